//! The record of every scheduled send: when it was written, how it was acked (or rejected), and
//! the id, trace id and seq it was first delivered with. Shared by every client task without
//! locks: each field is an atomic or a `OnceLock`, written once.
//!
//! Rare faults seen while the run goes on (one send acked or delivered as two different messages)
//! are kept as anomalies and become `stored_twice` findings in the verdict.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use protocol::ErrorCode;

use super::ids::fmt_id;
use crate::schedule::PlannedSend;

/// An `ack` as first received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckInfo {
    /// Message id (UUID bytes).
    pub id: [u8; 16],
    /// Its seq.
    pub seq: u64,
    /// When the ack arrived (µs on the run clock).
    pub at_us: u64,
}

/// The message as first seen at a recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// Message id (UUID bytes).
    pub id: [u8; 16],
    /// W3C trace id bytes (all zero when absent or malformed).
    pub trace: [u8; 16],
    /// Its seq.
    pub seq: u64,
}

/// One scheduled send and what became of it. About 120 bytes.
#[derive(Debug)]
pub struct MsgRecord {
    /// Room number.
    pub room: u32,
    /// Sending client.
    pub sender: u32,
    /// Scheduled instant, µs after the start of the measured phase.
    pub sched_us: u64,
    /// When it was written, plus one (0 = not written).
    sent: AtomicU64,
    ack: OnceLock<AckInfo>,
    pub(super) seen: OnceLock<Seen>,
    rejected: OnceLock<ErrorCode>,
    /// The seq and chain digest the first recipient that checked it got.
    digest: OnceLock<(u64, [u8; 32])>,
}

impl MsgRecord {
    /// When the send was written (µs on the run clock), if it was.
    pub fn sent_us(&self) -> Option<u64> {
        match self.sent.load(Ordering::Acquire) {
            0 => None,
            v => Some(v - 1),
        }
    }
    /// The first ack.
    pub fn ack(&self) -> Option<&AckInfo> {
        self.ack.get()
    }
    /// The first delivery seen.
    pub fn seen(&self) -> Option<&Seen> {
        self.seen.get()
    }
    /// The error code the send was answered with.
    pub fn rejected(&self) -> Option<ErrorCode> {
        self.rejected.get().copied()
    }

    /// The digest the first recipient got for this message as `seq` (`digest` when this is the
    /// first, or when the first got it as another seq).
    pub fn first_digest(&self, seq: u64, digest: [u8; 32]) -> [u8; 32] {
        match self.digest.get_or_init(|| (seq, digest)) {
            (first_seq, first) if *first_seq == seq => *first,
            _ => digest,
        }
    }
}

/// What an `ack` meant for its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// The first ack of this send.
    First,
    /// A repeated ack with the same id and seq (after a retry): fine.
    Repeat,
    /// A repeated ack with another id or seq: the message was stored twice.
    Conflict,
}

/// Every send of the run, indexed by send number, plus run-wide audit state.
#[derive(Debug)]
pub struct Records {
    pub(super) recs: Vec<MsgRecord>,
    measure_start_us: AtomicU64,
    answered: AtomicU64,
    sent: AtomicU64,
    room_max_acked: Vec<AtomicU64>,
    anomalies: Mutex<Vec<Anomaly>>,
}

/// A rare fault found while the run goes on (not per recipient): one send stored twice.
#[derive(Debug, Clone)]
pub(super) struct Anomaly {
    /// The send number.
    pub(super) send: u32,
    /// What disagreed with what.
    pub(super) detail: String,
    /// The id of the second message.
    pub(super) id: [u8; 16],
    /// The seq of the second message.
    pub(super) seq: u64,
}

impl Records {
    /// One record per planned send.
    pub fn new(sends: &[PlannedSend], rooms: usize) -> Self {
        Self {
            recs: sends
                .iter()
                .map(|s| MsgRecord {
                    room: s.room,
                    sender: s.client,
                    sched_us: s.at_us,
                    sent: AtomicU64::new(0),
                    ack: OnceLock::new(),
                    seen: OnceLock::new(),
                    rejected: OnceLock::new(),
                    digest: OnceLock::new(),
                })
                .collect(),
            measure_start_us: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            room_max_acked: (0..rooms).map(|_| AtomicU64::new(0)).collect(),
            anomalies: Mutex::new(Vec::new()),
        }
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.recs.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.recs.is_empty()
    }

    /// Record `i`.
    pub fn get(&self, i: u32) -> Option<&MsgRecord> {
        self.recs.get(i as usize)
    }

    /// Sets the run-clock instant the schedule's zero stands for (once, before any send).
    pub fn set_measure_start(&self, us: u64) {
        self.measure_start_us.store(us, Ordering::Release);
    }

    /// The run-clock instant of the schedule's zero.
    pub fn measure_start_us(&self) -> u64 {
        self.measure_start_us.load(Ordering::Acquire)
    }

    /// The scheduled instant of send `i` on the run clock.
    pub fn scheduled_at(&self, rec: &MsgRecord) -> u64 {
        self.measure_start_us() + rec.sched_us
    }

