//! `chat` processes: started, waited for, killed or terminated.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::START_TIMEOUT;

/// How long a process may take to answer `/readyz` with 200 once it listens (it connects to
/// NATS and the store first).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A `chat` process, killed (SIGKILL) on drop.
pub struct ChatProcess {
    child: Child,
    /// The HTTP address it reported.
    pub addr: SocketAddr,
}

impl ChatProcess {
    /// Runs `binary args...` and waits for its `listening on http://ADDR` line.
    pub async fn start(binary: &Path, args: &[String], env: &[(&str, &str)]) -> ChatProcess {
        Self::start_in(None, binary, args, env).await
    }

    /// [`start`](ChatProcess::start), inside network namespace `netns` when given (`ip netns
    /// exec` execs the binary in place, so killing the child kills `chat`).
    pub async fn start_in(netns: Option<&str>, binary: &Path, args: &[String], env: &[(&str, &str)]) -> ChatProcess {
        let mut command = match netns {
            Some(netns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns]).arg(binary);
                command
            }
            None => Command::new(binary),
        };
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

    /// Waits until its `/readyz` answers 200 (see [`wait_ready`]).
    pub async fn wait_ready(&self) {
        wait_ready(&self.http_url()).await;
    }

    /// kill -9 and wait for the process to be gone.
    pub async fn kill(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// Sends `signal` (`-STOP`, `-CONT`, ...) to the process.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("process still running");
        let status = std::process::Command::new("kill").args([signal, &pid.to_string()]).status().expect("run kill");
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// SIGTERM and wait (bounded) for a clean exit; returns whether it exited in time.
    pub async fn terminate(mut self, within: Duration) -> bool {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        }
        tokio::time::timeout(within, self.child.wait()).await.is_ok()
    }
}

/// Polls `BASE/readyz` until it answers 200; panics after [`READY_TIMEOUT`].
pub async fn wait_ready(base: &str) {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().expect("HTTP client");
    let url = format!("{base}/readyz");
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    loop {
        let last = match http.get(&url).send().await {
            Ok(response) if response.status() == 200 => return,
            Ok(response) => format!("{}: {}", response.status(), response.text().await.unwrap_or_default()),
            Err(e) => e.to_string(),
        };
        assert!(tokio::time::Instant::now() < deadline, "{url} not ready after {READY_TIMEOUT:?}; last answer: {last}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
