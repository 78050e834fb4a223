//! The command line of `chat`: every flag, its environment twin and its default. Defaults are
//! the constants the configuration types' `Default` impls use, so the two never disagree; the
//! README's configuration table is rendered from here ([`crate::config_doc`]).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bus::nats::{NatsAuth, NatsConfig};
use clap::builder::RangedU64ValueParser;
use clap::{Args, Parser, Subcommand, ValueEnum};
use fanout::FanoutConfig;
use gateway::auth::JwtAuth;
use gateway::{GatewayConfig, Limits};
use storage::cql::{CqlConfig, CqlCredentials};
use telemetry::logging::LogFormat;

use crate::cluster::{Backends, WorkerConfig};

/// Default address of the all-in-one server and of a gateway (`--listen`).
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080));
/// Default address of a fanout worker's ops endpoints (`chat fanout --listen`).
pub const DEFAULT_FANOUT_LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9180));
/// Default directory of the embedded store (`--data-dir`).
pub const DEFAULT_DATA_DIR: &str = "./data";

/// A real-time chat server over WebSockets (protocol v1).
///
/// With no subcommand: everything in one process (gateway, fanout, an in-process bus and an
/// embedded store in --data-dir).
#[derive(Parser, Debug)]
#[command(name = "chat", version, about, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// A process of a cluster, or a tool; none runs everything in one process.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Address to serve HTTP and WebSockets on.
    #[arg(long, env = "CHAT_LISTEN", value_name = "ADDR", default_value_t = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Directory of the embedded store.
    #[arg(long, env = "CHAT_DATA_DIR", value_name = "DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// While sends keep coming, the fanout worker takes them at most once per this window, so
    /// that more of them share one batch and its fsync'd commit (microseconds; 0 takes and
    /// commits each at once: lower latency, more CPU per send; at most 100000).
    #[arg(
        long,
        env = "CHAT_COMMIT_WINDOW_US",
        value_name = "US",
        default_value_t = storage::embedded::DEFAULT_COMMIT_WINDOW_US,
        value_parser = clap::value_parser!(u64).range(0..=storage::embedded::MAX_COMMIT_WINDOW_US)
    )]
    pub commit_window_us: u64,
    /// Gateway settings.
    #[command(flatten)]
    pub gateway: GatewayArgs,
    /// The fanout worker's decision log.
    #[command(flatten)]
    pub decision_log: DecisionLogArgs,
    /// Settings of every process.
    #[command(flatten)]
    pub common: CommonArgs,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// A stateless gateway: client WebSockets, publishing sends to NATS.
    Gateway {
        /// Address to serve HTTP and WebSockets on.
        #[arg(long, env = "CHAT_LISTEN", value_name = "ADDR", default_value_t = DEFAULT_LISTEN)]
        listen: SocketAddr,
        /// Where NATS and the CQL store are.
        #[command(flatten)]
        backends: BackendArgs,
        /// Gateway settings (boxed: by far the largest of the subcommands' arguments).
        #[command(flatten)]
        gateway: Box<GatewayArgs>,
        /// Settings of every process.
        #[command(flatten)]
        common: CommonArgs,
    },
    /// A fanout worker: sequences, stores and delivers sends taken from NATS.
    Fanout {
        /// Address of the worker's /healthz, /readyz, /metrics and /debug/messages.
        #[arg(long, env = "CHAT_LISTEN", value_name = "ADDR", default_value_t = DEFAULT_FANOUT_LISTEN)]
        listen: SocketAddr,
        /// The worker's own settings.
        #[command(flatten)]
        worker: WorkerArgs,
        /// Where NATS and the CQL store are.
        #[command(flatten)]
        backends: BackendArgs,
        /// Settings of every process.
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Print a message's journey through every process as a timeline.
    Trace {
        /// The message id (from an `ack` or a `message` frame).
        id: String,
        /// Base URL of any gateway (or the all-in-one server).
        #[arg(long, env = "CHAT_URL", default_value_t = format!("http://{DEFAULT_LISTEN}"))]
        url: String,
        /// The gateway's admin token, needed when it runs with client auth on.
        #[arg(long, env = "CHAT_ADMIN_TOKEN", value_name = "T", hide_env_values = true)]
        admin_token: Option<String>,
    },
    /// Tools that read the processes' debug endpoints.
    Debug {
        /// What to look at.
        #[command(subcommand)]
        what: DebugCommand,
    },
    /// Replay a recording offline.
    Replay {
        /// What to replay.
        #[command(subcommand)]
        what: ReplayCommand,
    },
    /// The debugging lab: challenges with hidden causes, graded (`chat lab list`).
    Lab {
        /// Where the lab keeps its state.
        #[command(flatten)]
        args: crate::lab::LabArgs,
        /// What to do.
        #[command(subcommand)]
        command: crate::lab::LabCommand,
    },
    /// Print the README's configuration table, rendered from these flags.
    #[command(hide = true)]
    ConfigTable,
}

/// What `chat debug` looks at.
#[derive(Subcommand, Debug)]
pub enum DebugCommand {
    /// What every process's operations wait on and hold (`/debug/waits`), as one wait-for graph;
    /// prints its cycles (deadlocks). Exit status: 0 no cycle, 1 a cycle, 2 a process did not
    /// answer.
    Waits {
        /// Base URL of each process (gateways, workers, the all-in-one server), comma-separated
        /// or repeated.
        #[arg(long, required = true, value_delimiter = ',')]
        url: Vec<String>,
        /// The processes' admin token, needed by a gateway with client auth on.
        #[arg(long, env = "CHAT_ADMIN_TOKEN", value_name = "T", hide_env_values = true)]
        admin_token: Option<String>,
        /// Only waits at least this many milliseconds old.
        #[arg(long, default_value_t = 0)]
        min_ms: u64,
    },
}

