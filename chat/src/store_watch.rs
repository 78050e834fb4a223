//! A fanout worker's store: warmed up before the worker takes sends, and warmed up again after
//! every outage before the worker says ready.
//!
//! A CQL node that restarts comes back cold (a fresh JVM, empty caches): for its first seconds
//! it answers slowly and times requests out (docs/benchmarks.md, "the cluster after a store node
//! restart"). A worker that warmed the store only when it started said ready again as soon as
//! the node answered. So the worker pings its store every second ([`StoreWatch::spawn`]); once
//! pings have failed [`Watching::outage_after`] times in a row the store counts as down, and the
//! first ping answered after that starts a warm-up (`storage::warm`). `/readyz` says not ready
//! from the outage until that warm-up ends ([`StoreWatch::ready_check`]), and the gauge
//! `chat_store_warming` is 1 meanwhile.
//!
//! Sends are still taken during the warm-up: holding them back would turn slow acks into
//! refusals. What readiness buys is that a rollout, a load balancer or an operator waits for a
//! store that serves at its usual speed.
//!
//! Not seen: one node of several restarting. Pings then go to the nodes that answer, and the
//! cold node warms with real traffic.

use std::sync::Arc;
use std::time::Duration;

use gateway::ops::ReadyCheck;
use storage::warm::WarmUp;
use storage::HistoryStore;
use telemetry::metrics::Metrics;
use tokio::sync::watch;

/// Where the watched store stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreState {
    /// Answering, and warmed since it last came back.
    Up,
    /// Pings have failed [`Watching::outage_after`] times in a row.
    Down,
    /// Answering again after an outage, and being warmed up.
    Warming,
}

/// How the store is watched and warmed.
#[derive(Debug, Clone, Copy)]
pub struct Watching {
    /// Time between pings.
    pub every: Duration,
    /// Failed pings in a row after which the store counts as down (one slow ping under load is
    /// not an outage).
    pub outage_after: u32,
    /// How a warm-up decides the store is warm, and its budget.
    pub warm_up: WarmUp,
}

impl Watching {
    /// Pings each second, an outage after 3 failed in a row, and the default warm-up with
    /// `budget`.
    pub fn with_budget(budget: Duration) -> Self {
        Self { every: Duration::from_secs(1), outage_after: 3, warm_up: WarmUp { budget, ..WarmUp::default() } }
    }
}

/// A handle on the watch: its state and a readiness check over it. The watch ends once every
/// handle is dropped.
#[derive(Clone)]
pub struct StoreWatch {
    state: watch::Receiver<StoreState>,
}

impl StoreWatch {
    /// Starts watching `store` (up, and warmed already) from a task of its own; warm-ups work
    /// in the warm-up room of `process`.
    pub fn spawn(store: Arc<dyn HistoryStore>, process: &str, watching: Watching, metrics: Metrics) -> Self {
        let (state_tx, state) = watch::channel(StoreState::Up);
        let process = process.to_owned();
        tokio::spawn(async move {
            tokio::select! {
                () = watch_store(store.as_ref(), &process, watching, &metrics, &state_tx) => {}
                () = state_tx.closed() => {}
            }
        });
        Self { state }
    }

    /// Where the store stands now.
    pub fn state(&self) -> StoreState {
        *self.state.borrow()
    }

    /// `store-warm`: fails from an outage until the store has answered again and been warmed.
    pub fn ready_check(&self) -> ReadyCheck {
        let watch = self.clone();
        ReadyCheck::new("store-warm", move || {
            let state = watch.state();
            async move {
                match state {
                    StoreState::Up => Ok(()),
                    StoreState::Down => {
                        Err("the store stopped answering; ready again once it answers and is warmed up")
                    }
                    StoreState::Warming => Err("warming the store up again after an outage"),
                }
            }
        })
    }
}

/// Warms `store` up in the warm-up room of `process` (see `storage::warm`), with the gauge
/// `chat_store_warming` at 1 meanwhile, and logs how it went. A zero budget warms nothing.
pub async fn warm(store: &dyn HistoryStore, process: &str, until: WarmUp, metrics: &Metrics) {
    if until.budget.is_zero() {
        return;
    }
    metrics.store_warming.set(1);
    let warmed = storage::warm::warm_up(store, &storage::warm::room_of(process), until).await;
    metrics.store_warming.set(0);
    let (rounds, failed, took_ms) = (warmed.rounds, warmed.failed, warmed.took.as_millis() as u64);
    let median_ms = warmed.median.as_secs_f64() * 1000.0;
    if warmed.warm {
        tracing::info!(rounds, failed, took_ms, median_ms, "store warmed up");
    } else {
        tracing::warn!(
            rounds,
            failed,
            took_ms,
            median_ms,
            "store still slow after the warm-up budget; taking sends anyway"
        );
    }
}

