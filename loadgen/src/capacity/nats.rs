//! `--nats URL`: how many messages per second one NATS server carries on this machine, measured
//! as core publish → subscribe of 200-byte messages (about a delivery's size) for a few seconds.
//!
//! This is the figure for deliveries and replies (core NATS). JetStream publishes (one per send,
//! stored and acked) cost the server more and are not measured here; docs/capacity.md says how
//! the planner treats them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use super::model::Throughput;

/// Publishes as fast as the client allows for `duration` and counts what a second connection
/// receives; returns messages received per second.
pub async fn measure(url: &str, duration: Duration) -> Result<Throughput, String> {
    let limit = duration + Duration::from_secs(10);
    let connect = |name: &'static str| async move {
        tokio::time::timeout(Duration::from_secs(5), async_nats::ConnectOptions::new().name(name).connect(url))
            .await
            .map_err(|_| format!("connecting to {url} timed out"))?
            .map_err(|e| format!("connecting to {url}: {e}"))
    };
    let publisher = connect("loadgen-capacity-pub").await?;
    let subscriber = connect("loadgen-capacity-sub").await?;
    let subject = format!("loadgen.capacity.{:08x}", rand::random::<u32>());
    let mut sub = subscriber.subscribe(subject.clone()).await.map_err(|e| format!("subscribing: {e}"))?;
    subscriber.flush().await.map_err(|e| format!("flushing: {e}"))?;

    let received = Arc::new(AtomicU64::new(0));
    let counter = {
        let received = received.clone();
        tokio::spawn(async move {
            while sub.next().await.is_some() {
                received.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let payload = bytes::Bytes::from(vec![b'x'; 200]);
    let start = Instant::now();
    let work = async {
        while start.elapsed() < duration {
            for _ in 0..256 {
                publisher.publish(subject.clone(), payload.clone()).await.map_err(|e| format!("publishing: {e}"))?;
            }
        }
        publisher.flush().await.map_err(|e| format!("flushing: {e}"))
    };
    tokio::time::timeout(limit, work).await.map_err(|_| "publishing timed out".to_string())??;
    // What was published has reached the server; give its last deliveries a moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let elapsed = start.elapsed().as_secs_f64();
    counter.abort();
    let n = received.load(Ordering::Relaxed);
    if n == 0 {
        return Err("no message came back".into());
    }
    Ok(Throughput {
        per_sec: n as f64 / elapsed,
        source: format!(
            "measured: core publish -> subscribe of 200-byte messages through {url} for {:.1} s ({n} received), on the machine above",
            elapsed
        ),
    })
}
