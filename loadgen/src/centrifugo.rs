//! `--protocol centrifugo`: loadgen's clients speaking Centrifugo's client protocol v2 in JSON,
//! so the same workloads can be run against Centrifugo and chat (deploy/bench/vs-centrifugo).
//!
//! The protocol (github.com/centrifugal/protocol, client.proto, read for this): a client sends
//! commands, JSON objects with an `id` and one request field (`connect`, `subscribe`,
//! `publish`); the server answers each with a reply carrying the same `id` and either `error`
//! or the request's result under the same field name (`{"id":3,"publish":{}}`). Asynchronous
//! pushes come as replies without an id, `{"push":{"channel":..,"pub":{"data":..}}}`. Several
//! replies may share one WebSocket frame, separated by `\n`. The server pings with an empty
//! reply `{}` and the client answers with an empty command `{}`.
//!
//! How it maps onto loadgen's measurements:
//! - a room is a channel; joining is `subscribe`;
//! - a send is `publish` with data `{"c": client_msg_id, "b": body}`; its reply is the ack
//!   (send → ack latency), its `error` a rejection;
//! - a `push.pub` is a delivery; the `client_msg_id` in its data names the send, whose scheduled
//!   instant gives the end-to-end latency (no clocks are compared).
//!
//! What is audited and what is not: Centrifugo with history off gives publications no offset
//! and its publish result no position, so there are no seqs. Each member keeps the set of sends
//! it got; [`finalize`] reports, per acked send, the members subscribed before it was written
//! that never got it (`missing`) and every second copy (`duplicate`), plus unanswered sends
//! (`unacked`) and publish errors (`rejected`). Order, gaps, resumed memberships and
//! idempotent retries are not audited: a send unanswered when its connection drops is not
//! retried (a publish is not idempotent) and counts as unacked; a lost connection reconnects
//! and subscribes again as a new membership.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures_util::stream::SplitStream;
use futures_util::{SinkExt, StreamExt};
use protocol::ErrorCode;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use crate::audit::{AuditResult, Finding, FindingCounts, FindingKind, Records, Track, TrackProgress};
use crate::client::{backoff, dial, mint_token, write_loop, ClientOutcome, Cmd, Ready, Ws, INITIAL_ATTEMPTS};
use crate::metrics::Lat;
use crate::outgoing::{note_written, ScheduledSends};
use crate::plan::Plan;
use crate::runner::Shared;
use crate::schedule::Action;

/// Subscriptions one client may hold: command ids below this are `subscribe`s (id 2 + the
/// track's index), ids from [`PUBLISH_ID_BASE`] are `publish`es; id 1 is `connect`.
pub const MAX_SUBSCRIPTIONS: u32 = 1 << 20;
/// Command id of `publish` of send `i`: `PUBLISH_ID_BASE + i` (sends number below 2^31).
const PUBLISH_ID_BASE: u32 = 1 << 31;
/// Command id of `connect`.
const CONNECT_ID: u32 = 1;
/// Centrifugo's error codes for a bad or expired token (they mean: do not retry as is).
const UNAUTHORIZED_CODES: [u32; 2] = [101, 109];
/// The WebSocket close code Centrifugo answers a `connect` with a token it cannot verify.
const INVALID_TOKEN_CLOSE: u16 = 3500;

// === wire: commands ===

/// A command to the server: an id and one request.
#[derive(Debug, Serialize)]
struct Command<'a> {
    id: u32,
    #[serde(flatten)]
    request: Request<'a>,
}

/// The requests loadgen makes; serialized as the one field named after the method.
#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
enum Request<'a> {
    Connect {
        #[serde(skip_serializing_if = "Option::is_none")]
        token: Option<&'a str>,
        name: &'a str,
    },
    Subscribe {
        channel: &'a str,
    },
    Publish {
        channel: &'a str,
        data: Payload<'a>,
    },
}

/// The data of loadgen's publications: the send's `client_msg_id` and its body. Read back
/// leniently: an object without `c` is someone else's publication (not audited).
#[derive(Debug, Serialize, Deserialize)]
struct Payload<'a> {
    #[serde(borrow, default)]
    c: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    b: Cow<'a, str>,
}

fn encode(id: u32, request: Request<'_>) -> String {
    serde_json::to_string(&Command { id, request }).unwrap_or_default()
}

/// The empty command that answers a server ping.
const PONG: &str = "{}";

// === wire: replies ===

