//! The gateway's read path to history: timed store reads, with identical concurrent page reads
//! coalesced into one store query (a reconnect storm asks the same pages many times at once).
//! Recent messages of active rooms are served from memory by the room hubs (see `rooms`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::future::{BoxFuture, FutureExt, Shared};
use storage::{HistoryStore, Page, PageQuery, StoreError};
use telemetry::metrics::Metrics;
use uuid::Uuid;

/// Reads a room's history for joins, `history` frames, gap repair and the HTTP API.
#[derive(Clone)]
pub struct HistoryReader {
    store: Arc<dyn HistoryStore>,
    metrics: Metrics,
    in_flight: Arc<Mutex<InFlightPages>>,
}

type PageKey = (String, Option<u64>, Option<u64>, u32);
type SharedPage = Shared<BoxFuture<'static, Result<Page, StoreError>>>;
type InFlightPages = HashMap<PageKey, InFlightPage>;

/// A page read in flight and how many callers wait on it.
struct InFlightPage {
    read: SharedPage,
    waiters: usize,
}

/// One caller waiting on an in-flight read. Dropping it, whether the read was answered or the
/// caller's future was dropped before, releases the caller's share of the entry: the entry
/// goes once the read is answered (nothing is cached here) or when its last waiter is gone.
struct Waiting<'a> {
    in_flight: &'a Mutex<InFlightPages>,
    key: PageKey,
    read: SharedPage,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        // The entry may already be a newer read of the same page: that one is not ours.
        let Some(entry) = in_flight.get_mut(&self.key).filter(|entry| entry.read.ptr_eq(&self.read)) else {
            return;
        };
        entry.waiters = entry.waiters.saturating_sub(1);
        if entry.waiters == 0 || self.read.peek().is_some() {
            in_flight.remove(&self.key);
        }
    }
}

impl HistoryReader {
    /// A reader over a store.
    pub fn new(store: Arc<dyn HistoryStore>, metrics: Metrics) -> Self {
        Self { store, metrics, in_flight: Arc::default() }
    }

    /// The room's newest seq.
    pub async fn last_seq(&self, room: &str) -> Result<u64, StoreError> {
        self.timed("last_seq", self.store.last_seq(room)).await
    }

    /// A page of the room's history; joins an identical read already in flight.
    ///
    /// The in-flight entry is released by a guard, so it goes away even when the caller's
    /// future is dropped mid-read (a client that disconnects): once the read is answered, or
    /// once nobody waits on it any more (the store read is then dropped too).
    pub async fn page(&self, room: &str, query: PageQuery) -> Result<Page, StoreError> {
        let key = (room.to_owned(), query.before, query.after, query.clamped_limit());
        let read = {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            match in_flight.get_mut(&key) {
                Some(entry) => {
                    self.metrics.history_coalesced.inc();
                    entry.waiters += 1;
                    entry.read.clone()
                }
                None => {
                    let reader = self.clone();
                    let room = room.to_owned();
                    let read =
                        async move { reader.timed("page", reader.store.page(&room, query)).await }.boxed().shared();
                    in_flight.insert(key.clone(), InFlightPage { read: read.clone(), waiters: 1 });
                    read
                }
            }
        };
        let waiting = Waiting { in_flight: &self.in_flight, key, read };
        waiting.read.clone().await
    }

    /// A message by id.
    pub async fn get_by_id(&self, id: Uuid) -> Result<Option<protocol::ChatMessage>, StoreError> {
        self.timed("get_by_id", self.store.get_by_id(id)).await
    }

    /// The store it reads (for readiness checks).
    pub fn store(&self) -> Arc<dyn HistoryStore> {
        self.store.clone()
    }

