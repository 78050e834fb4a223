//! Batch-at-a-time sequencing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bus::{BusError, FanoutBus, PendingSend};
use futures_util::future::join_all;
use protocol::bus::{SendCommand, SendOutcome};
use protocol::{chain, names, ChatMessage};
use storage::pacer::Pacer;
use storage::{HistoryStore, PageQuery, RoomAppend, StoreError, StoreErrorKind};
use telemetry::journal::Journal;
use telemetry::logging::HOP_TARGET;
use telemetry::metrics::Metrics;
use tracing::Instrument;
use uuid::Uuid;

use crate::clock::{Clock, IdSource, SystemClock, V7Ids};
use crate::config::FanoutConfig;
use crate::decision_log::{Decided, DecisionHook, DecisionKind, DecisionLog};
use crate::room_hook::RoomHook;

/// A fanout worker.
pub struct Fanout {
    store: Arc<dyn HistoryStore>,
    /// The same store, never recorded in a decision log: for settling failed appends in the
    /// background ([`settle_later`](Self::settle_later)), which decides nothing a replay checks
    /// and whose reads would interleave with the logged ones. `None` in a replay.
    settle_store: Option<Arc<dyn HistoryStore>>,
    bus: Arc<dyn FanoutBus>,
    journal: Arc<Journal>,
    metrics: Metrics,
    clock: Arc<dyn Clock>,
    ids: Arc<dyn IdSource>,
    /// Told of every batch taken and every decision made (a decision log), when set.
    hook: Option<Arc<dyn DecisionHook>>,
    /// Entered around each room's sequencing, when set.
    room_hook: Option<Arc<dyn RoomHook>>,
    config: FanoutConfig,
}

/// The newest message of a room as the worker knows it: its seq and its chain digest, which the
/// room's next message carries as `prev`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Head {
    seq: u64,
    digest: String,
}

impl Head {
    /// An empty room: seq 0, chained from the genesis.
    fn empty() -> Self {
        Self { seq: 0, digest: chain::GENESIS.to_owned() }
    }
}

/// A new message of a failed append that may still land, to be settled in the background
/// ([`Fanout::settle_later`]).
struct Unsettled {
    message: ChatMessage,
    /// The send's trace context, for the late publish.
    traceparent: String,
    /// How to ack the send late if the message landed ([`bus::Replier::late_ack`]).
    late_ack: Option<Box<dyn bus::LateAck>>,
}

/// What became of one send of a room group.
enum Decision {
    /// A new message with this seq.
    New(ChatMessage),
    /// A repeat of an already stored message.
    Duplicate(ChatMessage),
    /// Refused for a reason the client sees.
    Rejected(String),
    /// Past the workers' deadline: its ack could no longer reach the gateway by the send's own
    /// deadline, so it is not stored (refused as expired).
    Expired,
}

impl Fanout {
    /// A worker over a store and a bus.
    pub fn new(
        store: Arc<dyn HistoryStore>,
        bus: Arc<dyn FanoutBus>,
        journal: Arc<Journal>,
        metrics: Metrics,
        config: FanoutConfig,
    ) -> Self {
        Self {
            settle_store: Some(store.clone()),
            store,
            bus,
            journal,
            metrics,
            clock: Arc::new(SystemClock),
            ids: Arc::new(V7Ids),
            hook: None,
            room_hook: None,
            config,
        }
    }

    /// The same worker stamping `ts` from `clock`.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The same worker drawing new messages' ids from `ids`.
    pub fn with_ids(mut self, ids: Arc<dyn IdSource>) -> Self {
        self.ids = ids;
        self
    }

    /// The same worker telling `hook` of each batch it takes and each decision it makes.
    pub fn with_hook(mut self, hook: Arc<dyn DecisionHook>) -> Self {
        self.hook = Some(hook);
        self
    }

    /// The same worker settling nothing in the background: no late acks or publishes of failed
    /// appends that landed after all (a replay re-runs decisions, and those are not).
    pub fn without_settling(mut self) -> Self {
        self.settle_store = None;
        self
    }

    /// The same worker entering `hook` around each room's sequencing.
    pub fn with_room_hook(mut self, hook: Option<Arc<dyn RoomHook>>) -> Self {
        self.room_hook = hook;
        self
    }

    /// The same worker recording into `log` what it takes, asks, reads and decides (call it
    /// after [`with_clock`](Self::with_clock) and [`with_ids`](Self::with_ids): it wraps them).
    pub fn with_decision_log(mut self, log: &DecisionLog) -> Self {
        self.store = log.store(self.store);
        self.bus = log.bus(self.bus);
        self.clock = log.clock(self.clock);
        self.ids = log.ids(self.ids);
        self.hook = Some(Arc::new(log.clone()));
        self
    }