/// One reply or push, with the fields loadgen reads (borrowed from the frame where it can).
#[derive(Debug, Default, Deserialize)]
struct Reply<'a> {
    #[serde(default)]
    id: u32,
    #[serde(default, borrow)]
    error: Option<ReplyError<'a>>,
    #[serde(default, borrow)]
    push: Option<Push<'a>>,
}

/// An `error` of a reply.
#[derive(Debug, Deserialize)]
struct ReplyError<'a> {
    #[serde(default)]
    code: u32,
    #[serde(default, borrow)]
    message: Cow<'a, str>,
}

/// A push: a publication, or a disconnect or unsubscribe notice.
#[derive(Debug, Deserialize)]
struct Push<'a> {
    #[serde(default, borrow)]
    channel: Cow<'a, str>,
    #[serde(default, borrow, rename = "pub")]
    publication: Option<Publication<'a>>,
    #[serde(default)]
    disconnect: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    unsubscribe: Option<serde::de::IgnoredAny>,
}

/// A publication; only loadgen's own data is read.
#[derive(Debug, Deserialize)]
struct Publication<'a> {
    #[serde(default, borrow)]
    data: Option<Payload<'a>>,
}

/// One line of a frame, decoded.
#[derive(Debug, PartialEq, Eq)]
enum Incoming<'a> {
    /// `{}`: the server's ping, to be answered with `{}`.
    Ping,
    /// The answer to command `id`: `Ok` or the error's code and message.
    Reply { id: u32, result: Result<(), (u32, Cow<'a, str>)> },
    /// A publication in `channel`; `client_msg_id` when its data is loadgen's.
    Publication { channel: Cow<'a, str>, client_msg_id: Option<Cow<'a, str>> },
    /// The server unsubscribed the client from `channel`.
    Unsubscribed { channel: Cow<'a, str> },
    /// The server is closing the connection.
    Disconnect,
    /// Anything else (a join or leave push, say).
    Other,
}

/// Splits a frame into its replies (one per non-empty line) and decodes each; a line that is
/// not a reply is an `Err` with the line.
fn decode_frame(text: &str) -> impl Iterator<Item = Result<Incoming<'_>, &str>> {
    text.split('\n').map(|line| line.trim_end_matches('\r')).filter(|line| !line.trim().is_empty()).map(decode_line)
}

fn decode_line(line: &str) -> Result<Incoming<'_>, &str> {
    let reply: Reply<'_> = serde_json::from_str(line).map_err(|_| line)?;
    Ok(match reply {
        Reply { id: 0, error: None, push: None } => Incoming::Ping,
        Reply { id: 0, push: Some(push), .. } => match push {
            Push { publication: Some(p), channel, .. } => {
                Incoming::Publication { channel, client_msg_id: p.data.and_then(|d| d.c) }
            }
            Push { unsubscribe: Some(_), channel, .. } => Incoming::Unsubscribed { channel },
            Push { disconnect: Some(_), .. } => Incoming::Disconnect,
            _ => Incoming::Other,
        },
        Reply { id: 0, .. } => Incoming::Other,
        Reply { id, error: Some(e), .. } => Incoming::Reply { id, result: Err((e.code, e.message)) },
        Reply { id, error: None, .. } => Incoming::Reply { id, result: Ok(()) },
    })
}

/// Centrifugo's error code as the closest chat protocol code (for the report's error counts and
/// rejected sends).
fn error_code(code: u32) -> ErrorCode {
    match code {
        101 | 109 => ErrorCode::Unauthorized,
        103 => ErrorCode::Forbidden,
        111 => ErrorCode::RateLimited,
        100 => ErrorCode::Internal,
        _ => ErrorCode::BadRequest,
    }
}

// === the audit's evidence ===

/// Synthetic per-room seqs for acks: the n-th publish acked in a room is acked as seq n, so the
/// drain check (every member caught up with its room's highest acked seq) works as for chat,
/// with a member's "last seq" being the number of sends it got.
#[derive(Debug)]
pub struct AckOrdinals(Vec<AtomicU64>);

impl AckOrdinals {
    /// Counters for `rooms` rooms.
    pub fn new(rooms: usize) -> Self {
        Self((0..rooms).map(|_| AtomicU64::new(0)).collect())
    }

    /// The seq of the next ack in `room`.
    fn next(&self, room: u32) -> u64 {
        self.0.get(room as usize).map_or(0, |n| n.fetch_add(1, Ordering::Relaxed) + 1)
    }
}

/// One client's membership of one channel as the audit sees it at the end.
#[derive(Debug, Clone)]
pub struct Member {
    /// Room number.
    pub room: u32,
    /// Client number.
    pub client: u32,
    /// When the current subscription began (its reply arrived); `None` when not subscribed at
    /// the end (not audited).
    pub since_us: Option<u64>,
    /// Sends delivered during the current subscription.
    pub got: HashSet<u32>,
    /// Sends delivered again during the current subscription, once per extra copy.
    pub duplicates: Vec<u32>,
}

