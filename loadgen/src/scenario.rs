//! Scenario files: repeatable benchmarks described in TOML (see `loadgen/scenarios/`).
//!
//! A scenario sets any run parameter plus what flags cannot express: several rate phases
//! (`[[phase]]`, e.g. a burst) and reconnect storms (`[reconnect]`). Flags given on the command
//! line still win over the file.
//!
//! ```toml
//! name = "burst"
//! clients = 500
//! rooms = 50
//! room_dist = "zipf:1.1"
//! [[phase]]
//! duration = "10s"
//! rate = 200
//! [[phase]]
//! duration = "2s"
//! rate = 5000
//! [reconnect]
//! at = "5s"
//! fraction = 0.5
//! spread = "1s"
//! resume = true
//! ```

use std::path::Path;

use serde::Deserialize;

use crate::config::{parse_duration, BodySize, ConfigError, ReconnectPlan};
use crate::schedule::Phase;

/// A scenario file as written; every field is optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name shown in the report.
    pub name: Option<String>,
    /// What the scenario exercises.
    pub description: Option<String>,
    /// `--clients`.
    pub clients: Option<u32>,
    /// `--rooms`.
    pub rooms: Option<u32>,
    /// `--room-dist`: `uniform`, `zipf` or `zipf:S`.
    pub room_dist: Option<String>,
    /// `--rooms-per-client`.
    pub rooms_per_client: Option<u32>,
    /// `--ramp`: connections per second, 0 = all at once.
    pub ramp: Option<f64>,
    /// `--body-bytes`: a number or `"MIN-MAX"`.
    pub body_bytes: Option<BodySpec>,
    /// `--history-rate`.
    pub history_rate: Option<f64>,
    /// `--seed`.
    pub seed: Option<u64>,
    /// `--drain`, e.g. `"10s"`.
    pub drain: Option<String>,
    /// Rate phases, run back to back.
    #[serde(default, rename = "phase")]
    pub phases: Vec<PhaseSpec>,
    /// Reconnect storms.
    pub reconnect: Option<ReconnectSpec>,
}

/// A body size in a scenario: `100` or `"50-500"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum BodySpec {
    /// A fixed size.
    Fixed(usize),
    /// A size or range as text.
    Text(String),
}

impl BodySpec {
    /// The validated size.
    pub fn to_body_size(&self) -> Result<BodySize, String> {
        match self {
            Self::Fixed(n) => n.to_string().parse(),
            Self::Text(t) => t.parse(),
        }
    }
}

/// One `[[phase]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhaseSpec {
    /// How long, e.g. `"10s"`.
    pub duration: String,
    /// Sends per second during the phase (0 = idle).
    pub rate: f64,
}

/// The `[reconnect]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconnectSpec {
    /// First storm, from the start of the measured phase, e.g. `"5s"`.
    pub at: String,
    /// Repeat every this long (optional).
    pub every: Option<String>,
    /// Fraction of clients dropped per storm.
    pub fraction: f64,
    /// Window the drops of one storm are spread over (default `"0s"`: all at once).
    pub spread: Option<String>,
    /// Rejoin with `since` (default true).
    pub resume: Option<bool>,
}

impl ReconnectSpec {
    /// The validated plan.
    pub fn to_plan(&self) -> Result<ReconnectPlan, ConfigError> {
        let dur = |what: &'static str, text: &str| {
            parse_duration(text).map_err(|reason| ConfigError::Invalid { what, reason })
        };
        Ok(ReconnectPlan {
            at: dur("reconnect.at", &self.at)?,
            every: self.every.as_deref().map(|e| dur("reconnect.every", e)).transpose()?,
            fraction: self.fraction,
            spread: self.spread.as_deref().map(|s| dur("reconnect.spread", s)).transpose()?.unwrap_or_default(),
            resume: self.resume.unwrap_or(true),
        })
    }
}

impl Scenario {
    /// Reads and parses a scenario file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Scenario { path: path.into(), reason: e.to_string() })?;
        Self::parse(&text).map_err(|reason| ConfigError::Scenario { path: path.into(), reason })
    }

    /// Parses scenario TOML text.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// The rate phases, validated.
    pub fn phases(&self) -> Result<Vec<Phase>, ConfigError> {
        self.phases
            .iter()
            .map(|p| {
                Ok(Phase {
                    duration: parse_duration(&p.duration)
                        .map_err(|reason| ConfigError::Invalid { what: "phase.duration", reason })?,
                    rate: p.rate,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn shipped_scenarios_parse_and_validate() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            seen += 1;
            let cli = crate::config::Cli { scenario: Some(path.clone()), ..Default::default() };
            let config = cli.into_config(false).unwrap_or_else(|e| panic!("{path:?}: {e:?}"));
            assert!(config.scenario.is_some());
        }
        assert!(seen >= 4, "expected the four shipped scenarios, found {seen}");
    }

    #[test]
    fn phases_and_reconnect() {
        let s = Scenario::parse(
            r#"
            name = "x"
            body_bytes = "10-20"
            [[phase]]
            duration = "1s"
            rate = 10
            [[phase]]
            duration = "500ms"
            rate = 0
            [reconnect]
            at = "2s"
            fraction = 0.25
            "#,
        )
        .unwrap();
        let phases = s.phases().unwrap();
        assert_eq!(phases[1], Phase { duration: Duration::from_millis(500), rate: 0.0 });
        let r = s.reconnect.unwrap().to_plan().unwrap();
        assert!(r.resume);
        assert_eq!(r.at, Duration::from_secs(2));
        assert_eq!(s.body_bytes.unwrap().to_body_size(), Ok(BodySize { min: 10, max: 20 }));
        assert!(Scenario::parse("clients = 1\nbogus = 2").is_err());
    }
}
