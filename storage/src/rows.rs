//! How an append's rows are laid out in CQL requests: each message has three rows (the message,
//! its dedupe entry, its id entry), and the rows of a few small messages go as one unlogged batch,
//! so an append of several messages costs the store one request per batch instead of one per
//! message (docs/storage.md, "Appending").

use protocol::ChatMessage;
use scylla::serialize::row::{RowSerializationContext, SerializeRow};
use scylla::serialize::writers::RowWriter;
use scylla::serialize::SerializationError;
use uuid::Uuid;

use crate::cql::{bucket_of, to_cql_seq};
use crate::StoreError;

/// Largest body whose rows are written as one batch, and about the most bytes of rows one batch
/// carries. Cassandra logs batches over 5 KiB (`batch_size_warn_threshold`) and refuses those over
/// 50 KiB; a larger body's rows go as three requests.
pub const BATCHED_BODY_BYTES: usize = 4 * 1024;

/// Most messages whose rows go in one batch: each adds a dedupe and an id partition (and the
/// messages share one or two), and Cassandra warns of an unlogged batch across more than 10
/// partitions (`unlogged_batch_across_partitions_warn_threshold`).
pub const MESSAGES_PER_BATCH: usize = 4;

/// Splits an append's messages into runs whose rows go in one request each: at most
/// [`MESSAGES_PER_BATCH`] messages and about [`BATCHED_BODY_BYTES`] of rows; a message larger than
/// that goes alone.
pub fn batch_chunks(messages: &[ChatMessage]) -> Vec<&[ChatMessage]> {
    let mut chunks = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, message) in messages.iter().enumerate() {
        let size = row_bytes(message);
        if i > start && (i - start == MESSAGES_PER_BATCH || bytes + size > BATCHED_BODY_BYTES) {
            chunks.push(&messages[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < messages.len() {
        chunks.push(&messages[start..]);
    }
    chunks
}

/// About how many bytes a message's three rows take in a batch (its text, its keys twice or
/// three times, and fixed-size columns).
fn row_bytes(m: &ChatMessage) -> usize {
    let optional = m.prev.as_ref().map_or(0, String::len) + m.digest.as_ref().map_or(0, String::len);
    m.body.len() + 3 * m.room.len() + 2 * (m.user.len() + m.client_msg_id.len()) + m.trace_id.len() + optional + 120
}

/// The values of one message's row in `messages` (see `Statements::prepare`).
pub type MessageValues<'a> =
    (&'a str, i64, i64, Uuid, &'a str, &'a str, i64, &'a str, &'a str, Option<&'a str>, Option<&'a str>, i64);
/// The values of a `dedupe` row: room, user, client id, seq, stamp.
pub type DedupeValues<'a> = (&'a str, &'a str, &'a str, i64, i64);
/// The values of a `message_ids` row: id, room, seq, stamp.
pub type IdValues<'a> = (Uuid, &'a str, i64, i64);

/// A message's three rows (message, dedupe entry, id entry), each with its own stamp.
pub struct MessageRows<'a> {
    /// Its `messages` row.
    pub message: MessageValues<'a>,
    /// Its `dedupe` row.
    pub dedupe: DedupeValues<'a>,
    /// Its `message_ids` row.
    pub id: IdValues<'a>,
}

impl<'a> MessageRows<'a> {
    /// The rows of `m`, stamped with `stamps` (message, dedupe, id).
    pub fn of(m: &'a ChatMessage, stamps: [i64; 3]) -> Result<Self, StoreError> {
        let seq = to_cql_seq(m.seq)?;
        let message = (
            m.room.as_str(),
            bucket_of(m.seq)?,
            seq,
            m.id,
            m.user.as_str(),
            m.body.as_str(),
            m.ts,
            m.client_msg_id.as_str(),
            m.trace_id.as_str(),
            m.prev.as_deref(),
            m.digest.as_deref(),
            stamps[0],
        );
        let dedupe = (m.room.as_str(), m.user.as_str(), m.client_msg_id.as_str(), seq, stamps[1]);
        let id = (m.id, m.room.as_str(), seq, stamps[2]);
        Ok(Self { message, dedupe, id })
    }

    pub fn room(&self) -> &str {
        self.message.0
    }

    pub fn seq(&self) -> i64 {
        self.message.2
    }

    pub fn body_len(&self) -> usize {
        self.message.5.len()
    }

    /// The values of its three statements, in the order `insert_rows` holds them.
    pub fn values(&self) -> [RowValues<'a>; 3] {
        [RowValues::Message(self.message), RowValues::Dedupe(self.dedupe), RowValues::Id(self.id)]
    }
}

/// The values of one statement of a batch of rows (a batch's statements take different values).
#[derive(Clone, Copy)]
pub enum RowValues<'a> {
    Message(MessageValues<'a>),
    Dedupe(DedupeValues<'a>),
    Id(IdValues<'a>),
}

impl SerializeRow for RowValues<'_> {
    fn serialize(&self, ctx: &RowSerializationContext<'_>, writer: &mut RowWriter) -> Result<(), SerializationError> {
        match self {
            Self::Message(values) => values.serialize(ctx, writer),
            Self::Dedupe(values) => values.serialize(ctx, writer),
            Self::Id(values) => values.serialize(ctx, writer),
        }
    }

    fn is_empty(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_appends_rows_go_in_batches_of_a_few_small_messages_and_a_large_one_alone() {
        let message = |seq: u64, body_len: usize| ChatMessage {
            room: "r".into(),
            seq,
            id: Uuid::nil(),
            user: "ann".into(),
            body: "x".repeat(body_len),
            ts: 0,
            client_msg_id: format!("c{seq}"),
            trace_id: String::new(),
            prev: None,
            digest: None,
        };
        let lengths = |messages: &[ChatMessage]| batch_chunks(messages).iter().map(|c| c.len()).collect::<Vec<_>>();
        let small: Vec<_> = (1..=10).map(|seq| message(seq, 64)).collect();
        assert_eq!(lengths(&small), [4, 4, 2]);
        let mixed =
            [message(1, 64), message(2, 5000), message(3, 64), message(4, 1500), message(5, 1500), message(6, 1500)];
        assert_eq!(lengths(&mixed), [1, 1, 3, 1]);
        assert!(batch_chunks(&[]).is_empty());
        assert_eq!(lengths(&[message(1, 100_000)]), [1]);
    }
}