    fn decided(&self, room: &str, command: Option<&SendCommand>, decision: impl FnOnce() -> DecisionKind) {
        if let Some(hook) = &self.hook {
            hook.decided(Decided {
                room: room.to_owned(),
                user: command.map_or_else(String::new, |c| c.user.clone()),
                client_msg_id: command.map_or_else(String::new, |c| c.client_msg_id.clone()),
                decision: decision(),
            });
        }
    }

    /// Answers every send of `room` with `error`.
    async fn fail_all(&self, room: &str, sends: Vec<PendingSend>, error: BusError) {
        for pending in &sends {
            self.decided(room, Some(&pending.command), || DecisionKind::Unavailable {
                reason: error.message().to_owned(),
            });
        }
        answer_all(sends, error).await;
    }

    /// Sequences sends until the bus closes or `shutdown` resolves. A batch in progress is
    /// finished before returning.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut heads: HashMap<String, Head> = HashMap::new();
        let mut pacer = Pacer::new(self.config.batch_window);
        loop {
            let hold = pacer.hold(Instant::now());
            let next = async {
                if !hold.is_zero() {
                    tokio::time::sleep(hold).await;
                }
                self.bus.next_batch(self.config.max_batch).await
            };
            let batch = tokio::select! {
                biased;
                () = &mut shutdown => break,
                batch = next => match batch {
                    Some(batch) => batch,
                    None => break,
                },
            };
            pacer.started(Instant::now(), batch.len());
            self.metrics.fanout_batch.observe(batch.len() as f64);
            if let Some(hook) = &self.hook {
                hook.batch(&batch);
            }
            if heads.len() > self.config.max_cached_rooms {
                heads.clear();
            }
            let mut rooms: Vec<(String, Vec<PendingSend>)> = Vec::new();
            let mut index: HashMap<String, usize> = HashMap::new();
            for pending in batch {
                if pending.delivery > 1 {
                    self.journal.record_send(
                        &pending.command.dedupe_key(),
                        pending.command.trace_id(),
                        "fanout.redelivered",
                        serde_json::json!({"delivery": pending.delivery, "worker": self.journal.process()}),
                    );
                }
                let room = pending.command.room.clone();
                let slot = *index.entry(room.clone()).or_insert_with(|| {
                    rooms.push((room, Vec::new()));
                    rooms.len() - 1
                });
                rooms[slot].1.push(pending);
            }
            let this = &self;
            let results = join_all(rooms.into_iter().map(|(room, sends)| {
                let cached = heads.get(&room).cloned();
                async move {
                    let head = this.sequence_room(&room, cached, sends).await;
                    (room, head)
                }
            }))
            .await;
            for (room, head) in results {
                match head {
                    Some(head) => heads.insert(room, head),
                    None => heads.remove(&room),
                };
            }
        }
        tracing::info!("fanout worker stopped");
    }

    /// Sequences, stores, delivers and answers one room's sends. Returns the room's head (last
    /// seq and its digest) afterwards, or `None` when it is unknown (the store failed).
    async fn sequence_room(&self, room: &str, cached: Option<Head>, sends: Vec<PendingSend>) -> Option<Head> {
        let _entered = match &self.room_hook {
            Some(hook) => hook.enter(room).await,
            None => None,
        };
        // Sends already past their deadline are answered first, without a store read: a worker
        // that is behind then catches up at the cost of a clock reading per send.
        let sends = self.answer_expired(room, sends, true).await;
        if sends.is_empty() {
            return cached;
        }
        // Messages of failed appends that may still land: once every send here is answered,
        // they are settled in the background (a send refused meanwhile is acked late if its
        // message shows up).
        let mut maybe_landed = Vec::new();
        let head = self.sequence_sends(room, cached, sends, &mut maybe_landed).await;
        if !maybe_landed.is_empty() {
            self.settle_later(maybe_landed);
        }
        head
    }

    /// The attempts of [`sequence_room`](Self::sequence_room): sequence, append, and on a
    /// conflict or a failed append sequence again, until every send is answered. Messages of
    /// appends that failed but may still land are added to `maybe_landed`.
    async fn sequence_sends(
        &self,
        room: &str,
        cached: Option<Head>,
        mut sends: Vec<PendingSend>,
        maybe_landed: &mut Vec<Unsettled>,
    ) -> Option<Head> {
        let mut known = cached;
        // Whether an earlier attempt appended some of these sends and failed: a send that then
        // expires may still have been written by it, so its refusal is not `untried`.
        let mut appended_before = false;
        // Whether the store failed an append before its commit: the store was down a moment
        // ago, so a failed read of the room is asked again until the deadline, not refused.
        let mut failed_before_commit = false;
        for attempt in 0..=self.config.conflict_retries {
            let head = match known.take() {
                Some(head) => head,
                None => loop {
                    // After an append that failed before its commit, each send that expires is
                    // answered at its own deadline, not at the batch's latest; untried, since
                    // nothing of it was committed.
                    if failed_before_commit && !appended_before {
                        sends = self.answer_expired(room, sends, true).await;
                        if sends.is_empty() {
                            return None;
                        }
                    }
                    let failed = match self.read_head(room, &sends).await {
                        Ok(head) => break head,
                        Err(e) => e,
                    };
                    match self.cut_short(room, sends, appended_before).await {
                        CutShort::AllAnswered => return None,
                        CutShort::Others(others) => sends = others,
                        CutShort::No(others) => {
                            sends = others;
                            if failed_before_commit && self.time_left(room, &sends) > RESOLVE_PAUSE {
                                tokio::time::sleep(RESOLVE_PAUSE).await;
                            } else {
                                self.fail_all(room, sends, read_failed(failed, appended_before)).await;
                                return None;
                            }
                        }
                    }
                },
            };
            let last = head.seq;
            // A failed dedupe read changes nothing: unless an append of these sends failed
            // (its write may still land), the head stays known, and the room's next sends need
            // not read it again. On a slow store that read is two more round trips per batch.
            let head_after_failed_read = |head: &Head| (!appended_before).then(|| head.clone());
            let decisions = loop {
                let failed = match self.decide(room, &head, &sends).await {
                    Ok(decisions) => break decisions,
                    Err(e) => e,
                };
                match self.cut_short(room, sends, appended_before).await {
                    CutShort::AllAnswered => return head_after_failed_read(&head),
                    CutShort::Others(others) => sends = others,
                    CutShort::No(others) => {
                        self.fail_all(room, others, read_failed(failed, appended_before)).await;
                        return head_after_failed_read(&head);
                    }
                }
            };
            let new: Vec<ChatMessage> = decisions
                .iter()
                .filter_map(|d| match d {
                    Decision::New(m) => Some(m.clone()),
                    _ => None,
                })
                .collect();
            let new_head = match new.last() {
                Some(newest) => Head { seq: newest.seq, digest: newest.digest.clone().unwrap_or_default() },
                None => head,
            };
            // One `fanout.sequence` span per new message, with its `store.append` child open
            // while the (shared) append runs.
            let mut sequence_spans = Vec::with_capacity(new.len());
            let mut store_spans = Vec::with_capacity(new.len());
            for (decision, pending) in decisions.iter().zip(&sends) {
                if let Decision::New(message) = decision {
                    let span = tracing::info_span!(target: HOP_TARGET, "fanout.sequence", room = %message.room, seq = message.seq, message_id = %message.id);
                    telemetry::trace::set_parent(
                        &span,
                        telemetry::trace::message_context(Some(&pending.command.traceparent)),
                    );
                    store_spans.push(
                        tracing::info_span!(target: HOP_TARGET, parent: &span, "store.append", messages = new.len()),
                    );
                    sequence_spans.push(span);
                }
            }
            // Whether a failed append was stored anyway is known by its newest message: a store
            // may append a big batch in chunks, and stop after some of them.
            if let Some(newest) = new.last().cloned() {
                let concerning = Concerning::messages(room, &decisions, new.len());
                let append = RoomAppend { room: room.to_owned(), expected_last_seq: last, messages: new };
                let appended = match self.commit_by(room, &decisions, &sends) {
                    Some(commit_by) => self.timed("append", concerning, self.store.append_by(append, commit_by)).await,
                    None => self.timed("append", concerning, self.store.append(append)).await,
                };
                drop(store_spans);
                match appended {
                    Ok(()) => {}
                    // Fenced off: another worker took the room's partition, and nothing of the
                    // append was committed. Sequencing again takes the partition back (after the
                    // store's grace), or finds what the other worker stored.
                    // Fenced off because the room's partition moved from this worker: the new
                    // owner sequences these sends. Taking the fence back would fence off its
                    // appends in turn, each side waiting out the store's grace, until the
                    // sends' deadlines.
                    Err(fenced) if self.moved_away(room, &fenced) => {
                        tracing::info!(room, sends = sends.len(), error = %fenced, "room's partition moved; sends handed back to its new owner");
                        for pending in sends {
                            self.decided(room, Some(&pending.command), || DecisionKind::HandedBack);
                            pending.reply.release().await;
                        }
                        return None;
                    }
                    Err(conflict) if conflict.is_conflict() || conflict.kind() == StoreErrorKind::Fenced => {
                        self.metrics.seq_conflicts.inc();
                        // The messages' ids are drawn again on the retry: their sends' trace ids
                        // are what stays.
                        let sends_of = Concerning::sends(room, &sends);
                        tracing::debug!(
                            room,
                            attempt,
                            trace_id = %sends_of.trace_id,
                            client_msg_id = sends_of.client_msg_id,
                            sends = sends_of.count,
                            error = %conflict,
                            "sequencing conflict; retrying"
                        );
                        self.decided(room, sends.first().map(|p| &p.command), || DecisionKind::ConflictRetry {
                            attempt,
                        });
                        if self.clock.now_ms(room) > self.latest_deadline(room, &sends) {
                            break;
                        }
                        // Another worker is appending to this room: let it finish, with jitter
                        // so two workers do not keep colliding in step.
                        let ceiling = 1u64 << attempt.min(3);
                        let pause = rand::random_range(1..=ceiling);
                        tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
                        appended_before = true;
                        continue;
                    }
                    // The store failed before it sent the commit: nothing of the append is or
                    // will be stored, so there is nothing to ask, and a send refused from here
                    // on is still untried as far as a stored copy goes. Sequence again, reading
                    // the room until it answers or the deadline passes.
                    Err(e) if e.kind() == StoreErrorKind::NotCommitted => {
                        tracing::debug!(room, attempt, error = %e, "append failed before its commit; sequencing again");
                        self.decided(room, sends.first().map(|p| &p.command), || DecisionKind::FailedRetry { attempt });
                        failed_before_commit = true;
                        continue;
                    }
                    Err(e) => {
                        let outcome = self.resolve(&newest, self.latest_deadline(room, &sends)).await;
                        if outcome != Outcome::Applied {
                            // Not there when asked, or no answer: the write may still land
                            // (a store just back from a freeze applies what waited in its
                            // sockets after answering reads sent later). The sends' refusals
                            // will not settle them, so their gateways wait on, and a message
                            // found landed is acked to them late and still reaches the room.
                            maybe_landed.extend(decisions.iter().zip(&sends).filter_map(|(decision, pending)| {
                                match decision {
                                    Decision::New(m) => Some(Unsettled {
                                        message: m.clone(),
                                        traceparent: pending.command.traceparent.clone(),
                                        late_ack: pending.reply.late_ack(),
                                    }),
                                    _ => None,
                                }
                            }));
                        }
                        match outcome {
                            // The write went through after all.
                            Outcome::Applied => {}
                            // It did not: sequence again (repeats now find what others stored).
                            Outcome::NotApplied => {
                                self.decided(room, sends.first().map(|p| &p.command), || DecisionKind::FailedRetry {
                                    attempt,
                                });
                                appended_before = true;
                                continue;
                            }
                            Outcome::Unknown => {
                                self.fail_all(room, sends, BusError::unavailable(e.to_string())).await;
                                return None;
                            }
                        }
                    }
                }
            }
            self.finish(sends, decisions, sequence_spans, appended_before).await;
            return Some(new_head);
        }
        self.fail_all(room, sends, BusError::unavailable(format!("room {room}: too many sequencing conflicts"))).await;
        None
    }

    /// After a read of the room failed: whether it was cut short by a send's deadline (bounded
    /// reads give up at the earliest), answering every send now past its deadline. The others
    /// then read again (their own deadlines bound that read); when none expired the read truly
    /// failed. `appended_before` as in [`sequence_sends`](Self::sequence_sends).
    async fn cut_short(&self, room: &str, sends: Vec<PendingSend>, appended_before: bool) -> CutShort {
        let waiting = sends.len();
        let others = self.answer_expired(room, sends, !appended_before).await;
        match others.len() {
            0 => CutShort::AllAnswered,
            left if left < waiting => CutShort::Others(others),
            _ => CutShort::No(others),
        }
    }

    /// Answers `unavailable` to every valid send of `sends` past its deadline (by one clock
    /// reading) and returns the others; `untried` when no append of this worker held them.
    /// Invalid sends stay, to be rejected with their reason.
    async fn answer_expired(&self, room: &str, sends: Vec<PendingSend>, untried: bool) -> Vec<PendingSend> {
        let now = self.clock.now_ms(room);
        let (expired, live): (Vec<PendingSend>, Vec<PendingSend>) = sends.into_iter().partition(|pending| {
            let command = &pending.command;
            command.deadline_ms != 0 && now > command.deadline_ms && invalid(command).is_none()
        });
        for pending in expired {
            self.decided(room, Some(&pending.command), || DecisionKind::Expired);
            let outcome = self.expired(&pending.command, untried);
            pending.reply.reply(outcome).await;
        }
        live
    }

    /// Records that `command` expired before it could be stored, and its answer: `untried`
    /// when no append of this worker ever held it.
    fn expired(&self, command: &SendCommand, untried: bool) -> Result<SendOutcome, BusError> {
        self.journal.record_send(&command.dedupe_key(), command.trace_id(), "fanout.expired", serde_json::json!({}));
        let reason = "send expired before it could be stored";
        Err(if untried { BusError::expired(reason) } else { BusError::unavailable(reason) })
    }

    /// Reads the room's head from the store: its last seq, then the digest of the message with
    /// that seq (both store calls are in a decision log, so a replay reads the same).
    ///
    /// A room whose newest message was stored before the chain existed has no digest to chain
    /// from: its chain starts at the next message, from the digest that message would have had
    /// with the genesis as `prev` (verifiers skip the unchained message and check from there).
    async fn read_head(&self, room: &str, sends: &[PendingSend]) -> Result<Head, StoreError> {
        let concerning = Concerning::sends(room, sends);
        let by = self.read_by(room, sends);
        let last = self.timed("last_seq", concerning, self.store.last_seq_by(room, by)).await?;
        if last == 0 {
            return Ok(Head::empty());
        }
        let query = PageQuery::between(last - 1, last + 1);
        let page = self.timed("page", concerning, self.store.page_by(room, query, by)).await?;
        let Some(newest) = page.messages.into_iter().find(|m| m.seq == last) else {
            return Err(StoreError::corrupt(format!("room {room}: last seq {last} is not readable")));
        };
        let digest = match newest.digest {
            Some(digest) => digest,
            None => chain::digest(chain::GENESIS, &newest),
        };
        Ok(Head { seq: last, digest })
    }

    /// Decides each send's fate: a repeat of a stored message, a repeat within this batch, a
    /// rejection, or a new message with the next seq, chained to the one before it.
    async fn decide(&self, room: &str, head: &Head, sends: &[PendingSend]) -> Result<Vec<Decision>, StoreError> {
        let mut decisions = Vec::with_capacity(sends.len());
        let mut in_batch: HashMap<(&str, &str), usize> = HashMap::new();
        let mut next_seq = head.seq + 1;
        let mut prev = head.digest.clone();
        let keys: Vec<(&str, &str)> =
            sends.iter().map(|p| (p.command.user.as_str(), p.command.client_msg_id.as_str())).collect();
        let by = self.read_by(room, sends);
        let mut stored = self
            .timed("find_dedupe", Concerning::sends(room, sends), self.store.find_by_client_msg_ids_by(room, &keys, by))
            .await?;
        for (i, pending) in sends.iter().enumerate() {
            let command = &pending.command;
            if let Some(reason) = invalid(command) {
                decisions.push(Decision::Rejected(reason));
                continue;
            }
            if command.deadline_ms != 0 && self.clock.now_ms(room) > command.deadline_ms {
                decisions.push(Decision::Expired);
                continue;
            }
            if let Some(&earlier) = in_batch.get(&(command.user.as_str(), command.client_msg_id.as_str())) {
                if let Decision::New(message) = &decisions[earlier] {
                    decisions.push(Decision::Duplicate(message.clone()));
                    continue;
                }
            }
            if let Some(message) = stored.get_mut(i).and_then(Option::take) {
                decisions.push(Decision::Duplicate(message));
                continue;
            }
            in_batch.insert((command.user.as_str(), command.client_msg_id.as_str()), i);
            let id = self.ids.next_id(room);
            let mut message = ChatMessage {
                room: room.to_owned(),
                seq: next_seq,
                id,
                user: command.user.clone(),
                body: command.body.clone(),
                ts: self.clock.stamp_ms(room),
                client_msg_id: command.client_msg_id.clone(),
                trace_id: command.trace_id().to_owned(),
                prev: None,
                digest: None,
            };
            chain::seal(&mut message, prev);
            prev = message.digest.clone().unwrap_or_default();
            decisions.push(Decision::New(message));
            next_seq += 1;
        }
        Ok(decisions)
    }

    /// After a successful append: record, deliver new messages in seq order, answer senders.
    async fn finish(
        &self,
        sends: Vec<PendingSend>,
        decisions: Vec<Decision>,
        sequence_spans: Vec<tracing::Span>,
        appended_before: bool,
    ) {
        let mut sequence_spans = sequence_spans.into_iter();
        for (pending, decision) in sends.into_iter().zip(decisions) {
            let command = &pending.command;
            self.decided(&command.room, Some(command), || match &decision {
                Decision::New(m) => DecisionKind::New { seq: m.seq, id: m.id, ts: m.ts },
                Decision::Duplicate(m) => DecisionKind::Duplicate { seq: m.seq, id: m.id },
                Decision::Rejected(reason) => DecisionKind::Rejected { reason: reason.clone() },
                Decision::Expired => DecisionKind::Expired,
            });
            let dedupe_key = command.dedupe_key();
            let outcome = match decision {
                Decision::New(message) => {
                    let sequence_span = sequence_spans.next().unwrap_or_else(tracing::Span::none);
                    let span = tracing::info_span!(target: HOP_TARGET, parent: &sequence_span, "fanout.publish", room = %message.room, seq = message.seq);
                    let traceparent =
                        telemetry::trace::span_traceparent(&span).unwrap_or_else(|| command.traceparent.clone());
                    self.metrics.sequenced.inc();
                    tracing::debug!(room = %message.room, seq = message.seq, message_id = %message.id, trace_id = %message.trace_id, "sequenced");
                    self.journal.link(&dedupe_key, message.id);
                    self.journal.record(
                        message.id,
                        &message.trace_id,
                        "fanout.sequence",
                        serde_json::json!({"seq": message.seq}),
                    );
                    self.journal.record(
                        message.id,
                        &message.trace_id,
                        "store.append",
                        serde_json::json!({"durable": true}),
                    );
                    let message = Arc::new(message);
                    let delivered = self.publish(&message, &traceparent).instrument(span).await;
                    let detail = match &delivered {
                        Ok(()) => serde_json::json!({}),
                        Err(e) => serde_json::json!({"error": e.to_string()}),
                    };
                    self.journal.record(message.id, &message.trace_id, "fanout.publish", detail);
                    Ok(SendOutcome { message: (*message).clone(), duplicate: false })
                }
                Decision::Duplicate(message) => {
                    // Hops this worker recorded for the send (a stall, say) belong to the message.
                    self.journal.link(&dedupe_key, message.id);
                    self.journal.record(
                        message.id,
                        &message.trace_id,
                        "fanout.duplicate",
                        serde_json::json!({"client_msg_id": command.client_msg_id}),
                    );
                    Ok(SendOutcome { message, duplicate: true })
                }
                Decision::Rejected(reason) => Err(BusError::rejected(reason)),
                Decision::Expired => self.expired(command, !appended_before),
            };
            pending.reply.reply(outcome).await;
        }
    }

    /// After a failed append, learns whether it applied anyway (a timed-out write may still
    /// land) from its `newest` message, asking the store until it answers or the sends'
    /// deadline passes.
    async fn resolve(&self, newest: &ChatMessage, deadline_ms: i64) -> Outcome {
        loop {
            // `last_seq` also completes a claim whose writes were cut short.
            let answer = match self.store.last_seq(&newest.room).await {
                Ok(last) if last < newest.seq => Ok(None),
                Ok(_) => self.store.find_by_client_msg_id(&newest.room, &newest.user, &newest.client_msg_id).await,
                Err(e) => Err(e),
            };
            match answer {
                Ok(Some(stored)) if stored.id == newest.id => return Outcome::Applied,
                Ok(_) => return Outcome::NotApplied,
                Err(e) => {
                    tracing::warn!(room = %newest.room, message_id = %newest.id, trace_id = %newest.trace_id, error = %e, "store still failing; cannot tell whether the append applied")
                }
            }
            if self.clock.now_ms(&newest.room) + RESOLVE_PAUSE.as_millis() as i64 > deadline_ms {
                return Outcome::Unknown;
            }
            tokio::time::sleep(RESOLVE_PAUSE).await;
        }
    }

    /// Keeps asking the store, in the background, whether appends that failed and may still
    /// land (their outcome unknown, or "not there" when asked) did. A message that did is
    /// acked to its gateway at once (the send's answer if its deadline has not passed, else its
    /// late word, `stored`) and published to the room: without that it would reach
    /// members only when a later message of the room revealed the gap, in a room that then fell
    /// quiet never.
    fn settle_later(&self, unsettled: Vec<Unsettled>) {
        let Some(store) = self.settle_store.clone() else { return };
        let (bus, journal) = (self.bus.clone(), self.journal.clone());
        tokio::spawn(async move {
            let checks = unsettled.into_iter().map(|one| settle_one(store.as_ref(), one));
            let settled = join_all(checks).await;
            for (message, traceparent, acked) in settled.into_iter().flatten() {
                tracing::info!(room = %message.room, seq = message.seq, message_id = %message.id, trace_id = %message.trace_id, acked, "an append whose outcome was unknown had landed; acked and published late");
                let published = bus.deliver(Arc::new(message.clone()), &traceparent).await;
                let detail = match &published {
                    Ok(()) => serde_json::json!({"late": true, "acked": acked}),
                    Err(e) => serde_json::json!({"late": true, "acked": acked, "error": e.to_string()}),
                };
                journal.record(message.id, &message.trace_id, "fanout.publish", detail);
            }
        });
    }

    /// Publishes a stored message to the gateways.
    async fn publish(&self, message: &Arc<ChatMessage>, traceparent: &str) -> Result<(), BusError> {
        let _waiting = self.waiting(&message.room, "bus.deliver");
        self.bus.deliver(message.clone(), traceparent).await
    }

    /// Lists in `/debug/waits` that the sequencing of `room` (which holds the room's
    /// sequencer: its gateways' sends wait for it) waits for `what`, until dropped.
    fn waiting(&self, room: &str, what: &str) -> telemetry::waits::Waiting {
        self.journal.waits().begin(format!("sequence {room}"), vec![format!("room-sequencer:{room}")], what)
    }

    /// Whether `error` fenced this worker off from `room` because the room's partition moved
    /// to another worker: its sends go back to the new owner, and it is no store error.
    fn moved_away(&self, room: &str, error: &StoreError) -> bool {
        error.kind() == StoreErrorKind::Fenced && !self.bus.pulls(room)
    }

    /// Runs a store operation for the messages `concerning` names, timing it and logging its
    /// failure with them. Neither a sequencing conflict nor an append fenced off because the
    /// room's partition moved from this worker (its sends are handed back to the new owner, an
    /// expected step of every handover) is a store error.
    async fn timed<T>(
        &self,
        op: &str,
        concerning: Concerning<'_>,
        f: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let waiting = self.waiting(concerning.room, op);
        let result = f.await;
        drop(waiting);
        self.metrics.store_latency.with_label_values(&[op]).observe(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            if !e.is_conflict() && !self.moved_away(concerning.room, e) {
                self.metrics.store_errors.with_label_values(&[op]).inc();
                tracing::warn!(
                    op,
                    room = concerning.room,
                    trace_id = %concerning.trace_id,
                    message_id = concerning.message_id.map(tracing::field::display),
                    client_msg_id = concerning.client_msg_id,
                    messages = concerning.count,
                    error = %e,
                    "store operation failed"
                );
            }
        }
        result
    }

    /// The latest an append of `decisions` may commit: the earliest deadline of the sends it
    /// stores, so a store that hangs gives it up in time to refuse them by their deadline, but
    /// never sooner than [`APPEND_BUDGET`] from now, so an append of sends close to their
    /// deadline is not given up while the store answers as usual. `None` when no send has one.
    fn commit_by(&self, room: &str, decisions: &[Decision], sends: &[PendingSend]) -> Option<tokio::time::Instant> {
        let earliest = decisions
            .iter()
            .zip(sends)
            .filter(|(decision, pending)| matches!(decision, Decision::New(_)) && pending.command.deadline_ms != 0)
            .map(|(_, pending)| pending.command.deadline_ms)
            .min()?;
        let left = u64::try_from(earliest - self.clock.now_ms(room)).unwrap_or(0);
        Some(tokio::time::Instant::now() + std::time::Duration::from_millis(left).max(APPEND_BUDGET))
    }

    /// When a read for `sends` is given up: just past the earliest deadline among them (a
    /// millisecond, so the send reads as expired then), so a store that hangs does not hold a
    /// send's answer past it (a read cut short changes nothing). A minute from now when none has
    /// one.
    fn read_by(&self, room: &str, sends: &[PendingSend]) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        let Some(earliest) = sends.iter().map(|p| p.command.deadline_ms).filter(|d| *d > 0).min() else {
            return now + UNBOUNDED_READ;
        };
        let left = u64::try_from(earliest - self.clock.now_ms(room)).unwrap_or(0);
        now + std::time::Duration::from_millis(left + 1)
    }

    /// How long until the latest deadline of a room's sends (zero once it has passed).
    fn time_left(&self, room: &str, sends: &[PendingSend]) -> std::time::Duration {
        let left = self.latest_deadline(room, sends) - self.clock.now_ms(room);
        std::time::Duration::from_millis(u64::try_from(left).unwrap_or(0))
    }

    /// The latest deadline of a room's sends (now + 2 s when none has one).
    fn latest_deadline(&self, room: &str, sends: &[PendingSend]) -> i64 {
        sends
            .iter()
            .map(|p| p.command.deadline_ms)
            .filter(|d| *d > 0)
            .max()
            .unwrap_or_else(|| self.clock.now_ms(room) + 2_000)
    }
}

