//! The comparison of two runs: one [`Row`] per figure with both values, the change and its 95%
//! interval, the test's p-value (Holm-adjusted over every figure tested), and a [`Verdict`]
//! from the rules below. The text table and the HTML page only read this model.
//!
//! Rules (the thresholds are [`Options`]):
//! - **Latency** (send→delivery, send→ack, each hop pair), from the runs' raw samples: the
//!   median row is tested with Mann-Whitney U, the p99 row with Mood's quantile test (only with
//!   at least [`TAIL_MIN_SAMPLES`] values on each side; below that the p99 and its interval are
//!   shown, untested). A figure regresses when the adjusted
//!   p < α **and** B is worse than A by more than `threshold` × A **and** by more than
//!   `floor_ms` (so microsecond noise on a fast hop never fails a gate). Faster by as much is
//!   "improved"; significant but smaller is "small"; otherwise "same".
//! - **Throughput** (acked and delivered per second of the measured phase), as Poisson rates: a
//!   regression is a significant drop of more than `threshold`.
//! - **Loss and duplicates** (lost deliveries, unacked sends, duplicates, reorders, the audit's
//!   verdict): any where A had none is a regression outright; where A had some, a significant
//!   increase (Fisher's exact test) of the rate by more than `threshold`. Rejected sends (the
//!   server said no honestly) only by the test.

use std::collections::BTreeSet;
use std::path::PathBuf;

use super::input::{config_differences, Run};
use super::stats::{bootstrap_ci, holm, mann_whitney, proportion_test, quantile, quantile_test, rate_test};

/// The tail figure needs this many values in each sample to be tested. The quantile test takes
/// the values above the p99 as independent, and they are not: one stall delays every member's
/// delivery of the messages around it. A short run's p99 rests on a handful of such stalls (in
/// two identical 3 s runs here: 56 ms against 27 ms, "significant"); a sample of 1000 or more
/// out of a long run spreads over many more of them.
pub const TAIL_MIN_SAMPLES: usize = 1000;

/// The end-to-end latencies compared, in order.
pub const LATENCIES: [&str; 2] = ["send_to_delivery", "send_to_ack"];

/// How a comparison decides.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// Smallest relative change that counts (0.10 = 10%).
    pub threshold: f64,
    /// Smallest latency change that counts, ms.
    pub floor_ms: f64,
    /// Family-wise significance level (Holm).
    pub alpha: f64,
    /// Bootstrap resamples.
    pub resamples: usize,
    /// Seed of the bootstrap.
    pub seed: u64,
    /// Fewer samples than this on either side: the figure is shown, not tested.
    pub min_samples: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self { threshold: 0.10, floor_ms: 0.5, alpha: 0.01, resamples: 1000, seed: 1, min_samples: 20 }
    }
}

/// Which part of the table a row belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// End-to-end latencies, ms.
    Latency,
    /// Per-hop latencies, ms.
    Hop,
    /// Rates, per second.
    Throughput,
    /// Loss, duplicates and the audit.
    Correctness,
}

impl Section {
    /// The section's heading.
    pub fn title(self) -> &'static str {
        match self {
            Section::Latency => "latency (ms)",
            Section::Hop => "per hop (ms, from sampled journeys)",
            Section::Throughput => "throughput (per second of the measured phase)",
            Section::Correctness => "loss and duplicates",
        }
    }
}

/// What a figure did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No significant change.
    Same,
    /// Significant but within the threshold.
    Small,
    /// Significantly better by more than the threshold.
    Improved,
    /// Significantly worse by more than the threshold (or new loss).
    Regression,
    /// Shown but not tested (too few samples, no samples).
    NotTested,
}

impl Verdict {
    /// The word in the table.
    pub fn word(self) -> &'static str {
        match self {
            Verdict::Same => "same",
            Verdict::Small => "small",
            Verdict::Improved => "improved",
            Verdict::Regression => "REGRESSION",
            Verdict::NotTested => "n/a",
        }
    }
}

