//! The verdict: turns the per-send records and every member's track into an [`AuditResult`].
//!
//! [`finalize`] reads top-down as the steps it takes:
//! 1. [`SendTally`]: which sends were written and acked, and which (room, seq) is which send;
//! 2. [`unanswered_sends`]: sends that got an `error` (rejected, or refused but delivered when
//!    the message arrived all the same, or unknown then stored when that error was `internal`)
//!    or nothing (unacked);
//! 3. [`AuditedMembers`]: the memberships joined at the end and which acked sends each expects;
//! 4. [`Losses`]: per audited member, the holes it never filled (gaps) and the expected seqs it
//!    never got (missing), then [`missing_findings`] and [`gap_findings`];
//! 5. [`event_findings`]: duplicates and reorders, written down by the tracks as they happened;
//! 6. [`stored_twice_findings`]: sends acked or delivered as two different messages;
//! 7. [`order_and_cap`]: findings sorted by kind, room and seq, at most `max_findings` per kind;
//! 8. [`verdict_line`]: passed or failed, and the one line that says why.
//!
//! Each finding names the same fault once however many members it hit: the count is exact and up
//! to [`RECIPIENTS_PER_FINDING`] users are listed.

use std::collections::{BTreeMap, HashMap};

use protocol::ErrorCode;

use super::findings::{AuditResult, Finding, FindingCounts, FindingKind};
use super::ids::{fmt_id, fmt_trace};
use super::records::{MsgRecord, Records};
use super::track::{Track, TrackEvent};
use super::RECIPIENTS_PER_FINDING;
use crate::plan::Plan;

/// Builds the verdict from the records and every client's tracks.
pub fn finalize(
    records: &Records,
    tracks: &[&Track],
    plan: &Plan,
    stray_deliveries: u64,
    max_findings: usize,
) -> AuditResult {
    let names = Names { plan };
    let rooms = plan.rooms.len();
    let mut counts = FindingCounts::default();
    let mut findings: Vec<Finding> = Vec::new();

    let sends = SendTally::of(records, rooms);
    findings.extend(unanswered_sends(records, &names, &mut counts));

    let audited = AuditedMembers::of(tracks, rooms);
    let expected_deliveries = audited.expected_deliveries(records);
    let members_expecting_none = audited.expecting_none(records);

    let losses = Losses::find(records, tracks, &sends);
    counts.gap_seqs += losses.gap_seqs;
    findings.extend(missing_findings(&losses, records, &audited, &names, &mut counts));
    findings.extend(gap_findings(&losses, records, &sends, &names));

    findings.extend(event_findings(tracks, &sends, &names, &mut counts));
    findings.extend(stored_twice_findings(records, &names, &mut counts));

    let (findings, findings_truncated) = order_and_cap(findings, max_findings);
    let scheduled = records.len() as u64;
    let (passed, verdict) = verdict_line(&counts, scheduled, sends.acked, expected_deliveries, audited.members);
    AuditResult {
        passed,
        verdict,
        scheduled,
        sent: sends.sent,
        acked: sends.acked,
        not_sent: sends.not_sent,
        members_audited: audited.members,
        members_excluded: plan.memberships().saturating_sub(audited.members),
        members_expecting_none,
        expected_deliveries,
        delivered: expected_deliveries.saturating_sub(counts.missing_deliveries),
        stray_deliveries,
        counts,
        findings,
        findings_truncated,
    }
}

/// How findings name rooms, users and sends.
struct Names<'a> {
    plan: &'a Plan,
}

impl Names<'_> {
    /// The room's name (`#n` for a number outside the plan).
    fn room(&self, room: u32) -> String {
        self.plan.rooms.get(room as usize).cloned().unwrap_or_else(|| format!("#{room}"))
    }

    /// The user name of a client.
    fn user(&self, client: u32) -> String {
        self.plan.user(client)
    }

    /// The users listed for an affected set.
    fn users(&self, affected: &Affected) -> Vec<String> {
        affected.clients.iter().map(|&c| self.plan.user(c)).collect()
    }

    /// The `client_msg_id` of send `i`.
    fn client_msg_id(&self, send: u32) -> String {
        self.plan.client_msg_id(send)
    }
}

/// Members hit by one fault: the exact count and the first few clients.
#[derive(Debug, Default)]
struct Affected {
    count: u64,
    clients: Vec<u32>,
}

impl Affected {
    /// Counts one more member, listing it while there is room (once).
    fn add(&mut self, client: u32) {
        self.count += 1;
        if self.clients.len() < RECIPIENTS_PER_FINDING && !self.clients.contains(&client) {
            self.clients.push(client);
        }
    }
}

/// Step 1: what the records say about sending and acking.
#[derive(Debug)]
struct SendTally {
    /// Sends written.
    sent: u64,
    /// Sends acked.
    acked: u64,
    /// Sends never written.
    not_sent: u64,
    /// The send acked as each (room, seq).
    by_seq: HashMap<(u32, u64), u32>,
    /// The highest acked seq per room.
    room_max: Vec<u64>,
}

impl SendTally {
    /// Counts the records and indexes the acked ones by (room, seq).
    fn of(records: &Records, rooms: usize) -> Self {
        let mut tally = Self { sent: 0, acked: 0, not_sent: 0, by_seq: HashMap::new(), room_max: vec![0; rooms] };
        for (i, r) in records.recs.iter().enumerate() {
            if r.sent_us().is_none() {
                tally.not_sent += 1;
                continue;
            }
            tally.sent += 1;
            if let Some(ack) = r.ack() {
                tally.acked += 1;
                tally.by_seq.insert((r.room, ack.seq), i as u32);
                if let Some(m) = tally.room_max.get_mut(r.room as usize) {
                    *m = (*m).max(ack.seq);
                }
            }
        }
        tally
    }

