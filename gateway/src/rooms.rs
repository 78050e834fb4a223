//! Room hubs: one per room with local members, following the room's feed on the bus and fanning
//! it out to this gateway's connections.
//!
//! A hub forwards each room's messages in seq order with no gap and no duplicate: a repeated
//! seq is ignored, and a seq that jumps is preceded by the missing messages read from the store
//! (gap repair). `last_seq` is the last seq forwarded; a join registers its connection and reads
//! `last_seq` under the same lock the hub forwards under, so everything after it reaches the
//! new member live and everything up to it can be replayed from the store.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use bus::{BusError, FeedItem, GatewayBus};
use protocol::bus::RoomEvent;
use protocol::frames::PresenceState;
use protocol::{ChatMessage, ServerFrame};
use storage::PageQuery;
use telemetry::journal::Journal;
use telemetry::metrics::Metrics;
use tokio::sync::{Notify, OnceCell};

use crate::config::GatewayConfig;
use crate::history::HistoryReader;
use crate::hook::DeliveryHook;
use crate::outbox::{Delivery, Offer, Outbound, Outbox};

/// Messages each hub keeps in memory for replays and gap fills.
const RECENT: usize = 512;
/// A quiet feed is checked against the store this long after its last message, in case the
/// bus lost the last message of a burst (a later message would have revealed the gap).
const TAIL_CHECK: Duration = Duration::from_secs(1);
/// After a bus reconnect, rooms check their tails spread over this long.
const RESUME_SPREAD: Duration = Duration::from_secs(2);

/// A room's fixed offset within [`RESUME_SPREAD`].
fn resume_spread(room: &str) -> Duration {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    room.hash(&mut hasher);
    RESUME_SPREAD.mul_f64((hasher.finish() % 1024) as f64 / 1024.0)
}

/// How long a new hub waits for other gateways' rosters before answering its first join.
const ROSTER_WAIT: Duration = Duration::from_millis(150);

/// One room's presence at this gateway.
pub struct Hub {
    room: String,
    last_seq: AtomicU64,
    state: Mutex<HubState>,
    stop: Notify,
    /// Another gateway asked who is here: publish the roster now.
    roster_due: Notify,
}

#[derive(Default)]
struct HubState {
    members: HashMap<u64, Member>,
    /// Local connections per user.
    users: HashMap<String, usize>,
    /// Users present on other gateways, by gateway, with when that gateway was last heard.
    remote: HashMap<String, RemoteRoster>,
    /// The room's latest messages, consecutive seqs ending at `last_seq`.
    recent: VecDeque<Arc<Delivery>>,
    closed: bool,
}

struct RemoteRoster {
    users: HashSet<String>,
    heard: Instant,
}

impl HubState {
    fn member_names(&self) -> Vec<String> {
        let remote = self.remote.values().flat_map(|roster| roster.users.iter());
        let mut names: Vec<String> = self.users.keys().chain(remote).cloned().collect();
        names.sort();
        names.dedup();
        names
    }

    /// Whether the user is in the room on any gateway.
    fn present(&self, user: &str) -> bool {
        self.users.contains_key(user) || self.remote.values().any(|roster| roster.users.contains(user))
    }

    /// Tells local members (but the user) that the user's presence changed.
    fn tell_presence(&self, room: &str, user: &str, state: PresenceState, metrics: &Metrics) {
        let frame = ServerFrame::Presence { room: room.to_owned(), user: user.to_owned(), state };
        self.tell_others(user, frame.to_json().into(), metrics);
    }

    fn tell_others(&self, user: &str, text: Utf8Bytes, metrics: &Metrics) {
        let text = Arc::new(text);
        for member in self.members.values() {
            if member.user != user && member.outbox.offer(Outbound::Frame(text.clone())) != Offer::Queued {
                metrics.drops.with_label_values(&["ephemeral_queue_full"]).inc();
            }
        }
    }

