//! One simulated client: a task that owns its WebSocket (a read loop plus a writer task fed by
//! a bounded channel), joins its rooms, sends what the scheduler tells it, checks every
//! delivery against its [`Track`]s, and reconnects with `since` when its connection is lost.
//!
//! Sends that were written but not answered when a connection drops are retried after the
//! rejoin with the same `client_msg_id` (the protocol makes that idempotent). Sends scheduled
//! while the client is offline wait in a bounded queue; latency still counts from the
//! scheduled instant.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use protocol::{ClientFrame, ErrorCode, Req, ServerFrame};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::audit::{check_chain, check_delivery, parse_id, parse_trace, AckOutcome, Chained, Track};
use crate::metrics::Lat;
use crate::outgoing::{note_written, ScheduledSends};
use crate::replay::RecordedBody;
use crate::runner::Shared;
use crate::schedule::Action;

/// A client's WebSocket.
pub(crate) type Ws = WebSocketStream<TcpStream>;

/// Connection attempts before a client is reported as failed to the ramp (it keeps trying).
pub(crate) const INITIAL_ATTEMPTS: u32 = 3;
/// Longest pause between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A gateway URL, checked and split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The URL as given.
    pub url: String,
    /// Host name or address.
    pub host: String,
    /// Port (default 80).
    pub port: u16,
}

impl Target {
    /// Accepts `ws://host[:port]/path`; `wss://` is refused (loadgen has no TLS).
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url.strip_prefix("ws://").ok_or_else(|| {
            format!("`{url}`: use a ws:// URL such as ws://127.0.0.1:8080/ws (wss:// is not supported)")
        })?;
        let authority = rest.split(['/', '?']).next().unwrap_or_default();
        if authority.is_empty() {
            return Err(format!("`{url}`: no host"));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
                let port = p.parse::<u16>().map_err(|_| format!("`{url}`: bad port `{p}`"))?;
                (h.trim_start_matches('[').trim_end_matches(']').to_string(), port)
            }
            _ => (authority.to_string(), 80),
        };
        Ok(Self { url: url.to_string(), host, port })
    }

    /// The HTTP base URL of the same gateway (for `/debug/messages/{id}` links).
    pub fn http_base(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }
}

/// What the scheduler and the run tell a client.
#[derive(Debug, Clone, Copy)]
pub enum Cmd {
    /// Do something from the schedule.
    Act(Action),
    /// The run is over: close and hand back the tracks.
    Stop,
}

/// What a client reports once its first connection is up and its rooms joined (or given up).
#[derive(Debug, Clone, Copy)]
pub struct Ready {
    /// Connected and every room joined.
    pub ok: bool,
}

/// What a client hands back at the end.
#[derive(Debug)]
pub struct ClientOutcome {
    /// One per room of the client.
    pub tracks: Vec<Track>,
    /// With `--protocol centrifugo`: one per room of the client, the sends it got (the audit's
    /// evidence there, as pushes carry no seq); empty for the chat protocol.
    pub centrifugo: Vec<crate::centrifugo::Member>,
}

/// A `client frame + req` on the wire: the protocol crate's frame with the request tag beside it.
#[derive(Serialize)]
struct Tagged<'a> {
    #[serde(flatten)]
    frame: &'a ClientFrame,
    req: Req,
}

fn encode(frame: &ClientFrame, req: Req) -> String {
    serde_json::to_string(&Tagged { frame, req }).unwrap_or_default()
}

/// The fields loadgen reads on the hot path, borrowed from the frame text (a field with escapes,
/// a body with a newline say, is the only one copied); anything else is skipped.
#[derive(Deserialize)]
struct Fast<'a> {
    #[serde(rename = "type", borrow)]
    ty: Cow<'a, str>,
    #[serde(default, borrow)]
    room: Option<Cow<'a, str>>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default, borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    client_msg_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    trace_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    user: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    body: Option<Cow<'a, str>>,
    #[serde(default)]
    ts: Option<i64>,
    #[serde(default, borrow)]
    prev: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    digest: Option<Cow<'a, str>>,
}

