//! What each client frame does: `hello`, `join`, `leave`, `send` (and its ack), `history`,
//! `typing`, `ping`.

use std::time::Instant;

use axum::extract::ws::Message;
use protocol::bus::{SendCommand, SendOutcome};
use protocol::frames::{check_body, parse_client_frame, ClientFrame};
use protocol::{names, ErrorCode, Req, ServerFrame};
use storage::PageQuery;

use super::{deadline, Connection, End, InFlight, JoinedRoom, SubmitResult, CLOSE_POLICY};
use crate::auth::Identity;

impl Connection {
    // === reading ===

    pub(super) async fn on_client_message(&mut self, message: Message, in_flight: &mut InFlight) -> Result<(), End> {
        match message {
            Message::Text(text) => self.on_text(text.as_str(), in_flight).await,
            Message::Binary(bytes) => {
                self.record_invalid(bytes.len());
                self.count_frame("binary");
                self.error(ErrorCode::BadRequest, "binary frames are not supported; send JSON text frames", None).await
            }
            Message::Ping(_) | Message::Pong(_) => Ok(()),
            Message::Close(_) => Err(End::Gone),
        }
    }

    pub(super) async fn on_text(&mut self, text: &str, in_flight: &mut InFlight) -> Result<(), End> {
        let max = self.app.config.limits.max_frame_bytes;
        if text.len() > max {
            self.record_invalid(text.len());
            self.count_frame("too_large");
            return self
                .error(ErrorCode::TooLarge, &format!("frame of {} bytes exceeds the limit of {max}", text.len()), None)
                .await;
        }
        let (frame, req) = match parse_client_frame(text) {
            Ok(parsed) => parsed,
            Err(e) => {
                self.record_invalid(text.len());
                self.count_frame("invalid");
                return self.error(ErrorCode::BadRequest, &e.message, e.req).await;
            }
        };
        self.count_frame(frame.kind());
        if let Some(recording) = self.recording.as_mut() {
            recording.client_frame(&frame, text.len());
        }
        let Some(identity) = self.identity.clone() else {
            return match frame {
                ClientFrame::Hello { user, token } => self.on_hello(user, token, req).await,
                _ => self.error(ErrorCode::Unauthorized, "send hello first", req).await,
            };
        };
        let control =
            matches!(frame, ClientFrame::Join { .. } | ClientFrame::Leave { .. } | ClientFrame::History { .. });
        if control && self.control_limiter.check().is_err() {
            // Joins and leaves tell every member about presence, and joins with `since` and
            // history requests read the store: a flood of them is refused like a flood of sends.
            self.app.metrics.drops.with_label_values(&["rate_limited"]).inc();
            let message = "too many join, leave and history requests; slow down and retry";
            return self.error(ErrorCode::RateLimited, message, req).await;
        }
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

    pub(super) async fn on_hello(
        &mut self,
        user: Option<String>,
        token: Option<String>,
        req: Option<Req>,
    ) -> Result<(), End> {
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
        let max = self.app.config.limits.max_connections_per_user;
        if max > 0 {
            let Some(slot) = self.app.user_connections.take(&identity.user, max) else {
                let message = format!("at most {max} connections per user; close one first");
                self.error(ErrorCode::RateLimited, &message, req).await?;
                return Err(End::Close(CLOSE_POLICY, "too many connections for this user"));
            };
            self.user_slot = Some(slot);
        }
        let welcome = ServerFrame::Welcome {
            user: identity.user.clone(),
            session: self.session,
            gateway: self.app.config.gateway_id.clone(),
            req,
        };
        tracing::debug!(conn = self.id, user = %identity.user, "hello");
        self.identity = Some(Box::new(identity));
        self.write_frame(welcome).await
    }

    /// Answers a room name that is invalid or that the token does not allow (`Some`), or lets
    /// the frame go on (`None`).
    async fn refuse_room(&mut self, identity: &Identity, room: &str, req: Option<Req>) -> Option<Result<(), End>> {
        if !names::is_valid_room(room) {
            let message = "room must be 1-64 characters from A-Z a-z 0-9 _ -";
            return Some(self.error(ErrorCode::BadRequest, message, req).await);
        }
        if !identity.may_join(room) {
            return Some(
                self.error(ErrorCode::Forbidden, &format!("your token does not allow room {room}"), req).await,
            );
        }
        None
    }

    pub(super) async fn on_join(
        &mut self,
        identity: &Identity,
        room: String,
        since: Option<u64>,
        req: Option<Req>,
    ) -> Result<(), End> {
        if let Some(refusal) = self.refuse_room(identity, &room, req.clone()).await {
            return refusal;
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
    pub(super) async fn on_leave(&mut self, room: String, req: Option<Req>) -> Result<(), End> {
        if let Some(joined) = self.rooms.remove(&room) {
            self.app.rooms.leave(&joined.hub, self.id).await;
        }
        self.write_frame(ServerFrame::Left { room, req }).await
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) async fn on_send(
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
        // A message says something (not blank), within the body limit.
        if let Err(e) = check_body(&body, self.app.config.limits.max_body_chars) {
            return self.error(e.code(), &e.to_string(), req).await;
        }
        if self.limiter.check().is_err() {
            self.app.metrics.drops.with_label_values(&["rate_limited"]).inc();
            return self.error(ErrorCode::RateLimited, "sending too fast; slow down and retry", req).await;
        }
        let context = telemetry::trace::message_context(traceparent.as_deref());
        let span = tracing::info_span!(target: telemetry::logging::HOP_TARGET, "gateway.receive", room = %room, client_msg_id = %client_msg_id, user = %identity.user);
        telemetry::trace::set_parent(&span, context.clone());
        let traceparent =
            telemetry::trace::span_traceparent(&span).unwrap_or_else(|| telemetry::trace::to_traceparent(&context));
        let command = SendCommand {
            room,
            user: identity.user.clone(),
            client_msg_id,
            body,
            traceparent,
            gateway: self.app.config.gateway_id.clone(),
            // The workers' deadline: the client's, less the time their answer takes to arrive.
            deadline_ms: protocol::now_ms() + deadline::store_within(self.app.config.submit_timeout).as_millis() as i64,
        };
        let trace_id = command.trace_id().to_owned();
        self.app.journal.record_send(
            &command.dedupe_key(),
            &trace_id,
            "gateway.receive",
            serde_json::json!({"gateway": self.app.config.gateway_id, "session": self.session}),
        );
        // Over the process's limit of sends awaiting an answer (the cap, or what the workers'
        // stored rate clears in a third of the deadline): refused now, unpublished, so surely
        // not stored, rather than queued behind the others past its deadline.
        let Some(mut admitted) = self.app.sends.try_admit() else {
            self.app.metrics.drops.with_label_values(&["overloaded"]).inc();
            self.app.metrics.sends.with_label_values(&["unavailable"]).inc();
            self.app.journal.record_send(
                &command.dedupe_key(),
                &trace_id,
                "gateway.shed",
                serde_json::json!({"gateway": self.app.config.gateway_id, "limit": self.app.metrics.send_admission_limit.get()}),
            );
            tracing::debug!(room = %command.room, client_msg_id = %command.client_msg_id, trace_id = %trace_id, "send shed: as many sends in flight as the limit");
            return self
                .error(
                    ErrorCode::Unavailable,
                    "the server is overloaded; the message was not accepted; retry with the same client_msg_id",
                    req,
                )
                .await;
        };
        let bus = self.app.bus.sends.clone();
        let app = self.app.clone();
        let started = Instant::now();
        let answer_within = deadline::answer_within(self.app.config.submit_timeout);
        let submitted_trace = trace_id.clone();
        in_flight.push(Box::pin(async move {
            let room = command.room.clone();
            let client_msg_id = command.client_msg_id.clone();
            let key = command.dedupe_key();
            // Listed in `/debug/waits` while the worker has not answered.
            let waiting = app.journal.waits().begin(
                format!("send {room} {client_msg_id}"),
                Vec::new(),
                format!("room-sequencer:{room}"),
            );
            let pending: deadline::Pending =
                Box::pin(tracing::Instrument::instrument(async move { bus.submit(command).await }, span));
            let outcome = match deadline::answer_in_time(pending, answer_within).await {
                Ok(outcome) => outcome,
                Err(pending) => {
                    // No worker stores it now: it no longer counts as queued work. Its place
                    // under the cap is held until the workers' word comes, or the window ends.
                    admitted.past_deadline();
                    let trace_id = submitted_trace.clone();
                    tokio::spawn(async move {
                        let _waiting = waiting;
                        let word = deadline::late_word(pending, deadline::LATE_WORD_WINDOW).await;
                        if matches!(word, deadline::LateWord::Stored(_)) {
                            admitted.stored();
                        }
                        drop(admitted);
                        record_late_word(&app, &key, &trace_id, &word);
                    });
                    return Box::new((
                        req,
                        room,
                        client_msg_id,
                        submitted_trace,
                        started,
                        Err(deadline::not_known_yet()),
                    ));
                }
            };
            drop(waiting);
            if outcome.is_ok() {
                admitted.stored();
            }
            drop(admitted);
            Box::new((req, room, client_msg_id, submitted_trace, started, outcome))
        }));
        Ok(())
    }

    pub(super) async fn on_submitted(&mut self, submitted: Box<SubmitResult>) -> Result<(), End> {
        let (req, room, client_msg_id, trace_id, started, outcome) = *submitted;
        let metrics = &self.app.metrics;
        let label = outcome_label(&outcome);
        metrics.send_answer.with_label_values(&[label]).observe(started.elapsed().as_secs_f64());
        metrics.sends.with_label_values(&[label]).inc();
        match outcome {
            Ok(SendOutcome { message, duplicate }) => {
                metrics.send_to_ack.observe(started.elapsed().as_secs_f64(), &message.trace_id);
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
                self.error(ErrorCode::BadRequest, e.message(), req).await
            }
            Err(e) if e.kind() == bus::BusErrorKind::Indeterminate => {
                tracing::warn!(room, client_msg_id, trace_id = %trace_id, error = %e, "send outcome unknown");
                self.error(
                    ErrorCode::Internal,
                    "whether the message was stored is not known yet (no answer from the sequencer by the send's \
                     deadline); retry with the same client_msg_id: it is stored at most once, and the retry answers \
                     with its ack",
                    req,
                )
                .await
            }
            Err(e) if e.kind() == bus::BusErrorKind::Encoding => {
                tracing::error!(room, client_msg_id, trace_id = %trace_id, error = %e, "send not encodable for the bus");
                self.error(
                    ErrorCode::Internal,
                    "the message could not be handed to the sequencer (a server defect); it was not stored",
                    req,
                )
                .await
            }
            Err(e) => {
                tracing::warn!(room, client_msg_id, trace_id = %trace_id, error = %e, "send not accepted");
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
    pub(super) async fn on_history(
        &mut self,
        identity: &Identity,
        room: String,
        before: Option<u64>,
        after: Option<u64>,
        limit: Option<u32>,
        req: Option<Req>,
    ) -> Result<(), End> {
        if let Some(refusal) = self.refuse_room(identity, &room, req.clone()).await {
            return refusal;
        }
        let query = PageQuery { before, after, limit: limit.unwrap_or(storage::DEFAULT_PAGE) };
        match self.app.history.page(&room, query).await {
            Ok(page) => {
                self.app.rooms.chain().check_page(&page.messages);
                self.write_frame(ServerFrame::History { room, messages: page.messages, has_more: page.has_more, req })
                    .await
            }
            Err(e) => {
                tracing::warn!(room, error = %e, "history read failed");
                self.error(ErrorCode::Unavailable, "history is unavailable right now; retry", req).await
            }
        }
    }

    pub(super) async fn on_typing(&mut self, identity: &Identity, room: String, req: Option<Req>) -> Result<(), End> {
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
}

/// How a send's outcome is counted (`chat_sends_total`, `chat_send_answer_seconds`).
fn outcome_label(outcome: &Result<SendOutcome, bus::BusError>) -> &'static str {
    match outcome {
        Ok(SendOutcome { duplicate: true, .. }) => "duplicate",
        Ok(_) => "acked",
        Err(e) => match e.kind() {
            bus::BusErrorKind::Rejected => "rejected",
            bus::BusErrorKind::Indeterminate => "indeterminate",
            bus::BusErrorKind::Encoding => "internal",
            // Unavailable, and any kind the bus adds later.
            _ => "unavailable",
        },
    }
}

/// Records what the workers said about a send after it was answered `internal` at its deadline:
/// a metric (`chat_send_late_words_total`), a hop in its journey and a log line, so "where did my
/// message go" has an answer after the client's.
fn record_late_word(app: &crate::state::AppState, key: &str, trace_id: &str, word: &deadline::LateWord) {
    app.metrics.send_late_words.with_label_values(&[word.label()]).inc();
    let gateway = &app.config.gateway_id;
    match word {
        deadline::LateWord::Stored(SendOutcome { message, duplicate }) => {
            app.journal.link(key, message.id);
            app.journal.record(
                message.id,
                &message.trace_id,
                "gateway.late_word",
                serde_json::json!({"gateway": gateway, "word": "stored", "seq": message.seq, "duplicate": duplicate}),
            );
            tracing::info!(
                room = %message.room,
                client_msg_id = %message.client_msg_id,
                seq = message.seq,
                message_id = %message.id,
                trace_id = %message.trace_id,
                "send stored after its deadline; the client was told `internal` (not known) and its retry gets the ack"
            );
        }
        deadline::LateWord::Refused(refusal) => {
            app.journal.record_send(
                key,
                trace_id,
                "gateway.late_word",
                serde_json::json!({"gateway": gateway, "word": "refused", "error": refusal.to_string()}),
            );
            tracing::info!(key, trace_id, error = %refusal, "send refused after its deadline; the client was told `internal` (not known)");
        }
        deadline::LateWord::Silent => {
            app.journal.record_send(
                key,
                trace_id,
                "gateway.late_word",
                serde_json::json!({"gateway": gateway, "word": "silent"}),
            );
            tracing::warn!(key, trace_id, "no word from the workers on a send within 6 s of its deadline");
        }
    }
}
