//! The faults in force in one process: added and removed at run time, drawn from with seeded
//! randomness so a run can be repeated exactly.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::hop::{FaultAction, Hop};

/// A fault as requested.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    /// Where.
    pub hop: Hop,
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
    /// A sealed fault leaves only the evidence a real defect would: no `fault.injected` hop in
    /// journeys, no fault metric, no log line naming it, and `GET /admin/faults` does not list
    /// it. For the debugging lab.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sealed: bool,
    /// For `cross_lock`: the room whose lock is also taken (required there, refused elsewhere).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub with_room: Option<String>,
}

impl FaultSpec {
    /// A fault at `hop` doing `action` every time, in every room.
    pub fn new(hop: Hop, action: FaultAction) -> Self {
        Self {
            hop,
            action,
            probability: 1.0,
            seed: 0,
            room: None,
            count: None,
            delay_ms: None,
            sealed: false,
            with_room: None,
        }
    }

    /// `delay_ms`, or 1000.
    pub fn millis(&self) -> i64 {
        self.delay_ms.unwrap_or(1000)
    }
}

fn one() -> f64 {
    1.0
}

/// A fault that fired for one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fired {
    /// Where.
    pub hop: Hop,
    /// What to do.
    pub action: FaultAction,
    /// The fault's `delay_ms` (or 1000).
    pub millis: i64,
    /// Whether the fault is sealed (leaves no marks).
    pub sealed: bool,
}

impl Fired {
    /// `millis` as a wait (a negative value waits nothing).
    pub fn wait(&self) -> Duration {
        Duration::from_millis(u64::try_from(self.millis).unwrap_or(0))
    }
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

/// Why a fault was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FaultError {
    /// The hop does not support the action.
    #[error("hop {hop} does not support {}; it supports {}", action.name(), supported.iter().map(|a| a.name()).collect::<Vec<_>>().join(", "))]
    UnsupportedAction {
        /// The hop.
        hop: Hop,
        /// The refused action.
        action: FaultAction,
        /// What the hop supports.
        supported: &'static [FaultAction],
    },
    /// Probability outside 0..=1.
    #[error("probability must be between 0 and 1")]
    BadProbability,
    /// `with_room` missing on `cross_lock`, or given on another action.
    #[error("with_room is required by cross_lock and only by it")]
    WithRoom,
    /// `room` given at a hop whose events belong to no room.
    #[error("hop {0} takes no room: its events belong to none")]
    NoRooms(Hop),
}

/// The faults in force in this process.
#[derive(Default)]
pub struct Faults {
    active: AtomicBool,
    next_id: AtomicU64,
    entries: Mutex<Vec<Entry>>,
}

