//! One WebSocket connection: the protocol state machine, per-room delivery cursors and the
//! writer that batches frames.
//!
//! A single task owns the socket. It reads client frames, keeps up to `max_in_flight_sends`
//! sends waiting for their acks at once, and writes what the room hubs queue for it. Every room
//! the connection joined has a cursor, the last seq written: a message at or below it is
//! skipped, a message beyond `cursor + 1` is preceded by the missing ones from the store. So a
//! join with `since`, a queue that overflowed, and live delivery all meet without a gap or a
//! duplicate.
//!
//! - this file: the connection's state and its loop (reading, acks, outbound, timers);
//! - `handlers`: what each client frame does;
//! - `deadline`: a send answered by its deadline, and what became of it after;
//! - `writer`: writing frames, live messages and replays to the socket.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, SinkExt, StreamExt};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use protocol::bus::SendOutcome;
use protocol::{ErrorCode, Req, ServerFrame};
use uuid::Uuid;

mod deadline;
mod handlers;
mod writer;

use crate::auth::Identity;
use crate::hook::{ConnectionWrites, QueuePolicy};
use crate::outbox::Outbox;
use crate::recorder::ConnectionRecording;
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
/// RFC 6455 §7.4.1 and §8.1: a text frame whose payload is not valid UTF-8.
const CLOSE_INVALID_PAYLOAD: u16 = 1007;

/// How long a closing handshake may take before the socket is simply dropped.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);
/// Frames written per batch before a flush.
const WRITE_BATCH: usize = 128;

/// What a finished submit hands back: the request tag, room, client message id, trace id,
/// when it started, and the outcome.
type SubmitResult = (Option<Req>, String, String, String, Instant, Result<SendOutcome, bus::BusError>);
/// Sends waiting for their outcome. Each answers with a box: the connection's loop holds room
/// for one answer for its whole life, and every connection's loop is kept small.
type InFlight = FuturesUnordered<Pin<Box<dyn std::future::Future<Output = Box<SubmitResult>> + Send>>>;

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
    identity: Option<Box<Identity>>,
    query_token: Option<String>,
    rooms: HashMap<String, JoinedRoom>,
    outbox: Arc<Outbox>,
    limiter: DefaultDirectRateLimiter,
    /// For `join`, `leave` and `history`.
    control_limiter: DefaultDirectRateLimiter,
    /// The socket, read and written by this one task. Not split in two halves: those share
    /// it through a lock that every read and every write would take. Boxed, so the
    /// connection's future stays small (see the test below).
    socket: Box<WebSocket>,
    /// The delivery hook's interceptor for this connection (none in the product).
    hooked_writes: Option<Box<dyn ConnectionWrites>>,
    /// Whether skipped deliveries and gaps are caught up from the store (always, in the product).
    catches_up: bool,
    /// This connection's place among its user's connections, from `hello` on.
    user_slot: Option<crate::slots::Slot<String>>,
    deliveries: u64,
    /// This connection's frames, when the gateway records (`--record`).
    recording: Option<Box<ConnectionRecording>>,
}

/// Serves one upgraded WebSocket until it closes.
///
/// The connection is set up before the returned future starts, so that future holds the
/// connection's state but not the socket it was built from (368 bytes, in every one of
/// 100,000 connection tasks).
pub fn serve(
    socket: WebSocket,
    app: Arc<AppState>,
    query_token: Option<String>,
) -> impl std::future::Future<Output = ()> + Send {
    let id = app.next_connection_id();
    let limits = &app.config.limits;
    let session = Uuid::now_v7();
    let hooked_writes = app.delivery_hook.as_ref().map(|hook| hook.connection(session));
    let configured = QueuePolicy { capacity: limits.outbound_queue, catch_up: true };
    let queue_policy = hooked_writes.as_ref().map_or(configured, |hooked| hooked.queue_policy(configured));
    let outbox = Outbox::new(id, queue_policy.capacity, limits.slow_consumer_timeout);
    let rate = NonZeroU32::new(limits.send_rate_per_sec).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(limits.send_burst).unwrap_or(rate);
    let control_rate = NonZeroU32::new(limits.control_rate_per_sec).unwrap_or(NonZeroU32::MIN);
    let control_burst = NonZeroU32::new(limits.control_burst).unwrap_or(control_rate);
    let mut connection = Connection {
        id,
        session,
        identity: None,
        query_token,
        rooms: HashMap::new(),
        outbox,
        limiter: RateLimiter::direct(Quota::per_second(rate).allow_burst(burst)),
        control_limiter: RateLimiter::direct(Quota::per_second(control_rate).allow_burst(control_burst)),
        socket: Box::new(socket),
        hooked_writes,
        catches_up: queue_policy.catch_up,
        user_slot: None,
        deliveries: 0,
        recording: app.recorder.clone().map(|recorder| Box::new(ConnectionRecording::new(recorder, id))),
        app: app.clone(),
    };
    app.metrics.connections.inc();
    app.metrics.connections_total.inc();
    if let Some(recording) = connection.recording.as_mut() {
        recording.opened(session);
    }
    connection.live()
}

