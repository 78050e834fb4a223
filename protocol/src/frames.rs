//! Client and server frames: one JSON object with a string `type` per WebSocket text frame.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A request tag chosen by the client and echoed in the frame that answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Req {
    /// An integer tag.
    Int(i64),
    /// A string tag.
    Str(String),
}

/// Everything a client may send.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    /// First frame of a connection: a user name (dev mode) or a JWT (auth on).
    Hello {
        /// The user name, taken as given in dev mode.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
        /// An HS256 JWT whose `sub` is the user.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    /// Join a room, optionally replaying everything after `since`.
    Join {
        /// The room to join.
        room: String,
        /// The last seq the client already has.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<u64>,
    },
    /// Leave a room.
    Leave {
        /// The room to leave.
        room: String,
    },
    /// Post a message.
    Send {
        /// The room to post to; the connection must have joined it.
        room: String,
        /// Client-chosen id that makes the send idempotent.
        client_msg_id: String,
        /// The message text.
        body: String,
        /// Extension: a W3C `traceparent` the message's trace should join.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        traceparent: Option<String>,
    },
    /// Page through stored messages.
    History {
        /// The room to read.
        room: String,
        /// Only messages with seq < before.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        before: Option<u64>,
        /// Only messages with seq > after.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<u64>,
        /// Page size, default 50, at most 200.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// Ephemeral typing signal.
    Typing {
        /// The room the user types in.
        room: String,
    },
    /// Application-level liveness check.
    Ping,
}

impl ClientFrame {
    /// The frame's `type` as written on the wire.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientFrame::Hello { .. } => "hello",
            ClientFrame::Join { .. } => "join",
            ClientFrame::Leave { .. } => "leave",
            ClientFrame::Send { .. } => "send",
            ClientFrame::History { .. } => "history",
            ClientFrame::Typing { .. } => "typing",
            ClientFrame::Ping => "ping",
        }
    }
}

/// A stored, sequenced chat message: the `message` frame without its `type`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// The room it belongs to.
    pub room: String,
    /// Per-room sequence number, from 1, gapless.
    pub seq: u64,
    /// Unique id (UUID v7).
    pub id: Uuid,
    /// The sender.
    pub user: String,
    /// The text.
    pub body: String,
    /// Milliseconds since the Unix epoch when it was sequenced.
    pub ts: i64,
    /// The sender's idempotency key.
    pub client_msg_id: String,
    /// W3C trace id (32 lowercase hex digits) of the message's trace.
    pub trace_id: String,
    /// Extension (message chain): the `digest` of the room's message with seq - 1 (64 zeros for
    /// seq 1); absent on messages stored before the chain existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev: Option<String>,
    /// Extension (message chain): lowercase hex SHA-256 chaining this message to `prev`
    /// ([`crate::chain::digest`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// The error codes of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Unparseable, mistyped or unknown frame, or a bad name.
    BadRequest,
    /// No successful `hello` yet, or a bad token.
    Unauthorized,
    /// The token does not allow this room.
    Forbidden,
    /// The connection has not joined the room.
    NotJoined,
    /// The frame or body exceeds a limit.
    TooLarge,
    /// The connection sends faster than its rate limit.
    RateLimited,
    /// A backend is down; the send was not accepted and may be retried.
    Unavailable,
    /// Something unexpected failed on the server.
    Internal,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotJoined => "not_joined",
            Self::TooLarge => "too_large",
            Self::RateLimited => "rate_limited",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }
}

/// Presence states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceState {
    /// The user's first connection joined the room.
    Online,
    /// The user's last connection left the room or dropped.
    Offline,
}

/// Everything the server sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// Answer to a successful `hello`.
    Welcome {
        /// The authenticated user.
        user: String,
        /// This connection's session id.
        session: Uuid,
        /// The id of the gateway holding the connection.
        gateway: String,
        /// Echo of the request tag.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req: Option<Req>,
    },
    /// Answer to `join`.
    Joined {
        /// The joined room.
        room: String,
        /// The room's newest seq (0 when empty).
        last_seq: u64,
        /// Users present in the room on any gateway.
        members: Vec<String>,
        /// Echo of the request tag.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req: Option<Req>,
    },
    /// Answer to `leave`.
    Left {
        /// The room left.
        room: String,
        /// Echo of the request tag.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req: Option<Req>,
    },
    /// The message is durably stored.
    Ack {
        /// The room.
        room: String,
        /// The client's idempotency key.
        client_msg_id: String,
        /// The message id.
        id: Uuid,
        /// The message's seq.
        seq: u64,
        /// When it was sequenced.
        ts: i64,
        /// Echo of the request tag.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req: Option<Req>,
    },
    /// A message in a joined room.
    Message(ChatMessage),
    /// Answer to `history`.
    History {
        /// The room.
        room: String,
        /// Messages in ascending seq.
        messages: Vec<ChatMessage>,
        /// Whether more messages lie beyond this page in the direction asked.
        has_more: bool,
        /// Echo of the request tag.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req: Option<Req>,
    },
    /// A user came online or went offline in a room.
    Presence {
        /// The room.
        room: String,
        /// The user.
        user: String,
        /// Online or offline.
        state: PresenceState,
    },
    /// Another member is typing.
    Typing {
        /// The room.
        room: String,
        /// The typing user.
        user: String,
    },
    /// Answer to `ping`.
    Pong {
        /// Echo of the request tag.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req: Option<Req>,
    },
    /// The gateway is shutting down; reconnect and rejoin with `since`.
    Reconnect {
        /// Why, e.g. `draining`.
        reason: String,
    },
    /// A request failed.
    Error {
        /// Machine-readable code.
        code: ErrorCode,
        /// Human-readable explanation.
        message: String,
        /// Echo of the request tag.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req: Option<Req>,
    },
}

