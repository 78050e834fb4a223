//! The CQL store: history in ScyllaDB (tested on Apache Cassandra 5) through the `scylla` driver.
//!
//! Appends are plain writes, fenced by owner epochs (docs/architecture.md, "Sequencing on the
//! cluster"): a writer takes the fence of a room's partition once, with a lightweight
//! transaction that raises the fence's epoch, and waits out the grace of the writer before it
//! (less when that writer let the fence go on purpose and said so in `fence_releases`);
//! every write it makes then carries a timestamp derived from its epoch, so a write of an older
//! epoch always loses. An append writes the message, dedupe and id rows, reads that the epoch is
//! still its own, and commits by writing the room's `last_seq`; it answers success only when the
//! commit completed within the fence window of that read. Rows above a room's `last_seq` were never
//! committed: lookups check a row against the committed seqs and the row it points at.
//!
//! Rooms last written before epochs (by a transaction that also kept a `pending` record of its
//! messages) are completed by [`HistoryStore::last_seq`] and [`HistoryStore::page`] as before.
//! The schema lives in `storage/schema/*.cql`; see docs/storage.md.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::future::BoxFuture;
use futures_util::{StreamExt, TryStreamExt};
use protocol::ChatMessage;
use scylla::client::execution_profile::{ExecutionProfile, ExecutionProfileHandle};
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::policies::load_balancing::{DefaultPolicy, LatencyAwarenessBuilder};
use scylla::response::query_result::QueryResult;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::Statement;
use scylla::value::{CqlValue, Row};
use uuid::Uuid;

pub use scylla::statement::{Consistency, SerialConsistency};

use crate::fence::{fence_of, Appending, Entry, Fences, Known, LeaseSlot};
use crate::hedge::Hedge;
use crate::rows::{batch_chunks, MessageRows, RowValues, BATCHED_BODY_BYTES, MESSAGES_PER_BATCH};
use crate::{HistoryStore, Page, PageQuery, RoomAppend, StoreError, StoreErrorKind};

/// Consecutive seqs per `messages` partition: `bucket = seq / BUCKET_SIZE`.
pub const BUCKET_SIZE: u64 = 1000;

/// Schema files, applied in this order on every connect (all idempotent).
const MIGRATIONS: &[(&str, &str)] = &[
    ("0001_history.cql", include_str!("../schema/0001_history.cql")),
    ("0002_chain.cql", include_str!("../schema/0002_chain.cql")),
    ("0003_fence.cql", include_str!("../schema/0003_fence.cql")),
    ("0004_fence_release.cql", include_str!("../schema/0004_fence_release.cql")),
];

/// Requests in flight at once for one append, or for one batch of dedupe lookups.
const MAX_INFLIGHT_REQUESTS: usize = 64;

/// An append succeeds only when its commit completed within this long of the start of a read
/// that found its epoch current, or when a read after the commit still finds it current.
const FENCE_WINDOW: Duration = Duration::from_millis(400);
/// An append commits on a confirmation of its epoch (a read of it) started at most this long
/// ago, so its commit has the rest of [`FENCE_WINDOW`] to complete; appends of one fence share a
/// confirmation this fresh.
const FENCE_FRESH: Duration = Duration::from_millis(100);
/// How long a writer waits after taking a fence from another before it writes: longer than
/// [`FENCE_WINDOW`], so every commit the writer before it could still call a success has landed.
const FENCE_GRACE: Duration = Duration::from_millis(1000);
/// While it waits out the grace, a writer that took a fence reads this often whether the writer
/// before it let the fence go ([`CqlStore::release_partition`]), which ends the wait.
const RELEASE_POLL: Duration = Duration::from_millis(25);
/// How long a writer letting a fence go waits for its appends under it to end; past it, it says
/// nothing and the next writer waits out the whole grace.
const RELEASE_DRAIN: Duration = Duration::from_secs(3);

/// Transactions tried to take a fence before giving up (each loses only to another taker).
const TAKE_ATTEMPTS: usize = 5;

/// Client-side timeout of schema statements, which are slower than reads and writes.
const SCHEMA_TIMEOUT: Duration = Duration::from_secs(60);

/// Columns of a message row, in the order [`message_from_row`] reads them.
const MESSAGE_COLUMNS: &str = "seq, id, user, body, ts, client_msg_id, trace_id, prev, digest";

/// A message row as selected with [`MESSAGE_COLUMNS`] (`prev` and `digest` are null in rows
/// written before the message chain).
type MessageRow = (i64, Uuid, String, String, i64, String, String, Option<String>, Option<String>);

/// How the keyspace is replicated when `connect` creates it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replication {
    /// `SimpleStrategy` with this replication factor: single-datacenter and local setups.
    SimpleStrategy {
        /// Replicas of each row.
        rf: u32,
    },
    /// `NetworkTopologyStrategy`: replicas per datacenter name.
    NetworkTopology {
        /// Datacenter name to replication factor.
        dcs: BTreeMap<String, u32>,
    },
}

impl Replication {
    /// The CQL map literal of `WITH replication = ...`.
    fn to_cql(&self) -> Result<String, StoreError> {
        match self {
            Self::SimpleStrategy { rf } if *rf > 0 => {
                Ok(format!("{{'class': 'SimpleStrategy', 'replication_factor': {rf}}}"))
            }
            Self::NetworkTopology { dcs } if !dcs.is_empty() && dcs.values().all(|rf| *rf > 0) => {
                let mut map = String::from("{'class': 'NetworkTopologyStrategy'");
                for (dc, rf) in dcs {
                    map.push_str(&format!(", '{}': {rf}", dc.replace('\'', "''")));
                }
                map.push('}');
                Ok(map)
            }
            other => Err(StoreError::new(
                StoreErrorKind::Config,
                format!("invalid CQL replication {other:?}: every replication factor must be at least 1"),
            )),
        }
    }
}

/// How to reach the CQL cluster and where the history lives.
#[derive(Debug, Clone)]
pub struct CqlConfig {
    /// Contact points, `host:port` each; the driver discovers the other nodes.
    pub nodes: Vec<String>,
    /// Keyspace of the history tables (letters, digits, `_`; at most 48; starts with a letter).
    pub keyspace: String,
    /// Replication used when the keyspace does not exist yet; an existing keyspace is left as it is.
    pub replication: Replication,
    /// Consistency of reads and writes, and of the commit of lightweight transactions.
    pub consistency: Consistency,
    /// Consistency of the Paxos phase of lightweight transactions.
    pub serial_consistency: SerialConsistency,
    /// Client-side timeout of one request (including the driver's retries).
    pub request_timeout: Duration,
    /// A request (a read, or an append's idempotent writes; never a fence transaction) not
    /// answered after this long, and after 4 times the median of the latest requests, is sent
    /// once more, to the next node of its plan (the driver's speculative execution), and the
    /// first answer wins: a node that stalls (a long pause) then costs a request this long, not
    /// its timeout, while a cluster slow as a whole is not sent its requests twice (see `hedge`).
    /// `None` (the default): never, because on a cluster short of CPU the second copies cost
    /// more than they save (docs/storage.md).
    pub hedge_after: Option<Duration>,
    /// Route around slow nodes: the driver's latency awareness puts a node whose recent mean
    /// latency is over twice the fastest node's at the end of each request's plan (for 10 s,
    /// then tries it again). It helps while one node of a ring is cold (just started or
    /// restarted: its JIT unwarmed) or otherwise slow; off by default, as the driver advises,
    /// since on a balanced cluster it only moves requests off their replicas (docs/storage.md).
    pub latency_aware: bool,
    /// Timeout of opening one connection.
    pub connect_timeout: Duration,
    /// Datacenter whose nodes coordinate requests (needed for `LOCAL_*` consistency to mean the
    /// right datacenter in a multi-datacenter cluster): the load-balancing policy tries its
    /// nodes only (token-aware), never a remote datacenter's. `None` treats all nodes alike.
    pub local_datacenter: Option<String>,
    /// A role to log in as, for a cluster with password authentication; `None` logs in as no one.
    pub credentials: Option<CqlCredentials>,
    /// PEM file of the certificate authority that signed the nodes' certificates: when set, every
    /// connection uses TLS and the nodes are verified against it (by their IP address).
    pub tls_ca: Option<std::path::PathBuf>,
}

