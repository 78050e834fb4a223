//! The bus between gateways and fanout workers.
//!
//! Gateways see it as [`GatewayBus`]: submit a send and wait for its outcome, follow a room's
//! sequenced messages and ephemeral events, publish events. Fanout workers see it as
//! [`FanoutBus`]: take submitted sends in batches, answer each, publish sequenced messages.
//! [`local::LocalBus`] is both, inside one process.

pub mod local;
pub mod nats;

use std::sync::Arc;

use async_trait::async_trait;
use protocol::bus::{RoomEvent, SendCommand, SendOutcome};
use protocol::ChatMessage;
use tokio::sync::mpsc;

/// Errors of the bus.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum BusError {
    /// The bus (or the fanout behind it) cannot take the request now; nothing was accepted.
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    /// The send was rejected by the sequencer for a reason the client should see.
    #[error("rejected: {0}")]
    Rejected(String),
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
pub struct RoomFeed {
    /// The room.
    pub room: String,
    /// Items in the order the bus delivered them (messages may skip seqs when the bus lost one).
    pub items: mpsc::Receiver<FeedItem>,
}

/// The gateway's view of the bus.
#[async_trait]
pub trait GatewayBus: Send + Sync + 'static {
    /// Hands a send to the sequencer and waits until it is stored (or refused).
    async fn submit(&self, command: SendCommand) -> Result<SendOutcome, BusError>;

    /// Follows a room's messages and events.
    async fn subscribe(&self, room: &str) -> Result<RoomFeed, BusError>;

    /// Tells every gateway following the room about a presence or typing event.
    async fn publish_event(&self, room: &str, event: RoomEvent) -> Result<(), BusError>;

    /// Succeeds while the bus answers; used by `/readyz`.
    async fn ready(&self) -> Result<(), BusError>;

    /// Whether other gateways may share rooms with this one (so presence must be exchanged).
    fn is_distributed(&self) -> bool;

    /// What the other processes on the bus remember of a message's journey (empty in one
    /// process, where there are no others).
    async fn remote_journeys(&self, _id: uuid::Uuid) -> Vec<telemetry::journal::Journey> {
        Vec::new()
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
}