    /// Marks send `i` written at `now_us`; false if it already was (a retry).
    pub fn mark_sent(&self, i: u32, now_us: u64) -> bool {
        let Some(r) = self.get(i) else { return false };
        let first = r.sent.compare_exchange(0, now_us + 1, Ordering::AcqRel, Ordering::Acquire).is_ok();
        if first {
            self.sent.fetch_add(1, Ordering::Relaxed);
        }
        first
    }

    /// Records an ack for send `i`.
    pub fn ack(&self, i: u32, id: [u8; 16], seq: u64, now_us: u64) -> AckOutcome {
        let Some(r) = self.get(i) else { return AckOutcome::Repeat };
        let info = AckInfo { id, seq, at_us: now_us };
        match r.ack.set(info) {
            Ok(()) => {
                if let Some(m) = self.room_max_acked.get(r.room as usize) {
                    m.fetch_max(seq, Ordering::AcqRel);
                }
                if r.rejected.get().is_none() {
                    self.answered.fetch_add(1, Ordering::Relaxed);
                }
                AckOutcome::First
            }
            Err(_) => {
                let first = r.ack.get().copied().unwrap_or(info);
                if first.id == id && first.seq == seq {
                    AckOutcome::Repeat
                } else {
                    self.anomaly(
                        i,
                        format!("acked twice: first seq {} id {}, then seq {seq}", first.seq, fmt_id(&first.id)),
                        id,
                        seq,
                    );
                    AckOutcome::Conflict
                }
            }
        }
    }

    /// Records that send `i` was answered with an error frame.
    pub fn reject(&self, i: u32, code: ErrorCode) -> bool {
        let Some(r) = self.get(i) else { return false };
        let first = r.rejected.set(code).is_ok() && r.ack.get().is_none();
        if first {
            self.answered.fetch_add(1, Ordering::Relaxed);
        }
        first
    }

    /// Sends written so far.
    pub fn sent_count(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Sends answered (ack or error) so far.
    pub fn answered_count(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// The highest acked seq of a room so far.
    pub fn room_max_acked(&self, room: u32) -> u64 {
        self.room_max_acked.get(room as usize).map_or(0, |m| m.load(Ordering::Acquire))
    }

    /// Writes down that send `send` was stored as a second message (`id`, `seq`).
    pub(super) fn anomaly(&self, send: u32, detail: String, id: [u8; 16], seq: u64) {
        if let Ok(mut list) = self.anomalies.lock() {
            list.push(Anomaly { send, detail, id, seq });
        }
    }

    /// The first anomaly of each send that has any, in send order.
    pub(super) fn first_anomaly_per_send(&self) -> Vec<Anomaly> {
        let Ok(list) = self.anomalies.lock() else { return Vec::new() };
        let mut first: BTreeMap<u32, &Anomaly> = BTreeMap::new();
        for a in list.iter() {
            first.entry(a.send).or_insert(a);
        }
        first.into_values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::parse_id;

    fn records(n: u32) -> Records {
        let sends: Vec<PlannedSend> =
            (0..n).map(|i| PlannedSend { at_us: 1000 * i as u64, client: 0, room: 0 }).collect();
        Records::new(&sends, 1)
    }

    #[test]
    fn sends_are_marked_once_and_answered_once() {
        let r = records(3);
        assert!(r.mark_sent(0, 10));
        assert!(!r.mark_sent(0, 20), "a retry is not a second send");
        assert_eq!(r.get(0).and_then(MsgRecord::sent_us), Some(10));
        assert_eq!(r.sent_count(), 1);
        assert_eq!(r.ack(0, parse_id("018f0000-0000-7000-8000-000000000001"), 1, 30), AckOutcome::First);
        r.reject(0, ErrorCode::RateLimited); // an error after the ack does not count twice
        r.reject(1, ErrorCode::RateLimited);
        assert_eq!(r.answered_count(), 2);
        assert_eq!(r.room_max_acked(0), 1);
        assert!(!r.mark_sent(9, 0), "no such send");
    }

    #[test]
    fn a_conflicting_ack_is_an_anomaly_kept_once_per_send() {
        let r = records(2);
        let (a, b) =
            (parse_id("018f0000-0000-7000-8000-000000000001"), parse_id("018f0000-0000-7000-8000-000000000002"));
        assert_eq!(r.ack(1, a, 1, 0), AckOutcome::First);
        assert_eq!(r.ack(1, a, 1, 0), AckOutcome::Repeat);
        assert_eq!(r.ack(1, b, 2, 0), AckOutcome::Conflict);
        assert_eq!(r.ack(1, b, 3, 0), AckOutcome::Conflict);
        let list = r.first_anomaly_per_send();
        assert_eq!(list.len(), 1);
        assert_eq!((list[0].send, list[0].seq), (1, 2));
        assert!(list[0].detail.starts_with("acked twice: first seq 1"), "{}", list[0].detail);
    }
}
