//! A real Jaeger (v2, all-in-one, in-memory store) receiving OTLP spans, with its HTTP query API.

use std::path::PathBuf;
use std::process::Stdio;

/// A running Jaeger on dynamic loopback ports, killed on drop: OTLP over HTTP in
/// ([`otlp_endpoint`](Jaeger::otlp_endpoint)), its query API out ([`api`](Jaeger::api)).
pub struct Jaeger {
    child: std::process::Child,
    otlp_port: u16,
    query_port: u16,
    _dir: tempfile::TempDir,
}

/// The Jaeger binary: `CHAT_JAEGER`, or the one `deploy/tools/jaeger` prints (it builds it once
/// per machine with Go). Panics with what to do when neither works.
fn jaeger_binary() -> PathBuf {
    if let Some(binary) = std::env::var_os("CHAT_JAEGER") {
        return binary.into();
    }
    let script = crate::workspace_root().join("deploy/tools/jaeger");
    let output = std::process::Command::new(&script)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e} (or set CHAT_JAEGER to a jaeger binary)", script.display()));
    assert!(
        output.status.success(),
        "{} failed (set CHAT_JAEGER to a jaeger binary instead): {}",
        script.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).expect("UTF-8 path");
    PathBuf::from(stdout.lines().last().expect("deploy/tools/jaeger printed no path").trim())
}

/// Jaeger's configuration: OTLP/HTTP in, memory store, query API; nothing else listening.
fn config(otlp_port: u16, query_port: u16, query_grpc_port: u16) -> String {
    format!(
        "service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    traces:
      level: none
    logs:
      level: warn
extensions:
  jaeger_storage:
    backends:
      memory_store:
        memory:
          max_traces: 100000
  jaeger_query:
    storage:
      traces: memory_store
    http:
      endpoint: 127.0.0.1:{query_port}
    grpc:
      endpoint: 127.0.0.1:{query_grpc_port}
receivers:
  otlp:
    protocols:
      http:
        endpoint: 127.0.0.1:{otlp_port}
processors:
  batch:
    timeout: 200ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memory_store
"
    )
}

impl Jaeger {
    /// Starts Jaeger and waits until its query API answers.
    pub async fn start() -> Jaeger {
        let binary = jaeger_binary();
        let dir = tempfile::Builder::new().prefix("chat-jaeger-").tempdir().expect("temp dir");
        let (config_path, log_path) = (dir.path().join("jaeger.yaml"), dir.path().join("jaeger.log"));
        // Ports are picked by binding :0 and letting go; a start that loses one to another
        // process is retried on fresh ones.
        for _ in 0..3 {
            let (otlp_port, query_port, query_grpc_port) = (crate::free_port(), crate::free_port(), crate::free_port());
            std::fs::write(&config_path, config(otlp_port, query_port, query_grpc_port)).expect("write jaeger.yaml");
            let log = std::fs::File::create(&log_path).expect("create jaeger.log");
            let mut child = std::process::Command::new(&binary)
                .arg(format!("--config=file:{}", config_path.display()))
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", binary.display()));
            match crate::wait_answering(&mut child, &format!("http://127.0.0.1:{query_port}/api/services"), &log_path)
                .await
            {
                Ok(()) => return Jaeger { child, otlp_port, query_port, _dir: dir },
                Err(log) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    if !log.contains("address already in use") {
                        panic!("jaeger did not become ready: {log}");
                    }
                }
            }
        }
        panic!("jaeger found no free ports in three attempts");
    }

    /// Where processes send spans: `http://127.0.0.1:PORT` (OTLP over HTTP, `/v1/traces`).
    pub fn otlp_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.otlp_port)
    }

    /// Its HTTP query API: `http://127.0.0.1:PORT/api` (`/services`, `/traces?service=...`).
    pub fn api(&self) -> String {
        format!("http://127.0.0.1:{}/api", self.query_port)
    }
}

impl Drop for Jaeger {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
