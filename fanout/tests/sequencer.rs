//! The sequencer's decisions, driven directly: a scripted bus hands the worker batches, a real
//! embedded store keeps what it stores, and a store wrapper fails appends on demand. Each test
//! names one rule: conflicts re-sequence, expired sends are not stored, an append whose outcome
//! is unknown is resolved before answering, and repeats (in a batch or across batches) are one
//! message. A property test drives arbitrary batches, store failures and other writers through
//! the same harness and checks the sequencer's invariants after each case.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test harness: a failed set-up step should panic

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bus::{BusError, BusErrorKind, FanoutBus, LateAck, PendingSend, Replier};
use fanout::decision_log::{DecisionKind, DecisionLog};
use fanout::{Clock, Fanout, FanoutConfig};
use protocol::bus::{SendCommand, SendOutcome};
use protocol::{chain, ChatMessage};
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
    /// The rooms whose partition moved to another worker ([`FanoutBus::pulls`]).
    moved: Mutex<Vec<String>>,
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

    fn pulls(&self, room: &str) -> bool {
        !self.moved.lock().unwrap().iter().any(|moved| moved == room)
    }
}

struct Answer(oneshot::Sender<Result<SendOutcome, BusError>>);

/// An answer, or word that the send was given back to the bus unanswered.
#[derive(Debug)]
enum Settled {
    Answered(Box<Result<SendOutcome, BusError>>),
    HandedBack,
}

struct AnswerOrHandBack(oneshot::Sender<Settled>);

#[async_trait]
impl Replier for AnswerOrHandBack {
    async fn reply(self: Box<Self>, outcome: Result<SendOutcome, BusError>) {
        let _ = self.0.send(Settled::Answered(Box::new(outcome)));
    }

    async fn release(self: Box<Self>) {
        let _ = self.0.send(Settled::HandedBack);
    }
}

#[async_trait]
impl Replier for Answer {
    async fn reply(self: Box<Self>, outcome: Result<SendOutcome, BusError>) {
        let _ = self.0.send(outcome);
    }
}

/// An answer that can also be given late ([`Replier::late_ack`]), as the NATS bus's can.
struct AnswerWithLateAck {
    answer: oneshot::Sender<Result<SendOutcome, BusError>>,
    late: mpsc::UnboundedSender<SendOutcome>,
}

#[async_trait]
impl Replier for AnswerWithLateAck {
    async fn reply(self: Box<Self>, outcome: Result<SendOutcome, BusError>) {
        let _ = self.answer.send(outcome);
    }

    fn late_ack(&self) -> Option<Box<dyn LateAck>> {
        Some(Box::new(LateAnswer(self.late.clone())))
    }
}

struct LateAnswer(mpsc::UnboundedSender<SendOutcome>);

#[async_trait]
impl LateAck for LateAnswer {
    async fn stored(self: Box<Self>, outcome: SendOutcome) {
        let _ = self.0.send(outcome);
    }
}

// === a store that fails on demand ===

/// How the next append fails.
#[derive(Clone, Copy, Debug)]
enum Failure {
    /// Stored, but the answer is lost (a timed-out write that landed).
    AppliedButUnanswered,
    /// Not stored, and the answer is an error.
    NotApplied,
    /// Not stored, and the answer is an error after this pause (a write that timed out late).
    SlowNotApplied(std::time::Duration),
    /// Not stored: the store says another writer holds the seqs (whether or not one does).
    Conflict,
    /// Not stored: the store says another writer took the room's fence.
    Fenced,
    /// Only the first message stored (a store appending in chunks that failed after the first),
    /// and the answer is an error.
    FirstOnlyApplied,
    /// Stored, the answer lost, and every read fails from then on until `reads_down` is cleared
    /// (a store that times everything out, as a node that just started does).
    AppliedThenDown,
    /// Not stored yet, the answer lost, and every read fails until `reads_down` is cleared; the
    /// write is kept in `late_write` for the test to apply later (a write waiting in a socket of
    /// a frozen store, applied only after reads sent later).
    LandsLate,
    /// As `LandsLate`, but the answer (an error) comes after this pause and reads keep working:
    /// the worker reads "not there" before the write applies.
    SlowLandsLate(std::time::Duration),
    /// Not stored, the store saying its commit was never sent, and every read fails from then
    /// on until `reads_down` is cleared (a store that froze while the rows were being written).
    NotCommittedThenDown,
    /// A store that hangs: the append answers only when its `commit_by` passes (`NotCommitted`),
    /// or after 10 s when it has none; reads fail until `reads_down` is cleared.
    HangsThenDown,
}

struct FlakyStore {
    inner: EmbeddedStore,
    next_append: Mutex<Option<Failure>>,
    reads_down: std::sync::atomic::AtomicBool,
    /// Every read waits 10 s, then fails (a frozen node, each read waiting out its timeout).
    reads_hang: std::sync::atomic::AtomicBool,
    late_write: Mutex<Option<RoomAppend>>,
    /// Reads of a room's last seq so far.
    head_reads: std::sync::atomic::AtomicUsize,
}

impl FlakyStore {
    async fn reads(&self) -> Result<(), StoreError> {
        if self.reads_hang.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::time::sleep(std::time::Duration::from_secs(10)).await;
            return Err(StoreError::unavailable("read timed out after hanging"));
        }
        match self.reads_down.load(std::sync::atomic::Ordering::SeqCst) {
            true => Err(StoreError::unavailable("read timed out")),
            false => Ok(()),
        }
    }
}

