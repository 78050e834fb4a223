//! Room hubs: one per room with local members, following the room's feed on the bus and fanning
//! it out to this gateway's connections.
//!
//! A hub forwards each room's messages in seq order with no gap and no duplicate: a repeated
//! seq is ignored, and a seq that jumps is preceded by the missing messages read from the store
//! (gap repair). `last_seq` is the last seq forwarded; a join registers its connection and reads
//! `last_seq` under the same lock the hub forwards under, so everything after it reaches the
//! new member live and everything up to it can be replayed from the store.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::ws::Utf8Bytes;
use bus::{BusError, FeedItem, GatewayBus};
use protocol::bus::RoomEvent;
use protocol::frames::PresenceState;
use protocol::{ChatMessage, ServerFrame};
use storage::PageQuery;
use telemetry::journal::Journal;
use telemetry::metrics::Metrics;
use tokio::sync::{Notify, OnceCell};

use crate::faults::Faults;
use crate::history::HistoryReader;
use crate::outbox::{Delivery, Offer, Outbound, Outbox};

/// One room's presence at this gateway.
pub struct Hub {
    room: String,
    last_seq: AtomicU64,
    state: Mutex<HubState>,
    stop: Notify,
}

#[derive(Default)]
struct HubState {
    members: HashMap<u64, Member>,
    /// Local connections per user.
    users: HashMap<String, usize>,
    /// Users present on other gateways, and on which.
    remote: HashMap<String, HashSet<String>>,
    closed: bool,
}

impl HubState {
    fn member_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.users.keys().chain(self.remote.keys()).cloned().collect();
        names.sort();
        names.dedup();
        names
    }
}

struct Member {
    user: String,
    outbox: Arc<Outbox>,
}

impl Hub {
    /// The room.
    pub fn room(&self) -> &str {
        &self.room
    }

    /// The last seq this hub forwarded.
    pub fn last_seq(&self) -> u64 {
        self.last_seq.load(Ordering::Acquire)
    }

