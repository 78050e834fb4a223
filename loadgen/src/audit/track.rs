//! One recipient's view of one room (a [`Track`]): the last seq it saw, the holes below it, and
//! the duplicates and reorders it met. Owned by the client task that holds the membership; the
//! drain check reads its progress through [`TrackProgress`] from other tasks.
//!
//! Per delivery: seq = last + 1 is in order; a higher seq opens a hole for the seqs skipped; a
//! seq inside a hole closes it (a reorder); anything else at or below last is a duplicate, except
//! that after a fresh join seqs at or below the `joined` frame's `last_seq` are older than the
//! membership and ignored.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use super::chain::ChainHead;
use super::findings::FindingKind;

/// Progress of one track, readable by the drain check from other tasks.
#[derive(Debug, Default)]
pub struct TrackProgress {
    /// Last seq seen.
    pub last: AtomicU64,
    /// Seqs still missing below `last`.
    pub holes: AtomicU64,
    /// Joined right now.
    pub active: AtomicBool,
}

/// What one delivery was, for one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The next seq.
    InOrder,
    /// A higher seq than the next: the seqs between are now holes.
    AfterGap,
    /// A seq that fills a hole: it came after a higher one.
    Reordered,
    /// A seq this member already had.
    Duplicate,
    /// A seq at or below the `last_seq` of a fresh join: older than the membership, ignored.
    BeforeJoin,
}

impl Delivery {
    /// The member got this seq for the first time.
    pub fn is_first(self) -> bool {
        matches!(self, Self::InOrder | Self::AfterGap | Self::Reordered)
    }
}

/// A duplicate or reordered delivery as it happened.
#[derive(Debug, Clone, Copy)]
pub struct TrackEvent {
    /// Duplicate or reordered.
    pub kind: FindingKind,
    /// The seq delivered.
    pub seq: u64,
    /// The highest seq the member had seen at the time.
    pub last: u64,
    /// Message id from the frame.
    pub id: [u8; 16],
    /// Trace id from the frame.
    pub trace: [u8; 16],
    /// Another message the event is about (for an equivocation found by the chain: the message
    /// that does not chain to this one); all zero when none.
    pub other: [u8; 16],
}

/// One member's view of one room: last seq seen, open holes, and events.
#[derive(Debug)]
pub struct Track {
    /// Room number.
    pub room: u32,
    /// Client number.
    pub client: u32,
    /// When the current continuous membership began (its `joined` arrived); `None` when there
    /// is none to resume.
    since_us: Option<u64>,
    /// Joined right now.
    joined: bool,
    /// The `last_seq` of the fresh join: seqs at or below it predate the membership.
    floor: u64,
    /// Resumed with `since`: every seq at or below `last` counts as a duplicate.
    strict: bool,
    /// Highest seq seen.
    last: u64,
    /// Inclusive ranges of seqs below `last` not seen yet, in order.
    holes: Vec<(u64, u64)>,
    /// Seqs in `holes`.
    hole_seqs: u64,
    /// Duplicates, reorders and chain failures, as they happened.
    events: Vec<TrackEvent>,
    /// The newest chained message got (the message chain continues from it).
    chain_head: Option<ChainHead>,
    /// What the drain check reads.
    progress: Arc<TrackProgress>,
}

impl Track {
    /// A membership not joined yet.
    pub fn new(room: u32, client: u32) -> Self {
        Self {
            room,
            client,
            since_us: None,
            joined: false,
            floor: 0,
            strict: false,
            last: 0,
            holes: Vec::new(),
            hole_seqs: 0,
            events: Vec::new(),
            chain_head: None,
            progress: Arc::new(TrackProgress::default()),
        }
    }

    /// Shared progress for the drain check.
    pub fn progress(&self) -> Arc<TrackProgress> {
        self.progress.clone()
    }

    /// The `since` to rejoin with after a reconnect, when this membership can be resumed.
    pub fn resume_since(&self) -> Option<u64> {
        self.since_us.map(|_| self.last)
    }

    /// Last seq seen.
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Joined right now.
    pub fn is_joined(&self) -> bool {
        self.joined
    }

    /// Duplicate and reordered deliveries seen.
    pub fn events(&self) -> &[TrackEvent] {
        &self.events
    }

    /// When the membership audited at the end began: `Some` only when joined now.
    pub(super) fn audited_since(&self) -> Option<u64> {
        if self.joined {
            self.since_us
        } else {
            None
        }
    }

    /// The seqs skipped and not seen yet, as inclusive ranges.
    pub(super) fn holes(&self) -> &[(u64, u64)] {
        &self.holes
    }

    /// A `joined` frame arrived at `at_us`. With `resumed` the join carried `since` =
    /// [`Self::resume_since`] and the membership continues; otherwise it starts afresh at
    /// `last_seq`.
    pub fn joined(&mut self, last_seq: u64, at_us: u64, resumed: bool) {
        if !(resumed && self.since_us.is_some()) {
            self.since_us = Some(at_us);
            self.floor = last_seq;
            self.last = last_seq;
            self.strict = false;
            self.holes.clear();
            self.hole_seqs = 0;
        } else {
            self.strict = true;
        }
        self.joined = true;
        self.progress.last.store(self.last, Ordering::Relaxed);
        self.progress.holes.store(self.hole_seqs, Ordering::Relaxed);
        self.progress.active.store(true, Ordering::Release);
    }

