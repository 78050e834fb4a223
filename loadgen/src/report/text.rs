//! The human summary printed on stdout at the end of a run: a header, the throughput and latency
//! tables, errors and loadgen's CPU, then the audit with its findings and the verdict line.

use std::fmt::Write as _;

use super::model::Report;
use crate::metrics::Lat;

impl Report {
    /// The human summary: a few tables of plain text.
    pub fn summary(&self) -> String {
        let mut o = String::new();
        self.text_header(&mut o);
        let _ = writeln!(o);
        self.text_throughput(&mut o);
        let _ = writeln!(o);
        self.text_latency(&mut o);
        let _ = writeln!(o);
        self.text_errors_and_cpu(&mut o);
        let _ = writeln!(o);
        self.text_audit(&mut o);
        let _ = writeln!(o, "{}", self.audit.verdict);
        o
    }

    /// Version, scenario, seed, prefix, gateways; clients, rooms and phase lengths.
    fn text_header(&self, o: &mut String) {
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
        if let Some(r) = &cfg.replay {
            let _ = writeln!(
                o,
                "replay of {} at {}x: {} recorded sends of {} connections ({} left out: no hello or room not joined; {} half-written last lines)",
                r.dir.display(),
                cfg.replay_speed,
                r.sends.len(),
                r.users.len(),
                r.skipped_sends,
                r.cut_lines
            );
        }
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
    }

    /// Scheduled, sent, acked and delivered: totals and per second.
    fn text_throughput(&self, o: &mut String) {
        let th = &self.throughput;
        let _ = writeln!(o, "{:<18}{:>12}{:>12}{:>12}{:>14}", "throughput", "scheduled", "sent", "acked", "delivered");
        let _ = writeln!(o, "{:<18}{:>12}{:>12}{:>12}{:>14}", "  total", th.scheduled, th.sent, th.acked, th.delivered);
        let _ = writeln!(
            o,
            "{:<18}{:>12}{:>12.1}{:>12.1}{:>14.1}",
            "  per second", "", th.sent_per_s, th.acked_per_s, th.delivered_per_s
        );
    }

    /// One row per latency histogram.
    fn text_latency(&self, o: &mut String) {
        let _ = writeln!(
            o,
            "{:<18}{:>9}{:>10}{:>10}{:>10}{:>10}{:>10}{:>10}",
            "latency (ms)", "count", "p50", "p90", "p99", "p99.9", "max", "mean"
        );
        for lat in Lat::ALL {
            let Some(h) = self.latency_ms.get(lat.name()) else { continue };
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
        let hops = &self.samples.hops;
        if hops.requested > 0 || hops.error.is_some() {
            let _ = write!(
                o,
                "journeys: {} of {} read for per-hop timings ({} hop pairs)",
                hops.read,
                hops.requested,
                hops.pairs.len()
            );
            match &hops.error {
                Some(e) => {
                    let _ = writeln!(o, "; {e}");
                }
                None => {
                    let _ = writeln!(o);
                }
            }
        }
    }

    /// Errors by code, and what loadgen's own CPU cost per delivery.
    fn text_errors_and_cpu(&self, o: &mut String) {
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
    }

    /// The audit's totals, counts per kind and the findings table.
    fn text_audit(&self, o: &mut String) {
        let a = &self.audit;
        let _ = writeln!(
            o,
            "audit: {} members audited ({} excluded), {} expected deliveries, {} delivered, {} sent, {} acked, {} not sent",
            a.members_audited, a.members_excluded, a.expected_deliveries, a.delivered, a.sent, a.acked, a.not_sent
        );
        let c = &a.counts;
        let _ = writeln!(
            o,
            "  missing {} ({} deliveries) | duplicate {} | reordered {} | gap {} | unacked {} | stored twice {} | refused but delivered {} | rejected {} | unknown then stored {} | stray {}",
            c.missing_messages,
            c.missing_deliveries,
            c.duplicate_deliveries,
            c.reordered_deliveries,
            c.gap_seqs,
            c.unacked,
            c.stored_twice,
            c.refused_but_delivered,
            c.rejected,
            c.unknown_then_stored,
            a.stray_deliveries
        );
        if a.scheduled > 0 && a.members_expecting_none > 0 {
            let _ = writeln!(
                o,
                "  {} of the audited members expected no message (no acked send to their room after they joined)",
                a.members_expecting_none
            );
        }
        if a.findings.is_empty() {
            return;
        }
        let _ = writeln!(
            o,
            "  {:<22}{:<16}{:>8}  {:<38}{:<34}{:>6}  detail",
            "kind", "room", "seq", "id", "trace_id", "count"
        );
        for f in &a.findings {
            let _ = writeln!(
                o,
                "  {:<22}{:<16}{:>8}  {:<38}{:<34}{:>6}  {}",
                f.kind.name(),
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
}