    /// Users present in the room, on this gateway and on others, sorted.
    pub fn members(&self) -> Vec<String> {
        self.lock().member_names()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// What a connection learns when it joins.
pub struct Joined {
    /// The room's hub (keep it to leave).
    pub hub: Arc<Hub>,
    /// The last seq the hub had forwarded when the connection was registered.
    pub last_seq: u64,
    /// Users present in the room.
    pub members: Vec<String>,
}

type Slot = Arc<OnceCell<Arc<Hub>>>;

/// All hubs of this gateway.
pub struct Rooms {
    gateway_id: String,
    bus: Arc<dyn GatewayBus>,
    history: HistoryReader,
    metrics: Metrics,
    journal: Arc<Journal>,
    faults: Arc<Faults>,
    gap_repair: bool,
    hubs: Mutex<HashMap<String, Slot>>,
}

impl Rooms {
    /// A registry with no hubs yet.
    pub fn new(
        gateway_id: String,
        bus: Arc<dyn GatewayBus>,
        history: HistoryReader,
        metrics: Metrics,
        journal: Arc<Journal>,
        faults: Arc<Faults>,
        gap_repair: bool,
    ) -> Arc<Self> {
        Arc::new(Self { gateway_id, bus, history, metrics, journal, faults, gap_repair, hubs: Mutex::new(HashMap::new()) })
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.hubs.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a connection in a room, creating the room's hub when it is the first local
    /// member.
    pub async fn join(self: &Arc<Self>, room: &str, user: &str, outbox: Arc<Outbox>) -> Result<Joined, BusError> {
        loop {
            let hub = self.hub(room).await?;
            let (joined, first_of_user) = {
                let mut state = hub.lock();
                if state.closed {
                    continue;
                }
                state.members.insert(outbox.conn_id, Member { user: user.to_owned(), outbox: outbox.clone() });
                let count = state.users.entry(user.to_owned()).or_default();
                *count += 1;
                let first = *count == 1;
                let members = state.member_names();
                (Joined { hub: hub.clone(), last_seq: hub.last_seq(), members }, first)
            };
            if first_of_user {
                self.announce(room, user, PresenceState::Online).await;
            }
            return Ok(joined);
        }
    }

    /// Removes a connection from a room; the last local member closes the hub.
    pub async fn leave(&self, hub: &Arc<Hub>, conn_id: u64) {
        let gone_user = {
            let mut state = hub.lock();
            let Some(member) = state.members.remove(&conn_id) else { return };
            let gone = match state.users.get_mut(&member.user) {
                Some(count) if *count > 1 => {
                    *count -= 1;
                    None
                }
                _ => {
                    state.users.remove(&member.user);
                    Some(member.user)
                }
            };
            if state.members.is_empty() {
                state.closed = true;
                let mut slots = self.slots();
                let same = slots.get(&hub.room).and_then(|slot| slot.get()).is_some_and(|h| Arc::ptr_eq(h, hub));
                if same {
                    slots.remove(&hub.room);
                }
                hub.stop.notify_one();
            }
            gone
        };
        if let Some(user) = gone_user {
            self.announce(&hub.room, &user, PresenceState::Offline).await;
        }
    }

    /// Tells every member of the room, on every gateway, that `user` is typing.
    pub async fn typing(&self, room: &str, user: &str) -> Result<(), BusError> {
        self.bus.publish_event(room, RoomEvent::Typing { user: user.to_owned() }).await
    }

    async fn announce(&self, room: &str, user: &str, state: PresenceState) {
        let event = RoomEvent::Presence { user: user.to_owned(), state, gateway: self.gateway_id.clone() };
        if let Err(e) = self.bus.publish_event(room, event).await {
            tracing::warn!(room, user, error = %e, "presence not published");
        }
    }

    /// The room's hub, created (subscribed and initialised) on first use.
    async fn hub(self: &Arc<Self>, room: &str) -> Result<Arc<Hub>, BusError> {
        let slot = self.slots().entry(room.to_owned()).or_default().clone();
        let created = slot.get_or_try_init(|| self.create_hub(room)).await;
        if created.is_err() {
            let mut slots = self.slots();
            if slots.get(room).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                slots.remove(room);
            }
        }
        created.cloned()
    }

    async fn create_hub(self: &Arc<Self>, room: &str) -> Result<Arc<Hub>, BusError> {
        // Subscribe first, then read the last seq: nothing sequenced in between is missed
        // (older seqs in the feed are ignored, newer ones follow).
        let feed = self.bus.subscribe(room).await?;
        let last_seq = self.history.last_seq(room).await.map_err(|e| BusError::Unavailable(e.to_string()))?;
        let hub = Arc::new(Hub {
            room: room.to_owned(),
            last_seq: AtomicU64::new(last_seq),
            state: Mutex::new(HubState::default()),
            stop: Notify::new(),
        });
        let rooms = self.clone();
        let task_hub = hub.clone();
        tokio::spawn(async move { rooms.follow(task_hub, feed).await });
        Ok(hub)
    }

    /// The hub's feed task.
    async fn follow(self: Arc<Self>, hub: Arc<Hub>, mut feed: bus::RoomFeed) {
        loop {
            let item = tokio::select! {
                () = hub.stop.notified() => break,
                item = feed.items.recv() => item,
            };
            match item {
                Some(FeedItem::Message(message)) => self.on_message(&hub, message).await,
                Some(FeedItem::Event(event)) => self.on_event(&hub, event),
                None => {
                    tracing::warn!(room = %hub.room, "room feed ended");
                    break;
                }
            }
        }
    }

    async fn on_message(&self, hub: &Hub, message: Arc<ChatMessage>) {
        let last = hub.last_seq();
        if message.seq <= last {
            self.metrics.drops.with_label_values(&["feed_duplicate"]).inc();
            return;
        }
        if message.seq > last + 1 && self.gap_repair {
            self.repair_gap(hub, last, message.seq).await;
        }
        self.forward(hub, message);
    }

    /// Reads the messages between `last` and `next` from the store and forwards them.
    async fn repair_gap(&self, hub: &Hub, last: u64, next: u64) {
        self.metrics.gap_repairs.inc();
        let mut after = last;
        while after + 1 < next {
            match self.history.page(&hub.room, PageQuery::between(after, next)).await {
                Ok(page) if !page.messages.is_empty() => {
                    for message in page.messages {
                        after = message.seq;
                        self.metrics.gap_repaired_messages.inc();
                        self.journal.record(message.id, &message.trace_id, "gateway.gap_repair", serde_json::json!({"gateway": self.gateway_id}));
                        self.forward(hub, Arc::new(message));
                    }
                }
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(room = %hub.room, after, next, error = %e, "gap repair failed; connections will catch up themselves");
                    break;
                }
            }
        }
    }

    /// Hands a message to every local member and advances `last_seq`.
    fn forward(&self, hub: &Hub, message: Arc<ChatMessage>) {
        let sequenced_ms = message.ts;
        let delivery = Arc::new(Delivery::new(message));
        let (mut queued, mut skipped, mut kicked) = (0u32, 0u32, 0u32);
        {
            let state = hub.lock();
            if delivery.message.seq <= hub.last_seq() {
                return;
            }
            for member in state.members.values() {
                match member.outbox.offer(Outbound::Message(delivery.clone())) {
                    Offer::Queued => queued += 1,
                    Offer::Skipped => skipped += 1,
                    Offer::Kicked => kicked += 1,
                    Offer::Closed => {}
                }
            }
            hub.last_seq.store(delivery.message.seq, Ordering::Release);
        }
        let lag = (protocol::now_ms() - sequenced_ms).max(0) as f64 / 1000.0;
        self.metrics.sequence_to_gateway.observe(lag);
        if skipped + kicked > 0 {
            self.metrics.drops.with_label_values(&["queue_full"]).inc_by(u64::from(skipped + kicked));
        }
        let message = &delivery.message;
        let mut detail = serde_json::json!({"gateway": self.gateway_id, "connections": queued});
        if skipped + kicked > 0 {
            detail["deferred_queue_full"] = serde_json::json!(skipped + kicked);
            detail["kicked_slow_consumer"] = serde_json::json!(kicked);
        }
        if self.faults.is_active() {
            detail["faults_active"] = serde_json::json!(true);
        }
        self.journal.record(message.id, &message.trace_id, "gateway.fanout", detail);
    }

    fn on_event(&self, hub: &Hub, event: RoomEvent) {
        let mut state = hub.lock();
        let (frame, skip_user) = match event {
            RoomEvent::Presence { user, state: presence, gateway } => {
                if gateway != self.gateway_id {
                    let remote = state.remote.entry(user.clone()).or_default();
                    match presence {
                        PresenceState::Online => remote.insert(gateway),
                        PresenceState::Offline => remote.remove(&gateway),
                    };
                    if remote.is_empty() {
                        state.remote.remove(&user);
                    }
                }
                let frame = ServerFrame::Presence { room: hub.room.clone(), user: user.clone(), state: presence };
                (frame, user)
            }
            RoomEvent::Typing { user } => (ServerFrame::Typing { room: hub.room.clone(), user: user.clone() }, user),
        };
        let text: Utf8Bytes = frame.to_json().into();
        for member in state.members.values() {
            if member.user != skip_user && member.outbox.offer(Outbound::Frame(text.clone())) != Offer::Queued {
                self.metrics.drops.with_label_values(&["ephemeral_queue_full"]).inc();
            }
        }
    }
}
