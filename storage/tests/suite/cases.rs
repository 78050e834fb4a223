//! Test bodies shared by both backends: each takes `&dyn HistoryStore` and knows nothing of
//! the backend behind it.

use protocol::ChatMessage;
use storage::{HistoryStore, PageQuery, RoomAppend, MAX_PAGE};
use uuid::Uuid;

/// A message of `room` with `seq`, sent by `user` with a client id derived from both.
pub fn message(room: &str, seq: u64, user: &str) -> ChatMessage {
    testkit::message(room, seq, user)
}

/// Messages `first..=last` of a room, alternating between two users.
pub fn messages(room: &str, first: u64, last: u64) -> Vec<ChatMessage> {
    (first..=last).map(|seq| message(room, seq, if seq % 2 == 0 { "ann" } else { "bob" })).collect()
}

/// Appends `count` messages after `after` in batches of at most `batch`; returns them.
pub async fn fill(store: &dyn HistoryStore, room: &str, after: u64, count: u64, batch: u64) -> Vec<ChatMessage> {
    let all = messages(room, after + 1, after + count);
    let mut expected = after;
    for chunk in all.chunks(batch as usize) {
        let append = RoomAppend { room: room.into(), expected_last_seq: expected, messages: chunk.to_vec() };
        store.append(append).await.unwrap();
        expected += chunk.len() as u64;
    }
    all
}

fn seqs(messages: &[ChatMessage]) -> Vec<u64> {
    messages.iter().map(|m| m.seq).collect()
}

async fn page_seqs(store: &dyn HistoryStore, room: &str, query: PageQuery) -> (Vec<u64>, bool) {
    let page = store.page(room, query).await.unwrap();
    (seqs(&page.messages), page.has_more)
}

pub async fn appends_and_reads_last_seq(store: &dyn HistoryStore) {
    assert_eq!(store.last_seq("lobby").await.unwrap(), 0);
    let first = messages("lobby", 1, 3);
    store.append(RoomAppend { room: "lobby".into(), expected_last_seq: 0, messages: first.clone() }).await.unwrap();
    assert_eq!(store.last_seq("lobby").await.unwrap(), 3);
    let second = messages("lobby", 4, 5);
    store.append(RoomAppend { room: "lobby".into(), expected_last_seq: 3, messages: second.clone() }).await.unwrap();
    assert_eq!(store.last_seq("lobby").await.unwrap(), 5);
    assert_eq!(store.last_seq("other").await.unwrap(), 0, "rooms are independent");

    let page = store.page("lobby", PageQuery::newest(50)).await.unwrap();
    assert_eq!(page.messages, [first, second].concat(), "stored exactly as appended");
    assert!(!page.has_more);
}

/// Chained messages keep `prev` and `digest` through every read; unchained ones (stored before
/// the chain) come back without them.
pub async fn chain_fields_round_trip(store: &dyn HistoryStore) {
    let mut chained = messages("chained", 1, 3);
    let mut prev = protocol::chain::GENESIS.to_owned();
    for m in &mut chained {
        protocol::chain::seal(m, prev);
        prev = m.digest.clone().unwrap();
    }
    let legacy = messages("chained", 4, 4);
    store.append(RoomAppend { room: "chained".into(), expected_last_seq: 0, messages: chained.clone() }).await.unwrap();
    store.append(RoomAppend { room: "chained".into(), expected_last_seq: 3, messages: legacy.clone() }).await.unwrap();
    let all = [chained.clone(), legacy].concat();

    let page = store.page("chained", PageQuery::newest(50)).await.unwrap();
    assert_eq!(page.messages, all, "stored exactly as appended, chain fields included");
    assert_eq!(store.page("chained", PageQuery::between(1, 3)).await.unwrap().messages, all[1..2]);
    assert_eq!(store.get_by_id(chained[2].id).await.unwrap().as_ref(), Some(&chained[2]));
    assert_eq!(store.find_by_client_msg_id("chained", "ann", "ann-2").await.unwrap().as_ref(), Some(&chained[1]));
    let found = store.find_by_client_msg_ids("chained", &[("bob", "bob-1"), ("ann", "ann-4")]).await.unwrap();
    assert_eq!(found, [Some(all[0].clone()), Some(all[3].clone())]);
    assert!(found[1].as_ref().is_some_and(|m| m.prev.is_none() && m.digest.is_none()));
    for m in &chained {
        assert_eq!(protocol::chain::check(m), Ok(()));
    }
}

