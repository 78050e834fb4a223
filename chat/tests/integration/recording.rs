//! Recording clients' traffic (`--record DIR`): what a client sends and is sent lands in the
//! recording with its ids and sizes, bodies only when asked, and `POST /admin/record` switches
//! it at run time (admin token required).

use chat::testing::TestServerOptions;
use serde_json::Value;

use crate::support::*;

const ADMIN: &str = "recording-admin-token";

async fn recording_server(dir: &std::path::Path, enabled: bool) -> chat::testing::RunningServer {
    let mut options = TestServerOptions::default();
    options.gateway.admin_token = Some(ADMIN.to_owned());
    options.gateway.record = Some(gateway::recorder::RecordConfig {
        dir: dir.to_owned(),
        enabled,
        bodies: false,
        max_file_bytes: 1 << 20,
        max_total_bytes: 1 << 30,
    });
    server_with(options).await
}

/// Every recorded line, oldest first, once at least `want` lines are there.
async fn recorded(dir: &std::path::Path, want: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut paths: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        paths.sort();
        let lines: Vec<Value> = paths
            .iter()
            .flat_map(|p| {
                std::fs::read_to_string(p)
                    .unwrap()
                    .lines()
                    // The newest line may be half written while it is read: whole lines only.
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect::<Vec<_>>()
            })
            .collect();
        if want(&lines) {
            return lines;
        }
        assert!(std::time::Instant::now() < deadline, "recording incomplete after 10 s: {lines:#?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

fn find<'a>(lines: &'a [Value], dir: &str, kind: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["dir"] == dir && l["type"] == kind).collect()
}

#[tokio::test]
async fn a_session_is_recorded_frame_by_frame_with_ids_and_sizes_but_no_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let server = recording_server(dir.path(), true).await;
    let mut alice = Client::login(&server.ws_url, "alice").await;
    alice.join("rec").await;
    let ack = alice.say("rec", "c1", "a secret body").await;

    let lines = recorded(dir.path(), |l| !find(l, "out", "message").is_empty()).await;
    let conn = find(&lines, "in", "open")[0]["conn"].clone();
    assert!(lines.iter().all(|l| l["conn"] == conn), "one connection: {lines:#?}");
    let kinds: Vec<(&str, &str)> =
        lines.iter().map(|l| (l["dir"].as_str().unwrap(), l["type"].as_str().unwrap())).collect();
    for expected in [
        ("in", "open"),
        ("in", "hello"),
        ("out", "welcome"),
        ("in", "join"),
        ("out", "joined"),
        ("in", "send"),
        ("out", "ack"),
    ] {
        assert!(kinds.contains(&expected), "{expected:?} missing from {kinds:?}");
    }
    assert_eq!(find(&lines, "in", "hello")[0]["user"], "alice");
    let send = find(&lines, "in", "send")[0];
    assert_eq!(
        (send["room"].as_str(), send["client_msg_id"].as_str(), send["body_len"].as_u64()),
        (Some("rec"), Some("c1"), Some(13))
    );
    let acked = find(&lines, "out", "ack")[0];
    assert_eq!((&acked["id"], &acked["seq"]), (&ack["id"], &ack["seq"]));
    let message = find(&lines, "out", "message")[0];
    assert_eq!((&message["id"], &message["seq"]), (&ack["id"], &ack["seq"]));
    assert!(message["bytes"].as_u64().unwrap() > 13, "{message}");
    let at: Vec<u64> = lines.iter().map(|l| l["at_us"].as_u64().unwrap()).collect();
    assert!(at.windows(2).all(|w| w[0] <= w[1]), "monotonic: {at:?}");
    assert!(!serde_json::to_string(&lines).unwrap().contains("secret"), "no bodies without --record-bodies");
}

#[tokio::test]
async fn the_admin_api_switches_recording_and_needs_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let server = recording_server(dir.path(), false).await;
    let url = format!("{}/admin/record", server.http_url);
    let admin = [("Authorization", format!("Bearer {ADMIN}"))];
    let admin: Vec<(&str, &str)> = admin.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let with_json: Vec<(&str, &str)> = admin.iter().copied().chain([("Content-Type", "application/json")]).collect();

    assert_eq!(request("POST", &url, &[("Content-Type", "application/json")], r#"{"enabled":true}"#).await.0, 401);
    let (status, body) = request("POST", &url, &with_json, r#"{"enabled":"yes"}"#).await;
    assert_eq!(status, 400, "{body}");

    // Off: a whole session leaves nothing.
    let mut bob = Client::login(&server.ws_url, "bob").await;
    bob.join("rec").await;
    bob.say("rec", "b1", "unrecorded").await;
    let (status, body) = request("GET", &url, &admin, "").await;
    assert_eq!(status, 200, "{body}");
    let status_now: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((status_now["enabled"].as_bool(), status_now["written"].as_u64()), (Some(false), Some(0)), "{body}");

    // On: the next frames are recorded, the earlier ones are not.
    let (status, body) = request("POST", &url, &with_json, r#"{"enabled":true}"#).await;
    assert_eq!(status, 200, "{body}");
    bob.say("rec", "b2", "recorded").await;
    let lines = recorded(dir.path(), |l| !find(l, "out", "ack").is_empty()).await;
    let sends: Vec<&Value> = find(&lines, "in", "send");
    assert_eq!(sends.len(), 1, "{lines:#?}");
    assert_eq!(sends[0]["client_msg_id"], "b2");
}