impl ServerFrame {
    /// An `error` frame.
    pub fn error(code: ErrorCode, message: impl Into<String>, req: Option<Req>) -> Self {
        Self::Error { code, message: message.into(), req }
    }

    /// The frame as JSON text.
    pub fn to_json(&self) -> String {
        // Serializing these plain structs cannot fail: no maps with non-string keys, no floats.
        serde_json::to_string(self)
            .unwrap_or_else(|e| format!(r#"{{"type":"error","code":"internal","message":"encode: {e}"}}"#))
    }
}

/// A client frame that could not be understood, with the tag to echo in the `error` answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct FrameError {
    /// The request tag, when the frame was an object with a valid `req`.
    pub req: Option<Req>,
    /// Human-readable reason.
    pub message: String,
}

/// Parses one text frame into a [`ClientFrame`] and its request tag.
///
/// Invalid JSON, a non-object, a missing or mistyped field, or an unknown `type` all become a
/// [`FrameError`] whose message says what was wrong; the caller answers it with `bad_request`.
pub fn parse_client_frame(text: &str) -> Result<(ClientFrame, Option<Req>), FrameError> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| FrameError { req: None, message: format!("invalid JSON: {e}") })?;
    let serde_json::Value::Object(mut object) = value else {
        return Err(FrameError { req: None, message: "a frame must be a JSON object".into() });
    };
    let req = match object.remove("req") {
        None | Some(serde_json::Value::Null) => None,
        Some(raw) => Some(
            serde_json::from_value::<Req>(raw)
                .map_err(|_| FrameError { req: None, message: "`req` must be a string or an integer".into() })?,
        ),
    };
    match object.get("type") {
        Some(serde_json::Value::String(_)) => {}
        Some(_) => return Err(FrameError { req, message: "`type` must be a string".into() }),
        None => return Err(FrameError { req, message: "missing field `type`".into() }),
    }
    let frame = serde_json::from_value::<ClientFrame>(serde_json::Value::Object(object)).map_err(|e| {
        // Only on this (rare) path: for a wrong type, read the frame again to say which field.
        let message = e.to_string();
        let named = (message.starts_with("invalid type") || message.starts_with("invalid value"))
            .then(|| serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text).ok())
            .flatten()
            .and_then(|object| mistyped_field(&object));
        FrameError { req: req.clone(), message: named.unwrap_or(message) }
    })?;
    Ok((frame, req))
}

/// Names the first known field whose JSON type is wrong in a frame serde refused, since serde's
/// own message for an internally tagged enum does not say which field it was.
fn mistyped_field(object: &serde_json::Map<String, serde_json::Value>) -> Option<String> {
    const SEQS: [&str; 4] = ["since", "before", "after", "limit"];
    const STRINGS: [&str; 6] = ["room", "user", "token", "client_msg_id", "body", "traceparent"];
    for field in SEQS {
        match object.get(field) {
            None | Some(serde_json::Value::Null) => {}
            // `limit` is a u32: a larger integer is refused by serde like a wrong type.
            Some(value) if field == "limit" && value.as_u64().is_some_and(|v| v > u64::from(u32::MAX)) => {
                return Some(format!("`{field}` must be a non-negative integer below 2^32"));
            }
            Some(value) if value.as_u64().is_some() => {}
            Some(_) => return Some(format!("`{field}` must be a non-negative integer")),
        }
    }
    // `null` stands for an absent optional field, but a required one must hold a string.
    let required = match object.get("type").and_then(serde_json::Value::as_str) {
        Some("join" | "leave" | "history" | "typing") => &["room"][..],
        Some("send") => &["room", "client_msg_id", "body"][..],
        _ => &[][..],
    };
    for field in STRINGS {
        match object.get(field) {
            None | Some(serde_json::Value::String(_)) => {}
            Some(serde_json::Value::Null) if !required.contains(&field) => {}
            Some(_) => return Some(format!("`{field}` must be a string")),
        }
    }
    None
}

