//! The comparison as plain text on stdout: the two runs, the rule, one table row per figure
//! (A, B, the change with its 95% interval, the adjusted p-value, the verdict), the notes, and
//! the regressions by name with the hop they happened at.

use std::fmt::Write as _;

use super::model::{fmt_ms, fmt_p, percent, signed, Comparison, Row, Section};

impl Comparison {
    /// The whole text report.
    pub fn text(&self) -> String {
        let mut o = String::new();
        let opt = &self.options;
        let _ = writeln!(o, "loadgen compare");
        let _ = writeln!(o, "  A: {}  {}", self.a_path.display(), self.a_desc);
        let _ = writeln!(o, "  B: {}  {}", self.b_path.display(), self.b_desc);
        let _ = writeln!(
            o,
            "  rule: a regression is significant (Holm-adjusted p < {} over {} tests) and worse by more than {}% (latencies: and {} ms); new loss or duplicates always; 95% CIs by bootstrap ({} resamples, seed {})",
            opt.alpha,
            self.tests,
            opt.threshold * 100.0,
            opt.floor_ms,
            opt.resamples,
            opt.seed
        );
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "{:<46}{:>12}{:>12}  {:<34}{:>7}  {:>9}  {:<13}verdict",
            "figure", "A", "B", "change (95% CI)", "", "p_adj", "test"
        );
        let mut section = None;
        for r in &self.rows {
            if section != Some(r.section) {
                section = Some(r.section);
                let _ = writeln!(o, "{}", r.section.title());
            }
            let _ = writeln!(
                o,
                "  {:<44}{:>12}{:>12}  {:<34}{:>7}  {:>9}  {:<13}{}{}",
                r.figure,
                value(r, r.a, r.of.map(|of| of.0)),
                value(r, r.b, r.of.map(|of| of.1)),
                change(r),
                r.relative().filter(|_| r.section != Section::Correctness).map_or(String::new(), percent),
                r.p_adj.map_or("-".into(), fmt_p),
                r.test,
                r.verdict.word(),
                if r.note.is_empty() { String::new() } else { format!("  ({})", r.note) }
            );
        }
        if !self.notes.is_empty() {
            let _ = writeln!(o);
            for n in &self.notes {
                let _ = writeln!(o, "note: {n}");
            }
        }
        let _ = writeln!(o);
        let findings = self.findings();
        let latency_tested =
            self.rows.iter().any(|r| matches!(r.section, Section::Latency | Section::Hop) && r.p.is_some());
        if findings.is_empty() && !latency_tested {
            let _ = writeln!(o, "no significant regression, but no latency could be tested (see the notes): exit 0");
        } else if findings.is_empty() {
            let _ = writeln!(o, "no significant regression: exit 0");
        } else {
            for f in &findings {
                let _ = writeln!(o, "{f}");
            }
            let _ = writeln!(o, "{} regression(s): exit 1", findings.len());
        }
        o
    }
}

/// A row's value in its unit (`of`: the count's denominator).
fn value(r: &Row, v: Option<f64>, of: Option<u64>) -> String {
    match (r.section, v) {
        (_, None) => "-".into(),
        (Section::Latency | Section::Hop, v) => fmt_ms(v),
        (Section::Throughput, Some(v)) => format!("{v:.1}"),
        (Section::Correctness, Some(v)) if r.figure == "audit" => (if v > 0.0 { "passed" } else { "failed" }).into(),
        (Section::Correctness, Some(v)) => match of {
            Some(n) => format!("{} / {n}", v as u64),
            None => format!("{v}"),
        },
    }
}

/// The change and its interval.
fn change(r: &Row) -> String {
    let Some(c) = r.change() else { return String::new() };
    match r.section {
        Section::Latency | Section::Hop | Section::Throughput => {
            let f = |x: f64| {
                if r.section == Section::Throughput {
                    signed(format!("{:.1}", (x * 10.0).round() / 10.0 + 0.0))
                } else {
                    signed(fmt_ms(Some(x)))
                }
            };
            match r.ci {
                Some((lo, hi)) => format!("{} ({}..{})", f(c), f(lo), f(hi)),
                None => f(c),
            }
        }
        Section::Correctness if r.figure == "audit" => String::new(),
        Section::Correctness => format!("{c:+}"),
    }
}
