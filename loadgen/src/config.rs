//! Run configuration: the command line (clap, every flag also an `LOADGEN_*` environment
//! variable), merged over an optional scenario file, merged over defaults.
//!
//! Precedence is flag > scenario file > default. [`Config`] is the validated result that
//! [`crate::run`] takes; tests build it directly with struct-update syntax over
//! `Config::default()`.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

use crate::replay::Recording;
use crate::scenario::{ReconnectSpec, Scenario};
use crate::schedule::Phase;

/// A configuration that cannot be used, with what to change.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A flag or scenario value is malformed or out of range.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// Which flag or field.
        what: &'static str,
        /// What is wrong and what would be accepted.
        reason: String,
    },
    /// The `--replay` recording could not be read or holds nothing to replay.
    #[error("--replay: {0}")]
    Replay(#[from] crate::replay::ReplayError),
    /// The scenario file could not be read or parsed.
    #[error("scenario {path}: {reason}")]
    Scenario {
        /// The file.
        path: PathBuf,
        /// The I/O or TOML error.
        reason: String,
    },
}

fn invalid(what: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { what, reason: reason.into() }
}

/// How clients are spread over rooms.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RoomDist {
    /// Every room gets the same number of members (±1).
    Uniform,
    /// Room k (from 1) gets members in proportion to 1/k^s: a few rooms are huge.
    Zipf {
        /// The exponent; 1.0 is classic Zipf, larger is more skewed.
        s: f64,
    },
}

impl std::str::FromStr for RoomDist {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text.split_once(':') {
            None if text == "uniform" => Ok(Self::Uniform),
            None if text == "zipf" => Ok(Self::Zipf { s: 1.0 }),
            Some(("zipf", s)) => match s.parse::<f64>() {
                Ok(s) if s.is_finite() && s > 0.0 => Ok(Self::Zipf { s }),
                _ => Err(format!("zipf exponent `{s}` must be a positive number, e.g. zipf:1.2")),
            },
            _ => Err(format!("`{text}`: use `uniform`, `zipf` or `zipf:S` (e.g. zipf:1.2)")),
        }
    }
}

/// Message body sizes in bytes: fixed, or uniform in an inclusive range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BodySize {
    /// Smallest body.
    pub min: usize,
    /// Largest body.
    pub max: usize,
}

/// Largest body loadgen will generate; the gateway's default frame limit is 64 KiB.
pub const MAX_BODY_BYTES: usize = 60 * 1024;

impl std::str::FromStr for BodySize {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let parse = |s: &str| s.trim().parse::<usize>().map_err(|_| format!("`{s}` is not a byte count"));
        let (min, max) = match text.split_once('-') {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => {
                let n = parse(text)?;
                (n, n)
            }
        };
        if min == 0 || min > max || max > MAX_BODY_BYTES {
            return Err(format!("`{text}`: need 1 <= MIN <= MAX <= {MAX_BODY_BYTES}, e.g. 100 or 50-500"));
        }
        Ok(Self { min, max })
    }
}

/// Parses `10s`, `2m`, `1m30s`, `500ms`, `1h` or a bare number of seconds (`1.5`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<f64>() {
        return duration_from_secs(secs, text);
    }
    let mut total = 0.0f64;
    let mut rest = text;
    if rest.is_empty() {
        return Err("empty duration; use e.g. 10s, 2m, 500ms".into());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let (num, tail) = rest.split_at(digits);
        let unit_len = tail.find(|c: char| c.is_ascii_digit()).unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let value: f64 = num.parse().map_err(|_| format!("`{text}`: expected a number before `{unit}`"))?;
        let factor = match unit {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(format!("`{text}`: unknown unit `{unit}`; use ms, s, m or h")),
        };
        total += value * factor;
        rest = tail;
    }
    duration_from_secs(total, text)
}

fn duration_from_secs(secs: f64, text: &str) -> Result<Duration, String> {
    if secs.is_finite() && (0.0..1e7).contains(&secs) {
        Ok(Duration::from_secs_f64(secs))
    } else {
        Err(format!("`{text}` is not a duration between 0 and 10^7 seconds"))
    }
}

