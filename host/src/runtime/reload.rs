//! Hot reload: swap the filter (a new `.wasm`, or new configuration)
//! without a restart and without losing a request or a greylist record.
//!
//! The pipeline runs entirely off the request path: read the file → content
//! hash (an unchanged file and configuration is not reloaded) → compile (on a
//! blocking thread) → type-check against the host's world → `init(config)`
//! and a smoke call under the filter's deadline → atomic swap. Calls in
//! flight finish on the version they started with; every call after the
//! swap uses the new one. A refused version (not Wasm, wrong world, init
//! error, trap in the smoke call) leaves the current one serving; the
//! refusal is logged and returned.
//!
//! Triggers (wired by [`crate::daemon`]): a change of the filter file or the
//! configuration file (watched with `notify`, debounced, correct for an
//! atomic rename into place), SIGHUP, and `greyhook reload` on the control
//! socket.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio::sync::Mutex;

use crate::domain::types::{Context, Session, Transaction};
use crate::runtime::artifact_cache::ArtifactCache;
use crate::runtime::{CompiledFilter, Filter, FilterOptions, LoadError, Runtime};
use crate::store::Store;

/// The largest filter component read (256 MiB: a Python filter made with
/// componentize-py is ~40 MB; a larger file, or `/dev/zero`, is refused
/// before it takes the memory).
pub const MAX_COMPONENT_FILE: u64 = 256 << 20;

/// One link of a [`crate::Chain`]: the filter in service, which a
/// [`Reloader`] can swap while requests run (each request takes a snapshot
/// and finishes on the version it started with).
#[derive(Clone)]
pub struct FilterSlot(Arc<ArcSwap<Filter>>);

impl FilterSlot {
    /// A slot holding `filter` for good (nothing reloads it).
    pub fn fixed(filter: Filter) -> FilterSlot {
        FilterSlot(Arc::new(ArcSwap::from_pointee(filter)))
    }

    /// The filter serving now.
    pub fn load(&self) -> Arc<Filter> {
        self.0.load_full()
    }

    fn swap(&self, filter: Arc<Filter>) -> Arc<Filter> {
        self.0.swap(filter)
    }

    fn store(&self, filter: Arc<Filter>) {
        self.0.store(filter)
    }
}

/// Where a filter comes from: a file, or the embedded reference filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterSource {
    /// A `.wasm` file, read again at every reload.
    File(PathBuf),
    /// [`crate::REFERENCE_FILTER`].
    Embedded,
}

/// Why a reload was refused (the old version keeps serving).
#[derive(Debug, Error)]
pub enum ReloadError {
    /// The file cannot be read.
    #[error("cannot read {path}: {error}")]
    Read {
        /// The file.
        path: String,
        /// The error (its text is in the message: not a `source` too).
        error: std::io::Error,
    },
    /// The new version failed to load.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The new version failed its smoke call.
    #[error("the new version failed its smoke call: {0}")]
    Smoke(String),
    /// The new options cannot be used.
    #[error("{0}")]
    Options(String),
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// A new version is serving.
    Loaded {
        /// Its name.
        name: String,
        /// Its version.
        version: String,
        /// SHA-256 of the component and configuration, hex.
        hash: String,
    },
    /// Neither the file nor the configuration changed.
    Unchanged {
        /// The hash of what is serving.
        hash: String,
    },
}

impl std::fmt::Display for ReloadOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReloadOutcome::Loaded { name, version, hash } => write!(f, "loaded {name} {version} (sha256 {})", &hash[..16]),
            ReloadOutcome::Unchanged { hash } => write!(f, "unchanged (sha256 {})", &hash[..16]),
        }
    }
}

#[derive(Clone)]
struct Current {
    source: FilterSource,
    options: FilterOptions,
    hash: String,
}

/// When a new version fails too often it is reverted to the last known-good
/// one, and not loaded again for a while.
#[derive(Debug, Clone)]
pub struct BreakerConfig {
    /// Failures within `window` that trip the breaker (and at least half of
    /// the calls in it failed).
    pub failures: u64,
    /// The window.
    pub window: Duration,
    /// How long a reverted version is refused; doubles each time it trips again.
    pub backoff: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig { failures: 20, window: Duration::from_secs(10), backoff: Duration::from_secs(60) }
    }
}

