//! One WebSocket connection: the protocol state machine, per-room delivery cursors and the
//! writer that batches frames.
//!
//! A single task owns the socket. It reads client frames, keeps up to `max_in_flight_sends`
//! sends waiting for their acks at once, and writes what the room hubs queue for it. Every room
//! the connection joined has a cursor, the last seq written: a message at or below it is
//! skipped, a message beyond `cursor + 1` is preceded by the missing ones from the store. So a
//! join with `since`, a queue that overflowed, and live delivery all meet without a gap or a
//! duplicate.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::stream::{FuturesUnordered, SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use protocol::bus::{SendCommand, SendOutcome};
use protocol::frames::{parse_client_frame, ClientFrame};
use protocol::{names, ErrorCode, Req, ServerFrame};
use storage::PageQuery;
use uuid::Uuid;

use crate::auth::Identity;
use crate::hook::ConnectionWrites;
use crate::outbox::{Delivery, Outbound, Outbox};
use crate::rooms::Hub;
use crate::state::AppState;

/// Close code for a connection whose outbound queue stayed full.
pub const CLOSE_SLOW_CONSUMER: u16 = 4008;
/// Close code for a connection whose token expired while it was open.
pub const CLOSE_TOKEN_EXPIRED: u16 = 4001;
const CLOSE_POLICY: u16 = 1008;
const CLOSE_TOO_BIG: u16 = 1009;
const CLOSE_RESTART: u16 = 1012;
const CLOSE_PROTOCOL: u16 = 1002;

/// How much longer than a send's deadline the gateway waits for its outcome: more than any
/// store write a worker may still finish after checking the deadline.
const SUBMIT_MARGIN: std::time::Duration = std::time::Duration::from_secs(6);
/// How long a closing handshake may take before the socket is simply dropped.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);
/// Frames written per batch before a flush.
const WRITE_BATCH: usize = 128;

/// What a finished submit hands back: the request tag, room, client message id, trace id,
/// when it started, and the outcome.
type SubmitResult = (Option<Req>, String, String, String, Instant, Result<SendOutcome, bus::BusError>);
type InFlight = FuturesUnordered<Pin<Box<dyn std::future::Future<Output = SubmitResult> + Send>>>;

struct JoinedRoom {
    hub: Arc<Hub>,
    cursor: u64,
}

/// Why the connection loop ended.
enum End {
    /// The client went away or the socket failed.
    Gone,
    /// The server closes with this code and reason.
    Close(u16, &'static str),
}

struct Connection {
    id: u64,
    session: Uuid,
    app: Arc<AppState>,
    identity: Option<Identity>,
    query_token: Option<String>,
    rooms: HashMap<String, JoinedRoom>,
    outbox: Arc<Outbox>,
    limiter: DefaultDirectRateLimiter,
    sink: SplitSink<WebSocket, Message>,
    /// The delivery hook's interceptor for this connection (none in the product).
    hooked_writes: Option<Box<dyn ConnectionWrites>>,
    deliveries: u64,
}

/// Serves one upgraded WebSocket until it closes.
pub async fn serve(socket: WebSocket, app: Arc<AppState>, query_token: Option<String>) {
    let id = app.next_connection_id();
    let limits = &app.config.limits;
    let outbox = Outbox::new(id, limits.outbound_queue, limits.slow_consumer_timeout);
    let rate = NonZeroU32::new(limits.send_rate_per_sec).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(limits.send_burst).unwrap_or(rate);
    let (sink, stream) = socket.split();
    let session = Uuid::now_v7();
    let mut connection = Connection {
        id,
        session,
        identity: None,
        query_token,
        rooms: HashMap::new(),
        outbox,
        limiter: RateLimiter::direct(Quota::per_second(rate).allow_burst(burst)),
        sink,
        hooked_writes: app.delivery_hook.as_ref().map(|hook| hook.connection(session)),
        deliveries: 0,
        app: app.clone(),
    };
    app.metrics.connections.inc();
    app.metrics.connections_total.inc();
    let end = connection.run(stream).await;
    connection.outbox.close();
    if let End::Close(code, reason) = end {
        app.metrics.disconnects.with_label_values(&[reason_label(code)]).inc();
        let frame = CloseFrame { code, reason: Utf8Bytes::from_static(reason) };
        // A client that does not read cannot hold the task: give the close a moment, then drop.
        let close = async {
            let _ = connection.sink.send(Message::Close(Some(frame))).await;
            let _ = connection.sink.close().await;
        };
        let _ = tokio::time::timeout(CLOSE_GRACE, close).await;
    }
    for (_, joined) in connection.rooms.drain() {
        app.rooms.leave(&joined.hub, id).await;
    }
    app.metrics.connections.dec();
}

fn reason_label(code: u16) -> &'static str {
    match code {
        CLOSE_SLOW_CONSUMER => "slow_consumer",
        CLOSE_TOKEN_EXPIRED => "token_expired",
        CLOSE_POLICY => "policy",
        CLOSE_TOO_BIG => "too_large",
        CLOSE_RESTART => "draining",
        CLOSE_PROTOCOL => "protocol_error",
        _ => "other",
    }
}

