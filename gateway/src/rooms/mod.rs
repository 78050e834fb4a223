//! Room hubs: one per room with local members, following the room's feed on the bus and fanning
//! it out to this gateway's connections.
//!
//! A hub forwards each room's messages in seq order with no gap and no duplicate: a repeated
//! seq is ignored, and a seq that jumps is preceded by the missing messages read from the store
//! (gap repair). `last_seq` is the last seq forwarded; a join registers its connection and reads
//! `last_seq` under the same lock the hub forwards under, so everything after it reaches the
//! new member live and everything up to it can be replayed from the store.
//!
//! - [`hub`]: one room's members, presence and recent messages;
//! - `feed`: the hub's feed task (ordering and gap repair);
//! - `presence`: users present across gateways.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus::{BusError, RoomBus};
use protocol::bus::RoomEvent;
use protocol::frames::PresenceState;
use storage::PageQuery;
use telemetry::journal::Journal;
use telemetry::metrics::Metrics;
use tokio::sync::{Notify, OnceCell};

use crate::chain::ChainWatch;
use crate::config::GatewayConfig;
use crate::history::HistoryReader;
use crate::hook::DeliveryHook;
use crate::outbox::{Delivery, Outbox};

mod feed;
pub mod hub;
mod presence;
#[cfg(test)]
mod tests;

pub use hub::Hub;
use hub::{HubState, Member};

/// Messages each hub keeps in memory for replays and gap fills.
pub(super) const RECENT: usize = 512;
/// How long a new hub waits for other gateways' rosters before answering its first join.
const ROSTER_WAIT: Duration = Duration::from_millis(150);

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
    bus: Arc<dyn RoomBus>,
    history: HistoryReader,
    metrics: Metrics,
    journal: Arc<Journal>,
    hook: Option<Arc<dyn DeliveryHook>>,
    chain: ChainWatch,
    gap_repair: bool,
    roster_interval: Duration,
    roster_wait: Duration,
    hubs: Mutex<HashMap<String, Slot>>,
}

impl Rooms {
    /// A registry with no hubs yet.
    pub fn new(
        config: &GatewayConfig,
        bus: Arc<dyn RoomBus>,
        history: HistoryReader,
        metrics: Metrics,
        journal: Arc<Journal>,
        hook: Option<Arc<dyn DeliveryHook>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            gateway_id: config.gateway_id.clone(),
            bus,
            history,
            chain: ChainWatch::new(&config.gateway_id, metrics.clone(), journal.clone()),
            metrics,
            journal,
            hook,
            gap_repair: config.gap_repair,
            roster_interval: config.roster_interval,
            roster_wait: ROSTER_WAIT,
            hubs: Mutex::new(HashMap::new()),
        })
    }

    /// Where chain violations are reported.
    pub fn chain(&self) -> &ChainWatch {
        &self.chain
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
                // The recent messages are checked like any history; the newest is where the
                // room's chain continues.
                self.chain.check_page(&messages);
                if let Some(newest) = messages.last() {
                    let _ = state.chain.observe(newest);
                }
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
}