/// A CQL role and its password (`PasswordAuthenticator`).
#[derive(Clone, PartialEq, Eq)]
pub struct CqlCredentials {
    /// The role (user) name.
    pub user: String,
    /// Its password.
    pub password: String,
}

impl std::fmt::Debug for CqlCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CqlCredentials({}, <hidden>)", self.user)
    }
}

impl CqlConfig {
    /// Default contact point (`--cql`).
    pub const DEFAULT_NODE: &'static str = "127.0.0.1:9042";
    /// Default keyspace (`--keyspace`).
    pub const DEFAULT_KEYSPACE: &'static str = "chat";
    /// Default replication factor (SimpleStrategy) of a keyspace created by `connect` (`--replication`).
    pub const DEFAULT_REPLICATION_FACTOR: u32 = 1;
    /// Default `request_timeout`, in milliseconds (`--cql-request-timeout-ms`). An append is up
    /// to three round trips; with 1 s each, a worker that checked a send's deadline finishes (or
    /// gives up on) its append well within the 6 s its gateway listens for the send's late word
    /// after the deadline. A write that timed out may
    /// still apply later: the worker then resolves the outcome before answering (see fanout),
    /// and a client retry gets the original ack.
    pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 1_000;
    /// Default `connect_timeout`, in milliseconds.
    pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 5_000;
}

impl Default for CqlConfig {
    /// One local node, keyspace `chat`, RF 1, `LOCAL_QUORUM` / `LOCAL_SERIAL`, 1 s requests,
    /// no request sent twice, 5 s connects, no preferred datacenter, no credentials, no TLS.
    fn default() -> Self {
        Self {
            nodes: vec![Self::DEFAULT_NODE.into()],
            keyspace: Self::DEFAULT_KEYSPACE.into(),
            replication: Replication::SimpleStrategy { rf: Self::DEFAULT_REPLICATION_FACTOR },
            consistency: Consistency::LocalQuorum,
            serial_consistency: SerialConsistency::LocalSerial,
            request_timeout: Duration::from_millis(Self::DEFAULT_REQUEST_TIMEOUT_MS),
            hedge_after: None,
            latency_aware: false,
            connect_timeout: Duration::from_millis(Self::DEFAULT_CONNECT_TIMEOUT_MS),
            local_datacenter: None,
            credentials: None,
            tls_ca: None,
        }
    }
}

/// The prepared statements of the store.
struct Statements {
    /// Taking a fence the first time: `INSERT ... IF NOT EXISTS` with epoch 1.
    take_first: PreparedStatement,
    /// Taking it from the epoch before: `UPDATE ... IF epoch = ?`.
    take_next: PreparedStatement,
    read_epoch: PreparedStatement,
    /// Saying a fence was let go: its epoch, stamped with it.
    write_release: PreparedStatement,
    /// The epoch a fence was last let go at.
    read_release: PreparedStatement,
    /// The commit of an append: the room's `last_seq`, stamped.
    commit: PreparedStatement,
    read_state: PreparedStatement,
    read_last_seq: PreparedStatement,
    insert_message: PreparedStatement,
    insert_dedupe: PreparedStatement,
    insert_id: PreparedStatement,
    /// The three inserts above for 1..=[`MESSAGES_PER_BATCH`] messages as one unlogged batch
    /// each (`insert_rows[k - 1]` holds k messages' rows): a few messages' rows in one request.
    insert_rows: Vec<Batch>,
    message_exists: PreparedStatement,
    read_message: PreparedStatement,
    read_range: PreparedStatement,
    read_dedupe: PreparedStatement,
    read_id: PreparedStatement,
    ping: PreparedStatement,
}

/// A partition's fence as [`CqlStore::hold_partition`] left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holding {
    /// The epoch held.
    pub epoch: u64,
    /// How it was taken, if this call took it (`None`: it was held already).
    pub taken: Option<Taken>,
}

/// How a writer took a fence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    /// The epoch it was taken from (`None`: nobody held it before).
    pub from: Option<u64>,
    /// Whether the writer of that epoch had said it let the fence go, which ended the grace
    /// early; otherwise the whole grace was waited out.
    pub let_go: bool,
}

/// History in a CQL keyspace.
pub struct CqlStore {
    session: Session,
    keyspace: String,
    statements: Statements,
    fences: Fences,
    /// Who takes fences (kept in `fence_epochs.owner`, for operators): process id and a nonce.
    owner: String,
    /// When a request is sent to a second node; `None`: never.
    hedge: Option<Arc<Hedge>>,
}

// === impl CqlStore ===