impl Fast<'_> {
    /// The message chain's evidence of a `message` frame, when it carries a digest.
    fn chained(&self, room: &str, seq: u64, id: &str) -> Option<Chained> {
        let digest = self.digest.as_deref()?;
        let fields = protocol::chain::Fields {
            room,
            seq,
            id: uuid::Uuid::from_bytes(parse_id(id)),
            user: self.user.as_deref().unwrap_or_default(),
            ts: self.ts.unwrap_or_default(),
            client_msg_id: self.client_msg_id.as_deref().unwrap_or_default(),
            body: self.body.as_deref().unwrap_or_default(),
        };
        Some(Chained::of(&fields, self.prev.as_deref(), digest))
    }
}

/// Why a connection ended.
enum End {
    Stop,
    Dropped,
    Lost(&'static str),
}

struct Conn {
    stream: SplitStream<Ws>,
    tx: mpsc::Sender<Message>,
    writer: JoinHandle<()>,
}

/// One client's state. Its frame handling is separate from the socket so the audit benchmark
/// can drive it with synthetic frames.
pub struct ClientState {
    shared: Arc<Shared>,
    idx: u32,
    tracks: Vec<Track>,
    /// Written, not answered: retried after a reconnect.
    pending: VecDeque<u32>,
    /// Scheduled, not written yet (offline, or the writer channel was full).
    queue: VecDeque<u32>,
    /// Per track: when its `join` was written and whether it carried `since`.
    joining: Vec<Option<(u64, bool)>>,
    joins_outstanding: usize,
    history_started: Vec<(u64, u64)>,
    next_history: u64,
    ready: bool,
    ready_reported: bool,
    lost_at: Option<u64>,
    rng: StdRng,
}

impl ClientState {
    /// A client that has not connected yet.
    pub fn new(shared: Arc<Shared>, idx: u32) -> Self {
        let tracks = shared.plan.client_rooms[idx as usize].iter().map(|&r| Track::new(r, idx)).collect::<Vec<_>>();
        let rng = StdRng::seed_from_u64(shared.config.seed ^ crate::schedule::mix(idx as u64 + 1));
        Self {
            joining: vec![None; tracks.len()],
            tracks,
            shared,
            idx,
            pending: VecDeque::new(),
            queue: VecDeque::new(),
            joins_outstanding: 0,
            history_started: Vec::new(),
            next_history: 0,
            ready: false,
            ready_reported: false,
            lost_at: None,
            rng,
        }
    }

    /// The client's tracks.
    pub fn tracks(&self) -> &[Track] {
        &self.tracks
    }

    /// Marks every track joined at `last_seq` now (for the audit benchmark).
    pub fn assume_joined(&mut self, last_seq: u64) {
        let now = self.shared.clock.now_us();
        for t in &mut self.tracks {
            t.joined(last_seq, now, false);
        }
        self.ready = true;
    }