/// Parses `127.0.0.1-127.0.0.8`, `127.0.0.1,127.0.0.2`, or a mix (`10.0.0.1,127.0.0.2-127.0.0.4`).
pub fn parse_source_ips(text: &str) -> Result<Vec<IpAddr>, String> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let a: Ipv4Addr = a.trim().parse().map_err(|_| format!("`{a}` is not an IPv4 address"))?;
                let b: Ipv4Addr = b.trim().parse().map_err(|_| format!("`{b}` is not an IPv4 address"))?;
                let (a, b) = (u32::from(a), u32::from(b));
                if a > b || b - a >= 65_536 {
                    return Err(format!("`{part}`: the range must go upwards and hold at most 65536 addresses"));
                }
                out.extend((a..=b).map(|n| IpAddr::V4(Ipv4Addr::from(n))));
            }
            None => out.push(part.parse().map_err(|_| format!("`{part}` is not an IP address"))?),
        }
    }
    if out.is_empty() {
        return Err("no address given; e.g. 127.0.0.1-127.0.0.8".into());
    }
    Ok(out)
}

/// The addresses of one `--source-ips` value. A type of its own: clap reads an `Option<Vec<_>>`
/// field as a repeated flag of single addresses, and panicked on the list this parser returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceIps(pub Vec<IpAddr>);

impl SourceIps {
    /// Parses a `--source-ips` value (see [`parse_source_ips`]).
    pub fn parse(text: &str) -> Result<Self, String> {
        parse_source_ips(text).map(Self)
    }
}

/// What to do with the live progress line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum ProgressMode {
    /// Print it when stderr is a terminal.
    #[default]
    Auto,
    /// Always print it (one line per second when stderr is not a terminal).
    Always,
    /// Never print it.
    Never,
}

/// Which server protocol the clients speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// Chat protocol v1 (docs/protocol.md): `hello`, `join`, `send`, audited by seq.
    #[default]
    Chat,
    /// Centrifugo's client protocol v2 in JSON (`connect`, `subscribe`, `publish`, `push.pub`),
    /// for comparisons (deploy/bench/vs-centrifugo); a room is a channel. Deliveries are
    /// audited by count per member (missing, duplicate), not by order: see [`crate::centrifugo`].
    Centrifugo,
}

/// Serializes durations as seconds (a float) in reports.
pub(crate) mod secs {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub mod opt {
        use std::time::Duration;

        pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => s.serialize_some(&d.as_secs_f64()),
                None => s.serialize_none(),
            }
        }
    }
}

/// Scenario-driven disconnects: clients drop their connection and come back.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ReconnectPlan {
    /// First storm, from the start of the measured phase.
    #[serde(with = "secs")]
    pub at: Duration,
    /// Repeat period; `None` for a single storm.
    #[serde(with = "secs::opt")]
    pub every: Option<Duration>,
    /// Fraction of clients dropped in each storm (0..=1).
    pub fraction: f64,
    /// Drops of one storm are spread evenly over this window.
    #[serde(with = "secs")]
    pub spread: Duration,
    /// Rejoin with `since` (resume, audited as continuously joined) or without (a new membership).
    pub resume: bool,
}

/// Everything a run needs. Build it with [`Cli::into_config`] or directly.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Config {
    /// Gateway WebSocket URLs (`ws://host:port/ws`); clients are spread round-robin.
    pub urls: Vec<String>,
    /// The protocol the clients speak.
    pub protocol: Protocol,
    /// Number of simulated clients (one WebSocket connection each).
    pub clients: u32,
    /// Number of rooms.
    pub rooms: u32,
    /// Rooms each client joins.
    pub rooms_per_client: u32,
    /// How members are spread over rooms.
    pub room_dist: RoomDist,
    /// Send-rate phases, run back to back.
    pub phases: Vec<Phase>,
    /// New connections per second while ramping up; 0 connects everyone at once.
    pub ramp: f64,
    /// Body sizes.
    pub body: BodySize,
    /// History reads per second (all clients together).
    pub history_rate: f64,
    /// HS256 secret to mint JWTs with; `None` sends `hello` with a plain user (dev mode).
    #[serde(skip)]
    pub token_secret: Option<String>,
    /// Seed of every random choice (membership, senders, body sizes, drops).
    pub seed: u64,
    /// Local addresses to bind client sockets to, round-robin; empty lets the OS choose.
    pub source_ips: Vec<IpAddr>,
    /// Scenario-driven reconnect storms.
    pub reconnect: Option<ReconnectPlan>,
    /// How long to wait after the last scheduled send for outstanding acks and deliveries.
    #[serde(with = "secs")]
    pub drain: Duration,
    /// Limit for one connect + WebSocket handshake + `welcome`.
    #[serde(with = "secs")]
    pub connect_timeout: Duration,
    /// Prefix of user and room names; unique per run by default so runs never share rooms.
    pub prefix: String,
    /// Prefix of room names when it differs from `prefix`: the run joins rooms another run
    /// (or real users) use, as users of its own (`--room-prefix`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room_prefix: Option<String>,
    /// Per-client queue of scheduled sends waiting for the socket; beyond it a send is dropped
    /// locally and counted as `loadgen_backlog` (a sign loadgen itself is the bottleneck).
    pub queue: usize,
    /// Findings listed per kind in the report (counts are always exact).
    pub max_findings: usize,
    /// Print the live progress line to stderr.
    pub progress: bool,
    /// The scenario's name, when one was used.
    pub scenario: Option<String>,
    /// Message journeys read after the run for per-hop timings (`loadgen compare`); 0 = none.
    pub journeys: usize,
    /// Bearer token for the gateway's `/debug/messages` when it has an admin token.
    #[serde(skip)]
    pub admin_token: Option<String>,
    /// A recording re-driven instead of the seeded plan and schedule (`--replay`); the report
    /// names its directory.
    #[serde(serialize_with = "replay_dir")]
    pub replay: Option<Arc<Recording>>,
    /// Pace of a replay: 2 sends twice as fast as recorded.
    pub replay_speed: f64,
}

