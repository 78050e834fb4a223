//! Auth on (HS256 JWT) and off (dev mode).

use chat::testing::TestServerOptions;
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::json;

use crate::support::*;

fn config_with_secret(secret: &str) -> TestServerOptions {
    let mut options = TestServerOptions::default();
    options.gateway.jwt_secret = Some(std::sync::Arc::new(gateway::auth::JwtAuth::new(secret)));
    options
}

const SECRET: &str = "integration-test-secret-0123456789";

fn token(sub: &str, exp_offset_secs: i64, rooms: Option<&[&str]>) -> String {
    let exp = (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
        + exp_offset_secs) as u64;
    let mut claims = json!({"sub": sub, "exp": exp});
    if let Some(rooms) = rooms {
        claims["rooms"] = json!(rooms);
    }
    encode(&Header::default(), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

#[tokio::test]
async fn auth_on_requires_a_valid_token() {
    let server = server_with(config_with_secret(SECRET)).await;

    let mut anonymous = Client::connect(&server.ws_url).await;
    anonymous.send(json!({"type": "hello", "user": "mallory"})).await;
    assert_eq!(anonymous.expect("error").await["code"], "unauthorized");
    assert_eq!(anonymous.closed().await, 1008);

    let mut expired = Client::connect(&server.ws_url).await;
    expired.send(json!({"type": "hello", "token": token("alice", -3600, None)})).await;
    assert_eq!(expired.expect("error").await["code"], "unauthorized");
    assert_eq!(expired.closed().await, 1008);

    let forged = encode(
        &Header::default(),
        &json!({"sub": "alice", "exp": 4_000_000_000u64}),
        &EncodingKey::from_secret(b"other"),
    )
    .unwrap();
    let mut forger = Client::connect(&server.ws_url).await;
    forger.send(json!({"type": "hello", "token": forged})).await;
    assert_eq!(forger.expect("error").await["code"], "unauthorized");
    assert_eq!(forger.closed().await, 1008);

    let mut alice = Client::connect(&server.ws_url).await;
    alice.send(json!({"type": "hello", "token": token("alice", 3600, None), "user": "ignored"})).await;
    assert_eq!(alice.expect("welcome").await["user"], "alice");
    alice.join("anything").await;

    let mut limited = Client::connect(&server.ws_url).await;
    limited.send(json!({"type": "hello", "token": token("bob", 3600, Some(&["team"]))})).await;
    limited.expect("welcome").await;
    limited.join("team").await;
    limited.send(json!({"type": "join", "room": "secret", "req": 4})).await;
    let forbidden = limited.expect("error").await;
    assert_eq!((forbidden["code"].as_str(), forbidden["req"].as_i64()), (Some("forbidden"), Some(4)));
    limited.send(json!({"type": "history", "room": "secret"})).await;
    assert_eq!(limited.expect("error").await["code"], "forbidden");

    let query_url = format!("{}?token={}", server.ws_url, token("carol", 3600, None));
    let mut carol = Client::connect(&query_url).await;
    carol.send(json!({"type": "hello"})).await;
    assert_eq!(carol.expect("welcome").await["user"], "carol");

    let (status, _) = get(&format!("{}/api/rooms/team/messages", server.http_url)).await;
    assert_eq!(status, 401);
    let bearer = format!("Bearer {}", token("bob", 3600, Some(&["team"])));
    let (status, _) =
        request("GET", &format!("{}/api/rooms/team/messages", server.http_url), &[("Authorization", &bearer)], "")
            .await;
    assert_eq!(status, 200);
    let (status, _) =
        request("GET", &format!("{}/api/rooms/secret/messages", server.http_url), &[("Authorization", &bearer)], "")
            .await;
    assert_eq!(status, 403);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn dev_mode_takes_the_user_as_given() {
    let server = server_with(TestServerOptions::default()).await;
    let mut client = Client::connect(&server.ws_url).await;
    client.send(json!({"type": "hello", "user": "dev.user-1", "req": "h"})).await;
    let welcome = client.expect("welcome").await;
    assert_eq!(welcome["user"], "dev.user-1");
    assert_eq!(welcome["req"], "h");
    assert!(uuid::Uuid::parse_str(welcome["session"].as_str().unwrap()).is_ok());
    assert!(!welcome["gateway"].as_str().unwrap().is_empty());
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_token_that_expires_while_connected_ends_the_connection() {
    let mut options = config_with_secret(SECRET);
    options.gateway.admin_token = Some("auth-test-admin-token".into());
    let server = server_with(options).await;
    // exp one second from now; the gateway allows 5 s of clock leeway on top.
    let mut alice = Client::connect(&server.ws_url).await;
    alice.send(json!({"type": "hello", "token": token("alice", 1, None)})).await;
    alice.expect("welcome").await;
    alice.join("r").await;
    let connected = std::time::Instant::now();
    let error = alice.expect("error").await;
    assert_eq!(error["code"], "unauthorized", "{error}");
    assert_eq!(alice.closed().await, 4001);
    assert!(connected.elapsed() >= std::time::Duration::from_secs(4), "closed too early: {:?}", connected.elapsed());
    // With client auth on, metrics are for operators (the admin token).
    let (_, metrics) = request(
        "GET",
        &format!("{}/metrics", server.http_url),
        &[("Authorization", "Bearer auth-test-admin-token")],
        "",
    )
    .await;
    assert_eq!(metric(&metrics, "chat_disconnects_total{reason=\"token_expired\"}"), 1.0, "{metrics}");

    // A long-lived token keeps its connection.
    let mut bob = Client::connect(&server.ws_url).await;
    bob.send(json!({"type": "hello", "token": token("bob", 3600, None)})).await;
    bob.expect("welcome").await;
    bob.send(json!({"type": "ping"})).await;
    assert_eq!(bob.expect("pong").await["type"], "pong");
    server.shutdown().await.unwrap();
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// Whether `claims`, signed with [`SECRET`], gets `welcome` (else `unauthorized` and 1008).
async fn accepted(ws_url: &str, claims: serde_json::Value) -> bool {
    let token = encode(&Header::default(), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap();
    let mut client = Client::connect(ws_url).await;
    client.send(json!({"type": "hello", "token": token})).await;
    let answer = client.next().await;
    match answer["type"].as_str() {
        Some("welcome") => true,
        _ => {
            assert_eq!(answer["code"], "unauthorized", "{answer}");
            assert_eq!(client.closed().await, 1008);
            false
        }
    }
}

#[tokio::test]
async fn not_yet_valid_and_overlong_tokens_are_refused() {
    let server = server_with(config_with_secret(SECRET)).await;
    let now = now_secs();
    let ws = server.ws_url.as_str();
    assert!(accepted(ws, json!({"sub": "a", "exp": now + 3600})).await);
    // nbf: checked when present (5 s leeway).
    assert!(accepted(ws, json!({"sub": "a", "exp": now + 3600, "nbf": now - 10})).await);
    assert!(!accepted(ws, json!({"sub": "a", "exp": now + 3600, "nbf": now + 600})).await);
    // Lifetime: at most a day (the default of --jwt-max-lifetime-secs).
    assert!(accepted(ws, json!({"sub": "a", "iat": now, "exp": now + 86_400})).await);
    assert!(!accepted(ws, json!({"sub": "a", "exp": now + 30 * 86_400})).await);
    assert!(!accepted(ws, json!({"sub": "a", "iat": now - 2 * 86_400, "exp": now + 3600})).await);
    server.shutdown().await.unwrap();
}

/// `chat` with a JWT secret shorter than 32 bytes (or an empty one) does not start: a clear
/// error, exit code 2 (as any other bad flag), and the secret is not echoed.
#[tokio::test]
async fn a_short_jwt_secret_is_refused_at_start() {
    let data_dir = tempfile::tempdir().unwrap();
    let run = |env_secret: Option<&str>, args: &[&str]| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_chat"));
        command
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir.path())
            .args(args)
            .env_remove("CHAT_JWT_SECRET")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        if let Some(secret) = env_secret {
            command.env("CHAT_JWT_SECRET", secret);
        }
        async move { tokio::time::timeout(WAIT, command.output()).await }
    };
    for (env_secret, args) in [
        (None, &["--jwt-secret", "change-me"][..]),
        (Some("change-me"), &[][..]),
        (Some(""), &[][..]),
        (None, &["--jwt-secret", "0123456789abcdef0123456789abcde"][..]),
    ] {
        let output = run(env_secret, args).await.expect("chat exits at once").unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{env_secret:?} {args:?}: {stderr}");
        assert!(stderr.contains("at least 32 bytes"), "{stderr}");
        assert!(stderr.contains("openssl rand -base64 48"), "{stderr}");
        assert!(!stderr.contains("change-me") && !stderr.contains("0123456789abcdef"), "{stderr}");
    }
}