impl CqlStore {
    /// Connects, creates the keyspace if missing, applies the schema and prepares the
    /// statements. Fails with [`StoreErrorKind::Unavailable`] when no node answers, and with
    /// [`StoreErrorKind::Config`] when retrying cannot help: the cluster refused the
    /// credentials (or wants some), the TLS handshake failed, or the CA file is unusable.
    pub async fn connect(config: CqlConfig) -> Result<Self, StoreError> {
        validate_keyspace(&config.keyspace)?;
        let replication = config.replication.to_cql()?;
        if let Replication::NetworkTopology { dcs } = &config.replication {
            // LOCAL_SERIAL fences within one datacenter: with several, two appends coordinated in
            // different datacenters could both win unless every process names its own.
            if dcs.len() > 1 && config.local_datacenter.is_none() {
                return Err(StoreError::new(
                    StoreErrorKind::Config,
                    format!(
                        "replication across datacenters ({}) needs the local datacenter (--cql-local-dc), or the \
                         LOCAL_SERIAL fence of appends is not one fence",
                        dcs.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
        }
        let mut profile = ExecutionProfile::builder()
            .consistency(config.consistency)
            .serial_consistency(Some(config.serial_consistency))
            .request_timeout(Some(config.request_timeout));
        let mut builder = SessionBuilder::new()
            .known_nodes(&config.nodes)
            .connection_timeout(config.connect_timeout)
            .keyspaces_to_fetch([config.keyspace.clone()]);
        if config.local_datacenter.is_some() || config.latency_aware {
            // With a datacenter, the policy prefers it (token-aware, no failover to a remote
            // one, so `LOCAL_*` always means this one); the session-level preference says the
            // same to whatever the driver routes without this profile.
            let mut policy = DefaultPolicy::builder();
            if let Some(dc) = &config.local_datacenter {
                policy = policy.prefer_datacenter(dc.clone()).permit_dc_failover(false);
                builder = builder.prefer_datacenter(dc.clone());
            }
            if config.latency_aware {
                policy = policy.latency_awareness(LatencyAwarenessBuilder::new());
            }
            profile = profile.load_balancing_policy(policy.build());
        }
        if let Some(CqlCredentials { user, password }) = &config.credentials {
            builder = builder.user(user, password);
        }
        if let Some(ca) = &config.tls_ca {
            builder = builder.tls_context(Some(tls_config(ca)?));
        }
        let profile = profile.build();
        // Half the timeout at most: a second copy sent later has too little time to be answered.
        let hedge = config.hedge_after.map(|floor| Hedge::new(floor, config.request_timeout / 2));
        let hedged = hedged_profile(&profile, hedge.as_ref());
        let builder = builder.default_execution_profile_handle(profile.into_handle());
        let nodes = config.nodes.join(",");
        let session = builder.build().await.map_err(|e| {
            let what = format!("connect to CQL nodes {nodes}");
            match refused_setup(&e, &config) {
                Some(why) => StoreError::new(StoreErrorKind::Config, format!("{what}: {why}")).with_source(e),
                None => unavailable(what, e),
            }
        })?;

        let keyspace = config.keyspace;
        run_schema(
            &session,
            &format!(
                "CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = {replication} \
                 AND durable_writes = true"
            ),
        )
        .await
        .map_err(|e| unavailable(format_args!("create keyspace {keyspace}"), e))?;
        for (file, text) in MIGRATIONS {
            for statement in schema_statements(text) {
                apply_schema(&session, &keyspace, &statement)
                    .await
                    .map_err(|e| unavailable(format_args!("apply schema/{file}"), e))?;
            }
        }
        let statements = Statements::prepare(&session, &hedged, &keyspace).await?;
        tracing::info!(%nodes, %keyspace, "CQL history store ready");
        let owner = format!("pid{}-{}", std::process::id(), &Uuid::new_v4().simple().to_string()[..8]);
        Ok(Self { session, keyspace, statements, fences: Fences::default(), owner, hedge })
    }

    /// The keyspace the store uses.
    pub fn keyspace(&self) -> &str {
        &self.keyspace
    }

    /// Takes the fence of a partition of the send stream now, if this store does not hold it
    /// (a worker that was just given the partition calls it, so its first send does not wait out
    /// the grace), also when this store let it go before.
    pub async fn hold_partition(&self, partition: u32) -> Result<Holding, StoreError> {
        let fence = format!("p{partition}");
        self.fences.lease(&fence).reclaim();
        let (appending, taken) = self.holding_taken(&fence).await?;
        Ok(Holding { epoch: appending.epoch, taken })
    }

    /// Lets the fence of a partition that moved away from this worker go: appends to its rooms
    /// are refused from now on (`Fenced`), and once those in progress have ended, the store is
    /// told the epoch was let go, so the partition's next owner need not wait out the grace
    /// (docs/architecture.md, "Sequencing on the cluster"). Whether that was said: not when
    /// this store did not hold the fence, when its appends did not end within
    /// `RELEASE_DRAIN` (3 s), or when a commit under the epoch has an unknown outcome (it may still
    /// land); the next owner then waits out the whole grace. [`Self::hold_partition`] takes it
    /// again.
    pub async fn release_partition(&self, partition: u32) -> Result<bool, StoreError> {
        self.release(&format!("p{partition}")).await
    }

    /// Lets every fence this store holds go ([`Self::release_partition`]), as a worker that
    /// leaves does (its private rooms' fences too: the same worker started again takes them
    /// without the grace); how many were said to be let go.
    pub async fn release_all(&self) -> usize {
        let fences = self.fences.held();
        let releases = fences.iter().map(|fence| async move {
            match self.release(fence).await {
                Ok(said) => said,
                Err(e) => {
                    tracing::warn!(fence, error = %e, "could not say the fence was let go");
                    false
                }
            }
        });
        futures_util::future::join_all(releases).await.into_iter().filter(|said| *said).count()
    }

    /// [`Self::release_partition`] for any fence.
    async fn release(&self, fence: &str) -> Result<bool, StoreError> {
        let slot = self.fences.lease(fence);
        let Some(epoch) = slot.release() else { return Ok(false) };
        if tokio::time::timeout(RELEASE_DRAIN, slot.drained()).await.is_err() {
            tracing::warn!(fence, epoch, "appends under the fence still in progress; not saying it was let go");
            return Ok(false);
        }
        if !slot.settled(epoch) {
            tracing::info!(fence, epoch, "a commit under the fence has an unknown outcome; not saying it was let go");
            return Ok(false);
        }
        let values = (fence, to_cql_seq(epoch)?, self.owner.as_str(), self.fences.stamp(epoch)?);
        self.session
            .execute_unpaged(&self.statements.write_release, values)
            .await
            .map_err(|e| unavailable(format_args!("{fence}: say epoch {epoch} was let go"), e))?;
        tracing::info!(fence, epoch, owner = %self.owner, "fence let go");
        Ok(true)
    }

    /// Test hook: writes a batch's rows as a writer of an older epoch would and stops before
    /// its commit (as a writer fenced off, or dying, there does).
    #[doc(hidden)]
    pub async fn write_uncommitted(&self, batch: RoomAppend) -> Result<(), StoreError> {
        check_consecutive(&batch)?;
        self.write_rows(&batch.messages, 0).await
    }

    /// Test hook: runs a schema statement in the store's keyspace (to take a keyspace back to an
    /// older schema).
    #[doc(hidden)]
    pub async fn run_schema_statement(&self, cql: &str) -> Result<(), StoreError> {
        run_schema(&self.session, cql).await.map_err(|e| unavailable(format_args!("run `{cql}`"), e))
    }

    /// Test hook: drops the store's keyspace with everything in it.
    #[doc(hidden)]
    pub async fn drop_keyspace(&self) -> Result<(), StoreError> {
        run_schema(&self.session, &format!("DROP KEYSPACE IF EXISTS {}", self.keyspace))
            .await
            .map_err(|e| unavailable(format_args!("drop keyspace {}", self.keyspace), e))
    }

    /// An append under the epoch this store holds on `fence`, taking the fence first when it
    /// holds none: one transaction raises the epoch, then the store waits out the grace (when a
    /// writer held the fence before it) so every commit that writer could still answer as a
    /// success has landed. `Fenced` when this store let the fence go.
    async fn holding(&self, fence: &str) -> Result<Appending, StoreError> {
        Ok(self.holding_taken(fence).await?.0)
    }

    /// [`Self::holding`], and how the fence was taken if this call took it.
    async fn holding_taken(&self, fence: &str) -> Result<(Appending, Option<Taken>), StoreError> {
        let slot = self.fences.lease(fence);
        let entered = |slot: &Arc<LeaseSlot>| match slot.enter() {
            Entry::Held(appending) => Some(Ok((appending, None))),
            Entry::Released => {
                Some(Err(StoreError::fenced(format!("{fence}: let go, its partition moved to another writer"))))
            }
            Entry::Vacant => None,
        };
        if let Some(entered) = entered(&slot) {
            return entered;
        }
        let _taking = slot.taking.lock().await;
        if let Some(entered) = entered(&slot) {
            return entered;
        }
        let epoch = self.take(fence).await?;
        let taken = match epoch {
            1 => Taken { from: None, let_go: false },
            _ => Taken { from: Some(epoch - 1), let_go: self.grace(fence, epoch - 1).await },
        };
        tracing::info!(fence, epoch, owner = %self.owner, let_go = taken.let_go, "fence taken");
        slot.hold(epoch);
        match entered(&slot) {
            Some(Ok((appending, _))) => Ok((appending, Some(taken))),
            Some(Err(e)) => Err(e),
            None => Err(StoreError::fenced(format!("{fence}: taken from it while it took it"))),
        }
    }

    /// Waits out the grace after taking `fence` from `previous`, or less when the writer that held
    /// `previous` says it let it go (every commit it answered as a success completed before it
    /// said so); whether it did.
    async fn grace(&self, fence: &str, previous: u64) -> bool {
        let until = tokio::time::Instant::now() + FENCE_GRACE;
        loop {
            let read = self.read_counter(&self.statements.read_release, fence, "release");
            match tokio::time::timeout_at(until, read).await {
                Ok(Ok(released)) if released == previous => return true,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::debug!(fence, error = %e, "could not read whether the fence was let go"),
                Err(_) => return false,
            }
            let next = tokio::time::Instant::now() + RELEASE_POLL;
            if next >= until {
                tokio::time::sleep_until(until).await;
                return false;
            }
            tokio::time::sleep_until(next).await;
        }
    }

    /// Raises `fence`'s epoch by one with a lightweight transaction; the new epoch.
    async fn take(&self, fence: &str) -> Result<u64, StoreError> {
        let failed = |e| unavailable(format_args!("take fence {fence}"), e);
        let result = self
            .session
            .execute_unpaged(&self.statements.take_first, (fence, self.owner.as_str()))
            .await
            .map_err(failed)?;
        let mut current =
            match lwt_outcome(result, "epoch").map_err(|e| StoreError::corrupt(format!("{fence}: {e}")))? {
                None => return Ok(1),
                Some(current) => current,
            };
        for _ in 0..TAKE_ATTEMPTS {
            let next = current + 1;
            if next > crate::fence::MAX_EPOCH {
                return Err(StoreError::corrupt(format!("{fence}: epoch {current} is the last one")));
            }
            let values = (to_cql_seq(next)?, self.owner.as_str(), fence, to_cql_seq(current)?);
            let result = self.session.execute_unpaged(&self.statements.take_next, values).await.map_err(failed)?;
            match lwt_outcome(result, "epoch").map_err(|e| StoreError::corrupt(format!("{fence}: {e}")))? {
                None => return Ok(next),
                Some(moved) => current = moved,
            }
        }
        Err(StoreError::fenced(format!("{fence}: other writers kept taking it ({TAKE_ATTEMPTS} attempts)")))
    }

    /// That `epoch` is still the fence's current one, as of a read started at the returned
    /// instant, or the epoch it moved to. A read started less than [`FENCE_FRESH`] ago answers
    /// for every append of the fence (one read at a time per fence), so under load appends share
    /// their epoch reads.
    async fn confirm(&self, fence: &str, epoch: u64) -> Result<Result<Instant, u64>, StoreError> {
        let slot = self.fences.lease(fence);
        let fresh = |slot: &crate::fence::LeaseSlot| {
            slot.confirmed(epoch).filter(|at| at.elapsed() < FENCE_FRESH).map(Ok::<Instant, u64>)
        };
        if let Some(confirmed) = fresh(&slot) {
            return Ok(confirmed);
        }
        let _reading = slot.confirming.lock().await;
        if let Some(confirmed) = fresh(&slot) {
            return Ok(confirmed);
        }
        let started = Instant::now();
        let current = self.current_epoch(fence).await?;
        if current != epoch {
            return Ok(Err(current));
        }
        slot.confirm(epoch, started);
        Ok(Ok(started))
    }

    /// The fence's epoch as stored now (0 when nobody ever took it).
    async fn current_epoch(&self, fence: &str) -> Result<u64, StoreError> {
        self.read_counter(&self.statements.read_epoch, fence, "epoch").await
    }

    /// Runs a hedged request, noting how long it took for the hedge of later ones.
    async fn timed<T>(&self, request: impl std::future::Future<Output = T>) -> T {
        let started = Instant::now();
        let result = request.await;
        if let Some(hedge) = &self.hedge {
            hedge.record(started.elapsed());
        }
        result
    }

    /// The one bigint column `statement` selects for `key` (0 when there is no row or value):
    /// a room's last seq, a fence's epoch.
    async fn read_counter(&self, statement: &PreparedStatement, key: &str, what: &str) -> Result<u64, StoreError> {
        let result = self
            .timed(self.session.execute_unpaged(statement, (key,)))
            .await
            .map_err(|e| unavailable(format_args!("{key}: read {what}"), e))?;
        let row = rows(result, key)?
            .maybe_first_row::<(Option<i64>,)>()
            .map_err(|e| StoreError::corrupt(format!("{key}: {what} row: {e}")))?;
        from_cql_seq(row.and_then(|(value,)| value).unwrap_or(0))
    }

    /// Writes the message, dedupe and id rows of `messages`, stamped for `epoch` (rows of a room
    /// before epochs, completed from a pending record, use epoch 0): up to
    /// [`MESSAGES_PER_BATCH`] messages' rows as one unlogged batch, so an append of a few small
    /// messages costs the store one request.
    async fn write_rows(&self, messages: &[ChatMessage], epoch: u64) -> Result<(), StoreError> {
        let mut writes: Vec<BoxFuture<'_, Result<(), StoreError>>> = Vec::new();
        for chunk in batch_chunks(messages) {
            let mut rows = Vec::with_capacity(chunk.len());
            for message in chunk {
                let stamps = [self.fences.stamp(epoch)?, self.fences.stamp(epoch)?, self.fences.stamp(epoch)?];
                rows.push(MessageRows::of(message, stamps)?);
            }
            writes.push(Box::pin(self.write_chunk(rows)));
        }
        // Collected first: a closure held across the await would trip async_trait's Send check.
        futures_util::stream::iter(writes).buffer_unordered(MAX_INFLIGHT_REQUESTS).try_collect::<()>().await
    }

    /// Writes the rows of a few messages: one batch request, or three requests for a message
    /// too large to batch.
    async fn write_chunk(&self, rows: Vec<MessageRows<'_>>) -> Result<(), StoreError> {
        let (Some(first), Some(last)) = (rows.first(), rows.last()) else { return Ok(()) };
        let (room, seqs) = (first.room(), (first.seq(), last.seq()));
        let s = &self.statements;
        let written = match rows.as_slice() {
            [one] if one.body_len() > BATCHED_BODY_BYTES => futures_util::try_join!(
                self.timed(self.session.execute_unpaged(&s.insert_message, one.message)),
                self.timed(self.session.execute_unpaged(&s.insert_dedupe, one.dedupe)),
                self.timed(self.session.execute_unpaged(&s.insert_id, one.id)),
            )
            .map(|_| ()),
            _ => {
                let batch = &s.insert_rows[rows.len() - 1];
                let values: Vec<RowValues<'_>> = rows.iter().flat_map(MessageRows::values).collect();
                self.timed(self.session.batch(batch, values)).await.map(|_| ())
            }
        };
        written.map_err(|e| unavailable(format_args!("room {room}: write the rows of seqs {}..={}", seqs.0, seqs.1), e))
    }

    /// The commit of an append: the room's last seq, stamped for `epoch`.
    async fn commit(&self, room: &str, last_seq: u64, epoch: u64) -> Result<(), StoreError> {
        let values = (self.fences.stamp(epoch)?, to_cql_seq(last_seq)?, room);
        self.timed(self.session.execute_unpaged(&self.statements.commit, values))
            .await
            .map(|_| ())
            .map_err(|e| unavailable(format_args!("room {room}: commit last seq {last_seq} (outcome unknown)"), e))
    }

    /// The room's last seq and its pending record (decoded), as stored.
    async fn read_state(&self, room: &str) -> Result<(u64, Vec<ChatMessage>), StoreError> {
        let result = self
            .timed(self.session.execute_unpaged(&self.statements.read_state, (room,)))
            .await
            .map_err(|e| unavailable(format_args!("room {room}: read state"), e))?;
        let row = rows(result, room)?
            .maybe_first_row::<(Option<i64>, Option<Vec<u8>>)>()
            .map_err(|e| StoreError::corrupt(format!("room {room}: state row: {e}")))?;
        let Some((last_seq, pending)) = row else {
            return Ok((0, Vec::new()));
        };
        let last_seq = from_cql_seq(last_seq.unwrap_or(0))?;
        let pending = match pending {
            Some(json) if !json.is_empty() => serde_json::from_slice(&json)
                .map_err(|e| StoreError::corrupt(format!("room {room}: pending record: {e}")))?,
            _ => Vec::new(),
        };
        Ok((last_seq, pending))
    }

    /// The room's last seq as stored (without the pending record, which a page rarely needs).
    async fn read_last_seq(&self, room: &str) -> Result<u64, StoreError> {
        self.read_counter(&self.statements.read_last_seq, room, "last seq").await
    }

    /// The room's last seq, after making sure the pending record of a room last written before
    /// epochs is written out.
    async fn settled_last_seq(&self, room: &str) -> Result<u64, StoreError> {
        let (last_seq, pending) = self.read_state(room).await?;
        if let Some(newest) = pending.last() {
            if !self.message_exists(room, newest.seq).await? {
                // Its writer died between its transaction and the rows (writers since epochs
                // leave no pending record); the rows are idempotent.
                tracing::debug!(room, seq = newest.seq, "writing the rows of a claimed append");
                self.write_rows(&pending, 0).await?;
            }
        }
        Ok(last_seq)
    }

    async fn message_exists(&self, room: &str, seq: u64) -> Result<bool, StoreError> {
        let values = (room, bucket_of(seq)?, to_cql_seq(seq)?);
        let result = self
            .timed(self.session.execute_unpaged(&self.statements.message_exists, values))
            .await
            .map_err(|e| unavailable(format_args!("room {room}: check seq {seq}"), e))?;
        Ok(rows(result, room)?.rows_num() > 0)
    }

    async fn read_message(&self, room: &str, seq: u64) -> Result<Option<ChatMessage>, StoreError> {
        let values = (room, bucket_of(seq)?, to_cql_seq(seq)?);
        let result = self
            .timed(self.session.execute_unpaged(&self.statements.read_message, values))
            .await
            .map_err(|e| unavailable(format_args!("room {room}: read seq {seq}"), e))?;
        let row = rows(result, room)?
            .maybe_first_row::<MessageRow>()
            .map_err(|e| StoreError::corrupt(format!("room {room}: message row: {e}")))?;
        row.map(|row| message_from_row(room, row)).transpose()
    }

    /// The committed message an index row (dedupe or id) points at, if `is_it` says the row at
    /// that seq is the one indexed. An index row may come from an append never committed (its
    /// writer fenced off or dead before its commit, its seq since reused by the room's owner): then
    /// the seq lies above the room's last seq, or holds another message, and the answer is `None`.
    /// `last_seq` holds the room's last seq once read (shared by a batch of lookups).
    async fn read_indexed(
        &self,
        room: &str,
        seq: u64,
        last_seq: &tokio::sync::OnceCell<u64>,
        is_it: impl Fn(&ChatMessage) -> bool + Send,
    ) -> Result<Option<ChatMessage>, StoreError> {
        let last_seq = *last_seq.get_or_try_init(|| self.settled_last_seq(room)).await?;
        if seq > last_seq {
            return Ok(None);
        }
        Ok(self.read_message(room, seq).await?.filter(|message| is_it(message)))
    }

    /// The message stored by `user` with `client_msg_id` (`last_seq` as in
    /// [`read_indexed`](Self::read_indexed)).
    async fn lookup(
        &self,
        room: &str,
        user: &str,
        client_msg_id: &str,
        last_seq: &tokio::sync::OnceCell<u64>,
    ) -> Result<Option<ChatMessage>, StoreError> {
        let result = self
            .timed(self.session.execute_unpaged(&self.statements.read_dedupe, (room, user, client_msg_id)))
            .await
            .map_err(|e| unavailable(format_args!("room {room}: read dedupe entry"), e))?;
        let row = rows(result, room)?
            .maybe_first_row::<(i64,)>()
            .map_err(|e| StoreError::corrupt(format!("room {room}: dedupe row: {e}")))?;
        let Some((seq,)) = row else { return Ok(None) };
        let is_it = |m: &ChatMessage| m.user == user && m.client_msg_id == client_msg_id;
        self.read_indexed(room, from_cql_seq(seq)?, last_seq, is_it).await
    }

    /// Messages `first..=last` of a room, one query per bucket, concurrently.
    async fn read_range(&self, room: &str, first: u64, last: u64) -> Result<Vec<ChatMessage>, StoreError> {
        let buckets = (first / BUCKET_SIZE)..=(last / BUCKET_SIZE);
        let reads = buckets.map(|bucket| async move {
            let from = first.max(bucket * BUCKET_SIZE);
            let to = last.min(bucket * BUCKET_SIZE + BUCKET_SIZE - 1);
            let values = (room, to_cql_seq(bucket)?, to_cql_seq(from)?, to_cql_seq(to)?);
            let result = self
                .timed(self.session.execute_unpaged(&self.statements.read_range, values))
                .await
                .map_err(|e| unavailable(format_args!("room {room}: read seqs {from}..={to}"), e))?;
            let rows = rows(result, room)?;
            let messages = rows
                .rows::<MessageRow>()
                .map_err(|e| StoreError::corrupt(format!("room {room}: message rows: {e}")))?
                .map(|row| {
                    let row = row.map_err(|e| StoreError::corrupt(format!("room {room}: message row: {e}")))?;
                    message_from_row(room, row)
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok::<_, StoreError>(messages)
        });
        let parts = futures_util::future::try_join_all(reads).await?;
        Ok(parts.concat())
    }
}

impl Statements {
    /// Prepares every statement; the reads, the ping and the append's idempotent writes run with
    /// `hedged` (see [`hedged_profile`]), the fence transactions with the session's profile.
    /// Every table is named with its keyspace: the session has none set (`USE` with prepared
    /// statements is ambiguous, and Cassandra 5 warns of it on every prepare).
    async fn prepare(session: &Session, hedged: &ExecutionProfileHandle, keyspace: &str) -> Result<Self, StoreError> {
        let ks = keyspace;
        let hedged_statement = |cql: String| async move {
            let mut statement = prepare(session, &cql, true).await?;
            statement.set_execution_profile_handle(Some(hedged.clone()));
            Ok::<_, StoreError>(statement)
        };
        let insert_message =
            format!("INSERT INTO {ks}.messages (room, bucket, {MESSAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?");
        let read_message =
            format!("SELECT {MESSAGE_COLUMNS} FROM {ks}.messages WHERE room = ? AND bucket = ? AND seq = ?");
        let read_range = format!(
            "SELECT {MESSAGE_COLUMNS} FROM {ks}.messages WHERE room = ? AND bucket = ? AND seq >= ? AND seq <= ?"
        );
        let insert_message = hedged_statement(insert_message).await?;
        let insert_dedupe = hedged_statement(format!(
            "INSERT INTO {ks}.dedupe (room, user, client_msg_id, seq) VALUES (?, ?, ?, ?) USING TIMESTAMP ?"
        ))
        .await?;
        let insert_id = hedged_statement(format!(
            "INSERT INTO {ks}.message_ids (id, room, seq) VALUES (?, ?, ?) USING TIMESTAMP ?"
        ))
        .await?;
        Ok(Self {
            take_first: prepare(
                session,
                &format!("INSERT INTO {ks}.fence_epochs (fence, epoch, owner) VALUES (?, 1, ?) IF NOT EXISTS"),
                false,
            )
            .await?,
            take_next: prepare(
                session,
                &format!("UPDATE {ks}.fence_epochs SET epoch = ?, owner = ? WHERE fence = ? IF epoch = ?"),
                false,
            )
            .await?,
            read_epoch: hedged_statement(format!("SELECT epoch FROM {ks}.fence_epochs WHERE fence = ?")).await?,
            write_release: hedged_statement(format!(
                "INSERT INTO {ks}.fence_releases (fence, epoch, owner) VALUES (?, ?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            read_release: hedged_statement(format!("SELECT epoch FROM {ks}.fence_releases WHERE fence = ?")).await?,
            commit: hedged_statement(format!(
                "UPDATE {ks}.room_state USING TIMESTAMP ? SET last_seq = ?, pending = null WHERE room = ?"
            ))
            .await?,
            read_state: hedged_statement(format!("SELECT last_seq, pending FROM {ks}.room_state WHERE room = ?"))
                .await?,
            read_last_seq: hedged_statement(format!("SELECT last_seq FROM {ks}.room_state WHERE room = ?")).await?,
            insert_rows: (1..=MESSAGES_PER_BATCH)
                .map(|messages| {
                    let mut rows = Batch::new(BatchType::Unlogged);
                    for _ in 0..messages {
                        for insert in [&insert_message, &insert_dedupe, &insert_id] {
                            rows.append_statement(insert.clone());
                        }
                    }
                    rows.set_is_idempotent(true);
                    rows.set_execution_profile_handle(Some(hedged.clone()));
                    rows
                })
                .collect(),
            insert_message,
            insert_dedupe,
            insert_id,
            message_exists: hedged_statement(format!(
                "SELECT seq FROM {ks}.messages WHERE room = ? AND bucket = ? AND seq = ?"
            ))
            .await?,
            read_message: hedged_statement(read_message).await?,
            read_range: hedged_statement(read_range).await?,
            read_dedupe: hedged_statement(format!(
                "SELECT seq FROM {ks}.dedupe WHERE room = ? AND user = ? AND client_msg_id = ?"
            ))
            .await?,
            read_id: hedged_statement(format!("SELECT room, seq FROM {ks}.message_ids WHERE id = ?")).await?,
            // A process asks this to know whether the store is up: one stalled node of several is
            // not the store down.
            ping: hedged_statement("SELECT release_version FROM system.local".into()).await?,
        })
    }
}

impl CqlStore {
    /// An append, given up before its commit once `commit_by` (if any) has passed
    /// ([`HistoryStore::append_by`]). Taking the fence is not bounded: it is rare (once per
    /// ownership change), and a take cut short would only be taken again.
    async fn append_within(
        &self,
        batch: RoomAppend,
        commit_by: Option<tokio::time::Instant>,
    ) -> Result<(), StoreError> {
        if batch.messages.is_empty() {
            let actual = self.settled_last_seq(&batch.room).await?;
            if actual != batch.expected_last_seq {
                let expected = batch.expected_last_seq;
                return Err(StoreError::conflict(&batch.room, expected, actual));
            }
            return Ok(());
        }
        check_consecutive(&batch)?;
        let room = batch.room.as_str();
        let fence = fence_of(room);
        // This store's appends to one room go one at a time: under one epoch nobody else writes
        // the room, so what the last one left is the room's last seq.
        let slot = self.fences.room(room);
        // Every failure until the commit is sent leaves nothing committed: `before_commit`
        // tells the caller so, which spares it asking the store whether the append landed.
        // Each step until then is given up once `commit_by` passes.
        let mut known = before_deadline(commit_by, room, async { Ok(slot.lock().await) }).await?;
        // Counted until the append ends: a fence is said to be let go only after that.
        let appending = self.holding(&fence).await.map_err(StoreError::before_commit)?;
        let epoch = appending.epoch;
        let last_seq = match *known {
            Some(Known { epoch: e, last_seq }) if e == epoch => last_seq,
            _ => before_deadline(commit_by, room, self.settled_last_seq(room))
                .await
                .map_err(StoreError::before_commit)?,
        };
        *known = Some(Known { epoch, last_seq });
        if last_seq != batch.expected_last_seq {
            return Err(StoreError::conflict(room, batch.expected_last_seq, last_seq));
        }
        let new_last = last_seq + batch.messages.len() as u64;
        // Rows and the epoch check at once: the rows are invisible until the commit, and the
        // commit waits for both.
        let both =
            async { Ok(futures_util::join!(self.write_rows(&batch.messages, epoch), self.confirm(&fence, epoch))) };
        let (written, confirmed) = before_deadline(commit_by, room, both).await?;
        written.map_err(|e| {
            StoreError::unavailable(format!("room {room}: seqs after {last_seq} not committed: {e}")).before_commit()
        })?;
        // The rows may have taken long (or this process was paused): commit only on a fresh
        // confirmation.
        let confirmed = match confirmed.map_err(StoreError::before_commit)? {
            Ok(at) if at.elapsed() > FENCE_FRESH => before_deadline(commit_by, room, self.confirm(&fence, epoch))
                .await
                .map_err(StoreError::before_commit)?,
            other => other,
        };
        let checked_at = match confirmed {
            Ok(at) => at,
            Err(current) => {
                *known = None;
                self.fences.lease(&fence).fenced_off(epoch);
                tracing::warn!(room, fence, epoch, current, "fenced off: another writer took the room's partition");
                return Err(StoreError::fenced(format!(
                    "room {room}: {fence} moved from epoch {epoch} to {current}; seqs after {last_seq} not committed"
                )));
            }
        };
        if commit_by.is_some_and(|at| tokio::time::Instant::now() >= at) {
            return Err(deadline_passed(room));
        }
        if let Err(e) = self.commit(room, new_last, epoch).await {
            *known = None;
            appending.unsettled();
            return Err(e);
        }
        let took = checked_at.elapsed();
        if took > FENCE_WINDOW {
            // The commit may have landed after a writer that took the fence meanwhile read the
            // room; only a still current epoch says it did not.
            *known = None;
            let current = self.current_epoch(&fence).await.inspect_err(|_| appending.unsettled())?;
            if current != epoch {
                self.fences.lease(&fence).fenced_off(epoch);
                return Err(StoreError::unavailable(format!(
                    "room {room}: commit of seqs up to {new_last} took {took:?}, and {fence} moved meanwhile \
                     (outcome unknown)"
                )));
            }
        }
        *known = Some(Known { epoch, last_seq: new_last });
        Ok(())
    }
}

/// `step` of an append before its commit, given up when `commit_by` passes first: nothing of the
/// append is committed then.
async fn before_deadline<T>(
    commit_by: Option<tokio::time::Instant>,
    room: &str,
    step: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let Some(at) = commit_by else { return step.await };
    tokio::time::timeout_at(at, step).await.unwrap_or_else(|_| Err(deadline_passed(room)))
}

/// The error of an append given up at its sends' deadline, before its commit.
fn deadline_passed(room: &str) -> StoreError {
    StoreError::unavailable(format!("room {room}: the sends' deadline passed before the commit")).before_commit()
}

#[async_trait]
impl HistoryStore for CqlStore {
    async fn append(&self, batch: RoomAppend) -> Result<(), StoreError> {
        self.append_within(batch, None).await
    }

    async fn append_by(&self, batch: RoomAppend, commit_by: tokio::time::Instant) -> Result<(), StoreError> {
        self.append_within(batch, Some(commit_by)).await
    }

    async fn last_seq(&self, room: &str) -> Result<u64, StoreError> {
        self.settled_last_seq(room).await
    }

    async fn find_by_client_msg_id(
        &self,
        room: &str,
        user: &str,
        client_msg_id: &str,
    ) -> Result<Option<ChatMessage>, StoreError> {
        self.lookup(room, user, client_msg_id, &tokio::sync::OnceCell::new()).await
    }

    async fn find_by_client_msg_ids(
        &self,
        room: &str,
        keys: &[(&str, &str)],
    ) -> Result<Vec<Option<ChatMessage>>, StoreError> {
        // At most one read of the room's last seq for the whole batch (none when no send is a
        // repeat); a batch may hold hundreds of one room's sends: bounded, in order.
        let last_seq = tokio::sync::OnceCell::new();
        let lookups: Vec<_> = keys.iter().map(|(user, id)| self.lookup(room, user, id, &last_seq)).collect();
        futures_util::stream::iter(lookups).buffered(MAX_INFLIGHT_REQUESTS).try_collect().await
    }

    async fn page(&self, room: &str, query: PageQuery) -> Result<Page, StoreError> {
        let last_seq = self.read_last_seq(room).await?;
        let (seqs, has_more) = query.seq_range(last_seq);
        if seqs.is_empty() {
            return Ok(Page { messages: Vec::new(), has_more: false });
        }
        let (first, last) = (*seqs.start(), *seqs.end());
        let want = (last - first + 1) as usize;
        let mut messages = self.read_range(room, first, last).await?;
        if messages.len() != want {
            // A room last written before epochs may have an interrupted append: finish it, read
            // again.
            let (_, pending) = self.read_state(room).await?;
            self.write_rows(&pending, 0).await?;
            messages = self.read_range(room, first, last).await?;
        }
        if messages.len() != want {
            return Err(StoreError::corrupt(format!(
                "room {room}: seqs {first}..={last}: {} of {want} messages stored",
                messages.len()
            )));
        }
        Ok(Page { messages, has_more })
    }

    async fn get_by_id(&self, id: Uuid) -> Result<Option<ChatMessage>, StoreError> {
        let result = self
            .timed(self.session.execute_unpaged(&self.statements.read_id, (id,)))
            .await
            .map_err(|e| unavailable(format_args!("read id {id}"), e))?;
        let row = rows(result, "-")?
            .maybe_first_row::<(String, i64)>()
            .map_err(|e| StoreError::corrupt(format!("id {id}: row: {e}")))?;
        let Some((room, seq)) = row else {
            return Ok(None);
        };
        self.read_indexed(&room, from_cql_seq(seq)?, &tokio::sync::OnceCell::new(), |m| m.id == id).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.timed(self.session.execute_unpaged(&self.statements.ping, ()))
            .await
            .map(|_| ())
            .map_err(|e| unavailable("ping", e))
    }
}

// === helpers ===

/// TLS that trusts only the certificate authority in the PEM file `ca`, on the ring provider
/// (the driver's rustls also carries aws-lc-rs, so the provider is named, never left to rustls).
fn tls_config(ca: &std::path::Path) -> Result<std::sync::Arc<rustls::ClientConfig>, StoreError> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let config_error = |problem: String| {
        StoreError::new(StoreErrorKind::Config, format!("CQL TLS CA file {}: {problem}", ca.display()))
    };
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca).map_err(|e| config_error(format!("cannot be read: {e}")))?;
    for cert in certs {
        let cert = cert.map_err(|e| config_error(format!("is not PEM: {e}")))?;
        roots.add(cert).map_err(|e| config_error(format!("holds an unusable certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(config_error("holds no certificate".into()));
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::new(StoreErrorKind::Config, "CQL TLS set-up").with_source(e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(std::sync::Arc::new(config))
}

/// Why opening a session failed in a way retrying will not mend: the cluster refused the
/// credentials, wants some, or the TLS handshake failed (a node not verified by the CA, say).
/// `None` for everything else (a node down, a timeout...).
fn refused_setup(e: &scylla::errors::NewSessionError, config: &CqlConfig) -> Option<String> {
    use scylla::errors::{
        ConnectionError, ConnectionPoolError, ConnectionSetupRequestErrorKind as Setup, DbError, MetadataError,
        NewSessionError,
    };
    let NewSessionError::MetadataError(MetadataError::ConnectionPoolError(ConnectionPoolError::Broken {
        last_connection_error,
    })) = e
    else {
        return None;
    };
    match last_connection_error {
        ConnectionError::ConnectionSetupRequestError(setup) => match setup.get_error() {
            Setup::MissingAuthentication => {
                Some("the cluster requires authentication: give a role with --cql-user and --cql-password".into())
            }
            Setup::DbError(DbError::AuthenticationError, _) => Some(match &config.credentials {
                Some(credentials) => format!(
                    "authentication failed for role {:?}: check --cql-user and --cql-password",
                    credentials.user
                ),
                None => "authentication failed".into(),
            }),
            _ => None,
        },
        ConnectionError::IoError(io) if io.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) => {
            Some("TLS handshake failed (is --cql-tls-ca the CA that signed the nodes' certificates?)".into())
        }
        _ => None,
    }
}

/// Refuses a batch whose messages are not of its room with consecutive seqs after the expected one.
fn check_consecutive(batch: &RoomAppend) -> Result<(), StoreError> {
    let (room, expected) = (batch.room.as_str(), batch.expected_last_seq);
    for (i, message) in batch.messages.iter().enumerate() {
        if message.room != room || message.seq != expected + 1 + i as u64 {
            return Err(StoreError::corrupt(format!(
                "append to room {room} after seq {expected}: message {i} has room {} and seq {}, \
                 want consecutive seqs in this room",
                message.room, message.seq
            )));
        }
    }
    Ok(())
}

fn unavailable(context: impl Display, e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::unavailable(context.to_string()).with_source(e)
}

/// The execution profile of reads and of an append's idempotent writes: `profile`, and a request
/// that `hedge` finds slow sent once more to the next node of its plan ([`CqlConfig::hedge_after`]).
fn hedged_profile(profile: &ExecutionProfile, hedge: Option<&Arc<Hedge>>) -> ExecutionProfileHandle {
    profile.to_builder().speculative_execution_policy(hedge.map(Hedge::policy)).build().into_handle()
}

async fn prepare(session: &Session, cql: &str, idempotent: bool) -> Result<PreparedStatement, StoreError> {
    let mut statement = session.prepare(cql).await.map_err(|e| unavailable(format_args!("prepare `{cql}`"), e))?;
    statement.set_is_idempotent(idempotent);
    Ok(statement)
}

/// Runs one schema statement (not prepared: DDL takes no values) with the long schema timeout;
/// the driver waits for schema agreement afterwards.
async fn run_schema(session: &Session, cql: &str) -> Result<(), scylla::errors::ExecutionError> {
    let mut statement = Statement::new(cql);
    statement.set_request_timeout(Some(SCHEMA_TIMEOUT));
    session.query_unpaged(statement, ()).await.map(|_| ())
}

/// Applies one schema statement idempotently. `CREATE ... IF NOT EXISTS` is idempotent as it is;
/// an `ALTER TABLE t ADD c type` (which has no portable `IF NOT EXISTS`) runs only when
/// `system_schema.columns` does not list the column, and when it fails (another process added
/// the column meanwhile) it is accepted if the column is there now. No error text is read.
async fn apply_schema(session: &Session, keyspace: &str, cql: &str) -> Result<(), scylla::errors::ExecutionError> {
    let qualified = in_keyspace(cql, keyspace);
    let Some((table, column)) = added_column(cql) else {
        return run_schema(session, &qualified).await;
    };
    if column_exists(session, keyspace, table, column).await? {
        return Ok(());
    }
    match run_schema(session, &qualified).await {
        Ok(()) => Ok(()),
        Err(e) => match column_exists(session, keyspace, table, column).await {
            Ok(true) => Ok(()),
            _ => Err(e),
        },
    }
}

/// A schema statement of the schema files (`CREATE TABLE [IF NOT EXISTS] <table>`, `ALTER TABLE
/// <table> ...`, written without a keyspace so an operator can run them with `cqlsh -k`) with its
/// table named in `keyspace`. Other statements are returned as they are.
fn in_keyspace(cql: &str, keyspace: &str) -> String {
    // Each word with its offset in `cql`, so the rest of the text is kept as it is.
    let words: Vec<(usize, &str)> =
        cql.split_whitespace().map(|word| (word.as_ptr() as usize - cql.as_ptr() as usize, word)).collect();
    let is = |i: usize, word: &str| words.get(i).is_some_and(|(_, w)| w.eq_ignore_ascii_case(word));
    let table_at = if is(0, "CREATE") && is(1, "TABLE") && is(2, "IF") && is(3, "NOT") && is(4, "EXISTS") {
        5
    } else if (is(0, "CREATE") || is(0, "ALTER")) && is(1, "TABLE") {
        2
    } else {
        return cql.to_owned();
    };
    match words.get(table_at) {
        Some(&(at, table)) if !table.contains('.') => format!("{}{keyspace}.{}", &cql[..at], &cql[at..]),
        _ => cql.to_owned(),
    }
}

/// The table and column of an `ALTER TABLE <table> ADD <column> <type>` statement.
fn added_column(cql: &str) -> Option<(&str, &str)> {
    let words: Vec<&str> = cql.split_whitespace().collect();
    match words.as_slice() {
        [alter, table_kw, table, add, column, _type] => (alter.eq_ignore_ascii_case("ALTER")
            && table_kw.eq_ignore_ascii_case("TABLE")
            && add.eq_ignore_ascii_case("ADD"))
        .then_some((*table, *column)),
        _ => None,
    }
}

/// Whether `keyspace.table` has `column`, per `system_schema.columns` (in Cassandra 3+ and
/// ScyllaDB alike).
async fn column_exists(
    session: &Session,
    keyspace: &str,
    table: &str,
    column: &str,
) -> Result<bool, scylla::errors::ExecutionError> {
    let mut statement = Statement::new(
        "SELECT column_name FROM system_schema.columns WHERE keyspace_name = ? AND table_name = ? AND column_name = ?",
    );
    statement.set_request_timeout(Some(SCHEMA_TIMEOUT));
    // Unquoted identifiers are stored lowercased.
    let names = (keyspace.to_lowercase(), table.to_lowercase(), column.to_lowercase());
    let result = session.query_unpaged(statement, names).await?;
    Ok(result.into_rows_result().is_ok_and(|rows| rows.rows_num() > 0))
}

/// The statements of a schema file: `--` comment lines dropped, split at `;`.
fn schema_statements(text: &str) -> Vec<String> {
    let code: String =
        text.lines().filter(|line| !line.trim_start().starts_with("--")).map(|line| format!("{line}\n")).collect();
    code.split(';').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

/// Keyspace names go into CQL text unquoted, so only plain identifiers are accepted.
fn validate_keyspace(keyspace: &str) -> Result<(), StoreError> {
    let mut chars = keyspace.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && keyspace.len() <= 48;
    if ok {
        Ok(())
    } else {
        Err(StoreError::new(
            StoreErrorKind::Config,
            format!(
                "invalid keyspace name {keyspace:?}: use at most 48 letters, digits or '_', starting with a letter"
            ),
        ))
    }
}

fn rows(result: QueryResult, room: &str) -> Result<scylla::response::query_result::QueryRowsResult, StoreError> {
    result.into_rows_result().map_err(|e| StoreError::corrupt(format!("room {room}: expected rows: {e}")))
}

/// The outcome of a lightweight transaction: `None` when applied, else the current value of
/// `column` (0 when the row does not exist).
fn lwt_outcome(result: QueryResult, column: &str) -> Result<Option<u64>, String> {
    let rows = result.into_rows_result().map_err(|e| format!("transaction result: {e}"))?;
    let specs = rows.column_specs();
    let applied_at = specs.get_by_name("[applied]").map(|(i, _)| i).ok_or("no [applied] column")?;
    let column_at = specs.get_by_name(column).map(|(i, _)| i);
    let row = rows
        .maybe_first_row::<Row>()
        .map_err(|e| format!("transaction result: {e}"))?
        .ok_or("empty transaction result")?;
    match row.columns.get(applied_at) {
        Some(Some(CqlValue::Boolean(true))) => return Ok(None),
        Some(Some(CqlValue::Boolean(false))) => {}
        other => return Err(format!("transaction result: [applied] is {other:?}")),
    }
    let actual = match column_at.and_then(|i| row.columns.get(i)) {
        Some(Some(CqlValue::BigInt(value))) => u64::try_from(*value).map_err(|e| e.to_string())?,
        Some(Some(other)) => return Err(format!("transaction result: {column} is {other:?}")),
        Some(None) | None => 0,
    };
    Ok(Some(actual))
}

fn message_from_row(room: &str, row: MessageRow) -> Result<ChatMessage, StoreError> {
    let (seq, id, user, body, ts, client_msg_id, trace_id, prev, digest) = row;
    let seq = from_cql_seq(seq)?;
    Ok(ChatMessage { room: room.to_owned(), seq, id, user, body, ts, client_msg_id, trace_id, prev, digest })
}

pub(crate) fn bucket_of(seq: u64) -> Result<i64, StoreError> {
    to_cql_seq(seq / BUCKET_SIZE)
}

pub(crate) fn to_cql_seq(seq: u64) -> Result<i64, StoreError> {
    i64::try_from(seq).map_err(|_| StoreError::corrupt(format!("seq {seq} exceeds CQL bigint")))
}

fn from_cql_seq(seq: i64) -> Result<u64, StoreError> {
    u64::try_from(seq).map_err(|_| StoreError::corrupt(format!("negative seq {seq} in store")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_schema_file_is_applied_in_order() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schema");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".cql"))
            .collect();
        files.sort();
        let listed: Vec<&str> = MIGRATIONS.iter().map(|(name, _)| *name).collect();
        assert_eq!(files, listed, "list every storage/schema/*.cql file in MIGRATIONS, in order");
    }

    #[test]
    fn schema_statements_name_their_table_in_the_keyspace() {
        let create = "CREATE TABLE IF NOT EXISTS room_state (\n    room text PRIMARY KEY,\n    last_seq bigint\n)";
        assert_eq!(
            in_keyspace(create, "chat"),
            "CREATE TABLE IF NOT EXISTS chat.room_state (\n    room text PRIMARY KEY,\n    last_seq bigint\n)"
        );
        assert_eq!(in_keyspace("create table t (a int PRIMARY KEY)", "ks"), "create table ks.t (a int PRIMARY KEY)");
        assert_eq!(in_keyspace("ALTER TABLE messages ADD prev text", "ks"), "ALTER TABLE ks.messages ADD prev text");
        // Already named, or not a table statement: as it is.
        assert_eq!(in_keyspace("ALTER TABLE other.messages ADD x int", "ks"), "ALTER TABLE other.messages ADD x int");
        assert_eq!(in_keyspace("CREATE INDEX i ON t (a)", "ks"), "CREATE INDEX i ON t (a)");
        for (file, text) in MIGRATIONS {
            for statement in schema_statements(text) {
                assert!(in_keyspace(&statement, "ks").contains(" ks."), "{file}: table not named: {statement}");
            }
        }
    }

    #[test]
    fn schema_is_portable_and_idempotent() {
        for (file, text) in MIGRATIONS {
            let statements = schema_statements(text);
            assert!(!statements.is_empty(), "{file}");
            for statement in statements {
                let upper = statement.to_uppercase();
                // An added column is checked for before it is added (apply_schema).
                let idempotent = upper.contains("IF NOT EXISTS") || added_column(&statement).is_some();
                assert!(idempotent, "{file}: not idempotent: {statement}");
                for scylla_only in ["USING TIMEOUT", "TABLETS", "CDC"] {
                    assert!(!upper.contains(scylla_only), "{file}: ScyllaDB-only {scylla_only}");
                }
            }
        }
        assert_eq!(schema_statements(MIGRATIONS[0].1).len(), 4);
        assert_eq!(
            schema_statements(MIGRATIONS[1].1).iter().map(|s| added_column(s)).collect::<Vec<_>>(),
            [Some(("messages", "prev")), Some(("messages", "digest"))]
        );
        assert_eq!(added_column("CREATE TABLE IF NOT EXISTS t (a int PRIMARY KEY)"), None);
    }

    #[test]
    fn replication_literals() {
        assert_eq!(
            Replication::SimpleStrategy { rf: 1 }.to_cql().unwrap(),
            "{'class': 'SimpleStrategy', 'replication_factor': 1}"
        );
        let dcs = BTreeMap::from([("dc1".to_owned(), 3), ("o'dc".to_owned(), 2)]);
        assert_eq!(
            Replication::NetworkTopology { dcs }.to_cql().unwrap(),
            "{'class': 'NetworkTopologyStrategy', 'dc1': 3, 'o''dc': 2}"
        );
        assert!(Replication::SimpleStrategy { rf: 0 }.to_cql().is_err());
        assert!(Replication::NetworkTopology { dcs: BTreeMap::new() }.to_cql().is_err());
    }

    #[test]
    fn keyspace_names() {
        assert!(validate_keyspace("chat").is_ok());
        assert!(validate_keyspace("chat_test_01").is_ok());
        for bad in ["", "1chat", "chat-x", "chat; DROP", &"k".repeat(49)] {
            assert!(validate_keyspace(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn buckets() {
        assert_eq!(bucket_of(1).unwrap(), 0);
        assert_eq!(bucket_of(999).unwrap(), 0);
        assert_eq!(bucket_of(1000).unwrap(), 1);
        assert_eq!(bucket_of(2010).unwrap(), 2);
        assert!(to_cql_seq(u64::MAX).is_err());
    }
}
