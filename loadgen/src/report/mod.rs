//! What a run produces: [`Report`] with every figure and finding, written as JSON
//! (`--report`), as a human summary table (stdout), and as a self-contained HTML page with
//! inline SVG plots (`--html`: latency over time, throughput over time, latency distribution;
//! no scripts, no external files).
//!
//! - `model`: the [`Report`] and its parts, built from the runner's state; the JSON is its
//!   serialization;
//! - `text`: the summary on stdout ([`Report::summary`]);
//! - `html`: the HTML page ([`Report::html`]);
//! - `svg`: the line charts on that page ([`line_chart`]).

mod html;
mod model;
mod svg;
mod text;

pub use html::esc;
pub use model::{
    ClientStats, CpuStats, HistSummary, Quantile, Report, RoomStats, RunFacts, Samples, Throughput, Timing,
};
pub use svg::{line_chart, Series, XAxis};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

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
            drain: Duration::from_secs(5),
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
}
