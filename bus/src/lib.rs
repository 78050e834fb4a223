//! The bus between gateways and fanout workers.
//!
//! Gateways see it by capability, bundled as [`GatewayBus`]: [`SendBus`] submits a send and
//! waits for its outcome, [`RoomBus`] follows a room's sequenced messages and ephemeral events
//! and publishes events, [`BusHealth`] tells readiness, [`JourneyBus`] gathers other processes'
//! journeys. Fanout workers see it as
//! [`FanoutBus`]: take submitted sends in batches, answer each, publish sequenced messages.
//! [`local::LocalBus`] is both, inside one process.

pub mod local;
pub mod nats;

use std::sync::Arc;

use async_trait::async_trait;
use futures_util::stream::BoxStream;
use protocol::bus::{RoomEvent, SendCommand, SendOutcome};
use protocol::ChatMessage;
use tokio::sync::mpsc;

/// What kind of failure a [`BusError`] is, for callers to branch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BusErrorKind {
    /// The bus (or the fanout behind it) cannot take the request now; nothing was accepted.
    Unavailable,
    /// The sequencer refused the send for a reason the client should see.
    Rejected,
    /// A value could not be encoded for the bus or decoded from it: a defect, not the client's.
    Encoding,
    /// Nobody can tell yet whether the send was stored (no final answer came from the workers by
    /// the send's deadline): not "unavailable", which promises "not stored".
    Indeterminate,
}

impl std::fmt::Display for BusErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Unavailable => "bus unavailable",
            Self::Rejected => "rejected",
            Self::Encoding => "bus encoding failed",
            Self::Indeterminate => "outcome unknown",
        })
    }
}

/// An error of the bus: a [`kind`](Self::kind) to branch on, a message and the underlying error
/// when there is one.
#[derive(Debug, Clone)]
pub struct BusError {
    kind: BusErrorKind,
    message: String,
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
    untried: bool,
}

impl BusError {
    /// An error of `kind` with `message`.
    pub fn new(kind: BusErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), source: None, untried: false }
    }

    /// The same error caused by `source`.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Arc::new(source));
        self
    }

    /// The bus cannot take the request now: `message` says why.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(BusErrorKind::Unavailable, message)
    }

    /// The send expired before its worker tried to store it: unavailable, and
    /// [`untried`](Self::untried).
    pub fn expired(message: impl Into<String>) -> Self {
        Self::unwritten(message)
    }

    /// The worker refused the send having written nothing of it (a store read failed before
    /// any write): unavailable, and [`untried`](Self::untried).
    pub fn unwritten(message: impl Into<String>) -> Self {
        Self { untried: true, ..Self::unavailable(message) }
    }

    /// Whether the send was stored is not known: `message` says why.
    pub fn indeterminate(message: impl Into<String>) -> Self {
        Self::new(BusErrorKind::Indeterminate, message)
    }

    /// The sequencer refused the send; `reason` is shown to the client.
    pub fn rejected(reason: impl Into<String>) -> Self {
        Self::new(BusErrorKind::Rejected, reason)
    }

    /// Encoding `what` for the bus (or decoding it) failed.
    pub fn encoding(what: impl Into<String>, source: serde_json::Error) -> Self {
        Self::new(BusErrorKind::Encoding, what).with_source(source)
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> BusErrorKind {
        self.kind
    }

    /// Whether the worker refused the send without ever trying to store it, so nothing of it
    /// can land later (unlike a store failure, whose write may still apply).
    pub fn untried(&self) -> bool {
        self.untried
    }

    /// The message without the kind or the source (for a rejection: the reason to show).
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl std::fmt::Display for BusError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl std::error::Error for BusError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|source| source as &(dyn std::error::Error + 'static))
    }
}

/// One item of a room's feed at a gateway.
#[derive(Debug, Clone)]
pub enum FeedItem {
    /// A sequenced, stored message and the `traceparent` it was published with.
    Message(Arc<ChatMessage>, Option<String>),
    /// Presence or typing.
    Event(RoomEvent),
    /// The bus connection came back after an outage. Deliveries published meanwhile were
    /// lost (core NATS keeps nothing for an absent subscriber), so the gateway checks the
    /// room's newest seq in the store.
    Resumed,
}

/// A subscription to one room's feed; dropping it unsubscribes.
///
/// A gateway holds one per room it has members in, so a feed is a plain stream over what the
/// bus already buffers (no task or channel of its own): 100,000 connections in rooms of 100 over
/// 7 gateways make 7,000 of them.
pub struct RoomFeed {
    /// The room.
    pub room: String,
    /// Items in the order the bus delivered them (messages may skip seqs when the bus lost one);
    /// it ends when the bus is gone.
    pub items: BoxStream<'static, FeedItem>,
}

impl RoomFeed {
    /// A feed over a channel's receiving end.
    pub fn from_channel(room: &str, mut items: mpsc::Receiver<FeedItem>) -> Self {
        Self { room: room.to_owned(), items: Box::pin(futures_util::stream::poll_fn(move |cx| items.poll_recv(cx))) }
    }
}

