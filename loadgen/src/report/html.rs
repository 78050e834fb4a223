//! The `--html` page: one self-contained document (inline CSS and SVG, no scripts, no external
//! files) with the verdict, the run's parameters, three charts (latency over time, throughput
//! over time, latency distribution), the latency, throughput and error tables, and the audit's
//! findings linked to `/debug/messages/{id}`.

use std::fmt::Write as _;
use std::path::Path;

use super::model::Report;
use super::svg::{line_chart, Series, XAxis};
use crate::metrics::{Lat, Second};

impl Report {
    /// Writes the HTML page.
    pub fn write_html(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.html())
    }

    /// The HTML page.
    pub fn html(&self) -> String {
        let mut o = String::new();
        self.html_head(&mut o);
        self.html_charts(&mut o);
        self.html_tables(&mut o);
        self.html_audit(&mut o);
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

    /// Doctype, title and style, the verdict, and one paragraph of run parameters.
    fn html_head(&self, o: &mut String) {
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
    }

    /// Latency over time and throughput over time (the measured phase shaded), then the latency
    /// distribution on a percentile axis.
    fn html_charts(&self, o: &mut String) {
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
    }

    /// The latency, throughput and error tables.
    fn html_tables(&self, o: &mut String) {
        o.push_str("<h3>Latency (ms)</h3>\n<table><tr><th class=\"l\">what</th><th>count</th><th>p50</th><th>p90</th><th>p99</th><th>p99.9</th><th>max</th><th>mean</th></tr>\n");
        for lat in Lat::ALL {
            let Some(h) = self.latency_ms.get(lat.name()) else { continue };
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
    }

    /// The audit's totals and counts, and the findings with links to `/debug/messages/{id}`.
    fn html_audit(&self, o: &mut String) {
        let a = &self.audit;
        let c = &a.counts;
        let _ = writeln!(
            o,
            "<h3>Audit</h3>\n<p>{} members audited ({} excluded); {} expected deliveries of {} acked messages, {} delivered.</p>\n\
             <table><tr><th>missing messages</th><th>missing deliveries</th><th>duplicate</th><th>reordered</th><th>gap</th><th>unacked</th><th>stored twice</th><th>refused but delivered</th><th>rejected</th><th>unknown then stored</th></tr>\
             <tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr></table>",
            a.members_audited, a.members_excluded, a.expected_deliveries, a.acked, a.delivered,
            c.missing_messages, c.missing_deliveries, c.duplicate_deliveries, c.reordered_deliveries,
            c.gap_seqs, c.unacked, c.stored_twice, c.refused_but_delivered, c.rejected, c.unknown_then_stored
        );
        if a.findings.is_empty() {
            return;
        }
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
                f.kind.name(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_every_markup_character() {
        assert_eq!(
            esc(r#"<a href="x">Tom & 'Jerry'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;Tom &amp; &#39;Jerry&#39;&lt;/a&gt;"
        );
        assert_eq!(esc("send→delivery"), "send→delivery");
    }
}