/// What `chat replay` replays.
#[derive(Subcommand, Debug)]
pub enum ReplayCommand {
    /// Run the sequencer again on a fanout worker's decision log (--decision-log) and compare its
    /// decisions with the logged ones. Exit status: 0 identical, 1 divergent, 2 the log cannot
    /// be read or is incomplete.
    Worker {
        /// The decision log (JSON lines).
        log: PathBuf,
        /// Also print each send, store call and answer, clock reading and id.
        #[arg(long, short)]
        verbose: bool,
    },
}

/// A fanout worker's decision log.
#[derive(Args, Debug)]
pub struct DecisionLogArgs {
    /// File to write the fanout worker's decision log to (JSON lines: batches, store answers,
    /// clock readings, ids, decisions; truncated at start) for `chat replay worker`. Off when
    /// unset.
    #[arg(long = "decision-log", env = "CHAT_DECISION_LOG", value_name = "FILE")]
    pub path: Option<PathBuf>,
}

/// Where NATS and the CQL store are, and how to use them.
#[derive(Args, Debug)]
pub struct BackendArgs {
    /// NATS server URL(s), comma-separated.
    #[arg(long = "nats", env = "CHAT_NATS_URL", value_name = "URL", default_value = NatsConfig::DEFAULT_URL)]
    pub nats_url: String,
    /// NATS user (with --nats-password), when the server requires credentials.
    #[arg(
        long,
        env = "CHAT_NATS_USER",
        value_name = "USER",
        requires = "nats_password",
        conflicts_with = "nats_token"
    )]
    pub nats_user: Option<String>,
    /// NATS password of --nats-user.
    #[arg(long, env = "CHAT_NATS_PASSWORD", value_name = "P", hide_env_values = true, requires = "nats_user")]
    pub nats_password: Option<String>,
    /// NATS token, when the server requires one (instead of a user and password).
    #[arg(
        long,
        env = "CHAT_NATS_TOKEN",
        value_name = "T",
        hide_env_values = true,
        conflicts_with = "nats_nkey_seed_file"
    )]
    pub nats_token: Option<String>,
    /// File holding the nkey user seed (`SU...`) to authenticate to NATS with, when the server
    /// lists users by nkey; read and checked at start.
    #[arg(long, env = "CHAT_NATS_NKEY_SEED_FILE", value_name = "FILE", conflicts_with = "nats_user")]
    pub nats_nkey_seed_file: Option<PathBuf>,
    /// PEM file of the CA that signed the NATS servers' certificates: TLS is then required and
    /// the servers verified against it.
    #[arg(long, env = "CHAT_NATS_TLS_CA", value_name = "FILE")]
    pub nats_tls_ca: Option<std::path::PathBuf>,
    /// CQL contact points, HOST:PORT[,...]; the driver discovers the other nodes.
    #[arg(
        long = "cql",
        env = "CHAT_CQL_NODES",
        value_name = "NODES",
        default_value = CqlConfig::DEFAULT_NODE,
        value_delimiter = ','
    )]
    pub cql_nodes: Vec<String>,
    /// CQL role to log in as (with --cql-password), when the cluster requires authentication.
    #[arg(long, env = "CHAT_CQL_USER", value_name = "USER", requires = "cql_password")]
    pub cql_user: Option<String>,
    /// Password of --cql-user.
    #[arg(long, env = "CHAT_CQL_PASSWORD", value_name = "P", hide_env_values = true, requires = "cql_user")]
    pub cql_password: Option<String>,
    /// PEM file of the CA that signed the CQL nodes' certificates: connections then use TLS and
    /// verify the nodes (by IP address) against it.
    #[arg(long, env = "CHAT_CQL_TLS_CA", value_name = "FILE")]
    pub cql_tls_ca: Option<PathBuf>,
    /// Keyspace of the history.
    #[arg(long, env = "CHAT_CQL_KEYSPACE", value_name = "K", default_value = CqlConfig::DEFAULT_KEYSPACE)]
    pub keyspace: String,
    /// Replication when the keyspace is created: `N` (SimpleStrategy) or `dc1=3,dc2=3`
    /// (NetworkTopologyStrategy); an existing keyspace is left as it is.
    #[arg(
        long,
        env = "CHAT_CQL_REPLICATION",
        value_name = "R",
        default_value_t = CqlConfig::DEFAULT_REPLICATION_FACTOR.to_string()
    )]
    pub replication: String,
    /// Datacenter whose CQL nodes coordinate every request (token-aware, never failing over to
    /// another datacenter, so `LOCAL_QUORUM` means this one); all nodes alike when unset.
    #[arg(long, env = "CHAT_CQL_LOCAL_DC", value_name = "DC")]
    pub cql_local_dc: Option<String>,
    /// Client-side timeout of one CQL request in milliseconds, the driver's retries included; a
    /// write that timed out is resolved before the client is answered.
    #[arg(
        long,
        env = "CHAT_CQL_REQUEST_TIMEOUT_MS",
        value_name = "MS",
        default_value_t = CqlConfig::DEFAULT_REQUEST_TIMEOUT_MS,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub cql_request_timeout_ms: u64,
    /// A CQL request (a read, or an append's idempotent writes) not answered after this many
    /// milliseconds, and after 4 times the median of recent requests (at most half the request
    /// timeout), is sent once more, to another node, and the first answer wins: a stalled node
    /// costs a request this long, not its timeout. 0: never (the default: on a cluster short of
    /// CPU the second copies cost more than they save).
    #[arg(long, env = "CHAT_CQL_HEDGE_MS", value_name = "MS", default_value_t = 0)]
    pub cql_hedge_ms: u64,
    /// Route CQL requests around a node whose recent mean latency is over twice the fastest
    /// node's (the driver's latency awareness; the node is tried again after 10 s). Helps while
    /// one node of a ring is cold or slow, as right after it restarts; off by default
    /// (docs/storage.md).
    #[arg(long, env = "CHAT_CQL_LATENCY_AWARE")]
    pub cql_latency_aware: bool,
    /// Replicas of the JetStream send stream `CHAT_SEND` when it is created (3 on a NATS cluster).
    #[arg(
        long,
        env = "CHAT_STREAM_REPLICAS",
        value_name = "N",
        default_value_t = NatsConfig::DEFAULT_STREAM_REPLICAS,
        value_parser = clap::value_parser!(u8).range(1..=5)
    )]
    pub stream_replicas: u8,
}

