//! The three-node Cassandra ring shared by the multi-node tests (`deploy/cassandra/ring`, nodes
//! on 127.0.1.1-3), with nodes killed and restarted by the tests that need it.

use std::path::PathBuf;
use std::process::Stdio;

use crate::workspace_root;

/// The ring's directory, CQL port and storage port (apart from the single shared node's).
const RING_DIR: &str = "target/test-cassandra-ring";
const RING_CQL_PORT: &str = "9242";
const RING_STORAGE_PORT: &str = "7242";

/// The shared ring's contact points (`127.0.1.1:9242,127.0.1.2:9242,127.0.1.3:9242`), starting
/// it on first use (idempotently: running nodes are kept, a killed one is started again).
/// `deploy/test-all` stops it at the end of the run.
pub fn cassandra_ring() -> String {
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

/// Starts ring node `node` again (after [`kill_ring_node`]) and waits until it answers CQL.
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
    }
}
