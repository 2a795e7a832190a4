//! The embedded default store: one redb file.
//!
//! Durability: with [`Durability::Immediate`] every write is fsynced before
//! the filter's call returns (safest, about a millisecond a write on most
//! disks). With [`Durability::Periodic`] (the default) writes are committed
//! without fsync and [`Store::flush`] (called every second by the daemon's
//! housekeeping, and at shutdown) makes them durable: a power cut loses at
//! most the last second of greylist records, which only means those clients
//! are greylisted once more. A process crash loses nothing either way.
//! redb keeps the file consistent in both modes.

use std::path::Path;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Condition, Entry, Store, StoreError, WriteOutcome};

/// key → version (8 bytes LE) ‖ expires_at (8 bytes LE) ‖ value.
const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");
/// (expires_at, key) → (): the expiry index the sweeper walks.
const EXPIRY: TableDefinition<(u64, &str), ()> = TableDefinition::new("expiry");
/// "last_version" → the last version handed out.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// How writes reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// fsync on every write.
    Immediate,
    /// fsync on [`Store::flush`] (every second in the daemon).
    #[default]
    Periodic,
}

/// A [`Store`] in a redb file.
pub struct RedbStore {
    db: Database,
    durability: Durability,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore").field("durability", &self.durability).finish()
    }
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn decode(b: &[u8]) -> Option<Entry> {
    let version = u64::from_le_bytes(b.get(..8)?.try_into().ok()?);
    let expires_at = u64::from_le_bytes(b.get(8..16)?.try_into().ok()?);
    Some(Entry { value: b[16..].to_vec(), version, expires_at })
}

fn encode(version: u64, expires_at: u64, value: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + value.len());
    b.extend_from_slice(&version.to_le_bytes());
    b.extend_from_slice(&expires_at.to_le_bytes());
    b.extend_from_slice(value);
    b
}

impl RedbStore {
    /// Opens (creating if needed) the store at `path`. Fails if another
    /// process has it open.
    pub fn open(path: &Path, durability: Durability) -> Result<RedbStore, StoreError> {
        let open_err = |e: &dyn std::fmt::Display| StoreError::Open { path: path.display().to_string(), reason: e.to_string() };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| open_err(&e))?;
        }
        let db = Database::create(path).map_err(|e| open_err(&e))?;
        let txn = db.begin_write().map_err(|e| open_err(&e))?;
        {
            txn.open_table(RECORDS).map_err(|e| open_err(&e))?;
            txn.open_table(EXPIRY).map_err(|e| open_err(&e))?;
            txn.open_table(META).map_err(|e| open_err(&e))?;
        }
        txn.commit().map_err(|e| open_err(&e))?;
        Ok(RedbStore { db, durability })
    }

    /// Runs one write transaction; `f` returns whether to commit it, and a result.
    fn write<T>(&self, f: impl FnOnce(&redb::WriteTransaction) -> Result<(bool, T), StoreError>) -> Result<T, StoreError> {
        let run = || {
            let mut txn = self.db.begin_write().map_err(backend)?;
            if self.durability == Durability::Periodic {
                txn.set_durability(redb::Durability::None).map_err(backend)?;
            }
            let (commit, v) = f(&txn)?;
            if commit {
                txn.commit().map_err(backend)?;
            } else {
                txn.abort().map_err(backend)?;
            }
            Ok(v)
        };
        // An fsync per write must not stall the async runtime's worker.
        match (self.durability, tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor())) {
            (Durability::Immediate, Ok(tokio::runtime::RuntimeFlavor::MultiThread)) => tokio::task::block_in_place(run),
            _ => run(),
        }
    }

    /// Writes or deletes under `cond`: `value` `None` deletes.
    fn update(&self, key: &str, value: Option<(&[u8], u64)>, cond: Condition, now: u64) -> Result<Option<u64>, StoreError> {
        self.write(|txn| {
            let mut rec = txn.open_table(RECORDS).map_err(backend)?;
            let mut exp = txn.open_table(EXPIRY).map_err(backend)?;
            let old = rec.get(key).map_err(backend)?.and_then(|g| decode(g.value()));
            let live = old.as_ref().filter(|e| e.expires_at > now).map(|e| e.version);
            if !cond.holds(live) {
                return Ok((false, None));
            }
            if let Some(o) = &old {
                exp.remove((o.expires_at, key)).map_err(backend)?;
            }
            match value {
                Some((value, expires_at)) => {
                    let mut meta = txn.open_table(META).map_err(backend)?;
                    let version = meta.get("last_version").map_err(backend)?.map_or(0, |g| g.value()) + 1;
                    meta.insert("last_version", version).map_err(backend)?;
                    rec.insert(key, encode(version, expires_at, value).as_slice()).map_err(backend)?;
                    exp.insert((expires_at, key), ()).map_err(backend)?;
                    Ok((true, Some(version)))
                }
                None => {
                    rec.remove(key).map_err(backend)?;
                    Ok((true, live))
                }
            }
        })
    }
}

#[async_trait]
impl Store for RedbStore {
    async fn get(&self, key: &str, now: u64) -> Result<Option<Entry>, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let table = txn.open_table(RECORDS).map_err(backend)?;
        let entry = table.get(key).map_err(backend)?.and_then(|g| decode(g.value()));
        Ok(entry.filter(|e| e.expires_at > now))
    }

    async fn set(&self, key: &str, value: &[u8], expires_at: u64, cond: Condition, now: u64) -> Result<WriteOutcome, StoreError> {
        Ok(match self.update(key, Some((value, expires_at)), cond, now)? {
            Some(v) => WriteOutcome::Written(v),
            None => WriteOutcome::Conflict,
        })
    }

    async fn delete(&self, key: &str, cond: Condition, now: u64) -> Result<bool, StoreError> {
        Ok(self.update(key, None, cond, now)?.is_some())
    }

    async fn sweep(&self, now: u64) -> Result<u64, StoreError> {
        // At most this many a transaction, so a large backlog does not hold
        // the write lock for long.
        const BATCH: usize = 10_000;
        let mut total = 0;
        loop {
            let n = self.write(|txn| {
                let mut rec = txn.open_table(RECORDS).map_err(backend)?;
                let mut exp = txn.open_table(EXPIRY).map_err(backend)?;
                let mut due = Vec::new();
                for item in exp.range((0u64, "")..=(now, "\u{10FFFF}")).map_err(backend)?.take(BATCH) {
                    let (k, _) = item.map_err(backend)?;
                    let (at, key) = k.value();
                    due.push((at, key.to_string()));
                }
                for (at, key) in &due {
                    exp.remove((*at, key.as_str())).map_err(backend)?;
                    let stale =
                        rec.get(key.as_str()).map_err(backend)?.and_then(|g| decode(g.value())).is_some_and(|e| e.expires_at == *at);
                    if stale {
                        rec.remove(key.as_str()).map_err(backend)?;
                    }
                }
                Ok((true, due.len()))
            })?;
            total += n as u64;
            if n < BATCH {
                return Ok(total);
            }
        }
    }

    async fn flush(&self) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(backend)?;
        txn.commit().map_err(backend)
    }
}
