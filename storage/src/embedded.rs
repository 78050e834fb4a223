//! The embedded store: one redb file, ACID and fsync'd on every commit.
//!
//! Appends go to a single writer thread that commits everything queued in one transaction,
//! so under load many messages share one fsync (group commit), while a lone message is still
//! durable before its caller hears back.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use protocol::ChatMessage;
use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::{HistoryStore, Page, PageQuery, RoomAppend, StoreError};

/// (room, seq) → message JSON.
const MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("messages");
/// dedupe key (room/user/client_msg_id) → seq.
const DEDUPE: TableDefinition<&str, u64> = TableDefinition::new("dedupe");
/// message id → (room, seq).
const IDS: TableDefinition<u128, (&str, u64)> = TableDefinition::new("ids");

/// Most appends committed in one transaction.
const MAX_GROUP: usize = 1024;

type AppendReply = oneshot::Sender<Result<(), StoreError>>;

/// History in a redb file.
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    writer: mpsc::Sender<(RoomAppend, AppendReply)>,
}

impl EmbeddedStore {
    /// Opens (or creates) the store at `dir/history.redb` and starts its writer thread.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::unavailable(format!("create {}: {e}", dir.display())))?;
        let path = dir.join("history.redb");
        let db =
            Database::create(&path).map_err(|e| StoreError::unavailable(format!("open {}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(unavailable)?;
        {
            txn.open_table(MESSAGES).map_err(unavailable)?;
            txn.open_table(DEDUPE).map_err(unavailable)?;
            txn.open_table(IDS).map_err(unavailable)?;
        }
        txn.commit().map_err(unavailable)?;
        let db = Arc::new(db);
        let (writer, queue) = mpsc::channel(MAX_GROUP * 4);
        let writer_db = db.clone();
        std::thread::Builder::new()
            .name("redb-writer".into())
            .spawn(move || write_loop(&writer_db, queue))
            .map_err(|e| StoreError::unavailable(format!("spawn writer thread: {e}")))?;
        Ok(Self { db, writer })
    }

    fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, StoreError> + Send + 'static,
    ) -> impl std::future::Future<Output = Result<T, StoreError>> {
        let db = self.db.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let txn = db.begin_read().map_err(unavailable)?;
                f(&txn)
            })
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

fn last_seq_in<T: ReadableTable<(&'static str, u64), &'static [u8]>>(table: &T, room: &str) -> Result<u64, StoreError> {
    let last = table.range((room, 0)..=(room, u64::MAX)).map_err(unavailable)?.next_back();
    match last {
        Some(entry) => Ok(entry.map_err(unavailable)?.0.value().1),
        None => Ok(0),
    }
}

/// The writer thread: drain what is queued, commit it in one transaction, answer each caller.
fn write_loop(db: &Database, mut queue: mpsc::Receiver<(RoomAppend, AppendReply)>) {
    while let Some(first) = queue.blocking_recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
        match commit_group(db, &group) {
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

/// Writes every append whose expectation holds; returns each one's result. Fails as a whole
/// only when the transaction itself fails, in which case nothing was stored.
fn commit_group(db: &Database, group: &[(RoomAppend, AppendReply)]) -> Result<Vec<Result<(), StoreError>>, StoreError> {
    let txn = db.begin_write().map_err(unavailable)?;
    let mut results = Vec::with_capacity(group.len());
    {
        let mut messages = txn.open_table(MESSAGES).map_err(unavailable)?;
        let mut dedupe = txn.open_table(DEDUPE).map_err(unavailable)?;
        let mut ids = txn.open_table(IDS).map_err(unavailable)?;
        for (append, _) in group {
            let actual = last_seq_in(&messages, &append.room)?;
            if actual != append.expected_last_seq {
                results.push(Err(StoreError::conflict(&append.room, append.expected_last_seq, actual)));
                continue;
            }
            for message in &append.messages {
                let json =
                    serde_json::to_vec(message).map_err(|e| StoreError::corrupt("encode a message").with_source(e))?;
                messages.insert((message.room.as_str(), message.seq), json.as_slice()).map_err(unavailable)?;
                let key = protocol::bus::dedupe_key(&message.room, &message.user, &message.client_msg_id);
                dedupe.insert(key.as_str(), message.seq).map_err(unavailable)?;
                ids.insert(message.id.as_u128(), (message.room.as_str(), message.seq)).map_err(unavailable)?;
            }
            results.push(Ok(()));
        }
    }
    txn.commit().map_err(unavailable)?;
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
        let room = room.to_owned();
        self.read(move |txn| last_seq_in(&txn.open_table(MESSAGES).map_err(unavailable)?, &room)).await
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
        let room = room.to_owned();
        let keys: Vec<String> = keys.iter().map(|(user, id)| protocol::bus::dedupe_key(&room, user, id)).collect();
        self.read(move |txn| {
            let dedupe = txn.open_table(DEDUPE).map_err(unavailable)?;
            let messages = txn.open_table(MESSAGES).map_err(unavailable)?;
            keys.iter()
                .map(|key| {
                    let Some(seq) = dedupe.get(key.as_str()).map_err(unavailable)? else { return Ok(None) };
                    let found = messages.get((room.as_str(), seq.value())).map_err(unavailable)?;
                    found.map(|bytes| decode(bytes.value())).transpose()
                })
                .collect()
        })
        .await
    }

    async fn page(&self, room: &str, query: PageQuery) -> Result<Page, StoreError> {
        let room = room.to_owned();
        self.read(move |txn| {
            let messages = txn.open_table(MESSAGES).map_err(unavailable)?;
            let (seqs, has_more) = query.seq_range(last_seq_in(&messages, &room)?);
            if seqs.is_empty() {
                return Ok(Page { messages: Vec::new(), has_more: false });
            }
            let rows =
                messages.range((room.as_str(), *seqs.start())..=(room.as_str(), *seqs.end())).map_err(unavailable)?;
            let mut page = Vec::with_capacity((seqs.end() - seqs.start() + 1) as usize);
            for row in rows {
                page.push(decode(row.map_err(unavailable)?.1.value())?);
            }
            Ok(Page { messages: page, has_more })
        })
        .await
    }

    async fn get_by_id(&self, id: Uuid) -> Result<Option<ChatMessage>, StoreError> {
        self.read(move |txn| {
            let ids = txn.open_table(IDS).map_err(unavailable)?;
            let Some(location) = ids.get(id.as_u128()).map_err(unavailable)? else { return Ok(None) };
            let (room, seq) = location.value();
            let messages = txn.open_table(MESSAGES).map_err(unavailable)?;
            let found = messages.get((room, seq)).map_err(unavailable)?;
            found.map(|bytes| decode(bytes.value())).transpose()
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
