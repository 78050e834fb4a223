//! The embedded store: a fjall log-structured database in one directory, fsync'd on every
//! commit.
//!
//! Appends go to a single writer thread that commits everything queued in one atomic batch,
//! so under load many messages share one journal write and one fsync (group commit), while a
//! lone message is still durable before its caller hears back. While sends keep coming, a
//! commit may be held up to a short window so that more share it ([`crate::pacer`]). A log-structured store writes
//! each message once, to the journal; the B-tree store before it (redb) rewrote a 4 KiB page
//! of each table a message touched, about three times the CPU per message (docs/benchmarks.md).
//!
//! Three keyspaces:
//! - `messages`: [`message_key`] (room, seq) → the message's JSON;
//! - `dedupe`: dedupe key (room/user/client_msg_id) → seq (8 bytes, big-endian);
//! - `ids`: message id (16 bytes, big-endian) → the message's [`message_key`].
//!
//! A data directory written by the redb store is imported once when opened
//! ([`legacy::import`]).

mod legacy;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::pacer::Pacer;

use async_trait::async_trait;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use protocol::ChatMessage;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::{HistoryStore, Page, PageQuery, RoomAppend, StoreError};

/// Most appends committed in one batch.
const MAX_GROUP: usize = 1024;
/// Most rooms whose last seq the writer thread remembers; past it, it forgets them all and
/// reads each room's again on its next append.
const REMEMBERED_ROOMS: usize = 65_536;
/// Memory for recently read blocks.
const CACHE_BYTES: u64 = 16 * 1024 * 1024;
/// One keyspace's memtable is flushed to a table at this size.
const MEMTABLE_BYTES: u64 = 16 * 1024 * 1024;

/// Default of [`EmbeddedOptions::commit_window`], in microseconds.
pub const DEFAULT_COMMIT_WINDOW_US: u64 = 3_000;
/// Longest commit window allowed, in microseconds: a longer hold would add more to every
/// send's ack than any fsync saves.
pub const MAX_COMMIT_WINDOW_US: u64 = 100_000;

/// How the embedded store trades a send's latency for CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbeddedOptions {
    /// While appends keep coming, commits start at most once per window: a commit that would
    /// start sooner waits out the rest of it, if more appends are expected meanwhile, so they
    /// share its fsync. An append after a quiet spell is committed at once. Zero: never wait.
    pub commit_window: Duration,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self { commit_window: Duration::from_micros(DEFAULT_COMMIT_WINDOW_US) }
    }
}

type AppendReply = oneshot::Sender<Result<(), StoreError>>;

/// The store's three keyspaces.
#[derive(Clone)]
struct Tables {
    db: Database,
    messages: Keyspace,
    dedupe: Keyspace,
    ids: Keyspace,
}

/// History in a fjall database.
#[derive(Clone)]
pub struct EmbeddedStore {
    tables: Tables,
    writer: mpsc::Sender<(RoomAppend, AppendReply)>,
}

impl EmbeddedStore {
    /// Opens (or creates) the store at `dir/history` with the default options and starts its
    /// writer thread. History a redb store left in `dir/history.redb` is imported first.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, EmbeddedOptions::default())
    }

    /// [`EmbeddedStore::open`] with the given options.
    pub fn open_with(dir: &Path, options: EmbeddedOptions) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::unavailable(format!("create {}: {e}", dir.display())))?;
        let path = dir.join("history");
        let db = Database::builder(&path)
            .cache_size(CACHE_BYTES)
            .open()
            .map_err(|e| StoreError::unavailable(format!("open {}", path.display())).with_source(e))?;
        let keyspace = |name: &str| {
            db.keyspace(name, || KeyspaceCreateOptions::default().max_memtable_size(MEMTABLE_BYTES))
                .map_err(|e| StoreError::unavailable(format!("open keyspace {name}")).with_source(e))
        };
        let tables = Tables { messages: keyspace("messages")?, dedupe: keyspace("dedupe")?, ids: keyspace("ids")?, db };
        legacy::import(dir, &tables)?;
        let (writer, queue) = mpsc::channel(MAX_GROUP * 4);
        let writer_tables = tables.clone();
        std::thread::Builder::new()
            .name("history-writer".into())
            .spawn(move || write_loop(&writer_tables, queue, Pacer::new(options.commit_window)))
            .map_err(|e| StoreError::unavailable(format!("spawn writer thread: {e}")))?;
        Ok(Self { tables, writer })
    }

    fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Tables) -> Result<T, StoreError> + Send + 'static,
    ) -> impl std::future::Future<Output = Result<T, StoreError>> {
        let tables = self.tables.clone();
        async move {
            tokio::task::spawn_blocking(move || f(&tables))
                .await
                .map_err(|e| StoreError::unavailable(format!("reader task: {e}")))?
        }
    }
}

fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::unavailable("embedded store").with_source(e)
}

fn decode(bytes: &[u8]) -> Result<ChatMessage, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::corrupt("stored message").with_source(e))
}

/// A room's key prefix in `messages`: the room's name and a zero byte (room names hold no zero
/// byte, so no room's keys fall among another's).
fn room_prefix(room: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(room.len() + 9);
    key.extend_from_slice(room.as_bytes());
    key.push(0);
    key
}

/// A message's key in `messages`: the room's prefix, then the seq big-endian, so a room's
/// messages sort by seq.
fn message_key(room: &str, seq: u64) -> Vec<u8> {
    let mut key = room_prefix(room);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// The seq at the end of a [`message_key`].
fn seq_of_key(key: &[u8]) -> Result<u64, StoreError> {
    key.len()
        .checked_sub(8)
        .and_then(|start| key[start..].try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| StoreError::corrupt(format!("message key of {} bytes", key.len())))
}

fn seq_value(bytes: &[u8]) -> Result<u64, StoreError> {
    bytes
        .try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::corrupt(format!("dedupe entry of {} bytes", bytes.len())))
}

fn last_seq_in(messages: &Keyspace, room: &str) -> Result<u64, StoreError> {
    match messages.prefix(room_prefix(room)).next_back() {
        Some(entry) => seq_of_key(&entry.key().map_err(unavailable)?),
        None => Ok(0),
    }
}

fn message_at(messages: &Keyspace, key: &[u8]) -> Result<Option<ChatMessage>, StoreError> {
    messages.get(key).map_err(unavailable)?.map(|bytes| decode(&bytes)).transpose()
}

