//! gateway (being written).
