//! Unit tests of the room hubs on tokio's paused clock: a scripted bus feeds a room, an
//! in-memory store holds what "the workers" stored, and a member's outbox shows what it got.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bus::{BusError, FeedItem, RoomBus, RoomFeed};
use protocol::bus::RoomEvent;
use protocol::frames::PresenceState;
use protocol::ChatMessage;
use storage::{HistoryStore, Page, PageQuery, RoomAppend, StoreError};
use telemetry::journal::Journal;
use telemetry::metrics::Metrics;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::Rooms;
use crate::config::GatewayConfig;
use crate::history::HistoryReader;
use crate::outbox::{Outbound, Outbox};

// === a scripted bus and an in-memory store ===

/// A bus whose room feeds the test drives by hand.
#[derive(Default)]
struct ScriptedBus {
    distributed: bool,
    feeds: Mutex<HashMap<String, mpsc::Sender<FeedItem>>>,
    published: Mutex<Vec<RoomEvent>>,
}

impl ScriptedBus {
    async fn push(&self, room: &str, item: FeedItem) {
        let feed = self.feeds.lock().unwrap().get(room).cloned().expect("the room is followed");
        feed.send(item).await.unwrap();
    }
}

#[async_trait]
impl RoomBus for ScriptedBus {
    async fn subscribe(&self, room: &str) -> Result<RoomFeed, BusError> {
        let (tx, items) = mpsc::channel(64);
        self.feeds.lock().unwrap().insert(room.to_owned(), tx);
        Ok(RoomFeed::from_channel(room, items))
    }
    async fn publish_event(&self, _room: &str, event: RoomEvent) -> Result<(), BusError> {
        self.published.lock().unwrap().push(event);
        Ok(())
    }
    fn is_distributed(&self) -> bool {
        self.distributed
    }
}

#[derive(Default)]
struct MemoryStore {
    rooms: Mutex<HashMap<String, Vec<ChatMessage>>>,
    /// While set, reads fail as an unreachable store's do.
    failing: std::sync::atomic::AtomicBool,
}

impl MemoryStore {
    fn put(&self, message: &ChatMessage) {
        self.rooms.lock().unwrap().entry(message.room.clone()).or_default().push(message.clone());
    }
}

#[async_trait]
impl HistoryStore for MemoryStore {
    async fn append(&self, batch: RoomAppend) -> Result<(), StoreError> {
        batch.messages.iter().for_each(|m| self.put(m));
        Ok(())
    }
    async fn last_seq(&self, room: &str) -> Result<u64, StoreError> {
        if self.failing.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(StoreError::unavailable("read last seq: timed out"));
        }
        Ok(self.rooms.lock().unwrap().get(room).and_then(|m| m.last()).map_or(0, |m| m.seq))
    }
    async fn find_by_client_msg_id(&self, _: &str, _: &str, _: &str) -> Result<Option<ChatMessage>, StoreError> {
        Ok(None)
    }
    async fn page(&self, room: &str, query: PageQuery) -> Result<Page, StoreError> {
        if self.failing.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(StoreError::unavailable("read page: timed out"));
        }
        let rooms = self.rooms.lock().unwrap();
        let all = rooms.get(room).cloned().unwrap_or_default();
        let (range, has_more) = query.seq_range(all.last().map_or(0, |m| m.seq));
        Ok(Page { messages: all.into_iter().filter(|m| range.contains(&m.seq)).collect(), has_more })
    }
    async fn get_by_id(&self, _id: Uuid) -> Result<Option<ChatMessage>, StoreError> {
        Ok(None)
    }
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

// === the harness ===

struct Setup {
    rooms: Arc<Rooms>,
    bus: Arc<ScriptedBus>,
    store: Arc<MemoryStore>,
    metrics: Metrics,
    journal: Arc<Journal>,
}

fn setup(distributed: bool) -> Setup {
    let bus = Arc::new(ScriptedBus { distributed, ..ScriptedBus::default() });
    let store = Arc::new(MemoryStore::default());
    let metrics = Metrics::new();
    let config = GatewayConfig { gateway_id: "gw-1".into(), ..GatewayConfig::default() };
    let history = HistoryReader::new(store.clone(), metrics.clone());
    let journal = Arc::new(Journal::new("gw-1", 100));
    let rooms = Rooms::new(&config, bus.clone(), history, metrics.clone(), journal.clone(), None);
    Setup { rooms, bus, store, metrics, journal }
}

fn message(room: &str, seq: u64) -> ChatMessage {
    ChatMessage {
        room: room.into(),
        seq,
        id: Uuid::now_v7(),
        user: "writer".into(),
        body: format!("m{seq}"),
        ts: protocol::now_ms(),
        client_msg_id: format!("c{seq}"),
        trace_id: "0af7651916cd43dd8448eb211c80319c".into(),
        prev: None,
        digest: None,
    }
}