// === one client ===

/// One Centrifugo client's state, apart from its socket (so tests can drive it with frames).
pub struct Client {
    shared: Arc<Shared>,
    idx: u32,
    /// One per room: joined state and progress for the drain check.
    tracks: Vec<Track>,
    /// One per room: what it got.
    members: Vec<Member>,
    /// Per track: when its `subscribe` was written.
    subscribing: Vec<Option<u64>>,
    subscribes_outstanding: usize,
    /// Scheduled, not written yet (offline, or the writer channel was full).
    queue: std::collections::VecDeque<u32>,
    ready: bool,
    ready_reported: bool,
    rng: StdRng,
}

impl Client {
    /// A client that has not connected yet.
    pub fn new(shared: Arc<Shared>, idx: u32) -> Self {
        let rooms = &shared.plan.client_rooms[idx as usize];
        let tracks: Vec<Track> = rooms.iter().map(|&r| Track::new(r, idx)).collect();
        let members = rooms
            .iter()
            .map(|&room| Member { room, client: idx, since_us: None, got: HashSet::new(), duplicates: Vec::new() })
            .collect();
        let rng = StdRng::seed_from_u64(shared.config.seed ^ crate::schedule::mix(idx as u64 + 1));
        Self {
            subscribing: vec![None; tracks.len()],
            tracks,
            members,
            shared,
            idx,
            subscribes_outstanding: 0,
            queue: Default::default(),
            ready: false,
            ready_reported: false,
            rng,
        }
    }

    /// The client's tracks (for the drain check's progress).
    pub fn tracks(&self) -> &[Track] {
        &self.tracks
    }

    /// Each track's progress, with its room.
    pub fn progress(&self) -> Vec<(u32, Arc<TrackProgress>)> {
        self.tracks.iter().map(|t| (t.room, t.progress())).collect()
    }

