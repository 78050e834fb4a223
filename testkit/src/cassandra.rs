//! The Cassandra node shared by a test run, dedicated nodes for outage tests, unique keyspaces.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::workspace_root;

/// The shared test node's address: `CHAT_TEST_CQL`, or a node started (once, idempotently)
/// with `deploy/cassandra/start` in `target/test-cassandra` on port 9142.
pub fn cassandra() -> String {
    static NODE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NODE.get_or_init(|| {
        if let Ok(nodes) = std::env::var("CHAT_TEST_CQL") {
            return nodes;
        }
        start_cassandra(&workspace_root().join("target/test-cassandra"), 9142, 7142, &[])
    })
    .clone()
}

/// Starts (or finds running) a node in `dir` with `deploy/cassandra/start` and `more` of its
/// options; its address.
fn start_cassandra(dir: &Path, cql_port: u16, storage_port: u16, more: &[&str]) -> String {
    let root = workspace_root();
    let output = std::process::Command::new(root.join("deploy/cassandra/start"))
        .arg("--dir")
        .arg(dir)
        .args(["--cql-port", &cql_port.to_string(), "--storage-port", &storage_port.to_string(), "--heap", "512M"])
        .args(more)
        .stderr(Stdio::inherit())
        .output()
        .expect("run deploy/cassandra/start");
    if !output.status.success() {
        panic!("the test Cassandra node did not start (deploy/cassandra/start --dir {}); set CHAT_TEST_CQL to use a running node", dir.display());
    }
    String::from_utf8_lossy(&output.stdout).lines().last().expect("start prints the address").trim().to_owned()
}

/// A Cassandra node of one test's own, for outage tests that must not disturb the shared
/// node: it can be frozen (SIGSTOP) and thawed. Stopped on drop.
pub struct DedicatedCassandra {
    dir: PathBuf,
    /// `127.0.0.1:PORT`
    pub addr: String,
}

impl DedicatedCassandra {
    /// Starts a node in `target/<name>` on the given ports.
    pub fn start(name: &str, cql_port: u16, storage_port: u16) -> DedicatedCassandra {
        Self::start_with(name, cql_port, storage_port, &[])
    }

    /// Starts a node in `target/<name>` on the given ports with more options of
    /// `deploy/cassandra/start` (`--auth`, `--tls-dir DIR`...).
    pub fn start_with(name: &str, cql_port: u16, storage_port: u16, more: &[&str]) -> DedicatedCassandra {
        let dir = workspace_root().join("target").join(name);
        let addr = start_cassandra(&dir, cql_port, storage_port, more);
        DedicatedCassandra { dir, addr }
    }

    /// The node's directory (`target/<name>`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn signal(&self, signal: &str) {
        let pid = std::fs::read_to_string(self.dir.join("cassandra.pid")).expect("node pid file");
        let status = std::process::Command::new("kill").args([signal, pid.trim()]).status().expect("run kill");
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// Freezes the node: connections stay open, nothing is answered.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Lets a frozen node run again.
    pub fn thaw(&self) {
        self.signal("-CONT");
    }
}

impl Drop for DedicatedCassandra {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT"])
            .arg(std::fs::read_to_string(self.dir.join("cassandra.pid")).unwrap_or_default().trim())
            .status();
        let _ = std::process::Command::new(workspace_root().join("deploy/cassandra/stop"))
            .arg("--dir")
            .arg(&self.dir)
            .status();
    }
}

/// A keyspace name no other test uses.
pub fn unique_keyspace(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("{prefix}_{}_{}_{nanos}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}
