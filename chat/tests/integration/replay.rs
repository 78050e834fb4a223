//! `chat fanout --decision-log` and `chat replay worker`: a worker of a real cluster (its own
//! nats-server, the shared Cassandra node) stalled past its ack wait gets a send redelivered;
//! its decision log replays to identical decisions (exit 0), an edited store answer replays to
//! a divergence naming the decision (exit 1), and a log cut short is refused (exit 2).

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testkit::Cluster;

use crate::support::*;

const TOKEN: &str = "replay-admin-token-0123";

/// Runs `chat replay worker LOG`; its exit status and stdout and stderr.
async fn replay_worker(log: &Path) -> (i32, String) {
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_chat")).args(["replay", "worker"]).arg(log).output(),
    )
    .await
    .expect("the replay ends")
    .expect("run chat replay worker");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.code().expect("an exit status"), text)
}

/// The log's records once `ready` holds for them (the writer flushes whenever it is idle).
async fn records_when(path: &Path, ready: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let records: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        if ready(&records) {
            return records;
        }
        assert!(Instant::now() < deadline, "the log never got there:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_stalled_workers_decision_log_replays_identically_and_an_edit_diverges() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("fanout-1.jsonl");
    let mut lab = Cluster::builder(env!("CARGO_BIN_EXE_chat"))
        .gateways(1)
        .workers(1)
        .admin_token(TOKEN)
        .keyspace_prefix("replay")
        .worker_arg("--decision-log")
        .worker_arg(log.to_str().unwrap())
        .worker_arg("--ack-wait-ms")
        .worker_arg("1000")
        .start()
        .await;
    // The worker holds its first batch 1.5 s: JetStream redelivers it after 1 s.
    let fault =
        json!({"hop": "fanout.sequence", "action": "stall", "probability": 1, "seed": 7, "delay_ms": 1500, "count": 1});
    arm_fault(&lab.worker_url(0), TOKEN, &fault).await;

    let mut alice = Client::connect(&lab.gateway_ws(0)).await;
    alice.send(json!({"type": "hello", "user": "alice"})).await;
    alice.expect("welcome").await;
    alice.join("replay").await;
    let slow = alice.say("replay", "m0", "held by the stall").await;
    assert_eq!(slow["seq"], 1, "{slow}");
    alice.say("replay", "m1", "one").await;
    // The client sends m1 again: answered from the store.
    let again = alice.say("replay", "m1", "one").await;
    assert_eq!(again["seq"], 2, "{again}");

    // The redelivered copy of m0 is taken after the stall and found stored.
    records_when(&log, |records| {
        let redelivered = records.iter().any(|r| {
            r["event"] == "batch"
                && r["sends"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|s| s["client_msg_id"] == "m0" && s["delivery"].as_u64() >= Some(2))
        });
        let found = records
            .iter()
            .any(|r| r["event"] == "decision" && r["client_msg_id"] == "m0" && r["decision"]["kind"] == "duplicate");
        redelivered && found
    })
    .await;
    assert!(lab.terminate_worker(0, Duration::from_secs(15)).await, "the worker stops on SIGTERM");

    // The log as the worker left it replays to the same decisions.
    let (status, out) = replay_worker(&log).await;
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("redelivered"), "{out}");
    assert!(out.contains("room replay alice/m0: duplicate of seq 1"), "{out}");
    assert!(out.contains("room replay alice/m0: new seq 1"), "{out}");
    assert!(out.contains("identical: "), "{out}");
    // The only worker took every partition before its first batch.
    assert!(out.contains("partitions taken: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15\nbatch 1:"), "{out}");
    eprintln!("{out}");

    // Say the store had answered the first last_seq with 5: the first new message diverges.
    let text = std::fs::read_to_string(&log).unwrap();
    let mut edited = false;
    let lines: Vec<String> = text
        .lines()
        .map(|line| {
            let mut record: Value = serde_json::from_str(line).unwrap();
            if !edited && record["event"] == "store" && record["call"]["op"] == "last_seq" {
                assert_eq!(record["answer"], json!({"last_seq": 0}), "{line}");
                record["answer"] = json!({"last_seq": 5});
                edited = true;
            }
            record.to_string()
        })
        .collect();
    assert!(edited, "{text}");
    let changed = dir.path().join("edited.jsonl");
    std::fs::write(&changed, lines.join("\n")).unwrap();
    let (status, out) = replay_worker(&changed).await;
    assert_eq!(status, 1, "{out}");
    assert!(out.contains("DIVERGED at batch 1, room replay, client_msg_id m0"), "{out}");
    assert!(out.contains("logged:   room replay alice/m0: new seq 1"), "{out}");
    assert!(out.contains("replayed: room replay alice/m0: new seq 6"), "{out}");

    // A log without its end record (a worker killed mid-run) is refused.
    let cut = dir.path().join("cut.jsonl");
    std::fs::write(&cut, text.lines().take(text.lines().count() - 1).collect::<Vec<_>>().join("\n")).unwrap();
    let (status, out) = replay_worker(&cut).await;
    assert_eq!(status, 2, "{out}");
    assert!(out.contains("log incomplete"), "{out}");
}
