//! Load shedding for sends: a cap on the sends one gateway process has handed to the bus and
//! not yet answered. Past the cap a send is answered `unavailable` at once, before it is
//! published, so it is surely not stored and the client may retry it at once.
//!
//! Without the cap, sends offered faster than the workers sequence them queue in the bus until
//! their deadline: under a 4× overload every send then waited its full deadline and margin (11 s)
//! and the gateways asked the store about tens of thousands of them at once
//! (docs/benchmarks.md). With it, the queue a worker can be behind by is bounded by the gateways'
//! caps, so an admitted send waits about `cap × gateways / throughput` at most.

use std::sync::Arc;

use telemetry::metrics::IntGauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The sends of one gateway process awaiting their answer, up to a cap.
pub struct SendAdmission {
    permits: Arc<Semaphore>,
    in_flight: IntGauge,
}

/// One admitted send's place; given back (and the in-flight gauge lowered) on drop.
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
    in_flight: IntGauge,
}

impl SendAdmission {
    /// A cap of `max` sends in flight (0: no cap), counted in `in_flight`.
    pub fn new(max: usize, in_flight: IntGauge) -> Self {
        let max = if max == 0 { Semaphore::MAX_PERMITS } else { max };
        Self { permits: Arc::new(Semaphore::new(max)), in_flight }
    }

    /// A place for one more send, or `None` when the cap is reached.
    pub fn try_admit(&self) -> Option<Admitted> {
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        self.in_flight.inc();
        Some(Admitted { _permit: permit, in_flight: self.in_flight.clone() })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.in_flight.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_the_cap_and_again_once_a_place_is_given_back() {
        let gauge = IntGauge::default();
        let admission = SendAdmission::new(2, gauge.clone());
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
        let admission = SendAdmission::new(0, IntGauge::default());
        let held: Vec<Admitted> = (0..10_000).map_while(|_| admission.try_admit()).collect();
        assert_eq!(held.len(), 10_000);
    }
}
