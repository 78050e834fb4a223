//! Wiring of the chat processes. [`all_in_one`] runs gateway and fanout in one process on the
//! in-process bus and the embedded store; [`testing`] starts it on a free port for tests.
//! [`cli`] is the command line (every flag and default), [`config_doc`] renders it as the
//! README's configuration table.

pub mod cli;
pub mod cluster;
pub mod config_doc;
pub mod lab;
pub mod ops;
pub mod replay;
pub mod store_watch;
pub mod testing;
pub mod trace;
pub mod waits;

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use bus::local::LocalBus;
use bus::GatewayBus;
use fanout::{Fanout, FanoutConfig};
use faults::FaultLayer;
use gateway::{GatewayConfig, GatewayDeps};
use storage::embedded::{EmbeddedOptions, EmbeddedStore};
use telemetry::journal::Journal;
use telemetry::metrics::Metrics;
use tokio::net::TcpListener;

/// Journeys each process remembers by default.
pub const DEFAULT_JOURNAL_CAPACITY: usize = 20_000;

/// Runs gateway + fanout + in-process bus + embedded store until `shutdown` resolves; then
/// drains the gateway and stops the fanout worker after its current batch.
pub async fn all_in_one(
    listener: TcpListener,
    data_dir: &Path,
    config: GatewayConfig,
    journal_capacity: usize,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    all_in_one_logged(listener, data_dir, EmbeddedOptions::default(), config, journal_capacity, None, shutdown).await
}

/// [`all_in_one`] with the store's options given and its fanout worker writing a decision log
/// to `decision_log`.
pub async fn all_in_one_logged(
    listener: TcpListener,
    data_dir: &Path,
    store_options: EmbeddedOptions,
    config: GatewayConfig,
    journal_capacity: usize,
    decision_log: Option<&Path>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // One worker feeds the store's one writer, and waits for each commit before its next batch:
    // the commit window paces the worker's batches, and the writer commits each batch at once.
    // (Held in the writer, a batch taken just after a commit would wait out the window there,
    // and a send arriving meanwhile would wait for the batch after it.)
    let batch_window = store_options.commit_window;
    let store_options = EmbeddedOptions { commit_window: std::time::Duration::ZERO };
    let store = Arc::new(
        EmbeddedStore::open_with(data_dir, store_options)
            .with_context(|| format!("opening the store in {}", data_dir.display()))?,
    );
    let bus = Arc::new(LocalBus::new());
    let metrics = Metrics::new();
    let journal = Arc::new(Journal::new(config.gateway_id.clone(), journal_capacity));
    let faults = FaultLayer::new(config.admin_token.clone(), metrics.clone(), journal.clone());
    let fanout_config = FanoutConfig { batch_window, ..FanoutConfig::default() };
    let decision_log = cluster::start_decision_log(decision_log, &config.gateway_id, &fanout_config).await?;
    let mut worker =
        Fanout::new(store.clone(), faults.fanout_bus(bus.clone()), journal.clone(), metrics.clone(), fanout_config)
            .with_clock(faults.clock())
            .with_room_hook(faults.room_hook(Arc::new(faults::LocalLocks::default())));
    if let Some((log, _)) = &decision_log {
        worker = worker.with_decision_log(log);
    }
    let (stop_fanout, fanout_stopped) = tokio::sync::oneshot::channel::<()>();
    let fanout_task = tokio::spawn(worker.run(async move {
        let _ = fanout_stopped.await;
    }));
    let deps = faults.wire_gateway(GatewayDeps::new(GatewayBus::of(bus), store, metrics, journal));
    let served = gateway::run(listener, config, deps, shutdown).await;
    let _ = stop_fanout.send(());
    fanout_task.await.context("fanout worker panicked")?;
    cluster::close_decision_log(decision_log).await?;
    served.context("serving HTTP")
}
