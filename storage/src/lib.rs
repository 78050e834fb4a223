//! Message history behind one trait, [`HistoryStore`], with two backends:
//!
//! - [`embedded::EmbeddedStore`]: a fjall database in one directory, for the one-process setup;
//! - [`cql::CqlStore`]: ScyllaDB (tested on Apache Cassandra), for the distributed setup.
//!
//! The store is also where sequencing is fenced: [`HistoryStore::append`] only succeeds when
//! the room's last seq is still the one the writer expected, so two writers can never give two
//! messages the same seq. (The CQL store fences by the writer's lease on the room's partition,
//! see [`cql`]; the embedded store by its one writer.)

pub mod cql;
pub mod embedded;
mod fence;
mod hedge;
pub mod pacer;
mod rows;
pub mod warm;

use async_trait::async_trait;
use protocol::ChatMessage;
use uuid::Uuid;

/// Largest page a history query returns.
pub const MAX_PAGE: u32 = 200;
/// Page size when the client gives none.
pub const DEFAULT_PAGE: u32 = 50;

/// What kind of failure a [`StoreError`] is, for callers to branch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// The room's last seq was not what the writer expected: another writer got there first.
    /// Reload the room's state and sequence again.
    Conflict,
    /// The backend cannot be reached or refused the operation; retry later.
    Unavailable,
    /// Stored data could not be decoded (or encoded).
    Corrupt,
    /// The store was configured wrongly (a bad replication setting, say); retrying will not help.
    Config,
    /// Another writer took the room's partition (this one was fenced off): nothing of the append
    /// was committed. Like a conflict, reload the room and sequence again: the next append takes
    /// the partition back, after the store's grace.
    Fenced,
    /// The backend failed before the append's commit was sent: nothing of the append was
    /// committed, and nothing of it can be later (rows it may have written stay above the room's
    /// last seq, and a later append's rows replace them). Unlike [`Unavailable`](Self::Unavailable)
    /// the outcome is known; sequence again when the store answers.
    NotCommitted,
}

impl std::fmt::Display for StoreErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Conflict => "sequencing conflict",
            Self::Unavailable => "store unavailable",
            Self::Corrupt => "corrupt record",
            Self::Config => "bad store configuration",
            Self::Fenced => "fenced off",
            Self::NotCommitted => "store unavailable before commit",
        })
    }
}

/// The cause beneath a [`StoreError`].
pub type BoxError = std::sync::Arc<dyn std::error::Error + Send + Sync>;

/// An error of a history store: a [`kind`](Self::kind) to branch on, what was being done, and
/// the underlying error when there is one.
#[derive(Debug, Clone)]
pub struct StoreError {
    kind: StoreErrorKind,
    context: String,
    source: Option<BoxError>,
    /// For a conflict: the last seq the writer expected and the one the store holds.
    seqs: Option<(u64, u64)>,
}

impl StoreError {
    /// An error of `kind` while doing `context`.
    pub fn new(kind: StoreErrorKind, context: impl Into<String>) -> Self {
        Self { kind, context: context.into(), source: None, seqs: None }
    }

    /// The same error caused by `source`.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(std::sync::Arc::new(source));
        self
    }

    /// The room's last seq was `actual`, not the `expected` the writer sequenced from.
    pub fn conflict(room: &str, expected: u64, actual: u64) -> Self {
        let context = format!("room {room}: expected last seq {expected}, store has {actual}");
        Self { seqs: Some((expected, actual)), ..Self::new(StoreErrorKind::Conflict, context) }
    }

    /// The backend failed while doing `context`.
    pub fn unavailable(context: impl Into<String>) -> Self {
        Self::new(StoreErrorKind::Unavailable, context)
    }

    /// Stored data did not decode while doing `context`.
    pub fn corrupt(context: impl Into<String>) -> Self {
        Self::new(StoreErrorKind::Corrupt, context)
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }

    /// For a conflict, the last seq the writer expected and the one the store holds.
    pub fn conflict_seqs(&self) -> Option<(u64, u64)> {
        self.seqs
    }

    /// Another writer holds the room's partition: nothing of the append was committed.
    pub fn fenced(context: impl Into<String>) -> Self {
        Self::new(StoreErrorKind::Fenced, context)
    }

    /// The same failure, known to have struck an append before its commit was sent: an
    /// [`Unavailable`](StoreErrorKind::Unavailable) error becomes
    /// [`NotCommitted`](StoreErrorKind::NotCommitted); other kinds stay as they are.
    pub fn before_commit(mut self) -> Self {
        if self.kind == StoreErrorKind::Unavailable {
            self.kind = StoreErrorKind::NotCommitted;
        }
        self
    }

    /// Whether another writer moved the room first.
    pub fn is_conflict(&self) -> bool {
        self.kind == StoreErrorKind::Conflict
    }
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind, self.context)?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|source| source as &(dyn std::error::Error + 'static))
    }
}

