//! Counted places per key (client address, user): a place is taken while under the cap and
//! given back when its [`Slot`] is dropped.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};

/// How many places each key holds.
pub struct Counts<K> {
    open: Arc<Mutex<HashMap<K, usize>>>,
}

impl<K> Default for Counts<K> {
    fn default() -> Self {
        Self { open: Arc::default() }
    }
}

/// One place of `key`, given back on drop.
pub struct Slot<K: Hash + Eq> {
    key: K,
    open: Arc<Mutex<HashMap<K, usize>>>,
}

impl<K: Hash + Eq + Clone> Counts<K> {
    /// A place for `key`, unless it already holds `max`.
    pub fn take(&self, key: &K, max: usize) -> Option<Slot<K>> {
        let mut open = lock(&self.open);
        let held = open.entry(key.clone()).or_default();
        if *held >= max {
            return None;
        }
        *held += 1;
        Some(Slot { key: key.clone(), open: self.open.clone() })
    }
}

impl<K: Hash + Eq> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut open = lock(&self.open);
        if let Some(held) = open.get_mut(&self.key) {
            *held -= 1;
            if *held == 0 {
                open.remove(&self.key);
            }
        }
    }
}

fn lock<K>(open: &Mutex<HashMap<K, usize>>) -> MutexGuard<'_, HashMap<K, usize>> {
    open.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_counts_until_dropped() {
        let counts = Counts::default();
        let first = counts.take(&"a", 2);
        let second = counts.take(&"a", 2);
        assert!(first.is_some() && second.is_some());
        assert!(counts.take(&"a", 2).is_none(), "a third place for the key is refused");
        assert!(counts.take(&"b", 2).is_some(), "another key is not");
        drop(first);
        assert!(counts.take(&"a", 2).is_some(), "a dropped slot gives its place back");
    }
}
