//! The report's model: every figure a run produces ([`Report`] and its parts), assembled from the
//! runner's state at the end of a run, and written as JSON (`--report`) exactly as serialized
//! here. The text summary, the HTML page and its charts only read this model.
//!
//! `samples` (raw latency samples and per-hop durations from sampled journeys) was added for
//! `loadgen compare`; reports written before it have none and are still read by it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::audit::AuditResult;
use crate::config::Config;
use crate::journeys::HopSamples;
use crate::metrics::{Collector, Lat, Sample, Second, SAMPLED};
use crate::plan::Plan;
use crate::runner::Shared;

/// Timings and outcomes the runner knows.
#[derive(Debug, Clone)]
pub struct RunFacts {
    /// Wall clock at the start, ms since the Unix epoch.
    pub started_unix_ms: i64,
    /// Run clock: ramp began.
    pub ramp_start_us: u64,
    /// Run clock: measured phase began.
    pub measure_start_us: u64,
    /// Run clock: last scheduled event dispatched.
    pub measure_end_us: u64,
    /// Run clock: drain ended.
    pub drain_end_us: u64,
    /// Clients that connected and joined during the ramp.
    pub clients_ok: u64,
    /// Clients that did not.
    pub clients_failed: u64,
    /// The run was cut short (Ctrl-C).
    pub interrupted: bool,
    /// CPU seconds loadgen used from start to stop.
    pub cpu_seconds: Option<f64>,
    /// CPU seconds from the start of the measured phase to the stop (no connection setup).
    pub cpu_seconds_measured: Option<f64>,
}

/// Summary of one latency histogram, in milliseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HistSummary {
    /// Samples.
    pub count: u64,
    /// Smallest.
    pub min: f64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
}

impl HistSummary {
    /// Summarises a microsecond histogram in milliseconds.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self { count: 0, min: 0.0, mean: 0.0, p50: 0.0, p90: 0.0, p99: 0.0, p999: 0.0, max: 0.0 };
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            count: h.len(),
            min: ms(h.min()),
            mean: h.mean() / 1000.0,
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// One point of a latency distribution.
#[derive(Debug, Clone, Serialize)]
pub struct Quantile {
    /// Quantile, 0..=1.
    pub q: f64,
    /// Latency in ms.
    pub ms: f64,
}

/// The quantiles of the distribution curves.
const QUANTILES: [f64; 19] =
    [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99, 0.995, 0.999, 0.9995, 0.9999, 0.99999, 1.0];

/// The latency (ms) at each of [`QUANTILES`]; empty for an empty histogram.
fn distribution(h: &Histogram<u64>) -> Vec<Quantile> {
    if h.is_empty() {
        return Vec::new();
    }
    QUANTILES.iter().map(|&q| Quantile { q, ms: h.value_at_quantile(q) as f64 / 1000.0 }).collect()
}

/// Phase lengths and markers, in seconds.
#[derive(Debug, Clone, Serialize)]
pub struct Timing {
    /// Ramp (connect and join) length.
    pub ramp_s: f64,
    /// Measured phase length.
    pub measure_s: f64,
    /// Drain length.
    pub drain_s: f64,
    /// Measured phase start on the timeline's clock.
    pub measure_start_s: f64,
    /// Measured phase end on the timeline's clock.
    pub measure_end_s: f64,
    /// Cut short by Ctrl-C.
    pub interrupted: bool,
}

/// Connection figures.
#[derive(Debug, Clone, Serialize)]
pub struct ClientStats {
    /// Clients asked for.
    pub requested: u64,
    /// Connected and joined during the ramp.
    pub ready: u64,
    /// Did not.
    pub failed: u64,
    /// Reconnects started.
    pub reconnects: u64,
    /// Reconnects by cause (`scenario_drop`, `server_closed`, `read_error`, ...).
    pub reconnects_by_cause: BTreeMap<String, u64>,
}

/// Room sizes.
#[derive(Debug, Clone, Serialize)]
pub struct RoomStats {
    /// Rooms in the plan.
    pub rooms: u64,
    /// Rooms with at least one member.
    pub non_empty: u64,
    /// Smallest non-empty room.
    pub min_members: u64,
    /// Largest room.
    pub max_members: u64,
    /// Mean members per non-empty room.
    pub mean_members: f64,
    /// The five largest rooms and their sizes.
    pub largest: Vec<(String, u32)>,
}

/// Counts and rates.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    /// Sends in the schedule.
    pub scheduled: u64,
    /// Sends written.
    pub sent: u64,
    /// Acks received.
    pub acked: u64,
    /// First deliveries of this run's messages (all recipients).
    pub delivered: u64,
    /// Message frames checked by the auditor (including duplicates and others' messages).
    pub frames_checked: u64,
    /// Sends per second over the measured phase.
    pub sent_per_s: f64,
    /// Acks per second over the measured phase.
    pub acked_per_s: f64,
    /// Deliveries per second over the measured phase.
    pub delivered_per_s: f64,
    /// Highest deliveries per second in any timeline interval.
    pub peak_delivered_per_s: f64,
}

