//! A synthetic run for the auditor's unit tests: one room with `members` clients, `n` sends by
//! client 0 acked as seq 1..=n, and a delivery log that tests rewrite to plant faults.

use rand::SeedableRng;

use super::*;
use crate::config::RoomDist;
use crate::plan::Plan;
use crate::schedule::PlannedSend;

/// The message id the sim gives seq `seq`.
pub(super) fn id_of(seq: u64) -> String {
    format!("018f0000-0000-7000-8000-{seq:012x}")
}

/// The trace id the sim gives seq `seq`.
pub(super) fn trace_of(seq: u64) -> String {
    format!("{seq:032x}")
}

/// A delivery log: per client, the seqs it gets, in order.
pub(super) type Log = Vec<(usize, Vec<u64>)>;

/// Plan, records and one joined track per member of room 0.
pub(super) struct Sim {
    pub(super) plan: Plan,
    pub(super) records: Records,
    pub(super) tracks: Vec<Track>,
}

impl Sim {
    /// `members` clients joined at t = 50 (before any send); send `i` scheduled at 1000·i,
    /// written at 100 + 1000·i and acked as seq i + 1.
    pub(super) fn new(members: u32, n: u32) -> Self {
        let plan = Plan::build("t", members, 1, 1, RoomDist::Uniform, &mut rand::rngs::StdRng::seed_from_u64(1));
        let sends: Vec<PlannedSend> =
            (0..n).map(|i| PlannedSend { at_us: 1000 * i as u64, client: 0, room: 0 }).collect();
        let records = Records::new(&sends, 1);
        records.set_measure_start(100);
        let mut tracks: Vec<Track> = (0..members).map(|c| Track::new(0, c)).collect();
        for t in &mut tracks {
            t.joined(0, 50, false);
        }
        for i in 0..n {
            records.mark_sent(i, 100 + 1000 * i as u64);
            assert_eq!(records.ack(i, parse_id(&id_of(i as u64 + 1)), i as u64 + 1, 0), AckOutcome::First);
        }
        Self { plan, records, tracks }
    }

    /// Delivers `seq` (of send `seq - 1`) to `client`.
    pub(super) fn deliver(&mut self, client: usize, seq: u64) -> Delivery {
        let send = Some(seq as u32 - 1);
        check_delivery(&mut self.tracks[client], &self.records, send, seq, &id_of(seq), &trace_of(seq), 10_000).0
    }

    /// Delivers the log: per client, the seqs in the given order.
    pub(super) fn run(&mut self, log: &[(usize, Vec<u64>)]) {
        for (client, seqs) in log {
            for &s in seqs {
                self.deliver(*client, s);
            }
        }
    }

    /// Every member gets seqs 1..=n once, in order.
    pub(super) fn clean_log(&self, n: u64) -> Log {
        (0..self.tracks.len()).map(|c| (c, (1..=n).collect())).collect()
    }

    /// The track references the verdict takes.
    pub(super) fn track_refs(&self) -> Vec<&Track> {
        self.tracks.iter().collect()
    }

    /// The verdict, listing up to 100 findings per kind.
    pub(super) fn audit(&self) -> AuditResult {
        finalize(&self.records, &self.track_refs(), &self.plan, 0, 100)
    }
}

/// The findings of one kind.
pub(super) fn only(result: &AuditResult, kind: FindingKind) -> Vec<&Finding> {
    result.findings.iter().filter(|f| f.kind == kind).collect()
}