    /// Handles one text frame from the server. Returns a fatal reason when the connection
    /// must be given up.
    pub fn on_text(&mut self, text: &str, tx: Option<&mpsc::Sender<Message>>) -> Option<&'static str> {
        let fast: Fast<'_> = match serde_json::from_str(text) {
            Ok(f) => f,
            Err(_) => {
                self.shared.metrics.error(self.idx, "unparseable_frame");
                return None;
            }
        };
        match fast.ty.as_ref() {
            "message" => {
                self.on_message(&fast);
                None
            }
            "ack" => {
                self.on_ack(&fast);
                None
            }
            "presence" | "typing" | "pong" => None,
            _ => match serde_json::from_str::<ServerFrame>(text) {
                Ok(frame) => self.on_frame(frame, tx),
                Err(_) => {
                    self.shared.metrics.error(self.idx, "unparseable_frame");
                    None
                }
            },
        }
    }

    fn on_message(&mut self, f: &Fast<'_>) {
        let now = self.shared.clock.now_us();
        let shared = &*self.shared;
        let (Some(room), Some(seq), Some(id)) = (f.room.as_deref(), f.seq, f.id.as_deref()) else {
            shared.metrics.error(self.idx, "malformed_message");
            return;
        };
        let track = shared
            .plan
            .room_index(room)
            .and_then(|r| self.tracks.iter_mut().find(|t| t.room == r))
            .filter(|t| t.resume_since().is_some());
        let Some(track) = track else {
            shared.metrics.stray.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let send = f.client_msg_id.as_deref().and_then(|c| shared.plan.send_index(c));
        let trace = f.trace_id.as_deref().unwrap_or("");
        let (_, latency) = check_delivery(track, &shared.records, send, seq, id, trace, now);
        let chained = f.chained(room, seq, id);
        check_chain(track, &shared.records, send, seq, id, parse_trace(trace), chained.as_ref());
        let mut w = shared.metrics.shard(self.idx);
        w.checked += 1;
        if let Some(us) = latency {
            w.delivered += 1;
            w.record(Lat::E2e, us);
        }
    }

    fn on_ack(&mut self, f: &Fast<'_>) {
        let shared = &*self.shared;
        let (Some(cmid), Some(id), Some(seq)) = (f.client_msg_id.as_deref(), f.id.as_deref(), f.seq) else {
            shared.metrics.error(self.idx, "malformed_ack");
            return;
        };
        let Some(i) = shared.plan.send_index(cmid) else { return };
        let now = shared.clock.now_us();
        if shared.records.ack(i, parse_id(id), seq, now) == AckOutcome::First {
            if let Some(rec) = shared.records.get(i) {
                let mut w = shared.metrics.shard(self.idx);
                w.acked += 1;
                w.record(Lat::Ack, now.saturating_sub(shared.records.scheduled_at(rec)));
            }
        }
        self.answered(i);
    }

    fn answered(&mut self, i: u32) {
        if let Some(pos) = self.pending.iter().position(|&p| p == i) {
            self.pending.remove(pos);
        }
    }

    fn on_frame(&mut self, frame: ServerFrame, tx: Option<&mpsc::Sender<Message>>) -> Option<&'static str> {
        let now = self.shared.clock.now_us();
        match frame {
            ServerFrame::Joined { room, last_seq, .. } => {
                let r = self.shared.plan.room_index(&room)?;
                let ti = self.tracks.iter().position(|t| t.room == r)?;
                let (started, resumed) = self.joining[ti].take()?;
                self.tracks[ti].joined(last_seq, now, resumed);
                self.shared.metrics.shard(self.idx).record(Lat::Join, now.saturating_sub(started));
                self.join_done(tx);
            }
            ServerFrame::History { req: Some(Req::Str(tag)), .. } => {
                let n: u64 = tag.strip_prefix('h')?.parse().ok()?;
                let pos = self.history_started.iter().position(|&(h, _)| h == n)?;
                let (_, started) = self.history_started.swap_remove(pos);
                self.shared.metrics.shard(self.idx).record(Lat::History, now.saturating_sub(started));
            }
            ServerFrame::Error { code, req, .. } => {
                self.shared.metrics.error(self.idx, code.as_str());
                match req {
                    Some(Req::Int(i)) => {
                        let i = u32::try_from(i).ok()?;
                        if self.shared.records.reject(i, code) {
                            let shared = &*self.shared;
                            if let Some(rec) = shared.records.get(i) {
                                let refused_after = now.saturating_sub(shared.records.scheduled_at(rec));
                                shared.metrics.shard(self.idx).record(Lat::Refusal, refused_after);
                            }
                        }
                        self.answered(i);
                    }
                    Some(Req::Str(tag)) if tag.starts_with('j') => {
                        let ti: usize = tag[1..].parse().ok()?;
                        if self.joining.get_mut(ti)?.take().is_some() {
                            // The membership could not be (re)established: not audited.
                            self.tracks[ti].abandon();
                            self.join_done(tx);
                        }
                    }
                    Some(Req::Str(tag)) if tag.starts_with('h') => {
                        let n: u64 = tag[1..].parse().ok()?;
                        self.history_started.retain(|&(h, _)| h != n);
                    }
                    _ if code == ErrorCode::Unauthorized => return Some("unauthorized"),
                    _ => {}
                }
            }
            ServerFrame::Reconnect { .. } => {
                self.shared.metrics.error(self.idx, "server_reconnect_requested");
            }
            _ => {}
        }
        None
    }

    fn join_done(&mut self, tx: Option<&mpsc::Sender<Message>>) {
        self.joins_outstanding = self.joins_outstanding.saturating_sub(1);
        if self.joins_outstanding > 0 {
            return;
        }
        self.ready = true;
        if let Some(lost) = self.lost_at.take() {
            let now = self.shared.clock.now_us();
            self.shared.metrics.shard(self.idx).record(Lat::Reconnect, now.saturating_sub(lost));
            self.shared.metrics.reconnecting.fetch_sub(1, Ordering::Relaxed);
        }
        // Unanswered sends of the previous connection go first, with the same client_msg_id.
        while let Some(i) = self.pending.pop_back() {
            self.queue.push_front(i);
        }
        if let Some(tx) = tx {
            self.flush_backlog(tx);
        }
    }

    fn history(&mut self, room: u32, tx: Option<&mpsc::Sender<Message>>) {
        let Some(tx) = tx.filter(|_| self.ready) else { return };
        let Ok(permit) = tx.try_reserve() else { return };
        let n = self.next_history;
        self.next_history += 1;
        let frame = ClientFrame::History {
            room: self.shared.plan.rooms[room as usize].clone(),
            before: None,
            after: None,
            limit: Some(50),
        };
        self.history_started.push((n, self.shared.clock.now_us()));
        permit.send(Message::text(encode(&frame, Req::Str(format!("h{n}")))));
    }

    /// Writes a `join` per track (with `since` when the membership can be resumed).
    fn start_joins(&mut self, tx: &mpsc::Sender<Message>, resume: bool) {
        self.ready = false;
        self.joins_outstanding = self.tracks.len();
        let now = self.shared.clock.now_us();
        for (ti, t) in self.tracks.iter().enumerate() {
            let since = if resume { t.resume_since() } else { None };
            let frame = ClientFrame::Join { room: self.shared.plan.rooms[t.room as usize].clone(), since };
            self.joining[ti] = Some((now, since.is_some()));
            // The channel is fresh and as large as the queue option; a client with more rooms
            // than that waits here, which only happens while (re)connecting.
            let _ = tx.try_send(Message::text(encode(&frame, Req::Str(format!("j{ti}")))));
        }
        if self.tracks.is_empty() {
            self.joins_outstanding = 1;
            self.join_done(Some(tx));
        }
    }

    fn offline(&mut self, action: Action) {
        if let Action::Send(i) = action {
            self.enqueue(i);
        }
    }

    fn disconnected(&mut self, resume: bool) {
        self.ready = false;
        for (ti, t) in self.tracks.iter_mut().enumerate() {
            self.joining[ti] = None;
            if resume {
                t.disconnected();
            } else {
                t.abandon();
            }
        }
        self.history_started.clear();
    }

    fn backoff(&mut self, attempt: u32) -> Duration {
        backoff(&mut self.rng, attempt)
    }
}

