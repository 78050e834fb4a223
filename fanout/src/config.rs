//! Tuning of a fanout worker.

/// Tuning of a fanout worker.
#[derive(Debug, Clone)]
pub struct FanoutConfig {
    /// Most sends taken off the bus at once.
    pub max_batch: usize,
    /// Rooms whose last seq is cached before the cache is cleared.
    pub max_cached_rooms: usize,
    /// Attempts to sequence a room after conflicts with another writer.
    pub conflict_retries: usize,
}

impl Default for FanoutConfig {
    fn default() -> Self {
        Self { max_batch: 1024, max_cached_rooms: 100_000, conflict_retries: 50 }
    }
}