#[async_trait]
impl HistoryStore for FlakyStore {
    async fn append_by(&self, batch: RoomAppend, commit_by: tokio::time::Instant) -> Result<(), StoreError> {
        let hangs = matches!(*self.next_append.lock().unwrap(), Some(Failure::HangsThenDown));
        if !hangs {
            return self.append(batch).await;
        }
        self.next_append.lock().unwrap().take();
        self.reads_down.store(true, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep_until(commit_by).await;
        Err(StoreError::unavailable("given up at its commit deadline").before_commit())
    }
    async fn append(&self, batch: RoomAppend) -> Result<(), StoreError> {
        let failure = self.next_append.lock().unwrap().take();
        match failure {
            Some(Failure::HangsThenDown) => {
                self.reads_down.store(true, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(std::time::Duration::from_secs(10)).await;
                Err(StoreError::unavailable("append timed out"))
            }
            None => self.inner.append(batch).await,
            Some(Failure::AppliedButUnanswered) => {
                self.inner.append(batch).await?;
                Err(StoreError::unavailable("append timed out"))
            }
            Some(Failure::NotApplied) => Err(StoreError::unavailable("append timed out")),
            Some(Failure::SlowNotApplied(pause)) => {
                tokio::time::sleep(pause).await;
                Err(StoreError::unavailable("append timed out"))
            }
            Some(Failure::Conflict) => {
                Err(StoreError::conflict(&batch.room, batch.expected_last_seq, batch.expected_last_seq + 1))
            }
            Some(Failure::Fenced) => Err(StoreError::fenced(format!("another writer took {}'s fence", batch.room))),
            Some(Failure::AppliedThenDown) => {
                self.inner.append(batch).await?;
                self.reads_down.store(true, std::sync::atomic::Ordering::SeqCst);
                Err(StoreError::unavailable("append timed out"))
            }
            Some(Failure::LandsLate) => {
                *self.late_write.lock().unwrap() = Some(batch);
                self.reads_down.store(true, std::sync::atomic::Ordering::SeqCst);
                Err(StoreError::unavailable("commit timed out (outcome unknown)"))
            }
            Some(Failure::SlowLandsLate(pause)) => {
                *self.late_write.lock().unwrap() = Some(batch);
                tokio::time::sleep(pause).await;
                Err(StoreError::unavailable("commit timed out (outcome unknown)"))
            }
            Some(Failure::NotCommittedThenDown) => {
                self.reads_down.store(true, std::sync::atomic::Ordering::SeqCst);
                Err(StoreError::unavailable("rows timed out").before_commit())
            }
            Some(Failure::FirstOnlyApplied) => {
                let first = RoomAppend { messages: batch.messages[..1].to_vec(), ..batch };
                self.inner.append(first).await?;
                Err(StoreError::unavailable("append failed after its first chunk"))
            }
        }
    }
    async fn last_seq(&self, room: &str) -> Result<u64, StoreError> {
        self.head_reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.reads().await?;
        self.inner.last_seq(room).await
    }
    async fn find_by_client_msg_id(&self, room: &str, user: &str, id: &str) -> Result<Option<ChatMessage>, StoreError> {
        self.reads().await?;
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
    worker_logged(None)
}

/// A worker writing its decisions to `log`, when given.
fn worker_logged(log: Option<&DecisionLog>) -> Worker {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FlakyStore {
        inner: EmbeddedStore::open(dir.path()).unwrap(),
        next_append: Mutex::new(None),
        reads_down: Default::default(),
        reads_hang: Default::default(),
        late_write: Mutex::new(None),
        head_reads: Default::default(),
    });
    worker_over(store, dir, log)
}

/// A worker over an existing store (kept in `dir`).
fn worker_over(store: Arc<FlakyStore>, dir: tempfile::TempDir, log: Option<&DecisionLog>) -> Worker {
    let (batches, receiver) = mpsc::unbounded_channel();
    let bus = Arc::new(ScriptedBus {
        batches: tokio::sync::Mutex::new(receiver),
        published: Mutex::default(),
        moved: Mutex::default(),
    });
    let metrics = Metrics::new();
    let fanout = Fanout::new(
        store.clone(),
        bus.clone(),
        Arc::new(Journal::new("w", 100)),
        metrics.clone(),
        FanoutConfig::default(),
    )
    .with_clock(Arc::new(FixedClock));
    let fanout = match log {
        Some(log) => fanout.with_decision_log(log),
        None => fanout,
    };
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
        let mut outcomes = Vec::new();
        for answer in self.hand(commands) {
            outcomes.push(answer.await.expect("every send is answered"));
        }
        outcomes
    }

    /// Hands the worker one batch; where each send's answer arrives, in order.
    fn hand(&self, commands: Vec<SendCommand>) -> Vec<oneshot::Receiver<Result<SendOutcome, BusError>>> {
        let (pending, answers): (Vec<_>, Vec<_>) = commands
            .into_iter()
            .map(|command| {
                let (tx, rx) = oneshot::channel();
                (PendingSend { command, delivery: 1, reply: Box::new(Answer(tx)) }, rx)
            })
            .unzip();
        self.batches.send(pending).unwrap();
        answers
    }

    /// Hands the worker one send whose answer can also come late ([`Replier::late_ack`]);
    /// returns where its answer and its late ack arrive.
    fn send_acking_late(
        &self,
        command: SendCommand,
    ) -> (oneshot::Receiver<Result<SendOutcome, BusError>>, mpsc::UnboundedReceiver<SendOutcome>) {
        let (answer, answered) = oneshot::channel();
        let (late, late_acks) = mpsc::unbounded_channel();
        let reply = Box::new(AnswerWithLateAck { answer, late });
        self.batches.send(vec![PendingSend { command, delivery: 1, reply }]).unwrap();
        (answered, late_acks)
    }

    /// Applies the append the store kept back ([`Failure::LandsLate`]): the write lands now.
    async fn land_late_write(&self) {
        let late_write = self.store.late_write.lock().unwrap().take().expect("the append was kept");
        self.store.inner.append(late_write).await.unwrap();
    }

    /// The seqs the worker published, once it has published any (or after 5 s).
    async fn published_seqs(&self) -> Vec<(u64, String)> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while self.bus.published.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        self.bus.published.lock().unwrap().iter().map(|m| (m.seq, m.client_msg_id.clone())).collect()
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

    /// Stops the worker and starts a new one over the same store: nothing is cached.
    async fn restart(self) -> Worker {
        drop(self.batches);
        self.task.await.unwrap();
        worker_over(self.store, self._dir, None)
    }
}

/// The next late ack, within 5 s.
async fn late_ack(late_acks: &mut mpsc::UnboundedReceiver<SendOutcome>) -> SendOutcome {
    tokio::time::timeout(std::time::Duration::from_secs(5), late_acks.recv())
        .await
        .expect("acked late within 5 s")
        .expect("acked, not dropped")
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

/// Every new message chains to the one before it: from the genesis, across batches, across a
/// restart (the head is read from the store) and after a conflict (the head is read again, so the
/// retry chains to the other writer's message).
#[tokio::test]
async fn messages_are_chained_across_batches_restarts_and_conflicts() {
    let worker = worker();
    worker.batch(vec![command("r", "a", soon()), command("r", "b", soon())]).await;
    worker.send(command("r", "c", soon())).await.unwrap();
    let worker = worker.restart().await;
    assert_eq!(seq(&worker.send(command("r", "d", soon())).await), 4);
    // Another writer takes seq 5, properly chained, behind the worker's back.
    let stored = worker.stored("r").await;
    let mut theirs = ChatMessage {
        seq: 5,
        id: Uuid::now_v7(),
        client_msg_id: "theirs".into(),
        body: "theirs".into(),
        ..stored[3].clone()
    };
    chain::seal(&mut theirs, stored[3].digest.clone().unwrap());
    worker.store.append(RoomAppend { room: "r".into(), expected_last_seq: 4, messages: vec![theirs] }).await.unwrap();
    assert_eq!(seq(&worker.send(command("r", "e", soon())).await), 6);
    assert_eq!(worker.metrics.seq_conflicts.get(), 1, "the retry followed a conflict");

    let stored = worker.stored("r").await;
    assert_eq!(stored.len(), 6);
    assert_eq!(stored[0].prev.as_deref(), Some(chain::GENESIS));
    let mut tracker = chain::ChainTracker::new();
    for message in &stored {
        assert!(message.digest.is_some(), "seq {} is chained", message.seq);
        tracker.observe(message).unwrap_or_else(|e| panic!("stored seq {}: {e}", message.seq));
    }
    // What the worker published is what it stored, chain fields included.
    let published: Vec<ChatMessage> = worker.bus.published.lock().unwrap().iter().map(|m| (**m).clone()).collect();
    assert_eq!(published, [&stored[3..4], &stored[5..]].concat());
    worker.stop().await;
}

/// A room whose newest message was stored before the chain: the next message chains to the
/// digest that message has with the genesis as `prev`.
#[tokio::test]
async fn a_room_from_before_the_chain_starts_its_chain_at_the_next_message() {
    let worker = worker();
    let legacy = ChatMessage {
        room: "old".into(),
        seq: 1,
        id: Uuid::now_v7(),
        user: "bob".into(),
        body: "from before the chain".into(),
        ts: 1,
        client_msg_id: "legacy".into(),
        trace_id: "0".repeat(32),
        prev: None,
        digest: None,
    };
    let append = RoomAppend { room: "old".into(), expected_last_seq: 0, messages: vec![legacy.clone()] };
    worker.store.append(append).await.unwrap();
    let next = worker.send(command("old", "a", soon())).await.unwrap().message;
    assert_eq!(next.seq, 2);
    assert_eq!(next.prev, Some(chain::digest(chain::GENESIS, &legacy)));
    assert_eq!(chain::check(&next), Ok(()));
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

/// A worker behind its queue answers the sends already past their deadline without asking the
/// store (here a store whose reads all fail): the answer says the send expired.
#[tokio::test]
async fn sends_past_their_deadline_are_answered_without_a_store_read() {
    let worker = worker();
    worker.store.reads_down.store(true, std::sync::atomic::Ordering::SeqCst);
    let late = protocol::now_ms() - 1;
    let outcomes = worker.batch(vec![command("r", "late-1", late), command("r", "late-2", late)]).await;
    for outcome in &outcomes {
        let refused = outcome.as_ref().expect_err("expired");
        assert_eq!(refused.kind(), BusErrorKind::Unavailable);
        assert!(refused.message().contains("expired"), "answered from the clock, not the store: {refused}");
        assert!(refused.untried(), "nothing of it was written: {refused}");
    }
    worker.store.reads_down.store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(worker.stored("r").await.is_empty());
    worker.stop().await;
}

/// A store whose reads fail (down, or timing out) is refused before anything is written: the
/// refusal is `untried`, so the gateway can pass it on as `unavailable` (not stored) instead of
/// answering `internal` (not known yet) at the deadline.
#[tokio::test]
async fn a_send_refused_because_the_store_reads_failed_is_refused_as_untried() {
    let worker = worker();
    worker.store.reads_down.store(true, std::sync::atomic::Ordering::SeqCst);
    let outcome = worker.send(command("r", "a", soon())).await;
    let refused = outcome.expect_err("the store cannot be read");
    assert_eq!(refused.kind(), BusErrorKind::Unavailable);
    assert!(refused.untried(), "nothing of it was written: {refused}");
    worker.store.reads_down.store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(worker.stored("r").await.is_empty());
    assert_eq!(seq(&worker.send(command("r", "a", soon())).await), 1, "the retry is stored");
    worker.stop().await;
}

/// A failed dedupe read changes nothing in the room, so the worker keeps the room's head: the
/// room's next sends are sequenced without reading it again (on a slow store, two round trips
/// fewer for every batch after a read that ran out of time).
#[tokio::test]
async fn a_failed_dedupe_read_keeps_the_rooms_head() {
    let worker = worker();
    assert_eq!(seq(&worker.send(command("r", "a", soon())).await), 1);
    let order = std::sync::atomic::Ordering::SeqCst;
    let head_reads = worker.store.head_reads.load(order);
    worker.store.reads_down.store(true, order);
    let refused = worker.send(command("r", "b", soon())).await.expect_err("the dedupe read fails");
    assert!(refused.untried(), "nothing of it was written: {refused}");
    worker.store.reads_down.store(false, order);
    assert_eq!(seq(&worker.send(command("r", "c", soon())).await), 2, "the next send follows the stored one");
    assert_eq!(worker.store.head_reads.load(order), head_reads, "the head was not read again");
    let stored: Vec<(u64, String)> = worker.stored("r").await.into_iter().map(|m| (m.seq, m.client_msg_id)).collect();
    assert_eq!(stored, vec![(1, "a".to_owned()), (2, "c".to_owned())]);
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

/// An append that landed while the store stopped answering until the sends' deadline: the
/// sends are answered unavailable, a refusal that does not settle them (their gateway waits
/// on, then answers `internal` at the send's deadline), and once the store answers again the
/// worker acks what landed to the gateway at once (its answer, or its late word) and publishes
/// it, so members get it even if the room says nothing more.
#[tokio::test]
async fn an_append_whose_outcome_stayed_unknown_is_acked_and_published_once_the_store_tells() {
    let worker = worker();
    *worker.store.next_append.lock().unwrap() = Some(Failure::AppliedThenDown);
    let (answered, mut late_acks) = worker.send_acking_late(command("r", "a", protocol::now_ms() + 600));
    let refused = answered.await.unwrap().unwrap_err();
    assert_eq!(refused.kind(), BusErrorKind::Unavailable);
    assert!(!refused.untried(), "its write may have landed: {refused}");
    assert!(worker.bus.published.lock().unwrap().is_empty(), "nothing published while it is unknown");
    assert!(late_acks.try_recv().is_err(), "nothing acked while it is unknown");
    worker.store.reads_down.store(false, std::sync::atomic::Ordering::SeqCst);
    let acked = late_ack(&mut late_acks).await;
    assert_eq!((acked.message.seq, acked.message.client_msg_id.as_str(), acked.duplicate), (1, "a", false));
    let published = worker.published_seqs().await;
    assert_eq!(published, [(1, "a".to_owned())], "published once it was known to have landed");
    assert_eq!(worker.stored("r").await.len(), 1);
    worker.stop().await;
}

/// An append the store failed before its commit stored nothing and cannot store it later, so
/// the worker does not ask the store whether it landed: it sequences again, reading the room
/// until the store answers. Back before the deadline, the send is stored; still down at the
/// deadline, it is refused as `untried`, which lets the gateway answer `unavailable` (not
/// stored) instead of `internal` (not known yet) at the deadline.
#[tokio::test]
async fn an_append_that_failed_before_its_commit_is_sequenced_again_until_the_deadline() {
    let worker = worker();
    *worker.store.next_append.lock().unwrap() = Some(Failure::NotCommittedThenDown);
    let store = worker.store.clone();
    let back = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(600)).await;
        store.reads_down.store(false, std::sync::atomic::Ordering::SeqCst);
    });
    let stored = worker.send(command("r", "a", soon())).await;
    assert_eq!(seq(&stored), 1, "stored once the store answered again");
    back.await.unwrap();

    *worker.store.next_append.lock().unwrap() = Some(Failure::NotCommittedThenDown);
    let outcome = worker.send(command("r", "b", protocol::now_ms() + 800)).await;
    let refused = outcome.expect_err("the store is down past the deadline");
    assert_eq!(refused.kind(), BusErrorKind::Unavailable);
    assert!(refused.untried(), "nothing of it can be stored: {refused}");
    worker.store.reads_down.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(worker.stored("r").await.len(), 1);
    let retried = worker.send(command("r", "b", soon())).await;
    assert_eq!(seq(&retried), 2, "the retry is the room's next message");
    worker.stop().await;
}

/// Two sends of one batch while the store stays down after an append failed before its commit:
/// each is refused (untried) once its own deadline passes, the first long before the second,
/// not both at the batch's latest deadline.
#[tokio::test]
async fn while_the_store_is_down_each_send_is_refused_at_its_own_deadline() {
    let worker = worker();
    *worker.store.next_append.lock().unwrap() = Some(Failure::NotCommittedThenDown);
    let started = std::time::Instant::now();
    let now = protocol::now_ms();
    let [early, late]: [_; 2] =
        worker.hand(vec![command("r", "early", now + 300), command("r", "late", now + 2_500)]).try_into().unwrap();
    let early = early.await.unwrap().expect_err("the store is down");
    let early_at = started.elapsed();
    assert!(early.untried(), "nothing of it was committed: {early}");
    let late = late.await.unwrap().expect_err("the store is still down");
    let late_at = started.elapsed();
    assert!(late.untried(), "nothing of it was committed: {late}");
    assert!(
        early_at + std::time::Duration::from_millis(1_000) < late_at,
        "the early send was answered at {early_at:?}, the late one at {late_at:?}"
    );
    worker.stop().await;
}

/// A store whose reads hang (each waiting out a long timeout): the worker gives its read of the
/// room up at the earliest deadline of the sends waiting for it, so each send is refused
/// (untried) at its own deadline, not when the read fails at last; and the decision log of it
/// replays to the same decisions.
#[tokio::test]
async fn while_the_stores_reads_hang_each_send_is_refused_at_its_own_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("decisions.jsonl");
    let config = FanoutConfig::default();
    let (log, writer) = DecisionLog::create(&path, "w", &config, fanout::decision_log::DEFAULT_CAPACITY).await.unwrap();
    let worker = worker_logged(Some(&log));
    worker.store.reads_hang.store(true, std::sync::atomic::Ordering::SeqCst);
    let started = std::time::Instant::now();
    let now = protocol::now_ms();
    let [early, late]: [_; 2] =
        worker.hand(vec![command("r", "early", now + 300), command("r", "late", now + 1_300)]).try_into().unwrap();
    let early = early.await.unwrap().expect_err("the store's reads hang");
    let early_at = started.elapsed();
    let late = late.await.unwrap().expect_err("the store's reads still hang");
    let late_at = started.elapsed();
    assert!(early.untried() && late.untried(), "nothing was appended: {early}; {late}");
    assert!(early_at < std::time::Duration::from_millis(900), "the early send was answered at {early_at:?}");
    assert!(
        late_at >= std::time::Duration::from_millis(1_200) && late_at < std::time::Duration::from_secs(2),
        "the late send was answered at {late_at:?}"
    );
    worker.store.reads_hang.store(false, std::sync::atomic::Ordering::SeqCst);
    let stored = worker.send(command("r", "after", soon())).await;
    assert_eq!(seq(&stored), 1, "nothing of the refused sends was stored");
    worker.stop().await;
    drop(log);
    writer.close().await.unwrap();
    let report = fanout::replay::replay(&fanout::replay::Log::read(&path).unwrap()).await;
    assert!(report.identical(), "{}", report.render(false));
}