    /// The send acked as `seq` in `room`, if one was.
    fn send_at(&self, room: u32, seq: u64) -> Option<u32> {
        self.by_seq.get(&(room, seq)).copied()
    }

    /// The highest acked seq of `room`.
    fn room_max(&self, room: u32) -> u64 {
        self.room_max.get(room as usize).copied().unwrap_or(0)
    }
}

/// Step 2: written sends without an ack: `rejected` when the server answered with an error (not
/// a failure), `refused_but_delivered` when it did and the message was delivered all the same
/// (an error promises "not stored", docs/protocol.md), `unknown_then_stored` when that error was
/// `internal`, which promises nothing (not a failure), `unacked` when it did not answer at all.
fn unanswered_sends(records: &Records, names: &Names<'_>, counts: &mut FindingCounts) -> Vec<Finding> {
    let mut findings = Vec::new();
    for (i, r) in records.recs.iter().enumerate() {
        if r.sent_us().is_none() || r.ack().is_some() {
            continue;
        }
        let i = i as u32;
        if let (Some(code), Some(seen)) = (r.rejected(), r.seen()) {
            // `internal` promises nothing about storage; every other error says "not stored".
            let delivered = format!("delivered as seq {} (id {})", seen.seq, fmt_id(&seen.id));
            let (kind, detail) = if code == ErrorCode::Internal {
                counts.unknown_then_stored += 1;
                (
                    FindingKind::UnknownThenStored,
                    format!("send answered `internal` (outcome unknown), then {delivered}"),
                )
            } else {
                counts.refused_but_delivered += 1;
                (
                    FindingKind::RefusedButDelivered,
                    format!("send answered with error `{}`, yet {delivered}", code.as_str()),
                )
            };
            findings.push(Finding {
                kind,
                room: names.room(r.room),
                seq: Some(seen.seq),
                id: Some(fmt_id(&seen.id)),
                trace_id: fmt_trace(&seen.trace),
                client_msg_id: Some(names.client_msg_id(i)),
                count: 1,
                recipients: vec![names.user(r.sender)],
                detail,
            });
        } else if let Some(code) = r.rejected() {
            counts.rejected += 1;
            findings.push(Finding {
                kind: FindingKind::Rejected,
                room: names.room(r.room),
                seq: None,
                id: None,
                trace_id: None,
                client_msg_id: Some(names.client_msg_id(i)),
                count: 1,
                recipients: vec![names.user(r.sender)],
                detail: format!("send answered with error `{}`", code.as_str()),
            });
        } else {
            counts.unacked += 1;
            let seen = r.seen();
            findings.push(Finding {
                kind: FindingKind::Unacked,
                room: names.room(r.room),
                seq: seen.map(|s| s.seq),
                id: seen.map(|s| fmt_id(&s.id)),
                trace_id: seen.and_then(|s| fmt_trace(&s.trace)),
                client_msg_id: Some(names.client_msg_id(i)),
                count: 1,
                recipients: vec![names.user(r.sender)],
                detail: if seen.is_some() {
                    "no ack nor error by the end of the drain, yet it was delivered".into()
                } else {
                    "no ack nor error by the end of the drain, and never delivered".into()
                },
            });
        }
    }
    findings
}

/// Step 3: the memberships audited (joined at the end), by room, as the sorted instants their
/// continuous membership began.
#[derive(Debug)]
struct AuditedMembers {
    /// Per room, when each audited membership began, ascending.
    since_by_room: Vec<Vec<u64>>,
    /// Audited memberships in all.
    members: u64,
}

impl AuditedMembers {
    /// Collects the audited memberships of `rooms` rooms.
    fn of(tracks: &[&Track], rooms: usize) -> Self {
        let mut since_by_room: Vec<Vec<u64>> = vec![Vec::new(); rooms];
        let mut members = 0u64;
        for t in tracks {
            if let Some(since) = t.audited_since() {
                if let Some(list) = since_by_room.get_mut(t.room as usize) {
                    list.push(since);
                    members += 1;
                }
            }
        }
        for list in &mut since_by_room {
            list.sort_unstable();
        }
        Self { since_by_room, members }
    }

    /// How many audited members expect the message of `r`: those whose membership began before
    /// the send was written.
    fn expecting(&self, r: &MsgRecord) -> u64 {
        match (r.sent_us(), self.since_by_room.get(r.room as usize)) {
            (Some(sent), Some(list)) => list.partition_point(|&s| s < sent) as u64,
            _ => 0,
        }
    }

    /// (acked message, expecting member) pairs in all.
    fn expected_deliveries(&self, records: &Records) -> u64 {
        records.recs.iter().filter(|r| r.ack().is_some()).map(|r| self.expecting(r)).sum()
    }

