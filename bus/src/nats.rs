//! The bus on NATS (docs/architecture.md has the subject scheme).
//!
//! - Sends: a gateway publishes each accepted send to JetStream
//!   (`chat.send.<partition>.<room>`, stream `CHAT_SEND`, work-queue retention), so it survives
//!   any one process dying until a fanout worker has stored it. Each of the 16 partitions is
//!   pulled by the one live worker that owns it (rendezvous hashing over worker heartbeats). The worker answers on the gateway's reply subject
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
use futures_util::StreamExt;
use protocol::bus::{RoomEvent, SendCommand, SendOutcome, SendReply};
use protocol::{subjects, ChatMessage};
use telemetry::journal::{Journal, Journey};
use telemetry::metrics::Metrics;
use tokio::sync::{mpsc, oneshot};

use crate::{BusError, BusErrorKind, FanoutBus, FeedItem, GatewayBus, PendingSend, Replier, RoomFeed};

/// Header naming where a worker sends its answer.
const REPLY_HEADER: &str = "Chat-Reply";
/// Header carrying the W3C trace context.
const TRACEPARENT: &str = "traceparent";
/// Durable consumer of a partition: `fanout-p<N>`.
fn consumer_name(partition: u32) -> String {
    format!("fanout-p{partition}")
}
/// The single consumer of every send used before partitions.
const LEGACY_CONSUMER: &str = "fanout";
/// A worker not heard from for this long is presumed gone; its partitions move.
const WORKER_SILENCE: Duration = Duration::from_secs(3);
/// How often a worker announces itself.
const WORKER_HEARTBEAT: Duration = Duration::from_secs(1);
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
    /// Sends pulled from the partitions this worker owns (fanout side).
    sends: tokio::sync::Mutex<Option<mpsc::Receiver<jetstream::Message>>>,
    /// Counts the connection's (re)connects; room feeds turn a change into [`FeedItem::Resumed`].
    connects: Arc<tokio::sync::watch::Sender<u64>>,
    metrics: Metrics,
}

