//! Replaying a worker's [decision log](crate::decision_log): the sequencer runs again, offline,
//! on the logged batches, with a store answering what the real store answered (call by call,
//! per batch and room), the logged clock readings and the logged message ids. Each decision is
//! printed, and the decisions are compared with the logged ones: a duplicate or a gap seen in
//! production can be reproduced and stepped through without the cluster.
//!
//! Rooms of a batch are sequenced concurrently, so the log interleaves them in whatever order
//! their store calls finished; answers, readings and ids are therefore queued per batch and
//! room, and decisions compared per batch and room in the order the room made them.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use bus::{BusError, FanoutBus, PendingSend, Replier};
use protocol::bus::{SendCommand, SendOutcome};
use protocol::ChatMessage;
use storage::{HistoryStore, Page, PageQuery, RoomAppend, StoreError};
use telemetry::journal::Journal;
use telemetry::metrics::Metrics;
use uuid::Uuid;

use crate::clock::{Clock, IdSource};
use crate::config::FanoutConfig;
use crate::decision_log::{
    Decided, DecisionHook, LoggedMessage, LoggedSend, Reading, Record, StoreAnswer, StoreCall, LOG_VERSION,
};
use crate::Fanout;

/// Why a log cannot be replayed.
#[derive(Debug)]
#[non_exhaustive]
pub enum LogError {
    /// The file cannot be read.
    Io(std::io::Error),
    /// A line is not a record of this format.
    Unreadable {
        /// Its number, from 1.
        line: usize,
        /// What is wrong with it.
        error: String,
    },
    /// The log does not hold everything the worker did: replaying it would prove nothing.
    Incomplete(String),
}

impl std::fmt::Display for LogError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) => write!(f, "cannot read the log: {e}"),
            Self::Unreadable { line, error } => write!(f, "unreadable log: line {line}: {error}"),
            Self::Incomplete(why) => write!(f, "log incomplete: {why}"),
        }
    }
}

impl std::error::Error for LogError {}

/// Per batch and room.
type Key = (u64, String);

/// A decision log, read and checked.
#[derive(Debug, Clone)]
pub struct Log {
    /// The worker that wrote it.
    pub worker: String,
    /// Its format version.
    pub version: u32,
    /// Its tuning.
    pub config: FanoutConfig,
    /// Batches, the first being batch 1.
    pub batches: Vec<Vec<LoggedSend>>,
    /// Decisions logged, by batch, in the order they were made.
    pub decisions: Vec<(u64, Decided)>,
    /// Changes of the partitions pulled, by the batches taken before each.
    pub ownership: Vec<(u64, Vec<u32>, Vec<u32>)>,
    store: HashMap<Key, VecDeque<(StoreCall, StoreAnswer)>>,
    clock: HashMap<Key, VecDeque<(Reading, i64)>>,
    ids: HashMap<Key, VecDeque<Uuid>>,
}

impl Log {
    /// Reads the log at `path`.
    pub fn read(path: &Path) -> Result<Self, LogError> {
        Self::parse(&std::fs::read_to_string(path).map_err(LogError::Io)?)
    }