impl BackendArgs {
    /// The backends these flags name; fails on a malformed `--replication` and on an nkey seed
    /// file that cannot be read or holds no user seed.
    pub fn backends(&self) -> anyhow::Result<Backends> {
        let nats_auth = match (&self.nats_user, &self.nats_password, &self.nats_token, &self.nats_nkey_seed_file) {
            (Some(user), Some(password), None, None) => {
                NatsAuth::UserPassword { user: user.clone(), password: password.clone() }
            }
            (None, None, Some(token), None) => NatsAuth::Token(token.clone()),
            (None, None, None, Some(file)) => NatsAuth::nkey_seed_file(file)?,
            _ => NatsAuth::None,
        };
        Ok(Backends {
            nats_url: self.nats_url.clone(),
            nats_auth,
            nats_tls_ca: self.nats_tls_ca.clone(),
            cql_nodes: self.cql_nodes.clone(),
            cql_credentials: match (&self.cql_user, &self.cql_password) {
                (Some(user), Some(password)) => Some(CqlCredentials { user: user.clone(), password: password.clone() }),
                _ => None,
            },
            cql_tls_ca: self.cql_tls_ca.clone(),
            keyspace: self.keyspace.clone(),
            replication: crate::cluster::parse_replication(&self.replication)?,
            stream_replicas: usize::from(self.stream_replicas),
            cql_local_datacenter: self.cql_local_dc.clone().filter(|dc| !dc.is_empty()),
            cql_request_timeout: Duration::from_millis(self.cql_request_timeout_ms),
            cql_hedge_after: (self.cql_hedge_ms > 0).then(|| Duration::from_millis(self.cql_hedge_ms)),
            cql_latency_aware: self.cql_latency_aware,
        })
    }
}

/// A fanout worker's own settings.
#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// Id of this worker (default: random `fanout-xxxxxxxx`).
    #[arg(long, env = "CHAT_WORKER_ID", value_name = "ID")]
    pub worker_id: Option<String>,
    /// Bearer token of at least 16 bytes (`openssl rand -hex 16`) enabling the /admin API (fault
    /// injection); off when unset.
    #[arg(
        long,
        env = "CHAT_ADMIN_TOKEN",
        value_name = "T",
        hide_env_values = true,
        value_parser = SecretParser::ADMIN_TOKEN
    )]
    pub admin_token: Option<String>,
    /// Most sends a worker takes off the bus at once; they are grouped by room and the rooms
    /// sequenced concurrently.
    #[arg(
        long,
        env = "CHAT_MAX_BATCH",
        value_name = "N",
        default_value_t = FanoutConfig::DEFAULT_MAX_BATCH,
        value_parser = RangedU64ValueParser::<usize>::new().range(1..)
    )]
    pub max_batch: usize,
    /// Milliseconds a worker may hold a send unacked before JetStream redelivers it to another
    /// worker; applies when a partition's durable consumer is created (an existing one keeps
    /// its setting). At 5.5 s or more (the workers' 4.5 s deadline plus 1 s for clocks), a
    /// worker's refusal of an expired send it never tried to store settles it: `unavailable` (not
    /// stored) when it reaches the gateway in time; below, such sends are always answered
    /// `internal` (not known yet) at their deadline.
    #[arg(
        long,
        env = "CHAT_ACK_WAIT_MS",
        value_name = "MS",
        default_value_t = NatsConfig::DEFAULT_ACK_WAIT_MS,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub ack_wait_ms: u64,
    /// Seconds a worker may spend warming the store up (a send's operations in a room of its
    /// own, until they are quick) before it takes sends and says it is ready, and again after
    /// the store comes back from an outage; 0 skips it.
    #[arg(long, env = "CHAT_WARM_UP_SECS", value_name = "S", default_value_t = 30)]
    pub warm_up_secs: u64,
    /// The worker's decision log.
    #[command(flatten)]
    pub decision_log: DecisionLogArgs,
}