/// What loadgen itself cost.
#[derive(Debug, Clone, Serialize)]
pub struct CpuStats {
    /// CPU seconds (user + system) loadgen used, ramp to stop.
    pub cpu_seconds: Option<f64>,
    /// CPU seconds from the start of the measured phase to the stop (the ramp's connection
    /// setup left out); all deliveries are checked in this window.
    pub cpu_seconds_measured: Option<f64>,
    /// Wall seconds, ramp to stop.
    pub wall_seconds: f64,
    /// Mean cores used.
    pub cores_used: Option<f64>,
    /// Message frames checked.
    pub frames_checked: u64,
    /// `cpu_seconds_measured` per 100k checked deliveries = cores needed to check 100k
    /// deliveries/s (everything included: sockets, WebSocket, JSON, audit, sends).
    pub cores_per_100k_deliveries_per_s: Option<f64>,
}

/// Everything a run measured and found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// loadgen's version.
    pub loadgen_version: &'static str,
    /// The audit passed.
    pub passed: bool,
    /// One line verdict.
    pub verdict: String,
    /// Wall clock at the start, ms since the Unix epoch.
    pub started_unix_ms: i64,
    /// The configuration (the token secret left out).
    pub config: Config,
    /// Base URL for `/debug/messages/{id}` (the first gateway's HTTP side).
    pub debug_base_url: String,
    /// Phase lengths.
    pub timing: Timing,
    /// Connections.
    pub clients: ClientStats,
    /// Room sizes.
    pub rooms: RoomStats,
    /// Counts and rates.
    pub throughput: Throughput,
    /// Latency summaries by name, ms.
    pub latency_ms: BTreeMap<&'static str, HistSummary>,
    /// Latency distributions (quantile → ms) of send→delivery and send→ack.
    pub distribution_ms: BTreeMap<&'static str, Vec<Quantile>>,
    /// Errors by code.
    pub errors: BTreeMap<String, u64>,
    /// Once-a-second figures (t on the run clock; the measured phase is `timing.measure_*_s`).
    pub timeline: Vec<Second>,
    /// The audit's verdict and findings.
    pub audit: AuditResult,
    /// loadgen's own CPU cost.
    pub loadgen_cpu: CpuStats,
    /// Raw samples for comparing runs (`loadgen compare`).
    pub samples: Samples,
}

/// Raw samples of a run, so that another run can be tested against it (`loadgen compare`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Samples {
    /// Uniform random samples (µs) of send→delivery and send→ack, at most
    /// [`crate::metrics::SAMPLE_CAP`] values each.
    pub latency_us: BTreeMap<&'static str, Sample>,
    /// Durations between consecutive hops of message journeys sampled after the run.
    pub hops: HopSamples,
}

/// Microseconds as seconds.
fn secs(us: u64) -> f64 {
    us as f64 / 1e6
}

impl Timing {
    /// Phase lengths from the runner's instants.
    fn of(facts: &RunFacts) -> Self {
        Self {
            ramp_s: secs(facts.measure_start_us.saturating_sub(facts.ramp_start_us)),
            measure_s: secs(facts.measure_end_us.saturating_sub(facts.measure_start_us)),
            drain_s: secs(facts.drain_end_us.saturating_sub(facts.measure_end_us)),
            measure_start_s: secs(facts.measure_start_us),
            measure_end_s: secs(facts.measure_end_us),
            interrupted: facts.interrupted,
        }
    }
}

impl RoomStats {
    /// Room sizes of the plan.
    fn of(plan: &Plan) -> Self {
        let sizes = &plan.room_sizes;
        let non_empty: Vec<u32> = sizes.iter().copied().filter(|&n| n > 0).collect();
        let mut largest: Vec<(String, u32)> = plan.rooms.iter().cloned().zip(sizes.iter().copied()).collect();
        largest.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        largest.truncate(5);
        Self {
            rooms: sizes.len() as u64,
            non_empty: non_empty.len() as u64,
            min_members: non_empty.iter().copied().min().unwrap_or(0) as u64,
            max_members: non_empty.iter().copied().max().unwrap_or(0) as u64,
            mean_members: if non_empty.is_empty() {
                0.0
            } else {
                non_empty.iter().map(|&n| n as f64).sum::<f64>() / non_empty.len() as f64
            },
            largest,
        }
    }
}