/// Messages for one room to append after `expected_last_seq`, with consecutive seqs.
#[derive(Debug, Clone)]
pub struct RoomAppend {
    /// The room.
    pub room: String,
    /// The room's last seq the writer sequenced from.
    pub expected_last_seq: u64,
    /// Messages with seqs `expected_last_seq + 1 ..`, in order.
    pub messages: Vec<ChatMessage>,
}

/// Which page of a room's history to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageQuery {
    /// Only seqs below this (exclusive).
    pub before: Option<u64>,
    /// Only seqs above this (exclusive).
    pub after: Option<u64>,
    /// At most this many messages (clamped to 1..=[`MAX_PAGE`]).
    pub limit: u32,
}

impl PageQuery {
    /// The newest `limit` messages.
    pub fn newest(limit: u32) -> Self {
        Self { before: None, after: None, limit }
    }

    /// Messages with `after < seq < before`, oldest first.
    pub fn between(after: u64, before: u64) -> Self {
        let span = before.saturating_sub(after).saturating_sub(1);
        Self { before: Some(before), after: Some(after), limit: span.min(MAX_PAGE as u64) as u32 }
    }

    /// The limit clamped to 1..=MAX_PAGE.
    pub fn clamped_limit(&self) -> u32 {
        self.limit.clamp(1, MAX_PAGE)
    }

    /// Which seqs to read, given the room's last seq: an inclusive range, oldest first, and
    /// whether messages beyond the page remain in the direction asked.
    ///
    /// Seqs are gapless from 1, so the range is plain arithmetic: with `after` the page starts
    /// right after it and `has_more` looks forward; otherwise the page ends just below
    /// `before` (or at the newest) and `has_more` looks back.
    pub fn seq_range(&self, last_seq: u64) -> (std::ops::RangeInclusive<u64>, bool) {
        let limit = u64::from(self.clamped_limit());
        let upper = match self.before {
            Some(before) => before.saturating_sub(1).min(last_seq),
            None => last_seq,
        };
        match self.after {
            Some(after) => {
                let first = after.saturating_add(1);
                let last = upper.min(after.saturating_add(limit));
                (first..=last, last < upper)
            }
            None => {
                let first = upper.saturating_sub(limit - 1).max(1);
                (first..=upper, first > 1)
            }
        }
    }
}

/// A page of history: messages in ascending seq and whether more lie beyond.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Page {
    /// Messages, ascending by seq.
    pub messages: Vec<ChatMessage>,
    /// Whether more messages lie beyond the page in the direction asked.
    pub has_more: bool,
}

/// A read of `room`, given up once `by` has passed.
async fn read_within<T>(
    by: tokio::time::Instant,
    room: &str,
    read: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout_at(by, read).await.unwrap_or_else(|_| {
        Err(StoreError::unavailable(format!("room {room}: the deadline passed before the store answered")))
    })
}