/// What reached a member so far: seqs of messages and the text of other frames.
fn received(outbox: &Outbox) -> (Vec<u64>, Vec<String>) {
    let mut items = Vec::new();
    outbox.take(usize::MAX, &mut items);
    let mut seqs = Vec::new();
    let mut frames = Vec::new();
    for item in items {
        match item {
            Outbound::Message(delivery) => seqs.push(delivery.message.seq),
            Outbound::Frame(text) => frames.push(text.as_str().to_owned()),
        }
    }
    (seqs, frames)
}

async fn settle() {
    tokio::time::sleep(Duration::from_millis(10)).await;
}

// === ordering and gap repair ===

#[tokio::test(start_paused = true)]
async fn a_seq_that_jumps_is_preceded_by_the_missing_messages_from_the_store() {
    let s = setup(false);
    let outbox = Outbox::new(1, 64, Duration::from_secs(5));
    let joined = s.rooms.join("r", "alice", outbox.clone()).await.unwrap();
    assert_eq!(joined.last_seq, 0);
    let stored: Vec<ChatMessage> = (1..=3).map(|seq| message("r", seq)).collect();
    stored.iter().for_each(|m| s.store.put(m));
    s.bus.push("r", FeedItem::Message(Arc::new(stored[0].clone()), None)).await;
    s.bus.push("r", FeedItem::Message(Arc::new(stored[2].clone()), None)).await;
    s.bus.push("r", FeedItem::Message(Arc::new(stored[0].clone()), None)).await;
    settle().await;
    assert_eq!(received(&outbox).0, [1, 2, 3], "in order, no gap, the repeat ignored");
    assert_eq!(s.metrics.gap_repairs.get(), 1);
    assert_eq!(joined.hub.last_seq(), 3);
}

/// Seqs `1..=n` of `room`, chained from the genesis.
fn chained(room: &str, n: u64) -> Vec<ChatMessage> {
    let mut prev = protocol::chain::GENESIS.to_owned();
    (1..=n)
        .map(|seq| {
            let mut m = message(room, seq);
            protocol::chain::seal(&mut m, prev.clone());
            prev = m.digest.clone().unwrap();
            m
        })
        .collect()
}

fn violations(metrics: &Metrics, kind: &str, source: &str) -> u64 {
    metrics.chain_violations.with_label_values(&[kind, source]).get()
}

/// A worker that published a forged seq 2 (digest recomputed: it passes the self-check) is
/// caught at seq 3, which chains to the true seq 2; both messages are still delivered, and the
/// journeys of both name the violation.
#[tokio::test(start_paused = true)]
async fn a_forged_message_is_delivered_and_the_fork_is_reported_at_the_next_one() {
    let s = setup(false);
    let outbox = Outbox::new(1, 64, Duration::from_secs(5));
    s.rooms.join("r", "alice", outbox.clone()).await.unwrap();
    let truth = chained("r", 3);
    truth.iter().for_each(|m| s.store.put(m));
    let mut forged = truth[1].clone();
    forged.body = "forged".into();
    protocol::chain::seal(&mut forged, truth[0].digest.clone().unwrap());
    for m in [&truth[0], &forged, &truth[2]] {
        s.bus.push("r", FeedItem::Message(Arc::new(m.clone()), None)).await;
    }
    settle().await;
    assert_eq!(received(&outbox).0, [1, 2, 3], "the check observes: everything is delivered");
    assert_eq!(violations(&s.metrics, "fork", "feed"), 1);
    assert_eq!(violations(&s.metrics, "altered", "feed"), 0);
    let hop = |id| s.journal.get(id).unwrap().hops.into_iter().find(|h| h.hop == "chain.violation").unwrap();
    let at_three = hop(truth[2].id);
    assert_eq!(at_three.detail["kind"], "fork");
    assert_eq!(at_three.detail["seq"], 3);
    assert_eq!(at_three.detail["expected"], forged.digest.clone().unwrap());
    assert_eq!(at_three.detail["got"], truth[1].digest.clone().unwrap());
    assert_eq!(at_three.detail["previous_id"], truth[1].id.to_string());
    assert_eq!(hop(truth[1].id).detail["next_id"], truth[2].id.to_string());
}

