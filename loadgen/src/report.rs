//! What a run produces: [`Report`] with every figure and finding, written as JSON
//! (`--report`), as a human summary table (stdout), and as a self-contained HTML page with
//! inline SVG plots (`--html`: latency over time, throughput over time, latency distribution;
//! no scripts, no external files).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::Ordering;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::audit::{AuditResult, FindingKind};
use crate::config::Config;
use crate::metrics::{Collector, Lat, Second};
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

const QUANTILES: [f64; 19] =
    [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99, 0.995, 0.999, 0.9995, 0.9999, 0.99999, 1.0];

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
}

impl Report {
    /// Assembles the report at the end of a run.
    pub fn build(shared: &Shared, c: &Collector, audit: AuditResult, facts: RunFacts) -> Self {
        let s = |us: u64| us as f64 / 1e6;
        let measure_s = s(facts.measure_end_us.saturating_sub(facts.measure_start_us));
        let per_s = |n: u64| if measure_s > 0.0 { n as f64 / measure_s } else { 0.0 };
        let sizes = &shared.plan.room_sizes;
        let non_empty: Vec<u32> = sizes.iter().copied().filter(|&n| n > 0).collect();
        let mut largest: Vec<(String, u32)> = shared.plan.rooms.iter().cloned().zip(sizes.iter().copied()).collect();
        largest.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        largest.truncate(5);
        let wall = s(facts.drain_end_us.saturating_sub(facts.ramp_start_us));
        let cores_per_100k =
            facts.cpu_seconds_measured.filter(|_| c.checked > 0).map(|cpu| cpu / (c.checked as f64 / 100_000.0));
        Self {
            loadgen_version: env!("CARGO_PKG_VERSION"),
            passed: audit.passed,
            verdict: audit.verdict.clone(),
            started_unix_ms: facts.started_unix_ms,
            config: shared.config.clone(),
            debug_base_url: shared.targets.first().map(|(t, _)| t.http_base()).unwrap_or_default(),
            timing: Timing {
                ramp_s: s(facts.measure_start_us.saturating_sub(facts.ramp_start_us)),
                measure_s,
                drain_s: s(facts.drain_end_us.saturating_sub(facts.measure_end_us)),
                measure_start_s: s(facts.measure_start_us),
                measure_end_s: s(facts.measure_end_us),
                interrupted: facts.interrupted,
            },
            clients: ClientStats {
                requested: shared.config.clients as u64,
                ready: facts.clients_ok,
                failed: facts.clients_failed,
                reconnects: shared.metrics.reconnects.load(Ordering::Relaxed),
                reconnects_by_cause: shared.metrics.reconnect_causes(),
            },
            rooms: RoomStats {
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
            },
            throughput: Throughput {
                scheduled: shared.records.len() as u64,
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
            },
            latency_ms: Lat::ALL.iter().map(|&l| (l.name(), HistSummary::of(c.total(l)))).collect(),
            distribution_ms: [Lat::E2e, Lat::Ack].iter().map(|&l| (l.name(), distribution(c.total(l)))).collect(),
            errors: shared.metrics.errors(),
            timeline: c.timeline.clone(),
            audit,
            loadgen_cpu: CpuStats {
                cpu_seconds: facts.cpu_seconds,
                cpu_seconds_measured: facts.cpu_seconds_measured,
                wall_seconds: wall,
                cores_used: facts.cpu_seconds.filter(|_| wall > 0.0).map(|cpu| cpu / wall),
                frames_checked: c.checked,
                cores_per_100k_deliveries_per_s: cores_per_100k,
            },
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

    /// Writes the HTML page.
    pub fn write_html(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.html())
    }

    /// The human summary: a few tables of plain text.
    pub fn summary(&self) -> String {
        let mut o = String::new();
        let cfg = &self.config;
        let _ = writeln!(
            o,
            "loadgen {} | scenario {} | seed {} | prefix {} | {} gateway(s)",
            self.loadgen_version,
            cfg.scenario.as_deref().unwrap_or("-"),
            cfg.seed,
            cfg.prefix,
            cfg.urls.len()
        );
        let t = &self.timing;
        let _ = writeln!(
            o,
            "clients {} ready / {} failed | reconnects {} | rooms {} ({} non-empty, {}..{} members) | ramp {:.1}s measured {:.1}s drain {:.1}s{}",
            self.clients.ready,
            self.clients.failed,
            self.clients.reconnects,
            self.rooms.rooms,
            self.rooms.non_empty,
            self.rooms.min_members,
            self.rooms.max_members,
            t.ramp_s,
            t.measure_s,
            t.drain_s,
            if t.interrupted { " (interrupted)" } else { "" }
        );
        let th = &self.throughput;
        let _ = writeln!(o);
        let _ = writeln!(o, "{:<18}{:>12}{:>12}{:>12}{:>14}", "throughput", "scheduled", "sent", "acked", "delivered");
        let _ = writeln!(o, "{:<18}{:>12}{:>12}{:>12}{:>14}", "  total", th.scheduled, th.sent, th.acked, th.delivered);
        let _ = writeln!(
            o,
            "{:<18}{:>12}{:>12.1}{:>12.1}{:>14.1}",
            "  per second", "", th.sent_per_s, th.acked_per_s, th.delivered_per_s
        );
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "{:<18}{:>9}{:>10}{:>10}{:>10}{:>10}{:>10}{:>10}",
            "latency (ms)", "count", "p50", "p90", "p99", "p99.9", "max", "mean"
        );
        for lat in Lat::ALL {
            let h = &self.latency_ms[lat.name()];
            let _ = writeln!(
                o,
                "  {:<16}{:>9}{:>10.2}{:>10.2}{:>10.2}{:>10.2}{:>10.2}{:>10.2}",
                lat.name(),
                h.count,
                h.p50,
                h.p90,
                h.p99,
                h.p999,
                h.max,
                h.mean
            );
        }
        let _ = writeln!(o);
        if self.errors.is_empty() {
            let _ = writeln!(o, "errors: none");
        } else {
            let list: Vec<String> = self.errors.iter().map(|(k, v)| format!("{k} {v}")).collect();
            let _ = writeln!(o, "errors: {}", list.join(", "));
        }
        let cpu = &self.loadgen_cpu;
        if let (Some(total), Some(secs), Some(per)) =
            (cpu.cpu_seconds, cpu.cpu_seconds_measured, cpu.cores_per_100k_deliveries_per_s)
        {
            let _ = writeln!(
                o,
                "loadgen cpu: {total:.2} s in all, {secs:.2} s while checking {} frames = {per:.2} cores per 100k deliveries/s",
                cpu.frames_checked
            );
        }
        let a = &self.audit;
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "audit: {} members audited ({} excluded), {} expected deliveries, {} delivered, {} sent, {} acked, {} not sent",
            a.members_audited, a.members_excluded, a.expected_deliveries, a.delivered, a.sent, a.acked, a.not_sent
        );
        let c = &a.counts;
        let _ = writeln!(
            o,
            "  missing {} ({} deliveries) | duplicate {} | reordered {} | gap {} | unacked {} | stored twice {} | rejected {} | stray {}",
            c.missing_messages,
            c.missing_deliveries,
            c.duplicate_deliveries,
            c.reordered_deliveries,
            c.gap_seqs,
            c.unacked,
            c.stored_twice,
            c.rejected,
            a.stray_deliveries
        );
        if !a.findings.is_empty() {
            let _ = writeln!(
                o,
                "  {:<13}{:<16}{:>8}  {:<38}{:<34}{:>6}  detail",
                "kind", "room", "seq", "id", "trace_id", "count"
            );
            for f in &a.findings {
                let _ = writeln!(
                    o,
                    "  {:<13}{:<16}{:>8}  {:<38}{:<34}{:>6}  {}",
                    kind_name(f.kind),
                    f.room,
                    f.seq.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
                    f.id.as_deref().unwrap_or("-"),
                    f.trace_id.as_deref().unwrap_or("-"),
                    f.count,
                    f.detail
                );
            }
            if a.findings_truncated {
                let _ = writeln!(o, "  (more findings left out; raise --max-findings)");
            }
            if a.findings.iter().any(|f| f.id.is_some()) {
                let _ = writeln!(o, "  look a message up at {}/debug/messages/<id>", self.debug_base_url);
            }
        }
        let _ = writeln!(o, "{}", a.verdict);
        o
    }

    /// The HTML page.
    pub fn html(&self) -> String {
        let mut o = String::new();
        let title = format!("loadgen report: {}", self.config.scenario.as_deref().unwrap_or("ad hoc run"));
        let _ = write!(
            o,
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\n<style>\
             body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}}\
             table{{border-collapse:collapse;margin:.5em 0 1.5em}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}\
             th{{background:#f4f4f4}}td.l,th.l{{text-align:left}}.pass{{color:#1a7f37}}.fail{{color:#c62828}}\
             svg{{background:#fff;border:1px solid #ddd;margin:.5em 0}}code{{font-size:90%}}\
             </style></head><body>\n<h1>{}</h1>\n",
            esc(&title),
            esc(&title)
        );
        let class = if self.passed { "pass" } else { "fail" };
        let _ = writeln!(o, "<h2 class=\"{class}\">{}</h2>", esc(&self.verdict));
        let cfg = &self.config;
        let _ = writeln!(
            o,
            "<p>seed <code>{}</code>, prefix <code>{}</code>, {} clients ({} ready, {} failed), {} rooms ({}), \
             {} reconnects; ramp {:.1} s, measured {:.1} s, drain {:.1} s. Gateways: {}.</p>",
            cfg.seed,
            esc(&cfg.prefix),
            cfg.clients,
            self.clients.ready,
            self.clients.failed,
            cfg.rooms,
            esc(&format!("{} members at most", self.rooms.max_members)),
            self.clients.reconnects,
            self.timing.ramp_s,
            self.timing.measure_s,
            self.timing.drain_s,
            esc(&cfg.urls.join(", "))
        );

        // Latency over time.
        let tl = &self.timeline;
        // Intervals without samples are left out rather than drawn as zero latency.
        let e2e_pts =
            |f: &dyn Fn(&Second) -> f64| tl.iter().filter(|p| p.delivered > 0).map(|p| (p.t, f(p))).collect::<Vec<_>>();
        let ack_pts =
            |f: &dyn Fn(&Second) -> f64| tl.iter().filter(|p| p.acked > 0).map(|p| (p.t, f(p))).collect::<Vec<_>>();
        let marks = Some((self.timing.measure_start_s, self.timing.measure_end_s));
        o.push_str("<h3>Latency over time</h3>\n");
        o.push_str(&line_chart(
            "ms",
            "seconds since start",
            &[
                Series { name: "send→delivery p50", color: "#1f77b4", points: e2e_pts(&|p| p.e2e_p50_ms) },
                Series { name: "send→delivery p99", color: "#d62728", points: e2e_pts(&|p| p.e2e_p99_ms) },
                Series { name: "send→delivery max", color: "#ff9896", points: e2e_pts(&|p| p.e2e_max_ms) },
                Series { name: "send→ack p99", color: "#2ca02c", points: ack_pts(&|p| p.ack_p99_ms) },
            ],
            XAxis::Linear,
            marks,
        ));
        o.push_str("<h3>Throughput over time (per second)</h3>\n");
        let rate = |f: &dyn Fn(&Second) -> u64| {
            tl.iter().map(|p| (p.t, if p.dt > 0.0 { f(p) as f64 / p.dt } else { 0.0 })).collect::<Vec<_>>()
        };
        o.push_str(&line_chart(
            "per second",
            "seconds since start",
            &[
                Series { name: "sent", color: "#1f77b4", points: rate(&|p| p.sent) },
                Series { name: "acked", color: "#2ca02c", points: rate(&|p| p.acked) },
                Series { name: "delivered", color: "#9467bd", points: rate(&|p| p.delivered) },
                Series { name: "errors", color: "#d62728", points: rate(&|p| p.errors) },
            ],
            XAxis::Linear,
            marks,
        ));
        o.push_str("<h3>Latency distribution</h3>\n");
        let dist = |name: &str| {
            self.distribution_ms
                .get(name)
                .map(|d| d.iter().filter(|q| q.q < 1.0).map(|q| (-(1.0 - q.q).log10(), q.ms)).collect())
                .unwrap_or_default()
        };
        o.push_str(&line_chart(
            "ms",
            "percentile",
            &[
                Series { name: "send→delivery", color: "#d62728", points: dist(Lat::E2e.name()) },
                Series { name: "send→ack", color: "#2ca02c", points: dist(Lat::Ack.name()) },
            ],
            XAxis::Percentile,
            None,
        ));

        // Tables.
        o.push_str("<h3>Latency (ms)</h3>\n<table><tr><th class=\"l\">what</th><th>count</th><th>p50</th><th>p90</th><th>p99</th><th>p99.9</th><th>max</th><th>mean</th></tr>\n");
        for lat in Lat::ALL {
            let h = &self.latency_ms[lat.name()];
            let _ = writeln!(
                o,
                "<tr><td class=\"l\">{}</td><td>{}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td></tr>",
                lat.name(), h.count, h.p50, h.p90, h.p99, h.p999, h.max, h.mean
            );
        }
        o.push_str("</table>\n");
        let th = &self.throughput;
        let _ = writeln!(
            o,
            "<h3>Throughput</h3>\n<table><tr><th></th><th>scheduled</th><th>sent</th><th>acked</th><th>delivered</th></tr>\
             <tr><td class=\"l\">total</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\
             <tr><td class=\"l\">per second</td><td></td><td>{:.1}</td><td>{:.1}</td><td>{:.1}</td></tr></table>",
            th.scheduled, th.sent, th.acked, th.delivered, th.sent_per_s, th.acked_per_s, th.delivered_per_s
        );
        o.push_str("<h3>Errors</h3>\n");
        if self.errors.is_empty() {
            o.push_str("<p>none</p>\n");
        } else {
            o.push_str("<table><tr><th class=\"l\">code</th><th>count</th></tr>\n");
            for (k, v) in &self.errors {
                let _ = writeln!(o, "<tr><td class=\"l\">{}</td><td>{v}</td></tr>", esc(k));
            }
            o.push_str("</table>\n");
        }
        let a = &self.audit;
        let c = &a.counts;
        let _ = writeln!(
            o,
            "<h3>Audit</h3>\n<p>{} members audited ({} excluded); {} expected deliveries of {} acked messages, {} delivered.</p>\n\
             <table><tr><th>missing messages</th><th>missing deliveries</th><th>duplicate</th><th>reordered</th><th>gap</th><th>unacked</th><th>stored twice</th><th>rejected</th></tr>\
             <tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr></table>",
            a.members_audited, a.members_excluded, a.expected_deliveries, a.acked, a.delivered,
            c.missing_messages, c.missing_deliveries, c.duplicate_deliveries, c.reordered_deliveries,
            c.gap_seqs, c.unacked, c.stored_twice, c.rejected
        );
        if !a.findings.is_empty() {
            o.push_str("<table><tr><th class=\"l\">kind</th><th class=\"l\">room</th><th>seq</th><th class=\"l\">id</th><th class=\"l\">trace id</th><th class=\"l\">client_msg_id</th><th>count</th><th class=\"l\">recipients</th><th class=\"l\">detail</th></tr>\n");
            for f in &a.findings {
                let id = match &f.id {
                    Some(id) => format!(
                        "<a href=\"{}/debug/messages/{}\"><code>{}</code></a>",
                        esc(&self.debug_base_url),
                        esc(id),
                        esc(id)
                    ),
                    None => "-".into(),
                };
                let _ = writeln!(
                    o,
                    "<tr><td class=\"l\">{}</td><td class=\"l\">{}</td><td>{}</td><td class=\"l\">{id}</td><td class=\"l\"><code>{}</code></td><td class=\"l\">{}</td><td>{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td></tr>",
                    kind_name(f.kind),
                    esc(&f.room),
                    f.seq.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
                    esc(f.trace_id.as_deref().unwrap_or("-")),
                    esc(f.client_msg_id.as_deref().unwrap_or("-")),
                    f.count,
                    esc(&f.recipients.join(", ")),
                    esc(&f.detail)
                );
            }
            o.push_str("</table>\n");
            if a.findings_truncated {
                o.push_str("<p>More findings were left out; see --max-findings.</p>\n");
            }
        }
        let cpu = &self.loadgen_cpu;
        if let (Some(secs), Some(per)) = (cpu.cpu_seconds_measured, cpu.cores_per_100k_deliveries_per_s) {
            let _ = writeln!(
                o,
                "<p>loadgen used {secs:.2} CPU seconds while checking {} frames: {per:.2} cores per 100k deliveries/s.</p>",
                cpu.frames_checked
            );
        }
        o.push_str("</body></html>\n");
        o
    }
}

fn kind_name(k: FindingKind) -> &'static str {
    match k {
        FindingKind::Missing => "missing",
        FindingKind::Duplicate => "duplicate",
        FindingKind::Reordered => "reordered",
        FindingKind::Gap => "gap",
        FindingKind::Unacked => "unacked",
        FindingKind::StoredTwice => "stored_twice",
        FindingKind::Rejected => "rejected",
    }
}