    /// Reads a log's text; refuses one that lost records or was cut short.
    pub fn parse(text: &str) -> Result<Self, LogError> {
        let mut log = Log {
            worker: String::new(),
            version: LOG_VERSION,
            config: FanoutConfig::default(),
            batches: Vec::new(),
            decisions: Vec::new(),
            ownership: Vec::new(),
            store: HashMap::new(),
            clock: HashMap::new(),
            ids: HashMap::new(),
        };
        let mut ended = false;
        let mut records = 0u64;
        for (i, line) in text.lines().enumerate() {
            let number = i + 1;
            if line.trim().is_empty() {
                continue;
            }
            if ended {
                return Err(LogError::Unreadable { line: number, error: "a record after the end record".into() });
            }
            let record: Record =
                serde_json::from_str(line).map_err(|e| LogError::Unreadable { line: number, error: e.to_string() })?;
            if records == 0 && !matches!(record, Record::Start { .. }) {
                return Err(LogError::Unreadable {
                    line: number,
                    error: "the log does not begin with a start record".into(),
                });
            }
            match record {
                Record::Start { version, worker, max_batch, max_cached_rooms, conflict_retries } => {
                    if records != 0 {
                        return Err(LogError::Unreadable { line: number, error: "a second start record".into() });
                    }
                    if !(1..=LOG_VERSION).contains(&version) {
                        return Err(LogError::Unreadable {
                            line: number,
                            error: format!(
                                "log format version {version}; this replay reads versions 1 to {LOG_VERSION}"
                            ),
                        });
                    }
                    log.worker = worker;
                    log.version = version;
                    log.config =
                        FanoutConfig { max_batch, max_cached_rooms, conflict_retries, ..FanoutConfig::default() };
                }
                Record::Batch { batch, sends } => {
                    if batch != log.batches.len() as u64 + 1 {
                        return Err(LogError::Incomplete(format!(
                            "line {number}: batch {batch} follows batch {}",
                            log.batches.len()
                        )));
                    }
                    log.batches.push(sends);
                }
                Record::Store { batch, room, call, answer } => {
                    log.store.entry((batch, room)).or_default().push_back((call, answer));
                }
                Record::Clock { batch, room, reading, ms } => {
                    log.clock.entry((batch, room)).or_default().push_back((reading, ms));
                }
                Record::Id { batch, room, id } => log.ids.entry((batch, room)).or_default().push_back(id),
                Record::Decision { batch, decided } => log.decisions.push((batch, decided)),
                Record::Ownership { batch, acquired, released, owned: _ } => {
                    log.ownership.push((batch, acquired, released));
                }
                Record::Lost { records } => {
                    return Err(LogError::Incomplete(format!(
                        "line {number}: {records} records were dropped because the writer fell behind; \
                         a replay of what is left would prove nothing"
                    )));
                }
                Record::End { records: written, lost } => {
                    if lost > 0 {
                        return Err(LogError::Incomplete(format!("{lost} records were lost")));
                    }
                    if written != records {
                        return Err(LogError::Incomplete(format!(
                            "the end record counts {written} records before it, the file holds {records}"
                        )));
                    }
                    ended = true;
                }
            }
            records += 1;
        }
        if records == 0 {
            return Err(LogError::Unreadable { line: 1, error: "empty log".into() });
        }
        if !ended {
            return Err(LogError::Incomplete(
                "no end record: the worker did not stop cleanly or the file was cut short".into(),
            ));
        }
        Ok(log)
    }
}

/// A line of a replay's account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// Shown only with `--verbose`: store calls, clock readings, ids, each send.
    pub detail: bool,
    /// The text.
    pub text: String,
}

/// The first decision that differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Divergence {
    /// The batch, from 1.
    pub batch: u64,
    /// The room.
    pub room: String,
    /// The send's idempotency key.
    pub client_msg_id: String,
    /// What the log says (none: the replay decided more).
    pub logged: Option<Decided>,
    /// What the replay decided (none: it decided less).
    pub replayed: Option<Decided>,
}

/// What a replay found.
#[derive(Debug, Clone)]
pub struct Report {
    /// The worker that wrote the log.
    pub worker: String,
    /// Batches replayed.
    pub batches: usize,
    /// What happened, in order.
    pub lines: Vec<Line>,
    /// Decisions logged.
    pub logged: Vec<(u64, Decided)>,
    /// Decisions replayed, in the order made.
    pub replayed: Vec<(u64, Decided)>,
    /// The first decision that differs, if one does.
    pub divergence: Option<Divergence>,
    /// Store calls, clock readings and ids the replay asked for that differ from (or are
    /// missing in) the log, and logged calls the replay did not make.
    pub mismatches: Vec<String>,
}

impl Report {
    /// Whether the replay decided exactly as logged and asked exactly what was logged.
    pub fn identical(&self) -> bool {
        self.divergence.is_none() && self.mismatches.is_empty()
    }

