//! Warming a store up before a process says it is ready.
//!
//! A CQL node that has just started answers its first thousands of requests slowly (its JIT
//! compiles the hot paths, its Paxos tables are cold), and a fresh session's connections and
//! prepared statements have never been used. A worker that took sends then would time out on
//! most of them. So a worker first runs the operations of a send against a room of its own
//! ([`warm_up`]): the dedupe lookup, the room's last seq, the fenced append, a history page.
//! Several rooms at once, since a store warmed one request at a time is still cold under load.
//! It stops once those are quick, or when its time is up.
//!
//! The warm-up room's name starts with a dot, which no client room name may contain
//! (`A-Z a-z 0-9 _ -`), so it never meets a client's room.

use std::time::{Duration, Instant};

use protocol::ChatMessage;

use crate::{HistoryStore, PageQuery, RoomAppend, StoreErrorKind};

/// When the store counts as warm, and how long to try.
#[derive(Debug, Clone, Copy)]
pub struct WarmUp {
    /// Rounds that must pass in a row, each within `quick`.
    pub quick_rounds: u32,
    /// Rooms worked on at once in a round, each with a send's operations (lookup, last seq,
    /// append, page): a store warmed one request at a time is still cold under load.
    pub concurrency: usize,
    /// A quick round's longest time.
    pub quick: Duration,
    /// Give up warming after this long (the process then starts anyway).
    pub budget: Duration,
}

impl Default for WarmUp {
    fn default() -> Self {
        Self { quick_rounds: 30, concurrency: 8, quick: Duration::from_millis(100), budget: Duration::from_secs(45) }
    }
}

/// What a warm-up did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warmed {
    /// Rounds run.
    pub rounds: u32,
    /// Rounds that failed (a timeout, a conflict).
    pub failed: u32,
    /// How long it took.
    pub took: Duration,
    /// Whether the store became quick within the budget.
    pub warm: bool,
}

/// The warm-up room of the process called `process`.
pub fn room_of(process: &str) -> String {
    format!(".warmup.{process}")
}

/// Runs rounds of a send's store operations, in `until.concurrency` rooms named after `room` at
/// once, until `until.quick_rounds` rounds in a row each took at most `until.quick`, or
/// `until.budget` is spent. Errors are counted, not returned: a cold store times out, which is
/// what warming is for.
pub async fn warm_up(store: &dyn HistoryStore, room: &str, until: WarmUp) -> Warmed {
    let started = Instant::now();
    let rooms: Vec<String> = (0..until.concurrency.max(1)).map(|i| format!("{room}.{i}")).collect();
    let (mut rounds, mut failed, mut quick_in_a_row) = (0u32, 0u32, 0u32);
    while quick_in_a_row < until.quick_rounds {
        if started.elapsed() >= until.budget {
            return Warmed { rounds, failed, took: started.elapsed(), warm: false };
        }
        rounds += 1;
        let round = Instant::now();
        let outcomes = futures_util::future::join_all(rooms.iter().map(|room| one_round(store, room, rounds))).await;
        let errors: Vec<StoreErrorKind> = outcomes.into_iter().filter_map(Result::err).collect();
        if errors.is_empty() && round.elapsed() <= until.quick {
            quick_in_a_row += 1;
            continue;
        }
        quick_in_a_row = 0;
        failed += errors.len() as u32;
        if errors.iter().any(|kind| *kind != StoreErrorKind::Conflict) {
            // A store that refuses outright gets a breath before the next round.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Warmed { rounds, failed, took: started.elapsed(), warm: true }
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
            WarmUp { quick_rounds: 5, concurrency: 3, quick: Duration::from_secs(5), budget: Duration::from_secs(30) };
        let warmed = warm_up(&store, &room_of("w1"), until).await;
        assert!(warmed.warm && warmed.rounds == 5 && warmed.failed == 0, "{warmed:?}");
        for i in 0..3 {
            assert_eq!(store.last_seq(&format!(".warmup.w1.{i}")).await.unwrap(), 5, "room {i}");
        }
        // A second warm-up (a restart) continues the rooms.
        warm_up(&store, &room_of("w1"), until).await;
        assert_eq!(store.last_seq(".warmup.w1.0").await.unwrap(), 10);
    }

    #[tokio::test]
    async fn a_store_never_quick_enough_gives_up_at_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let until =
            WarmUp { quick_rounds: 3, concurrency: 2, quick: Duration::ZERO, budget: Duration::from_millis(300) };
        let warmed = warm_up(&store, &room_of("w1"), until).await;
        assert!(!warmed.warm && warmed.rounds > 0, "{warmed:?}");
        assert!(warmed.took >= Duration::from_millis(300));
    }
}
