//! What every request handler and connection shares.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bus::GatewayBus;
use telemetry::journal::Journal;
use telemetry::metrics::Metrics;
use tokio::sync::{mpsc, watch, Semaphore};

use crate::admission::SendAdmission;
use crate::auth::Verifier;
use crate::config::GatewayConfig;
use crate::history::HistoryReader;
use crate::hook::DeliveryHook;
use crate::rooms::Rooms;

/// Shared state of one gateway.
pub struct AppState {
    /// Settings.
    pub config: GatewayConfig,
    /// The bus to the fanout workers.
    pub bus: GatewayBus,
    /// Reads of history.
    pub history: HistoryReader,
    /// Room hubs.
    pub rooms: Arc<Rooms>,
    /// Metrics.
    pub metrics: Metrics,
    /// Journey recorder.
    pub journal: Arc<Journal>,
    /// Intercepts deliveries (exercises and the debugging lab); `None` in the product.
    pub delivery_hook: Option<Arc<dyn DeliveryHook>>,
    /// Records clients' traffic when set up (`--record DIR`).
    pub recorder: Option<Arc<crate::recorder::Recorder>>,
    /// Token verifier when auth is on.
    pub verifier: Option<Verifier>,
    /// Permits for open connections.
    pub connection_permits: Arc<Semaphore>,
    /// Places for sends awaiting their answer (load shedding).
    pub sends: SendAdmission,
    /// Connections per user, taken at `hello`.
    pub(crate) user_connections: crate::slots::Counts<String>,
    draining: watch::Receiver<bool>,
    next_connection: AtomicU64,
    /// Held (cloned) by every connection task; the drain waits until all are dropped.
    pub(crate) alive: mpsc::Sender<()>,
}

impl AppState {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        config: GatewayConfig,
        bus: GatewayBus,
        history: HistoryReader,
        rooms: Arc<Rooms>,
        metrics: Metrics,
        journal: Arc<Journal>,
        delivery_hook: Option<Arc<dyn DeliveryHook>>,
        recorder: Option<Arc<crate::recorder::Recorder>>,
        draining: watch::Receiver<bool>,
        alive: mpsc::Sender<()>,
    ) -> Self {
        let verifier = config.jwt_secret.as_deref().map(Verifier::new);
        let connection_permits = Arc::new(Semaphore::new(config.limits.max_connections));
        let sends = SendAdmission::new(
            config.limits.max_sends_in_flight,
            config.submit_timeout,
            metrics.sends_in_flight.clone(),
            metrics.send_admission_limit.clone(),
        );
        Self {
            config,
            bus,
            history,
            rooms,
            metrics,
            journal,
            delivery_hook,
            recorder,
            verifier,
            connection_permits,
            sends,
            user_connections: crate::slots::Counts::default(),
            draining,
            next_connection: AtomicU64::new(1),
            alive,
        }
    }

    /// A fresh connection id.
    pub fn next_connection_id(&self) -> u64 {
        self.next_connection.fetch_add(1, Ordering::Relaxed)
    }

    /// Becomes `true` when the gateway starts draining.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.draining.clone()
    }

    /// Whether gaps in room feeds are repaired now (configured, and not switched off by the
    /// delivery hook).
    pub fn repairs_gaps(&self) -> bool {
        self.config.gap_repair && self.delivery_hook.as_ref().is_none_or(|hook| hook.repairs_gaps())
    }

    /// Whether the gateway is draining.
    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }
}