impl WorkerArgs {
    /// The worker's settings (a random `fanout-xxxxxxxx` id unless one is given).
    pub fn config(&self, journal_capacity: usize) -> WorkerConfig {
        let id = self
            .worker_id
            .clone()
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| format!("fanout-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]));
        WorkerConfig {
            id,
            journal_capacity,
            fanout: FanoutConfig { max_batch: self.max_batch, ..FanoutConfig::default() },
            ack_wait: Duration::from_millis(self.ack_wait_ms),
            warm_up: Duration::from_secs(self.warm_up_secs),
            decision_log: self.decision_log.path.clone().filter(|p| !p.as_os_str().is_empty()),
        }
    }
}

/// Settings of every process.
#[derive(Args, Debug)]
pub struct CommonArgs {
    /// Log lines on stderr (`RUST_LOG` filters).
    #[arg(long, env = "CHAT_LOG_FORMAT", value_enum, default_value_t = LogFormatArg::Text)]
    pub log_format: LogFormatArg,
    /// Message journeys kept in memory for /debug/messages.
    #[arg(long, env = "CHAT_JOURNAL_CAPACITY", value_name = "N", default_value_t = crate::DEFAULT_JOURNAL_CAPACITY)]
    pub journal_capacity: usize,
    /// OTLP collector (e.g. http://127.0.0.1:4318, or :4317 with OTEL_EXPORTER_OTLP_PROTOCOL=grpc);
    /// spans of every message hop are exported there. Off when unset.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
}

impl CommonArgs {
    /// The log format chosen.
    pub fn log_format(&self) -> LogFormat {
        match self.log_format {
            LogFormatArg::Text => LogFormat::Text,
            LogFormatArg::Json => LogFormat::Json,
        }
    }
}

/// Gateway settings shared by every mode that serves clients.
#[derive(Args, Debug)]
pub struct GatewayArgs {
    /// HS256 secret of at least 32 bytes (`openssl rand -base64 48`): when set, `hello` must
    /// carry a JWT signed with it (`sub`, `exp`, optional `nbf` and `rooms`); unset is dev mode.
    #[arg(
        long,
        env = "CHAT_JWT_SECRET",
        value_name = "S",
        hide_env_values = true,
        value_parser = SecretParser::JWT_SECRET
    )]
    pub jwt_secret: Option<String>,
    /// With a JWT secret: tokens must carry this `iss`.
    #[arg(long, env = "CHAT_JWT_ISSUER", value_name = "ISS")]
    pub jwt_issuer: Option<String>,
    /// With a JWT secret: tokens must carry this `aud` (unset, tokens with any `aud` are refused).
    #[arg(long, env = "CHAT_JWT_AUDIENCE", value_name = "AUD")]
    pub jwt_audience: Option<String>,
    /// With a JWT secret: longest token lifetime in seconds; a token whose `exp` is further
    /// ahead, or whose `exp - iat` is longer, is refused.
    #[arg(
        long,
        env = "CHAT_JWT_MAX_LIFETIME_SECS",
        value_name = "N",
        default_value_t = gateway::auth::DEFAULT_MAX_LIFETIME_SECS,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub jwt_max_lifetime_secs: u64,
    /// Bearer token of at least 16 bytes (`openssl rand -hex 16`) enabling the /admin API (fault
    /// injection); off when unset. With client auth on it also guards /metrics, /debug/messages
    /// and the reasons of a failing /readyz (closed without it).
    #[arg(
        long,
        env = "CHAT_ADMIN_TOKEN",
        value_name = "T",
        hide_env_values = true,
        value_parser = SecretParser::ADMIN_TOKEN
    )]
    pub admin_token: Option<String>,
    /// Id of this gateway, in `welcome` and journeys (default: random `gw-xxxxxxxx`).
    #[arg(long, env = "CHAT_GATEWAY_ID", value_name = "ID")]
    pub gateway_id: Option<String>,
    /// Largest client frame in bytes: larger ones get `too_large`; above 4x the connection is
    /// closed with 1009.
    #[arg(long, env = "CHAT_MAX_FRAME_BYTES", value_name = "N", default_value_t = Limits::DEFAULT_MAX_FRAME_BYTES)]
    pub max_frame_bytes: usize,
    /// Largest message body in characters.
    #[arg(long, env = "CHAT_MAX_BODY_CHARS", value_name = "N", default_value_t = Limits::DEFAULT_MAX_BODY_CHARS)]
    pub max_body_chars: usize,
    /// Rooms one connection may have joined at once.
    #[arg(
        long,
        env = "CHAT_MAX_ROOMS_PER_CONNECTION",
        value_name = "N",
        default_value_t = Limits::DEFAULT_MAX_ROOMS_PER_CONNECTION
    )]
    pub max_rooms_per_connection: usize,
    /// Open WebSockets per process; more get HTTP 503.
    #[arg(long, env = "CHAT_MAX_CONNECTIONS", value_name = "N", default_value_t = Limits::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Client sockets not yet upgraded to WebSockets, on top of --max-connections; more are
    /// answered 503 at once (all client sockets are also kept 256 below the open-file limit).
    #[arg(
        long,
        env = "CHAT_MAX_PENDING_CONNECTIONS",
        value_name = "N",
        default_value_t = Limits::DEFAULT_MAX_PENDING_CONNECTIONS
    )]
    pub max_pending_connections: usize,
    /// Client sockets from one IP address at once, upgraded or not; more are answered 503; 0 is
    /// no cap (load tests and proxies bring many sockets from one address).
    #[arg(
        long,
        env = "CHAT_MAX_CONNECTIONS_PER_IP",
        value_name = "N",
        default_value_t = Limits::DEFAULT_MAX_CONNECTIONS_PER_IP
    )]
    pub max_connections_per_ip: usize,
    /// Connections of one user at once (counted from `hello`); more are refused with
    /// `rate_limited` and closed; 0 is no cap.
    #[arg(
        long,
        env = "CHAT_MAX_CONNECTIONS_PER_USER",
        value_name = "N",
        default_value_t = Limits::DEFAULT_MAX_CONNECTIONS_PER_USER
    )]
    pub max_connections_per_user: usize,
    /// Browser origins allowed to open WebSockets, comma-separated (`https://chat.example.com`);
    /// others get HTTP 403. Unset: any origin; clients that send no Origin are not affected.
    #[arg(long, env = "CHAT_ALLOWED_ORIGINS", value_name = "ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// Milliseconds a socket has to send its HTTP request headers before it is closed.
    #[arg(
        long,
        env = "CHAT_HEADER_READ_TIMEOUT_MS",
        value_name = "MS",
        default_value_t = Limits::DEFAULT_HEADER_READ_TIMEOUT_MS,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub header_read_timeout_ms: u64,
    /// Sends of this gateway process awaiting their answer at once; more are answered
    /// `unavailable` at once, unpublished, so a client may retry them at once (load shedding:
    /// an overload refuses the excess quickly instead of queueing every send past its deadline).
    /// Above 1,024 the limit in force is lower while the queue stands (most sends stored 250 ms
    /// or more after they came, two windows running) and sends are stored slower than it clears
    /// in a third of a send's deadline, down to 128 (`chat_send_admission_limit`); a stall (a dead
    /// worker, NATS stopped) keeps the limit it had; 0 is no limit.
    #[arg(
        long,
        env = "CHAT_MAX_SENDS_IN_FLIGHT",
        value_name = "N",
        default_value_t = Limits::DEFAULT_MAX_SENDS_IN_FLIGHT
    )]
    pub max_sends_in_flight: usize,
    /// Sustained sends (and typing signals) per second per connection; `rate_limited` beyond.
    #[arg(long, env = "CHAT_SEND_RATE", value_name = "N", default_value_t = Limits::DEFAULT_SEND_RATE_PER_SEC)]
    pub send_rate: u32,
    /// Burst of sends allowed above the sustained rate.
    #[arg(long, env = "CHAT_SEND_BURST", value_name = "N", default_value_t = Limits::DEFAULT_SEND_BURST)]
    pub send_burst: u32,
    /// Sustained join, leave and history requests per second per connection; `rate_limited` beyond.
    #[arg(long, env = "CHAT_CONTROL_RATE", value_name = "N", default_value_t = Limits::DEFAULT_CONTROL_RATE_PER_SEC)]
    pub control_rate: u32,
    /// Burst of join, leave and history requests above that (a reconnecting client rejoins its
    /// rooms at once).
    #[arg(long, env = "CHAT_CONTROL_BURST", value_name = "N", default_value_t = Limits::DEFAULT_CONTROL_BURST)]
    pub control_burst: u32,
    /// Frames queued per connection before deliveries are deferred to a store catch-up (slow
    /// consumers in docs/protocol.md).
    #[arg(long, env = "CHAT_OUTBOUND_QUEUE", value_name = "N", default_value_t = Limits::DEFAULT_OUTBOUND_QUEUE)]
    pub outbound_queue: usize,
    /// Seconds a connection's queue or socket may stay full before it is closed with 4008.
    #[arg(
        long,
        env = "CHAT_SLOW_CONSUMER_SECS",
        value_name = "N",
        default_value_t = Limits::DEFAULT_SLOW_CONSUMER_SECS
    )]
    pub slow_consumer_secs: u64,
    /// Milliseconds between a gateway's presence rosters; a gateway silent for 3 of them has
    /// its users marked offline (so a dead gateway's users go offline within 4 intervals).
    #[arg(
        long,
        env = "CHAT_ROSTER_INTERVAL_MS",
        value_name = "MS",
        default_value_t = GatewayConfig::DEFAULT_ROSTER_INTERVAL_MS,
        value_parser = clap::value_parser!(u64).range(GatewayConfig::MIN_ROSTER_INTERVAL_MS..)
    )]
    pub roster_interval_ms: u64,
    /// On SIGTERM/SIGINT every client gets `reconnect` and close 1012; then wait this many
    /// seconds for the connections to close.
    #[arg(
        long,
        env = "CHAT_DRAIN_GRACE_SECS",
        value_name = "N",
        default_value_t = GatewayConfig::DEFAULT_DRAIN_GRACE_SECS
    )]
    pub drain_grace_secs: u64,
    /// Record every client's frames (types, rooms, ids, seqs, sizes; bodies only with
    /// --record-bodies) to JSON-lines files in this directory (docs/debugging.md); switch it at
    /// run time with `POST /admin/record {"enabled": bool}` (needs --admin-token).
    #[arg(long, env = "CHAT_RECORD", value_name = "DIR")]
    pub record: Option<std::path::PathBuf>,
    /// With --record: set it up switched off, until `POST /admin/record {"enabled": true}`.
    #[arg(long, env = "CHAT_RECORD_PAUSED")]
    pub record_paused: bool,
    /// With --record: write message bodies too (else only their length).
    #[arg(long, env = "CHAT_RECORD_BODIES")]
    pub record_bodies: bool,
    /// With --record: start a new file past this many MiB.
    #[arg(
        long,
        env = "CHAT_RECORD_FILE_MIB",
        value_name = "N",
        default_value_t = 64,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub record_file_mib: u64,
    /// With --record: delete the oldest files while the directory holds more than this many MiB.
    #[arg(
        long,
        env = "CHAT_RECORD_TOTAL_MIB",
        value_name = "N",
        default_value_t = 1024,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub record_total_mib: u64,
}