    /// Audited members that expected no acked message at all: their room had none written
    /// after they joined. The members that did expect one are those expecting the room's
    /// latest-written acked message.
    fn expecting_none(&self, records: &Records) -> u64 {
        let mut latest: Vec<Option<&MsgRecord>> = vec![None; self.since_by_room.len()];
        for r in records.recs.iter().filter(|r| r.ack().is_some()) {
            if let Some(slot) = latest.get_mut(r.room as usize) {
                if slot.is_none_or(|l| l.sent_us() < r.sent_us()) {
                    *slot = Some(r);
                }
            }
        }
        let expecting_some: u64 = latest.into_iter().flatten().map(|r| self.expecting(r)).sum();
        self.members - expecting_some
    }
}

/// Step 4: what audited members never got.
#[derive(Debug, Default)]
struct Losses {
    /// Per send, the expecting members that never got it (from holes and from the tail after
    /// each member's last seq).
    missing: BTreeMap<u32, Affected>,
    /// Per (room, seq), the members whose stream skipped it and never filled the hole.
    gaps: BTreeMap<(u32, u64), Affected>,
    /// (member, seq) pairs in holes.
    gap_seqs: u64,
}

impl Losses {
    /// Walks each audited member's holes and the acked seqs above its last one.
    fn find(records: &Records, tracks: &[&Track], sends: &SendTally) -> Self {
        let mut losses = Self::default();
        for t in tracks {
            let Some(since) = t.audited_since() else { continue };
            // The send acked as `seq` in this room, when this member was expected to get it.
            let expects = |seq: u64| -> Option<u32> {
                let i = sends.send_at(t.room, seq)?;
                let sent = records.get(i)?.sent_us()?;
                (sent > since).then_some(i)
            };
            for &(a, b) in t.holes() {
                for seq in a..=b {
                    losses.gaps.entry((t.room, seq)).or_default().add(t.client);
                    losses.gap_seqs += 1;
                    if let Some(i) = expects(seq) {
                        losses.missing.entry(i).or_default().add(t.client);
                    }
                }
            }
            for seq in (t.last() + 1)..=sends.room_max(t.room) {
                if let Some(i) = expects(seq) {
                    losses.missing.entry(i).or_default().add(t.client);
                }
            }
        }
        losses
    }
}

/// Step 4, missing: one finding per acked send some expecting member never got.
fn missing_findings(
    losses: &Losses,
    records: &Records,
    audited: &AuditedMembers,
    names: &Names<'_>,
    counts: &mut FindingCounts,
) -> Vec<Finding> {
    let mut findings = Vec::new();
    for (&i, who) in &losses.missing {
        let Some(r) = records.get(i) else { continue };
        let ack = r.ack().copied();
        let n = who.count;
        counts.missing_messages += 1;
        counts.missing_deliveries += n;
        findings.push(Finding {
            kind: FindingKind::Missing,
            room: names.room(r.room),
            seq: ack.map(|a| a.seq),
            id: ack.map(|a| fmt_id(&a.id)),
            trace_id: r.seen().and_then(|s| fmt_trace(&s.trace)),
            client_msg_id: Some(names.client_msg_id(i)),
            count: n,
            recipients: names.users(who),
            detail: format!("{n} of {} expected members never got it", audited.expecting(r)),
        });
    }
    findings
}

/// Step 4, gaps: one finding per (room, seq) some member skipped for good.
fn gap_findings(losses: &Losses, records: &Records, sends: &SendTally, names: &Names<'_>) -> Vec<Finding> {
    let mut findings = Vec::new();
    for (&(room, seq), who) in &losses.gaps {
        let known = sends.send_at(room, seq).and_then(|i| Some((i, records.get(i)?)));
        let n = who.count;
        findings.push(Finding {
            kind: FindingKind::Gap,
            room: names.room(room),
            seq: Some(seq),
            id: known.and_then(|(_, r)| r.ack().map(|a| fmt_id(&a.id))),
            trace_id: known.and_then(|(_, r)| r.seen().and_then(|s| fmt_trace(&s.trace))),
            client_msg_id: known.map(|(i, _)| names.client_msg_id(i)),
            count: n,
            recipients: names.users(who),
            detail: format!("{n} members got a later seq but never seq {seq}"),
        });
    }
    findings
}

/// Step 5: duplicates, reorders and chain failures from every membership (they happened while it
/// was joined), one finding per (kind, room, seq), described by the first member that met it (an
/// equivocation by the first that names the message revealing it, when one does).
fn event_findings(tracks: &[&Track], sends: &SendTally, names: &Names<'_>, counts: &mut FindingCounts) -> Vec<Finding> {
    type EventKey = (FindingKind, u32, u64);
    let mut events: BTreeMap<EventKey, (Affected, TrackEvent)> = BTreeMap::new();
    for t in tracks {
        for e in t.events() {
            match e.kind {
                FindingKind::Duplicate => counts.duplicate_deliveries += 1,
                FindingKind::ChainAltered => counts.chain_altered += 1,
                FindingKind::Equivocation => counts.equivocations += 1,
                _ => counts.reordered_deliveries += 1,
            }
            let (who, first) = events.entry((e.kind, t.room, e.seq)).or_insert_with(|| (Affected::default(), *e));
            who.add(t.client);
            if first.other == [0; 16] && e.other != [0; 16] {
                *first = *e;
            }
        }
    }
    let mut findings = Vec::new();
    for (&(kind, room, seq), (who, e)) in &events {
        let n = who.count;
        findings.push(Finding {
            kind,
            room: names.room(room),
            seq: Some(seq),
            id: Some(fmt_id(&e.id)),
            trace_id: fmt_trace(&e.trace),
            client_msg_id: sends.send_at(room, seq).map(|i| names.client_msg_id(i)),
            count: n,
            recipients: names.users(who),
            detail: match kind {
                FindingKind::Duplicate => format!("delivered again to {n} members"),
                FindingKind::ChainAltered => {
                    format!("{n} deliveries carried a digest its fields do not hash to: altered after sequencing")
                }
                FindingKind::Equivocation if e.other != [0; 16] => format!(
                    "two versions of seq {seq}: the next message (id {}) does not chain to the one delivered; {n} deliveries revealed it",
                    fmt_id(&e.other)
                ),
                FindingKind::Equivocation => {
                    format!("two versions of seq {seq}: recipients got different digests; {n} deliveries revealed it")
                }
                _ => format!("{n} members got it after a higher seq (first seen after seq {})", e.last),
            },
        });
    }
    findings
}

