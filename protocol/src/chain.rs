//! The message chain (docs/protocol.md, extension "Message chain"): every stored message carries
//! `digest`, a SHA-256 over its fields and `prev`, the digest of the room's message with seq - 1.
//! Whoever holds a message can check that it was not altered after sequencing ([`check`], the
//! self-check), and whoever holds two consecutive messages of a room can check that they belong
//! to one history ([`RoomChain`], the link check): two different messages claiming one seq (a
//! process that equivocates) break the link at the next message.
//!
//! Without signatures the chain proves consistency, not authorship: a liar that recomputes the
//! digests of everything one client sees can rewrite that client's chain from some point on.
//! Comparing what different receivers, and the history, hold for one seq catches that.

use std::collections::HashMap;

use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::frames::ChatMessage;

/// The `prev` of a room's first message: 64 zeros.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What every digest's input begins with: the chain's version.
const DOMAIN: &[u8] = b"chat-chain-v1\n";

/// The fields a digest covers, borrowed (a verifier that parsed a frame lazily need not build a
/// [`ChatMessage`]).
#[derive(Debug, Clone, Copy)]
pub struct Fields<'a> {
    /// The room.
    pub room: &'a str,
    /// The seq.
    pub seq: u64,
    /// The message id.
    pub id: Uuid,
    /// The sender.
    pub user: &'a str,
    /// When it was sequenced.
    pub ts: i64,
    /// The sender's idempotency key.
    pub client_msg_id: &'a str,
    /// The text.
    pub body: &'a str,
}

impl<'a> Fields<'a> {
    /// The fields of `m`.
    pub fn of(m: &'a ChatMessage) -> Self {
        Self {
            room: &m.room,
            seq: m.seq,
            id: m.id,
            user: &m.user,
            ts: m.ts,
            client_msg_id: &m.client_msg_id,
            body: &m.body,
        }
    }

    /// SHA-256 of `"chat-chain-v1\n" + prev + "\n" + room + "\n" + seq + "\n" + id + "\n" + user +
    /// "\n" + ts + "\n" + client_msg_id + "\n" + body`, as bytes. The body comes last, so a
    /// newline in it is unambiguous (no other field may hold a control character).
    pub fn digest_bytes(&self, prev: &str) -> [u8; 32] {
        let mut hasher = Sha256::new();
        let mut id = Uuid::encode_buffer();
        let mut number = itoa::Buffer::new();
        hasher.update(DOMAIN);
        for part in [prev.as_bytes(), self.room.as_bytes()] {
            hasher.update(part);
            hasher.update(b"\n");
        }
        hasher.update(number.format(self.seq).as_bytes());
        hasher.update(b"\n");
        hasher.update(self.id.hyphenated().encode_lower(&mut id).as_bytes());
        hasher.update(b"\n");
        hasher.update(self.user.as_bytes());
        hasher.update(b"\n");
        hasher.update(number.format(self.ts).as_bytes());
        hasher.update(b"\n");
        hasher.update(self.client_msg_id.as_bytes());
        hasher.update(b"\n");
        hasher.update(self.body.as_bytes());
        hasher.finalize().into()
    }

    /// [`digest_bytes`](Self::digest_bytes) as 64 lowercase hex digits.
    pub fn digest(&self, prev: &str) -> String {
        hex::encode(self.digest_bytes(prev))
    }
}

/// The digest of `m` chained to `prev` (the message's own `prev` and `digest` are not read).
pub fn digest(prev: &str, m: &ChatMessage) -> String {
    Fields::of(m).digest(prev)
}

/// Chains `m` to `prev`: sets its `prev` and its `digest`.
pub fn seal(m: &mut ChatMessage, prev: String) {
    m.digest = Some(digest(&prev, m));
    m.prev = Some(prev);
}

/// Which check a message failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ViolationKind {
    /// Its digest does not match its fields: altered after sequencing.
    Altered,
    /// Its `prev` is not the digest of the seq before it as the verifier holds it: two different
    /// messages claim one seq (a fork, an equivocating process).
    Fork,
}

impl ViolationKind {
    /// Its name, as in the `kind` metric label and journeys.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Altered => "altered",
            Self::Fork => "fork",
        }
    }
}

/// A message that failed a chain check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChainError {
    /// The digest does not cover the fields as they are: the message was altered after it was
    /// sequenced (a rewritten body, a forged seq...).
    #[error("seq {seq}: digest {got} does not match the message's fields (they hash to {expected}): altered after sequencing")]
    Altered {
        /// The message's seq.
        seq: u64,
        /// The digest its fields hash to.
        expected: String,
        /// The digest it carries.
        got: String,
    },
    /// `prev` is not the digest of the room's previous message as the verifier received it.
    #[error("seq {seq}: prev {got} is not the digest {expected} of seq {} as received: a fork", seq.saturating_sub(1))]
    Fork {
        /// The message's seq.
        seq: u64,
        /// The digest of seq - 1 as the verifier holds it.
        expected: String,
        /// The `prev` the message carries.
        got: String,
        /// The id of the message the verifier holds as seq - 1.
        previous: Option<Uuid>,
    },
}

