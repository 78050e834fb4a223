//! One room's hub: its local members, the users present on other gateways, the last seq
//! forwarded and the room's recent messages.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::ws::Utf8Bytes;
use telemetry::metrics::Metrics;
use tokio::sync::Notify;

use super::presence::RemoteRoster;
use crate::outbox::{Delivery, Offer, Outbound, Outbox};

/// One room's presence at this gateway.
pub struct Hub {
    pub(super) room: String,
    pub(super) last_seq: AtomicU64,
    pub(super) state: Mutex<HubState>,
    pub(super) stop: Notify,
    /// Another gateway asked who is here: publish the roster now.
    pub(super) roster_due: Notify,
}

#[derive(Default)]
pub(super) struct HubState {
    pub(super) members: HashMap<u64, Member>,
    /// Local connections per user.
    pub(super) users: HashMap<String, usize>,
    /// Users present on other gateways, by gateway, with when that gateway was last heard.
    pub(super) remote: HashMap<String, RemoteRoster>,
    /// The room's latest messages, consecutive seqs ending at `last_seq`.
    pub(super) recent: VecDeque<Arc<Delivery>>,
    /// The room's message chain as forwarded: each message is checked against it.
    pub(super) chain: protocol::chain::RoomChain,
    pub(super) closed: bool,
}

impl HubState {
    /// Users present in the room, here and on other gateways, sorted.
    pub(super) fn member_names(&self) -> Vec<String> {
        let remote = self.remote.values().flat_map(|roster| roster.users.iter());
        let mut names: Vec<String> = self.users.keys().chain(remote).cloned().collect();
        names.sort();
        names.dedup();
        names
    }

    /// Whether the user is in the room on any gateway.
    pub(super) fn present(&self, user: &str) -> bool {
        self.users.contains_key(user) || self.remote.values().any(|roster| roster.users.contains(user))
    }

    /// Queues a frame for every local member but `user`.
    pub(super) fn tell_others(&self, user: &str, text: Utf8Bytes, metrics: &Metrics) {
        let text = Arc::new(text);
        for member in self.members.values() {
            if member.user != user && member.outbox.offer(Outbound::Frame(text.clone())) != Offer::Queued {
                metrics.drops.with_label_values(&["ephemeral_queue_full"]).inc();
            }
        }
    }
}

/// A local connection in the room.
pub(super) struct Member {
    pub(super) user: String,
    pub(super) outbox: Arc<Outbox>,
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

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