    /// Handles one frame from the server; returns a fatal reason when the connection must be
    /// given up.
    fn on_text(&mut self, text: &str, tx: &mpsc::Sender<Message>) -> Option<&'static str> {
        for item in decode_frame(text) {
            match item {
                Ok(Incoming::Ping) => {
                    if tx.try_send(Message::text(PONG)).is_err() {
                        self.shared.metrics.error(self.idx, "pong_not_sent");
                    }
                }
                Ok(Incoming::Publication { channel, client_msg_id }) => {
                    self.on_publication(&channel, client_msg_id.as_deref())
                }
                Ok(Incoming::Reply { id, result }) => self.on_reply(id, result, tx),
                Ok(Incoming::Unsubscribed { channel }) => {
                    self.shared.metrics.error(self.idx, "server_unsubscribed");
                    if let Some(ti) = self.track_of(&channel) {
                        self.tracks[ti].abandon();
                        self.members[ti].since_us = None;
                    }
                }
                Ok(Incoming::Disconnect) => return Some("server_disconnect"),
                Ok(Incoming::Other) => {}
                Err(_) => self.shared.metrics.error(self.idx, "unparseable_frame"),
            }
        }
        None
    }

    fn track_of(&self, channel: &str) -> Option<usize> {
        let room = self.shared.plan.room_index(channel)?;
        self.tracks.iter().position(|t| t.room == room)
    }

    /// A delivery: counted once per member and send, its latency from the scheduled instant.
    fn on_publication(&mut self, channel: &str, client_msg_id: Option<&str>) {
        let now = self.shared.clock.now_us();
        let shared = &*self.shared;
        let ti = self.track_of(channel).filter(|&ti| self.tracks[ti].is_joined());
        let Some(ti) = ti else {
            shared.metrics.stray.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let Some(i) = client_msg_id.and_then(|c| shared.plan.send_index(c)) else {
            // Someone else's publication in one of our channels: seen, not audited.
            shared.metrics.shard(self.idx).checked += 1;
            return;
        };
        let member = &mut self.members[ti];
        let first = member.got.insert(i);
        let mut w = shared.metrics.shard(self.idx);
        w.checked += 1;
        if !first {
            member.duplicates.push(i);
            return;
        }
        // The member's "last seq" counts what it got, for the drain check.
        let track = &mut self.tracks[ti];
        track.deliver(track.last() + 1);
        if let Some(rec) = shared.records.get(i) {
            w.delivered += 1;
            w.record(Lat::E2e, now.saturating_sub(shared.records.scheduled_at(rec)));
        }
    }

    fn on_reply(&mut self, id: u32, result: Result<(), (u32, Cow<'_, str>)>, tx: &mpsc::Sender<Message>) {
        let now = self.shared.clock.now_us();
        let shared = &*self.shared;
        if id >= PUBLISH_ID_BASE {
            let i = id - PUBLISH_ID_BASE;
            let Some(rec) = shared.records.get(i) else { return };
            match result {
                Ok(()) => {
                    let seq = shared.ack_ordinals.next(rec.room);
                    if shared.records.ack(i, [0; 16], seq, now) == crate::audit::AckOutcome::First {
                        let mut w = shared.metrics.shard(self.idx);
                        w.acked += 1;
                        w.record(Lat::Ack, now.saturating_sub(shared.records.scheduled_at(rec)));
                    }
                }
                Err((code, _)) => {
                    let code = error_code(code);
                    shared.metrics.error(self.idx, code.as_str());
                    shared.records.reject(i, code);
                }
            }
        } else if let Some(ti) = id.checked_sub(2).map(|ti| ti as usize).filter(|&ti| ti < self.tracks.len()) {
            let Some(started) = self.subscribing[ti].take() else { return };
            match result {
                Ok(()) => {
                    self.tracks[ti].joined(0, now, false);
                    let member = &mut self.members[ti];
                    member.since_us = Some(now);
                    member.got.clear();
                    member.duplicates.clear();
                    shared.metrics.shard(self.idx).record(Lat::Join, now.saturating_sub(started));
                }
                Err((code, _)) => {
                    shared.metrics.error(self.idx, error_code(code).as_str());
                    self.tracks[ti].abandon();
                }
            }
            self.subscribe_done(tx);
        }
    }

    /// Writes a `subscribe` per track.
    fn start_subscribes(&mut self, tx: &mpsc::Sender<Message>) {
        self.ready = false;
        self.subscribes_outstanding = self.tracks.len();
        let now = self.shared.clock.now_us();
        for (ti, t) in self.tracks.iter().enumerate() {
            let channel = &self.shared.plan.rooms[t.room as usize];
            self.subscribing[ti] = Some(now);
            // The channel is fresh and at least as large as the client's rooms.
            let _ = tx.try_send(Message::text(encode(2 + ti as u32, Request::Subscribe { channel })));
        }
        if self.tracks.is_empty() {
            self.subscribes_outstanding = 1;
            self.subscribe_done(tx);
        }
    }

    fn subscribe_done(&mut self, tx: &mpsc::Sender<Message>) {
        self.subscribes_outstanding = self.subscribes_outstanding.saturating_sub(1);
        if self.subscribes_outstanding == 0 {
            self.ready = true;
            self.flush_backlog(tx);
        }
    }

    /// The connection is gone: memberships end (there is no history to resume from).
    fn disconnected(&mut self) {
        self.ready = false;
        for (ti, t) in self.tracks.iter_mut().enumerate() {
            self.subscribing[ti] = None;
            t.abandon();
            self.members[ti].since_us = None;
        }
    }

    fn into_outcome(self) -> ClientOutcome {
        ClientOutcome { tracks: self.tracks, centrifugo: self.members }
    }
}

/// A connected client: the read half and the writer task's channel.
struct Conn {
    stream: SplitStream<Ws>,
    tx: mpsc::Sender<Message>,
    writer: JoinHandle<()>,
}

/// TCP connect, WebSocket handshake, `connect` → its reply. Errors are short codes counted in
/// the report.
async fn connect(shared: &Shared, idx: u32, shift: usize) -> Result<Conn, &'static str> {
    let mut ws = dial(shared, idx, shift).await?;
    let user = shared.plan.user(idx);
    let token = match &shared.config.token_secret {
        Some(secret) => Some(mint_token(shared, idx, &user, secret)?),
        None => None,
    };
    let connect = encode(CONNECT_ID, Request::Connect { token: token.as_deref(), name: "loadgen" });
    ws.send(Message::text(connect)).await.map_err(|_| "write_failed")?;
    'wait: loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                for item in decode_frame(text.as_str()) {
                    match item {
                        Ok(Incoming::Reply { id: CONNECT_ID, result: Ok(()) }) => break 'wait,
                        Ok(Incoming::Reply { id: CONNECT_ID, result: Err((code, _)) }) => {
                            return Err(if UNAUTHORIZED_CODES.contains(&code) {
                                "unauthorized"
                            } else {
                                "connect_rejected"
                            })
                        }
                        Ok(Incoming::Disconnect) => return Err("closed_before_connect_reply"),
                        _ => {}
                    }
                }
            }
            Some(Ok(Message::Close(Some(frame)))) if u16::from(frame.code) == INVALID_TOKEN_CLOSE => {
                return Err("unauthorized")
            }
            Some(Ok(Message::Close(_))) | None => return Err("closed_before_connect_reply"),
            Some(Err(_)) => return Err("read_error"),
            Some(Ok(_)) => {}
        }
    }
    let (sink, stream) = ws.split();
    let (tx, rx) = mpsc::channel(shared.config.queue.max(shared.plan.client_rooms[idx as usize].len() + 1));
    let writer = tokio::spawn(write_loop(sink, rx));
    Ok(Conn { stream, tx, writer })
}

