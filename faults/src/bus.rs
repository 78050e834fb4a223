//! Decorators over the bus: a gateway's side (`gateway.nats`, `gateway.feed`) and a worker's
//! side (`fanout.sequence`, `fanout.publish`).

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use bus::{BusError, FanoutBus, FeedItem, GatewayBus, PendingSend, RoomFeed};
use protocol::bus::{RoomEvent, SendCommand, SendOutcome};
use protocol::ChatMessage;
use tokio::sync::{mpsc, Mutex};
use tokio::time::Instant;

use crate::marks::Injector;
use crate::{FaultAction, Hop};

/// Items buffered between a room's real feed and the feed a faulty gateway bus hands out.
const FEED_BUFFER: usize = 1024;

// === the gateway's side ===

/// A gateway's bus under `gateway.nats` (cut: sends refused, feeds lose messages, not ready)
/// and `gateway.feed` (drop or delay a room's messages on arrival).
pub struct FaultyGatewayBus {
    inner: Arc<dyn GatewayBus>,
    injector: Injector,
}

impl FaultyGatewayBus {
    /// `inner` under the injector's faults.
    pub fn new(inner: Arc<dyn GatewayBus>, injector: Injector) -> Self {
        Self { inner, injector }
    }
}

#[async_trait]
impl GatewayBus for FaultyGatewayBus {
    async fn submit(&self, command: SendCommand) -> Result<SendOutcome, BusError> {
        if let Some(fired) = self.injector.decide(Hop::GatewayNats, &command.room) {
            self.injector.count(&fired);
            let trace_id = telemetry::trace::trace_id_of(&command.traceparent);
            self.injector.mark_send(&fired, &command.dedupe_key(), &trace_id, serde_json::json!({}));
            return Err(BusError::unavailable("not connected to NATS"));
        }
        self.inner.submit(command).await
    }

    async fn subscribe(&self, room: &str) -> Result<RoomFeed, BusError> {
        let inner = self.inner.subscribe(room).await?;
        let (items, outer) = mpsc::channel(FEED_BUFFER);
        tokio::spawn(forward_feed(inner, items, self.injector.clone()));
        Ok(RoomFeed { room: room.to_owned(), items: outer })
    }

    async fn publish_event(&self, room: &str, event: RoomEvent) -> Result<(), BusError> {
        self.inner.publish_event(room, event).await
    }

    async fn ready(&self) -> Result<(), BusError> {
        if let Some(cut) = self.injector.faults.armed(Hop::GatewayNats) {
            // A sealed cut looks like a real outage.
            let why = if cut.sealed { "not connected to NATS" } else { "cut off by an injected fault" };
            return Err(BusError::unavailable(why));
        }
        self.inner.ready().await
    }

    fn is_distributed(&self) -> bool {
        self.inner.is_distributed()
    }

    async fn remote_journeys(&self, id: uuid::Uuid) -> Vec<telemetry::journal::Journey> {
        self.inner.remote_journeys(id).await
    }
}

/// Moves a room's feed items to the gateway, losing or delaying messages as faults say, until
/// either side goes away.
async fn forward_feed(mut feed: RoomFeed, items: mpsc::Sender<FeedItem>, injector: Injector) {
    loop {
        let item = tokio::select! {
            () = items.closed() => return,
            item = feed.items.recv() => match item {
                Some(item) => item,
                None => return,
            },
        };
        if let FeedItem::Message(message, _) = &item {
            if !arrives(&injector, message).await {
                continue;
            }
        }
        if items.send(item).await.is_err() {
            return;
        }
    }
}

/// Whether a message reaches the gateway, after any delay.
async fn arrives(injector: &Injector, message: &ChatMessage) -> bool {
    for hop in [Hop::GatewayNats, Hop::GatewayFeed] {
        let Some(fired) = injector.decide(hop, &message.room) else { continue };
        injector.mark_message(
            &fired,
            message.id,
            &message.trace_id,
            serde_json::json!({"gateway": injector.process()}),
        );
        match fired.action {
            FaultAction::Delay => tokio::time::sleep(fired.wait()).await,
            _ => return false,
        }
    }
    true
}

