//! Reading a run's `--report` JSON for `loadgen compare`: only the fields a comparison uses,
//! each optional where older reports lack it (a report written before `samples` existed loads,
//! and its latencies are shown from its percentiles without a test).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::journeys::HopSamples;
use crate::metrics::Sample;

/// A report that cannot be compared.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InputError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a loadgen report.
    #[error("{path} is not a loadgen --report file: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What did not fit.
        reason: String,
    },
}

/// What a comparison reads of one report.
#[derive(Debug, Clone, Deserialize)]
pub struct Run {
    /// The file it came from (set after reading).
    #[serde(skip)]
    pub path: PathBuf,
    /// loadgen's version.
    #[serde(default)]
    pub loadgen_version: String,
    /// The configuration, as written (compared field by field for a warning).
    #[serde(default)]
    pub config: serde_json::Value,
    /// Phase lengths.
    #[serde(default)]
    pub timing: TimingIn,
    /// Counts and rates.
    pub throughput: ThroughputIn,
    /// Latency summaries by name, ms.
    #[serde(default)]
    pub latency_ms: BTreeMap<String, HistIn>,
    /// The audit's verdict and counts.
    pub audit: AuditIn,
    /// Raw samples (absent in reports of loadgen before `compare`).
    #[serde(default)]
    pub samples: Option<SamplesIn>,
}

/// Phase lengths.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct TimingIn {
    /// Measured phase, seconds.
    pub measure_s: f64,
}

/// Counts and rates.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ThroughputIn {
    /// Sends in the schedule.
    pub scheduled: u64,
    /// Sends written.
    pub sent: u64,
    /// Acks.
    pub acked: u64,
    /// First deliveries.
    pub delivered: u64,
}

/// One latency summary, ms.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct HistIn {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
}

/// The audit's figures.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct AuditIn {
    /// The audit passed.
    pub passed: bool,
    /// One line verdict.
    pub verdict: String,
    /// Sends written.
    pub sent: u64,
    /// Sends acked.
    pub acked: u64,
    /// (acked message, expected member) pairs.
    pub expected_deliveries: u64,
    /// Of those, delivered.
    pub delivered: u64,
    /// Counts per kind.
    pub counts: CountsIn,
}

/// Finding counts.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct CountsIn {
    /// Missing (message, member) deliveries.
    pub missing_deliveries: u64,
    /// Duplicate deliveries.
    pub duplicate_deliveries: u64,
    /// Reordered deliveries.
    pub reordered_deliveries: u64,
    /// Sends with no answer.
    pub unacked: u64,
    /// Sends answered with an error and never delivered.
    pub rejected: u64,
}

/// Raw samples.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SamplesIn {
    /// Latency samples (µs) by name.
    pub latency_us: BTreeMap<String, Sample>,
    /// Per-hop durations.
    pub hops: HopSamples,
}

impl Run {
    /// Reads and checks one report.
    pub fn read(path: &Path) -> Result<Self, InputError> {
        let text = std::fs::read_to_string(path).map_err(|source| InputError::Read { path: path.into(), source })?;
        Self::parse(&text, path)
    }

    /// Parses a report's text (`path` names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, InputError> {
        let parse_err = |reason: String| InputError::Parse { path: path.into(), reason };
        let mut run: Run = serde_json::from_str(text).map_err(|e| parse_err(e.to_string()))?;
        if run.timing.measure_s <= 0.0 {
            return Err(parse_err("timing.measure_s is missing or zero".into()));
        }
        run.path = path.into();
        Ok(run)
    }

    /// The latency sample `name` (µs), when the report has one.
    pub fn latency_sample(&self, name: &str) -> Option<&[u64]> {
        let s = self.samples.as_ref()?.latency_us.get(name)?;
        (!s.values.is_empty()).then_some(s.values.as_slice())
    }

    /// The per-hop samples, when the report has any.
    pub fn hops(&self) -> Option<&HopSamples> {
        self.samples.as_ref().map(|s| &s.hops)
    }

    /// A one-line description: seed, clients, rooms, rate and length, samples.
    pub fn describe(&self) -> String {
        let c = &self.config;
        let rate: f64 = c["phases"]
            .as_array()
            .map(|ps| {
                let (sends, secs) = ps.iter().fold((0.0, 0.0), |(n, t), p| {
                    let d = p["duration"].as_f64().unwrap_or(0.0);
                    (n + p["rate"].as_f64().unwrap_or(0.0) * d, t + d)
                });
                if secs > 0.0 {
                    sends / secs
                } else {
                    0.0
                }
            })
            .unwrap_or(0.0);
        let journeys = self.hops().map_or(0, |h| h.read);
        format!(
            "loadgen {}, seed {}, {} clients, {} rooms, {rate:.0} sends/s for {:.1} s, {} acked, {} journeys{}",
            if self.loadgen_version.is_empty() { "?" } else { &self.loadgen_version },
            c["seed"],
            c["clients"],
            c["rooms"],
            self.timing.measure_s,
            self.throughput.acked,
            journeys,
            if self.samples.is_none() { " (no samples: an older report)" } else { "" }
        )
    }
}

/// The configuration fields that make two runs comparable, and where A and B differ in them.
pub fn config_differences(a: &Run, b: &Run) -> Vec<String> {
    const FIELDS: [&str; 8] =
        ["clients", "rooms", "rooms_per_client", "room_dist", "phases", "body", "history_rate", "reconnect"];
    FIELDS
        .iter()
        .filter(|f| a.config.get(**f) != b.config.get(**f))
        .map(|f| {
            let show = |v: Option<&serde_json::Value>| v.map_or("-".to_string(), |v| v.to_string());
            format!("{f} {} vs {}", show(a.config.get(*f)), show(b.config.get(*f)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_reports_without_samples_load_and_junk_is_refused() {
        let old = r#"{"passed": true, "config": {"seed": 1, "clients": 2, "rooms": 1, "phases": [{"duration": 2.0, "rate": 10.0}]},
            "timing": {"ramp_s": 0.1, "measure_s": 2.0, "drain_s": 0.2},
            "throughput": {"scheduled": 20, "sent": 20, "acked": 20, "delivered": 40},
            "latency_ms": {"send_to_delivery": {"count": 40, "min": 1.0, "mean": 2.0, "p50": 2.0, "p90": 3.0, "p99": 4.0, "p999": 4.0, "max": 4.0}},
            "audit": {"passed": true, "verdict": "PASSED", "sent": 20, "acked": 20, "expected_deliveries": 40, "delivered": 40,
                      "counts": {"missing_messages": 0, "missing_deliveries": 0, "duplicate_deliveries": 0}}}"#;
        let run = Run::parse(old, Path::new("old.json")).unwrap();
        assert!(run.samples.is_none() && run.latency_sample("send_to_delivery").is_none());
        assert_eq!(run.latency_ms["send_to_delivery"].p99, 4.0);
        assert!(run.describe().contains("10 sends/s for 2.0 s"), "{}", run.describe());
        assert!(matches!(Run::parse("{}", Path::new("x.json")), Err(InputError::Parse { .. })));
        assert!(matches!(Run::parse("not json", Path::new("x.json")), Err(InputError::Parse { .. })));
        assert!(matches!(Run::read(Path::new("/nonexistent/r.json")), Err(InputError::Read { .. })));
        let mut other = run.clone();
        other.config["clients"] = 3.into();
        assert_eq!(config_differences(&run, &other), ["clients 2 vs 3"]);
    }
}