/// Fenced off after the room's partition moved to another worker: the sends are handed back
/// unanswered for the new owner, not sequenced again (which would take the fence back from it);
/// fenced off while the worker still pulls the room, they are sequenced again and stored. Only the
/// latter counts as a store error. The decision log replays to the same decisions.
#[tokio::test]
async fn sends_fenced_off_after_their_partition_moved_are_handed_back_not_fought_for() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("decisions.jsonl");
    let config = FanoutConfig::default();
    let (log, writer) = DecisionLog::create(&path, "w", &config, fanout::decision_log::DEFAULT_CAPACITY).await.unwrap();
    let worker = worker_logged(Some(&log));
    let hand = |client_msg_id: &str| {
        let (tx, rx) = oneshot::channel();
        let reply = Box::new(AnswerOrHandBack(tx));
        worker
            .batches
            .send(vec![PendingSend { command: command("r", client_msg_id, soon()), delivery: 1, reply }])
            .unwrap();
        rx
    };

    *worker.store.next_append.lock().unwrap() = Some(Failure::Fenced);
    let Settled::Answered(outcome) = hand("still-mine").await.unwrap() else {
        panic!("handed back a send it still pulls")
    };
    assert_eq!(seq(&outcome), 1, "fenced off while still pulling the room: sequenced again");
    let append_errors = || worker.metrics.store_errors.with_label_values(&["append"]).get();
    assert_eq!(append_errors(), 1, "a fence taken from a worker that still pulls the room is a store error");

    worker.bus.moved.lock().unwrap().push("r".into());
    *worker.store.next_append.lock().unwrap() = Some(Failure::Fenced);
    let settled = hand("moved").await.unwrap();
    assert!(matches!(settled, Settled::HandedBack), "expected the send handed back, got {settled:?}");
    assert_eq!(worker.stored("r").await.len(), 1, "nothing of the handed-back send was stored");
    assert_eq!(append_errors(), 1, "a handover is no store error (it would raise ChatStoreErrors each rolling deploy)");
    worker.stop().await;
    drop(log);
    writer.close().await.unwrap();
    let log = fanout::replay::Log::read(&path).unwrap();
    let report = fanout::replay::replay(&log).await;
    assert!(report.identical(), "{}", report.render(false));
    assert!(report.render(true).contains("handed back"), "{}", report.render(true));
}

