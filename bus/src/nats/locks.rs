//! Named locks every process on one NATS shares: a lock is a key of the `chat_room_locks`
//! key-value bucket, taken by creating it (one create wins) and released by deleting it.
//! Nothing in the message path takes them; the fault layer's `fanout.lock` does, so that two
//! workers can hold what the other waits for (the lab's deadlock across processes).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{kv, stream};
use tokio::sync::OnceCell;

use super::{unavailable, NatsBus};
use crate::BusError;

/// The bucket holding the locks.
const BUCKET: &str = "chat_room_locks";
/// How often a waiter tries again to take a lock that is held.
const RETRY: Duration = Duration::from_millis(50);

/// The shared locks of one process (see the module docs); cheap to clone.
#[derive(Clone)]
pub struct SharedLocks {
    bus: Arc<NatsBus>,
    bucket: Arc<OnceCell<kv::Store>>,
}

/// A shared lock held; released (its key deleted) when dropped.
pub struct SharedLockGuard {
    bucket: kv::Store,
    key: String,
    revision: u64,
}

impl NatsBus {
    /// The locks this process shares with every other on this NATS (the bucket is created on
    /// first use).
    pub fn shared_locks(self: &Arc<Self>) -> SharedLocks {
        SharedLocks { bus: self.clone(), bucket: Arc::new(OnceCell::new()) }
    }
}

impl SharedLocks {
    async fn bucket(&self) -> Result<&kv::Store, BusError> {
        self.bucket
            .get_or_try_init(|| async {
                let js = &self.bus.js;
                // The bucket's stream, laid out as a key-value bucket is. Created directly:
                // async-nats's `create_key_value` first reads the account's info, which it cannot
                // parse from nats-server 2.9.
                js.get_or_create_stream(stream::Config {
                    name: format!("KV_{BUCKET}"),
                    subjects: vec![format!("$KV.{BUCKET}.>")],
                    max_messages_per_subject: 1,
                    discard: stream::DiscardPolicy::New,
                    allow_rollup: true,
                    deny_delete: true,
                    allow_direct: true,
                    ..Default::default()
                })
                .await
                .map_err(|e| unavailable("create the shared locks bucket", e))?;
                js.get_key_value(BUCKET).await.map_err(|e| unavailable("open the shared locks bucket", e))
            })
            .await
    }

    /// Takes the lock `name` if nobody holds it; `None` when somebody does.
    pub async fn try_lock(&self, name: &str) -> Result<Option<SharedLockGuard>, BusError> {
        let bucket = self.bucket().await?;
        let key = lock_key(name);
        match bucket.create(&key, self.bus.config.name.clone().into()).await {
            Ok(revision) => Ok(Some(SharedLockGuard { bucket: bucket.clone(), key, revision })),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(unavailable(&format!("take the shared lock {name}"), e)),
        }
    }

    /// Takes the lock `name`, waiting for as long as somebody holds it (and trying again while
    /// NATS cannot be reached).
    pub async fn lock(&self, name: &str) -> SharedLockGuard {
        loop {
            match self.try_lock(name).await {
                Ok(Some(guard)) => return guard,
                Ok(None) => {}
                Err(e) => tracing::warn!(lock = name, error = %e, "cannot take a shared lock yet"),
            }
            tokio::time::sleep(RETRY).await;
        }
    }
}

impl Drop for SharedLockGuard {
    fn drop(&mut self) {
        let (bucket, key, revision) = (self.bucket.clone(), std::mem::take(&mut self.key), self.revision);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = bucket.delete_expect_revision(&key, Some(revision)).await {
                    tracing::warn!(key, error = %e, "could not release a shared lock");
                }
            });
        }
    }
}

/// The bucket key of lock `name`: its bytes where a key allows them (letters, digits, `-`, `_`,
/// `.`, `/`), any other byte as `=XX`.
fn lock_key(name: &str) -> String {
    let mut key = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'/') {
            key.push(char::from(byte));
        } else {
            key.push_str(&format!("={byte:02X}"));
        }
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_keys_keep_plain_names_and_escape_the_rest() {
        assert_eq!(lock_key("room-lock.lab-r3"), "room-lock.lab-r3");
        assert_eq!(lock_key("a b:é"), "a=20b=3A=C3=A9");
    }
}
