//! Presence across gateways: which users are in a room here and on other gateways, told to
//! local members as they come and go. Each hub publishes its roster every roster interval (and
//! when a new hub asks); a gateway not heard from for three intervals has its users go offline.

use std::collections::HashSet;

use protocol::bus::RoomEvent;
use protocol::frames::PresenceState;
use protocol::ServerFrame;
use telemetry::metrics::Metrics;
use tokio::time::Instant;

use super::hub::{Hub, HubState};
use super::Rooms;

/// The users of one other gateway in a room, and when that gateway was last heard.
pub(super) struct RemoteRoster {
    pub(super) users: HashSet<String>,
    pub(super) heard: Instant,
}

impl HubState {
    /// Tells local members (but the user) that the user's presence changed.
    pub(super) fn tell_presence(&self, room: &str, user: &str, state: PresenceState, metrics: &Metrics) {
        let frame = ServerFrame::Presence { room: room.to_owned(), user: user.to_owned(), state };
        self.tell_others(user, frame.to_json().into(), metrics);
    }

    /// Applies a change to the users of a remote gateway, telling local members about users
    /// whose overall presence changed.
    pub(super) fn update_remote(
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

impl Rooms {
    pub(super) fn on_event(&self, hub: &Hub, event: RoomEvent) {
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

    pub(super) async fn publish_roster(&self, hub: &Hub) {
        let users: Vec<String> = hub.lock().users.keys().cloned().collect();
        let roster = RoomEvent::Roster { gateway: self.gateway_id.clone(), users };
        if let Err(e) = self.bus.publish_event(&hub.room, roster).await {
            tracing::debug!(room = %hub.room, error = %e, "roster not published");
        }
    }

    /// Forgets gateways not heard from for three roster periods: their users go offline.
    pub(super) fn expire_rosters(&self, hub: &Hub) {
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
