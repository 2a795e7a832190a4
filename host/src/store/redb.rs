//! The embedded default store: one redb file.
//!
//! Durability: with [`Durability::Immediate`] every write is its own redb
//! transaction, fsynced before the filter's call returns (safest; about a
//! millisecond a write on most disks). With [`Durability::Periodic`] (the
//! default) writes land in an in-memory overlay that every read and
//! compare-and-swap sees first, and a flusher thread writes the overlay to
//! the file in one fsynced transaction every second (and at [`Store::flush`],
//! and when the store is dropped): a crash or power cut loses at most the
//! last second of greylist records, which only means those clients are
//! greylisted once more. redb keeps the file consistent in both modes.
//!
//! Faults: a write that fails (a full disk, an I/O error) puts the store in
//! a *degraded* state instead of losing records: the records stay in the
//! overlay (in `immediate` mode too), every read and compare-and-swap still
//! sees them, the database handle is closed and opened again (redb refuses
//! all work after an I/O error until then), and the flusher retries every
//! second until the disk takes them, then logs the recovery. Meanwhile the
//! fault is logged and counted ([`Store::failures`], [`Store::degraded`],
//! `greyhook status`). The overlay is bounded ([`OVERLAY_HARD_MAX`]): past
//! it, writes fail and the failure policy answers.
//!
//! Reads: the overlay first, then the file, but only for a key the file
//! may hold: a Bloom filter of its keys ([`KeyFilter`], built in the
//! background) rules out most of the keys a greylisting filter asks for
//! without a walk down the B-tree.
//!
//! Memory: redb keeps the file's pages in a cache of its own, bounded by
//! [`RedbOptions::cache_bytes`] ([`DEFAULT_CACHE_BYTES`], `[store]
//! cache_mib`); the overlay is bounded as above.
//!
//! A damaged file is never a panic: opening walks the whole file (redb's
//! integrity check, then every record) and refuses with a message that
//! says what to do.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::keyfilter::KeyFilter;
use super::{Condition, Entry, Page, Store, StoreError, WriteOutcome};

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
    /// Writes go to an in-memory overlay, written to the file and fsynced
    /// every second, at [`Store::flush`] and when the store is dropped.
    #[default]
    Periodic,
}

/// How often the periodic flusher writes the overlay.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// An overlay this large is flushed by the writer itself (unless the store
/// is degraded: then the flusher keeps trying on its own).
const OVERLAY_MAX: usize = 100_000;
/// Records the overlay holds at most while the file cannot be written, or
/// is written more slowly than records come (a disk slower than the
/// writes); past this, writes fail (about 200 bytes each: some 400 MB).
pub const OVERLAY_HARD_MAX: usize = 2_000_000;
/// Records a sweep removes per transaction: each holds redb's write lock
/// (which the flusher needs) for a few milliseconds at most.
const SWEEP_BATCH: usize = 1_000;

/// By default, files up to this size are checked in full before the store opens
/// (redb's check of every page's checksum, then every record and index
/// entry read); a larger file opens at once and is read through by a
/// background thread, so that a restart stays quick at millions of records
/// (the full check of a 5M-record file took seconds). `greyhook db check`
/// always checks in full. `[store] check_at_open_mib` sets it.
pub const CHECK_AT_OPEN_MAX_BYTES: u64 = 256 << 20;

/// redb's page cache by default: the B-tree pages it keeps in memory (read
/// cache and write buffer together; the write buffer takes at most half).
/// redb's own default is 1 GiB, which a store of a million records or more
/// fills: the daemon then held over 1 GB. Pages past the cache are read
/// from the file, which the kernel's page cache usually holds; the overlay
/// and the key filter answer most of a greylisting filter's reads first.
/// At 1M records this cost no measurable CPU a policy request (see
/// `docs/performance.md`). `[store] cache_mib` sets it.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

/// How [`RedbStore::open_with`] opens a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedbOptions {
    /// How writes reach the disk.
    pub durability: Durability,
    /// Files up to this size are checked in full before the store opens
    /// (see [`CHECK_AT_OPEN_MAX_BYTES`]).
    pub check_at_open_max_bytes: u64,
    /// redb's page cache in bytes (see [`DEFAULT_CACHE_BYTES`]).
    pub cache_bytes: usize,
}

impl Default for RedbOptions {
    fn default() -> Self {
        RedbOptions {
            durability: Durability::default(),
            check_at_open_max_bytes: CHECK_AT_OPEN_MAX_BYTES,
            cache_bytes: DEFAULT_CACHE_BYTES,
        }
    }
}

