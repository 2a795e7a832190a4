//! Where filters keep state: a key-value store with expiry and
//! compare-and-swap, behind the [`Store`] trait.
//!
//! Backends: [`MemoryStore`] (tests, throwaway runs), [`RedbStore`] (the
//! embedded default, one file) and [`RedisStore`] (shared by the MX hosts
//! of a farm). The trait is async so that a networked backend waits on the
//! network without blocking the runtime.
//!
//! **Adding a backend** is one module here and one line in [`BACKENDS`]:
//! the URL schemes it answers to in `[store] path` (or `--db`) and how it
//! opens from the `[store]` table ([`StoreConfig`]).
//!
//! Time is given by the caller (`now`, Unix seconds), never read here, so the
//! expiry of records follows the same injected clock as the filter.

mod keyfilter;
mod memory;
mod metered;
mod redb;
mod redis;

pub use self::memory::MemoryStore;
pub use self::metered::Metered;
pub use self::redb::{CHECK_AT_OPEN_MAX_BYTES, DEFAULT_CACHE_BYTES, Durability, RedbOptions, RedbStore};
pub use self::redis::{RedisConfig, RedisStore, RedisTls, SentinelAuth};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

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

/// One write of [`Store::set_many`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    /// The key (namespaced).
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// When it expires, Unix seconds.
    pub expires_at: u64,
    /// The condition.
    pub cond: Condition,
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

    /// Reads several keys; the answers in the order of `keys`. A networked
    /// backend answers in one round trip; the default asks one by one.
    async fn get_many(&self, keys: &[String], now: u64) -> Result<Vec<Option<Entry>>, StoreError> {
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            out.push(self.get(k, now).await?);
        }
        Ok(out)
    }

    /// Writes several keys, each under its own condition (not atomic
    /// across keys); the outcomes in order. A networked backend answers in
    /// one round trip; the default writes one by one.
    async fn set_many(&self, writes: &[Write], now: u64) -> Result<Vec<WriteOutcome>, StoreError> {
        let mut out = Vec::with_capacity(writes.len());
        for w in writes {
            out.push(self.set(&w.key, &w.value, w.expires_at, w.cond, now).await?);
        }
        Ok(out)
    }

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
    /// backend: the budget is then not enforced). For the empty prefix a
    /// backend may answer from its table's size without walking it, expired
    /// records not yet swept included (the daemon counts right after a
    /// sweep, for `status` and `greyhook_store_records`).
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

/// A store backend: the `[store] path` forms it answers to, and how it
/// opens from the `[store]` table.
pub struct Backend {
    /// Its name in the log.
    pub name: &'static str,
    /// The prefixes of `path` it answers to (`redis://`, `memory`).
    pub schemes: &'static [&'static str],
    /// Opens it; `path` is the whole `[store] path`.
    pub open: OpenFn,
}

/// How a [`Backend`] opens: the whole `[store] path` and the table.
pub type OpenFn = fn(path: &str, config: &StoreConfig) -> Result<Arc<dyn Store>, StoreError>;

/// Every backend but the default (a redb file: any `path` no scheme here
/// matches), in the order they are tried.
pub const BACKENDS: &[Backend] = &[
    Backend { name: "memory", schemes: &["memory"], open: memory::open },
    Backend {
        name: "redis",
        schemes: &[
            "redis://",
            "rediss://",
            "redis+unix://",
            "redis+cluster://",
            "rediss+cluster://",
            "redis+sentinel://",
            "rediss+sentinel://",
        ],
        open: redis::open,
    },
];

/// The largest `[store] cache_mib` (64 GiB): a larger figure is a typo,
/// not a cache.
const MAX_CACHE_MIB: u64 = 64 << 10;

/// The `[store]` table: which backend and its settings.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// The redb file (default: [`default_db_path`]), `memory` for a store
    /// that is lost on exit, or a `redis://` URL (see [`BACKENDS`]).
    pub path: Option<String>,
    /// How often expired records are swept.
    #[serde(deserialize_with = "crate::settings::duration")]
    pub sweep_interval: Duration,
    /// redb: `periodic` (written and fsynced every second) or `immediate`
    /// (every write).
    pub durability: Durability,
    /// redb: files up to this many MiB are checked in full (every page's
    /// checksum, every record) before greyhook serves; a larger one opens
    /// at once and is read through in the background, so that a restart
    /// stays quick at millions of records.
    pub check_at_open_mib: u64,
    /// redb: the page cache in MiB, which bounds the memory the file's
    /// pages take (default [`DEFAULT_CACHE_BYTES`]; redb's own is 1 GiB).
    pub cache_mib: u64,
    /// Redis: put before every key (several deployments on one server).
    pub prefix: String,
    /// Redis: the bound of every store call (1 ms to 30 s).
    #[serde(deserialize_with = "crate::settings::duration")]
    pub timeout: Duration,
    /// Redis over TLS (`rediss://`, `rediss+cluster://`): the CA file the
    /// server's certificate must chain to (default: the system's roots).
    pub tls_ca: Option<PathBuf>,
    /// Redis over TLS: the client certificate to present (with `tls_key`).
    pub tls_cert: Option<PathBuf>,
    /// Redis over TLS: the client certificate's key.
    pub tls_key: Option<PathBuf>,
    /// Redis Sentinel: the ACL user the sentinels require (with
    /// `sentinel_password`; default: none).
    pub sentinel_user: Option<String>,
    /// Redis Sentinel: the password the sentinels require of their own
    /// clients (their `requirepass`; default: none). The master's is the
    /// URL's.
    pub sentinel_password: Option<String>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        let r = RedisConfig::new("");
        StoreConfig {
            path: None,
            durability: Durability::Periodic,
            sweep_interval: Duration::from_secs(60),
            check_at_open_mib: self::redb::CHECK_AT_OPEN_MAX_BYTES >> 20,
            cache_mib: (DEFAULT_CACHE_BYTES >> 20) as u64,
            prefix: r.prefix,
            timeout: r.timeout,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            sentinel_user: None,
            sentinel_password: None,
        }
    }
}

