//! The message chain at one recipient (docs/protocol.md, extension "Message chain"): each
//! `message` frame that carries a `digest` is self-checked (its fields hash to it), linked to the
//! seq before it as this recipient got it (its `prev` is that message's digest), and compared
//! with what other recipients got for the same message (one digest per seq). A frame without a
//! digest (a server from before the chain) is not checked and breaks the recipient's chain.
//!
//! - **chain_altered**: a message whose digest does not match its fields: altered after it was
//!   sequenced (a gateway rewriting a body, a forged seq).
//! - **equivocation**: two different messages claimed one seq: the next message does not chain
//!   to the one this recipient got, or recipients got different digests for it. The finding
//!   names the seq and id of the message with two versions.

use protocol::chain::Fields;

use super::findings::FindingKind;
use super::ids::parse_id;
use super::records::Records;
use super::track::Track;

/// The chain evidence of one `message` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chained {
    /// The digest it carries (all zero when malformed).
    pub digest: [u8; 32],
    /// Its `prev` (all zero for the genesis, or when absent or malformed).
    pub prev: [u8; 32],
    /// Whether its fields hash to its digest.
    pub intact: bool,
}

impl Chained {
    /// Checks a frame's fields against the `digest` and `prev` it carries.
    pub fn of(fields: &Fields<'_>, prev: Option<&str>, digest: &str) -> Self {
        let computed = fields.digest_bytes(prev.unwrap_or(""));
        let claimed = parse_digest(digest);
        Self {
            digest: claimed.unwrap_or_default(),
            prev: prev.and_then(parse_digest).unwrap_or_default(),
            intact: claimed == Some(computed),
        }
    }
}

/// 64 hex digits as bytes.
fn parse_digest(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

/// The newest chained message a recipient got in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainHead {
    /// Its seq.
    pub seq: u64,
    /// Its digest.
    pub digest: [u8; 32],
    /// Its id.
    pub id: [u8; 16],
    /// Its trace id.
    pub trace: [u8; 16],
}

/// Checks one delivery's chain evidence at its recipient and writes down what fails: an altered
/// message, a link to a seq the recipient got in another version, or a digest other recipients
/// did not get for the same message (this run's messages only). `chained` is `None` for a frame
/// without a digest, which breaks the recipient's chain.
pub fn check_chain(
    track: &mut Track,
    records: &Records,
    send: Option<u32>,
    seq: u64,
    id: &str,
    trace: [u8; 16],
    chained: Option<&Chained>,
) {
    let Some(chained) = chained else {
        track.set_chain_head(None);
        return;
    };
    let id = parse_id(id);
    if !chained.intact {
        track.note(FindingKind::ChainAltered, seq, id, trace);
    }
    if let Some(head) = track.chain_head() {
        if head.seq + 1 == seq && head.digest != chained.prev {
            // The version of seq - 1 this recipient got is not the one this message chains to.
            track.note_other(FindingKind::Equivocation, head.seq, head.id, head.trace, id);
        }
    }
    if chained.intact {
        if let Some(first) = send.and_then(|i| records.get(i)).map(|r| r.first_digest(seq, chained.digest)) {
            if first != chained.digest {
                track.note(FindingKind::Equivocation, seq, id, trace);
            }
        }
    }
    if track.chain_head().is_none_or(|head| seq > head.seq) {
        track.set_chain_head(Some(ChainHead { seq, digest: chained.digest, id, trace }));
    }
}

#[cfg(test)]
mod tests {
    use protocol::chain::{seal, GENESIS};
    use protocol::ChatMessage;

    use super::*;
    use crate::audit::sim::{id_of, trace_of, Sim};
    use crate::audit::{parse_trace, FindingKind};

    /// Seqs 1..=n as the sim names them, chained.
    fn chain(n: u64) -> Vec<ChatMessage> {
        let mut prev = GENESIS.to_owned();
        (1..=n)
            .map(|seq| {
                let mut m = ChatMessage {
                    room: "t-r0".into(),
                    seq,
                    id: uuid::Uuid::parse_str(&id_of(seq)).unwrap(),
                    user: "t-u0".into(),
                    body: format!("body {seq}"),
                    ts: seq as i64,
                    client_msg_id: format!("t.{}", seq - 1),
                    trace_id: trace_of(seq),
                    prev: None,
                    digest: None,
                };
                seal(&mut m, prev.clone());
                prev = m.digest.clone().unwrap();
                m
            })
            .collect()
    }