/// Why a `send`'s body is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// Empty, or only whitespace: a message must say something.
    #[error("body must not be empty or only whitespace")]
    Blank,
    /// More characters than the limit.
    #[error("body exceeds {max} characters")]
    TooLong {
        /// The limit, in characters.
        max: usize,
    },
}

impl BodyError {
    /// The error code the client gets for it.
    pub fn code(self) -> ErrorCode {
        match self {
            Self::Blank => ErrorCode::BadRequest,
            Self::TooLong { .. } => ErrorCode::TooLarge,
        }
    }
}

/// Checks a `send`'s body: something other than whitespace, at most `max_chars` characters
/// (Unicode scalar values). A body is stored as sent, its spaces included.
pub fn check_body(body: &str, max_chars: usize) -> Result<(), BodyError> {
    if body.trim().is_empty() {
        return Err(BodyError::Blank);
    }
    if body.chars().count() > max_chars {
        return Err(BodyError::TooLong { max: max_chars });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mistyped_field_is_named_in_the_error() {
        let cases = [
            (r#"{"type":"join","room":"r","since":-1,"req":1}"#, "`since` must be a non-negative integer"),
            (r#"{"type":"history","room":"r","limit":"5"}"#, "`limit` must be a non-negative integer"),
            (r#"{"type":"send","room":"r","client_msg_id":7,"body":"x"}"#, "`client_msg_id` must be a string"),
            (r#"{"type":"join","room":["r"]}"#, "`room` must be a string"),
            (r#"{"type":"send","room":"r","client_msg_id":null,"body":"x"}"#, "`client_msg_id` must be a string"),
            (
                r#"{"type":"history","room":"r","limit":4294967296}"#,
                "`limit` must be a non-negative integer below 2^32",
            ),
        ];
        for (text, expected) in cases {
            let error = parse_client_frame(text).expect_err(text);
            assert_eq!(error.message, expected, "{text}");
        }
        let (_, req) =
            parse_client_frame(r#"{"type":"join","room":"r","since":null,"req":"a"}"#).expect("null is absent");
        assert_eq!(req, Some(Req::Str("a".into())));
        // A field the frame does not have is ignored, whatever its type.
        assert!(parse_client_frame(r#"{"type":"ping","room":5}"#).is_ok());
    }

    #[test]
    fn parses_every_client_frame() {
        let cases = [
            r#"{"type":"hello","user":"alice"}"#,
            r#"{"type":"hello","token":"x.y.z"}"#,
            r#"{"type":"join","room":"general","since":12}"#,
            r#"{"type":"leave","room":"general"}"#,
            r#"{"type":"send","room":"general","client_msg_id":"c-1","body":"hello"}"#,
            r#"{"type":"history","room":"general","before":100,"limit":50}"#,
            r#"{"type":"typing","room":"general"}"#,
            r#"{"type":"ping"}"#,
        ];
        for case in cases {
            assert!(parse_client_frame(case).is_ok(), "{case}");
        }
    }

    #[test]
    fn keeps_req_of_any_frame() {
        let (frame, req) = parse_client_frame(r#"{"type":"ping","req":7}"#).unwrap();
        assert_eq!(frame, ClientFrame::Ping);
        assert_eq!(req, Some(Req::Int(7)));
        let err = parse_client_frame(r#"{"type":"nope","req":"r1"}"#).unwrap_err();
        assert_eq!(err.req, Some(Req::Str("r1".into())));
        assert!(err.message.contains("unknown variant"), "{}", err.message);
    }

    #[test]
    fn rejects_bad_input_with_reasons() {
        for bad in [
            "not json",
            "[1]",
            r#"{"room":"x"}"#,
            r#"{"type":5}"#,
            r#"{"type":"join"}"#,
            r#"{"type":"join","room":"a","since":-1}"#,
            r#"{"type":"send","room":"a","body":"x"}"#,
        ] {
            let err = parse_client_frame(bad).unwrap_err();
            assert!(!err.message.is_empty(), "{bad}");
        }
    }

    #[test]
    fn message_frame_is_flat() {
        let msg = ChatMessage {
            room: "r".into(),
            seq: 1,
            id: Uuid::nil(),
            user: "u".into(),
            body: "b".into(),
            ts: 5,
            client_msg_id: "c".into(),
            trace_id: "0".repeat(32),
            prev: None,
            digest: None,
        };
        let json: serde_json::Value = serde_json::from_str(&ServerFrame::Message(msg.clone()).to_json()).unwrap();
        assert_eq!(json["type"], "message");
        assert_eq!(json["seq"], 1);
        assert_eq!(json["trace_id"], "0".repeat(32));
        let back: ServerFrame = serde_json::from_value(json).unwrap();
        assert_eq!(back, ServerFrame::Message(msg));
    }
}