/// One figure of both runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Table section.
    pub section: Section,
    /// The figure, e.g. `send_to_delivery p50`, `store.append→fanout.publish p50`, `acked`.
    pub figure: String,
    /// The hop pair, for per-hop rows.
    pub hop: Option<String>,
    /// A's value (ms, per second, or a count).
    pub a: Option<f64>,
    /// B's value.
    pub b: Option<f64>,
    /// For counts: A's and B's denominators (`k of n`).
    pub of: Option<(u64, u64)>,
    /// Samples behind A's and B's values.
    pub n: (usize, usize),
    /// 95% interval of B − A.
    pub ci: Option<(f64, f64)>,
    /// The test used.
    pub test: &'static str,
    /// Its p-value.
    pub p: Option<f64>,
    /// Holm-adjusted over every tested row.
    pub p_adj: Option<f64>,
    /// The outcome.
    pub verdict: Verdict,
    /// Why not tested, or what made it a regression.
    pub note: String,
}

impl Row {
    fn new(section: Section, figure: impl Into<String>) -> Self {
        Self {
            section,
            figure: figure.into(),
            hop: None,
            a: None,
            b: None,
            of: None,
            n: (0, 0),
            ci: None,
            test: "-",
            p: None,
            p_adj: None,
            verdict: Verdict::NotTested,
            note: String::new(),
        }
    }

    /// B − A.
    pub fn change(&self) -> Option<f64> {
        Some(self.b? - self.a?)
    }

    /// (B − A) / A.
    pub fn relative(&self) -> Option<f64> {
        let (a, b) = (self.a?, self.b?);
        (a != 0.0).then(|| (b - a) / a)
    }

    /// For count rows, the rates k / n.
    fn rates(&self) -> Option<(f64, f64)> {
        let (na, nb) = self.of?;
        let rate = |k: f64, n: u64| if n == 0 { 0.0 } else { k / n as f64 };
        Some((rate(self.a?, na), rate(self.b?, nb)))
    }
}

/// Both runs' samples of one latency, sorted, for the plots.
#[derive(Debug, Clone)]
pub struct Distribution {
    /// `send_to_delivery`, or a hop pair.
    pub name: String,
    /// A per-hop distribution.
    pub is_hop: bool,
    /// A's values, µs, sorted.
    pub a: Vec<u64>,
    /// B's values, µs, sorted.
    pub b: Vec<u64>,
}

/// Two runs compared.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// A's file.
    pub a_path: PathBuf,
    /// B's file.
    pub b_path: PathBuf,
    /// One line about A.
    pub a_desc: String,
    /// One line about B.
    pub b_desc: String,
    /// The rules' parameters.
    pub options: Options,
    /// Every figure.
    pub rows: Vec<Row>,
    /// The latency samples, for plots.
    pub distributions: Vec<Distribution>,
    /// Rows tested (the size of the Holm family).
    pub tests: usize,
    /// Warnings: configurations that differ, journeys that could not be read.
    pub notes: Vec<String>,
}