    /// The account: each batch and decision (with `verbose`, each call, reading and id), then
    /// the verdict.
    pub fn render(&self, verbose: bool) -> String {
        let mut out = format!(
            "replaying worker {}: {} batches, {} decisions logged\n",
            self.worker,
            self.batches,
            self.logged.len()
        );
        for line in self.lines.iter().filter(|l| verbose || !l.detail) {
            out.push_str(&line.text);
            out.push('\n');
        }
        if let Some(d) = &self.divergence {
            out.push_str(&format!(
                "DIVERGED at batch {}, room {}, client_msg_id {}\n  logged:   {}\n  replayed: {}\n",
                d.batch,
                d.room,
                d.client_msg_id,
                d.logged.as_ref().map_or_else(|| "(nothing)".to_owned(), ToString::to_string),
                d.replayed.as_ref().map_or_else(|| "(nothing)".to_owned(), ToString::to_string),
            ));
        }
        if !self.mismatches.is_empty() {
            out.push_str(&format!(
                "{} store calls, clock readings or ids differed from the log:\n",
                self.mismatches.len()
            ));
            for m in self.mismatches.iter().take(10) {
                out.push_str(&format!("  {m}\n"));
            }
        }
        if self.identical() {
            out.push_str(&format!("identical: {} decisions replayed as logged\n", self.replayed.len()));
        }
        out
    }
}

/// Replays `log` and compares.
pub async fn replay(log: &Log) -> Report {
    let state = Arc::new(Mutex::new(State {
        batch: 0,
        store: log.store.clone(),
        clock: log.clock.clone(),
        ids: log.ids.clone(),
        lines: Vec::new(),
        replayed: Vec::new(),
        mismatches: Vec::new(),
        ownership: log.ownership.clone().into(),
        chainless: log.version < 2,
    }));
    let bus = Arc::new(ReplayBus { state: state.clone(), batches: Mutex::new(log.batches.clone().into()) });
    let replay = Replay(state.clone());
    let worker = Fanout::new(
        Arc::new(replay.clone()),
        bus,
        Arc::new(Journal::new("replay", 16)),
        Metrics::new(),
        log.config.clone(),
    )
    .with_clock(Arc::new(replay.clone()))
    .with_ids(Arc::new(replay.clone()))
    .with_hook(Arc::new(replay))
    .without_settling();
    worker.run(std::future::pending()).await;

    let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
    state.ownership_up_to(u64::MAX);
    let mut left: Vec<String> = state
        .store
        .iter()
        .filter(|(_, calls)| !calls.is_empty())
        .map(|((batch, room), calls)| {
            format!(
                "batch {batch} room {room}: {} logged store calls not made, the first {}",
                calls.len(),
                describe_call(&calls[0].0)
            )
        })
        .collect();
    left.sort();
    state.mismatches.extend(left);
    Report {
        worker: log.worker.clone(),
        batches: log.batches.len(),
        lines: std::mem::take(&mut state.lines),
        logged: log.decisions.clone(),
        divergence: first_divergence(&log.decisions, &state.replayed),
        replayed: std::mem::take(&mut state.replayed),
        mismatches: std::mem::take(&mut state.mismatches),
    }
}

/// The first decision that differs, comparing batch by batch and, within a batch, room by
/// room in the order each room decided.
fn first_divergence(logged: &[(u64, Decided)], replayed: &[(u64, Decided)]) -> Option<Divergence> {
    let last = logged.iter().chain(replayed).map(|(b, _)| *b).max().unwrap_or(0);
    for batch in 0..=last {
        let of = |all: &[(u64, Decided)]| {
            let mut these: Vec<Decided> = all.iter().filter(|(b, _)| *b == batch).map(|(_, d)| d.clone()).collect();
            these.sort_by(|a, b| a.room.cmp(&b.room));
            these
        };
        let (logged, replayed) = (of(logged), of(replayed));
        for i in 0..logged.len().max(replayed.len()) {
            let (l, r) = (logged.get(i), replayed.get(i));
            if l != r {
                let named =
                    l.or(r).map_or((String::new(), String::new()), |d| (d.room.clone(), d.client_msg_id.clone()));
                return Some(Divergence {
                    batch,
                    room: named.0,
                    client_msg_id: named.1,
                    logged: l.cloned(),
                    replayed: r.cloned(),
                });
            }
        }
    }
    None
}

// === the replaying bus, store, clock, ids and hook ===

struct State {
    batch: u64,
    store: HashMap<Key, VecDeque<(StoreCall, StoreAnswer)>>,
    clock: HashMap<Key, VecDeque<(Reading, i64)>>,
    ids: HashMap<Key, VecDeque<Uuid>>,
    lines: Vec<Line>,
    replayed: Vec<(u64, Decided)>,
    mismatches: Vec<String>,
    ownership: VecDeque<(u64, Vec<u32>, Vec<u32>)>,
    /// A version 1 log, from before the chain: the reads of a room's chain head are not in it.
    chainless: bool,
}

