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
    /// The workers' deadline, in milliseconds since the epoch: after it a worker must not store
    /// the send any more (0: no deadline). It is earlier than the client's (the send's 5 s
    /// deadline less the time an answer takes to reach the gateway), so an ack or refusal a
    /// worker decides by then arrives in time; the gateway answers the client by the send's own
    /// deadline either way.
    #[serde(default)]
    pub deadline_ms: i64,
}

impl SendCommand {
    /// The dedupe key: one message per user, room and client message id.
    pub fn dedupe_key(&self) -> String {
        dedupe_key(&self.room, &self.user, &self.client_msg_id)
    }

    /// The trace id in `traceparent`, borrowed ([`trace_id_in`]).
    pub fn trace_id(&self) -> &str {
        trace_id_in(&self.traceparent)
    }
}

/// What a log line says for a trace id it does not know: W3C's invalid all-zero id.
pub const NO_TRACE_ID: &str = "00000000000000000000000000000000";

/// The trace id inside a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`), borrowed from it,
/// or [`NO_TRACE_ID`] when it holds none. For log lines: it neither allocates nor builds a
/// trace context, and what it returns is always 32 lowercase hex digits, safe to print bare.
pub fn trace_id_in(traceparent: &str) -> &str {
    let bytes = traceparent.as_bytes();
    match traceparent.get(3..35) {
        Some(id) if bytes[2] == b'-' && bytes.get(35) == Some(&b'-') && is_trace_id(id) => id,
        _ => NO_TRACE_ID,
    }
}

/// Whether `id` is a valid W3C trace id: 32 lowercase hex digits, not all zero.
pub fn is_trace_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) && id != NO_TRACE_ID
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
    /// Not stored because a backend failed or the send expired; the client may retry.
    Unavailable {
        /// Why.
        reason: String,
        /// True when no copy of the send can be stored any more: the worker wrote nothing of
        /// it, and the bus cannot hand it to another worker before its deadline. The gateway
        /// then passes it on as `unavailable` (not stored) when it comes in time; an unsettled
        /// refusal leaves the send not known, answered `internal` at its deadline if no other
        /// answer comes. Absent (false)
        /// from workers that predate it.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        settled: bool,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_settled_refusal_says_so_and_an_unsettled_one_reads_as_before() {
        let settled = SendReply::Unavailable { reason: "expired".into(), settled: true };
        let json = serde_json::to_string(&settled).unwrap();
        assert_eq!(json, r#"{"result":"unavailable","reason":"expired","settled":true}"#);
        assert_eq!(serde_json::from_str::<SendReply>(&json).unwrap(), settled);
        let unsettled = SendReply::Unavailable { reason: "store down".into(), settled: false };
        let json = serde_json::to_string(&unsettled).unwrap();
        assert_eq!(json, r#"{"result":"unavailable","reason":"store down"}"#, "older gateways read it unchanged");
        assert_eq!(
            serde_json::from_str::<SendReply>(&json).unwrap(),
            unsettled,
            "older workers' refusals are unsettled"
        );
    }

    #[test]
    fn the_trace_id_of_a_traceparent_is_borrowed_from_it() {
        let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        assert_eq!(trace_id_in(traceparent), "0af7651916cd43dd8448eb211c80319c");
        let command = SendCommand {
            room: "r".into(),
            user: "u".into(),
            client_msg_id: "c".into(),
            body: "b".into(),
            traceparent: traceparent.into(),
            gateway: "g".into(),
            deadline_ms: 0,
        };
        assert_eq!(command.trace_id(), "0af7651916cd43dd8448eb211c80319c");
    }

    #[test]
    fn anything_but_a_traceparent_has_no_trace_id() {
        for value in [
            "",
            "00",
            "00-0af7651916cd43dd8448eb211c80319c",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c0-7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c8031é-b7ad6b7169203331-01",
            "00_0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c message_id=x",
        ] {
            assert_eq!(trace_id_in(value), NO_TRACE_ID, "{value:?}");
        }
    }
}
