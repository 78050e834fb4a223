//! The WebSocket gateway. It holds client connections, speaks protocol v1
//! (docs/protocol.md), hands sends to the bus, and fans each room's
//! feed out to its own sockets. It keeps nothing that matters: kill it and clients reconnect
//! elsewhere and rejoin with `since`.
//!
//! The caller binds the listener and owns shutdown: [`run`] serves until `shutdown` resolves,
//! then drains (every connection gets `reconnect` and close 1012) within the grace period.

pub mod admission;
pub mod auth;
pub mod chain;
pub mod config;
mod connection;
pub mod history;
pub mod hook;
mod http;
pub mod listener;
pub mod ops;
pub mod outbox;
pub mod recorder;
pub mod rooms;
mod slots;
pub mod state;
mod web;

use std::sync::Arc;

use bus::GatewayBus;
use storage::HistoryStore;
use telemetry::journal::Journal;
use telemetry::metrics::Metrics;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

pub use config::{GatewayConfig, Limits};
pub use connection::CLOSE_SLOW_CONSUMER;

/// What a gateway runs on.
pub struct GatewayDeps {
    /// The bus to fanout.
    pub bus: GatewayBus,
    /// The history store (read-only use).
    pub store: Arc<dyn HistoryStore>,
    /// Metrics registry shared with the rest of the process.
    pub metrics: Metrics,
    /// Journey recorder shared with the rest of the process.
    pub journal: Arc<Journal>,
    /// Intercepts deliveries (exercises and the debugging lab); `None` in the product.
    pub delivery_hook: Option<Arc<dyn hook::DeliveryHook>>,
    /// More routes served beside the gateway's own (an admin API, say).
    pub routes: axum::Router,
}

impl GatewayDeps {
    /// A gateway's dependencies with no delivery hook and no extra routes.
    pub fn new(bus: GatewayBus, store: Arc<dyn HistoryStore>, metrics: Metrics, journal: Arc<Journal>) -> Self {
        Self { bus, store, metrics, journal, delivery_hook: None, routes: axum::Router::new() }
    }
}

/// Serves HTTP and WebSockets on `listener` until `shutdown` resolves, then drains.
pub async fn run(
    listener: TcpListener,
    config: GatewayConfig,
    deps: GatewayDeps,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (drain_tx, drain_rx) = watch::channel(false);
    let (alive, mut all_closed) = mpsc::channel::<()>(1);
    let history = history::HistoryReader::new(deps.store, deps.metrics.clone());
    let rooms = rooms::Rooms::new(
        &config,
        deps.bus.rooms.clone(),
        history.clone(),
        deps.metrics.clone(),
        deps.journal.clone(),
        deps.delivery_hook.clone(),
    );
    let grace = config.drain_grace;
    let recorder = match &config.record {
        Some(record) => {
            Some(recorder::Recorder::start(record.clone(), &config.gateway_id).map_err(std::io::Error::other)?)
        }
        None => None,
    };
    let state = Arc::new(state::AppState::new(
        config,
        deps.bus,
        history,
        rooms,
        deps.metrics,
        deps.journal,
        deps.delivery_hook,
        recorder,
        drain_rx,
        alive,
    ));
    let app = http::router(state.clone()).merge(deps.routes);
    let address = listener.local_addr()?;
    let limits = &state.config.limits;
    let accept = listener::AcceptLimits {
        header_read_timeout: limits.header_read_timeout,
        max_client_sockets: listener::socket_capacity(
            limits.max_connections.saturating_add(limits.max_pending_connections),
        ),
        max_sockets_per_ip: limits.max_connections_per_ip,
    };
    tracing::info!(%address, gateway = %state.config.gateway_id, ?accept, "gateway listening");
    let draining = async move {
        shutdown.await;
        tracing::info!("draining: telling every connection to reconnect");
        let _ = drain_tx.send(true);
    };
    listener::serve(listener, app, accept, state.metrics.clone(), draining, grace).await;
    drop(state);
    if tokio::time::timeout(grace, all_closed.recv()).await.is_err() {
        tracing::warn!(?grace, "drain grace period over; dropping the remaining connections");
    } else {
        tracing::info!("all connections drained");
    }
    Ok(())
}