impl Connection {
    /// The connection's loop. It lives as long as the connection, so its own state is kept
    /// small: the handlers of each event run as boxed futures, allocated only while they run
    /// (an idle connection then costs a few KiB, not the size of the deepest handler).
    async fn run(&mut self, mut stream: SplitStream<WebSocket>) -> End {
        let app = self.app.clone();
        let limits = &app.config.limits;
        let mut shutdown = self.app.shutdown_signal();
        let mut in_flight: InFlight = FuturesUnordered::new();
        // Before `hello`: the hello timeout. After it: when the token expires (auth on), or
        // never. One timer serves both, so an idle connection carries only one.
        let deadline = tokio::time::sleep(limits.hello_timeout);
        tokio::pin!(deadline);
        let mut deadline_armed = true;
        let mut hello_done = false;
        let mut ping = tokio::time::interval(limits.ping_interval);
        ping.tick().await;
        let mut last_heard = Instant::now();
        let outbox = self.outbox.clone();
        loop {
            let step = tokio::select! {
                () = draining(&mut shutdown) => {
                    let frame = ServerFrame::Reconnect { reason: "draining".into() };
                    let _ = self.write(frame.to_json().into()).await;
                    Err(End::Close(CLOSE_RESTART, "server draining; reconnect"))
                }
                () = outbox.kicked() => Err(End::Close(CLOSE_SLOW_CONSUMER, "slow consumer: outbound queue stayed full")),
                frame = stream.next(), if in_flight.len() < limits.max_in_flight_sends => {
                    last_heard = Instant::now();
                    match frame {
                        None => Err(End::Gone),
                        Some(Err(e)) => Err(read_error(e)),
                        Some(Ok(message)) => Box::pin(self.on_client_message(message, &mut in_flight)).await,
                    }
                }
                Some(done) = in_flight.next(), if !in_flight.is_empty() => Box::pin(self.on_submitted(done)).await,
                () = outbox.ready() => Box::pin(self.on_outbound()).await,
                () = &mut deadline, if deadline_armed => match self.identity {
                    None => {
                        let _ = self.error(ErrorCode::Unauthorized, "no hello within the time allowed", None).await;
                        Err(End::Close(CLOSE_POLICY, "hello timeout"))
                    }
                    Some(_) => {
                        let _ = self.error(ErrorCode::Unauthorized, "token expired: reconnect with a fresh token", None).await;
                        Err(End::Close(CLOSE_TOKEN_EXPIRED, "token expired"))
                    }
                },
                _ = ping.tick() => {
                    if last_heard.elapsed() > limits.ping_interval * 3 {
                        Err(End::Close(CLOSE_POLICY, "no traffic from client"))
                    } else {
                        self.sink.feed(Message::Ping(Default::default())).await.map_err(|_| End::Gone)
                    }
                }
            };
            if deadline_armed && !hello_done && self.identity.is_some() {
                hello_done = true;
                match self.identity.as_ref().and_then(|identity| identity.valid_until) {
                    Some(until) => deadline.as_mut().reset(instant_at_unix_secs(until)),
                    None => deadline_armed = false,
                }
            }
            let flushed = self.flush().await;
            match (step, flushed) {
                (Err(end), _) => return end,
                (Ok(()), Err(end)) => return end,
                (Ok(()), Ok(())) => {}
            }
        }
    }