/// Escapes text for HTML and SVG.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// One line of a chart.
pub struct Series<'a> {
    /// Legend text.
    pub name: &'a str,
    /// CSS colour.
    pub color: &'a str,
    /// (x, y) points.
    pub points: Vec<(f64, f64)>,
}

/// How the x axis is labelled.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum XAxis {
    /// Plain numbers.
    Linear,
    /// x = -log10(1 - q), labelled as percentiles (50%, 90%, 99%, ...).
    Percentile,
}

/// A chart as an inline SVG element. `band` shades an x range (the measured phase).
pub fn line_chart(
    y_label: &str,
    x_label: &str,
    series: &[Series<'_>],
    x_axis: XAxis,
    band: Option<(f64, f64)>,
) -> String {
    let (w, h) = (860.0, 300.0);
    let (left, right, top, bottom) = (64.0, 170.0, 16.0, 42.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let all = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0.0f64);
    for &(x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    let mut o = String::new();
    let _ = write!(o, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-size=\"11\" font-family=\"sans-serif\">");
    if x0 > x1 {
        let _ = writeln!(o, "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">no data</text></svg>", w / 2.0, h / 2.0);
        return o;
    }
    match x_axis {
        XAxis::Percentile => {
            x0 = 0.0;
            x1 = x1.max(3.0).ceil();
        }
        XAxis::Linear => {
            x0 = x0.min(0.0);
            if let Some((_, b)) = band {
                x1 = x1.max(b);
            }
        }
    }
    if x1 - x0 < 1e-9 {
        x1 = x0 + 1.0;
    }
    let y1 = nice_ceil(y1.max(1e-3));
    let sx = |x: f64| left + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| top + ph - (y / y1) * ph;
    if let Some((a, b)) = band {
        let (a, b) = (a.max(x0), b.min(x1));
        if b > a {
            let _ = write!(
                o,
                "<rect x=\"{:.1}\" y=\"{top}\" width=\"{:.1}\" height=\"{ph}\" fill=\"#f3f7ff\"/>",
                sx(a),
                sx(b) - sx(a)
            );
        }
    }
    // Grid and y ticks.
    for i in 0..=5 {
        let v = y1 * i as f64 / 5.0;
        let y = sy(v);
        let _ = write!(o, "<line x1=\"{left}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#eee\"/>", left + pw);
        let _ =
            write!(o, "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>", left - 6.0, y + 4.0, fmt_num(v));
    }
    // x ticks.
    let ticks: Vec<(f64, String)> = match x_axis {
        XAxis::Percentile => (0..=(x1 as i32)).map(|k| (k as f64, percentile_label(k as usize))).collect(),
        XAxis::Linear => {
            let step = nice_ceil((x1 - x0) / 8.0);
            let mut t = (x0 / step).ceil() * step;
            let mut v = Vec::new();
            while t <= x1 + 1e-9 {
                v.push((t, fmt_num(t)));
                t += step;
            }
            v
        }
    };
    for (x, label) in ticks {
        let px = sx(x);
        let _ = write!(o, "<line x1=\"{px:.1}\" x2=\"{px:.1}\" y1=\"{top}\" y2=\"{:.1}\" stroke=\"#eee\"/>", top + ph);
        let _ =
            write!(o, "<text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>", top + ph + 14.0, esc(&label));
    }
    let _ = write!(o, "<rect x=\"{left}\" y=\"{top}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#999\"/>");
    let _ = write!(
        o,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
        left + pw / 2.0,
        h - 6.0,
        esc(x_label)
    );
    let _ = write!(
        o,
        "<text transform=\"translate(14 {:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
        top + ph / 2.0,
        esc(y_label)
    );
    for (i, s) in series.iter().enumerate() {
        if !s.points.is_empty() {
            let pts: Vec<String> = s.points.iter().map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect();
            let _ = write!(
                o,
                "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.6\" points=\"{}\"/>",
                esc(s.color),
                pts.join(" ")
            );
        }
        let ly = top + 14.0 + 18.0 * i as f64;
        let lx = left + pw + 12.0;
        let _ = write!(
            o,
            "<line x1=\"{lx}\" x2=\"{:.1}\" y1=\"{ly}\" y2=\"{ly}\" stroke=\"{}\" stroke-width=\"3\"/>",
            lx + 18.0,
            esc(s.color)
        );
        let _ = write!(o, "<text x=\"{:.1}\" y=\"{:.1}\">{}</text>", lx + 24.0, ly + 4.0, esc(s.name));
    }
    o.push_str("</svg>\n");
    o
}

/// The percentile at x = k on a -log10(1 - q) axis: 0%, 90%, 99%, 99.9%, ...
fn percentile_label(k: usize) -> String {
    match k {
        0 => "0%".into(),
        1 => "90%".into(),
        2 => "99%".into(),
        _ => format!("99.{}%", "9".repeat(k - 2)),
    }
}

/// The smallest of 1, 2, 2.5, 5 × 10^k at or above `v`.
fn nice_ceil(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * mag >= v - 1e-12 {
            return m * mag;
        }
    }
    10.0 * mag
}

fn fmt_num(v: f64) -> String {
    if v == v.trunc() && v.abs() < 1e12 {
        format!("{}", v as i64)
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_numbers() {
        assert_eq!(nice_ceil(7.3), 10.0);
        assert_eq!(nice_ceil(0.21), 0.25);
        assert_eq!(nice_ceil(1.0), 1.0);
        assert_eq!(nice_ceil(160.0), 200.0);
        assert_eq!(fmt_num(99.9), "99.9");
        assert_eq!(fmt_num(5.0), "5");
    }

    #[test]
    fn charts_are_well_formed_svg() {
        let svg = line_chart(
            "ms",
            "t <s>",
            &[Series { name: "a&b", color: "#123", points: vec![(0.0, 1.0), (1.0, 3.0), (2.0, 2.0)] }],
            XAxis::Linear,
            Some((0.5, 1.5)),
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("<polyline"));
        assert!(svg.contains("a&amp;b") && svg.contains("t &lt;s&gt;"));
        let empty = line_chart("ms", "x", &[], XAxis::Percentile, None);
        assert!(empty.contains("no data"));
        let p = line_chart(
            "ms",
            "percentile",
            &[Series { name: "e2e", color: "red", points: vec![(0.3, 1.0), (2.0, 5.0), (4.0, 9.0)] }],
            XAxis::Percentile,
            None,
        );
        assert!(p.contains("99.99%"), "{p}");
        assert_eq!(percentile_label(6), "99.9999%");
    }

    /// A report from a synthetic run: one planted drop, written as JSON and HTML.
    #[test]
    fn reports_are_written_and_read_back() {
        use crate::audit::{check_delivery, finalize, parse_id, Track};
        use crate::metrics::{Collector, Lat};
        use std::time::Duration;

        let config = Config {
            clients: 3,
            rooms: 1,
            phases: vec![crate::schedule::Phase { duration: Duration::from_secs(1), rate: 4.0 }],
            prefix: "rep".into(),
            ..Config::default()
        };
        let (shared, _) = crate::runner::Shared::prepare(config, Vec::new());
        let records = &shared.records;
        let id = |seq: u64| format!("018f0000-0000-7000-8000-{seq:012x}");
        let mut tracks: Vec<Track> = (0..3).map(|c| Track::new(0, c)).collect();
        for t in &mut tracks {
            t.joined(0, 0, false);
        }
        for i in 0..records.len() as u32 {
            let seq = i as u64 + 1;
            records.mark_sent(i, 10);
            records.ack(i, parse_id(&id(seq)), seq, 20);
            for (c, t) in tracks.iter_mut().enumerate() {
                if !(c == 1 && seq == 2) {
                    let (_, lat) = check_delivery(t, records, Some(i), seq, &id(seq), &format!("{seq:032x}"), 1000);
                    shared.metrics.shard(c as u32).record(Lat::E2e, lat.unwrap());
                    shared.metrics.shard(c as u32).delivered += 1;
                }
            }
        }
        let mut collector = Collector::new();
        collector.collect(&shared.metrics, 0.0);
        collector.collect(&shared.metrics, 1.0);
        let refs: Vec<&Track> = tracks.iter().collect();
        let audit = finalize(records, &refs, &shared.plan, 0, 10);
        let facts = RunFacts {
            started_unix_ms: 1,
            ramp_start_us: 0,
            measure_start_us: 100_000,
            measure_end_us: 1_100_000,
            drain_end_us: 1_200_000,
            clients_ok: 3,
            clients_failed: 0,
            interrupted: false,
            cpu_seconds: Some(0.5),
            cpu_seconds_measured: Some(0.4),
        };
        let report = Report::build(&shared, &collector, audit, facts);
        assert!(!report.passed);
        assert_eq!(report.exit_code(), 1);

        let dir = std::env::temp_dir().join(format!("loadgen-report-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (json, html) = (dir.join("r.json"), dir.join("r.html"));
        report.write_json(&json).unwrap();
        report.write_html(&html).unwrap();
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(v["passed"], false);
        assert_eq!(v["audit"]["counts"]["missing_deliveries"], 1);
        assert_eq!(v["audit"]["findings"][0]["kind"], "missing");
        assert_eq!(v["audit"]["findings"][0]["id"], id(2));
        assert_eq!(v["audit"]["findings"][0]["recipients"][0], "rep-u1");
        assert_eq!(v["config"]["drain"], 5.0, "durations are seconds");
        assert_eq!(v["latency_ms"]["send_to_delivery"]["count"], 11);
        assert_eq!(v["timeline"].as_array().unwrap().len(), 1);
        assert_eq!(v["loadgen_cpu"]["frames_checked"], 0);
        let page = std::fs::read_to_string(&html).unwrap();
        assert!(page.starts_with("<!doctype html>") && page.trim_end().ends_with("</html>"));
        assert_eq!(page.matches("<svg").count(), 3);
        assert!(page.contains(&format!("/debug/messages/{}", id(2))));
        assert!(!page.contains("<script"));
        let summary = report.summary();
        assert!(summary.contains(&id(2)) && summary.contains("FAILED"), "{summary}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

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
