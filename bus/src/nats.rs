//! The bus on NATS (docs/architecture.md has the subject scheme).
//!
//! - Sends: a gateway publishes each accepted send to JetStream (`chat.send.<room>`, stream
//!   `CHAT_SEND`, work-queue retention), so it survives any one process dying until a fanout
//!   worker has stored it. The worker answers on the gateway's reply subject
//!   (`chat.reply.<gateway>.<token>`) and only then acks the JetStream message; a worker that
//!   dies before acking has the send redelivered to another worker, and the store's dedupe
//!   makes the retry harmless.
//! - Deliveries: core NATS `chat.deliver.<room>`, one message per room per gateway; gateways
//!   subscribe only for rooms with local members and repair gaps from the store.
//! - Presence and typing: core NATS `chat.events.<room>`.
//!
//! The W3C `traceparent` rides in NATS headers. Works with nats-server 2.9 and later: only
//! APIs 2.9 supports are used (singular `filter_subject`, no KV bucket creation).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream, AckKind};
use async_nats::HeaderMap;
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use protocol::bus::{RoomEvent, SendCommand, SendOutcome, SendReply};
use protocol::{subjects, ChatMessage};
use telemetry::journal::{Journal, Journey};
use telemetry::metrics::Metrics;
use tokio::sync::{mpsc, oneshot};

use crate::{BusError, FanoutBus, FeedItem, GatewayBus, PendingSend, Replier, RoomFeed};

/// Header naming where a worker sends its answer.
const REPLY_HEADER: &str = "Chat-Reply";
/// Header carrying the W3C trace context.
const TRACEPARENT: &str = "traceparent";
/// Durable consumer shared by all fanout workers.
const CONSUMER: &str = "fanout";
/// Capacity of a room feed.
const FEED_QUEUE: usize = 4_096;
/// How long a journey query waits for other processes' answers.
const JOURNAL_GATHER: Duration = Duration::from_millis(300);

/// How to reach NATS and tune the send stream.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated (`nats://127.0.0.1:4222`).
    pub url: String,
    /// This process's name: the gateway id for gateways.
    pub name: String,
    /// Replicas of the send stream (1 locally, 3 in a NATS cluster).
    pub stream_replicas: usize,
    /// How long a worker may hold a send before JetStream gives it to another worker.
    pub ack_wait: Duration,
    /// Sends a worker may hold unacked at once.
    pub max_ack_pending: i64,
}

impl NatsConfig {
    /// Defaults for a process named `name` on `url`.
    pub fn new(url: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            name: name.into(),
            stream_replicas: 1,
            ack_wait: Duration::from_secs(4),
            max_ack_pending: 20_000,
        }
    }
}

type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<SendReply>>>>;

/// Gateways' and fanout workers' connection to NATS.
pub struct NatsBus {
    client: async_nats::Client,
    js: jetstream::Context,
    config: NatsConfig,
    stream_ready: AtomicBool,
    waiters: Waiters,
    reply_prefix: String,
    sends: tokio::sync::Mutex<Option<consumer::pull::Stream>>,
    metrics: Metrics,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(format!("{what}: {e}"))
}

impl NatsBus {
    /// Connects (retrying in the background while NATS is down) and, for gateways, starts
    /// listening for workers' answers. Never fails because NATS is down: `ready` says so.
    pub async fn connect(config: NatsConfig, metrics: Metrics) -> Result<Arc<Self>, BusError> {
        let name = config.name.clone();
        let client = async_nats::ConnectOptions::new()
            .name(&config.name)
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            .event_callback(move |event| {
                let name = name.clone();
                async move { tracing::info!(process = %name, %event, "nats connection event") }
            })
            .connect(config.url.as_str())
            .await
            .map_err(|e| unavailable("connect to NATS", e))?;
        let js = jetstream::new(client.clone());
        let reply_prefix = format!("chat.reply.{}", config.name);
        let bus = Arc::new(Self {
            client,
            js,
            config,
            stream_ready: AtomicBool::new(false),
            waiters: Arc::default(),
            reply_prefix,
            sends: tokio::sync::Mutex::new(None),
            metrics,
        });
        bus.listen_for_replies().await?;
        Ok(bus)
    }