fn replay_dir<S: serde::Serializer>(replay: &Option<Arc<Recording>>, s: S) -> Result<S::Ok, S::Error> {
    match replay {
        Some(r) => s.serialize_some(&r.dir),
        None => s.serialize_none(),
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            urls: vec![DEFAULT_URL.to_string()],
            protocol: Protocol::Chat,
            clients: 100,
            rooms: 10,
            rooms_per_client: 1,
            room_dist: RoomDist::Uniform,
            phases: vec![Phase { duration: Duration::from_secs(10), rate: 100.0 }],
            ramp: 500.0,
            body: BodySize { min: 100, max: 100 },
            history_rate: 1.0,
            token_secret: None,
            seed: 1,
            source_ips: Vec::new(),
            reconnect: None,
            drain: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(10),
            prefix: "lg".to_string(),
            room_prefix: None,
            queue: 1024,
            max_findings: 100,
            progress: false,
            scenario: None,
            journeys: DEFAULT_JOURNEYS,
            admin_token: None,
            replay: None,
            replay_speed: 1.0,
        }
    }
}

/// Journeys read after a run by default.
pub const DEFAULT_JOURNEYS: usize = 300;

/// The default gateway URL.
pub const DEFAULT_URL: &str = "ws://127.0.0.1:8080/ws";

