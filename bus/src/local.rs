//! The in-process bus of the one-machine setup: channels instead of NATS.
//!
//! Lossless by construction: deliveries wait for room on a gateway's feed (backpressure) instead
//! of dropping, and every gateway feed is a bounded channel.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use protocol::bus::{RoomEvent, SendCommand, SendOutcome};
use protocol::ChatMessage;
use tokio::sync::{mpsc, oneshot};

use crate::{BusError, FanoutBus, FeedItem, GatewayBus, PendingSend, Replier, RoomFeed};

/// Capacity of the queue of submitted sends.
const SEND_QUEUE: usize = 16_384;
/// Capacity of each room feed.
const FEED_QUEUE: usize = 4_096;

/// Gateways and fanout in one process, joined by channels.
pub struct LocalBus {
    sends: mpsc::Sender<PendingSend>,
    pending: tokio::sync::Mutex<mpsc::Receiver<PendingSend>>,
    rooms: Mutex<HashMap<String, Vec<mpsc::Sender<FeedItem>>>>,
}

impl Default for LocalBus {
    fn default() -> Self {
        Self::new()
    }
}

impl LocalBus {
    /// A new, empty bus.
    pub fn new() -> Self {
        let (sends, pending) = mpsc::channel(SEND_QUEUE);
        Self { sends, pending: tokio::sync::Mutex::new(pending), rooms: Mutex::new(HashMap::new()) }
    }

    /// The live feeds of a room, pruning the ones whose subscriber went away.
    fn feeds(&self, room: &str) -> Vec<mpsc::Sender<FeedItem>> {
        let mut rooms = self.rooms.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(feeds) = rooms.get_mut(room) else { return Vec::new() };
        feeds.retain(|feed| !feed.is_closed());
        if feeds.is_empty() {
            rooms.remove(room);
            return Vec::new();
        }
        feeds.clone()
    }

    async fn broadcast(&self, room: &str, item: FeedItem) {
        for feed in self.feeds(room) {
            // A closed feed is a gateway that just unsubscribed: nothing to deliver to.
            let _ = feed.send(item.clone()).await;
        }
    }
}

struct LocalReplier(oneshot::Sender<Result<SendOutcome, BusError>>);

#[async_trait]
impl Replier for LocalReplier {
    async fn reply(self: Box<Self>, outcome: Result<SendOutcome, BusError>) {
        // The submitter may have given up (its client left); the message is stored either way.
        let _ = self.0.send(outcome);
    }
}

#[async_trait]
impl GatewayBus for LocalBus {
    async fn submit(&self, command: SendCommand) -> Result<SendOutcome, BusError> {
        let (reply, outcome) = oneshot::channel();
        self.sends
            .send(PendingSend { command, delivery: 1, reply: Box::new(LocalReplier(reply)) })
            .await
            .map_err(|_| BusError::unavailable("fanout stopped"))?;
        outcome.await.map_err(|_| BusError::unavailable("fanout dropped the send"))?
    }

    async fn subscribe(&self, room: &str) -> Result<RoomFeed, BusError> {
        let (feed, items) = mpsc::channel(FEED_QUEUE);
        let mut rooms = self.rooms.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let feeds = rooms.entry(room.to_owned()).or_default();
        feeds.retain(|feed| !feed.is_closed());
        feeds.push(feed);
        Ok(RoomFeed { room: room.to_owned(), items })
    }

    async fn publish_event(&self, room: &str, event: RoomEvent) -> Result<(), BusError> {
        self.broadcast(room, FeedItem::Event(event)).await;
        Ok(())
    }

    async fn ready(&self) -> Result<(), BusError> {
        if self.sends.is_closed() {
            return Err(BusError::unavailable("fanout stopped"));
        }
        Ok(())
    }

    fn is_distributed(&self) -> bool {
        false
    }
}

#[async_trait]
impl FanoutBus for LocalBus {
    async fn next_batch(&self, max: usize) -> Option<Vec<PendingSend>> {
        let mut pending = self.pending.lock().await;
        let first = pending.recv().await?;
        let mut batch = vec![first];
        while batch.len() < max {
            match pending.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        Some(batch)
    }

    async fn deliver(&self, message: Arc<ChatMessage>, traceparent: &str) -> Result<(), BusError> {
        let room = message.room.clone();
        self.broadcast(&room, FeedItem::Message(message, Some(traceparent.to_owned()))).await;
        Ok(())
    }
}
