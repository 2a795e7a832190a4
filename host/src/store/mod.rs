//! Where filters keep state: a key-value store with expiry and
//! compare-and-swap, behind the [`Store`] trait.
//!
//! Backends: [`MemoryStore`] (tests, throwaway runs), [`RedbStore`] (the
//! embedded default, one file) and [`RedisStore`] (shared by the MX hosts
//! of a farm). The trait is async so that a networked backend waits on the
//! network without blocking the runtime; adding one means adding a module
//! here and nothing in the engine.
//!
//! Time is given by the caller (`now`, Unix seconds), never read here, so the
//! expiry of records follows the same injected clock as the filter.

mod memory;
mod redb;
mod redis;

pub use self::memory::MemoryStore;
pub use self::redb::{Durability, RedbStore};
pub use self::redis::{RedisConfig, RedisStore};

use async_trait::async_trait;
use thiserror::Error;

/// A stored value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The value.
    pub value: Vec<u8>,
    /// Its version: never 0, different after every write of the key.
    pub version: u64,
    /// When it expires, Unix seconds.
    pub expires_at: u64,
}

/// The condition of a write or delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// Unconditional.
    Any,
    /// Only if the key is absent (or expired).
    Absent,
    /// Only if the key's current version is this one.
    Version(u64),
}

impl Condition {
    /// The WIT form: `none` = any, `some(0)` = absent, `some(v)` = version `v`.
    pub fn from_wit(v: Option<u64>) -> Condition {
        match v {
            None => Condition::Any,
            Some(0) => Condition::Absent,
            Some(v) => Condition::Version(v),
        }
    }

    /// True if a key whose live version is `current` (`None` = absent) meets it.
    pub fn holds(self, current: Option<u64>) -> bool {
        match self {
            Condition::Any => true,
            Condition::Absent => current.is_none(),
            Condition::Version(v) => current == Some(v),
        }
    }
}

/// The outcome of a conditional write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Written, with this new version.
    Written(u64),
    /// The condition did not hold; nothing was written.
    Conflict,
}

/// A store failure.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The backend failed or is unreachable.
    #[error("store backend: {0}")]
    Backend(String),
    /// The store could not be opened.
    #[error("cannot open store {path}: {reason}")]
    Open {
        /// What was opened.
        path: String,
        /// Why it failed.
        reason: String,
    },
}

/// A key-value store with expiry and compare-and-swap. Implementations are
/// shared by all filter instances and front ends (`Arc<dyn Store>`).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Reads `key`; expired entries (`expires_at <= now`) are absent.
    async fn get(&self, key: &str, now: u64) -> Result<Option<Entry>, StoreError>;

    /// Writes `key` if `cond` holds against its live entry, atomically.
    async fn set(&self, key: &str, value: &[u8], expires_at: u64, cond: Condition, now: u64) -> Result<WriteOutcome, StoreError>;

    /// Deletes `key` if `cond` holds; true if a live entry was deleted.
    async fn delete(&self, key: &str, cond: Condition, now: u64) -> Result<bool, StoreError>;

    /// Removes entries expired at `now`; returns how many.
    async fn sweep(&self, now: u64) -> Result<u64, StoreError>;

    /// Makes every completed write durable (no-op where writes already are).
    async fn flush(&self) -> Result<(), StoreError>;

    /// One page of live entries, for copying a store (`greyhook db
    /// migrate`): at most about `limit` entries from `cursor` (`None` = the
    /// start), and the cursor of the next page (`None` at the end). Entries
    /// written during a scan may or may not be seen.
    async fn scan(&self, cursor: Option<String>, limit: usize, now: u64) -> Result<Page, StoreError>;

    /// Live entries whose key starts with `prefix` (a filter's namespace,
    /// for its record budget, counted once a minute in the background), or
    /// `None` where the backend cannot count (the default for a new
    /// backend: the budget is then not enforced).
    async fn count_prefix(&self, prefix: &str, now: u64) -> Result<Option<u64>, StoreError> {
        let _ = (prefix, now);
        Ok(None)
    }

    /// Calls that failed in the backend since start (for `greyhook status`).
    fn failures(&self) -> u64 {
        0
    }

    /// Whether the backend is degraded: records it could not write wait
    /// in memory (for `greyhook status`).
    fn degraded(&self) -> bool {
        false
    }
}

/// A page of [`Store::scan`].
#[derive(Debug, Default)]
pub struct Page {
    /// Keys and entries.
    pub entries: Vec<(String, Entry)>,
    /// Where the next page starts; `None` at the end.
    pub next: Option<String>,
}
