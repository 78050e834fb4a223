//! A worker's decision log: what a fanout worker saw and decided, one JSON object a line, so
//! [`crate::replay`] can run the sequencer again offline and get the same decisions.
//!
//! Recorded: each batch taken off the bus (the sends without their bodies, whose length is
//! enough: no decision reads a body), each store call the sequencer made and the store's answer,
//! each clock reading, each message id drawn, and each decision. Messages are logged without
//! their bodies, so a replay cannot recompute their chain digests: an append is logged without
//! them (a replay's would differ), while messages the store answered with keep theirs (the head
//! of a room's chain that the worker read is what its next message chains to). Recording wraps what the
//! sequencer already uses (the store, the clock, the id source) and hooks where it takes a
//! batch and decides ([`DecisionHook`]), so the sequencer itself stays as it was.
//!
//! Records go through a bounded channel to a writer task: the hot path never waits for the
//! disk. When the channel is full a record is dropped and counted, and the writer notes the
//! loss in the file (`{"event":"lost"}`); a replay refuses such a log. Changes of the
//! partitions a NATS worker pulls are logged when the process feeds them in
//! ([`DecisionLog::ownership`]); they explain a redelivery or a conflict, and no decision
//! depends on them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bus::{BusError, FanoutBus, PendingSend};
use protocol::ChatMessage;
use serde::{Deserialize, Serialize};
use storage::{HistoryStore, Page, PageQuery, RoomAppend, StoreError, StoreErrorKind};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::clock::{Clock, IdSource};
use crate::config::FanoutConfig;

/// Version of the log format, in its `start` record. Version 2 added the read of a room's chain
/// head (a `page` store call); a replay still reads version 1 logs.
pub const LOG_VERSION: u32 = 2;

/// Records the channel to the writer holds by default.
pub const DEFAULT_CAPACITY: usize = 64 * 1024;

// === what is decided ===

/// What became of one send (or, for a retry, of a room's sends) as the hook sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum DecisionKind {
    /// Stored as a new message.
    New {
        /// Its seq.
        seq: u64,
        /// Its id.
        id: Uuid,
        /// Its `ts`.
        ts: i64,
    },
    /// A repeat of a message already stored (or of one earlier in the batch).
    Duplicate {
        /// The stored message's seq.
        seq: u64,
        /// The stored message's id.
        id: Uuid,
    },
    /// Refused for a reason the client sees.
    Rejected {
        /// The reason.
        reason: String,
    },
    /// Past its deadline: not stored.
    Expired,
    /// The room's append conflicted with another writer: its sends are sequenced again. Named
    /// by the room's first send.
    ConflictRetry {
        /// Which attempt conflicted, from 0.
        attempt: usize,
    },
    /// The room's append failed and did not apply: its sends are sequenced again. Named by the
    /// room's first send.
    FailedRetry {
        /// Which attempt failed, from 0.
        attempt: usize,
    },
    /// Answered `unavailable` (the store failing, too many conflicts).
    Unavailable {
        /// What the sender is told.
        reason: String,
    },
    /// Given back to the bus unanswered: the room's partition moved to another worker, which
    /// sequences the send.
    HandedBack,
}

/// A decision about a send of a room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decided {
    /// The room.
    pub room: String,
    /// The sender.
    pub user: String,
    /// The sender's idempotency key.
    pub client_msg_id: String,
    /// What became of it.
    pub decision: DecisionKind,
}

impl std::fmt::Display for Decided {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "room {} {}/{}: ", self.room, self.user, self.client_msg_id)?;
        match &self.decision {
            DecisionKind::New { seq, id, ts } => write!(f, "new seq {seq} id {id} ts {ts}"),
            DecisionKind::Duplicate { seq, id } => write!(f, "duplicate of seq {seq} id {id}"),
            DecisionKind::Rejected { reason } => write!(f, "rejected: {reason}"),
            DecisionKind::Expired => write!(f, "expired"),
            DecisionKind::ConflictRetry { attempt } => write!(f, "conflict on attempt {attempt}; sequencing again"),
            DecisionKind::FailedRetry { attempt } => {
                write!(f, "append failed and did not apply on attempt {attempt}; sequencing again")
            }
            DecisionKind::Unavailable { reason } => write!(f, "unavailable: {reason}"),
            DecisionKind::HandedBack => write!(f, "handed back: the room's partition moved to another worker"),
        }
    }
}