    async fn timed<T>(
        &self,
        op: &str,
        f: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let result = f.await;
        self.metrics.store_latency.with_label_values(&[op]).observe(started.elapsed().as_secs_f64());
        if result.is_err() {
            self.metrics.store_errors.with_label_values(&[op]).inc();
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;
    use protocol::ChatMessage;
    use storage::RoomAppend;

    use super::*;

    /// A store whose page reads are counted and held until the test opens the gate.
    #[derive(Default)]
    struct GatedStore {
        pages: AtomicUsize,
        gate: tokio::sync::Notify,
    }

    #[async_trait]
    impl HistoryStore for GatedStore {
        async fn append(&self, _batch: RoomAppend) -> Result<(), StoreError> {
            Ok(())
        }
        async fn last_seq(&self, _room: &str) -> Result<u64, StoreError> {
            Ok(0)
        }
        async fn find_by_client_msg_id(
            &self,
            _room: &str,
            _user: &str,
            _id: &str,
        ) -> Result<Option<ChatMessage>, StoreError> {
            Ok(None)
        }
        async fn page(&self, _room: &str, query: PageQuery) -> Result<Page, StoreError> {
            self.pages.fetch_add(1, Ordering::SeqCst);
            self.gate.notified().await;
            Ok(Page { messages: Vec::new(), has_more: query.after == Some(1) })
        }
        async fn get_by_id(&self, _id: Uuid) -> Result<Option<ChatMessage>, StoreError> {
            Ok(None)
        }
        async fn ping(&self) -> Result<(), StoreError> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn identical_concurrent_page_reads_become_one_store_query() {
        let store = Arc::new(GatedStore::default());
        let metrics = Metrics::new();
        let reader = HistoryReader::new(store.clone(), metrics.clone());
        let same = (0..50).map(|_| {
            let reader = reader.clone();
            tokio::spawn(async move { reader.page("r", PageQuery::between(1, 100)).await })
        });
        let same: Vec<_> = same.collect();
        let other = {
            let reader = reader.clone();
            tokio::spawn(async move { reader.page("r", PageQuery::between(2, 100)).await })
        };
        while store.pages.load(Ordering::SeqCst) < 2 || metrics.history_coalesced.get() < 49 {
            tokio::task::yield_now().await;
        }
        store.gate.notify_waiters();
        for read in same {
            assert!(read.await.unwrap().unwrap().has_more, "every caller gets the shared page");
        }
        assert!(!other.await.unwrap().unwrap().has_more);
        assert_eq!(store.pages.load(Ordering::SeqCst), 2, "one query for the 50 identical reads, one for the other");
        assert_eq!(metrics.history_coalesced.get(), 49);

        // Once answered, the next identical read goes to the store again (nothing is cached here).
        let again = {
            let reader = reader.clone();
            tokio::spawn(async move { reader.page("r", PageQuery::between(1, 100)).await })
        };
        while store.pages.load(Ordering::SeqCst) < 3 {
            tokio::task::yield_now().await;
        }
        store.gate.notify_waiters();
        again.await.unwrap().unwrap();
        assert_eq!(metrics.history_coalesced.get(), 49);
    }

    #[tokio::test]
    async fn a_dropped_page_read_leaves_nothing_in_flight() {
        let store = Arc::new(GatedStore::default());
        let reader = HistoryReader::new(store.clone(), Metrics::new());
        let in_flight = || reader.in_flight.lock().unwrap_or_else(|p| p.into_inner()).len();

        // The client goes away while its read waits on the store: its future is dropped.
        let mut read = Box::pin(reader.page("r", PageQuery::between(1, 100)));
        assert!(read.as_mut().now_or_never().is_none(), "the store holds the read");
        assert_eq!(store.pages.load(Ordering::SeqCst), 1);
        assert_eq!(in_flight(), 1);
        drop(read);
        assert_eq!(in_flight(), 0, "a read nobody waits for any more is forgotten");

        // With two callers on one read, the first going away leaves the read to the other.
        let mut first = Box::pin(reader.page("r", PageQuery::between(1, 100)));
        let mut second = Box::pin(reader.page("r", PageQuery::between(1, 100)));
        assert!(first.as_mut().now_or_never().is_none());
        assert!(second.as_mut().now_or_never().is_none());
        assert_eq!(store.pages.load(Ordering::SeqCst), 2, "the second joined the first one's read");
        drop(first);
        assert_eq!(in_flight(), 1, "the other caller still waits on the read");
        store.gate.notify_waiters();
        assert!(second.await.unwrap().has_more);
        assert_eq!(in_flight(), 0);
    }
}
