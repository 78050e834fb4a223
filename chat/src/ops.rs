//! The fanout worker's small HTTP surface: `/healthz`, `/readyz`, `/metrics`, its own
//! journeys at `/debug/messages/{id}` and fault injection at `/admin/faults`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bus::GatewayBus;
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
}

/// Serves the ops endpoints and `admin_routes` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    ops: Ops,
    admin_routes: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route("/debug/messages/{id}", get(journey))
        .with_state(ops)
        .merge(admin_routes);
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}

async fn ready(State(ops): State<Ops>) -> Response {
    let (bus, store) = tokio::join!(ops.bus.ready(), ops.store.ping());
    match (bus, store) {
        (Ok(()), Ok(())) => (StatusCode::OK, "ready\n").into_response(),
        (bus, store) => {
            let why = format!(
                "bus: {:?}\nstore: {:?}\n",
                bus.err().map(|e| e.to_string()),
                store.err().map(|e| e.to_string())
            );
            (StatusCode::SERVICE_UNAVAILABLE, why).into_response()
        }
    }
}

async fn metrics(State(ops): State<Ops>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], ops.metrics.render()).into_response()
}

async fn journey(State(ops): State<Ops>, Path(id): Path<String>) -> Response {
    let Ok(id) = uuid::Uuid::parse_str(&id) else {
        return (StatusCode::BAD_REQUEST, "message id must be a UUID\n").into_response();
    };
    match ops.journal.get(id) {
        Some(journey) => Json(journey).into_response(),
        None => (StatusCode::NOT_FOUND, "not in this process's journal\n").into_response(),
    }
}
