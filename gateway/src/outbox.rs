//! A connection's outbound queue as the room hubs see it: bounded, never blocking the hub, and
//! never silent when full.
//!
//! Slow-consumer policy: when a connection's queue is full, a delivery to it is skipped and the
//! connection is flagged for resync; once its queue drains it reads what it missed from the
//! store, so it still sees every message once, in order. If the queue stays full for
//! `slow_consumer_timeout`, the connection is kicked: closed with code 4008. Both are counted.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use protocol::ChatMessage;
use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;

/// A sequenced message ready to write: the message and its `message` frame, encoded once per
/// gateway and shared by every connection.
pub struct Delivery {
    /// The message.
    pub message: Arc<ChatMessage>,
    /// Its `message` frame as JSON text.
    pub frame: Utf8Bytes,
    /// The trace context of this gateway's `gateway.deliver` span, parent of the sampled
    /// per-connection `ws.write` spans.
    pub trace: Option<telemetry::trace::Context>,
    /// How many `ws.write` spans were recorded for it (only the first few are).
    write_spans: AtomicU32,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery").field("message", &self.message).finish_non_exhaustive()
    }
}

/// Per-connection write spans recorded per message per gateway; a room of thousands still
/// costs a handful of spans (the `gateway.deliver` span counts all connections).
pub const SAMPLED_WRITE_SPANS: u32 = 8;

impl Delivery {
    /// Encodes a message's frame.
    pub fn new(message: Arc<ChatMessage>) -> Self {
        Self::traced(message, None)
    }

    /// Encodes a message's frame, remembering the trace context its writes belong to.
    pub fn traced(message: Arc<ChatMessage>, trace: Option<telemetry::trace::Context>) -> Self {
        let frame = protocol::ServerFrame::Message((*message).clone()).to_json();
        Self { message, frame: frame.into(), trace, write_spans: AtomicU32::new(0) }
    }

    /// A `ws.write` span for one connection's write, for the first few connections only.
    pub fn write_span(&self) -> Option<tracing::Span> {
        let trace = self.trace.as_ref()?;
        if self.write_spans.fetch_add(1, Ordering::Relaxed) >= SAMPLED_WRITE_SPANS {
            return None;
        }
        let span = tracing::info_span!(target: telemetry::logging::HOP_TARGET, "ws.write", seq = self.message.seq);
        telemetry::trace::set_parent(&span, trace.clone());
        Some(span)
    }
}

/// What a room hub hands a connection.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// A room message.
    Message(Arc<Delivery>),
    /// Any other ready-made frame (presence, typing), shared by every recipient. (Behind an
    /// `Arc` so an `Outbound` is two words: every connection's queue preallocates slots.)
    Frame(Arc<Utf8Bytes>),
}

/// The hub's handle on one connection, and the connection's queue.
///
/// A plain bounded deque behind a mutex, not a channel: an idle connection's empty deque
/// allocates nothing (a channel preallocates a block of slots per connection), and the writer
/// takes everything queued under one lock.
pub struct Outbox {
    /// The connection's id (unique in this process).
    pub conn_id: u64,
    queue: Mutex<Queue>,
    ready: Notify,
    capacity: usize,
    /// Milliseconds since the epoch when the queue was first found full; 0 when it is not.
    full_since_ms: AtomicI64,
    resync: AtomicBool,
    /// Set once the queue stayed full too long; `ready` wakes the connection to see it.
    kicked: AtomicBool,
    slow_consumer_timeout: Duration,
}

/// What became of an offered frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// Queued.
    Queued,
    /// Skipped: the queue is full; the connection will resync from the store.
    Skipped,
    /// Skipped, and the connection has now been full too long: it is being closed.
    Kicked,
    /// The connection is gone.
    Closed,
}

impl Outbox {
    /// A new, empty outbox holding at most `capacity` frames.
    pub fn new(conn_id: u64, capacity: usize, slow_consumer_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            conn_id,
            queue: Mutex::new(Queue::default()),
            ready: Notify::new(),
            capacity: capacity.max(1),
            full_since_ms: AtomicI64::new(0),
            resync: AtomicBool::new(false),
            kicked: AtomicBool::new(false),
            slow_consumer_timeout,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues a frame without waiting.
    pub fn offer(&self, item: Outbound) -> Offer {
        let full = {
            let mut queue = self.lock();
            if queue.closed {
                return Offer::Closed;
            }
            let full = queue.items.len() >= self.capacity;
            if !full {
                queue.items.push_back(item);
            }
            full
        };
        match full {
            false => {
                self.ready.notify_one();
                Offer::Queued
            }
            true => {
                self.resync.store(true, Ordering::Release);
                let now = protocol::now_ms();
                let since = match self.full_since_ms.compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => now,
                    Err(earlier) => earlier,
                };
                if now - since >= self.slow_consumer_timeout.as_millis() as i64
                    && !self.kicked.swap(true, Ordering::AcqRel)
                {
                    self.ready.notify_one();
                    return Offer::Kicked;
                }
                Offer::Skipped
            }
        }
    }

    /// Called by the connection once its queue is empty: returns whether deliveries were
    /// skipped since the last call (so it must catch up from the store), and clears the flag.
    pub fn take_resync(&self) -> bool {
        self.full_since_ms.store(0, Ordering::Release);
        self.resync.swap(false, Ordering::AcqRel)
    }

    /// Whether the connection has been kicked for staying full too long (checked when `ready`
    /// resolves: one wake-up for both, so an idle connection waits on one `Notify`, not two).
    pub fn is_kicked(&self) -> bool {
        self.kicked.load(Ordering::Acquire)
    }

    /// Makes the next `ready` resolve at once (the writer left frames for its next round).
    pub fn wake(&self) {
        self.ready.notify_one();
    }

    /// Resolves when frames may be waiting (spurious wake-ups are possible).
    pub async fn ready(&self) {
        self.ready.notified().await;
    }

    /// Takes up to `max` queued frames, oldest first, into `into`; whether more remain.
    pub fn take(&self, max: usize, into: &mut Vec<Outbound>) -> bool {
        let mut queue = self.lock();
        let n = queue.items.len().min(max);
        into.extend(queue.items.drain(..n));
        if queue.items.is_empty() && queue.items.capacity() > SHRINK_ABOVE {
            // Give back what a burst grew, so idle connections stay small.
            queue.items.shrink_to(SHRINK_ABOVE);
        }
        !queue.items.is_empty()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.lock().items.is_empty()
    }

    /// Refuses further frames (the connection is closing) and drops the queued ones.
    pub fn close(&self) {
        let mut queue = self.lock();
        queue.closed = true;
        queue.items = VecDeque::new();
    }
}

/// Queue capacity kept after a burst drains.
const SHRINK_ABOVE: usize = 64;

#[derive(Default)]
struct Queue {
    items: VecDeque<Outbound>,
    closed: bool,
}