/// Runs a Centrifugo client until [`Cmd::Stop`]; reports [`Ready`] once. The same shape as
/// [`crate::client::run_client`], without history reads, resumes or retries.
pub async fn run_client(mut st: Client, mut cmds: mpsc::Receiver<Cmd>, ready_tx: mpsc::Sender<Ready>) -> ClientOutcome {
    let shared = st.shared.clone();
    let idx = st.idx;
    let mut attempt = 0u32;
    let mut shift = 0usize;
    let mut first = true;
    'life: loop {
        // === connect ===
        let started = shared.clock.now_us();
        let connecting = tokio::time::timeout(shared.config.connect_timeout, connect(&shared, idx, shift));
        tokio::pin!(connecting);
        let result = loop {
            tokio::select! {
                r = &mut connecting => break r,
                cmd = cmds.recv() => match cmd {
                    Some(Cmd::Act(Action::Send(i))) => st.enqueue(i),
                    Some(Cmd::Act(_)) => {}
                    Some(Cmd::Stop) | None => break 'life,
                },
            }
        };
        let mut conn = match result {
            Ok(Ok(c)) => c,
            failed => {
                shared.metrics.error(idx, if let Ok(Err(code)) = failed { code } else { "connect_timeout" });
                attempt += 1;
                shift += 1;
                if !st.ready_reported && attempt >= INITIAL_ATTEMPTS {
                    st.ready_reported = true;
                    let _ = ready_tx.send(Ready { ok: false }).await;
                }
                let pause = tokio::time::sleep(backoff(&mut st.rng, attempt));
                tokio::pin!(pause);
                loop {
                    tokio::select! {
                        _ = &mut pause => continue 'life,
                        cmd = cmds.recv() => match cmd {
                            Some(Cmd::Act(Action::Send(i))) => st.enqueue(i),
                            Some(Cmd::Act(_)) => {}
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
        st.start_subscribes(&conn.tx);

        // === connected ===
        let lost = loop {
            tokio::select! {
                frame = conn.stream.next() => match frame {
                    Some(Ok(Message::Text(text))) => {
                        if let Some(reason) = st.on_text(text.as_str(), &conn.tx) {
                            break Some(reason);
                        }
                        if st.ready && !st.ready_reported {
                            st.ready_reported = true;
                            let ok = st.tracks.iter().all(Track::is_joined);
                            let _ = ready_tx.send(Ready { ok }).await;
                        }
                    }
                    Some(Ok(Message::Close(_))) | None => break Some("server_closed"),
                    Some(Err(_)) => break Some("read_error"),
                    Some(Ok(_)) => {}
                },
                permit = conn.tx.reserve(), if st.ready && !st.queue.is_empty() => {
                    drop(permit);
                    st.flush_backlog(&conn.tx);
                }
                cmd = cmds.recv() => match cmd {
                    Some(Cmd::Act(Action::Send(i))) => st.send(i, Some(&conn.tx)),
                    Some(Cmd::Act(Action::History(_))) => {}
                    Some(Cmd::Act(Action::Drop)) => break Some("scenario_drop"),
                    Some(Cmd::Stop) | None => break None,
                },
            }
        };
        shared.metrics.connected.fetch_sub(1, Ordering::Relaxed);
        first = false;
        let Some(cause) = lost else {
            // Dropping the sender lets the writer send a close frame and finish.
            drop(conn.tx);
            break 'life;
        };
        conn.writer.abort();
        shared.metrics.reconnect(cause);
        st.disconnected();
        shift += 1;
        tokio::time::sleep(backoff(&mut st.rng, 0)).await;
    }
    if !st.ready_reported {
        let _ = ready_tx.send(Ready { ok: false }).await;
    }
    st.into_outcome()
}

// === the verdict ===

/// The audit of a Centrifugo run: per acked send, which members subscribed before it was
/// written (and still subscribed at the end) never got it, and which got it twice; sends with
/// no answer; publish errors (listed, not failing). Order is not audited (no seqs).
pub fn finalize(records: &Records, members: &[Member], plan: &Plan, stray: u64, max_findings: usize) -> AuditResult {
    let mut by_room: Vec<Vec<&Member>> = vec![Vec::new(); plan.rooms.len()];
    for m in members.iter().filter(|m| m.since_us.is_some()) {
        if let Some(list) = by_room.get_mut(m.room as usize) {
            list.push(m);
        }
    }
    let members_audited = by_room.iter().map(Vec::len).sum::<usize>() as u64;
    let mut counts = FindingCounts::default();
    let mut findings = Vec::new();
    let (mut sent, mut acked, mut not_sent, mut expected) = (0u64, 0u64, 0u64, 0u64);
    // Per room, when its latest acked publish was written: members subscribed before it
    // expected at least one.
    let mut latest_acked: Vec<Option<u64>> = vec![None; plan.rooms.len()];
    let finding = |kind, i: u32, room: u32, count: u64, who: Vec<u32>, detail: String| Finding {
        kind,
        room: plan.rooms.get(room as usize).cloned().unwrap_or_default(),
        seq: None,
        id: None,
        trace_id: None,
        client_msg_id: Some(plan.client_msg_id(i)),
        count,
        recipients: who.iter().map(|&c| plan.user(c)).collect(),
        detail,
    };
    for i in 0..records.len() as u32 {
        let Some(r) = records.get(i) else { continue };
        let Some(sent_us) = r.sent_us() else {
            not_sent += 1;
            continue;
        };
        sent += 1;
        if r.ack().is_none() {
            if let Some(code) = r.rejected() {
                counts.rejected += 1;
                let detail = format!("publish answered with error `{}`", code.as_str());
                findings.push(finding(FindingKind::Rejected, i, r.room, 1, vec![r.sender], detail));
            } else {
                counts.unacked += 1;
                let detail = "no publish reply by the end of the drain".to_string();
                findings.push(finding(FindingKind::Unacked, i, r.room, 1, vec![r.sender], detail));
            }
            continue;
        }
        acked += 1;
        if let Some(latest) = latest_acked.get_mut(r.room as usize) {
            *latest = (*latest).max(Some(sent_us));
        }
        let expecting = by_room.get(r.room as usize).map(Vec::as_slice).unwrap_or_default();
        let expecting: Vec<&&Member> = expecting.iter().filter(|m| m.since_us.is_some_and(|s| s < sent_us)).collect();
        expected += expecting.len() as u64;
        let missed: Vec<u32> = expecting.iter().filter(|m| !m.got.contains(&i)).map(|m| m.client).collect();
        if !missed.is_empty() {
            let n = missed.len() as u64;
            counts.missing_messages += 1;
            counts.missing_deliveries += n;
            let detail = format!("{n} of {} expected members never got it", expecting.len());
            findings.push(finding(FindingKind::Missing, i, r.room, n, cap(missed), detail));
        }
    }
    // Duplicates, one finding per send.
    let mut dups: BTreeMap<u32, (u64, Vec<u32>)> = BTreeMap::new();
    for m in members.iter().filter(|m| m.since_us.is_some()) {
        for &i in &m.duplicates {
            let (n, who) = dups.entry(i).or_default();
            *n += 1;
            who.push(m.client);
        }
    }
    for (i, (n, who)) in dups {
        counts.duplicate_deliveries += n;
        let room = records.get(i).map_or(0, |r| r.room);
        let detail = format!("delivered again {n} times");
        findings.push(finding(FindingKind::Duplicate, i, room, n, cap(who), detail));
    }
    findings.sort_by(|a, b| (a.kind, &a.room, &a.client_msg_id).cmp(&(b.kind, &b.room, &b.client_msg_id)));
    let mut per_kind: BTreeMap<FindingKind, usize> = BTreeMap::new();
    let before = findings.len();
    findings.retain(|f| {
        let n = per_kind.entry(f.kind).or_default();
        *n += 1;
        *n <= max_findings
    });
    let findings_truncated = findings.len() < before;
    let failing = [
        (counts.missing_messages, "missing message(s)"),
        (counts.duplicate_deliveries, "duplicate delivery(ies)"),
        (counts.unacked, "unacked publish(es)"),
    ];
    let parts: Vec<String> = failing.iter().filter(|(n, _)| *n > 0).map(|(n, what)| format!("{n} {what}")).collect();
    let scheduled = records.len() as u64;
    let (passed, verdict) = if !parts.is_empty() {
        (false, format!("FAILED: {}", parts.join(", ")))
    } else if scheduled > 0 && acked == 0 {
        (false, "FAILED: no publish was acked, so nothing could be checked".to_string())
    } else {
        (
            true,
            format!(
                "PASSED: {expected} expected deliveries of {acked} acked publishes to {members_audited} members all arrived once (Centrifugo: order not audited, pushes carry no seq)"
            ),
        )
    };
    AuditResult {
        passed,
        verdict,
        scheduled,
        sent,
        acked,
        not_sent,
        members_audited,
        members_excluded: plan.memberships().saturating_sub(members_audited),
        members_expecting_none: by_room
            .iter()
            .zip(&latest_acked)
            .map(|(list, latest)| list.iter().filter(|m| latest.is_none_or(|l| m.since_us >= Some(l))).count() as u64)
            .sum(),
        expected_deliveries: expected,
        delivered: expected.saturating_sub(counts.missing_deliveries),
        stray_deliveries: stray,
        counts,
        findings,
        findings_truncated,
    }
}

/// The first few clients of a finding (counts stay exact).
fn cap(mut clients: Vec<u32>) -> Vec<u32> {
    clients.truncate(10);
    clients
}

impl ScheduledSends for Client {
    fn shared(&self) -> &Shared {
        &self.shared
    }

    fn idx(&self) -> u32 {
        self.idx
    }

    fn ready(&self) -> bool {
        self.ready
    }

    fn backlog(&mut self) -> &mut std::collections::VecDeque<u32> {
        &mut self.queue
    }

    /// Writes the `publish` of send `i`.
    fn write_one(&mut self, i: u32, tx: &mpsc::Sender<Message>) -> bool {
        let Ok(permit) = tx.try_reserve() else { return false };
        let shared = &*self.shared;
        let Some(rec) = shared.records.get(i) else { return true };
        let cfg = &shared.config;
        let len = crate::schedule::body_len(i, cfg.body.min, cfg.body.max, cfg.seed);
        let start = (crate::schedule::mix(i as u64 ^ cfg.seed) as usize) % (shared.body_pool.len() - len + 1);
        let client_msg_id = shared.plan.client_msg_id(i);
        let data = Payload {
            c: Some(Cow::Borrowed(client_msg_id.as_str())),
            b: Cow::Borrowed(&shared.body_pool[start..start + len]),
        };
        let text =
            encode(PUBLISH_ID_BASE + i, Request::Publish { channel: &shared.plan.rooms[rec.room as usize], data });
        note_written(shared, self.idx, i, rec);
        permit.send(Message::text(text));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::PlannedSend;

    #[test]
    fn commands_are_one_field_named_after_the_method() {
        let connect = encode(1, Request::Connect { token: Some("t"), name: "loadgen" });
        assert_eq!(connect, r#"{"id":1,"connect":{"token":"t","name":"loadgen"}}"#);
        let anonymous = encode(1, Request::Connect { token: None, name: "loadgen" });
        assert_eq!(anonymous, r#"{"id":1,"connect":{"name":"loadgen"}}"#);
        assert_eq!(encode(2, Request::Subscribe { channel: "lg-r0" }), r#"{"id":2,"subscribe":{"channel":"lg-r0"}}"#);
        let data = Payload { c: Some("lg.7".into()), b: "hello".into() };
        let publish = encode(PUBLISH_ID_BASE + 7, Request::Publish { channel: "lg-r0", data });
        assert_eq!(publish, r#"{"id":2147483655,"publish":{"channel":"lg-r0","data":{"c":"lg.7","b":"hello"}}}"#);
    }

    #[test]
    fn a_frame_of_several_replies_is_split_on_newlines() {
        let frame = concat!(
            r#"{"id":1,"connect":{"client":"c1","version":"6.9.1","ping":25,"pong":true}}"#,
            "\n",
            r#"{"push":{"channel":"lg-r0","pub":{"data":{"c":"lg.3","b":"x"},"offset":4}}}"#,
            "\n",
            r#"{"id":2147483650,"error":{"code":103,"message":"permission denied"}}"#,
            "\n\n",
            "{}",
            "\n",
            r#"{"id":3,"subscribe":{}}"#,
            "\n",
        );
        let items: Vec<_> = decode_frame(frame).collect();
        assert_eq!(
            items,
            vec![
                Ok(Incoming::Reply { id: 1, result: Ok(()) }),
                Ok(Incoming::Publication { channel: "lg-r0".into(), client_msg_id: Some("lg.3".into()) }),
                Ok(Incoming::Reply { id: PUBLISH_ID_BASE + 2, result: Err((103, "permission denied".into())) }),
                Ok(Incoming::Ping),
                Ok(Incoming::Reply { id: 3, result: Ok(()) }),
            ]
        );
    }

    #[test]
    fn pings_pushes_of_others_and_garbage_are_told_apart() {
        assert_eq!(decode_line("{}"), Ok(Incoming::Ping));
        assert_eq!(decode_line(r#"{"id":3,"publish":{}}"#), Ok(Incoming::Reply { id: 3, result: Ok(()) }));
        // Another publisher's object data without `c` is a publication loadgen does not audit;
        // data that is not an object is counted as an unparseable frame.
        assert_eq!(
            decode_line(r#"{"push":{"channel":"a","pub":{"data":{"x":1}}}}"#),
            Ok(Incoming::Publication { channel: "a".into(), client_msg_id: None })
        );
        assert!(decode_line(r#"{"push":{"channel":"a","pub":{"data":"text"}}}"#).is_err());
        assert_eq!(
            decode_line(r#"{"push":{"channel":"a","unsubscribe":{"code":2000,"reason":"server unsubscribe"}}}"#),
            Ok(Incoming::Unsubscribed { channel: "a".into() })
        );
        assert_eq!(
            decode_line(r#"{"push":{"disconnect":{"code":3001,"reason":"shutdown"}}}"#),
            Ok(Incoming::Disconnect)
        );
        assert_eq!(decode_line(r#"{"push":{"channel":"a","join":{"info":{}}}}"#), Ok(Incoming::Other));
        assert!(decode_line("not json").is_err());
        assert_eq!(decode_frame("{}\r\n").collect::<Vec<_>>(), vec![Ok(Incoming::Ping)]);
    }

    /// Room 0 with clients 0, 1 and 2 (2 subscribed only after the sends), four sends from
    /// client 0: 0 and 1 acked, 2 never answered, 3 rejected.
    fn verdict_of(got: [&[u32]; 2], duplicates: &[u32]) -> AuditResult {
        let users = (0..3).map(|c| format!("t-u{c}")).collect();
        let plan = Plan::explicit("t", users, vec!["t-r0".into()], vec![vec![0]; 3]);
        let sends: Vec<PlannedSend> = (0..4).map(|i| PlannedSend { at_us: i * 1000, client: 0, room: 0 }).collect();
        let records = Records::new(&sends, 1);
        for i in 0..4u32 {
            records.mark_sent(i, 100 + i as u64);
        }
        records.ack(0, [0; 16], 1, 500);
        records.ack(1, [0; 16], 2, 600);
        records.reject(3, ErrorCode::Forbidden);
        let member = |client: u32, since_us: u64, got: &[u32], duplicates: &[u32]| Member {
            room: 0,
            client,
            since_us: Some(since_us),
            got: got.iter().copied().collect(),
            duplicates: duplicates.to_vec(),
        };
        let members = [member(0, 10, got[0], duplicates), member(1, 10, got[1], &[]), member(2, 5_000, &[], &[])];
        finalize(&records, &members, &plan, 0, 10)
    }

    #[test]
    fn the_verdict_counts_missing_duplicate_and_unanswered_publishes() {
        let clean = verdict_of([&[0, 1], &[0, 1]], &[]);
        assert!(!clean.passed, "send 2 was never answered: {}", clean.verdict);
        assert_eq!((clean.sent, clean.acked, clean.members_audited), (4, 2, 3));
        assert_eq!(clean.members_expecting_none, 1, "client 2 subscribed after every acked publish");
        assert_eq!((clean.expected_deliveries, clean.delivered), (4, 4), "client 2 subscribed after the sends");
        assert_eq!((clean.counts.unacked, clean.counts.rejected), (1, 1));

        let faulty = verdict_of([&[0, 1], &[0]], &[0, 0]);
        assert_eq!((faulty.counts.missing_messages, faulty.counts.missing_deliveries), (1, 1));
        assert_eq!(faulty.counts.duplicate_deliveries, 2);
        assert_eq!(faulty.delivered, 3);
        let missing: Vec<_> = faulty.findings.iter().filter(|f| f.kind == FindingKind::Missing).collect();
        assert_eq!(missing.len(), 1);
        assert_eq!(missing[0].client_msg_id.as_deref(), Some("t.1"));
        assert_eq!(missing[0].recipients, vec!["t-u1".to_string()]);
        assert!(faulty.verdict.starts_with("FAILED: 1 missing message(s), 2 duplicate delivery(ies), 1 unacked"));
    }
}
