//! Fanout workers and the partitions they pull. Every worker announces itself on
//! `chat.workers` each second and remembers who it heard in the last few seconds; each of the
//! 16 partitions of the send stream belongs to the live worker with the highest rendezvous
//! score, so every worker computes the same owners without talking more. A worker pulls the
//! partitions it owns from their durable consumers (`fanout-p<N>`) into one queue, from which
//! the fanout takes batches.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, AckKind};
use futures_util::StreamExt;
use protocol::subjects;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::sends::Pulled;
use super::{unavailable, HeartbeatGate, NatsBus};
use crate::{BusError, PendingSend};

/// The single consumer of every send used before partitions.
const LEGACY_CONSUMER: &str = "fanout";
/// A worker not heard from for this long is presumed gone; its partitions move.
const WORKER_SILENCE: Duration = Duration::from_secs(3);
/// How often a worker announces itself.
pub(super) const WORKER_HEARTBEAT: Duration = Duration::from_secs(1);
/// How long a process remembers a worker gone silent.
const SILENT_REMEMBERED: Duration = Duration::from_secs(60);
/// A worker not heard from for this long (a heartbeat missed) is asked whether its NATS
/// connection is still there ([`Prober`]): a process that died has none, and NATS answers the
/// probe "no responders" at once, so its partitions move now rather than after
/// [`WORKER_SILENCE`].
const PROBE_AFTER: Duration = Duration::from_millis(1250);
/// How often a silent worker is probed again.
const PROBE_EVERY: Duration = Duration::from_millis(500);
/// How long a probe waits. A worker whose connection is there but which does not answer
/// (frozen, or stalled) is not found gone: only its silence counts, as before.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// How long this process's own NATS connection must have been up before it trusts a probe's
/// "no responders": right after NATS restarts, processes reconnect one by one, and a worker not
/// back yet is not gone.
const PROBE_TRUSTED_AFTER: Duration = WORKER_SILENCE;
/// How long a process may hear no worker at all before it counts the quiet as its own (its NATS
/// connection stalled, or NATS did) rather than the workers': with any worker live, a heartbeat
/// comes every [`WORKER_HEARTBEAT`] (a worker hears its own too); the half heartbeat more is for
/// jitter.
const HEARING_GRACE: Duration = Duration::from_millis(1500);
/// How often a process looks for workers gone silent: a dead worker's partitions move within
/// [`WORKER_SILENCE`] and this of its last heartbeat.
pub(super) const SILENCE_CHECK: Duration = Duration::from_millis(250);
/// How long a send a leaving worker hands back waits before JetStream offers it again: time for
/// the leaving worker's pulls to end and the new owner's to begin.
const HAND_BACK_DELAY: Duration = Duration::from_millis(250);
/// How long a leaving worker waits for its departure to be announced before it goes anyway.
const LEAVE_ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a joining worker listens before it takes any partition: one heartbeat round and a
/// margin, so it knows the live workers. Taking at once would mean taking every partition
/// and handing most back a moment later, two workers pulling each meanwhile.
const JOIN_LISTEN: Duration = Duration::from_millis(1500);
/// The header a joining worker's heartbeats carry while it listens ([`JOINING`]): its peers
/// keep its share until it says it is ready, so no partition goes unpulled meanwhile.
/// Processes that predate it ignore headers and count the worker live at once, as before.
const WORKER_STATE_HEADER: &str = "Chat-Worker-State";
/// [`WORKER_STATE_HEADER`]'s value while the worker listens before taking partitions.
const JOINING: &str = "joining";

/// Durable consumer of a partition: `fanout-p<N>`.
fn consumer_name(partition: u32) -> String {
    format!("fanout-p{partition}")
}

/// The worker among `workers` that owns `partition`: the highest rendezvous score (a hash of
/// worker and partition), whatever order the workers come in; `None` without workers.
pub fn owner<'a>(partition: u32, workers: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    workers
        .into_iter()
        .map(|worker| (crc32fast::hash(format!("{worker}/{partition}").as_bytes()), worker))
        .max()
        .map(|(_, worker)| worker)
}

/// The workers one process has heard announce themselves, and when it last heard each: a
/// worker's own membership, or a gateway following the workers ([`Membership::observer`]).
pub(super) struct Membership {
    me: String,
    /// A gateway's view: it is never a worker itself and logs nothing (its workers do).
    observer: bool,
    heard: HashMap<String, Instant>,
    /// When this process last heard any worker (a worker, itself included): silences are
    /// measured on a clock that stops [`HEARING_GRACE`] after that ([`Membership::hearing_time`]).
    last_heard_any: Option<Instant>,
    /// Workers forgotten for their silence in the last [`SILENT_REMEMBERED`], with when each
    /// was last heard.
    silent: HashMap<String, Instant>,
    /// When this process first heard any worker: until [`JOIN_LISTEN`] after it, owners change
    /// as it hears the workers one by one, which are not moves.
    first_heard_any: Option<Instant>,
    /// Each partition's owner in the last [`view`](Self::view), and when it last moved from
    /// one worker to another.
    owners: Vec<Option<String>>,
    moved_at: Vec<Option<Instant>>,
    /// Workers counted live while still joining: they began joining when no other worker was
    /// ready (a cluster starting), so they take their shares together, as founders.
    founders: std::collections::HashSet<String>,
    /// When each silent worker was last probed ([`due_for_probe`](Self::due_for_probe)).
    probed_at: HashMap<String, Instant>,
}

impl Membership {
    /// Worker `me`'s membership: only `me` so far.
    fn new(me: String) -> Self {
        Self { observer: false, ..Self::observer(me) }
    }

    /// The view of process `me`, which follows the workers without being one.
    pub(super) fn observer(me: String) -> Self {
        Self {
            me,
            observer: true,
            heard: HashMap::new(),
            last_heard_any: None,
            silent: HashMap::new(),
            first_heard_any: None,
            owners: vec![None; subjects::PARTITIONS as usize],
            moved_at: vec![None; subjects::PARTITIONS as usize],
            founders: std::collections::HashSet::new(),
            probed_at: HashMap::new(),
        }
    }