impl Config {
    /// Checks ranges and combinations; every problem is reported at once.
    pub fn validate(&self) -> Result<(), Vec<ConfigError>> {
        let mut errors = Vec::new();
        if self.urls.is_empty() {
            errors.push(invalid("--url", "at least one gateway URL is needed"));
        }
        for url in &self.urls {
            if let Err(reason) = crate::client::Target::parse(url) {
                errors.push(invalid("--url", reason));
            }
        }
        if self.clients == 0 {
            errors.push(invalid("--clients", "must be at least 1"));
        }
        if self.rooms == 0 {
            errors.push(invalid("--rooms", "must be at least 1"));
        }
        if self.rooms_per_client == 0 || self.rooms_per_client > self.rooms {
            errors.push(invalid("--rooms-per-client", format!("must be between 1 and --rooms ({})", self.rooms)));
        }
        if self.phases.is_empty() {
            errors.push(invalid("phases", "a run needs at least one phase"));
        }
        for p in &self.phases {
            if !(p.rate.is_finite() && p.rate >= 0.0 && p.rate <= 10_000_000.0) {
                errors.push(invalid("--rate", format!("{} is not between 0 and 10^7", p.rate)));
            }
        }
        if !(self.ramp.is_finite() && self.ramp >= 0.0) {
            errors.push(invalid("--ramp", "must be a non-negative number (0 = all at once)"));
        }
        if !(self.history_rate.is_finite() && self.history_rate >= 0.0) {
            errors.push(invalid("--history-rate", "must be a non-negative number"));
        }
        let names_fit = self.prefix.len() + 12 <= protocol::names::MAX_NAME_LEN;
        if !names_fit || !protocol::names::is_valid_room(&self.prefix) {
            errors.push(invalid(
                "--prefix",
                "use at most 52 characters from A-Z a-z 0-9 _ - (it starts room and user names)",
            ));
        }
        if let Some(rooms) = &self.room_prefix {
            if rooms.len() + 12 > protocol::names::MAX_NAME_LEN || !protocol::names::is_valid_room(rooms) {
                errors.push(invalid("--room-prefix", "use at most 52 characters from A-Z a-z 0-9 _ -"));
            }
        }
        if self.queue == 0 {
            errors.push(invalid("--queue", "must be at least 1"));
        }
        if let Some(r) = &self.reconnect {
            if !(0.0..=1.0).contains(&r.fraction) {
                errors.push(invalid("reconnect.fraction", "must be between 0 and 1"));
            }
            if r.every.is_some_and(|e| e.is_zero()) {
                errors.push(invalid("reconnect.every", "must be longer than 0"));
            }
        }
        if !(self.replay_speed.is_finite() && self.replay_speed > 0.0) {
            errors.push(invalid("--replay-speed", "must be a positive number, e.g. 2 for twice the recorded pace"));
        }
        if self.protocol == Protocol::Centrifugo {
            errors.extend(self.centrifugo_conflicts());
        }
        let scheduled: f64 = self.phases.iter().map(|p| p.rate * p.duration.as_secs_f64()).sum();
        if scheduled > u32::MAX as f64 / 2.0 {
            errors.push(invalid("--rate/--duration", "more than 2^31 sends in one run"));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// What `--protocol centrifugo` cannot do: history reads, resumed reconnects, replays and
    /// journeys are chat protocol features.
    fn centrifugo_conflicts(&self) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        let why = "is a chat protocol feature; --protocol centrifugo cannot use it";
        if self.history_rate > 0.0 {
            errors.push(invalid("--history-rate", format!("{why} (use --history-rate 0)")));
        }
        if self.reconnect.as_ref().is_some_and(|r| r.resume) {
            errors.push(invalid("reconnect.resume", format!("{why} (Centrifugo without history cannot resume)")));
        }
        if self.replay.is_some() {
            errors.push(invalid("--replay", why.to_string()));
        }
        if self.journeys > 0 {
            errors.push(invalid("--journeys", format!("{why} (use --journeys 0)")));
        }
        if self.rooms_per_client >= crate::centrifugo::MAX_SUBSCRIPTIONS {
            errors.push(invalid(
                "--rooms-per-client",
                format!("at most {} with --protocol centrifugo", crate::centrifugo::MAX_SUBSCRIPTIONS - 1),
            ));
        }
        errors
    }

    /// Total length of the measured phase.
    pub fn measure_duration(&self) -> Duration {
        self.phases.iter().map(|p| p.duration).sum()
    }
}

/// The `loadgen` command line.
#[derive(Debug, Parser, Default)]
#[command(
    name = "loadgen",
    version,
    about = "Open-loop load generator for chat protocol v1 that audits every delivery.",
    long_about = "Open-loop load generator for chat protocol v1 that audits every delivery.\n\n\
        Connects --clients WebSocket clients, joins them to rooms, sends --rate messages per \
        second on a fixed schedule (latency is measured from the scheduled instant), and checks \
        that every acked message reached every member that was joined the whole time, exactly \
        once, in seq order, with no gap. Exits 0 when the audit passes, 1 when it finds a fault, \
        2 when the run could not be carried out, 64 on a bad configuration.",
    after_help = "Examples:\n  \
        loadgen --url ws://127.0.0.1:8080/ws --clients 1000 --rooms 100 --rate 2000 --duration 30s\n  \
        loadgen --scenario loadgen/scenarios/reconnect-storm.toml --report out.json --html out.html\n  \
        loadgen --clients 40000 --ramp 5000 --source-ips 127.0.0.1-127.0.0.8 --rate 0 --duration 1m"
)]
pub struct Cli {
    /// Gateway WebSocket URL; repeat to spread clients round-robin over several gateways.
    /// Example: --url ws://127.0.0.1:8080/ws --url ws://127.0.0.1:8081/ws [default: ws://127.0.0.1:8080/ws]
    #[arg(long = "url", env = "LOADGEN_URL", value_delimiter = ',')]
    pub urls: Vec<String>,

    /// Protocol the clients speak: `chat` (protocol v1) or `centrifugo` (Centrifugo's client
    /// protocol v2, JSON, at ws://HOST:PORT/connection/websocket; no history reads or journeys,
    /// deliveries audited by count, not order). Example: --protocol centrifugo [default: chat]
    #[arg(long, env = "LOADGEN_PROTOCOL", value_enum, default_value_t = Protocol::Chat)]
    pub protocol: Protocol,

    /// Number of simulated clients, one WebSocket each. Example: --clients 1000 [default: 100]
    #[arg(long, env = "LOADGEN_CLIENTS")]
    pub clients: Option<u32>,

    /// Number of rooms. Example: --rooms 100 [default: 10]
    #[arg(long, env = "LOADGEN_ROOMS")]
    pub rooms: Option<u32>,