pub async fn conflict_stores_nothing(store: &dyn HistoryStore) {
    fill(store, "r", 0, 3, 3).await;
    let stale = messages("r", 2, 3);
    let rejected = store.append(RoomAppend { room: "r".into(), expected_last_seq: 1, messages: stale.clone() }).await;
    match rejected {
        Err(e) => assert_eq!(e.conflict_seqs(), Some((1, 3)), "want a conflict at 3, got {e}"),
        Ok(()) => panic!("want a conflict at 3, got Ok"),
    }
    // Expecting an empty room when it is not.
    let rejected =
        store.append(RoomAppend { room: "r".into(), expected_last_seq: 0, messages: messages("r", 1, 1) }).await;
    assert_eq!(rejected.err().and_then(|e| e.conflict_seqs()), Some((0, 3)));
    // Expecting history in an empty room.
    let rejected = store
        .append(RoomAppend { room: "empty".into(), expected_last_seq: 5, messages: messages("empty", 6, 6) })
        .await;
    assert_eq!(rejected.err().and_then(|e| e.conflict_seqs()), Some((5, 0)));

    // Nothing of the rejected appends is visible.
    assert_eq!(store.last_seq("r").await.unwrap(), 3);
    assert_eq!(store.last_seq("empty").await.unwrap(), 0);
    for m in &stale {
        assert_eq!(store.get_by_id(m.id).await.unwrap(), None, "rejected message stored");
    }
    let page = store.page("r", PageQuery::newest(50)).await.unwrap();
    assert_eq!(seqs(&page.messages), [1, 2, 3]);
    assert!(page.messages.iter().all(|m| !stale.iter().any(|s| s.id == m.id)));
    assert!(store.page("empty", PageQuery::newest(50)).await.unwrap().messages.is_empty());
}

pub async fn pages(store: &dyn HistoryStore) {
    fill(store, "p", 0, 250, 50).await;
    let range = |a: u64, b: u64| (a..=b).collect::<Vec<_>>();
    assert_eq!(page_seqs(store, "p", PageQuery::newest(50)).await, (range(201, 250), true));
    let before = |before, limit| PageQuery { before: Some(before), after: None, limit };
    let after = |after, limit| PageQuery { before: None, after: Some(after), limit };
    assert_eq!(page_seqs(store, "p", before(201, 50)).await, (range(151, 200), true));
    assert_eq!(page_seqs(store, "p", before(21, 50)).await, (range(1, 20), false));
    assert_eq!(page_seqs(store, "p", after(230, 50)).await, (range(231, 250), false));
    assert_eq!(page_seqs(store, "p", after(10, 50)).await, (range(11, 60), true));
    assert_eq!(page_seqs(store, "p", after(250, 50)).await, (vec![], false));
    assert_eq!(page_seqs(store, "p", PageQuery::between(5, 9)).await, (range(6, 8), false));
    // Limits are clamped to 1..=MAX_PAGE.
    assert_eq!(page_seqs(store, "p", PageQuery::newest(0)).await, (vec![250], true));
    let (got, more) = page_seqs(store, "p", PageQuery::newest(1000)).await;
    assert_eq!((got.len(), got.first().copied(), more), (MAX_PAGE as usize, Some(51), true));
    // An empty room.
    assert_eq!(page_seqs(store, "nobody-here", PageQuery::newest(50)).await, (vec![], false));
    assert_eq!(page_seqs(store, "nobody-here", after(0, 50)).await, (vec![], false));
}

pub async fn pages_across_buckets(store: &dyn HistoryStore) {
    let all = fill(store, "b", 0, 2010, MAX_PAGE as u64).await;
    let range = |a: u64, b: u64| (a..=b).collect::<Vec<_>>();
    let after = |after, limit| PageQuery { before: None, after: Some(after), limit };
    let before = |before, limit| PageQuery { before: Some(before), after: None, limit };
    assert_eq!(page_seqs(store, "b", after(989, 30)).await, (range(990, 1019), true));
    assert_eq!(page_seqs(store, "b", before(2006, 20)).await, (range(1986, 2005), true));
    assert_eq!(page_seqs(store, "b", PageQuery::newest(15)).await, (range(1996, 2010), true));
    assert_eq!(page_seqs(store, "b", after(1900, 200)).await, (range(1901, 2010), false));
    assert_eq!(page_seqs(store, "b", PageQuery::between(999, 1001)).await, (vec![1000], false));
    // Walking the whole history forward returns everything once, in order.
    let mut walked = Vec::new();
    let mut cursor = 0;
    loop {
        let page = store.page("b", after(cursor, MAX_PAGE)).await.unwrap();
        cursor = page.messages.last().map_or(cursor, |m| m.seq);
        walked.extend(page.messages);
        if !page.has_more {
            break;
        }
    }
    assert_eq!(walked, all);
}

