//! A send's round trip over NATS. The gateway publishes the send to JetStream with a reply
//! subject of its own (`chat.reply.<gateway>.<token>`) and waits; the answer comes back on its
//! reply listener, which hands it to the waiting submit. On the worker's side a pulled JetStream
//! message becomes a [`PendingSend`] whose replier publishes the answer to that subject and only
//! then acks the message, so a worker that dies before answering has the send redelivered.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use async_nats::jetstream::{self, AckKind};
use async_nats::HeaderMap;
use async_trait::async_trait;
use futures_util::StreamExt;
use protocol::bus::{SendCommand, SendOutcome, SendReply};
use protocol::subjects;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::ids::Named;
use super::workers::{WorkersView, WORKER_HEARTBEAT};
use super::{unavailable, NatsBus, TRACEPARENT};
use crate::{BusError, BusErrorKind, LateAck, PendingSend, Replier};

/// Header naming where a worker sends its answer.
const REPLY_HEADER: &str = "Chat-Reply";

/// Submits waiting for their answer, by reply subject.
pub(super) type Waiters = Arc<Mutex<HashMap<String, mpsc::Sender<SendReply>>>>;

/// Answers one submit can take: one per copy of the send a worker held (JetStream redelivers a
/// send whose worker was slow), plus slack.
const REPLIES_PER_SEND: usize = 4;

/// The prefix of a process's reply subjects, `chat.reply.<name>`; one send's reply subject is
/// the prefix and a token, and the process listens on `<prefix>.>`.
pub(super) fn reply_prefix(name: &str) -> String {
    format!("chat.reply.{name}")
}

/// A send pulled from a partition, with its consumer's ack wait (the server's setting, which
/// an existing consumer keeps whatever this worker was told).
pub(super) struct Pulled {
    /// The JetStream message.
    pub message: jetstream::Message,
    /// After how long JetStream hands an unacked message out again.
    pub ack_wait: std::time::Duration,
}

/// How far the clocks of gateways, workers and NATS servers may disagree for a refusal to be
/// [settled](Settles::refusal).
const CLOCK_ALLOWANCE_MS: i64 = 1_000;

/// What decides whether a worker's refusal of one pulled send settles it.
#[derive(Debug, Clone, Copy)]
struct Settles {
    /// Which delivery of the send the worker holds.
    delivery: u64,
    /// When JetStream stored the send (its clock).
    published_ms: i64,
    /// The consumer's ack wait.
    ack_wait_ms: i64,
    /// The workers' deadline for the send (`SendCommand::deadline_ms`, the gateway's clock; 0
    /// for none).
    deadline_ms: i64,
}

impl Settles {
    /// Whether a refusal settles the send: no copy of it can be stored any more. That holds when
    /// the worker never tried to store its copy (`untried`), its copy was the first delivery, and
    /// JetStream cannot deliver the send again before its deadline: a redelivery comes `ack_wait`
    /// after a delivery, which is after the publish, and a worker stores nothing past the
    /// workers' deadline. Redeliveries before the deadline need `ack_wait` shorter than the time
    /// from publish to deadline (with [`CLOCK_ALLOWANCE_MS`] for clocks that disagree).
    fn refusal(&self, untried: bool) -> bool {
        untried
            && self.delivery == 1
            && self.deadline_ms != 0
            && self.published_ms + self.ack_wait_ms >= self.deadline_ms + CLOCK_ALLOWANCE_MS
    }
}

/// What a submit returns for a worker's answer.
fn outcome_of(reply: SendReply) -> Result<SendOutcome, BusError> {
    match reply {
        SendReply::Stored(outcome) => Ok(outcome),
        SendReply::Rejected { reason } => Err(BusError::rejected(reason)),
        SendReply::Unavailable { reason, .. } => Err(BusError::unavailable(reason)),
    }
}

/// The workers' answers to one send, judged as they come. `Stored`, `Rejected` and a settled
/// `Unavailable` are final. An unsettled `Unavailable` speaks only for the copy that worker held:
/// JetStream may have redelivered the send to another worker (after `ack_wait`) that stores it
/// before the deadline, or the worker's failed write may still land. So the wait goes on after
/// it; the caller's wait ends it at the send's deadline, and the gateway then answers `internal`
/// ("not known yet") and listens on for the workers' late word. Once
/// the gateway has published a second copy of the send ([`copy_for`]), no refusal settles it:
/// the other copy may still be stored.
#[derive(Debug, Default)]
struct Answers {
    /// The last refusal, for the error when no final answer comes.
    refused: Option<String>,
    /// Whether more than one copy of the send was published.
    copied: bool,
}

impl Answers {
    /// The final answer, if `reply` is one. `command` names the send in the log.
    fn judge(&mut self, reply: SendReply, command: &SendCommand) -> Option<Result<SendOutcome, BusError>> {
        match reply {
            SendReply::Unavailable { reason, settled } if !settled || self.copied => {
                tracing::debug!(
                    room = %command.room,
                    trace_id = %command.trace_id(),
                    client_msg_id = command.client_msg_id.as_str(),
                    reason,
                    "a worker did not store its copy of the send; awaiting another answer"
                );
                self.refused = Some(reason);
                None
            }
            answer => Some(outcome_of(answer)),
        }
    }

