//! `loadgen compare --html`: one self-contained page (inline CSS and SVG, no scripts, nothing
//! fetched) with the verdict, the regressions, the table, and for every latency with samples in
//! both runs a chart of both distributions on a percentile axis (the run report's chart style).

use std::fmt::Write as _;
use std::path::Path;

use super::model::{describe_change, fmt_ms, fmt_p, Comparison, Distribution, Section, Verdict};
use super::stats::quantile;
use crate::report::{esc, line_chart, Series, XAxis};

/// The quantiles each curve is drawn through (as far as the sample reaches).
const CURVE: [f64; 20] =
    [0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998, 0.999];

impl Comparison {
    /// Writes the HTML page.
    pub fn write_html(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.html())
    }

    /// The HTML page.
    pub fn html(&self) -> String {
        let mut o = String::new();
        let _ = write!(
            o,
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>loadgen compare</title>\n<style>\
             body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}}\
             table{{border-collapse:collapse;margin:.5em 0 1.5em}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}\
             th{{background:#f4f4f4}}td.l,th.l{{text-align:left}}.pass{{color:#1a7f37}}.fail{{color:#c62828}}\
             tr.regression td{{background:#fdecea}}tr.improved td{{background:#eaf6ec}}\
             svg{{background:#fff;border:1px solid #ddd;margin:.5em 0}}code{{font-size:90%}}\
             </style></head><body>\n<h1>loadgen compare</h1>\n"
        );
        let _ = writeln!(
            o,
            "<p>A: <code>{}</code> {}<br>B: <code>{}</code> {}</p>",
            esc(&self.a_path.display().to_string()),
            esc(&self.a_desc),
            esc(&self.b_path.display().to_string()),
            esc(&self.b_desc)
        );
        let findings = self.findings();
        if findings.is_empty() {
            o.push_str("<h2 class=\"pass\">No significant regression</h2>\n");
        } else {
            let _ = writeln!(o, "<h2 class=\"fail\">{} regression(s)</h2>\n<ul>", findings.len());
            for f in &findings {
                let _ = writeln!(o, "<li>{}</li>", esc(f));
            }
            o.push_str("</ul>\n");
        }
        let opt = &self.options;
        let _ = writeln!(
            o,
            "<p>A regression is significant (Holm-adjusted p &lt; {} over {} tests) and worse by more than {}% \
             (latencies: and by more than {} ms); new loss or duplicates always are. Intervals: 95% percentile \
             bootstrap of B − A ({} resamples, seed {}).</p>",
            opt.alpha,
            self.tests,
            opt.threshold * 100.0,
            opt.floor_ms,
            opt.resamples,
            opt.seed
        );
        for n in &self.notes {
            let _ = writeln!(o, "<p>Note: {}</p>", esc(n));
        }
        self.html_table(&mut o);
        self.html_charts(&mut o);
        o.push_str("</body></html>\n");
        o
    }

    fn html_table(&self, o: &mut String) {
        o.push_str("<table><tr><th class=\"l\">figure</th><th>A</th><th>B</th><th class=\"l\">change</th><th>n (A / B)</th><th>p_adj</th><th class=\"l\">test</th><th class=\"l\">verdict</th></tr>\n");
        let mut section = None;
        for r in &self.rows {
            if section != Some(r.section) {
                section = Some(r.section);
                let _ = writeln!(o, "<tr><th class=\"l\" colspan=\"8\">{}</th></tr>", esc(r.section.title()));
            }
            let class = match r.verdict {
                Verdict::Regression => " class=\"regression\"",
                Verdict::Improved => " class=\"improved\"",
                _ => "",
            };
            let (a, b) = match r.section {
                Section::Latency | Section::Hop => (fmt_ms(r.a), fmt_ms(r.b)),
                Section::Throughput => {
                    (r.a.map_or("-".into(), |v| format!("{v:.1}")), r.b.map_or("-".into(), |v| format!("{v:.1}")))
                }
                Section::Correctness if r.of.is_none() => (String::new(), String::new()),
                Section::Correctness => {
                    (r.a.map_or("-".into(), |v| format!("{v:.0}")), r.b.map_or("-".into(), |v| format!("{v:.0}")))
                }
            };
            let verdict = if r.note.is_empty() {
                r.verdict.word().to_string()
            } else {
                format!("{} ({})", r.verdict.word(), r.note)
            };
            let _ = writeln!(
                o,
                "<tr{class}><td class=\"l\">{}</td><td>{a}</td><td>{b}</td><td class=\"l\">{}</td><td>{} / {}</td><td>{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td></tr>",
                esc(&r.figure),
                esc(&describe_change(r)),
                r.n.0,
                r.n.1,
                r.p_adj.map_or("-".into(), fmt_p),
                r.test,
                esc(&verdict)
            );
        }
        o.push_str("</table>\n");
    }

    fn html_charts(&self, o: &mut String) {
        let drawn: Vec<&Distribution> =
            self.distributions.iter().filter(|d| !d.a.is_empty() || !d.b.is_empty()).collect();
        if drawn.is_empty() {
            o.push_str("<p>No latency samples in either report: nothing to plot.</p>\n");
            return;
        }
        o.push_str("<h2>Distributions</h2>\n");
        for d in drawn {
            let regressed = self.rows.iter().any(|r| {
                r.verdict == Verdict::Regression && r.figure.rsplit_once(' ').is_some_and(|(name, _)| name == d.name)
            });
            let _ = writeln!(
                o,
                "<h3{}>{}{}</h3>",
                if regressed { " class=\"fail\"" } else { "" },
                if d.is_hop { "hop " } else { "" },
                esc(&d.name)
            );
            let a_name = format!("A (n={})", d.a.len());
            let b_name = format!("B (n={})", d.b.len());
            o.push_str(&line_chart(
                "ms",
                "percentile",
                &[
                    Series { name: &a_name, color: "#1f77b4", points: curve(&d.a) },
                    Series { name: &b_name, color: "#d62728", points: curve(&d.b) },
                ],
                XAxis::Percentile,
                None,
            ));
        }
    }
}

/// (−log10(1 − q), ms) through [`CURVE`], up to the highest quantile the sample resolves.
fn curve(sorted: &[u64]) -> Vec<(f64, f64)> {
    let n = sorted.len() as f64;
    CURVE
        .iter()
        .filter(|&&q| q <= 1.0 - 1.0 / n.max(1.0))
        .filter_map(|&q| Some((-(1.0 - q).log10(), quantile(sorted, q)? / 1000.0)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curves_stop_where_the_sample_does() {
        let s: Vec<u64> = (1..=100).map(|v| v * 1000).collect();
        let c = curve(&s);
        assert_eq!(c.first(), Some(&(0.0, 1.0)));
        assert!(c.iter().all(|&(x, _)| x <= 2.0 + 1e-9), "no q above 0.99 for 100 values: {c:?}");
        assert!(curve(&[]).is_empty());
    }
}
