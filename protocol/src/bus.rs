//! Envelopes that travel between gateways and fanout workers over the bus (in-process or NATS).

use serde::{Deserialize, Serialize};

use crate::frames::{ChatMessage, PresenceState};

/// A client's `send`, accepted by a gateway and handed to the sequencer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendCommand {
    /// Target room.
    pub room: String,
    /// Authenticated sender.
    pub user: String,
    /// The sender's idempotency key.
    pub client_msg_id: String,
    /// Message text.
    pub body: String,
    /// W3C `traceparent` of the message's trace (header form).
    pub traceparent: String,
    /// Id of the gateway that accepted it.
    pub gateway: String,
    /// Milliseconds since the epoch after which the gateway has told the client `unavailable`:
    /// a worker must not store the send any more (0: no deadline).
    #[serde(default)]
    pub deadline_ms: i64,
}

impl SendCommand {
    /// The dedupe key: one message per user, room and client message id.
    pub fn dedupe_key(&self) -> String {
        dedupe_key(&self.room, &self.user, &self.client_msg_id)
    }
}

/// The dedupe key of a message: user, room and client message id, unambiguously joined.
pub fn dedupe_key(room: &str, user: &str, client_msg_id: &str) -> String {
    // Rooms and users cannot contain '/', so the split is unambiguous.
    format!("{room}/{user}/{client_msg_id}")
}

/// The sequencer's answer to a [`SendCommand`]: the stored message (new, or the earlier one
/// for a repeated `client_msg_id`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendOutcome {
    /// The stored message.
    pub message: ChatMessage,
    /// True when this send repeated an earlier one and created nothing new.
    pub duplicate: bool,
}

/// What a fanout worker answers a gateway over the bus for one send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum SendReply {
    /// Stored (or found stored earlier).
    Stored(SendOutcome),
    /// Refused; the client sees `bad_request` with this reason.
    Rejected {
        /// Why.
        reason: String,
    },
    /// Not stored because a backend failed; the client may retry.
    Unavailable {
        /// Why.
        reason: String,
    },
}

/// Ephemeral room events gateways exchange: presence and typing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RoomEvent {
    /// A user came online or went offline in the room on some gateway.
    Presence {
        /// The user.
        user: String,
        /// New state.
        state: PresenceState,
        /// The gateway where it happened.
        gateway: String,
    },
    /// A user is typing.
    Typing {
        /// The user.
        user: String,
    },
    /// A gateway that just started following the room asks the others for their rosters.
    RosterRequest {
        /// The asking gateway.
        gateway: String,
    },
    /// A gateway's periodic list of its users in the room; a gateway not heard from for a
    /// few periods is presumed dead and its users offline.
    Roster {
        /// The gateway.
        gateway: String,
        /// Its users in the room.
        users: Vec<String>,
    },
}