/// The messages of a room that a store operation or a retry is for, named in its log line by
/// the first of them and how many there are (one room's part of a batch can hold a thousand;
/// each one's own outcome reaches its gateway, which logs a failure with its ids).
#[derive(Clone, Copy)]
struct Concerning<'a> {
    room: &'a str,
    /// The first one's trace id.
    trace_id: &'a str,
    /// The first one's id, once sequenced (an append).
    message_id: Option<Uuid>,
    /// The first one's sender's key, which names it before it is sequenced.
    client_msg_id: &'a str,
    count: usize,
}

impl<'a> Concerning<'a> {
    /// A room's sends, before they are sequenced.
    fn sends(room: &'a str, sends: &'a [PendingSend]) -> Self {
        let first = sends.first().map(|pending| &pending.command);
        Concerning {
            room,
            trace_id: first.map_or(protocol::bus::NO_TRACE_ID, SendCommand::trace_id),
            message_id: None,
            client_msg_id: first.map_or("", |command| command.client_msg_id.as_str()),
            count: sends.len(),
        }
    }

    /// The `count` new messages among a room's `decisions`, about to be appended.
    fn messages(room: &'a str, decisions: &'a [Decision], count: usize) -> Self {
        let first = decisions.iter().find_map(|decision| match decision {
            Decision::New(message) => Some(message),
            _ => None,
        });
        Concerning {
            room,
            trace_id: first.map_or(protocol::bus::NO_TRACE_ID, |message| message.trace_id.as_str()),
            message_id: first.map(|message| message.id),
            client_msg_id: first.map_or("", |message| message.client_msg_id.as_str()),
            count,
        }
    }
}