/// Told of each batch a worker takes and each decision it makes.
pub trait DecisionHook: Send + Sync + 'static {
    /// The worker took `sends` off the bus; decisions that follow are about them.
    fn batch(&self, sends: &[PendingSend]);
    /// The worker decided.
    fn decided(&self, decided: Decided);
}

// === the records ===

/// One line of a decision log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Record {
    /// The first line: who wrote the log and the sequencer's tuning.
    Start {
        /// [`LOG_VERSION`].
        version: u32,
        /// The worker's id.
        worker: String,
        /// `max_batch` of the worker.
        max_batch: usize,
        /// `max_cached_rooms` of the worker.
        max_cached_rooms: usize,
        /// `conflict_retries` of the worker.
        conflict_retries: usize,
    },
    /// A batch taken off the bus, numbered from 1.
    Batch {
        /// Its number.
        batch: u64,
        /// Its sends, in the order the bus gave them.
        sends: Vec<LoggedSend>,
    },
    /// A store call and its answer.
    Store {
        /// The batch being sequenced.
        batch: u64,
        /// The room called about.
        room: String,
        /// What was asked.
        call: StoreCall,
        /// What the store answered.
        answer: StoreAnswer,
    },
    /// A clock reading.
    Clock {
        /// The batch being sequenced.
        batch: u64,
        /// The room it was read for.
        room: String,
        /// Which reading.
        reading: Reading,
        /// Its value, milliseconds since the epoch.
        ms: i64,
    },
    /// A message id drawn.
    Id {
        /// The batch being sequenced.
        batch: u64,
        /// The room it was drawn for.
        room: String,
        /// The id.
        id: Uuid,
    },
    /// A decision.
    Decision {
        /// The batch it is about.
        batch: u64,
        /// The decision.
        #[serde(flatten)]
        decided: Decided,
    },
    /// The partitions the worker pulls changed (after batch `batch` was taken).
    Ownership {
        /// Batches taken so far.
        batch: u64,
        /// Partitions it took.
        acquired: Vec<u32>,
        /// Partitions it let go.
        released: Vec<u32>,
        /// Partitions it pulls now.
        owned: Vec<u32>,
    },
    /// Records dropped because the writer fell behind: the log is incomplete from here.
    Lost {
        /// How many.
        records: u64,
    },
    /// The last line, written when the worker stopped cleanly.
    End {
        /// Records written before this one.
        records: u64,
        /// Records lost in all.
        lost: u64,
    },
}

/// A send as logged: everything but the body, which is logged by its length.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoggedSend {
    /// Target room.
    pub room: String,
    /// Sender.
    pub user: String,
    /// The sender's idempotency key.
    pub client_msg_id: String,
    /// Deadline, ms since the epoch (0: none).
    pub deadline_ms: i64,
    /// Which delivery of the send it was (more than 1: redelivered).
    pub delivery: u64,
    /// Trace id of the send's trace.
    pub trace_id: String,
    /// Its W3C `traceparent`, from which the message's trace id is taken.
    pub traceparent: String,
    /// Length of the body in bytes.
    pub body_len: usize,
}

impl LoggedSend {
    fn of(pending: &PendingSend) -> Self {
        let c = &pending.command;
        Self {
            room: c.room.clone(),
            user: c.user.clone(),
            client_msg_id: c.client_msg_id.clone(),
            deadline_ms: c.deadline_ms,
            delivery: pending.delivery,
            trace_id: c.trace_id().to_owned(),
            traceparent: c.traceparent.clone(),
            body_len: c.body.len(),
        }
    }
}

