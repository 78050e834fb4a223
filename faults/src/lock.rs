//! [`CrossLocks`]: the worker's room hook under `fanout.lock` faults. Each room has a lock its
//! sequencing holds; a `cross_lock` fault makes sequencing its room also take `with_room`'s
//! lock after a moment of work, still holding its own. Two such faults the other way round are a
//! lock-order inversion: each waits for the lock the other holds, for ever. Where the locks live
//! is a [`LockTable`]: this process's memory ([`LocalLocks`]: both rooms must be in one batch of
//! one worker), or a table every worker shares ([`bus::nats::SharedLocks`]: two workers, each
//! sequencing one of the rooms, deadlock each other). Every wait is listed in `/debug/waits`, as a
//! real lock's would be.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use fanout::{Entered, RoomHook};

use crate::marks::Injector;

/// The work done under a room's own lock before the other is taken (slow cross-room work):
/// long enough that two rooms of one batch both hold their own first, and that sends pile up
/// meanwhile, so the two rooms soon meet in one batch.
const WORK_UNDER_LOCK: Duration = Duration::from_millis(200);

/// A lock held; released when dropped.
pub type HeldLock = Box<dyn std::any::Any + Send + Sync>;

/// Where room locks live.
#[async_trait]
pub trait LockTable: Send + Sync + 'static {
    /// Takes `room`'s lock if it is free.
    async fn try_lock(&self, room: &str) -> Option<HeldLock>;
    /// Takes `room`'s lock, waiting for as long as it is held.
    async fn lock(&self, room: &str) -> HeldLock;
}

/// Room locks in this process's memory.
#[derive(Default)]
pub struct LocalLocks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl LocalLocks {
    fn lock_of(&self, room: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        locks.entry(room.to_owned()).or_default().clone()
    }
}

#[async_trait]
impl LockTable for LocalLocks {
    async fn try_lock(&self, room: &str) -> Option<HeldLock> {
        self.lock_of(room).try_lock_owned().ok().map(|guard| Box::new(guard) as HeldLock)
    }

    async fn lock(&self, room: &str) -> HeldLock {
        Box::new(self.lock_of(room).lock_owned().await)
    }
}

/// Room locks every worker on one NATS shares (`room-lock.ROOM` keys of its lock bucket).
#[async_trait]
impl LockTable for bus::nats::SharedLocks {
    async fn try_lock(&self, room: &str) -> Option<HeldLock> {
        match bus::nats::SharedLocks::try_lock(self, &format!("room-lock.{room}")).await {
            Ok(held) => held.map(|guard| Box::new(guard) as HeldLock),
            Err(e) => {
                tracing::warn!(room, error = %e, "cannot take a room lock yet");
                None
            }
        }
    }

    async fn lock(&self, room: &str) -> HeldLock {
        Box::new(bus::nats::SharedLocks::lock(self, &format!("room-lock.{room}")).await)
    }
}

/// Room locks taken as `fanout.lock` faults say.
pub struct CrossLocks {
    injector: Injector,
    table: Arc<dyn LockTable>,
}

impl CrossLocks {
    /// Room locks in `table` under the injector's faults.
    pub fn new(injector: Injector, table: Arc<dyn LockTable>) -> Self {
        Self { injector, table }
    }

    /// Takes `room`'s lock for `operation` (holding `holding`), listed as a wait meanwhile.
    async fn take(&self, operation: &str, holding: Vec<String>, room: &str) -> HeldLock {
        if let Some(held) = self.table.try_lock(room).await {
            return held;
        }
        let _waiting = self.injector.waits().begin(operation, holding, format!("room-lock:{room}"));
        self.table.lock(room).await
    }
}

#[async_trait]
impl RoomHook for CrossLocks {
    async fn enter(&self, room: &str) -> Option<Entered> {
        let (fired, with_room) = self.injector.faults.cross_lock(room)?;
        self.injector.count(&fired);
        let operation = format!("sequence {room}");
        let sequencer = format!("room-sequencer:{room}");
        let own = self.take(&operation, vec![sequencer.clone()], room).await;
        tokio::time::sleep(WORK_UNDER_LOCK).await;
        let holding = vec![sequencer, format!("room-lock:{room}")];
        let other = self.take(&operation, holding, &with_room).await;
        Some(Box::new((own, other)))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use telemetry::journal::Journal;
    use telemetry::metrics::Metrics;

    use super::*;
    use crate::{FaultAction, FaultSpec, Faults, Hop};

    fn cross(room: &str, with_room: &str) -> FaultSpec {
        FaultSpec {
            room: Some(room.into()),
            with_room: Some(with_room.into()),
            sealed: true,
            ..FaultSpec::new(Hop::FanoutLock, FaultAction::CrossLock)
        }
    }

    #[tokio::test]
    async fn two_inverted_cross_locks_wait_for_each_other_for_ever() {
        let faults = Arc::new(Faults::default());
        faults.add(cross("a", "b")).unwrap();
        faults.add(cross("b", "a")).unwrap();
        let journal = Arc::new(Journal::new("w", 10));
        let locks =
            CrossLocks::new(Injector::new(faults, Metrics::new(), journal.clone()), Arc::new(LocalLocks::default()));
        let both = async { tokio::join!(locks.enter("a"), locks.enter("b")) };
        assert!(tokio::time::timeout(Duration::from_secs(1), both).await.is_err(), "deadlocked");
        // Dropped mid-wait: the waits are gone with the futures.
        assert!(journal.waits().snapshot(0).is_empty());
    }

    #[tokio::test]
    async fn the_waits_of_a_deadlock_form_a_cycle() {
        let faults = Arc::new(Faults::default());
        faults.add(cross("a", "b")).unwrap();
        faults.add(cross("b", "a")).unwrap();
        let journal = Arc::new(Journal::new("w", 10));
        let locks = Arc::new(CrossLocks::new(
            Injector::new(faults, Metrics::new(), journal.clone()),
            Arc::new(LocalLocks::default()),
        ));
        for room in ["a", "b"] {
            let locks = locks.clone();
            tokio::spawn(async move {
                let _held = locks.enter(room).await;
            });
        }
        tokio::time::sleep(Duration::from_millis(600)).await;
        let mut waits: Vec<(String, Vec<String>)> =
            journal.waits().snapshot(0).into_iter().map(|w| (w.waiting_for, w.holding)).collect();
        waits.sort();
        assert_eq!(
            waits,
            [
                ("room-lock:a".to_owned(), vec!["room-sequencer:b".to_owned(), "room-lock:b".to_owned()]),
                ("room-lock:b".to_owned(), vec!["room-sequencer:a".to_owned(), "room-lock:a".to_owned()]),
            ]
        );
    }

    #[tokio::test]
    async fn a_room_without_a_fault_takes_no_lock() {
        let faults = Arc::new(Faults::default());
        faults.add(cross("a", "b")).unwrap();
        let locks = CrossLocks::new(
            Injector::new(faults, Metrics::new(), Arc::new(Journal::new("w", 10))),
            Arc::new(LocalLocks::default()),
        );
        assert!(locks.enter("c").await.is_none());
        // `a` alone takes both and goes on.
        assert!(locks.enter("a").await.is_some());
    }
}
