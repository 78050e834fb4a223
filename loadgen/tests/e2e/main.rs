//! End-to-end tests of loadgen against the real all-in-one chat server, started in-process on a
//! free port. Faults are planted through the server's `POST /admin/faults` switch at the
//! `gateway.deliver` hop; loadgen must name exactly the message ids the server's journal says
//! were faulted, and a clean run must report zero findings.
//!
//! One test binary (modules below) keeps link time down.

// The helpers in `support` fail a test by panicking; clippy.toml's test allowance covers only `#[test]` fns.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod capacity;
mod centrifugo;
mod compare;
mod replay;
mod support;

use std::time::Duration;

use loadgen::config::ReconnectPlan;
use loadgen::{FindingKind, Report};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_run_reports_zero_and_writes_reports() {
    let server = server(None).await;
    let report = run(config(&server, "clean")).await;
    assert!(report.passed, "{}", report.summary());
    assert!(report.audit.findings.is_empty(), "{:?}", report.audit.findings);
    let a = &report.audit;
    assert_eq!(a.members_audited, 12);
    assert_eq!(a.acked, a.scheduled, "every send acked");
    assert!(a.expected_deliveries >= a.acked * 5, "rooms of 6: {a:?}");
    assert_eq!(a.delivered, a.expected_deliveries);
    assert_eq!(report.throughput.delivered, report.throughput.frames_checked);
    for name in ["connect", "join", "send_to_ack", "send_to_delivery", "history"] {
        assert!(report.latency_ms[name].count > 0, "{name} measured");
    }
    assert_eq!(report.exit_code(), 0);

    let dir = tempdir();
    let (json, html) = (dir.path().join("out.json"), dir.path().join("out.html"));
    report.write_json(&json).unwrap();
    report.write_html(&html).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(parsed["passed"], true);
    assert_eq!(parsed["audit"]["counts"]["missing_messages"], 0);
    assert!(parsed["timeline"].as_array().is_some_and(|t| !t.is_empty()));
    let page = std::fs::read_to_string(&html).unwrap();
    assert_eq!(page.matches("<svg").count(), 3, "three plots");
    assert!(!page.contains("<script"));
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_deliveries_are_named_by_id() {
    let server = server(None).await;
    plant(&server, "drop", "drop-r0", 3).await;
    let report = run(config(&server, "drop")).await;
    assert!(!report.passed);
    assert_eq!(report.exit_code(), 1);
    let c = &report.audit.counts;
    assert_eq!(c.missing_deliveries, 3, "{}", report.summary());
    assert_eq!((c.duplicate_deliveries, c.reordered_deliveries, c.unacked), (0, 0, 0));
    let missing = findings(&report, FindingKind::Missing);
    assert_eq!(missing.iter().map(|f| f.count).sum::<u64>(), 3);
    for f in &missing {
        assert_eq!(f.room, "drop-r0");
        assert_faulted(&server, f.id.as_deref().unwrap(), "drop", f.seq.unwrap()).await;
        assert!(f.trace_id.as_deref().is_some_and(|t| t.len() == 32), "trace id named: {f:?}");
        assert!(!f.recipients.is_empty());
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicated_delivery_is_named_by_id() {
    let server = server(None).await;
    plant(&server, "duplicate", "dup-r1", 1).await;
    let report = run(config(&server, "dup")).await;
    assert!(!report.passed);
    let c = &report.audit.counts;
    assert_eq!(c.duplicate_deliveries, 1, "{}", report.summary());
    assert_eq!((c.missing_messages, c.reordered_deliveries, c.gap_seqs), (0, 0, 0));
    let dups = findings(&report, FindingKind::Duplicate);
    assert_eq!(dups.len(), 1);
    assert_eq!(dups[0].room, "dup-r1");
    assert_faulted(&server, dups[0].id.as_deref().unwrap(), "duplicate", dups[0].seq.unwrap()).await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reordered_delivery_is_named_by_id() {
    let server = server(None).await;
    plant(&server, "reorder", "reo-r0", 1).await;
    let report = run(config(&server, "reo")).await;
    assert!(!report.passed);
    let c = &report.audit.counts;
    assert_eq!(c.reordered_deliveries, 1, "{}", report.summary());
    assert_eq!((c.missing_messages, c.duplicate_deliveries, c.gap_seqs), (0, 0, 0));
    let re = findings(&report, FindingKind::Reordered);
    assert_eq!(re.len(), 1);
    assert_faulted(&server, re[0].id.as_deref().unwrap(), "reorder", re[0].seq.unwrap()).await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_storm_resumes_with_since_and_misses_nothing() {
    let server = server(None).await;
    let mut cfg = config(&server, "storm");
    cfg.phases[0].duration = Duration::from_secs(3);
    cfg.reconnect = Some(ReconnectPlan {
        at: Duration::from_millis(500),
        every: Some(Duration::from_millis(800)),
        fraction: 0.5,
        spread: Duration::from_millis(200),
        resume: true,
    });
    let report = run(cfg).await;
    assert!(report.passed, "{}", report.summary());
    assert!(report.clients.reconnects >= 12, "three storms of 6: {:?}", report.clients);
    assert_eq!(report.clients.reconnects_by_cause.get("scenario_drop"), Some(&report.clients.reconnects));
    assert_eq!(report.audit.members_audited, 12, "every resumed member audited");
    assert!(report.latency_ms["reconnect"].count >= 12);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_source_addresses() {
    let server = server(Some("jwt-secret")).await;
    let mut cfg = config(&server, "auth");
    cfg.token_secret = Some("jwt-secret".into());
    cfg.source_ips = loadgen::config::parse_source_ips("127.0.0.1-127.0.0.3").unwrap();
    let report = run(cfg.clone()).await;
    assert!(report.passed, "{}", report.summary());

    cfg.token_secret = Some("wrong".into());
    cfg.prefix = "auth2".into();
    cfg.connect_timeout = Duration::from_secs(2);
    let err = loadgen::run(cfg).await.unwrap_err();
    assert!(err.to_string().contains("unauthorized"), "{err}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_exit_codes() {
    let server = server(None).await;
    let dir = tempdir();
    let json = dir.path().join("r.json");
    let args = |prefix: &str| {
        vec![
            "--url".to_string(),
            server.ws_url.clone(),
            "--clients".into(),
            "6".into(),
            "--rooms".into(),
            "1".into(),
            "--rate".into(),
            "20".into(),
            "--duration".into(),
            "1s".into(),
            "--ramp".into(),
            "0".into(),
            "--prefix".into(),
            prefix.into(),
            "--progress".into(),
            "never".into(),
            "--report".into(),
            json.display().to_string(),
        ]
    };
    assert_eq!(loadgen_bin(args("bin1")).await, 0);
    let parsed: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(parsed["passed"], true);
    plant(&server, "drop", "bin2-r0", 1).await;
    assert_eq!(loadgen_bin(args("bin2")).await, 1);
    assert_eq!(loadgen_bin(vec!["--clients".into(), "0".into()]).await, 64);
    let dead = vec!["--url".to_string(), "ws://127.0.0.1:1/ws".into(), "--connect-timeout".into(), "1s".into()];
    assert_eq!(loadgen_bin(dead).await, 2);
    server.shutdown().await.unwrap();
}

fn findings(report: &Report, kind: FindingKind) -> Vec<&loadgen::Finding> {
    report.audit.findings.iter().filter(|f| f.kind == kind).collect()
}