/// Whether a failed append applied after all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Applied,
    NotApplied,
    Unknown,
}

/// Asks the store until it tells whether `one`'s message landed; acks it late when it did, and
/// returns it (with its traceparent and whether it was acked) to be published.
///
/// "Not there" is believed only once the store has answered for [`NOT_LANDED_AFTER`]: a write
/// sent before the store froze waits in a socket and may apply just after reads sent later.
async fn settle_one(store: &dyn HistoryStore, one: Unsettled) -> Option<(ChatMessage, String, bool)> {
    let Unsettled { message, traceparent, late_ack } = one;
    let started = Instant::now();
    let mut answering_since: Option<Instant> = None;
    loop {
        tokio::time::sleep(RESOLVE_PAUSE).await;
        match store.find_by_client_msg_id(&message.room, &message.user, &message.client_msg_id).await {
            Ok(Some(stored)) if stored.id == message.id => {
                let acked = late_ack.is_some();
                if let Some(late_ack) = late_ack {
                    late_ack.stored(SendOutcome { message: message.clone(), duplicate: false }).await;
                }
                return Some((message, traceparent, acked));
            }
            // Another message holds the send's key: a later attempt stored it, and acked it.
            Ok(Some(_)) => return None,
            Ok(None) => {
                if answering_since.get_or_insert_with(Instant::now).elapsed() >= NOT_LANDED_AFTER {
                    return None;
                }
            }
            Err(_) if started.elapsed() < SETTLE_WITHIN => {}
            Err(e) => {
                tracing::warn!(room = %message.room, message_id = %message.id, trace_id = %message.trace_id, error = %e, "gave up learning whether an append landed; a later message of the room repairs it if it did");
                return None;
            }
        }
    }
}

