//! `fanout.clock`: a worker's clock running `delay_ms` off when it stamps `ts`.
//!
//! A skewed clock is not marked in the message's journey (each hop's `at_us` is the recording
//! process's true clock, so `ts` against those times is the evidence); it is counted in
//! `chat_faults_injected_total` unless sealed.

use std::sync::Arc;

use fanout::Clock;

use crate::marks::Injector;
use crate::Hop;

/// A clock that runs off by the `fanout.clock` fault in force.
pub struct SkewedClock {
    inner: Arc<dyn Clock>,
    injector: Injector,
}

impl SkewedClock {
    /// `inner`, skewed by the injector's faults.
    pub fn new(inner: Arc<dyn Clock>, injector: Injector) -> Self {
        Self { inner, injector }
    }
}

impl Clock for SkewedClock {
    fn stamp_ms(&self, room: &str) -> i64 {
        let now = self.inner.stamp_ms(room);
        match self.injector.decide(Hop::FanoutClock, room) {
            Some(fired) => {
                self.injector.count(&fired);
                // Any `delay_ms` is accepted: an extreme one pins `ts` at the end of the range
                // instead of overflowing.
                now.saturating_add(fired.millis)
            }
            None => now,
        }
    }

    fn now_ms(&self, room: &str) -> i64 {
        self.inner.now_ms(room)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FaultAction, FaultSpec, Faults};
    use telemetry::journal::Journal;
    use telemetry::metrics::Metrics;

    struct Fixed;
    impl Clock for Fixed {
        fn stamp_ms(&self, _room: &str) -> i64 {
            1_000_000
        }
    }

    #[test]
    fn skews_only_the_faulted_room_and_counts_unless_sealed() {
        let faults = Arc::new(Faults::default());
        let metrics = Metrics::new();
        let injector = Injector::new(faults.clone(), metrics.clone(), Arc::new(Journal::new("w", 10)));
        let clock = SkewedClock::new(Arc::new(Fixed), injector);
        let skew = |sealed| FaultSpec {
            room: Some("a".into()),
            delay_ms: Some(-90_000),
            sealed,
            ..FaultSpec::new(Hop::FanoutClock, FaultAction::Skew)
        };
        assert_eq!(clock.stamp_ms("a"), 1_000_000);
        let id = faults.add(skew(false)).unwrap();
        assert_eq!(clock.stamp_ms("a"), 910_000);
        assert_eq!(clock.stamp_ms("b"), 1_000_000);
        let counted = || metrics.faults_injected.with_label_values(&["fanout.clock", "skew"]).get();
        assert_eq!(counted(), 1);
        faults.remove(id);
        faults.add(skew(true)).unwrap();
        assert_eq!(clock.stamp_ms("a"), 910_000);
        assert_eq!(counted(), 1, "a sealed fault is not counted");
    }

    /// A clock stopped at a given time.
    struct At(i64);
    impl Clock for At {
        fn stamp_ms(&self, _room: &str) -> i64 {
            self.0
        }
    }

    #[test]
    fn extreme_skews_saturate_instead_of_overflowing() {
        let faults = Arc::new(Faults::default());
        let injector = || Injector::new(faults.clone(), Metrics::new(), Arc::new(Journal::new("w", 10)));
        let ahead = SkewedClock::new(Arc::new(At(1_000_000)), injector());
        let before_epoch = SkewedClock::new(Arc::new(At(-1_000_000)), injector());
        let skew = |delay_ms| FaultSpec {
            room: Some("a".into()),
            delay_ms: Some(delay_ms),
            ..FaultSpec::new(Hop::FanoutClock, FaultAction::Skew)
        };
        let id = faults.add(skew(i64::MAX)).unwrap();
        assert_eq!(ahead.stamp_ms("a"), i64::MAX);
        assert_eq!(before_epoch.stamp_ms("a"), i64::MAX - 1_000_000);
        faults.remove(id);
        faults.add(skew(i64::MIN)).unwrap();
        assert_eq!(ahead.stamp_ms("a"), i64::MIN + 1_000_000);
        assert_eq!(before_epoch.stamp_ms("a"), i64::MIN);
    }
}