// === the worker's side ===

/// A worker's bus under `fanout.sequence` (stall or delay a room's sends before they are
/// sequenced; the worker takes nothing else meanwhile) and `fanout.publish` (drop, duplicate or
/// delay the publication of a stored message).
pub struct FaultyFanoutBus {
    inner: Arc<dyn FanoutBus>,
    injector: Injector,
    /// Sends of stalled rooms and when they are handed out.
    stalled: Mutex<Option<(Vec<PendingSend>, Instant)>>,
}

impl FaultyFanoutBus {
    /// `inner` under the injector's faults.
    pub fn new(inner: Arc<dyn FanoutBus>, injector: Injector) -> Self {
        Self { inner, injector, stalled: Mutex::new(None) }
    }

    /// Splits off the sends of rooms a `fanout.sequence` fault holds, marking them; returns the
    /// held sends and how long they are held.
    fn stall(&self, batch: &mut Vec<PendingSend>) -> Option<(Vec<PendingSend>, std::time::Duration)> {
        let mut decided: HashMap<String, Option<crate::Fired>> = HashMap::new();
        for pending in batch.iter() {
            let room = &pending.command.room;
            if !decided.contains_key(room) {
                decided.insert(room.clone(), self.injector.decide(Hop::FanoutSequence, room));
            }
        }
        let fired: Vec<crate::Fired> = decided.values().flatten().copied().collect();
        let hold = fired.iter().map(crate::Fired::wait).max()?;
        let (held, kept): (Vec<PendingSend>, Vec<PendingSend>) =
            std::mem::take(batch).into_iter().partition(|p| decided.get(&p.command.room).is_some_and(Option::is_some));
        *batch = kept;
        for fired in &fired {
            self.injector.count(fired);
        }
        for pending in &held {
            let Some(Some(fired)) = decided.get(&pending.command.room) else { continue };
            let trace_id = telemetry::trace::trace_id_of(&pending.command.traceparent);
            let detail = serde_json::json!({"millis": fired.millis, "worker": self.injector.process()});
            self.injector.mark_send(fired, &pending.command.dedupe_key(), &trace_id, detail);
        }
        if fired.iter().any(|f| !f.sealed) {
            tracing::warn!(sends = held.len(), ?hold, "injected fault: worker holds a room's sends");
        }
        Some((held, hold))
    }
}

#[async_trait]
impl FanoutBus for FaultyFanoutBus {
    async fn next_batch(&self, max: usize) -> Option<Vec<PendingSend>> {
        let mut stalled = self.stalled.lock().await;
        if stalled.is_none() {
            let mut batch = self.inner.next_batch(max).await?;
            let Some((held, hold)) = self.stall(&mut batch) else { return Some(batch) };
            *stalled = Some((held, Instant::now() + hold));
            if !batch.is_empty() {
                return Some(batch);
            }
        }
        // Held sends stay here until handed out, even if this call is given up on.
        let until = stalled.as_ref().map(|(_, until)| *until)?;
        tokio::time::sleep_until(until).await;
        stalled.take().map(|(held, _)| held)
    }

    async fn deliver(&self, message: Arc<ChatMessage>, traceparent: &str) -> Result<(), BusError> {
        let Some(fired) = self.injector.decide(Hop::FanoutPublish, &message.room) else {
            return self.inner.deliver(message, traceparent).await;
        };
        self.injector.mark_message(
            &fired,
            message.id,
            &message.trace_id,
            serde_json::json!({"worker": self.injector.process()}),
        );
        match fired.action {
            FaultAction::Drop => Ok(()),
            FaultAction::Duplicate => {
                self.inner.deliver(message.clone(), traceparent).await?;
                self.inner.deliver(message, traceparent).await
            }
            FaultAction::Delay => {
                tokio::time::sleep(fired.wait()).await;
                self.inner.deliver(message, traceparent).await
            }
            _ => self.inner.deliver(message, traceparent).await,
        }
    }
}
