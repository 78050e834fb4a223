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
    /// While sends keep coming, batches are taken at most once per window: the rest of it is
    /// waited out first when the recent rate says more sends will arrive meanwhile, so that
    /// they share one batch (and its store commit) instead of waiting for the next one. Zero
    /// (the default): a batch is taken as soon as the last one is done. The all-in-one sets it
    /// to its store's commit window ([`storage::pacer`]).
    pub batch_window: std::time::Duration,
}

impl FanoutConfig {
    /// Default `max_batch` (`chat fanout --max-batch`).
    pub const DEFAULT_MAX_BATCH: usize = 1024;
    /// Default `max_cached_rooms`.
    pub const DEFAULT_MAX_CACHED_ROOMS: usize = 100_000;
    /// Default `conflict_retries`.
    pub const DEFAULT_CONFLICT_RETRIES: usize = 50;
}

impl Default for FanoutConfig {
    fn default() -> Self {
        Self {
            max_batch: Self::DEFAULT_MAX_BATCH,
            max_cached_rooms: Self::DEFAULT_MAX_CACHED_ROOMS,
            conflict_retries: Self::DEFAULT_CONFLICT_RETRIES,
            batch_window: std::time::Duration::ZERO,
        }
    }
}
