//! Load shedding for sends: a limit on the sends one gateway process has handed to the bus and
//! not yet answered. Past the limit a send is answered `unavailable` at once, before it is
//! published, so it is surely not stored and the client may retry it at once.
//!
//! Without a limit, sends offered faster than the workers sequence them queue in the bus until
//! their deadline: under a 4× overload every send then waited its full deadline and margin (11 s)
//! and the gateways asked the store about tens of thousands of them at once
//! (docs/benchmarks.md). A fixed cap bounds that queue, but an admitted send waits about
//! `in flight / answers per second` (Little's law), so a cap that suits a fast cluster lets a
//! slower one (a ring of replicas, a store warming up) queue sends past their deadline. So the
//! limit is the lower of the cap (`--max-sends-in-flight`) and what this gateway was answered
//! lately times a target wait (half the deadline), and never below a floor, so a burst after a
//! quiet spell is admitted while the answer rate catches up. The cap counts every send awaiting
//! its answer; the limit counts only those within their deadline, the workers' queue: a send past
//! it waits only for a late answer or the store's, and after a NATS outage thousands of those
//! would otherwise hold the limit at its floor until they are answered.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use telemetry::metrics::IntGauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Sends in flight that are always admitted (under the cap), whatever the answer rate: a burst
/// after a quiet spell, when the measured rate is near zero.
pub const ADMISSION_FLOOR: usize = 1_024;

/// How often the answer rate is measured.
const RATE_WINDOW: Duration = Duration::from_millis(250);

/// The sends of one gateway process awaiting their answer, up to a limit.
pub struct SendAdmission {
    permits: Arc<Semaphore>,
    cap: usize,
    /// Whether the answer rate may lower the limit: not when there is no cap at all, nor when
    /// the cap is at or below the floor.
    follows_answers: bool,
    target_wait: Duration,
    answers: Arc<AtomicU64>,
    /// Admitted sends still within their deadline: the ones the limit counts.
    waiting: Arc<AtomicUsize>,
    rate: Mutex<AnswerRate>,
    in_flight: IntGauge,
    limit: IntGauge,
}

/// The answer rate measured over the last windows.
struct AnswerRate {
    window_start: Instant,
    answers_at_start: u64,
    /// Answers per second, smoothed over windows.
    per_sec: f64,
}

/// One admitted send's place; given back (counted as answered, and the in-flight gauge lowered)
/// on drop.
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
    answers: Arc<AtomicU64>,
    /// `Some` while the send is within its deadline and counted in [`SendAdmission`]'s limit.
    waiting: Option<Arc<AtomicUsize>>,
    in_flight: IntGauge,
}

