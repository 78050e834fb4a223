//! Real services for tests, started by the tests themselves:
//!
//! - [`NatsServer`]: a `nats-server` with JetStream on a dynamic port, one per test binary or
//!   test, killed on drop; restartable on the same port and store for outage tests.
//! - [`Prometheus`]: a real `prometheus` on a dynamic port scraping given targets every second,
//!   with PromQL queries for assertions, killed on drop; [`promtool`] to check rule files.
//! - [`cassandra`]: the address of the one Cassandra node shared by the whole test run
//!   (`CHAT_TEST_CQL`, or started once through `deploy/cassandra/start`), and
//!   [`unique_keyspace`] so tests never share data.
//! - [`ChatProcess`]: a `chat` binary in a subprocess, for kill -9 tests.
//! - [`Relay`]: a loopback TCP relay that a test cuts and restores, to partition one process
//!   from a service while everything else keeps talking to it.
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

    /// The server's client address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
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

// === Relay ===

/// A loopback TCP relay to a service. Point one process at [`addr`](Relay::addr) instead of
/// the service and [`cut`](Relay::cut) it off: every relayed connection is closed and new ones
/// are closed on arrival until [`restore`](Relay::restore). Stops on drop.
pub struct Relay {
    addr: SocketAddr,
    open: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Starts relaying a dynamic loopback port to `target`.
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind relay port");
        let addr = listener.local_addr().expect("relay address");
        let open = std::sync::Arc::new(tokio::sync::watch::Sender::new(true));
        let gate = open.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut closed = gate.subscribe();
                if !*closed.borrow_and_update() {
                    continue; // cut: the connection is dropped at once
                }
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = closed.wait_for(|open| !open) => {}
                    }
                });
            }
        });
        Relay { addr, open, accept }
    }

    /// The address to connect to instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every relayed connection and refuses new ones.
    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    /// Relays again.
    pub fn restore(&self) {
        self.open.send_replace(true);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

// === Prometheus ===

/// A running `prometheus` scraping chat processes every second, killed on drop.
///
/// Its config, TSDB and log live in a temp dir; the log is printed when it fails to start.
pub struct Prometheus {
    child: std::process::Child,
    port: u16,
    dir: tempfile::TempDir,
    http: reqwest::Client,
}

/// The `prometheus` binary (`CHAT_PROMETHEUS` or on the PATH); panics with how to install it.
fn prometheus_binary() -> String {
    let binary = std::env::var("CHAT_PROMETHEUS").unwrap_or_else(|_| "prometheus".into());
    if std::process::Command::new(&binary).arg("--version").output().is_err() {
        panic!("`{binary}` not found: install it (`apt-get install prometheus`) or set CHAT_PROMETHEUS");
    }
    binary
}

/// Runs `promtool ARGS...` (`CHAT_PROMTOOL` or on the PATH) and returns its output; panics with
/// how to install it when missing.
pub fn promtool(args: &[&str]) -> std::process::Output {
    let binary = std::env::var("CHAT_PROMTOOL").unwrap_or_else(|_| "promtool".into());
    std::process::Command::new(&binary).args(args).output().unwrap_or_else(|e| {
        panic!("`{binary}` could not run ({e}): install it (`apt-get install prometheus`, which ships promtool) or set CHAT_PROMTOOL")
    })
}

impl Prometheus {
    /// Starts Prometheus scraping `/metrics` of each `host:port` target (job `chat`) every second.
    pub async fn start(targets: &[String]) -> Prometheus {
        Self::start_with_rules(targets, &[]).await
    }

    /// As [`Prometheus::start`], also loading these rule files (evaluated every second).
    pub async fn start_with_rules(targets: &[String], rule_files: &[PathBuf]) -> Prometheus {
        let binary = prometheus_binary();
        let dir = tempfile::Builder::new().prefix("chat-prometheus-").tempdir().expect("temp dir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(&config, prometheus_config(targets, rule_files)).expect("write prometheus.yml");
        let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().expect("HTTP client");
        // The port is picked by binding :0 and letting go; another process may take it in
        // between, so a start that fails on the address is retried on a fresh port.
        let log_path = dir.path().join("prometheus.log");
        for _ in 0..3 {
            let port = free_port();
            let log = std::fs::File::create(&log_path).expect("create prometheus.log");
            let mut child = std::process::Command::new(&binary)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {binary}: {e}"));
            match wait_ready(&mut child, &http, port, &log_path).await {
                Ok(()) => return Prometheus { child, port, dir, http },
                Err(log) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    if !log.contains("address already in use") {
                        panic!("prometheus did not become ready; its log:\n{log}");
                    }
                }
            }
        }
        panic!("prometheus found no free port in three attempts");
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Evaluates an instant PromQL query now: each series of the resulting vector as its labels
    /// and value (a scalar result is one series without labels). Panics on a query error.
    pub async fn query(&self, promql: &str) -> Vec<(serde_json::Value, f64)> {
        let body = self.api("api/v1/query", &[("query", promql)]).await;
        let data = &body["data"];
        let sample = |s: &serde_json::Value| s.as_str().and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
        match data["resultType"].as_str() {
            Some("vector") => data["result"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|series| (series["metric"].clone(), sample(&series["value"][1])))
                .collect(),
            Some("scalar") => vec![(serde_json::Value::Null, sample(&data["result"][1]))],
            other => panic!("query {promql} returned {other:?}, not a vector or scalar: {body}"),
        }
    }

    /// The loaded rule groups (`/api/v1/rules`, its `data.groups`).
    pub async fn rule_groups(&self) -> Vec<serde_json::Value> {
        let body = self.api("api/v1/rules", &[]).await;
        body["data"]["groups"].as_array().cloned().unwrap_or_default()
    }

    /// Prometheus's own log so far (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    async fn api(&self, path: &str, params: &[(&str, &str)]) -> serde_json::Value {
        let url = format!("{}/{path}", self.url());
        let response = self.http.get(&url).query(params).send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let body: serde_json::Value =
            response.json().await.unwrap_or_else(|e| panic!("GET {url}: body is not JSON: {e}"));
        if body["status"] != "success" {
            panic!("GET {url} {params:?} failed: {body}");
        }
        body
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // Wait for the exit so the temp dir is not removed under a running TSDB.
        self.stop();
    }
}

/// Waits for Prometheus's `/-/ready`; on failure returns why, with its log.
async fn wait_ready(
    child: &mut std::process::Child,
    http: &reqwest::Client,
    port: u16,
    log: &Path,
) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    let ready = format!("http://127.0.0.1:{port}/-/ready");
    let log = || std::fs::read_to_string(log).unwrap_or_default();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("prometheus exited with {status}\n{}", log()));
        }
        if let Ok(response) = http.get(&ready).send().await {
            if response.status().is_success() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(format!("{ready} not ready after {START_TIMEOUT:?}\n{}", log()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn prometheus_config(targets: &[String], rule_files: &[PathBuf]) -> String {
    let quoted = |items: Vec<String>| items.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", ");
    let rules = quoted(rule_files.iter().map(|p| p.display().to_string()).collect());
    format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nrule_files: [{rules}]\nscrape_configs:\n  - job_name: chat\n    metrics_path: /metrics\n    static_configs:\n      - targets: [{}]\n",
        quoted(targets.to_vec())
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("bind 127.0.0.1:0").port()
}

// === Cassandra ===

/// The shared test node's address: `CHAT_TEST_CQL`, or a node started (once, idempotently)
/// with `deploy/cassandra/start` in `target/test-cassandra` on port 9142.
pub fn cassandra() -> String {
    static NODE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NODE.get_or_init(|| {
        if let Ok(nodes) = std::env::var("CHAT_TEST_CQL") {
            return nodes;
        }
        start_cassandra(&workspace_root().join("target/test-cassandra"), 9142, 7142)
    })
    .clone()
}

/// Starts (or finds running) a node in `dir` with `deploy/cassandra/start`; its address.
fn start_cassandra(dir: &Path, cql_port: u16, storage_port: u16) -> String {
    let root = workspace_root();
    let output = std::process::Command::new(root.join("deploy/cassandra/start"))
        .arg("--dir")
        .arg(dir)
        .args(["--cql-port", &cql_port.to_string(), "--storage-port", &storage_port.to_string(), "--heap", "512M"])
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
        let dir = workspace_root().join("target").join(name);
        let addr = start_cassandra(&dir, cql_port, storage_port);
        DedicatedCassandra { dir, addr }
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