    /// Room-size distribution: `uniform` (equal sizes) or `zipf[:S]` (room k gets 1/k^S of the
    /// members). Example: --room-dist zipf:1.2 [default: uniform]
    #[arg(long, env = "LOADGEN_ROOM_DIST")]
    pub room_dist: Option<RoomDist>,

    /// Rooms each client joins. Example: --rooms-per-client 3 [default: 1]
    #[arg(long, env = "LOADGEN_ROOMS_PER_CLIENT")]
    pub rooms_per_client: Option<u32>,

    /// Total sends per second over all clients, open-loop (the schedule never waits for the
    /// server); 0 sends nothing. Example: --rate 5000 [default: 100]
    #[arg(long, env = "LOADGEN_RATE")]
    pub rate: Option<f64>,

    /// Length of the measured phase: 500ms, 10s, 2m, 1m30s, 1h. Example: --duration 2m [default: 10s]
    #[arg(long, env = "LOADGEN_DURATION", value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// New connections per second while ramping up; 0 connects everyone at once.
    /// Example: --ramp 2000 [default: 500]
    #[arg(long, env = "LOADGEN_RAMP")]
    pub ramp: Option<f64>,

    /// Message body size in bytes, fixed or a uniform range. Example: --body-bytes 50-500 [default: 100]
    #[arg(long, env = "LOADGEN_BODY_BYTES")]
    pub body_bytes: Option<BodySize>,

    /// History reads per second over all clients (measures history read time).
    /// Example: --history-rate 20 [default: 1]
    #[arg(long, env = "LOADGEN_HISTORY_RATE")]
    pub history_rate: Option<f64>,

    /// HS256 secret: mint a JWT per client (sub = user, rooms = its rooms) when auth is on.
    /// Example: --token-secret dev-secret
    #[arg(long, env = "LOADGEN_TOKEN_SECRET", hide_env_values = true)]
    pub token_secret: Option<String>,

    /// Seed of every random choice; the same seed and flags give the same schedule.
    /// Example: --seed 42 [default: random, printed in the report]
    #[arg(long, env = "LOADGEN_SEED")]
    pub seed: Option<u64>,

    /// Local addresses to bind client sockets to, round-robin (each gives ~28k ports on
    /// loopback). Example: --source-ips 127.0.0.1-127.0.0.8
    #[arg(long, env = "LOADGEN_SOURCE_IPS", value_parser = SourceIps::parse)]
    pub source_ips: Option<SourceIps>,

    /// Scenario file (TOML); flags given on the command line override its values.
    /// Example: --scenario loadgen/scenarios/burst.toml
    #[arg(long, env = "LOADGEN_SCENARIO")]
    pub scenario: Option<PathBuf>,

    /// Write every figure and finding as JSON. Example: --report out.json
    #[arg(long, env = "LOADGEN_REPORT")]
    pub report: Option<PathBuf>,

    /// Write an HTML page with latency-over-time, throughput and latency-distribution plots
    /// (inline SVG, no scripts). Example: --html out.html
    #[arg(long, env = "LOADGEN_HTML")]
    pub html: Option<PathBuf>,

    /// Wait up to this long after the last scheduled send for acks and deliveries (the drain
    /// ends as soon as everything is answered and delivered). The default covers the server's
    /// answer bound (every send is answered by its 5 s deadline, docs/protocol.md) with room for
    /// a slow client or gateway, so a send still being answered is not reported as unacked.
    /// Example: --drain 10s [default: 15s]
    #[arg(long, env = "LOADGEN_DRAIN", value_parser = parse_duration)]
    pub drain: Option<Duration>,

    /// Limit for one TCP connect + WebSocket handshake + welcome. Example: --connect-timeout 30s
    /// [default: 10s]
    #[arg(long, env = "LOADGEN_CONNECT_TIMEOUT", value_parser = parse_duration)]
    pub connect_timeout: Option<Duration>,

    /// Prefix of user and room names (`PREFIX-u7`, `PREFIX-r3`). Example: --prefix bench1
    /// [default: `lg` + 6 random hex digits, so runs never share rooms]
    #[arg(long, env = "LOADGEN_PREFIX")]
    pub prefix: Option<String>,

    /// Prefix of room names only (`ROOMS-r3`), so the run joins rooms others use while its
    /// users and client message ids stay its own (from --prefix). Example: --room-prefix lab
    /// [default: --prefix]
    #[arg(long, env = "LOADGEN_ROOM_PREFIX")]
    pub room_prefix: Option<String>,

