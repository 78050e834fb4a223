//! The `HistoryStore` test suite: every case in [`cases`] runs against the embedded (fjall) store
//! and against Cassandra (one fresh keyspace per test, dropped afterwards); [`cql`] holds the
//! cases only the CQL store has (an interrupted append, connecting).
//!
//! The Cassandra node comes from `CHAT_TEST_CQL` (default `127.0.0.1:9042`). When it does not
//! answer, the Cassandra tests fail and say how to start it; they never skip.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cases;
mod cql;

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::FutureExt;
use storage::cql::{CqlConfig, CqlStore};
use storage::embedded::EmbeddedStore;

/// The Cassandra node the tests use.
pub fn cql_node() -> String {
    std::env::var("CHAT_TEST_CQL").unwrap_or_else(|_| "127.0.0.1:9042".into())
}

/// A config for a fresh keyspace, unique per test and run.
pub fn fresh_config(case: &str) -> CqlConfig {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() % 1_000_000_000;
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut keyspace = format!("t{stamp}_{}_{n}_{case}", std::process::id());
    keyspace.truncate(48);
    CqlConfig { nodes: vec![cql_node()], keyspace, ..CqlConfig::default() }
}

/// Connects, or fails the test saying how to start Cassandra.
pub async fn connect(config: CqlConfig) -> CqlStore {
    let node = cql_node();
    match tokio::time::timeout(Duration::from_secs(90), CqlStore::connect(config)).await {
        Ok(Ok(store)) => store,
        Ok(Err(e)) => panic!(
            "Cassandra at {node} (CHAT_TEST_CQL) is not usable: {e}\n\
             Start the local node with `deploy/cassandra/start --dir /tmp/chat-cassandra` \
             (see docs/cassandra-local.md) or point CHAT_TEST_CQL at a running node."
        ),
        Err(_) => panic!(
            "Cassandra at {node} (CHAT_TEST_CQL) did not answer within 90 s.\n\
             Start the local node with `deploy/cassandra/start --dir /tmp/chat-cassandra` \
             (see docs/cassandra-local.md) or point CHAT_TEST_CQL at a running node."
        ),
    }
}

/// A fresh embedded store in a temporary directory (kept alive by the returned guard).
pub fn embedded() -> (EmbeddedStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    (store, dir)
}

/// Runs a test body with two stores (separate sessions) on one fresh keyspace, then drops the
/// keyspace (best effort) whether the body passed or panicked.
pub async fn with_cassandra<F>(case: &str, body: F)
where
    F: AsyncFnOnce(&CqlStore, &CqlStore),
{
    let config = fresh_config(case);
    let store = connect(config.clone()).await;
    let other = connect(config).await;
    let outcome = AssertUnwindSafe(body(&store, &other)).catch_unwind().await;
    if let Err(e) = store.drop_keyspace().await {
        eprintln!("could not drop test keyspace {}: {e}", store.keyspace());
    }
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// Declares a case of [`cases`] for both backends: `case::embedded` and `case::cassandra`.
/// With `two_stores`, the body gets a second store on the same data (for the embedded store,
/// the same one: its directory has one owner).
macro_rules! both_backends {
    ($case:ident) => {
        mod $case {
            #[tokio::test]
            async fn embedded() {
                let (store, _dir) = crate::embedded();
                crate::cases::$case(&store).await;
            }

            #[tokio::test]
            async fn cassandra() {
                crate::with_cassandra(stringify!($case), async |store, _| crate::cases::$case(store).await).await;
            }
        }
    };
    ($case:ident, two_stores) => {
        mod $case {
            #[tokio::test]
            async fn embedded() {
                let (store, _dir) = crate::embedded();
                crate::cases::$case(&store, &store).await;
            }

            #[tokio::test]
            async fn cassandra() {
                crate::with_cassandra(stringify!($case), async |store, other| crate::cases::$case(store, other).await)
                    .await;
            }
        }
    };
}

both_backends!(appends_and_reads_last_seq);
both_backends!(conflict_stores_nothing);
both_backends!(pages);
both_backends!(pages_across_buckets);
both_backends!(dedupe_lookup);
both_backends!(get_by_id);
both_backends!(ping);
both_backends!(chain_fields_round_trip);
both_backends!(concurrent_appends_one_wins, two_stores);
