//! The gateway's read path to history: timed store reads (caching and read coalescing live
//! here too, so every reader benefits).

use std::sync::Arc;
use std::time::Instant;

use storage::{HistoryStore, Page, PageQuery, StoreError};
use telemetry::metrics::Metrics;
use uuid::Uuid;

/// Reads a room's history for joins, `history` frames, gap repair and the HTTP API.
#[derive(Clone)]
pub struct HistoryReader {
    store: Arc<dyn HistoryStore>,
    metrics: Metrics,
}

impl HistoryReader {
    /// A reader over a store.
    pub fn new(store: Arc<dyn HistoryStore>, metrics: Metrics) -> Self {
        Self { store, metrics }
    }

    /// The room's newest seq.
    pub async fn last_seq(&self, room: &str) -> Result<u64, StoreError> {
        self.timed("last_seq", self.store.last_seq(room)).await
    }

    /// A page of the room's history.
    pub async fn page(&self, room: &str, query: PageQuery) -> Result<Page, StoreError> {
        self.timed("page", self.store.page(room, query)).await
    }

    /// A message by id.
    pub async fn get_by_id(&self, id: Uuid) -> Result<Option<protocol::ChatMessage>, StoreError> {
        self.timed("get_by_id", self.store.get_by_id(id)).await
    }

    /// Whether the store answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.store.ping().await
    }

    async fn timed<T>(&self, op: &str, f: impl std::future::Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        let started = Instant::now();
        let result = f.await;
        self.metrics.store_latency.with_label_values(&[op]).observe(started.elapsed().as_secs_f64());
        if result.is_err() {
            self.metrics.store_errors.with_label_values(&[op]).inc();
        }
        result
    }
}
