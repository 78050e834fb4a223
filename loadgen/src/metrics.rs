//! Measurements: HDR histograms of every latency, counters per second, errors by code.
//!
//! Client tasks record into a few mutex-guarded shards (picked by client number, so two cores
//! rarely contend); once a second the [`Collector`] swaps every shard's window out, merges it
//! into the run totals and appends one [`Second`] to the timeline. All latencies are in
//! microseconds; histograms keep 3 significant digits from 1 µs to 1 h.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use hdrhistogram::Histogram;
use serde::Serialize;

/// The run clock: microseconds since the run began.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
}

impl Clock {
    /// A clock starting now.
    pub fn new() -> Self {
        Self { start: Instant::now() }
    }
    /// Microseconds since the start.
    pub fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }
    /// The `Instant` of a run-clock reading.
    pub fn instant(&self, us: u64) -> Instant {
        self.start + std::time::Duration::from_micros(us)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// The latencies loadgen measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lat {
    /// TCP connect + WebSocket handshake + `hello` → `welcome`.
    Connect = 0,
    /// `join` → `joined`.
    Join,
    /// Scheduled send instant → `ack`.
    Ack,
    /// Scheduled send instant → `message` at each recipient (end to end).
    E2e,
    /// `history` → answer.
    History,
    /// Connection lost → every room rejoined.
    Reconnect,
    /// Scheduled send instant → written by loadgen (loadgen's own lag).
    Lag,
}

/// Number of [`Lat`] kinds.
pub const LAT_KINDS: usize = 7;

impl Lat {
    /// Every kind, in index order.
    pub const ALL: [Lat; LAT_KINDS] =
        [Lat::Connect, Lat::Join, Lat::Ack, Lat::E2e, Lat::History, Lat::Reconnect, Lat::Lag];

    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Lat::Connect => "connect",
            Lat::Join => "join",
            Lat::Ack => "send_to_ack",
            Lat::E2e => "send_to_delivery",
            Lat::History => "history",
            Lat::Reconnect => "reconnect",
            Lat::Lag => "schedule_lag",
        }
    }
}