    // === reading ===

    async fn on_client_message(&mut self, message: Message, in_flight: &mut InFlight) -> Result<(), End> {
        match message {
            Message::Text(text) => self.on_text(text.as_str(), in_flight).await,
            Message::Binary(_) => {
                self.count_frame("binary");
                self.error(ErrorCode::BadRequest, "binary frames are not supported; send JSON text frames", None).await
            }
            Message::Ping(_) | Message::Pong(_) => Ok(()),
            Message::Close(_) => Err(End::Gone),
        }
    }

    async fn on_text(&mut self, text: &str, in_flight: &mut InFlight) -> Result<(), End> {
        let max = self.app.config.limits.max_frame_bytes;
        if text.len() > max {
            self.count_frame("too_large");
            return self
                .error(ErrorCode::TooLarge, &format!("frame of {} bytes exceeds the limit of {max}", text.len()), None)
                .await;
        }
        let (frame, req) = match parse_client_frame(text) {
            Ok(parsed) => parsed,
            Err(e) => {
                self.count_frame("invalid");
                return self.error(ErrorCode::BadRequest, &e.message, e.req).await;
            }
        };
        self.count_frame(frame_type(&frame));
        let Some(identity) = self.identity.clone() else {
            return match frame {
                ClientFrame::Hello { user, token } => self.on_hello(user, token, req).await,
                _ => self.error(ErrorCode::Unauthorized, "send hello first", req).await,
            };
        };
        match frame {
            ClientFrame::Hello { .. } => {
                self.error(ErrorCode::BadRequest, "hello was already accepted on this connection", req).await
            }
            ClientFrame::Join { room, since } => self.on_join(&identity, room, since, req).await,
            ClientFrame::Leave { room } => self.on_leave(room, req).await,
            ClientFrame::Send { room, client_msg_id, body, traceparent } => {
                self.on_send(&identity, room, client_msg_id, body, traceparent, req, in_flight).await
            }
            ClientFrame::History { room, before, after, limit } => {
                self.on_history(&identity, room, before, after, limit, req).await
            }
            ClientFrame::Typing { room } => self.on_typing(&identity, room, req).await,
            ClientFrame::Ping => self.write_frame(ServerFrame::Pong { req }).await,
        }
    }

    async fn on_hello(&mut self, user: Option<String>, token: Option<String>, req: Option<Req>) -> Result<(), End> {
        let identity = match &self.app.verifier {
            Some(verifier) => match verifier.verify(token.as_deref().or(self.query_token.as_deref())) {
                Ok(identity) => identity,
                Err(e) => {
                    self.error(ErrorCode::Unauthorized, &e.to_string(), req).await?;
                    return Err(End::Close(CLOSE_POLICY, "unauthorized"));
                }
            },
            None => match user {
                Some(user) if names::is_valid_user(&user) => Identity { user, rooms: None, valid_until: None },
                Some(_) => {
                    return self
                        .error(ErrorCode::BadRequest, "user must be 1-64 characters from A-Z a-z 0-9 _ - .", req)
                        .await
                }
                None => {
                    return self
                        .error(ErrorCode::BadRequest, "hello needs a user (this server runs without auth)", req)
                        .await
                }
            },
        };
        let welcome = ServerFrame::Welcome {
            user: identity.user.clone(),
            session: self.session,
            gateway: self.app.config.gateway_id.clone(),
            req,
        };
        tracing::debug!(conn = self.id, user = %identity.user, "hello");
        self.identity = Some(identity);
        self.write_frame(welcome).await
    }

