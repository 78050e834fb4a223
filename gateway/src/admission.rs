//! Load shedding for sends: a limit on the sends one gateway process has handed to the bus and
//! not yet answered. Past the limit a send is answered `unavailable` at once, before it is
//! published, so it is surely not stored and the client may retry it at once.
//!
//! Without a limit, sends offered faster than the workers sequence them queue in the bus until
//! their deadline: under a 4× overload every send waited its full deadline and the gateway's
//! margin of the time (11 s), and the gateways asked the store about tens of thousands of them at
//! once (docs/benchmarks.md); today each would be answered `internal` (not known yet) at its
//! deadline. A fixed cap bounds that queue, but an admitted send waits about
//! `in flight / answers per second` (Little's law), so a cap that suits a fast cluster lets a
//! slower one (a ring of replicas, a store warming up) queue sends past their deadline. So the
//! limit is the lower of the cap (`--max-sends-in-flight`) and what the workers lately stored for
//! this gateway times a target wait, a third of the deadline: the pace swings (a ring's with its
//! compactions and pauses), and a wait of half the deadline left no room for a pace that halves,
//! so admitted sends were answered past their deadline (docs/benchmarks.md). The cap counts every
//! send awaiting its answer; the limit counts only those within their deadline, the workers'
//! queue: a send past it, answered `internal`, waits only for the workers' late word, and after
//! a NATS outage thousands of those would otherwise hold the limit down until their word came.
//!
//! A falling answer rate is not always overload. When a worker dies, or NATS or the store stops
//! for a few seconds, answers stop while nothing is queued behind a slow worker; the sends wait
//! for the stall to end, and most are served once it does. The answer rate alone reads that as
//! overload and sheds hundreds of sends at once (docs/benchmarks.md). So the limit follows the
//! stored rate only while the queue stands, as CoDel tells a standing queue from a burst
//! (Nichols and Jacobson, "Controlling Queue Delay", 2012) by how long what leaves it waited:
//! while half the sends stored in each of the last two windows waited at least a twentieth of
//! the deadline (250 ms, the send→ack SLO), the limit is the stored pace; once most in a window
//! are stored sooner, the limit is the cap. (Two windows, because the first answers after a stall
//! all waited it out.)
//!
//! Only stored sends went through the workers' queue, so only they measure its pace and whether
//! it stands. While none are stored but sends wait (a stall, even if some are refused: publishes
//! that time out in a NATS freeze), the pace and the verdict of the windows before it hold: a
//! stall says nothing of how fast the workers store once it ends. After a quiet spell (nothing
//! answered, nothing waiting) nothing is known of the queue a burst would meet: it is taken to
//! stand, with a floor of [`ADMISSION_FLOOR`] so the burst is admitted while its pace is
//! measured. Once the pace is measured from stored sends the floor is [`MEASURED_FLOOR`]: a ring
//! of replicas may store only a few hundred sends a second for a gateway, and 1,024 sends in
//! flight there wait past their deadline (docs/benchmarks.md).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use telemetry::metrics::IntGauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Sends in flight that are always admitted (under the cap) after a quiet spell, before the
/// workers' pace is measured: a burst onto an idle gateway.
pub const ADMISSION_FLOOR: usize = 1_024;

/// Sends in flight that are always admitted (under the cap) once the pace of a standing queue is
/// measured from stored sends.
pub const MEASURED_FLOOR: usize = 128;

/// How often the stored rate is measured.
const RATE_WINDOW: Duration = Duration::from_millis(250);

/// The target wait of an admitted send in a standing queue is the deadline divided by this.
const TARGET_SHARE_OF_DEADLINE: u32 = 3;

/// A window is slow when half the sends stored in it waited at least the deadline divided by
/// this.
const SLOW_SHARE_OF_DEADLINE: u32 = 20;

/// The queue stands after this many slow windows in a row: the first answers after a stall all
/// waited out the stall, and one window of them is no standing queue.
const STANDING_WINDOWS: u32 = 2;

/// The sends of one gateway process awaiting their answer, up to a limit.
pub struct SendAdmission {
    permits: Arc<Semaphore>,
    cap: usize,
    /// Whether the stored rate may lower the limit: not when there is no cap at all, nor when
    /// the cap is at or below [`ADMISSION_FLOOR`].
    follows_stored_rate: bool,
    target_wait: Duration,
    answers: Arc<Answers>,
    /// Admitted sends still within their deadline: the ones the limit counts.
    waiting: Arc<AtomicUsize>,
    rate: Mutex<AnswerRate>,
    in_flight: IntGauge,
    limit: IntGauge,
}

