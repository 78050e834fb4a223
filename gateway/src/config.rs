//! Gateway settings and limits, each with a production-sane default.

use std::sync::Arc;
use std::time::Duration;

use crate::auth::JwtAuth;

/// Everything a gateway needs to know besides its bus and store.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// This gateway's id, as sent in `welcome.gateway` and recorded in journeys.
    pub gateway_id: String,
    /// HS256 auth: the secret and the rules on tokens' claims (`iss`, `aud`, longest
    /// lifetime); `None` is dev mode (`hello` takes any valid user name).
    pub jwt_secret: Option<Arc<JwtAuth>>,
    /// Browser origins (`https://chat.example.com`) allowed to open WebSockets; empty: any.
    /// A request without an `Origin` header (not a browser) is not affected.
    pub allowed_origins: Vec<String>,
    /// Bearer token for `/admin/*`; `None` turns the admin API off.
    pub admin_token: Option<String>,
    /// Limits on what clients may do.
    pub limits: Limits,
    /// How long a drain waits for connections to finish before giving up on them.
    pub drain_grace: Duration,
    /// Whether a gateway fills gaps in a room feed from the store (off only for exercises).
    pub gap_repair: bool,
    /// How long a send may wait for a worker before the client is told `unavailable`.
    pub submit_timeout: Duration,
    /// How often each room hub tells other gateways who is here (presence across gateways);
    /// a gateway silent for 3 periods has its users marked offline.
    pub roster_interval: Duration,
    /// Recording of clients' traffic (`--record DIR`); `None`: not set up.
    pub record: Option<crate::recorder::RecordConfig>,
}

impl GatewayConfig {
    /// Default `drain_grace`, in seconds (`--drain-grace-secs`).
    pub const DEFAULT_DRAIN_GRACE_SECS: u64 = 10;
    /// Default `submit_timeout`, in seconds.
    pub const DEFAULT_SUBMIT_TIMEOUT_SECS: u64 = 5;
    /// Default `roster_interval`, in milliseconds (`--roster-interval-ms`).
    pub const DEFAULT_ROSTER_INTERVAL_MS: u64 = 6_000;
    /// Shortest `roster_interval` the command line accepts, in milliseconds.
    pub const MIN_ROSTER_INTERVAL_MS: u64 = 100;
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            gateway_id: format!("gw-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
            jwt_secret: None,
            allowed_origins: Vec::new(),
            admin_token: None,
            limits: Limits::default(),
            drain_grace: Duration::from_secs(Self::DEFAULT_DRAIN_GRACE_SECS),
            gap_repair: true,
            submit_timeout: Duration::from_secs(Self::DEFAULT_SUBMIT_TIMEOUT_SECS),
            roster_interval: Duration::from_millis(Self::DEFAULT_ROSTER_INTERVAL_MS),
            record: None,
        }
    }
}

/// Per-connection and per-process limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest text frame answered normally; larger ones get `error` `too_large`.
    pub max_frame_bytes: usize,
    /// Largest message body, in characters.
    pub max_body_chars: usize,
    /// Rooms one connection may have joined at once.
    pub max_rooms_per_connection: usize,
    /// Open WebSocket connections per process; more are refused with HTTP 503.
    pub max_connections: usize,
    /// Client sockets not (yet) upgraded to WebSockets, on top of `max_connections`; more are
    /// answered 503 at once.
    pub max_pending_connections: usize,
    /// Client sockets from one IP address at once (upgraded or not); 0: no cap.
    pub max_connections_per_ip: usize,
    /// Connections of one user at once (counted from `hello`); 0: no cap.
    pub max_connections_per_user: usize,
    /// A socket must send its HTTP request headers within this, or it is closed.
    pub header_read_timeout: Duration,
    /// Sustained `send` + `typing` frames per second per connection.
    pub send_rate_per_sec: u32,
    /// Burst allowance above the sustained rate.
    pub send_burst: u32,
    /// Sustained `join` + `leave` + `history` frames per second per connection.
    pub control_rate_per_sec: u32,
    /// Burst allowance above that (a reconnecting client rejoins all its rooms at once).
    pub control_burst: u32,
    /// Sends of one connection waiting for their ack at once; reading pauses beyond it.
    pub max_in_flight_sends: usize,
    /// Sends of the whole process waiting for their answer at once; more are answered
    /// `unavailable` at once, unpublished (load shedding). 0: no cap.
    pub max_sends_in_flight: usize,
    /// Frames queued for one connection. When full, deliveries to it are skipped and later
    /// recovered from the store; see `slow_consumer_timeout`.
    pub outbound_queue: usize,
    /// A connection whose queue stays full this long is closed with code 4008.
    pub slow_consumer_timeout: Duration,
    /// Time allowed between connecting and a successful `hello`.
    pub hello_timeout: Duration,
    /// Interval of server WebSocket pings; a connection silent for 3 intervals is closed.
    pub ping_interval: Duration,
    /// WebSocket read buffer per connection, in bytes: allocated for the connection's whole
    /// life, so it is kept small (frames larger than it are read in several reads).
    pub ws_read_buffer_bytes: usize,
    /// Bytes of frames gathered before a socket write; grown only while writing.
    pub ws_write_buffer_bytes: usize,
}