/// What bounds a read for sends without a deadline: the store's own request timeouts end it
/// much sooner.
const UNBOUNDED_READ: std::time::Duration = std::time::Duration::from_secs(60);

/// What [`Fanout::cut_short`] found after a failed read.
enum CutShort {
    /// Every send was past its deadline, and is answered.
    AllAnswered,
    /// Some were, and are answered; these others are not yet.
    Others(Vec<PendingSend>),
    /// None was: the read failed on its own. Every send is still waiting.
    No(Vec<PendingSend>),
}

/// The least time an append is given before its commit ([`Fanout::commit_by`]): longer than
/// a healthy store's append under load, so only a store that hangs has an append given up.
const APPEND_BUDGET: std::time::Duration = std::time::Duration::from_millis(500);

/// Pause between attempts to learn a failed append's fate.
const RESOLVE_PAUSE: std::time::Duration = std::time::Duration::from_millis(250);
/// How long a worker keeps asking whether an append whose outcome stayed unknown landed.
const SETTLE_WITHIN: std::time::Duration = std::time::Duration::from_secs(120);
/// How long the store must have answered "not there" before a worker believes that an append
/// whose outcome was unknown did not land: as long as a gateway listens for a send's late word
/// after its deadline. A node back from a freeze works through what queued meanwhile, and a
/// commit sent before the freeze was seen to apply 2-6 s after the first answers.
const NOT_LANDED_AFTER: std::time::Duration = std::time::Duration::from_secs(6);

/// Why a command is not acceptable, re-checked here because the bus may carry anything.
fn invalid(command: &SendCommand) -> Option<String> {
    if !names::is_valid_room(&command.room) {
        return Some("invalid room name".into());
    }
    if !names::is_valid_user(&command.user) {
        return Some("invalid user name".into());
    }
    if !names::is_valid_client_msg_id(&command.client_msg_id) {
        return Some("invalid client_msg_id".into());
    }
    None
}

/// The refusal of sends whose store read failed (the room's head, or the dedupe lookup). Before
/// any append of them (`appended_before` false) nothing of them was written, so the refusal is
/// [`untried`](BusError::untried): the gateway may pass it on at once when no other copy can be
/// stored (a store outage then answers `unavailable` within the read's timeout, not `internal`
/// at the deadline). After a failed append, a write may still land.
fn read_failed(error: StoreError, appended_before: bool) -> BusError {
    if appended_before {
        BusError::unavailable(error.to_string())
    } else {
        BusError::unwritten(error.to_string())
    }
}

async fn answer_all(sends: Vec<PendingSend>, error: BusError) {
    for pending in sends {
        pending.reply.reply(Err(error.clone())).await;
    }
}
