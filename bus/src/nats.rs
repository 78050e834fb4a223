//! The bus on NATS (docs/architecture.md has the subject scheme).
//!
//! - Sends: a gateway publishes each accepted send to JetStream
//!   (`chat.send.<partition>.<room>`, stream `CHAT_SEND`, work-queue retention), so it survives
//!   any one process dying until a fanout worker has stored it. Each of the 16 partitions is
//!   pulled by the one live worker that owns it (rendezvous hashing over worker heartbeats).
//!   The worker answers on the gateway's reply subject (`chat.reply.<gateway>.<token>`) and
//!   only then acks the JetStream message; a worker that dies before acking has the send
//!   redelivered to another worker, and the store's dedupe makes the retry harmless.
//! - Deliveries: core NATS `chat.deliver.<room>`, one message per room per gateway; gateways
//!   subscribe only for rooms with local members and repair gaps from the store.
//! - Presence and typing: core NATS `chat.events.<room>`. A gateway follows a room's deliveries
//!   and events with one subscription, `chat.*.<room>`.
//!
//! The W3C `traceparent` rides in NATS headers. Works with nats-server 2.9 and later: only
//! APIs 2.9 supports are used (singular `filter_subject`, no KV bucket creation).
//!
//! This file holds the configuration, the connection and the send stream; the rest is by
//! concept: `sends` (a send's round trip: publish, reply, ack), `feeds` (room deliveries and
//! events), `journeys` (journey queries between processes), `workers` (worker membership,
//! partition ownership and pulling) and `ids` (what an undecodable payload still names, for
//! its log line).

mod feeds;
mod ids;
mod journeys;
mod locks;
mod sends;
mod workers;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_trait::async_trait;
use protocol::bus::{RoomEvent, SendCommand, SendOutcome};
use protocol::{subjects, ChatMessage};
use telemetry::journal::Journey;
use telemetry::metrics::Metrics;
use tokio::sync::mpsc;

use crate::{BusError, BusHealth, FanoutBus, JourneyBus, PendingSend, RoomBus, RoomFeed, SendBus};
pub use locks::{SharedLockGuard, SharedLocks};
use sends::Waiters;
pub use workers::owner as partition_owner;

/// Header carrying the W3C trace context.
const TRACEPARENT: &str = "traceparent";

/// How to reach NATS and tune the send stream.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated (`nats://127.0.0.1:4222`).
    pub url: String,
    /// This process's name: the gateway id for gateways.
    pub name: String,
    /// Replicas of the send stream (1 locally, 3 in a NATS cluster).
    pub stream_replicas: usize,
    /// How long a worker may hold a send before JetStream gives it to another worker; set when
    /// a partition's durable consumer is created (an existing consumer keeps its own). Longer
    /// than a send's deadline (5 s) by default, so a redelivered copy is always past its deadline
    /// and a worker's refusal of a first copy it never tried to store is final.
    pub ack_wait: Duration,
    /// Sends a worker may hold unacked at once.
    pub max_ack_pending: i64,
    /// How this process proves who it is to NATS.
    pub auth: NatsAuth,
    /// PEM file of the certificate authority that signed the servers' certificates: when set,
    /// TLS is required and the servers are verified against it.
    pub tls_ca: Option<std::path::PathBuf>,
}

/// Credentials for NATS: without them anyone who reaches the server could publish deliveries
/// as any user.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum NatsAuth {
    /// None (a server without authorization, e.g. on loopback).
    #[default]
    None,
    /// A user and password of the server's `authorization` block.
    UserPassword {
        /// The user.
        user: String,
        /// The password.
        password: String,
    },
    /// A shared token.
    Token(String),
    /// The seed of an nkey (`SU...`) whose public key (`U...`) the server lists; the seed never
    /// leaves this process: the client signs the server's nonce with it. Build it with
    /// [`NatsAuth::nkey_seed_file`], which checks the seed.
    NkeySeed(String),
}