/// A stored message as logged: its body by length.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoggedMessage {
    /// Seq.
    pub seq: u64,
    /// Id.
    pub id: Uuid,
    /// Sender.
    pub user: String,
    /// The sender's idempotency key.
    pub client_msg_id: String,
    /// `ts`.
    pub ts: i64,
    /// Trace id.
    pub trace_id: String,
    /// Length of the body in bytes.
    pub body_len: usize,
    /// Chain: the digest of the message before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev: Option<String>,
    /// Chain: its digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

impl LoggedMessage {
    /// `message` without its body.
    pub fn of(message: &ChatMessage) -> Self {
        Self {
            seq: message.seq,
            id: message.id,
            user: message.user.clone(),
            client_msg_id: message.client_msg_id.clone(),
            ts: message.ts,
            trace_id: message.trace_id.clone(),
            body_len: message.body.len(),
            prev: message.prev.clone(),
            digest: message.digest.clone(),
        }
    }

    /// `message` without its body nor its chain fields (which cover the body).
    pub fn unchained(message: &ChatMessage) -> Self {
        Self { prev: None, digest: None, ..Self::of(message) }
    }

    /// The message again, of `room`, with a stand-in body of the logged length.
    pub fn message(&self, room: &str) -> ChatMessage {
        ChatMessage {
            room: room.to_owned(),
            seq: self.seq,
            id: self.id,
            user: self.user.clone(),
            body: "x".repeat(self.body_len),
            ts: self.ts,
            client_msg_id: self.client_msg_id.clone(),
            trace_id: self.trace_id.clone(),
            prev: self.prev.clone(),
            digest: self.digest.clone(),
        }
    }
}

/// A store call the sequencer made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
#[non_exhaustive]
pub enum StoreCall {
    /// `last_seq`.
    LastSeq,
    /// `find_by_client_msg_ids`: the batch's dedupe lookup.
    FindDedupe {
        /// `(user, client_msg_id)` pairs.
        keys: Vec<(String, String)>,
    },
    /// `find_by_client_msg_id`: resolving a failed append.
    Find {
        /// Sender.
        user: String,
        /// The sender's idempotency key.
        client_msg_id: String,
    },
    /// `append`.
    Append {
        /// The last seq sequenced from.
        expected_last_seq: u64,
        /// The messages, without their chain fields.
        messages: Vec<LoggedMessage>,
    },
    /// `page`: reading the head of a room's chain.
    Page {
        /// Only seqs above this.
        after: Option<u64>,
        /// Only seqs below this.
        before: Option<u64>,
        /// At most this many.
        limit: u32,
    },
}

impl StoreCall {
    /// The call an append of `batch` is logged (and looked up in a replay) as.
    pub fn append(batch: &RoomAppend) -> Self {
        StoreCall::Append {
            expected_last_seq: batch.expected_last_seq,
            messages: batch.messages.iter().map(LoggedMessage::unchained).collect(),
        }
    }

    /// The call a page read with `query` is logged as.
    pub fn page(query: &PageQuery) -> Self {
        StoreCall::Page { after: query.after, before: query.before, limit: query.limit }
    }
}

/// What the store answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum StoreAnswer {
    /// `last_seq`'s answer.
    LastSeq(u64),
    /// A lookup's answers, in order.
    Found(Vec<Option<LoggedMessage>>),
    /// The append succeeded.
    Appended,
    /// A page's messages (with their chain fields, without bodies) and whether more remain.
    Page {
        /// The messages.
        messages: Vec<LoggedMessage>,
        /// Whether more lie beyond.
        has_more: bool,
    },
    /// The call failed.
    Failed(LoggedError),
}

/// A store error as logged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoggedError {
    /// `conflict`, `unavailable`, `corrupt`, `config`, `fenced` or `not_committed`.
    pub kind: String,
    /// The error as displayed.
    pub message: String,
}

