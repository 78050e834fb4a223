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

use crate::{BusError, BusHealth, FanoutBus, FeedItem, JourneyBus, PendingSend, Replier, RoomBus, RoomFeed, SendBus};

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
impl SendBus for LocalBus {
    async fn submit(&self, command: SendCommand) -> Result<SendOutcome, BusError> {
        let (reply, outcome) = oneshot::channel();
        self.sends
            .send(PendingSend { command, delivery: 1, reply: Box::new(LocalReplier(reply)) })
            .await
            .map_err(|_| BusError::unavailable("fanout stopped"))?;
        outcome.await.map_err(|_| BusError::unavailable("fanout dropped the send"))?
    }
}

#[async_trait]
impl RoomBus for LocalBus {
    async fn subscribe(&self, room: &str) -> Result<RoomFeed, BusError> {
        let (feed, items) = mpsc::channel(FEED_QUEUE);
        let mut rooms = self.rooms.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let feeds = rooms.entry(room.to_owned()).or_default();
        feeds.retain(|feed| !feed.is_closed());
        feeds.push(feed);
        Ok(RoomFeed::from_channel(room, items))
    }

    async fn publish_event(&self, room: &str, event: RoomEvent) -> Result<(), BusError> {
        self.broadcast(room, FeedItem::Event(event)).await;
        Ok(())
    }

    fn is_distributed(&self) -> bool {
        false
    }
}

#[async_trait]
impl BusHealth for LocalBus {
    async fn ready(&self) -> Result<(), BusError> {
        if self.sends.is_closed() {
            return Err(BusError::unavailable("fanout stopped"));
        }
        Ok(())
    }
}

/// One process has no other processes' journeys.
#[async_trait]
impl JourneyBus for LocalBus {
    async fn remote_journeys(&self, _id: uuid::Uuid) -> Vec<telemetry::journal::Journey> {
        Vec::new()
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures_util::{FutureExt, StreamExt};
    use protocol::frames::PresenceState;

    use super::*;
    use crate::BusErrorKind;

    /// The feed's next item if one is already waiting.
    fn queued(feed: &mut RoomFeed) -> Option<FeedItem> {
        feed.items.next().now_or_never().flatten()
    }

    const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    fn command(room: &str, client_msg_id: &str) -> SendCommand {
        SendCommand {
            room: room.into(),
            user: "alice".into(),
            client_msg_id: client_msg_id.into(),
            body: "hello".into(),
            traceparent: TRACEPARENT.into(),
            gateway: "gateway-1".into(),
            deadline_ms: 0,
        }
    }

    fn message(room: &str, seq: u64) -> Arc<ChatMessage> {
        Arc::new(ChatMessage {
            room: room.into(),
            seq,
            id: uuid::Uuid::now_v7(),
            user: "alice".into(),
            body: format!("message {seq}"),
            ts: 0,
            client_msg_id: format!("c-{seq}"),
            trace_id: "0af7651916cd43dd8448eb211c80319c".into(),
            prev: None,
            digest: None,
        })
    }

    fn stored(command: &SendCommand, seq: u64) -> SendOutcome {
        let mut message = (*message(&command.room, seq)).clone();
        message.client_msg_id = command.client_msg_id.clone();
        SendOutcome { message, duplicate: false }
    }

    fn typing(user: &str) -> RoomEvent {
        RoomEvent::Typing { user: user.into() }
    }

    /// Lets every other task run until it waits (time is paused, so this sleeps no real time).
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    /// `future`'s output, failing the test if it never comes (with time paused, at once rather
    /// than after a minute).
    async fn within<F: std::future::Future>(what: &str, future: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(60), future).await.unwrap_or_else(|_| panic!("{what}: never happened"))
    }