    async fn on_join(
        &mut self,
        identity: &Identity,
        room: String,
        since: Option<u64>,
        req: Option<Req>,
    ) -> Result<(), End> {
        if !names::is_valid_room(&room) {
            return self.error(ErrorCode::BadRequest, "room must be 1-64 characters from A-Z a-z 0-9 _ -", req).await;
        }
        if !identity.may_join(&room) {
            return self.error(ErrorCode::Forbidden, &format!("your token does not allow room {room}"), req).await;
        }
        if let Some(joined) = self.rooms.get(&room) {
            // Already joined: answer again, and replay what the client says it lacks.
            let (hub, cursor) = (joined.hub.clone(), joined.cursor);
            let members = hub.members();
            self.write_frame(ServerFrame::Joined {
                room: room.clone(),
                last_seq: hub.last_seq().max(cursor),
                members,
                req,
            })
            .await?;
            if let Some(since) = since.filter(|s| *s < cursor) {
                self.replay(&room, since, cursor).await?;
            }
            return Ok(());
        }
        let max_rooms = self.app.config.limits.max_rooms_per_connection;
        if self.rooms.len() >= max_rooms {
            return self
                .error(
                    ErrorCode::BadRequest,
                    &format!("at most {max_rooms} rooms per connection; leave one first"),
                    req,
                )
                .await;
        }
        let joined = match self.app.rooms.join(&room, &identity.user, self.outbox.clone()).await {
            Ok(joined) => joined,
            Err(e) => {
                tracing::warn!(room, error = %e, "join failed");
                return self.error(ErrorCode::Unavailable, "the room cannot be joined right now; retry", req).await;
            }
        };
        self.app.metrics.joins.inc();
        let last_seq = joined.last_seq;
        let frame = ServerFrame::Joined { room: room.clone(), last_seq, members: joined.members, req };
        // From `since` (never beyond what exists) up to `last_seq` comes from the store; the
        // hub delivers everything after `last_seq` live.
        let start = since.map_or(last_seq, |since| since.min(last_seq));
        self.rooms.insert(room.clone(), JoinedRoom { hub: joined.hub, cursor: start });
        self.write_frame(frame).await?;
        if start < last_seq {
            self.replay(&room, start, last_seq).await?;
        }
        Ok(())
    }

