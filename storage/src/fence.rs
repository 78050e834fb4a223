//! The bookkeeping behind the CQL store's fencing (docs/architecture.md, "Sequencing on the
//! cluster"): which fences this writer holds and at which epoch, what it knows of each room's last
//! seq under that epoch, and the write timestamps that make a write of an older epoch always lose.
//!
//! Nothing here talks to the database; [`crate::cql`] takes and checks epochs there.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::StoreError;

/// Every stamped write's timestamp is at least this (2^51 µs is the year 2041): above the
/// server-side timestamps of rows written before epochs, so a stamped write always wins over them.
const STAMP_BASE: u64 = 1 << 51;
/// An epoch's stamps are `STAMP_BASE + epoch << EPOCH_SHIFT + n`, `n` counting this writer's
/// writes (2^40 of them per epoch).
const EPOCH_SHIFT: u32 = 40;
/// The largest epoch whose stamps still fit a CQL timestamp (a signed 64-bit count).
pub const MAX_EPOCH: u64 = (1 << 22) - 1;
/// Rooms remembered before the idle ones are forgotten (forgetting costs one read later).
const MAX_ROOMS: usize = 100_000;

/// The fence a room belongs to: its partition of the send stream (`p<N>`, the unit a fanout
/// worker owns), or, for a private room (a name starting with `.`, which clients cannot use,
/// such as a worker's warm-up rooms), the room itself.
pub fn fence_of(room: &str) -> String {
    if room.starts_with('.') {
        room.to_owned()
    } else {
        format!("p{}", protocol::subjects::partition(room))
    }
}

/// One fence's lease (the epoch this writer holds, if any, and whether it let it go), the appends
/// writing under it, and the locks that make taking and confirming it single-flight.
#[derive(Default)]
pub struct LeaseSlot {
    lease: Mutex<Lease>,
    /// Woken when the last append in progress under the lease ends (see [`LeaseSlot::drained`]).
    append_ended: tokio::sync::Notify,
    /// The latest read that found the held epoch current: the epoch, and when the read started.
    confirmed: Mutex<Option<(u64, Instant)>>,
    /// Held while the epoch is being read, so one read confirms it for all rooms.
    pub confirming: tokio::sync::Mutex<()>,
    /// Held while the fence is being taken, so one transaction takes it for all rooms.
    pub taking: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Lease {
    /// The epoch held, if any.
    epoch: Option<u64>,
    /// Let go on purpose ([`LeaseSlot::release`]): appends are refused until it is taken again.
    released: bool,
    /// Appends under the held epoch that have not ended yet.
    appending: usize,
    /// An epoch under which an append sent its commit and could not tell whether it landed:
    /// that epoch cannot be marked released (its commit may still land).
    unsettled: Option<u64>,
}

/// What an append finds when it asks to write under a fence ([`LeaseSlot::enter`]).
pub enum Entry {
    /// Held: the append writes under this epoch while it keeps the guard.
    Held(Appending),
    /// Let go on purpose: the fence's partition moved to another writer.
    Released,
    /// Not held: the append must take the fence first.
    Vacant,
}

/// An append in progress under a lease: [`LeaseSlot::drained`] waits until every one is dropped.
pub struct Appending {
    slot: Arc<LeaseSlot>,
    /// The epoch the append writes under.
    pub epoch: u64,
}

impl Appending {
    /// This append sent its commit and does not know whether it landed.
    pub fn unsettled(&self) {
        self.slot.unsettled(self.epoch);
    }
}

impl Drop for Appending {
    fn drop(&mut self) {
        let idle = {
            let mut lease = lock(&self.slot.lease);
            lease.appending -= 1;
            lease.appending == 0
        };
        // Only the last append's end can finish a drain: the others spare the wake-up.
        if idle {
            self.slot.append_ended.notify_waiters();
        }
    }
}

impl LeaseSlot {
    /// The epoch held, if any and not let go.
    pub fn epoch(&self) -> Option<u64> {
        let lease = lock(&self.lease);
        lease.epoch.filter(|_| !lease.released)
    }

    /// Starts an append under the held epoch, if there is one: counted until the guard drops.
    pub fn enter(self: &Arc<Self>) -> Entry {
        let mut lease = lock(&self.lease);
        match (lease.epoch, lease.released) {
            (_, true) => Entry::Released,
            (None, false) => Entry::Vacant,
            (Some(epoch), false) => {
                lease.appending += 1;
                Entry::Held(Appending { slot: self.clone(), epoch })
            }
        }
    }

