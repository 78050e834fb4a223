//! Helpers: start the server, build configs, plant faults, read journeys, run the binary.

use std::time::Duration;

use chat::testing::{start_all_in_one, RunningServer, TestServerOptions};
use gateway::GatewayConfig;
use loadgen::schedule::Phase;
use loadgen::{Config, Report};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The admin token of test servers.
pub const ADMIN: &str = "loadgen-e2e-admin-token";
/// Every await that could hang is bounded by this.
pub const LIMIT: Duration = Duration::from_secs(60);

/// A fresh all-in-one server with the admin API on (and auth when `jwt` is given).
pub async fn server(jwt: Option<&str>) -> RunningServer {
    let gateway = GatewayConfig {
        admin_token: Some(ADMIN.into()),
        jwt_secret: jwt.map(|secret| gateway::auth::JwtAuth::new(secret).into()),
        ..GatewayConfig::default()
    };
    tokio::time::timeout(LIMIT, start_all_in_one(TestServerOptions { data_dir: None, gateway }))
        .await
        .expect("server start timed out")
        .expect("server started")
}

/// A small run: 12 clients in 2 rooms of 6, 40 sends/s for 2 s, everyone connects at once.
pub fn config(server: &RunningServer, prefix: &str) -> Config {
    Config {
        urls: vec![server.ws_url.clone()],
        clients: 12,
        rooms: 2,
        rooms_per_client: 1,
        phases: vec![Phase { duration: Duration::from_secs(2), rate: 40.0 }],
        ramp: 0.0,
        history_rate: 3.0,
        seed: 7,
        drain: Duration::from_secs(5),
        prefix: prefix.into(),
        progress: false,
        ..Config::default()
    }
}

/// Runs loadgen as a library, bounded in time.
pub async fn run(config: Config) -> Report {
    tokio::time::timeout(LIMIT, loadgen::run(config)).await.expect("run timed out").expect("run carried out")
}

/// A minimal HTTP/1.1 exchange (no client library needed for two admin calls).
pub async fn http(server: &RunningServer, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let body = body.unwrap_or("");
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {ADMIN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            server.addr,
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        let text = String::from_utf8_lossy(&response).into_owned();
        let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        (status, body)
    };
    tokio::time::timeout(LIMIT, exchange).await.expect("http timed out")
}

/// Plants a fault at `gateway.deliver` for `room` that fires `count` times.
pub async fn plant(server: &RunningServer, action: &str, room: &str, count: u64) {
    let body = format!(
        r#"{{"hop":"gateway.deliver","action":"{action}","probability":1.0,"seed":42,"room":"{room}","count":{count}}}"#
    );
    let (status, text) = http(server, "POST", "/admin/faults", Some(&body)).await;
    assert_eq!(status, 201, "planting {action}: {text}");
}

/// Asserts the server's journey of message `id` shows the injected fault and the seq loadgen
/// reported.
pub async fn assert_faulted(server: &RunningServer, id: &str, action: &str, seq: u64) {
    let (status, text) = http(server, "GET", &format!("/debug/messages/{id}"), None).await;
    assert_eq!(status, 200, "journey of {id}: {text}");
    let journey: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(journey["seq"], seq, "{text}");
    let hops = journey["hops"].as_array().cloned().unwrap_or_default();
    let faulted = hops.iter().any(|h| {
        let s = h.to_string();
        s.contains("fault.injected") && s.contains(&format!("\"{action}\""))
    });
    assert!(faulted, "message {id} named by loadgen has no `{action}` fault in its journey: {text}");
}

/// A fresh temporary directory, removed when dropped.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("loadgen-e2e-").tempdir().unwrap()
}

/// Runs the `loadgen` binary with `args`, returning its exit code.
pub async fn loadgen_bin(args: Vec<String>) -> i32 {
    let (code, stdout) = loadgen_bin_output(args).await;
    if code != 0 {
        eprintln!("{stdout}");
    }
    code
}

/// Runs the `loadgen` binary with `args`, returning its exit code and stdout (stderr is passed
/// through to the test's output).
pub async fn loadgen_bin_output(args: Vec<String>) -> (i32, String) {
    let child = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_loadgen")).args(&args).output().unwrap()
    });
    let out = tokio::time::timeout(LIMIT, child).await.expect("binary timed out").unwrap();
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}