/// A store that hangs in an append: the worker bounds it by the send's deadline (at least
/// 500 ms away), so the send is refused (untried) soon after its deadline, not when the store
/// answers at last.
#[tokio::test]
async fn a_send_held_by_a_hanging_append_is_refused_by_its_deadline() {
    let worker = worker();
    *worker.store.next_append.lock().unwrap() = Some(Failure::HangsThenDown);
    let started = std::time::Instant::now();
    let refused = worker.send(command("r", "a", protocol::now_ms() + 300)).await.expect_err("the store hangs");
    assert!(refused.untried(), "nothing of it was committed: {refused}");
    let answered_after = started.elapsed();
    assert!(
        answered_after >= std::time::Duration::from_millis(450) && answered_after < std::time::Duration::from_secs(2),
        "answered after {answered_after:?}"
    );
    worker.store.reads_down.store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(worker.stored("r").await.is_empty());
    worker.stop().await;
}

/// A write of unknown outcome that applies only after the store answers again (it waited in a
/// socket while reads sent later overtook it): the worker does not take the first "not there"
/// for the answer, and acks the send once the write shows.
#[tokio::test]
async fn a_write_that_lands_after_the_store_answers_again_is_still_acked_late() {
    let worker = worker();
    *worker.store.next_append.lock().unwrap() = Some(Failure::LandsLate);
    let (answered, mut late_acks) = worker.send_acking_late(command("r", "a", protocol::now_ms() + 600));
    assert!(!answered.await.unwrap().unwrap_err().untried());
    worker.store.reads_down.store(false, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    assert!(late_acks.try_recv().is_err(), "not stored yet");
    worker.land_late_write().await;
    let acked = late_ack(&mut late_acks).await;
    assert_eq!((acked.message.seq, acked.message.client_msg_id.as_str()), (1, "a"));
    worker.stop().await;
}

/// A write of unknown outcome that the store, asked at once, says is not there, and that
/// applies only after the send's deadline: the send is refused as expired (a refusal that does
/// not settle it, since the write may still land), and acked late once the write shows.
#[tokio::test]
async fn a_send_refused_while_its_write_was_not_there_yet_is_acked_late_when_it_lands() {
    let worker = worker();
    *worker.store.next_append.lock().unwrap() = Some(Failure::SlowLandsLate(std::time::Duration::from_millis(400)));
    let (answered, mut late_acks) = worker.send_acking_late(command("r", "a", protocol::now_ms() + 300));
    let refused = answered.await.unwrap().unwrap_err();
    assert!(refused.message().contains("expired"), "{refused}");
    assert!(!refused.untried(), "its write may still land: {refused}");
    worker.land_late_write().await;
    let acked = late_ack(&mut late_acks).await;
    assert_eq!((acked.message.seq, acked.message.client_msg_id.as_str()), (1, "a"));
    assert_eq!(worker.published_seqs().await, [(1, "a".to_owned())], "and published to the room");
    worker.stop().await;
}

/// A send that expires while its append fails was in a write that might still land (as far as
/// the worker can tell): its refusal is not `untried`, so the gateway answers `internal` (not
/// known yet) at the send's deadline.
#[tokio::test]
async fn a_send_that_expired_after_a_failed_append_is_not_refused_as_untried() {
    let worker = worker();
    *worker.store.next_append.lock().unwrap() = Some(Failure::SlowNotApplied(std::time::Duration::from_millis(400)));
    let outcome = worker.send(command("r", "a", protocol::now_ms() + 200)).await;
    let refused = outcome.expect_err("expired during the failed append");
    assert!(refused.message().contains("expired"), "{refused}");
    assert!(!refused.untried(), "it was in an append: {refused}");
    assert!(worker.stored("r").await.is_empty());
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

/// A store may append a batch in chunks and fail after some (the CQL store does for big
/// batches): the stored prefix is answered as it was stored, the rest sequenced again after it,
/// never acked with seqs the store does not hold.
#[tokio::test]
async fn an_append_that_stored_only_a_prefix_is_resolved_by_its_newest_message() {
    let worker = worker();
    *worker.store.next_append.lock().unwrap() = Some(Failure::FirstOnlyApplied);
    let outcomes =
        worker.batch(vec![command("r", "a", soon()), command("r", "b", soon()), command("r", "c", soon())]).await;
    let stored = worker.stored("r").await;
    let ids: Vec<&str> = stored.iter().map(|m| m.client_msg_id.as_str()).collect();
    assert_eq!(ids, ["a", "b", "c"], "each stored once, in order");
    for (outcome, message) in outcomes.iter().zip(&stored) {
        assert_eq!(&outcome.as_ref().expect("stored").message, message, "answered as stored");
    }
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

// === log lines name their messages ===

/// A buffer log lines are written into.
#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Buffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Buffer {
    fn lines(&self) -> Vec<String> {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap().lines().map(str::to_owned).collect()
    }
}

/// Log lines as the binary writes them (telemetry::logging): text, and JSON for
/// `--log-format json`, hop spans left out; here into two buffers.
fn logs_into(text: &Buffer, json: &Buffer) -> impl tracing::Subscriber + Send + Sync {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::Layer;
    let lines = || {
        tracing_subscriber::filter::Targets::new()
            .with_default(tracing::Level::DEBUG)
            .with_target(telemetry::logging::HOP_TARGET, tracing::level_filters::LevelFilter::OFF)
    };
    let (text, json) = (text.clone(), json.clone());
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_ansi(false).with_writer(move || text.clone()).with_filter(lines()))
        .with(
            tracing_subscriber::fmt::layer()
                .json()
                .with_current_span(true)
                .with_writer(move || json.clone())
                .with_filter(lines()),
        )
}

/// An append that fails names the messages it was for by the first one's trace id and message
/// id, and how many there were, as fields of the event itself (no span): `grep
/// message_id=<id>` finds it in text logs, and `.fields.message_id` in JSON ones.
#[tokio::test]
async fn a_failed_append_is_logged_with_its_first_messages_trace_id_and_message_id() {
    let (text, json) = (Buffer::default(), Buffer::default());
    let _logging = tracing::subscriber::set_default(logs_into(&text, &json));
    let worker = worker();
    *worker.store.next_append.lock().unwrap() = Some(Failure::FirstOnlyApplied);
    let traces =
        ["4bf92f3577b34da6a3ce929d0e0e4736", "0af7651916cd43dd8448eb211c80319c", "5b8efff798038103d269b633813fc60c"];
    let commands = ["a", "b", "c"]
        .into_iter()
        .zip(traces)
        .map(|(id, trace)| SendCommand {
            traceparent: format!("00-{trace}-00f067aa0ba902b7-01"),
            ..command("r", id, soon())
        })
        .collect();
    worker.batch(commands).await;
    // The failed append stored its first message (and not the others, sequenced again after
    // it): the line names that one.
    let first = worker.stored("r").await.remove(0);
    assert_eq!(first.client_msg_id, "a");
    assert_eq!(first.trace_id, traces[0]);
    worker.stop().await;

    let failures: Vec<serde_json::Value> = json
        .lines()
        .iter()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .filter(|line| line["fields"]["message"] == "store operation failed")
        .collect();
    assert_eq!(failures.len(), 1, "{:#?}", json.lines());
    let fields = &failures[0]["fields"];
    assert_eq!(fields["op"], "append");
    assert_eq!(fields["trace_id"], traces[0]);
    assert_eq!(fields["message_id"], first.id.to_string());
    assert_eq!(fields["messages"], 3);
    assert!(failures[0].get("span").is_none(), "the ids are the event's own fields: {:#}", failures[0]);

    let line = text.lines().into_iter().find(|line| line.contains("store operation failed")).expect("a text line");
    for field in [format!("trace_id={}", traces[0]), format!("message_id={}", first.id), "messages=3".into()] {
        assert!(line.contains(&field), "{field} in {line}");
    }
}

// === the invariants, over arbitrary histories ===

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;

/// How many rooms a history uses; each case has rooms of its own on the shared worker.
const ROOMS: usize = 3;
const USERS: [&str; 2] = ["alice", "bob"];
const CLIENT_MSG_IDS: [&str; 4] = ["a", "b", "c", "d"];

/// One send of a generated history.
#[derive(Debug, Clone)]
struct Spec {
    room: usize,
    user: usize,
    client_msg_id: usize,
    /// Past its deadline when the worker sees it.
    expired: bool,
}

/// One step of a generated history.
#[derive(Debug, Clone)]
enum Event {
    /// The worker gets these sends as one batch.
    Batch(Vec<Spec>),
    /// The next append fails this way.
    Fail(Failure),
    /// Another writer appends a message to this room behind the worker's back.
    Foreign(usize),
}

fn spec() -> impl Strategy<Value = Spec> {
    (0..ROOMS, 0..USERS.len(), 0..CLIENT_MSG_IDS.len(), prop::bool::weighted(0.1))
        .prop_map(|(room, user, client_msg_id, expired)| Spec { room, user, client_msg_id, expired })
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        6 => prop::collection::vec(spec(), 1..8).prop_map(Event::Batch),
        1 => Just(Event::Fail(Failure::AppliedButUnanswered)),
        1 => Just(Event::Fail(Failure::NotApplied)),
        1 => Just(Event::Fail(Failure::Conflict)),
        1 => (0..ROOMS).prop_map(Event::Foreign),
    ]
}