    #[tokio::test(start_paused = true)]
    async fn a_send_reaches_the_worker_and_its_outcome_reaches_the_submitter() {
        let bus = Arc::new(LocalBus::new());
        let submitter = tokio::spawn({
            let bus = bus.clone();
            async move { bus.submit(command("general", "c-1")).await }
        });
        let mut batch = within("a batch", bus.next_batch(10)).await.expect("a batch");
        assert_eq!(batch.len(), 1);
        let send = batch.pop().unwrap();
        assert_eq!(send.command, command("general", "c-1"));
        assert_eq!(send.delivery, 1);
        let outcome = stored(&send.command, 1);
        send.reply.reply(Ok(outcome.clone())).await;
        assert_eq!(within("the outcome", submitter).await.unwrap().unwrap(), outcome);
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejection_reaches_the_submitter() {
        let bus = Arc::new(LocalBus::new());
        let submitter = tokio::spawn({
            let bus = bus.clone();
            async move { bus.submit(command("general", "c-1")).await }
        });
        let send = within("a batch", bus.next_batch(10)).await.unwrap().pop().unwrap();
        send.reply.reply(Err(BusError::rejected("body too long"))).await;
        let error = within("the outcome", submitter).await.unwrap().unwrap_err();
        assert_eq!(error.kind(), BusErrorKind::Rejected);
        assert_eq!(error.message(), "body too long");
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_holds_what_is_waiting_up_to_max_and_waits_for_at_least_one() {
        let bus = Arc::new(LocalBus::new());
        assert!(
            tokio::time::timeout(Duration::from_secs(60), bus.next_batch(10)).await.is_err(),
            "a batch without any send"
        );
        for id in ["c-1", "c-2", "c-3"] {
            let bus = bus.clone();
            tokio::spawn(async move { bus.submit(command("general", id)).await });
        }
        settle().await;
        let first = within("a first batch", bus.next_batch(2)).await.unwrap();
        let second = within("a second batch", bus.next_batch(2)).await.unwrap();
        assert_eq!((first.len(), second.len()), (2, 1));
        let mut ids: Vec<_> = first.iter().chain(&second).map(|send| send.command.client_msg_id.clone()).collect();
        ids.sort();
        assert_eq!(ids, ["c-1", "c-2", "c-3"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_send_the_worker_drops_unanswered_is_unavailable() {
        let bus = Arc::new(LocalBus::new());
        let submitter = tokio::spawn({
            let bus = bus.clone();
            async move { bus.submit(command("general", "c-1")).await }
        });
        // The worker takes the send and goes away without answering.
        drop(within("a batch", bus.next_batch(10)).await.unwrap());
        let error = within("the outcome", submitter).await.unwrap().unwrap_err();
        assert_eq!(error.kind(), BusErrorKind::Unavailable);
        assert_eq!(error.message(), "fanout dropped the send");
    }

    #[tokio::test(start_paused = true)]
    async fn feeds_get_their_rooms_deliveries_and_events_only() {
        let bus = LocalBus::new();
        let mut here = bus.subscribe("general").await.unwrap();
        let mut also_here = bus.subscribe("general").await.unwrap();
        let mut elsewhere = bus.subscribe("random").await.unwrap();
        assert_eq!((here.room.as_str(), elsewhere.room.as_str()), ("general", "random"));

        let delivered = message("general", 1);
        within("delivery", bus.deliver(delivered.clone(), TRACEPARENT)).await.unwrap();
        bus.publish_event("general", typing("bob")).await.unwrap();
        bus.publish_event("random", typing("carol")).await.unwrap();
        let delivered_elsewhere = message("random", 1);
        within("delivery", bus.deliver(delivered_elsewhere.clone(), TRACEPARENT)).await.unwrap();

        for feed in [&mut here, &mut also_here] {
            match queued(feed) {
                Some(FeedItem::Message(message, traceparent)) => {
                    assert_eq!(message, delivered);
                    assert_eq!(traceparent.as_deref(), Some(TRACEPARENT));
                }
                other => panic!("expected the delivery, got {other:?}"),
            }
            assert!(matches!(queued(feed), Some(FeedItem::Event(event)) if event == typing("bob")));
            assert!(queued(feed).is_none());
        }
        assert!(matches!(queued(&mut elsewhere), Some(FeedItem::Event(event)) if event == typing("carol")));
        assert!(
            matches!(queued(&mut elsewhere), Some(FeedItem::Message(message, _)) if message == delivered_elsewhere)
        );
        assert!(queued(&mut elsewhere).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_feed_is_unsubscribed_and_the_others_still_get_deliveries() {
        let bus = LocalBus::new();
        let gone = bus.subscribe("general").await.unwrap();
        let mut stays = bus.subscribe("general").await.unwrap();
        drop(gone);
        within("delivery", bus.deliver(message("general", 1), TRACEPARENT)).await.unwrap();
        assert_eq!(bus.rooms.lock().unwrap()["general"].len(), 1, "the dropped feed is still subscribed");
        assert!(matches!(queued(&mut stays), Some(FeedItem::Message(..))));

        drop(stays);
        let presence = RoomEvent::Presence { user: "bob".into(), state: PresenceState::Offline, gateway: "g".into() };
        bus.publish_event("general", presence).await.unwrap();
        assert!(!bus.rooms.lock().unwrap().contains_key("general"), "a room without feeds is still followed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_feed_holds_deliveries_back_instead_of_dropping_them() {
        let bus = Arc::new(LocalBus::new());
        let mut feed = bus.subscribe("general").await.unwrap();
        let last = FEED_QUEUE as u64 + 1;
        let deliverer = tokio::spawn({
            let bus = bus.clone();
            async move {
                for seq in 1..=last {
                    bus.deliver(message("general", seq), TRACEPARENT).await.unwrap();
                }
            }
        });
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!deliverer.is_finished(), "a delivery went past a full feed");
        for seq in 1..=last {
            match within("a delivery", feed.items.next()).await {
                Some(FeedItem::Message(message, _)) => assert_eq!(message.seq, seq),
                other => panic!("expected message {seq}, got {other:?}"),
            }
        }
        within("every delivery", deliverer).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn one_process_is_ready_not_distributed_and_has_no_remote_journeys() {
        let bus = LocalBus::new();
        bus.ready().await.unwrap();
        assert!(!bus.is_distributed());
        assert!(bus.remote_journeys(uuid::Uuid::now_v7()).await.is_empty());
    }
}