#[derive(Default)]
struct Breaker {
    /// The version before the current one, with what it was loaded from.
    previous: Option<(Arc<Filter>, Current)>,
    /// Hashes in back-off: until when, and the back-off to use next time.
    banned: std::collections::HashMap<String, (std::time::Instant, Duration)>,
    /// (calls, failures) of the current version at the last sample.
    last: (u64, u64),
}

/// How many compiled components are kept for reuse (a configuration-only
/// reload, or a swap back to a recent file, does not compile again).
const COMPILED_KEEP: usize = 4;

/// Reloads one filter slot.
pub struct Reloader {
    runtime: Runtime,
    store: Arc<dyn Store>,
    slot: FilterSlot,
    /// Serialises reloads and remembers what is serving.
    current: Mutex<Current>,
    /// Recently compiled components by content hash, newest last.
    compiled: std::sync::Mutex<Vec<(String, CompiledFilter)>>,
    /// Compiled artifacts on disk, across restarts.
    cache: Option<ArtifactCache>,
    breaker: std::sync::Mutex<Breaker>,
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn hash(bytes: &[u8], options: &FilterOptions) -> String {
    let mut h = Sha256::new();
    h.update(Sha256::digest(bytes));
    h.update(options.config.as_bytes());
    h.update(format!("{:?}{:?}{:?}", options.limits, options.failure_policy, options.namespace).as_bytes());
    hex(&h.finalize())
}

fn read(source: &FilterSource) -> Result<Vec<u8>, ReloadError> {
    match source {
        #[cfg(feature = "reference-filter")]
        FilterSource::Embedded => Ok(crate::REFERENCE_FILTER.to_vec()),
        #[cfg(not(feature = "reference-filter"))]
        FilterSource::Embedded => {
            Err(ReloadError::Options("no filter named, and this build embeds none (feature reference-filter)".into()))
        }
        FilterSource::File(p) => {
            crate::settings::read_bounded(p, MAX_COMPONENT_FILE).map_err(|error| ReloadError::Read { path: p.display().to_string(), error })
        }
    }
}

impl Reloader {
    /// Loads the first version (failing if it is refused) and returns the
    /// reloader with its slot. `cache` keeps compiled artifacts on disk, so
    /// a restart or a swap back to a known file does not compile again.
    pub async fn start(
        runtime: Runtime,
        store: Arc<dyn Store>,
        source: FilterSource,
        options: FilterOptions,
        cache: Option<ArtifactCache>,
    ) -> Result<Reloader, ReloadError> {
        let bytes = read(&source)?;
        let compiled = compile(&runtime, &bytes, cache.clone()).await?;
        let filter = match load_checked(&runtime, compiled.clone(), options.clone(), store.clone()).await {
            Ok(f) => f,
            Err(e) => {
                // A refused component's artifact would never be used (a
                // refused configuration of a good one keeps it).
                if matches!(e, ReloadError::Load(LoadError::World(_) | LoadError::Compile(_)))
                    && let Some(c) = &cache
                {
                    c.forget(&runtime, &bytes);
                }
                return Err(e);
            }
        };
        let h = hash(&bytes, &options);
        Ok(Reloader {
            runtime,
            store,
            slot: FilterSlot::fixed(filter),
            current: Mutex::new(Current { source, options, hash: h }),
            compiled: std::sync::Mutex::new(vec![(hex(&Sha256::digest(&bytes)), compiled)]),
            cache,
            breaker: std::sync::Mutex::new(Breaker::default()),
        })
    }

    /// The slot the front ends read.
    pub fn slot(&self) -> FilterSlot {
        self.slot.clone()
    }

    /// The filter serving now.
    pub fn filter(&self) -> Arc<Filter> {
        self.slot.load()
    }

    /// Reloads from the same source with the same options (the file may have changed).
    pub async fn reload(&self) -> Result<ReloadOutcome, ReloadError> {
        self.reload_with(None, None).await
    }

    /// Reloads, optionally from a new source and with new options.
    pub async fn reload_with(&self, source: Option<FilterSource>, options: Option<FilterOptions>) -> Result<ReloadOutcome, ReloadError> {
        self.reload_checked(source, options, &|_| Ok(())).await
    }

