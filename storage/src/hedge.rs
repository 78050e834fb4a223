//! When a CQL request is sent a second time: only when it is an outlier.
//!
//! A request (a read, or one of an append's idempotent writes) still unanswered after
//! [`Hedge::delay`] is sent once more, to the next node of its load-balancing plan, and the first
//! answer wins (the driver's speculative execution). That saves the requests a stalled node
//! coordinates: a node paused with its connections open otherwise fails each of them after the
//! full request timeout.
//!
//! The delay is [`FACTOR`] times the median of the last [`WINDOW`] requests, kept between a floor
//! and a ceiling. A stalled node coordinates a minority of them, so the median stays the healthy
//! nodes' and its requests are hedged after the floor. When the whole cluster is slow (overload),
//! the median rises with it and only requests slower than the ceiling are sent twice, where a
//! fixed delay would double the requests of a cluster that has no capacity to spare. The ceiling
//! (half the request timeout) leaves a second copy time to be answered: on a machine where even
//! a healthy median is a fifth of the timeout, a delay of four medians would send it too late to
//! help. It is off unless [`crate::cql::CqlConfig::hedge_after`] sets the floor: on a cluster
//! already short of CPU even outliers' second copies cost more than they save (docs/storage.md).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use scylla::policies::speculative_execution::{Context, SpeculativeExecutionPolicy};

/// How many times slower than the median request a request must be to be hedged.
pub const FACTOR: u32 = 4;
/// How many recent requests the median is taken over.
pub const WINDOW: usize = 64;

/// The latest requests' durations and the delay after which a request is hedged.
#[derive(Debug)]
pub struct Hedge {
    floor: Duration,
    ceiling: Duration,
    recent: Mutex<Recent>,
    /// The median of `recent`, in microseconds (0 before the first read).
    median_us: AtomicU64,
}

#[derive(Debug)]
struct Recent {
    micros: [u32; WINDOW],
    next: usize,
    filled: usize,
}

impl Hedge {
    /// A hedge that never waits less than `floor`, nor more than `ceiling` (raised to `floor`
    /// when lower).
    pub fn new(floor: Duration, ceiling: Duration) -> Arc<Self> {
        Arc::new(Self {
            floor,
            ceiling: ceiling.max(floor),
            recent: Mutex::new(Recent { micros: [0; WINDOW], next: 0, filled: 0 }),
            median_us: AtomicU64::new(0),
        })
    }

    /// Notes how long a request took (answered, failed or timed out alike).
    pub fn record(&self, took: Duration) {
        let micros = u32::try_from(took.as_micros()).unwrap_or(u32::MAX);
        let mut recent = self.recent.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let slot = recent.next;
        recent.micros[slot] = micros;
        recent.next = (slot + 1) % WINDOW;
        recent.filled = (recent.filled + 1).min(WINDOW);
        let mut sorted = recent.micros;
        let filled = &mut sorted[..recent.filled];
        let middle = filled.len() / 2;
        let (_, median, _) = filled.select_nth_unstable(middle);
        self.median_us.store(u64::from(*median), Ordering::Relaxed);
    }

    /// How long a request waits for its first node before it is sent to the next.
    pub fn delay(&self) -> Duration {
        let median = Duration::from_micros(self.median_us.load(Ordering::Relaxed));
        (median * FACTOR).clamp(self.floor, self.ceiling)
    }

    /// The driver policy that asks this hedge (one extra attempt at most).
    pub fn policy(self: &Arc<Self>) -> Arc<dyn SpeculativeExecutionPolicy> {
        Arc::new(HedgePolicy(self.clone()))
    }
}

#[derive(Debug)]
struct HedgePolicy(Arc<Hedge>);

impl SpeculativeExecutionPolicy for HedgePolicy {
    fn max_retry_count(&self, _: &Context) -> usize {
        1
    }

    fn retry_interval(&self, _: &Context) -> Duration {
        self.0.delay()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLOOR: Duration = Duration::from_millis(200);
    const CEILING: Duration = Duration::from_millis(500);

    fn hedge_after(reads: impl IntoIterator<Item = u64>) -> Arc<Hedge> {
        let hedge = Hedge::new(FLOOR, CEILING);
        for millis in reads {
            hedge.record(Duration::from_millis(millis));
        }
        hedge
    }

    #[test]
    fn healthy_requests_are_hedged_after_the_floor() {
        assert_eq!(Hedge::new(FLOOR, CEILING).delay(), FLOOR, "before any request");
        assert_eq!(hedge_after([2, 3, 5, 4, 2, 40]).delay(), FLOOR);
    }

    #[test]
    fn a_stalled_node_among_three_does_not_move_the_delay() {
        // One request in three waits out the hedge, the other two are quick.
        let hedge = hedge_after((0..WINDOW as u64 * 2).map(|i| if i % 3 == 0 { 1_000 } else { 5 }));
        assert_eq!(hedge.delay(), FLOOR);
    }

    #[test]
    fn a_slower_cluster_waits_longer_but_never_past_the_ceiling() {
        assert_eq!(hedge_after((0..WINDOW).map(|_| 90)).delay(), Duration::from_millis(360));
        assert_eq!(hedge_after((0..WINDOW as u64).map(|i| 300 + i % 50)).delay(), CEILING);
    }

    #[test]
    fn a_ceiling_below_the_floor_is_the_floor() {
        let hedge = Hedge::new(FLOOR, FLOOR / 2);
        hedge.record(Duration::from_secs(1));
        assert_eq!(hedge.delay(), FLOOR);
    }

    #[test]
    fn the_median_follows_the_latest_requests_only() {
        let hedge = hedge_after((0..WINDOW).map(|_| 300));
        assert_eq!(hedge.delay(), CEILING);
        for _ in 0..WINDOW / 2 + 1 {
            hedge.record(Duration::from_millis(3));
        }
        assert_eq!(hedge.delay(), FLOOR, "the cluster is quick again");
    }
}