    /// Applies a change to the users of a remote gateway, telling local members about users
    /// whose overall presence changed.
    fn update_remote(
        &mut self,
        room: &str,
        gateway: &str,
        change: impl FnOnce(&mut HashSet<String>),
        metrics: &Metrics,
    ) {
        let before: HashSet<String> = self.remote.get(gateway).map(|r| r.users.clone()).unwrap_or_default();
        let was: Vec<(String, bool)> = before.iter().map(|u| (u.clone(), self.present(u))).collect();
        let roster = self
            .remote
            .entry(gateway.to_owned())
            .or_insert_with(|| RemoteRoster { users: HashSet::new(), heard: Instant::now() });
        roster.heard = Instant::now();
        change(&mut roster.users);
        let after = roster.users.clone();
        if after.is_empty() {
            self.remote.remove(gateway);
        }
        for (user, was_present) in was {
            if was_present && !self.present(&user) {
                self.tell_presence(room, &user, PresenceState::Offline, metrics);
            }
        }
        for user in after.difference(&before) {
            // Present now; was it before this change?
            let elsewhere = self.users.contains_key(user)
                || self.remote.iter().any(|(g, r)| g != gateway && r.users.contains(user));
            if !elsewhere {
                self.tell_presence(room, user, PresenceState::Online, metrics);
            }
        }
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

    /// The messages with `after < seq <= upto` if they are all still in memory.
    pub fn recent_between(&self, after: u64, upto: u64) -> Option<Vec<Arc<Delivery>>> {
        let state = self.lock();
        let first = state.recent.front()?.message.seq;
        if after + 1 < first || upto > self.last_seq() {
            return None;
        }
        let found: Vec<Arc<Delivery>> =
            state.recent.iter().filter(|d| d.message.seq > after && d.message.seq <= upto).cloned().collect();
        (found.len() as u64 == upto.saturating_sub(after)).then_some(found)
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
    hook: Option<Arc<dyn DeliveryHook>>,
    gap_repair: bool,
    roster_interval: Duration,
    roster_wait: Duration,
    hubs: Mutex<HashMap<String, Slot>>,
}

impl Rooms {
    /// A registry with no hubs yet.
    pub fn new(
        config: &GatewayConfig,
        bus: Arc<dyn GatewayBus>,
        history: HistoryReader,
        metrics: Metrics,
        journal: Arc<Journal>,
        hook: Option<Arc<dyn DeliveryHook>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            gateway_id: config.gateway_id.clone(),
            bus,
            history,
            metrics,
            journal,
            hook,
            gap_repair: config.gap_repair,
            roster_interval: config.roster_interval,
            roster_wait: ROSTER_WAIT,
            hubs: Mutex::new(HashMap::new()),
        })
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
                if !state.present(user) {
                    state.tell_presence(room, user, PresenceState::Online, &self.metrics);
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
                    if !state.present(&member.user) {
                        state.tell_presence(&hub.room, &member.user, PresenceState::Offline, &self.metrics);
                    }
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

    /// Tells other gateways that this gateway's first connection of `user` joined, or its
    /// last one left.
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
        let last_seq = self.history.last_seq(room).await.map_err(|e| BusError::unavailable(e.to_string()))?;
        // Recent history in memory: joins with `since` and gap fills then rarely touch the store.
        let mut state = HubState::default();
        if let Ok(page) = self.history.page(room, PageQuery::newest(RECENT as u32)).await {
            let messages: Vec<_> = page.messages.into_iter().filter(|m| m.seq <= last_seq).collect();
            if messages.last().is_some_and(|m| m.seq == last_seq) {
                state.recent = messages.into_iter().map(|m| Arc::new(Delivery::new(Arc::new(m)))).collect();
            }
        }
        let hub = Arc::new(Hub {
            room: room.to_owned(),
            last_seq: AtomicU64::new(last_seq),
            state: Mutex::new(state),
            stop: Notify::new(),
            roster_due: Notify::new(),
        });
        let rooms = self.clone();
        let task_hub = hub.clone();
        tokio::spawn(async move { rooms.follow(task_hub, feed).await });
        // Ask the other gateways in this room who is there; their rosters arrive on the feed.
        if self.bus.is_distributed() {
            let ask = RoomEvent::RosterRequest { gateway: self.gateway_id.clone() };
            if self.bus.publish_event(room, ask).await.is_ok() {
                tokio::time::sleep(self.roster_wait).await;
            }
        }
        Ok(hub)
    }

    /// The hub's feed task.
    async fn follow(self: Arc<Self>, hub: Arc<Hub>, mut feed: bus::RoomFeed) {
        let mut roster = tokio::time::interval(self.roster_interval);
        roster.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let tail = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(tail);
        let mut tail_armed = false;
        let mut tail_noted = 0;
        let mut after_outage = false;
        loop {
            let item = tokio::select! {
                () = hub.stop.notified() => break,
                () = &mut tail, if tail_armed => {
                    tail_armed = self.check_tail(&hub, &mut tail_noted, std::mem::take(&mut after_outage)).await;
                    if tail_armed {
                        tail.as_mut().reset(tokio::time::Instant::now() + TAIL_CHECK);
                    }
                    continue;
                }
                item = feed.items.recv() => item,
                () = hub.roster_due.notified() => {
                    self.publish_roster(&hub).await;
                    continue;
                }
                _ = roster.tick(), if self.bus.is_distributed() => {
                    self.publish_roster(&hub).await;
                    self.expire_rosters(&hub);
                    continue;
                }
            };
            match item {
                Some(FeedItem::Message(message, traceparent)) => {
                    self.on_message(&hub, message, traceparent.as_deref()).await;
                    if self.gap_repair_on() {
                        tail.as_mut().reset(tokio::time::Instant::now() + TAIL_CHECK);
                        tail_armed = true;
                    }
                }
                Some(FeedItem::Event(event)) => self.on_event(&hub, event),
                Some(FeedItem::Resumed) => {
                    // Whatever was published while the bus was away never arrives: look at
                    // the store once the room has been quiet for a moment, each room at its
                    // own moment so a gateway with many rooms does not read them all at once.
                    tracing::debug!(room = %hub.room, "bus connection resumed; checking the room's tail");
                    if self.gap_repair_on() {
                        tail.as_mut().reset(tokio::time::Instant::now() + TAIL_CHECK + resume_spread(&hub.room));
                        tail_armed = true;
                        after_outage = true;
                    }
                }
                None => {
                    tracing::warn!(room = %hub.room, "room feed ended");
                    break;
                }
            }
        }
    }

    async fn on_message(&self, hub: &Hub, message: Arc<ChatMessage>, traceparent: Option<&str>) {
        let last = hub.last_seq();
        if message.seq <= last {
            self.metrics.drops.with_label_values(&["feed_duplicate"]).inc();
            return;
        }
        if message.seq > last + 1 {
            if self.gap_repair_on() {
                self.repair_gap(hub, last, message.seq).await;
            } else {
                self.journal.record(message.id, &message.trace_id, "gateway.gap_unrepaired", serde_json::json!({"gateway": self.gateway_id, "missing_from": last + 1, "missing_to": message.seq - 1}));
            }
        }
        let span = tracing::info_span!(target: telemetry::logging::HOP_TARGET, "gateway.deliver", room = %message.room, seq = message.seq, gateway = %self.gateway_id);
        if let Some(parent) = traceparent.and_then(telemetry::trace::parse_traceparent) {
            telemetry::trace::set_parent(&span, parent);
        }
        let context = tracing_opentelemetry::OpenTelemetrySpanExt::context(&span);
        let trace = opentelemetry::trace::TraceContextExt::span(&context).span_context().is_valid().then_some(context);
        let _entered = span.enter();
        self.forward(hub, message, trace);
    }

    /// Whether gaps are repaired now (configured, and not switched off by the delivery hook).
    fn gap_repair_on(&self) -> bool {
        self.gap_repair && self.hook.as_ref().is_none_or(|hook| hook.repairs_gaps())
    }

    /// After a quiet second, makes sure the bus did not lose the last message of a burst.
    ///
    /// A message the store has but the feed has not brought may still be on its way (stored,
    /// not yet published, or in NATS), so one check only notes the store's newest seq in
    /// `noted`; the next check, a second later, repairs whatever up to `noted` has still not
    /// arrived. After a bus outage (`after_outage`) everything stored is known to be lost
    /// and is repaired at once. Returns whether to check again.
    async fn check_tail(&self, hub: &Hub, noted: &mut u64, after_outage: bool) -> bool {
        let stored = match self.history.last_seq(&hub.room).await {
            Ok(stored) => stored,
            Err(e) => {
                tracing::debug!(room = %hub.room, error = %e, "tail check failed");
                return false;
            }
        };
        let forwarded = hub.last_seq();
        let lost_up_to = if after_outage { stored } else { (*noted).min(stored) };
        if lost_up_to > forwarded {
            tracing::info!(room = %hub.room, forwarded, stored, "feed missed the newest messages; repairing");
            self.repair_gap(hub, forwarded, lost_up_to + 1).await;
        }
        *noted = stored;
        stored > hub.last_seq()
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
                        tracing::debug!(room = %hub.room, seq = message.seq, message_id = %message.id, trace_id = %message.trace_id, "recovered by gap repair");
                        self.journal.record(
                            message.id,
                            &message.trace_id,
                            "gateway.gap_repair",
                            serde_json::json!({"gateway": self.gateway_id}),
                        );
                        self.forward(hub, Arc::new(message), None);
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
    fn forward(&self, hub: &Hub, message: Arc<ChatMessage>, trace: Option<telemetry::trace::Context>) {
        let sequenced_ms = message.ts;
        let delivery = Arc::new(Delivery::traced(message, trace));
        let (mut queued, mut skipped, mut kicked) = (0u32, 0u32, 0u32);
        {
            let mut state = hub.lock();
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
            state.recent.push_back(delivery.clone());
            if state.recent.len() > RECENT {
                state.recent.pop_front();
            }
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
        self.journal.record(message.id, &message.trace_id, "gateway.fanout", detail);
    }

    fn on_event(&self, hub: &Hub, event: RoomEvent) {
        let mut state = hub.lock();
        match event {
            // This gateway's own presence changes were told locally when they happened.
            RoomEvent::Presence { gateway, .. }
            | RoomEvent::Roster { gateway, .. }
            | RoomEvent::RosterRequest { gateway }
                if gateway == self.gateway_id => {}
            RoomEvent::Presence { user, state: presence, gateway } => {
                state.update_remote(
                    &hub.room,
                    &gateway,
                    |users| {
                        match presence {
                            PresenceState::Online => users.insert(user),
                            PresenceState::Offline => users.remove(&user),
                        };
                    },
                    &self.metrics,
                );
            }
            RoomEvent::Roster { gateway, users } => {
                state.update_remote(
                    &hub.room,
                    &gateway,
                    |current| *current = users.into_iter().collect(),
                    &self.metrics,
                );
            }
            RoomEvent::RosterRequest { .. } => {
                drop(state);
                hub.roster_due.notify_one();
            }
            RoomEvent::Typing { user } => {
                let frame = ServerFrame::Typing { room: hub.room.clone(), user: user.clone() };
                state.tell_others(&user, frame.to_json().into(), &self.metrics);
            }
        }
    }

    async fn publish_roster(&self, hub: &Hub) {
        let users: Vec<String> = hub.lock().users.keys().cloned().collect();
        let roster = RoomEvent::Roster { gateway: self.gateway_id.clone(), users };
        if let Err(e) = self.bus.publish_event(&hub.room, roster).await {
            tracing::debug!(room = %hub.room, error = %e, "roster not published");
        }
    }

    /// Forgets gateways not heard from for three roster periods: their users go offline.
    fn expire_rosters(&self, hub: &Hub) {
        let mut state = hub.lock();
        let silent: Vec<String> = state
            .remote
            .iter()
            .filter(|(_, roster)| roster.heard.elapsed() > self.roster_interval * 3)
            .map(|(gateway, _)| gateway.clone())
            .collect();
        for gateway in silent {
            tracing::info!(room = %hub.room, %gateway, "gateway silent for 3 roster periods; its users are offline");
            state.update_remote(&hub.room, &gateway, |users| users.clear(), &self.metrics);
        }
    }
}