    /// Like [`Reloader::reload_with`], and `check` may refuse the new
    /// version once it is loaded, before it serves (the daemon refuses one
    /// whose store namespace another filter of the chain uses).
    pub async fn reload_checked(
        &self,
        source: Option<FilterSource>,
        options: Option<FilterOptions>,
        check: &(dyn Fn(&Filter) -> Result<(), String> + Sync),
    ) -> Result<ReloadOutcome, ReloadError> {
        let mut cur = self.current.lock().await;
        let source = source.unwrap_or_else(|| cur.source.clone());
        let options = options.unwrap_or_else(|| cur.options.clone());
        let result = async {
            let bytes = read(&source)?;
            let h = hash(&bytes, &options);
            if h == cur.hash && source == cur.source {
                return Ok(ReloadOutcome::Unchanged { hash: h });
            }
            let compiled = self.compiled(&bytes).await?;
            if let Some((until, _)) = self.breaker().banned.get(&h).filter(|(until, _)| *until > std::time::Instant::now()) {
                let left = until.saturating_duration_since(std::time::Instant::now());
                return Err(ReloadError::Options(format!(
                    "this version tripped the crash-loop breaker; it is refused for {}s more",
                    left.as_secs() + 1
                )));
            }
            let filter = match load_checked(&self.runtime, compiled, options.clone(), self.store.clone()).await {
                Ok(f) => f,
                Err(e) => {
                    // A refused component's artifact would never be used
                    // (a refused *configuration* of a good component keeps it).
                    if matches!(e, ReloadError::Load(LoadError::World(_) | LoadError::Compile(_)))
                        && let Some(c) = &self.cache
                    {
                        c.forget(&self.runtime, &bytes);
                    }
                    return Err(e);
                }
            };
            check(&filter).map_err(ReloadError::Options)?;
            let info = filter.info().clone();
            let old = self.slot.swap(Arc::new(filter));
            // Kept to go back to, without its idle instances.
            old.set_retired(true);
            let mut b = self.breaker();
            b.previous = Some((old, cur.clone()));
            b.last = (0, 0);
            drop(b);
            *cur = Current { source: source.clone(), options: options.clone(), hash: h.clone() };
            Ok(ReloadOutcome::Loaded { name: info.name, version: info.version, hash: h })
        }
        .await;
        match &result {
            Ok(o @ ReloadOutcome::Loaded { .. }) => tracing::info!("filter reload: {o}"),
            Ok(o) => tracing::debug!("filter reload: {o}"),
            Err(e) => tracing::warn!("filter reload refused, the current version keeps serving: {e}"),
        }
        result
    }
}

impl Reloader {
    fn breaker(&self) -> std::sync::MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Samples the current version's counters (call it every
    /// `config.window`); if it failed too often since the last sample, puts
    /// the previous version back and refuses this one for a while. Returns
    /// why, if it tripped.
    pub async fn check_breaker(&self, config: &BreakerConfig) -> Option<String> {
        let mut cur = self.current.lock().await;
        let filter = self.slot.load();
        let (calls, failures) = (filter.stats().calls.load(Ordering::Relaxed), filter.stats().failures.load(Ordering::Relaxed));
        let mut b = self.breaker();
        let (dc, df) = (calls.saturating_sub(b.last.0), failures.saturating_sub(b.last.1));
        b.last = (calls, failures);
        if df < config.failures.max(1) || df * 2 < dc {
            return None;
        }
        let Some((previous, prev_cur)) = b.previous.take() else {
            tracing::error!("filter {} failed {df} of {dc} calls, but there is no earlier version to go back to", filter.info().name);
            return None;
        };
        let backoff = b.banned.get(&cur.hash).map_or(config.backoff, |(_, d)| *d * 2);
        b.banned.insert(cur.hash.clone(), (std::time::Instant::now() + backoff, backoff));
        b.last = (previous.stats().calls.load(Ordering::Relaxed), previous.stats().failures.load(Ordering::Relaxed));
        let why = format!(
            "crash loop: {} {} failed {df} of {dc} calls; back to {} {}; the failing version is refused for {}s",
            filter.info().name,
            filter.info().version,
            previous.info().name,
            previous.info().version,
            backoff.as_secs()
        );
        previous.set_retired(false);
        self.slot.store(previous);
        filter.set_retired(true);
        *cur = prev_cur;
        drop(b);
        tracing::warn!("{why}");
        Some(why)
    }

