//! `--protocol centrifugo` against a real Centrifugo (deploy/bench/vs-centrifugo's server):
//! started on a free port with a temporary config (HS256 tokens, publish and subscribe allowed
//! in channels without a namespace, history off), killed on drop.
//!
//! Centrifugo is a Go binary the workspace does not build: deploy/test-all builds it once per
//! machine with `deploy/tools/centrifugo` (which prints the path) and passes it as `CENTRIFUGO`.
//! Without it these tests fail, saying so.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use loadgen::config::Protocol;
use loadgen::schedule::Phase;
use loadgen::{Config, RunError};

use crate::support::{run, tempdir, LIMIT};

const SECRET: &str = "loadgen-e2e-centrifugo-secret-0123456789";
const VERSION: &str = "v6.9.1";

/// A running Centrifugo, killed on drop.
struct Centrifugo {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Centrifugo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The binary: `$CENTRIFUGO`, or where deploy/tools/centrifugo caches it. Panics with what to do
/// when it is missing.
fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("CENTRIFUGO") {
        return path.into();
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .expect("HOME or XDG_CACHE_HOME is set");
    let path = cache.join(format!("chat/tools/centrifugo-{VERSION}/centrifugo"));
    assert!(
        path.exists(),
        "no Centrifugo at {}: run deploy/tools/centrifugo first (or set CENTRIFUGO)",
        path.display()
    );
    path
}

async fn centrifugo() -> Centrifugo {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = tempdir();
    let config = dir.path().join("config.json");
    let json = serde_json::json!({
        "http_server": { "address": "127.0.0.1", "port": port },
        "log": { "level": "error" },
        "client": { "token": { "hmac_secret_key": SECRET } },
        "http_api": { "key": SECRET },
        "channel": { "without_namespace": { "allow_subscribe_for_client": true, "allow_publish_for_client": true } },
    });
    std::fs::write(&config, json.to_string()).unwrap();
    let child = Command::new(binary())
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("Centrifugo starts");
    let server = Centrifugo { child, url: format!("ws://127.0.0.1:{port}/connection/websocket"), _dir: dir };
    let listening = async {
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(LIMIT, listening).await.expect("Centrifugo listening");
    server
}

fn config(server: &Centrifugo, prefix: &str) -> Config {
    Config {
        urls: vec![server.url.clone()],
        protocol: Protocol::Centrifugo,
        clients: 12,
        rooms: 2,
        rooms_per_client: 1,
        phases: vec![Phase { duration: Duration::from_secs(2), rate: 40.0 }],
        ramp: 0.0,
        history_rate: 0.0,
        journeys: 0,
        token_secret: Some(SECRET.into()),
        seed: 7,
        drain: Duration::from_secs(5),
        prefix: prefix.into(),
        progress: false,
        ..Config::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn centrifugo_run_delivers_every_publish_to_every_subscriber() {
    let server = centrifugo().await;
    let report = run(config(&server, "cf")).await;
    assert!(report.passed, "{}", report.summary());
    let a = &report.audit;
    assert_eq!(a.members_audited, 12);
    assert_eq!(a.acked, a.scheduled, "every publish answered: {a:?}");
    assert_eq!(a.expected_deliveries, a.acked * 6, "rooms of 6, the publisher included");
    assert_eq!(a.delivered, a.expected_deliveries);
    for name in ["connect", "join", "send_to_ack", "send_to_delivery"] {
        assert!(report.latency_ms[name].count > 0, "{name} measured");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn centrifugo_refuses_a_token_of_another_secret() {
    let server = centrifugo().await;
    let config =
        Config { token_secret: Some("another-secret-of-32-bytes-or-more-000".into()), ..config(&server, "cfbad") };
    match tokio::time::timeout(LIMIT, loadgen::run(config)).await.expect("run timed out") {
        Err(RunError::NoClients { errors, .. }) => assert!(errors.contains("unauthorized"), "{errors}"),
        other => panic!("expected no client to connect, got {other:?}"),
    }
}