impl State {
    /// Tells the ownership changes logged after at most `batch` batches.
    fn ownership_up_to(&mut self, batch: u64) {
        while self.ownership.front().is_some_and(|(after, _, _)| *after <= batch) {
            let Some((_, acquired, released)) = self.ownership.pop_front() else { break };
            let list = |ps: &[u32]| ps.iter().map(u32::to_string).collect::<Vec<_>>().join(" ");
            let text = match (acquired.is_empty(), released.is_empty()) {
                (false, true) => format!("partitions taken: {}", list(&acquired)),
                (true, false) => format!("partitions released: {}", list(&released)),
                _ => format!("partitions taken: {}; released: {}", list(&acquired), list(&released)),
            };
            self.lines.push(Line { detail: false, text });
        }
    }

    fn detail(&mut self, text: String) {
        self.lines.push(Line { detail: true, text });
    }
}

/// A deadline reading past the log's: late enough that every deadline has passed, so a replay
/// that strayed ends instead of waiting. (A `ts` past the log's is 0, a message id the nil id.)
const PAST_THE_LOG_MS: i64 = i64::MAX / 4;

struct ReplayBus {
    state: Arc<Mutex<State>>,
    batches: Mutex<VecDeque<Vec<LoggedSend>>>,
}

struct NoReply;

#[async_trait]
impl Replier for NoReply {
    async fn reply(self: Box<Self>, _outcome: Result<SendOutcome, BusError>) {}
}

#[async_trait]
impl FanoutBus for ReplayBus {
    async fn next_batch(&self, _max: usize) -> Option<Vec<PendingSend>> {
        let sends = self.batches.lock().unwrap_or_else(PoisonError::into_inner).pop_front()?;
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let taken = state.batch;
        state.ownership_up_to(taken);
        state.batch += 1;
        let redelivered = sends.iter().filter(|s| s.delivery > 1).count();
        let text = match redelivered {
            0 => format!("batch {}: {} sends", state.batch, sends.len()),
            n => format!("batch {}: {} sends, {n} redelivered", state.batch, sends.len()),
        };
        state.lines.push(Line { detail: false, text });
        for s in &sends {
            let text = format!(
                "  send room {} {}/{} delivery {} deadline {} trace {} body {} bytes",
                s.room, s.user, s.client_msg_id, s.delivery, s.deadline_ms, s.trace_id, s.body_len
            );
            state.lines.push(Line { detail: s.delivery == 1, text });
        }
        Some(
            sends
                .into_iter()
                .map(|s| PendingSend {
                    command: SendCommand {
                        room: s.room,
                        user: s.user,
                        client_msg_id: s.client_msg_id,
                        body: "x".repeat(s.body_len),
                        traceparent: s.traceparent,
                        gateway: "replay".into(),
                        deadline_ms: s.deadline_ms,
                    },
                    delivery: s.delivery,
                    reply: Box::new(NoReply),
                })
                .collect(),
        )
    }

    async fn deliver(&self, _message: Arc<ChatMessage>, _traceparent: &str) -> Result<(), BusError> {
        Ok(())
    }

    fn pulls(&self, room: &str) -> bool {
        Replay(Arc::clone(&self.state)).reading(room, Reading::Pulls) != 0
    }
}

/// The store, clock, id source and hook of a replay, over one state.
#[derive(Clone)]
struct Replay(Arc<Mutex<State>>);

impl Replay {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The logged answer to `call`. A call other than the logged one is a mismatch: answered
    /// as logged when it is the same operation, else refused (the logged call stays next). An
    /// append the log does not hold (the replay strayed) is answered as applied, so the
    /// decision it leads to can be shown; other calls the log does not hold fail.
    fn answer(&self, room: &str, call: StoreCall) -> Result<StoreAnswer, StoreError> {
        let mut state = self.state();
        let batch = state.batch;
        let queue = state.store.entry((batch, room.to_owned())).or_default();
        let Some((logged_call, answer)) = queue.pop_front() else {
            let text = format!("batch {batch} room {room}: {} was not logged", describe_call(&call));
            state.mismatches.push(text);
            if let StoreCall::Append { .. } = call {
                state.detail(format!("  store {room}: {} -> (not logged) appended", describe_call(&call)));
                return Ok(StoreAnswer::Appended);
            }
            return Err(StoreError::unavailable("replay: the log holds no such store call"));
        };
        if std::mem::discriminant(&logged_call) != std::mem::discriminant(&call) {
            let text = format!(
                "batch {batch} room {room}: replay asked {}, the log has {}",
                describe_call(&call),
                describe_call(&logged_call)
            );
            queue.push_front((logged_call, answer));
            state.mismatches.push(text);
            return Err(StoreError::unavailable("replay: the log holds another store call here"));
        }
        state.detail(format!("  store {room}: {} -> {}", describe_call(&call), describe_answer(&answer)));
        if logged_call != call {
            let text = format!(
                "batch {batch} room {room}: replay asked {}, the log has {}",
                describe_call(&call),
                describe_call(&logged_call)
            );
            state.mismatches.push(text);
        }
        Ok(answer)
    }