    /// What the send gets when the answers end without a final one: it was published, so a
    /// worker may still store it; only "not known" is true, never "unavailable" ("not stored").
    fn ended(self) -> Result<SendOutcome, BusError> {
        Err(BusError::indeterminate(match self.refused {
            Some(refused) => format!("answers ended without a final one; a copy was refused: {refused}"),
            None => "answers ended without a final one".into(),
        }))
    }
}

/// At most this many copies of one send are published after the first.
const MAX_COPIES: u32 = 2;

/// A copy is published only while at least this long is left before the workers' deadline: the
/// new owner needs time to pull it and store it.
const COPY_MARGIN_MS: i64 = 250;

/// The worker a new copy of a send should go to, if one should be published now: the worker
/// `holder` that owned the send's `partition` when it was published (at `published_at`) has gone
/// silent in `view`, having been heard at most two heartbeats before that publish (later, it was
/// already dead and never pulled the send, which JetStream then offers the new owner anyway),
/// another worker owns the partition, fewer than [`MAX_COPIES`] copies were made, and the
/// deadline is not close. A worker that said it left handed back what it held: no copy.
fn copy_for(
    holder: Option<&str>,
    published_at: Instant,
    view: &WorkersView,
    partition: u32,
    copies: u32,
    now_ms: i64,
    deadline_ms: i64,
) -> Option<String> {
    let last_heard = view.silent_since(holder?)?;
    let could_have_pulled = published_at <= last_heard + 2 * WORKER_HEARTBEAT;
    let next = view.owner_of(partition)?;
    (could_have_pulled && may_copy(copies, now_ms, deadline_ms)).then(|| next.to_owned())
}

/// The worker a send's partition moved to, if it moved from `holder` while `holder` is not
/// silent: it left, or a joining worker took the partition. `holder` gave back what it held
/// unanswered, but its pull was cut and a send JetStream handed it at that moment is offered
/// again only after `ack_wait`, past the deadline; so a send still unanswered
/// [`HANDOVER_SETTLE`] later gets one copy for the new owner. (A silent holder is
/// [`copy_for`]'s.)
fn moved_from(holder: Option<&str>, view: &WorkersView, partition: u32) -> Option<String> {
    let holder = holder?;
    let next = view.owner_of(partition)?;
    (next != holder && view.silent_since(holder).is_none()).then(|| next.to_owned())
}

/// How long after a send's partition moved from a worker that did not go silent the send, if
/// still unanswered, is copied once for the new owner ([`moved_from`]): past the hand-back's
/// 250 ms and the new owner's taking of the room's fence, which the worker it moved from let
/// go, by which it has answered what was handed back (about 0.4 s after a leave, measured).
/// When the fence was not let go, the copy waits out the store's 1 s grace at the new owner
/// with the first, and its dedupe keeps one.
const HANDOVER_SETTLE: std::time::Duration = std::time::Duration::from_millis(750);

/// A send published this soon after its partition moved may still have gone to the worker it
/// moved from, which hears of the move a moment after the gateway does: it counts as caught in
/// the move ([`HANDOVER_SETTLE`]).
const HANDOVER_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);

/// Sleeps until `at`, or for ever when it is not set.
async fn sleep_until_set(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Whether one more copy of a send may be published now: fewer than [`MAX_COPIES`] were, and
/// the deadline (0 for none) is at least [`COPY_MARGIN_MS`] away.
fn may_copy(copies: u32, now_ms: i64, deadline_ms: i64) -> bool {
    copies < MAX_COPIES && (deadline_ms == 0 || now_ms + COPY_MARGIN_MS < deadline_ms)
}

/// What a worker answers for an outcome, and how it acks the JetStream message: a stored send
/// is acked; a refused or failed one is terminated (never redelivered). `settled` says whether
/// a refusal settles the send ([`Settles::refusal`], given the error's `untried`).
fn reply_for(outcome: Result<SendOutcome, BusError>, settled: impl FnOnce(bool) -> bool) -> (SendReply, AckKind) {
    match outcome {
        Ok(outcome) => (SendReply::Stored(outcome), AckKind::Ack),
        Err(e) if e.kind() == BusErrorKind::Rejected => {
            (SendReply::Rejected { reason: e.message().to_owned() }, AckKind::Term)
        }
        // Not stored and the gateway tells the client so: drop the send for good, the
        // client retries with the same client_msg_id.
        Err(e) => (SendReply::Unavailable { reason: e.to_string(), settled: settled(e.untried()) }, AckKind::Term),
    }
}

/// Which delivery of a send a JetStream message is, from its `delivered` count (1 when
/// unknown or nonsensical).
fn delivery_number(delivered: Option<i64>) -> u64 {
    delivered.map_or(1, |delivered| u64::try_from(delivered).unwrap_or(1).max(1))
}

/// How much of the workers' deadline must be left to publish a send once a lost NATS connection
/// is back ([`NatsBus::await_connection`]): enough for JetStream to take it and a worker to
/// store it.
const PUBLISH_AFTER_RECONNECT_MS: i64 = 1_000;

/// How often a send waiting for the NATS connection looks at it between connection events.
const CONNECTION_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// How long after the NATS connection came back a send still unanswered is copied once more
/// ([`NatsBus::final_answer`]): time for the server to drop the workers' dead connections and
/// for their new pulls to begin.
const RECONNECT_SETTLE: std::time::Duration = std::time::Duration::from_millis(500);

/// Pause before publishing a send again whose JetStream answer was lost.
const REPUBLISH_PAUSE: std::time::Duration = std::time::Duration::from_millis(250);

/// Whether a failed JetStream publish may still have stored the message: its answer timed out or
/// the connection broke while waiting. No responders, a stream's error answer or a local limit
/// mean it was not stored.
fn publish_outcome_unknown(e: &jetstream::context::PublishError) -> bool {
    use jetstream::context::PublishErrorKind as Kind;
    matches!(e.kind(), Kind::TimedOut | Kind::BrokenPipe)
}

/// A send as published to JetStream, kept to publish a copy of it.
struct Published {
    subject: String,
    headers: HeaderMap,
    payload: bytes::Bytes,
    /// The first copy's `Nats-Msg-Id`.
    token: String,
    /// When the latest copy's publish began.
    at: Instant,
}

impl Published {
    /// Turns this into copy number `n` (from 1 after the first): a message id of its own, so
    /// JetStream's duplicate window does not drop it; same reply subject and payload.
    fn copy(&mut self, n: u32) {
        self.headers.insert("Nats-Msg-Id", format!("{}.copy{n}", self.token).as_str());
        self.at = Instant::now();
    }
}

/// Removes a waiter when its submit ends, answered or not.
struct WaiterGuard<'a> {
    waiters: &'a Waiters,
    subject: String,
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.subject);
    }
}