    /// Now holding `epoch`. A lease let go while it was being taken stays let go: only
    /// [`LeaseSlot::reclaim`] wants it back.
    pub fn hold(&self, epoch: u64) {
        lock(&self.lease).epoch = Some(epoch);
    }

    /// The writer wants the fence again after letting it go: appends take it anew from here.
    pub fn reclaim(&self) {
        let mut lease = lock(&self.lease);
        if lease.released {
            lease.released = false;
            lease.epoch = None;
        }
    }

    /// Lets the held epoch go: appends that have not started are refused from now on. The epoch
    /// let go, if one was held.
    pub fn release(&self) -> Option<u64> {
        let mut lease = lock(&self.lease);
        if lease.released {
            return None;
        }
        lease.released = true;
        lease.epoch
    }

    /// Waits until no append is in progress under the lease.
    pub async fn drained(&self) {
        loop {
            let ended = self.append_ended.notified();
            tokio::pin!(ended);
            // Registered before the count is read, so an append ending in between still wakes it.
            ended.as_mut().enable();
            if lock(&self.lease).appending == 0 {
                return;
            }
            ended.await;
        }
    }

    /// An append under `epoch` sent its commit and does not know whether it landed.
    pub fn unsettled(&self, epoch: u64) {
        lock(&self.lease).unsettled = Some(epoch);
    }

    /// Whether every commit sent under `epoch` is known to have landed or not.
    pub fn settled(&self, epoch: u64) -> bool {
        lock(&self.lease).unsettled != Some(epoch)
    }

    /// When the latest read that found `epoch` current started, if it did.
    pub fn confirmed(&self, epoch: u64) -> Option<Instant> {
        lock(&self.confirmed).filter(|(e, _)| *e == epoch).map(|(_, at)| at)
    }

    /// A read started at `at` found `epoch` current (an older read is not kept over a newer one).
    pub fn confirm(&self, epoch: u64, at: Instant) {
        let mut confirmed = lock(&self.confirmed);
        if confirmed.is_none_or(|(e, before)| e != epoch || before < at) {
            *confirmed = Some((epoch, at));
        }
    }

    /// Another writer took the fence from `epoch`: drop it, unless it was already dropped or
    /// taken again.
    pub fn fenced_off(&self, epoch: u64) {
        let mut lease = lock(&self.lease);
        if lease.epoch == Some(epoch) {
            lease.epoch = None;
        }
    }
}

/// A room's last seq as this writer left it under `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Known {
    /// The epoch it was written (or read) under.
    pub epoch: u64,
    /// The room's last seq.
    pub last_seq: u64,
}

/// One room: what is known of it, behind a lock that keeps this writer's appends to the room one
/// at a time.
pub type RoomSlot = Arc<tokio::sync::Mutex<Option<Known>>>;

/// Leases, rooms and stamps of one store.
#[derive(Default)]
pub struct Fences {
    leases: Mutex<HashMap<String, Arc<LeaseSlot>>>,
    rooms: Mutex<HashMap<String, RoomSlot>>,
    writes: AtomicU64,
}

impl Fences {
    /// The slot of `fence`.
    pub fn lease(&self, fence: &str) -> Arc<LeaseSlot> {
        lock(&self.leases).entry(fence.to_owned()).or_default().clone()
    }

    /// The fences this writer holds (and has not let go).
    pub fn held(&self) -> Vec<String> {
        lock(&self.leases).iter().filter(|(_, slot)| slot.epoch().is_some()).map(|(fence, _)| fence.clone()).collect()
    }

    /// The slot of `room`. Past [`MAX_ROOMS`], rooms nobody is appending to are forgotten.
    pub fn room(&self, room: &str) -> RoomSlot {
        let mut rooms = lock(&self.rooms);
        if rooms.len() >= MAX_ROOMS && !rooms.contains_key(room) {
            rooms.retain(|_, slot| Arc::strong_count(slot) > 1);
        }
        rooms.entry(room.to_owned()).or_default().clone()
    }

    /// The timestamp of this writer's next write under `epoch`: above every stamp of a lower
    /// epoch and above this writer's earlier stamps of the same epoch.
    pub fn stamp(&self, epoch: u64) -> Result<i64, StoreError> {
        let n = self.writes.fetch_add(1, Ordering::Relaxed);
        if epoch > MAX_EPOCH || n >= 1 << EPOCH_SHIFT {
            return Err(StoreError::unavailable(format!("write stamp out of range (epoch {epoch}, write {n})")));
        }
        i64::try_from(STAMP_BASE + (epoch << EPOCH_SHIFT) + n)
            .map_err(|_| StoreError::unavailable(format!("write stamp of epoch {epoch} exceeds a CQL timestamp")))
    }
}

