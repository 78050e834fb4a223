//! Measures the CQL store against a running node: append throughput with 1 and 50 messages per
//! append (one room, and several rooms at once), and the latency of 50-message history pages.
//!
//! ```text
//! cargo run --release -p storage --example cql_bench -- [NODE] [ROOMS] [MESSAGES]
//! ```
//! NODE defaults to `127.0.0.1:9042`, ROOMS (concurrent writers, one room each) to 16, MESSAGES
//! (per run) to 4000. Uses a fresh keyspace `bench_<pid>` and drops it at the end.

use std::time::{Duration, Instant};

use protocol::ChatMessage;
use storage::cql::{CqlConfig, CqlStore};
use storage::{HistoryStore, PageQuery, RoomAppend};
use uuid::Uuid;

type Error = Box<dyn std::error::Error>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let node = args.first().cloned().unwrap_or_else(|| "127.0.0.1:9042".into());
    let rooms: usize = args.get(1).map_or(Ok(16), |a| a.parse())?;
    let total: u64 = args.get(2).map_or(Ok(4000), |a| a.parse())?;
    let keyspace = format!("bench_{}", std::process::id());
    let config = CqlConfig { nodes: vec![node.clone()], keyspace, ..CqlConfig::default() };
    let store = CqlStore::connect(config).await?;
    println!("node {node}, keyspace {}, {total} messages per run", store.keyspace());

    let result = run(&store, rooms, total).await;
    store.drop_keyspace().await?;
    result
}

async fn run(store: &CqlStore, rooms: usize, total: u64) -> Result<(), Error> {
    for batch in [1u64, 50] {
        for writers in [1, rooms] {
            let prefix = format!("w{batch}x{writers}");
            let started = Instant::now();
            let per_room = total / writers as u64;
            let runs = (0..writers).map(|r| append_room(store, format!("{prefix}-{r}"), per_room, batch));
            let latencies: Vec<Duration> =
                futures_util::future::try_join_all(runs).await?.into_iter().flatten().collect();
            let elapsed = started.elapsed();
            let messages = per_room * writers as u64;
            println!(
                "append batch={batch:<2} rooms={writers:<3} {messages} msgs in {:.2}s = {:>6.0} msg/s; \
                 append p50 {} p99 {}",
                elapsed.as_secs_f64(),
                messages as f64 / elapsed.as_secs_f64(),
                ms(percentile(&latencies, 50.0)),
                ms(percentile(&latencies, 99.0)),
            );
        }
    }

    // History pages of 50 from a room of 2000 messages: newest, and before scattered seqs.
    let room = "pages";
    append_room(store, room.into(), 2000, 200).await?;
    let mut latencies = Vec::new();
    let mut before = 7u64;
    for i in 0..1000 {
        before = (before * 1103 + 17) % 2000 + 1;
        let query =
            if i % 4 == 0 { PageQuery::newest(50) } else { PageQuery { before: Some(before), after: None, limit: 50 } };
        let started = Instant::now();
        let page = store.page(room, query).await?;
        latencies.push(started.elapsed());
        if page.messages.is_empty() && before > 1 {
            return Err("empty page".into());
        }
    }
    println!(
        "page of 50 (1000 reads, sequential): p50 {} p99 {}",
        ms(percentile(&latencies, 50.0)),
        ms(percentile(&latencies, 99.0)),
    );
    Ok(())
}

/// Appends `count` messages to a fresh room, `batch` per append; returns each append's latency.
async fn append_room(store: &CqlStore, room: String, count: u64, batch: u64) -> Result<Vec<Duration>, Error> {
    let mut latencies = Vec::new();
    let mut last = 0;
    while last < count {
        let n = batch.min(count - last);
        let messages = (last + 1..=last + n).map(|seq| message(&room, seq)).collect();
        let started = Instant::now();
        store.append(RoomAppend { room: room.clone(), expected_last_seq: last, messages }).await?;
        latencies.push(started.elapsed());
        last += n;
    }
    Ok(latencies)
}

fn message(room: &str, seq: u64) -> ChatMessage {
    ChatMessage {
        room: room.into(),
        seq,
        id: Uuid::now_v7(),
        user: format!("user{}", seq % 7),
        body: "a chat message of a typical length, some sixty bytes long...".into(),
        ts: 1_700_000_000_000 + seq as i64,
        client_msg_id: Uuid::new_v4().to_string(),
        trace_id: format!("{seq:032x}"),
        prev: None,
        digest: None,
    }
}

fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let index = ((p / 100.0) * (sorted.len().saturating_sub(1)) as f64).round() as usize;
    sorted.get(index).copied().unwrap_or_default()
}

fn ms(d: Duration) -> String {
    format!("{:.2}ms", d.as_secs_f64() * 1000.0)
}
