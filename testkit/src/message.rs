//! Chat messages as a worker would store them, for tests that write a store directly.

use protocol::ChatMessage;

/// Message `seq` of `room` from `user`, with a client id derived from both (`<user>-<seq>`).
pub fn message(room: &str, seq: u64, user: &str) -> ChatMessage {
    ChatMessage {
        room: room.into(),
        seq,
        id: uuid::Uuid::now_v7(),
        user: user.into(),
        body: format!("message {seq} from {user}"),
        ts: 1_700_000_000_000 + seq as i64,
        client_msg_id: format!("{user}-{seq}"),
        trace_id: format!("{seq:032x}"),
        prev: None,
        digest: None,
    }
}