impl ChainError {
    /// Which check failed.
    pub fn kind(&self) -> ViolationKind {
        match self {
            Self::Altered { .. } => ViolationKind::Altered,
            Self::Fork { .. } => ViolationKind::Fork,
        }
    }

    /// The seq of the message that failed.
    pub fn seq(&self) -> u64 {
        match self {
            Self::Altered { seq, .. } | Self::Fork { seq, .. } => *seq,
        }
    }

    /// What the verifier expected (a digest).
    pub fn expected(&self) -> &str {
        match self {
            Self::Altered { expected, .. } | Self::Fork { expected, .. } => expected,
        }
    }

    /// What the message carries.
    pub fn got(&self) -> &str {
        match self {
            Self::Altered { got, .. } | Self::Fork { got, .. } => got,
        }
    }

    /// For a fork, the id of the message the verifier holds at seq - 1.
    pub fn previous(&self) -> Option<Uuid> {
        match self {
            Self::Fork { previous, .. } => *previous,
            Self::Altered { .. } => None,
        }
    }
}

/// The self-check: a message's `digest` matches its fields and `prev`. A message without a
/// digest (stored before the chain) passes: there is nothing to check.
pub fn check(m: &ChatMessage) -> Result<(), ChainError> {
    let Some(got) = m.digest.as_deref() else { return Ok(()) };
    let expected = digest(m.prev.as_deref().unwrap_or(""), m);
    if expected == got {
        Ok(())
    } else {
        Err(ChainError::Altered { seq: m.seq, expected, got: got.to_owned() })
    }
}

/// The newest link of one room's chain a verifier holds.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Head {
    seq: u64,
    digest: String,
    id: Uuid,
}

/// One room's chain as one verifier receives it: the last (seq, digest) held, checked against
/// each next message's `prev`.
#[derive(Debug, Clone, Default)]
pub struct RoomChain {
    head: Option<Head>,
}

impl RoomChain {
    /// A chain holding nothing yet (the first message is only self-checked).
    pub fn new() -> Self {
        Self::default()
    }

    /// The seq and digest held, if any.
    pub fn head(&self) -> Option<(u64, &str)> {
        self.head.as_ref().map(|h| (h.seq, h.digest.as_str()))
    }

    /// Forgets the head (the next message is only self-checked).
    pub fn reset(&mut self) {
        self.head = None;
    }

    /// Checks `m` (self-check, then the link to the seq before it when that is held) and holds
    /// it as the head when it is newer. A message without a digest passes and resets the chain.
    ///
    /// An altered message is still held by the digest it carries: what comes after it chains to
    /// that digest when only the fields were changed, so the next message is not also reported.
    pub fn observe(&mut self, m: &ChatMessage) -> Result<(), ChainError> {
        let Some(carried) = m.digest.as_deref() else {
            self.head = None;
            return Ok(());
        };
        let altered = check(m);
        let fork = match (&self.head, m.prev.as_deref()) {
            (Some(head), prev) if head.seq + 1 == m.seq && prev != Some(head.digest.as_str()) => {
                Err(ChainError::Fork {
                    seq: m.seq,
                    expected: head.digest.clone(),
                    got: prev.unwrap_or_default().to_owned(),
                    previous: Some(head.id),
                })
            }
            _ => Ok(()),
        };
        if self.head.as_ref().is_none_or(|head| m.seq > head.seq) {
            self.head = Some(Head { seq: m.seq, digest: carried.to_owned(), id: m.id });
        }
        altered.and(fork)
    }
}

/// [`RoomChain`]s of many rooms.
#[derive(Debug, Clone, Default)]
pub struct ChainTracker {
    rooms: HashMap<String, RoomChain>,
}

impl ChainTracker {
    /// A tracker holding no room.
    pub fn new() -> Self {
        Self::default()
    }

    /// [`RoomChain::observe`] in `m`'s room.
    pub fn observe(&mut self, m: &ChatMessage) -> Result<(), ChainError> {
        if m.digest.is_none() {
            self.rooms.remove(&m.room);
            return Ok(());
        }
        self.rooms.entry(m.room.clone()).or_default().observe(m)
    }

    /// The seq and digest held for `room`.
    pub fn head(&self, room: &str) -> Option<(u64, &str)> {
        self.rooms.get(room).and_then(RoomChain::head)
    }