/// Pings `store` every `watching.every` forever, moving `state` through down and warming (in
/// the warm-up room of `process`) as described in the module docs.
async fn watch_store(
    store: &dyn HistoryStore,
    process: &str,
    watching: Watching,
    metrics: &Metrics,
    state: &watch::Sender<StoreState>,
) {
    let mut ticks = tokio::time::interval(watching.every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failed_in_a_row = 0u32;
    loop {
        ticks.tick().await;
        match store.ping().await {
            Err(e) => {
                failed_in_a_row += 1;
                if failed_in_a_row == watching.outage_after.max(1) {
                    state.send_replace(StoreState::Down);
                    tracing::warn!(
                        error = %e,
                        failed_pings = failed_in_a_row,
                        "store unreachable; not ready until it answers and is warmed up again"
                    );
                }
            }
            Ok(()) => {
                failed_in_a_row = 0;
                if *state.borrow() == StoreState::Down {
                    state.send_replace(StoreState::Warming);
                    tracing::info!("store answers again; warming it up before saying ready");
                    warm(store, process, watching.warm_up, metrics).await;
                    state.send_replace(StoreState::Up);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::atomic::{AtomicBool, Ordering};

    use protocol::ChatMessage;
    use storage::embedded::EmbeddedStore;
    use storage::{Page, PageQuery, RoomAppend, StoreError, StoreErrorKind};

    use super::*;

    /// An embedded store whose pings fail while `down` is set.
    struct Outage {
        inner: EmbeddedStore,
        down: AtomicBool,
    }

    #[async_trait::async_trait]
    impl HistoryStore for Outage {
        async fn append(&self, batch: RoomAppend) -> Result<(), StoreError> {
            self.inner.append(batch).await
        }
        async fn last_seq(&self, room: &str) -> Result<u64, StoreError> {
            self.inner.last_seq(room).await
        }
        async fn find_by_client_msg_id(
            &self,
            room: &str,
            user: &str,
            id: &str,
        ) -> Result<Option<ChatMessage>, StoreError> {
            self.inner.find_by_client_msg_id(room, user, id).await
        }
        async fn page(&self, room: &str, query: PageQuery) -> Result<Page, StoreError> {
            self.inner.page(room, query).await
        }
        async fn get_by_id(&self, id: uuid::Uuid) -> Result<Option<ChatMessage>, StoreError> {
            self.inner.get_by_id(id).await
        }
        async fn ping(&self) -> Result<(), StoreError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(StoreError::new(StoreErrorKind::Unavailable, "node down"));
            }
            self.inner.ping().await
        }
    }

    fn watching() -> Watching {
        let warm_up =
            WarmUp { window: 5, concurrency: 2, quick: Duration::from_secs(5), budget: Duration::from_secs(10) };
        Watching { every: Duration::from_millis(10), outage_after: 3, warm_up }
    }

    async fn wait_for(watch: &StoreWatch, wanted: StoreState) {
        let mut state = watch.state.clone();
        tokio::time::timeout(Duration::from_secs(10), state.wait_for(|s| *s == wanted))
            .await
            .unwrap_or_else(|_| panic!("the watch never reached {wanted:?}"))
            .unwrap();
    }

    #[tokio::test]
    async fn after_an_outage_the_store_is_warmed_again_and_not_ready_until_then() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Outage { inner: EmbeddedStore::open(dir.path()).unwrap(), down: AtomicBool::new(false) });
        let metrics = Metrics::new();
        let watch = StoreWatch::spawn(store.clone(), "w1", watching(), metrics.clone());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(watch.state(), StoreState::Up);
        assert_eq!(watch.ready_check().run().await, Ok(()));
        assert_eq!(store.last_seq(".warmup.w1.0").await.unwrap(), 0, "no warm-up while the store is up");

        store.down.store(true, Ordering::SeqCst);
        wait_for(&watch, StoreState::Down).await;
        let why = watch.ready_check().run().await.unwrap_err();
        assert!(why.contains("stopped answering"), "{why}");
        store.down.store(false, Ordering::SeqCst);
        wait_for(&watch, StoreState::Up).await;
        assert_eq!(watch.ready_check().run().await, Ok(()));
        assert_eq!(store.last_seq(".warmup.w1.0").await.unwrap(), 5, "one window of warm-up rounds ran");
        assert_eq!(metrics.store_warming.get(), 0);
    }

    #[tokio::test]
    async fn a_ping_or_two_failing_is_no_outage() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Outage { inner: EmbeddedStore::open(dir.path()).unwrap(), down: AtomicBool::new(false) });
        let watching = Watching { every: Duration::from_millis(50), ..watching() };
        let watch = StoreWatch::spawn(store.clone(), "w1", watching, Metrics::new());
        tokio::time::sleep(Duration::from_millis(120)).await;
        // Pings at least 50 ms apart: at most two of them fail in 60 ms, one short of an outage.
        store.down.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(60)).await;
        store.down.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!watch.state.has_changed().unwrap(), "the state never left up");
        assert_eq!(store.last_seq(".warmup.w1.0").await.unwrap(), 0, "no warm-up");
    }
}
