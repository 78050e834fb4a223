//! Warming a store up before a process says it is ready.
//!
//! A CQL node that has just started answers its first thousands of requests slowly (its JIT
//! compiles the hot paths, its Paxos tables are cold), and a fresh session's connections and
//! prepared statements have never been used. A worker that took sends then would time out on
//! most of them. So a worker first runs the operations of a send against a room of its own
//! ([`warm_up`]): the dedupe lookup, the room's last seq, the fenced append, a history page.
//! Several rooms at once, since a store warmed one request at a time is still cold under load.
//! It stops once those are quick, or no longer getting quicker (settled), or when its time is
//! up.
//!
//! The warm-up room's name starts with a dot, which no client room name may contain
//! (`A-Z a-z 0-9 _ -`), so it never meets a client's room.

use std::time::{Duration, Instant};

use protocol::ChatMessage;

use crate::{HistoryStore, PageQuery, RoomAppend, StoreErrorKind};

/// When the store counts as warm, and how long to try.
#[derive(Debug, Clone, Copy)]
pub struct WarmUp {
    /// Rounds per window. The store is warm once a window's median round is within `quick`, or
    /// three windows in a row were no more than 10 % quicker than the best before (it has
    /// settled, at whatever speed this machine and build give; a failed round counts as slow).
    pub window: u32,
    /// Rooms worked on at once in a round, each with a send's operations (lookup, last seq,
    /// append, page): a store warmed one request at a time is still cold under load.
    pub concurrency: usize,
    /// A median round this quick is warm at once.
    pub quick: Duration,
    /// Give up warming after this long (the process then starts anyway).
    pub budget: Duration,
}

impl Default for WarmUp {
    fn default() -> Self {
        Self { window: 20, concurrency: 8, quick: Duration::from_millis(20), budget: Duration::from_secs(30) }
    }
}

/// What a warm-up did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warmed {
    /// Rounds run.
    pub rounds: u32,
    /// Rounds that failed (a timeout, a conflict).
    pub failed: u32,
    /// The last window's median round.
    pub median: Duration,
    /// How long it took.
    pub took: Duration,
    /// Whether the store became warm within the budget.
    pub warm: bool,
}

/// The warm-up room of the process called `process`.
pub fn room_of(process: &str) -> String {
    format!(".warmup.{process}")
}