/// The answers given so far, how many of them said the send was stored, and how many of those
/// came slowly.
struct Answers {
    total: AtomicU64,
    stored: AtomicU64,
    /// Stored answers that came at least `slow_after` after their send was admitted.
    stored_slowly: AtomicU64,
    slow_after: Duration,
}

/// The stored rate measured over the last windows, and whether the queue stands.
struct AnswerRate {
    window_start: Instant,
    answers_at_start: u64,
    stored_at_start: u64,
    stored_slowly_at_start: u64,
    /// Sends stored per second, smoothed over windows.
    stored_per_sec: f64,
    /// Slow windows in a row, up to [`STANDING_WINDOWS`] (windows with nothing stored do not
    /// count, nor break the run).
    slow_windows: u32,
    /// Whether the pace was measured from stored sends since the last quiet spell.
    measured: bool,
}

impl AnswerRate {
    /// Whether the queue stands: the limit follows the stored rate only then.
    fn standing(&self) -> bool {
        self.slow_windows >= STANDING_WINDOWS
    }
}

/// One admitted send's place; given back (counted as answered, and the in-flight gauge lowered)
/// on drop.
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
    admitted_at: Instant,
    answers: Arc<Answers>,
    /// Whether the answer said the send was stored.
    stored: bool,
    /// `Some` while the send is within its deadline and counted in [`SendAdmission`]'s limit.
    waiting: Option<Arc<AtomicUsize>>,
    in_flight: IntGauge,
}

impl Admitted {
    /// The answer says the send is stored (acked, or a duplicate of a stored one): it came
    /// through the workers' queue, so how long it waited tells whether that queue stands.
    /// Refusals do not: a send refused at its deadline in a stall waited as long as one queued.
    pub fn stored(&mut self) {
        self.stored = true;
    }