    /// `worker` announced itself at `at` (logged when it was not live before: partitions move
    /// to it). A process that heard no worker for longer than [`HEARING_GRACE`] before `at`
    /// (a worker not even itself) was the deaf one: every worker it still counts live is taken
    /// as heard one heartbeat before `at`, so each has two heartbeats' time to be heard again
    /// and none looks silent merely for heartbeats this process missed. Otherwise a worker
    /// would take every partition while NATS is frozen and fight its peers for their fences
    /// after, and a gateway would copy the sends of workers that never stopped. A dead worker's
    /// silence is noticed at most a heartbeat later for it.
    pub(super) fn heard(&mut self, worker: &str, at: Instant) {
        self.heard_anyone(at);
        self.founders.remove(worker);
        self.silent.remove(worker);
        if self.heard.insert(worker.to_owned(), at).is_none() && worker != self.me && !self.observer {
            tracing::info!(worker = %self.me, peer = %worker, "worker heard; partitions move to it");
        }
    }

    /// `worker` announced at `at` that it is joining: it listens before it takes partitions,
    /// so it owns none yet and its peers keep pulling its share. But when no other worker is
    /// ready (this process included), the cluster is starting: the joiners count as live at
    /// once ([founders](Self::founders)), so each takes only its share and nothing moves when
    /// the others are ready. Heard joining while counted live (and not a founder), it was
    /// started again under the same name: the process before is gone, so it counts as gone
    /// silent at its last heartbeat (its partitions move now, and gateways copy the sends it
    /// may have pulled), not after [`WORKER_SILENCE`].
    pub(super) fn heard_joining(&mut self, worker: &str, at: Instant) {
        self.heard_anyone(at);
        if worker == self.me {
            return;
        }
        let none_ready = self.heard.keys().all(|live| live == worker || self.founders.contains(live));
        let founder = self.founders.contains(worker) || none_ready;
        if founder {
            self.founders.insert(worker.to_owned());
            self.silent.remove(worker);
            if self.heard.insert(worker.to_owned(), at).is_none() && !self.observer {
                tracing::info!(worker = %self.me, peer = %worker, "worker heard joining a starting cluster; partitions move to it");
            }
            return;
        }
        if let Some(last) = self.heard.remove(worker) {
            self.silent.insert(worker.to_owned(), last);
            if !self.observer {
                tracing::info!(worker = %self.me, peer = %worker, "worker started again; its partitions move until it is ready");
            }
        }
    }

    /// This process heard some worker at `at`: the clock of its hearing runs on (see
    /// [`heard`](Self::heard) on the deaf process).
    fn heard_anyone(&mut self, at: Instant) {
        self.first_heard_any.get_or_insert(at);
        if let Some(before) = self.last_heard_any.filter(|before| at > *before + HEARING_GRACE) {
            tracing::info!(
                process = %self.me,
                heard_nothing_for = ?at.duration_since(before),
                "heard the fanout workers again; their silence meanwhile is not counted against them"
            );
            let credited = at.checked_sub(WORKER_HEARTBEAT).unwrap_or(at);
            for seen in self.heard.values_mut() {
                *seen = (*seen).max(credited);
            }
        }
        self.last_heard_any = Some(self.last_heard_any.map_or(at, |before| before.max(at)));
    }

    /// `worker` said it is leaving: its partitions move now (logged).
    pub(super) fn left(&mut self, worker: &str) {
        self.founders.remove(worker);
        self.silent.remove(worker);
        if worker != self.me && self.heard.remove(worker).is_some() && !self.observer {
            tracing::info!(worker = %self.me, peer = %worker, "worker left; its partitions move");
        }
    }

    /// The live workers (not this one) to probe at `now`: each silent for [`PROBE_AFTER`] on
    /// this process's hearing clock and not probed in the last [`PROBE_EVERY`]. Noted as probed.
    fn due_for_probe(&mut self, now: Instant) -> Vec<String> {
        let hearing = self.hearing_time(now);
        let due: Vec<String> = self
            .heard
            .iter()
            .filter(|(worker, seen)| **worker != self.me && hearing.duration_since(**seen) >= PROBE_AFTER)
            .filter(|(worker, _)| self.probed_at.get(*worker).is_none_or(|at| now.duration_since(*at) >= PROBE_EVERY))
            .map(|(worker, _)| worker.clone())
            .collect();
        for worker in &due {
            self.probed_at.insert(worker.clone(), now);
        }
        let heard = &self.heard;
        self.probed_at.retain(|worker, _| heard.contains_key(worker));
        due
    }

    /// A probe sent at `probed_at` found that `worker` has no NATS connection: unless it was
    /// heard since, it is gone, and counts as gone silent at its last heartbeat (its partitions
    /// move now, and gateways copy the sends it may have pulled). Logged.
    fn gone(&mut self, worker: &str, probed_at: Instant) {
        if worker == self.me || self.heard.get(worker).is_none_or(|seen| *seen > probed_at) {
            return;
        }
        if let Some(seen) = self.heard.remove(worker) {
            self.founders.remove(worker);
            self.probed_at.remove(worker);
            self.silent.insert(worker.to_owned(), seen);
            if !self.observer {
                tracing::info!(
                    worker = %self.me,
                    peer = %worker,
                    silent_for = ?probed_at.saturating_duration_since(seen),
                    "worker's NATS connection is gone; its partitions move"
                );
            }
        }
    }

    /// The live workers, this one included, after [`owned`](Self::owned).
    fn live(&self) -> usize {
        self.heard.len()
    }

    /// The time silences are measured at, at `now`: no later than [`HEARING_GRACE`] after this
    /// process last heard any worker, so while it hears nobody (its own connection stalled,
    /// NATS did, or every worker stopped) no worker goes silent in its view.
    fn hearing_time(&self, now: Instant) -> Instant {
        self.last_heard_any.map_or(now, |last| now.min(last + HEARING_GRACE))
    }

    /// Forgets the workers silent for [`WORKER_SILENCE`] at `now` (logged: their partitions
    /// move).
    fn forget_silent(&mut self, now: Instant) {
        let now = self.hearing_time(now);
        let (me, observer, silent) = (&self.me, self.observer, &mut self.silent);
        self.heard.retain(|worker, seen| {
            let live = now.duration_since(*seen) < WORKER_SILENCE;
            if !live {
                silent.insert(worker.clone(), *seen);
                if worker != me && !observer {
                    tracing::info!(worker = %me, peer = %worker, silent_for = ?WORKER_SILENCE, "worker silent; its partitions move");
                }
            }
            live
        });
        silent.retain(|_, seen| now.duration_since(*seen) < SILENT_REMEMBERED);
        let heard = &self.heard;
        self.founders.retain(|worker| heard.contains_key(worker));
    }

