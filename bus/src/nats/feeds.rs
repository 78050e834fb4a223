//! Room feeds over core NATS. A worker publishes each stored message to `chat.deliver.<room>`
//! and gateways publish presence and typing to `chat.events.<room>`; a gateway follows a room
//! with one subscription to `chat.*.<room>` that takes both, and turns what arrives into
//! [`FeedItem`]s, adding [`FeedItem::Resumed`] after every reconnect, since core NATS keeps
//! nothing for an absent subscriber. Dropping the feed unsubscribes.
//!
//! A feed is a stream over the subscription itself: no task or channel of its own. A gateway
//! follows one feed per room it has members in, so what one costs is multiplied by thousands.

use std::sync::Arc;

use async_nats::{HeaderMap, Message, Subscriber};
use bytes::Bytes;
use futures_util::StreamExt;
use protocol::bus::RoomEvent;
use protocol::{subjects, ChatMessage};
use tokio::sync::watch;

use super::ids::Named;
use super::{unavailable, NatsBus, TRACEPARENT};
use crate::{BusError, FeedItem, RoomFeed};

impl NatsBus {
    /// Follows a room's deliveries and events ([`GatewayBus::subscribe`]).
    ///
    /// [`GatewayBus::subscribe`]: crate::GatewayBus::subscribe
    pub(super) async fn follow_room(&self, room: &str) -> Result<RoomFeed, BusError> {
        let messages =
            self.client.subscribe(subjects::room_feed(room)).await.map_err(|e| unavailable("subscribe", e))?;
        // A round trip makes sure the server has the subscription before the caller reads the
        // room's last seq, so nothing sequenced in between is missed.
        self.client.flush().await.map_err(|e| unavailable("flush subscriptions", e))?;
        let following = Following { room: room.to_owned(), messages, connects: self.connects.subscribe() };
        let items = futures_util::stream::unfold(following, |mut following| async move {
            let item = following.next_item().await?;
            Some((item, following))
        });
        Ok(RoomFeed { room: room.to_owned(), items: Box::pin(items) })
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

/// One followed room: its subscription and the bus's reconnect signal.
struct Following {
    room: String,
    messages: Subscriber,
    connects: watch::Receiver<u64>,
}

impl Following {
    /// The next item, or `None` once the subscription or the bus is gone.
    async fn next_item(&mut self) -> Option<FeedItem> {
        loop {
            tokio::select! {
                changed = self.connects.changed() => return changed.ok().map(|()| FeedItem::Resumed),
                message = self.messages.next() => {
                    if let Some(item) = self.decode(message?) {
                        return Some(item);
                    }
                }
            }
        }
    }

    /// A delivery or an event; `None` for what cannot be decoded (logged) and for anything else
    /// the wildcard matched.
    fn decode(&self, message: Message) -> Option<FeedItem> {
        let kind = message.subject.split('.').nth(1);
        if kind == Some(subjects::DELIVER_KIND) {
            return match serde_json::from_slice::<ChatMessage>(&message.payload) {
                Ok(chat) => {
                    let traceparent =
                        message.headers.as_ref().and_then(|h| h.get(TRACEPARENT)).map(|v| v.as_str().to_owned());
                    Some(FeedItem::Message(Arc::new(chat), traceparent))
                }
                Err(e) => {
                    let named = Named::read(&message.payload, message.headers.as_ref());
                    tracing::warn!(
                        room = %self.room,
                        trace_id = named.trace_id.as_deref().map(tracing::field::display),
                        message_id = named.message_id.map(tracing::field::display),
                        error = %e,
                        "undecodable delivery ignored"
                    );
                    None
                }
            };
        }
        if kind == Some(subjects::EVENTS_KIND) {
            return match serde_json::from_slice::<RoomEvent>(&message.payload) {
                Ok(event) => Some(FeedItem::Event(event)),
                Err(e) => {
                    tracing::warn!(room = %self.room, error = %e, "undecodable room event ignored");
                    None
                }
            };
        }
        // `chat.journal.query` when the room is called `query`: not this feed's.
        None
    }
}
