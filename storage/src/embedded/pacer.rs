//! When the writer commits: at once after a quiet spell, a moment later while appends keep
//! coming, so that several sends share one fsync.
//!
//! An fsync costs the same CPU for one message as for fifty (on a virtual disk, most of it is
//! the doorbell to the host). At 2,000 sends/s each fsync used to carry about one send. The
//! pacer lets commits start at most once per window, but only holds a commit when the recent
//! rate of appends says at least one more will join it meanwhile: a lone send, or sends below
//! one per window (about 330 per second with the default 3 ms), are committed at once and pay
//! nothing.

use std::time::{Duration, Instant};

/// Time constant of the smoothed rate of appends: it follows changes within a few tenths of
/// a second, whatever the number of commits meanwhile.
const RATE_MEMORY: Duration = Duration::from_millis(100);

/// Paces the writer's commits.
#[derive(Debug)]
pub(super) struct CommitPacer {
    window: Duration,
    last_start: Option<Instant>,
    /// Appends per second, smoothed over recent commits.
    rate: f64,
}

impl CommitPacer {
    /// A pacer letting commits start at most once per `window` under load (zero: never holds).
    pub(super) fn new(window: Duration) -> Self {
        Self { window, last_start: None, rate: 0.0 }
    }

    /// How long to hold the next commit: the rest of the window, if appends are expected
    /// meanwhile (whether one is queued yet or not).
    pub(super) fn hold(&self, now: Instant) -> Duration {
        let Some(last_start) = self.last_start else { return Duration::ZERO };
        let remaining = self.window.saturating_sub(now.saturating_duration_since(last_start));
        // Worth holding only if at least one more append is expected meanwhile.
        if self.rate * remaining.as_secs_f64() >= 1.0 {
            remaining
        } else {
            Duration::ZERO
        }
    }

    /// Records that a commit of `appends` starts at `now`.
    pub(super) fn started(&mut self, now: Instant, appends: usize) {
        if let Some(last_start) = self.last_start {
            let since = now.saturating_duration_since(last_start).as_secs_f64().max(1e-6);
            let weight = 1.0 - (-since / RATE_MEMORY.as_secs_f64()).exp();
            self.rate = (1.0 - weight) * self.rate + weight * appends as f64 / since;
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
    fn steady(pacer: &mut CommitPacer, start: Instant, every: Duration, appends: usize, after: Duration) -> Duration {
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
        let mut pacer = CommitPacer::new(WINDOW);
        assert_eq!(pacer.hold(start), Duration::ZERO);
        pacer.started(start, 1);
        // A second, lone append 10 ms later: the rate is low, nothing to wait for.
        assert_eq!(pacer.hold(start + Duration::from_millis(10)), Duration::ZERO);
    }

    #[test]
    fn under_load_a_commit_waits_out_the_rest_of_the_window() {
        let start = Instant::now();
        let mut pacer = CommitPacer::new(WINDOW);
        // 2,000 appends/s: a commit of 3 every 1.5 ms.
        let hold = steady(&mut pacer, start, WINDOW, 3, Duration::from_micros(200));
        assert_eq!(hold, Duration::from_micros(1_300));
    }

    #[test]
    fn a_rate_too_low_to_fill_the_window_is_not_held() {
        let start = Instant::now();
        let mut pacer = CommitPacer::new(WINDOW);
        // 500 appends/s, one per commit: under one more expected within 1.3 ms.
        let hold = steady(&mut pacer, start, Duration::from_millis(2), 1, Duration::from_micros(200));
        assert_eq!(hold, Duration::ZERO);
    }

    #[test]
    fn a_commit_later_than_the_window_is_not_held_and_a_zero_window_never_holds() {
        let start = Instant::now();
        let mut pacer = CommitPacer::new(WINDOW);
        assert_eq!(steady(&mut pacer, start, WINDOW, 3, Duration::from_millis(2)), Duration::ZERO);
        let mut off = CommitPacer::new(Duration::ZERO);
        assert_eq!(steady(&mut off, start, WINDOW, 30, Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn the_rate_forgets_a_burst() {
        let start = Instant::now();
        let mut pacer = CommitPacer::new(WINDOW);
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
