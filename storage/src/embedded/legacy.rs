//! Importing history from the redb file that earlier versions of the embedded store kept in
//! the same data directory (`history.redb`), so an upgraded all-in-one keeps its rooms.
//!
//! Runs when the store opens. Every row of the three redb tables is copied as it is into the
//! matching keyspace, in durable batches; then the file is renamed to `history.redb.imported`
//! (kept, not deleted). An import cut short is simply done again on the next open: rows land
//! under the same keys.

use std::path::Path;

use fjall::PersistMode;
use redb::{Database, ReadableTable, TableDefinition};

use super::{message_key, unavailable, Tables};
use crate::StoreError;

/// The redb store's file, in the data directory.
pub(super) const FILE: &str = "history.redb";
/// What the file is renamed to once imported.
const IMPORTED: &str = "history.redb.imported";
/// Rows per durable batch.
const ROWS_PER_BATCH: usize = 10_000;

/// (room, seq) → message JSON.
pub(super) const MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("messages");
/// dedupe key (room/user/client_msg_id) → seq.
pub(super) const DEDUPE: TableDefinition<&str, u64> = TableDefinition::new("dedupe");
/// message id → (room, seq).
pub(super) const IDS: TableDefinition<u128, (&str, u64)> = TableDefinition::new("ids");

/// Imports `dir/history.redb` into `tables` when there is one.
pub(super) fn import(dir: &Path, tables: &Tables) -> Result<(), StoreError> {
    let path = dir.join(FILE);
    if !path.exists() {
        return Ok(());
    }
    let failed = |what: &str| format!("import {}: {what}", path.display());
    let db = Database::open(&path).map_err(|e| StoreError::unavailable(failed("open")).with_source(e))?;
    let txn = db.begin_read().map_err(|e| StoreError::unavailable(failed("read")).with_source(e))?;
    let mut copied = Copier::new(tables);
    let messages = txn.open_table(MESSAGES).map_err(|e| StoreError::unavailable(failed("messages")).with_source(e))?;
    for row in messages.iter().map_err(unavailable)? {
        let (key, json) = row.map_err(unavailable)?;
        let (room, seq) = key.value();
        copied.put(&tables.messages, message_key(room, seq), json.value().to_vec())?;
    }
    let dedupe = txn.open_table(DEDUPE).map_err(|e| StoreError::unavailable(failed("dedupe")).with_source(e))?;
    for row in dedupe.iter().map_err(unavailable)? {
        let (key, seq) = row.map_err(unavailable)?;
        copied.put(&tables.dedupe, key.value().as_bytes().to_vec(), seq.value().to_be_bytes().to_vec())?;
    }
    let ids = txn.open_table(IDS).map_err(|e| StoreError::unavailable(failed("ids")).with_source(e))?;
    for row in ids.iter().map_err(unavailable)? {
        let (id, location) = row.map_err(unavailable)?;
        let (room, seq) = location.value();
        copied.put(&tables.ids, id.value().to_be_bytes().to_vec(), message_key(room, seq))?;
    }
    let rows = copied.finish()?;
    drop((messages, dedupe, ids, txn, db));
    std::fs::rename(&path, dir.join(IMPORTED))
        .map_err(|e| StoreError::unavailable(failed("rename after import")).with_source(e))?;
    tracing::info!(path = %path.display(), rows, "imported the redb history into the embedded store");
    Ok(())
}

/// Writes rows in durable batches of [`ROWS_PER_BATCH`].
struct Copier<'a> {
    tables: &'a Tables,
    batch: fjall::OwnedWriteBatch,
    in_batch: usize,
    rows: usize,
}

impl<'a> Copier<'a> {
    fn new(tables: &'a Tables) -> Self {
        Self { tables, batch: Self::batch(tables), in_batch: 0, rows: 0 }
    }

    fn batch(tables: &Tables) -> fjall::OwnedWriteBatch {
        tables.db.batch().durability(Some(PersistMode::SyncAll))
    }