    /// The connection carrying this membership is gone (it may be resumed).
    pub fn disconnected(&mut self) {
        self.joined = false;
        self.progress.active.store(false, Ordering::Release);
    }

    /// The membership ended for good (a rejoin without `since` starts a new one).
    pub fn abandon(&mut self) {
        self.disconnected();
        self.since_us = None;
    }

    /// Checks one delivery of `seq`. O(1) unless there are holes.
    pub fn deliver(&mut self, seq: u64) -> Delivery {
        let outcome = if seq == self.last + 1 {
            self.last = seq;
            Delivery::InOrder
        } else if seq > self.last {
            self.holes.push((self.last + 1, seq - 1));
            self.hole_seqs += seq - 1 - self.last;
            self.last = seq;
            self.progress.holes.store(self.hole_seqs, Ordering::Relaxed);
            Delivery::AfterGap
        } else if self.fill_hole(seq) {
            self.progress.holes.store(self.hole_seqs, Ordering::Relaxed);
            Delivery::Reordered
        } else if !self.strict && seq <= self.floor {
            Delivery::BeforeJoin
        } else {
            Delivery::Duplicate
        };
        self.progress.last.store(self.last, Ordering::Relaxed);
        outcome
    }

    /// Writes down a duplicate, reordered or chain-failing delivery.
    pub fn note(&mut self, kind: FindingKind, seq: u64, id: [u8; 16], trace: [u8; 16]) {
        self.note_other(kind, seq, id, trace, [0; 16]);
    }

    /// Writes down an event about message `id` that message `other` revealed.
    pub fn note_other(&mut self, kind: FindingKind, seq: u64, id: [u8; 16], trace: [u8; 16], other: [u8; 16]) {
        self.events.push(TrackEvent { kind, seq, last: self.last, id, trace, other });
    }

    /// The newest chained message got, if the chain is unbroken.
    pub fn chain_head(&self) -> Option<ChainHead> {
        self.chain_head
    }

    /// Moves (or, with `None`, breaks) the chain.
    pub fn set_chain_head(&mut self, head: Option<ChainHead>) {
        self.chain_head = head;
    }

    /// Closes `seq` inside a hole (splitting it when `seq` is in the middle); false when no hole
    /// holds it.
    fn fill_hole(&mut self, seq: u64) -> bool {
        let Some(pos) = self.holes.iter().position(|&(a, b)| a <= seq && seq <= b) else {
            return false;
        };
        let (a, b) = self.holes[pos];
        match (seq == a, seq == b) {
            (true, true) => {
                self.holes.remove(pos);
            }
            (true, false) => self.holes[pos].0 = seq + 1,
            (false, true) => self.holes[pos].1 = seq - 1,
            (false, false) => {
                self.holes[pos].1 = seq - 1;
                self.holes.insert(pos + 1, (seq + 1, b));
            }
        }
        self.hole_seqs -= 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_split_and_fill() {
        let mut t = Track::new(0, 0);
        t.joined(0, 0, false);
        assert_eq!(t.deliver(1), Delivery::InOrder);
        assert_eq!(t.deliver(6), Delivery::AfterGap);
        assert_eq!(t.holes, vec![(2, 5)]);
        assert_eq!(t.deliver(4), Delivery::Reordered);
        assert_eq!(t.holes, vec![(2, 3), (5, 5)]);
        assert_eq!(t.deliver(2), Delivery::Reordered);
        assert_eq!(t.deliver(5), Delivery::Reordered);
        assert_eq!(t.holes, vec![(3, 3)]);
        assert_eq!(t.deliver(5), Delivery::Duplicate);
        assert_eq!(t.progress.holes.load(Ordering::Relaxed), 1);
        assert_eq!(t.deliver(3), Delivery::Reordered);
        assert!(t.holes.is_empty());
        assert_eq!(t.progress.last.load(Ordering::Relaxed), 6);
    }

    #[test]
    fn a_fresh_join_ignores_older_seqs_and_a_resumed_one_does_not() {
        let mut t = Track::new(0, 0);
        t.joined(5, 100, false);
        assert_eq!(t.deliver(5), Delivery::BeforeJoin);
        assert_eq!(t.deliver(6), Delivery::InOrder);
        assert_eq!(t.deliver(6), Delivery::Duplicate);
        t.disconnected();
        assert_eq!(t.audited_since(), None, "not joined at the end: not audited");
        assert_eq!(t.resume_since(), Some(6));
        t.joined(9, 200, true);
        assert_eq!(t.audited_since(), Some(100), "a resumed membership keeps its start");
        assert_eq!(t.deliver(5), Delivery::Duplicate, "after a resume nothing is older than the membership");
        t.abandon();
        assert_eq!(t.resume_since(), None);
        t.joined(9, 300, true);
        assert_eq!(t.audited_since(), Some(300), "nothing to resume: a new membership");
    }
}
