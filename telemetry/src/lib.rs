//! Evidence every message leaves behind:
//!
//! - [`trace`]: the W3C trace context a message carries through every process;
//! - [`journal`]: a bounded in-memory flight recorder of each message's hops in this process;
//! - [`metrics`]: the Prometheus metric catalogue (docs/metrics.md);
//! - [`logging`]: tracing subscriber setup (text or JSON logs).

pub mod journal;
pub mod logging;
pub mod metrics;
pub mod trace;
pub mod waits;
