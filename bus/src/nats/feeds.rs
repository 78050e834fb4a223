//! Room feeds over core NATS. A worker publishes each stored message to `chat.deliver.<room>`
//! and gateways publish presence and typing to `chat.events.<room>`; a gateway follows a room
//! by subscribing to both and turns what arrives into [`FeedItem`]s, adding
//! [`FeedItem::Resumed`] after every reconnect, since core NATS keeps nothing for an absent
//! subscriber. Dropping the feed unsubscribes.

use std::sync::Arc;

use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::StreamExt;
use protocol::bus::RoomEvent;
use protocol::{subjects, ChatMessage};
use tokio::sync::mpsc;

use super::ids::Named;
use super::{unavailable, NatsBus, TRACEPARENT};
use crate::{BusError, FeedItem, RoomFeed};

/// Capacity of a room feed.
const FEED_QUEUE: usize = 4_096;

impl NatsBus {
    /// Follows a room's deliveries and events ([`GatewayBus::subscribe`]).
    ///
    /// [`GatewayBus::subscribe`]: crate::GatewayBus::subscribe
    pub(super) async fn follow_room(&self, room: &str) -> Result<RoomFeed, BusError> {
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
                            Err(e) => {
                                let named = Named::read(&m.payload, m.headers.as_ref());
                                tracing::warn!(
                                    room = %name,
                                    trace_id = named.trace_id.as_deref().map(tracing::field::display),
                                    message_id = named.message_id.map(tracing::field::display),
                                    error = %e,
                                    "undecodable delivery ignored"
                                );
                                continue
                            }
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

    /// Publishes a presence or typing event to the room's followers
    /// ([`GatewayBus::publish_event`]).
    ///
    /// [`GatewayBus::publish_event`]: crate::GatewayBus::publish_event
    pub(super) async fn publish_room_event(&self, room: &str, event: RoomEvent) -> Result<(), BusError> {
        let payload = serde_json::to_vec(&event).map_err(|e| BusError::encoding("encode for NATS", e))?;
        self.client.publish(subjects::events(room), payload.into()).await.map_err(|e| unavailable("publish event", e))
    }

    /// Publishes a stored message to the room's followers ([`FanoutBus::deliver`]).
    ///
    /// [`FanoutBus::deliver`]: crate::FanoutBus::deliver
    pub(super) async fn publish_delivery(&self, message: Arc<ChatMessage>, traceparent: &str) -> Result<(), BusError> {
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