    /// The send's deadline has passed: no worker stores it now (answered `internal`, it only
    /// waits for the workers' late word), so it no longer counts against the limit, which is
    /// about the workers' queue. It still holds its place under the cap.
    pub fn past_deadline(&mut self) {
        if let Some(waiting) = self.waiting.take() {
            waiting.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl SendAdmission {
    /// At most `cap` sends in flight (0: no limit at all), and, while the queue stands, no more
    /// than the sends stored in the last moments clear in a third of a send's `deadline`, but at
    /// least a floor ([`ADMISSION_FLOOR`], or [`MEASURED_FLOOR`] once the pace is measured);
    /// counted in `in_flight`, the limit in force shown in `limit`.
    pub fn new(cap: usize, deadline: Duration, in_flight: IntGauge, limit: IntGauge) -> Self {
        let follows_stored_rate = cap > ADMISSION_FLOOR;
        let cap = if cap == 0 { Semaphore::MAX_PERMITS } else { cap };
        limit.set(i64::try_from(cap).unwrap_or(i64::MAX));
        Self {
            permits: Arc::new(Semaphore::new(cap)),
            cap,
            follows_stored_rate,
            target_wait: deadline / TARGET_SHARE_OF_DEADLINE,
            answers: Arc::new(Answers {
                total: AtomicU64::new(0),
                stored: AtomicU64::new(0),
                stored_slowly: AtomicU64::new(0),
                slow_after: deadline / SLOW_SHARE_OF_DEADLINE,
            }),
            waiting: Arc::new(AtomicUsize::new(0)),
            rate: Mutex::new(AnswerRate {
                window_start: Instant::now(),
                answers_at_start: 0,
                stored_at_start: 0,
                stored_slowly_at_start: 0,
                stored_per_sec: 0.0,
                slow_windows: STANDING_WINDOWS,
                measured: false,
            }),
            in_flight,
            limit,
        }
    }

    /// A place for one more send, or `None` when the limit is reached: the cap counts every send
    /// awaiting its answer, the limit those still within their deadline.
    pub fn try_admit(&self) -> Option<Admitted> {
        let now = Instant::now();
        if self.waiting.load(Ordering::Relaxed) >= self.limit_now(now) {
            return None;
        }
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        self.waiting.fetch_add(1, Ordering::Relaxed);
        self.in_flight.inc();
        Some(Admitted {
            _permit: permit,
            admitted_at: now,
            answers: self.answers.clone(),
            stored: false,
            waiting: Some(self.waiting.clone()),
            in_flight: self.in_flight.clone(),
        })
    }

    /// The limit in force at `now`: while the queue stands, the answer rate times the target
    /// wait, between the floor and the cap; otherwise the cap. Measures the rate, and whether
    /// the queue stands, again once a window has passed.
    fn limit_now(&self, now: Instant) -> usize {
        if !self.follows_stored_rate {
            return self.cap;
        }
        let mut rate = self.rate.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now.saturating_duration_since(rate.window_start);
        if elapsed >= RATE_WINDOW {
            let answers = self.answers.total.load(Ordering::Relaxed);
            let stored = self.answers.stored.load(Ordering::Relaxed);
            let stored_slowly = self.answers.stored_slowly.load(Ordering::Relaxed);
            let answered = answers - rate.answers_at_start;
            let (stored_now, slowly_now) = (stored - rate.stored_at_start, stored_slowly - rate.stored_slowly_at_start);
            let stalled = stored_now == 0 && self.waiting.load(Ordering::Relaxed) > 0;
            // A stall says nothing of the pace the workers store at once it ends: pace and
            // verdict hold.
            if !stalled {
                let window_rate = stored_now as f64 / elapsed.as_secs_f64();
                // A long window (a quiet spell with no sends offered) is no trend to smooth: take it alone.
                rate.stored_per_sec =
                    if elapsed > 4 * RATE_WINDOW { window_rate } else { (rate.stored_per_sec + window_rate) / 2.0 };
                if stored_now > 0 {
                    let slow = 2 * slowly_now >= stored_now;
                    rate.slow_windows = if slow { (rate.slow_windows + 1).min(STANDING_WINDOWS) } else { 0 };
                    rate.measured = true;
                } else if answered == 0 {
                    // Quiet: nothing is known about the queue a burst would meet; it is taken
                    // to stand, its pace unmeasured. (Refusals alone leave the verdict as it was.)
                    rate.slow_windows = STANDING_WINDOWS;
                    rate.measured = false;
                }
            }
            rate.window_start = now;
            rate.answers_at_start = answers;
            rate.stored_at_start = stored;
            rate.stored_slowly_at_start = stored_slowly;
            let limit = self.limit_given(&rate);
            self.limit.set(i64::try_from(limit).unwrap_or(i64::MAX));
            return limit;
        }
        self.limit_given(&rate)
    }

    /// The limit `rate` calls for: the cap unless the queue stands.
    fn limit_given(&self, rate: &AnswerRate) -> usize {
        if !rate.standing() {
            return self.cap;
        }
        let floor = if rate.measured { MEASURED_FLOOR } else { ADMISSION_FLOOR };
        limit_for(rate.stored_per_sec, self.target_wait, floor, self.cap)
    }
}

/// The sends in flight that `stored_per_sec` clears within `target_wait`, between `floor` and
/// `cap`.
fn limit_for(stored_per_sec: f64, target_wait: Duration, floor: usize, cap: usize) -> usize {
    let cleared = (stored_per_sec * target_wait.as_secs_f64()) as usize;
    cleared.clamp(floor.min(cap), cap)
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.past_deadline();
        if self.stored {
            if self.admitted_at.elapsed() >= self.answers.slow_after {
                self.answers.stored_slowly.fetch_add(1, Ordering::Relaxed);
            }
            self.answers.stored.fetch_add(1, Ordering::Relaxed);
        }
        self.answers.total.fetch_add(1, Ordering::Relaxed);
        self.in_flight.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A send's deadline, as the gateway's default.
    const DEADLINE: Duration = Duration::from_secs(5);

    fn admission(cap: usize) -> SendAdmission {
        SendAdmission::new(cap, DEADLINE, IntGauge::default(), IntGauge::default())
    }

    /// Answers `sends` stored, each as if admitted `waited` ago.
    fn answer_after(sends: impl IntoIterator<Item = Admitted>, waited: Duration) {
        for mut send in sends {
            send.stored();
            send.admitted_at = Instant::now().checked_sub(waited).expect("the clock is past the wait");
            drop(send);
        }
    }

    /// Admits `count` sends and answers them stored, each after `waited`.
    fn store_after(admission: &SendAdmission, count: usize, waited: Duration) {
        let sends: Vec<Admitted> = (0..count).map_while(|_| admission.try_admit()).collect();
        assert_eq!(sends.len(), count);
        answer_after(sends, waited);
    }

    /// A standing queue paced at 1,200 stored sends/s: 400 slow answers in each of two windows
    /// (1,600/s, smoothed from 0 to 800/s, then 1,200/s), which clear 2,000 sends in a third of
    /// the deadline. Returns the limit that pace sets.
    fn pace_a_standing_queue(admission: &SendAdmission) -> usize {
        for _ in 0..2 {
            store_after(admission, 400, Duration::from_millis(400));
            next_window(admission, 1);
        }
        admission.limit_now(Instant::now())
    }

    /// The limit once `windows` windows have passed since the last measure.
    fn next_window(admission: &SendAdmission, windows: u32) -> usize {
        let window_start = admission.rate.lock().expect("not poisoned").window_start;
        admission.limit_now(window_start + windows * RATE_WINDOW)
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
    fn the_limit_is_what_the_stored_rate_clears_in_the_target_wait_between_floor_and_cap() {
        let wait = Duration::from_millis(2_500);
        assert_eq!(
            limit_for(0.0, wait, ADMISSION_FLOOR, 4_096),
            ADMISSION_FLOOR,
            "a quiet gateway still admits a burst"
        );
        assert_eq!(
            limit_for(1_000.0, wait, ADMISSION_FLOOR, 4_096),
            2_500,
            "1,000 stored/s clear 2,500 sends in 2.5 s"
        );
        assert_eq!(limit_for(100_000.0, wait, ADMISSION_FLOOR, 4_096), 4_096, "never above the cap");
        assert_eq!(limit_for(0.0, wait, ADMISSION_FLOOR, 100), 100, "a cap below the floor is the limit");
        assert_eq!(limit_for(200.0, wait, MEASURED_FLOOR, 4_096), 500, "a measured slow pace is below the first floor");
    }

    #[test]
    fn a_gateway_answered_slowly_admits_only_what_it_clears_in_the_target_wait() {
        let limit = IntGauge::default();
        let admission = SendAdmission::new(4_096, DEADLINE, IntGauge::default(), limit.clone());
        assert_eq!(limit.get(), 4_096);
        // A burst from quiet: the floor is admitted, then no more while nothing is answered.
        let mut held: Vec<Admitted> = (0..5_000).map_while(|_| admission.try_admit()).collect();
        assert_eq!(held.len(), ADMISSION_FLOOR);
        // 400 slow answers over one window (1,600/s measured, halved by smoothing from 0:
        // 800/s): 1,333 sends clear in a third of the 5 s deadline.
        answer_after(held.split_off(held.len() - 400), Duration::from_millis(300));
        let slow = next_window(&admission, 1);
        assert!((1_300..=1_334).contains(&slow), "{slow}");
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
        // Slow answers, but as many as clear the cap: the cap is the limit again.
        answer_after(held.drain(..), Duration::from_millis(300));
        admission.answers.total.fetch_add(100_000, Ordering::Relaxed);
        admission.answers.stored.fetch_add(100_000, Ordering::Relaxed);
        admission.answers.stored_slowly.fetch_add(100_000, Ordering::Relaxed);
        assert_eq!(next_window(&admission, 1), 4_096);
    }

    #[test]
    fn a_stall_after_quick_answers_keeps_the_cap() {
        let admission = admission(4_096);
        // Quick answers: the queue does not stand, the cap is the limit.
        store_after(&admission, 100, Duration::from_millis(20));
        assert_eq!(next_window(&admission, 1), 4_096);
        // Then nothing is answered for windows on end while sends wait (a dead worker, NATS
        // stopped): the sends are admitted up to the cap, not shed at the floor.
        let mut held: Vec<Admitted> = (0..2_000).map_while(|_| admission.try_admit()).collect();
        assert_eq!(next_window(&admission, 1), 4_096, "no answers but sends waiting: a stall");
        assert_eq!(next_window(&admission, 1), 4_096);
        held.extend((0..5_000).map_while(|_| admission.try_admit()));
        assert_eq!(held.len(), 4_096);
        // The first of them are refused at their deadline (a publish timed out): slow answers,
        // but of sends that never went through the workers' queue. The cap holds.
        drop(held.drain(..500));
        assert_eq!(next_window(&admission, 1), 4_096, "slow refusals are no standing queue");
        // The stall ends: the first window of stored sends all waited it out; slow as they
        // are, one window of them is no standing queue, and the cap holds.
        answer_after(held.drain(..1_000), Duration::from_millis(600));
        assert_eq!(next_window(&admission, 1), 4_096, "one slow window after a stall");
    }

    #[test]
    fn a_partial_stall_keeps_the_cap_while_the_answers_that_come_are_quick() {
        let admission = admission(4_096);
        store_after(&admission, 500, Duration::from_millis(20));
        assert_eq!(next_window(&admission, 1), 4_096);
        // Then half the workers answer quickly and the other half's sends wait: the answer
        // rate falls to a few a second, but what is answered did not queue.
        let waiting: Vec<Admitted> = (0..1_500).map_while(|_| admission.try_admit()).collect();
        assert_eq!(waiting.len(), 1_500);
        store_after(&admission, 10, Duration::from_millis(30));
        assert_eq!(next_window(&admission, 1), 4_096, "the rate's limit would be the floor");
        let more: Vec<Admitted> = (0..5_000).map_while(|_| admission.try_admit()).collect();
        assert_eq!(waiting.len() + more.len(), 4_096);
    }

    #[test]
    fn a_stall_while_the_queue_stands_keeps_the_pace_measured_before_it() {
        let admission = admission(4_096);
        let paced = pace_a_standing_queue(&admission);
        assert!((1_950..=2_000).contains(&paced), "{paced}");
        // Then nothing is answered while sends wait: the limit keeps that pace rather than
        // falling to the floor, ready for the answers at the stall's end.
        let held: Vec<Admitted> = (0..1_500).map_while(|_| admission.try_admit()).collect();
        assert_eq!(held.len(), 1_500);
        assert_eq!(next_window(&admission, 1), paced);
        assert_eq!(next_window(&admission, 1), paced);
    }

    #[test]
    fn refusals_while_nothing_is_stored_keep_the_pace_measured_before() {
        let admission = admission(4_096);
        let paced = pace_a_standing_queue(&admission);
        // NATS stops: nothing is stored, and the sends that were in flight are refused as their
        // publish times out, while new ones wait. The refusals say nothing of the workers' pace.
        let mut held: Vec<Admitted> = (0..5_000).map_while(|_| admission.try_admit()).collect();
        assert_eq!(held.len(), paced);
        for _ in 0..4 {
            drop(held.drain(..200));
            assert_eq!(next_window(&admission, 1), paced, "refused while others wait");
        }
    }

    #[test]
    fn slow_answers_bring_the_limit_down_and_a_quiet_spell_the_floor_back() {
        let admission = admission(4_096);
        store_after(&admission, 100, Duration::from_millis(20));
        assert_eq!(next_window(&admission, 1), 4_096);
        // Most answers of the next two windows waited past a twentieth of the deadline: after
        // the first the cap holds (the answers that end a stall all waited it out); after the
        // second the queue stands, and the limit is the stored pace's: 400/s, smoothed from
        // 200/s to 350/s, clears 583 sends in a third of the deadline, under the floor of an
        // unmeasured pace.
        for window in 2..=3 {
            let mut sends: Vec<Admitted> = (0..100).map_while(|_| admission.try_admit()).collect();
            answer_after(sends.drain(..60), Duration::from_millis(400));
            answer_after(sends.drain(..), Duration::from_millis(10));
            let expected = if window == 2 { 4_096 } else { 583 };
            assert_eq!(next_window(&admission, 1), expected, "60 of 100 answers slow, window {window}");
        }
        // The pace falls further: the limit follows it down to the measured floor.
        for _ in 0..6 {
            store_after(&admission, 5, Duration::from_millis(400));
            next_window(&admission, 1);
        }
        assert_eq!(next_window(&admission, 0), MEASURED_FLOOR);
        // A quiet spell (nothing answered, nothing waiting) forgets the last verdict either way:
        // a burst gets the floor until its answers are measured.
        store_after(&admission, 100, Duration::from_millis(20));
        assert_eq!(next_window(&admission, 1), 4_096);
        assert_eq!(next_window(&admission, 5), ADMISSION_FLOOR, "quiet: taken to stand again");
    }
}
