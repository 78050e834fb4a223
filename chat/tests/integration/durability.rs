//! An ack means durable: kill -9 of the process right after acks loses nothing, and the next
//! start continues the seq, on either of the binary's schedulers.

use std::process::Stdio;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::support::*;

/// How many runtime worker threads the process is started with: the default (one per core, the
/// work-stealing scheduler), or one (`TOKIO_WORKER_THREADS=1`: the current-thread scheduler).
#[derive(Clone, Copy)]
enum Workers {
    PerCore,
    One,
}

async fn start_process(data_dir: &std::path::Path, workers: Workers) -> (Child, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_chat"));
    command
        .args(["--listen", "127.0.0.1:0", "--send-rate", "100000", "--send-burst", "100000", "--data-dir"])
        .arg(data_dir)
        .env("RUST_LOG", "warn");
    match workers {
        Workers::PerCore => command.env_remove("TOKIO_WORKER_THREADS"),
        Workers::One => command.env("TOKIO_WORKER_THREADS", "1"),
    };
    let mut child = command.stdout(Stdio::piped()).kill_on_drop(true).spawn().expect("chat binary starts");
    let stdout = child.stdout.take().expect("stdout piped");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("ready line in time")
        .expect("read")
        .expect("a line");
    let address = line.strip_prefix("chat listening on http://").expect("ready line format").to_owned();
    (child, address)
}

#[tokio::test]
async fn kill_9_right_after_acks_loses_nothing_and_seq_continues() {
    kill_9_right_after_acks_loses_nothing(Workers::PerCore).await;
}

#[tokio::test]
async fn on_one_worker_thread_kill_9_right_after_acks_loses_nothing_either() {
    kill_9_right_after_acks_loses_nothing(Workers::One).await;
}

async fn kill_9_right_after_acks_loses_nothing(workers: Workers) {
    let data = tempfile::tempdir().unwrap();
    let (mut child, address) = start_process(data.path(), workers).await;
    let mut a = Client::login(&format!("ws://{address}/ws"), "a").await;
    a.join("d").await;
    for i in 1..=200 {
        a.send(json!({"type": "send", "room": "d", "client_msg_id": format!("{i}"), "body": format!("{i}")})).await;
    }
    let mut acked = Vec::new();
    while acked.len() < 200 {
        let frame = a.next().await;
        if frame["type"] == "ack" {
            acked.push((frame["seq"].as_u64().unwrap(), frame["id"].as_str().unwrap().to_owned()));
        }
    }
    child.start_kill().expect("SIGKILL");
    child.wait().await.unwrap();

    let (_child, address) = start_process(data.path(), workers).await;
    let mut stored = Vec::new();
    let mut after = 0;
    loop {
        let (status, page) = get_json(&format!("http://{address}/api/rooms/d/messages?after={after}&limit=200")).await;
        assert_eq!(status, 200);
        let messages = page["messages"].as_array().unwrap();
        for m in messages {
            stored.push((m["seq"].as_u64().unwrap(), m["id"].as_str().unwrap().to_owned()));
        }
        after = stored.last().map(|(s, _)| *s).unwrap_or(0);
        if !page["has_more"].as_bool().unwrap() {
            break;
        }
    }
    acked.sort();
    assert_eq!(stored, acked);
    let mut b = Client::login(&format!("ws://{address}/ws"), "b").await;
    assert_eq!(b.join("d").await["last_seq"], 200);
    assert_eq!(b.say("d", "next", "after restart").await["seq"], 201);
    // A resend of an acked message after the crash is still deduplicated.
    let mut a = Client::login(&format!("ws://{address}/ws"), "a").await;
    a.join("d").await;
    let again = a.say("d", "7", "7").await;
    assert_eq!(again["id"].as_str(), Some(acked[6].1.as_str()));
}
