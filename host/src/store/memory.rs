//! An in-memory store: for tests and throwaway runs; lost on exit.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;

use super::{Condition, Entry, Page, Store, StoreError, WriteOutcome};

/// An in-memory [`Store`].
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<String, Entry>,
    last_version: u64,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the map half-written
        // (every update is a single insert or remove), so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many entries (live or not yet swept) it holds.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// True if it holds no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn live(e: Option<&Entry>, now: u64) -> Option<&Entry> {
    e.filter(|e| e.expires_at > now)
}

#[async_trait]
impl Store for MemoryStore {
    async fn get(&self, key: &str, now: u64) -> Result<Option<Entry>, StoreError> {
        Ok(live(self.lock().map.get(key), now).cloned())
    }

    async fn set(&self, key: &str, value: &[u8], expires_at: u64, cond: Condition, now: u64) -> Result<WriteOutcome, StoreError> {
        let mut g = self.lock();
        if !cond.holds(live(g.map.get(key), now).map(|e| e.version)) {
            return Ok(WriteOutcome::Conflict);
        }
        g.last_version += 1;
        let version = g.last_version;
        g.map.insert(key.to_string(), Entry { value: value.to_vec(), version, expires_at });
        Ok(WriteOutcome::Written(version))
    }

    async fn delete(&self, key: &str, cond: Condition, now: u64) -> Result<bool, StoreError> {
        let mut g = self.lock();
        let cur = live(g.map.get(key), now).map(|e| e.version);
        if !cond.holds(cur) {
            return Ok(false);
        }
        Ok(g.map.remove(key).is_some() && cur.is_some())
    }

    async fn sweep(&self, now: u64) -> Result<u64, StoreError> {
        let mut g = self.lock();
        let before = g.map.len();
        g.map.retain(|_, e| e.expires_at > now);
        Ok((before - g.map.len()) as u64)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn count_prefix(&self, prefix: &str, now: u64) -> Result<Option<u64>, StoreError> {
        let g = self.lock();
        Ok(Some(g.map.iter().filter(|(k, e)| k.starts_with(prefix) && live(Some(*e), now).is_some()).count() as u64))
    }

    async fn scan(&self, cursor: Option<String>, limit: usize, now: u64) -> Result<Page, StoreError> {
        let g = self.lock();
        let mut keys: Vec<&String> = g.map.keys().filter(|k| cursor.as_ref().is_none_or(|c| *k > c)).collect();
        keys.sort();
        let limit = limit.max(1);
        let next = (keys.len() > limit).then(|| keys[limit - 1].clone());
        let entries = keys.into_iter().take(limit).filter_map(|k| live(g.map.get(k), now).map(|e| (k.clone(), e.clone()))).collect();
        Ok(Page { entries, next })
    }
}

/// Opens the `memory` backend (see [`super::BACKENDS`]).
pub(super) fn open(_path: &str, _config: &super::StoreConfig) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    Ok(std::sync::Arc::new(MemoryStore::new()))
}
