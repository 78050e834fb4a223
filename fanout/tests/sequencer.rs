//! The sequencer's decisions, driven directly: a scripted bus hands the worker batches, a real
//! embedded store keeps what it stores, and a store wrapper fails appends on demand. Each test
//! names one rule: conflicts re-sequence, expired sends are not stored, an append whose outcome
//! is unknown is resolved before answering, and repeats (in a batch or across batches) are one
//! message.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test harness: a failed set-up step should panic

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bus::{BusError, BusErrorKind, FanoutBus, PendingSend, Replier};
use fanout::{Clock, Fanout, FanoutConfig};
use protocol::bus::{SendCommand, SendOutcome};
use protocol::ChatMessage;
use storage::embedded::EmbeddedStore;
use storage::{HistoryStore, Page, PageQuery, RoomAppend, StoreError};
use telemetry::journal::Journal;
use telemetry::metrics::Metrics;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

// === a scripted bus ===

/// Hands out the batches a test pushes; records what the worker publishes.
struct ScriptedBus {
    batches: tokio::sync::Mutex<mpsc::UnboundedReceiver<Vec<PendingSend>>>,
    published: Mutex<Vec<Arc<ChatMessage>>>,
}

#[async_trait]
impl FanoutBus for ScriptedBus {
    async fn next_batch(&self, _max: usize) -> Option<Vec<PendingSend>> {
        self.batches.lock().await.recv().await
    }

    async fn deliver(&self, message: Arc<ChatMessage>, _traceparent: &str) -> Result<(), BusError> {
        self.published.lock().unwrap().push(message);
        Ok(())
    }
}

struct Answer(oneshot::Sender<Result<SendOutcome, BusError>>);

#[async_trait]
impl Replier for Answer {
    async fn reply(self: Box<Self>, outcome: Result<SendOutcome, BusError>) {
        let _ = self.0.send(outcome);
    }
}

// === a store that fails on demand ===

/// How the next append fails.
#[derive(Clone, Copy)]
enum Failure {
    /// Stored, but the answer is lost (a timed-out write that landed).
    AppliedButUnanswered,
    /// Not stored, and the answer is an error.
    NotApplied,
}

struct FlakyStore {
    inner: EmbeddedStore,
    next_append: Mutex<Option<Failure>>,
}

#[async_trait]
impl HistoryStore for FlakyStore {
    async fn append(&self, batch: RoomAppend) -> Result<(), StoreError> {
        let failure = self.next_append.lock().unwrap().take();
        match failure {
            None => self.inner.append(batch).await,
            Some(Failure::AppliedButUnanswered) => {
                self.inner.append(batch).await?;
                Err(StoreError::unavailable("append timed out"))
            }
            Some(Failure::NotApplied) => Err(StoreError::unavailable("append timed out")),
        }
    }
    async fn last_seq(&self, room: &str) -> Result<u64, StoreError> {
        self.inner.last_seq(room).await
    }
    async fn find_by_client_msg_id(&self, room: &str, user: &str, id: &str) -> Result<Option<ChatMessage>, StoreError> {
        self.inner.find_by_client_msg_id(room, user, id).await
    }
    async fn page(&self, room: &str, query: PageQuery) -> Result<Page, StoreError> {
        self.inner.page(room, query).await
    }
    async fn get_by_id(&self, id: Uuid) -> Result<Option<ChatMessage>, StoreError> {
        self.inner.get_by_id(id).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
}

// === the harness ===

struct Worker {
    batches: mpsc::UnboundedSender<Vec<PendingSend>>,
    bus: Arc<ScriptedBus>,
    store: Arc<FlakyStore>,
    metrics: Metrics,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

struct FixedClock;
impl Clock for FixedClock {
    fn stamp_ms(&self, _room: &str) -> i64 {
        1_700_000_000_000
    }
}

fn worker() -> Worker {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FlakyStore { inner: EmbeddedStore::open(dir.path()).unwrap(), next_append: Mutex::new(None) });
    let (batches, receiver) = mpsc::unbounded_channel();
    let bus = Arc::new(ScriptedBus { batches: tokio::sync::Mutex::new(receiver), published: Mutex::default() });
    let metrics = Metrics::new();
    let fanout = Fanout::new(
        store.clone(),
        bus.clone(),
        Arc::new(Journal::new("w", 100)),
        metrics.clone(),
        FanoutConfig::default(),
    )
    .with_clock(Arc::new(FixedClock));
    let task = tokio::spawn(fanout.run(std::future::pending()));
    Worker { batches, bus, store, metrics, task, _dir: dir }
}

fn command(room: &str, client_msg_id: &str, deadline_ms: i64) -> SendCommand {
    SendCommand {
        room: room.into(),
        user: "alice".into(),
        client_msg_id: client_msg_id.into(),
        body: format!("body of {client_msg_id}"),
        traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
        gateway: "gw-1".into(),
        deadline_ms,
    }
}

fn soon() -> i64 {
    protocol::now_ms() + 5_000
}

impl Worker {
    /// Hands the worker one batch and waits for every answer, in order.
    async fn batch(&self, commands: Vec<SendCommand>) -> Vec<Result<SendOutcome, BusError>> {
        let (pending, answers): (Vec<_>, Vec<_>) = commands
            .into_iter()
            .map(|command| {
                let (tx, rx) = oneshot::channel();
                (PendingSend { command, delivery: 1, reply: Box::new(Answer(tx)) }, rx)
            })
            .unzip();
        self.batches.send(pending).unwrap();
        let mut outcomes = Vec::new();
        for answer in answers {
            outcomes.push(answer.await.expect("every send is answered"));
        }
        outcomes
    }