/// A message altered after sequencing (body changed, digest kept) fails its self-check; the
/// next one still links (it chains to the digest the altered one carries).
#[tokio::test(start_paused = true)]
async fn an_altered_message_from_the_bus_is_reported_and_delivered() {
    let s = setup(false);
    let outbox = Outbox::new(1, 64, Duration::from_secs(5));
    s.rooms.join("r", "alice", outbox.clone()).await.unwrap();
    let mut messages = chained("r", 3);
    messages.iter().for_each(|m| s.store.put(m));
    messages[1].body = "altered".into();
    for m in &messages {
        s.bus.push("r", FeedItem::Message(Arc::new(m.clone()), None)).await;
    }
    settle().await;
    assert_eq!(received(&outbox).0, [1, 2, 3]);
    assert_eq!(violations(&s.metrics, "altered", "feed"), 1);
    assert_eq!(violations(&s.metrics, "fork", "feed"), 0);
    let journey = s.journal.get(messages[1].id).unwrap();
    assert!(journey.hops.iter().any(|h| h.hop == "chain.violation" && h.detail["kind"] == "altered"), "{journey:?}");
    // Only a fork implicates the message before; an altered message fails on its own.
    let before = s.journal.get(messages[0].id).map(|j| j.hops).unwrap_or_default();
    assert!(before.iter().all(|h| h.hop != "chain.violation"), "{before:?}");
}

/// A hub created in a room with history continues the chain from its newest message.
#[tokio::test(start_paused = true)]
async fn a_new_hub_links_the_next_message_to_the_rooms_newest() {
    let s = setup(false);
    let truth = chained("r", 3);
    truth[..2].iter().for_each(|m| s.store.put(m));
    let outbox = Outbox::new(1, 64, Duration::from_secs(5));
    s.rooms.join("r", "alice", outbox.clone()).await.unwrap();
    let mut stranger = truth[2].clone();
    stranger.prev = Some(protocol::chain::GENESIS.to_owned());
    protocol::chain::seal(&mut stranger, protocol::chain::GENESIS.to_owned());
    s.store.put(&stranger);
    s.bus.push("r", FeedItem::Message(Arc::new(stranger), None)).await;
    settle().await;
    assert_eq!(received(&outbox).0, [3]);
    assert_eq!(violations(&s.metrics, "fork", "feed"), 1, "seq 3 does not chain to the stored seq 2");
}