pub async fn dedupe_lookup(store: &dyn HistoryStore) {
    let stored = fill(store, "d", 0, 4, 2).await;
    for m in &stored {
        let found = store.find_by_client_msg_id("d", &m.user, &m.client_msg_id).await.unwrap();
        assert_eq!(found.as_ref(), Some(m));
    }
    let m = &stored[0];
    assert_eq!(store.find_by_client_msg_id("d", "someone-else", &m.client_msg_id).await.unwrap(), None);
    assert_eq!(store.find_by_client_msg_id("elsewhere", &m.user, &m.client_msg_id).await.unwrap(), None);
    assert_eq!(store.find_by_client_msg_id("d", &m.user, "never-sent").await.unwrap(), None);
    // The batch form answers in the order asked, misses included.
    let keys = [
        (stored[3].user.as_str(), stored[3].client_msg_id.as_str()),
        (m.user.as_str(), "never-sent"),
        (stored[1].user.as_str(), stored[1].client_msg_id.as_str()),
        ("someone-else", m.client_msg_id.as_str()),
    ];
    let found = store.find_by_client_msg_ids("d", &keys).await.unwrap();
    assert_eq!(found, vec![Some(stored[3].clone()), None, Some(stored[1].clone()), None]);
    assert!(store.find_by_client_msg_ids("d", &[]).await.unwrap().is_empty());
}

pub async fn get_by_id(store: &dyn HistoryStore) {
    let stored = [fill(store, "g1", 0, 3, 3).await, fill(store, "g2", 0, 2, 1).await].concat();
    for m in &stored {
        assert_eq!(store.get_by_id(m.id).await.unwrap().as_ref(), Some(m));
    }
    assert_eq!(store.get_by_id(Uuid::now_v7()).await.unwrap(), None);
}

pub async fn ping(store: &dyn HistoryStore) {
    store.ping().await.unwrap();
}

/// Two writers append at the same expected seq, many times over: exactly one wins each round;
/// the loser is refused as a conflict (with the winner's seq as `actual`) or, on the CQL store, as
/// fenced off (the winner took the room's partition from it); either way it then sees the
/// winner's dedupe entries while its own messages exist nowhere.
pub async fn concurrent_appends_one_wins(a: &dyn HistoryStore, b: &dyn HistoryStore) {
    let room = "race";
    let mut last = 0;
    for round in 0..10u64 {
        let batch = |user: &str, len: u64| RoomAppend {
            room: room.into(),
            expected_last_seq: last,
            messages: (1..=len)
                .map(|i| {
                    let mut m = message(room, last + i, user);
                    m.client_msg_id = format!("{user}-round{round}-{i}");
                    m
                })
                .collect(),
        };
        // Different lengths tell which one won by the room's last seq.
        let (from_a, from_b) = (batch("ann", 1), batch("bob", 2));
        let (ra, rb) = tokio::join!(a.append(from_a.clone()), b.append(from_b.clone()));
        let (winner, loser, loser_result, loser_store) = match (&ra, &rb) {
            (Ok(()), Err(_)) => (&from_a, &from_b, rb, b),
            (Err(_), Ok(())) => (&from_b, &from_a, ra, a),
            _ => panic!("round {round}: want exactly one winner, got {ra:?} and {rb:?}"),
        };
        let new_last = last + winner.messages.len() as u64;
        match loser_result {
            Err(e) if e.is_conflict() => {
                assert_eq!(e.conflict_seqs(), Some((last, new_last)), "round {round}");
            }
            Err(e) if e.kind() == storage::StoreErrorKind::Fenced => {}
            other => panic!("round {round}: loser got {other:?}"),
        }
        assert_eq!(loser_store.last_seq(room).await.unwrap(), new_last);
        for m in &winner.messages {
            let found = loser_store.find_by_client_msg_id(room, &m.user, &m.client_msg_id).await.unwrap();
            assert_eq!(found.as_ref(), Some(m), "round {round}: winner's dedupe entry");
        }
        for m in &loser.messages {
            assert_eq!(loser_store.find_by_client_msg_id(room, &m.user, &m.client_msg_id).await.unwrap(), None);
            assert_eq!(loser_store.get_by_id(m.id).await.unwrap(), None);
        }
        last = new_last;
    }
    let page = a.page(room, PageQuery::newest(MAX_PAGE)).await.unwrap();
    assert_eq!(seqs(&page.messages), (1..=last).collect::<Vec<_>>(), "gapless, one message per seq");
}