impl Comparison {
    /// Compares run B against baseline A.
    pub fn build(a: &Run, b: &Run, options: &Options) -> Self {
        let mut rows = Vec::new();
        let mut distributions = Vec::new();
        let mut notes = Vec::new();
        for d in config_differences(a, b) {
            notes.push(format!(
                "the runs' configurations differ ({d}): differences may come from the load, not the build"
            ));
        }
        for name in LATENCIES {
            match (a.latency_sample(name), b.latency_sample(name)) {
                (Some(sa), Some(sb)) => {
                    let d = Distribution { name: name.into(), is_hop: false, a: sorted(sa), b: sorted(sb) };
                    rows.extend(latency_rows(Section::Latency, name, None, &d, options));
                    distributions.push(d);
                }
                (sa, sb) => {
                    let why = match (sa.is_none(), sb.is_none()) {
                        (true, true) => "no samples in A or B",
                        (true, false) => "no samples in A",
                        _ => "no samples in B",
                    };
                    notes.push(format!(
                        "{name}: {why}, so it is shown from the reports' percentiles and not tested; record both runs with this loadgen"
                    ));
                    for (q, label) in [(0.5, "p50"), (0.99, "p99")] {
                        let mut row = Row::new(Section::Latency, format!("{name} {label}"));
                        let pick = |r: &Run| {
                            r.latency_ms.get(name).filter(|h| h.count > 0).map(|h| if q == 0.5 { h.p50 } else { h.p99 })
                        };
                        row.a = pick(a);
                        row.b = pick(b);
                        row.n = (count(a, name), count(b, name));
                        row.note = format!("{why} (a report from before `loadgen compare`): not tested");
                        rows.push(row);
                    }
                }
            }
        }
        hop_rows(a, b, options, &mut rows, &mut distributions, &mut notes);
        throughput_rows(a, b, &mut rows);
        correctness_rows(a, b, &mut rows);

        // === Holm over every tested row, then the verdicts ===
        let tested: Vec<usize> = (0..rows.len()).filter(|&i| rows[i].p.is_some()).collect();
        let ps: Vec<f64> = tested.iter().filter_map(|&i| rows[i].p).collect();
        for (&i, p_adj) in tested.iter().zip(holm(&ps)) {
            rows[i].p_adj = Some(p_adj);
        }
        for row in &mut rows {
            decide(row, options);
        }
        Self {
            a_path: a.path.clone(),
            b_path: b.path.clone(),
            a_desc: a.describe(),
            b_desc: b.describe(),
            options: options.clone(),
            rows,
            distributions,
            tests: tested.len(),
            notes,
        }
    }

    /// The rows that regressed.
    pub fn regressions(&self) -> Vec<&Row> {
        self.rows.iter().filter(|r| r.verdict == Verdict::Regression).collect()
    }

    /// 0 when nothing regressed, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        u8::from(!self.regressions().is_empty())
    }

    /// One line per regression, naming the figure and, for end-to-end latencies, the hop pairs
    /// that regressed with it (the largest change first).
    pub fn findings(&self) -> Vec<String> {
        let mut hops: Vec<&Row> =
            self.rows.iter().filter(|r| r.section == Section::Hop && r.verdict == Verdict::Regression).collect();
        hops.sort_by(|x, y| y.change().unwrap_or(0.0).total_cmp(&x.change().unwrap_or(0.0)));
        // A hop pair with both its median and its p99 regressed is named once.
        let mut at: Vec<String> = Vec::new();
        let mut seen = BTreeSet::new();
        for h in &hops {
            if let (Some(hop), Some(change)) = (h.hop.as_deref(), h.change()) {
                if seen.insert(hop) {
                    at.push(format!("{hop} ({} at {})", signed_ms(change), h.figure.rsplit(' ').next().unwrap_or("")));
                }
            }
        }
        let mut out = Vec::new();
        for r in self.regressions() {
            let mut line = format!("REGRESSION {}: {}", r.figure, describe_change(r));
            if r.section == Section::Latency {
                if at.is_empty() {
                    line.push_str("; no hop pair regressed on its own (see the per-hop rows)");
                } else {
                    line.push_str(&format!("; at hop {}", at.join(", ")));
                }
            }
            out.push(line);
        }
        out
    }
}

