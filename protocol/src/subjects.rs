//! The NATS subject scheme (see docs/architecture.md).
//!
//! Room names never contain `.`, `*`, `>` or spaces, so they are safe as a subject token.

/// JetStream stream holding accepted sends until a fanout worker has stored them.
pub const SEND_STREAM: &str = "CHAT_SEND";

/// Subject of accepted sends for a room (captured by [`SEND_STREAM`]).
pub fn send(room: &str) -> String {
    format!("chat.send.{room}")
}

/// Wildcard matching every room's sends.
pub const SEND_ALL: &str = "chat.send.>";

/// Core NATS subject where fanout publishes a room's sequenced messages to gateways.
pub fn deliver(room: &str) -> String {
    format!("chat.deliver.{room}")
}

/// Core NATS subject where every process answers journey queries (payload: a message id)
/// with what its journey recorder holds.
pub const JOURNAL_QUERY: &str = "chat.journal.query";

/// Core NATS subject for a room's presence and typing events between gateways.
pub fn events(room: &str) -> String {
    format!("chat.events.{room}")
}
