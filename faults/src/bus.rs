//! Decorators over the bus: a gateway's side (`gateway.nats`, `gateway.answer`, `gateway.feed`) and a worker's
//! side (`fanout.sequence`, `fanout.publish`).

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use bus::{BusError, BusHealth, FanoutBus, FeedItem, GatewayBus, PendingSend, RoomBus, RoomFeed, SendBus};
use futures_util::StreamExt;
use protocol::bus::{RoomEvent, SendCommand, SendOutcome};
use protocol::ChatMessage;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::marks::Injector;
use crate::{FaultAction, Hop};

// === the gateway's side ===

/// A gateway's bus under `gateway.nats` (cut: sends refused, feeds lose messages, not ready),
/// `gateway.answer` (a worker's ack held or lost on arrival) and `gateway.feed` (drop or delay
/// a room's messages on arrival). Other processes' journeys pass untouched.
pub fn faulty_gateway_bus(inner: GatewayBus, injector: &Injector) -> GatewayBus {
    GatewayBus {
        sends: Arc::new(FaultySends { inner: inner.sends, injector: injector.clone() }),
        rooms: Arc::new(FaultyRooms { inner: inner.rooms, injector: injector.clone() }),
        health: Arc::new(FaultyHealth { inner: inner.health, injector: injector.clone() }),
        journeys: inner.journeys,
    }
}

/// Sends under a `gateway.nats` cut (refused as if NATS were unreachable) and `gateway.answer`
/// (the worker's ack held for the fault's delay, or lost: never returned, so the gateway's wait
/// for it runs out at the send's deadline and it answers `internal`, not known yet, as when NATS
/// loses an answer). Refusals pass.
struct FaultySends {
    inner: Arc<dyn SendBus>,
    injector: Injector,
}

#[async_trait]
impl SendBus for FaultySends {
    async fn submit(&self, command: SendCommand) -> Result<SendOutcome, BusError> {
        if let Some(fired) = self.injector.decide(Hop::GatewayNats, &command.room) {
            self.injector.count(&fired);
            self.injector.mark_send(&fired, &command.dedupe_key(), command.trace_id(), serde_json::json!({}));
            return Err(BusError::unavailable("not connected to NATS"));
        }
        let outcome = self.inner.submit(command).await?;
        let Some(fired) = self.injector.decide(Hop::GatewayAnswer, &outcome.message.room) else { return Ok(outcome) };
        let message = &outcome.message;
        self.injector.mark_message(
            &fired,
            message.id,
            &message.trace_id,
            serde_json::json!({"gateway": self.injector.process()}),
        );
        match fired.action {
            FaultAction::Delay => {
                tokio::time::sleep(fired.wait()).await;
                Ok(outcome)
            }
            _ => std::future::pending().await,
        }
    }
}

/// Room feeds under `gateway.nats` and `gateway.feed`.
struct FaultyRooms {
    inner: Arc<dyn RoomBus>,
    injector: Injector,
}

#[async_trait]
impl RoomBus for FaultyRooms {
    async fn subscribe(&self, room: &str) -> Result<RoomFeed, BusError> {
        let faulty = FaultyFeed::new(self.inner.subscribe(room).await?, self.injector.clone());
        let items = futures_util::stream::unfold(faulty, |mut faulty| async move {
            let item = faulty.next_item().await?;
            Some((item, faulty))
        });
        Ok(RoomFeed { room: room.to_owned(), items: Box::pin(items) })
    }

    async fn publish_event(&self, room: &str, event: RoomEvent) -> Result<(), BusError> {
        self.inner.publish_event(room, event).await
    }

    fn is_distributed(&self) -> bool {
        self.inner.is_distributed()
    }
}

/// Readiness under a `gateway.nats` cut: not ready.
struct FaultyHealth {
    inner: Arc<dyn BusHealth>,
    injector: Injector,
}

#[async_trait]
impl BusHealth for FaultyHealth {
    async fn ready(&self) -> Result<(), BusError> {
        if let Some(cut) = self.injector.faults.armed(Hop::GatewayNats) {
            // A sealed cut looks like a real outage.
            let why = if cut.sealed { "not connected to NATS" } else { "cut off by an injected fault" };
            return Err(BusError::unavailable(why));
        }
        self.inner.ready().await
    }
}

/// How often a feed that lost messages to a cut checks whether the cut is over.
const CUT_POLL: std::time::Duration = std::time::Duration::from_millis(250);