/// Step 6: sends acked or delivered as two different messages (idempotency broken), one finding
/// per send from the first disagreement.
fn stored_twice_findings(records: &Records, names: &Names<'_>, counts: &mut FindingCounts) -> Vec<Finding> {
    let mut findings = Vec::new();
    for a in records.first_anomaly_per_send() {
        let Some(r) = records.get(a.send) else { continue };
        counts.stored_twice += 1;
        findings.push(Finding {
            kind: FindingKind::StoredTwice,
            room: names.room(r.room),
            seq: Some(a.seq),
            id: Some(fmt_id(&a.id)),
            trace_id: r.seen().and_then(|s| fmt_trace(&s.trace)),
            client_msg_id: Some(names.client_msg_id(a.send)),
            count: 1,
            recipients: vec![names.user(r.sender)],
            detail: a.detail,
        });
    }
    findings
}

/// Step 7: sorts findings by kind, room and seq (stable, so ties keep their order) and keeps at
/// most `max_findings` of each kind; true when some were left out.
fn order_and_cap(mut findings: Vec<Finding>, max_findings: usize) -> (Vec<Finding>, bool) {
    findings.sort_by(|a, b| (a.kind, &a.room, a.seq).cmp(&(b.kind, &b.room, b.seq)));
    let mut kept: Vec<Finding> = Vec::new();
    let mut per_kind: HashMap<FindingKind, usize> = HashMap::new();
    let mut truncated = false;
    for f in findings {
        let n = per_kind.entry(f.kind).or_default();
        if *n < max_findings {
            *n += 1;
            kept.push(f);
        } else {
            truncated = true;
        }
    }
    (kept, truncated)
}

