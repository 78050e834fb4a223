//! Writing to the socket: what the hubs queued (batched, then flushed), live messages through
//! the delivery hook, replays of stored messages, and errors; a client that does not drain its
//! socket in time is closed as a slow consumer.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use axum::extract::ws::{Message, Utf8Bytes};
use futures_util::SinkExt;
use protocol::{ErrorCode, Req, ServerFrame};
use storage::PageQuery;

use super::{Connection, End, CLOSE_SLOW_CONSUMER, WRITE_BATCH};
use crate::outbox::{Delivery, Outbound};

impl Connection {
    // === writing ===

    /// Writes what the hubs queued: this item and whatever else is already waiting, then, once
    /// the queue is empty, catches up on anything skipped while it was full.
    pub(super) async fn on_outbound(&mut self) -> Result<(), End> {
        let mut batch = Vec::new();
        let more = self.outbox.take(WRITE_BATCH, &mut batch);
        if more {
            // Come back for the rest after this batch is flushed.
            self.outbox.wake();
        }
        if batch.is_empty() {
            return Ok(());
        }
        self.app.metrics.outbound_queue_depth.observe(batch.len() as f64);
        if let Some(Outbound::Message(delivery)) = batch.first() {
            let lag_ms = (protocol::now_ms() - delivery.message.ts).max(0);
            self.app.metrics.delivery_lag.observe(lag_ms as f64 / 1000.0);
        }
        for item in batch {
            self.write_outbound(item).await?;
        }
        if !more && self.outbox.is_empty() && self.outbox.take_resync() && self.catches_up {
            self.resync().await?;
        }
        Ok(())
    }

    pub(super) async fn write_outbound(&mut self, item: Outbound) -> Result<(), End> {
        match item {
            Outbound::Frame(text) => {
                if let Some(recording) = self.recording.as_mut() {
                    recording.event(text.len());
                }
                self.write((*text).clone()).await
            }
            Outbound::Message(delivery) => {
                let room = &delivery.message.room;
                let seq = delivery.message.seq;
                let Some(joined) = self.rooms.get(room) else { return Ok(()) };
                let cursor = joined.cursor;
                if seq <= cursor {
                    return Ok(());
                }
                if seq > cursor + 1 && self.catches_up && self.app.repairs_gaps() {
                    self.replay(&room.clone(), cursor, seq - 1).await?;
                }
                self.deliver(delivery).await
            }
        }
    }

    /// Writes a live message (through the delivery hook's interceptor, when there is one).
    pub(super) async fn deliver(&mut self, delivery: Arc<Delivery>) -> Result<(), End> {
        if let Some(joined) = self.rooms.get_mut(&delivery.message.room) {
            joined.cursor = delivery.message.seq;
        }
        let hooked = match self.hooked_writes.as_mut() {
            Some(hooked) if !hooked.passes_through() => hooked,
            _ => return self.write_message(&delivery).await,
        };
        let given = delivery.clone();
        for write in hooked.writes(delivery).await {
            // What the hook put in place of the message (not the same delivery) is checked
            // before it is written: a delivery stage that tampers is caught by its own gateway.
            // The message as given was checked when the hub forwarded it.
            if !Arc::ptr_eq(&write, &given) {
                self.app.rooms.chain().check_delivery(&write.message);
            }
            self.write_message(&write).await?;
        }
        Ok(())
    }

    pub(super) async fn write_message(&mut self, delivery: &Delivery) -> Result<(), End> {
        self.deliveries += 1;
        if let Some(recording) = self.recording.as_mut() {
            recording.message(&delivery.message, delivery.frame.len());
        }
        let _span = delivery.write_span();
        self.write(delivery.frame.clone()).await
    }

