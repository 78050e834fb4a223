//! A hub's feed task: it forwards the room's messages to local members in seq order with no gap
//! and no duplicate, repairing gaps from the store (a seq that jumps, a quiet room whose last
//! message the bus lost, everything missed during a bus outage).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bus::FeedItem;
use futures_util::StreamExt;
use protocol::ChatMessage;
use storage::PageQuery;

use super::hub::Hub;
use super::{Rooms, RECENT};
use crate::chain::{Previous, Source};
use crate::outbox::{Delivery, Offer, Outbound};

/// A quiet feed is checked against the store this long after its last message, in case the
/// bus lost the last message of a burst (a later message would have revealed the gap).
pub(super) const TAIL_CHECK: Duration = Duration::from_secs(1);
/// After a bus reconnect, rooms check their tails spread over this long.
pub(super) const RESUME_SPREAD: Duration = Duration::from_secs(2);

/// A room's fixed offset within [`RESUME_SPREAD`].
fn resume_spread(room: &str) -> Duration {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    room.hash(&mut hasher);
    RESUME_SPREAD.mul_f64((hasher.finish() % 1024) as f64 / 1024.0)
}

impl Rooms {
    /// The hub's feed task. It lives as long as the room has members here, so what it awaits
    /// beyond the feed itself (a message, a tail check, a roster) runs boxed, allocated only
    /// while it runs: a gateway holds one such task per room it serves.
    pub(super) async fn follow(self: Arc<Self>, hub: Arc<Hub>, mut feed: bus::RoomFeed) {
        let mut roster = tokio::time::interval(self.roster_interval);
        roster.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let tail = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(tail);
        let mut tail_armed = false;
        let mut tail_noted = 0;
        let mut after_outage = false;
        loop {
            let item = tokio::select! {
                () = hub.stop.notified() => break,
                () = &mut tail, if tail_armed => {
                    tail_armed = Box::pin(self.check_tail(&hub, &mut tail_noted, std::mem::take(&mut after_outage))).await;
                    if tail_armed {
                        tail.as_mut().reset(tokio::time::Instant::now() + TAIL_CHECK);
                    }
                    continue;
                }
                item = feed.items.next() => item,
                () = hub.roster_due.notified() => {
                    Box::pin(self.publish_roster(&hub)).await;
                    continue;
                }
                _ = roster.tick(), if self.bus.is_distributed() => {
                    Box::pin(self.publish_roster(&hub)).await;
                    self.expire_rosters(&hub);
                    continue;
                }
            };
            match item {
                Some(FeedItem::Message(message, traceparent)) => {
                    Box::pin(self.on_message(&hub, message, traceparent.as_deref())).await;
                    if self.gap_repair_on() {
                        tail.as_mut().reset(tokio::time::Instant::now() + TAIL_CHECK);
                        tail_armed = true;
                    }
                }
                Some(FeedItem::Event(event)) => self.on_event(&hub, event),
                Some(FeedItem::Resumed) => {
                    // Whatever was published while the bus was away never arrives: look at
                    // the store once the room has been quiet for a moment, each room at its
                    // own moment so a gateway with many rooms does not read them all at once.
                    tracing::debug!(room = %hub.room, "bus connection resumed; checking the room's tail");
                    if self.gap_repair_on() {
                        tail.as_mut().reset(tokio::time::Instant::now() + TAIL_CHECK + resume_spread(&hub.room));
                        tail_armed = true;
                        after_outage = true;
                    }
                }
                None => {
                    tracing::warn!(room = %hub.room, "room feed ended");
                    break;
                }
            }
        }
    }

    async fn on_message(&self, hub: &Hub, message: Arc<ChatMessage>, traceparent: Option<&str>) {
        let last = hub.last_seq();
        if message.seq <= last {
            self.metrics.drops.with_label_values(&["feed_duplicate"]).inc();
            return;
        }
        if message.seq > last + 1 {
            if self.gap_repair_on() {
                self.repair_gap(hub, last, message.seq).await;
                if hub.last_seq() + 1 != message.seq {
                    // The store does not have what lies before it: a seq that does not fit
                    // (forged, or from a confused publisher) would make every later message look
                    // like a repeat. The store is the truth; a real message will be repaired
                    // from it by the quiet-room check.
                    self.metrics.drops.with_label_values(&["unverified_seq"]).inc();
                    tracing::warn!(room = %message.room, seq = message.seq, forwarded = hub.last_seq(), message_id = %message.id, trace_id = %message.trace_id, "delivery ahead of the store dropped");
                    return;
                }
            } else {
                self.journal.record(message.id, &message.trace_id, "gateway.gap_unrepaired", serde_json::json!({"gateway": self.gateway_id, "missing_from": last + 1, "missing_to": message.seq - 1}));
            }
        }
        let span = tracing::info_span!(target: telemetry::logging::HOP_TARGET, "gateway.deliver", room = %message.room, seq = message.seq, gateway = %self.gateway_id);
        if let Some(parent) = traceparent.and_then(telemetry::trace::parse_traceparent) {
            telemetry::trace::set_parent(&span, parent);
        }
        let context = tracing_opentelemetry::OpenTelemetrySpanExt::context(&span);
        let trace = opentelemetry::trace::TraceContextExt::span(&context).span_context().is_valid().then_some(context);
        let _entered = span.enter();
        self.forward(hub, message, trace);
    }