fn unavailable(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> BusError {
    BusError::unavailable(what).with_source(e)
}

impl NatsBus {
    /// Connects (retrying in the background while NATS is down) and, for gateways, starts
    /// listening for workers' answers. Never fails because NATS is down: `ready` says so.
    pub async fn connect(config: NatsConfig, metrics: Metrics) -> Result<Arc<Self>, BusError> {
        let name = config.name.clone();
        let connects = Arc::new(tokio::sync::watch::Sender::new(0u64));
        let on_event = connects.clone();
        let client = async_nats::ConnectOptions::new()
            .name(&config.name)
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            .event_callback(move |event| {
                if matches!(event, async_nats::Event::Connected) {
                    on_event.send_modify(|count| *count += 1);
                }
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
            connects,
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
            return Err(BusError::unavailable("not connected to NATS"));
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
        let payload = serde_json::to_vec(&command).map_err(|e| BusError::encoding("encode for NATS", e))?;
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
            Ok(SendReply::Rejected { reason }) => Err(BusError::rejected(reason)),
            Ok(SendReply::Unavailable { reason }) => Err(BusError::unavailable(reason)),
            Err(_) => Err(BusError::unavailable("reply channel closed")),
        }
    }

    async fn subscribe(&self, room: &str) -> Result<RoomFeed, BusError> {
        let mut deliveries =
            self.client.subscribe(subjects::deliver(room)).await.map_err(|e| unavailable("subscribe", e))?;
        let mut events =
            self.client.subscribe(subjects::events(room)).await.map_err(|e| unavailable("subscribe", e))?;
        // A round trip makes sure the server has the subscriptions before the caller reads the
        // room's last seq, so nothing sequenced in between is missed.
        self.client.flush().await.map_err(|e| unavailable("flush subscriptions", e))?;
        let (tx, items) = mpsc::channel(FEED_QUEUE);
        let name = room.to_owned();
        let mut connects = self.connects.subscribe();
        tokio::spawn(async move {
            loop {
                let item = tokio::select! {
                    () = tx.closed() => break,
                    changed = connects.changed() => match changed {
                        Ok(()) => FeedItem::Resumed,
                        Err(_) => break,
                    },
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
        let payload = serde_json::to_vec(&event).map_err(|e| BusError::encoding("encode for NATS", e))?;
        self.client.publish(subjects::events(room), payload.into()).await.map_err(|e| unavailable("publish event", e))
    }

    async fn ready(&self) -> Result<(), BusError> {
        if !self.connected() {
            return Err(BusError::unavailable("not connected to NATS"));
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
                Ok(journey) if !journey.hops.iter().all(|hop| *hop.process == *self.config.name) => {
                    journeys.push(journey)
                }
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
        let mut queries = self
            .client
            .subscribe(subjects::JOURNAL_QUERY)
            .await
            .map_err(|e| unavailable("subscribe to journal queries", e))?;
        let client = self.client.clone();
        tokio::spawn(async move {
            while let Some(query) = queries.next().await {
                let (Some(reply), Ok(id)) =
                    (query.reply, std::str::from_utf8(&query.payload).map(uuid::Uuid::parse_str))
                else {
                    continue;
                };
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

/// The live worker that owns `partition`: the highest rendezvous score.
fn owner<'a>(workers: impl Iterator<Item = &'a String>, partition: u32) -> Option<&'a str> {
    workers
        .map(|worker| (crc32fast::hash(format!("{worker}/{partition}").as_bytes()), worker.as_str()))
        .max()
        .map(|(_, worker)| worker)
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
            Err(e) if e.kind() == BusErrorKind::Rejected => {
                (SendReply::Rejected { reason: e.message().to_owned() }, AckKind::Term)
            }
            // Not stored and the gateway tells the client so: drop the send for good, the
            // client retries with the same client_msg_id.
            Err(e) => (SendReply::Unavailable { reason: e.to_string() }, AckKind::Term),
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
    /// Starts this process as a fanout worker: it announces itself, follows the other
    /// workers, and pulls the partitions it owns. Ownership is rendezvous hashing over the
    /// live workers, so every worker computes the same owners without talking more; when one
    /// goes silent its partitions move within a few seconds, and its unacked sends are
    /// redelivered to the new owner after `ack_wait`. During a change two workers may briefly
    /// pull the same partition: the store's fenced append keeps seqs right.
    pub async fn start_worker(self: &Arc<Self>) -> Result<(), BusError> {
        let (tx, rx) = mpsc::channel(4 * 1024);
        *self.sends.lock().await = Some(rx);
        // Before partitions there was one consumer of every send; on a work-queue stream it
        // would overlap the partition consumers, so it goes (best effort: NATS may be down).
        if let Ok(stream) = self.ensure_stream().await {
            let _ = stream.delete_consumer(LEGACY_CONSUMER).await;
        }
        let mut heard =
            self.client.subscribe(subjects::WORKERS).await.map_err(|e| unavailable("subscribe to workers", e))?;
        let bus = self.clone();
        tokio::spawn(async move {
            let mut live: HashMap<String, tokio::time::Instant> = HashMap::new();
            let mut pullers: HashMap<u32, tokio::task::JoinHandle<()>> = HashMap::new();
            let mut tick = tokio::time::interval(WORKER_HEARTBEAT);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let _ = bus.client.publish(subjects::WORKERS, bus.config.name.clone().into()).await;
                    }
                    announced = heard.next() => match announced {
                        Some(message) => {
                            if let Ok(name) = std::str::from_utf8(&message.payload) {
                                live.insert(name.to_owned(), tokio::time::Instant::now());
                            }
                        }
                        None => break,
                    },
                    () = tx.closed() => break,
                }
                live.retain(|_, seen| seen.elapsed() < WORKER_SILENCE);
                live.insert(bus.config.name.clone(), tokio::time::Instant::now());
                let owned: Vec<u32> = (0..subjects::PARTITIONS)
                    .filter(|p| owner(live.keys(), *p) == Some(bus.config.name.as_str()))
                    .collect();
                pullers.retain(|partition, task| {
                    let keep = owned.contains(partition) && !task.is_finished();
                    if !keep {
                        tracing::info!(worker = %bus.config.name, partition, "partition released");
                        task.abort();
                    }
                    keep
                });
                for partition in owned {
                    if let std::collections::hash_map::Entry::Vacant(slot) = pullers.entry(partition) {
                        tracing::info!(worker = %bus.config.name, partition, "partition taken");
                        let (bus, tx) = (bus.clone(), tx.clone());
                        slot.insert(tokio::spawn(async move { bus.pull_partition(partition, tx).await }));
                    }
                }
            }
            for (_, task) in pullers {
                task.abort();
            }
        });
        Ok(())
    }

    /// Pulls one partition's sends into the worker's queue until aborted, reopening the pull
    /// with backoff when NATS goes away.
    async fn pull_partition(&self, partition: u32, into: mpsc::Sender<jetstream::Message>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.open_partition(partition).await {
                Ok(mut messages) => {
                    backoff = Duration::from_millis(100);
                    while let Some(message) = messages.next().await {
                        match message {
                            Ok(message) => {
                                if into.send(message).await.is_err() {
                                    return;
                                }
                            }
                            Err(e) => {
                                tracing::warn!(partition, error = %e, "pulling sends failed; reopening");
                                break;
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(partition, error = %e, ?backoff, "cannot pull sends yet; retrying"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    async fn open_partition(&self, partition: u32) -> Result<consumer::pull::Stream, BusError> {
        let stream = self.ensure_stream().await?;
        let name = consumer_name(partition);
        let consumer: consumer::PullConsumer = stream
            .get_or_create_consumer(
                &name,
                consumer::pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: subjects::send_partition(partition),
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
            .max_messages_per_batch(256)
            .heartbeat(Duration::from_secs(5))
            .messages()
            .await
            .map_err(|e| unavailable("pull sends", e))
    }

    fn pending(&self, message: jetstream::Message) -> Option<PendingSend> {
        let reply_subject = message.headers.as_ref().and_then(|h| h.get(REPLY_HEADER)).map(|v| v.as_str().to_owned());
        match serde_json::from_slice::<SendCommand>(&message.payload) {
            Ok(mut command) => {
                let delivery = message.info().map_or(1, |info| u64::try_from(info.delivered).unwrap_or(1).max(1));
                if delivery > 1 {
                    self.metrics.send_redeliveries.inc();
                    tracing::info!(room = %command.room, client_msg_id = %command.client_msg_id, delivery, "send redelivered by JetStream");
                }
                let span = tracing::info_span!(target: telemetry::logging::HOP_TARGET, "fanout.consume", room = %command.room, delivery);
                telemetry::trace::set_parent(&span, telemetry::trace::message_context(Some(&command.traceparent)));
                command.traceparent = telemetry::trace::traceparent_of(&span, &command.traceparent);
                Some(PendingSend {
                    command,
                    delivery,
                    reply: Box::new(NatsReplier { client: self.client.clone(), message, reply_subject }),
                })
            }
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
        let incoming = sends.as_mut()?;
        loop {
            let first = incoming.recv().await?;
            let mut batch: Vec<PendingSend> = self.pending(first).into_iter().collect();
            while batch.len() < max {
                match incoming.try_recv() {
                    Ok(message) => batch.extend(self.pending(message)),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                return Some(batch);
            }
        }
    }

    async fn deliver(&self, message: Arc<ChatMessage>, traceparent: &str) -> Result<(), BusError> {
        let payload: Bytes =
            serde_json::to_vec(&*message).map_err(|e| BusError::encoding("encode for NATS", e))?.into();
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