/// The change of a row in words: `2.310 → 4.503 ms (+2.193 ms, +95%, 95% CI …, p_adj …)`.
pub fn describe_change(r: &Row) -> String {
    match r.section {
        Section::Latency | Section::Hop => {
            let mut s = format!("{} → {} ms", fmt_ms(r.a), fmt_ms(r.b));
            if let Some(c) = r.change() {
                s.push_str(&format!(" ({}", signed_ms(c)));
                if let Some(rel) = r.relative() {
                    s.push_str(&format!(", {}", percent(rel)));
                }
                if let Some((lo, hi)) = r.ci {
                    s.push_str(&format!(", 95% CI {}..{}", signed_ms(lo), signed_ms(hi)));
                }
                if let Some(p) = r.p_adj {
                    s.push_str(&format!(", p_adj {}", fmt_p(p)));
                }
                s.push(')');
            }
            s
        }
        Section::Throughput => {
            format!(
                "{:.1} → {:.1} per s ({}{})",
                r.a.unwrap_or(0.0),
                r.b.unwrap_or(0.0),
                percent(r.relative().unwrap_or(0.0)),
                r.p_adj.map(|p| format!(", p_adj {}", fmt_p(p))).unwrap_or_default()
            )
        }
        Section::Correctness => {
            let mut s = match r.of {
                Some((na, nb)) => {
                    format!("{} of {na} → {} of {nb}", r.a.unwrap_or(0.0) as u64, r.b.unwrap_or(0.0) as u64)
                }
                None => {
                    let word = |v: Option<f64>| if v.unwrap_or(0.0) > 0.0 { "passed" } else { "failed" };
                    format!("{} → {}", word(r.a), word(r.b))
                }
            };
            if !r.note.is_empty() {
                s.push_str(&format!(" ({})", r.note));
            }
            s
        }
    }
}

/// A latency in ms with as many decimals as its size needs; `-` for none.
pub fn fmt_ms(v: Option<f64>) -> String {
    let s = match v {
        None => return "-".into(),
        Some(v) if v.abs() >= 100.0 => format!("{v:.1}"),
        Some(v) if v.abs() >= 10.0 => format!("{v:.2}"),
        Some(v) => format!("{v:.3}"),
    };
    // No "-0.000" for a change that rounds to nothing.
    match s.strip_prefix('-') {
        Some(rest) if rest.chars().all(|c| c == '0' || c == '.') => rest.to_string(),
        _ => s,
    }
}

/// A signed change in ms.
pub fn signed_ms(v: f64) -> String {
    format!("{} ms", signed(fmt_ms(Some(v))))
}

/// A formatted number with a `+` unless it has a `-`.
pub fn signed(s: String) -> String {
    if s.starts_with('-') {
        s
    } else {
        format!("+{s}")
    }
}

/// A relative change as a signed whole percentage (no "-0%").
pub fn percent(rel: f64) -> String {
    format!("{:+}%", (rel * 100.0).round() + 0.0)
}

/// A p-value.
pub fn fmt_p(p: f64) -> String {
    if p < 1e-4 {
        "<0.0001".into()
    } else {
        format!("{p:.4}")
    }
}

fn sorted(v: &[u64]) -> Vec<u64> {
    let mut v = v.to_vec();
    v.sort_unstable();
    v
}

fn count(r: &Run, name: &str) -> usize {
    r.latency_ms.get(name).map_or(0, |h| h.count as usize)
}

/// The median and p99 rows of one distribution: values, bootstrap intervals, tests.
fn latency_rows(section: Section, name: &str, hop: Option<&str>, d: &Distribution, o: &Options) -> Vec<Row> {
    let (na, nb) = (d.a.len(), d.b.len());
    let enough = na >= o.min_samples && nb >= o.min_samples;
    let ci = if enough {
        bootstrap_ci(&d.a, &d.b, &[0.5, 0.99], o.resamples, 0.95, o.seed).unwrap_or_default()
    } else {
        Vec::new()
    };
    let ms = |v: Option<f64>| v.map(|us| us / 1000.0);
    let mut rows = Vec::new();
    for (i, (q, label)) in [(0.5, "p50"), (0.99, "p99")].into_iter().enumerate() {
        let mut row = Row::new(section, format!("{name} {label}"));
        row.hop = hop.map(str::to_string);
        row.a = ms(quantile(&d.a, q));
        row.b = ms(quantile(&d.b, q));
        row.n = (na, nb);
        row.ci = ci.get(i).map(|&(lo, hi)| (lo / 1000.0, hi / 1000.0));
        if !enough {
            row.note = format!("fewer than {} samples: not tested", o.min_samples);
        } else if q == 0.5 {
            row.test = "Mann-Whitney";
            row.p = mann_whitney(&d.a, &d.b).map(|m| m.p);
        } else if na >= TAIL_MIN_SAMPLES && nb >= TAIL_MIN_SAMPLES {
            row.test = "quantile";
            row.p = quantile_test(&d.a, &d.b, q);
        } else {
            row.note = format!("fewer than {TAIL_MIN_SAMPLES} samples for a tail test: not tested");
        }
        rows.push(row);
    }
    rows
}

