//! Measurements: HDR histograms of every latency, counters per second, errors by code.
//!
//! Client tasks record into a few mutex-guarded shards (picked by client number, so two cores
//! rarely contend); once a second the [`Collector`] swaps every shard's window out, merges it
//! into the run totals and appends one [`Second`] to the timeline. All latencies are in
//! microseconds; histograms keep 3 significant digits from 1 µs to 1 h.
//!
//! Send→delivery and send→ack are also kept as uniform random samples of the raw values
//! ([`Reservoir`], at most [`SAMPLE_CAP`] per shard, merged into one sample of that size at the
//! end): `loadgen compare` tests two runs' distributions on them, which percentiles alone do not
//! allow.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

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
    /// Scheduled send instant → the `error` refusing it (`unavailable`, `rate_limited`, ...).
    Refusal,
}

/// Number of [`Lat`] kinds.
pub const LAT_KINDS: usize = 8;

impl Lat {
    /// Every kind, in index order.
    pub const ALL: [Lat; LAT_KINDS] =
        [Lat::Connect, Lat::Join, Lat::Ack, Lat::E2e, Lat::History, Lat::Reconnect, Lat::Lag, Lat::Refusal];

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
            Lat::Refusal => "send_to_refusal",
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
    /// Run-long samples of the [`SAMPLED`] latencies (not emptied by a collection).
    samples: [Reservoir; SAMPLED.len()],
}

impl Window {
    fn new(seed: u64) -> Self {
        Self {
            hists: (0..LAT_KINDS).map(|_| new_hist()).collect(),
            sent: 0,
            acked: 0,
            delivered: 0,
            checked: 0,
            errors: 0,
            samples: std::array::from_fn(|i| Reservoir::new(SAMPLE_CAP, seed.wrapping_mul(31).wrapping_add(i as u64))),
        }
    }
    /// Records one latency in microseconds.
    pub fn record(&mut self, lat: Lat, us: u64) {
        let us = us.max(1);
        self.hists[lat as usize].saturating_record(us);
        if let Some(i) = SAMPLED.iter().position(|&l| l == lat) {
            self.samples[i].offer(us);
        }
    }
}

/// The latencies kept as raw samples as well as histograms.
pub const SAMPLED: [Lat; 2] = [Lat::E2e, Lat::Ack];

/// Most values a latency sample keeps (per shard while the run goes on, and in the report).
pub const SAMPLE_CAP: usize = 2000;

/// A uniform random sample of at most `cap` of the values offered (Vitter's algorithm R): every
/// value offered so far is in it with the same probability.
#[derive(Debug)]
pub struct Reservoir {
    cap: usize,
    seen: u64,
    values: Vec<u64>,
    rng: SmallRng,
}

impl Reservoir {
    /// An empty reservoir of `cap` values whose choices come from `seed`.
    pub fn new(cap: usize, seed: u64) -> Self {
        Self { cap, seen: 0, values: Vec::new(), rng: SmallRng::seed_from_u64(seed) }
    }

    /// Offers one value: kept with probability cap / values offered, replacing a random one.
    pub fn offer(&mut self, v: u64) {
        self.seen += 1;
        if self.values.len() < self.cap {
            self.values.push(v);
        } else {
            let j = self.rng.random_range(0..self.seen);
            if let Some(slot) = self.values.get_mut(j as usize) {
                *slot = v;
            }
        }
    }

    /// Values offered so far.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// The values kept.
    pub fn values(&self) -> &[u64] {
        &self.values
    }
}

/// A uniform random sample of a run's values of one latency, in µs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Values measured in all (the sample is drawn from these).
    pub seen: u64,
    /// At most [`SAMPLE_CAP`] of them, in no particular order.
    pub values: Vec<u64>,
}

