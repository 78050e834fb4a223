//! The fanout worker's small HTTP surface: the shared ops endpoints ([`gateway::ops`]:
//! `/healthz`, `/readyz` over its bus, its store and the store's warmth, `/metrics`, its own journeys at
//! `/debug/messages/{id}`) and the admin routes it is given (fault injection).

use std::sync::Arc;

use axum::Router;
use gateway::ops::{OpsAccess, OpsState, ReadyCheck};
use storage::HistoryStore;
use telemetry::journal::Journal;
use telemetry::metrics::Metrics;
use tokio::net::TcpListener;

/// What the ops endpoints look at.
#[derive(Clone)]
pub struct Ops {
    /// The worker's bus connection (its readiness).
    pub bus: Arc<bus::nats::NatsBus>,
    /// The store.
    pub store: Arc<dyn HistoryStore>,
    /// Metrics to expose.
    pub metrics: Metrics,
    /// Journeys to expose.
    pub journal: Arc<Journal>,
    /// The watch on the store (not ready while it is down or warming up again).
    pub store_watch: crate::store_watch::StoreWatch,
}

/// Serves the ops endpoints and `admin_routes` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    ops: Ops,
    admin_routes: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // A worker's listener is internal (loopback by default) and it has no client auth.
    let state = OpsState {
        access: OpsAccess::Open,
        metrics: ops.metrics.clone(),
        ready: vec![
            ReadyCheck::bus(ops.bus.clone()),
            ReadyCheck::store(ops.store.clone()),
            ops.store_watch.ready_check(),
        ],
        journeys: ops.journal.clone(),
        journal: ops.journal.clone(),
    };
    let router = gateway::ops::router(state).merge(admin_routes);
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}
