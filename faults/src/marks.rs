//! The [`Injector`]: the faults of one process, the decorators that apply them, and the marks
//! a fault leaves when it fires (unless sealed).

use std::sync::Arc;

use telemetry::journal::Journal;
use telemetry::metrics::Metrics;
use uuid::Uuid;

use crate::registry::{Faults, Fired};
use crate::Hop;

/// Everything the decorators of one process share. Cheap to clone (three pointers): every
/// connection's delivery hook and every followed room's feed holds one.
#[derive(Clone)]
pub struct Injector {
    pub(crate) faults: Arc<Faults>,
    metrics: Arc<Metrics>,
    journal: Arc<Journal>,
}

impl Injector {
    /// An injector over `faults`, counting in `metrics` and marking journeys in `journal`.
    pub fn new(faults: Arc<Faults>, metrics: Metrics, journal: Arc<Journal>) -> Self {
        Self { faults, metrics: Arc::new(metrics), journal }
    }

    /// The faults in force.
    pub fn faults(&self) -> &Arc<Faults> {
        &self.faults
    }

    /// What this process's operations wait on (`/debug/waits`).
    pub(crate) fn waits(&self) -> &telemetry::waits::Waits {
        self.journal.waits()
    }

    /// This process's name in journeys.
    pub(crate) fn process(&self) -> &str {
        self.journal.process()
    }

    /// Decides whether a fault fires at `hop` for an event of `room`.
    pub(crate) fn decide(&self, hop: Hop, room: &str) -> Option<Fired> {
        self.faults.decide(hop, room)
    }

    /// Counts a fault that fired (a `drop` also as a drop with reason `fault_drop`), unless
    /// it is sealed.
    pub(crate) fn count(&self, fired: &Fired) {
        if !fired.sealed {
            self.metrics.fault(fired.hop.name(), fired.action.name());
        }
    }

    /// Marks a fault that fired for a stored message: counted, and a `fault.injected` hop with
    /// `detail` (plus `hop` and `action`) in its journey; nothing when sealed.
    pub(crate) fn mark_message(&self, fired: &Fired, id: Uuid, trace_id: &str, detail: serde_json::Value) {
        if fired.sealed {
            return;
        }
        self.count(fired);
        self.journal.record(id, trace_id, "fault.injected", with_fault(fired, detail));
    }

    /// Marks a fault that fired for a send not yet sequenced (by its dedupe key).
    pub(crate) fn mark_send(&self, fired: &Fired, dedupe_key: &str, trace_id: &str, detail: serde_json::Value) {
        if fired.sealed {
            return;
        }
        self.journal.record_send(dedupe_key, trace_id, "fault.injected", with_fault(fired, detail));
    }
}

fn with_fault(fired: &Fired, mut detail: serde_json::Value) -> serde_json::Value {
    if let Some(map) = detail.as_object_mut() {
        map.insert("hop".into(), fired.hop.name().into());
        map.insert("action".into(), fired.action.name().into());
    }
    detail
}