impl Connection {
    /// Runs the connection's loop until it ends, then closes the socket and leaves every room.
    async fn live(mut self) {
        let end = self.run().await;
        self.outbox.close();
        if let Some(recording) = self.recording.as_mut() {
            recording.closed(if let End::Close(code, _) = end { Some(code) } else { None });
        }
        if let End::Close(code, reason) = end {
            self.app.metrics.disconnects.with_label_values(&[reason_label(code)]).inc();
            let frame = CloseFrame { code, reason: Utf8Bytes::from_static(reason) };
            // A client that does not read cannot hold the task: give the close a moment, then drop.
            let close = async {
                let _ = self.socket.send(Message::Close(Some(frame))).await;
                let _ = self.socket.close().await;
            };
            let _ = tokio::time::timeout(CLOSE_GRACE, close).await;
        }
        for (_, joined) in self.rooms.drain() {
            self.app.rooms.leave(&joined.hub, self.id).await;
        }
        self.app.metrics.connections.dec();
    }
}

fn reason_label(code: u16) -> &'static str {
    match code {
        CLOSE_SLOW_CONSUMER => "slow_consumer",
        CLOSE_TOKEN_EXPIRED => "token_expired",
        CLOSE_POLICY => "policy",
        CLOSE_TOO_BIG => "too_large",
        CLOSE_RESTART => "draining",
        // Invalid UTF-8 is a protocol violation too: one label for both codes.
        CLOSE_PROTOCOL | CLOSE_INVALID_PAYLOAD => "protocol_error",
        _ => "other",
    }
}