    fn mismatch(&self, room: &str, text: String) {
        let mut state = self.state();
        let batch = state.batch;
        state.mismatches.push(format!("batch {batch} room {room}: {text}"));
    }
}

fn wrong_answer(answer: &StoreAnswer) -> StoreError {
    StoreError::unavailable(format!("replay: the log answered {}", describe_answer(answer)))
}

#[async_trait]
impl HistoryStore for Replay {
    async fn append(&self, batch: RoomAppend) -> Result<(), StoreError> {
        let call = StoreCall::append(&batch);
        match self.answer(&batch.room, call)? {
            StoreAnswer::Appended => Ok(()),
            StoreAnswer::Failed(e) => Err(e.error()),
            other => Err(wrong_answer(&other)),
        }
    }

    async fn last_seq(&self, room: &str) -> Result<u64, StoreError> {
        match self.answer(room, StoreCall::LastSeq)? {
            StoreAnswer::LastSeq(last) => Ok(last),
            StoreAnswer::Failed(e) => Err(e.error()),
            other => Err(wrong_answer(&other)),
        }
    }

    async fn find_by_client_msg_id(
        &self,
        room: &str,
        user: &str,
        client_msg_id: &str,
    ) -> Result<Option<ChatMessage>, StoreError> {
        let call = StoreCall::Find { user: user.to_owned(), client_msg_id: client_msg_id.to_owned() };
        match self.answer(room, call)? {
            StoreAnswer::Found(found) if found.len() == 1 => Ok(found[0].as_ref().map(|m| m.message(room))),
            StoreAnswer::Failed(e) => Err(e.error()),
            other => Err(wrong_answer(&other)),
        }
    }

    async fn find_by_client_msg_ids(
        &self,
        room: &str,
        keys: &[(&str, &str)],
    ) -> Result<Vec<Option<ChatMessage>>, StoreError> {
        let call =
            StoreCall::FindDedupe { keys: keys.iter().map(|(u, c)| ((*u).to_owned(), (*c).to_owned())).collect() };
        match self.answer(room, call)? {
            StoreAnswer::Found(found) => Ok(found.iter().map(|m| m.as_ref().map(|m| m.message(room))).collect()),
            StoreAnswer::Failed(e) => Err(e.error()),
            other => Err(wrong_answer(&other)),
        }
    }

    async fn page(&self, room: &str, query: PageQuery) -> Result<Page, StoreError> {
        // A read of the room's chain head that the log does not hold here (a version 1 log, from
        // before the chain, or a replay that strayed to another last seq) is answered with
        // unchained stand-ins: no decision depends on it, so the decisions it leads to can be
        // shown. In a strayed replay it is a mismatch; the logged call stays next.
        let (chainless, logged) = {
            let state = self.state();
            let next = state.store.get(&(state.batch, room.to_owned())).and_then(VecDeque::front);
            (state.chainless, next.is_some_and(|(call, _)| matches!(call, StoreCall::Page { .. })))
        };
        if chainless || !logged {
            if !chainless {
                let call = describe_call(&StoreCall::page(&query));
                self.mismatch(room, format!("{call} was not logged; answered with an unchained stand-in"));
            }
            let upto = query.before.map_or(u64::MAX, |before| before.saturating_sub(1));
            let seqs = query.seq_range(upto).0;
            let messages = seqs.map(|seq| LoggedMessage { seq, ..LoggedMessage::default() }.message(room)).collect();
            return Ok(Page { messages, has_more: false });
        }
        match self.answer(room, StoreCall::page(&query))? {
            StoreAnswer::Page { messages, has_more } => {
                Ok(Page { messages: messages.iter().map(|m| m.message(room)).collect(), has_more })
            }
            StoreAnswer::Failed(e) => Err(e.error()),
            other => Err(wrong_answer(&other)),
        }
    }