#[tokio::test(start_paused = true)]
async fn a_quiet_room_repairs_a_lost_last_message_only_on_the_second_check() {
    let s = setup(false);
    let outbox = Outbox::new(1, 64, Duration::from_secs(5));
    s.rooms.join("r", "alice", outbox.clone()).await.unwrap();
    let (first, lost) = (message("r", 1), message("r", 2));
    s.store.put(&first);
    s.store.put(&lost);
    s.bus.push("r", FeedItem::Message(Arc::new(first), None)).await;
    settle().await;
    assert_eq!(received(&outbox).0, [1]);

    // The first check, a second after the last message, only notes the store's newest seq:
    // seq 2 may still be on its way.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(received(&outbox).0, Vec::<u64>::new());
    assert_eq!(s.metrics.gap_repairs.get(), 0);
    // The second check repairs it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(received(&outbox).0, [2]);
    assert_eq!(s.metrics.gap_repairs.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_quiet_room_keeps_checking_while_the_store_fails_and_repairs_when_it_answers() {
    use std::sync::atomic::Ordering;
    let s = setup(false);
    let outbox = Outbox::new(1, 64, Duration::from_secs(5));
    s.rooms.join("r", "alice", outbox.clone()).await.unwrap();
    let first = message("r", 1);
    s.store.put(&first);
    s.bus.push("r", FeedItem::Message(Arc::new(first), None)).await;
    settle().await;
    assert_eq!(received(&outbox).0, [1]);
    // Seqs 2..=4 are stored but never published, and the store stops answering reads (a node
    // killed): the checks fail for a while; no new message comes to wake the room up.
    s.store.failing.store(true, Ordering::Relaxed);
    for seq in 2..=4 {
        s.store.put(&message("r", seq));
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(received(&outbox).0, Vec::<u64>::new());
    s.store.failing.store(false, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(received(&outbox).0, [2, 3, 4], "repaired once the store answers");
}

#[tokio::test(start_paused = true)]
async fn a_message_arriving_between_the_two_checks_is_not_a_repair() {
    let s = setup(false);
    let outbox = Outbox::new(1, 64, Duration::from_secs(5));
    s.rooms.join("r", "alice", outbox.clone()).await.unwrap();
    let (first, late) = (message("r", 1), message("r", 2));
    s.store.put(&first);
    s.store.put(&late);
    s.bus.push("r", FeedItem::Message(Arc::new(first), None)).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    s.bus.push("r", FeedItem::Message(Arc::new(late), None)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(received(&outbox).0, [1, 2]);
    assert_eq!(s.metrics.gap_repairs.get(), 0, "the late message came by the bus");
}

#[tokio::test(start_paused = true)]
async fn after_a_bus_outage_everything_stored_meanwhile_is_repaired_at_once() {
    let s = setup(false);
    let outbox = Outbox::new(1, 64, Duration::from_secs(5));
    s.rooms.join("r", "alice", outbox.clone()).await.unwrap();
    for seq in 1..=3 {
        s.store.put(&message("r", seq));
    }
    s.bus.push("r", FeedItem::Resumed).await;
    // One check, within the tail-check delay plus the spread of resumed rooms.
    tokio::time::sleep(super::feed::TAIL_CHECK + super::feed::RESUME_SPREAD + Duration::from_millis(100)).await;
    assert_eq!(received(&outbox).0, [1, 2, 3]);
}

#[tokio::test(start_paused = true)]
async fn a_delivery_whose_seq_the_store_does_not_back_is_dropped_and_later_ones_still_flow() {
    let s = setup(false);
    let outbox = Outbox::new(1, 64, Duration::from_secs(5));
    s.rooms.join("r", "alice", outbox.clone()).await.unwrap();
    let (first, second) = (message("r", 1), message("r", 2));
    s.store.put(&first);
    s.store.put(&second);
    s.bus.push("r", FeedItem::Message(Arc::new(first), None)).await;
    // Anyone who can publish on the bus could send this; the store has nothing near it.
    let forged = ChatMessage { seq: u64::MAX, body: "forged".into(), ..message("r", 0) };
    s.bus.push("r", FeedItem::Message(Arc::new(forged), None)).await;
    s.bus.push("r", FeedItem::Message(Arc::new(second), None)).await;
    settle().await;
    assert_eq!(received(&outbox).0, [1, 2]);
    assert_eq!(s.metrics.drops.with_label_values(&["unverified_seq"]).get(), 1);
}

// === presence across gateways ===

#[tokio::test(start_paused = true)]
async fn users_of_a_gateway_silent_for_three_roster_periods_go_offline() {
    let s = setup(true);
    let outbox = Outbox::new(1, 64, Duration::from_secs(5));
    s.rooms.join("r", "alice", outbox.clone()).await.unwrap();
    let asked = s.bus.published.lock().unwrap().iter().any(|e| matches!(e, RoomEvent::RosterRequest { .. }));
    assert!(asked, "a new hub asks the other gateways who is there");

    let bob_online = RoomEvent::Presence { user: "bob".into(), state: PresenceState::Online, gateway: "gw-2".into() };
    s.bus.push("r", FeedItem::Event(bob_online)).await;
    settle().await;
    let (_, frames) = received(&outbox);
    assert!(frames.iter().any(|f| f.contains("\"bob\"") && f.contains("online")), "{frames:?}");
    assert!(s.rooms.hub_members("r").contains(&"bob".to_owned()));

    // gw-2 stays silent. Two periods later bob is still there; after three he is gone.
    let period = GatewayConfig::default().roster_interval;
    tokio::time::sleep(period * 2).await;
    assert!(s.rooms.hub_members("r").contains(&"bob".to_owned()));
    tokio::time::sleep(period * 2).await;
    let (_, frames) = received(&outbox);
    assert!(frames.iter().any(|f| f.contains("\"bob\"") && f.contains("offline")), "{frames:?}");
    assert_eq!(s.rooms.hub_members("r"), ["alice"]);
}

#[tokio::test(start_paused = true)]
async fn a_hub_publishes_its_roster_every_period_and_when_asked() {
    let s = setup(true);
    let outbox = Outbox::new(1, 64, Duration::from_secs(5));
    s.rooms.join("r", "alice", outbox).await.unwrap();
    let rosters = || s.bus.published.lock().unwrap().iter().filter(|e| matches!(e, RoomEvent::Roster { .. })).count();
    let before = rosters();
    s.bus.push("r", FeedItem::Event(RoomEvent::RosterRequest { gateway: "gw-2".into() })).await;
    settle().await;
    assert_eq!(rosters(), before + 1, "answered a roster request at once");
    tokio::time::sleep(GatewayConfig::default().roster_interval * 2).await;
    assert!(rosters() >= before + 3, "and every period");
}

impl Rooms {
    /// Users present in a followed room.
    fn hub_members(&self, room: &str) -> Vec<String> {
        let hub = self.slots().get(room).and_then(|slot| slot.get().cloned()).expect("the room is followed");
        hub.members()
    }
}

/// A gateway holds one hub task per room it serves: a message, a tail check or a roster runs
/// boxed, so the task's own future stays small (520 bytes when written; 856 with them inline).
#[test]
fn a_hubs_feed_task_stays_small() {
    fn future_size<A, B, C, F: std::future::Future>(_: fn(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }
    let size = future_size(Rooms::follow as fn(Arc<Rooms>, Arc<super::Hub>, RoomFeed) -> _);
    assert!(size <= 600, "the hub task's future grew to {size} bytes: box what grew it");
}
