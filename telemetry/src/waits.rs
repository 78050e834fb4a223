//! What each operation in progress waits on, and what it holds meanwhile: the raw material of a
//! wait-for graph. Served at `/debug/waits`; `chat debug waits` gathers it from every process
//! and looks for cycles (a deadlock).
//!
//! An operation registers itself with [`Waits::begin`] when it starts to wait and is removed
//! when the returned [`Waiting`] is dropped. Resources are plain names that mean the same in
//! every process (`room-lock:lab-r1`, `worker-reply:lab-r1`, `store`), so waits gathered from
//! several processes join into one graph: an operation waiting for a resource that another one
//! holds is an edge from the first to the second.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// One operation waiting, as `/debug/waits` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wait {
    /// What the operation is (`sequence lab-r1`, `send lab-r1 c-17`).
    pub operation: String,
    /// Resources it holds while it waits.
    pub holding: Vec<String>,
    /// The resource it waits for.
    pub waiting_for: String,
    /// When it started waiting, Unix milliseconds.
    pub since_unix_ms: i64,
    /// How long it has waited, milliseconds.
    pub waited_ms: u64,
}

struct Entry {
    operation: String,
    holding: Vec<String>,
    waiting_for: String,
    since: Instant,
    since_unix_ms: i64,
}

/// The waits in progress in one process. Cheap to clone (one shared table).
#[derive(Clone, Default)]
pub struct Waits {
    next: Arc<AtomicU64>,
    table: Arc<Mutex<BTreeMap<u64, Entry>>>,
}

impl Waits {
    /// Records that `operation`, holding `holding`, waits for `waiting_for`, until the returned
    /// guard is dropped.
    pub fn begin(&self, operation: impl Into<String>, holding: Vec<String>, waiting_for: impl Into<String>) -> Waiting {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let entry = Entry {
            operation: operation.into(),
            holding,
            waiting_for: waiting_for.into(),
            since: Instant::now(),
            since_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        };
        self.lock().insert(id, entry);
        Waiting { waits: self.clone(), id }
    }

    /// The waits at least `min_ms` old, longest first.
    pub fn snapshot(&self, min_ms: u64) -> Vec<Wait> {
        let mut waits: Vec<Wait> = self
            .lock()
            .values()
            .map(|entry| Wait {
                operation: entry.operation.clone(),
                holding: entry.holding.clone(),
                waiting_for: entry.waiting_for.clone(),
                since_unix_ms: entry.since_unix_ms,
                waited_ms: u64::try_from(entry.since.elapsed().as_millis()).unwrap_or(u64::MAX),
            })
            .filter(|wait| wait.waited_ms >= min_ms)
            .collect();
        waits.sort_by_key(|wait| std::cmp::Reverse(wait.waited_ms));
        waits
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Entry>> {
        self.table.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A wait in progress; dropping it ends the wait.
#[must_use = "the wait ends when this is dropped"]
pub struct Waiting {
    waits: Waits,
    id: u64,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.waits.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_is_listed_until_its_guard_drops() {
        let waits = Waits::default();
        let held = waits.begin("sequence r1", vec!["room-lock:r1".into()], "room-lock:r2");
        let listed = waits.snapshot(0);
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].holding, ["room-lock:r1"]);
        assert_eq!(listed[0].waiting_for, "room-lock:r2");
        assert!(waits.snapshot(60_000).is_empty(), "younger than a minute");
        drop(held);
        assert!(waits.snapshot(0).is_empty());
    }
}