    /// Creates the send stream if it does not exist yet.
    async fn ensure_stream(&self) -> Result<stream::Stream, BusError> {
        let config = stream::Config {
            name: subjects::SEND_STREAM.to_owned(),
            subjects: vec![subjects::SEND_ALL.to_owned()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            num_replicas: self.config.stream_replicas,
            max_age: Duration::from_secs(3600),
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        };
        let stream = self.js.get_or_create_stream(config).await.map_err(|e| unavailable("create stream", e))?;
        self.stream_ready.store(true, Ordering::Release);
        Ok(stream)
    }

    async fn listen_for_replies(self: &Arc<Self>) -> Result<(), BusError> {
        let mut replies = self
            .client
            .subscribe(format!("{}.>", self.reply_prefix))
            .await
            .map_err(|e| unavailable("subscribe to replies", e))?;
        let waiters = self.waiters.clone();
        tokio::spawn(async move {
            while let Some(message) = replies.next().await {
                let Ok(reply) = serde_json::from_slice::<SendReply>(&message.payload) else {
                    tracing::warn!(subject = %message.subject, "undecodable send reply ignored");
                    continue;
                };
                let waiter = waiters.lock().unwrap_or_else(|p| p.into_inner()).remove(message.subject.as_str());
                if let Some(waiter) = waiter {
                    let _ = waiter.send(reply);
                }
            }
        });
        Ok(())
    }

    fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
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

#[async_trait]
impl GatewayBus for NatsBus {
    async fn submit(&self, command: SendCommand) -> Result<SendOutcome, BusError> {
        if !self.connected() {
            return Err(BusError::Unavailable("not connected to NATS".into()));
        }
        if !self.stream_ready.load(Ordering::Acquire) {
            self.ensure_stream().await?;
        }
        let token = uuid::Uuid::new_v4().simple().to_string();
        let reply_subject = format!("{}.{token}", self.reply_prefix);
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().unwrap_or_else(|p| p.into_inner()).insert(reply_subject.clone(), tx);
        let _guard = WaiterGuard { waiters: &self.waiters, subject: reply_subject.clone() };
        let span = tracing::info_span!(target: telemetry::logging::HOP_TARGET, "bus.publish", subject = %subjects::send(&command.room));
        let mut command = command;
        command.traceparent = telemetry::trace::traceparent_of(&span, &command.traceparent);
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", token.as_str());
        headers.insert(REPLY_HEADER, reply_subject.as_str());
        headers.insert(TRACEPARENT, command.traceparent.as_str());
        let payload = serde_json::to_vec(&command).map_err(|e| BusError::Rejected(e.to_string()))?;
        let stored = async {
            let ack = self
                .js
                .publish_with_headers(subjects::send(&command.room), headers, payload.into())
                .await
                .map_err(|e| unavailable("publish send", e))?;
            ack.await.map_err(|e| unavailable("send not stored in JetStream", e))
        };
        let started = std::time::Instant::now();
        tracing::Instrument::instrument(stored, span).await?;
        self.metrics.bus_latency.with_label_values(&["jetstream_publish"]).observe(started.elapsed().as_secs_f64());
        let replied = std::time::Instant::now();
        let reply = rx.await;
        self.metrics.bus_latency.with_label_values(&["worker_reply"]).observe(replied.elapsed().as_secs_f64());
        match reply {
            Ok(SendReply::Stored(outcome)) => Ok(outcome),
            Ok(SendReply::Rejected { reason }) => Err(BusError::Rejected(reason)),
            Ok(SendReply::Unavailable { reason }) => Err(BusError::Unavailable(reason)),
            Err(_) => Err(BusError::Unavailable("reply channel closed".into())),
        }
    }

    async fn subscribe(&self, room: &str) -> Result<RoomFeed, BusError> {
        let mut deliveries = self.client.subscribe(subjects::deliver(room)).await.map_err(|e| unavailable("subscribe", e))?;
        let mut events = self.client.subscribe(subjects::events(room)).await.map_err(|e| unavailable("subscribe", e))?;
        // A round trip makes sure the server has the subscriptions before the caller reads the
        // room's last seq, so nothing sequenced in between is missed.
        self.client.flush().await.map_err(|e| unavailable("flush subscriptions", e))?;
        let (tx, items) = mpsc::channel(FEED_QUEUE);
        let name = room.to_owned();
        tokio::spawn(async move {
            loop {
                let item = tokio::select! {
                    () = tx.closed() => break,
                    message = deliveries.next() => match message {
                        Some(m) => match serde_json::from_slice::<ChatMessage>(&m.payload) {
                            Ok(message) => {
                                let traceparent = m.headers.as_ref().and_then(|h| h.get(TRACEPARENT)).map(|v| v.as_str().to_owned());
                                FeedItem::Message(Arc::new(message), traceparent)
                            }
                            Err(e) => { tracing::warn!(room = %name, error = %e, "undecodable delivery ignored"); continue }
                        },
                        None => break,
                    },
                    message = events.next() => match message {
                        Some(m) => match serde_json::from_slice::<RoomEvent>(&m.payload) {
                            Ok(event) => FeedItem::Event(event),
                            Err(e) => { tracing::warn!(room = %name, error = %e, "undecodable room event ignored"); continue }
                        },
                        None => break,
                    },
                };
                if tx.send(item).await.is_err() {
                    break;
                }
            }
            let _ = deliveries.unsubscribe().await;
            let _ = events.unsubscribe().await;
        });
        Ok(RoomFeed { room: room.to_owned(), items })
    }

    async fn publish_event(&self, room: &str, event: RoomEvent) -> Result<(), BusError> {
        let payload = serde_json::to_vec(&event).map_err(|e| BusError::Rejected(e.to_string()))?;
        self.client.publish(subjects::events(room), payload.into()).await.map_err(|e| unavailable("publish event", e))
    }

    async fn ready(&self) -> Result<(), BusError> {
        if !self.connected() {
            return Err(BusError::Unavailable("not connected to NATS".into()));
        }
        if !self.stream_ready.load(Ordering::Acquire) {
            self.ensure_stream().await?;
        }
        Ok(())
    }

    fn is_distributed(&self) -> bool {
        true
    }

    async fn remote_journeys(&self, id: uuid::Uuid) -> Vec<Journey> {
        let inbox = self.client.new_inbox();
        let Ok(mut replies) = self.client.subscribe(inbox.clone()).await else { return Vec::new() };
        if self.client.publish_with_reply(subjects::JOURNAL_QUERY, inbox, id.to_string().into()).await.is_err() {
            return Vec::new();
        }
        let mut journeys = Vec::new();
        let deadline = tokio::time::Instant::now() + JOURNAL_GATHER;
        while let Ok(Some(reply)) = tokio::time::timeout_at(deadline, replies.next()).await {
            match serde_json::from_slice::<Journey>(&reply.payload) {
                Ok(journey) if !journey.hops.iter().all(|hop| *hop.process == *self.config.name) => journeys.push(journey),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "undecodable journey reply ignored"),
            }
        }
        journeys
    }
}

impl NatsBus {
    /// Answers journey queries from other processes with what `journal` remembers.
    pub async fn serve_journal(&self, journal: Arc<Journal>) -> Result<(), BusError> {
        let mut queries = self.client.subscribe(subjects::JOURNAL_QUERY).await.map_err(|e| unavailable("subscribe to journal queries", e))?;
        let client = self.client.clone();
        tokio::spawn(async move {
            while let Some(query) = queries.next().await {
                let (Some(reply), Ok(id)) = (query.reply, std::str::from_utf8(&query.payload).map(uuid::Uuid::parse_str)) else { continue };
                let Ok(id) = id else { continue };
                if let Some(journey) = journal.get(id) {
                    if let Ok(payload) = serde_json::to_vec(&journey) {
                        let _ = client.publish(reply, payload.into()).await;
                    }
                }
            }
        });
        Ok(())
    }
}

/// Answers one JetStream send.
struct NatsReplier {
    client: async_nats::Client,
    message: jetstream::Message,
    reply_subject: Option<String>,
}

#[async_trait]
impl Replier for NatsReplier {
    async fn reply(self: Box<Self>, outcome: Result<SendOutcome, BusError>) {
        let (reply, ack) = match outcome {
            Ok(outcome) => (SendReply::Stored(outcome), AckKind::Ack),
            Err(BusError::Rejected(reason)) => (SendReply::Rejected { reason }, AckKind::Term),
            // Not stored and the gateway tells the client so: drop the send for good, the
            // client retries with the same client_msg_id.
            Err(BusError::Unavailable(reason)) => (SendReply::Unavailable { reason }, AckKind::Term),
        };
        if let Some(subject) = self.reply_subject {
            if let Ok(payload) = serde_json::to_vec(&reply) {
                if let Err(e) = self.client.publish(subject, payload.into()).await {
                    tracing::warn!(error = %e, "send reply not published");
                }
            }
        }
        if let Err(e) = self.message.ack_with(ack).await {
            // The send will be redelivered; the store's dedupe answers the retry.
            tracing::warn!(error = %e, "JetStream ack failed");
        }
    }
}

impl NatsBus {
    async fn open_sends(&self) -> Result<consumer::pull::Stream, BusError> {
        let stream = self.ensure_stream().await?;
        let consumer: consumer::PullConsumer = stream
            .get_or_create_consumer(
                CONSUMER,
                consumer::pull::Config {
                    durable_name: Some(CONSUMER.to_owned()),
                    filter_subject: subjects::SEND_ALL.to_owned(),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: self.config.ack_wait,
                    max_ack_pending: self.config.max_ack_pending,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| unavailable("create consumer", e))?;
        consumer
            .stream()
            .max_messages_per_batch(512)
            .heartbeat(Duration::from_secs(5))
            .messages()
            .await
            .map_err(|e| unavailable("pull sends", e))
    }

    fn pending(&self, message: jetstream::Message) -> Option<PendingSend> {
        let reply_subject = message
            .headers
            .as_ref()
            .and_then(|h| h.get(REPLY_HEADER))
            .map(|v| v.as_str().to_owned());
        match serde_json::from_slice::<SendCommand>(&message.payload) {
            Ok(mut command) => Some({
                let span = tracing::info_span!(target: telemetry::logging::HOP_TARGET, "fanout.consume", room = %command.room);
                telemetry::trace::set_parent(&span, telemetry::trace::message_context(Some(&command.traceparent)));
                command.traceparent = telemetry::trace::traceparent_of(&span, &command.traceparent);
                PendingSend {
                command,
                reply: Box::new(NatsReplier { client: self.client.clone(), message, reply_subject }),
            }
            }),
            Err(e) => {
                tracing::warn!(subject = %message.subject, error = %e, "undecodable send terminated");
                tokio::spawn(async move {
                    let _ = message.ack_with(AckKind::Term).await;
                });
                None
            }
        }
    }
}

#[async_trait]
impl FanoutBus for NatsBus {
    async fn next_batch(&self, max: usize) -> Option<Vec<PendingSend>> {
        let mut sends = self.sends.lock().await;
        let mut backoff = Duration::from_millis(100);
        loop {
            if sends.is_none() {
                match self.open_sends().await {
                    Ok(stream) => *sends = Some(stream),
                    Err(e) => {
                        tracing::warn!(error = %e, ?backoff, "cannot pull sends yet; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        continue;
                    }
                }
            }
            let Some(stream) = sends.as_mut() else { continue };
            let first = match stream.next().await {
                Some(Ok(message)) => message,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "pulling sends failed; reopening");
                    *sends = None;
                    tokio::time::sleep(backoff).await;
                    continue;
                }
                None => {
                    *sends = None;
                    continue;
                }
            };
            let mut batch: Vec<PendingSend> = self.pending(first).into_iter().collect();
            while batch.len() < max {
                match stream.next().now_or_never() {
                    Some(Some(Ok(message))) => batch.extend(self.pending(message)),
                    _ => break,
                }
            }
            if !batch.is_empty() {
                return Some(batch);
            }
        }
    }

    async fn deliver(&self, message: Arc<ChatMessage>, traceparent: &str) -> Result<(), BusError> {
        let payload: Bytes = serde_json::to_vec(&*message).map_err(|e| BusError::Rejected(e.to_string()))?.into();
        let mut headers = HeaderMap::new();
        headers.insert(TRACEPARENT, traceparent);
        let started = std::time::Instant::now();
        let published = self
            .client
            .publish_with_headers(subjects::deliver(&message.room), headers, payload)
            .await
            .map_err(|e| unavailable("publish delivery", e));
        self.metrics.bus_latency.with_label_values(&["deliver_publish"]).observe(started.elapsed().as_secs_f64());
        published
    }
}