    async fn send(&self, command: SendCommand) -> Result<SendOutcome, BusError> {
        self.batch(vec![command]).await.remove(0)
    }

    async fn stored(&self, room: &str) -> Vec<ChatMessage> {
        self.store.page(room, PageQuery::newest(200)).await.unwrap().messages
    }

    async fn stop(self) {
        drop(self.batches);
        self.task.await.unwrap();
    }
}

fn seq(outcome: &Result<SendOutcome, BusError>) -> u64 {
    outcome.as_ref().expect("stored").message.seq
}

// === the rules ===

#[tokio::test]
async fn sends_get_consecutive_seqs_the_clocks_ts_and_are_published_in_order() {
    let worker = worker();
    let outcomes = worker.batch(vec![command("r", "a", soon()), command("r", "b", soon())]).await;
    assert_eq!(outcomes.iter().map(seq).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(outcomes[0].as_ref().unwrap().message.ts, 1_700_000_000_000);
    let published: Vec<u64> = worker.bus.published.lock().unwrap().iter().map(|m| m.seq).collect();
    assert_eq!(published, [1, 2]);
    worker.stop().await;
}

#[tokio::test]
async fn a_conflict_with_another_writer_is_resequenced_after_its_messages() {
    let worker = worker();
    assert_eq!(seq(&worker.send(command("r", "a", soon())).await), 1);
    // Another writer takes seq 2 behind the worker's back (its cached last seq is now stale).
    let mut theirs = worker.stored("r").await.remove(0);
    theirs.seq = 2;
    theirs.id = Uuid::now_v7();
    theirs.client_msg_id = "theirs".into();
    worker.store.append(RoomAppend { room: "r".into(), expected_last_seq: 1, messages: vec![theirs] }).await.unwrap();

    let outcome = worker.send(command("r", "b", soon())).await;
    assert_eq!(seq(&outcome), 3, "sequenced after the other writer's message");
    assert_eq!(worker.metrics.seq_conflicts.get(), 1);
    assert_eq!(worker.stored("r").await.iter().map(|m| m.seq).collect::<Vec<_>>(), [1, 2, 3]);
    worker.stop().await;
}

#[tokio::test]
async fn an_expired_send_is_answered_unavailable_and_not_stored() {
    let worker = worker();
    let outcomes =
        worker.batch(vec![command("r", "late", protocol::now_ms() - 1), command("r", "on-time", soon())]).await;
    let refused = outcomes[0].as_ref().expect_err("expired");
    assert_eq!(refused.kind(), BusErrorKind::Unavailable);
    assert_eq!(seq(&outcomes[1]), 1, "the expired send took no seq");
    assert_eq!(worker.stored("r").await.len(), 1);
    worker.stop().await;
}

#[tokio::test]
async fn an_append_that_landed_without_an_answer_is_acked_once() {
    let worker = worker();
    *worker.store.next_append.lock().unwrap() = Some(Failure::AppliedButUnanswered);
    let outcome = worker.send(command("r", "a", soon())).await;
    assert_eq!(seq(&outcome), 1);
    assert!(!outcome.as_ref().unwrap().duplicate);
    assert_eq!(worker.stored("r").await.len(), 1, "not stored twice");
    assert_eq!(worker.bus.published.lock().unwrap().len(), 1);
    worker.stop().await;
}

#[tokio::test]
async fn an_append_that_did_not_land_is_sequenced_again() {
    let worker = worker();
    *worker.store.next_append.lock().unwrap() = Some(Failure::NotApplied);
    let outcome = worker.send(command("r", "a", soon())).await;
    assert_eq!(seq(&outcome), 1);
    assert_eq!(worker.stored("r").await.len(), 1);
    worker.stop().await;
}

#[tokio::test]
async fn repeats_in_one_batch_and_across_batches_are_one_message() {
    let worker = worker();
    let outcomes = worker.batch(vec![command("r", "a", soon()), command("r", "a", soon())]).await;
    let (first, repeat) = (outcomes[0].as_ref().unwrap(), outcomes[1].as_ref().unwrap());
    assert!(!first.duplicate && repeat.duplicate);
    assert_eq!(first.message.id, repeat.message.id);
    let later = worker.send(command("r", "a", soon())).await.unwrap();
    assert!(later.duplicate);
    assert_eq!(later.message.id, first.message.id);
    assert_eq!(worker.stored("r").await.len(), 1);
    assert_eq!(worker.bus.published.lock().unwrap().len(), 1, "a repeat is not published again");
    worker.stop().await;
}

#[tokio::test]
async fn an_invalid_command_from_the_bus_is_rejected_with_a_reason() {
    let worker = worker();
    let outcomes = worker.batch(vec![command("bad room!", "a", soon())]).await;
    let rejected = outcomes[0].as_ref().expect_err("rejected");
    assert_eq!(rejected.kind(), BusErrorKind::Rejected);
    assert_eq!(rejected.message(), "invalid room name");
    worker.stop().await;
}