/// The pause before reconnect attempt `attempt`: doubling from 100 ms up to [`MAX_BACKOFF`],
/// jittered down by up to half.
pub(crate) fn backoff(rng: &mut StdRng, attempt: u32) -> Duration {
    let base = Duration::from_millis(100).saturating_mul(1 << attempt.min(6)).min(MAX_BACKOFF);
    base.mul_f64(0.5 + rng.random::<f64>() * 0.5)
}

/// Runs a client until [`Cmd::Stop`]; reports [`Ready`] once.
pub async fn run_client(
    mut st: ClientState,
    mut cmds: mpsc::Receiver<Cmd>,
    ready_tx: mpsc::Sender<Ready>,
) -> ClientOutcome {
    let shared = st.shared.clone();
    let idx = st.idx;
    let resume = shared.config.reconnect.as_ref().is_none_or(|r| r.resume);
    let mut attempt = 0u32;
    let mut gateway_shift = 0usize;
    let mut first = true;
    'life: loop {
        // === connect ===
        let started = shared.clock.now_us();
        let connecting = tokio::time::timeout(shared.config.connect_timeout, connect(&shared, idx, gateway_shift));
        tokio::pin!(connecting);
        let result = loop {
            tokio::select! {
                r = &mut connecting => break r,
                cmd = cmds.recv() => match cmd {
                    Some(Cmd::Act(a)) => st.offline(a),
                    Some(Cmd::Stop) | None => break 'life,
                },
            }
        };
        let mut conn = match result {
            Ok(Ok(c)) => c,
            failed => {
                let code = match failed {
                    Ok(Err(e)) => e,
                    _ => "connect_timeout",
                };
                shared.metrics.error(idx, code);
                attempt += 1;
                gateway_shift += 1;
                if !st.ready_reported && attempt >= INITIAL_ATTEMPTS {
                    st.ready_reported = true;
                    let _ = ready_tx.send(Ready { ok: false }).await;
                }
                let pause = tokio::time::sleep(st.backoff(attempt));
                tokio::pin!(pause);
                loop {
                    tokio::select! {
                        _ = &mut pause => continue 'life,
                        cmd = cmds.recv() => match cmd {
                            Some(Cmd::Act(a)) => st.offline(a),
                            Some(Cmd::Stop) | None => break 'life,
                        },
                    }
                }
            }
        };
        attempt = 0;
        shared.metrics.connected.fetch_add(1, Ordering::Relaxed);
        if first {
            shared.metrics.shard(idx).record(Lat::Connect, shared.clock.now_us().saturating_sub(started));
        }
        st.start_joins(&conn.tx, resume);

        // === connected ===
        let end = loop {
            tokio::select! {
                frame = conn.stream.next() => match frame {
                    Some(Ok(Message::Text(text))) => {
                        let was_ready = st.ready;
                        if let Some(reason) = st.on_text(text.as_str(), Some(&conn.tx)) {
                            break End::Lost(reason);
                        }
                        if st.ready && !was_ready && !st.ready_reported {
                            st.ready_reported = true;
                            let ok = st.tracks.iter().all(Track::is_joined);
                            let _ = ready_tx.send(Ready { ok }).await;
                        }
                    }
                    Some(Ok(Message::Close(_))) | None => break End::Lost("server_closed"),
                    Some(Err(_)) => break End::Lost("read_error"),
                    Some(Ok(_)) => {}
                },
                permit = conn.tx.reserve(), if st.ready && !st.queue.is_empty() => {
                    drop(permit);
                    st.flush_backlog(&conn.tx);
                }
                cmd = cmds.recv() => match cmd {
                    Some(Cmd::Act(Action::Send(i))) => st.send(i, Some(&conn.tx)),
                    Some(Cmd::Act(Action::History(room))) => st.history(room, Some(&conn.tx)),
                    Some(Cmd::Act(Action::Drop)) => break End::Dropped,
                    Some(Cmd::Stop) | None => break End::Stop,
                },
            }
        };
        shared.metrics.connected.fetch_sub(1, Ordering::Relaxed);
        first = false;
        match end {
            End::Stop => {
                // Dropping the sender lets the writer send a close frame and finish.
                drop(conn.tx);
                break 'life;
            }
            End::Dropped => {
                conn.writer.abort();
                shared.metrics.reconnect("scenario_drop");
            }
            End::Lost(cause) => {
                conn.writer.abort();
                shared.metrics.reconnect(cause);
                gateway_shift += 1;
                let pause = st.backoff(0);
                st.disconnected(resume);
                mark_lost(&mut st, &shared);
                tokio::time::sleep(pause).await;
                continue 'life;
            }
        }
        st.disconnected(resume);
        mark_lost(&mut st, &shared);
    }
    if st.lost_at.take().is_some() {
        shared.metrics.reconnecting.fetch_sub(1, Ordering::Relaxed);
    }
    if !st.ready_reported {
        let _ = ready_tx.send(Ready { ok: false }).await;
    }
    ClientOutcome { tracks: st.tracks, centrifugo: Vec::new() }
}