impl Sample {
    /// One uniform sample of at most `cap` values out of several reservoirs' streams together.
    ///
    /// Values are drawn without replacement from the union: each draw picks a reservoir with
    /// probability (its values not yet drawn) / (all not yet drawn), then a random value of its
    /// sample not yet taken. Per reservoir, that takes a uniform subset of a uniform subset of
    /// its stream, so the result is a uniform sample of everything offered.
    pub fn merge(parts: &[&Reservoir], cap: usize, seed: u64) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut left: Vec<u64> = parts.iter().map(|r| r.seen).collect();
        let mut pools: Vec<Vec<u64>> = parts.iter().map(|r| r.values.clone()).collect();
        let seen: u64 = left.iter().sum();
        let want = (cap as u64).min(seen);
        let mut values = Vec::with_capacity(want as usize);
        while (values.len() as u64) < want {
            let total: u64 = left.iter().sum();
            let mut pick = rng.random_range(0..total);
            let Some(part) = left.iter().position(|&n| {
                if pick < n {
                    true
                } else {
                    pick -= n;
                    false
                }
            }) else {
                break;
            };
            left[part] -= 1;
            let pool = &mut pools[part];
            if pool.is_empty() {
                // Cannot happen (a part never gives more than `cap` ≥ its sample), but never loop.
                continue;
            }
            let k = rng.random_range(0..pool.len());
            values.push(pool.swap_remove(k));
        }
        Self { seen, values }
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
            shards: (0..shards.max(1)).map(|i| Mutex::new(Window::new(i as u64))).collect(),
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

    /// The run's sample of `lat` (one of [`SAMPLED`]), merged over the shards; `None` for a
    /// latency that is not sampled.
    pub fn sample(&self, lat: Lat, seed: u64) -> Option<Sample> {
        let i = SAMPLED.iter().position(|&l| l == lat)?;
        let guards: Vec<MutexGuard<'_, Window>> =
            self.shards.iter().map(|m| m.lock().unwrap_or_else(|p| p.into_inner())).collect();
        let parts: Vec<&Reservoir> = guards.iter().map(|w| &w.samples[i]).collect();
        Some(Sample::merge(&parts, SAMPLE_CAP, seed))
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
        let mut window = Window::new(0);
        for shard in &metrics.shards {
            let taken = {
                let mut guard = shard.lock().unwrap_or_else(|p| p.into_inner());
                let mut taken = std::mem::replace(&mut *guard, Window::new(0));
                // The samples span the whole run: they stay with the shard.
                std::mem::swap(&mut guard.samples, &mut taken.samples);
                taken
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
    fn reservoirs_keep_a_uniform_sample_of_the_whole_stream() {
        let mut r = Reservoir::new(100, 1);
        for v in 0..10u64 {
            r.offer(v);
        }
        assert_eq!(r.values(), (0..10).collect::<Vec<u64>>().as_slice(), "under the cap: everything");
        for v in 10..100_000u64 {
            r.offer(v);
        }
        assert_eq!((r.seen(), r.values().len()), (100_000, 100));
        // A uniform sample of 0..100000: as many from each half, within a few standard
        // deviations (sd of the count of 100 draws at 1/2 is 5).
        let low = r.values().iter().filter(|&&v| v < 50_000).count();
        assert!((30..=70).contains(&low), "{low} of 100 from the first half");
    }

    #[test]
    fn merged_reservoirs_weigh_each_part_by_what_it_saw() {
        // One shard saw 1000 values of 1, another 9000 values of 2: a tenth of the merged sample
        // should be 1s, whatever the shards' samples hold.
        let (mut a, mut b) = (Reservoir::new(500, 1), Reservoir::new(500, 2));
        (0..1000).for_each(|_| a.offer(1));
        (0..9000).for_each(|_| b.offer(2));
        let merged = Sample::merge(&[&a, &b], 500, 3);
        assert_eq!((merged.seen, merged.values.len()), (10_000, 500));
        let ones = merged.values.iter().filter(|&&v| v == 1).count();
        assert!((30..=70).contains(&ones), "{ones} of 500 (expected 50)");
        // Fewer seen than the cap: everything, once.
        let (mut c, mut d) = (Reservoir::new(500, 1), Reservoir::new(500, 2));
        (0..3).for_each(|v| c.offer(v));
        (3..5).for_each(|v| d.offer(v));
        let mut all = Sample::merge(&[&c, &d], 500, 3).values;
        all.sort_unstable();
        assert_eq!(all, [0, 1, 2, 3, 4]);
        assert!(Sample::merge(&[], 10, 1).values.is_empty());
    }

    #[test]
    fn samples_survive_the_collections() {
        let m = Metrics::new(2);
        let mut c = Collector::new();
        for i in 0..10u32 {
            m.shard(i).record(Lat::E2e, 1000 + i as u64);
            m.shard(i).record(Lat::Join, 5);
            c.collect(&m, i as f64);
        }
        let s = m.sample(Lat::E2e, 1).unwrap();
        assert_eq!((s.seen, s.values.len()), (10, 10));
        assert_eq!(m.sample(Lat::Ack, 1).unwrap().seen, 0);
        assert!(m.sample(Lat::Join, 1).is_none(), "join is not sampled");
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