    /// The partitions this worker owns at `now`: workers silent for [`WORKER_SILENCE`] are
    /// forgotten, and this worker is always live.
    fn owned(&mut self, now: Instant) -> Vec<u32> {
        self.forget_silent(now);
        self.heard.insert(self.me.clone(), now);
        (0..subjects::PARTITIONS)
            .filter(|partition| owner(*partition, self.heard.keys().map(String::as_str)) == Some(self.me.as_str()))
            .collect()
    }

    /// The owner of each partition among the live workers at `now`, when each last moved from
    /// one worker to another, and the workers gone silent lately (an observer's view: it
    /// counts only the workers it hears).
    pub(super) fn view(&mut self, now: Instant) -> WorkersView {
        self.forget_silent(now);
        let owners: Vec<Option<String>> = (0..subjects::PARTITIONS)
            .map(|partition| owner(partition, self.heard.keys().map(String::as_str)).map(str::to_owned))
            .collect();
        let settled = self.first_heard_any.is_some_and(|first| now >= first + JOIN_LISTEN);
        for (partition, (before, after)) in self.owners.iter().zip(&owners).enumerate() {
            if settled && before.is_some() && after.is_some() && before != after {
                self.moved_at[partition] = Some(now);
            }
        }
        self.owners.clone_from(&owners);
        WorkersView { owners, silent: self.silent.clone(), moved_at: self.moved_at.clone(), settled }
    }
}

/// Which worker owns each partition, as one process hears them, and which went silent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct WorkersView {
    /// The owner of each partition, by partition number (`None` without live workers).
    pub owners: Vec<Option<String>>,
    /// Workers that went silent lately (not those that said they left), with when each was
    /// last heard.
    pub silent: HashMap<String, Instant>,
    /// When each partition last moved from one worker to another, by partition number.
    pub moved_at: Vec<Option<Instant>>,
    /// Whether this process has heard the workers long enough ([`JOIN_LISTEN`]) for a change of
    /// owner to be a move, not the next worker heard.
    pub settled: bool,
}

impl WorkersView {
    /// When `worker` was last heard, if it went silent lately.
    pub fn silent_since(&self, worker: &str) -> Option<Instant> {
        self.silent.get(worker).copied()
    }

    /// The owner of `partition`, if any worker is live.
    pub fn owner_of(&self, partition: u32) -> Option<&str> {
        self.owners.get(partition as usize).and_then(Option::as_deref)
    }

    /// When `partition` last moved from one worker to another, as this process heard it.
    pub fn moved_at(&self, partition: u32) -> Option<Instant> {
        self.moved_at.get(partition as usize).copied().flatten()
    }
}

/// The workers' heartbeats (`chat.workers`) and departures (`chat.workers.left`), as one
/// process reads them into its [`Membership`].
struct Announcements {
    heard: async_nats::Subscriber,
    left: async_nats::Subscriber,
}

impl Announcements {
    /// Subscribes to both subjects.
    async fn subscribe(client: &async_nats::Client) -> Result<Self, BusError> {
        let heard = client.subscribe(subjects::WORKERS).await.map_err(|e| unavailable("subscribe to workers", e))?;
        let left = client
            .subscribe(subjects::WORKERS_LEFT)
            .await
            .map_err(|e| unavailable("subscribe to departing workers", e))?;
        Ok(Self { heard, left })
    }

    /// Waits for the next announcement and records it in `membership`; `false` once the
    /// heartbeats' subscription has ended. Cancel-safe: nothing is lost when another branch of
    /// a `select!` wins.
    async fn record_next(&mut self, membership: &mut Membership) -> bool {
        tokio::select! {
            announced = self.heard.next() => {
                let Some(message) = announced else { return false };
                let joining = message
                    .headers
                    .as_ref()
                    .and_then(|headers| headers.get(WORKER_STATE_HEADER))
                    .is_some_and(|state| state.as_str() == JOINING);
                if let Ok(name) = std::str::from_utf8(&message.payload) {
                    if joining {
                        membership.heard_joining(name, Instant::now());
                    } else {
                        membership.heard(name, Instant::now());
                    }
                }
            }
            Some(message) = self.left.next() => {
                if let Ok(name) = std::str::from_utf8(&message.payload) {
                    membership.left(name);
                }
            }
        }
        true
    }
}

/// Asks NATS whether workers gone quiet still have a connection: a request to the worker's
/// probe subject ([`subjects::worker_probe`]), which each worker answers while it runs, gets
/// "no responders" from the server once the worker's connection is gone (its process died: the
/// kernel closed its socket). A frozen worker, or one whose heartbeats are lost, still has its
/// connection and is left to its silence.
struct Prober {
    client: async_nats::Client,
    found_gone: mpsc::Sender<(String, Instant)>,
    gone: mpsc::Receiver<(String, Instant)>,
    /// This process's NATS (re)connects ([`NatsBus::connects`]), and when the last came.
    connects: tokio::sync::watch::Receiver<u64>,
    connected_since: Instant,
}

impl Prober {
    /// A prober on `bus`'s connection.
    fn new(bus: &NatsBus) -> Self {
        let (found_gone, gone) = mpsc::channel(64);
        Self {
            client: bus.client.clone(),
            found_gone,
            gone,
            connects: bus.connects.subscribe(),
            connected_since: Instant::now(),
        }
    }

    /// Probes the workers of `membership` due for it ([`Membership::due_for_probe`]), unless
    /// this process's own connection is down or came up less than [`PROBE_TRUSTED_AFTER`] ago.
    /// Each found gone comes out of [`next_gone`](Self::next_gone).
    fn probe(&mut self, membership: &mut Membership) {
        let now = Instant::now();
        if self.connects.has_changed().unwrap_or(false) {
            self.connects.borrow_and_update();
            self.connected_since = now;
        }
        let connected = self.client.connection_state() == async_nats::connection::State::Connected;
        if !connected || now < self.connected_since + PROBE_TRUSTED_AFTER {
            return;
        }
        for worker in membership.due_for_probe(now) {
            let Some(subject) = subjects::worker_probe(&worker) else { continue };
            let (client, found_gone) = (self.client.clone(), self.found_gone.clone());
            tokio::spawn(async move {
                let request = async_nats::Request::new().timeout(Some(PROBE_TIMEOUT));
                if let Err(e) = client.send_request(subject, request).await {
                    if e.kind() == async_nats::RequestErrorKind::NoResponders {
                        let _ = found_gone.send((worker, now)).await;
                    }
                }
            });
        }
    }

    /// The next worker found gone, with when its probe was sent.
    async fn next_gone(&mut self) -> (String, Instant) {
        match self.gone.recv().await {
            Some(gone) => gone,
            // This prober holds a sender: the channel never closes.
            None => std::future::pending().await,
        }
    }
}

