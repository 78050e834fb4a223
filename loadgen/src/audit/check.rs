//! The hot path: one `message` frame at one recipient. Classifies the delivery on the
//! recipient's [`Track`], writes down a duplicate or reorder, and updates the shared record of
//! the send it came from (first id, trace id and seq seen; a second, different message for the
//! same send is an anomaly).

use super::findings::FindingKind;
use super::ids::{fmt_id, parse_id, parse_trace};
use super::records::{MsgRecord, Records, Seen};
use super::track::{Delivery, Track};

/// Checks a `message` frame at one recipient and updates the shared record of the send it
/// came from (when it is one of this run's). Returns the delivery kind and, for a first
/// delivery of one of this run's messages, its end-to-end latency from the scheduled instant.
pub fn check_delivery(
    track: &mut Track,
    records: &Records,
    send: Option<u32>,
    seq: u64,
    id: &str,
    trace_id: &str,
    now_us: u64,
) -> (Delivery, Option<u64>) {
    let outcome = track.deliver(seq);
    match outcome {
        Delivery::Duplicate => track.note(FindingKind::Duplicate, seq, parse_id(id), parse_trace(trace_id)),
        Delivery::Reordered => track.note(FindingKind::Reordered, seq, parse_id(id), parse_trace(trace_id)),
        _ => {}
    }
    let mut latency = None;
    if let Some(i) = send {
        if let Some(rec) = records.get(i) {
            if outcome.is_first() {
                latency = Some(now_us.saturating_sub(records.scheduled_at(rec)));
            }
            note_seen(records, i, rec, outcome, seq, id, trace_id);
        }
    }
    (outcome, latency)
}

/// Keeps the first id, trace id and seq send `i` was delivered with; a first delivery of it as
/// another seq with another id means it was stored twice.
fn note_seen(records: &Records, i: u32, rec: &MsgRecord, outcome: Delivery, seq: u64, id: &str, trace_id: &str) {
    match rec.seen.get() {
        None => {
            let _ = rec.seen.set(Seen { id: parse_id(id), trace: parse_trace(trace_id), seq });
        }
        Some(seen) if seen.seq != seq => {
            let parsed = parse_id(id);
            if seen.id != parsed && outcome.is_first() {
                records.anomaly(
                    i,
                    format!(
                        "delivered as seq {} id {} and as seq {seq} id {}",
                        seen.seq,
                        fmt_id(&seen.id),
                        fmt_id(&parsed)
                    ),
                    parsed,
                    seq,
                );
            }
        }
        Some(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::sim::{id_of, trace_of, Sim};

    #[test]
    fn first_deliveries_have_a_latency_and_faults_are_noted() {
        let mut sim = Sim::new(1, 3);
        // Send 1 was scheduled at 100 + 1000 on the run clock.
        let (d, lat) = check_delivery(&mut sim.tracks[0], &sim.records, Some(1), 2, &id_of(2), &trace_of(2), 5_000);
        assert_eq!((d, lat), (Delivery::AfterGap, Some(3_900)));
        let (d, lat) = check_delivery(&mut sim.tracks[0], &sim.records, Some(1), 2, &id_of(2), &trace_of(2), 6_000);
        assert_eq!((d, lat), (Delivery::Duplicate, None));
        let (d, _) = check_delivery(&mut sim.tracks[0], &sim.records, Some(0), 1, &id_of(1), &trace_of(1), 7_000);
        assert_eq!(d, Delivery::Reordered);
        let kinds: Vec<_> = sim.tracks[0].events().iter().map(|e| (e.kind, e.seq, e.last)).collect();
        assert_eq!(kinds, vec![(FindingKind::Duplicate, 2, 2), (FindingKind::Reordered, 1, 2)]);
        let seen = sim.records.get(1).and_then(MsgRecord::seen).copied();
        assert_eq!(seen, Some(Seen { id: parse_id(&id_of(2)), trace: parse_trace(&trace_of(2)), seq: 2 }));
        // A message that is not one of this run's is checked but has no record and no latency.
        let (d, lat) = check_delivery(&mut sim.tracks[0], &sim.records, None, 3, &id_of(3), "", 8_000);
        assert_eq!((d, lat), (Delivery::InOrder, None));
    }

    #[test]
    fn one_send_delivered_as_two_messages_is_an_anomaly() {
        let mut sim = Sim::new(1, 2);
        check_delivery(&mut sim.tracks[0], &sim.records, Some(0), 1, &id_of(1), &trace_of(1), 0);
        check_delivery(&mut sim.tracks[0], &sim.records, Some(0), 2, &id_of(9), &trace_of(9), 0);
        let list = sim.records.first_anomaly_per_send();
        assert_eq!(list.len(), 1);
        assert!(list[0].detail.starts_with("delivered as seq 1"), "{}", list[0].detail);
    }
}