/// A room's feed as the gateway sees it under faults: messages lost or delayed as faults say.
/// When a cut that lost messages ends, the feed says [`FeedItem::Resumed`], as a real NATS
/// connection coming back does, so the hub looks in the store for what it missed. A stream over
/// the real feed, not a task: faults are on wherever an admin token is set, and a gateway follows
/// thousands of rooms.
struct FaultyFeed {
    /// The room's real feed; `None` once a `gateway.resubscribe` fault dropped it.
    feed: Option<RoomFeed>,
    room: String,
    injector: Injector,
    poll: tokio::time::Interval,
    lost_to_cut: bool,
}

impl FaultyFeed {
    fn new(feed: RoomFeed, injector: Injector) -> Self {
        let mut poll = tokio::time::interval(CUT_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self { room: feed.room.clone(), feed: Some(feed), injector, poll, lost_to_cut: false }
    }

    /// The next item that reaches the gateway; `None` when the real feed ended. After a
    /// `gateway.resubscribe` fault it never yields again, as a subscription that is gone.
    async fn next_item(&mut self) -> Option<FeedItem> {
        loop {
            let Some(feed) = self.feed.as_mut() else { return std::future::pending().await };
            let item = tokio::select! {
                _ = self.poll.tick(), if self.lost_to_cut => {
                    if self.injector.faults.armed(Hop::GatewayNats).is_some() {
                        continue;
                    }
                    self.lost_to_cut = false;
                    FeedItem::Resumed
                }
                item = feed.items.next() => item?,
            };
            if matches!(item, FeedItem::Resumed) && not_resubscribed(&self.injector, &self.room) {
                // The hub hears the reconnect and checks the store once; then the room's real
                // subscription is dropped while the hub still believes it is subscribed.
                self.feed = None;
                return Some(FeedItem::Resumed);
            }
            if let FeedItem::Message(message, _) = &item {
                if let Some(lost_at) = arrival(&self.injector, message).await {
                    self.lost_to_cut |= lost_at == Hop::GatewayNats;
                    continue;
                }
            }
            return Some(item);
        }
    }
}

/// Whether a `gateway.resubscribe` fault fires for `room` at a bus reconnect (counted, and
/// logged unless sealed).
fn not_resubscribed(injector: &Injector, room: &str) -> bool {
    let Some(fired) = injector.decide(Hop::GatewayResubscribe, room) else { return false };
    injector.count(&fired);
    if !fired.sealed {
        tracing::warn!(%room, "injected fault: the room's subscription is not restored after the bus reconnect");
    }
    true
}

/// Whether a message reaches the gateway (after any delay): `None` when it does, else the hop
/// where it was lost.
async fn arrival(injector: &Injector, message: &ChatMessage) -> Option<Hop> {
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
            _ => return Some(hop),
        }
    }
    None
}

// === the worker's side ===

/// A worker's bus under `fanout.sequence` (stall or delay a room's sends before they are
/// sequenced; the worker takes nothing else meanwhile) and `fanout.publish` (drop, duplicate,
/// delay, equivocate: publish a forged copy of a stored message, or forge_seq: publish it under
/// the next seq).
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
        if !self.injector.faults.is_active() {
            return None;
        }
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
            let command = &pending.command;
            // One line per send, so grepping a message's trace id finds why it waited; a sealed
            // fault leaves no line, as it leaves no mark.
            if !fired.sealed {
                tracing::warn!(
                    room = %command.room,
                    trace_id = %command.trace_id(),
                    client_msg_id = command.client_msg_id.as_str(),
                    hold = ?fired.wait(),
                    "injected fault: worker holds a send of a stalled room"
                );
            }
            let detail = serde_json::json!({"millis": fired.millis, "worker": self.injector.process()});
            self.injector.mark_send(fired, &command.dedupe_key(), command.trace_id(), detail);
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
            FaultAction::Equivocate => self.inner.deliver(Arc::new(forged(&message)), traceparent).await,
            FaultAction::ForgeSeq => {
                let mut lie = (*message).clone();
                lie.seq += 1;
                self.inner.deliver(Arc::new(lie), traceparent).await
            }
            _ => self.inner.deliver(message, traceparent).await,
        }
    }

    /// The sends a stall holds go back too: the worker never started on them.
    fn pulls(&self, room: &str) -> bool {
        self.inner.pulls(room)
    }

    async fn leave(&self) {
        if let Some((held, _)) = self.stalled.lock().await.take() {
            for pending in held {
                pending.reply.release().await;
            }
        }
        self.inner.leave().await;
    }
}