/// The answers of a batch in the order the worker gave them, each with the index of its send.
type AnswerLog = Arc<Mutex<Vec<(usize, Result<SendOutcome, BusError>)>>>;

/// Records each answer, with the index of its send, at the moment the worker gives it.
struct Logged {
    index: usize,
    log: AnswerLog,
    done: oneshot::Sender<()>,
}

#[async_trait]
impl Replier for Logged {
    async fn reply(self: Box<Self>, outcome: Result<SendOutcome, BusError>) {
        self.log.lock().unwrap().push((self.index, outcome));
        let _ = self.done.send(());
    }
}

/// What a history did: the worker's answers in the order given, and the other writers' keys.
#[derive(Default)]
struct Model {
    /// The first successful answer per (room, user, client_msg_id): (id, seq).
    acked: HashMap<(String, String, String), (Uuid, u64)>,
    /// Keys of messages other writers stored.
    foreign: Vec<(String, String, String)>,
}

/// Plays one history on the shared worker, in rooms no other case uses.
async fn run_history(worker: &Worker, case: usize, events: Vec<Event>) -> Result<(), TestCaseError> {
    let rooms: Vec<String> = (0..ROOMS).map(|r| format!("case{case}-r{r}")).collect();
    // A failure armed by an earlier case that never reached an append does not carry over.
    *worker.store.next_append.lock().unwrap() = None;
    let mut model = Model::default();
    for (step, event) in events.into_iter().enumerate() {
        match event {
            Event::Fail(failure) => *worker.store.next_append.lock().unwrap() = Some(failure),
            Event::Foreign(room) => {
                let room = rooms[room].as_str();
                let last = worker.store.inner.last_seq(room).await.unwrap();
                let client_msg_id = format!("theirs-{step}");
                let message = ChatMessage {
                    room: room.into(),
                    seq: last + 1,
                    id: Uuid::now_v7(),
                    user: "carol".into(),
                    body: "from another writer".into(),
                    ts: 1,
                    client_msg_id: client_msg_id.clone(),
                    trace_id: "0".repeat(32),
                    prev: None,
                    digest: None,
                };
                let append = RoomAppend { room: room.into(), expected_last_seq: last, messages: vec![message] };
                worker.store.inner.append(append).await.unwrap();
                model.foreign.push((room.into(), "carol".into(), client_msg_id));
            }
            Event::Batch(specs) => batch_step(worker, &rooms, &mut model, &specs).await?,
        }
    }
    check_store(worker, &rooms, &model).await
}