    /// Leaves a room. Leaving is idempotent: a room this connection has not joined (or already
    /// left) is answered `left` too, as the contract's table says, since the outcome holds.
    async fn on_leave(&mut self, room: String, req: Option<Req>) -> Result<(), End> {
        if let Some(joined) = self.rooms.remove(&room) {
            self.app.rooms.leave(&joined.hub, self.id).await;
        }
        self.write_frame(ServerFrame::Left { room, req }).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn on_send(
        &mut self,
        identity: &Identity,
        room: String,
        client_msg_id: String,
        body: String,
        traceparent: Option<String>,
        req: Option<Req>,
        in_flight: &mut InFlight,
    ) -> Result<(), End> {
        if !self.rooms.contains_key(&room) {
            return self.error(ErrorCode::NotJoined, &format!("join room {room} before sending to it"), req).await;
        }
        if !names::is_valid_client_msg_id(&client_msg_id) {
            return self
                .error(ErrorCode::BadRequest, "client_msg_id must be 1-64 characters without control characters", req)
                .await;
        }
        let max_body = self.app.config.limits.max_body_chars;
        if body.chars().count() > max_body {
            return self.error(ErrorCode::TooLarge, &format!("body exceeds {max_body} characters"), req).await;
        }
        if self.limiter.check().is_err() {
            self.app.metrics.drops.with_label_values(&["rate_limited"]).inc();
            return self.error(ErrorCode::RateLimited, "sending too fast; slow down and retry", req).await;
        }
        let context = telemetry::trace::message_context(traceparent.as_deref());
        let span = tracing::info_span!(target: telemetry::logging::HOP_TARGET, "gateway.receive", room = %room, client_msg_id = %client_msg_id, user = %identity.user);
        telemetry::trace::set_parent(&span, context.clone());
        let traceparent = telemetry::trace::traceparent_of(&span, &telemetry::trace::to_traceparent(&context));
        let command = SendCommand {
            room,
            user: identity.user.clone(),
            client_msg_id,
            body,
            traceparent,
            gateway: self.app.config.gateway_id.clone(),
            deadline_ms: protocol::now_ms() + self.app.config.submit_timeout.as_millis() as i64,
        };
        let trace_id = telemetry::trace::trace_id_of(&command.traceparent);
        self.app.journal.record_send(
            &command.dedupe_key(),
            &trace_id,
            "gateway.receive",
            serde_json::json!({"gateway": self.app.config.gateway_id, "session": self.session}),
        );
        let bus = self.app.bus.clone();
        let started = Instant::now();
        // Workers refuse a send past its deadline; waiting a little longer than that means a
        // send this gateway calls `unavailable` was really not stored.
        let wait = self.app.config.submit_timeout + SUBMIT_MARGIN;
        let submitted_trace = trace_id.clone();
        in_flight.push(Box::pin(async move {
            let room = command.room.clone();
            let client_msg_id = command.client_msg_id.clone();
            let submitted = tracing::Instrument::instrument(bus.submit(command), span);
            let outcome = match tokio::time::timeout(wait, submitted).await {
                Ok(outcome) => outcome,
                Err(_) => Err(bus::BusError::unavailable("no answer from fanout in time")),
            };
            (req, room, client_msg_id, submitted_trace, started, outcome)
        }));
        Ok(())
    }

    async fn on_submitted(
        &mut self,
        (req, room, client_msg_id, trace_id, started, outcome): SubmitResult,
    ) -> Result<(), End> {
        let metrics = &self.app.metrics;
        match outcome {
            Ok(SendOutcome { message, duplicate }) => {
                metrics.sends.with_label_values(&[if duplicate { "duplicate" } else { "acked" }]).inc();
                metrics.send_to_ack.observe(started.elapsed().as_secs_f64());
                let key = protocol::bus::dedupe_key(&room, &message.user, &client_msg_id);
                self.app.journal.link(&key, message.id);
                self.app.journal.record(
                    message.id,
                    &message.trace_id,
                    "gateway.ack",
                    serde_json::json!({"gateway": self.app.config.gateway_id, "duplicate": duplicate}),
                );
                let ack =
                    ServerFrame::Ack { room, client_msg_id, id: message.id, seq: message.seq, ts: message.ts, req };
                self.write_frame(ack).await
            }
            Err(e) if e.kind() == bus::BusErrorKind::Rejected => {
                metrics.sends.with_label_values(&["rejected"]).inc();
                self.error(ErrorCode::BadRequest, e.message(), req).await
            }
            Err(e) if e.kind() == bus::BusErrorKind::Encoding => {
                metrics.sends.with_label_values(&["internal"]).inc();
                tracing::error!(room, client_msg_id, trace_id, error = %e, "send not encodable for the bus");
                self.error(
                    ErrorCode::Internal,
                    "the message could not be handed to the sequencer (a server defect); it was not stored",
                    req,
                )
                .await
            }
            Err(e) => {
                metrics.sends.with_label_values(&["unavailable"]).inc();
                tracing::warn!(room, client_msg_id, trace_id, error = %e, "send not accepted");
                self.error(
                    ErrorCode::Unavailable,
                    "the message was not accepted (a backend is unavailable); retry with the same client_msg_id",
                    req,
                )
                .await
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn on_history(
        &mut self,
        identity: &Identity,
        room: String,
        before: Option<u64>,
        after: Option<u64>,
        limit: Option<u32>,
        req: Option<Req>,
    ) -> Result<(), End> {
        if !names::is_valid_room(&room) {
            return self.error(ErrorCode::BadRequest, "room must be 1-64 characters from A-Z a-z 0-9 _ -", req).await;
        }
        if !identity.may_join(&room) {
            return self.error(ErrorCode::Forbidden, &format!("your token does not allow room {room}"), req).await;
        }
        let query = PageQuery { before, after, limit: limit.unwrap_or(storage::DEFAULT_PAGE) };
        match self.app.history.page(&room, query).await {
            Ok(page) => {
                self.write_frame(ServerFrame::History { room, messages: page.messages, has_more: page.has_more, req })
                    .await
            }
            Err(e) => {
                tracing::warn!(room, error = %e, "history read failed");
                self.error(ErrorCode::Unavailable, "history is unavailable right now; retry", req).await
            }
        }
    }

    async fn on_typing(&mut self, identity: &Identity, room: String, req: Option<Req>) -> Result<(), End> {
        if !self.rooms.contains_key(&room) {
            return self.error(ErrorCode::NotJoined, &format!("join room {room} before typing in it"), req).await;
        }
        if self.limiter.check().is_err() {
            self.app.metrics.drops.with_label_values(&["rate_limited"]).inc();
            return self.error(ErrorCode::RateLimited, "sending too fast; slow down", req).await;
        }
        if let Err(e) = self.app.rooms.typing(&room, &identity.user).await {
            tracing::debug!(room, error = %e, "typing not published");
            self.app.metrics.drops.with_label_values(&["typing_unpublished"]).inc();
        }
        Ok(())
    }

    // === writing ===

    /// Writes what the hubs queued: this item and whatever else is already waiting, then, once
    /// the queue is empty, catches up on anything skipped while it was full.
    async fn on_outbound(&mut self) -> Result<(), End> {
        let mut batch = Vec::new();
        let more = self.outbox.take(WRITE_BATCH, &mut batch);
        if more {
            // Come back for the rest after this batch is flushed.
            self.outbox.wake();
        }
        if batch.is_empty() {
            return Ok(());
        }
        self.app.metrics.outbound_queue_depth.observe(batch.len() as f64);
        if let Some(Outbound::Message(delivery)) = batch.first() {
            let lag_ms = (protocol::now_ms() - delivery.message.ts).max(0);
            self.app.metrics.delivery_lag.observe(lag_ms as f64 / 1000.0);
        }
        for item in batch {
            self.write_outbound(item).await?;
        }
        if !more && self.outbox.is_empty() && self.outbox.take_resync() {
            self.resync().await?;
        }
        Ok(())
    }

    async fn write_outbound(&mut self, item: Outbound) -> Result<(), End> {
        match item {
            Outbound::Frame(text) => self.write((*text).clone()).await,
            Outbound::Message(delivery) => {
                let room = &delivery.message.room;
                let seq = delivery.message.seq;
                let Some(joined) = self.rooms.get(room) else { return Ok(()) };
                let cursor = joined.cursor;
                if seq <= cursor {
                    return Ok(());
                }
                if seq > cursor + 1 && self.app.repairs_gaps() {
                    self.replay(&room.clone(), cursor, seq - 1).await?;
                }
                self.deliver(delivery).await
            }
        }
    }

    /// Writes a live message (through the delivery hook's interceptor, when there is one).
    async fn deliver(&mut self, delivery: Arc<Delivery>) -> Result<(), End> {
        if let Some(joined) = self.rooms.get_mut(&delivery.message.room) {
            joined.cursor = delivery.message.seq;
        }
        let Some(hooked) = self.hooked_writes.as_mut() else {
            return self.write_message(&delivery).await;
        };
        for write in hooked.writes(delivery).await {
            self.write_message(&write).await?;
        }
        Ok(())
    }

    async fn write_message(&mut self, delivery: &Delivery) -> Result<(), End> {
        self.deliveries += 1;
        let _span = delivery.write_span();
        self.write(delivery.frame.clone()).await
    }

    /// Writes a room's stored messages with `after < seq <= upto` and moves its cursor; from
    /// the hub's recent messages when it still has them all, else from the store.
    async fn replay(&mut self, room: &str, after: u64, upto: u64) -> Result<(), End> {
        let recent = self.rooms.get(room).and_then(|joined| joined.hub.recent_between(after, upto));
        if let Some(recent) = recent {
            self.app.metrics.history_cache_hits.inc();
            for delivery in recent {
                self.write_message(&delivery).await?;
            }
            if let Some(joined) = self.rooms.get_mut(room) {
                joined.cursor = joined.cursor.max(upto);
            }
            return Ok(());
        }
        let mut cursor = after;
        while cursor < upto {
            let page = match self
                .app
                .history
                .page(room, PageQuery { before: Some(upto + 1), after: Some(cursor), limit: storage::MAX_PAGE })
                .await
            {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(room, after = cursor, upto, error = %e, "replay failed");
                    return Err(End::Close(1011, "history unavailable; reconnect and rejoin with since"));
                }
            };
            if page.messages.is_empty() {
                break;
            }
            for message in page.messages {
                cursor = message.seq;
                let delivery = Delivery::new(Arc::new(message));
                self.write_message(&delivery).await?;
            }
        }
        if let Some(joined) = self.rooms.get_mut(room) {
            joined.cursor = joined.cursor.max(cursor);
        }
        Ok(())
    }

    /// Catches up every room whose hub moved past this connection's cursor.
    async fn resync(&mut self) -> Result<(), End> {
        self.app.metrics.drops.with_label_values(&["resynced_from_store"]).inc();
        let behind: Vec<(String, u64, u64)> = self
            .rooms
            .iter()
            .filter(|(_, joined)| joined.hub.last_seq() > joined.cursor)
            .map(|(room, joined)| (room.clone(), joined.cursor, joined.hub.last_seq()))
            .collect();
        for (room, cursor, last) in behind {
            self.replay(&room, cursor, last).await?;
        }
        Ok(())
    }

    async fn write_frame(&mut self, frame: ServerFrame) -> Result<(), End> {
        self.write(frame.to_json().into()).await
    }

    async fn error(&mut self, code: ErrorCode, message: &str, req: Option<Req>) -> Result<(), End> {
        self.app.metrics.errors_sent.with_label_values(&[code.as_str()]).inc();
        self.write_frame(ServerFrame::error(code, message, req)).await
    }

    /// Queues a frame on the socket. A client that cannot take it within the slow-consumer
    /// timeout is closed.
    async fn write(&mut self, text: Utf8Bytes) -> Result<(), End> {
        let limit = self.app.config.limits.slow_consumer_timeout;
        match tokio::time::timeout(limit, self.sink.feed(Message::Text(text))).await {
            Ok(written) => written.map_err(|_| End::Gone),
            Err(_) => Err(End::Close(CLOSE_SLOW_CONSUMER, "slow consumer: socket not drained in time")),
        }
    }

    async fn flush(&mut self) -> Result<(), End> {
        if self.deliveries > 0 {
            self.app.metrics.deliveries.inc_by(self.deliveries);
            self.deliveries = 0;
        }
        let limit = self.app.config.limits.slow_consumer_timeout;
        match tokio::time::timeout(limit, self.sink.flush()).await {
            Ok(flushed) => flushed.map_err(|_| End::Gone),
            Err(_) => Err(End::Close(CLOSE_SLOW_CONSUMER, "slow consumer: socket not drained in time")),
        }
    }

    fn count_frame(&self, kind: &str) {
        self.app.metrics.frames_received.with_label_values(&[kind]).inc();
    }
}

/// The monotonic instant of a wall-clock time given in seconds since the Unix epoch.
fn instant_at_unix_secs(secs: u64) -> tokio::time::Instant {
    let now_ms = u64::try_from(protocol::now_ms()).unwrap_or(0);
    let wait_ms = secs.saturating_mul(1000).saturating_sub(now_ms);
    tokio::time::Instant::now() + std::time::Duration::from_millis(wait_ms)
}

/// Resolves once the gateway drains.
async fn draining(signal: &mut tokio::sync::watch::Receiver<bool>) {
    // An error means the gateway is gone altogether: drain as well.
    let _ = signal.wait_for(|draining| *draining).await;
}

fn frame_type(frame: &ClientFrame) -> &'static str {
    match frame {
        ClientFrame::Hello { .. } => "hello",
        ClientFrame::Join { .. } => "join",
        ClientFrame::Leave { .. } => "leave",
        ClientFrame::Send { .. } => "send",
        ClientFrame::History { .. } => "history",
        ClientFrame::Typing { .. } => "typing",
        ClientFrame::Ping => "ping",
    }
}

/// Maps a read error to how the connection ends: an over-long frame is closed with 1009, a
/// peer that went away ends it quietly, anything else is a protocol error (1002).
fn read_error(error: axum::Error) -> End {
    use tungstenite::error::{Error as WsError, ProtocolError};
    let Ok(error) = error.into_inner().downcast::<WsError>() else {
        return End::Close(CLOSE_PROTOCOL, "websocket protocol error");
    };
    match *error {
        WsError::Capacity(_) => End::Close(CLOSE_TOO_BIG, "frame too large"),
        WsError::ConnectionClosed
        | WsError::AlreadyClosed
        | WsError::Io(_)
        | WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => End::Gone,
        _ => End::Close(CLOSE_PROTOCOL, "websocket protocol error"),
    }
}
