//! A minimal protocol client for tests: every wait is bounded by a timeout.

use std::time::Duration;

use chat::testing::{start_all_in_one, RunningServer, TestServerOptions};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const WAIT: Duration = Duration::from_secs(10);

/// A server with default settings except a send rate high enough for tests that pipeline
/// hundreds of sends (the rate limit itself is tested with its own settings).
pub async fn server() -> RunningServer {
    let mut options = TestServerOptions::default();
    options.gateway.limits.send_rate_per_sec = 100_000;
    options.gateway.limits.send_burst = 100_000;
    server_with(options).await
}

pub async fn server_with(options: TestServerOptions) -> RunningServer {
    start_all_in_one(options).await.expect("server starts")
}

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Frames read while looking for another kind, handed out first by `next`.
    pending: std::collections::VecDeque<Value>,
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect in time")
            .expect("connect");
        Client { ws, pending: Default::default() }
    }

    /// Connects and says hello as `user` (dev mode).
    pub async fn login(url: &str, user: &str) -> Client {
        let mut client = Client::connect(url).await;
        client.send(json!({"type": "hello", "user": user})).await;
        client.expect("welcome").await;
        client
    }

    pub async fn send(&mut self, frame: Value) {
        self.ws.send(Message::text(frame.to_string())).await.expect("send frame");
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.ws.send(message).await.expect("send raw frame");
    }

    /// The next text frame as JSON (control frames skipped).
    pub async fn next(&mut self) -> Value {
        if let Some(frame) = self.pending.pop_front() {
            return frame;
        }
        self.read().await
    }

    /// The next text frame as JSON, waiting up to `wait` (for answers slower than [`WAIT`]).
    pub async fn next_within(&mut self, wait: Duration) -> Value {
        if let Some(frame) = self.pending.pop_front() {
            return frame;
        }
        self.read_within(wait).await
    }

    async fn read(&mut self) -> Value {
        self.read_within(WAIT).await
    }

    async fn read_within(&mut self, wait: Duration) -> Value {
        loop {
            let message = tokio::time::timeout(wait, self.ws.next())
                .await
                .expect("a frame in time")
                .expect("connection open")
                .expect("valid frame");
            match message {
                Message::Text(text) => return serde_json::from_str(&text).expect("server sends JSON"),
                Message::Close(frame) => panic!("closed by server: {frame:?}"),
                _ => continue,
            }
        }
    }

    /// The first frame of this type; presence and typing frames before it are dropped, and
    /// messages and acks are kept for later `next` calls. Any other frame fails the test.
    pub async fn expect(&mut self, kind: &str) -> Value {
        if let Some(at) = self.pending.iter().position(|f| f["type"] == kind) {
            return self.pending.remove(at).expect("position is valid");
        }
        loop {
            let frame = self.read().await;
            match frame["type"].as_str() {
                Some(k) if k == kind => return frame,
                Some("presence") | Some("typing") => continue,
                Some("message") | Some("ack") => self.pending.push_back(frame),
                _ => panic!("expected {kind}, got {frame}"),
            }
        }
    }

    /// Waits for the close frame and returns its code (frames before it are ignored).
    pub async fn closed(&mut self) -> u16 {
        loop {
            let message = tokio::time::timeout(WAIT, self.ws.next()).await.expect("close in time");
            match message {
                Some(Ok(Message::Close(Some(frame)))) => return frame.code.into(),
                Some(Ok(Message::Close(None))) | None => return 1005,
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("error instead of close: {e}"),
            }
        }
    }

    pub async fn join(&mut self, room: &str) -> Value {
        self.send(json!({"type": "join", "room": room})).await;
        self.expect("joined").await
    }

    /// Sends a message and waits for its ack.
    pub async fn say(&mut self, room: &str, id: &str, body: &str) -> Value {
        self.send(json!({"type": "send", "room": room, "client_msg_id": id, "body": body})).await;
        self.expect("ack").await
    }

    /// Collects `n` message frames (skipping acks, presence, typing).
    pub async fn messages(&mut self, n: usize) -> Vec<Value> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let frame = self.next().await;
            if frame["type"] == "message" {
                out.push(frame);
            }
        }
        out
    }
}

pub async fn get_json(url: &str) -> (u16, Value) {
    get_json_within(WAIT, url).await
}

pub async fn get(url: &str) -> (u16, String) {
    request("GET", url, &[], "").await
}

pub async fn request(method: &str, url: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    request_within(WAIT, method, url, headers, body).await
}

/// A GET answered as JSON within `wait`, for queries slower than [`WAIT`] (a Jaeger search over
/// thousands of traces on a busy machine).
pub async fn get_json_within(wait: Duration, url: &str) -> (u16, Value) {
    let (status, body) = request_within(wait, "GET", url, &[], "").await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

async fn request_within(
    wait: Duration,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let client = reqwest::Client::new();
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut builder = client.request(method, url).timeout(wait).body(body.to_owned());
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let response = builder.send().await.expect("HTTP response");
    let status = response.status().as_u16();
    (status, response.text().await.expect("HTTP body"))
}

/// `metric(text, sample)`: the value of a sample in a `/metrics` text; panics (listing what is
/// there) when it is absent. `metric_or_zero` only where absence means zero: see its docs.
pub use testkit::{metric, metric_or_zero};

/// Every stored message of a room, oldest first, read page by page through the HTTP API.
pub async fn whole_history(base: &str, room: &str) -> Vec<Value> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let (status, page) = get_json(&format!("{base}/api/rooms/{room}/messages?after={after}&limit=200")).await;
        assert_eq!(status, 200, "{page}");
        let messages = page["messages"].as_array().expect("messages").clone();
        if let Some(last) = messages.last() {
            after = last["seq"].as_u64().expect("seq");
        }
        all.extend(messages);
        if !page["has_more"].as_bool().expect("has_more") {
            return all;
        }
    }
}

/// Arms `fault` on a process's admin API (`POST {base}/admin/faults` with `token`); fails the
/// test unless it is created.
pub async fn arm_fault(base: &str, token: &str, fault: &Value) {
    let headers = [("Authorization", format!("Bearer {token}")), ("Content-Type", "application/json".into())];
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (status, body) = request("POST", &format!("{base}/admin/faults"), &headers, &fault.to_string()).await;
    assert_eq!(status, 201, "{body}");
}