    fn evidence(m: &ChatMessage) -> Chained {
        Chained::of(&Fields::of(m), m.prev.as_deref(), m.digest.as_deref().unwrap())
    }

    fn deliver(sim: &mut Sim, client: usize, m: &ChatMessage) {
        let send = Some(m.seq as u32 - 1);
        sim.deliver(client, m.seq);
        let track = &mut sim.tracks[client];
        check_chain(track, &sim.records, send, m.seq, &m.id.to_string(), parse_trace(&m.trace_id), Some(&evidence(m)));
    }

    fn kinds(sim: &Sim, client: usize) -> Vec<(FindingKind, u64)> {
        sim.tracks[client].events().iter().map(|e| (e.kind, e.seq)).collect()
    }

    #[test]
    fn an_intact_chain_is_clean() {
        let mut sim = Sim::new(2, 3);
        for m in chain(3) {
            deliver(&mut sim, 0, &m);
            deliver(&mut sim, 1, &m);
        }
        assert!(kinds(&sim, 0).is_empty() && kinds(&sim, 1).is_empty());
        assert!(sim.audit().passed);
    }

    #[test]
    fn a_rewritten_body_is_altered_and_named() {
        let mut sim = Sim::new(2, 3);
        let messages = chain(3);
        let mut lie = messages[1].clone();
        lie.body.push_str(" (edited in transit)");
        for (client, second) in [(0, &lie), (1, &messages[1])] {
            for m in [&messages[0], second, &messages[2]] {
                deliver(&mut sim, client, m);
            }
        }
        assert_eq!(kinds(&sim, 0), [(FindingKind::ChainAltered, 2)], "the next message still links");
        assert!(kinds(&sim, 1).is_empty());
        let audit = sim.audit();
        assert!(!audit.passed, "{}", audit.verdict);
        let found: Vec<_> = audit.findings.iter().filter(|f| f.kind == FindingKind::ChainAltered).collect();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].id.as_deref(), Some(id_of(2).as_str()));
        assert_eq!(found[0].recipients, ["t-u0"]);
        assert_eq!(audit.counts.chain_altered, 1);
    }

    #[test]
    fn a_forged_copy_breaks_the_next_link_and_disagrees_with_other_recipients() {
        let mut sim = Sim::new(2, 3);
        let messages = chain(3);
        let mut forged = messages[1].clone();
        forged.body = "forged".into();
        seal(&mut forged, messages[0].digest.clone().unwrap());
        // Client 1 got the true seq 2 first (from history, say); client 0 the forged copy live.
        for m in [&messages[0], &messages[1], &messages[2]] {
            deliver(&mut sim, 1, m);
        }
        for m in [&messages[0], &forged, &messages[2]] {
            deliver(&mut sim, 0, m);
        }
        assert_eq!(kinds(&sim, 1), []);
        assert_eq!(kinds(&sim, 0), [(FindingKind::Equivocation, 2), (FindingKind::Equivocation, 2)]);
        let audit = sim.audit();
        assert!(!audit.passed, "{}", audit.verdict);
        let found: Vec<_> = audit.findings.iter().filter(|f| f.kind == FindingKind::Equivocation).collect();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!((found[0].seq, found[0].id.as_deref()), (Some(2), Some(id_of(2).as_str())));
        assert!(found[0].detail.contains(&id_of(3)), "the message that revealed it is named: {}", found[0].detail);
        assert_eq!(audit.counts.equivocations, 2);
    }

    #[test]
    fn a_frame_without_a_digest_breaks_the_chain_without_a_finding() {
        let mut sim = Sim::new(1, 3);
        let messages = chain(3);
        deliver(&mut sim, 0, &messages[0]);
        sim.deliver(0, 2);
        check_chain(&mut sim.tracks[0], &sim.records, Some(1), 2, &id_of(2), [0; 16], None);
        let mut stray = messages[2].clone();
        seal(&mut stray, GENESIS.to_owned());
        deliver(&mut sim, 0, &stray);
        assert!(kinds(&sim, 0).is_empty(), "{:?}", kinds(&sim, 0));
    }
}