impl std::fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            Self::UserPassword { user, .. } => write!(f, "UserPassword({user}, <hidden>)"),
            Self::Token(_) => f.write_str("Token(<hidden>)"),
            Self::NkeySeed(_) => f.write_str("NkeySeed(<hidden>)"),
        }
    }
}

impl NatsAuth {
    /// Reads an nkey user seed from `path` (a file keeps it out of the process list and the
    /// environment) and checks that it is one: fails with a message naming the file when it
    /// cannot be read or holds anything but a user seed (`SU...`; blank lines and `#` comments
    /// around it are allowed).
    pub fn nkey_seed_file(path: &std::path::Path) -> Result<Self, NkeySeedError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| NkeySeedError { path: path.to_owned(), problem: format!("cannot be read: {e}") })?;
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#'));
        let (Some(seed), None) = (lines.next(), lines.next()) else {
            let problem = "must hold exactly one nkey seed (one line starting with SU)".to_owned();
            return Err(NkeySeedError { path: path.to_owned(), problem });
        };
        // The error text of the nkeys crate never contains the seed.
        let pair = nkeys::KeyPair::from_seed(seed)
            .map_err(|e| NkeySeedError { path: path.to_owned(), problem: format!("is not a valid nkey seed: {e}") })?;
        if pair.key_pair_type() != nkeys::KeyPairType::User {
            let problem =
                format!("holds a {:?} seed; NATS clients authenticate with a user seed (SU...)", pair.key_pair_type());
            return Err(NkeySeedError { path: path.to_owned(), problem });
        }
        Ok(Self::NkeySeed(seed.to_owned()))
    }
}

/// An nkey seed file that cannot be used: a configuration error, found at start.
#[derive(Debug, thiserror::Error)]
#[error("NATS nkey seed file {}: {problem}", path.display())]
pub struct NkeySeedError {
    path: std::path::PathBuf,
    problem: String,
}

impl NatsConfig {
    /// Default server URL (`--nats`).
    pub const DEFAULT_URL: &'static str = "nats://127.0.0.1:4222";
    /// Default `stream_replicas` (`--stream-replicas`).
    pub const DEFAULT_STREAM_REPLICAS: u8 = 1;
    /// Default `ack_wait`, in milliseconds (`chat fanout --ack-wait-ms`).
    pub const DEFAULT_ACK_WAIT_MS: u64 = 8_000;
    /// Default `max_ack_pending`.
    pub const DEFAULT_MAX_ACK_PENDING: i64 = 20_000;

    /// Defaults for a process named `name` on `url`.
    pub fn new(url: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            name: name.into(),
            stream_replicas: usize::from(Self::DEFAULT_STREAM_REPLICAS),
            ack_wait: Duration::from_millis(Self::DEFAULT_ACK_WAIT_MS),
            max_ack_pending: Self::DEFAULT_MAX_ACK_PENDING,
            auth: NatsAuth::None,
            tls_ca: None,
        }
    }
}

/// Gateways' and fanout workers' connection to NATS.
pub struct NatsBus {
    client: async_nats::Client,
    js: jetstream::Context,
    config: NatsConfig,
    stream_ready: AtomicBool,
    waiters: Waiters,
    reply_prefix: String,
    /// Sends pulled from the partitions this worker owns (fanout side).
    sends: tokio::sync::Mutex<Option<mpsc::Receiver<sends::Pulled>>>,
    /// The worker's membership task (fanout side): it ends once it has announced that this
    /// worker leaves and stopped the pulls, which [`leave`](crate::FanoutBus::leave) awaits.
    membership: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Counts the connection's (re)connects; room feeds turn a change into [`FeedItem::Resumed`],
    /// and sends awaiting an answer publish a copy.
    ///
    /// [`FeedItem::Resumed`]: crate::FeedItem::Resumed
    connects: Arc<tokio::sync::watch::Sender<u64>>,
    /// The partitions this worker pulls, in order (empty on a gateway).
    owned: tokio::sync::watch::Sender<Vec<u32>>,
    /// The workers a gateway hears and the owner of each partition (empty until
    /// [`follow_workers`](Self::follow_workers), and on a worker).
    workers: tokio::sync::watch::Sender<Arc<workers::WorkersView>>,
    /// Decides whether each of this worker's heartbeats is published (set by a fault layer;
    /// without one, every heartbeat is).
    heartbeat_gate: std::sync::OnceLock<HeartbeatGate>,
    metrics: Metrics,
}

