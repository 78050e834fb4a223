//! The clock that stamps `ts` on sequenced messages and tells deadlines, and the source of
//! message ids. Both are injected so a decision log can record them and a replay give them
//! back ([`crate::decision_log`], [`crate::replay`]).

use uuid::Uuid;

/// Gives the wall-clock time stamped on a room's new message and checked against deadlines.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch, for a message of `room`.
    fn stamp_ms(&self, room: &str) -> i64;

    /// Milliseconds since the Unix epoch, for checking the deadlines of `room`'s sends (the
    /// true time: a skewed stamp must not expire sends).
    fn now_ms(&self, _room: &str) -> i64 {
        protocol::now_ms()
    }
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn stamp_ms(&self, _room: &str) -> i64 {
        protocol::now_ms()
    }
}

/// Gives the id of a room's new message.
pub trait IdSource: Send + Sync + 'static {
    /// A fresh id for a new message of `room`.
    fn next_id(&self, room: &str) -> Uuid;
}

/// Time-ordered random ids (UUID v7).
#[derive(Debug, Clone, Copy, Default)]
pub struct V7Ids;

impl IdSource for V7Ids {
    fn next_id(&self, _room: &str) -> Uuid {
        Uuid::now_v7()
    }
}
