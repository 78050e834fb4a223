//! Real services for tests, started by the tests themselves:
//!
//! - [`NatsServer`]: a `nats-server` with JetStream on a dynamic port, one per test binary or
//!   test, killed on drop; restartable on the same port and store for outage tests.
//! - [`cassandra`]: the address of the one Cassandra node shared by the whole test run
//!   (`CHAT_TEST_CQL`, or started once through `deploy/cassandra/start`), and
//!   [`unique_keyspace`] so tests never share data.
//! - [`ChatProcess`]: a `chat` binary in a subprocess, for kill -9 tests.
//!
//! A missing binary or an unreachable service panics with what to install or start: tests that
//! need a service fail, they never skip.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long a service may take to come up before the test fails.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The workspace root (where `deploy/` lives).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("testkit lives in the workspace").to_owned()
}

// === nats-server ===

/// A running nats-server with JetStream, killed on drop.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    store: tempfile::TempDir,
}

fn nats_binary() -> String {
    let binary = std::env::var("CHAT_NATS_SERVER").unwrap_or_else(|_| "nats-server".into());
    let found = std::process::Command::new(&binary).arg("--version").output();
    if found.is_err() {
        panic!("`{binary}` not found: install it (`apt-get install nats-server`, or `go install github.com/nats-io/nats-server/v2@latest`) or set CHAT_NATS_SERVER");
    }
    binary
}

impl NatsServer {
    /// Starts a server on a free port.
    pub async fn start() -> NatsServer {
        let store = tempfile::Builder::new().prefix("chat-nats-").tempdir().expect("temp dir");
        let (child, port) = spawn_nats(None, store.path()).await;
        NatsServer { child: Some(child), port, store }
    }

    /// `nats://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL), keeping its port and JetStream store.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// Starts it again on the same port with the same store.
    pub async fn restart(&mut self) {
        self.kill().await;
        let (child, _) = spawn_nats(Some(self.port), self.store.path()).await;
        self.child = Some(child);
    }
}

async fn spawn_nats(port: Option<u16>, store: &Path) -> (Child, u16) {
    let port_arg = port.map_or("-1".to_owned(), |p| p.to_string());
    let mut child = Command::new(nats_binary())
        .args(["-a", "127.0.0.1", "-p", &port_arg, "-js", "-sd"])
        .arg(store)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn nats-server");
    let stderr = child.stderr.take().expect("stderr piped");
    let mut lines = BufReader::new(stderr).lines();
    let deadline = Instant::now() + START_TIMEOUT;
    let port = loop {
        let line = tokio::time::timeout_at(deadline.into(), lines.next_line())
            .await
            .expect("nats-server did not report its port in time")
            .expect("read nats-server log")
            .expect("nats-server exited before it was ready");
        if let Some(rest) = line.split("Listening for client connections on ").nth(1) {
            break rest.trim().rsplit(':').next().and_then(|p| p.parse().ok()).expect("port in log line");
        }
    };
    // Keep draining its log so the pipe never fills.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, port)
}

// === Cassandra ===

/// The shared test node's address: `CHAT_TEST_CQL`, or a node started (once, idempotently)
/// with `deploy/cassandra/start` in `target/test-cassandra` on port 9142.
pub fn cassandra() -> String {
    if let Ok(nodes) = std::env::var("CHAT_TEST_CQL") {
        return nodes;
    }
    let root = workspace_root();
    let dir = root.join("target/test-cassandra");
    let output = std::process::Command::new(root.join("deploy/cassandra/start"))
        .arg("--dir")
        .arg(&dir)
        .args(["--cql-port", "9142", "--storage-port", "7142"])
        .stderr(Stdio::inherit())
        .output()
        .expect("run deploy/cassandra/start");
    if !output.status.success() {
        panic!("the test Cassandra node did not start (deploy/cassandra/start --dir {}); set CHAT_TEST_CQL to use a running node", dir.display());
    }
    String::from_utf8_lossy(&output.stdout).lines().last().expect("start prints the address").trim().to_owned()
}

/// A keyspace name no other test uses.
pub fn unique_keyspace(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("{prefix}_{}_{}_{nanos}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

// === chat processes ===

/// A `chat` process, killed (SIGKILL) on drop.
pub struct ChatProcess {
    child: Child,
    /// The HTTP address it reported.
    pub addr: SocketAddr,
}

impl ChatProcess {
    /// Runs `binary args...` and waits for its `listening on http://ADDR` line.
    pub async fn start(binary: &Path, args: &[String], env: &[(&str, &str)]) -> ChatProcess {
        let mut command = Command::new(binary);
        command.args(args).stdout(Stdio::piped()).stderr(Stdio::inherit()).kill_on_drop(true);
        for (key, value) in env {
            command.env(key, value);
        }
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "warn");
        }
        let mut child = command.spawn().unwrap_or_else(|e| panic!("spawn {}: {e}", binary.display()));
        let stdout = child.stdout.take().expect("stdout piped");
        let mut lines = BufReader::new(stdout).lines();
        let addr = loop {
            let line = tokio::time::timeout(START_TIMEOUT, lines.next_line())
                .await
                .expect("chat did not report its address in time")
                .expect("read chat stdout")
                .expect("chat exited before it was ready");
            if let Some(rest) = line.split("listening on http://").nth(1) {
                break rest.trim().parse().expect("address in ready line");
            }
        };
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        ChatProcess { child, addr }
    }

    /// `http://ADDR`
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `ws://ADDR/ws`
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// kill -9 and wait for the process to be gone.
    pub async fn kill(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// SIGTERM and wait (bounded) for a clean exit; returns whether it exited in time.
    pub async fn terminate(mut self, within: Duration) -> bool {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        }
        tokio::time::timeout(within, self.child.wait()).await.is_ok()
    }
}
