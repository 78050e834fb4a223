//! `loadgen --replay`: a run recorded by the gateway (`--record DIR`) is re-driven against a
//! fresh server by the `loadgen` binary; the replay must send what was recorded, from the same
//! users to the same rooms, and its audit must come out like the original's.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use chat::testing::{start_all_in_one, RunningServer, TestServerOptions};
use gateway::recorder::RecordConfig;
use gateway::GatewayConfig;
use loadgen::replay::Recording;
use loadgen::schedule::Phase;
use loadgen::Config;

use crate::support::*;

/// An all-in-one server with the admin API, recording to `record` when given.
async fn recording_server(record: Option<&Path>) -> RunningServer {
    let gateway = GatewayConfig {
        admin_token: Some(ADMIN.into()),
        record: record.map(|dir| RecordConfig {
            dir: dir.to_path_buf(),
            enabled: true,
            bodies: false,
            max_file_bytes: 64 << 20,
            max_total_bytes: 1 << 30,
        }),
        ..GatewayConfig::default()
    };
    tokio::time::timeout(LIMIT, start_all_in_one(TestServerOptions { data_dir: None, gateway }))
        .await
        .expect("server start timed out")
        .expect("server started")
}

/// The recording once it holds `sends` sends (the writer flushes within 200 ms of the
/// connections closing).
async fn recording(dir: &Path, sends: usize) -> Recording {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match Recording::load(dir) {
            Ok(r) if r.sends.len() >= sends => return r,
            other if tokio::time::Instant::now() > deadline => {
                panic!("recording in {} never held {sends} sends: {:?}", dir.display(), other.map(|r| r.sends.len()))
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Users, rooms and the send count of a recording.
fn shape(r: &Recording) -> (BTreeSet<String>, BTreeSet<String>, usize) {
    (r.users.iter().cloned().collect(), r.rooms.iter().cloned().collect(), r.sends.len())
}

/// Findings of a report by (kind, room), with the deliveries or seqs each kind counts summed.
/// How a fault's drops group into messages is not part of it: four drops may hit one message's
/// deliveries or two messages' when two sends to the room fan out together.
fn findings_of(report: &serde_json::Value) -> BTreeMap<(String, String), u64> {
    let mut out = BTreeMap::new();
    for f in report["audit"]["findings"].as_array().cloned().unwrap_or_default() {
        let key = (f["kind"].as_str().unwrap_or("?").to_string(), f["room"].as_str().unwrap_or("?").to_string());
        *out.entry(key).or_default() += f["count"].as_u64().unwrap_or(0);
    }
    out
}

/// The audit counts that do not depend on how drops group into messages.
fn deliveries_of(report: &serde_json::Value) -> Vec<u64> {
    let c = &report["audit"]["counts"];
    ["missing_deliveries", "duplicate_deliveries", "reordered_deliveries", "gap_seqs", "unacked", "rejected"]
        .iter()
        .map(|k| c[*k].as_u64().unwrap_or(u64::MAX))
        .collect()
}

/// Records a 20-client run (planting `fault` in its room first when given), replays it at
/// twice the pace against a fresh server (with the same fault), and checks both.
async fn record_and_replay(prefix: &str, fault: Option<(&str, u64)>) -> (serde_json::Value, serde_json::Value) {
    let (rec, rec2, out) = (tempdir(), tempdir(), tempdir());

    // === the original run, recorded ===
    let server = recording_server(Some(rec.path())).await;
    if let Some((room, count)) = fault {
        plant(&server, "drop", room, count).await;
    }
    let original = run(Config {
        urls: vec![server.ws_url.clone()],
        clients: 20,
        rooms: 4,
        rooms_per_client: 1,
        phases: vec![Phase { duration: Duration::from_secs(4), rate: 50.0 }],
        ramp: 0.0,
        history_rate: 1.0,
        seed: 11,
        prefix: prefix.into(),
        journeys: 0,
        ..Config::default()
    })
    .await;
    server.shutdown().await.unwrap();
    let recorded = recording(rec.path(), original.throughput.sent as usize).await;
    let original = serde_json::to_value(&original).unwrap();

    // === the replay, against a fresh server (itself recorded, to compare who sent what) ===
    let server = recording_server(Some(rec2.path())).await;
    if let Some((room, count)) = fault {
        plant(&server, "drop", room, count).await;
    }
    let json = out.path().join("replay.json");
    let args = [
        "--url",
        &server.ws_url,
        "--replay",
        &rec.path().display().to_string(),
        "--replay-speed",
        "2",
        "--journeys",
        "0",
        "--progress",
        "never",
        "--report",
        &json.display().to_string(),
    ];
    let (code, stdout) = loadgen_bin_output(args.iter().map(ToString::to_string).collect()).await;
    eprintln!("{stdout}");
    assert_eq!(code, if fault.is_some() { 1 } else { 0 }, "replay exit code");
    server.shutdown().await.unwrap();
    let replay: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let replayed = recording(rec2.path(), replay["throughput"]["sent"].as_u64().unwrap() as usize).await;

    // Same connections, users, rooms; sends within 1 %.
    let (sent_a, sent_b) =
        (original["throughput"]["sent"].as_u64().unwrap(), replay["throughput"]["sent"].as_u64().unwrap());
    eprintln!(
        "original: sent {sent_a}, recorded {} sends of {} connections; replay: sent {sent_b}, acked {}, delivered {}",
        recorded.sends.len(),
        recorded.users.len(),
        replay["throughput"]["acked"],
        replay["throughput"]["delivered"],
    );
    assert!(sent_a > 150, "the original run sent {sent_a}");
    assert!(sent_a.abs_diff(sent_b) * 100 <= sent_a, "replay sent {sent_b}, original {sent_a}");
    assert_eq!(replay["clients"]["requested"], 20);
    assert_eq!(replay["rooms"]["rooms"], 4);
    let (users_a, rooms_a, _) = shape(&recorded);
    let (users_b, rooms_b, sends_b) = shape(&replayed);
    assert_eq!(users_a, (0..20).map(|i| format!("{prefix}-u{i}")).collect::<BTreeSet<_>>());
    assert_eq!(rooms_a, (0..4).map(|i| format!("{prefix}-r{i}")).collect::<BTreeSet<_>>());
    assert_eq!((users_b, rooms_b), (users_a, rooms_a), "the replay's own recording names the same users and rooms");
    assert_eq!(sends_b as u64, sent_b);
    // The replay ran at twice the pace: its sends span about half the original's 4 s.
    let span_b = replayed.sends.last().unwrap().at_us as f64 / 1e6;
    assert!((1.5..2.6).contains(&span_b), "replayed sends span {span_b} s");
    assert_eq!(replay["passed"], original["passed"]);
    (original, replay)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_re_drives_a_recorded_run() {
    let (original, replay) = record_and_replay("rec", None).await;
    assert_eq!(original["passed"], true, "{}", original["audit"]);
    assert!(findings_of(&original).is_empty() && findings_of(&replay).is_empty(), "{}", replay["audit"]);
    assert_eq!(replay["throughput"]["acked"], replay["throughput"]["sent"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_with_the_same_fault_finds_the_same() {
    let (original, replay) = record_and_replay("recf", Some(("recf-r1", 4))).await;
    let (a, b) = (findings_of(&original), findings_of(&replay));
    assert_eq!(original["audit"]["counts"]["missing_deliveries"], 4, "{}", original["audit"]);
    assert_eq!(a, b, "the same fault, the same findings (kind, room, deliveries)");
    assert_eq!(deliveries_of(&original), deliveries_of(&replay));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_refuses_conflicting_flags_and_empty_recordings() {
    let empty = tempdir();
    let dir = empty.path().display().to_string();
    let refuse = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_loadgen")).args(args).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = refuse(&["--replay", &dir, "--clients", "5", "--rate", "10"]);
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("--clients") && err.contains("--rate") && err.contains("cannot be used with --replay"),
        "{err}"
    );
    assert!(err.contains("is empty: no .jsonl files"), "{err}");
    let (code, err) = refuse(&["--replay", &format!("{dir}/missing")]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("cannot read recording"), "{err}");
    let (code, err) = refuse(&["--replay-speed", "2"]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("only means something with --replay"), "{err}");
}