/// A forged copy of a stored message, as a competent liar makes it: the body rewritten and the
/// chain digest recomputed over it, so it passes the self-check and claims the true message's
/// place (same room, seq, id and `prev`).
fn forged(message: &ChatMessage) -> ChatMessage {
    let mut lie = message.clone();
    lie.body = format!("{} (forged by the worker)", lie.body);
    if let Some(prev) = lie.prev.take() {
        protocol::chain::seal(&mut lie, prev);
    }
    lie
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;
    use std::time::Duration;

    use bus::local::LocalBus;
    use bus::{BusErrorKind, Replier};
    use telemetry::journal::Journal;
    use telemetry::metrics::Metrics;
    use tokio::sync::mpsc;

    use super::*;
    use crate::{FaultSpec, Faults};

    fn injector(spec: FaultSpec) -> (Injector, Metrics) {
        let faults = Arc::new(Faults::default());
        faults.add(spec).unwrap();
        let metrics = Metrics::new();
        (Injector::new(faults, metrics.clone(), Arc::new(Journal::new("p", 100))), metrics)
    }

    fn command(room: &str, id: &str) -> SendCommand {
        SendCommand {
            room: room.into(),
            user: "u".into(),
            client_msg_id: id.into(),
            body: "b".into(),
            traceparent: String::new(),
            gateway: "gw".into(),
            deadline_ms: 0,
        }
    }

    struct NoReply;
    #[async_trait]
    impl Replier for NoReply {
        async fn reply(self: Box<Self>, _outcome: Result<SendOutcome, BusError>) {}
    }

    /// Hands out one prepared batch, then nothing.
    struct OneBatch(StdMutex<Option<Vec<PendingSend>>>);
    #[async_trait]
    impl FanoutBus for OneBatch {
        async fn next_batch(&self, _max: usize) -> Option<Vec<PendingSend>> {
            let batch = self.0.lock().unwrap().take();
            match batch {
                Some(batch) => Some(batch),
                None => std::future::pending().await,
            }
        }
        async fn deliver(&self, _message: Arc<ChatMessage>, _traceparent: &str) -> Result<(), BusError> {
            Ok(())
        }
    }

    fn rooms_of(batch: &[PendingSend]) -> Vec<String> {
        batch.iter().map(|p| p.command.room.clone()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_stall_holds_only_its_rooms_sends_and_nothing_else_is_taken_meanwhile() {
        let stall = FaultSpec {
            room: Some("slow".into()),
            delay_ms: Some(4_000),
            ..FaultSpec::new(Hop::FanoutSequence, FaultAction::Stall)
        };
        let (injector, metrics) = injector(stall);
        let batch = ["fast", "slow", "fast"]
            .iter()
            .enumerate()
            .map(|(i, room)| PendingSend {
                command: command(room, &i.to_string()),
                delivery: 1,
                reply: Box::new(NoReply),
            })
            .collect();
        let bus = FaultyFanoutBus::new(Arc::new(OneBatch(StdMutex::new(Some(batch)))), injector);
        let started = Instant::now();
        let first = bus.next_batch(10).await.unwrap();
        assert_eq!(rooms_of(&first), ["fast", "fast"]);
        assert!(started.elapsed() < Duration::from_millis(10), "the other rooms are not held");
        let held = bus.next_batch(10).await.unwrap();
        assert_eq!(rooms_of(&held), ["slow"]);
        assert!(started.elapsed() >= Duration::from_secs(4), "held for the stall");
        assert_eq!(metrics.faults_injected.with_label_values(&["fanout.sequence", "stall"]).get(), 1);
    }

    /// A chained message of room `r`, seq 1.
    fn chained() -> Arc<ChatMessage> {
        let mut message = ChatMessage {
            room: "r".into(),
            seq: 1,
            id: uuid::Uuid::now_v7(),
            user: "u".into(),
            body: "the truth".into(),
            ts: 0,
            client_msg_id: "a".into(),
            trace_id: "0af7651916cd43dd8448eb211c80319c".into(),
            prev: None,
            digest: None,
        };
        protocol::chain::seal(&mut message, protocol::chain::GENESIS.to_owned());
        Arc::new(message)
    }

    #[tokio::test]
    async fn an_equivocating_worker_publishes_a_forged_copy_that_passes_the_self_check() {
        for sealed in [false, true] {
            let spec = FaultSpec { sealed, ..FaultSpec::new(Hop::FanoutPublish, FaultAction::Equivocate) };
            let faults = Arc::new(Faults::default());
            faults.add(spec).unwrap();
            let (metrics, journal) = (Metrics::new(), Arc::new(Journal::new("w", 100)));
            let injector = Injector::new(faults, metrics.clone(), journal.clone());
            let local = Arc::new(LocalBus::new());
            let mut feed = local.subscribe("r").await.unwrap();
            let bus = FaultyFanoutBus::new(local.clone(), injector);
            let truth = chained();
            bus.deliver(truth.clone(), "").await.unwrap();
            let Some(FeedItem::Message(published, _)) = feed.items.next().await else { panic!("nothing published") };
            assert_eq!((published.seq, published.id, &published.prev), (truth.seq, truth.id, &truth.prev));
            assert_ne!(published.body, truth.body);
            assert_ne!(published.digest, truth.digest, "the digest is recomputed over the forged body");
            assert_eq!(protocol::chain::check(&published), Ok(()), "a competent liar passes the self-check");
            let marked = journal.get(truth.id).is_some();
            assert_eq!(marked, !sealed, "sealed: {sealed}");
            let counted = metrics.faults_injected.with_label_values(&["fanout.publish", "equivocate"]).get();
            assert_eq!(counted, u64::from(!sealed));
        }
    }

    /// A room feed fed by hand: what the bus would hand the gateway.
    struct HandFed(StdMutex<Option<mpsc::Receiver<FeedItem>>>);
    #[async_trait]
    impl RoomBus for HandFed {
        async fn subscribe(&self, room: &str) -> Result<RoomFeed, BusError> {
            let items = self.0.lock().unwrap().take().expect("subscribed once");
            Ok(RoomFeed::from_channel(room, items))
        }
        async fn publish_event(&self, _room: &str, _event: RoomEvent) -> Result<(), BusError> {
            Ok(())
        }
        fn is_distributed(&self) -> bool {
            true
        }
    }

    #[tokio::test]
    async fn a_subscription_not_restored_after_a_reconnect_is_dropped_while_the_feed_stays_open() {
        let spec = FaultSpec {
            room: Some("r".into()),
            sealed: true,
            ..FaultSpec::new(Hop::GatewayResubscribe, FaultAction::Drop)
        };
        let (injector, metrics) = injector(spec);
        let (bus_side, items) = mpsc::channel(8);
        let local = Arc::new(LocalBus::new());
        let gateway = GatewayBus { rooms: Arc::new(HandFed(StdMutex::new(Some(items)))), ..GatewayBus::of(local) };
        let bus = faulty_gateway_bus(gateway, &injector);
        let mut feed = bus.rooms.subscribe("r").await.unwrap();
        bus_side.send(FeedItem::Message(chained(), None)).await.unwrap();
        assert!(matches!(feed.items.next().await, Some(FeedItem::Message(m, _)) if m.seq == 1));
        bus_side.send(FeedItem::Resumed).await.unwrap();
        assert!(matches!(feed.items.next().await, Some(FeedItem::Resumed)), "the hub hears the reconnect");
        tokio::time::timeout(Duration::from_secs(2), bus_side.closed())
            .await
            .expect("the real subscription is dropped");
        let nothing = tokio::time::timeout(Duration::from_millis(200), feed.items.next()).await;
        assert!(nothing.is_err(), "the gateway's feed stays open and silent: {nothing:?}");
        assert_eq!(metrics.faults_injected.with_label_values(&["gateway.resubscribe", "drop"]).get(), 0, "sealed");
    }

    #[tokio::test]
    async fn a_forged_seq_is_published_under_the_next_seq_and_fails_the_self_check() {
        let spec = FaultSpec { sealed: true, ..FaultSpec::new(Hop::FanoutPublish, FaultAction::ForgeSeq) };
        let (injector, metrics) = injector(spec);
        let local = Arc::new(LocalBus::new());
        let mut feed = local.subscribe("r").await.unwrap();
        let bus = FaultyFanoutBus::new(local.clone(), injector);
        let truth = chained();
        bus.deliver(truth.clone(), "").await.unwrap();
        let Some(FeedItem::Message(published, _)) = feed.items.next().await else { panic!("nothing published") };
        assert_eq!((published.seq, published.id, &published.body), (truth.seq + 1, truth.id, &truth.body));
        assert_eq!(published.digest, truth.digest, "the digest is left as it was");
        let caught = protocol::chain::check(&published).unwrap_err();
        assert_eq!(caught.kind(), protocol::chain::ViolationKind::Altered);
        assert_eq!(metrics.faults_injected.with_label_values(&["fanout.publish", "forge_seq"]).get(), 0, "sealed");
    }

    /// Answers every send `Stored`, at once.
    struct StoresAll;
    #[async_trait]
    impl SendBus for StoresAll {
        async fn submit(&self, command: SendCommand) -> Result<SendOutcome, BusError> {
            let message = ChatMessage {
                room: command.room,
                seq: 1,
                id: uuid::Uuid::now_v7(),
                user: command.user,
                body: command.body,
                ts: 0,
                client_msg_id: command.client_msg_id,
                trace_id: "t".into(),
                prev: None,
                digest: None,
            };
            Ok(SendOutcome { message, duplicate: false })
        }
    }

    /// Refuses every send.
    struct RefusesAll;
    #[async_trait]
    impl SendBus for RefusesAll {
        async fn submit(&self, _command: SendCommand) -> Result<SendOutcome, BusError> {
            Err(BusError::unavailable("worker: store failed"))
        }
    }

    fn gateway_bus_over(sends: Arc<dyn SendBus>, injector: &Injector) -> GatewayBus {
        let inner = GatewayBus { sends, ..GatewayBus::of(Arc::new(LocalBus::new())) };
        faulty_gateway_bus(inner, injector)
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_delay_holds_only_acks_of_its_room_and_a_drop_loses_them() {
        let delay = FaultSpec {
            room: Some("r".into()),
            delay_ms: Some(3000),
            ..FaultSpec::new(Hop::GatewayAnswer, FaultAction::Delay)
        };
        let (injector, metrics) = injector(delay);
        let bus = gateway_bus_over(Arc::new(StoresAll), &injector);
        let started = Instant::now();
        bus.sends.submit(command("other", "a")).await.unwrap();
        assert_eq!(started.elapsed(), Duration::ZERO, "another room's ack is not held");
        let acked = bus.sends.submit(command("r", "b")).await.unwrap();
        assert_eq!((acked.message.client_msg_id.as_str(), started.elapsed()), ("b", Duration::from_secs(3)));
        assert_eq!(metrics.faults_injected.with_label_values(&["gateway.answer", "delay"]).get(), 1);
        let refused = gateway_bus_over(Arc::new(RefusesAll), &injector).sends.submit(command("r", "c")).await;
        assert_eq!(refused.unwrap_err().kind(), BusErrorKind::Unavailable, "a refusal passes at once");

        let (dropping, _) = self::injector(FaultSpec::new(Hop::GatewayAnswer, FaultAction::Drop));
        let bus = gateway_bus_over(Arc::new(StoresAll), &dropping);
        let lost = tokio::time::timeout(Duration::from_secs(60), bus.sends.submit(command("r", "d"))).await;
        assert!(lost.is_err(), "a lost answer never comes");
    }

    #[tokio::test]
    async fn a_cut_gateway_refuses_sends_is_not_ready_and_loses_its_feeds_messages() {
        let (injector, metrics) = injector(FaultSpec::new(Hop::GatewayNats, FaultAction::Cut));
        let local = Arc::new(LocalBus::new());
        let bus = faulty_gateway_bus(GatewayBus::of(local.clone()), &injector);
        let refused = bus.sends.submit(command("r", "a")).await.unwrap_err();
        assert_eq!(refused.kind(), BusErrorKind::Unavailable);
        assert!(bus.health.ready().await.unwrap_err().to_string().contains("injected fault"));

        let mut feed = bus.rooms.subscribe("r").await.unwrap();
        let message = Arc::new(ChatMessage {
            room: "r".into(),
            seq: 1,
            id: uuid::Uuid::now_v7(),
            user: "u".into(),
            body: "b".into(),
            ts: 0,
            client_msg_id: "a".into(),
            trace_id: "t".into(),
            prev: None,
            digest: None,
        });
        local.deliver(message.clone(), "").await.unwrap();
        let lost = tokio::time::timeout(Duration::from_millis(200), feed.items.next()).await;
        assert!(lost.is_err(), "the message never reaches the cut gateway");
        assert_eq!(metrics.faults_injected.with_label_values(&["gateway.nats", "cut"]).get(), 2);

        // The cut ends: the feed says it resumed (the hub then checks the store), and carries
        // messages again.
        injector.faults().clear(true);
        assert!(bus.health.ready().await.is_ok());
        let resumed = tokio::time::timeout(Duration::from_secs(2), feed.items.next()).await.unwrap();
        assert!(matches!(resumed, Some(FeedItem::Resumed)), "{resumed:?}");
        local.deliver(message, "").await.unwrap();
        let arrived = tokio::time::timeout(Duration::from_secs(2), feed.items.next()).await.unwrap();
        assert!(matches!(arrived, Some(FeedItem::Message(m, _)) if m.seq == 1));
    }
}