impl Faults {
    /// Whether any fault is in force (a cheap check for hot paths).
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// Adds a fault; returns its id.
    pub fn add(&self, spec: FaultSpec) -> Result<u64, FaultError> {
        if !spec.hop.actions().contains(&spec.action) {
            return Err(FaultError::UnsupportedAction {
                hop: spec.hop,
                action: spec.action,
                supported: spec.hop.actions(),
            });
        }
        if !(0.0..=1.0).contains(&spec.probability) {
            return Err(FaultError::BadProbability);
        }
        if spec.with_room.is_some() != (spec.action == FaultAction::CrossLock) {
            return Err(FaultError::WithRoom);
        }
        if spec.room.is_some() && !spec.hop.has_rooms() {
            return Err(FaultError::NoRooms(spec.hop));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let rng = SmallRng::seed_from_u64(spec.seed);
        self.lock().push(Entry { fault: ActiveFault { id, spec, fired: 0 }, rng });
        self.active.store(true, Ordering::Relaxed);
        Ok(id)
    }

    /// Removes one fault by id, sealed or not; returns whether it existed.
    pub fn remove(&self, id: u64) -> bool {
        self.remove_where(|fault| fault.id == id) == 1
    }

    /// Removes every fault that is not sealed (or every fault with `include_sealed`); returns
    /// how many were removed.
    pub fn clear(&self, include_sealed: bool) -> usize {
        self.remove_where(|fault| include_sealed || !fault.spec.sealed)
    }

    fn remove_where(&self, matches: impl Fn(&ActiveFault) -> bool) -> usize {
        let mut entries = self.lock();
        let before = entries.len();
        entries.retain(|entry| !matches(&entry.fault));
        self.active.store(!entries.is_empty(), Ordering::Relaxed);
        before - entries.len()
    }

    /// The fault in force at `hop` (without drawing from its randomness), if any.
    pub fn armed(&self, hop: Hop) -> Option<Fired> {
        if !self.is_active() {
            return None;
        }
        self.lock().iter().map(|entry| &entry.fault).find(|fault| fault.spec.hop == hop && !exhausted(fault)).map(
            |fault| Fired { hop, action: fault.spec.action, millis: fault.spec.millis(), sealed: fault.spec.sealed },
        )
    }

    /// The faults in force that are not sealed.
    pub fn list(&self) -> Vec<ActiveFault> {
        self.lock().iter().map(|entry| &entry.fault).filter(|fault| !fault.spec.sealed).cloned().collect()
    }

    /// Decides whether a fault fires for an event at `hop` in `room`; the first one that
    /// fires wins.
    pub fn decide(&self, hop: Hop, room: &str) -> Option<Fired> {
        if !self.is_active() {
            return None;
        }
        let mut entries = self.lock();
        for entry in entries.iter_mut() {
            let fault = &mut entry.fault;
            if fault.spec.hop != hop || fault.spec.room.as_deref().is_some_and(|r| r != room) || exhausted(fault) {
                continue;
            }
            if entry.rng.random_bool(fault.spec.probability) {
                fault.fired += 1;
                return Some(Fired {
                    hop,
                    action: fault.spec.action,
                    millis: fault.spec.millis(),
                    sealed: fault.spec.sealed,
                });
            }
        }
        None
    }

    /// The room a `fanout.lock` fault makes sequencing `room` also lock, if one fires.
    pub fn cross_lock(&self, room: &str) -> Option<(Fired, String)> {
        let fired = self.decide(Hop::FanoutLock, room)?;
        let entries = self.lock();
        let with_room = entries
            .iter()
            .map(|entry| &entry.fault.spec)
            .find(|spec| spec.hop == Hop::FanoutLock && spec.room.as_deref().is_none_or(|r| r == room))
            .and_then(|spec| spec.with_room.clone())?;
        Some((fired, with_room))
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Entry>> {
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn exhausted(fault: &ActiveFault) -> bool {
    fault.spec.count.is_some_and(|count| fault.fired >= count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drop_fault(probability: f64, seed: u64, count: Option<u64>) -> FaultSpec {
        FaultSpec { probability, seed, count, ..FaultSpec::new(Hop::GatewayDeliver, FaultAction::Drop) }
    }

    #[test]
    fn seeded_faults_repeat_exactly() {
        let pattern = |seed| {
            let faults = Faults::default();
            faults.add(drop_fault(0.3, seed, None)).unwrap();
            (0..200).map(|_| faults.decide(Hop::GatewayDeliver, "r").is_some()).collect::<Vec<_>>()
        };
        assert_eq!(pattern(7), pattern(7));
        assert_ne!(pattern(7), pattern(8));
    }

    #[test]
    fn count_limits_and_removal() {
        let faults = Faults::default();
        let id = faults.add(drop_fault(1.0, 0, Some(2))).unwrap();
        assert!(faults.decide(Hop::GatewayDeliver, "r").is_some());
        assert!(faults.decide(Hop::GatewayDeliver, "r").is_some());
        assert!(faults.decide(Hop::GatewayDeliver, "r").is_none());
        assert!(faults.armed(Hop::GatewayDeliver).is_none(), "an exhausted fault is not armed");
        assert!(faults.remove(id));
        assert!(!faults.remove(id));
        assert!(!faults.is_active());
    }

    #[test]
    fn refuses_actions_a_hop_does_not_offer_and_bad_probabilities() {
        let faults = Faults::default();
        let stall_at_deliver = FaultSpec::new(Hop::GatewayDeliver, FaultAction::Stall);
        assert!(matches!(faults.add(stall_at_deliver), Err(FaultError::UnsupportedAction { .. })));
        assert!(matches!(faults.add(drop_fault(1.5, 0, None)), Err(FaultError::BadProbability)));
        let heartbeat_in_a_room =
            FaultSpec { room: Some("a".into()), ..FaultSpec::new(Hop::FanoutHeartbeat, FaultAction::Drop) };
        assert!(matches!(faults.add(heartbeat_in_a_room), Err(FaultError::NoRooms(Hop::FanoutHeartbeat))));
        assert!(!faults.is_active());
    }

    #[test]
    fn a_room_fault_fires_only_in_its_room() {
        let faults = Faults::default();
        faults.add(FaultSpec { room: Some("a".into()), ..drop_fault(1.0, 0, None) }).unwrap();
        assert!(faults.decide(Hop::GatewayDeliver, "b").is_none());
        assert!(faults.decide(Hop::GatewayFeed, "a").is_none());
        assert!(faults.decide(Hop::GatewayDeliver, "a").is_some());
    }

    #[test]
    fn sealed_faults_are_unlisted_and_survive_a_plain_clear() {
        let faults = Faults::default();
        faults.add(FaultSpec { sealed: true, ..drop_fault(1.0, 0, None) }).unwrap();
        faults.add(drop_fault(1.0, 0, None)).unwrap();
        assert_eq!(faults.list().len(), 1);
        assert!(faults.decide(Hop::GatewayDeliver, "r").is_some_and(|fired| fired.sealed));
        assert_eq!(faults.clear(false), 1);
        assert!(faults.is_active(), "the sealed fault is still in force");
        assert_eq!(faults.clear(true), 1);
        assert!(!faults.is_active());
    }

    #[test]
    fn specs_parse_from_the_admin_json() {
        let spec: FaultSpec =
            serde_json::from_str(r#"{"hop":"fanout.clock","action":"skew","seed":5,"delay_ms":-90000}"#).unwrap();
        assert_eq!(spec.hop, Hop::FanoutClock);
        assert_eq!(spec.probability, 1.0);
        assert_eq!(spec.millis(), -90_000);
        assert!(serde_json::from_str::<FaultSpec>(r#"{"hop":"nope","action":"drop"}"#).is_err());
        assert!(serde_json::from_str::<FaultSpec>(r#"{"hop":"gateway.feed","action":"drop","sead":1}"#).is_err());
    }
}