    /// Forgets `room`.
    pub fn forget(&mut self, room: &str) {
        self.rooms.remove(room);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(seq: u64, body: &str) -> ChatMessage {
        ChatMessage {
            room: "general".into(),
            seq,
            id: Uuid::from_u128(0x018f_0000_0000_7000_8000_0000_0000_0000 | u128::from(seq)),
            user: "alice".into(),
            body: body.into(),
            ts: 1_700_000_000_000 + seq as i64,
            client_msg_id: format!("c-{seq}"),
            trace_id: "0af7651916cd43dd8448eb211c80319c".into(),
            prev: None,
            digest: None,
        }
    }

    /// Seqs 1..=n chained from the genesis.
    fn chain(n: u64) -> Vec<ChatMessage> {
        let mut prev = GENESIS.to_owned();
        (1..=n)
            .map(|seq| {
                let mut m = message(seq, &format!("body {seq}\nsecond line"));
                seal(&mut m, prev.clone());
                prev = m.digest.clone().unwrap_or_default();
                m
            })
            .collect()
    }

    #[test]
    fn the_digest_is_sha256_of_the_documented_input() {
        let m = message(1, "hi\nthere");
        let input = format!(
            "chat-chain-v1\n{GENESIS}\ngeneral\n1\n{}\nalice\n1700000000001\nc-1\nhi\nthere",
            m.id.hyphenated()
        );
        let expected = hex::encode(Sha256::digest(input.as_bytes()));
        assert_eq!(digest(GENESIS, &m), expected);
        assert_eq!(expected.len(), 64);
        assert!(expected.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        // A known answer, so a change of the input's layout cannot pass unnoticed (also in the
        // browser client's test and docs/protocol.md).
        let fixed = ChatMessage { id: Uuid::nil(), ts: 0, ..message(1, "hello") };
        assert_eq!(digest(GENESIS, &fixed), KNOWN_ANSWER);
    }

    /// The digest of seq 1 of room `general`, id nil, user `alice`, ts 0, client_msg_id `c-1`,
    /// body `hello`, with the genesis as `prev`.
    const KNOWN_ANSWER: &str = "8c284bd8e436b55c739da5b68260e557be029824d5a4a1fd08d27b98eaa1f857";

    #[test]
    fn an_intact_chain_passes_both_checks() {
        let mut room = RoomChain::new();
        for m in chain(5) {
            assert_eq!(check(&m), Ok(()));
            assert_eq!(room.observe(&m), Ok(()));
        }
        assert_eq!(room.head().map(|(seq, _)| seq), Some(5));
        assert_eq!(chain(1)[0].prev.as_deref(), Some(GENESIS));
    }

    #[test]
    fn an_altered_field_fails_the_self_check() {
        for alter in [
            (|m: &mut ChatMessage| m.body.push('!')) as fn(&mut ChatMessage),
            |m| m.seq += 1,
            |m| m.user = "mallory".into(),
            |m| m.ts += 1,
            |m| m.id = Uuid::nil(),
            |m| m.client_msg_id.push('x'),
            |m| m.room = "elsewhere".into(),
            |m| m.prev = Some(GENESIS.replace('0', "1")),
        ] {
            let mut m = chain(2).remove(1);
            alter(&mut m);
            let error = check(&m).unwrap_err();
            assert_eq!(error.kind(), ViolationKind::Altered);
            assert_eq!(error.got(), m.digest.as_deref().unwrap());
        }
    }

    #[test]
    fn a_forged_copy_with_a_recomputed_digest_breaks_the_next_link() {
        let messages = chain(3);
        let mut forged = messages[1].clone();
        forged.body = "forged".into();
        seal(&mut forged, messages[0].digest.clone().unwrap());
        assert_eq!(check(&forged), Ok(()), "a competent liar passes the self-check");

        let mut room = RoomChain::new();
        room.observe(&messages[0]).unwrap();
        room.observe(&forged).unwrap();
        let error = room.observe(&messages[2]).unwrap_err();
        assert_eq!(error.kind(), ViolationKind::Fork);
        assert_eq!(error.seq(), 3);
        assert_eq!(error.expected(), forged.digest.as_deref().unwrap());
        assert_eq!(error.got(), messages[1].digest.as_deref().unwrap());
        assert_eq!(error.previous(), Some(forged.id));
    }

    #[test]
    fn unchained_messages_pass_and_reset_the_room() {
        let messages = chain(3);
        let mut tracker = ChainTracker::new();
        tracker.observe(&messages[0]).unwrap();
        let legacy = message(2, "before the chain");
        assert_eq!(tracker.observe(&legacy), Ok(()));
        assert_eq!(tracker.head("general"), None);
        // Seq 3 chains to a seq 2 the tracker does not hold: only its self-check applies.
        assert_eq!(tracker.observe(&messages[2]), Ok(()));
        assert_eq!(tracker.head("general").map(|(seq, _)| seq), Some(3));
    }

    #[test]
    fn a_gap_or_an_old_message_is_not_a_fork() {
        let messages = chain(4);
        let mut room = RoomChain::new();
        room.observe(&messages[0]).unwrap();
        room.observe(&messages[2]).unwrap();
        room.observe(&messages[1]).unwrap();
        assert_eq!(room.head().map(|(seq, _)| seq), Some(3), "an older message does not move the head back");
        room.observe(&messages[3]).unwrap();
    }

    #[test]
    fn chain_fields_are_omitted_when_absent_and_round_trip_when_present() {
        let plain = serde_json::to_value(message(1, "b")).unwrap();
        assert!(plain.get("prev").is_none() && plain.get("digest").is_none(), "{plain}");
        let chained = chain(1).remove(0);
        let json = serde_json::to_string(&chained).unwrap();
        assert_eq!(serde_json::from_str::<ChatMessage>(&json).unwrap(), chained);
    }
}
