//! `chat`: with no subcommand, the whole chat system in one process on embedded defaults;
//! `chat gateway` and `chat fanout` are the processes of a cluster on NATS and a CQL store.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use gateway::{GatewayConfig, Limits};
use telemetry::logging::LogFormat;

/// A real-time chat server over WebSockets (protocol v1).
///
/// With no subcommand: everything in one process (gateway, fanout, an in-process bus and an
/// embedded store in --data-dir).
#[derive(Parser, Debug)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Address to serve HTTP and WebSockets on.
    #[arg(long, env = "CHAT_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Directory of the embedded store.
    #[arg(long, env = "CHAT_DATA_DIR", default_value = "./data")]
    data_dir: PathBuf,
    #[command(flatten)]
    gateway: GatewayArgs,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// A stateless gateway: client WebSockets, publishing sends to NATS.
    Gateway {
        /// Address to serve HTTP and WebSockets on.
        #[arg(long, env = "CHAT_LISTEN", default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        #[command(flatten)]
        backends: BackendArgs,
        #[command(flatten)]
        gateway: GatewayArgs,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Print a message's journey through every process as a timeline.
    Trace {
        /// The message id (from an `ack` or a `message` frame).
        id: String,
        /// Base URL of any gateway (or the all-in-one server).
        #[arg(long, env = "CHAT_URL", default_value = "http://127.0.0.1:8080")]
        url: String,
    },
    /// A fanout worker: sequences, stores and delivers sends taken from NATS.
    Fanout {
        /// Address of the worker's /healthz, /readyz, /metrics and /debug/messages.
        #[arg(long, env = "CHAT_LISTEN", default_value = "127.0.0.1:9180")]
        listen: SocketAddr,
        /// Id of this worker (default: random `fanout-xxxxxxxx`).
        #[arg(long, env = "CHAT_WORKER_ID")]
        worker_id: Option<String>,
        /// Bearer token enabling the worker's /admin API (fault injection); off when unset.
        #[arg(long, env = "CHAT_ADMIN_TOKEN", hide_env_values = true)]
        admin_token: Option<String>,
        #[command(flatten)]
        backends: BackendArgs,
        #[command(flatten)]
        common: CommonArgs,
    },
}

/// Where NATS and the CQL store are.
#[derive(Args, Debug)]
struct BackendArgs {
    /// NATS server URL.
    #[arg(long = "nats", env = "CHAT_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// CQL contact points, HOST:PORT[,...].
    #[arg(long = "cql", env = "CHAT_CQL_NODES", default_value = "127.0.0.1:9042", value_delimiter = ',')]
    cql_nodes: Vec<String>,
    /// Keyspace of the history.
    #[arg(long, env = "CHAT_CQL_KEYSPACE", default_value = "chat")]
    keyspace: String,
    /// Replication when the keyspace is created: `1` (SimpleStrategy RF) or `dc1=3,dc2=3`.
    #[arg(long, env = "CHAT_CQL_REPLICATION", default_value = "1")]
    replication: String,
    /// Replicas of the JetStream send stream when it is created (3 on a NATS cluster).
    #[arg(long, env = "CHAT_STREAM_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    stream_replicas: u8,
}

impl BackendArgs {
    fn backends(&self) -> anyhow::Result<chat::cluster::Backends> {
        Ok(chat::cluster::Backends {
            nats_url: self.nats_url.clone(),
            cql_nodes: self.cql_nodes.clone(),
            keyspace: self.keyspace.clone(),
            replication: chat::cluster::parse_replication(&self.replication)?,
            stream_replicas: usize::from(self.stream_replicas),
        })
    }
}

/// Settings of every process.
#[derive(Args, Debug)]
struct CommonArgs {
    /// Log format.
    #[arg(long, env = "CHAT_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormatArg,
    /// Journeys remembered for /debug/messages.
    #[arg(long, env = "CHAT_JOURNAL_CAPACITY", default_value_t = chat::DEFAULT_JOURNAL_CAPACITY)]
    journal_capacity: usize,
    /// OTLP collector (e.g. http://127.0.0.1:4318, or :4317 with OTEL_EXPORTER_OTLP_PROTOCOL=grpc);
    /// spans of every message hop are exported there. Off when unset.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
}