impl NatsBus {
    /// Starts this process as a fanout worker: it announces itself, follows the other
    /// workers, and pulls the partitions it owns. Ownership is rendezvous hashing over the
    /// live workers, so every worker computes the same owners without talking more; when one
    /// goes silent its partitions move within a few seconds, and its unacked sends are
    /// redelivered to the new owner after `ack_wait`. During a change two workers may briefly
    /// pull the same partition: the store's fenced append keeps seqs right.
    ///
    /// Returns once this worker has listened for [`JOIN_LISTEN`] and taken its partitions, so
    /// a worker that says it is ready pulls its settled share.
    pub async fn start_worker(self: &Arc<Self>) -> Result<(), BusError> {
        let (tx, rx) = mpsc::channel(4 * 1024);
        *self.sends.lock().await = Some(rx);
        // Before partitions there was one consumer of every send; on a work-queue stream it
        // would overlap the partition consumers, so it goes (best effort: NATS may be down).
        if let Ok(stream) = self.ensure_stream().await {
            let _ = stream.delete_consumer(LEGACY_CONSUMER).await;
        }
        let mut announcements = Announcements::subscribe(&self.client).await?;
        // Answered while this worker runs, so peers probing it find its connection ([`Prober`]).
        let mut probes = match subjects::worker_probe(&self.config.name) {
            Some(subject) => {
                Some(self.client.subscribe(subject).await.map_err(|e| unavailable("subscribe to probes", e))?)
            }
            None => {
                tracing::warn!(
                    worker = %self.config.name,
                    "this worker's name is not a NATS subject token: peers cannot probe it, and find it gone \
                     only when it has been silent for 3 s"
                );
                None
            }
        };
        let mut prober = Prober::new(self);
        let bus = self.clone();
        let (settled_tx, settled) = tokio::sync::oneshot::channel();
        let mut settled_tx = Some(settled_tx);
        let listening_until = Instant::now() + JOIN_LISTEN;
        let membership = tokio::spawn(async move {
            let mut membership = Membership::new(bus.config.name.clone());
            let mut pullers: HashMap<u32, tokio::task::JoinHandle<()>> = HashMap::new();
            let mut tick = tokio::time::interval(WORKER_HEARTBEAT);
            let mut check = tokio::time::interval(SILENCE_CHECK);
            check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => bus.announce(Instant::now() < listening_until).await,
                    _ = check.tick() => prober.probe(&mut membership),
                    (worker, probed_at) = prober.next_gone() => membership.gone(&worker, probed_at),
                    Some(probe) = next_probe(&mut probes) => {
                        if let Some(reply) = probe.reply {
                            let _ = bus.client.publish(reply, bytes::Bytes::new()).await;
                        }
                        continue;
                    }
                    open = announcements.record_next(&mut membership) => if !open { break },
                    () = tokio::time::sleep_until(listening_until), if settled_tx.is_some() => {}
                    () = tx.closed() => {
                        // Leaving (see `leave`): the pulls stop first, so what the stream
                        // offers from now waits for the next owner; then the departure goes
                        // out after this worker's last heartbeat, on the same connection, so
                        // no peer hears it again afterwards.
                        for task in pullers.values() {
                            task.abort();
                        }
                        let _ = bus.client.publish(subjects::WORKERS_LEFT, bus.config.name.clone().into()).await;
                        let _ = bus.client.flush().await;
                        break;
                    }
                }
                if Instant::now() < listening_until {
                    continue;
                }
                if settled_tx.is_some() {
                    // Ready: said at once, so the peers hand over this worker's share as it
                    // takes it, not up to a heartbeat later.
                    bus.announce(false).await;
                }
                let owned = membership.owned(Instant::now());
                bus.metrics.workers_live.set(membership.live() as i64);
                pullers.retain(|partition, task| {
                    let keep = owned.contains(partition) && !task.is_finished();
                    if !keep {
                        tracing::info!(worker = %bus.config.name, partition, "partition released");
                        task.abort();
                    }
                    keep
                });
                for partition in owned {
                    if let std::collections::hash_map::Entry::Vacant(slot) = pullers.entry(partition) {
                        tracing::info!(worker = %bus.config.name, partition, "partition taken");
                        let (bus, tx) = (bus.clone(), tx.clone());
                        slot.insert(tokio::spawn(async move { bus.pull_partition(partition, tx).await }));
                    }
                }
                let mut pulled: Vec<u32> = pullers.keys().copied().collect();
                pulled.sort_unstable();
                bus.metrics.partitions_owned.set(pulled.len() as i64);
                bus.owned.send_if_modified(|owned| {
                    let changed = *owned != pulled;
                    if changed {
                        *owned = pulled;
                    }
                    changed
                });
                if let Some(settled) = settled_tx.take() {
                    let _ = settled.send(());
                }
            }
            for (_, task) in pullers {
                task.abort();
            }
        });
        *self.membership.lock().await = Some(membership);
        settled.await.map_err(|_| BusError::unavailable("the workers' membership ended before this worker joined"))?;
        Ok(())
    }

    /// Follows the fanout workers from a gateway: who is live and who owns each partition, so a
    /// send whose worker is gone is published again for the next owner ([`submit`]). Only
    /// heartbeats and departures are read; the view is recomputed every [`SILENCE_CHECK`].
    ///
    /// [`submit`]: crate::GatewayBus::submit
    pub async fn follow_workers(self: &Arc<Self>) -> Result<(), BusError> {
        let mut announcements = Announcements::subscribe(&self.client).await?;
        let mut prober = Prober::new(self);
        let bus = self.clone();
        tokio::spawn(async move {
            let mut membership = Membership::observer(bus.config.name.clone());
            let mut check = tokio::time::interval(SILENCE_CHECK);
            check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = check.tick() => prober.probe(&mut membership),
                    (worker, probed_at) = prober.next_gone() => membership.gone(&worker, probed_at),
                    open = announcements.record_next(&mut membership) => if !open { break },
                }
                let view = membership.view(Instant::now());
                bus.workers.send_if_modified(|current| {
                    let changed = **current != view;
                    if changed {
                        *current = Arc::new(view);
                    }
                    changed
                });
            }
        });
        Ok(())
    }

    /// The workers this gateway hears, as they change ([`follow_workers`](Self::follow_workers)).
    pub(super) fn workers_view(&self) -> tokio::sync::watch::Receiver<Arc<WorkersView>> {
        self.workers.subscribe()
    }

    /// Stops this worker taking sends and hands back those it pulled but did not take, so the
    /// next owner of their partitions stores them before their deadline rather than JetStream
    /// redelivering them after `ack_wait`, past it. Its peers hear that it left and take its
    /// partitions at once ([`FanoutBus::leave`]).
    ///
    /// Returns once the departure is announced, or after [`LEAVE_ANNOUNCE_TIMEOUT`]: a process
    /// that exits sooner may take its announcement with it, and its peers would then wait out
    /// [`WORKER_SILENCE`] before taking its partitions.
    ///
    /// [`FanoutBus::leave`]: crate::FanoutBus::leave
    pub(super) async fn leave_workers(&self) {
        let Some(mut queued) = self.sends.lock().await.take() else { return };
        // Ends the membership task: it announces the departure and stops the pulls.
        queued.close();
        let mut handed_back = 0usize;
        while let Some(pulled) = queued.recv().await {
            hand_back(&pulled.message).await;
            handed_back += 1;
        }
        let announced = match self.membership.lock().await.take() {
            Some(membership) => tokio::time::timeout(LEAVE_ANNOUNCE_TIMEOUT, membership).await.is_ok(),
            None => false,
        };
        let _ = self.client.flush().await;
        if announced {
            tracing::info!(worker = %self.config.name, handed_back, "left the fanout workers; queued sends handed back");
        } else {
            tracing::warn!(
                worker = %self.config.name,
                handed_back,
                "left the fanout workers without announcing it in time; peers take its partitions once it is silent"
            );
        }
    }

    /// Lets `gate` decide whether each heartbeat of this worker is published (a fault layer's
    /// seam; the first gate set stays).
    pub fn gate_heartbeats(&self, gate: HeartbeatGate) {
        let _ = self.heartbeat_gate.set(gate);
    }

    /// The partitions this worker pulls, in order, as they change (empty until
    /// [`start_worker`](Self::start_worker) took some, and on a gateway).
    pub fn owned_partitions(&self) -> tokio::sync::watch::Receiver<Vec<u32>> {
        self.owned.subscribe()
    }

    /// Publishes this worker's heartbeat on `chat.workers`, marked [`JOINING`] while it still
    /// listens before taking partitions, unless the fault layer's heartbeat gate drops it.
    async fn announce(&self, joining: bool) {
        if !self.heartbeat_gate.get().is_none_or(|pass| pass()) {
            return;
        }
        let name = self.config.name.clone().into();
        let _ = if joining {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(WORKER_STATE_HEADER, JOINING);
            self.client.publish_with_headers(subjects::WORKERS, headers, name).await
        } else {
            self.client.publish(subjects::WORKERS, name).await
        };
    }

    /// Whether this worker pulls `partition` now.
    pub(super) fn pulls_partition(&self, partition: u32) -> bool {
        self.owned.borrow().contains(&partition)
    }

    /// Pulls one partition's sends into the worker's queue until aborted, reopening the pull
    /// with backoff when NATS goes away.
    async fn pull_partition(&self, partition: u32, into: mpsc::Sender<Pulled>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.open_partition(partition).await {
                Ok((mut messages, ack_wait)) => {
                    backoff = Duration::from_millis(100);
                    while let Some(message) = messages.next().await {
                        match message {
                            Ok(message) => {
                                if let Err(unsent) = into.send(Pulled { message, ack_wait }).await {
                                    // The worker is leaving: the next owner takes it.
                                    hand_back(&unsent.0.message).await;
                                    return;
                                }
                            }
                            Err(e) => {
                                tracing::warn!(partition, error = %e, "pulling sends failed; reopening");
                                break;
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(partition, error = %e, ?backoff, "cannot pull sends yet; retrying"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Opens a pull on a partition's durable consumer, creating the consumer if needed, and
    /// returns it with the consumer's ack wait (an existing consumer keeps the one it was
    /// created with).
    async fn open_partition(&self, partition: u32) -> Result<(consumer::pull::Stream, Duration), BusError> {
        let stream = self.ensure_stream().await?;
        let name = consumer_name(partition);
        let consumer: consumer::PullConsumer = stream
            .get_or_create_consumer(
                &name,
                consumer::pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: subjects::send_partition(partition),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: self.config.ack_wait,
                    max_ack_pending: self.config.max_ack_pending,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| unavailable("create consumer", e))?;
        let ack_wait = consumer.cached_info().config.ack_wait;
        if ack_wait != self.config.ack_wait {
            tracing::warn!(
                consumer = name.as_str(),
                ack_wait_ms = ack_wait.as_millis() as u64,
                configured_ms = self.config.ack_wait.as_millis() as u64,
                "this partition's consumer keeps the ack wait it was created with, not the configured one \
                 (edit or delete the consumer to adopt it); refusals of expired sends settle only when the \
                 ack wait outlasts their deadline"
            );
        }
        let messages = consumer
            .stream()
            .max_messages_per_batch(256)
            .heartbeat(Duration::from_secs(5))
            .messages()
            .await
            .map_err(|e| unavailable("pull sends", e))?;
        Ok((messages, ack_wait))
    }

    /// The next batch of pulled sends ([`FanoutBus::next_batch`]); `None` on a process that
    /// is not a worker.
    ///
    /// [`FanoutBus::next_batch`]: crate::FanoutBus::next_batch
    pub(super) async fn next_pulled_batch(&self, max: usize) -> Option<Vec<PendingSend>> {
        let mut sends = self.sends.lock().await;
        let incoming = sends.as_mut()?;
        loop {
            let first = incoming.recv().await?;
            let mut batch: Vec<PendingSend> = self.pending(first).into_iter().collect();
            while batch.len() < max {
                match incoming.try_recv() {
                    Ok(message) => batch.extend(self.pending(message)),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                return Some(batch);
            }
        }
    }
}

/// The next probe of this worker ([`Prober`]); never, without a probe subscription.
async fn next_probe(probes: &mut Option<async_nats::Subscriber>) -> Option<async_nats::Message> {
    match probes {
        Some(probes) => probes.next().await,
        None => std::future::pending().await,
    }
}

/// Gives a pulled send back to JetStream, to be offered again after [`HAND_BACK_DELAY`] (best
/// effort: failing that, JetStream redelivers it after `ack_wait`).
pub(super) async fn hand_back(message: &jetstream::Message) {
    if let Err(e) = message.ack_with(AckKind::Nak(Some(HAND_BACK_DELAY))).await {
        tracing::warn!(subject = %message.subject, error = %e, "could not hand a send back; it is redelivered after ack_wait");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Worker names like the default `fanout-<8 hex digits>`, different for every `(set, i)`.
    fn worker(set: u32, i: u32) -> String {
        format!("fanout-{:08x}", crc32fast::hash(format!("{set}/{i}").as_bytes()))
    }

    fn workers(set: u32, n: u32) -> Vec<String> {
        (0..n).map(|i| worker(set, i)).collect()
    }

    /// `membership` hears `worker`'s heartbeat at `start` plus each of `beats` heartbeats.
    fn heard_at_beats(membership: &mut Membership, worker: &str, start: Instant, beats: std::ops::RangeInclusive<u32>) {
        for beat in beats {
            membership.heard(worker, start + WORKER_HEARTBEAT * beat);
        }
    }

    fn owners(workers: &[String]) -> Vec<Option<&str>> {
        (0..subjects::PARTITIONS).map(|p| owner(p, workers.iter().map(String::as_str))).collect()
    }

    #[test]
    fn consumers_are_named_by_partition() {
        assert_eq!(consumer_name(0), "fanout-p0");
        assert_eq!(consumer_name(15), "fanout-p15");
    }

    #[test]
    fn no_workers_own_nothing() {
        for partition in 0..subjects::PARTITIONS {
            assert_eq!(owner(partition, []), None);
        }
    }

    #[test]
    fn ownership_is_the_same_whatever_order_the_workers_are_heard_in() {
        for set in 0..50 {
            let forward = workers(set, 5);
            let mut backward = forward.clone();
            backward.reverse();
            let mut rotated = forward.clone();
            rotated.rotate_left(2);
            assert_eq!(owners(&forward), owners(&backward), "set {set}");
            assert_eq!(owners(&forward), owners(&rotated), "set {set}");
            assert_eq!(owners(&forward), owners(&forward.clone()), "set {set}");
        }
    }

    /// Workers of different builds must agree during a rolling upgrade: the owners of a known
    /// set never change.
    #[test]
    fn ownership_is_stable_across_versions() {
        let three: Vec<String> = ["fanout-1", "fanout-2", "fanout-3"].map(String::from).into();
        let expected = ["3", "1", "1", "2", "1", "3", "2", "1", "1", "2", "1", "2", "3", "3", "1", "2"];
        let got: Vec<&str> = owners(&three).into_iter().map(|o| o.unwrap().trim_start_matches("fanout-")).collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn every_partition_has_exactly_one_owner_among_the_live_workers() {
        for n in 1..=6 {
            for set in 0..20 {
                let live = workers(set, n);
                // Each worker decides for itself which partitions it owns; together they cover
                // every partition exactly once.
                let mut claims = vec![0; subjects::PARTITIONS as usize];
                for me in &live {
                    let mut membership = Membership::new(me.clone());
                    let now = Instant::now();
                    for other in &live {
                        membership.heard(other, now);
                    }
                    for partition in membership.owned(now) {
                        claims[partition as usize] += 1;
                    }
                }
                assert_eq!(claims, vec![1; subjects::PARTITIONS as usize], "{live:?}");
                for owner in owners(&live) {
                    assert!(live.iter().any(|w| Some(w.as_str()) == owner), "{owner:?} not in {live:?}");
                }
            }
        }
    }

    /// Only the newcomer gains partitions, so what moves is its share: about 1/(n+1) of them,
    /// averaged over many sets (16 partitions are too few to be even in every one).
    #[test]
    fn a_new_worker_takes_only_the_partitions_it_wins_about_one_in_n() {
        for n in 1..=5 {
            let (mut moved, mut total) = (0, 0);
            for set in 0..200 {
                let before = workers(set, n);
                let after = workers(set, n + 1);
                let newcomer = after[n as usize].as_str();
                for (old, new) in owners(&before).into_iter().zip(owners(&after)) {
                    total += 1;
                    if old != new {
                        moved += 1;
                        assert_eq!(new, Some(newcomer), "a partition moved between old workers");
                    }
                }
            }
            let share = f64::from(moved) / f64::from(total);
            let fair = 1.0 / f64::from(n + 1);
            assert!((share - fair).abs() < 0.03, "{n} → {}: the newcomer took {share:.3}, not about {fair:.3}", n + 1);
        }
    }

    #[test]
    fn a_departed_workers_partitions_move_and_no_others() {
        for set in 0..200 {
            let before = workers(set, 4);
            for gone in 0..before.len() {
                let mut after = before.clone();
                let departed = after.remove(gone);
                for (old, new) in owners(&before).into_iter().zip(owners(&after)) {
                    if old == Some(departed.as_str()) {
                        assert!(new.is_some() && new != old, "{departed}'s partition kept no live owner");
                    } else {
                        assert_eq!(old, new, "a partition of a live worker moved when {departed} left");
                    }
                }
            }
        }
    }

    #[test]
    fn a_worker_alone_owns_every_partition() {
        let mut membership = Membership::new("fanout-a".into());
        assert_eq!(membership.owned(Instant::now()), (0..subjects::PARTITIONS).collect::<Vec<_>>());
    }

    #[test]
    fn a_silent_worker_is_forgotten_after_the_silence_and_not_before() {
        let start = Instant::now();
        let mut membership = Membership::new("fanout-a".into());
        membership.heard("fanout-b", start);
        let all: BTreeSet<u32> = (0..subjects::PARTITIONS).collect();
        let shared: BTreeSet<u32> = membership.owned(start).into_iter().collect();
        assert!(shared.len() < all.len(), "fanout-b owns none of {shared:?}");

        // fanout-a hears its own heartbeat each second, fanout-b's no more.
        heard_at_beats(&mut membership, "fanout-a", start, 1..=3);
        let almost = start + WORKER_SILENCE - Duration::from_millis(1);
        assert_eq!(membership.owned(almost).into_iter().collect::<BTreeSet<_>>(), shared, "forgotten too early");

        let silent = start + WORKER_SILENCE;
        assert_eq!(membership.owned(silent).into_iter().collect::<BTreeSet<_>>(), all, "still counted after silence");
    }

    #[test]
    fn a_worker_that_says_it_left_is_forgotten_at_once_and_this_one_never_is() {
        let start = Instant::now();
        let mut membership = Membership::new("fanout-a".into());
        membership.heard("fanout-b", start);
        assert!(membership.owned(start).len() < subjects::PARTITIONS as usize);
        membership.left("fanout-a");
        membership.left("fanout-b");
        assert_eq!(membership.owned(start), (0..subjects::PARTITIONS).collect::<Vec<_>>(), "fanout-b's moved at once");
        assert_eq!(membership.live(), 1);
    }

    #[test]
    fn a_worker_is_probed_once_a_heartbeat_is_missed_and_again_only_after_a_while() {
        let start = Instant::now();
        let mut membership = Membership::new("fanout-a".into());
        membership.heard("fanout-a", start);
        membership.heard("fanout-b", start);
        assert!(
            membership.due_for_probe(start + PROBE_AFTER - Duration::from_millis(1)).is_empty(),
            "probed too early"
        );
        membership.heard("fanout-a", start + WORKER_HEARTBEAT);
        assert_eq!(membership.due_for_probe(start + PROBE_AFTER), ["fanout-b"], "only the silent peer, never itself");
        assert!(membership.due_for_probe(start + PROBE_AFTER + PROBE_EVERY / 2).is_empty(), "probed again at once");
        assert_eq!(membership.due_for_probe(start + PROBE_AFTER + PROBE_EVERY), ["fanout-b"]);
        membership.heard("fanout-b", start + PROBE_AFTER + PROBE_EVERY);
        assert!(
            membership.due_for_probe(start + PROBE_AFTER + PROBE_EVERY * 2).is_empty(),
            "heard again, still probed"
        );
    }

    #[test]
    fn a_worker_found_gone_loses_its_partitions_at_once_and_counts_as_silent() {
        let start = Instant::now();
        let mut membership = Membership::new("fanout-a".into());
        membership.heard("fanout-b", start);
        let shared = membership.owned(start);
        assert!(shared.len() < subjects::PARTITIONS as usize);
        let probed = start + PROBE_AFTER;
        membership.gone("fanout-b", probed);
        assert_eq!(membership.owned(probed).len(), subjects::PARTITIONS as usize, "fanout-b's partitions did not move");
        let view = membership.view(probed);
        assert_eq!(view.silent_since("fanout-b"), Some(start), "gateways must copy the sends it may have pulled");
        membership.gone("fanout-a", probed);
        assert_eq!(membership.live(), 1, "a worker never finds itself gone");
    }

    #[test]
    fn a_probe_that_a_heartbeat_overtook_finds_nobody_gone() {
        let start = Instant::now();
        let mut membership = Membership::new("fanout-a".into());
        membership.heard("fanout-b", start);
        let shared = membership.owned(start);
        let probed = start + PROBE_AFTER;
        // The worker was started again, or its connection came back, after the probe was sent.
        membership.heard("fanout-b", probed + Duration::from_millis(10));
        membership.gone("fanout-b", probed);
        assert_eq!(membership.owned(probed + Duration::from_millis(10)), shared);
        assert_eq!(membership.view(probed).silent_since("fanout-b"), None);
    }

    #[test]
    fn hearing_a_worker_again_keeps_it_live() {
        let start = Instant::now();
        let mut membership = Membership::new("fanout-a".into());
        membership.heard("fanout-b", start);
        let shared = membership.owned(start);
        membership.heard("fanout-b", start + WORKER_HEARTBEAT * 2);
        assert_eq!(membership.owned(start + WORKER_SILENCE + WORKER_HEARTBEAT), shared);
    }

    #[test]
    fn this_worker_counts_itself_live_without_hearing_its_own_heartbeat() {
        let start = Instant::now();
        let mut membership = Membership::new("fanout-a".into());
        assert_eq!(membership.owned(start).len(), subjects::PARTITIONS as usize);
        membership.heard("fanout-b", start);
        heard_at_beats(&mut membership, "fanout-c", start, 1..=3);
        // fanout-b went silent; fanout-a owns its share with fanout-c, never nothing.
        let owned = membership.owned(start + WORKER_SILENCE);
        assert!(!owned.is_empty() && owned.len() < subjects::PARTITIONS as usize);
        membership.left("fanout-c");
        assert_eq!(membership.owned(start + WORKER_SILENCE).len(), subjects::PARTITIONS as usize);
    }

    #[test]
    fn a_worker_that_hears_nobody_not_even_itself_keeps_its_share() {
        let start = Instant::now();
        let mut membership = Membership::new("fanout-a".into());
        membership.heard("fanout-a", start);
        membership.heard("fanout-b", start);
        let share = membership.owned(start);
        assert!(share.len() < subjects::PARTITIONS as usize);

        // NATS frozen for ten seconds: taking fanout-b's partitions would only fight it for them.
        let thawed = start + WORKER_SILENCE * 3;
        assert_eq!(membership.owned(thawed), share, "took partitions while hearing nobody");
        membership.heard("fanout-a", thawed);
        assert_eq!(membership.owned(thawed + WORKER_HEARTBEAT + WORKER_HEARTBEAT / 2), share);
        heard_at_beats(&mut membership, "fanout-a", thawed, 1..=2);
        assert_eq!(membership.owned(thawed + WORKER_HEARTBEAT * 2).len(), subjects::PARTITIONS as usize);
    }

    #[test]
    fn a_gateway_that_hears_no_worker_counts_the_quiet_as_its_own() {
        let start = Instant::now();
        let mut gateway = Membership::observer("gateway-1".into());
        gateway.heard("fanout-a", start);
        gateway.heard("fanout-b", start + WORKER_HEARTBEAT / 2);
        let both = gateway.view(start + WORKER_HEARTBEAT / 2);
        let same = |view: WorkersView| (view.owners, view.silent) == (both.owners.clone(), both.silent.clone());

        // Nothing heard for ten seconds: its own connection, not the workers, went quiet.
        let deaf = start + WORKER_SILENCE * 3;
        assert!(same(gateway.view(deaf)), "workers went silent while the gateway heard nobody");

        // Heard again: fanout-b's next heartbeat is still to come, and it is not silent meanwhile.
        gateway.heard("fanout-a", deaf);
        assert!(same(gateway.view(deaf + WORKER_HEARTBEAT + WORKER_HEARTBEAT / 2)));

        // But a worker that stays silent after that is found out.
        heard_at_beats(&mut gateway, "fanout-a", deaf, 1..=2);
        let view = gateway.view(deaf + WORKER_HEARTBEAT * 2);
        assert_eq!(view.silent_since("fanout-b"), Some(deaf - WORKER_HEARTBEAT));
        assert!(view.owners.iter().all(|owner| owner.as_deref() == Some("fanout-a")));
    }

    #[test]
    fn a_gateway_that_keeps_hearing_one_worker_finds_the_other_silent_in_time() {
        let start = Instant::now();
        let mut gateway = Membership::observer("gateway-1".into());
        gateway.heard("fanout-a", start);
        gateway.heard("fanout-b", start);
        heard_at_beats(&mut gateway, "fanout-a", start, 1..=3);
        let almost = gateway.view(start + WORKER_SILENCE - Duration::from_millis(1));
        assert_eq!(almost.silent_since("fanout-b"), None, "silent too early");
        let view = gateway.view(start + WORKER_SILENCE);
        assert_eq!(view.silent_since("fanout-b"), Some(start));
    }

    #[test]
    fn a_joining_worker_owns_nothing_in_its_peers_views_until_it_says_it_is_ready() {
        let start = Instant::now();
        let mut worker = Membership::new("fanout-a".into());
        let mut gateway = Membership::observer("gateway-1".into());
        for process in [&mut worker, &mut gateway] {
            process.heard("fanout-a", start);
            process.heard_joining("fanout-b", start);
            process.heard_joining("fanout-b", start + WORKER_HEARTBEAT);
        }
        let listening = start + WORKER_HEARTBEAT + WORKER_HEARTBEAT / 2;
        assert_eq!(worker.owned(listening).len(), subjects::PARTITIONS as usize, "handed partitions to a listener");
        let view = gateway.view(listening);
        assert!(view.owners.iter().all(|owner| owner.as_deref() == Some("fanout-a")));
        assert_eq!(view.silent_since("fanout-b"), None, "a joining worker is not a silent one");

        // Ready: its share moves to it, as a new worker's always did.
        worker.heard("fanout-b", listening);
        gateway.heard("fanout-b", listening);
        let share = worker.owned(listening);
        assert!(!share.is_empty() && share.len() < subjects::PARTITIONS as usize);
        let owners = gateway.view(listening).owners;
        let taken = owners.iter().filter(|owner| owner.as_deref() == Some("fanout-b")).count();
        assert_eq!(taken, subjects::PARTITIONS as usize - share.len());
    }

    #[test]
    fn a_worker_started_again_under_its_name_is_gone_at_once_and_back_when_ready() {
        let start = Instant::now();
        let mut worker = Membership::new("fanout-a".into());
        let mut gateway = Membership::observer("gateway-1".into());
        for process in [&mut worker, &mut gateway] {
            process.heard("fanout-a", start);
            process.heard("fanout-b", start);
        }
        let share = worker.owned(start);
        assert!(share.len() < subjects::PARTITIONS as usize);

        // fanout-b was killed and started again within the silence: its first heartbeat says so.
        let restarted = start + WORKER_HEARTBEAT;
        worker.heard_joining("fanout-b", restarted);
        gateway.heard_joining("fanout-b", restarted);
        assert_eq!(worker.owned(restarted).len(), subjects::PARTITIONS as usize, "kept waiting out the silence");
        let view = gateway.view(restarted);
        assert_eq!(view.silent_since("fanout-b"), Some(start), "its sends get no copy for the new owner");

        worker.heard("fanout-b", restarted + JOIN_LISTEN);
        assert_eq!(worker.owned(restarted + JOIN_LISTEN), share);
    }

    #[test]
    fn a_gateway_notes_when_each_partition_moved_from_one_worker_to_another() {
        let start = Instant::now();
        let mut gateway = Membership::observer("gateway-1".into());
        gateway.heard("fanout-a", start);
        let first = gateway.view(start);
        assert!(first.moved_at.iter().all(Option::is_none), "a first owner is not a move");
        assert!(!first.settled);
        // Hearing the workers one by one in its first moments, as it starts, moves nothing.
        gateway.heard("fanout-c", start + WORKER_HEARTBEAT / 2);
        assert!(gateway.view(start + WORKER_HEARTBEAT / 2).moved_at.iter().all(Option::is_none));
        gateway.left("fanout-c");
        assert!(gateway.view(start + WORKER_HEARTBEAT / 2).moved_at.iter().all(Option::is_none));
        let joined = start + JOIN_LISTEN;
        gateway.heard("fanout-b", joined);
        let view = gateway.view(joined);
        assert!(view.settled);
        for partition in 0..subjects::PARTITIONS {
            let moved = view.owner_of(partition) == Some("fanout-b");
            assert_eq!(view.moved_at(partition), moved.then_some(joined), "partition {partition}");
        }
        // Later views keep when each moved.
        gateway.heard("fanout-a", joined + WORKER_HEARTBEAT);
        gateway.heard("fanout-b", joined + WORKER_HEARTBEAT);
        assert_eq!(gateway.view(joined + WORKER_HEARTBEAT).moved_at, view.moved_at);
    }

    #[test]
    fn workers_starting_together_take_their_shares_at_once_and_nothing_moves_when_they_are_ready() {
        let start = Instant::now();
        let mut a = Membership::new("fanout-a".into());
        let mut b = Membership::new("fanout-b".into());
        let mut gateway = Membership::observer("gateway-1".into());
        // Both listening; each hears the other (and the gateway both) joining, no one ready.
        for beat in 0..=1 {
            let at = start + WORKER_HEARTBEAT * beat;
            a.heard_joining("fanout-b", at);
            b.heard_joining("fanout-a", at);
            gateway.heard_joining("fanout-a", at);
            gateway.heard_joining("fanout-b", at);
        }
        let ready = start + JOIN_LISTEN;
        let (share_a, share_b) = (a.owned(ready), b.owned(ready));
        assert_eq!(share_a.len() + share_b.len(), subjects::PARTITIONS as usize, "{share_a:?} {share_b:?}");
        assert!(share_a.iter().all(|p| !share_b.contains(p)));
        let before = gateway.view(ready);
        // Their first plain heartbeats (after a's, b's joining heartbeat still counts b live).
        a.heard_joining("fanout-b", ready);
        assert_eq!(a.owned(ready), share_a, "a founder's joining heartbeat is not a restart");
        for process in [&mut a, &mut b, &mut gateway] {
            process.heard("fanout-a", ready);
            process.heard("fanout-b", ready);
        }
        assert_eq!(a.owned(ready), share_a);
        assert_eq!(b.owned(ready), share_b);
        let after = gateway.view(ready);
        assert_eq!(after.owners, before.owners);
        assert!(after.moved_at.iter().all(Option::is_none), "a partition moved at start");
    }

    #[test]
    fn a_worker_hearing_its_own_joining_heartbeat_still_takes_its_share_when_ready() {
        let start = Instant::now();
        let mut worker = Membership::new("fanout-b".into());
        worker.heard("fanout-a", start);
        worker.heard_joining("fanout-b", start);
        let share = worker.owned(start + JOIN_LISTEN);
        assert!(!share.is_empty() && share.len() < subjects::PARTITIONS as usize);
    }
}