/// A histogram for microsecond latencies, 1 µs to 1 h, 3 significant digits.
pub fn new_hist() -> Histogram<u64> {
    // Constant, valid bounds: creation cannot fail.
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// What one shard gathered since the last collection.
#[derive(Debug)]
pub struct Window {
    hists: Vec<Histogram<u64>>,
    /// Sends written.
    pub sent: u64,
    /// Acks received.
    pub acked: u64,
    /// First deliveries of this run's messages.
    pub delivered: u64,
    /// Message frames checked (all of them, duplicates and other senders' included).
    pub checked: u64,
    /// Error frames and local errors.
    pub errors: u64,
}

impl Window {
    fn new() -> Self {
        Self {
            hists: (0..LAT_KINDS).map(|_| new_hist()).collect(),
            sent: 0,
            acked: 0,
            delivered: 0,
            checked: 0,
            errors: 0,
        }
    }
    /// Records one latency in microseconds.
    pub fn record(&mut self, lat: Lat, us: u64) {
        self.hists[lat as usize].saturating_record(us.max(1));
    }
}

/// Everything clients record into.
#[derive(Debug)]
pub struct Metrics {
    shards: Vec<Mutex<Window>>,
    errors: Mutex<BTreeMap<String, u64>>,
    reconnect_causes: Mutex<BTreeMap<String, u64>>,
    /// Connections currently up (welcome received).
    pub connected: AtomicI64,
    /// Clients currently between a lost connection and their rejoin.
    pub reconnecting: AtomicI64,
    /// Reconnects started.
    pub reconnects: AtomicU64,
    /// Message frames for rooms the connection had not joined.
    pub stray: AtomicU64,
}

impl Metrics {
    /// Metrics with `shards` shards (at least one).
    pub fn new(shards: usize) -> Self {
        Self {
            shards: (0..shards.max(1)).map(|_| Mutex::new(Window::new())).collect(),
            errors: Mutex::new(BTreeMap::new()),
            reconnect_causes: Mutex::new(BTreeMap::new()),
            connected: AtomicI64::new(0),
            reconnecting: AtomicI64::new(0),
            reconnects: AtomicU64::new(0),
            stray: AtomicU64::new(0),
        }
    }

    /// The shard of client `key`, locked.
    pub fn shard(&self, key: u32) -> MutexGuard<'_, Window> {
        let m = &self.shards[key as usize % self.shards.len()];
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts an error by code (`rate_limited`, `connect_refused`, `loadgen_backlog`, ...).
    pub fn error(&self, key: u32, code: &str) {
        self.shard(key).errors += 1;
        let mut map = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry(code.to_string()).or_default() += 1;
    }

    /// Counts a reconnect by cause.
    pub fn reconnect(&self, cause: &str) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
        let mut map = self.reconnect_causes.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry(cause.to_string()).or_default() += 1;
    }

    /// Errors by code so far.
    pub fn errors(&self) -> BTreeMap<String, u64> {
        self.errors.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reconnects by cause so far.
    pub fn reconnect_causes(&self) -> BTreeMap<String, u64> {
        self.reconnect_causes.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// One point of the timeline.
#[derive(Debug, Clone, Serialize)]
pub struct Second {
    /// End of the interval, seconds since the measured phase began (negative while ramping).
    pub t: f64,
    /// Length of the interval in seconds.
    pub dt: f64,
    /// Sends written in the interval.
    pub sent: u64,
    /// Acks received.
    pub acked: u64,
    /// First deliveries of this run's messages.
    pub delivered: u64,
    /// Errors.
    pub errors: u64,
    /// Send → delivery median, ms.
    pub e2e_p50_ms: f64,
    /// Send → delivery 99th percentile, ms.
    pub e2e_p99_ms: f64,
    /// Send → delivery maximum, ms.
    pub e2e_max_ms: f64,
    /// Send → ack 99th percentile, ms.
    pub ack_p99_ms: f64,
    /// Connections up at the end of the interval.
    pub connected: i64,
}

/// Merges shard windows into totals and the timeline.
#[derive(Debug)]
pub struct Collector {
    totals: Vec<Histogram<u64>>,
    /// One entry per collection.
    pub timeline: Vec<Second>,
    last_t: Option<f64>,
    /// Sends written in total.
    pub sent: u64,
    /// Acks in total.
    pub acked: u64,
    /// First deliveries in total.
    pub delivered: u64,
    /// Message frames checked in total.
    pub checked: u64,
    /// Errors in total.
    pub errors: u64,
}

impl Default for Collector {
    fn default() -> Self {
        Self::new()
    }
}

impl Collector {
    /// An empty collector.
    pub fn new() -> Self {
        Self {
            totals: (0..LAT_KINDS).map(|_| new_hist()).collect(),
            timeline: Vec::new(),
            last_t: None,
            sent: 0,
            acked: 0,
            delivered: 0,
            checked: 0,
            errors: 0,
        }
    }

    /// Takes every shard's window; `t` is seconds since the measured phase began. The first
    /// call only sets the baseline of the timeline (its counts still go into the totals).
    pub fn collect(&mut self, metrics: &Metrics, t: f64) -> Option<&Second> {
        let mut window = Window::new();
        for shard in &metrics.shards {
            let taken = {
                let mut guard = shard.lock().unwrap_or_else(|p| p.into_inner());
                std::mem::replace(&mut *guard, Window::new())
            };
            for (w, h) in window.hists.iter_mut().zip(&taken.hists) {
                let _ = w.add(h);
            }
            window.sent += taken.sent;
            window.acked += taken.acked;
            window.delivered += taken.delivered;
            window.checked += taken.checked;
            window.errors += taken.errors;
        }
        for (total, h) in self.totals.iter_mut().zip(&window.hists) {
            let _ = total.add(h);
        }
        self.sent += window.sent;
        self.acked += window.acked;
        self.delivered += window.delivered;
        self.checked += window.checked;
        self.errors += window.errors;
        let dt = self.last_t.map(|last| t - last);
        self.last_t = Some(t);
        let dt = dt?;
        let e2e = &window.hists[Lat::E2e as usize];
        let ack = &window.hists[Lat::Ack as usize];
        let ms = |h: &Histogram<u64>, q: f64| if h.is_empty() { 0.0 } else { h.value_at_quantile(q) as f64 / 1000.0 };
        self.timeline.push(Second {
            t,
            dt,
            sent: window.sent,
            acked: window.acked,
            delivered: window.delivered,
            errors: window.errors,
            e2e_p50_ms: ms(e2e, 0.5),
            e2e_p99_ms: ms(e2e, 0.99),
            e2e_max_ms: if e2e.is_empty() { 0.0 } else { e2e.max() as f64 / 1000.0 },
            ack_p99_ms: ms(ack, 0.99),
            connected: metrics.connected.load(Ordering::Relaxed),
        });
        self.timeline.last()
    }

    /// The run total of one latency.
    pub fn total(&self, lat: Lat) -> &Histogram<u64> {
        &self.totals[lat as usize]
    }
}

/// CPU seconds (user + system) this process has used, from `/proc/self/stat` (Linux only).
pub fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start at field 3, `state`.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on every Linux configuration we run on.
    Some((utime + stime) / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collector_merges_shards_and_builds_a_timeline() {
        let m = Metrics::new(4);
        let mut c = Collector::new();
        assert!(c.collect(&m, 0.0).is_none(), "first collection is the baseline");
        for key in 0..8u32 {
            let mut w = m.shard(key);
            w.record(Lat::E2e, 1000 * (key as u64 + 1));
            w.delivered += 1;
            w.sent += 1;
        }
        m.error(3, "rate_limited");
        let s = c.collect(&m, 1.0).cloned().unwrap();
        assert_eq!((s.sent, s.delivered, s.errors), (8, 8, 1));
        assert!((s.e2e_max_ms - 8.0).abs() < 0.01, "{}", s.e2e_max_ms);
        assert!((s.e2e_p50_ms - 4.0).abs() < 0.01, "{}", s.e2e_p50_ms);
        let s = c.collect(&m, 2.0).cloned().unwrap();
        assert_eq!(s.delivered, 0, "windows are emptied by each collection");
        assert_eq!(c.total(Lat::E2e).len(), 8);
        assert_eq!(m.errors().get("rate_limited"), Some(&1));
    }

    #[test]
    fn cpu_time_is_readable_here() {
        let a = process_cpu_seconds().unwrap();
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        std::hint::black_box(x);
        assert!(process_cpu_seconds().unwrap() >= a);
    }
}