/// Hands the worker one batch and checks each answer against what was answered before.
async fn batch_step(worker: &Worker, rooms: &[String], model: &mut Model, specs: &[Spec]) -> Result<(), TestCaseError> {
    let log = AnswerLog::default();
    let mut done = Vec::new();
    let mut pending = Vec::new();
    for (index, spec) in specs.iter().enumerate() {
        let (tx, rx) = oneshot::channel();
        done.push(rx);
        let deadline_ms = if spec.expired { protocol::now_ms() - 1 } else { soon() };
        let mut command = command(&rooms[spec.room], CLIENT_MSG_IDS[spec.client_msg_id], deadline_ms);
        command.user = USERS[spec.user].into();
        pending.push(PendingSend {
            command,
            delivery: 1,
            reply: Box::new(Logged { index, log: log.clone(), done: tx }),
        });
    }
    let published_before = worker.bus.published.lock().unwrap().len();
    worker.batches.send(pending).unwrap();
    for rx in done {
        rx.await.expect("every send is answered");
    }
    let answers = std::mem::take(&mut *log.lock().unwrap());
    // The last seq answered per room so far in this batch: answers come in seq order.
    let mut last_answered: HashMap<String, u64> = HashMap::new();
    let mut new_messages = Vec::new();
    for (index, outcome) in answers {
        let spec = &specs[index];
        let key =
            (rooms[spec.room].clone(), USERS[spec.user].to_owned(), CLIENT_MSG_IDS[spec.client_msg_id].to_owned());
        if spec.expired {
            let refused = outcome.as_ref().err().map(BusError::kind);
            prop_assert_eq!(refused, Some(BusErrorKind::Unavailable), "an expired send is refused");
            continue;
        }
        let outcome = outcome.map_err(|e| TestCaseError::fail(format!("send {key:?} refused: {e}")))?;
        let message = &outcome.message;
        prop_assert_eq!((&message.room, &message.user, &message.client_msg_id), (&key.0, &key.1, &key.2));
        match model.acked.get(&key) {
            Some(&(id, seq)) => {
                prop_assert!(outcome.duplicate, "a repeat of {:?} is answered as a duplicate", key);
                prop_assert_eq!((message.id, message.seq), (id, seq), "a repeat of {:?} gets the original", key);
            }
            None => {
                prop_assert!(!outcome.duplicate, "the first answer for {:?} is not a duplicate", key);
                let previous = last_answered.get(key.0.as_str()).copied().unwrap_or(0);
                prop_assert!(message.seq > previous, "{:?} answered seq {} after seq {}", key, message.seq, previous);
                last_answered.insert(key.0.clone(), message.seq);
                model.acked.insert(key, (message.id, message.seq));
                new_messages.push((message.room.clone(), message.seq, message.id));
            }
        }
    }
    // Exactly the new messages are published, each once, in seq order per room.
    let published: Vec<(String, u64, Uuid)> = worker.bus.published.lock().unwrap()[published_before..]
        .iter()
        .map(|m| (m.room.clone(), m.seq, m.id))
        .collect();
    for room in rooms {
        let of_room = |list: &[(String, u64, Uuid)]| -> Vec<(u64, Uuid)> {
            list.iter().filter(|(r, _, _)| r == room).map(|(_, seq, id)| (*seq, *id)).collect()
        };
        prop_assert_eq!(of_room(&published), of_room(&new_messages), "published to {}", room);
    }
    Ok(())
}