    async fn get_by_id(&self, _id: Uuid) -> Result<Option<ChatMessage>, StoreError> {
        Err(StoreError::unavailable("replay: history is not replayed"))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

impl Replay {
    fn reading(&self, room: &str, reading: Reading) -> i64 {
        let logged = {
            let mut state = self.state();
            let batch = state.batch;
            let logged = state.clock.get_mut(&(batch, room.to_owned())).and_then(VecDeque::pop_front);
            if let Some((_, ms)) = logged {
                state.detail(format!("  clock {room}: {reading:?} {ms}"));
            }
            logged
        };
        match logged {
            Some((logged, ms)) if logged == reading => ms,
            Some((logged, ms)) => {
                self.mismatch(room, format!("replay read the clock for {reading:?}, the log has {logged:?}"));
                ms
            }
            None => {
                self.mismatch(room, format!("replay read the clock for {reading:?}; the log has no more readings"));
                match reading {
                    Reading::Stamp => 0,
                    Reading::Now => PAST_THE_LOG_MS,
                    Reading::Pulls => 1,
                }
            }
        }
    }
}

impl Clock for Replay {
    fn stamp_ms(&self, room: &str) -> i64 {
        self.reading(room, Reading::Stamp)
    }

    fn now_ms(&self, room: &str) -> i64 {
        self.reading(room, Reading::Now)
    }
}

impl IdSource for Replay {
    fn next_id(&self, room: &str) -> Uuid {
        let id = {
            let mut state = self.state();
            let batch = state.batch;
            state.ids.get_mut(&(batch, room.to_owned())).and_then(VecDeque::pop_front)
        };
        id.unwrap_or_else(|| {
            self.mismatch(room, "replay drew a message id; the log has no more".into());
            Uuid::nil()
        })
    }
}

impl DecisionHook for Replay {
    fn batch(&self, _sends: &[PendingSend]) {}

    fn decided(&self, decided: Decided) {
        let mut state = self.state();
        let batch = state.batch;
        state.lines.push(Line { detail: false, text: format!("  {decided}") });
        state.replayed.push((batch, decided));
    }
}

/// A store call in a few words.
pub fn describe_call(call: &StoreCall) -> String {
    match call {
        StoreCall::LastSeq => "last_seq".into(),
        StoreCall::FindDedupe { keys } => format!("dedupe lookup of {} sends", keys.len()),
        StoreCall::Find { user, client_msg_id } => format!("find {user}/{client_msg_id}"),
        StoreCall::Append { expected_last_seq, messages } => {
            let seqs = match (messages.first(), messages.last()) {
                (Some(first), Some(last)) => format!("seqs {}..={}", first.seq, last.seq),
                _ => "nothing".into(),
            };
            format!("append {} messages ({seqs}) after last seq {expected_last_seq}", messages.len())
        }
        StoreCall::Page { after, before, limit } => {
            let bound = |b: &Option<u64>| b.map_or_else(|| "-".to_owned(), |b| b.to_string());
            format!("page of at most {limit} between seqs {} and {} (exclusive)", bound(after), bound(before))
        }
    }
}

/// A store answer in a few words.
pub fn describe_answer(answer: &StoreAnswer) -> String {
    match answer {
        StoreAnswer::LastSeq(last) => format!("last seq {last}"),
        StoreAnswer::Found(found) => {
            let hits: Vec<String> = found.iter().flatten().map(|m| format!("seq {}", m.seq)).collect();
            if hits.is_empty() {
                format!("{} keys, none stored", found.len())
            } else {
                format!("{} keys, stored: {}", found.len(), hits.join(", "))
            }
        }
        StoreAnswer::Appended => "appended".into(),
        StoreAnswer::Page { messages, has_more } => {
            let chained = messages.iter().filter(|m| m.digest.is_some()).count();
            format!("{} messages ({chained} chained), more: {has_more}", messages.len())
        }
        StoreAnswer::Failed(e) => format!("failed ({}): {}", e.kind, e.message),
    }
}