/// Gateway settings shared by every mode that serves clients.
#[derive(Args, Debug)]
struct GatewayArgs {
    /// HS256 secret: when set, `hello` must carry a JWT signed with it.
    #[arg(long, env = "CHAT_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// Bearer token enabling the /admin API (fault injection); off when unset.
    #[arg(long, env = "CHAT_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Id of this gateway (default: random `gw-xxxxxxxx`).
    #[arg(long, env = "CHAT_GATEWAY_ID")]
    gateway_id: Option<String>,
    /// Largest client frame in bytes.
    #[arg(long, env = "CHAT_MAX_FRAME_BYTES", default_value_t = Limits::default().max_frame_bytes)]
    max_frame_bytes: usize,
    /// Largest message body in characters.
    #[arg(long, env = "CHAT_MAX_BODY_CHARS", default_value_t = Limits::default().max_body_chars)]
    max_body_chars: usize,
    /// Rooms one connection may join.
    #[arg(long, env = "CHAT_MAX_ROOMS_PER_CONNECTION", default_value_t = Limits::default().max_rooms_per_connection)]
    max_rooms_per_connection: usize,
    /// Open connections per process.
    #[arg(long, env = "CHAT_MAX_CONNECTIONS", default_value_t = Limits::default().max_connections)]
    max_connections: usize,
    /// Sustained sends (and typing signals) per second per connection.
    #[arg(long, env = "CHAT_SEND_RATE", default_value_t = Limits::default().send_rate_per_sec)]
    send_rate: u32,
    /// Burst of sends allowed above the sustained rate.
    #[arg(long, env = "CHAT_SEND_BURST", default_value_t = Limits::default().send_burst)]
    send_burst: u32,
    /// Frames queued per connection before deliveries are deferred to a store catch-up.
    #[arg(long, env = "CHAT_OUTBOUND_QUEUE", default_value_t = Limits::default().outbound_queue)]
    outbound_queue: usize,
    /// Seconds a connection's queue may stay full before it is closed with 4008.
    #[arg(long, env = "CHAT_SLOW_CONSUMER_SECS", default_value_t = 5)]
    slow_consumer_secs: u64,
    /// Milliseconds between a gateway's presence rosters; a gateway silent for 3 of them has
    /// its users marked offline (so a dead gateway's users go offline within 4 intervals).
    #[arg(long, env = "CHAT_ROSTER_INTERVAL_MS", default_value_t = 6000)]
    roster_interval_ms: u64,
    /// Seconds to wait for connections to close when draining.
    #[arg(long, env = "CHAT_DRAIN_GRACE_SECS", default_value_t = 10)]
    drain_grace_secs: u64,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum LogFormatArg {
    Text,
    Json,
}

impl GatewayArgs {
    fn config(&self) -> GatewayConfig {
        let defaults = GatewayConfig::default();
        GatewayConfig {
            gateway_id: self.gateway_id.clone().unwrap_or(defaults.gateway_id),
            jwt_secret: self.jwt_secret.clone().filter(|s| !s.is_empty()),
            admin_token: self.admin_token.clone().filter(|s| !s.is_empty()),
            limits: Limits {
                max_frame_bytes: self.max_frame_bytes,
                max_body_chars: self.max_body_chars,
                max_rooms_per_connection: self.max_rooms_per_connection,
                max_connections: self.max_connections,
                send_rate_per_sec: self.send_rate,
                send_burst: self.send_burst,
                outbound_queue: self.outbound_queue,
                slow_consumer_timeout: Duration::from_secs(self.slow_consumer_secs),
                ..Limits::default()
            },
            drain_grace: Duration::from_secs(self.drain_grace_secs),
            roster_interval: Duration::from_millis(self.roster_interval_ms.max(100)),
            ..defaults
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        None => {
            let _telemetry = init_logging(&cli.common, "chat")?;
            let config = cli.gateway.config();
            tracing::info!(auth = config.jwt_secret.is_some(), admin = config.admin_token.is_some(), data_dir = %cli.data_dir.display(), "starting all-in-one chat");
            let listener = bind(cli.listen).await?;
            chat::all_in_one(listener, &cli.data_dir, config, cli.common.journal_capacity, shutdown_signal()).await
        }
        Some(Command::Gateway { listen, backends, gateway, common }) => {
            let _telemetry = init_logging(&common, "chat-gateway")?;
            let config = gateway.config();
            tracing::info!(gateway = %config.gateway_id, nats = %backends.nats_url, cql = ?backends.cql_nodes, "starting gateway");
            let backends = backends.backends()?;
            let listener = bind(listen).await?;
            chat::cluster::gateway(listener, backends, config, common.journal_capacity, shutdown_signal()).await
        }
        Some(Command::Trace { id, url }) => chat::trace::print(&url, &id).await,
        Some(Command::Fanout { listen, worker_id, admin_token, backends, common }) => {
            let _telemetry = init_logging(&common, "chat-fanout")?;
            let worker_id =
                worker_id.unwrap_or_else(|| format!("fanout-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]));
            tracing::info!(worker = %worker_id, nats = %backends.nats_url, cql = ?backends.cql_nodes, "starting fanout worker");
            let backends = backends.backends()?;
            let listener = bind(listen).await?;
            chat::cluster::fanout(
                listener,
                backends,
                worker_id,
                admin_token.filter(|t| !t.is_empty()),
                common.journal_capacity,
                shutdown_signal(),
            )
            .await
        }
    }
}

fn init_logging(common: &CommonArgs, service: &str) -> anyhow::Result<telemetry::logging::TelemetryGuard> {
    let format = match common.log_format {
        LogFormatArg::Text => LogFormat::Text,
        LogFormatArg::Json => LogFormat::Json,
    };
    telemetry::logging::init(format, common.otlp_endpoint.as_deref(), service).context("setting up tracing")
}

/// Binds and announces the address on stdout (scripts and tests wait for this line).
async fn bind(address: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(address).await.with_context(|| format!("binding {address}"))?;
    println!("chat listening on http://{}", listener.local_addr()?);
    Ok(listener)
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the server");
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    tracing::info!("shutdown signal received");
}
