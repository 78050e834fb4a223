//! With client auth on, what the ops endpoints reveal is for operators: `/metrics`,
//! `/debug/messages/{id}` and the reasons of a failing `/readyz` need the admin token, and
//! `chat trace` sends it; `/healthz` and `/readyz`'s status stay open. A guessable (short)
//! admin token is refused at start.

use chat::testing::TestServerOptions;
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::json;

use crate::support::*;

const SECRET: &str = "ops-access-test-secret-0123456789abcdef";
const ADMIN: &str = "ops-access-admin-token";

fn token(sub: &str) -> String {
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 600;
    encode(&Header::default(), &json!({"sub": sub, "exp": exp}), &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

async fn server_with_auth(admin_token: Option<&str>) -> chat::testing::RunningServer {
    let mut options = TestServerOptions::default();
    options.gateway.jwt_secret = Some(std::sync::Arc::new(gateway::auth::JwtAuth::new(SECRET)));
    options.gateway.admin_token = admin_token.map(str::to_owned);
    server_with(options).await
}

#[tokio::test]
async fn with_auth_on_metrics_and_journeys_need_the_admin_token_and_chat_trace_sends_it() {
    let server = server_with_auth(Some(ADMIN)).await;
    let mut alice = Client::connect(&server.ws_url).await;
    alice.send(json!({"type": "hello", "token": token("alice")})).await;
    alice.expect("welcome").await;
    alice.join("ops").await;
    let ack = alice.say("ops", "c1", "hello").await;
    let id = ack["id"].as_str().unwrap();
    let operator = [("Authorization", format!("Bearer {ADMIN}"))];
    let operator: Vec<(&str, &str)> = operator.iter().map(|(k, v)| (*k, v.as_str())).collect();

    assert_eq!(get(&format!("{}/healthz", server.http_url)).await.0, 200);
    assert_eq!(get(&format!("{}/readyz", server.http_url)).await, (200, "ready\n".to_owned()));
    for path in ["/metrics".to_owned(), format!("/debug/messages/{id}")] {
        let url = format!("{}{path}", server.http_url);
        let (status, body) = get(&url).await;
        assert_eq!(status, 401, "{path} without the token: {body}");
        assert!(!body.contains("alice") && !body.contains("chat_sends_total"), "{body}");
        let (status, _) = request("GET", &url, &[("Authorization", "Bearer wrong")], "").await;
        assert_eq!(status, 401, "{path} with a wrong token");
        let (status, body) = request("GET", &url, &operator, "").await;
        assert_eq!(status, 200, "{path} with the admin token: {body}");
    }

    let trace = |token: Option<&'static str>| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_chat"));
        command.args(["trace", id, "--url", &server.http_url]).env_remove("CHAT_ADMIN_TOKEN");
        if let Some(token) = token {
            command.env("CHAT_ADMIN_TOKEN", token);
        }
        command.output()
    };
    let refused = trace(None).await.unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("admin token"), "{refused:?}");
    let traced = trace(Some(ADMIN)).await.unwrap();
    assert!(traced.status.success(), "{}", String::from_utf8_lossy(&traced.stderr));
    assert!(String::from_utf8_lossy(&traced.stdout).contains("gateway.ack"));
    server.shutdown().await.unwrap();
}

/// An admin token under 16 bytes, by flag or environment, in every mode that serves /admin, is a
/// configuration error: exit code 2 (as any other bad flag), and the token is not echoed.
#[tokio::test]
async fn a_short_admin_token_is_refused_at_start() {
    let data_dir = tempfile::tempdir().unwrap();
    let run = |env_token: Option<&str>, args: &[&str]| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_chat"));
        command
            .args(args)
            .args(["--listen", "127.0.0.1:0"])
            .env_remove("CHAT_ADMIN_TOKEN")
            .env("CHAT_DATA_DIR", data_dir.path())
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        if let Some(token) = env_token {
            command.env("CHAT_ADMIN_TOKEN", token);
        }
        async move { tokio::time::timeout(WAIT, command.output()).await }
    };
    for (env_token, args) in [
        (None, &["--admin-token", "s3cret"][..]),
        (Some("s3cret"), &[][..]),
        (Some(""), &[][..]),
        (None, &["gateway", "--admin-token", "fifteen-bytes!!"][..]),
        (Some("s3cret"), &["fanout"][..]),
    ] {
        let output = run(env_token, args).await.expect("chat exits at once").unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{env_token:?} {args:?}: {stderr}");
        assert!(stderr.contains("at least 16 bytes"), "{stderr}");
        assert!(stderr.contains("openssl rand -hex 16"), "{stderr}");
        assert!(!stderr.contains("s3cret") && !stderr.contains("fifteen-bytes"), "{stderr}");
    }
}

#[tokio::test]
async fn with_auth_on_and_no_admin_token_the_details_are_closed() {
    let server = server_with_auth(None).await;
    let (status, body) = get(&format!("{}/metrics", server.http_url)).await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("--admin-token"), "{body}");
    assert_eq!(get(&format!("{}/readyz", server.http_url)).await.0, 200);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn without_auth_the_ops_endpoints_stay_open() {
    let server = server().await;
    let (status, body) = get(&format!("{}/metrics", server.http_url)).await;
    assert_eq!(status, 200, "{body}");
    server.shutdown().await.unwrap();
}