    /// Per-client queue of scheduled sends waiting for the socket; overflow is counted as
    /// `loadgen_backlog`. Example: --queue 4096 [default: 1024]
    #[arg(long, env = "LOADGEN_QUEUE")]
    pub queue: Option<usize>,

    /// Findings listed per kind in the report and summary; counts are always exact.
    /// Example: --max-findings 1000 [default: 100]
    #[arg(long, env = "LOADGEN_MAX_FINDINGS")]
    pub max_findings: Option<usize>,

    /// Live progress line on stderr: auto (when a terminal), always, never. Example: --progress never
    #[arg(long, env = "LOADGEN_PROGRESS", value_enum, default_value_t = ProgressMode::Auto)]
    pub progress: ProgressMode,

    /// After the run, read this many message journeys (`/debug/messages/{id}`, spread over the
    /// run) from the first gateway and keep their per-hop timings in the report, for
    /// `loadgen compare`; 0 reads none. Example: --journeys 1000 [default: 300]
    #[arg(long, env = "LOADGEN_JOURNEYS")]
    pub journeys: Option<usize>,

    /// The gateway's admin token, sent as a bearer token when reading journeys (needed when
    /// the gateway has one). Example: --admin-token "$CHAT_ADMIN_TOKEN"
    #[arg(long, env = "LOADGEN_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// Re-drive a gateway recording (`chat --record DIR`): one client per recorded connection,
    /// the recorded users, rooms and sends at their recorded instants; not with --clients,
    /// --rooms, --rate, --duration or other flags that shape the load. Example: --replay rec/
    #[arg(long, env = "LOADGEN_REPLAY", value_name = "DIR")]
    pub replay: Option<PathBuf>,

    /// With --replay: pace relative to the recording (2 = twice as fast). Example:
    /// --replay-speed 2 [default: 1]
    #[arg(long, env = "LOADGEN_REPLAY_SPEED", value_name = "X")]
    pub replay_speed: Option<f64>,

    /// Instead of a run, measure the auditor alone on N synthetic deliveries and print its CPU
    /// cost per 100k deliveries/s. Example: --bench-audit 5000000
    #[arg(long, value_name = "N")]
    pub bench_audit: Option<u64>,
}

