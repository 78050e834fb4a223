//! Fault injection at named hops, switched on at run time through `/admin/faults`, seeded so a
//! run can be repeated exactly. Every injected fault is counted and marked in the journey.
//!
//! | hop | actions | where |
//! |---|---|---|
//! | `gateway.deliver` | drop, duplicate, reorder, delay, rewrite | a gateway writing a message to one connection |
//! | `gateway.feed` | drop, delay | a gateway receiving a room's message from the bus |
//! | `gateway.gap_repair` | disable | a gateway's gap repair (hub and connections) |
//! | `gateway.nats` | cut | a gateway's whole bus connection: sends `unavailable`, feeds dropped |
//! | `fanout.publish` | drop, duplicate, delay | a worker publishing a stored message to gateways |
//! | `fanout.sequence` | stall, delay | a worker before sequencing a room's sends (`stall` holds them `delay_ms`; the rest of the batch waits behind them) |
//! | `fanout.clock` | skew | a worker stamping `ts` (`delay_ms` ahead; a negative `delay_ms` puts it behind) |

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Hops where faults can be injected, with the actions each supports.
pub const HOPS: &[(&str, &[FaultAction])] = &[
    (
        "gateway.deliver",
        &[FaultAction::Drop, FaultAction::Duplicate, FaultAction::Reorder, FaultAction::Delay, FaultAction::Rewrite],
    ),
    ("gateway.feed", &[FaultAction::Drop, FaultAction::Delay]),
    ("gateway.gap_repair", &[FaultAction::Disable]),
    ("gateway.nats", &[FaultAction::Cut]),
    ("fanout.publish", &[FaultAction::Drop, FaultAction::Duplicate, FaultAction::Delay]),
    ("fanout.sequence", &[FaultAction::Stall, FaultAction::Delay]),
    ("fanout.clock", &[FaultAction::Skew]),
];

/// What a fault does to a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultAction {
    /// The connection never gets the message.
    Drop,
    /// The connection gets the message twice.
    Duplicate,
    /// The message is held back and written after the room's next message.
    Reorder,
    /// The event waits `delay_ms` first.
    Delay,
    /// The body is altered before it is written (a lying gateway).
    Rewrite,
    /// A worker stops taking work for `delay_ms`.
    Stall,
    /// The process acts as if cut off from the bus.
    Cut,
    /// A safety mechanism is switched off.
    Disable,
    /// A worker's clock runs `delay_ms` off.
    Skew,
}

impl FaultAction {
    /// The action's name, as in the API and the `action` metric label.
    pub fn name(self) -> &'static str {
        match self {
            Self::Drop => "drop",
            Self::Duplicate => "duplicate",
            Self::Reorder => "reorder",
            Self::Delay => "delay",
            Self::Rewrite => "rewrite",
            Self::Stall => "stall",
            Self::Cut => "cut",
            Self::Disable => "disable",
            Self::Skew => "skew",
        }
    }
}

/// A fault as requested.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultSpec {
    /// Where: one of [`HOPS`].
    pub hop: String,
    /// What.
    pub action: FaultAction,
    /// Chance per eligible event, 0..=1 (default 1).
    #[serde(default = "one")]
    pub probability: f64,
    /// Seed of the fault's random choices (default 0).
    #[serde(default)]
    pub seed: u64,
    /// Only this room (default: every room).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
    /// Fire at most this many times (default: unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// Milliseconds for `delay`, `stall` and `skew` (default 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<i64>,
}

impl FaultSpec {
    /// `delay_ms`, or 1000.
    pub fn millis(&self) -> i64 {
        self.delay_ms.unwrap_or(1000)
    }
}

fn one() -> f64 {
    1.0
}

/// A fault in force, as listed by `GET /admin/faults`.
#[derive(Debug, Clone, Serialize)]
pub struct ActiveFault {
    /// Id to remove it by.
    pub id: u64,
    /// The request.
    #[serde(flatten)]
    pub spec: FaultSpec,
    /// Times it fired so far.
    pub fired: u64,
}

struct Entry {
    fault: ActiveFault,
    rng: SmallRng,
}

/// The faults in force in this process.
#[derive(Default)]
pub struct Faults {
    active: AtomicBool,
    next_id: AtomicU64,
    entries: Mutex<Vec<Entry>>,
}