/// The writer thread: wait as the pacer says, drain what is queued, commit it in one batch,
/// answer each caller.
///
/// While appends keep coming it waits out the window before it looks at the queue, so the
/// appends queued meanwhile do not wake it: one wake-up per commit, not two.
fn write_loop(tables: &Tables, mut queue: mpsc::Receiver<(RoomAppend, AppendReply)>, mut pacer: Pacer) {
    use mpsc::error::TryRecvError;
    let mut last_seqs = LastSeqs::default();
    loop {
        let hold = pacer.hold(Instant::now());
        if !hold.is_zero() {
            std::thread::sleep(hold);
        }
        let first = match queue.try_recv() {
            Ok(first) => first,
            Err(TryRecvError::Empty) => match queue.blocking_recv() {
                Some(first) => first,
                None => return,
            },
            Err(TryRecvError::Disconnected) => return,
        };
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
        pacer.started(Instant::now(), group.len());
        match commit_group(tables, &mut last_seqs, &group) {
            Ok(results) => {
                for ((_, reply), result) in group.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, appends = group.len(), "history commit failed");
                for (_, reply) in group {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// The last seq of each room the writer thread has written or read, so that checking an
/// append's expectation costs no read. The writer thread is the store's only writer, so what
/// it remembers stays true.
#[derive(Default)]
struct LastSeqs {
    committed: HashMap<String, u64>,
}

impl LastSeqs {
    /// The room's last seq: remembered, or read from the store (and then remembered).
    fn get(&mut self, messages: &Keyspace, room: &str) -> Result<u64, StoreError> {
        if let Some(&seq) = self.committed.get(room) {
            return Ok(seq);
        }
        let seq = last_seq_in(messages, room)?;
        self.remember(room, seq);
        Ok(seq)
    }

    fn remember(&mut self, room: &str, seq: u64) {
        if self.committed.len() >= REMEMBERED_ROOMS && !self.committed.contains_key(room) {
            self.committed.clear();
        }
        match self.committed.get_mut(room) {
            Some(known) => *known = seq,
            None => {
                self.committed.insert(room.to_owned(), seq);
            }
        }
    }
}

/// Writes every append whose expectation holds, in one atomic batch made durable before this
/// returns; returns each one's result. Fails as a whole only when the batch fails, in which
/// case nothing was stored and `committed` is as it was.
fn commit_group(
    tables: &Tables,
    committed: &mut LastSeqs,
    group: &[(RoomAppend, AppendReply)],
) -> Result<Vec<Result<(), StoreError>>, StoreError> {
    let mut batch = tables.db.batch().durability(Some(PersistMode::SyncAll));
    let mut results = Vec::with_capacity(group.len());
    // A batch is not readable before it commits: the rooms' last seqs as this batch leaves them.
    let mut last_seqs: HashMap<&str, u64> = HashMap::new();
    for (append, _) in group {
        let actual = match last_seqs.get(append.room.as_str()) {
            Some(&seq) => seq,
            None => committed.get(&tables.messages, &append.room)?,
        };
        if actual != append.expected_last_seq {
            results.push(Err(StoreError::conflict(&append.room, append.expected_last_seq, actual)));
            continue;
        }
        for message in &append.messages {
            let json =
                serde_json::to_vec(message).map_err(|e| StoreError::corrupt("encode a message").with_source(e))?;
            let key = message_key(&message.room, message.seq);
            let dedupe_key = protocol::bus::dedupe_key(&message.room, &message.user, &message.client_msg_id);
            batch.insert(&tables.messages, key.clone(), json);
            batch.insert(&tables.dedupe, dedupe_key.into_bytes(), message.seq.to_be_bytes().to_vec());
            batch.insert(&tables.ids, message.id.as_u128().to_be_bytes().to_vec(), key);
        }
        let newest = append.messages.last().map_or(actual, |message| message.seq);
        last_seqs.insert(append.room.as_str(), newest);
        results.push(Ok(()));
    }
    batch.commit().map_err(unavailable)?;
    for (room, seq) in last_seqs {
        committed.remember(room, seq);
    }
    Ok(results)
}

#[async_trait]
impl HistoryStore for EmbeddedStore {
    async fn append(&self, batch: RoomAppend) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.writer.send((batch, reply)).await.map_err(|_| StoreError::unavailable("writer thread stopped"))?;
        answer.await.map_err(|_| StoreError::unavailable("writer thread stopped"))?
    }

    async fn last_seq(&self, room: &str) -> Result<u64, StoreError> {
        // Inline, as a dedupe check is: one step of a reverse range over the room's keys.
        last_seq_in(&self.tables.messages, room)
    }

    async fn find_by_client_msg_id(
        &self,
        room: &str,
        user: &str,
        client_msg_id: &str,
    ) -> Result<Option<ChatMessage>, StoreError> {
        let mut found = self.find_by_client_msg_ids(room, &[(user, client_msg_id)]).await?;
        Ok(found.pop().flatten())
    }

    async fn find_by_client_msg_ids(
        &self,
        room: &str,
        keys: &[(&str, &str)],
    ) -> Result<Vec<Option<ChatMessage>>, StoreError> {
        // Inline, not on the blocking pool: a send's dedupe check is a point read that a new
        // key answers from the memtables and the tables' in-memory filters, and the hop to a
        // pool thread and back cost more than the read.
        keys.iter()
            .map(|(user, id)| {
                let key = protocol::bus::dedupe_key(room, user, id);
                let Some(seq) = self.tables.dedupe.get(key.as_bytes()).map_err(unavailable)? else { return Ok(None) };
                message_at(&self.tables.messages, &message_key(room, seq_value(&seq)?))
            })
            .collect()
    }

    async fn page(&self, room: &str, query: PageQuery) -> Result<Page, StoreError> {
        let room = room.to_owned();
        self.read(move |tables| {
            let (seqs, has_more) = query.seq_range(last_seq_in(&tables.messages, &room)?);
            if seqs.is_empty() {
                return Ok(Page { messages: Vec::new(), has_more: false });
            }
            let rows = tables.messages.range(message_key(&room, *seqs.start())..=message_key(&room, *seqs.end()));
            let mut page = Vec::with_capacity((seqs.end() - seqs.start() + 1) as usize);
            for row in rows {
                page.push(decode(&row.value().map_err(unavailable)?)?);
            }
            Ok(Page { messages: page, has_more })
        })
        .await
    }

    async fn get_by_id(&self, id: Uuid) -> Result<Option<ChatMessage>, StoreError> {
        self.read(move |tables| {
            let Some(key) = tables.ids.get(id.as_u128().to_be_bytes()).map_err(unavailable)? else { return Ok(None) };
            message_at(&tables.messages, &key)
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        if self.writer.is_closed() {
            return Err(StoreError::unavailable("writer thread stopped"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_writer_remembers_a_bounded_number_of_rooms() {
        let mut last_seqs = LastSeqs::default();
        for room in 0..REMEMBERED_ROOMS {
            last_seqs.remember(&format!("room-{room}"), 7);
        }
        last_seqs.remember("room-0", 8);
        assert_eq!(last_seqs.committed.len(), REMEMBERED_ROOMS, "a known room is updated in place");
        assert_eq!(last_seqs.committed.get("room-0"), Some(&8));
        last_seqs.remember("one-more", 1);
        assert_eq!(last_seqs.committed.len(), 1, "a new room past the bound starts the memory afresh");
        assert_eq!(last_seqs.committed.get("one-more"), Some(&1));
    }
}
