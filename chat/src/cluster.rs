//! The distributed processes: `chat gateway` and `chat fanout`, on NATS and a CQL store.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bus::nats::{NatsAuth, NatsBus, NatsConfig};
use bus::GatewayBus;
use fanout::decision_log::{DecisionLog, DecisionLogWriter};
use fanout::{Fanout, FanoutConfig};
use faults::FaultLayer;
use gateway::{GatewayConfig, GatewayDeps};
use storage::cql::{CqlConfig, CqlCredentials, CqlStore, Replication};
use storage::StoreErrorKind;
use telemetry::journal::Journal;
use telemetry::metrics::Metrics;
use tokio::net::TcpListener;

/// Where the shared services are.
#[derive(Debug, Clone)]
pub struct Backends {
    /// NATS URL.
    pub nats_url: String,
    /// Credentials for NATS.
    pub nats_auth: NatsAuth,
    /// CA certificate of the NATS servers; TLS is required when set.
    pub nats_tls_ca: Option<std::path::PathBuf>,
    /// CQL contact points.
    pub cql_nodes: Vec<String>,
    /// The CQL role to log in as, when the cluster requires authentication.
    pub cql_credentials: Option<CqlCredentials>,
    /// CA certificate of the CQL nodes; TLS is used when set.
    pub cql_tls_ca: Option<std::path::PathBuf>,
    /// Keyspace of the history.
    pub keyspace: String,
    /// Replication of the keyspace when it is created.
    pub replication: Replication,
    /// Replicas of the JetStream send stream when it is created.
    pub stream_replicas: usize,
    /// Datacenter whose CQL nodes coordinate requests; `None` treats all nodes alike.
    pub cql_local_datacenter: Option<String>,
    /// Client-side timeout of one CQL request.
    pub cql_request_timeout: Duration,
    /// A CQL request slower than this (and than 4 times the median) is sent once more, to
    /// another node; `None`: never.
    pub cql_hedge_after: Option<Duration>,
    /// Route CQL requests around nodes much slower than the fastest (the driver's latency
    /// awareness).
    pub cql_latency_aware: bool,
}

impl Backends {
    fn nats_config(&self, name: &str) -> NatsConfig {
        let mut config = NatsConfig::new(&self.nats_url, name);
        config.stream_replicas = self.stream_replicas;
        config.auth = self.nats_auth.clone();
        config.tls_ca = self.nats_tls_ca.clone();
        config
    }

    fn cql_config(&self) -> CqlConfig {
        CqlConfig {
            nodes: self.cql_nodes.clone(),
            keyspace: self.keyspace.clone(),
            replication: self.replication.clone(),
            request_timeout: self.cql_request_timeout,
            hedge_after: self.cql_hedge_after,
            latency_aware: self.cql_latency_aware,
            local_datacenter: self.cql_local_datacenter.clone(),
            credentials: self.cql_credentials.clone(),
            tls_ca: self.cql_tls_ca.clone(),
            ..CqlConfig::default()
        }
    }
}

/// A fanout worker's own settings.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Id of the worker, in journeys and partition ownership.
    pub id: String,
    /// Journeys remembered for `/debug/messages`.
    pub journal_capacity: usize,
    /// Tuning of the sequencer (batch size, ...).
    pub fanout: FanoutConfig,
    /// How long the worker may hold a send before JetStream redelivers it to another worker
    /// (set when a partition's consumer is created).
    pub ack_wait: Duration,
    /// Longest warm-up of the store before taking sends (zero: none).
    pub warm_up: Duration,
    /// Where to write the worker's decision log, if anywhere.
    pub decision_log: Option<std::path::PathBuf>,
}

/// Parses `--replication`: `1` (SimpleStrategy RF 1) or `dc1=3,dc2=3` (NetworkTopologyStrategy).
pub fn parse_replication(text: &str) -> anyhow::Result<Replication> {
    if let Ok(rf) = text.trim().parse::<u32>() {
        return Ok(Replication::SimpleStrategy { rf });
    }
    let mut dcs = BTreeMap::new();
    for pair in text.split(',') {
        let (dc, rf) =
            pair.split_once('=').with_context(|| format!("replication {text:?}: expected N or dc=N,dc=N"))?;
        dcs.insert(dc.trim().to_owned(), rf.trim().parse().with_context(|| format!("replication factor of {dc}"))?);
    }
    Ok(Replication::NetworkTopology { dcs })
}

