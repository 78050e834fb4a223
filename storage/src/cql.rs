//! The CQL store: history in ScyllaDB (tested on Apache Cassandra 5) through the `scylla` driver.
//!
//! Sequencing is fenced by a lightweight transaction on the room's `room_state` row, which also
//! records the appended messages as `pending` (a write-ahead record). Only after the transaction
//! is applied are the message, dedupe and id rows written, with plain idempotent writes; the
//! newest message's row goes last and marks the append complete. A writer that dies in between
//! leaves the record behind, and [`HistoryStore::last_seq`] (and [`HistoryStore::page`]) finish
//! the writes before answering. The schema lives in `storage/schema/*.cql`; see
//! docs/storage.md for the design.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::BoxFuture;
use futures_util::{StreamExt, TryStreamExt};
use protocol::ChatMessage;
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::policies::load_balancing::DefaultPolicy;
use scylla::response::query_result::QueryResult;
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::Statement;
use scylla::value::{CqlValue, Row};
use uuid::Uuid;

pub use scylla::statement::{Consistency, SerialConsistency};

use crate::{HistoryStore, Page, PageQuery, RoomAppend, StoreError, StoreErrorKind};

/// Consecutive seqs per `messages` partition: `bucket = seq / BUCKET_SIZE`.
pub const BUCKET_SIZE: u64 = 1000;

/// Schema files, applied in this order on every connect (all idempotent).
const MIGRATIONS: &[(&str, &str)] = &[
    ("0001_history.cql", include_str!("../schema/0001_history.cql")),
    ("0002_chain.cql", include_str!("../schema/0002_chain.cql")),
];

/// Requests in flight at once for one append, or for one batch of dedupe lookups.
const MAX_INFLIGHT_REQUESTS: usize = 64;

/// Most bytes of pending record (the JSON of the messages) one fencing transaction carries; a
/// bigger append is claimed in chunks of at most this much (a single message larger than this
/// goes alone). What bounds a single-partition transaction is the request frame
/// (`native_transport_max_frame_size`, 16 MiB) and the mutation (`max_mutation_size`, half the
/// 32 MiB commit log segment); `batch_size_fail_threshold` (50 KiB) applies to `BATCH`
/// statements, which the store does not use. 256 KiB keeps the `pending` cell far below those and
/// ScyllaDB's 1 MB large-cell warning, while a worker's usual batch (up to 1024 messages of a
/// few hundred bytes) still takes one transaction.
pub const MAX_CLAIM_BYTES: usize = 256 * 1024;

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
    /// gives up on) its append well within the gateway's margin. A write that timed out may
    /// still apply later: the worker then resolves the outcome before answering (see fanout),
    /// and a client retry gets the original ack.
    pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 1_000;
    /// Default `connect_timeout`, in milliseconds.
    pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 5_000;
}

impl Default for CqlConfig {
    /// One local node, keyspace `chat`, RF 1, `LOCAL_QUORUM` / `LOCAL_SERIAL`, 1 s requests,
    /// 5 s connects, no preferred datacenter, no credentials, no TLS.
    fn default() -> Self {
        Self {
            nodes: vec![Self::DEFAULT_NODE.into()],
            keyspace: Self::DEFAULT_KEYSPACE.into(),
            replication: Replication::SimpleStrategy { rf: Self::DEFAULT_REPLICATION_FACTOR },
            consistency: Consistency::LocalQuorum,
            serial_consistency: SerialConsistency::LocalSerial,
            request_timeout: Duration::from_millis(Self::DEFAULT_REQUEST_TIMEOUT_MS),
            connect_timeout: Duration::from_millis(Self::DEFAULT_CONNECT_TIMEOUT_MS),
            local_datacenter: None,
            credentials: None,
            tls_ca: None,
        }
    }
}