/// Step 8: the audit fails on any failing finding, or when sends were scheduled but none was
/// acked (nothing could be checked). Returns whether it passed and the line that says why.
fn verdict_line(
    counts: &FindingCounts,
    scheduled: u64,
    acked: u64,
    expected_deliveries: u64,
    members_audited: u64,
) -> (bool, String) {
    let failing = [
        (counts.missing_messages, "missing message(s)"),
        (counts.duplicate_deliveries, "duplicate delivery(ies)"),
        (counts.reordered_deliveries, "reordered delivery(ies)"),
        (counts.gap_seqs, "seq gap(s)"),
        (counts.unacked, "unacked send(s)"),
        (counts.stored_twice, "send(s) stored twice"),
        (counts.refused_but_delivered, "send(s) refused but delivered"),
        (counts.chain_altered, "altered message(s) (chain digest mismatch)"),
        (counts.equivocations, "equivocation(s) (two versions of a seq)"),
    ];
    let parts: Vec<String> = failing.iter().filter(|(n, _)| *n > 0).map(|(n, what)| format!("{n} {what}")).collect();
    if !parts.is_empty() {
        (false, format!("FAILED: {}", parts.join(", ")))
    } else if scheduled > 0 && acked == 0 {
        (false, "FAILED: no message was acked, so nothing could be checked".to_string())
    } else {
        (
            true,
            format!(
                "PASSED: {expected_deliveries} expected deliveries of {acked} acked messages to {members_audited} members all arrived once, in order"
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::sim::{id_of, only, trace_of, Log, Sim};
    use crate::audit::{parse_id, AckOutcome, Delivery};
    use crate::schedule::PlannedSend;

    // ---- The whole verdict, on synthetic delivery logs. ----

    #[test]
    fn clean_run_reports_zero() {
        let mut sim = Sim::new(5, 20);
        let log = sim.clean_log(20);
        sim.run(&log);
        let r = sim.audit();
        assert!(r.passed, "{}", r.verdict);
        assert!(r.findings.is_empty(), "{:?}", r.findings);
        assert_eq!(r.counts, FindingCounts::default());
        assert_eq!((r.expected_deliveries, r.delivered, r.acked), (100, 100, 20));
    }

    #[test]
    fn members_of_rooms_with_no_message_after_their_join_expected_none() {
        // Two rooms of two: room 0 gets sends 0 and 1, room 1 none; client 2 joins room 0 after
        // send 0 was written and before send 1, client 3 after both.
        let users = (0..4).map(|c| format!("t-u{c}")).collect();
        let plan =
            Plan::explicit("t", users, vec!["t-r0".into(), "t-r1".into()], vec![vec![0], vec![1], vec![0], vec![0]]);
        let sends: Vec<PlannedSend> = (0..2).map(|i| PlannedSend { at_us: 1000 * i, client: 0, room: 0 }).collect();
        let records = Records::new(&sends, 2);
        let mut tracks: Vec<Track> = [(0, 0), (1, 1), (0, 2), (0, 3)].map(|(room, c)| Track::new(room, c)).into();
        for (t, at) in tracks.iter_mut().zip([50, 50, 500, 5000]) {
            t.joined(0, at, false);
        }
        for i in 0..2u32 {
            records.mark_sent(i, 100 + 1000 * u64::from(i));
            assert_eq!(records.ack(i, parse_id(&id_of(u64::from(i) + 1)), u64::from(i) + 1, 0), AckOutcome::First);
        }
        let refs: Vec<&Track> = tracks.iter().collect();
        let r = finalize(&records, &refs, &plan, 0, 100);
        assert_eq!(r.members_audited, 4);
        // Client 1 (room 1, no sends) and client 3 (joined after the last send) expected none.
        assert_eq!(r.members_expecting_none, 2);
        assert_eq!(r.expected_deliveries, 3);

        let mut sim = Sim::new(5, 3);
        let log = sim.clean_log(3);
        sim.run(&log);
        assert_eq!(sim.audit().members_expecting_none, 0);
    }

    #[test]
    fn dropped_delivery_is_named_by_id() {
        let mut sim = Sim::new(3, 10);
        let mut log = sim.clean_log(10);
        log[1].1.retain(|&s| s != 4); // client 1 never gets seq 4
        log[2].1.retain(|&s| s != 10); // client 2 never gets the last one (no later seq reveals it)
        sim.run(&log);
        let r = sim.audit();
        assert!(!r.passed);
        let missing = only(&r, FindingKind::Missing);
        assert_eq!(missing.len(), 2, "{missing:?}");
        assert_eq!(missing[0].id.as_deref(), Some(id_of(4).as_str()));
        assert_eq!(missing[0].seq, Some(4));
        assert_eq!(missing[0].trace_id.as_deref(), Some(trace_of(4).as_str()));
        assert_eq!(missing[0].recipients, vec!["t-u1".to_string()]);
        assert_eq!(missing[0].client_msg_id.as_deref(), Some("t.3"));
        assert_eq!(missing[1].id.as_deref(), Some(id_of(10).as_str()));
        assert_eq!(missing[1].recipients, vec!["t-u2".to_string()]);
        // The mid-stream drop is also a gap; the tail drop is not (nothing came after it).
        let gaps = only(&r, FindingKind::Gap);
        assert_eq!(gaps.len(), 1);
        assert_eq!(gaps[0].id.as_deref(), Some(id_of(4).as_str()));
        assert_eq!(r.counts.missing_deliveries, 2);
        assert_eq!(r.delivered, r.expected_deliveries - 2);
    }

    #[test]
    fn duplicate_is_named_by_id() {
        let mut sim = Sim::new(3, 10);
        let mut log = sim.clean_log(10);
        log[0].1.insert(6, 6); // client 0 gets seq 6 twice, back to back
        log[2].1.push(3); // client 2 gets seq 3 again at the end
        sim.run(&log);
        let r = sim.audit();
        assert!(!r.passed);
        let dups = only(&r, FindingKind::Duplicate);
        let ids: Vec<_> = dups.iter().map(|f| f.id.clone().unwrap()).collect();
        assert_eq!(ids, vec![id_of(3), id_of(6)]);
        assert_eq!(dups[1].recipients, vec!["t-u0".to_string()]);
        assert_eq!(r.counts.duplicate_deliveries, 2);
        assert_eq!(r.counts.missing_messages, 0);
        assert_eq!(r.counts.gap_seqs, 0);
    }

    #[test]
    fn reorder_is_named_by_id() {
        let mut sim = Sim::new(3, 10);
        let mut log = sim.clean_log(10);
        log[1].1.swap(4, 5); // client 1 gets 6 before 5
        log[2].1.retain(|&s| s != 2);
        log[2].1.push(2); // client 2 gets 2 last of all
        sim.run(&log);
        let r = sim.audit();
        assert!(!r.passed);
        let re = only(&r, FindingKind::Reordered);
        let ids: Vec<_> = re.iter().map(|f| f.id.clone().unwrap()).collect();
        assert_eq!(ids, vec![id_of(2), id_of(5)]);
        assert_eq!(r.counts.reordered_deliveries, 2);
        // A hole that was filled late is neither missing nor a gap.
        assert_eq!(r.counts.missing_messages, 0);
        assert_eq!(r.counts.gap_seqs, 0);
        assert_eq!(r.counts.duplicate_deliveries, 0);
    }

    #[test]
    fn same_fault_at_many_members_is_one_finding() {
        let mut sim = Sim::new(50, 5);
        let mut log = sim.clean_log(5);
        for (_, seqs) in &mut log {
            seqs.retain(|&s| s != 3);
        }
        sim.run(&log);
        let r = sim.audit();
        let missing = only(&r, FindingKind::Missing);
        assert_eq!(missing.len(), 1);
        assert_eq!(missing[0].count, 50);
        assert_eq!(missing[0].recipients.len(), RECIPIENTS_PER_FINDING);
        assert_eq!(r.counts.missing_deliveries, 50);
    }

    #[test]
    fn unacked_and_rejected_sends() {
        let mut sim = Sim::new(2, 3);
        let plan_sends = vec![PlannedSend { at_us: 0, client: 0, room: 0 }; 3];
        sim.records = Records::new(&plan_sends, 1);
        sim.records.mark_sent(0, 10);
        sim.records.ack(0, parse_id(&id_of(1)), 1, 20);
        sim.records.mark_sent(1, 10); // never answered
        sim.records.mark_sent(2, 10);
        sim.records.reject(2, ErrorCode::RateLimited);
        sim.deliver(0, 1);
        sim.deliver(1, 1);
        let r = sim.audit();
        assert!(!r.passed);
        assert_eq!(r.counts.unacked, 1);
        assert_eq!(r.counts.rejected, 1);
        let un = only(&r, FindingKind::Unacked);
        assert_eq!(un[0].client_msg_id.as_deref(), Some("t.1"));
        assert!(only(&r, FindingKind::Rejected)[0].detail.contains("rate_limited"));
    }

    /// Three sends by one client to three members: the first two acked, the third answered
    /// `error` `code`, yet members get it as seq 3.
    fn third_send_answered_then_delivered(code: ErrorCode) -> AuditResult {
        let mut sim = Sim::new(3, 3);
        let plan_sends = vec![PlannedSend { at_us: 0, client: 0, room: 0 }; 3];
        sim.records = Records::new(&plan_sends, 1);
        for i in 0..2 {
            sim.records.mark_sent(i, 10);
            sim.records.ack(i, parse_id(&id_of(u64::from(i) + 1)), u64::from(i) + 1, 20);
        }
        sim.records.mark_sent(2, 10);
        sim.records.reject(2, code);
        let log = sim.clean_log(3);
        sim.run(&log);
        sim.audit()
    }

    /// `internal` promises nothing about storage (the server could not tell): a send so
    /// answered and then delivered is listed, and passes.
    #[test]
    fn an_unknown_outcome_then_delivered_is_listed_and_passes() {
        let r = third_send_answered_then_delivered(ErrorCode::Internal);
        assert!(r.passed, "{}", r.verdict);
        assert_eq!((r.counts.unknown_then_stored, r.counts.refused_but_delivered, r.counts.rejected), (1, 0, 0));
        let found = only(&r, FindingKind::UnknownThenStored);
        assert_eq!((found[0].seq, found[0].client_msg_id.as_deref()), (Some(3), Some("t.2")));
    }

    /// An error promises the send was not stored (docs/protocol.md: "`unavailable` means not
    /// stored"): one that was delivered all the same fails the audit, naming the delivery.
    #[test]
    fn a_refused_send_that_was_delivered_fails_naming_the_delivery() {
        let r = third_send_answered_then_delivered(ErrorCode::Unavailable);
        assert!(!r.passed, "{}", r.verdict);
        assert_eq!(r.verdict, "FAILED: 1 send(s) refused but delivered");
        assert_eq!((r.counts.refused_but_delivered, r.counts.rejected), (1, 0));
        let found = only(&r, FindingKind::RefusedButDelivered);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].seq, Some(3));
        assert_eq!(found[0].id.as_deref(), Some(id_of(3).as_str()));
        assert_eq!(found[0].trace_id.as_deref(), Some(trace_of(3).as_str()));
        assert_eq!(found[0].client_msg_id.as_deref(), Some("t.2"));
        assert_eq!(
            found[0].detail,
            format!("send answered with error `unavailable`, yet delivered as seq 3 (id {})", id_of(3))
        );
        assert!(only(&r, FindingKind::Rejected).is_empty(), "not also listed as an honest rejection");
    }

    #[test]
    fn members_who_joined_after_the_send_are_not_expected() {
        let mut sim = Sim::new(2, 4);
        // Client 1 (re)joins afresh at t = 2150: sends 0..=2 (sent at 100, 1100, 2100) predate it.
        sim.tracks[1] = Track::new(0, 1);
        sim.tracks[1].joined(3, 2150, false);
        sim.run(&[(0, vec![1, 2, 3, 4]), (1, vec![4])]);
        let r = sim.audit();
        assert!(r.passed, "{} {:?}", r.verdict, r.findings);
        assert_eq!(r.expected_deliveries, 4 + 1);
        // A delivery at or below the join's last_seq is ignored, not a duplicate.
        assert_eq!(sim.deliver(1, 3), Delivery::BeforeJoin);
        // A member not joined at the end is not audited.
        sim.tracks[0].abandon();
        let r = sim.audit();
        assert_eq!((r.members_audited, r.members_excluded), (1, 1));
        // Nor is one whose client never handed its track over (it did not stop in time).
        let r = finalize(&sim.records, &[&sim.tracks[1]], &sim.plan, 0, 100);
        assert_eq!((r.members_audited, r.members_excluded), (1, 1));
    }

    #[test]
    fn resumed_membership_stays_audited_and_catches_duplicates_across_reconnects() {
        let mut sim = Sim::new(2, 6);
        sim.run(&[(0, vec![1, 2, 3, 4, 5, 6]), (1, vec![1, 2, 3])]);
        sim.tracks[1].disconnected();
        assert_eq!(sim.tracks[1].resume_since(), Some(3));
        sim.tracks[1].joined(6, 20_000, true);
        // The replay after `since` = 3 repeats 3 (a server bug) then brings 4, 5 but not 6.
        sim.run(&[(1, vec![3, 4, 5])]);
        let r = sim.audit();
        assert_eq!(r.counts.duplicate_deliveries, 1);
        let missing = only(&r, FindingKind::Missing);
        assert_eq!(missing.len(), 1);
        assert_eq!(missing[0].id.as_deref(), Some(id_of(6).as_str()));
    }

    #[test]
    fn stored_twice_is_found_from_acks_and_deliveries() {
        let sim = Sim::new(1, 2);
        assert_eq!(sim.records.ack(0, parse_id(&id_of(1)), 1, 5), AckOutcome::Repeat);
        assert_eq!(sim.records.ack(0, parse_id(&id_of(9)), 9, 5), AckOutcome::Conflict);
        let r = sim.audit();
        assert_eq!(r.counts.stored_twice, 1);
        assert!(only(&r, FindingKind::StoredTwice)[0].detail.contains("acked twice"));
    }

    /// The verdict line names exactly what failed, for each kind of fault on its own.
    #[test]
    fn verdict_names_a_lost_a_duplicate_and_a_reordered_delivery_and_passes_a_clean_run() {
        let verdict = |edit: &dyn Fn(&mut Log)| {
            let mut sim = Sim::new(3, 6);
            let mut log = sim.clean_log(6);
            edit(&mut log);
            sim.run(&log);
            let r = sim.audit();
            (r.passed, r.verdict)
        };
        assert_eq!(
            verdict(&|_| {}),
            (true, "PASSED: 18 expected deliveries of 6 acked messages to 3 members all arrived once, in order".into())
        );
        assert_eq!(
            verdict(&|log| log[0].1.retain(|&s| s != 2)),
            (false, "FAILED: 1 missing message(s), 1 seq gap(s)".into())
        );
        assert_eq!(verdict(&|log| log[2].1.push(5)), (false, "FAILED: 1 duplicate delivery(ies)".into()));
        assert_eq!(verdict(&|log| log[1].1.swap(2, 3)), (false, "FAILED: 1 reordered delivery(ies)".into()));
    }

    // ---- The steps, one at a time. ----

    #[test]
    fn tally_counts_sends_and_indexes_acks_by_room_and_seq() {
        let sim = Sim::new(1, 3);
        let sends = SendTally::of(&sim.records, 1);
        assert_eq!((sends.sent, sends.acked, sends.not_sent), (3, 3, 0));
        assert_eq!(sends.send_at(0, 2), Some(1));
        assert_eq!(sends.send_at(0, 4), None);
        assert_eq!((sends.room_max(0), sends.room_max(7)), (3, 0));
    }

    #[test]
    fn losses_of_a_clean_run_are_none() {
        let mut sim = Sim::new(3, 5);
        let log = sim.clean_log(5);
        sim.run(&log);
        let losses = Losses::find(&sim.records, &sim.track_refs(), &SendTally::of(&sim.records, 1));
        assert!(losses.missing.is_empty() && losses.gaps.is_empty(), "{losses:?}");
        assert_eq!(losses.gap_seqs, 0);
    }

    #[test]
    fn a_lost_delivery_is_missing_for_that_member_and_a_gap_unless_it_was_the_last() {
        let mut sim = Sim::new(3, 5);
        let mut log = sim.clean_log(5);
        log[1].1.retain(|&s| s != 2); // mid-stream: seq 3 reveals the hole
        log[2].1.retain(|&s| s != 5); // the tail: nothing after it
        sim.run(&log);
        let sends = SendTally::of(&sim.records, 1);
        let losses = Losses::find(&sim.records, &sim.track_refs(), &sends);
        let missing: Vec<_> = losses.missing.iter().map(|(&i, a)| (i, a.count, a.clients.clone())).collect();
        assert_eq!(missing, vec![(1, 1, vec![1]), (4, 1, vec![2])]);
        let gaps: Vec<_> = losses.gaps.iter().map(|(&k, a)| (k, a.clients.clone())).collect();
        assert_eq!(gaps, vec![((0, 2), vec![1])]);
        assert_eq!(losses.gap_seqs, 1);

        let names = Names { plan: &sim.plan };
        let audited = AuditedMembers::of(&sim.track_refs(), 1);
        let mut counts = FindingCounts::default();
        let found = missing_findings(&losses, &sim.records, &audited, &names, &mut counts);
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].detail, "1 of 3 expected members never got it");
        assert_eq!((counts.missing_messages, counts.missing_deliveries), (2, 2));
        let gap = gap_findings(&losses, &sim.records, &sends, &names);
        assert_eq!(gap.len(), 1);
        assert_eq!((gap[0].seq, gap[0].id.as_deref()), (Some(2), Some(id_of(2).as_str())));
        assert_eq!(gap[0].detail, "1 members got a later seq but never seq 2");
    }

    #[test]
    fn only_members_joined_before_the_send_expect_it() {
        let mut sim = Sim::new(3, 3);
        sim.tracks[1] = Track::new(0, 1);
        sim.tracks[1].joined(1, 1_100, false); // at the very instant send 1 was written
        sim.tracks[2].disconnected(); // not audited
        let audited = AuditedMembers::of(&sim.track_refs(), 1);
        assert_eq!(audited.members, 2);
        let expecting: Vec<u64> = (0..3).map(|i| audited.expecting(sim.records.get(i).unwrap())).collect();
        assert_eq!(expecting, vec![1, 1, 2], "a join at the instant of the send does not expect it");
        assert_eq!(audited.expected_deliveries(&sim.records), 4);
    }

    #[test]
    fn a_member_misses_only_sends_written_after_its_join() {
        // Send 2 (seq 3) is written at t = 2100; nobody but client 0 ever gets it.
        let lost_by = |joined_at: u64| {
            let mut sim = Sim::new(2, 3);
            sim.tracks[1] = Track::new(0, 1);
            sim.tracks[1].joined(2, joined_at, false);
            sim.run(&[(0, vec![1, 2, 3])]);
            let losses = Losses::find(&sim.records, &sim.track_refs(), &SendTally::of(&sim.records, 1));
            losses.missing.iter().map(|(&i, a)| (i, a.clients.clone())).collect::<Vec<_>>()
        };
        assert_eq!(lost_by(2_099), vec![(2, vec![1])]);
        assert_eq!(lost_by(2_100), vec![], "joined at the instant of the send: not expected");
    }

    #[test]
    fn duplicates_and_reorders_become_one_finding_per_seq_with_exact_counts() {
        let mut sim = Sim::new(3, 4);
        sim.run(&[(0, vec![1, 2, 2, 3, 4]), (1, vec![1, 2, 2, 3, 4]), (2, vec![1, 3, 2, 4])]);
        let names = Names { plan: &sim.plan };
        let mut counts = FindingCounts::default();
        let sends = SendTally::of(&sim.records, 1);
        let found = event_findings(&sim.track_refs(), &sends, &names, &mut counts);
        assert_eq!((counts.duplicate_deliveries, counts.reordered_deliveries), (2, 1));
        let summary: Vec<_> = found.iter().map(|f| (f.kind, f.seq, f.count, f.recipients.clone())).collect();
        assert_eq!(
            summary,
            vec![
                (FindingKind::Duplicate, Some(2), 2, vec!["t-u0".to_string(), "t-u1".to_string()]),
                (FindingKind::Reordered, Some(2), 1, vec!["t-u2".to_string()]),
            ]
        );
        assert_eq!(found[0].detail, "delivered again to 2 members");
        assert_eq!(found[1].detail, "1 members got it after a higher seq (first seen after seq 3)");
        assert_eq!(found[1].client_msg_id.as_deref(), Some("t.1"));
        assert_eq!(found[1].trace_id.as_deref(), Some(trace_of(2).as_str()));
    }

    #[test]
    fn a_clean_run_has_no_events_and_no_unanswered_sends() {
        let mut sim = Sim::new(2, 3);
        let log = sim.clean_log(3);
        sim.run(&log);
        let names = Names { plan: &sim.plan };
        let mut counts = FindingCounts::default();
        let sends = SendTally::of(&sim.records, 1);
        assert!(event_findings(&sim.track_refs(), &sends, &names, &mut counts).is_empty());
        assert!(unanswered_sends(&sim.records, &names, &mut counts).is_empty());
        assert!(stored_twice_findings(&sim.records, &names, &mut counts).is_empty());
        assert_eq!(counts, FindingCounts::default());
    }

    #[test]
    fn findings_are_ordered_and_capped_per_kind() {
        let f = |kind, room: &str, seq| Finding {
            kind,
            room: room.into(),
            seq,
            id: None,
            trace_id: None,
            client_msg_id: None,
            count: 1,
            recipients: Vec::new(),
            detail: String::new(),
        };
        let all = vec![
            f(FindingKind::Gap, "r0", Some(3)),
            f(FindingKind::Missing, "r1", Some(1)),
            f(FindingKind::Missing, "r0", Some(9)),
            f(FindingKind::Missing, "r0", Some(2)),
        ];
        let (kept, truncated) = order_and_cap(all.clone(), 2);
        let order: Vec<_> = kept.iter().map(|f| (f.kind, f.room.as_str(), f.seq)).collect();
        assert_eq!(
            order,
            vec![
                (FindingKind::Missing, "r0", Some(2)),
                (FindingKind::Missing, "r0", Some(9)),
                (FindingKind::Gap, "r0", Some(3))
            ]
        );
        assert!(truncated);
        assert_eq!(order_and_cap(all, 3).0.len(), 4);
    }

    #[test]
    fn the_verdict_line_lists_every_failing_count_in_a_fixed_order() {
        let clean = FindingCounts::default();
        assert_eq!(
            verdict_line(&clean, 4, 4, 8, 2),
            (true, "PASSED: 8 expected deliveries of 4 acked messages to 2 members all arrived once, in order".into())
        );
        assert!(verdict_line(&clean, 0, 0, 0, 0).0, "nothing scheduled is a pass");
        assert_eq!(
            verdict_line(&clean, 4, 0, 0, 2),
            (false, "FAILED: no message was acked, so nothing could be checked".into())
        );
        let rejected_only = FindingCounts { rejected: 3, ..FindingCounts::default() };
        assert!(verdict_line(&rejected_only, 4, 1, 2, 2).0, "a rejection is not a failure");
        let all = FindingCounts {
            missing_messages: 1,
            missing_deliveries: 5,
            duplicate_deliveries: 2,
            reordered_deliveries: 3,
            gap_seqs: 4,
            unacked: 5,
            stored_twice: 6,
            refused_but_delivered: 8,
            rejected: 7,
            unknown_then_stored: 11,
            chain_altered: 9,
            equivocations: 10,
        };
        assert_eq!(
            verdict_line(&all, 10, 10, 10, 1).1,
            "FAILED: 1 missing message(s), 2 duplicate delivery(ies), 3 reordered delivery(ies), 4 seq gap(s), \
             5 unacked send(s), 6 send(s) stored twice, 8 send(s) refused but delivered, \
             9 altered message(s) (chain digest mismatch), 10 equivocation(s) (two versions of a seq)"
        );
    }
}