fn mark_lost(st: &mut ClientState, shared: &Shared) {
    if st.lost_at.is_none() {
        st.lost_at = Some(shared.clock.now_us());
        shared.metrics.reconnecting.fetch_add(1, Ordering::Relaxed);
    }
}

/// TCP connect, WebSocket handshake, `hello` → `welcome`. Errors are short codes counted in
/// the report.
async fn connect(shared: &Shared, idx: u32, shift: usize) -> Result<Conn, &'static str> {
    let mut ws = dial(shared, idx, shift).await?;
    let user = shared.plan.user(idx);
    let hello = match &shared.config.token_secret {
        Some(secret) => ClientFrame::Hello { user: None, token: Some(mint_token(shared, idx, &user, secret)?) },
        None => ClientFrame::Hello { user: Some(user), token: None },
    };
    ws.send(Message::text(serde_json::to_string(&hello).unwrap_or_default())).await.map_err(|_| "write_failed")?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => match serde_json::from_str::<ServerFrame>(text.as_str()) {
                Ok(ServerFrame::Welcome { .. }) => break,
                Ok(ServerFrame::Error { code: ErrorCode::Unauthorized, .. }) => return Err("unauthorized"),
                Ok(ServerFrame::Error { .. }) => return Err("hello_rejected"),
                _ => {}
            },
            Some(Ok(Message::Close(_))) | None => return Err("closed_before_welcome"),
            Some(Err(_)) => return Err("read_error"),
            Some(Ok(_)) => {}
        }
    }
    let (sink, stream) = ws.split();
    let (tx, rx) = mpsc::channel(shared.config.queue.max(shared.plan.client_rooms[idx as usize].len() + 1));
    let writer = tokio::spawn(write_loop(sink, rx));
    Ok(Conn { stream, tx, writer })
}