impl Throughput {
    /// Totals from the collector, rates over a measured phase of `measure_s` seconds.
    fn of(scheduled: u64, c: &Collector, measure_s: f64) -> Self {
        let per_s = |n: u64| if measure_s > 0.0 { n as f64 / measure_s } else { 0.0 };
        Self {
            scheduled,
            sent: c.sent,
            acked: c.acked,
            delivered: c.delivered,
            frames_checked: c.checked,
            sent_per_s: per_s(c.sent),
            acked_per_s: per_s(c.acked),
            delivered_per_s: per_s(c.delivered),
            peak_delivered_per_s: c
                .timeline
                .iter()
                .filter(|p| p.dt > 0.0)
                .map(|p| p.delivered as f64 / p.dt)
                .fold(0.0, f64::max),
        }
    }
}

impl CpuStats {
    /// loadgen's CPU use against the frames it checked.
    fn of(facts: &RunFacts, frames_checked: u64) -> Self {
        let wall = secs(facts.drain_end_us.saturating_sub(facts.ramp_start_us));
        Self {
            cpu_seconds: facts.cpu_seconds,
            cpu_seconds_measured: facts.cpu_seconds_measured,
            wall_seconds: wall,
            cores_used: facts.cpu_seconds.filter(|_| wall > 0.0).map(|cpu| cpu / wall),
            frames_checked,
            cores_per_100k_deliveries_per_s: facts
                .cpu_seconds_measured
                .filter(|_| frames_checked > 0)
                .map(|cpu| cpu / (frames_checked as f64 / 100_000.0)),
        }
    }
}

impl Report {
    /// Assembles the report at the end of a run.
    pub fn build(shared: &Shared, c: &Collector, audit: AuditResult, facts: RunFacts) -> Self {
        let timing = Timing::of(&facts);
        Self {
            loadgen_version: env!("CARGO_PKG_VERSION"),
            passed: audit.passed,
            verdict: audit.verdict.clone(),
            started_unix_ms: facts.started_unix_ms,
            config: shared.config.clone(),
            debug_base_url: shared.targets.first().map(|(t, _)| t.http_base()).unwrap_or_default(),
            clients: ClientStats {
                requested: shared.config.clients as u64,
                ready: facts.clients_ok,
                failed: facts.clients_failed,
                reconnects: shared.metrics.reconnects.load(Ordering::Relaxed),
                reconnects_by_cause: shared.metrics.reconnect_causes(),
            },
            rooms: RoomStats::of(&shared.plan),
            throughput: Throughput::of(shared.records.len() as u64, c, timing.measure_s),
            latency_ms: Lat::ALL.iter().map(|&l| (l.name(), HistSummary::of(c.total(l)))).collect(),
            distribution_ms: [Lat::E2e, Lat::Ack].iter().map(|&l| (l.name(), distribution(c.total(l)))).collect(),
            errors: shared.metrics.errors(),
            timeline: c.timeline.clone(),
            audit,
            loadgen_cpu: CpuStats::of(&facts, c.checked),
            samples: Samples {
                latency_us: SAMPLED
                    .iter()
                    .filter_map(|&l| Some((l.name(), shared.metrics.sample(l, shared.config.seed)?)))
                    .collect(),
                hops: HopSamples::default(),
            },
            timing,
        }
    }

    /// The process exit status: 0 passed, 1 the audit failed.
    pub fn exit_code(&self) -> i32 {
        if self.passed {
            0
        } else {
            1
        }
    }

    /// Writes the report as pretty JSON.
    pub fn write_json(&self, path: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(path, text + "\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_of_histograms() {
        let mut h = crate::metrics::new_hist();
        for v in 1..=1000u64 {
            h.record(v * 1000).unwrap();
        }
        let s = HistSummary::of(&h);
        assert_eq!(s.count, 1000);
        assert!((s.p50 - 500.0).abs() < 1.0 && (s.p99 - 990.0).abs() < 1.0, "{s:?}");
        assert_eq!(HistSummary::of(&crate::metrics::new_hist()).count, 0);
        assert_eq!(distribution(&h).len(), QUANTILES.len());
    }
}