    /// Writes a room's stored messages with `after < seq <= upto` and moves its cursor; from
    /// the hub's recent messages when it still has them all, else from the store.
    pub(super) async fn replay(&mut self, room: &str, after: u64, upto: u64) -> Result<(), End> {
        let recent = self.rooms.get(room).and_then(|joined| joined.hub.recent_between(after, upto));
        if let Some(recent) = recent {
            self.app.metrics.history_cache_hits.inc();
            for delivery in recent {
                self.write_message(&delivery).await?;
            }
            if let Some(joined) = self.rooms.get_mut(room) {
                joined.cursor = joined.cursor.max(upto);
            }
            return Ok(());
        }
        let mut cursor = after;
        while cursor < upto {
            let page = match self
                .app
                .history
                .page(room, PageQuery { before: Some(upto + 1), after: Some(cursor), limit: storage::MAX_PAGE })
                .await
            {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(room, after = cursor, upto, error = %e, "replay failed");
                    return Err(End::Close(1011, "history unavailable; reconnect and rejoin with since"));
                }
            };
            if page.messages.is_empty() {
                break;
            }
            self.app.rooms.chain().check_page(&page.messages);
            for message in page.messages {
                cursor = message.seq;
                let delivery = Delivery::new(Arc::new(message));
                self.write_message(&delivery).await?;
            }
        }
        if let Some(joined) = self.rooms.get_mut(room) {
            joined.cursor = joined.cursor.max(cursor);
        }
        Ok(())
    }

    /// Catches up every room whose hub moved past this connection's cursor.
    pub(super) async fn resync(&mut self) -> Result<(), End> {
        self.app.metrics.drops.with_label_values(&["resynced_from_store"]).inc();
        let behind: Vec<(String, u64, u64)> = self
            .rooms
            .iter()
            .filter(|(_, joined)| joined.hub.last_seq() > joined.cursor)
            .map(|(room, joined)| (room.clone(), joined.cursor, joined.hub.last_seq()))
            .collect();
        for (room, cursor, last) in behind {
            self.replay(&room, cursor, last).await?;
        }
        Ok(())
    }

    pub(super) async fn write_frame(&mut self, frame: ServerFrame) -> Result<(), End> {
        let text = frame.to_json();
        if let Some(recording) = self.recording.as_mut() {
            recording.server_frame(&frame, text.len());
        }
        self.write(text.into()).await
    }

    pub(super) async fn error(&mut self, code: ErrorCode, message: &str, req: Option<Req>) -> Result<(), End> {
        self.app.metrics.errors_sent.with_label_values(&[code.as_str()]).inc();
        self.write_frame(ServerFrame::error(code, message, req)).await
    }

    /// Queues a frame on the socket. A client that cannot take it within the slow-consumer
    /// timeout is closed.
    pub(super) async fn write(&mut self, text: Utf8Bytes) -> Result<(), End> {
        let limit = self.app.config.limits.slow_consumer_timeout;
        match within(limit, self.socket.feed(Message::Text(text))).await {
            Some(written) => written.map_err(|_| End::Gone),
            None => Err(End::Close(CLOSE_SLOW_CONSUMER, "slow consumer: socket not drained in time")),
        }
    }

    pub(super) async fn flush(&mut self) -> Result<(), End> {
        if let Some(recording) = self.recording.as_mut() {
            recording.flush();
        }
        if self.deliveries > 0 {
            self.app.metrics.deliveries.inc_by(self.deliveries);
            self.deliveries = 0;
        }
        let limit = self.app.config.limits.slow_consumer_timeout;
        match within(limit, self.socket.flush()).await {
            Some(flushed) => flushed.map_err(|_| End::Gone),
            None => Err(End::Close(CLOSE_SLOW_CONSUMER, "slow consumer: socket not drained in time")),
        }
    }

    /// Records a client frame that was refused before it parsed (when recording).
    pub(super) fn record_invalid(&mut self, bytes: usize) {
        if let Some(recording) = self.recording.as_mut() {
            recording.invalid_client_frame(bytes);
        }
    }

    pub(super) fn count_frame(&self, kind: &str) {
        self.app.metrics.frames_received.with_label_values(&[kind]).inc();
    }
}

/// `future`'s output, or `None` if it is not done within `limit`. Most writes and flushes are
/// done on their first poll; only those that are not start a timer (boxed: it is rare, and
/// held inline it would grow every connection's future).
async fn within<F: Future + Unpin>(limit: Duration, mut future: F) -> Option<F::Output> {
    let first = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut future).poll(cx))).await;
    match first {
        Poll::Ready(output) => Some(output),
        Poll::Pending => Box::pin(tokio::time::timeout(limit, future)).await.ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn within_gives_what_finishes_in_time_and_none_for_what_does_not() {
        assert_eq!(within(Duration::from_secs(5), std::future::ready(7)).await, Some(7));
        let later = Box::pin(async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            8
        });
        assert_eq!(within(Duration::from_secs(5), later).await, Some(8), "pending at first, done in time");
        let never = std::future::pending::<()>();
        assert_eq!(within(Duration::from_millis(20), never).await, None);
    }
}