/// A [`Store`] in a redb file.
pub struct RedbStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None` between closing after an I/O error and opening again.
    db: RwLock<Option<Database>>,
    path: PathBuf,
    durability: Durability,
    /// redb's page cache ([`RedbOptions::cache_bytes`]), kept for reopening.
    cache_bytes: usize,
    /// A write to the file failed and records wait in the overlay.
    degraded: AtomicBool,
    /// Backend failures since start.
    failures: AtomicU64,
    overlay: Overlay,
    /// Flushes completed (bumped just before a flushed batch leaves the
    /// overlay): a file read made while it did not move is still current
    /// for a key the overlay does not hold.
    flushed: AtomicU64,
    /// Serialises flushes.
    flushing: Mutex<()>,
    /// The flusher thread, woken early when the overlay grows large.
    flusher: std::sync::OnceLock<std::thread::Thread>,
    /// What the calls that answer peers read the file through.
    snapshot: RwLock<Snapshot>,
    /// Serialises taking a snapshot and installing it: each thread that
    /// committed begins its read under this, so none installs a snapshot
    /// older than the one before (a reader would then miss a flushed
    /// record that has left the overlay).
    refreshing: Mutex<()>,
    /// The thread that builds the key filter ([`Snapshot::keys`]), woken
    /// when the filter in use has noted more keys than it was sized for.
    key_builder: std::sync::OnceLock<std::thread::Thread>,
    /// Keys looked up in the file itself (past the overlay and the key
    /// filter), for tests: not a shared counter on every read in service.
    #[cfg(test)]
    file_reads: AtomicU64,
    /// The [`RedbStore`] was dropped: background threads let go.
    closing: AtomicBool,
}

/// How long dropping a [`RedbStore`] waits for a background thread's step
/// (a flush, a chunk of a scan) to let go of it.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

impl Drop for RedbStore {
    /// Background threads hold the store a step at a time: waits for the
    /// step in progress (up to two seconds), so that the file is closed
    /// when this returns and the store can be opened again at once.
    fn drop(&mut self) {
        self.inner.closing.store(true, Ordering::Release);
        let t = std::time::Instant::now();
        while Arc::strong_count(&self.inner) > 1 && t.elapsed() < CLOSE_WAIT {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// The store for a background thread's next step, unless it was dropped.
fn hold(store: &Weak<Inner>) -> Option<Arc<Inner>> {
    store.upgrade().filter(|i| !i.closing.load(Ordering::Acquire))
}

/// The records table as of the last commit, read by every call that
/// answers a peer instead of each beginning its own read transaction.
///
/// Why: redb's `begin_read` takes the lock of its page allocator, and redb
/// holds that lock across an fsync whenever the file grows
/// (`TransactionalMemory::grow`). With a slow disk, every request then
/// waited one fsync (110 ms at 5M records with a 100 ms fsync, measured by
/// `cargo bench -p greyhook --bench store` with fsync slowed). The snapshot
/// is taken again by the thread that committed, right after its commit and
/// before a flushed batch leaves the overlay, so a reader never misses a
/// flushed record; only those background threads wait for the allocator.
#[derive(Default)]
struct Snapshot {
    /// `None` before the first commit is seen, after a failed refresh and
    /// while the file is reopened: readers then begin their own
    /// transaction (never a stale snapshot).
    current: Option<Arc<Records>>,
    /// Replaced snapshots that a reader may still hold. Ending one ends a
    /// redb read transaction, which takes redb's transaction-tracker lock
    /// (held meanwhile by a `begin_read` waiting on the allocator): so they
    /// are dropped by the refreshing thread, once no reader holds them.
    retired: Vec<Arc<Records>>,
    /// The keys the file may hold ([`KeyFilter`]), asked before each read
    /// of the file: `None` until it is first built. Kept here, beside the
    /// snapshot, so that a read takes one lock for both.
    keys: Option<Arc<KeyFilter>>,
    /// A filter being built (see [`Inner::build_key_filter`]): every write
    /// transaction notes its keys in it too.
    building: Option<Arc<KeyFilter>>,
}

/// The key filters a write transaction notes its keys in: taken after the
/// transaction began (it holds redb's write lock), so a filter whose build
/// began before is among them (see [`Inner::build_key_filter`]).
#[derive(Default)]
struct Notes {
    filters: Vec<Arc<KeyFilter>>,
    /// Set when a filter went past its capacity: its builder is woken
    /// once the transaction is over.
    full: std::cell::Cell<bool>,
}

impl Notes {
    fn note(&self, key: &str) {
        for f in &self.filters {
            if f.note(key) {
                self.full.set(true);
            }
        }
    }
}

type Records = redb::ReadOnlyTable<&'static str, &'static [u8]>;

/// Shards of the overlay, each behind its own lock.
///
/// Why: one lock over one map made every request wait while any request
/// grew the map (a rehash of hundreds of thousands of entries when a slow
/// disk held a flush back: 10-30 ms, measured by `--bench store` with fsync
/// slowed), and serialised all writers, which stops scaling with cores. A
/// key's shard is fixed by its hash, so a compare-and-swap stays atomic
/// under its shard's lock alone.
const OVERLAY_SHARDS: usize = 64;

/// Writes not yet in the file, in [`OVERLAY_SHARDS`] shards.
struct Overlay {
    shards: Box<[Mutex<Shard>]>,
    /// Picks a key's shard (its own seed, apart from the maps').
    spread: foldhash::fast::RandomState,
    /// Entries in all shards' `dirty` maps.
    pending: AtomicUsize,
    /// Entries in the batch a flush is writing (the shards' `in_flight`
    /// maps): memory too, counted against [`OVERLAY_HARD_MAX`].
    flushing: AtomicUsize,
    /// The last version handed out.
    last_version: AtomicU64,
}

/// Key → entry, or `None` for a deletion. Hashed with foldhash, seeded
/// per process (so keys a peer influences cannot be crafted to collide
/// offline): SipHash was ~2k instructions of a policy request, hashing
/// each key twice (shard, then map).
type OverlayMap = HashMap<String, Option<Entry>, foldhash::fast::RandomState>;

/// One shard: key → entry, or `None` for a deletion.
#[derive(Default)]
struct Shard {
    dirty: OverlayMap,
    /// This shard's part of the batch a flush is writing, still visible
    /// to readers.
    in_flight: Arc<OverlayMap>,
}

impl Shard {
    fn lookup(&self, key: &str) -> Option<&Option<Entry>> {
        self.dirty.get(key).or_else(|| self.in_flight.get(key))
    }
}

impl Overlay {
    fn new(last_version: u64) -> Overlay {
        Overlay {
            shards: (0..OVERLAY_SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            spread: foldhash::fast::RandomState::default(),
            pending: AtomicUsize::new(0),
            flushing: AtomicUsize::new(0),
            last_version: AtomicU64::new(last_version),
        }
    }

    /// The locked shard that holds `key`.
    fn shard(&self, key: &str) -> std::sync::MutexGuard<'_, Shard> {
        use std::hash::BuildHasher;
        let h = self.spread.hash_one(key);
        lock(&self.shards[(h as usize) % OVERLAY_SHARDS])
    }

    /// A copy of what the overlay holds for `key`, if anything.
    fn lookup(&self, key: &str) -> Option<Option<Entry>> {
        self.shard(key).lookup(key).cloned()
    }

    fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore").field("durability", &self.inner.durability).finish()
    }
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// The record under `key` in a records table (read-only or being written).
fn record(table: &impl ReadableTable<&'static str, &'static [u8]>, key: &str) -> Result<Option<Entry>, StoreError> {
    Ok(table.get(key).map_err(backend)?.and_then(|g| decode(g.value())))
}

/// Replaces the record under `key` with `entry` (version, expiry, value),
/// or removes it for `None`, keeping the expiry index in step: the old
/// record's index entry goes, the new one's is added. One walk of the
/// records table (the insert or removal hands back the old record), and
/// none of the index when the expiry is unchanged.
fn put_record(
    rec: &mut redb::Table<&'static str, &'static [u8]>,
    exp: &mut redb::Table<(u64, &'static str), ()>,
    notes: &Notes,
    key: &str,
    entry: Option<(u64, u64, &[u8])>,
) -> Result<(), StoreError> {
    let (old_at, new_at) = match entry {
        Some((version, expires_at, value)) => {
            // Before the commit that puts it in the file: see `KeyFilter`.
            notes.note(key);
            let old = rec.insert(key, encode(version, expires_at, value).as_slice()).map_err(backend)?;
            (old.and_then(|g| expiry_of(g.value())), Some(expires_at))
        }
        None => (rec.remove(key).map_err(backend)?.and_then(|g| expiry_of(g.value())), None),
    };
    if old_at != new_at {
        if let Some(at) = old_at {
            exp.remove((at, key)).map_err(backend)?;
        }
        if let Some(at) = new_at {
            exp.insert((at, key), ()).map_err(backend)?;
        }
    }
    Ok(())
}

/// The expiry of an encoded record ([`encode`]), without copying its value.
fn expiry_of(b: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(8..16)?.try_into().ok()?))
}

fn decode(b: &[u8]) -> Option<Entry> {
    let version = u64::from_le_bytes(b.get(..8)?.try_into().ok()?);
    // Before the value is sliced: a record shorter than 16 bytes is `None`.
    let expires_at = expiry_of(b)?;
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
    /// Opens (creating if needed) the store at `path` with the default
    /// [`RedbOptions`] but `durability`. Fails if another process has it
    /// open, or if the file is damaged (never a panic).
    pub fn open(path: &Path, durability: Durability) -> Result<RedbStore, StoreError> {
        RedbStore::open_with(path, &RedbOptions { durability, ..RedbOptions::default() })
    }

    /// [`RedbStore::open`] with every option: the file is checked in full
    /// before this returns only if it is at most
    /// [`RedbOptions::check_at_open_max_bytes`]; a larger file is read
    /// through in the background, and damage found then is logged.
    pub fn open_with(path: &Path, options: &RedbOptions) -> Result<RedbStore, StoreError> {
        let open_err = |e: &dyn std::fmt::Display| StoreError::Open { path: path.display().to_string(), reason: e.to_string() };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| open_err(&e))?;
        }
        let (db, last_version, unread) = open_checked(path, Check::UpTo(options.check_at_open_max_bytes), options.cache_bytes)?;
        let inner = Arc::new(Inner {
            db: RwLock::new(Some(db)),
            path: path.to_path_buf(),
            durability: options.durability,
            cache_bytes: options.cache_bytes,
            degraded: AtomicBool::new(false),
            failures: AtomicU64::new(0),
            overlay: Overlay::new(last_version),
            flushed: AtomicU64::new(0),
            flushing: Mutex::new(()),
            flusher: std::sync::OnceLock::new(),
            snapshot: RwLock::new(Snapshot::default()),
            refreshing: Mutex::new(()),
            key_builder: std::sync::OnceLock::new(),
            #[cfg(test)]
            file_reads: AtomicU64::new(0),
            closing: AtomicBool::new(false),
        });
        inner.refresh_snapshot();
        // The flusher runs in both modes: in `immediate` mode it writes what
        // a disk fault left in the overlay.
        let weak = Arc::downgrade(&inner);
        let t = std::thread::Builder::new().name("greyhook-redb-flush".into()).spawn(move || flusher(weak)).map_err(|e| open_err(&e))?;
        let _ = inner.flusher.set(t.thread().clone());
        let weak = Arc::downgrade(&inner);
        let t = std::thread::Builder::new().name("greyhook-redb-keys".into()).spawn(move || key_builder(weak)).map_err(|e| open_err(&e))?;
        let _ = inner.key_builder.set(t.thread().clone());
        if unread {
            let weak = Arc::downgrade(&inner);
            std::thread::Builder::new()
                .name("greyhook-redb-check".into())
                .spawn(move || Inner::read_through(&weak))
                .map_err(|e| open_err(&e))?;
        }
        Ok(RedbStore { inner })
    }

    /// Checks the file at `path` the way [`RedbStore::open`] does (integrity
    /// check, every record read), without keeping it open: the number of
    /// records, or why it cannot be used. For `greyhook db check`.
    pub fn check(path: &Path) -> Result<u64, StoreError> {
        if !path.exists() {
            return Err(StoreError::Open { path: path.display().to_string(), reason: "no such file".into() });
        }
        let damaged = |what: String| StoreError::Open { path: path.display().to_string(), reason: format!("the file is damaged ({what})") };
        quiet_catch(|| {
            let (db, _, _) = open_checked(path, Check::Full, DEFAULT_CACHE_BYTES)?;
            let txn = db.begin_read().map_err(backend)?;
            let rec = txn.open_table(RECORDS).map_err(backend)?;
            rec.len().map_err(backend)
        })
        .map_err(damaged)?
    }

    /// Writes `records` (key, value, expires_at) straight to the file in
    /// large transactions, past the overlay and without conditions (an
    /// existing key is replaced): for migrations, and for filling a store
    /// with millions of records in a benchmark. The number written.
    pub fn import(&self, records: impl IntoIterator<Item = (String, Vec<u8>, u64)>) -> Result<u64, StoreError> {
        const CHUNK: usize = 100_000;
        self.inner.flush()?;
        let mut records = records.into_iter().peekable();
        let mut total = 0u64;
        while records.peek().is_some() {
            let n = self.inner.with_db(|db| {
                let mut txn = db.begin_write().map_err(backend)?;
                txn.set_quick_repair(true);
                let notes = self.inner.notes();
                let mut n = 0;
                {
                    let mut rec = txn.open_table(RECORDS).map_err(backend)?;
                    let mut exp = txn.open_table(EXPIRY).map_err(backend)?;
                    let mut meta = txn.open_table(META).map_err(backend)?;
                    let mut version = meta
                        .get("last_version")
                        .map_err(backend)?
                        .map_or(0, |g| g.value())
                        .max(self.inner.overlay.last_version.load(Ordering::Acquire));
                    for (key, value, expires_at) in records.by_ref().take(CHUNK) {
                        version += 1;
                        put_record(&mut rec, &mut exp, &notes, &key, Some((version, expires_at, &value)))?;
                        n += 1;
                    }
                    meta.insert("last_version", version).map_err(backend)?;
                    self.inner.overlay.last_version.fetch_max(version, Ordering::AcqRel);
                }
                txn.commit().map_err(backend)?;
                self.inner.noted(&notes);
                Ok(n)
            })?;
            self.inner.refresh_snapshot();
            total += n;
        }
        Ok(total)
    }

    /// Whether writes wait in memory for the disk (for tests and status).
    pub fn is_degraded(&self) -> bool {
        self.inner.degraded.load(Ordering::Relaxed)
    }

    /// Runs one write transaction; `f` returns whether to commit it, and a result.
    fn write<T>(&self, f: impl FnOnce(&redb::WriteTransaction) -> Result<(bool, T), StoreError>) -> Result<T, StoreError> {
        let run = || {
            self.inner
                .with_db(|db| {
                    let txn = db.begin_write().map_err(backend)?;
                    let (commit, v) = f(&txn)?;
                    if commit {
                        txn.commit().map_err(backend)?;
                    } else {
                        txn.abort().map_err(backend)?;
                    }
                    Ok((commit, v))
                })
                .map(|(commit, v)| {
                    if commit {
                        self.inner.refresh_snapshot();
                    }
                    v
                })
        };
        // An fsync per write must not stall the async runtime's worker.
        match (self.inner.durability, tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor())) {
            (Durability::Immediate, Ok(tokio::runtime::RuntimeFlavor::MultiThread)) => tokio::task::block_in_place(run),
            _ => run(),
        }
    }

    /// Writes or deletes under `cond`: `value` `None` deletes.
    fn update(&self, key: &str, value: Option<(&[u8], u64)>, cond: Condition, now: u64) -> Result<Option<u64>, StoreError> {
        let notes = std::cell::OnceCell::new();
        let written = self.write(|txn| {
            let notes = notes.get_or_init(|| self.inner.notes());
            let mut rec = txn.open_table(RECORDS).map_err(backend)?;
            let mut exp = txn.open_table(EXPIRY).map_err(backend)?;
            let old = record(&rec, key)?;
            let live = old.as_ref().filter(|e| e.expires_at > now).map(|e| e.version);
            if !cond.holds(live) {
                return Ok((false, None));
            }
            match value {
                Some((value, expires_at)) => {
                    let mut meta = txn.open_table(META).map_err(backend)?;
                    let version = meta.get("last_version").map_err(backend)?.map_or(0, |g| g.value()) + 1;
                    meta.insert("last_version", version).map_err(backend)?;
                    put_record(&mut rec, &mut exp, notes, key, Some((version, expires_at, value)))?;
                    Ok((true, Some(version)))
                }
                None => {
                    put_record(&mut rec, &mut exp, notes, key, None)?;
                    Ok((true, live))
                }
            }
        });
        if let Some(notes) = notes.get() {
            self.inner.noted(notes);
        }
        written
    }
}

impl RedbStore {
    fn read_file(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let mut slot = [None];
        self.read_file_into(std::iter::once(key).zip(&mut slot))?;
        let [entry] = slot;
        Ok(entry.flatten())
    }

    /// Reads each key of `slots` whose slot is `None` from the file, all
    /// from one snapshot (or one read transaction), into its slot.
    /// A key the key filter rules out is not read at all.
    fn read_file_into<'k>(&self, slots: impl Iterator<Item = (&'k str, &'k mut Option<Option<Entry>>)>) -> Result<(), StoreError> {
        let (snapshot, keys) = {
            let s = self.inner.snapshot.read().unwrap_or_else(|p| p.into_inner());
            (s.current.clone(), s.keys.clone())
        };
        let fill = |table: &dyn Fn(&str) -> Result<Option<Entry>, StoreError>| {
            for (key, slot) in slots {
                if slot.is_none() {
                    *slot = Some(match &keys {
                        Some(k) if !k.may_hold(key) => None,
                        _ => {
                            #[cfg(test)]
                            self.inner.file_reads.fetch_add(1, Ordering::Relaxed);
                            table(key)?
                        }
                    });
                }
            }
            Ok(())
        };
        if let Some(records) = snapshot {
            return self.inner.guarded(|| fill(&|key| record(&*records, key)));
        }
        self.inner.with_db(|db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(RECORDS).map_err(backend)?;
            fill(&|key| record(&table, key))
        })
    }

    /// A write or deletion: to the overlay in `periodic` mode, or while
    /// degraded; else to the file, falling back to the overlay when the
    /// file fails (the record is kept, the flusher writes it later).
    fn write_any(&self, key: &str, value: Option<(&[u8], u64)>, cond: Condition, now: u64) -> Result<Option<u64>, StoreError> {
        if self.inner.durability == Durability::Periodic || self.is_degraded() || self.inner.overlay.pending() > 0 {
            return self.update_overlay(key, value, cond, now);
        }
        match self.update(key, value, cond, now) {
            Ok(r) => Ok(r),
            Err(e) => {
                if !self.inner.degraded.swap(true, Ordering::Relaxed) {
                    tracing::error!("store degraded: cannot write {} ({e}); records kept in memory", self.inner.path.display());
                }
                self.inner.reopen();
                // Versions continue from the file's.
                if self.inner.overlay.last_version.load(Ordering::Acquire) == 0 {
                    self.inner.overlay.last_version.fetch_max(self.read_last_version().unwrap_or(0), Ordering::AcqRel);
                }
                self.update_overlay(key, value, cond, now)
            }
        }
    }

    fn read_last_version(&self) -> Result<u64, StoreError> {
        self.inner.with_db(|db| {
            let txn = db.begin_read().map_err(backend)?;
            let meta = txn.open_table(META).map_err(backend)?;
            Ok(meta.get("last_version").map_err(backend)?.map_or(0, |g| g.value()))
        })
    }

    /// Periodic mode: a conditional write or deletion in the overlay.
    fn update_overlay(&self, key: &str, value: Option<(&[u8], u64)>, cond: Condition, now: u64) -> Result<Option<u64>, StoreError> {
        // The file is read before the lock is taken, so that the lock is
        // held only for the overlay's lookup and insert (reading under it
        // serialised every write behind a redb read transaction, and the
        // store stopped scaling past 4 cores). The read is used only if no
        // flush completed meanwhile: only a flush moves records from the
        // overlay into the file, and a record being flushed is still in
        // the overlay until then.
        let overlay = &self.inner.overlay;
        let (mut o, current) = loop {
            let flushed = self.inner.flushed.load(Ordering::Acquire);
            {
                // Held in the overlay (hot keys, and everything a degraded
                // store keeps): no file read at all.
                let o = overlay.shard(key);
                if let Some(e) = o.lookup(key) {
                    let e = e.clone();
                    break (o, e);
                }
            }
            let in_file = self.read_file(key)?;
            let o = overlay.shard(key);
            match o.lookup(key) {
                Some(e) => {
                    let e = e.clone();
                    break (o, e);
                }
                None if self.inner.flushed.load(Ordering::Acquire) == flushed => break (o, in_file),
                None => continue,
            }
        };
        // The batch being flushed is held in memory too: while a slow disk
        // holds a flush of many records, new ones wait beside it.
        if overlay.pending() + overlay.flushing.load(Ordering::Acquire) >= OVERLAY_HARD_MAX {
            self.inner.failures.fetch_add(1, Ordering::Relaxed);
            // Either the file cannot be written (degraded) or it is written
            // more slowly than records come: say which.
            let why = if self.is_degraded() { "the store file cannot be written" } else { "the disk is slower than the writes" };
            return Err(StoreError::Backend(format!("{why} and {OVERLAY_HARD_MAX} records wait in memory: refusing more")));
        }
        let live = current.as_ref().filter(|e| e.expires_at > now).map(|e| e.version);
        if !cond.holds(live) {
            return Ok(None);
        }
        let result = match value {
            Some((value, expires_at)) => {
                let version = overlay.last_version.fetch_add(1, Ordering::AcqRel) + 1;
                if o.dirty.insert(key.to_string(), Some(Entry { value: value.to_vec(), version, expires_at })).is_none() {
                    overlay.pending.fetch_add(1, Ordering::AcqRel);
                }
                Some(version)
            }
            None => {
                if o.dirty.insert(key.to_string(), None).is_none() {
                    overlay.pending.fetch_add(1, Ordering::AcqRel);
                }
                live
            }
        };
        drop(o);
        let n = overlay.pending();
        if n >= OVERLAY_MAX
            && let Some(t) = self.inner.flusher.get()
        {
            // The flusher writes it now rather than at its next second; the
            // call that found the overlay large does not wait for the disk
            // (requests never flush: a flush of 100k records, or one behind
            // a sweep's transaction, would stall whoever made it).
            t.unpark();
        }
        Ok(result)
    }
}

/// How much [`open_checked`] checks before it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// redb's integrity check and every record and index entry read.
    Full,
    /// The full check for a file up to this many bytes; a larger one only
    /// as far as redb's open goes (a file that crashed is repaired from its
    /// last commit's allocator state), the rest left to
    /// [`Inner::read_through`] in the background.
    UpTo(u64),
}

/// Opens the database at `path`, runs redb's integrity check and reads
/// every record and index entry (see [`Check`]), so that a damaged file is
/// refused here with a clear message (redb can panic on some damage:
/// caught, never passed on). Returns the database, the last version handed
/// out, and whether the records are still to be read through.
fn open_checked(path: &Path, check: Check, cache_bytes: usize) -> Result<(Database, u64, bool), StoreError> {
    let open_err = |e: &dyn std::fmt::Display| StoreError::Open { path: path.display().to_string(), reason: e.to_string() };
    let damaged = |detail: &dyn std::fmt::Display| open_err(&damaged_advice(detail));
    let size = std::fs::metadata(path).map_or(0, |m| m.len());
    let full = match check {
        Check::Full => true,
        Check::UpTo(max) => size <= max,
    };
    let attempt = quiet_catch(|| -> Result<(Database, u64), StoreError> {
        let mut db = Database::builder().set_cache_size(cache_bytes).create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => open_err(
                &"it is in use by another process (one greyhook process can serve every front end: `greyhook smtp --policy ADDR --milter ADDR`; several hosts share a Redis store)",
            ),
            redb::DatabaseError::Storage(redb::StorageError::Io(e)) if e.kind() == std::io::ErrorKind::PermissionDenied => open_err(&e),
            e => damaged(&e),
        })?;
        if full {
            match db.check_integrity() {
                Ok(true) => {}
                Ok(false) => return Err(damaged(&"redb's integrity check repaired it, but records may be lost")),
                Err(e) => return Err(damaged(&e)),
            }
        }
        let mut txn = db.begin_write().map_err(|e| open_err(&e))?;
        txn.set_quick_repair(true);
        {
            txn.open_table(RECORDS).map_err(|e| damaged(&e))?;
            txn.open_table(EXPIRY).map_err(|e| damaged(&e))?;
            txn.open_table(META).map_err(|e| damaged(&e))?;
        }
        txn.commit().map_err(|e| open_err(&e))?;
        if full {
            read_through(&db).map_err(|e| damaged(&e))?;
        }
        let last_version = {
            let txn = db.begin_read().map_err(|e| open_err(&e))?;
            let meta = txn.open_table(META).map_err(|e| damaged(&e))?;
            meta.get("last_version").map_err(|e| damaged(&e))?.map_or(0, |g| g.value())
        };
        Ok((db, last_version))
    });
    match attempt {
        Ok(r) => r.map(|(db, v)| (db, v, !full)),
        Err(what) => Err(damaged(&format!("redb could not read it: {what}"))),
    }
}

/// What to do about a damaged file, after what was found.
fn damaged_advice(detail: &dyn std::fmt::Display) -> String {
    format!(
        "the file is damaged ({detail}); move it aside and start greyhook again (it starts with an empty greylist: \
         known clients are greylisted once more), or restore a copy; `greyhook db check PATH` checks a file"
    )
}

/// Records (then index entries) a background read-through reads per read
/// transaction; between chunks it lets go of the store.
const READ_THROUGH_CHUNK: usize = 50_000;

/// Where a read-through is: in the records after a key, in the expiry
/// index after an entry, or done.
enum Cursor {
    Records(Option<String>),
    Expiry(Option<(u64, String)>),
    Done,
}

/// The records of `rec` after the key `after` (all of them for `None`), in key order.
fn records_after<'t>(rec: &'t Records, after: Option<&str>) -> Result<redb::Range<'t, &'static str, &'static [u8]>, StoreError> {
    use std::ops::Bound::{Excluded, Unbounded};
    match after {
        Some(k) => rec.range::<&str>((Excluded(k), Unbounded)),
        None => rec.range::<&str>(..),
    }
    .map_err(backend)
}

/// Reads up to `limit` records or index entries after `cursor`: where to go
/// on, and the number of records read, or what is wrong (a malformed
/// record; redb's own errors).
fn read_through_step(db: &Database, cursor: Cursor, limit: usize) -> Result<(Cursor, u64), StoreError> {
    use std::ops::Bound::{Excluded, Unbounded};
    let txn = db.begin_read().map_err(backend)?;
    match cursor {
        Cursor::Records(after) => {
            let rec = txn.open_table(RECORDS).map_err(backend)?;
            let (mut n, mut last) = (0, None);
            for item in records_after(&rec, after.as_deref())?.take(limit) {
                let (k, v) = item.map_err(backend)?;
                if decode(v.value()).is_none() {
                    return Err(StoreError::Backend("a record is malformed".into()));
                }
                n += 1;
                last = Some(k.value().to_string());
            }
            let next = if (n as usize) < limit { Cursor::Expiry(None) } else { Cursor::Records(last) };
            Ok((next, n))
        }
        Cursor::Expiry(after) => {
            let exp = txn.open_table(EXPIRY).map_err(backend)?;
            let range = match &after {
                Some((at, k)) => exp.range::<(u64, &str)>((Excluded((*at, k.as_str())), Unbounded)),
                None => exp.range::<(u64, &str)>(..),
            };
            let (mut n, mut last) = (0, None);
            for item in range.map_err(backend)?.take(limit) {
                let (k, _) = item.map_err(backend)?;
                let (at, key) = k.value();
                n += 1;
                last = Some((at, key.to_string()));
            }
            Ok((if n < limit { Cursor::Done } else { Cursor::Expiry(last) }, 0))
        }
        Cursor::Done => Ok((Cursor::Done, 0)),
    }
}

/// Reads every record and index entry in one go: the number of records, or
/// what is wrong.
fn read_through(db: &Database) -> Result<u64, StoreError> {
    let (mut cursor, mut n) = (Cursor::Records(None), 0);
    while !matches!(cursor, Cursor::Done) {
        let (next, read) = read_through_step(db, cursor, usize::MAX)?;
        (cursor, n) = (next, n + read);
    }
    Ok(n)
}

/// Runs `f`, turning a panic into `Err(message)` without the panic being
/// printed (a damaged file is reported once, as an error that says what
/// to do). Used at start, before other threads run; the panic hook is
/// process-wide, so it is put back at once.
fn quiet_catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(previous);
    r.map_err(|panic| {
        panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown damage".into())
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section leaves the data whole (single inserts and swaps).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    /// Writes the overlay to the file in one fsynced transaction.
    fn flush(&self) -> Result<(), StoreError> {
        let _one_at_a_time = lock(&self.flushing);
        let overlay = &self.overlay;
        if overlay.pending() == 0 {
            return Ok(());
        }
        // Each shard's entries move to its `in_flight`, where readers still
        // find them until the file holds them.
        let batch: Vec<Arc<OverlayMap>> = overlay
            .shards
            .iter()
            .map(|shard| {
                let mut s = lock(shard);
                let taken = Arc::new(std::mem::take(&mut s.dirty));
                overlay.pending.fetch_sub(taken.len(), Ordering::AcqRel);
                s.in_flight = taken.clone();
                taken
            })
            .collect();
        // Every version in the batch was handed out before its shard was
        // taken, so none is above this.
        let last_version = overlay.last_version.load(Ordering::Acquire);
        let records: usize = batch.iter().map(|b| b.len()).sum();
        overlay.flushing.store(records, Ordering::Release);
        let result = self.with_db(|db| {
            // Quick repair: the commit records redb's allocator state (and
            // commits in two phases), so that opening the file after a crash
            // loads it instead of walking the whole file to rebuild it.
            let mut txn = db.begin_write().map_err(backend)?;
            txn.set_quick_repair(true);
            let notes = self.notes();
            {
                let mut rec = txn.open_table(RECORDS).map_err(backend)?;
                let mut exp = txn.open_table(EXPIRY).map_err(backend)?;
                let mut meta = txn.open_table(META).map_err(backend)?;
                // In key order: consecutive inserts then walk the same
                // branch pages and fill the same leaves, where hash order
                // sent each one to another part of the tree.
                let mut sorted: Vec<_> = batch.iter().flat_map(|b| b.iter()).collect();
                sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
                for (key, entry) in sorted {
                    put_record(&mut rec, &mut exp, &notes, key, entry.as_ref().map(|e| (e.version, e.expires_at, e.value.as_slice())))?;
                }
                meta.insert("last_version", last_version).map_err(backend)?;
            }
            txn.commit().map_err(backend)?;
            self.noted(&notes);
            Ok(())
        });
        if result.is_ok() {
            // Before the batch leaves the overlay: see `Snapshot`.
            self.refresh_snapshot();
        }
        // Counted before any shard lets its batch go: a reader that then
        // misses the key in the overlay sees that a flush completed and
        // reads the file again.
        self.flushed.fetch_add(1, Ordering::AcqRel);
        for (shard, taken) in overlay.shards.iter().zip(&batch) {
            let mut s = lock(shard);
            if result.is_err() {
                // Put the batch back under anything written since, to retry.
                for (k, v) in taken.iter() {
                    if let std::collections::hash_map::Entry::Vacant(slot) = s.dirty.entry(k.clone()) {
                        slot.insert(v.clone());
                        overlay.pending.fetch_add(1, Ordering::AcqRel);
                    }
                }
            }
            s.in_flight = Arc::new(OverlayMap::default());
        }
        overlay.flushing.store(0, Ordering::Release);
        let waiting = overlay.pending();
        match &result {
            Ok(()) => {
                if self.degraded.swap(false, Ordering::Relaxed) {
                    tracing::warn!(records, "store recovered: the records kept in memory are written to {}", self.path.display());
                }
            }
            Err(e) => {
                if !self.degraded.swap(true, Ordering::Relaxed) {
                    tracing::error!(
                        "store degraded: cannot write {} ({e}); {waiting} records kept in memory, retried every second",
                        self.path.display()
                    );
                }
                self.reopen();
            }
        }
        result
    }

    /// Runs `f` on the open database; a failure counts, and an I/O failure
    /// marks the store degraded (the handle is reopened by the next flush).
    fn with_db<T>(&self, f: impl FnOnce(&Database) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let guard = self.db.read().unwrap_or_else(|p| p.into_inner());
        let Some(db) = guard.as_ref() else {
            self.failures.fetch_add(1, Ordering::Relaxed);
            return Err(StoreError::Backend(format!("{} is closed after an I/O error; reopening", self.path.display())));
        };
        self.guarded(|| f(db))
    }

    /// Runs `f`, a call into redb, counting a failure. redb can panic on a
    /// damaged page (a file larger than CHECK_AT_OPEN_MAX_BYTES is not read
    /// through before it serves): that is a store failure, answered by the
    /// failure policy, not a panic in whatever thread asked.
    fn guarded<T>(&self, f: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
            .unwrap_or_else(|_| Err(StoreError::Backend(format!("redb panicked on {}: the file is damaged", self.path.display()))));
        if r.is_err() {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Takes the [`Snapshot`] again after a commit; on a failure, readers
    /// begin their own transactions until the next commit succeeds.
    fn refresh_snapshot(&self) {
        let one_at_a_time = lock(&self.refreshing);
        let fresh = self.with_db(|db| {
            let txn = db.begin_read().map_err(backend)?;
            Ok(Arc::new(txn.open_table(RECORDS).map_err(backend)?))
        });
        let unheld = {
            let mut s = self.snapshot.write().unwrap_or_else(|p| p.into_inner());
            if let Some(old) = std::mem::replace(&mut s.current, fresh.ok()) {
                s.retired.push(old);
            }
            // Ended here, outside the lock: see `Snapshot::retired`.
            let (unheld, held) = std::mem::take(&mut s.retired).into_iter().partition(|t| Arc::strong_count(t) == 1);
            s.retired = held;
            unheld
        };
        drop(one_at_a_time);
        drop::<Vec<Arc<Records>>>(unheld);
    }

    /// Ends every snapshot (before the database is closed). The key
    /// filter stays: the file it describes does not change.
    fn drop_snapshots(&self) {
        let _one_at_a_time = lock(&self.refreshing);
        let old = {
            let mut s = self.snapshot.write().unwrap_or_else(|p| p.into_inner());
            (s.current.take(), std::mem::take(&mut s.retired))
        };
        drop(old);
    }

    /// The key filters a write transaction that has begun notes its keys
    /// in: the one in use and the one being built, if any.
    fn notes(&self) -> Notes {
        let s = self.snapshot.read().unwrap_or_else(|p| p.into_inner());
        Notes { filters: s.keys.iter().chain(&s.building).cloned().collect(), full: Default::default() }
    }

    /// After a write transaction: wakes the key filter's builder if the
    /// filter went past its capacity.
    fn noted(&self, notes: &Notes) {
        if notes.full.get()
            && let Some(t) = self.key_builder.get()
        {
            t.unpark();
        }
    }

    /// Builds a key filter for the file and puts it in use.
    ///
    /// Sized for twice the records the file holds, so it fills once the
    /// store has doubled or churned through as many keys again. The new
    /// filter is registered while this thread holds redb's write lock: a
    /// write transaction still open then has committed before the scan
    /// begins (so the scan finds its keys), and every later one notes its
    /// keys in the new filter itself. The scan reads [`READ_THROUGH_CHUNK`]
    /// keys per read transaction, letting go of the store between them; a
    /// key removed meanwhile is not needed, one written meanwhile was
    /// noted. The store is held only for each step (it can close meanwhile:
    /// then `Ok(None)`). Returns the filter's keys and bytes.
    fn build_key_filter(store: &Weak<Inner>) -> Result<Option<(usize, usize)>, StoreError> {
        let Some(this) = hold(store) else { return Ok(None) };
        let records = this.with_db(|db| {
            let txn = db.begin_read().map_err(backend)?;
            txn.open_table(RECORDS).map_err(backend)?.len().map_err(backend)
        })?;
        let fresh = Arc::new(KeyFilter::with_capacity(usize::try_from(records).unwrap_or(usize::MAX).saturating_mul(2)));
        this.with_db(|db| {
            let txn = db.begin_write().map_err(backend)?;
            this.snapshot.write().unwrap_or_else(|p| p.into_inner()).building = Some(fresh.clone());
            txn.abort().map_err(backend)
        })?;
        drop(this);
        let scanned = (|| {
            let mut after: Option<String> = None;
            loop {
                let Some(this) = hold(store) else { return Ok(false) };
                let (n, last) = this.with_db(|db| {
                    let txn = db.begin_read().map_err(backend)?;
                    let rec = txn.open_table(RECORDS).map_err(backend)?;
                    let (mut n, mut last) = (0, None);
                    for item in records_after(&rec, after.as_deref())?.take(READ_THROUGH_CHUNK) {
                        let (k, _) = item.map_err(backend)?;
                        fresh.note(k.value());
                        n += 1;
                        last = Some(k);
                    }
                    Ok((n, last.map(|k| k.value().to_string())))
                })?;
                if n < READ_THROUGH_CHUNK {
                    return Ok(true);
                }
                after = last;
            }
        })();
        let Some(this) = hold(store) else { return Ok(None) };
        let mut s = this.snapshot.write().unwrap_or_else(|p| p.into_inner());
        s.building = None;
        if !scanned? {
            return Ok(None);
        }
        s.keys = Some(fresh.clone());
        Ok(Some((fresh.keys(), fresh.bytes())))
    }

    /// The background half of the check at open for a large file (see
    /// [`CHECK_AT_OPEN_MAX_BYTES`]): reads every record and index entry,
    /// [`READ_THROUGH_CHUNK`] at a time (holding the store only meanwhile),
    /// and logs what it finds. Damage found here cannot refuse the start
    /// any more: it is logged as an error that says what to do, and
    /// counted as a store failure; calls that meet it fail (the failure
    /// policy answers them) rather than panic.
    fn read_through(store: &Weak<Inner>) {
        let t = std::time::Instant::now();
        let (mut cursor, mut n) = (Cursor::Records(None), 0);
        while !matches!(cursor, Cursor::Done) {
            let Some(inner) = hold(store) else { return };
            match inner.with_db(|db| read_through_step(db, cursor, READ_THROUGH_CHUNK)) {
                Ok((next, read)) => (cursor, n) = (next, n + read),
                Err(e) => return tracing::error!("{}: {}", inner.path.display(), damaged_advice(&e)),
            }
        }
        tracing::info!(records = n, "store read through in {:.1} s: no damage found", t.elapsed().as_secs_f64());
    }

    /// Closes the database and opens it again: after an I/O error redb
    /// refuses all work until then.
    fn reopen(&self) {
        self.drop_snapshots();
        {
            let mut guard = self.db.write().unwrap_or_else(|p| p.into_inner());
            *guard = None;
            let reopened = std::panic::catch_unwind(|| Database::builder().set_cache_size(self.cache_bytes).create(&self.path));
            match reopened {
                Ok(Ok(db)) => *guard = Some(db),
                Ok(Err(e)) => tracing::debug!("reopening {} failed (will retry): {e}", self.path.display()),
                Err(_) => tracing::error!("reopening {} panicked in redb (will retry)", self.path.display()),
            }
        }
        self.refresh_snapshot();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::error!("flushing the store on close failed: {e}");
        }
        // Before the database they read (a field dropped after this).
        self.drop_snapshots();
    }
}

/// Builds the key filter at start, then again whenever the one in use is
/// full (woken by the write that filled it; checked every
/// [`KEY_FILTER_CHECK`] too). Until the first one is built, and after a
/// failed build, reads go to the file as before.
fn key_builder(store: Weak<Inner>) {
    let mut first = true;
    loop {
        if !first {
            std::thread::park_timeout(KEY_FILTER_CHECK);
        }
        let Some(inner) = hold(&store) else { return };
        let due = first || inner.snapshot.read().unwrap_or_else(|p| p.into_inner()).keys.as_ref().is_none_or(|k| k.is_full());
        drop(inner);
        first = false;
        if !due {
            continue;
        }
        let t = std::time::Instant::now();
        match Inner::build_key_filter(&store) {
            Ok(Some((keys, bytes))) => tracing::debug!(keys, bytes, "store key filter built in {:.0} ms", t.elapsed().as_secs_f64() * 1e3),
            Ok(None) => return,
            // Reads go to the file meanwhile; tried again later.
            Err(e) => tracing::debug!("building the store's key filter failed (will retry): {e}"),
        }
    }
}

/// How often the key filter's builder looks whether the filter in use is
/// missing or full, besides being woken.
const KEY_FILTER_CHECK: Duration = Duration::from_secs(10);

fn flusher(store: Weak<Inner>) {
    loop {
        // Woken early (unparked) when the overlay reaches OVERLAY_MAX.
        std::thread::park_timeout(FLUSH_EVERY);
        let Some(inner) = hold(&store) else { return };
        if inner.db.read().unwrap_or_else(|p| p.into_inner()).is_none() {
            inner.reopen();
        }
        // Errors are logged by `flush` (once when the store degrades).
        let _ = inner.flush();
    }
}

#[async_trait]
impl Store for RedbStore {
    async fn get(&self, key: &str, now: u64) -> Result<Option<Entry>, StoreError> {
        // The overlay first in both modes: in `immediate` mode it holds
        // what a disk fault could not write yet.
        let pending = self.inner.overlay.lookup(key);
        let entry = match pending {
            Some(e) => e,
            None => self.read_file(key)?,
        };
        Ok(entry.filter(|e| e.expires_at > now))
    }

    async fn get_many(&self, keys: &[String], now: u64) -> Result<Vec<Option<Entry>>, StoreError> {
        // As `get` for each key, in two passes: the overlay for all, then
        // one snapshot of the file for those it did not hold (taken after
        // their misses, as in `get`). One call, not a boxed future, a
        // snapshot and a panic guard a key.
        let mut slots: Vec<Option<Option<Entry>>> = keys.iter().map(|k| self.inner.overlay.lookup(k)).collect();
        if slots.iter().any(Option::is_none) {
            self.read_file_into(keys.iter().map(String::as_str).zip(slots.iter_mut()))?;
        }
        Ok(slots.into_iter().map(|e| e.flatten().filter(|e| e.expires_at > now)).collect())
    }

    async fn set(&self, key: &str, value: &[u8], expires_at: u64, cond: Condition, now: u64) -> Result<WriteOutcome, StoreError> {
        let written = self.write_any(key, Some((value, expires_at)), cond, now)?;
        Ok(written.map_or(WriteOutcome::Conflict, WriteOutcome::Written))
    }

    async fn delete(&self, key: &str, cond: Condition, now: u64) -> Result<bool, StoreError> {
        Ok(self.write_any(key, None, cond, now)?.is_some())
    }

    async fn sweep(&self, now: u64) -> Result<u64, StoreError> {
        off_runtime(&self.inner, move |inner| inner.sweep(now)).await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        off_runtime(&self.inner, Inner::flush).await
    }

    async fn count_prefix(&self, prefix: &str, now: u64) -> Result<Option<u64>, StoreError> {
        let prefix = prefix.to_string();
        off_runtime(&self.inner, move |inner| inner.count_prefix(&prefix, now)).await
    }

    fn failures(&self) -> u64 {
        self.inner.failures.load(Ordering::Relaxed)
    }

    fn degraded(&self) -> bool {
        self.is_degraded()
    }

    async fn scan(&self, cursor: Option<String>, limit: usize, now: u64) -> Result<Page, StoreError> {
        off_runtime(&self.inner, move |inner| inner.scan(cursor, limit, now)).await
    }
}

/// Runs `f` (work that walks the file or waits for the disk: a sweep, a
/// flush, a count, a scan) on tokio's blocking pool when called from a
/// multi-threaded runtime, so the threads that answer peers never do it;
/// inline otherwise (a current-thread runtime, or no runtime).
async fn off_runtime<T: Send + 'static>(
    inner: &Arc<Inner>,
    f: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            let inner = inner.clone();
            tokio::task::spawn_blocking(move || f(&inner)).await.map_err(|e| StoreError::Backend(format!("store task failed: {e}")))?
        }
        _ => f(inner),
    }
}

impl Inner {
    /// Removes records expired at `now`, in short transactions
    /// ([`SWEEP_BATCH`] records each) so that the flusher, which needs the
    /// same write lock, never waits long behind a sweep.
    fn sweep(&self, now: u64) -> Result<u64, StoreError> {
        // The overlay's entries are swept once they are in the file.
        self.flush()?;
        let mut total = 0;
        let mut flushed_at = std::time::Instant::now();
        loop {
            // The flusher would wait behind these transactions for redb's
            // write lock (and lose the race for it each time): the sweep
            // flushes the overlay itself as often as the flusher would.
            if flushed_at.elapsed() >= FLUSH_EVERY || self.overlay.pending() >= OVERLAY_MAX {
                self.flush()?;
                flushed_at = std::time::Instant::now();
            }
            let n = self.with_db(|db| {
                let txn = db.begin_write().map_err(backend)?;
                let n = {
                    let mut rec = txn.open_table(RECORDS).map_err(backend)?;
                    let mut exp = txn.open_table(EXPIRY).map_err(backend)?;
                    let mut due = Vec::with_capacity(SWEEP_BATCH);
                    for item in exp.range((0u64, "")..=(now, "\u{10FFFF}")).map_err(backend)?.take(SWEEP_BATCH) {
                        let (k, _) = item.map_err(backend)?;
                        let (at, key) = k.value();
                        due.push((at, key.to_string()));
                    }
                    for (at, key) in &due {
                        exp.remove((*at, key.as_str())).map_err(backend)?;
                        // Only if the record was not written again since
                        // (then it has a later expiry and its own index entry).
                        let stale = record(&rec, key.as_str())?.is_some_and(|e| e.expires_at == *at);
                        if stale {
                            rec.remove(key.as_str()).map_err(backend)?;
                        }
                    }
                    due.len()
                };
                // Durable, with quick repair like a flush: redb's
                // non-durable commits leave their pages in its write buffer,
                // which readers then write back themselves when the file
                // outgrows the cache (request stalls of over a second at 5M
                // records), and a crash after one would cost a full repair.
                // Nothing removed: nothing to commit (a durable commit is
                // two fsyncs, every sweep interval).
                let mut txn = txn;
                if n == 0 {
                    txn.abort().map_err(backend)?;
                } else {
                    txn.set_quick_repair(true);
                    txn.commit().map_err(backend)?;
                }
                Ok(n)
            })?;
            if n > 0 {
                // Also lets redb reuse the pages this batch freed, which
                // the previous snapshot still pinned.
                self.refresh_snapshot();
            }
            total += n as u64;
            if n < SWEEP_BATCH {
                return Ok(total);
            }
            // Let a waiting flush have the write lock between batches.
            std::thread::yield_now();
        }
    }

    /// Live records under `prefix`; all records (live or expired but not yet
    /// swept) for the empty prefix, read from the table's length at once
    /// instead of walking millions of records.
    fn count_prefix(&self, prefix: &str, now: u64) -> Result<Option<u64>, StoreError> {
        // The overlay's entries count once they are in the file.
        self.flush()?;
        self.with_db(|db| {
            let txn = db.begin_read().map_err(backend)?;
            let rec = txn.open_table(RECORDS).map_err(backend)?;
            if prefix.is_empty() {
                return Ok(Some(rec.len().map_err(backend)?));
            }
            let end = format!("{prefix}\u{10FFFF}");
            let mut n = 0u64;
            for item in rec.range::<&str>(prefix..end.as_str()).map_err(backend)? {
                let (_, v) = item.map_err(backend)?;
                if decode(v.value()).is_some_and(|e| e.expires_at > now) {
                    n += 1;
                }
            }
            Ok(Some(n))
        })
    }

    /// One page of live records after `cursor`.
    fn scan(&self, cursor: Option<String>, limit: usize, now: u64) -> Result<Page, StoreError> {
        self.flush()?;
        let guard = self.db.read().unwrap_or_else(|p| p.into_inner());
        let db = guard.as_ref().ok_or_else(|| StoreError::Backend("the store file is closed after an I/O error".into()))?;
        let txn = db.begin_read().map_err(backend)?;
        let rec = txn.open_table(RECORDS).map_err(backend)?;
        let limit = limit.max(1);
        let mut page = Page::default();
        let mut seen = 0;
        let range = match &cursor {
            Some(c) => rec.range::<&str>((std::ops::Bound::Excluded(c.as_str()), std::ops::Bound::Unbounded)),
            None => rec.range::<&str>(..),
        }
        .map_err(backend)?;
        for item in range {
            let (k, v) = item.map_err(backend)?;
            seen += 1;
            let key = k.value().to_string();
            if let Some(e) = decode(v.value()).filter(|e| e.expires_at > now) {
                page.entries.push((key.clone(), e));
            }
            if seen == limit {
                page.next = Some(key);
                break;
            }
        }
        Ok(page)
    }
}

#[cfg(test)]
mod tests {
    use redb::{Database, ReadableDatabase, ReadableTable};

    use super::*;

    /// The expiry index holds exactly one entry per record, at its expiry:
    /// a rewrite with another expiry moves it, one with the same expiry
    /// leaves it, a removal takes it away.
    #[test]
    fn the_expiry_index_follows_every_record() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("t.db")).unwrap();
        let steps: [(&str, Option<u64>); 6] =
            [("a", Some(10)), ("a", Some(20)), ("a", Some(20)), ("b", Some(10)), ("c", Some(30)), ("b", None)];
        for (key, at) in steps {
            let txn = db.begin_write().unwrap();
            {
                let mut rec = txn.open_table(RECORDS).unwrap();
                let mut exp = txn.open_table(EXPIRY).unwrap();
                put_record(&mut rec, &mut exp, &Notes::default(), key, at.map(|at| (1, at, &b"v"[..]))).unwrap();
            }
            txn.commit().unwrap();
        }
        let txn = db.begin_read().unwrap();
        let exp = txn.open_table(EXPIRY).unwrap();
        let index: Vec<(u64, String)> = exp
            .iter()
            .unwrap()
            .map(|e| {
                let (k, _) = e.unwrap();
                let (at, key) = k.value();
                (at, key.to_string())
            })
            .collect();
        assert_eq!(index, [(20, "a".to_string()), (30, "c".to_string())]);
        let rec = txn.open_table(RECORDS).unwrap();
        assert_eq!(rec.len().unwrap(), 2);
        assert_eq!(record(&rec, "a").unwrap().map(|e| e.expires_at), Some(20));
        assert!(record(&rec, "b").unwrap().is_none());
    }

    /// Waits for the key filter built at open.
    fn key_filter(store: &RedbStore) -> Arc<KeyFilter> {
        for _ in 0..500 {
            if let Some(k) = store.inner.snapshot.read().unwrap().keys.clone() {
                return k;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("no key filter after 5 s");
    }

    fn put(store: &RedbStore, key: &str) {
        store.write_any(key, Some((b"v", 1_000)), Condition::Any, 0).unwrap();
    }

    /// A key the file does not hold is answered without reading the file;
    /// one it holds, written before the store opened or since, is read.
    #[test]
    fn keys_the_file_does_not_hold_are_not_read_from_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        {
            let store = RedbStore::open(&path, Durability::Periodic).unwrap();
            put(&store, "t/before");
            store.inner.flush().unwrap();
        }
        let store = RedbStore::open(&path, Durability::Periodic).unwrap();
        key_filter(&store);
        put(&store, "t/since");
        store.inner.flush().unwrap();
        let reads = || store.inner.file_reads.load(Ordering::Relaxed);
        let before = reads();
        for i in 0..1_000 {
            assert!(store.read_file(&format!("wl/client/192.0.2.{i}")).unwrap().is_none());
        }
        // A false "maybe" is a read; at 1% of capacity hardly any.
        assert!(reads() - before < 20, "{} of 1 000 absent keys read from the file", reads() - before);
        for key in ["t/before", "t/since"] {
            let before = reads();
            assert_eq!(store.read_file(key).unwrap().map(|e| e.value), Some(b"v".to_vec()), "{key}");
            assert_eq!(reads(), before + 1);
        }
    }

    /// Filters built again and again while writers flush keys of their
    /// own never miss one: each key written is read back from the file
    /// (the overlay flushed) by every filter that came after it.
    #[test]
    fn a_filter_built_while_keys_are_written_misses_none() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(&dir.path().join("t.db"), Durability::Periodic).unwrap());
        key_filter(&store);
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..3)
            .map(|w| {
                let (store, stop) = (store.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) || n < 2_000 {
                        put(&store, &format!("t/{w}/{n}"));
                        if n % 50 == 0 {
                            store.inner.flush().unwrap();
                        }
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        let weak = Arc::downgrade(&store.inner);
        let mut built = 0;
        for _ in 0..20 {
            assert!(Inner::build_key_filter(&weak).unwrap().is_some());
            built += 1;
        }
        stop.store(true, Ordering::Relaxed);
        let written: Vec<usize> = writers.into_iter().map(|w| w.join().unwrap()).collect();
        store.inner.flush().unwrap();
        let filter = store.inner.snapshot.read().unwrap().keys.clone().unwrap();
        for (w, n) in written.iter().enumerate() {
            for i in 0..*n {
                let key = format!("t/{w}/{i}");
                assert!(filter.may_hold(&key), "the filter misses {key} after {built} builds");
                assert!(store.read_file(&key).unwrap().is_some(), "{key}");
            }
        }
    }

    /// A full filter is built again, for the records the file holds.
    #[test]
    fn a_full_filter_is_built_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("t.db"), Durability::Periodic).unwrap();
        let first = key_filter(&store);
        // As a write transaction notes its keys: the one that fills the
        // filter wakes the builder.
        let notes = store.inner.notes();
        for i in 0..super::super::keyfilter::MIN_KEYS + 20_000 {
            notes.note(&format!("noise/{i}"));
        }
        assert!(first.is_full());
        put(&store, "t/one");
        store.inner.flush().unwrap();
        store.inner.noted(&notes);
        for _ in 0..500 {
            let now = key_filter(&store);
            if !Arc::ptr_eq(&now, &first) {
                assert!(!now.is_full());
                assert!(now.may_hold("t/one"));
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the full filter was not built again");
    }

    /// A store on no page cache at all (`[store] cache_mib = 0`) reads and
    /// writes the file directly: every record flushed there, rewritten and
    /// read back after a reopen is right.
    #[test]
    fn no_page_cache_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let options = RedbOptions { cache_bytes: 0, ..RedbOptions::default() };
        let store = RedbStore::open_with(&path, &options).unwrap();
        for i in 0..3_000 {
            store.write_any(&format!("t/{i}"), Some((format!("v{i}").as_bytes(), 1_000)), Condition::Any, 0).unwrap();
        }
        store.inner.flush().unwrap();
        for i in (0..3_000).step_by(3) {
            store.write_any(&format!("t/{i}"), Some((b"again", 2_000)), Condition::Any, 0).unwrap();
        }
        drop(store);
        let store = RedbStore::open_with(&path, &options).unwrap();
        for i in 0..3_000 {
            let e = store.read_file(&format!("t/{i}")).unwrap().unwrap();
            let want = if i % 3 == 0 { b"again".to_vec() } else { format!("v{i}").into_bytes() };
            assert_eq!((e.value, e.expires_at), (want, if i % 3 == 0 { 2_000 } else { 1_000 }), "t/{i}");
        }
    }
}