/// After a history: per room the seqs are 1..=n, every key is stored once, and what is stored
/// is what was answered.
async fn check_store(worker: &Worker, rooms: &[String], model: &Model) -> Result<(), TestCaseError> {
    let mut stored_keys: BTreeMap<(String, String, String), Vec<(Uuid, u64)>> = BTreeMap::new();
    for room in rooms {
        let stored = worker.stored(room).await;
        let seqs: Vec<u64> = stored.iter().map(|m| m.seq).collect();
        let expected: Vec<u64> = (1..=stored.len() as u64).collect();
        prop_assert_eq!(seqs, expected, "room {} has seqs 1..=n without gap", room);
        for m in stored {
            stored_keys.entry((m.room, m.user, m.client_msg_id)).or_default().push((m.id, m.seq));
        }
    }
    for (key, copies) in &stored_keys {
        prop_assert_eq!(copies.len(), 1, "{:?} stored {} times", key, copies.len());
        match model.acked.get(key) {
            Some(answered) => prop_assert_eq!(&copies[0], answered, "{:?} stored as answered", key),
            None => prop_assert!(model.foreign.contains(key), "{:?} stored but never acked", key),
        }
    }
    for key in model.acked.keys().chain(&model.foreign) {
        prop_assert!(stored_keys.contains_key(key), "{:?} acked but not stored", key);
    }
    Ok(())
}