/// Locks a mutex whose data stays consistent even if a holder panicked (plain values only).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_later_epoch_always_stamps_higher_and_one_epoch_stamps_increase() {
        let old = Fences::default();
        let new = Fences::default();
        let stale: Vec<i64> = (0..1000).map(|_| old.stamp(7).unwrap()).collect();
        let first_of_next = new.stamp(8).unwrap();
        assert!(stale.iter().all(|s| *s < first_of_next));
        assert!(stale.windows(2).all(|w| w[0] < w[1]));
        // Above the server clock's microseconds (rows from before epochs) and valid at the top.
        let now_us = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros();
        assert!(i128::from(new.stamp(1).unwrap()) > now_us as i128);
        assert!(new.stamp(MAX_EPOCH).unwrap() > 0);
        assert!(new.stamp(MAX_EPOCH + 1).is_err());
    }

    #[test]
    fn rooms_share_their_partitions_fence_and_private_rooms_have_their_own() {
        let room = "general";
        assert_eq!(fence_of(room), format!("p{}", protocol::subjects::partition(room)));
        assert_eq!(fence_of(".warmup.w1.3"), ".warmup.w1.3");
    }

    #[test]
    fn a_fenced_off_lease_is_dropped_only_for_the_epoch_held() {
        let slot = LeaseSlot::default();
        slot.hold(3);
        slot.fenced_off(2); // an older epoch (a stale failure): not the one held
        assert_eq!(slot.epoch(), Some(3));
        slot.fenced_off(3);
        assert_eq!(slot.epoch(), None);
        slot.hold(5);
        assert_eq!(slot.epoch(), Some(5));
    }

    #[tokio::test]
    async fn a_released_lease_refuses_new_appends_and_drains_those_in_progress() {
        let slot = Arc::new(LeaseSlot::default());
        assert!(matches!(slot.enter(), Entry::Vacant));
        slot.hold(4);
        let Entry::Held(appending) = slot.enter() else { panic!("held") };
        let Entry::Held(other) = slot.enter() else { panic!("held") };
        assert_eq!(appending.epoch, 4);
        assert_eq!(slot.release(), Some(4));
        assert_eq!(slot.release(), None, "let go once");
        assert!(matches!(slot.enter(), Entry::Released));
        assert_eq!(slot.epoch(), None);
        let drained = tokio::spawn({
            let slot = slot.clone();
            async move { slot.drained().await }
        });
        tokio::task::yield_now().await;
        assert!(!drained.is_finished(), "two appends are still in progress");
        drop(other);
        tokio::task::yield_now().await;
        assert!(!drained.is_finished(), "an append is still in progress");
        drop(appending);
        tokio::time::timeout(std::time::Duration::from_secs(5), drained).await.unwrap().unwrap();
        // Wanted again: appends must take it anew.
        slot.reclaim();
        assert!(matches!(slot.enter(), Entry::Vacant));
        slot.hold(6);
        assert_eq!(slot.epoch(), Some(6));
    }

    #[test]
    fn an_epoch_with_a_commit_of_unknown_outcome_is_not_settled() {
        let slot = LeaseSlot::default();
        assert!(slot.settled(3));
        slot.unsettled(3);
        assert!(!slot.settled(3));
        assert!(slot.settled(4));
    }

    #[test]
    fn a_confirmation_answers_for_its_epoch_only_and_the_newest_read_is_kept() {
        let slot = LeaseSlot::default();
        let (earlier, later) = (Instant::now(), Instant::now() + std::time::Duration::from_millis(5));
        slot.confirm(4, later);
        slot.confirm(4, earlier); // a slower read that started before: not kept
        assert_eq!(slot.confirmed(4), Some(later));
        assert_eq!(slot.confirmed(3), None);
        slot.confirm(5, earlier); // another epoch replaces it
        assert_eq!(slot.confirmed(4), None);
        assert_eq!(slot.confirmed(5), Some(earlier));
    }

    #[tokio::test]
    async fn idle_rooms_are_forgotten_past_the_bound_and_busy_ones_kept() {
        let fences = Fences::default();
        let busy = fences.room("busy");
        *busy.lock().await = Some(Known { epoch: 1, last_seq: 9 });
        for i in 0..MAX_ROOMS {
            drop(fences.room(&format!("idle{i}")));
        }
        assert!(lock(&fences.rooms).len() < 10);
        assert_eq!(*fences.room("busy").lock().await, Some(Known { epoch: 1, last_seq: 9 }));
    }
}
