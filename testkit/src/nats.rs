//! A real `nats-server` with JetStream on a dynamic port.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Instant;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::START_TIMEOUT;

/// A running nats-server with JetStream, killed on drop.
pub struct NatsServer {
    child: Option<Child>,
    host: std::net::IpAddr,
    port: u16,
    store: tempfile::TempDir,
    args: Vec<String>,
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
        Self::start_with(&[]).await
    }

    /// Starts a server on a free port with more command-line arguments (`--user`, `--pass`,
    /// `--auth`...). A restart keeps them.
    pub async fn start_with(args: &[&str]) -> NatsServer {
        Self::start_on([127, 0, 0, 1].into(), args).await
    }

    /// Starts a server listening on `host` (say, a [`Netns`](crate::Netns) link's host
    /// address, so processes inside the namespace reach it) on a free port.
    pub async fn start_on(host: std::net::IpAddr, args: &[&str]) -> NatsServer {
        let store = tempfile::Builder::new().prefix("chat-nats-").tempdir().expect("temp dir");
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let (child, port) = spawn_nats(host, None, store.path(), &args).await;
        NatsServer { child: Some(child), host, port, store, args }
    }

    /// `nats://HOST:PORT`
    pub fn url(&self) -> String {
        format!("nats://{}", self.addr())
    }

    /// The server's client address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.port)
    }

    /// Kills the server (SIGKILL), keeping its port and JetStream store.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// Sends `signal` (`-STOP` freezes it: connections stay open, nothing is answered; `-CONT`).
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().and_then(Child::id).expect("nats-server running");
        let status = std::process::Command::new("kill").args([signal, &pid.to_string()]).status().expect("run kill");
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// Starts it again on the same port with the same store.
    pub async fn restart(&mut self) {
        self.kill().await;
        let (child, _) = spawn_nats(self.host, Some(self.port), self.store.path(), &self.args).await;
        self.child = Some(child);
    }
}

async fn spawn_nats(host: std::net::IpAddr, port: Option<u16>, store: &Path, args: &[String]) -> (Child, u16) {
    let port_arg = port.map_or("-1".to_owned(), |p| p.to_string());
    let mut child = Command::new(nats_binary())
        .args(["-a", &host.to_string(), "-p", &port_arg, "-js", "-sd"])
        .arg(store)
        .args(args)
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