/// A secret flag's value, refused when too short (an empty one too: unset is the way to turn
/// the feature off) without echoing it, as clap would in "invalid value '...'".
#[derive(Clone, Debug)]
struct SecretParser {
    /// What the secret is, for a value that is not UTF-8.
    what: &'static str,
    /// Says why a value is refused, never containing it.
    check: fn(&str) -> Result<(), String>,
}

impl SecretParser {
    /// `--jwt-secret`: at least [`gateway::auth::MIN_SECRET_BYTES`].
    const JWT_SECRET: Self = Self { what: "the JWT secret", check: gateway::auth::check_secret };
    /// `--admin-token` (gateways and workers): at least [`faults::admin::MIN_TOKEN_BYTES`].
    const ADMIN_TOKEN: Self = Self { what: "the admin token", check: faults::admin::check_token };
}

impl clap::builder::TypedValueParser for SecretParser {
    type Value = String;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<String, clap::Error> {
        let refuse = |message: String| {
            let flag = arg.and_then(clap::Arg::get_long).map_or_else(String::new, |long| format!("--{long}: "));
            clap::Error::raw(clap::error::ErrorKind::ValueValidation, format!("{flag}{message}\n")).with_cmd(cmd)
        };
        let secret = value.to_str().ok_or_else(|| refuse(format!("{} is not valid UTF-8", self.what)))?;
        (self.check)(secret).map_err(refuse)?;
        Ok(secret.to_owned())
    }
}