impl NatsBus {
    /// Routes workers' answers on this process's reply subjects to the submits waiting for them.
    pub(super) async fn listen_for_replies(self: &Arc<Self>) -> Result<(), BusError> {
        let mut replies = self
            .client
            .subscribe(format!("{}.>", self.reply_prefix))
            .await
            .map_err(|e| unavailable("subscribe to replies", e))?;
        let waiters = self.waiters.clone();
        let metrics = self.metrics.clone();
        // One task takes in every worker answer for this gateway, while each room's deliveries
        // have a task of their own. Under tokio's cooperative budget the task would hand back
        // its turn after 128 answers, so an overloaded runtime (a turn every 50 ms, say) caps
        // answers at a few thousand a second and they fall behind deliveries without bound.
        // Unconstrained, each turn takes in every answer waiting; each costs a microsecond or two.
        tokio::spawn(tokio::task::coop::unconstrained(async move {
            while let Some(message) = replies.next().await {
                let Ok(reply) = serde_json::from_slice::<SendReply>(&message.payload) else {
                    let named = Named::read(&message.payload, None);
                    tracing::warn!(
                        subject = %message.subject,
                        trace_id = named.trace_id.as_deref().map(tracing::field::display),
                        message_id = named.message_id.map(tracing::field::display),
                        "undecodable send reply ignored"
                    );
                    continue;
                };
                if let SendReply::Stored(SendOutcome { message, duplicate: false }) = &reply {
                    let lag = (protocol::now_ms() - message.ts).max(0) as f64 / 1000.0;
                    metrics.sequence_to_answer.observe(lag, &message.trace_id);
                }
                let waiter = waiters.lock().unwrap_or_else(|p| p.into_inner()).get(message.subject.as_str()).cloned();
                if let Some(waiter) = waiter {
                    let _ = waiter.try_send(reply);
                }
            }
        }));
        Ok(())
    }

    /// Publishes a send to JetStream and waits for the worker's answer ([`GatewayBus::submit`]).
    ///
    /// [`GatewayBus::submit`]: crate::GatewayBus::submit
    pub(super) async fn submit_send(&self, command: SendCommand) -> Result<SendOutcome, BusError> {
        let waited_for_connection = self.await_connection(command.deadline_ms).await?;
        if !self.stream_ready.load(Ordering::Acquire) {
            self.ensure_stream().await?;
        }
        // Reconnects from here on may have lost the send's first delivery ([`final_answer`]).
        let reconnects = self.connects.subscribe();
        let token = uuid::Uuid::new_v4().simple().to_string();
        let reply_subject = format!("{}.{token}", self.reply_prefix);
        let (tx, mut rx) = mpsc::channel(REPLIES_PER_SEND);
        self.waiters.lock().unwrap_or_else(|p| p.into_inner()).insert(reply_subject.clone(), tx);
        let _guard = WaiterGuard { waiters: &self.waiters, subject: reply_subject.clone() };
        let span = tracing::info_span!(target: telemetry::logging::HOP_TARGET, "bus.publish", subject = %subjects::send(&command.room));
        let mut command = command;
        if let Some(traceparent) = telemetry::trace::span_traceparent(&span) {
            command.traceparent = traceparent;
        }
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", token.as_str());
        headers.insert(REPLY_HEADER, reply_subject.as_str());
        headers.insert(TRACEPARENT, command.traceparent.as_str());
        let payload: bytes::Bytes =
            serde_json::to_vec(&command).map_err(|e| BusError::encoding("encode for NATS", e))?.into();
        let subject = subjects::send(&command.room);
        let deadline_ms = command.deadline_ms;
        let stored = async {
            // The send is refused at once only when JetStream surely did not store it. When the
            // answer is lost (a timeout, a broken connection) it may be stored, so it is published
            // again with the same Nats-Msg-Id (JetStream keeps one) until the deadline, and then
            // the worker's answer is awaited: the caller's wait, which ends at the send's deadline,
            // bounds it, and a worker never stores a send past the workers' deadline.
            // The same goes for a reconnect while the answer is awaited: an answer sent to the
            // connection that broke is lost, so the send is published again at once.
            let mut maybe_stored = false;
            let mut during_publish = reconnects.clone();
            loop {
                let published = self.js.publish_with_headers(subject.clone(), headers.clone(), payload.clone()).await;
                let answer = match published {
                    Ok(ack) => tokio::select! {
                        answer = ack => answer,
                        Ok(()) = during_publish.changed() => {
                            maybe_stored = true;
                            continue;
                        }
                    },
                    Err(e) if !maybe_stored => return Err(unavailable("publish send", e)),
                    Err(e) => Err(e),
                };
                match answer {
                    Ok(_) => return Ok(()),
                    Err(e) if !maybe_stored && !publish_outcome_unknown(&e) => {
                        return Err(unavailable("send not stored in JetStream", e))
                    }
                    Err(e) => {
                        maybe_stored = true;
                        if protocol::now_ms() + REPUBLISH_PAUSE.as_millis() as i64 >= deadline_ms {
                            tracing::warn!(
                                room = %command.room,
                                trace_id = %command.trace_id(),
                                client_msg_id = command.client_msg_id.as_str(),
                                error = %e,
                                "JetStream never confirmed the send; awaiting the worker's answer"
                            );
                            return Ok(());
                        }
                        tokio::time::sleep(REPUBLISH_PAUSE).await;
                    }
                }
            }
        };
        let published_at = Instant::now();
        tracing::Instrument::instrument(stored, span).await?;
        self.metrics
            .bus_latency
            .with_label_values(&["jetstream_publish"])
            .observe(published_at.elapsed().as_secs_f64());
        let replied = std::time::Instant::now();
        let first = Published { subject, headers, payload, token, at: published_at };
        let reply = self.final_answer(&mut rx, &command, first, reconnects, waited_for_connection).await;
        self.metrics.bus_latency.with_label_values(&["worker_reply"]).observe(replied.elapsed().as_secs_f64());
        reply
    }