impl StoreConfig {
    /// Opens the store this table names: the backend whose scheme `path`
    /// starts with, else a redb file (the default path if unset).
    pub fn open(&self) -> Result<Arc<dyn Store>, StoreError> {
        let path = self.path.as_deref().unwrap_or_default();
        let backend = self.backend();
        if (self.tls().is_set() || self.sentinel_auth().is_set()) && backend.is_none_or(|b| b.name != "redis") {
            // TLS files and sentinel credentials name a Redis store: set
            // with a file (or memory), the farm an operator meant would
            // silently be this host's alone.
            return Err(StoreError::Open {
                path: redacted(path),
                reason: "tls_ca, tls_cert, tls_key, sentinel_user and sentinel_password are for Redis (rediss://, redis+sentinel://), \
                         not a redb file or memory"
                    .into(),
            });
        }
        if let Some(b) = backend {
            return (b.open)(path, self);
        }
        if path.contains("://") {
            return Err(StoreError::Open { path: redacted(path), reason: "unknown scheme: a file, \"memory\" or a redis:// URL".into() });
        }
        let path = self.redb_path().unwrap_or_else(default_db_path);
        let options = self.redb_options().map_err(|reason| StoreError::Open { path: path.display().to_string(), reason })?;
        Ok(Arc::new(RedbStore::open_with(&path, &options)?))
    }

    /// Checks the table's bounds (the daemon does before it starts, so a
    /// typo is refused with the others).
    pub fn check(&self) -> Result<(), String> {
        if self.cache_mib > MAX_CACHE_MIB {
            return Err(format!("[store] cache_mib must be 0 to {MAX_CACHE_MIB} (MiB), not {}", self.cache_mib));
        }
        Ok(())
    }

    /// The redb options this table sets, or why they are unusable.
    fn redb_options(&self) -> Result<RedbOptions, String> {
        self.check()?;
        let cache_bytes =
            usize::try_from(self.cache_mib << 20).map_err(|_| format!("cache_mib = {} does not fit in memory", self.cache_mib))?;
        Ok(RedbOptions {
            durability: self.durability,
            check_at_open_max_bytes: self.check_at_open_mib.saturating_mul(1 << 20),
            cache_bytes,
        })
    }

    /// The TLS files `tls_ca`, `tls_cert` and `tls_key` name.
    pub fn tls(&self) -> RedisTls {
        RedisTls { ca: self.tls_ca.clone(), cert: self.tls_cert.clone(), key: self.tls_key.clone() }
    }

    /// The sentinels' credentials `sentinel_user` and `sentinel_password` name.
    pub fn sentinel_auth(&self) -> SentinelAuth {
        SentinelAuth { user: self.sentinel_user.clone(), password: self.sentinel_password.clone() }
    }

    /// The backend `path` names, `None` for a redb file.
    pub fn backend(&self) -> Option<&'static Backend> {
        let path = self.path.as_deref()?;
        BACKENDS.iter().find(|b| b.schemes.iter().any(|s| path.starts_with(s)))
    }

    /// The redb file, if the store is one: anything no backend claims.
    pub fn redb_path(&self) -> Option<PathBuf> {
        match self.path.as_deref() {
            _ if self.backend().is_some() => None,
            Some(u) if u.contains("://") => None,
            Some(p) => Some(PathBuf::from(p)),
            None => Some(default_db_path()),
        }
    }

    /// `path` for the log, without a password (`redis://:secret@host`).
    pub fn describe(&self) -> String {
        match self.redb_path() {
            Some(p) => format!("redb file {} (durability {:?}, cache {} MiB)", p.display(), self.durability, self.cache_mib),
            None => redacted(self.path.as_deref().unwrap_or_default()),
        }
    }
}

/// A store URL as logs and errors show it: a password (`redis://:secret@host`)
/// replaced by `***`.
pub(crate) fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://***{}", &url[..scheme], &url[at..]),
        _ => url.to_string(),
    }
}

/// Where the store lives by default: `$STATE_DIRECTORY` (systemd's
/// `StateDirectory=`), else `/var/lib/greyhook` when it can be created
/// (root), else `$XDG_STATE_HOME/greyhook` or `~/.local/state/greyhook`.
pub fn default_db_path() -> PathBuf {
    crate::settings::systemd_or_system("STATE_DIRECTORY", SYSTEM_STATE_DIR, "greyhook.db").unwrap_or_else(user_db_path)
}

/// The store's directory for a daemon run by root with no service manager.
const SYSTEM_STATE_DIR: &str = "/var/lib/greyhook";

/// Every place [`default_db_path`] may choose, in its order, named without
/// creating or probing anything: where to look for what a daemon keeps
/// beside its default store (its control socket, at the last).
pub(crate) fn default_db_candidates() -> Vec<PathBuf> {
    let mut candidates: Vec<PathBuf> = crate::settings::systemd_dir("STATE_DIRECTORY", "greyhook.db").into_iter().collect();
    candidates.push(PathBuf::from(SYSTEM_STATE_DIR).join("greyhook.db"));
    candidates.push(user_db_path());
    candidates
}

/// The user's default store, `$XDG_STATE_HOME/greyhook/greyhook.db` or
/// `~/.local/state/greyhook/greyhook.db`: what [`default_db_path`] chooses
/// when neither systemd nor root's `/var/lib/greyhook` applies.
fn user_db_path() -> PathBuf {
    let state = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("."));
    state.join("greyhook").join("greyhook.db")
}
