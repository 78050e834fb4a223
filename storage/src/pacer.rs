//! When work that is cheaper in bulk starts: at once after a quiet spell, a moment later while
//! items keep coming, so that several share it. The embedded store paces its commits with it
//! (several sends share one fsync), and the all-in-one's fanout worker the batches it takes
//! (several sends share one batch, and so one commit).
//!
//! An fsync costs the same CPU for one message as for fifty (on a virtual disk, most of it is
//! the doorbell to the host). At 2,000 sends/s each fsync used to carry about one send. The
//! pacer lets work start at most once per window, but only holds it when the recent rate of
//! items says at least one more will join meanwhile: a lone send, or sends below one per window
//! (about 330 per second with the default 3 ms), start at once and pay nothing.

use std::time::{Duration, Instant};

/// Time constant of the smoothed rate of items: it follows changes within a few tenths of
/// a second, whatever the number of commits meanwhile.
const RATE_MEMORY: Duration = Duration::from_millis(100);

/// Paces work (a commit, a batch) under load.
#[derive(Debug)]
pub struct Pacer {
    window: Duration,
    last_start: Option<Instant>,
    /// Items per second, smoothed over recent starts.
    rate: f64,
}

impl Pacer {
    /// A pacer letting work start at most once per `window` under load (zero: never holds).
    pub fn new(window: Duration) -> Self {
        Self { window, last_start: None, rate: 0.0 }
    }

    /// How long to hold the next start: the rest of the window, if items are expected
    /// meanwhile (whether one is queued yet or not).
    pub fn hold(&self, now: Instant) -> Duration {
        let Some(last_start) = self.last_start else { return Duration::ZERO };
        let remaining = self.window.saturating_sub(now.saturating_duration_since(last_start));
        // Worth holding only if at least one more item is expected meanwhile.
        if self.rate * remaining.as_secs_f64() >= 1.0 {
            remaining
        } else {
            Duration::ZERO
        }
    }

    /// Records that work on `items` starts at `now`.
    pub fn started(&mut self, now: Instant, items: usize) {
        if let Some(last_start) = self.last_start {
            let since = now.saturating_duration_since(last_start).as_secs_f64().max(1e-6);
            let weight = 1.0 - (-since / RATE_MEMORY.as_secs_f64()).exp();
            self.rate = (1.0 - weight) * self.rate + weight * items as f64 / since;
        }
        self.last_start = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_micros(1_500);

    /// Feeds the pacer commits of `appends` every `every`, holding as it says; returns the
    /// hold it asks for at the last arrival, which comes `after` the last commit started.
    fn steady(pacer: &mut Pacer, start: Instant, every: Duration, appends: usize, after: Duration) -> Duration {
        let mut now = start;
        for _ in 0..500 {
            pacer.started(now, appends);
            now += every;
        }
        pacer.hold(now - every + after)
    }

    #[test]
    fn the_first_commit_and_one_after_a_quiet_spell_are_not_held() {
        let start = Instant::now();
        let mut pacer = Pacer::new(WINDOW);
        assert_eq!(pacer.hold(start), Duration::ZERO);
        pacer.started(start, 1);
        // A second, lone append 10 ms later: the rate is low, nothing to wait for.
        assert_eq!(pacer.hold(start + Duration::from_millis(10)), Duration::ZERO);
    }

    #[test]
    fn under_load_a_commit_waits_out_the_rest_of_the_window() {
        let start = Instant::now();
        let mut pacer = Pacer::new(WINDOW);
        // 2,000 appends/s: a commit of 3 every 1.5 ms.
        let hold = steady(&mut pacer, start, WINDOW, 3, Duration::from_micros(200));
        assert_eq!(hold, Duration::from_micros(1_300));
    }

    #[test]
    fn a_rate_too_low_to_fill_the_window_is_not_held() {
        let start = Instant::now();
        let mut pacer = Pacer::new(WINDOW);
        // 500 appends/s, one per commit: under one more expected within 1.3 ms.
        let hold = steady(&mut pacer, start, Duration::from_millis(2), 1, Duration::from_micros(200));
        assert_eq!(hold, Duration::ZERO);
    }

    #[test]
    fn a_commit_later_than_the_window_is_not_held_and_a_zero_window_never_holds() {
        let start = Instant::now();
        let mut pacer = Pacer::new(WINDOW);
        assert_eq!(steady(&mut pacer, start, WINDOW, 3, Duration::from_millis(2)), Duration::ZERO);
        let mut off = Pacer::new(Duration::ZERO);
        assert_eq!(steady(&mut off, start, WINDOW, 30, Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn the_rate_forgets_a_burst() {
        let start = Instant::now();
        let mut pacer = Pacer::new(WINDOW);
        let now = start + Duration::from_secs(1);
        assert!(steady(&mut pacer, start, WINDOW, 10, Duration::ZERO) > Duration::ZERO);
        // Then one append per 50 ms for half a second.
        let mut at = now;
        for _ in 0..10 {
            at += Duration::from_millis(50);
            pacer.started(at, 1);
        }
        assert_eq!(pacer.hold(at + Duration::from_micros(100)), Duration::ZERO);
    }
}
