//! fanout (being written).