/// The prepared statements of the store.
struct Statements {
    /// First append to a room: `INSERT ... IF NOT EXISTS`.
    claim_first: PreparedStatement,
    /// Later appends: `UPDATE ... IF last_seq = ?`.
    claim_next: PreparedStatement,
    read_state: PreparedStatement,
    read_last_seq: PreparedStatement,
    insert_message: PreparedStatement,
    insert_dedupe: PreparedStatement,
    insert_id: PreparedStatement,
    message_exists: PreparedStatement,
    read_message: PreparedStatement,
    read_range: PreparedStatement,
    read_dedupe: PreparedStatement,
    read_id: PreparedStatement,
    ping: PreparedStatement,
}

/// History in a CQL keyspace.
pub struct CqlStore {
    session: Session,
    keyspace: String,
    statements: Statements,
}

/// One of the plain writes that complete an append.
#[derive(Clone, Copy)]
enum Write<'a> {
    Message(&'a ChatMessage),
    Dedupe(&'a ChatMessage),
    Id(&'a ChatMessage),
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
        if let Some(dc) = &config.local_datacenter {
            // The policy prefers the datacenter (token-aware, no failover to a remote one, so
            // `LOCAL_*` always means this one); the session-level preference says the same to
            // whatever the driver routes without this profile.
            let policy = DefaultPolicy::builder().prefer_datacenter(dc.clone()).permit_dc_failover(false).build();
            profile = profile.load_balancing_policy(policy);
            builder = builder.prefer_datacenter(dc.clone());
        }
        if let Some(CqlCredentials { user, password }) = &config.credentials {
            builder = builder.user(user, password);
        }
        if let Some(ca) = &config.tls_ca {
            builder = builder.tls_context(Some(tls_config(ca)?));
        }
        let builder = builder.default_execution_profile_handle(profile.build().into_handle());
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
        session
            .use_keyspace(keyspace.as_str(), false)
            .await
            .map_err(|e| unavailable(format_args!("use keyspace {keyspace}"), e))?;
        for (file, text) in MIGRATIONS {
            for statement in schema_statements(text) {
                apply_schema(&session, &keyspace, &statement)
                    .await
                    .map_err(|e| unavailable(format_args!("apply schema/{file}"), e))?;
            }
        }
        let statements = Statements::prepare(&session).await?;
        tracing::info!(%nodes, %keyspace, "CQL history store ready");
        Ok(Self { session, keyspace, statements })
    }

    /// The keyspace the store uses.
    pub fn keyspace(&self) -> &str {
        &self.keyspace
    }

    /// Test hook: runs only the fencing transaction of an append (as a writer that dies right
    /// after it would), leaving the messages as the pending record.
    #[doc(hidden)]
    pub async fn claim_only(&self, batch: RoomAppend) -> Result<(), StoreError> {
        check_consecutive(&batch)?;
        let pending = serde_json::to_vec(&batch.messages)
            .map_err(|e| StoreError::corrupt(format!("encode pending messages: {e}")))?;
        self.claim(&batch.room, batch.expected_last_seq, batch.messages.len(), pending).await
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

    /// The fencing lightweight transaction: sets the room's last seq to `expected + count` and
    /// records `pending` (the JSON of those `count` messages) if the last seq is still `expected`.
    async fn claim(&self, room: &str, expected: u64, count: usize, pending: Vec<u8>) -> Result<(), StoreError> {
        let new_last = to_cql_seq(expected + count as u64)?;
        let result = if expected == 0 {
            self.session.execute_unpaged(&self.statements.claim_first, (room, new_last, pending)).await
        } else {
            let values = (new_last, pending, room, to_cql_seq(expected)?);
            self.session.execute_unpaged(&self.statements.claim_next, values).await
        };
        let result = result
            .map_err(|e| unavailable(format_args!("room {room}: claim seqs after {expected} (outcome unknown)"), e))?;
        match lwt_outcome(result).map_err(|e| StoreError::corrupt(format!("room {room}: {e}")))? {
            None => Ok(()),
            Some(actual) => Err(StoreError::conflict(room, expected, actual)),
        }
    }

    /// Writes the message, dedupe and id rows of claimed messages, idempotently. The newest
    /// message's row is written last, after everything else succeeded: its presence means the
    /// whole batch is readable.
    async fn materialize(&self, messages: &[ChatMessage]) -> Result<(), StoreError> {
        let Some((newest, older)) = messages.split_last() else {
            return Ok(());
        };
        let mut writes: Vec<BoxFuture<'_, Result<(), StoreError>>> = Vec::with_capacity(messages.len() * 3);
        for message in older {
            for write in [Write::Message(message), Write::Dedupe(message), Write::Id(message)] {
                writes.push(Box::pin(self.write(write)));
            }
        }
        writes.push(Box::pin(self.write(Write::Dedupe(newest))));
        writes.push(Box::pin(self.write(Write::Id(newest))));
        // Collected first: a closure held across the await would trip async_trait's Send check.
        futures_util::stream::iter(writes).buffer_unordered(MAX_INFLIGHT_REQUESTS).try_collect::<()>().await?;
        self.write(Write::Message(newest)).await
    }

    async fn write(&self, write: Write<'_>) -> Result<(), StoreError> {
        let s = &self.statements;
        let result = match write {
            Write::Message(m) => {
                let seq = to_cql_seq(m.seq)?;
                let values = (
                    m.room.as_str(),
                    bucket_of(m.seq)?,
                    seq,
                    m.id,
                    m.user.as_str(),
                    m.body.as_str(),
                    m.ts,
                    m.client_msg_id.as_str(),
                    m.trace_id.as_str(),
                    m.prev.as_deref(),
                    m.digest.as_deref(),
                );
                self.session.execute_unpaged(&s.insert_message, values).await
            }
            Write::Dedupe(m) => {
                let values = (m.room.as_str(), m.user.as_str(), m.client_msg_id.as_str(), to_cql_seq(m.seq)?);
                self.session.execute_unpaged(&s.insert_dedupe, values).await
            }
            Write::Id(m) => {
                let values = (m.id, m.room.as_str(), to_cql_seq(m.seq)?);
                self.session.execute_unpaged(&s.insert_id, values).await
            }
        };
        result.map(|_| ()).map_err(|e| {
            let (what, m) = match write {
                Write::Message(m) => ("message", m),
                Write::Dedupe(m) => ("dedupe entry", m),
                Write::Id(m) => ("id entry", m),
            };
            unavailable(format_args!("room {}: write {what} of seq {}", m.room, m.seq), e)
        })
    }

    /// The room's last seq and its pending record (decoded), as stored.
    async fn read_state(&self, room: &str) -> Result<(u64, Vec<ChatMessage>), StoreError> {
        let result = self
            .session
            .execute_unpaged(&self.statements.read_state, (room,))
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
        let result = self
            .session
            .execute_unpaged(&self.statements.read_last_seq, (room,))
            .await
            .map_err(|e| unavailable(format_args!("room {room}: read last seq"), e))?;
        let row = rows(result, room)?
            .maybe_first_row::<(Option<i64>,)>()
            .map_err(|e| StoreError::corrupt(format!("room {room}: state row: {e}")))?;
        from_cql_seq(row.and_then(|(seq,)| seq).unwrap_or(0))
    }

    /// The room's last seq, after making sure its pending record is written out.
    async fn settled_last_seq(&self, room: &str) -> Result<u64, StoreError> {
        let (last_seq, pending) = self.read_state(room).await?;
        if let Some(newest) = pending.last() {
            if !self.message_exists(room, newest.seq).await? {
                // Either its writer died between the claim and the rows, or it is still writing
                // them right now; the rows are idempotent either way.
                tracing::debug!(room, seq = newest.seq, "writing the rows of a claimed append");
                self.materialize(&pending).await?;
            }
        }
        Ok(last_seq)
    }

    async fn message_exists(&self, room: &str, seq: u64) -> Result<bool, StoreError> {
        let values = (room, bucket_of(seq)?, to_cql_seq(seq)?);
        let result = self
            .session
            .execute_unpaged(&self.statements.message_exists, values)
            .await
            .map_err(|e| unavailable(format_args!("room {room}: check seq {seq}"), e))?;
        Ok(rows(result, room)?.rows_num() > 0)
    }

    async fn read_message(&self, room: &str, seq: u64) -> Result<Option<ChatMessage>, StoreError> {
        let values = (room, bucket_of(seq)?, to_cql_seq(seq)?);
        let result = self
            .session
            .execute_unpaged(&self.statements.read_message, values)
            .await
            .map_err(|e| unavailable(format_args!("room {room}: read seq {seq}"), e))?;
        let row = rows(result, room)?
            .maybe_first_row::<MessageRow>()
            .map_err(|e| StoreError::corrupt(format!("room {room}: message row: {e}")))?;
        row.map(|row| message_from_row(room, row)).transpose()
    }

    /// A message that an index row (dedupe or id) points at. The index row may come from an
    /// append still in progress or interrupted: then the room is settled and the read retried.
    async fn read_indexed(&self, room: &str, seq: u64) -> Result<ChatMessage, StoreError> {
        if let Some(message) = self.read_message(room, seq).await? {
            return Ok(message);
        }
        self.settled_last_seq(room).await?;
        self.read_message(room, seq)
            .await?
            .ok_or_else(|| StoreError::corrupt(format!("room {room}: seq {seq} is indexed but not stored")))
    }

    /// Messages `first..=last` of a room, one query per bucket, concurrently.
    async fn read_range(&self, room: &str, first: u64, last: u64) -> Result<Vec<ChatMessage>, StoreError> {
        let buckets = (first / BUCKET_SIZE)..=(last / BUCKET_SIZE);
        let reads = buckets.map(|bucket| async move {
            let from = first.max(bucket * BUCKET_SIZE);
            let to = last.min(bucket * BUCKET_SIZE + BUCKET_SIZE - 1);
            let values = (room, to_cql_seq(bucket)?, to_cql_seq(from)?, to_cql_seq(to)?);
            let result = self
                .session
                .execute_unpaged(&self.statements.read_range, values)
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
    async fn prepare(session: &Session) -> Result<Self, StoreError> {
        let insert_message =
            format!("INSERT INTO messages (room, bucket, {MESSAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)");
        let read_message = format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE room = ? AND bucket = ? AND seq = ?");
        let read_range =
            format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE room = ? AND bucket = ? AND seq >= ? AND seq <= ?");
        Ok(Self {
            claim_first: prepare(
                session,
                "INSERT INTO room_state (room, last_seq, pending) VALUES (?, ?, ?) IF NOT EXISTS",
                false,
            )
            .await?,
            claim_next: prepare(
                session,
                "UPDATE room_state SET last_seq = ?, pending = ? WHERE room = ? IF last_seq = ?",
                false,
            )
            .await?,
            read_state: prepare(session, "SELECT last_seq, pending FROM room_state WHERE room = ?", true).await?,
            read_last_seq: prepare(session, "SELECT last_seq FROM room_state WHERE room = ?", true).await?,
            insert_message: prepare(session, &insert_message, true).await?,
            insert_dedupe: prepare(
                session,
                "INSERT INTO dedupe (room, user, client_msg_id, seq) VALUES (?, ?, ?, ?)",
                true,
            )
            .await?,
            insert_id: prepare(session, "INSERT INTO message_ids (id, room, seq) VALUES (?, ?, ?)", true).await?,
            message_exists: prepare(
                session,
                "SELECT seq FROM messages WHERE room = ? AND bucket = ? AND seq = ?",
                true,
            )
            .await?,
            read_message: prepare(session, &read_message, true).await?,
            read_range: prepare(session, &read_range, true).await?,
            read_dedupe: prepare(
                session,
                "SELECT seq FROM dedupe WHERE room = ? AND user = ? AND client_msg_id = ?",
                true,
            )
            .await?,
            read_id: prepare(session, "SELECT room, seq FROM message_ids WHERE id = ?", true).await?,
            ping: prepare(session, "SELECT release_version FROM system.local", true).await?,
        })
    }
}

#[async_trait]
impl HistoryStore for CqlStore {
    async fn append(&self, batch: RoomAppend) -> Result<(), StoreError> {
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
        // Chunk by chunk: each is claimed (fenced on the previous chunk's last seq) and written
        // out before the next is claimed, so the pending record only ever holds the newest
        // chunk, as `last_seq` expects.
        let mut expected = batch.expected_last_seq;
        for (i, (messages, pending)) in claim_chunks(&batch.messages, MAX_CLAIM_BYTES)?.into_iter().enumerate() {
            let claimed = self.claim(room, expected, messages.len(), pending).await;
            if let Err(e) = claimed {
                if i > 0 {
                    tracing::warn!(room, stored_up_to = expected, error = %e, "append stopped after a chunk");
                }
                return Err(e);
            }
            let last = expected + messages.len() as u64;
            self.materialize(messages).await.map_err(|e| {
                StoreError::unavailable(format!(
                    "room {room}: seqs {}..={last} are claimed but not all written ({e}); last_seq completes them",
                    expected + 1,
                ))
            })?;
            expected = last;
        }
        Ok(())
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
        let result = self
            .session
            .execute_unpaged(&self.statements.read_dedupe, (room, user, client_msg_id))
            .await
            .map_err(|e| unavailable(format_args!("room {room}: read dedupe entry"), e))?;
        let row = rows(result, room)?
            .maybe_first_row::<(i64,)>()
            .map_err(|e| StoreError::corrupt(format!("room {room}: dedupe row: {e}")))?;
        let Some((seq,)) = row else { return Ok(None) };
        self.read_indexed(room, from_cql_seq(seq)?).await.map(Some)
    }

    async fn find_by_client_msg_ids(
        &self,
        room: &str,
        keys: &[(&str, &str)],
    ) -> Result<Vec<Option<ChatMessage>>, StoreError> {
        // A batch may hold hundreds of one room's sends: bounded, in order.
        let lookups: Vec<_> = keys.iter().map(|(user, id)| self.find_by_client_msg_id(room, user, id)).collect();
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
            // The newest append may be interrupted or still in flight: finish it, read again.
            let (_, pending) = self.read_state(room).await?;
            self.materialize(&pending).await?;
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
            .session
            .execute_unpaged(&self.statements.read_id, (id,))
            .await
            .map_err(|e| unavailable(format_args!("read id {id}"), e))?;
        let row = rows(result, "-")?
            .maybe_first_row::<(String, i64)>()
            .map_err(|e| StoreError::corrupt(format!("id {id}: row: {e}")))?;
        let Some((room, seq)) = row else {
            return Ok(None);
        };
        self.read_indexed(&room, from_cql_seq(seq)?).await.map(Some)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.session.execute_unpaged(&self.statements.ping, ()).await.map(|_| ()).map_err(|e| unavailable("ping", e))
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

/// Consecutive messages of an append claimed by one transaction, with their pending record.
type ClaimChunk<'a> = (&'a [ChatMessage], Vec<u8>);

/// Splits `messages` into consecutive chunks whose pending record (a JSON array of the chunk's
/// messages, returned with it) is at most `max_bytes`, or holds a single message.
fn claim_chunks(messages: &[ChatMessage], max_bytes: usize) -> Result<Vec<ClaimChunk<'_>>, StoreError> {
    let mut chunks = Vec::new();
    let (mut start, mut pending) = (0, Vec::new());
    for (i, message) in messages.iter().enumerate() {
        let json = serde_json::to_vec(message)
            .map_err(|e| StoreError::corrupt(format!("encode pending message of seq {}: {e}", message.seq)))?;
        // `[` or `,` before it, `]` after it.
        if i > start && pending.len() + 1 + json.len() + 1 > max_bytes {
            pending.push(b']');
            chunks.push((&messages[start..i], std::mem::take(&mut pending)));
            start = i;
        }
        pending.push(if i == start { b'[' } else { b',' });
        pending.extend_from_slice(&json);
    }
    if start < messages.len() {
        pending.push(b']');
        chunks.push((&messages[start..], pending));
    }
    Ok(chunks)
}

fn unavailable(context: impl Display, e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::unavailable(context.to_string()).with_source(e)
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
    let Some((table, column)) = added_column(cql) else {
        return run_schema(session, cql).await;
    };
    if column_exists(session, keyspace, table, column).await? {
        return Ok(());
    }
    match run_schema(session, cql).await {
        Ok(()) => Ok(()),
        Err(e) => match column_exists(session, keyspace, table, column).await {
            Ok(true) => Ok(()),
            _ => Err(e),
        },
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

/// The outcome of a lightweight transaction: `None` when applied, else the room's actual last
/// seq (0 when the row does not exist).
fn lwt_outcome(result: QueryResult) -> Result<Option<u64>, String> {
    let rows = result.into_rows_result().map_err(|e| format!("transaction result: {e}"))?;
    let specs = rows.column_specs();
    let applied_at = specs.get_by_name("[applied]").map(|(i, _)| i).ok_or("no [applied] column")?;
    let last_seq_at = specs.get_by_name("last_seq").map(|(i, _)| i);
    let row = rows
        .maybe_first_row::<Row>()
        .map_err(|e| format!("transaction result: {e}"))?
        .ok_or("empty transaction result")?;
    match row.columns.get(applied_at) {
        Some(Some(CqlValue::Boolean(true))) => return Ok(None),
        Some(Some(CqlValue::Boolean(false))) => {}
        other => return Err(format!("transaction result: [applied] is {other:?}")),
    }
    let actual = match last_seq_at.and_then(|i| row.columns.get(i)) {
        Some(Some(CqlValue::BigInt(seq))) => u64::try_from(*seq).map_err(|e| e.to_string())?,
        Some(Some(other)) => return Err(format!("transaction result: last_seq is {other:?}")),
        Some(None) | None => 0,
    };
    Ok(Some(actual))
}

fn message_from_row(room: &str, row: MessageRow) -> Result<ChatMessage, StoreError> {
    let (seq, id, user, body, ts, client_msg_id, trace_id, prev, digest) = row;
    let seq = from_cql_seq(seq)?;
    Ok(ChatMessage { room: room.to_owned(), seq, id, user, body, ts, client_msg_id, trace_id, prev, digest })
}

fn bucket_of(seq: u64) -> Result<i64, StoreError> {
    to_cql_seq(seq / BUCKET_SIZE)
}

fn to_cql_seq(seq: u64) -> Result<i64, StoreError> {
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
    fn claim_chunks_are_bounded_ordered_and_decode_to_their_messages() {
        let message = |seq: u64, body: String| ChatMessage {
            room: "r".into(),
            seq,
            id: Uuid::now_v7(),
            user: "u".into(),
            body,
            ts: 1,
            client_msg_id: format!("c{seq}"),
            trace_id: String::new(),
            prev: None,
            digest: None,
        };
        let messages: Vec<ChatMessage> =
            (1..=300).map(|seq| message(seq, "\u{1F600}\u{7}\"".repeat((seq as usize * 37) % 1500))).collect();
        let max = 64 * 1024;
        let chunks = claim_chunks(&messages, max).unwrap();
        assert!(chunks.len() > 10, "{} chunks", chunks.len());
        let mut rejoined = Vec::new();
        for (chunk, pending) in &chunks {
            assert!(!chunk.is_empty());
            assert!(pending.len() <= max, "{} bytes", pending.len());
            assert_eq!(pending, &serde_json::to_vec(chunk).unwrap(), "the pending record is the chunk's JSON");
            rejoined.extend_from_slice(chunk);
        }
        assert_eq!(rejoined, messages);

        // One message over the bound goes alone; small batches stay one chunk; none is empty.
        let huge = vec![message(1, "x".repeat(100)), message(2, "y".repeat(max)), message(3, "z".into())];
        let sizes: Vec<usize> = claim_chunks(&huge, max).unwrap().iter().map(|(c, _)| c.len()).collect();
        assert_eq!(sizes, [1, 1, 1]);
        assert_eq!(claim_chunks(&messages[..5], max).unwrap().len(), 1);
        assert!(claim_chunks(&[], max).unwrap().is_empty());
    }

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
