//! Sockets are guarded before any request is read: a half-sent request is closed after the
//! header-read timeout, and sockets over the total or per-address caps are answered 503 at once
//! instead of being held (or silently ignored).

use std::time::Duration;

use chat::testing::TestServerOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

async fn server_with_limits(configure: impl FnOnce(&mut gateway::Limits)) -> chat::testing::RunningServer {
    let mut options = TestServerOptions::default();
    configure(&mut options.gateway.limits);
    server_with(options).await
}

/// What the server sends on `socket` until it closes it (or `limit` passes: `None`).
async fn read_until_closed(socket: &mut TcpStream, limit: Duration) -> Option<String> {
    let mut received = Vec::new();
    let read = tokio::time::timeout(limit, socket.read_to_end(&mut received)).await;
    read.ok().map(|_| String::from_utf8_lossy(&received).into_owned())
}

#[tokio::test]
async fn a_socket_that_sends_half_a_request_is_closed_after_the_header_read_timeout() {
    let server = server_with_limits(|limits| limits.header_read_timeout = Duration::from_millis(500)).await;
    let mut socket = TcpStream::connect(server.addr).await.unwrap();
    socket.write_all(b"GET /ws HT").await.unwrap();
    let started = std::time::Instant::now();
    let closed = read_until_closed(&mut socket, Duration::from_secs(5)).await;
    assert!(closed.is_some(), "the half request was still held open after 5 s");
    assert!(started.elapsed() >= Duration::from_millis(400), "closed before the timeout: {:?}", started.elapsed());
    // A socket that says nothing at all is closed too.
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    assert!(read_until_closed(&mut silent, Duration::from_secs(5)).await.is_some());
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn sockets_over_the_total_cap_are_answered_503_and_the_place_comes_back() {
    let server = server_with_limits(|limits| {
        limits.max_connections = 1;
        limits.max_pending_connections = 1;
    })
    .await;
    // One WebSocket and one idle socket fill the two places.
    let client = Client::login(&server.ws_url, "alice").await;
    let idle = TcpStream::connect(server.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut over = TcpStream::connect(server.addr).await.unwrap();
    let answer = read_until_closed(&mut over, Duration::from_secs(3)).await.expect("an answer, not silence");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("connection limit"), "{answer}");
    let (_, metrics) = metrics_once_places_are_free(&server, idle, client).await;
    assert_eq!(metric(&metrics, "chat_disconnects_total{reason=\"socket_limit\"}"), 1.0, "{metrics}");
    server.shutdown().await.unwrap();
}

/// Frees the two places (the idle socket and the WebSocket), then reads the metrics once a
/// place is back.
async fn metrics_once_places_are_free(
    server: &chat::testing::RunningServer,
    idle: TcpStream,
    client: Client,
) -> (u16, String) {
    drop(idle);
    drop(client);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) = get(&format!("{}/metrics", server.http_url)).await;
        if status == 200 {
            return (status, body);
        }
        assert!(std::time::Instant::now() < deadline, "no place came back: {status} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn sockets_over_the_per_address_cap_are_answered_503_upgraded_ones_included() {
    let server = server_with_limits(|limits| limits.max_connections_per_ip = 2).await;
    let first = Client::login(&server.ws_url, "alice").await;
    let _second = Client::login(&server.ws_url, "bob").await;
    let mut third = TcpStream::connect(server.addr).await.unwrap();
    let answer = read_until_closed(&mut third, Duration::from_secs(3)).await.expect("an answer, not silence");
    assert!(answer.starts_with("HTTP/1.1 503") && answer.contains("from your address"), "{answer}");
    // A WebSocket that closes gives its place back.
    drop(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while get(&format!("{}/healthz", server.http_url)).await.0 != 200 {
        assert!(std::time::Instant::now() < deadline, "the closed WebSocket's place did not come back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn only_allowed_browser_origins_may_open_websockets() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut options = TestServerOptions::default();
    options.gateway.allowed_origins = vec!["https://chat.example.com".into()];
    let server = server_with(options).await;
    let with_origin = |origin: &str| {
        let mut request = server.ws_url.as_str().into_client_request().unwrap();
        request.headers_mut().insert("Origin", origin.parse().unwrap());
        tokio_tungstenite::connect_async(request)
    };
    let refused = with_origin("https://evil.example.net").await.expect_err("another site's page is refused");
    assert!(refused.to_string().contains("403"), "{refused}");
    assert!(with_origin("https://chat.example.com").await.is_ok(), "the allowed origin connects");
    // Clients that are not browsers send no Origin and are not affected.
    let _client = Client::login(&server.ws_url, "alice").await;
    server.shutdown().await.unwrap();
}