    fn put(&mut self, keyspace: &fjall::Keyspace, key: Vec<u8>, value: Vec<u8>) -> Result<(), StoreError> {
        self.batch.insert(keyspace, key, value);
        self.in_batch += 1;
        self.rows += 1;
        if self.in_batch == ROWS_PER_BATCH {
            std::mem::replace(&mut self.batch, Self::batch(self.tables)).commit().map_err(unavailable)?;
            self.in_batch = 0;
        }
        Ok(())
    }

    /// Commits the last batch; returns how many rows were copied.
    fn finish(self) -> Result<usize, StoreError> {
        self.batch.commit().map_err(unavailable)?;
        Ok(self.rows)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use protocol::ChatMessage;
    use uuid::Uuid;

    use super::*;
    use crate::embedded::EmbeddedStore;
    use crate::{HistoryStore, PageQuery, RoomAppend};

    fn message(room: &str, seq: u64) -> ChatMessage {
        ChatMessage {
            room: room.into(),
            seq,
            id: Uuid::now_v7(),
            user: "ann".into(),
            body: format!("message {seq}"),
            ts: 1_700_000_000_000 + seq as i64,
            client_msg_id: format!("c-{seq}"),
            trace_id: format!("{seq:032x}"),
            prev: None,
            digest: None,
        }
    }

    /// Writes `messages` as the redb store did: its three tables in `dir/history.redb`.
    fn write_redb(dir: &Path, messages: &[ChatMessage]) {
        let db = Database::create(dir.join(FILE)).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut rows = txn.open_table(MESSAGES).unwrap();
            let mut dedupe = txn.open_table(DEDUPE).unwrap();
            let mut ids = txn.open_table(IDS).unwrap();
            for m in messages {
                rows.insert((m.room.as_str(), m.seq), serde_json::to_vec(m).unwrap().as_slice()).unwrap();
                let key = protocol::bus::dedupe_key(&m.room, &m.user, &m.client_msg_id);
                dedupe.insert(key.as_str(), m.seq).unwrap();
                ids.insert(m.id.as_u128(), (m.room.as_str(), m.seq)).unwrap();
            }
        }
        txn.commit().unwrap();
    }

    /// An all-in-one upgraded from the redb store keeps its rooms: messages, seqs, dedupe and
    /// ids, in rooms whose names prefix one another, and goes on from the imported seqs.
    #[tokio::test]
    async fn a_redb_data_directory_is_imported_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let old: Vec<ChatMessage> =
            [("query", 1), ("query", 2), ("query", 3), ("query-2", 1)].iter().map(|&(r, s)| message(r, s)).collect();
        write_redb(dir.path(), &old);

        let store = EmbeddedStore::open(dir.path()).unwrap();
        assert!(!dir.path().join(FILE).exists(), "the redb file is renamed once imported");
        assert!(dir.path().join(IMPORTED).exists(), "and kept");
        assert_eq!(store.last_seq("query").await.unwrap(), 3);
        assert_eq!(store.last_seq("query-2").await.unwrap(), 1);
        let page = store.page("query", PageQuery::newest(10)).await.unwrap();
        assert_eq!(page.messages, old[..3].to_vec());
        assert_eq!(store.get_by_id(old[3].id).await.unwrap(), Some(old[3].clone()));
        assert_eq!(store.find_by_client_msg_id("query", "ann", "c-2").await.unwrap(), Some(old[1].clone()));

        let stale = RoomAppend { room: "query".into(), expected_last_seq: 2, messages: vec![message("query", 3)] };
        assert!(store.append(stale).await.unwrap_err().is_conflict());
        let next = message("query", 4);
        store
            .append(RoomAppend { room: "query".into(), expected_last_seq: 3, messages: vec![next.clone()] })
            .await
            .unwrap();
        assert_eq!(store.get_by_id(next.id).await.unwrap(), Some(next));
    }
}