/// `--log-format`.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum LogFormatArg {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl GatewayArgs {
    /// The gateway's configuration (a random `gw-xxxxxxxx` id unless one is given).
    pub fn config(&self) -> GatewayConfig {
        let defaults = GatewayConfig::default();
        GatewayConfig {
            gateway_id: self.gateway_id.clone().filter(|id| !id.is_empty()).unwrap_or(defaults.gateway_id),
            jwt_secret: self.jwt_secret.as_ref().map(|secret| {
                Arc::new(JwtAuth {
                    secret: secret.clone(),
                    issuer: self.jwt_issuer.clone().filter(|iss| !iss.is_empty()),
                    audience: self.jwt_audience.clone().filter(|aud| !aud.is_empty()),
                    max_lifetime: Duration::from_secs(self.jwt_max_lifetime_secs),
                })
            }),
            admin_token: self.admin_token.clone(),
            allowed_origins: self
                .allowed_origins
                .iter()
                .map(|o| o.trim().to_owned())
                .filter(|o| !o.is_empty())
                .collect(),
            limits: Limits {
                max_frame_bytes: self.max_frame_bytes,
                max_body_chars: self.max_body_chars,
                max_rooms_per_connection: self.max_rooms_per_connection,
                max_connections: self.max_connections,
                max_pending_connections: self.max_pending_connections,
                max_connections_per_ip: self.max_connections_per_ip,
                max_connections_per_user: self.max_connections_per_user,
                max_sends_in_flight: self.max_sends_in_flight,
                header_read_timeout: Duration::from_millis(self.header_read_timeout_ms),
                send_rate_per_sec: self.send_rate,
                send_burst: self.send_burst,
                control_rate_per_sec: self.control_rate,
                control_burst: self.control_burst,
                outbound_queue: self.outbound_queue,
                slow_consumer_timeout: Duration::from_secs(self.slow_consumer_secs),
                ..Limits::default()
            },
            drain_grace: Duration::from_secs(self.drain_grace_secs),
            roster_interval: Duration::from_millis(self.roster_interval_ms),
            record: self.record.clone().map(|dir| gateway::recorder::RecordConfig {
                dir,
                enabled: !self.record_paused,
                bodies: self.record_bodies,
                max_file_bytes: self.record_file_mib << 20,
                max_total_bytes: self.record_total_mib << 20,
            }),
            ..defaults
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use clap::{CommandFactory, Parser};

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Flags left out parse to exactly the configuration types' defaults.
    #[test]
    fn defaults_are_the_configuration_defaults() {
        let cli = Cli::try_parse_from(["chat"]).unwrap();
        assert_eq!(cli.listen, DEFAULT_LISTEN);
        assert_eq!(
            storage::embedded::EmbeddedOptions::default().commit_window,
            Duration::from_micros(cli.commit_window_us)
        );
        let config = cli.gateway.config();
        let (limits, defaults) = (&config.limits, gateway::Limits::default());
        assert_eq!(
            (limits.max_frame_bytes, limits.max_body_chars, limits.max_rooms_per_connection, limits.max_connections),
            (
                defaults.max_frame_bytes,
                defaults.max_body_chars,
                defaults.max_rooms_per_connection,
                defaults.max_connections
            )
        );
        assert_eq!(
            (limits.send_rate_per_sec, limits.send_burst, limits.outbound_queue, limits.slow_consumer_timeout),
            (defaults.send_rate_per_sec, defaults.send_burst, defaults.outbound_queue, defaults.slow_consumer_timeout)
        );
        let gateway_defaults = GatewayConfig::default();
        assert_eq!(config.drain_grace, gateway_defaults.drain_grace);
        assert_eq!(config.roster_interval, gateway_defaults.roster_interval);

        let cli = Cli::try_parse_from(["chat", "fanout"]).unwrap();
        let Some(Command::Fanout { listen, worker, backends, common }) = cli.command else {
            panic!("not the fanout command");
        };
        assert_eq!(listen, DEFAULT_FANOUT_LISTEN);
        let worker = worker.config(common.journal_capacity);
        assert_eq!(worker.fanout.max_batch, FanoutConfig::default().max_batch);
        assert!(worker.id.starts_with("fanout-"), "{}", worker.id);
        let nats = NatsConfig::new(NatsConfig::DEFAULT_URL, "x");
        assert_eq!(worker.ack_wait, nats.ack_wait);
        let backends = backends.backends().unwrap();
        let cql = CqlConfig::default();
        assert_eq!(backends.nats_url, nats.url);
        assert_eq!(backends.stream_replicas, nats.stream_replicas);
        assert_eq!(backends.cql_nodes, cql.nodes);
        assert_eq!(backends.keyspace, cql.keyspace);
        assert_eq!(backends.replication, cql.replication);
        assert_eq!(backends.cql_request_timeout, cql.request_timeout);
        assert_eq!(backends.cql_hedge_after, cql.hedge_after);
        assert_eq!(backends.cql_latency_aware, cql.latency_aware);
        assert_eq!(backends.cql_local_datacenter, cql.local_datacenter);
    }

    #[test]
    fn new_flags_reach_the_configuration() {
        let cli = Cli::try_parse_from([
            "chat",
            "fanout",
            "--cql-local-dc",
            "dc2",
            "--cql-request-timeout-ms",
            "2500",
            "--cql-hedge-ms",
            "150",
            "--cql-latency-aware",
            "--max-batch",
            "64",
            "--ack-wait-ms",
            "9000",
        ])
        .unwrap();
        let Some(Command::Fanout { worker, backends, .. }) = cli.command else {
            panic!("not the fanout command");
        };
        let backends = backends.backends().unwrap();
        assert_eq!(backends.cql_local_datacenter.as_deref(), Some("dc2"));
        assert_eq!(backends.cql_request_timeout, Duration::from_millis(2500));
        assert_eq!(backends.cql_hedge_after, Some(Duration::from_millis(150)));
        assert!(backends.cql_latency_aware);
        let worker = worker.config(10);
        assert_eq!((worker.fanout.max_batch, worker.ack_wait), (64, Duration::from_secs(9)));
        assert!(Cli::try_parse_from(["chat", "fanout", "--max-batch", "0"]).is_err());
        assert!(Cli::try_parse_from(["chat", "--roster-interval-ms", "10"]).is_err());
        assert!(Cli::try_parse_from(["chat", "--commit-window-us", "100001"]).is_err());
        assert!(Cli::try_parse_from(["chat", "--commit-window-us", "-1"]).is_err());
        assert_eq!(Cli::try_parse_from(["chat", "--commit-window-us", "0"]).unwrap().commit_window_us, 0);
    }

    #[test]
    fn the_decision_log_flag_reaches_the_worker_and_replay_parses() {
        let cli = Cli::try_parse_from(["chat", "fanout", "--decision-log", "/tmp/w.jsonl"]).unwrap();
        let Some(Command::Fanout { worker, .. }) = cli.command else { panic!("not the fanout command") };
        assert_eq!(worker.config(1).decision_log, Some(PathBuf::from("/tmp/w.jsonl")));
        let cli = Cli::try_parse_from(["chat", "fanout"]).unwrap();
        let Some(Command::Fanout { worker, .. }) = cli.command else { panic!("not the fanout command") };
        assert_eq!(worker.config(1).decision_log, None);
        let cli = Cli::try_parse_from(["chat", "--decision-log", "/tmp/a.jsonl"]).unwrap();
        assert_eq!(cli.decision_log.path, Some(PathBuf::from("/tmp/a.jsonl")));
        let cli = Cli::try_parse_from(["chat", "replay", "worker", "w.jsonl", "--verbose"]).unwrap();
        let Some(Command::Replay { what: ReplayCommand::Worker { log, verbose } }) = cli.command else {
            panic!("not replay worker")
        };
        assert_eq!((log, verbose), (PathBuf::from("w.jsonl"), true));
    }

    #[test]
    fn jwt_flags_reach_the_configuration_and_short_secrets_are_refused() {
        let secret = "s".repeat(gateway::auth::MIN_SECRET_BYTES);
        let config = Cli::try_parse_from(["chat"]).unwrap().gateway.config();
        assert!(config.jwt_secret.is_none(), "unset is dev mode");
        let cli = Cli::try_parse_from(["chat", "--jwt-secret", &secret]).unwrap();
        let auth = cli.gateway.config().jwt_secret.unwrap();
        assert_eq!((auth.secret.as_str(), &auth.issuer, &auth.audience), (secret.as_str(), &None, &None));
        assert_eq!(auth.max_lifetime, Duration::from_secs(gateway::auth::DEFAULT_MAX_LIFETIME_SECS));
        let cli = Cli::try_parse_from([
            "chat",
            "gateway",
            "--jwt-secret",
            &secret,
            "--jwt-issuer",
            "https://idp.example",
            "--jwt-audience",
            "chat",
            "--jwt-max-lifetime-secs",
            "900",
        ])
        .unwrap();
        let Some(Command::Gateway { gateway, .. }) = cli.command else {
            panic!("not the gateway command");
        };
        let auth = gateway.config().jwt_secret.unwrap();
        assert_eq!(auth.issuer.as_deref(), Some("https://idp.example"));
        assert_eq!(auth.audience.as_deref(), Some("chat"));
        assert_eq!(auth.max_lifetime, Duration::from_secs(900));
        assert!(Cli::try_parse_from(["chat", "--jwt-secret", &secret, "--jwt-max-lifetime-secs", "0"]).is_err());
        for short in ["", "change-me", &secret[1..]] {
            let error = Cli::try_parse_from(["chat", "--jwt-secret", short]).unwrap_err();
            assert_eq!(error.kind(), clap::error::ErrorKind::ValueValidation);
            assert_eq!(error.exit_code(), 2);
            let text = error.to_string();
            assert!(text.contains("at least 32 bytes"), "{text}");
            assert!(short.is_empty() || !text.contains(short), "{text}");
        }
    }

    #[test]
    fn admin_tokens_under_16_bytes_are_refused_in_every_mode_that_serves_admin() {
        let token = "t".repeat(faults::admin::MIN_TOKEN_BYTES);
        let cli = Cli::try_parse_from(["chat", "--admin-token", &token]).unwrap();
        assert_eq!(cli.gateway.config().admin_token.as_deref(), Some(token.as_str()));
        let cli = Cli::try_parse_from(["chat", "gateway", "--admin-token", &token]).unwrap();
        let Some(Command::Gateway { gateway, .. }) = cli.command else { panic!("not the gateway command") };
        assert_eq!(gateway.config().admin_token.as_deref(), Some(token.as_str()));
        let cli = Cli::try_parse_from(["chat", "fanout", "--admin-token", &token]).unwrap();
        let Some(Command::Fanout { worker, .. }) = cli.command else { panic!("not the fanout command") };
        assert_eq!(worker.admin_token.as_deref(), Some(token.as_str()));
        assert!(Cli::try_parse_from(["chat"]).unwrap().gateway.config().admin_token.is_none(), "unset is off");
        for mode in [&[][..], &["gateway"][..], &["fanout"][..]] {
            for short in ["", "s3cret", &token[1..]] {
                let args: Vec<&str> = ["chat"].iter().chain(mode).chain(&["--admin-token", short]).copied().collect();
                let error = Cli::try_parse_from(args).unwrap_err();
                assert_eq!(error.kind(), clap::error::ErrorKind::ValueValidation, "{mode:?} {short:?}");
                assert_eq!(error.exit_code(), 2);
                let text = error.to_string();
                assert!(text.contains("--admin-token: the admin token"), "{text}");
                assert!(text.contains("at least 16 bytes"), "{text}");
                assert!(short.is_empty() || !text.contains(short), "{text}");
            }
        }
    }

    #[test]
    fn nats_credentials_come_in_pairs_or_as_a_token() {
        let backends = |args: &[&str]| {
            let cli = Cli::try_parse_from(["chat", "gateway"].iter().chain(args)).map_err(|e| e.kind())?;
            let Some(Command::Gateway { backends, .. }) = cli.command else { panic!("gateway") };
            Ok::<_, clap::error::ErrorKind>(backends.backends().unwrap().nats_auth)
        };
        assert_eq!(
            backends(&["--nats-user", "chat", "--nats-password", "pw"]),
            Ok(NatsAuth::UserPassword { user: "chat".into(), password: "pw".into() })
        );
        assert_eq!(backends(&["--nats-token", "t"]), Ok(NatsAuth::Token("t".into())));
        assert_eq!(backends(&[]), Ok(NatsAuth::None));
        assert!(backends(&["--nats-user", "chat"]).is_err(), "a user needs a password");
        assert!(backends(&["--nats-user", "chat", "--nats-password", "pw", "--nats-token", "t"]).is_err());
    }

    #[test]
    fn cql_credentials_come_in_pairs_and_tls_names_a_ca() {
        let backends = |args: &[&str]| {
            let cli = Cli::try_parse_from(["chat", "fanout"].iter().chain(args)).map_err(|e| e.kind())?;
            let Some(Command::Fanout { backends, .. }) = cli.command else { panic!("fanout") };
            let backends = backends.backends().unwrap();
            Ok::<_, clap::error::ErrorKind>((backends.cql_credentials, backends.cql_tls_ca))
        };
        let credentials = CqlCredentials { user: "chat".into(), password: "pw".into() };
        assert_eq!(backends(&["--cql-user", "chat", "--cql-password", "pw"]), Ok((Some(credentials.clone()), None)));
        assert_eq!(
            backends(&["--cql-tls-ca", "/etc/chat/cql-ca.pem"]),
            Ok((None, Some(PathBuf::from("/etc/chat/cql-ca.pem"))))
        );
        assert_eq!(backends(&[]), Ok((None, None)));
        assert!(backends(&["--cql-user", "chat"]).is_err(), "a user needs a password");
        assert!(backends(&["--cql-password", "pw"]).is_err(), "a password needs a user");
        assert!(!format!("{credentials:?}").contains("pw"), "the password is never printed");
        let help = Cli::command().find_subcommand_mut("fanout").unwrap().render_long_help().to_string();
        assert!(help.contains("CHAT_CQL_PASSWORD") && help.contains("--cql-tls-ca"), "{help}");
    }

    #[test]
    fn an_nkey_seed_file_is_read_and_checked_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let backends = |file: &std::path::Path, more: &[&str]| {
            let args = ["chat", "gateway", "--nats-nkey-seed-file", file.to_str().unwrap()];
            let cli = Cli::try_parse_from(args.iter().chain(more)).map_err(|e| e.kind().to_string())?;
            let Some(Command::Gateway { backends, .. }) = cli.command else { panic!("gateway") };
            backends.backends().map(|b| b.nats_auth).map_err(|e| e.to_string())
        };
        let seed = nkeys::KeyPair::new_user().seed().unwrap();
        let good = dir.path().join("user.nk");
        std::fs::write(&good, format!("# chat's NATS user\n{seed}\n")).unwrap();
        assert_eq!(backends(&good, &[]), Ok(NatsAuth::NkeySeed(seed.clone())));
        assert!(!format!("{:?}", NatsAuth::NkeySeed(seed.clone())).contains(&seed), "the seed is never printed");

        let missing = dir.path().join("missing.nk");
        let why = backends(&missing, &[]).unwrap_err();
        assert!(why.contains("missing.nk") && why.contains("cannot be read"), "{why}");
        let malformed = dir.path().join("malformed.nk");
        std::fs::write(&malformed, "SUnot-a-seed-at-all\n").unwrap();
        let why = backends(&malformed, &[]).unwrap_err();
        assert!(why.contains("malformed.nk") && why.contains("not a valid nkey seed"), "{why}");
        assert!(!why.contains("SUnot-a-seed"), "the file's text is never printed: {why}");
        let account = dir.path().join("account.nk");
        std::fs::write(&account, nkeys::KeyPair::new_account().seed().unwrap()).unwrap();
        assert!(backends(&account, &[]).unwrap_err().contains("user seed"));
        let public = dir.path().join("public.nk");
        std::fs::write(&public, nkeys::KeyPair::new_user().public_key()).unwrap();
        assert!(backends(&public, &[]).is_err(), "a public key is no seed");

        assert!(backends(&good, &["--nats-token", "t"]).is_err(), "one way to authenticate");
        assert!(backends(&good, &["--nats-user", "u", "--nats-password", "p"]).is_err(), "one way to authenticate");
    }
}