/// Per-hop rows: every hop pair of either run, in A's path order, then B's new pairs.
fn hop_rows(
    a: &Run,
    b: &Run,
    o: &Options,
    rows: &mut Vec<Row>,
    dists: &mut Vec<Distribution>,
    notes: &mut Vec<String>,
) {
    for (label, run) in [("A", a), ("B", b)] {
        match run.hops() {
            None => notes.push(format!("{label} has no per-hop timings (a report from before `loadgen compare`)")),
            Some(h) if h.pairs.is_empty() => notes.push(format!(
                "{label} has no per-hop timings: {}",
                h.error.as_deref().unwrap_or("no journeys were read (--journeys 0?)")
            )),
            Some(h) if h.failed > 0 => notes.push(format!(
                "{label}: {} of {} journeys read{}",
                h.read,
                h.requested,
                h.error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default()
            )),
            Some(_) => {}
        }
    }
    let (Some(ha), Some(hb)) = (a.hops(), b.hops()) else { return };
    let mut names: Vec<&str> = ha.pairs.iter().map(|p| p.hop.as_str()).collect();
    for p in &hb.pairs {
        if !names.contains(&p.hop.as_str()) {
            names.push(&p.hop);
        }
    }
    for name in names {
        let find = |h: &crate::journeys::HopSamples| h.pairs.iter().find(|p| p.hop == name).map(|p| sorted(&p.us));
        let d = Distribution {
            name: name.into(),
            is_hop: true,
            a: find(ha).unwrap_or_default(),
            b: find(hb).unwrap_or_default(),
        };
        let mut r = latency_rows(Section::Hop, name, Some(name), &d, o);
        if d.a.is_empty() || d.b.is_empty() {
            for row in &mut r {
                row.note = format!("only in {}: the path differs", if d.a.is_empty() { "B" } else { "A" });
            }
        }
        rows.extend(r);
        dists.push(d);
    }
}

/// Acked and delivered per second of the measured phase, as Poisson rates.
fn throughput_rows(a: &Run, b: &Run, rows: &mut Vec<Row>) {
    let (ta, tb) = (a.timing.measure_s, b.timing.measure_s);
    for (figure, ka, kb) in [
        ("acked", a.throughput.acked, b.throughput.acked),
        ("delivered", a.throughput.delivered, b.throughput.delivered),
    ] {
        let mut row = Row::new(Section::Throughput, figure);
        row.n = (ka as usize, kb as usize);
        if let Some(t) = rate_test(ka, ta, kb, tb) {
            row.a = Some(t.a);
            row.b = Some(t.b);
            row.ci = Some(t.ci);
            row.test = "Poisson";
            row.p = Some(t.p);
        }
        rows.push(row);
    }
}