/// Connects to the CQL store, retrying with backoff until it answers (a process is useless
/// without it; once connected, the driver reconnects by itself). A configuration error (the
/// cluster refused the credentials, TLS failed, a bad CA file...) is not retried: it fails.
pub async fn connect_store(backends: &Backends) -> anyhow::Result<Arc<CqlStore>> {
    let config = backends.cql_config();
    let mut backoff = Duration::from_millis(200);
    loop {
        match CqlStore::connect(config.clone()).await {
            Ok(store) => return Ok(Arc::new(store)),
            Err(e) if e.kind() == StoreErrorKind::Config => return Err(e).context("the CQL store"),
            Err(e) => {
                tracing::warn!(nodes = ?config.nodes, error = %e, ?backoff, "CQL store not reachable yet; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Runs a stateless gateway until `shutdown`, then drains.
pub async fn gateway(
    listener: TcpListener,
    backends: Backends,
    config: GatewayConfig,
    journal_capacity: usize,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    let bus = NatsBus::connect(backends.nats_config(&config.gateway_id), metrics.clone()).await.context("NATS")?;
    let store = connect_store(&backends).await?;
    let journal = Arc::new(Journal::new(config.gateway_id.clone(), journal_capacity));
    bus.serve_journal(journal.clone()).await.context("serving journeys")?;
    bus.follow_workers().await.context("following the fanout workers")?;
    let faults = FaultLayer::new(config.admin_token.clone(), metrics.clone(), journal.clone());
    let deps = faults.wire_gateway(GatewayDeps::new(GatewayBus::of(bus), store, metrics, journal));
    gateway::run(listener, config, deps, shutdown).await.context("serving HTTP")
}

/// How long a joining worker waits before it takes the fences of the partitions it was given:
/// their previous owners are alive and may still be finishing the sends they pulled.
const OWNERSHIP_SETTLE: Duration = Duration::from_secs(3);

/// Keeps the store fences in step with the partitions this worker owns. It takes the fence of
/// every partition it owns, so the first send of a partition that moved here does not wait out
/// the store's grace: at join, once ownership has settled; after that at once, for every
/// partition gained (the fences are taken together, so their graces overlap). It lets go the
/// fence of every partition that moved away, once its appends there have ended, so the new
/// owner's grace ends early (docs/architecture.md, "Sequencing on the cluster"). Ends when the
/// bus is dropped.
fn keep_fences_with_ownership(store: Arc<CqlStore>, mut owned: tokio::sync::watch::Receiver<Vec<u32>>) {
    tokio::spawn(async move {
        tokio::time::sleep(OWNERSHIP_SETTLE).await;
        let mut held: Vec<u32> = Vec::new();
        loop {
            let partitions = owned.borrow_and_update().clone();
            for partition in held.iter().copied().filter(|p| !partitions.contains(p)) {
                let store = store.clone();
                tokio::spawn(async move {
                    if let Err(e) = store.release_partition(partition).await {
                        tracing::warn!(partition, error = %e, "could not say the partition's fence was let go");
                    }
                });
            }
            held.clone_from(&partitions);
            let mut taking = tokio::task::JoinSet::new();
            for partition in partitions {
                let store = store.clone();
                taking.spawn(async move { (partition, store.hold_partition(partition).await) });
            }
            while let Some(Ok((partition, taken))) = taking.join_next().await {
                if let Err(e) = taken {
                    tracing::warn!(partition, error = %e, "could not take the partition's store fence yet");
                }
            }
            if owned.changed().await.is_err() {
                break;
            }
        }
    });
}

/// Runs a fanout worker until `shutdown`, serving health, readiness and metrics on `listener`.
pub async fn fanout(
    listener: TcpListener,
    backends: Backends,
    worker: WorkerConfig,
    admin_token: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let WorkerConfig { id: worker_id, journal_capacity, fanout: fanout_config, ack_wait, warm_up, decision_log } =
        worker;
    let decision_log = start_decision_log(decision_log.as_deref(), &worker_id, &fanout_config).await?;
    let metrics = Metrics::new();
    let mut nats = backends.nats_config(&worker_id);
    nats.ack_wait = ack_wait;
    let bus = NatsBus::connect(nats, metrics.clone()).await.context("NATS")?;
    let store = connect_store(&backends).await?;
    // Before taking sends (and before /readyz answers): a store node that just started would
    // time most of them out.
    let watching = crate::store_watch::Watching::with_budget(warm_up);
    crate::store_watch::warm(store.as_ref(), &worker_id, watching.warm_up, &metrics).await;
    // ... and again after every outage, before /readyz says ready again.
    let store_watch = crate::store_watch::StoreWatch::spawn(store.clone(), &worker_id, watching, metrics.clone());
    bus.start_worker().await.context("joining the fanout workers")?;
    keep_fences_with_ownership(store.clone(), bus.owned_partitions());
    let journal = Arc::new(Journal::new(worker_id.clone(), journal_capacity));
    bus.serve_journal(journal.clone()).await.context("serving journeys")?;
    let faults = FaultLayer::new(admin_token, metrics.clone(), journal.clone());
    if let Some(gate) = faults.heartbeat_gate() {
        bus.gate_heartbeats(gate);
    }
    let fanout_bus = faults.fanout_bus(bus.clone());
    let mut worker = Fanout::new(store.clone(), fanout_bus.clone(), journal.clone(), metrics.clone(), fanout_config)
        .with_clock(faults.clock())
        .with_room_hook(faults.room_hook(Arc::new(bus.shared_locks())));
    if let Some((log, _)) = &decision_log {
        worker = worker.with_decision_log(log);
        let (log, mut owned) = (log.clone(), bus.owned_partitions());
        // Ends when the bus is dropped, after the worker.
        tokio::spawn(async move {
            loop {
                let now = owned.borrow_and_update().clone();
                log.ownership(&now);
                if owned.changed().await.is_err() {
                    break;
                }
            }
        });
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let ops = crate::ops::serve(
        listener,
        crate::ops::Ops { bus, store: store.clone(), metrics, journal, store_watch },
        faults.routes(),
        {
            let mut stop = stop_rx.clone();
            async move {
                let _ = stop.wait_for(|s| *s).await;
            }
        },
    );
    let ops = tokio::spawn(ops);
    let mut stop = stop_rx;
    tracing::info!(worker = %worker_id, "fanout worker running");
    let run = worker.run(async move {
        let _ = stop.wait_for(|s| *s).await;
    });
    tokio::pin!(run);
    tokio::select! {
        () = &mut run => {}
        () = shutdown => {
            let _ = stop_tx.send(true);
            run.await;
        }
    }
    // The batch in hand is answered; what is queued behind it goes to the next owner, which
    // need not wait out the fences' grace: this worker lets them go as it leaves.
    let (_, let_go) = tokio::join!(fanout_bus.leave(), store.release_all());
    tracing::info!(worker = %worker_id, fences = let_go, "fences let go");
    let _ = stop_tx.send(true);
    close_decision_log(decision_log).await?;
    ops.await.context("ops server task")?.context("ops server")
}

/// Starts writing a worker's decision log at `path`, if one is asked for.
pub async fn start_decision_log(
    path: Option<&std::path::Path>,
    worker: &str,
    config: &FanoutConfig,
) -> anyhow::Result<Option<(DecisionLog, DecisionLogWriter)>> {
    let Some(path) = path else { return Ok(None) };
    let log = DecisionLog::create(path, worker, config, fanout::decision_log::DEFAULT_CAPACITY)
        .await
        .with_context(|| format!("creating the decision log {}", path.display()))?;
    tracing::info!(path = %path.display(), "writing the decision log");
    Ok(Some(log))
}

/// Finishes a decision log once its worker stopped.
pub async fn close_decision_log(log: Option<(DecisionLog, DecisionLogWriter)>) -> anyhow::Result<()> {
    let Some((_, writer)) = log else { return Ok(()) };
    let path = writer.path().display().to_string();
    let summary = writer.close().await.with_context(|| format!("writing the decision log {path}"))?;
    if summary.lost > 0 {
        tracing::warn!(
            path,
            records = summary.records,
            lost = summary.lost,
            "the decision log lost records: its writer fell behind; it cannot be replayed"
        );
    } else {
        tracing::info!(path, records = summary.records, "decision log written");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// A configuration error is reported at once, not retried for ever like a node that is down.
    #[tokio::test]
    async fn a_bad_store_configuration_fails_instead_of_retrying() {
        let backends = Backends {
            nats_url: NatsConfig::DEFAULT_URL.into(),
            nats_auth: NatsAuth::None,
            nats_tls_ca: None,
            cql_nodes: vec!["127.0.0.1:1".into()],
            cql_credentials: None,
            cql_tls_ca: Some("/nonexistent/cql-ca.pem".into()),
            keyspace: "chat".into(),
            replication: Replication::SimpleStrategy { rf: 1 },
            stream_replicas: 1,
            cql_local_datacenter: None,
            cql_request_timeout: Duration::from_secs(1),
            cql_hedge_after: None,
            cql_latency_aware: false,
        };
        let failed = tokio::time::timeout(Duration::from_secs(10), connect_store(&backends))
            .await
            .expect("an answer, not endless retries");
        let why = format!("{:#}", failed.err().expect("refused"));
        assert!(why.contains("/nonexistent/cql-ca.pem") && why.contains("cannot be read"), "{why}");
    }
}
