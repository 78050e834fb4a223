//! The journey recorder: a bounded, in-memory flight recorder of the hops each message passed in
//! this process, served by `GET /debug/messages/{id}`.
//!
//! Hops before sequencing happen before the message has an id, so they are recorded under the
//! send's dedupe key (room/user/client_msg_id) and moved under the id when the send is
//! [`Journal::link`]ed to its message. The oldest journeys are forgotten first.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One hop a message passed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hop {
    /// The process that recorded it (e.g. `gateway-1a2b`, `fanout-3c4d`).
    pub process: Arc<str>,
    /// The hop's name, e.g. `gateway.receive`, `fanout.sequence`, `gateway.deliver`.
    pub hop: Cow<'static, str>,
    /// Microseconds since the Unix epoch.
    pub at_us: i64,
    /// Hop-specific facts (seq, connections reached, drops and their reasons, faults...).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub detail: serde_json::Map<String, serde_json::Value>,
}

/// Everything this process knows about one message.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Journey {
    /// The message id, once sequenced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Uuid>,
    /// The message's W3C trace id.
    pub trace_id: String,
    /// Hops in the order recorded.
    pub hops: Vec<Hop>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Send(String),
    Id(Uuid),
}

#[derive(Default)]
struct Inner {
    journeys: HashMap<Key, Journey>,
    order: VecDeque<Key>,
}

/// A bounded recorder of message journeys in this process.
pub struct Journal {
    process: Arc<str>,
    capacity: usize,
    inner: Mutex<Inner>,
    waits: crate::waits::Waits,
}

fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

impl Journal {
    /// A recorder for `process` keeping at most `capacity` journeys.
    pub fn new(process: impl Into<String>, capacity: usize) -> Self {
        Self {
            process: Arc::from(process.into()),
            capacity: capacity.max(1),
            inner: Mutex::default(),
            waits: crate::waits::Waits::default(),
        }
    }

    /// What this process's operations wait on now (`/debug/waits`).
    pub fn waits(&self) -> &crate::waits::Waits {
        &self.waits
    }

    /// This process's name as it appears in hops.
    pub fn process(&self) -> &str {
        &self.process
    }

    /// Records a hop of a send that has no message id yet, keyed by its dedupe key.
    pub fn record_send(&self, dedupe_key: &str, trace_id: &str, hop: &'static str, detail: serde_json::Value) {
        self.push(Key::Send(dedupe_key.to_owned()), None, trace_id, hop, detail);
    }

    /// Records a hop of a sequenced message.
    pub fn record(&self, id: Uuid, trace_id: &str, hop: &'static str, detail: serde_json::Value) {
        self.push(Key::Id(id), Some(id), trace_id, hop, detail);
    }

    /// Moves the hops recorded under a send's dedupe key to its message id.
    pub fn link(&self, dedupe_key: &str, id: Uuid) {
        let mut inner = self.lock();
        let Some(early) = inner.journeys.remove(&Key::Send(dedupe_key.to_owned())) else { return };
        if !inner.journeys.contains_key(&Key::Id(id)) {
            inner.order.push_back(Key::Id(id));
        }
        let journey = inner.journeys.entry(Key::Id(id)).or_default();
        let later = std::mem::take(&mut journey.hops);
        journey.id = Some(id);
        if journey.trace_id.is_empty() {
            journey.trace_id = early.trace_id;
        }
        journey.hops = early.hops;
        journey.hops.extend(later);
        journey.hops.sort_by_key(|hop| hop.at_us);
        self.evict(&mut inner);
    }

    /// The journey of a message, if this process still remembers it.
    pub fn get(&self, id: Uuid) -> Option<Journey> {
        self.lock().journeys.get(&Key::Id(id)).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn push(&self, key: Key, id: Option<Uuid>, trace_id: &str, hop: &'static str, detail: serde_json::Value) {
        let detail = match detail {
            serde_json::Value::Object(map) => map,
            serde_json::Value::Null => serde_json::Map::new(),
            other => serde_json::Map::from_iter([("value".to_owned(), other)]),
        };
        let hop = Hop { process: self.process.clone(), hop: Cow::Borrowed(hop), at_us: now_us(), detail };
        let mut inner = self.lock();
        if !inner.journeys.contains_key(&key) {
            inner.order.push_back(key.clone());
        }
        let journey = inner.journeys.entry(key).or_default();
        journey.id = journey.id.or(id);
        if journey.trace_id.is_empty() {
            journey.trace_id = trace_id.to_owned();
        }
        journey.hops.push(hop);
        self.evict(&mut inner);
    }

    /// Forgets the oldest journeys beyond capacity. `order` may still hold keys of journeys that
    /// were linked away; they are skipped when they come up, and bounded to twice the capacity.
    fn evict(&self, inner: &mut Inner) {
        while inner.journeys.len() > self.capacity || inner.order.len() > 2 * self.capacity {
            if let Some(oldest) = inner.order.pop_front() {
                inner.journeys.remove(&oldest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_send_hops_to_the_message() {
        let journal = Journal::new("p", 10);
        let id = Uuid::now_v7();
        journal.record_send("r/u/c1", "t1", "gateway.receive", serde_json::json!({}));
        journal.record(id, "t1", "fanout.sequence", serde_json::json!({"seq": 1}));
        journal.link("r/u/c1", id);
        let journey = journal.get(id).unwrap();
        assert_eq!(journey.trace_id, "t1");
        let hops: Vec<&str> = journey.hops.iter().map(|h| h.hop.as_ref()).collect();
        assert_eq!(hops, ["gateway.receive", "fanout.sequence"]);
        assert_eq!(journey.hops[1].detail["seq"], 1);
    }

    #[test]
    fn forgets_the_oldest() {
        let journal = Journal::new("p", 2);
        let ids: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
        for id in &ids {
            journal.record(*id, "t", "hop", serde_json::Value::Null);
        }
        assert!(journal.get(ids[0]).is_none());
        assert!(journal.get(ids[2]).is_some());
    }
}