/// Durable message history.
#[async_trait]
pub trait HistoryStore: Send + Sync + 'static {
    /// Appends one room's sequenced messages durably (fsync'd or replicated) with their dedupe
    /// entries, if the room's last seq still equals `expected_last_seq`; otherwise fails with a
    /// [`StoreErrorKind::Conflict`] error and stores nothing.
    ///
    /// Whether a batch was stored is known by its last message: the batch commits as a whole
    /// (both stores), and a message whose seq is above the room's last seq was never committed,
    /// whatever rows a failed writer left (lookups do not find it).
    ///
    /// After a [`StoreErrorKind::Unavailable`] error the outcome is unknown: call
    /// [`last_seq`](Self::last_seq) before appending to the room again. After
    /// [`StoreErrorKind::Fenced`] nothing was committed, and another writer owns the room. After
    /// [`StoreErrorKind::NotCommitted`] nothing was committed nor can be later.
    async fn append(&self, batch: RoomAppend) -> Result<(), StoreError>;

    /// [`append`](Self::append), given up before its commit once `commit_by` has passed: it
    /// then fails with [`StoreErrorKind::NotCommitted`], so the caller knows by then that nothing
    /// of it is stored (a commit already sent is waited for). For a store whose append can hang
    /// (a network store); the default, for one that cannot, ignores the bound.
    async fn append_by(&self, batch: RoomAppend, commit_by: tokio::time::Instant) -> Result<(), StoreError> {
        let _ = commit_by;
        self.append(batch).await
    }

    /// The room's newest seq, 0 for an empty room.
    ///
    /// Contract: once this returns `N`, every message with seq `<= N` is readable (page,
    /// [`get_by_id`](Self::get_by_id)) and its dedupe entry is found by
    /// [`find_by_client_msg_id`](Self::find_by_client_msg_id). A backend whose append is not
    /// one atomic write (the CQL store: a fencing transaction, then the message writes) finishes
    /// any interrupted append before returning. That makes a writer crash between the two steps
    /// harmless, and lets a writer that lost a conflict call this and then see
    /// the winner's dedupe entries.
    async fn last_seq(&self, room: &str) -> Result<u64, StoreError>;

    /// [`last_seq`](Self::last_seq), given up once `by` has passed: it then fails with
    /// [`StoreErrorKind::Unavailable`] ("the deadline passed before the store answered").
    /// Reads change nothing, so one cut short leaves nothing to settle.
    async fn last_seq_by(&self, room: &str, by: tokio::time::Instant) -> Result<u64, StoreError> {
        read_within(by, room, self.last_seq(room)).await
    }

    /// The message stored earlier by `user` in `room` with this client message id.
    async fn find_by_client_msg_id(
        &self,
        room: &str,
        user: &str,
        client_msg_id: &str,
    ) -> Result<Option<ChatMessage>, StoreError>;

    /// [`find_by_client_msg_id`](Self::find_by_client_msg_id) for many `(user, client_msg_id)`
    /// pairs of one room at once, answers in the same order. Backends override it to read in one
    /// transaction or concurrently; a sequencer calls it once per batch of sends.
    async fn find_by_client_msg_ids(
        &self,
        room: &str,
        keys: &[(&str, &str)],
    ) -> Result<Vec<Option<ChatMessage>>, StoreError> {
        let mut found = Vec::with_capacity(keys.len());
        for (user, client_msg_id) in keys {
            found.push(self.find_by_client_msg_id(room, user, client_msg_id).await?);
        }
        Ok(found)
    }

    /// [`find_by_client_msg_ids`](Self::find_by_client_msg_ids), given up once `by` has passed
    /// (as [`last_seq_by`](Self::last_seq_by)).
    async fn find_by_client_msg_ids_by(
        &self,
        room: &str,
        keys: &[(&str, &str)],
        by: tokio::time::Instant,
    ) -> Result<Vec<Option<ChatMessage>>, StoreError> {
        read_within(by, room, self.find_by_client_msg_ids(room, keys)).await
    }

    /// A page of a room's history.
    async fn page(&self, room: &str, query: PageQuery) -> Result<Page, StoreError>;

    /// [`page`](Self::page), given up once `by` has passed (as [`last_seq_by`](Self::last_seq_by)).
    async fn page_by(&self, room: &str, query: PageQuery, by: tokio::time::Instant) -> Result<Page, StoreError> {
        read_within(by, room, self.page(room, query)).await
    }

    /// A message by id.
    async fn get_by_id(&self, id: Uuid) -> Result<Option<ChatMessage>, StoreError>;

    /// Succeeds while the backend answers; used by `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_ranges() {
        // newest 50 of 120
        assert_eq!(PageQuery::newest(50).seq_range(120), (71..=120, true));
        // newest of few
        assert_eq!(PageQuery::newest(50).seq_range(3), (1..=3, false));
        // before
        let q = PageQuery { before: Some(71), after: None, limit: 50 };
        assert_eq!(q.seq_range(120), (21..=70, true));
        let q = PageQuery { before: Some(21), after: None, limit: 50 };
        assert_eq!(q.seq_range(120), (1..=20, false));
        // after
        let q = PageQuery { before: None, after: Some(100), limit: 50 };
        assert_eq!(q.seq_range(120), (101..=120, false));
        let q = PageQuery { before: None, after: Some(10), limit: 50 };
        assert_eq!(q.seq_range(120), (11..=60, true));
        // between
        assert_eq!(PageQuery::between(5, 9).seq_range(120), (6..=8, false));
        // empty room
        let (range, more) = PageQuery::newest(50).seq_range(0);
        assert!(range.is_empty() && !more);
        // after beyond the end
        let q = PageQuery { before: None, after: Some(500), limit: 50 };
        assert!(q.seq_range(120).0.is_empty());
    }
}