impl LoggedError {
    fn of(e: &StoreError) -> Self {
        let kind = match e.kind() {
            StoreErrorKind::Conflict => "conflict",
            StoreErrorKind::Corrupt => "corrupt",
            StoreErrorKind::Config => "config",
            StoreErrorKind::Fenced => "fenced",
            StoreErrorKind::NotCommitted => "not_committed",
            _ => "unavailable",
        };
        Self { kind: kind.into(), message: e.to_string() }
    }

    /// The error again, displayed as it was.
    pub fn error(&self) -> StoreError {
        let kind = match self.kind.as_str() {
            "conflict" => StoreErrorKind::Conflict,
            "corrupt" => StoreErrorKind::Corrupt,
            "config" => StoreErrorKind::Config,
            "fenced" => StoreErrorKind::Fenced,
            "not_committed" => StoreErrorKind::NotCommitted,
            _ => StoreErrorKind::Unavailable,
        };
        let prefix = format!("{kind}: ");
        StoreError::new(kind, self.message.strip_prefix(&prefix).unwrap_or(&self.message))
    }
}

/// Which clock reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reading {
    /// [`Clock::stamp_ms`]: a new message's `ts`.
    Stamp,
    /// [`Clock::now_ms`]: checking deadlines.
    Now,
    /// [`FanoutBus::pulls`]: whether the worker still pulls the room's partition, logged as 1
    /// (it does) or 0 (the partition moved to another worker).
    ///
    /// [`FanoutBus::pulls`]: bus::FanoutBus::pulls
    Pulls,
}

// === the log and its writer ===

/// A handle on a decision log being written; cheap to clone. Wire it into a worker with
/// [`crate::Fanout::with_decision_log`].
#[derive(Clone)]
pub struct DecisionLog {
    shared: Arc<Shared>,
}

struct Shared {
    tx: mpsc::Sender<Record>,
    /// The batch being sequenced (0 before the first).
    batch: AtomicU64,
    /// Records dropped because the channel was full (or the writer gone).
    lost: AtomicU64,
    /// The partitions pulled, as last logged.
    owned: std::sync::Mutex<Vec<u32>>,
}

/// The task writing a decision log; [`close`](Self::close) it after the worker stopped.
pub struct DecisionLogWriter {
    path: PathBuf,
    close: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<LogSummary>>,
}

/// What a closed log holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogSummary {
    /// Records written (the `end` record aside).
    pub records: u64,
    /// Records lost.
    pub lost: u64,
}

impl DecisionLog {
    /// Creates (or truncates) `path` and starts writing the log of worker `worker` tuned by
    /// `config` there, through a channel of `capacity` records.
    pub async fn create(
        path: &Path,
        worker: &str,
        config: &FanoutConfig,
        capacity: usize,
    ) -> std::io::Result<(DecisionLog, DecisionLogWriter)> {
        let file = tokio::fs::File::create(path).await?;
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let shared = Arc::new(Shared {
            tx,
            batch: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            owned: std::sync::Mutex::new(Vec::new()),
        });
        let start = Record::Start {
            version: LOG_VERSION,
            worker: worker.to_owned(),
            max_batch: config.max_batch,
            max_cached_rooms: config.max_cached_rooms,
            conflict_retries: config.conflict_retries,
        };
        let (close, closed) = oneshot::channel();
        let task = tokio::spawn(write_log(file, start, rx, closed, shared.clone()));
        Ok((DecisionLog { shared }, DecisionLogWriter { path: path.to_owned(), close, task }))
    }

    /// Records dropped so far because the writer fell behind.
    pub fn lost(&self) -> u64 {
        self.shared.lost.load(Ordering::Relaxed)
    }

    fn batch(&self) -> u64 {
        self.shared.batch.load(Ordering::Relaxed)
    }