impl Cli {
    /// Merges flags over the scenario file (if any) over defaults, then validates.
    pub fn into_config(self, stderr_is_terminal: bool) -> Result<Config, Vec<ConfigError>> {
        let scenario = match &self.scenario {
            Some(path) => Some(Scenario::load(path).map_err(|e| vec![e])?),
            None => None,
        };
        let mut errors = Vec::new();
        let replay = self.load_replay(&mut errors);
        let d = Config::default();
        let sc = scenario.as_ref();
        let pick = |cli: Option<f64>, sc: Option<f64>, d: f64| cli.or(sc).unwrap_or(d);
        // History reads and journeys are chat protocol features: off by default for Centrifugo
        // (given values are refused by `validate`).
        let chat = self.protocol == Protocol::Chat;
        let (history_default, journeys_default) = if chat { (d.history_rate, d.journeys) } else { (0.0, 0) };

        let room_dist = match (self.room_dist, sc.and_then(|s| s.room_dist.as_deref())) {
            (Some(r), _) => r,
            (None, Some(text)) => text.parse().unwrap_or_else(|e| {
                errors.push(invalid("room_dist", e));
                d.room_dist
            }),
            (None, None) => d.room_dist,
        };
        let body = match (self.body_bytes, sc.and_then(|s| s.body_bytes.as_ref())) {
            (Some(b), _) => b,
            (None, Some(spec)) => spec.to_body_size().unwrap_or_else(|e| {
                errors.push(invalid("body_bytes", e));
                d.body
            }),
            (None, None) => d.body,
        };
        let sc_phases = match sc.map(Scenario::phases).transpose() {
            Ok(p) => p.unwrap_or_default(),
            Err(e) => {
                errors.push(e);
                Vec::new()
            }
        };
        let phases = if self.rate.is_some() || self.duration.is_some() || sc_phases.is_empty() {
            let rate = self.rate.or(sc_phases.first().map(|p| p.rate)).unwrap_or(d.phases[0].rate);
            let total: Duration = sc_phases.iter().map(|p| p.duration).sum();
            let duration = self.duration.or((!sc_phases.is_empty()).then_some(total)).unwrap_or(d.phases[0].duration);
            vec![Phase { duration, rate }]
        } else {
            sc_phases
        };
        let reconnect = match sc.and_then(|s| s.reconnect.as_ref()).map(ReconnectSpec::to_plan) {
            Some(Ok(p)) => Some(p),
            Some(Err(e)) => {
                errors.push(e);
                None
            }
            None => None,
        };
        let drain = match (self.drain, sc.and_then(|s| s.drain.as_deref())) {
            (Some(v), _) => v,
            (None, Some(text)) => parse_duration(text).unwrap_or_else(|e| {
                errors.push(invalid("drain", e));
                d.drain
            }),
            (None, None) => d.drain,
        };
        let seed = self.seed.or(sc.and_then(|s| s.seed)).unwrap_or_else(random_u64);
        let config = Config {
            urls: if self.urls.is_empty() { d.urls.clone() } else { self.urls },
            protocol: self.protocol,
            clients: self.clients.or(sc.and_then(|s| s.clients)).unwrap_or(d.clients),
            rooms: self.rooms.or(sc.and_then(|s| s.rooms)).unwrap_or(d.rooms),
            rooms_per_client: self
                .rooms_per_client
                .or(sc.and_then(|s| s.rooms_per_client))
                .unwrap_or(d.rooms_per_client),
            room_dist,
            phases,
            ramp: pick(self.ramp, sc.and_then(|s| s.ramp), d.ramp),
            body,
            history_rate: pick(self.history_rate, sc.and_then(|s| s.history_rate), history_default),
            token_secret: self.token_secret,
            seed,
            source_ips: self.source_ips.map(|ips| ips.0).unwrap_or_default(),
            reconnect,
            drain,
            connect_timeout: self.connect_timeout.unwrap_or(d.connect_timeout),
            prefix: self.prefix.unwrap_or_else(|| format!("lg{:06x}", random_u64() & 0xff_ffff)),
            room_prefix: self.room_prefix,
            queue: self.queue.unwrap_or(d.queue),
            max_findings: self.max_findings.unwrap_or(d.max_findings),
            progress: match self.progress {
                ProgressMode::Auto => stderr_is_terminal,
                ProgressMode::Always => true,
                ProgressMode::Never => false,
            },
            scenario: sc.map(|s| {
                s.name
                    .clone()
                    .unwrap_or_else(|| self.scenario.as_ref().map(|p| p.display().to_string()).unwrap_or_default())
            }),
            journeys: self.journeys.unwrap_or(journeys_default),
            admin_token: self.admin_token,
            replay: None,
            replay_speed: self.replay_speed.unwrap_or(d.replay_speed),
        };
        let config = match replay {
            Some(recording) => config.replaying(recording),
            None => config,
        };
        if let Err(mut more) = config.validate() {
            errors.append(&mut more);
        }
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(errors)
        }
    }
}

impl Cli {
    /// Reads the `--replay` recording, refusing flags that would reshape it.
    fn load_replay(&self, errors: &mut Vec<ConfigError>) -> Option<Recording> {
        let Some(dir) = &self.replay else {
            if self.replay_speed.is_some() {
                errors.push(invalid("--replay-speed", "only means something with --replay DIR"));
            }
            return None;
        };
        let given = [
            ("--clients", self.clients.is_some()),
            ("--rooms", self.rooms.is_some()),
            ("--rooms-per-client", self.rooms_per_client.is_some()),
            ("--room-dist", self.room_dist.is_some()),
            ("--rate", self.rate.is_some()),
            ("--duration", self.duration.is_some()),
            ("--history-rate", self.history_rate.is_some()),
            ("--body-bytes", self.body_bytes.is_some()),
            ("--scenario", self.scenario.is_some()),
        ];
        for (flag, _) in given.iter().filter(|(_, given)| *given) {
            errors.push(ConfigError::Invalid {
                what: flag,
                reason: format!(
                    "cannot be used with --replay: the recording fixes the clients, rooms, sends and \
                     their timing (use --replay-speed to change the pace); drop {flag}"
                ),
            });
        }
        match Recording::load(dir) {
            Ok(r) => Some(r),
            Err(e) => {
                errors.push(ConfigError::Replay(e));
                None
            }
        }
    }
}

impl Config {
    /// This configuration re-driving `recording`: its clients, rooms and sends replace the
    /// seeded plan; no history reads or reconnect storms; one idle phase as long as the
    /// replayed schedule.
    pub fn replaying(mut self, recording: Recording) -> Self {
        let last = recording.sends.last().map_or(0, |s| s.at_us);
        self.clients = recording.users.len() as u32;
        self.rooms = recording.rooms.len() as u32;
        self.rooms_per_client = recording.client_rooms.iter().map(Vec::len).max().unwrap_or(1).max(1) as u32;
        let span = Duration::from_micros((last as f64 / self.replay_speed.max(1e-9)).round() as u64);
        self.phases = vec![Phase { duration: span + Duration::from_millis(1), rate: 0.0 }];
        self.history_rate = 0.0;
        self.reconnect = None;
        self.scenario = None;
        let max = recording.max_body().clamp(1, MAX_FRAME_BODY);
        self.body = BodySize { min: max, max };
        self.replay = Some(Arc::new(recording));
        self
    }
}