    /// Returns once the NATS connection is up, waiting for it while at least
    /// [`PUBLISH_AFTER_RECONNECT_MS`] of the workers' deadline (0 for none: no wait) would be left:
    /// a connection that comes back within a few seconds (a server restarted or frozen briefly)
    /// costs no send. Otherwise the send is refused unpublished, so surely not stored. Says
    /// whether it waited: such a send is published the moment the connection comes back.
    async fn await_connection(&self, deadline_ms: i64) -> Result<bool, BusError> {
        if self.connected() {
            return Ok(false);
        }
        let mut connects = self.connects.subscribe();
        loop {
            if self.connected() {
                return Ok(true);
            }
            if deadline_ms == 0 || protocol::now_ms() + PUBLISH_AFTER_RECONNECT_MS >= deadline_ms {
                return Err(BusError::unavailable("not connected to NATS"));
            }
            // The connection's state may change just after its event: look again now and then.
            let _ = tokio::time::timeout(CONNECTION_POLL, connects.changed()).await;
        }
    }

    /// Waits for the final answer to a published send ([`Answers`]). When the worker that owned
    /// the send's partition at publish time goes silent before answering, having possibly pulled
    /// it, the send is published again under a new JetStream message id ([`copy_for`]), so the
    /// partition's new owner takes it before the deadline. Likewise when this process's NATS
    /// connection came back (`reconnects` changed) after the first publish began: an outage long
    /// enough to break connections (a frozen or restarted server) breaks the workers' too, and
    /// JetStream may have handed the send to a pull on a connection that is gone, offering it
    /// again only after `ack_wait`, past the deadline. A copy published at the reconnect, like a
    /// send that waited for the connection (`waited_for_connection`), may race the server's
    /// cleanup of the workers' dead connections just as the first did, so one more copy follows
    /// [`RECONNECT_SETTLE`] later if no answer came meanwhile. Which copies get stored does not
    /// matter: the sequencer's dedupe by `client_msg_id`, under the partition's fence, keeps one
    /// message.
    async fn final_answer(
        &self,
        replies: &mut mpsc::Receiver<SendReply>,
        command: &SendCommand,
        mut published: Published,
        mut reconnects: tokio::sync::watch::Receiver<u64>,
        waited_for_connection: bool,
    ) -> Result<SendOutcome, BusError> {
        let mut answers = Answers::default();
        let mut workers = self.workers_view();
        let partition = subjects::partition(&command.room);
        let mut holder = workers.borrow_and_update().owner_of(partition).map(str::to_owned);
        let mut copies = 0;
        let mut following = true;
        let mut watching_connection = true;
        // A reconnect while the first copy was being published counts: that copy may be lost too.
        let mut reconnected = reconnects.has_changed().unwrap_or(false);
        reconnects.borrow_and_update();
        let mut settled_copy_at = waited_for_connection.then(|| tokio::time::Instant::now() + RECONNECT_SETTLE);
        // Set when the send's partition moved from a worker that did not go silent: while this
        // send waits, or just before it was published (the worker it moved from may have heard
        // of the move a moment after this gateway, still pulling).
        let moved_just_before = workers
            .borrow()
            .moved_at(partition)
            .is_some_and(|at| published.at.saturating_duration_since(at) < HANDOVER_WINDOW);
        let mut handover_copy_at = moved_just_before.then(|| tokio::time::Instant::now() + HANDOVER_SETTLE);
        loop {
            if std::mem::take(&mut reconnected) && may_copy(copies, protocol::now_ms(), command.deadline_ms) {
                copies += 1;
                answers.copied = true;
                let why =
                    "the NATS connection came back: the first may have been handed to a pull that died with the outage";
                self.publish_copy(&mut published, copies, command, why).await;
                settled_copy_at = Some(tokio::time::Instant::now() + RECONNECT_SETTLE);
            }
            tokio::select! {
                () = sleep_until_set(handover_copy_at) => {
                    handover_copy_at = None;
                    if may_copy(copies, protocol::now_ms(), command.deadline_ms) {
                        copies += 1;
                        answers.copied = true;
                        let why = "no answer a moment after the send's partition moved: the worker that held it \
                                   may have had it in flight on a pull it cut";
                        self.publish_copy(&mut published, copies, command, why).await;
                    }
                }
                () = sleep_until_set(settled_copy_at) => {
                    settled_copy_at = None;
                    if may_copy(copies, protocol::now_ms(), command.deadline_ms) {
                        copies += 1;
                        answers.copied = true;
                        let why = "no answer a moment after the NATS connection came back: the last may have been \
                                   handed to a worker's pull not yet found dead";
                        self.publish_copy(&mut published, copies, command, why).await;
                    }
                }
                reply = replies.recv() => match reply {
                    Some(reply) => {
                        if let Some(answer) = answers.judge(reply, command) {
                            return answer;
                        }
                    }
                    None => return answers.ended(),
                },
                changed = reconnects.changed(), if watching_connection => {
                    reconnects.borrow_and_update();
                    match changed {
                        Ok(()) => reconnected = true,
                        Err(_) => watching_connection = false,
                    }
                }
                changed = workers.changed(), if following => {
                    if changed.is_err() {
                        following = false;
                        continue;
                    }
                    let view = workers.borrow_and_update().clone();
                    let Some(holder_now) = holder.clone() else {
                        // Published before this gateway heard any worker: the first owner it
                        // hears is the best guess of who holds the send.
                        holder = view.owner_of(partition).map(str::to_owned);
                        continue;
                    };
                    let now_ms = protocol::now_ms();
                    let Some(next) =
                        copy_for(Some(&holder_now), published.at, &view, partition, copies, now_ms, command.deadline_ms)
                    else {
                        if let Some(next) = moved_from(Some(&holder_now), &view, partition) {
                            holder = Some(next);
                            // A gateway that has just started hears the workers one by one:
                            // the owner it had is a guess, not a worker that held the send.
                            if view.settled {
                                handover_copy_at.get_or_insert(tokio::time::Instant::now() + HANDOVER_SETTLE);
                            }
                        }
                        continue;
                    };
                    copies += 1;
                    answers.copied = true;
                    let why = format!("the worker holding the send ({holder_now}) is gone; for the partition's new owner, {next}");
                    self.publish_copy(&mut published, copies, command, &why).await;
                    holder = Some(next);
                }
            }
        }
    }

