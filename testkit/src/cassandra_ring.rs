//! The three-node Cassandra ring shared by the multi-node tests (`deploy/cassandra/ring`, nodes
//! on 127.0.1.1-3), with nodes killed and restarted by the tests that need it.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::workspace_root;

/// The ring's directory, CQL port and storage port (apart from the single shared node's).
const RING_DIR: &str = "target/test-cassandra-ring";
const RING_CQL_PORT: &str = "9242";
const RING_STORAGE_PORT: &str = "7242";

/// When a ring node was last thawed (see [`FrozenRingNode`]).
static LAST_THAW: Mutex<Option<Instant>> = Mutex::new(None);

/// How long after a thaw the ring is left to settle before the next test uses it. A peer may
/// mark the thawed node down just after the thaw, before its first heartbeat arrives, and up
/// again about 1.5 s later (measured here); `deploy/cassandra/ring start` then waits for that up.
const SETTLE_AFTER_THAW: Duration = Duration::from_secs(2);

/// The shared ring's contact points (`127.0.1.1:9242,127.0.1.2:9242,127.0.1.3:9242`), starting
/// it on first use (idempotently: running nodes are kept, a killed one is started again) and
/// returning once every node sees every other up. `deploy/test-all` stops it at the end of the run.
pub fn cassandra_ring() -> String {
    let last_thaw = *LAST_THAW.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(thawed) = last_thaw {
        std::thread::sleep(SETTLE_AFTER_THAW.saturating_sub(thawed.elapsed()));
    }
    ring(&["start", "--nodes", "3", "--cql-port", RING_CQL_PORT, "--storage-port", RING_STORAGE_PORT])
}

fn ring(args: &[&str]) -> String {
    let dir = workspace_root().join(RING_DIR);
    let output = std::process::Command::new(workspace_root().join("deploy/cassandra/ring"))
        .args(&args[..1])
        .arg("--dir")
        .arg(&dir)
        .args(&args[1..])
        .stderr(Stdio::inherit())
        .output()
        .expect("run deploy/cassandra/ring");
    assert!(output.status.success(), "deploy/cassandra/ring {} --dir {} failed", args.join(" "), dir.display());
    String::from_utf8_lossy(&output.stdout).lines().last().unwrap_or_default().trim().to_owned()
}

fn pid_file(node: usize) -> PathBuf {
    workspace_root().join(RING_DIR).join(format!("node{node}/cassandra.pid"))
}

/// kill -9 of ring node `node` (1-based), as a crash would.
pub fn kill_ring_node(node: usize) {
    let pid = std::fs::read_to_string(pid_file(node)).expect("ring node pid file");
    let status = std::process::Command::new("kill").args(["-KILL", pid.trim()]).status().expect("run kill");
    assert!(status.success(), "kill -9 of ring node {node}");
}

/// Starts ring node `node` again (after [`kill_ring_node`]) and waits until it answers CQL and
/// it and its peers see each other up.
pub fn restart_ring_node(node: usize) {
    ring(&["node", "--node", &node.to_string()]);
}

/// A ring node frozen by [`freeze_ring_node`]; dropping it lets the node run again.
#[must_use = "the node is thawed when this is dropped"]
pub struct FrozenRingNode {
    pid: String,
}

/// Freezes ring node `node` (1-based) with SIGSTOP: its connections stay open and nothing is
/// answered, as a node stalled by a long pause would. Thawed (SIGCONT) when the guard drops,
/// so a failing test leaves the ring whole for the next.
pub fn freeze_ring_node(node: usize) -> FrozenRingNode {
    let pid = std::fs::read_to_string(pid_file(node)).expect("ring node pid file").trim().to_owned();
    let status = std::process::Command::new("kill").args(["-STOP", &pid]).status().expect("run kill");
    assert!(status.success(), "kill -STOP of ring node {node}");
    FrozenRingNode { pid }
}

impl Drop for FrozenRingNode {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").args(["-CONT", &self.pid]).status();
        *LAST_THAW.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Instant::now());
    }
}
