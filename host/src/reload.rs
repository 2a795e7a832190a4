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
use std::time::Duration;

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio::sync::Mutex;

use crate::artifact_cache::ArtifactCache;
use crate::engine::{CompiledFilter, Filter, FilterOptions, LoadError, Runtime};
use crate::store::Store;
use crate::types::{Context, Session, Transaction};

/// The filter in service, swappable: readers take a snapshot per request.
pub type FilterSlot = Arc<ArcSwap<Filter>>;

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
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
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

struct Current {
    source: FilterSource,
    options: FilterOptions,
    hash: String,
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
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn hash(bytes: &[u8], options: &FilterOptions) -> String {
    let mut h = Sha256::new();
    h.update(Sha256::digest(bytes));
    h.update(options.config.as_bytes());
    h.update(format!("{:?}{:?}{}", options.limits, options.failure_policy, options.namespace).as_bytes());
    hex(&h.finalize())
}

fn read(source: &FilterSource) -> Result<Vec<u8>, ReloadError> {
    match source {
        FilterSource::Embedded => Ok(crate::REFERENCE_FILTER.to_vec()),
        FilterSource::File(p) => std::fs::read(p).map_err(|source| ReloadError::Read { path: p.display().to_string(), source }),
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
        let filter = load_checked(&runtime, compiled.clone(), options.clone(), store.clone()).await?;
        let h = hash(&bytes, &options);
        Ok(Reloader {
            runtime,
            store,
            slot: Arc::new(ArcSwap::from_pointee(filter)),
            current: Mutex::new(Current { source, options, hash: h }),
            compiled: std::sync::Mutex::new(vec![(hex(&Sha256::digest(&bytes)), compiled)]),
            cache,
        })
    }

    /// The slot the front ends read.
    pub fn slot(&self) -> FilterSlot {
        self.slot.clone()
    }

    /// The filter serving now.
    pub fn filter(&self) -> Arc<Filter> {
        self.slot.load_full()
    }

    /// Reloads from the same source with the same options (the file may have changed).
    pub async fn reload(&self) -> Result<ReloadOutcome, ReloadError> {
        self.reload_with(None, None).await
    }

    /// Reloads, optionally from a new source and with new options.
    pub async fn reload_with(&self, source: Option<FilterSource>, options: Option<FilterOptions>) -> Result<ReloadOutcome, ReloadError> {
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
            let filter = load_checked(&self.runtime, compiled, options.clone(), self.store.clone()).await?;
            let info = filter.info().clone();
            self.slot.store(Arc::new(filter));
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
async fn compile(runtime: &Runtime, bytes: &[u8], cache: Option<ArtifactCache>) -> Result<CompiledFilter, ReloadError> {
    let rt = runtime.clone();
    let owned = bytes.to_vec();
    let work = move || match &cache {
        Some(c) => c.compile(&rt, &owned).map(|(compiled, origin)| {
            tracing::debug!(?origin, "filter compiled");
            compiled
        }),
        None => rt.compile(&owned),
    };
    Ok(tokio::task::spawn_blocking(work).await.map_err(|e| ReloadError::Options(format!("compile task failed: {e}")))??)
}

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