    fn send(&self, record: Record) {
        if self.shared.tx.try_send(record).is_err() {
            self.shared.lost.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The worker now pulls the partitions `owned`: logs what it took and let go, if anything.
    pub fn ownership(&self, owned: &[u32]) {
        let mut last = self.shared.owned.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let acquired: Vec<u32> = owned.iter().copied().filter(|p| !last.contains(p)).collect();
        let released: Vec<u32> = last.iter().copied().filter(|p| !owned.contains(p)).collect();
        if acquired.is_empty() && released.is_empty() {
            return;
        }
        *last = owned.to_vec();
        self.send(Record::Ownership { batch: self.batch(), acquired, released, owned: owned.to_vec() });
    }

    /// `store`, recording every call the sequencer makes and its answer.
    pub fn store(&self, store: Arc<dyn HistoryStore>) -> Arc<dyn HistoryStore> {
        Arc::new(RecordingStore { inner: store, log: self.clone() })
    }

    /// `clock`, recording every reading.
    pub fn clock(&self, clock: Arc<dyn Clock>) -> Arc<dyn Clock> {
        Arc::new(RecordingClock { inner: clock, log: self.clone() })
    }

    /// `ids`, recording every id drawn.
    pub fn ids(&self, ids: Arc<dyn IdSource>) -> Arc<dyn IdSource> {
        Arc::new(RecordingIds { inner: ids, log: self.clone() })
    }

    /// `bus`, recording every answer to [`FanoutBus::pulls`].
    pub fn bus(&self, bus: Arc<dyn FanoutBus>) -> Arc<dyn FanoutBus> {
        Arc::new(RecordingBus { inner: bus, log: self.clone() })
    }
}

impl DecisionHook for DecisionLog {
    fn batch(&self, sends: &[PendingSend]) {
        let batch = self.shared.batch.fetch_add(1, Ordering::Relaxed) + 1;
        self.send(Record::Batch { batch, sends: sends.iter().map(LoggedSend::of).collect() });
    }

    fn decided(&self, decided: Decided) {
        self.send(Record::Decision { batch: self.batch(), decided });
    }
}

impl DecisionLogWriter {
    /// Where the log is written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes what is still queued, an `end` record, and flushes. Call it once the worker has
    /// stopped (records sent later are lost).
    pub async fn close(self) -> std::io::Result<LogSummary> {
        let _ = self.close.send(());
        self.task.await.map_err(std::io::Error::other)?
    }
}

async fn write_log(
    file: tokio::fs::File,
    start: Record,
    mut rx: mpsc::Receiver<Record>,
    mut closed: oneshot::Receiver<()>,
    shared: Arc<Shared>,
) -> std::io::Result<LogSummary> {
    let mut out = tokio::io::BufWriter::with_capacity(256 * 1024, file);
    let mut records = 0u64;
    let mut reported_lost = 0u64;
    let mut line = Vec::with_capacity(512);
    write_record(&mut out, &mut line, &start).await?;
    records += 1;
    loop {
        let record = tokio::select! {
            biased;
            record = rx.recv() => record,
            _ = &mut closed => None,
        };
        let Some(record) = record else { break };
        let lost = shared.lost.load(Ordering::Relaxed);
        if lost > reported_lost {
            write_record(&mut out, &mut line, &Record::Lost { records: lost - reported_lost }).await?;
            records += 1;
            reported_lost = lost;
        }
        write_record(&mut out, &mut line, &record).await?;
        records += 1;
        // Idle: what is written so far reaches the file (a crash loses little).
        if rx.is_empty() {
            out.flush().await?;
        }
    }
    rx.close();
    while let Ok(record) = rx.try_recv() {
        write_record(&mut out, &mut line, &record).await?;
        records += 1;
    }
    let lost = shared.lost.load(Ordering::Relaxed);
    if lost > reported_lost {
        write_record(&mut out, &mut line, &Record::Lost { records: lost - reported_lost }).await?;
        records += 1;
    }
    write_record(&mut out, &mut line, &Record::End { records, lost }).await?;
    out.flush().await?;
    out.get_ref().sync_all().await?;
    Ok(LogSummary { records, lost })
}

async fn write_record(
    out: &mut tokio::io::BufWriter<tokio::fs::File>,
    line: &mut Vec<u8>,
    record: &Record,
) -> std::io::Result<()> {
    line.clear();
    serde_json::to_writer(&mut *line, record).map_err(std::io::Error::other)?;
    line.push(b'\n');
    out.write_all(line).await
}

// === recording decorators ===

struct RecordingStore {
    inner: Arc<dyn HistoryStore>,
    log: DecisionLog,
}

impl RecordingStore {
    fn record(&self, room: &str, call: StoreCall, answer: StoreAnswer) {
        self.log.send(Record::Store { batch: self.log.batch(), room: room.to_owned(), call, answer });
    }

    /// An append (bounded by `commit_by`, if given) and its answer, recorded alike: a replay
    /// gives back the answer, however the bound came out.
    async fn recorded_append(
        &self,
        batch: RoomAppend,
        commit_by: Option<tokio::time::Instant>,
    ) -> Result<(), StoreError> {
        let call = StoreCall::append(&batch);
        let room = batch.room.clone();
        let result = match commit_by {
            Some(at) => self.inner.append_by(batch, at).await,
            None => self.inner.append(batch).await,
        };
        self.record(&room, call, failed_or(&result, |()| StoreAnswer::Appended));
        result
    }

    // The reads the sequencer makes, each bounded by `by` when given and recorded alike: a read
    // cut short is recorded as the error it gave, so a replay gives back the same.

    async fn recorded_last_seq(&self, room: &str, by: Option<tokio::time::Instant>) -> Result<u64, StoreError> {
        let result = match by {
            Some(by) => self.inner.last_seq_by(room, by).await,
            None => self.inner.last_seq(room).await,
        };
        self.record(room, StoreCall::LastSeq, failed_or(&result, |last| StoreAnswer::LastSeq(*last)));
        result
    }

    async fn recorded_find(
        &self,
        room: &str,
        keys: &[(&str, &str)],
        by: Option<tokio::time::Instant>,
    ) -> Result<Vec<Option<ChatMessage>>, StoreError> {
        let result = match by {
            Some(by) => self.inner.find_by_client_msg_ids_by(room, keys, by).await,
            None => self.inner.find_by_client_msg_ids(room, keys).await,
        };
        let call =
            StoreCall::FindDedupe { keys: keys.iter().map(|(u, c)| ((*u).to_owned(), (*c).to_owned())).collect() };
        self.record(
            room,
            call,
            failed_or(&result, |found| {
                StoreAnswer::Found(found.iter().map(|m| m.as_ref().map(LoggedMessage::of)).collect())
            }),
        );
        result
    }

    async fn recorded_page(
        &self,
        room: &str,
        query: PageQuery,
        by: Option<tokio::time::Instant>,
    ) -> Result<Page, StoreError> {
        let result = match by {
            Some(by) => self.inner.page_by(room, query, by).await,
            None => self.inner.page(room, query).await,
        };
        self.record(
            room,
            StoreCall::page(&query),
            failed_or(&result, |page| StoreAnswer::Page {
                messages: page.messages.iter().map(LoggedMessage::of).collect(),
                has_more: page.has_more,
            }),
        );
        result
    }
}

fn failed_or<T>(result: &Result<T, StoreError>, ok: impl FnOnce(&T) -> StoreAnswer) -> StoreAnswer {
    match result {
        Ok(value) => ok(value),
        Err(e) => StoreAnswer::Failed(LoggedError::of(e)),
    }
}

#[async_trait]
impl HistoryStore for RecordingStore {
    async fn append(&self, batch: RoomAppend) -> Result<(), StoreError> {
        self.recorded_append(batch, None).await
    }

    async fn append_by(&self, batch: RoomAppend, commit_by: tokio::time::Instant) -> Result<(), StoreError> {
        self.recorded_append(batch, Some(commit_by)).await
    }

    async fn last_seq(&self, room: &str) -> Result<u64, StoreError> {
        self.recorded_last_seq(room, None).await
    }

    async fn last_seq_by(&self, room: &str, by: tokio::time::Instant) -> Result<u64, StoreError> {
        self.recorded_last_seq(room, Some(by)).await
    }

    async fn find_by_client_msg_id(
        &self,
        room: &str,
        user: &str,
        client_msg_id: &str,
    ) -> Result<Option<ChatMessage>, StoreError> {
        let result = self.inner.find_by_client_msg_id(room, user, client_msg_id).await;
        let call = StoreCall::Find { user: user.to_owned(), client_msg_id: client_msg_id.to_owned() };
        self.record(
            room,
            call,
            failed_or(&result, |found| StoreAnswer::Found(vec![found.as_ref().map(LoggedMessage::of)])),
        );
        result
    }

    async fn find_by_client_msg_ids(
        &self,
        room: &str,
        keys: &[(&str, &str)],
    ) -> Result<Vec<Option<ChatMessage>>, StoreError> {
        self.recorded_find(room, keys, None).await
    }

    async fn find_by_client_msg_ids_by(
        &self,
        room: &str,
        keys: &[(&str, &str)],
        by: tokio::time::Instant,
    ) -> Result<Vec<Option<ChatMessage>>, StoreError> {
        self.recorded_find(room, keys, Some(by)).await
    }

    async fn page(&self, room: &str, query: PageQuery) -> Result<Page, StoreError> {
        self.recorded_page(room, query, None).await
    }

    async fn page_by(&self, room: &str, query: PageQuery, by: tokio::time::Instant) -> Result<Page, StoreError> {
        self.recorded_page(room, query, Some(by)).await
    }

    // Not used by the sequencer: passed through unrecorded.
    async fn get_by_id(&self, id: Uuid) -> Result<Option<ChatMessage>, StoreError> {
        self.inner.get_by_id(id).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
}

struct RecordingClock {
    inner: Arc<dyn Clock>,
    log: DecisionLog,
}

impl RecordingClock {
    fn record(&self, room: &str, reading: Reading, ms: i64) -> i64 {
        self.log.send(Record::Clock { batch: self.log.batch(), room: room.to_owned(), reading, ms });
        ms
    }
}

impl Clock for RecordingClock {
    fn stamp_ms(&self, room: &str) -> i64 {
        self.record(room, Reading::Stamp, self.inner.stamp_ms(room))
    }

    fn now_ms(&self, room: &str) -> i64 {
        self.record(room, Reading::Now, self.inner.now_ms(room))
    }
}

struct RecordingBus {
    inner: Arc<dyn FanoutBus>,
    log: DecisionLog,
}

#[async_trait]
impl FanoutBus for RecordingBus {
    async fn next_batch(&self, max: usize) -> Option<Vec<PendingSend>> {
        self.inner.next_batch(max).await
    }

    async fn deliver(&self, message: Arc<ChatMessage>, traceparent: &str) -> Result<(), BusError> {
        self.inner.deliver(message, traceparent).await
    }

    async fn leave(&self) {
        self.inner.leave().await;
    }

    fn pulls(&self, room: &str) -> bool {
        let pulls = self.inner.pulls(room);
        let ms = i64::from(pulls);
        self.log.send(Record::Clock { batch: self.log.batch(), room: room.to_owned(), reading: Reading::Pulls, ms });
        pulls
    }
}

struct RecordingIds {
    inner: Arc<dyn IdSource>,
    log: DecisionLog,
}

impl IdSource for RecordingIds {
    fn next_id(&self, room: &str) -> Uuid {
        let id = self.inner.next_id(room);
        self.log.send(Record::Id { batch: self.log.batch(), room: room.to_owned(), id });
        id
    }
}