impl Admitted {
    /// The send's deadline has passed: no worker stores it now (it only waits for a late answer
    /// or the store's), so it no longer counts against the limit, which is about the workers'
    /// queue. It still holds its place under the cap.
    pub fn past_deadline(&mut self) {
        if let Some(waiting) = self.waiting.take() {
            waiting.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl SendAdmission {
    /// At most `cap` sends in flight (0: no limit at all), and no more than the answers of the
    /// last moments times `target_wait`, but at least [`ADMISSION_FLOOR`]; counted in
    /// `in_flight`, the limit in force shown in `limit`.
    pub fn new(cap: usize, target_wait: Duration, in_flight: IntGauge, limit: IntGauge) -> Self {
        let follows_answers = cap > ADMISSION_FLOOR;
        let cap = if cap == 0 { Semaphore::MAX_PERMITS } else { cap };
        limit.set(i64::try_from(cap).unwrap_or(i64::MAX));
        Self {
            permits: Arc::new(Semaphore::new(cap)),
            cap,
            follows_answers,
            target_wait,
            answers: Arc::new(AtomicU64::new(0)),
            waiting: Arc::new(AtomicUsize::new(0)),
            rate: Mutex::new(AnswerRate { window_start: Instant::now(), answers_at_start: 0, per_sec: 0.0 }),
            in_flight,
            limit,
        }
    }

    /// A place for one more send, or `None` when the limit is reached: the cap counts every send
    /// awaiting its answer, the limit those still within their deadline.
    pub fn try_admit(&self) -> Option<Admitted> {
        if self.waiting.load(Ordering::Relaxed) >= self.limit_now(Instant::now()) {
            return None;
        }
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        self.waiting.fetch_add(1, Ordering::Relaxed);
        self.in_flight.inc();
        Some(Admitted {
            _permit: permit,
            answers: self.answers.clone(),
            waiting: Some(self.waiting.clone()),
            in_flight: self.in_flight.clone(),
        })
    }

    /// The limit in force at `now`: the cap, or the answer rate times the target wait if lower,
    /// but not below the floor. Measures the rate again once a window has passed.
    fn limit_now(&self, now: Instant) -> usize {
        if !self.follows_answers {
            return self.cap;
        }
        let mut rate = self.rate.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now.saturating_duration_since(rate.window_start);
        if elapsed >= RATE_WINDOW {
            let answers = self.answers.load(Ordering::Relaxed);
            let window_rate = (answers - rate.answers_at_start) as f64 / elapsed.as_secs_f64();
            // A long window (a quiet spell with no sends offered) is no trend to smooth: take it alone.
            rate.per_sec = if elapsed > 4 * RATE_WINDOW { window_rate } else { (rate.per_sec + window_rate) / 2.0 };
            rate.window_start = now;
            rate.answers_at_start = answers;
            let limit = limit_for(rate.per_sec, self.target_wait, self.cap);
            self.limit.set(i64::try_from(limit).unwrap_or(i64::MAX));
            return limit;
        }
        limit_for(rate.per_sec, self.target_wait, self.cap)
    }
}

/// The sends in flight that `answers_per_sec` clears within `target_wait`, between the floor and
/// `cap`.
fn limit_for(answers_per_sec: f64, target_wait: Duration, cap: usize) -> usize {
    let cleared = (answers_per_sec * target_wait.as_secs_f64()) as usize;
    cleared.clamp(ADMISSION_FLOOR.min(cap), cap)
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.past_deadline();
        self.answers.fetch_add(1, Ordering::Relaxed);
        self.in_flight.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(cap: usize) -> SendAdmission {
        SendAdmission::new(cap, Duration::from_millis(2_500), IntGauge::default(), IntGauge::default())
    }

    #[test]
    fn admits_up_to_the_cap_and_again_once_a_place_is_given_back() {
        let gauge = IntGauge::default();
        let admission = SendAdmission::new(2, Duration::from_secs(2), gauge.clone(), IntGauge::default());
        let first = admission.try_admit().expect("first admitted");
        let _second = admission.try_admit().expect("second admitted");
        assert!(admission.try_admit().is_none(), "a third is over the cap");
        assert_eq!(gauge.get(), 2);
        drop(first);
        assert_eq!(gauge.get(), 1);
        assert!(admission.try_admit().is_some(), "a freed place is taken again");
    }

    #[test]
    fn zero_means_no_cap() {
        let admission = admission(0);
        let held: Vec<Admitted> = (0..10_000).map_while(|_| admission.try_admit()).collect();
        assert_eq!(held.len(), 10_000);
    }

    #[test]
    fn the_limit_is_what_the_answer_rate_clears_in_the_target_wait_between_floor_and_cap() {
        let wait = Duration::from_millis(2_500);
        assert_eq!(limit_for(0.0, wait, 4_096), ADMISSION_FLOOR, "a quiet gateway still admits a burst");
        assert_eq!(limit_for(1_000.0, wait, 4_096), 2_500, "1,000 answers/s clear 2,500 sends in 2.5 s");
        assert_eq!(limit_for(100_000.0, wait, 4_096), 4_096, "never above the cap");
        assert_eq!(limit_for(0.0, wait, 100), 100, "a cap below the floor is the limit");
    }

    #[test]
    fn a_gateway_answered_slowly_admits_only_what_it_clears_in_the_target_wait() {
        let limit = IntGauge::default();
        let admission = SendAdmission::new(4_096, Duration::from_millis(2_500), IntGauge::default(), limit.clone());
        assert_eq!(limit.get(), 4_096);
        // A burst from quiet: the floor is admitted, then no more while nothing is answered.
        let mut held: Vec<Admitted> = (0..5_000).map_while(|_| admission.try_admit()).collect();
        assert_eq!(held.len(), ADMISSION_FLOOR);
        // 400 answers over one window (1,600/s measured, halved by smoothing from 0: 800/s):
        // 2,000 sends clear in 2.5 s.
        held.truncate(held.len() - 400);
        let later = Instant::now() + RATE_WINDOW;
        let slow = admission.limit_now(later);
        assert!((1_950..=2_000).contains(&slow), "{slow}");
        assert_eq!(limit.get(), slow as i64);
        assert!(admission.try_admit().is_some(), "624 in flight, under the limit");
        // Sends past their deadline hold their place under the cap but not under the limit.
        let mut held: Vec<Admitted> = held.into_iter().chain((0..5_000).map_while(|_| admission.try_admit())).collect();
        assert_eq!(held.len(), slow);
        for send in held.iter_mut().take(1_000) {
            send.past_deadline();
        }
        held.extend((0..5_000).map_while(|_| admission.try_admit()));
        assert_eq!(held.len(), slow + 1_000, "the limit counts only sends within their deadline");
        // Answers as fast as the cap clears: the cap is the limit again.
        held.clear();
        admission.answers.fetch_add(100_000, Ordering::Relaxed);
        assert_eq!(admission.limit_now(later + RATE_WINDOW), 4_096);
    }
}