    /// Publishes copy number `n` of a send ([`Published::copy`]) for the reason `why`, logged
    /// and counted in `chat_send_copies_total`; when it cannot be published, the first copy's
    /// answer is still awaited.
    async fn publish_copy(&self, published: &mut Published, n: u32, command: &SendCommand, why: &str) {
        tracing::info!(
            room = %command.room,
            trace_id = %command.trace_id(),
            client_msg_id = command.client_msg_id.as_str(),
            copy = n,
            why,
            "published a copy of the send"
        );
        self.metrics.send_copies.inc();
        published.copy(n);
        if let Err(e) = self.publish_once(published).await {
            tracing::warn!(
                room = %command.room,
                trace_id = %command.trace_id(),
                error = %e,
                "copy of the send not published; awaiting the first copy's answer"
            );
        }
    }

    /// Publishes a send to JetStream once and waits for the stream's acknowledgement.
    async fn publish_once(&self, published: &Published) -> Result<(), BusError> {
        let ack = self
            .js
            .publish_with_headers(published.subject.clone(), published.headers.clone(), published.payload.clone())
            .await
            .map_err(|e| unavailable("publish a copy of the send", e))?;
        ack.await.map_err(|e| unavailable("copy of the send not stored in JetStream", e))?;
        Ok(())
    }

    /// Turns a pulled JetStream message into a send for the worker; an undecodable one is
    /// terminated and skipped.
    pub(super) fn pending(&self, pulled: Pulled) -> Option<PendingSend> {
        let Pulled { message, ack_wait } = pulled;
        let reply_subject = message.headers.as_ref().and_then(|h| h.get(REPLY_HEADER)).map(|v| v.as_str().to_owned());
        match serde_json::from_slice::<SendCommand>(&message.payload) {
            Ok(mut command) => {
                let info = message.info().ok();
                let delivery = delivery_number(info.as_ref().map(|info| info.delivered));
                // Far in the past when the message has no JetStream info: its refusals never settle.
                let published_ms = info
                    .as_ref()
                    .map_or(i64::MIN / 2, |info| (info.published.unix_timestamp_nanos() / 1_000_000) as i64);
                if delivery > 1 {
                    self.metrics.send_redeliveries.inc();
                    tracing::info!(
                        room = %command.room,
                        trace_id = %command.trace_id(),
                        client_msg_id = command.client_msg_id.as_str(),
                        delivery,
                        "send redelivered by JetStream"
                    );
                }
                let span = tracing::info_span!(target: telemetry::logging::HOP_TARGET, "fanout.consume", room = %command.room, delivery);
                telemetry::trace::set_parent(&span, telemetry::trace::message_context(Some(&command.traceparent)));
                if let Some(traceparent) = telemetry::trace::span_traceparent(&span) {
                    command.traceparent = traceparent;
                }
                let settles = Settles {
                    delivery,
                    published_ms,
                    ack_wait_ms: i64::try_from(ack_wait.as_millis()).unwrap_or(i64::MAX / 2),
                    deadline_ms: command.deadline_ms,
                };
                Some(PendingSend {
                    command,
                    delivery,
                    reply: Box::new(NatsReplier { client: self.client.clone(), message, reply_subject, settles }),
                })
            }
            Err(e) => {
                let named = Named::read(&message.payload, message.headers.as_ref());
                tracing::warn!(
                    subject = %message.subject,
                    trace_id = named.trace_id.as_deref().map(tracing::field::display),
                    client_msg_id = named.client_msg_id.as_deref(),
                    error = %e,
                    "undecodable send terminated"
                );
                tokio::spawn(async move {
                    let _ = message.ack_with(AckKind::Term).await;
                });
                None
            }
        }
    }
}