impl Limits {
    /// Default `max_frame_bytes` (`--max-frame-bytes`).
    pub const DEFAULT_MAX_FRAME_BYTES: usize = 64 * 1024;
    /// Default `max_body_chars` (`--max-body-chars`).
    pub const DEFAULT_MAX_BODY_CHARS: usize = 4_000;
    /// Default `max_rooms_per_connection` (`--max-rooms-per-connection`).
    pub const DEFAULT_MAX_ROOMS_PER_CONNECTION: usize = 100;
    /// Default `max_connections` (`--max-connections`).
    pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
    /// Default `max_pending_connections` (`--max-pending-connections`).
    pub const DEFAULT_MAX_PENDING_CONNECTIONS: usize = 1_024;
    /// Default `max_connections_per_ip` (`--max-connections-per-ip`): no cap, since load tests
    /// and proxies bring many sockets from one address; set it for direct exposure.
    pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 0;
    /// Default `max_connections_per_user` (`--max-connections-per-user`): tabs and devices of
    /// one person, not thousands.
    pub const DEFAULT_MAX_CONNECTIONS_PER_USER: usize = 64;
    /// Default `header_read_timeout`, in milliseconds (`--header-read-timeout-ms`).
    pub const DEFAULT_HEADER_READ_TIMEOUT_MS: u64 = 10_000;
    /// Default `send_rate_per_sec` (`--send-rate`).
    pub const DEFAULT_SEND_RATE_PER_SEC: u32 = 20;
    /// Default `send_burst` (`--send-burst`).
    pub const DEFAULT_SEND_BURST: u32 = 50;
    /// Default `control_rate_per_sec` (`--control-rate`).
    pub const DEFAULT_CONTROL_RATE_PER_SEC: u32 = 10;
    /// Default `control_burst` (`--control-burst`): a client rejoining its rooms after a
    /// reconnect (at most `max_rooms_per_connection`) and reading a page of each.
    pub const DEFAULT_CONTROL_BURST: u32 = 200;
    /// Default `max_sends_in_flight` (`--max-sends-in-flight`). Measured on the local cluster
    /// (docs/benchmarks.md): 1,024 shed a fifth of 4,000 sends/s, which the cluster serves in
    /// full; 4,096 serves them and, under 8,000/s, still answers every send within its deadline.
    pub const DEFAULT_MAX_SENDS_IN_FLIGHT: usize = 4_096;
    /// Default `outbound_queue` (`--outbound-queue`).
    pub const DEFAULT_OUTBOUND_QUEUE: usize = 1_024;
    /// Default `slow_consumer_timeout`, in seconds (`--slow-consumer-secs`).
    pub const DEFAULT_SLOW_CONSUMER_SECS: u64 = 5;
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: Self::DEFAULT_MAX_FRAME_BYTES,
            max_body_chars: Self::DEFAULT_MAX_BODY_CHARS,
            max_rooms_per_connection: Self::DEFAULT_MAX_ROOMS_PER_CONNECTION,
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
            max_pending_connections: Self::DEFAULT_MAX_PENDING_CONNECTIONS,
            max_connections_per_ip: Self::DEFAULT_MAX_CONNECTIONS_PER_IP,
            max_connections_per_user: Self::DEFAULT_MAX_CONNECTIONS_PER_USER,
            header_read_timeout: Duration::from_millis(Self::DEFAULT_HEADER_READ_TIMEOUT_MS),
            send_rate_per_sec: Self::DEFAULT_SEND_RATE_PER_SEC,
            send_burst: Self::DEFAULT_SEND_BURST,
            control_rate_per_sec: Self::DEFAULT_CONTROL_RATE_PER_SEC,
            control_burst: Self::DEFAULT_CONTROL_BURST,
            max_in_flight_sends: 64,
            max_sends_in_flight: Self::DEFAULT_MAX_SENDS_IN_FLIGHT,
            outbound_queue: Self::DEFAULT_OUTBOUND_QUEUE,
            slow_consumer_timeout: Duration::from_secs(Self::DEFAULT_SLOW_CONSUMER_SECS),
            hello_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(30),
            // A send with a 64-byte body is about 150 bytes, a `hello` with a token 300-500.
            ws_read_buffer_bytes: 512,
            ws_write_buffer_bytes: 16 * 1024,
        }
    }
}