/// Asked before each heartbeat a worker publishes: `false` loses that heartbeat (the seam of the
/// `fanout.heartbeat` fault).
pub type HeartbeatGate = Arc<dyn Fn() -> bool + Send + Sync>;

/// How often the connection pings its server; after 3 unanswered pings it reconnects to
/// another (so a partitioned NATS node is left within about 6 s, not async-nats's 2 minutes).
const PING_INTERVAL: Duration = Duration::from_secs(2);

/// The servers of a `--nats` value: one URL, or several separated by commas (a cluster).
fn server_list(urls: &str) -> Result<Vec<async_nats::ServerAddr>, BusError> {
    urls.split(',')
        .map(|url| url.trim().parse::<async_nats::ServerAddr>())
        .collect::<Result<_, _>>()
        .map_err(|e| unavailable(&format!("parse the NATS URL list {urls:?}"), e))
}

/// TLS that trusts only the CA in the PEM file `ca`, on the ring provider. Built here rather
/// than by async-nats from `add_root_certificates`: that path asks rustls for the process-wide
/// provider, which rustls cannot choose in a binary that also has aws-lc-rs (the CQL driver's
/// rustls features pull it in), and panics.
fn tls_config(ca: &std::path::Path) -> Result<async_nats::rustls::ClientConfig, BusError> {
    use async_nats::rustls::{self, pki_types::pem::PemObject, pki_types::CertificateDer};
    let what = format!("read the NATS TLS CA {}", ca.display());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| unavailable(&what, e))? {
        roots.add(cert.map_err(|e| unavailable(&what, e))?).map_err(|e| unavailable(&what, e))?;
    }
    if roots.is_empty() {
        return Err(BusError::unavailable(format!("{what}: no certificate in it")));
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| unavailable("set up TLS for NATS", e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// An unavailable-bus error for a failed `what`, caused by `e`.
fn unavailable(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> BusError {
    BusError::unavailable(what).with_source(e)
}

impl NatsBus {
    /// Connects (retrying in the background while NATS is down) and, for gateways, starts
    /// listening for workers' answers. Never fails because NATS is down: `ready` says so.
    pub async fn connect(config: NatsConfig, metrics: Metrics) -> Result<Arc<Self>, BusError> {
        let name = config.name.clone();
        let connects = Arc::new(tokio::sync::watch::Sender::new(0u64));
        let on_event = connects.clone();
        let options = match &config.auth {
            NatsAuth::None => async_nats::ConnectOptions::new(),
            NatsAuth::UserPassword { user, password } => {
                async_nats::ConnectOptions::with_user_and_password(user.clone(), password.clone())
            }
            NatsAuth::Token(token) => async_nats::ConnectOptions::with_token(token.clone()),
            NatsAuth::NkeySeed(seed) => async_nats::ConnectOptions::with_nkey(seed.clone()),
        };
        let options = match &config.tls_ca {
            Some(ca) => options.require_tls(true).tls_client_config(tls_config(ca)?),
            None => options,
        };
        let client = options
            .name(&config.name)
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            // A server that stops answering (partitioned, frozen) is left after 3 missed pings.
            .ping_interval(PING_INTERVAL)
            .event_callback(move |event| {
                if matches!(event, async_nats::Event::Connected) {
                    on_event.send_modify(|count| *count += 1);
                }
                let name = name.clone();
                async move { tracing::info!(process = %name, %event, "nats connection event") }
            })
            .connect(server_list(&config.url)?)
            .await
            .map_err(|e| unavailable("connect to NATS", e))?;
        let js = jetstream::new(client.clone());
        let reply_prefix = sends::reply_prefix(&config.name);
        let bus = Arc::new(Self {
            client,
            js,
            config,
            stream_ready: AtomicBool::new(false),
            waiters: Arc::default(),
            reply_prefix,
            sends: tokio::sync::Mutex::new(None),
            membership: tokio::sync::Mutex::new(None),
            connects,
            owned: tokio::sync::watch::Sender::new(Vec::new()),
            workers: tokio::sync::watch::Sender::new(Arc::default()),
            heartbeat_gate: std::sync::OnceLock::new(),
            metrics,
        });
        bus.listen_for_replies().await?;
        Ok(bus)
    }

    /// Creates the send stream if it does not exist yet.
    async fn ensure_stream(&self) -> Result<stream::Stream, BusError> {
        let config = stream::Config {
            name: subjects::SEND_STREAM.to_owned(),
            subjects: vec![subjects::SEND_ALL.to_owned()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            num_replicas: self.config.stream_replicas,
            max_age: Duration::from_secs(3600),
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        };
        let stream = self.js.get_or_create_stream(config).await.map_err(|e| unavailable("create stream", e))?;
        self.stream_ready.store(true, Ordering::Release);
        Ok(stream)
    }

    fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }
}

#[async_trait]
impl SendBus for NatsBus {
    async fn submit(&self, command: SendCommand) -> Result<SendOutcome, BusError> {
        self.submit_send(command).await
    }
}

#[async_trait]
impl RoomBus for NatsBus {
    async fn subscribe(&self, room: &str) -> Result<RoomFeed, BusError> {
        self.follow_room(room).await
    }

    async fn publish_event(&self, room: &str, event: RoomEvent) -> Result<(), BusError> {
        self.publish_room_event(room, event).await
    }

    fn is_distributed(&self) -> bool {
        true
    }
}

#[async_trait]
impl BusHealth for NatsBus {
    async fn ready(&self) -> Result<(), BusError> {
        if !self.connected() {
            return Err(BusError::unavailable("not connected to NATS"));
        }
        if !self.stream_ready.load(Ordering::Acquire) {
            self.ensure_stream().await?;
        }
        Ok(())
    }
}

#[async_trait]
impl JourneyBus for NatsBus {
    async fn remote_journeys(&self, id: uuid::Uuid) -> Vec<Journey> {
        self.gather_journeys(id).await
    }
}

#[async_trait]
impl FanoutBus for NatsBus {
    async fn next_batch(&self, max: usize) -> Option<Vec<PendingSend>> {
        self.next_pulled_batch(max).await
    }

    async fn deliver(&self, message: Arc<ChatMessage>, traceparent: &str) -> Result<(), BusError> {
        self.publish_delivery(message, traceparent).await
    }

    async fn leave(&self) {
        self.leave_workers().await
    }

    fn pulls(&self, room: &str) -> bool {
        self.pulls_partition(subjects::partition(room))
    }
}

#[cfg(test)]
mod tests {
    use super::server_list;

    #[test]
    fn a_nats_value_names_one_server_or_a_comma_separated_cluster() {
        assert_eq!(server_list("nats://127.0.0.1:4222").unwrap().len(), 1);
        let cluster = server_list("nats://127.0.0.1:4222, nats://127.0.0.1:4223,nats://127.0.0.1:4224").unwrap();
        let ports: Vec<u16> = cluster.iter().map(|s| s.port()).collect();
        assert_eq!(ports, [4222, 4223, 4224]);
        assert!(server_list("nats://127.0.0.1:4222,nats://127.0.0.1:nope").is_err());
    }
}
