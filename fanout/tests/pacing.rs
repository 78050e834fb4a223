//! A worker's batch window (`FanoutConfig::batch_window`), over the in-process bus and the
//! embedded store as the all-in-one runs them: under a steady stream of sends it takes them in
//! few batches, one per window; a lone send after a quiet spell is not held.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test harness: a failed set-up step should panic

use std::sync::Arc;
use std::time::{Duration, Instant};

use bus::local::LocalBus;
use bus::SendBus;
use fanout::{Fanout, FanoutConfig};
use protocol::bus::SendCommand;
use storage::embedded::{EmbeddedOptions, EmbeddedStore};
use telemetry::journal::Journal;
use telemetry::metrics::Metrics;

/// The window of these tests: long against the pace of the sends, so that the number of
/// batches tells paced from unpaced on a loaded machine.
const WINDOW: Duration = Duration::from_millis(100);
/// Sends of the steady stream, one every [`EVERY`].
const SENDS: usize = 100;
const EVERY: Duration = Duration::from_millis(5);

struct Running {
    bus: Arc<LocalBus>,
    metrics: Metrics,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

fn start(batch_window: Duration) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let options = EmbeddedOptions { commit_window: Duration::ZERO };
    let store = Arc::new(EmbeddedStore::open_with(dir.path(), options).unwrap());
    let bus = Arc::new(LocalBus::new());
    let metrics = Metrics::new();
    let config = FanoutConfig { batch_window, ..FanoutConfig::default() };
    let worker = Fanout::new(store, bus.clone(), Arc::new(Journal::new("w", 100)), metrics.clone(), config);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(worker.run(async move {
        let _ = stopped.await;
    }));
    Running { bus, metrics, stop, task, _dir: dir }
}

fn command(client_msg_id: String) -> SendCommand {
    SendCommand {
        room: "r".into(),
        user: "alice".into(),
        body: format!("body of {client_msg_id}"),
        client_msg_id,
        traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
        gateway: "gw-1".into(),
        deadline_ms: protocol::now_ms() + 30_000,
    }
}

/// Submits [`SENDS`] sends, one every [`EVERY`], each without waiting for the one before;
/// returns their seqs in the order sent.
async fn steady_stream(bus: &Arc<LocalBus>) -> Vec<u64> {
    let mut answers = Vec::with_capacity(SENDS);
    let mut tick = tokio::time::interval(EVERY);
    for n in 0..SENDS {
        tick.tick().await;
        let bus = bus.clone();
        answers.push(tokio::spawn(async move { bus.submit(command(format!("s{n}"))).await }));
    }
    let mut seqs = Vec::with_capacity(SENDS);
    for answer in answers {
        seqs.push(answer.await.unwrap().expect("every send is stored").message.seq);
    }
    seqs
}

/// How many batches the worker has taken, from its `chat_fanout_batch_size` histogram.
fn batches_taken(metrics: &Metrics) -> u64 {
    let rendered = metrics.render();
    let line = rendered.lines().find(|line| line.starts_with("chat_fanout_batch_size_count"));
    let value = line.and_then(|line| line.split_whitespace().nth(1)).expect("the batch histogram is exported");
    value.parse().expect("a count")
}

async fn stop(running: Running) {
    let _ = running.stop.send(());
    running.task.await.unwrap();
}

#[tokio::test]
async fn under_a_steady_stream_a_paced_worker_takes_one_batch_per_window() {
    let running = start(WINDOW);
    let started = Instant::now();
    let mut seqs = steady_stream(&running.bus).await;
    let took = started.elapsed();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=SENDS as u64).collect::<Vec<_>>(), "every send stored once, gapless");
    let batches = batches_taken(&running.metrics);
    // One batch per window, and a few while the worker learns the rate; unpaced, about one per
    // send (see the next test).
    let most = took.as_millis() / WINDOW.as_millis() + 5;
    assert!(batches as u128 <= most, "{batches} batches in {took:?}: more than one per window");
    stop(running).await;
}

/// The same stream with no window: the worker takes each send as it comes, so the paced
/// worker's few batches above are its pacing, not the stream's shape.
#[tokio::test]
async fn under_the_same_stream_an_unpaced_worker_takes_many_more_batches() {
    let running = start(Duration::ZERO);
    let started = Instant::now();
    steady_stream(&running.bus).await;
    let took = started.elapsed();
    let batches = batches_taken(&running.metrics);
    let paced_most = took.as_millis() / WINDOW.as_millis() + 5;
    assert!(batches as u128 > 2 * paced_most, "only {batches} batches in {took:?} with no window");
    stop(running).await;
}

/// A send after a quiet spell starts a batch at once: sends rarer than one per window are
/// never held (one every 2 s against a 1 s window).
#[tokio::test]
async fn a_lone_send_after_a_quiet_spell_is_not_held() {
    let window = Duration::from_secs(1);
    let running = start(window);
    for n in 0..3 {
        if n > 0 {
            tokio::time::sleep(2 * window).await;
        }
        let started = Instant::now();
        let stored = running.bus.submit(command(format!("lone{n}"))).await.expect("stored");
        assert_eq!(stored.message.seq, n + 1);
        let took = started.elapsed();
        assert!(took < window / 2, "send {n} was held {took:?}");
    }
    stop(running).await;
}
