//! Real services for tests, started by the tests themselves:
//!
//! - [`NatsServer`] (`nats`): a `nats-server` with JetStream on a dynamic port, one per test
//!   binary or test, killed on drop; restartable on the same port and store for outage tests.
//! - [`Prometheus`] (`prometheus`): a real `prometheus` on a dynamic port scraping given targets
//!   every second, with PromQL queries for assertions, killed on drop; [`promtool`] to check
//!   rule files.
//! - [`cassandra()`] (`cassandra`): the address of the one Cassandra node shared by the whole
//!   test run (`CHAT_TEST_CQL`, or started once through `deploy/cassandra/start`), and
//!   [`unique_keyspace`] so tests never share data; [`DedicatedCassandra`] for a node a test may
//!   freeze.
//! - [`NatsCluster`] (`nats_cluster`): a multi-node JetStream cluster of a current nats-server,
//!   with nodes killed, restarted, or run inside a [`Netns`] (`netns`): a network namespace
//!   joined to the host by veth links a test cuts for a real partition.
//! - [`cassandra_ring`]: the three-node Cassandra ring shared by the multi-node tests.
//! - [`ChatProcess`] (`process`): a `chat` binary in a subprocess, for kill -9 tests, and
//!   [`wait_ready`] for its `/readyz`.
//! - [`Cluster`] (`cluster`): nats-server, fanout workers and gateways as `chat` processes on
//!   the Cassandra node, in a keyspace of their own, all killed on drop.
//! - [`Relay`] (`relay`): a loopback TCP relay that a test cuts and restores, to partition one
//!   process from a service while everything else keeps talking to it.
//! - [`Jaeger`] (`jaeger`): a real Jaeger on dynamic ports (OTLP over HTTP in, its query API
//!   out, spans kept in memory), killed on drop.
//! - [`message()`] (`message`): a chat message as a worker would store it, for tests that write a
//!   store directly.
//! - [`metric`] and [`metric_or_zero`] (`metrics`): a sample's value in a `/metrics` text, failing
//!   loudly (with the similar names present) when it is missing.
//!
//! A missing binary or an unreachable service panics with what to install or start: tests that
//! need a service fail, they never skip.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::Duration;

mod cassandra;
mod cassandra_ring;
mod cluster;
mod jaeger;
mod message;
mod metrics;
mod nats;
mod nats_cluster;
mod netns;
mod process;
mod prometheus;
mod relay;

pub use cassandra::{cassandra, unique_keyspace, DedicatedCassandra};
pub use cassandra_ring::{cassandra_ring, freeze_ring_node, kill_ring_node, restart_ring_node, FrozenRingNode};
pub use cluster::{Cluster, ClusterBuilder};
pub use jaeger::Jaeger;
pub use message::message;
pub use metrics::{metric, metric_or_zero};
pub use nats::NatsServer;
pub use nats_cluster::{NatsCluster, NatsNodeAt};
pub use netns::{InsideRelay, Netns};
pub use process::{wait_ready, ChatProcess, READY_TIMEOUT};
pub use prometheus::{promtool, Prometheus};
pub use relay::Relay;

/// How long a service may take to come up before the test fails.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A port free on the host's loopback right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("bind 127.0.0.1:0").port()
}

/// Waits until `url` answers 2xx, for at most [`START_TIMEOUT`]; on failure (the child exited, or
/// time ran out) returns why, with the child's `log`.
async fn wait_answering(child: &mut std::process::Child, url: &str, log: &Path) -> Result<(), String> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().expect("HTTP client");
    let deadline = std::time::Instant::now() + START_TIMEOUT;
    let log = || std::fs::read_to_string(log).unwrap_or_default();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited with {status}\n{}", log()));
        }
        if let Ok(response) = http.get(url).send().await {
            if response.status().is_success() {
                return Ok(());
            }
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("{url} did not answer within {START_TIMEOUT:?}\n{}", log()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The workspace root (where `deploy/` lives).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("testkit lives in the workspace").to_owned()
}