    /// The compiled component for `bytes`, from the recent ones or compiled now.
    async fn compiled(&self, bytes: &[u8]) -> Result<CompiledFilter, ReloadError> {
        let key = hex(&Sha256::digest(bytes));
        let hit = {
            let c = self.compiled.lock().unwrap_or_else(|p| p.into_inner());
            c.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone())
        };
        if let Some(c) = hit {
            return Ok(c);
        }
        let compiled = compile(&self.runtime, bytes, self.cache.clone()).await?;
        let mut c = self.compiled.lock().unwrap_or_else(|p| p.into_inner());
        if c.len() >= COMPILED_KEEP {
            c.remove(0);
        }
        c.push((key, compiled.clone()));
        Ok(compiled)
    }
}

/// Compiles (or loads the cached artifact) on a blocking thread: a compile
/// is hundreds of milliseconds of CPU.
///
/// A component from componentize-js or componentize-py is 12–18 MB and
/// takes tens of seconds to compile: the log says so when it starts, every
/// [`PROGRESS_EVERY`] while it runs, and when it is done; a cached artifact
/// loads in milliseconds. Artifacts unused for [`EVICT_AFTER`] are removed.
async fn compile(runtime: &Runtime, bytes: &[u8], cache: Option<ArtifactCache>) -> Result<CompiledFilter, ReloadError> {
    let rt = runtime.clone();
    let owned = bytes.to_vec();
    let cached = cache.as_ref().is_some_and(|c| c.holds(runtime, bytes));
    let mb = bytes.len() as f64 / 1e6;
    let started = std::time::Instant::now();
    if !cached {
        tracing::info!("compiling the filter ({mb:.1} MB of WebAssembly){}", if mb > 4.0 { "; this can take a while" } else { "" });
    }
    let work = move || match &cache {
        Some(c) => {
            let evicted = c.evict_unused(EVICT_AFTER);
            if evicted > 0 {
                tracing::info!("removed {evicted} compiled filters unused for {} days", EVICT_AFTER.as_secs() / 86_400);
            }
            c.compile(&rt, &owned).map(|(compiled, origin)| {
                tracing::debug!(?origin, "filter compiled");
                compiled
            })
        }
        None => rt.compile(&owned),
    };
    let mut task = tokio::task::spawn_blocking(work);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
    let done = loop {
        tokio::select! {
            r = &mut task => break r,
            _ = tick.tick() => tracing::info!("still compiling the filter ({} s so far)", started.elapsed().as_secs()),
        }
    };
    let compiled = done.map_err(|e| ReloadError::Options(format!("compile task failed: {e}")))??;
    if cached {
        tracing::info!("filter loaded from the compiled-filter cache in {:.0?}", started.elapsed());
    } else {
        tracing::info!("filter compiled in {:.1?}", started.elapsed());
    }
    Ok(compiled)
}

/// How often a long compile is reported.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Compiled artifacts not used for this long are removed from the cache.
const EVICT_AFTER: Duration = Duration::from_secs(30 * 86_400);

/// Type-checks, initialises and smoke-tests a compiled filter.
async fn load_checked(
    runtime: &Runtime,
    compiled: CompiledFilter,
    options: FilterOptions,
    store: Arc<dyn Store>,
) -> Result<Filter, ReloadError> {
    let filter = runtime.instantiate_filter(compiled, options, store).await?;
    // The smoke call: EHLO from a documentation address (no store writes
    // by the reference filter), under the filter's own deadline.
    let ctx = Context { session: Session::new("reload-smoke-test", [192, 0, 2, 1].into()), transaction: Transaction::default(), now: 0 };
    let deadline = filter.options().limits.deadline + Duration::from_millis(50);
    match tokio::time::timeout(deadline, filter.try_on_ehlo(&ctx)).await {
        Ok(Ok(_)) => Ok(filter),
        Ok(Err(e)) => Err(ReloadError::Smoke(e.to_string())),
        Err(_) => Err(ReloadError::Smoke(format!("no answer within {deadline:?}"))),
    }
}