/// Arbitrary batches of sends over a few rooms, users and client_msg_ids (so repeats happen
/// within and across batches), mixed with expired sends, appends that land unanswered, do not
/// land or hit a conflict, and other writers: the sequencer keeps every invariant. One worker
/// (and store) serves every case, each case in rooms of its own, since opening a store per case
/// would take most of the run. The worker writes a decision log of every case, and the replay
/// of that log decides exactly as the worker did, through every kind of failure.
#[test]
fn arbitrary_histories_keep_the_sequencer_invariants() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("decisions.jsonl");
    let (log, writer) = runtime
        .block_on(DecisionLog::create(&path, "w", &FanoutConfig::default(), fanout::decision_log::DEFAULT_CAPACITY))
        .unwrap();
    let worker = runtime.block_on(async { worker_logged(Some(&log)) });
    let cases = std::sync::atomic::AtomicUsize::new(0);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig { cases: 256, ..ProptestConfig::default() });
    let result = runner.run(&prop::collection::vec(event(), 1..12), |events| {
        let case = cases.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        runtime.block_on(run_history(&worker, case, events))
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
    runtime.block_on(worker.stop());

    let summary = runtime.block_on(writer.close()).unwrap();
    assert_eq!(summary.lost, 0);
    let logged = fanout::replay::Log::read(&path).unwrap();
    let report = runtime.block_on(fanout::replay::replay(&logged));
    assert!(report.identical(), "{}", report.render(false));
    for (what, seen) in [
        ("a conflict", report.logged.iter().any(|(_, d)| matches!(d.decision, DecisionKind::ConflictRetry { .. }))),
        (
            "an append that did not land",
            report.logged.iter().any(|(_, d)| matches!(d.decision, DecisionKind::FailedRetry { .. })),
        ),
        ("a duplicate", report.logged.iter().any(|(_, d)| matches!(d.decision, DecisionKind::Duplicate { .. }))),
        ("an expiry", report.logged.iter().any(|(_, d)| matches!(d.decision, DecisionKind::Expired))),
    ] {
        assert!(seen, "the histories replayed include {what}");
    }
}