impl Connection {
    /// The connection's loop. It lives as long as the connection, so its own state is kept
    /// small: the handlers of each event run as boxed futures, allocated only while they run
    /// (an idle connection then costs a few KiB, not the size of the deepest handler).
    async fn run(&mut self) -> End {
        let app = self.app.clone();
        let limits = &app.config.limits;
        // One future for the connection's life: made afresh on every turn of the loop, it would
        // join and leave the gateway-wide list of the signal's waiters each time.
        let drain = draining(self.app.shutdown_signal());
        tokio::pin!(drain);
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
            // Whether an ack and the message it announces may share a write (below).
            let coalesce = self.hooked_writes.as_ref().is_none_or(|hooked| hooked.passes_through());
            let step = tokio::select! {
                () = &mut drain => Box::pin(self.say_draining()).await,
                frame = self.socket.next(), if in_flight.len() < limits.max_in_flight_sends => {
                    last_heard = Instant::now();
                    match frame {
                        None => Err(End::Gone),
                        Some(Err(e)) => Err(read_error(e)),
                        Some(Ok(message)) => Box::pin(self.on_client_message(message, &mut in_flight)).await,
                    }
                }
                Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                    let message_to_come = self.announces_unwritten_message(&done);
                    let answered = Box::pin(self.on_submitted(done)).await;
                    // In one process the message an ack announces usually reaches this
                    // connection's queue a moment after the ack (the room's hub forwards it):
                    // let the hub run first, so that one write to the socket carries both. Not
                    // when the message was written already (in a cluster it usually comes
                    // first): on a busy runtime the yield would hold the ack for a whole turn.
                    // Nor while a delivery hook may hold deliveries: an ack never waits behind one.
                    if coalesce && message_to_come && outbox.is_empty() {
                        tokio::task::yield_now().await;
                    }
                    match answered {
                        Ok(()) if coalesce && !outbox.is_empty() && !outbox.is_kicked() => {
                            Box::pin(self.on_outbound()).await
                        }
                        answered => answered,
                    }
                }
                () = outbox.ready() => match outbox.is_kicked() {
                    true => Err(End::Close(CLOSE_SLOW_CONSUMER, "slow consumer: outbound queue stayed full")),
                    false => match Box::pin(self.on_outbound()).await {
                        // When the message came first, an ack already answered joins it in
                        // the same write.
                        Ok(()) if coalesce => match in_flight.next().now_or_never() {
                            Some(Some(done)) => Box::pin(self.on_submitted(done)).await,
                            _ => Ok(()),
                        },
                        written => written,
                    },
                },
                () = &mut deadline, if deadline_armed => Box::pin(self.on_deadline()).await,
                _ = ping.tick() => {
                    if last_heard.elapsed() > limits.ping_interval * 3 {
                        Err(End::Close(CLOSE_POLICY, "no traffic from client"))
                    } else {
                        self.socket.feed(Message::Ping(Default::default())).await.map_err(|_| End::Gone)
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
}

impl Connection {
    /// Whether `done` is an ack of a message this connection will still write: its room is
    /// joined and its seq is past the room's cursor.
    fn announces_unwritten_message(&self, done: &SubmitResult) -> bool {
        let (_, room, _, _, _, outcome) = done;
        match outcome {
            Ok(SendOutcome { message, .. }) => self.rooms.get(room).is_some_and(|joined| message.seq > joined.cursor),
            Err(_) => false,
        }
    }

    /// Tells the client the gateway drains, and ends the connection.
    async fn say_draining(&mut self) -> Result<(), End> {
        let frame = ServerFrame::Reconnect { reason: "draining".into() };
        let _ = self.write(frame.to_json().into()).await;
        Err(End::Close(CLOSE_RESTART, "server draining; reconnect"))
    }

    /// The connection's one deadline passed: no `hello` in time, or the token expired.
    async fn on_deadline(&mut self) -> Result<(), End> {
        if self.identity.is_none() {
            let _ = self.error(ErrorCode::Unauthorized, "no hello within the time allowed", None).await;
            return Err(End::Close(CLOSE_POLICY, "hello timeout"));
        }
        let _ = self.error(ErrorCode::Unauthorized, "token expired: reconnect with a fresh token", None).await;
        Err(End::Close(CLOSE_TOKEN_EXPIRED, "token expired"))
    }
}

/// The monotonic instant of a wall-clock time given in seconds since the Unix epoch.
fn instant_at_unix_secs(secs: u64) -> tokio::time::Instant {
    let now_ms = u64::try_from(protocol::now_ms()).unwrap_or(0);
    let wait_ms = secs.saturating_mul(1000).saturating_sub(now_ms);
    tokio::time::Instant::now() + std::time::Duration::from_millis(wait_ms)
}

/// Resolves once the gateway drains.
async fn draining(mut signal: tokio::sync::watch::Receiver<bool>) {
    // An error means the gateway is gone altogether: drain as well.
    let _ = signal.wait_for(|draining| *draining).await;
}

/// Maps a read error to how the connection ends: an over-long frame is closed with 1009, a
/// text frame that is not UTF-8 with 1007 (RFC 6455 §8.1), a peer that went away ends it
/// quietly, anything else is a protocol error (1002).
fn read_error(error: axum::Error) -> End {
    use tungstenite::error::{Error as WsError, ProtocolError};
    let Ok(error) = error.into_inner().downcast::<WsError>() else {
        return End::Close(CLOSE_PROTOCOL, "websocket protocol error");
    };
    match *error {
        WsError::Capacity(_) => End::Close(CLOSE_TOO_BIG, "frame too large"),
        WsError::Utf8(_) => End::Close(CLOSE_INVALID_PAYLOAD, "text frame is not valid UTF-8"),
        WsError::ConnectionClosed
        | WsError::AlreadyClosed
        | WsError::Io(_)
        | WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => End::Gone,
        _ => End::Close(CLOSE_PROTOCOL, "websocket protocol error"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future an async fn of three arguments returns.
    fn future_size<A, B, C, F: std::future::Future>(_: fn(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every connection's task holds this future for its whole life: 100,000 connections make
    /// every 100 bytes 10 MB. Handlers that run now and then are boxed so it stays small, and
    /// the socket it is built from is not kept in it (1,320 bytes when written; 2,224 with those
    /// handlers, the answer to a send, the connection's identity and its recording held inline;
    /// 1,448 with the socket).
    #[test]
    fn a_connections_future_stays_small() {
        let size = future_size(serve as fn(WebSocket, Arc<AppState>, Option<String>) -> _);
        assert!(size <= 1_400, "serve's future grew to {size} bytes: box the handler that grew it");
    }
}
