//! `loadgen`: an open-loop load generator for chat protocol v1 that is also an auditor of every
//! delivery.
//!
//! A run ([`run`] / [`run_until`]) connects simulated clients, joins them to rooms, sends on a
//! fixed schedule, checks every `message` frame as it arrives, and ends with a [`Report`]:
//! latency histograms, throughput over time, errors by code, and the [`audit::AuditResult`]
//! naming every missing, duplicate, reordered, gapped or unacked message by id, room, seq and
//! trace id.
//!
//! - [`config`]: flags, environment, defaults, validation.
//! - [`scenario`]: TOML scenario files (phases, reconnect storms).
//! - [`plan`]: users, rooms, who is in which room (uniform or zipf sizes).
//! - [`schedule`]: the open-loop schedule of sends, history reads and disconnects.
//! - [`client`]: one simulated client and its connection.
//! - [`centrifugo`]: the same client speaking Centrifugo's protocol (`--protocol centrifugo`).
//! - [`audit`]: the per-message records, per-member tracks and the verdict.
//! - [`metrics`]: HDR histograms and the once-a-second timeline.
//! - [`report`]: JSON, the summary table, and HTML with inline SVG plots.
//! - [`progress`]: the live progress line.
//! - [`replay`]: a gateway recording read back as plan and schedule (`--replay`).
//! - [`bench`]: the auditor's CPU cost on its own.
//! - [`capacity`]: unit costs measured into a model file, and deployment plans from it.
//! - [`journeys`]: per-hop timings from message journeys sampled after a run.
//! - [`compare`]: `loadgen compare A.json B.json`, a regression test of one run against another.

pub mod audit;
pub mod bench;
pub mod capacity;
pub mod centrifugo;
pub mod client;
pub mod compare;
pub mod config;
pub mod journeys;
pub mod metrics;
mod outgoing;
pub mod plan;
pub mod progress;
pub mod replay;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod schedule;

pub use audit::{AuditResult, Finding, FindingKind};
pub use config::{Cli, Config, ConfigError};
pub use report::Report;
pub use runner::{run, run_until, RunError};
