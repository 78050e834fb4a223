//! The chat wire contract (docs/protocol.md) as Rust types.
//!
//! - [`frames`]: every client and server frame, with parsing that turns bad input into the
//!   protocol's `error` codes instead of failing.
//! - [`names`]: validation of user, room and client message id names.
//! - [`chain`]: the message chain extension: digests chaining each room's messages, and checks.
//! - [`bus`]: what gateways and fanout workers say to each other over the bus.
//! - [`subjects`]: the NATS subject scheme.

pub mod bus;
pub mod chain;
pub mod frames;
pub mod names;
pub mod subjects;

pub use frames::{ChatMessage, ClientFrame, ErrorCode, Req, ServerFrame};

/// Milliseconds since the Unix epoch, as used by `ts` fields.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