    /// Whether gaps are repaired now (configured, and not switched off by the delivery hook).
    pub(super) fn gap_repair_on(&self) -> bool {
        self.gap_repair && self.hook.as_ref().is_none_or(|hook| hook.repairs_gaps())
    }

    /// After a quiet second, makes sure the bus did not lose the last message of a burst.
    ///
    /// A message the store has but the feed has not brought may still be on its way (stored,
    /// not yet published, or in NATS), so one check only notes the store's newest seq in
    /// `noted`; the next check, a second later, repairs whatever up to `noted` has still not
    /// arrived. After a bus outage (`after_outage`) everything stored is known to be lost
    /// and is repaired at once. Returns whether to check again: yes while the store does not
    /// answer (a quiet room gets no other chance to notice what it missed meanwhile).
    async fn check_tail(&self, hub: &Hub, noted: &mut u64, after_outage: bool) -> bool {
        let stored = match self.history.last_seq(&hub.room).await {
            Ok(stored) => stored,
            Err(e) => {
                tracing::debug!(room = %hub.room, error = %e, "tail check failed; checking again");
                return true;
            }
        };
        let forwarded = hub.last_seq();
        let lost_up_to = if after_outage { stored } else { (*noted).min(stored) };
        if lost_up_to > forwarded {
            tracing::info!(room = %hub.room, forwarded, stored, "feed missed the newest messages; repairing");
            self.repair_gap(hub, forwarded, lost_up_to + 1).await;
        }
        *noted = stored;
        stored > hub.last_seq()
    }

    /// Reads the messages between `last` and `next` from the store and forwards them.
    async fn repair_gap(&self, hub: &Hub, last: u64, next: u64) {
        self.metrics.gap_repairs.inc();
        let mut after = last;
        while after + 1 < next {
            match self.history.page(&hub.room, PageQuery::between(after, next)).await {
                Ok(page) if !page.messages.is_empty() => {
                    for message in page.messages {
                        after = message.seq;
                        self.metrics.gap_repaired_messages.inc();
                        tracing::debug!(room = %hub.room, seq = message.seq, message_id = %message.id, trace_id = %message.trace_id, "recovered by gap repair");
                        self.journal.record(
                            message.id,
                            &message.trace_id,
                            "gateway.gap_repair",
                            serde_json::json!({"gateway": self.gateway_id}),
                        );
                        self.forward(hub, Arc::new(message), None);
                    }
                }
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(room = %hub.room, after, next, error = %e, "gap repair failed; connections will catch up themselves");
                    break;
                }
            }
        }
    }

    /// Hands a message to every local member and advances `last_seq`.
    fn forward(&self, hub: &Hub, message: Arc<ChatMessage>, trace: Option<telemetry::trace::Context>) {
        let sequenced_ms = message.ts;
        let delivery = Arc::new(Delivery::traced(message, trace));
        let (mut queued, mut skipped, mut kicked) = (0u32, 0u32, 0u32);
        let violation = {
            let mut state = hub.lock();
            if delivery.message.seq <= hub.last_seq() {
                return;
            }
            // Checked once per gateway, in seq order (what is forwarded has no gap), before the
            // members get it; a violation is reported, and the message still delivered.
            let violation = state.chain.observe(&delivery.message).err().map(|error| {
                let previous = state.recent.back().filter(|p| p.message.seq + 1 == delivery.message.seq);
                let previous = previous.map(|p| Previous { id: p.message.id, trace_id: p.message.trace_id.clone() });
                (error, previous)
            });
            for member in state.members.values() {
                match member.outbox.offer(Outbound::Message(delivery.clone())) {
                    Offer::Queued => queued += 1,
                    Offer::Skipped => skipped += 1,
                    Offer::Kicked => kicked += 1,
                    Offer::Closed => {}
                }
            }
            hub.last_seq.store(delivery.message.seq, Ordering::Release);
            state.recent.push_back(delivery.clone());
            if state.recent.len() > RECENT {
                state.recent.pop_front();
            }
            violation
        };
        if let Some((error, previous)) = violation {
            self.chain.report(&delivery.message, &error, Source::Feed, previous);
        }
        let lag = (protocol::now_ms() - sequenced_ms).max(0) as f64 / 1000.0;
        self.metrics.sequence_to_gateway.observe(lag, &delivery.message.trace_id);
        if skipped + kicked > 0 {
            self.metrics.drops.with_label_values(&["queue_full"]).inc_by(u64::from(skipped + kicked));
        }
        let message = &delivery.message;
        let mut detail = serde_json::json!({"gateway": self.gateway_id, "connections": queued});
        if skipped + kicked > 0 {
            detail["deferred_queue_full"] = serde_json::json!(skipped + kicked);
            detail["kicked_slow_consumer"] = serde_json::json!(kicked);
        }
        self.journal.record(message.id, &message.trace_id, "gateway.fanout", detail);
    }
}