/// Answers one JetStream send.
struct NatsReplier {
    client: async_nats::Client,
    message: jetstream::Message,
    reply_subject: Option<String>,
    settles: Settles,
}

#[async_trait]
impl Replier for NatsReplier {
    async fn reply(self: Box<Self>, outcome: Result<SendOutcome, BusError>) {
        let settles = self.settles;
        let (reply, ack) = reply_for(outcome, |untried| settles.refusal(untried));
        if let Some(subject) = self.reply_subject {
            if let Ok(payload) = serde_json::to_vec(&reply) {
                if let Err(e) = self.client.publish(subject, payload.into()).await {
                    let named = named(&self.message, &reply);
                    tracing::warn!(
                        trace_id = named.trace_id.as_deref().map(tracing::field::display),
                        message_id = named.message_id.map(tracing::field::display),
                        client_msg_id = named.client_msg_id.as_deref(),
                        error = %e,
                        "send reply not published"
                    );
                }
            }
        }
        if let Err(e) = self.message.ack_with(ack).await {
            // The send will be redelivered; the store's dedupe answers the retry.
            let named = named(&self.message, &reply);
            tracing::warn!(
                trace_id = named.trace_id.as_deref().map(tracing::field::display),
                message_id = named.message_id.map(tracing::field::display),
                client_msg_id = named.client_msg_id.as_deref(),
                error = %e,
                "JetStream ack failed"
            );
        }
    }

    async fn release(self: Box<Self>) {
        super::workers::hand_back(&self.message).await;
    }

    fn late_ack(&self) -> Option<Box<dyn LateAck>> {
        let subject = self.reply_subject.clone()?;
        Some(Box::new(NatsLateAck { client: self.client.clone(), subject }))
    }
}

/// Publishes a late `Stored` answer to the gateway's reply subject ([`Replier::late_ack`]). The
/// gateway still waits after an unsettled refusal: by the send's deadline it takes it as the
/// send's answer, after it (while it listens for the late word) records it as the send's fate;
/// past that nobody listens, and the answer is dropped.
struct NatsLateAck {
    client: async_nats::Client,
    subject: String,
}

