//! What each client frame does: `hello`, `join`, `leave`, `send` (and its ack), `history`,
//! `typing`, `ping`.

use std::future::Future;
use std::time::Instant;

use axum::extract::ws::Message;
use protocol::bus::{SendCommand, SendOutcome};
use protocol::frames::{check_body, parse_client_frame, ClientFrame};
use protocol::{names, ErrorCode, Req, ServerFrame};
use storage::PageQuery;

use super::{Connection, End, InFlight, JoinedRoom, SubmitResult, CLOSE_POLICY, SUBMIT_MARGIN};
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
            deadline_ms: protocol::now_ms() + self.app.config.submit_timeout.as_millis() as i64,
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
        let history = self.app.history.clone();
        let started = Instant::now();
        // Workers refuse a send past its deadline; waiting a little longer than that means a
        // send this gateway calls `unavailable` was really not stored.
        let deadline = self.app.config.submit_timeout;
        let submitted_trace = trace_id.clone();
        let waits = self.app.journal.waits().clone();
        in_flight.push(Box::pin(async move {
            let room = command.room.clone();
            let client_msg_id = command.client_msg_id.clone();
            let user = command.user.clone();
            // Listed in `/debug/waits` while the worker has not answered.
            let _waiting =
                waits.begin(format!("send {room} {client_msg_id}"), Vec::new(), format!("room-sequencer:{room}"));
            let mut submitted = Box::pin(tracing::Instrument::instrument(bus.submit(command), span));
            let outcome = match tokio::time::timeout(deadline, &mut submitted).await {
                Ok(outcome) => outcome,
                Err(_) => {
                    // No worker stores it now: it no longer counts as queued work.
                    admitted.past_deadline();
                    match tokio::time::timeout(SUBMIT_MARGIN, &mut submitted).await {
                        Ok(outcome) => outcome,
                        Err(_) => settle_unanswered(submitted, &history, &room, &user, &client_msg_id).await,
                    }
                }
            };
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
                    "whether the message was stored is not known (no answer from the sequencer or the store in time); \
                     retry with the same client_msg_id: it is stored at most once",
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

/// How long the gateway keeps asking the store about a send whose answer never came before it
/// says the outcome is unknown, and the first pause between asks (the pauses double). `unavailable` promises "not stored", so a failed read never says it; but the answer
/// must come in bounded time, and "unknown" is a true one: the client retries with the same
/// `client_msg_id` and the dedupe settles it (the web client has resent by then anyway). Two
/// or three asks ride out a blip; an overloaded store that times reads out for longer would
/// only hold the send (and its admission slot) without an answer.
const STORE_ASK_BUDGET: std::time::Duration = std::time::Duration::from_secs(3);
const STORE_ASK_FIRST_PAUSE: std::time::Duration = std::time::Duration::from_millis(500);

/// The outcome of a send whose worker has not answered by the deadline and the margin: the
/// store's answer, or the worker's late ack (an indeterminate write found landed) if that comes
/// first. A late refusal is not waited for: it speaks only for the copy its worker held.
async fn settle_unanswered(
    answer: impl Future<Output = Result<SendOutcome, bus::BusError>>,
    history: &crate::history::HistoryReader,
    room: &str,
    user: &str,
    client_msg_id: &str,
) -> Result<SendOutcome, bus::BusError> {
    let late_ack = async move {
        match answer.await {
            Ok(outcome) => Ok(outcome),
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        // A late ack ready with the store's "not found" wins: it is the surer word.
        biased;
        outcome = late_ack => outcome,
        outcome = outcome_from_store(history, room, user, client_msg_id) => outcome,
    }
}

/// The outcome of a send whose answer never came (a worker stored it and its answer was lost on
/// the bus, or nobody stored it): the store says which. Past the send's deadline and the margin
/// no worker will store it any more, so "not found" means not stored. A store that fails is
/// asked again, with growing pauses, for up to [`STORE_ASK_BUDGET`]; if it never answers, the
/// outcome is [`Indeterminate`](bus::BusErrorKind::Indeterminate), never `unavailable`.
async fn outcome_from_store(
    history: &crate::history::HistoryReader,
    room: &str,
    user: &str,
    client_msg_id: &str,
) -> Result<SendOutcome, bus::BusError> {
    let give_up = tokio::time::Instant::now() + STORE_ASK_BUDGET;
    let mut pause = STORE_ASK_FIRST_PAUSE;
    let mut asked = 1;
    let found = loop {
        match history.find_send(room, user, client_msg_id).await {
            Ok(found) => break found,
            Err(e) if tokio::time::Instant::now() + pause >= give_up => {
                return Err(bus::BusError::indeterminate(format!(
                    "no answer from fanout in time, and the store could not tell in {asked} asks"
                ))
                .with_source(e))
            }
            Err(e) => {
                tracing::debug!(room, client_msg_id, asked, error = %e, "the store cannot tell yet; asking again");
                asked += 1;
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
        }
    };
    match found {
        Some(message) => {
            tracing::info!(
                room,
                client_msg_id,
                seq = message.seq,
                message_id = %message.id,
                trace_id = %message.trace_id,
                "send answered from the store: its answer was lost"
            );
            Ok(SendOutcome { message, duplicate: false })
        }
        None => Err(bus::BusError::unavailable("no answer from fanout in time; not stored")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    use async_trait::async_trait;
    use protocol::ChatMessage;
    use storage::{HistoryStore, Page, PageQuery, RoomAppend, StoreError};
    use telemetry::metrics::Metrics;
    use uuid::Uuid;

    use super::*;
    use crate::history::HistoryReader;

    /// A store whose dedupe lookups time out `failures` times, then find `stored` (if any).
    struct Overloaded {
        failures: u32,
        asked: AtomicU32,
        stored: Option<ChatMessage>,
    }

    #[async_trait]
    impl HistoryStore for Overloaded {
        async fn append(&self, _: RoomAppend) -> Result<(), StoreError> {
            unreachable!("a gateway never appends")
        }
        async fn last_seq(&self, _: &str) -> Result<u64, StoreError> {
            Ok(0)
        }
        async fn find_by_client_msg_id(&self, _: &str, _: &str, _: &str) -> Result<Option<ChatMessage>, StoreError> {
            if self.asked.fetch_add(1, Ordering::SeqCst) < self.failures {
                return Err(StoreError::unavailable("read dedupe entry: timed out"));
            }
            Ok(self.stored.clone())
        }
        async fn page(&self, _: &str, _: PageQuery) -> Result<Page, StoreError> {
            Ok(Page { messages: Vec::new(), has_more: false })
        }
        async fn get_by_id(&self, _: Uuid) -> Result<Option<ChatMessage>, StoreError> {
            Ok(None)
        }
        async fn ping(&self) -> Result<(), StoreError> {
            Ok(())
        }
    }

    fn message() -> ChatMessage {
        ChatMessage {
            room: "r".into(),
            seq: 2,
            id: Uuid::now_v7(),
            user: "alice".into(),
            body: "hi".into(),
            ts: 1,
            client_msg_id: "c-1".into(),
            trace_id: String::new(),
            prev: None,
            digest: None,
        }
    }

    async fn ask(store: Overloaded) -> (Result<SendOutcome, bus::BusError>, u32) {
        let store = Arc::new(store);
        let history = HistoryReader::new(store.clone(), Metrics::new());
        let outcome = outcome_from_store(&history, "r", "alice", "c-1").await;
        (outcome, store.asked.load(Ordering::SeqCst))
    }

    #[tokio::test(start_paused = true)]
    async fn a_stored_send_is_acked_though_the_store_timed_out_the_first_asks() {
        let stored = message();
        let started = tokio::time::Instant::now();
        let (outcome, asked) =
            ask(Overloaded { failures: 2, asked: AtomicU32::new(0), stored: Some(stored.clone()) }).await;
        assert_eq!((outcome.unwrap().message.id, asked), (stored.id, 3));
        // Pauses of 0.5 and 1 s between the asks.
        assert_eq!(started.elapsed(), std::time::Duration::from_millis(1_500));
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_ack_settles_a_send_the_store_cannot_tell_about() {
        let stored = message();
        let store = Arc::new(Overloaded { failures: u32::MAX, asked: AtomicU32::new(0), stored: None });
        let history = HistoryReader::new(store.clone(), Metrics::new());
        let late = {
            let stored = stored.clone();
            async move {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                Ok(SendOutcome { message: stored, duplicate: false })
            }
        };
        let started = tokio::time::Instant::now();
        let outcome = settle_unanswered(late, &history, "r", "alice", "c-1").await;
        assert_eq!(outcome.unwrap().message.id, stored.id);
        assert_eq!(started.elapsed(), std::time::Duration::from_secs(1));
        // A late refusal is not an answer: the store's (here: none in time) decides.
        let refused = async { Err::<SendOutcome, _>(bus::BusError::unavailable("worker: store failed")) };
        let outcome = settle_unanswered(refused, &history, "r", "alice", "c-1").await;
        assert_eq!(outcome.unwrap_err().kind(), bus::BusErrorKind::Indeterminate);
    }

    #[tokio::test(start_paused = true)]
    async fn unavailable_only_when_the_store_says_not_stored() {
        let (outcome, asked) = ask(Overloaded { failures: 0, asked: AtomicU32::new(0), stored: None }).await;
        assert_eq!(asked, 1);
        let refusal = outcome.unwrap_err();
        assert_eq!(refusal.kind(), bus::BusErrorKind::Unavailable);
        assert!(refusal.message().contains("not stored"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_that_never_answers_leaves_the_outcome_unknown_not_unavailable() {
        let started = tokio::time::Instant::now();
        let (outcome, asked) =
            ask(Overloaded { failures: u32::MAX, asked: AtomicU32::new(0), stored: Some(message()) }).await;
        let unknown = outcome.unwrap_err();
        assert_eq!(unknown.kind(), bus::BusErrorKind::Indeterminate, "{unknown}");
        // Asked at 0, 0.5 and 1.5 s; the next pause (2 s) would pass the 3 s budget.
        assert_eq!(asked, 3);
        assert!(started.elapsed() <= STORE_ASK_BUDGET);
    }
}
