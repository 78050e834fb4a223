//! `--bench-audit N`: the auditor's CPU cost on its own, without sockets.
//!
//! Builds one room of 100 members, pre-encodes `N / 100` `message` frames exactly as a gateway
//! sends them, and feeds every frame to every member's [`ClientState::on_text`] — the same code
//! a live run uses for each delivery (JSON fast path, seq check, message chain check, record
//! update, latency histogram). The result is CPU seconds per delivery, scaled to cores per 100k deliveries/s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::{ChatMessage, ServerFrame};
use serde::Serialize;

use crate::audit::parse_id;
use crate::client::ClientState;
use crate::config::{BodySize, Config};
use crate::metrics::process_cpu_seconds;
use crate::runner::Shared;
use crate::schedule::Phase;

/// Members of the benchmark's room.
const MEMBERS: u32 = 100;

/// What the benchmark measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    /// Deliveries checked.
    pub deliveries: u64,
    /// CPU seconds used while checking (process-wide).
    pub cpu_seconds: f64,
    /// Wall seconds.
    pub wall_seconds: f64,
    /// Nanoseconds of CPU per delivery.
    pub ns_per_delivery: f64,
    /// Cores needed to check 100k deliveries per second.
    pub cores_per_100k_deliveries_per_s: f64,
    /// Findings (must be zero: the synthetic log is clean).
    pub findings: usize,
}

/// Runs the benchmark over about `deliveries` deliveries (at least one message).
pub fn bench_audit(deliveries: u64) -> BenchResult {
    let messages = (deliveries / MEMBERS as u64).max(1);
    let config = Config {
        clients: MEMBERS,
        rooms: 1,
        rooms_per_client: 1,
        phases: vec![Phase { duration: Duration::from_secs(1), rate: messages as f64 }],
        history_rate: 0.0,
        body: BodySize { min: 100, max: 100 },
        prefix: "bench".into(),
        ..Config::default()
    };
    let (shared, _) = Shared::prepare(config, Vec::new());
    let shared = Arc::new(shared);
    let records = &shared.records;
    let mut prev = protocol::chain::GENESIS.to_owned();
    let frames: Vec<String> = (0..records.len() as u32)
        .map(|i| {
            let seq = i as u64 + 1;
            let id = uuid::Uuid::from_u128(0x018f_0000_0000_7000_8000_0000_0000_0000 | seq as u128);
            records.mark_sent(i, 0);
            records.ack(i, parse_id(&id.to_string()), seq, 0);
            let mut message = ChatMessage {
                room: shared.plan.rooms[0].clone(),
                seq,
                id,
                user: shared.plan.user(0),
                body: "x".repeat(100),
                ts: protocol::now_ms(),
                client_msg_id: shared.plan.client_msg_id(i),
                trace_id: format!("{:032x}", seq * 7919),
                prev: None,
                digest: None,
            };
            protocol::chain::seal(&mut message, std::mem::take(&mut prev));
            prev = message.digest.clone().unwrap_or_default();
            ServerFrame::Message(message).to_json()
        })
        .collect();
    let mut clients: Vec<ClientState> = (0..MEMBERS).map(|c| ClientState::new(shared.clone(), c)).collect();
    for c in &mut clients {
        c.assume_joined(0);
    }
    let cpu0 = process_cpu_seconds().unwrap_or(0.0);
    let wall = Instant::now();
    for frame in &frames {
        for c in &mut clients {
            c.on_text(frame, None);
        }
    }
    let wall_seconds = wall.elapsed().as_secs_f64();
    let cpu_seconds = process_cpu_seconds().map_or(wall_seconds, |c| c - cpu0);
    let n = frames.len() as u64 * MEMBERS as u64;
    let tracks: Vec<&crate::audit::Track> = clients.iter().flat_map(|c| c.tracks()).collect();
    let audit = crate::audit::finalize(records, &tracks, &shared.plan, 0, 10);
    BenchResult {
        deliveries: n,
        cpu_seconds,
        wall_seconds,
        ns_per_delivery: cpu_seconds * 1e9 / n as f64,
        cores_per_100k_deliveries_per_s: cpu_seconds / (n as f64 / 100_000.0),
        findings: audit.findings.len(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn bench_checks_a_clean_log_without_findings() {
        let r = super::bench_audit(20_000);
        assert_eq!(r.deliveries, 20_000);
        assert_eq!(r.findings, 0);
        assert!(r.ns_per_delivery > 0.0);
    }
}