/// Largest body a replay generates (the gateway's default frame limit).
const MAX_FRAME_BODY: usize = 64 * 1024;

/// A seed nobody chose: time and process id mixed through splitmix64.
fn random_u64() -> u64 {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let mut z = nanos ^ ((std::process::id() as u64) << 32);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    // 53 bits, so the seed survives JSON readers that use doubles.
    (z ^ (z >> 31)) >> 11
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("10x").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("-1").is_err());
    }

    #[test]
    fn source_ip_ranges() {
        let ips = parse_source_ips("127.0.0.1-127.0.0.8").unwrap();
        assert_eq!(ips.len(), 8);
        assert_eq!(ips[7], "127.0.0.8".parse::<IpAddr>().unwrap());
        let ips = parse_source_ips("127.0.0.1, 127.0.1.255-127.0.2.1").unwrap();
        assert_eq!(ips.len(), 4);
        assert!(parse_source_ips("127.0.0.8-127.0.0.1").is_err());
        assert!(parse_source_ips("nope").is_err());
        assert!(parse_source_ips("").is_err());
    }

    #[test]
    fn body_sizes_and_dists() {
        assert_eq!("100".parse::<BodySize>(), Ok(BodySize { min: 100, max: 100 }));
        assert_eq!("50-500".parse::<BodySize>(), Ok(BodySize { min: 50, max: 500 }));
        assert!("0".parse::<BodySize>().is_err());
        assert!("500-50".parse::<BodySize>().is_err());
        assert!("100000".parse::<BodySize>().is_err());
        assert_eq!("zipf".parse::<RoomDist>(), Ok(RoomDist::Zipf { s: 1.0 }));
        assert_eq!("zipf:1.5".parse::<RoomDist>(), Ok(RoomDist::Zipf { s: 1.5 }));
        assert_eq!("uniform".parse::<RoomDist>(), Ok(RoomDist::Uniform));
        assert!("zipf:-1".parse::<RoomDist>().is_err());
        assert!("gauss".parse::<RoomDist>().is_err());
    }

    #[test]
    fn flags_override_defaults_and_all_errors_are_reported() {
        let cli = Cli::try_parse_from([
            "loadgen",
            "--clients",
            "7",
            "--rate",
            "3",
            "--duration",
            "2s",
            "--seed",
            "9",
            "--url",
            "ws://a:1/ws,ws://b:2/ws",
            "--prefix",
            "t1",
            "--source-ips",
            "127.0.1.1-127.0.1.3",
        ])
        .unwrap();
        let c = cli.into_config(false).unwrap();
        assert_eq!(c.clients, 7);
        assert_eq!(c.urls.len(), 2);
        assert_eq!(c.source_ips, parse_source_ips("127.0.1.1,127.0.1.2,127.0.1.3").unwrap());
        assert_eq!(c.phases, vec![Phase { duration: Duration::from_secs(2), rate: 3.0 }]);
        assert_eq!(c.seed, 9);
        assert!(!c.progress);

        let cli = Cli::try_parse_from([
            "loadgen",
            "--clients",
            "0",
            "--rooms",
            "2",
            "--rooms-per-client",
            "3",
            "--url",
            "http://x/ws",
        ])
        .unwrap();
        let errors = cli.into_config(false).unwrap_err();
        assert_eq!(errors.len(), 3, "{errors:?}");
    }

    #[test]
    fn centrifugo_turns_chat_features_off_and_refuses_them_when_given() {
        let cli = Cli::try_parse_from(["loadgen", "--protocol", "centrifugo", "--prefix", "t1"]).unwrap();
        let c = cli.into_config(false).unwrap();
        assert_eq!((c.protocol, c.history_rate, c.journeys), (Protocol::Centrifugo, 0.0, 0));
        let cli =
            Cli::try_parse_from(["loadgen", "--protocol", "centrifugo", "--history-rate", "2", "--journeys", "10"])
                .unwrap();
        let errors = cli.into_config(false).unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
    }

    #[test]
    fn help_mentions_every_flag_with_an_example() {
        use clap::CommandFactory;
        let cmd = Cli::command();
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if matches!(id, "help" | "version") {
                continue;
            }
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            assert!(help.contains("Example:"), "--{id} has no example: {help}");
        }
    }
}