/// Handing sends to the sequencer: a gateway's writes.
#[async_trait]
pub trait SendBus: Send + Sync + 'static {
    /// Hands a send to the sequencer and waits until it is stored (or refused).
    async fn submit(&self, command: SendCommand) -> Result<SendOutcome, BusError>;
}

/// Following rooms: their sequenced messages, and presence and typing between gateways.
#[async_trait]
pub trait RoomBus: Send + Sync + 'static {
    /// Follows a room's messages and events.
    async fn subscribe(&self, room: &str) -> Result<RoomFeed, BusError>;

    /// Tells every gateway following the room about a presence or typing event.
    async fn publish_event(&self, room: &str, event: RoomEvent) -> Result<(), BusError>;

    /// Whether other gateways may share rooms with this one (so presence must be exchanged).
    fn is_distributed(&self) -> bool;
}

/// Whether the bus answers: a process's readiness.
#[async_trait]
pub trait BusHealth: Send + Sync + 'static {
    /// Succeeds while the bus answers; used by `/readyz`.
    async fn ready(&self) -> Result<(), BusError>;
}

/// What other processes remember of a message's journey.
#[async_trait]
pub trait JourneyBus: Send + Sync + 'static {
    /// The journeys the other processes on the bus hold for a message (none in one process,
    /// where there are no others).
    async fn remote_journeys(&self, id: uuid::Uuid) -> Vec<telemetry::journal::Journey>;
}

/// The bus as a gateway uses it: one handle per capability, so each part of the gateway holds
/// only what it needs and a decorator wraps only what it changes.
#[derive(Clone)]
pub struct GatewayBus {
    /// Submitting sends (connections).
    pub sends: Arc<dyn SendBus>,
    /// Room feeds and events (room hubs).
    pub rooms: Arc<dyn RoomBus>,
    /// Readiness (`/readyz`).
    pub health: Arc<dyn BusHealth>,
    /// Other processes' journeys (`/debug/messages`).
    pub journeys: Arc<dyn JourneyBus>,
}

impl GatewayBus {
    /// Every capability from one bus that has them all.
    pub fn of<B: SendBus + RoomBus + BusHealth + JourneyBus>(bus: Arc<B>) -> Self {
        Self { sends: bus.clone(), rooms: bus.clone(), health: bus.clone(), journeys: bus }
    }
}

/// A submitted send waiting for the fanout worker's answer.
pub struct PendingSend {
    /// What the client sent.
    pub command: SendCommand,
    /// Which delivery of this send it is: 1 the first time, more when the bus handed it out
    /// again because a worker held it past its ack deadline (a stall) or died holding it.
    pub delivery: u64,
    /// Where the outcome goes.
    pub reply: Box<dyn Replier>,
}

/// Answers one submitted send.
#[async_trait]
pub trait Replier: Send + Sync {
    /// Reports the outcome to the gateway that submitted it (and, on a durable bus, marks the
    /// send as done so it is not redelivered).
    async fn reply(self: Box<Self>, outcome: Result<SendOutcome, BusError>);

    /// Gives the send back unanswered, for another worker to take (its worker is leaving).
    /// By default it is dropped: a durable bus redelivers it after its ack wait.
    async fn release(self: Box<Self>) {}

    /// A second way to answer, for a send refused while its write's outcome was unknown (a
    /// refusal the gateway does not take as final): once the write is found stored, the gateway
    /// is told so at once: as the send's answer by its deadline, or after it as the send's late
    /// word.
    /// `None` (the default) when the bus has no such second answer.
    fn late_ack(&self) -> Option<Box<dyn LateAck>> {
        None
    }
}

/// Acks a send after its worker refused it without knowing whether its write landed
/// ([`Replier::late_ack`]).
#[async_trait]
pub trait LateAck: Send + Sync {
    /// Tells the gateway the send was stored after all, as `outcome`.
    async fn stored(self: Box<Self>, outcome: SendOutcome);
}

/// The fanout worker's view of the bus.
#[async_trait]
pub trait FanoutBus: Send + Sync + 'static {
    /// The next batch of submitted sends (at least one, at most `max`); `None` once the bus
    /// is closed for good.
    async fn next_batch(&self, max: usize) -> Option<Vec<PendingSend>>;

    /// Publishes a stored message to every gateway following its room, with the W3C
    /// `traceparent` of the message's trace.
    async fn deliver(&self, message: Arc<ChatMessage>, traceparent: &str) -> Result<(), BusError>;

    /// Stops taking sends and gives back those taken from the bus but not yet handed out in a
    /// batch, so another worker takes them at once (a worker leaving on shutdown, once its last
    /// batch is answered). By default nothing is held back.
    async fn leave(&self) {}

    /// Whether this worker still pulls `room`'s partition. A worker whose partition moved to
    /// another while it held some of the room's sends hands them back rather than take the
    /// room's fence back from the new owner (each take costs the other a fenced append and the
    /// store's grace). By default the worker pulls every room.
    fn pulls(&self, _room: &str) -> bool {
        true
    }
}