/// Lost, unacked, duplicate, reordered and rejected, and the audit's verdict.
fn correctness_rows(a: &Run, b: &Run, rows: &mut Vec<Row>) {
    let (ca, cb) = (&a.audit.counts, &b.audit.counts);
    let (aa, ab) = (&a.audit, &b.audit);
    let counts = [
        (
            "lost deliveries",
            ca.missing_deliveries,
            aa.expected_deliveries,
            cb.missing_deliveries,
            ab.expected_deliveries,
            true,
        ),
        ("unacked sends", ca.unacked, aa.sent, cb.unacked, ab.sent, true),
        ("duplicate deliveries", ca.duplicate_deliveries, aa.delivered, cb.duplicate_deliveries, ab.delivered, true),
        ("reordered deliveries", ca.reordered_deliveries, aa.delivered, cb.reordered_deliveries, ab.delivered, true),
        ("rejected sends", ca.rejected, aa.sent, cb.rejected, ab.sent, false),
    ];
    for (figure, ka, na, kb, nb, strict) in counts {
        let mut row = Row::new(Section::Correctness, figure);
        row.a = Some(ka as f64);
        row.b = Some(kb as f64);
        row.of = Some((na, nb));
        row.n = (na as usize, nb as usize);
        if strict && ka == 0 && kb > 0 {
            row.note = "new: A had none".into();
            row.verdict = Verdict::Regression;
        } else if ka + kb > 0 {
            row.test = "Fisher";
            row.p = Some(proportion_test(ka, na, kb, nb));
        } else {
            row.verdict = Verdict::Same;
        }
        rows.push(row);
    }
    let mut row = Row::new(Section::Correctness, "audit");
    row.a = Some(f64::from(u8::from(aa.passed)));
    row.b = Some(f64::from(u8::from(ab.passed)));
    row.verdict = match (aa.passed, ab.passed) {
        (true, false) => {
            row.note = format!("B's audit failed: {}", ab.verdict);
            Verdict::Regression
        }
        (false, true) => Verdict::Improved,
        (false, false) => {
            row.note = "both audits failed".into();
            Verdict::Same
        }
        (true, true) => Verdict::Same,
    };
    rows.push(row);
}