/// Runs rounds of a send's store operations, in `until.concurrency` rooms named after `room` at
/// once, window after window, until a window shows the store warm (see [`WarmUp::window`]) or
/// `until.budget` is spent. Errors are counted, not returned: a cold store times out, which is
/// what warming is for.
pub async fn warm_up(store: &dyn HistoryStore, room: &str, until: WarmUp) -> Warmed {
    let started = Instant::now();
    let rooms: Vec<String> = (0..until.concurrency.max(1)).map(|i| format!("{room}.{i}")).collect();
    let (mut rounds, mut failed) = (0u32, 0u32);
    // The best window median so far, and how many windows since were not 10 % quicker.
    let (mut best, mut unimproved): (Option<Duration>, u32) = (None, 0);
    loop {
        let mut window = Vec::with_capacity(until.window as usize);
        while window.len() < until.window.max(1) as usize {
            if started.elapsed() >= until.budget {
                let median = median_of(&mut window);
                return Warmed { rounds, failed, median, took: started.elapsed(), warm: false };
            }
            rounds += 1;
            let round = Instant::now();
            let outcomes =
                futures_util::future::join_all(rooms.iter().map(|room| one_round(store, room, rounds))).await;
            let errors: Vec<StoreErrorKind> = outcomes.into_iter().filter_map(Result::err).collect();
            if errors.is_empty() {
                window.push(round.elapsed());
                continue;
            }
            failed += errors.len() as u32;
            window.push(until.budget);
            if errors.iter().any(|kind| *kind != StoreErrorKind::Conflict) {
                // A store that refuses outright gets a breath before the next round.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let median = median_of(&mut window);
        match best {
            Some(b) if median.as_secs_f64() >= b.as_secs_f64() * 0.9 => unimproved += 1,
            _ => (best, unimproved) = (Some(median), 0),
        }
        if median <= until.quick || unimproved >= SETTLED_AFTER {
            return Warmed { rounds, failed, median, took: started.elapsed(), warm: true };
        }
    }
}

/// Windows in a row no more than 10 % quicker than the best before, after which the store has
/// settled: a cold node's JIT improves in steps, with plateaus between.
const SETTLED_AFTER: u32 = 3;

/// The median of `times` (zero when empty).
fn median_of(times: &mut [Duration]) -> Duration {
    times.sort_unstable();
    times.get(times.len() / 2).copied().unwrap_or_default()
}

/// One round: what a worker does for one send, and a page read.
async fn one_round(store: &dyn HistoryStore, room: &str, round: u32) -> Result<(), StoreErrorKind> {
    let client_msg_id = format!("warm-{}-{round}", uuid::Uuid::now_v7().simple());
    store.find_by_client_msg_ids(room, &[("warmup", &client_msg_id)]).await.map_err(|e| e.kind())?;
    let last = store.last_seq(room).await.map_err(|e| e.kind())?;
    let message = ChatMessage {
        room: room.to_owned(),
        seq: last + 1,
        id: uuid::Uuid::now_v7(),
        user: "warmup".into(),
        body: "warm-up".into(),
        ts: protocol::now_ms(),
        client_msg_id,
        trace_id: String::new(),
        prev: None,
        digest: None,
    };
    let append = RoomAppend { room: room.to_owned(), expected_last_seq: last, messages: vec![message] };
    store.append(append).await.map_err(|e| e.kind())?;
    store.page(room, PageQuery::newest(20)).await.map_err(|e| e.kind())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embedded::EmbeddedStore;

    #[tokio::test]
    async fn a_quick_store_is_warm_after_the_rounds_asked_for_and_its_room_holds_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let until =
            WarmUp { window: 5, concurrency: 3, quick: Duration::from_secs(5), budget: Duration::from_secs(30) };
        let warmed = warm_up(&store, &room_of("w1"), until).await;
        assert!(warmed.warm && warmed.rounds == 5 && warmed.failed == 0, "{warmed:?}");
        for i in 0..3 {
            assert_eq!(store.last_seq(&format!(".warmup.w1.{i}")).await.unwrap(), 5, "room {i}");
        }
        // A second warm-up (a restart) continues the rooms.
        warm_up(&store, &room_of("w1"), until).await;
        assert_eq!(store.last_seq(".warmup.w1.0").await.unwrap(), 10);
    }

    /// A store whose appends get twice as quick each time: still warming.
    struct Quickening {
        inner: EmbeddedStore,
        delay: std::sync::Mutex<Duration>,
    }

    #[async_trait::async_trait]
    impl HistoryStore for Quickening {
        async fn append(&self, batch: RoomAppend) -> Result<(), crate::StoreError> {
            let delay = {
                let mut delay = self.delay.lock().unwrap();
                *delay /= 2;
                *delay * 2
            };
            tokio::time::sleep(delay).await;
            self.inner.append(batch).await
        }
        async fn last_seq(&self, room: &str) -> Result<u64, crate::StoreError> {
            self.inner.last_seq(room).await
        }
        async fn find_by_client_msg_id(
            &self,
            room: &str,
            user: &str,
            id: &str,
        ) -> Result<Option<ChatMessage>, crate::StoreError> {
            self.inner.find_by_client_msg_id(room, user, id).await
        }
        async fn page(&self, room: &str, query: PageQuery) -> Result<crate::Page, crate::StoreError> {
            self.inner.page(room, query).await
        }
        async fn get_by_id(&self, id: uuid::Uuid) -> Result<Option<ChatMessage>, crate::StoreError> {
            self.inner.get_by_id(id).await
        }
        async fn ping(&self) -> Result<(), crate::StoreError> {
            self.inner.ping().await
        }
    }

    #[tokio::test]
    async fn a_store_still_getting_quicker_is_given_up_on_at_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let store = Quickening {
            inner: EmbeddedStore::open(dir.path()).unwrap(),
            delay: std::sync::Mutex::new(Duration::from_millis(64)),
        };
        let until = WarmUp { window: 2, concurrency: 1, quick: Duration::ZERO, budget: Duration::from_millis(100) };
        let warmed = warm_up(&store, &room_of("w1"), until).await;
        assert!(!warmed.warm && warmed.rounds > 0, "{warmed:?}");
        assert!(warmed.took >= Duration::from_millis(100));
    }
}