/// TCP connect (bound to a source address when configured) and WebSocket handshake, the part
/// of connecting every protocol shares.
/// Client `idx` uses gateway `(idx + shift) % n`: spread round-robin, and moved on to the next
/// gateway after each lost connection or failed attempt (a draining gateway refuses new ones).
pub(crate) async fn dial(shared: &Shared, idx: u32, shift: usize) -> Result<Ws, &'static str> {
    let targets = &shared.targets;
    let (target, addrs) = &targets[(idx as usize + shift) % targets.len()];
    let ips = &shared.config.source_ips;
    let source = (!ips.is_empty()).then(|| ips[idx as usize % ips.len()]);
    let addr = pick_addr(addrs, source).ok_or("no_address")?;
    let stream = match source {
        Some(ip) => {
            let socket = match ip {
                IpAddr::V4(_) => TcpSocket::new_v4(),
                IpAddr::V6(_) => TcpSocket::new_v6(),
            }
            .map_err(|_| "socket_failed")?;
            socket.bind(SocketAddr::new(ip, 0)).map_err(|_| "bind_failed")?;
            socket.connect(addr).await.map_err(connect_code)?
        }
        None => TcpStream::connect(addr).await.map_err(connect_code)?,
    };
    let _ = stream.set_nodelay(true);
    let (ws, _) = tokio_tungstenite::client_async_with_config(target.url.as_str(), stream, Some(ws_config()))
        .await
        .map_err(|_| "handshake_failed")?;
    Ok(ws)
}

/// Small buffers: tungstenite zero-fills its whole read buffer before every read (128 KiB by
/// default, which cost more CPU than everything else together) and keeps it per connection.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(WS_BUFFER_BYTES).write_buffer_size(WS_BUFFER_BYTES)
}

/// Read buffer and write-flush threshold of each connection.
const WS_BUFFER_BYTES: usize = 4 * 1024;

fn pick_addr(addrs: &[SocketAddr], source: Option<IpAddr>) -> Option<SocketAddr> {
    match source {
        Some(ip) => addrs.iter().find(|a| a.is_ipv4() == ip.is_ipv4()).copied(),
        None => addrs.first().copied(),
    }
}

fn connect_code(e: std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "connect_refused",
        std::io::ErrorKind::AddrInUse | std::io::ErrorKind::AddrNotAvailable => "source_ports_exhausted",
        std::io::ErrorKind::TimedOut => "connect_timeout",
        _ => "connect_failed",
    }
}

/// Claims of the JWTs loadgen mints.
#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
    rooms: Vec<&'a str>,
}

/// A JWT (HS256) for client `idx` as `user`, valid for a day.
pub(crate) fn mint_token(shared: &Shared, idx: u32, user: &str, secret: &str) -> Result<String, &'static str> {
    let now = (protocol::now_ms() / 1000) as u64;
    let rooms =
        shared.plan.client_rooms[idx as usize].iter().map(|&r| shared.plan.rooms[r as usize].as_str()).collect();
    let claims = Claims { sub: user, iat: now, exp: now + 24 * 3600, rooms };
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|_| "token_mint_failed")
}