/// The verdict of a tested row from its adjusted p-value and the thresholds.
fn decide(row: &mut Row, o: &Options) {
    let Some(p_adj) = row.p_adj else { return };
    if p_adj >= o.alpha {
        row.verdict = Verdict::Same;
        return;
    }
    let (Some(a), Some(b)) = (row.a, row.b) else { return };
    // `worse` > 0 when B is worse, in the figure's own unit; `bound` is what counts.
    let (worse, bound) = match row.section {
        Section::Latency | Section::Hop => (b - a, (o.threshold * a.abs()).max(o.floor_ms)),
        Section::Throughput => (a - b, o.threshold * a.abs()),
        Section::Correctness => {
            let (ra, rb) = row.rates().unwrap_or((a, b));
            (rb - ra, o.threshold * ra)
        }
    };
    row.verdict = if worse > bound {
        Verdict::Regression
    } else if -worse > bound {
        Verdict::Improved
    } else {
        Verdict::Small
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::input::Run;
    use std::path::Path;

    /// A report with the given latency samples (µs) and hop samples.
    fn run(e2e: &[u64], hops: &[(&str, Vec<u64>)], missing: u64) -> Run {
        let pairs: Vec<serde_json::Value> =
            hops.iter().map(|(h, us)| serde_json::json!({"hop": h, "us": us})).collect();
        let v = serde_json::json!({
            "config": {"seed": 1, "clients": 10, "rooms": 2, "phases": [{"duration": 10.0, "rate": 40.0}]},
            "timing": {"measure_s": 10.0},
            "throughput": {"scheduled": 400, "sent": 400, "acked": 400, "delivered": 2000},
            "latency_ms": {},
            "audit": {"passed": missing == 0, "verdict": "x", "sent": 400, "acked": 400, "expected_deliveries": 2000,
                      "delivered": 2000 - missing, "counts": {"missing_deliveries": missing}},
            "samples": {"latency_us": {"send_to_delivery": {"seen": 2000, "values": e2e},
                                       "send_to_ack": {"seen": 400, "values": e2e}},
                        "hops": {"requested": 300, "read": 300, "pairs": pairs}},
        });
        Run::parse(&v.to_string(), Path::new("t.json")).unwrap()
    }

    /// `n` latencies around `base` µs with a spread of ±`jitter`, deterministic.
    fn lat(n: usize, base: u64, jitter: u64, salt: u64) -> Vec<u64> {
        (0..n as u64).map(|i| base + (i.wrapping_mul(2_654_435_761).wrapping_add(salt) % (2 * jitter + 1))).collect()
    }

    #[test]
    fn the_same_distribution_passes_and_a_delayed_hop_is_named() {
        let a = run(&lat(2000, 3000, 1500, 1), &[("store.append→fanout.publish", lat(300, 20, 10, 1))], 0);
        let same = run(&lat(2000, 3000, 1500, 7), &[("store.append→fanout.publish", lat(300, 20, 10, 9))], 0);
        let c = Comparison::build(&a, &same, &Options::default());
        assert_eq!(c.exit_code(), 0, "{:#?}", c.regressions());
        assert!(c.findings().is_empty());

        let slow = run(&lat(2000, 5000, 1500, 3), &[("store.append→fanout.publish", lat(300, 2020, 10, 1))], 0);
        let c = Comparison::build(&a, &slow, &Options::default());
        assert_eq!(c.exit_code(), 1);
        let findings = c.findings();
        let e2e = findings.iter().find(|f| f.contains("send_to_delivery p50")).expect("e2e named");
        assert!(e2e.contains("at hop store.append→fanout.publish"), "{findings:#?}");
        assert!(findings.iter().any(|f| f.starts_with("REGRESSION store.append→fanout.publish p50")), "{findings:#?}");
        let hop = c.rows.iter().find(|r| r.figure == "store.append→fanout.publish p50").unwrap();
        let (lo, hi) = hop.ci.unwrap();
        assert!(lo < 2.0 && 2.0 < hi, "the 2 ms lies in the interval: {hop:?}");

        // Faster by as much is an improvement, never a failure.
        let c = Comparison::build(&slow, &a, &Options::default());
        assert_eq!(c.exit_code(), 0);
        assert!(c.rows.iter().any(|r| r.verdict == Verdict::Improved));
    }

    #[test]
    fn small_shifts_stay_under_the_floor_and_new_loss_fails() {
        // +100 µs on a 3 ms median: significant with 2000 samples, but under 0.5 ms and 10%.
        let a = run(&lat(2000, 3000, 500, 1), &[], 0);
        let b = run(&lat(2000, 3100, 500, 1), &[], 0);
        let c = Comparison::build(&a, &b, &Options::default());
        let p50 = c.rows.iter().find(|r| r.figure == "send_to_delivery p50").unwrap();
        assert_eq!(p50.verdict, Verdict::Small, "{p50:?}");
        assert_eq!(c.exit_code(), 0);

        let lossy = run(&lat(2000, 3000, 500, 1), &[], 3);
        let c = Comparison::build(&a, &lossy, &Options::default());
        assert_eq!(c.exit_code(), 1);
        let lost = c.rows.iter().find(|r| r.figure == "lost deliveries").unwrap();
        assert_eq!((lost.verdict, lost.note.as_str()), (Verdict::Regression, "new: A had none"));
        assert!(c.rows.iter().any(|r| r.figure == "audit" && r.verdict == Verdict::Regression));
    }

    #[test]
    fn a_heavier_tail_alone_is_a_p99_regression() {
        let base = lat(2000, 3000, 500, 1);
        let a = run(&base, &[], 0);
        // The slowest 4% get 20 ms slower: the median stays, the p99 moves.
        let mut tail = base.clone();
        tail.sort_unstable();
        for v in tail.iter_mut().skip(1920) {
            *v += 20_000;
        }
        let c = Comparison::build(&a, &run(&tail, &[], 0), &Options::default());
        let row = |f: &str| c.rows.iter().find(|r| r.figure == f).unwrap().clone();
        assert_eq!(row("send_to_delivery p50").verdict, Verdict::Same);
        let p99 = row("send_to_delivery p99");
        assert_eq!((p99.verdict, p99.test), (Verdict::Regression, "quantile"), "{p99:?}");
        // Fewer than TAIL_MIN_SAMPLES: shown, not tested.
        let mut sorted_base = base.clone();
        sorted_base.sort_unstable();
        let thin = |v: &[u64]| v.iter().step_by(3).copied().collect::<Vec<u64>>();
        let c = Comparison::build(&run(&thin(&sorted_base), &[], 0), &run(&thin(&tail), &[], 0), &Options::default());
        let p99 = c.rows.iter().find(|r| r.figure == "send_to_delivery p99").unwrap();
        assert_eq!(p99.verdict, Verdict::NotTested);
        assert!(p99.ci.is_some());
    }

    #[test]
    fn the_text_and_the_page_show_every_row() {
        let a = run(&lat(500, 3000, 500, 1), &[("x.a→x.b", lat(50, 20, 5, 1))], 0);
        let b = run(&lat(500, 5000, 500, 1), &[("x.a→x.b", lat(50, 2020, 5, 1))], 0);
        let c = Comparison::build(&a, &b, &Options::default());
        let text = c.text();
        assert!(text.contains("REGRESSION x.a→x.b p50") && text.ends_with("regression(s): exit 1\n"), "{text}");
        for r in &c.rows {
            assert!(text.contains(&r.figure), "{} missing from\n{text}", r.figure);
        }
        let page = c.html();
        assert!(page.starts_with("<!doctype html>") && page.trim_end().ends_with("</html>"));
        assert_eq!(page.matches("<svg").count(), 3, "send→delivery, send→ack and the hop");
        assert!(!page.contains("<script") && page.contains("passed → passed"));
    }

    #[test]
    fn reports_without_samples_are_shown_not_tested() {
        let a = run(&lat(2000, 3000, 500, 1), &[], 0);
        let mut old = a.clone();
        old.samples = None;
        let c = Comparison::build(&old, &a, &Options::default());
        assert_eq!(c.exit_code(), 0);
        let p50 = c.rows.iter().find(|r| r.figure == "send_to_delivery p50").unwrap();
        assert_eq!(p50.verdict, Verdict::NotTested);
        assert!(p50.note.contains("no samples in A"), "{p50:?}");
        assert!(c.notes.iter().any(|n| n.contains("A has no per-hop timings")), "{:?}", c.notes);
        assert!(c.text().contains("no latency could be tested"));
    }

    #[test]
    fn numbers_are_signed_without_negative_zeros() {
        assert_eq!(signed_ms(-0.0002), "+0.000 ms");
        assert_eq!(signed_ms(-0.25), "-0.250 ms");
        assert_eq!(signed_ms(12.345), "+12.35 ms");
        assert_eq!(fmt_ms(Some(-0.0)), "0.000");
        assert_eq!(percent(-0.001), "+0%");
        assert_eq!(percent(0.514), "+51%");
        assert_eq!(percent(-0.25), "-25%");
    }

    #[test]
    fn throughput_drops_beyond_the_threshold_regress() {
        let a = run(&lat(200, 3000, 500, 1), &[], 0);
        let mut b = a.clone();
        b.throughput.acked = 300;
        b.throughput.delivered = 1500;
        let c = Comparison::build(&a, &b, &Options::default());
        let acked = c.rows.iter().find(|r| r.figure == "acked").unwrap();
        assert_eq!(acked.verdict, Verdict::Regression, "{acked:?}");
        assert_eq!(describe_change(acked), format!("40.0 → 30.0 per s (-25%, p_adj {})", fmt_p(acked.p_adj.unwrap())));
    }
}
