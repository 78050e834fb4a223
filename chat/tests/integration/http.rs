//! The HTTP routes beside the WebSocket: health, readiness, metrics, journeys, faults, web app.

use chat::testing::{RunningServer, TestServerOptions};
use serde_json::json;

use crate::support::*;

/// Headers of an admin request to a server from [`server_with_admin`].
const ADMIN: [(&str, &str); 2] = [("Authorization", "Bearer sesame-admin-token"), ("Content-Type", "application/json")];

/// An all-in-one server with the admin API on (token `sesame-admin-token`).
async fn server_with_admin() -> RunningServer {
    let mut options = TestServerOptions::default();
    options.gateway.admin_token = Some("sesame-admin-token".into());
    server_with(options).await
}

#[tokio::test]
async fn health_ready_metrics_and_the_web_app() {
    let server = server().await;
    assert_eq!(get(&format!("{}/healthz", server.http_url)).await.0, 200);
    assert_eq!(get(&format!("{}/readyz", server.http_url)).await.0, 200);
    let mut a = Client::login(&server.ws_url, "a").await;
    a.join("m").await;
    a.say("m", "1", "one").await;
    a.say("m", "1", "one").await;
    a.messages(1).await;
    let (status, text) = get(&format!("{}/metrics", server.http_url)).await;
    assert_eq!(status, 200);
    assert_eq!(metric(&text, "chat_connections"), 1.0, "{text}");
    assert_eq!(metric(&text, "chat_sends_total{outcome=\"acked\"}"), 1.0, "{text}");
    assert_eq!(metric(&text, "chat_sends_total{outcome=\"duplicate\"}"), 1.0, "{text}");
    assert_eq!(metric(&text, "chat_deliveries_total"), 1.0, "{text}");
    assert!(text.contains("chat_send_ack_seconds_bucket"), "{text}");
    // Both answers (the ack and the duplicate's) were timed by outcome, within the deadline.
    for outcome in ["acked", "duplicate"] {
        assert_eq!(metric(&text, &format!("chat_send_answer_seconds_count{{outcome=\"{outcome}\"}}")), 1.0, "{text}");
        let within = format!("chat_send_answer_seconds_bucket{{outcome=\"{outcome}\",le=\"5.0\"}}");
        assert_eq!(metric(&text, &within), 1.0, "{text}");
    }
    assert_eq!(metric(&text, "chat_send_answer_seconds_count{outcome=\"unavailable\"}"), 0.0, "{text}");
    // The limit on sends within their deadline: the cap (4,096), the floor after a quiet spell
    // (1,024), or, if a debug build stored these sends slowly, the pace's (at least 128).
    let limit = metric(&text, "chat_send_admission_limit");
    assert!((128.0..=4_096.0).contains(&limit), "{text}");
    let (status, html) = get(&format!("{}/", server.http_url)).await;
    assert_eq!(status, 200);
    assert!(html.to_lowercase().contains("<!doctype html"), "{html}");
    assert_eq!(get(&format!("{}/no-such-file.js", server.http_url)).await.0, 404);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn debug_messages_show_the_journey_inside_the_process() {
    let server = server().await;
    let mut a = Client::login(&server.ws_url, "a").await;
    a.join("j").await;
    let ack = a.say("j", "c1", "trace me").await;
    let message = a.messages(1).await.remove(0);
    let id = ack["id"].as_str().unwrap();
    let (status, journey) = get_json(&format!("{}/debug/messages/{id}", server.http_url)).await;
    assert_eq!(status, 200, "{journey}");
    assert_eq!(journey["trace_id"], message["trace_id"]);
    assert_eq!(journey["seq"], 1);
    let hops: Vec<&str> = journey["hops"].as_array().unwrap().iter().map(|h| h["hop"].as_str().unwrap()).collect();
    for hop in ["gateway.receive", "fanout.sequence", "store.append", "gateway.fanout", "gateway.ack"] {
        assert!(hops.contains(&hop), "{hop} missing from {hops:?}");
    }
    let fanout = journey["hops"].as_array().unwrap().iter().find(|h| h["hop"] == "gateway.fanout").unwrap();
    assert_eq!(fanout["detail"]["connections"], 1);
    let unknown = uuid::Uuid::now_v7();
    assert_eq!(get(&format!("{}/debug/messages/{unknown}", server.http_url)).await.0, 404);
    assert_eq!(get(&format!("{}/debug/messages/not-a-uuid", server.http_url)).await.0, 400);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn admin_faults_need_the_token_and_are_marked_in_the_journey() {
    let server = server_with_admin().await;
    let url = format!("{}/admin/faults", server.http_url);
    let fault = json!({"hop": "gateway.deliver", "action": "drop", "room": "f", "count": 1}).to_string();
    assert_eq!(request("POST", &url, &[("Content-Type", "application/json")], &fault).await.0, 401);
    assert_eq!(
        request("POST", &url, &[("Authorization", "Bearer wrong"), ("Content-Type", "application/json")], &fault)
            .await
            .0,
        401
    );
    let auth = ADMIN;
    assert_eq!(request("POST", &url, &auth, "{\"hop\": \"nowhere\", \"action\": \"drop\"}").await.0, 400);
    let (status, body) = request("POST", &url, &auth, &fault).await;
    assert_eq!(status, 201, "{body}");
    let (_, listed) = request("GET", &url, &auth, "").await;
    assert!(listed.contains("\"action\":\"drop\""), "{listed}");

    let mut a = Client::login(&server.ws_url, "a").await;
    a.join("f").await;
    let lost = a.say("f", "1", "dropped").await;
    a.say("f", "2", "delivered").await;
    let seen = a.messages(1).await;
    assert_eq!(seen[0]["seq"], 2, "the first delivery was dropped by the fault");
    let (_, journey) = get_json(&format!("{}/debug/messages/{}", server.http_url, lost["id"].as_str().unwrap())).await;
    let fault_hop = journey["hops"].as_array().unwrap().iter().find(|h| h["hop"] == "fault.injected").cloned();
    assert_eq!(fault_hop.expect("fault marked in journey")["detail"]["action"], "drop");
    let (_, metrics) = get(&format!("{}/metrics", server.http_url)).await;
    assert_eq!(metric(&metrics, "chat_drops_total{reason=\"fault_drop\"}"), 1.0, "{metrics}");
    assert_eq!(request("DELETE", &url, &auth, "").await.0, 200);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn admin_api_is_off_without_a_token() {
    let server = server().await;
    let (status, _) =
        request("GET", &format!("{}/admin/faults", server.http_url), &[("Authorization", "Bearer x")], "").await;
    assert_eq!(status, 404);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_sequencing_stall_limited_to_a_room_holds_only_that_room() {
    let server = server_with_admin().await;
    let url = format!("{}/admin/faults", server.http_url);
    let auth = ADMIN;
    let stall = json!({"hop": "fanout.sequence", "action": "stall", "room": "slow", "delay_ms": 1500}).to_string();
    assert_eq!(request("POST", &url, &auth, &stall).await.0, 201);

    let mut a = Client::login(&server.ws_url, "a").await;
    a.join("slow").await;
    a.join("fast").await;
    let started = std::time::Instant::now();
    a.say("fast", "f1", "not held").await;
    assert!(
        started.elapsed() < std::time::Duration::from_millis(1000),
        "another room's send was held {:?}",
        started.elapsed()
    );
    let started = std::time::Instant::now();
    let held = a.say("slow", "s1", "held").await;
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(1500),
        "the room's send was not held: {:?}",
        started.elapsed()
    );
    let (_, journey) = get_json(&format!("{}/debug/messages/{}", server.http_url, held["id"].as_str().unwrap())).await;
    assert!(
        journey["hops"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["hop"] == "fault.injected" && h["detail"]["action"] == "stall"),
        "{journey:#}"
    );
    server.shutdown().await.unwrap();
}

// A slow delivery not mistaken for a lost one (the two-step quiet-room check) is tested on
// tokio's paused clock in gateway/src/rooms/tests.rs.

/// The web app's pages and files carry a strict Content-Security-Policy (own scripts, styles
/// and connections only; no framing), `nosniff` and no referrer.
#[tokio::test]
async fn the_web_app_sends_security_headers() {
    let server = server().await;
    for path in ["/", "/app.js", "/style.css"] {
        let response = reqwest::Client::new()
            .get(format!("{}{path}", server.http_url))
            .timeout(WAIT)
            .send()
            .await
            .expect("HTTP response");
        assert_eq!(response.status(), 200, "{path}");
        let headers = response.headers();
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let csp = header("content-security-policy").unwrap_or_else(|| panic!("{path}: no CSP in {headers:?}"));
        let directives: Vec<&str> = csp.split(';').map(str::trim).collect();
        for expected in [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
            "base-uri 'none'",
            "form-action 'none'",
        ] {
            assert!(directives.contains(&expected), "{path}: {expected:?} missing from {csp:?}");
        }
        assert!(!csp.contains("unsafe-"), "{path}: {csp}");
        assert_eq!(header("x-content-type-options").as_deref(), Some("nosniff"), "{path}");
        assert_eq!(header("referrer-policy").as_deref(), Some("no-referrer"), "{path}");
    }
    server.shutdown().await.unwrap();
}
