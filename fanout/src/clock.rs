//! The clock that stamps `ts` on sequenced messages.

/// Gives the wall-clock time stamped on a room's new message.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch, for a message of `room`.
    fn stamp_ms(&self, room: &str) -> i64;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn stamp_ms(&self, _room: &str) -> i64 {
        protocol::now_ms()
    }
}