/// Feeds queued frames to the socket, flushing when the queue runs dry; a closed channel sends
/// a close frame.
pub(crate) async fn write_loop(mut sink: SplitSink<Ws, Message>, mut rx: mpsc::Receiver<Message>) {
    while let Some(msg) = rx.recv().await {
        if sink.feed(msg).await.is_err() {
            return;
        }
        while let Ok(msg) = rx.try_recv() {
            if sink.feed(msg).await.is_err() {
                return;
            }
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
    let _ = sink.close().await;
}

impl ScheduledSends for ClientState {
    fn shared(&self) -> &Shared {
        &self.shared
    }

    fn idx(&self) -> u32 {
        self.idx
    }

    fn ready(&self) -> bool {
        self.ready
    }

    fn backlog(&mut self) -> &mut VecDeque<u32> {
        &mut self.queue
    }

    /// Writes the `send` frame of send `i` (remembered as pending until answered).
    fn write_one(&mut self, i: u32, tx: &mpsc::Sender<Message>) -> bool {
        let Ok(permit) = tx.try_reserve() else { return false };
        let shared = &*self.shared;
        let Some(rec) = shared.records.get(i) else { return true };
        let cfg = &shared.config;
        let recorded = cfg.replay.as_ref().and_then(|r| r.bodies.get(i as usize));
        let body = match recorded {
            Some(RecordedBody::Text(text)) => text.clone(),
            _ => {
                let len = match recorded {
                    Some(RecordedBody::Len(n)) => (*n).min(shared.body_pool.len()),
                    _ => crate::schedule::body_len(i, cfg.body.min, cfg.body.max, cfg.seed),
                };
                let start = (crate::schedule::mix(i as u64 ^ cfg.seed) as usize) % (shared.body_pool.len() - len + 1);
                shared.body_pool[start..start + len].to_string()
            }
        };
        let frame = ClientFrame::Send {
            room: shared.plan.rooms[rec.room as usize].clone(),
            client_msg_id: shared.plan.client_msg_id(i),
            body,
            traceparent: None,
        };
        note_written(shared, self.idx, i, rec);
        permit.send(Message::text(encode(&frame, Req::Int(i as i64))));
        self.pending.push_back(i);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let t = Target::parse("ws://127.0.0.1:8080/ws").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 8080));
        assert_eq!(t.http_base(), "http://127.0.0.1:8080");
        let t = Target::parse("ws://localhost/ws?x=1").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("localhost", 80));
        let t = Target::parse("ws://[::1]:9000/ws").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 9000));
        assert!(Target::parse("wss://x/ws").is_err());
        assert!(Target::parse("http://x/ws").is_err());
        assert!(Target::parse("ws:///ws").is_err());
    }

    #[test]
    fn tagged_frames_are_valid_protocol_frames_with_req() {
        let frames = [
            ClientFrame::Send { room: "r".into(), client_msg_id: "c.1".into(), body: "b".into(), traceparent: None },
            ClientFrame::Join { room: "r".into(), since: Some(4) },
            ClientFrame::History { room: "r".into(), before: None, after: None, limit: Some(50) },
        ];
        for (i, frame) in frames.iter().enumerate() {
            let text = encode(frame, Req::Int(i as i64));
            let (parsed, req) = protocol::frames::parse_client_frame(&text).unwrap();
            assert_eq!(&parsed, frame);
            assert_eq!(req, Some(Req::Int(i as i64)));
        }
    }

    #[test]
    fn fast_path_reads_message_and_ack_frames() {
        let msg = protocol::ChatMessage {
            room: "lg-r1".into(),
            seq: 7,
            id: uuid::Uuid::nil(),
            user: "u".into(),
            body: "with \"escapes\" \\ and ünïcode".into(),
            ts: 1,
            client_msg_id: "lg.3".into(),
            trace_id: "ab".repeat(16),
            prev: None,
            digest: None,
        };
        let text = ServerFrame::Message(msg).to_json();
        let f: Fast<'_> = serde_json::from_str(&text).unwrap();
        assert_eq!(f.ty, "message");
        assert_eq!((f.room.as_deref(), f.seq), (Some("lg-r1"), Some(7)));
        assert_eq!(f.client_msg_id.as_deref(), Some("lg.3"));
        assert_eq!(f.trace_id.as_deref(), Some("ab".repeat(16).as_str()));
        let ack = ServerFrame::Ack {
            room: "r".into(),
            client_msg_id: "lg.3".into(),
            id: uuid::Uuid::nil(),
            seq: 9,
            ts: 1,
            req: Some(Req::Int(3)),
        };
        let text = ack.to_json();
        let f: Fast<'_> = serde_json::from_str(&text).unwrap();
        assert_eq!((f.ty.as_ref(), f.seq), ("ack", Some(9)));
    }
}