#[async_trait]
impl LateAck for NatsLateAck {
    async fn stored(self: Box<Self>, outcome: SendOutcome) {
        let trace_id = outcome.message.trace_id.clone();
        let reply = SendReply::Stored(outcome);
        let published = match serde_json::to_vec(&reply) {
            Ok(payload) => self.client.publish(self.subject, payload.into()).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = published {
            tracing::warn!(trace_id, error = %e, "late ack not published; a retry finds the send in the store");
        }
    }
}

/// The ids of the send a worker answers, for a failure's log line: read again from its
/// JetStream message (the gateway's `traceparent` header and the send's `client_msg_id`), with
/// the message's ids when it was stored. Only failures pay for it.
fn named(message: &jetstream::Message, reply: &SendReply) -> Named {
    let mut named = Named::read(&message.payload, message.headers.as_ref());
    if let SendReply::Stored(outcome) = reply {
        named.message_id = Some(outcome.message.id);
        named.trace_id = Some(outcome.message.trace_id.clone());
    }
    named
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome() -> SendOutcome {
        SendOutcome {
            message: protocol::ChatMessage {
                room: "general".into(),
                seq: 7,
                id: uuid::Uuid::nil(),
                user: "alice".into(),
                body: "hi".into(),
                ts: 1,
                client_msg_id: "c-1".into(),
                trace_id: "0".repeat(32),
                prev: None,
                digest: None,
            },
            duplicate: false,
        }
    }

    fn command() -> SendCommand {
        SendCommand {
            room: "general".into(),
            user: "alice".into(),
            client_msg_id: "c-1".into(),
            body: "hi".into(),
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            gateway: "gw-1".into(),
            deadline_ms: 0,
        }
    }

    #[test]
    fn reply_subjects_are_under_the_process_prefix() {
        assert_eq!(reply_prefix("gateway-1"), "chat.reply.gateway-1");
    }

    #[test]
    fn a_stored_send_is_acked_and_returned_to_the_submitter() {
        let (reply, ack) = reply_for(Ok(outcome()), |_| true);
        assert!(matches!(ack, AckKind::Ack), "{ack:?}");
        assert_eq!(reply, SendReply::Stored(outcome()));
        assert_eq!(outcome_of(reply).unwrap(), outcome());
    }

    #[test]
    fn a_rejection_is_terminated_and_reaches_the_submitter_with_its_reason_alone() {
        let (reply, ack) = reply_for(Err(BusError::rejected("body too long")), |_| true);
        assert!(matches!(ack, AckKind::Term), "{ack:?}");
        assert_eq!(reply, SendReply::Rejected { reason: "body too long".into() });
        let error = outcome_of(reply).unwrap_err();
        assert_eq!(error.kind(), BusErrorKind::Rejected);
        assert_eq!(error.message(), "body too long");
    }

    #[test]
    fn a_failure_is_terminated_and_reaches_the_submitter_as_unavailable() {
        let (reply, ack) = reply_for(Err(BusError::unavailable("store down")), |untried| untried);
        assert!(matches!(ack, AckKind::Term), "{ack:?}");
        assert_eq!(reply, SendReply::Unavailable { reason: "bus unavailable: store down".into(), settled: false });
        assert_eq!(outcome_of(reply).unwrap_err().kind(), BusErrorKind::Unavailable);
    }

    #[test]
    fn an_untried_refusal_settles_only_where_the_rule_says_so() {
        let (reply, _) = reply_for(Err(BusError::expired("expired")), |untried| untried);
        assert_eq!(reply, SendReply::Unavailable { reason: "bus unavailable: expired".into(), settled: true });
        let (reply, _) = reply_for(Err(BusError::expired("expired")), |_| false);
        assert_eq!(reply, SendReply::Unavailable { reason: "bus unavailable: expired".into(), settled: false });
    }

    /// A send published at 1,000 ms with a deadline 5 s later.
    const PUBLISHED: i64 = 1_000;
    const DEADLINE: i64 = 6_000;

    /// Whether an `untried` refusal of `delivery` settles, as `Settles::refusal` decides.
    fn settled_refusal(untried: bool, delivery: u64, published_ms: i64, ack_wait_ms: i64, deadline_ms: i64) -> bool {
        Settles { delivery, published_ms, ack_wait_ms, deadline_ms }.refusal(untried)
    }

    #[test]
    fn an_untried_first_delivery_settles_when_no_redelivery_can_come_before_the_deadline() {
        assert!(settled_refusal(true, 1, PUBLISHED, 8_000, DEADLINE));
        // Exactly the clock allowance past the deadline.
        assert!(settled_refusal(true, 1, PUBLISHED, 6_000, DEADLINE));
    }

    #[test]
    fn a_refusal_does_not_settle_while_another_copy_may_be_stored() {
        // A redelivery may come before the deadline (the old 4 s ack wait), or within the
        // clocks' allowance of it.
        assert!(!settled_refusal(true, 1, PUBLISHED, 4_000, DEADLINE));
        assert!(!settled_refusal(true, 1, PUBLISHED, 5_999, DEADLINE));
        // A redelivered copy: the first may still be stored by its worker.
        assert!(!settled_refusal(true, 2, PUBLISHED, 8_000, DEADLINE));
        // A write was tried: it may still land.
        assert!(!settled_refusal(false, 1, PUBLISHED, 8_000, DEADLINE));
        // No deadline, or no JetStream info.
        assert!(!settled_refusal(true, 1, PUBLISHED, 8_000, 0));
        assert!(!settled_refusal(true, 1, i64::MIN / 2, 8_000, DEADLINE));
    }

    #[test]
    fn a_settled_refusal_is_final() {
        let mut answers = Answers::default();
        let answer = answers.judge(SendReply::Unavailable { reason: "expired".into(), settled: true }, &command());
        let error = answer.expect("final").unwrap_err();
        assert_eq!((error.kind(), error.message()), (BusErrorKind::Unavailable, "expired"));
    }

    #[test]
    fn a_copy_refused_is_not_final_another_copy_stored_is() {
        let mut answers = Answers::default();
        let refusal = SendReply::Unavailable { reason: "past its deadline".into(), settled: false };
        assert!(answers.judge(refusal, &command()).is_none());
        assert_eq!(answers.judge(SendReply::Stored(outcome()), &command()).unwrap().unwrap(), outcome());
    }

    #[test]
    fn once_the_send_was_copied_no_refusal_settles_it() {
        let mut answers = Answers { copied: true, ..Answers::default() };
        let settled = SendReply::Unavailable { reason: "expired in the queue".into(), settled: true };
        assert!(answers.judge(settled, &command()).is_none(), "the other copy may still be stored");
        let error = answers.ended().unwrap_err();
        assert_eq!(error.kind(), BusErrorKind::Indeterminate, "published, so perhaps stored: never unavailable");
        assert!(error.message().ends_with("expired in the queue"), "{}", error.message());
    }

    #[test]
    fn a_rejection_is_final_whatever_the_copies() {
        let mut answers = Answers { copied: true, ..Answers::default() };
        let answer = answers.judge(SendReply::Rejected { reason: "body too long".into() }, &command());
        assert_eq!(answer.unwrap().unwrap_err().kind(), BusErrorKind::Rejected);
    }

    #[test]
    fn answers_ended_without_any_is_not_known() {
        let error = Answers::default().ended().unwrap_err();
        assert_eq!(error.kind(), BusErrorKind::Indeterminate);
        assert_eq!(error.message(), "answers ended without a final one");
    }

    /// The view 4 s after `start`, `live` having been heard every second since and `gone`
    /// only at `start`.
    fn view(start: Instant, live: &[&str], gone: &[&str]) -> WorkersView {
        let mut membership = super::super::workers::Membership::observer("gw-1".into());
        for worker in gone {
            membership.heard(worker, start);
        }
        let second = std::time::Duration::from_secs(1);
        for beat in 0..=4 {
            for worker in live {
                membership.heard(worker, start + second * beat);
            }
        }
        membership.view(start + second * 4)
    }

    #[test]
    fn a_copy_is_made_only_for_a_send_a_silent_worker_could_have_pulled() {
        let start = Instant::now();
        let both = view(start, &["fanout-1", "fanout-2"], &[]);
        let partition = (0..subjects::PARTITIONS).find(|p| both.owner_of(*p) == Some("fanout-1")).unwrap();
        let after = view(start, &["fanout-2"], &["fanout-1"]);
        let (now, deadline) = (5_000, 10_000);
        let copy = |holder, published_at, view: &WorkersView, copies, now| {
            copy_for(holder, published_at, view, partition, copies, now, deadline)
        };
        assert_eq!(copy(Some("fanout-1"), start, &after, 0, now).as_deref(), Some("fanout-2"));
        let sec = std::time::Duration::from_secs(1);
        assert_eq!(copy(Some("fanout-1"), start + 2 * sec, &after, 0, now).as_deref(), Some("fanout-2"));
        // Published more than two heartbeats after it was last heard: it was dead, never pulled
        // the send, and JetStream gives the new owner the send itself.
        assert_eq!(copy(Some("fanout-1"), start + 3 * sec, &after, 0, now), None);
        // The holder is still live (it only lost the partition to a newcomer): it answers.
        let joined = view(start, &["fanout-1", "fanout-2", "fanout-3"], &[]);
        assert_eq!(copy(Some("fanout-1"), start, &joined, 0, now), None);
        // A worker that said it left handed back what it held.
        let mut membership = super::super::workers::Membership::observer("gw-1".into());
        membership.heard("fanout-1", start);
        membership.heard("fanout-2", start);
        membership.left("fanout-1");
        assert_eq!(copy(Some("fanout-1"), start, &membership.view(start), 0, now), None);
        // Nobody to take it, no known holder, too many copies, or too close to the deadline.
        assert_eq!(copy(Some("fanout-1"), start, &view(start, &[], &["fanout-1"]), 0, now), None);
        assert_eq!(copy(None, start, &after, 0, now), None);
        assert_eq!(copy(Some("fanout-1"), start, &after, MAX_COPIES, now), None);
        assert_eq!(copy(Some("fanout-1"), start, &after, 0, deadline - COPY_MARGIN_MS), None);
    }

    #[test]
    fn a_send_whose_partition_moved_from_a_worker_that_did_not_go_silent_is_marked_for_a_later_copy() {
        let start = Instant::now();
        let both = view(start, &["fanout-1", "fanout-2"], &[]);
        let partition = (0..subjects::PARTITIONS).find(|p| both.owner_of(*p) == Some("fanout-1")).unwrap();
        // Still the owner: nothing moved.
        assert_eq!(moved_from(Some("fanout-1"), &both, partition), None);
        // It left (handing back what it held, but perhaps not what was in flight on its pull).
        let mut membership = super::super::workers::Membership::observer("gw-1".into());
        membership.heard("fanout-1", start);
        membership.heard("fanout-2", start);
        membership.left("fanout-1");
        assert_eq!(moved_from(Some("fanout-1"), &membership.view(start), partition).as_deref(), Some("fanout-2"));
        // A joining worker took the partition from it, live.
        let joiner = (3..100)
            .map(|i| format!("fanout-{i}"))
            .find(|w| view(start, &["fanout-1", "fanout-2", w], &[]).owner_of(partition) == Some(w.as_str()))
            .unwrap();
        let joined = view(start, &["fanout-1", "fanout-2", &joiner], &[]);
        assert_eq!(moved_from(Some("fanout-1"), &joined, partition), Some(joiner));
        // A silent holder's sends are copied at once instead (copy_for); no holder, no owner: nothing.
        let after = view(start, &["fanout-2"], &["fanout-1"]);
        assert_eq!(moved_from(Some("fanout-1"), &after, partition), None);
        assert_eq!(moved_from(None, &joined, partition), None);
        assert_eq!(moved_from(Some("fanout-1"), &view(start, &[], &[]), partition), None);
    }

    #[test]
    fn copies_are_bounded_in_number_and_stop_near_the_deadline() {
        let deadline = 10_000;
        assert!(may_copy(0, 5_000, deadline));
        assert!(may_copy(MAX_COPIES - 1, deadline - COPY_MARGIN_MS - 1, deadline));
        assert!(!may_copy(MAX_COPIES, 5_000, deadline));
        assert!(!may_copy(0, deadline - COPY_MARGIN_MS, deadline));
        assert!(!may_copy(0, deadline + 1, deadline));
        // A send without a deadline can always be copied, up to the bound.
        assert!(may_copy(1, i64::MAX / 2, 0));
    }

    #[test]
    fn the_delivery_number_counts_from_one() {
        assert_eq!(delivery_number(None), 1);
        assert_eq!(delivery_number(Some(0)), 1);
        assert_eq!(delivery_number(Some(-3)), 1);
        assert_eq!(delivery_number(Some(1)), 1);
        assert_eq!(delivery_number(Some(4)), 4);
    }
}