/// Why a fault was refused.
#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    /// Unknown hop.
    #[error("unknown hop {0:?}; known hops and their actions: {HOPS:?}")]
    UnknownHop(String),
    /// The hop does not support the action.
    #[error("hop {0} does not support {1:?}")]
    UnsupportedAction(String, FaultAction),
    /// Probability outside 0..=1.
    #[error("probability must be between 0 and 1")]
    BadProbability,
}

impl Faults {
    /// Whether any fault is in force (a cheap check for hot paths).
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// Adds a fault; returns its id.
    pub fn add(&self, spec: FaultSpec) -> Result<u64, FaultError> {
        let Some((_, actions)) = HOPS.iter().find(|(hop, _)| *hop == spec.hop) else {
            return Err(FaultError::UnknownHop(spec.hop));
        };
        if !actions.contains(&spec.action) {
            return Err(FaultError::UnsupportedAction(spec.hop, spec.action));
        }
        if !(0.0..=1.0).contains(&spec.probability) {
            return Err(FaultError::BadProbability);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let rng = SmallRng::seed_from_u64(spec.seed);
        let mut entries = self.lock();
        entries.push(Entry { fault: ActiveFault { id, spec, fired: 0 }, rng });
        self.active.store(true, Ordering::Relaxed);
        Ok(id)
    }

    /// Removes one fault (or all with `None`); returns how many were removed.
    pub fn remove(&self, id: Option<u64>) -> usize {
        let mut entries = self.lock();
        let before = entries.len();
        entries.retain(|e| id.is_some_and(|id| e.fault.id != id));
        self.active.store(!entries.is_empty(), Ordering::Relaxed);
        before - entries.len()
    }

    /// Whether a fault at `hop` is in force (without drawing from its randomness).
    pub fn is_set(&self, hop: &str) -> bool {
        self.is_active()
            && self
                .lock()
                .iter()
                .any(|e| e.fault.spec.hop == hop && e.fault.spec.count.is_none_or(|c| e.fault.fired < c))
    }

    /// The faults in force.
    pub fn list(&self) -> Vec<ActiveFault> {
        self.lock().iter().map(|e| e.fault.clone()).collect()
    }

    /// Decides whether a fault fires for an event at `hop` in `room` (`""`: any room); the
    /// first one that fires wins.
    pub fn decide(&self, hop: &str, room: &str) -> Option<FaultSpec> {
        if !self.is_active() {
            return None;
        }
        let mut entries = self.lock();
        for entry in entries.iter_mut() {
            let fault = &mut entry.fault;
            if fault.spec.hop != hop || fault.spec.room.as_deref().is_some_and(|r| !room.is_empty() && r != room) {
                continue;
            }
            if fault.spec.count.is_some_and(|count| fault.fired >= count) {
                continue;
            }
            if entry.rng.random_bool(fault.spec.probability) {
                fault.fired += 1;
                return Some(fault.spec.clone());
            }
        }
        None
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(probability: f64, seed: u64, count: Option<u64>) -> FaultSpec {
        FaultSpec {
            hop: "gateway.deliver".into(),
            action: FaultAction::Drop,
            probability,
            seed,
            room: None,
            count,
            delay_ms: None,
        }
    }

    #[test]
    fn seeded_faults_repeat_exactly() {
        let pattern = |seed| {
            let faults = Faults::default();
            faults.add(spec(0.3, seed, None)).unwrap();
            (0..200).map(|_| faults.decide("gateway.deliver", "r").is_some()).collect::<Vec<_>>()
        };
        assert_eq!(pattern(7), pattern(7));
        assert_ne!(pattern(7), pattern(8));
    }

    #[test]
    fn count_and_removal() {
        let faults = Faults::default();
        let id = faults.add(spec(1.0, 0, Some(2))).unwrap();
        assert!(faults.decide("gateway.deliver", "r").is_some());
        assert!(faults.decide("gateway.deliver", "r").is_some());
        assert!(faults.decide("gateway.deliver", "r").is_none());
        assert_eq!(faults.remove(Some(id)), 1);
        assert!(!faults.is_active());
        assert!(faults.add(FaultSpec { hop: "nope".into(), ..spec(1.0, 0, None) }).is_err());
        assert!(faults.add(FaultSpec { action: FaultAction::Stall, ..spec(1.0, 0, None) }).is_err());
    }
}
