//! The wasmtime engine behind a narrow API: a [`Runtime`] compiles and
//! type-checks filters; a [`Filter`] runs hook calls on a pool of reused
//! instances, each call under a CPU deadline and a memory cap.
//!
//! Hooks are stateless, so an instance is reused across calls and requests
//! (a call on a warm instance costs a microsecond or two; a new instance
//! tens). A trap, a deadline or an invalid answer drops the instance (a trap
//! poisons the whole wasmtime `Store`) and the filter's [`FailurePolicy`]
//! answers instead; the next call gets a fresh instance.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use wasmtime::component::{Component, Linker};
use wasmtime::{Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::domain::reply::{self, InvalidVerdict};
use crate::domain::types::{Context, Decision, EhloVerdict, FilterInfo, Message, Phase, Reply, SkipHooks, Verdict};
use crate::runtime::metrics::FilterMetrics;
use crate::runtime::sandbox::{self, HostState, bindings, bindings_v01};
use crate::runtime::ticker::{TICK, Ticker};
use crate::store::Store;

/// A call is slow once it has run this many ticks (at least two whole
/// milliseconds): far past any sane decision, and past what a thread
/// preempted for a moment adds.
const SLOW_AFTER_TICKS: u64 = 3;
/// How long a filter stays a suspect after a call ran past its deadline.
const SUSPECT_FOR: Duration = Duration::from_secs(10);

/// Address space reserved for each linear memory (not memory used: the
/// pages past an instance's size are never mapped). With 4 GiB plus
/// wasmtime's guard region a 32-bit memory's accesses need no bounds
/// checks in the compiled code (the guard pages catch the out-of-bounds
/// ones); with a reservation the size of the memory cap every load and
/// store carried a compare and a Spectre-safe select. On a 32-bit host
/// the memory cap is reserved instead.
const MEMORY_RESERVATION: u64 = if cfg!(target_pointer_width = "64") { 1 << 32 } else { 0 };

/// Settings of the [`Runtime`] shared by all filters.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Most filter instances alive at once, over all filters (the size of
    /// the pooling allocator). A quarter of them at most (at least one of
    /// two or more) are kept idle for reuse, over all filters. A call that
    /// finds no idle instance of its filter and no free slot waits for
    /// either, within its deadline ([`FilterError::Busy`] past it): it is
    /// never failed for the load alone.
    pub max_instances: u32,
    /// The memory cap of one instance, bytes (the largest any filter's
    /// [`Limits::memory`] may be).
    pub max_memory: usize,
    /// The Wasm stack cap, bytes.
    pub max_stack: usize,
    /// Calls of a *suspect* filter (one of whose calls was still running
    /// at its deadline in the last ten seconds) that may run at once
    /// (default: half the CPUs, at least one): the rest wait, within their
    /// deadlines, so a runaway filter never holds every thread and other
    /// filters' calls keep their latency.
    pub slow_calls: usize,
    /// The resolver behind the `dns` and `auth` imports (default: the
    /// system's configuration, read on first use).
    pub resolver: crate::dns::Resolver,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        RuntimeConfig {
            max_instances: 64,
            max_memory: 64 << 20,
            max_stack: 512 << 10,
            slow_calls: (cpus / 2).max(1),
            resolver: crate::dns::Resolver::default(),
        }
    }
}

/// Per-filter limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// CPU and wall-clock deadline of one hook call (including its store calls).
    pub deadline: Duration,
    /// Memory cap of one instance, bytes (at most [`RuntimeConfig::max_memory`]).
    pub memory: usize,
    /// Most store calls in one hook call.
    pub store_calls: u32,
    /// Idle instances kept for reuse.
    pub idle_instances: usize,
    /// Longest record lifetime, seconds; a longer TTL is cut to this.
    pub max_ttl: u32,
    /// Bytes (keys and values) this filter may write to the store per
    /// minute, all instances together; past it a write is a store `limit`
    /// error (the failure policy answers), not a full disk.
    pub write_bytes_per_minute: u64,
    /// Log lines this filter may write per second, all instances together
    /// (and at most a tenth of it in one call); the rest are dropped and
    /// counted in one line.
    pub log_lines_per_second: u32,
    /// Records this filter may hold in the store (its namespace); past it,
    /// writes that would create a record are a store `limit` error. Counted
    /// every minute where the store can count (memory, redb); not enforced
    /// on Redis (bound it with `maxmemory` and TTLs).
    pub max_records: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            deadline: Duration::from_millis(100),
            memory: 32 << 20,
            store_calls: 64,
            idle_instances: 16,
            max_ttl: 100 * 86_400,
            write_bytes_per_minute: 64 << 20,
            log_lines_per_second: 200,
            max_records: 5_000_000,
        }
    }
}

/// What answers when a filter fails (trap, deadline, limit, invalid verdict,
/// store failure).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailurePolicy {
    /// No opinion: the mail goes on (fail open; greylisting must never lose mail).
    #[default]
    Continue,
    /// A temporary failure (`421` at connect, `451 4.3.0` elsewhere); the
    /// client retries later.
    Tempfail,
}

impl FailurePolicy {
    /// The verdict this policy gives at `phase`.
    pub fn verdict(self, phase: Phase) -> Verdict {
        match self {
            FailurePolicy::Continue => Verdict::cont(),
            FailurePolicy::Tempfail => Verdict {
                decision: Decision::Tempfail(Reply {
                    code: if phase == Phase::Connect { 421 } else { 451 },
                    enhanced: Some("4.3.0".into()),
                    text: vec!["Temporary local problem, please try again later".into()],
                    retry_after: None,
                }),
                ..Verdict::cont()
            },
        }
    }
}

/// Options of one loaded filter.
#[derive(Debug, Clone)]
pub struct FilterOptions {
    /// The configuration text handed to the filter's `init`.
    pub config: String,
    /// The store namespace: the filter's keys are stored as `namespace/key`.
    /// Letters, digits, `-`, `_` and `.`; 1 to 64 characters. `None` (the
    /// default): the filter's own name from `init`, so that two different
    /// filters never share records by accident (the store is not open to
    /// `init` then: the name is not known before it returns). Name the
    /// same namespace for two filters only to share their records on purpose.
    pub namespace: Option<String>,
    /// Limits.
    pub limits: Limits,
    /// What answers when the filter fails.
    pub failure_policy: FailurePolicy,
}

impl Default for FilterOptions {
    fn default() -> Self {
        FilterOptions { config: String::new(), namespace: None, limits: Limits::default(), failure_policy: FailurePolicy::Continue }
    }
}

/// Why a filter could not be loaded.
#[derive(Debug, Error)]
pub enum LoadError {
    /// The engine could not be set up.
    #[error("cannot set up the WebAssembly engine: {0}")]
    Engine(String),
    /// The bytes are not WebAssembly at all.
    #[error("not a WebAssembly file (no \\0asm header)")]
    NotWasm,
    /// A core module, not a component.
    #[error("a core WebAssembly module, not a component: build the filter for wasm32-wasip2 or wrap it with `wasm-tools component new`")]
    CoreModule,
    /// The component failed to compile.
    #[error("invalid component: {0}")]
    Compile(String),
    /// The component is not of a `greyhook:filter/filter` world this host
    /// provides (0.1.0 to 0.2.3), or imports what the host does not give.
    #[error("not a greyhook filter this host can run: {0}")]
    World(String),
    /// The filter's `init` refused its configuration.
    #[error("the filter refused its configuration: {0}")]
    Init(String),
    /// The filter trapped while starting.
    #[error("the filter failed while starting: {0}")]
    Start(String),
    /// Options out of range.
    #[error("invalid filter options: {0}")]
    Options(String),
}

/// Why a hook call failed (and the failure policy answered). More kinds
/// may come: match with a catch-all arm.
#[derive(Debug, Clone, Error)]
#[non_exhaustive]
pub enum FilterError {
    /// The filter trapped (panic, unreachable, out of memory, stack overflow...).
    #[error("filter trapped: {0}")]
    Trap(String),
    /// The call ran past its deadline.
    #[error("filter exceeded its deadline of {0:?}")]
    Deadline(Duration),
    /// The filter's answer broke the rules.
    #[error("invalid verdict: {0}")]
    Invalid(#[from] InvalidVerdict),
    /// A store call failed or broke a limit during the call.
    #[error("store: {0}")]
    Store(String),
    /// No instance could be made.
    #[error("cannot instantiate the filter: {0}")]
    Instantiate(String),
    /// The host is overloaded: every instance stayed busy with other calls
    /// for as long as the call's deadline ([`RuntimeConfig::max_instances`]),
    /// or a suspect filter's slow-call slots did, or the call was cut at
    /// its deadline having run for less than half of it (it waited the
    /// rest, behind other tasks). Not the filter's failure: answered with a
    /// tempfail whatever the failure policy.
    #[error("the host is overloaded: the call did not get to run within {0:?}")]
    Busy(Duration),
}

/// Counters of one filter.
#[derive(Debug, Default)]
pub struct Stats {
    /// Hook calls made.
    pub calls: AtomicU64,
    /// Calls answered by the failure policy.
    pub failures: AtomicU64,
    /// Instances created.
    pub instances: AtomicU64,
}

/// The engine shared by all filters: compiles, type-checks and instantiates.
/// Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<RuntimeInner>,
}

struct RuntimeInner {
    engine: Engine,
    linker: Linker<HostState>,
    config: RuntimeConfig,
    ticker: Ticker,
    /// Whether memories got the large reservation ([`Runtime::guard_pages`]).
    guarded: bool,
    /// The pooling allocator's slots: every instance alive, idle or in
    /// use, holds one permit (so making one never fails for lack of a
    /// slot). Taken and given back only when an instance is made or
    /// dropped: a call that reuses an idle instance touches no semaphore.
    slots: Arc<tokio::sync::Semaphore>,
    /// Places for idle instances, all filters together (see [`Reserved`]).
    idle: Arc<IdleCount>,
}

/// Places for idle instances, all filters together, at most `reserve`:
/// fewer than the pool's slots, so that while every slot is taken some
/// instances hold no place, and each of those whose call ends either gets
/// a place or is dropped, freeing a slot for a waiting call.
#[derive(Debug)]
struct IdleCount {
    now: AtomicUsize,
    reserve: usize,
}

/// An instance's place among the idle ones, kept while it serves a call
/// (so a call that reuses an idle instance counts nothing) and given back
/// when it is dropped.
struct Reserved(Arc<IdleCount>);

impl Reserved {
    /// A place, if the reserve has room.
    fn take(count: &Arc<IdleCount>) -> Option<Reserved> {
        let took = count.now.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < count.reserve).then_some(n + 1));
        took.is_ok().then(|| Reserved(count.clone()))
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The pooling allocator's `max_instances` slots, and how many of them
/// idle instances may hold: a quarter, and at least one when there are two
/// slots (without one, every call would make its instance anew, ~280k
/// instructions), always fewer than all.
fn share_slots(max_instances: u32) -> (usize, usize) {
    let n = max_instances.max(1) as usize;
    let idle = if n >= 2 { (n / 4).max(1) } else { 0 };
    (n, idle)
}

/// The engine's configuration: the pooling allocator sized by `config`,
/// epoch interruption, and `reservation` bytes of address space a memory.
fn engine_config(config: &RuntimeConfig, reservation: u64) -> wasmtime::Config {
    let mut pool = PoolingAllocationConfig::new();
    let n = config.max_instances.max(1);
    pool.total_component_instances(n)
        .total_core_instances(n * 8)
        .total_memories(n * 2)
        .total_tables(n * 8)
        .total_stacks(n)
        .max_memory_size(config.max_memory)
        // Keep the top of each fiber stack resident: otherwise every
        // call's stack is returned to the kernel (madvise) afterwards.
        .async_stack_keep_resident(256 << 10);
    let mut wc = wasmtime::Config::new();
    wc.epoch_interruption(true)
        .max_wasm_stack(config.max_stack)
        .async_stack_size(config.max_stack + (1 << 20))
        .memory_reservation(reservation)
        .memory_reservation_for_growth(0)
        // The pooling allocator never moves a memory (each has its slot,
        // up to `max_memory`): compiled code may keep the base pointer in a
        // register across loops instead of reloading it.
        .memory_may_move(false)
        // Tables initialised at instantiation: an indirect call (a `dyn`
        // method, the formatting machinery) then skips the lazy-init check.
        .table_lazy_init(false)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    // For profiling: `GREYHOOK_PERFMAP=1` names the filters' compiled
    // functions in /tmp/perf-PID.map, which `perf report` reads (and the
    // breakdown of `cargo bench --bench filter -- --instructions` maps
    // callgrind's addresses with; docs/performance.md).
    if std::env::var_os("GREYHOOK_PERFMAP").is_some_and(|v| v == "1") {
        wc.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    wc
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").field("config", &self.inner.config).finish()
    }
}

impl Runtime {
    /// Sets up the engine (pooling allocator, epoch interruption) and the
    /// linker with the host's imports.
    pub fn new(config: RuntimeConfig) -> Result<Runtime, LoadError> {
        let err = |e: wasmtime::Error| LoadError::Engine(format!("{e:#}"));
        let cap = config.max_memory as u64;
        // The large reservation needs address space, which `ulimit -v` (or
        // a tool such as valgrind) may refuse: then each memory reserves
        // only its cap, and pays for bounds checks in the compiled code.
        let (engine, guarded) = match Engine::new(&engine_config(&config, MEMORY_RESERVATION.max(cap))) {
            Ok(engine) => (engine, MEMORY_RESERVATION > cap),
            Err(e) if MEMORY_RESERVATION > cap => {
                tracing::warn!(
                    error = %format!("{e:#}"),
                    "cannot reserve address space for guard-page bounds checks; filters run with explicit bounds checks (slower)"
                );
                (Engine::new(&engine_config(&config, cap)).map_err(err)?, false)
            }
            Err(e) => return Err(err(e)),
        };
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(err)?;
        bindings::Filter::add_to_linker::<HostState, sandbox::Host>(&mut linker, |s| s).map_err(err)?;
        bindings_v01::Filter::add_to_linker::<HostState, sandbox::Host>(&mut linker, |s| s).map_err(err)?;
        sandbox::link_metrics(&mut linker).map_err(err)?;
        sandbox::link_store(&mut linker).map_err(err)?;
        let weak = engine.weak();
        let ticker =
            Ticker::start(move || weak.upgrade().map(|e| e.increment_epoch()).is_some()).map_err(|e| LoadError::Engine(e.to_string()))?;
        let (slots, reserve) = share_slots(config.max_instances);
        let slots = Arc::new(tokio::sync::Semaphore::new(slots));
        let idle = Arc::new(IdleCount { now: Default::default(), reserve });
        Ok(Runtime { inner: Arc::new(RuntimeInner { engine, linker, config, ticker, guarded, slots, idle }) })
    }

    /// True if filters' memory accesses are bounds-checked by guard pages
    /// (the fast way); false if the address space for them was refused
    /// and the compiled code checks every access.
    pub fn guard_pages(&self) -> bool {
        self.inner.guarded
    }

    /// Compiles `bytes` into a component, with a clear error for what is
    /// not one.
    pub fn compile(&self, bytes: &[u8]) -> Result<CompiledFilter, LoadError> {
        if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
            return Err(LoadError::NotWasm);
        }
        // Bytes 4..8: version 1 and layer 0 is a core module; components
        // have layer 1.
        if bytes[4..8] == [1, 0, 0, 0] {
            return Err(LoadError::CoreModule);
        }
        let component = Component::new(&self.inner.engine, bytes).map_err(|e| LoadError::Compile(format!("{e:#}")))?;
        Ok(CompiledFilter { component })
    }

    /// The compiled artifact of a component, for [`crate::runtime::artifact_cache`].
    pub(crate) fn serialize(&self, c: &CompiledFilter) -> Result<Vec<u8>, LoadError> {
        c.component.serialize().map_err(|e| LoadError::Compile(format!("{e:#}")))
    }

    /// A component from an artifact this process's cache wrote.
    ///
    /// # Safety
    /// `path` must hold an artifact written by [`Runtime::serialize`] of an
    /// engine with the same compatibility hash, and nobody else must have
    /// been able to write it (wasmtime trusts the machine code in it).
    pub(crate) unsafe fn deserialize_file(&self, path: &std::path::Path) -> Result<CompiledFilter, LoadError> {
        // SAFETY: the caller's contract above.
        let component =
            unsafe { Component::deserialize_file(&self.inner.engine, path) }.map_err(|e| LoadError::Compile(format!("{e:#}")))?;
        Ok(CompiledFilter { component })
    }

    /// A hash of everything that makes compiled artifacts compatible with
    /// this engine (wasmtime version, settings, CPU features).
    pub(crate) fn compatibility_hash(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.inner.engine.precompile_compatibility_hash().hash(&mut h);
        h.finish()
    }

    /// Loads a filter: compiles it, checks it against the world, makes a
    /// first instance and runs `init` with the options' configuration.
    pub async fn load(&self, bytes: &[u8], options: FilterOptions, store: Arc<dyn Store>) -> Result<Filter, LoadError> {
        let compiled = self.compile(bytes)?;
        self.instantiate_filter(compiled, options, store).await
    }

    /// Like [`Runtime::load`], from an already compiled filter.
    pub async fn instantiate_filter(
        &self,
        compiled: CompiledFilter,
        options: FilterOptions,
        store: Arc<dyn Store>,
    ) -> Result<Filter, LoadError> {
        if let Some(ns) = &options.namespace
            && !valid_namespace(ns)
        {
            return Err(LoadError::Options(format!("namespace {ns:?}: use 1 to 64 letters, digits, '-', '_' or '.'")));
        }
        if options.limits.memory > self.inner.config.max_memory {
            return Err(LoadError::Options(format!(
                "memory limit {} is over the runtime's {}",
                options.limits.memory, self.inner.config.max_memory
            )));
        }
        let contract = compiled.contract(self)?;
        let pre = self.inner.linker.instantiate_pre(&compiled.component).map_err(|e| LoadError::World(format!("{e:#}")))?;
        let world = |e: wasmtime::Error| LoadError::World(format!("{e:#}"));
        let pre = match contract {
            Contract::V0_1 => Pre::V1(bindings_v01::FilterPre::new(pre).map_err(world)?),
            // A 0.2.0, 0.2.1 or 0.2.2 filter is a 0.2.3 one that does not
            // use what came later: the 0.2.3 bindings find its exports
            // (semver-compatible names), and the linker gives its imports
            // the 0.2.3 functions.
            Contract::V0_2 | Contract::V0_2_1 | Contract::V0_2_2 | Contract::V0_2_3 => {
                Pre::V2(bindings::FilterPre::new(pre).map_err(world)?)
            }
        };
        let imports = compiled.imports(self);
        let inner = FilterInner {
            runtime: self.clone(),
            pre,
            store,
            name: Arc::from("filter"),
            idle: IdlePool {
                list: Mutex::new(Vec::new()),
                waiting: AtomicUsize::new(0),
                back: tokio::sync::Notify::new(),
                retired: AtomicBool::new(false),
            },
            stats: Stats::default(),
            suspect_until: AtomicU64::new(0),
            clock: std::time::Instant::now(),
            quota: Arc::new(sandbox::Quota::new(&options.limits)),
            metrics: Arc::default(),
            contract,
            slow_slots: Arc::new(tokio::sync::Semaphore::new(self.inner.config.slow_calls.max(1))),
            options,
            skip: SkipHooks::default(),
        };
        // The first instance takes its slot like any (calls give theirs
        // back within their deadlines).
        let slot = self.inner.slots.clone().acquire_owned().await.map_err(|e| LoadError::Engine(e.to_string()))?;
        let mut first = inner.instantiate(slot).await.map_err(|e| match e {
            StartError::Init(m) => LoadError::Init(m),
            StartError::Trap(m) => LoadError::Start(m),
        })?;
        let info = first.info.clone();
        // What the first instance said in `init` holds for the filter.
        let mut skip = first.store.data_mut().skip.take().unwrap_or_default();
        skip.data_null_sender_only = first.store.data().data_null_sender_only;
        let advertised = EhloVerdict { verdict: Verdict::cont(), keywords: skip.ehlo_keywords.clone() };
        if let Err(e) = reply::check_ehlo(&advertised) {
            return Err(LoadError::Start(format!("the EHLO keywords it gave `negotiate.skip-hooks` are not valid: {e}")));
        }
        let namespace = match &inner.options.namespace {
            Some(ns) => ns.clone(),
            None if valid_namespace(&info.name) => info.name.clone(),
            None => {
                return Err(LoadError::Options(format!(
                    "the filter's name {:?} cannot be its store namespace (1 to 64 letters, digits, '-', '_' or '.'): set `namespace`",
                    info.name
                )));
            }
        };
        let options = FilterOptions { namespace: Some(namespace.clone()), ..inner.options.clone() };
        let inner = FilterInner { name: Arc::from(info.name.as_str()), options, skip, ..inner };
        first.store.data_mut().filter = inner.name.clone();
        first.store.data_mut().set_namespace(&namespace);
        inner.checkin(first);
        Ok(Filter { inner: Arc::new(inner), info, imports })
    }
}

/// Whether `ns` can be a store namespace: 1 to 64 letters, digits, `-`,
/// `_` and `.`.
fn valid_namespace(ns: &str) -> bool {
    !ns.is_empty() && ns.len() <= 64 && ns.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// A compiled (not yet type-checked) component.
#[derive(Clone)]
pub struct CompiledFilter {
    component: Component,
}

/// A version of the filter contract (`greyhook:filter`) this host runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contract {
    /// `greyhook:filter@0.1.0` (`wit/v0.1/`): store and log.
    V0_1,
    /// `greyhook:filter@0.2.0`: adds dns, auth, metrics and batched store
    /// calls.
    V0_2,
    /// `greyhook:filter@0.2.1` (`wit/v0.2.1/`): adds metric handles.
    V0_2_1,
    /// `greyhook:filter@0.2.2` (`wit/v0.2.2/`): adds `negotiate` (the
    /// hooks a filter asks not to be called).
    V0_2_2,
    /// `greyhook:filter@0.2.3` (`wit/greyhook.wit`): adds
    /// `negotiate.data-for-null-sender-only`.
    V0_2_3,
}

impl Contract {
    /// The package version, e.g. `0.2.0`.
    pub fn version(self) -> &'static str {
        match self {
            Contract::V0_1 => "0.1.0",
            Contract::V0_2 => "0.2.0",
            Contract::V0_2_1 => "0.2.1",
            Contract::V0_2_2 => "0.2.2",
            Contract::V0_2_3 => "0.2.3",
        }
    }

    /// The interfaces of the contract a filter of this version may import.
    fn provides(self) -> &'static [&'static str] {
        match self {
            Contract::V0_1 => &["types", "store", "log"],
            Contract::V0_2 | Contract::V0_2_1 => &["types", "store", "log", "dns", "auth", "metrics"],
            Contract::V0_2_2 | Contract::V0_2_3 => &["types", "store", "log", "dns", "auth", "metrics", "negotiate"],
        }
    }
}

impl std::fmt::Display for Contract {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "greyhook:filter@{}", self.version())
    }
}

/// The WASI packages whose interfaces the sandbox links (empty: see
/// [`crate::runtime::sandbox`]); `wasi:http` and anything else is refused.
const WASI_LINKED: &[&str] = &["wasi:cli/", "wasi:clocks/", "wasi:filesystem/", "wasi:io/", "wasi:random/", "wasi:sockets/"];

/// How to build a filter without an import the host refuses.
const BUILD_WITHOUT: &str = "greyhook gives filters no network or HTTP: build the filter without it \
    (componentize-js: `--disable http --disable fetch-event`; componentize-py: do not import `wasi:http`; \
    Rust: do not depend on an HTTP client); see docs/writing-filters.md";

impl CompiledFilter {
    /// The component's imports, as `name` strings (e.g. `greyhook:filter/store@0.2.3`).
    pub fn imports(&self, runtime: &Runtime) -> Vec<String> {
        self.component.component_type().imports(&runtime.inner.engine).map(|(name, _)| name.to_string()).collect()
    }

    /// Which contract the component is built for (by the `hooks` it
    /// exports), with every import checked: an import the host does not
    /// provide is named in the error with how to build without it, instead
    /// of the linker's text.
    pub fn contract(&self, runtime: &Runtime) -> Result<Contract, LoadError> {
        let ty = self.component.component_type();
        let engine = &runtime.inner.engine;
        let exports: Vec<String> = ty.exports(engine).map(|(n, _)| n.to_string()).collect();
        let contract = if exports.iter().any(|e| e == "greyhook:filter/hooks@0.2.3") {
            Contract::V0_2_3
        } else if exports.iter().any(|e| e == "greyhook:filter/hooks@0.2.2") {
            Contract::V0_2_2
        } else if exports.iter().any(|e| e == "greyhook:filter/hooks@0.2.1") {
            Contract::V0_2_1
        } else if exports.iter().any(|e| e == "greyhook:filter/hooks@0.2.0") {
            Contract::V0_2
        } else if exports.iter().any(|e| e == "greyhook:filter/hooks@0.1.0") {
            Contract::V0_1
        } else if let Some(other) = exports.iter().find(|e| e.starts_with("greyhook:filter/hooks")) {
            return Err(LoadError::World(format!(
                "it exports {other}; this host runs greyhook:filter@0.1.0, @0.2.0, @0.2.1, @0.2.2 and @0.2.3 filters (upgrade greyhook, or build the filter against one of those)"
            )));
        } else {
            return Err(LoadError::World(format!(
                "it exports no greyhook:filter/hooks interface (exports: {}); build it for the `greyhook:filter/filter` world",
                if exports.is_empty() { "none".to_string() } else { exports.join(", ") }
            )));
        };
        for name in self.imports(runtime) {
            if WASI_LINKED.iter().any(|p| name.starts_with(p)) {
                continue;
            }
            if let Some(rest) = name.strip_prefix("greyhook:filter/") {
                let (iface, version) = rest.split_once('@').unwrap_or((rest, ""));
                if version == contract.version() && contract.provides().contains(&iface) {
                    continue;
                }
                return Err(LoadError::World(format!(
                    "it imports {name}, which a {contract} filter cannot import (mixing contract versions, or an interface of a newer contract)"
                )));
            }
            return Err(LoadError::World(format!("it imports {name}, which greyhook does not provide; {BUILD_WITHOUT}")));
        }
        Ok(contract)
    }
}

/// One instance in the pool.
struct Pooled {
    store: wasmtime::Store<HostState>,
    world: World,
    info: FilterInfo,
    /// Its place among the idle instances, once it has been idle.
    place: Option<Reserved>,
    /// Its slot in the pooling allocator, given back when it is dropped:
    /// after the store (fields drop in order), so a slot is free only once
    /// the allocator has it back.
    _slot: tokio::sync::OwnedSemaphorePermit,
}

/// The pre-linked component, by contract version.
enum Pre {
    V1(bindings_v01::FilterPre<HostState>),
    V2(bindings::FilterPre<HostState>),
}

/// An instance, by contract version.
enum World {
    V1(bindings_v01::Filter),
    V2(bindings::Filter),
}

enum StartError {
    Init(String),
    Trap(String),
}

struct FilterInner {
    runtime: Runtime,
    pre: Pre,
    contract: Contract,
    /// What the filter counts through the `metrics` import.
    metrics: Arc<FilterMetrics>,
    store: Arc<dyn Store>,
    options: FilterOptions,
    name: Arc<str>,
    idle: IdlePool,
    stats: Stats,
    /// Until when (ms on [`FilterInner::clock`]) calls take a slow-call
    /// slot before they start.
    suspect_until: AtomicU64,
    clock: std::time::Instant,
    /// What all instances of this filter may write and log.
    quota: Arc<sandbox::Quota>,
    /// Calls that may run at once while the filter is a suspect
    /// ([`RuntimeConfig::slow_calls`]).
    slow_slots: Arc<tokio::sync::Semaphore>,
    /// The hooks the filter asked not to be called (contracts 0.2.2 and 0.2.3).
    skip: SkipHooks,
}

impl FilterInner {
    /// The namespace, resolved at load (the options' or the filter's name).
    fn namespace(&self) -> &str {
        self.options.namespace.as_deref().unwrap_or_default()
    }

    fn suspect(&self) -> bool {
        // Never marked (the usual case): no clock read.
        let until = self.suspect_until.load(Ordering::Relaxed);
        until != 0 && (self.clock.elapsed().as_millis() as u64) < until
    }

    fn mark_suspect(&self) {
        let until = (self.clock.elapsed() + SUSPECT_FOR).as_millis() as u64;
        self.suspect_until.store(until, Ordering::Relaxed);
    }

    /// An idle instance of this filter, if it has one (it keeps its place
    /// among the idle ones for when it comes back).
    fn checkout(&self) -> Option<Pooled> {
        self.idle.list().pop()
    }

    /// Makes an instance in `slot`.
    async fn instantiate(&self, slot: tokio::sync::OwnedSemaphorePermit) -> Result<Pooled, StartError> {
        // `init` runs Wasm: the epoch must advance meanwhile.
        let _busy = self.runtime.inner.ticker.busy();
        let l = &self.options.limits;
        let mut state = HostState::new(self.store.clone(), self.options.namespace.as_deref(), self.name.clone(), l.memory, l.store_calls);
        state.quota = self.quota.clone();
        state.resolver = self.runtime.inner.config.resolver.clone();
        state.metrics = self.metrics.clone();
        let mut store = wasmtime::Store::new(&self.runtime.inner.engine, state);
        store.limiter(|s| &mut s.limits);
        // A call still running a few epoch ticks after it began yields to
        // the runtime at every tick from then on, so it shares its thread
        // with other requests, and traps once past its deadline. A filter
        // whose call trapped so lately is a suspect (see `call`).
        store.epoch_deadline_callback(|mut ctx| {
            if ctx.data().call_deadline.is_some_and(|end| std::time::Instant::now() >= end) {
                return Ok(wasmtime::UpdateDeadline::Interrupt);
            }
            let state = ctx.data_mut();
            state.yields = state.yields.saturating_add(1);
            Ok(wasmtime::UpdateDeadline::Yield(1))
        });
        store.set_epoch_deadline(SLOW_AFTER_TICKS);
        store.data_mut().call_deadline = Some(std::time::Instant::now() + l.deadline.max(Duration::from_secs(1)));
        let trap = |e: wasmtime::Error, s: &wasmtime::Store<HostState>| StartError::Trap(describe_trap(&e, s.data()));
        let world = match &self.pre {
            Pre::V1(p) => p.instantiate_async(&mut store).await.map(World::V1),
            Pre::V2(p) => p.instantiate_async(&mut store).await.map(World::V2),
        };
        let world = match world {
            Ok(w) => w,
            Err(e) => return Err(trap(e, &store)),
        };
        store.data_mut().in_init = true;
        let init = match &world {
            World::V1(w) => {
                w.greyhook_filter_hooks().call_init(&mut store, &self.options.config).await.map(|r| r.map(|i| (i.name, i.version)))
            }
            World::V2(w) => {
                w.greyhook_filter_hooks().call_init(&mut store, &self.options.config).await.map(|r| r.map(|i| (i.name, i.version)))
            }
        };
        store.data_mut().in_init = false;
        let info = match init {
            Ok(Ok((name, version))) => FilterInfo { name: sanitize(&name, 64), version: sanitize(&version, 64) },
            Ok(Err(m)) => return Err(StartError::Init(sanitize(&m, 1024))),
            Err(e) => return Err(trap(e, &store)),
        };
        self.stats.instances.fetch_add(1, Ordering::Relaxed);
        Ok(Pooled { store, world, info, place: None, _slot: slot })
    }

    /// Keeps `p` for reuse if this filter's idle limit and the runtime's
    /// idle reserve have room; else it is dropped (its slot freed).
    fn checkin(&self, mut p: Pooled) {
        let mut idle = self.idle.list();
        if idle.len() >= self.options.limits.idle_instances || self.idle.retired.load(Ordering::Relaxed) {
            return;
        }
        if p.place.is_none() {
            p.place = Reserved::take(&self.runtime.inner.idle);
        }
        if p.place.is_some() {
            idle.push(p);
            drop(idle);
            // A call of this filter waiting for an instance takes it.
            if self.idle.waiting.load(Ordering::SeqCst) > 0 {
                self.idle.back.notify_one();
            }
        }
    }

    /// An instance for a call that found none idle: a new one in a free
    /// slot, else the first of a slot freed or an instance of this filter
    /// brought back, waited for until `wait` has passed.
    async fn make_or_wait(&self, wait: Duration) -> Result<Pooled, FilterError> {
        let failed = |e| match e {
            StartError::Init(m) | StartError::Trap(m) => FilterError::Instantiate(m),
        };
        let slots = &self.runtime.inner.slots;
        if let Ok(slot) = slots.clone().try_acquire_owned() {
            return self.instantiate(slot).await.map_err(failed);
        }
        // Every slot is taken (calls waiting for DNS hold theirs; a hundred
        // Postfix smtpd processes may ask at once). Failing the call would
        // let the failure policy answer for load alone, and `continue`
        // would pass the mail ungreylisted; the wait is bounded by the
        // connections the front ends admit and by `wait`.
        let until = tokio::time::Instant::now() + wait;
        let _waiting = Waiting::new(&self.idle.waiting);
        loop {
            // Registered before looking, so an instance brought back in
            // between wakes us (see `checkin`).
            let back = self.idle.back.notified();
            tokio::pin!(back);
            back.as_mut().enable();
            if let Some(p) = self.checkout() {
                return Ok(p);
            }
            tokio::select! {
                slot = slots.clone().acquire_owned() => {
                    let slot = slot.map_err(|_| FilterError::Busy(wait))?;
                    return self.instantiate(slot).await.map_err(failed);
                }
                _ = &mut back => {}
                _ = tokio::time::sleep_until(until) => return Err(FilterError::Busy(wait)),
            }
        }
    }
}

/// A call counted as waiting for an instance while it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(n: &'a AtomicUsize) -> Waiting<'a> {
        n.fetch_add(1, Ordering::SeqCst);
        Waiting(n)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A filter's idle instances (each with its place in the runtime's idle
/// reserve until it is dropped, with the filter after a reload).
struct IdlePool {
    list: Mutex<Vec<Pooled>>,
    /// Calls of this filter waiting for an instance ([`FilterInner::make_or_wait`]).
    waiting: AtomicUsize,
    /// Told when an instance comes back while calls wait.
    back: tokio::sync::Notify,
    /// Keeps no instance ([`Filter::set_retired`]); written and read with
    /// `list` locked, so no instance is kept after it is set.
    retired: AtomicBool,
}

impl IdlePool {
    fn list(&self) -> std::sync::MutexGuard<'_, Vec<Pooled>> {
        // Pushing or popping a Vec cannot be interrupted half-way.
        self.list.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn sanitize(s: &str, max: usize) -> String {
    s.chars().take(max).map(|c| if c.is_control() { ' ' } else { c }).collect()
}

fn describe_trap(e: &wasmtime::Error, state: &HostState) -> String {
    let stderr = state.stderr_text();
    let mut msg = match e.downcast_ref::<wasmtime::Trap>() {
        Some(t) => t.to_string(),
        None => format!("{e:#}"),
    };
    if !stderr.is_empty() {
        msg.push_str(": ");
        msg.push_str(&sanitize(&stderr, 512));
    }
    msg
}

/// The hook a call is for, with its arguments besides the context (all
/// borrowed: [`invoke`] hands them to the filter as they are).
enum Call<'a> {
    Connect,
    Ehlo,
    Mail(&'a str),
    Rcpt(&'a str),
    Data(&'a Message),
}

impl Call<'_> {
    fn phase(&self) -> Phase {
        match self {
            Call::Connect => Phase::Connect,
            Call::Ehlo => Phase::Ehlo,
            Call::Mail(_) => Phase::Mail,
            Call::Rcpt(_) => Phase::Rcpt,
            Call::Data(_) => Phase::Data,
        }
    }
}

enum Answer {
    Verdict(Verdict),
    Ehlo(EhloVerdict),
}

/// A loaded filter. Cheap to clone; safe to call from many tasks at once.
#[derive(Clone)]
pub struct Filter {
    inner: Arc<FilterInner>,
    info: FilterInfo,
    imports: Vec<String>,
}

impl std::fmt::Debug for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filter").field("info", &self.info).field("namespace", &self.inner.namespace()).finish()
    }
}

impl Filter {
    /// The name and version the filter's `init` reported.
    pub fn info(&self) -> &FilterInfo {
        &self.info
    }

    /// The store namespace its keys live in: the one its options named, or
    /// its name from `init`.
    pub fn namespace(&self) -> &str {
        self.inner.namespace()
    }

    /// What the component imports.
    pub fn imports(&self) -> &[String] {
        &self.imports
    }

    /// The contract version it is built for.
    pub fn contract(&self) -> Contract {
        self.inner.contract
    }

    /// What it counts through the contract's `metrics` import.
    pub fn metrics(&self) -> &FilterMetrics {
        &self.inner.metrics
    }

    /// The options it was loaded with.
    pub fn options(&self) -> &FilterOptions {
        &self.inner.options
    }

    /// Its counters.
    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    /// Marks the filter as replaced (`true`) or serving again (`false`).
    ///
    /// Idle instances hold slots of the runtime's pool and places among
    /// the idle instances it keeps, all filters together. A version kept
    /// after it was replaced (to go back to it, as the crash-loop breaker
    /// does) would hold them for nothing, and the version serving would
    /// make an instance anew for every call. A retired filter drops its
    /// idle instances now, and each of its instances when its call ends;
    /// it still answers calls. Dropping a filter frees them too.
    pub fn set_retired(&self, retired: bool) {
        let dropped = {
            let mut idle = self.inner.idle.list();
            self.inner.idle.retired.store(retired, Ordering::Relaxed);
            if retired { std::mem::take(&mut *idle) } else { Vec::new() }
        };
        drop(dropped);
    }

    /// The hooks it asked not to be called (contract 0.2.2's
    /// `negotiate.skip-hooks`, and 0.2.3's `data-for-null-sender-only`),
    /// which this host answers for it: `continue`, and at EHLO the keywords
    /// it gave.
    pub fn skipped(&self) -> &SkipHooks {
        &self.inner.skip
    }

    /// The connect hook. Never fails: a failure is logged, counted and
    /// answered by the failure policy (see [`Filter::try_on_connect`]).
    pub async fn on_connect(&self, ctx: &Context) -> Verdict {
        self.or_policy(Phase::Connect, ctx, self.try_on_connect(ctx).await)
    }

    /// The EHLO hook, with the failure policy.
    pub async fn on_ehlo(&self, ctx: &Context) -> EhloVerdict {
        match self.try_on_ehlo(ctx).await {
            Ok(v) => v,
            Err(e) => EhloVerdict { verdict: self.or_policy(Phase::Ehlo, ctx, Err(e)), keywords: Vec::new() },
        }
    }

    /// The MAIL hook, with the failure policy.
    pub async fn on_mail(&self, ctx: &Context, sender: &str) -> Verdict {
        self.or_policy(Phase::Mail, ctx, self.try_on_mail(ctx, sender).await)
    }

    /// The RCPT hook, with the failure policy.
    pub async fn on_rcpt(&self, ctx: &Context, recipient: &str) -> Verdict {
        self.or_policy(Phase::Rcpt, ctx, self.try_on_rcpt(ctx, recipient).await)
    }

    /// The DATA hook, with the failure policy.
    pub async fn on_data(&self, ctx: &Context, message: &Message) -> Verdict {
        self.or_policy(Phase::Data, ctx, self.try_on_data(ctx, message).await)
    }

    /// The connect hook, reporting a failure instead of applying the policy.
    pub async fn try_on_connect(&self, ctx: &Context) -> Result<Verdict, FilterError> {
        self.verdict(Call::Connect, ctx).await
    }

    /// The EHLO hook, reporting a failure.
    pub async fn try_on_ehlo(&self, ctx: &Context) -> Result<EhloVerdict, FilterError> {
        match self.call(Call::Ehlo, ctx).await? {
            Answer::Ehlo(v) => {
                reply::check_ehlo(&v)?;
                Ok(v)
            }
            Answer::Verdict(_) => Err(FilterError::Trap("internal: wrong answer kind".into())),
        }
    }

    /// The MAIL hook, reporting a failure.
    pub async fn try_on_mail(&self, ctx: &Context, sender: &str) -> Result<Verdict, FilterError> {
        self.verdict(Call::Mail(sender), ctx).await
    }

    /// The RCPT hook, reporting a failure.
    pub async fn try_on_rcpt(&self, ctx: &Context, recipient: &str) -> Result<Verdict, FilterError> {
        self.verdict(Call::Rcpt(recipient), ctx).await
    }

    /// The DATA hook, reporting a failure.
    pub async fn try_on_data(&self, ctx: &Context, message: &Message) -> Result<Verdict, FilterError> {
        self.verdict(Call::Data(message), ctx).await
    }

    fn or_policy(&self, phase: Phase, ctx: &Context, r: Result<Verdict, FilterError>) -> Verdict {
        match r {
            Ok(v) => v,
            Err(e) => {
                self.inner.stats.failures.fetch_add(1, Ordering::Relaxed);
                let kind = match &e {
                    FilterError::Trap(_) => "trap",
                    FilterError::Deadline(_) => "deadline",
                    FilterError::Invalid(_) => "invalid_verdict",
                    FilterError::Store(_) => "store",
                    FilterError::Instantiate(_) => "instantiate",
                    FilterError::Busy(_) => "busy",
                };
                let labels = crate::telemetry::FailureLabels { filter: self.info.name.clone(), kind };
                crate::telemetry::host().filter_failures.get_or_create(&labels).inc();
                // Overload is not a broken filter: a flood of clients must
                // not pass its mail ungreylisted, so it is a tempfail (the
                // client retries) whatever the policy says.
                let policy = match e {
                    FilterError::Busy(_) => FailurePolicy::Tempfail,
                    _ => self.inner.options.failure_policy,
                };
                tracing::warn!(filter = %self.info.name, session = %ctx.session.id, %phase, ?policy, "filter failed: {e}");
                policy.verdict(phase)
            }
        }
    }

    async fn verdict(&self, call: Call<'_>, ctx: &Context) -> Result<Verdict, FilterError> {
        match self.call(call, ctx).await? {
            Answer::Verdict(v) => {
                reply::check_verdict(&v)?;
                Ok(v)
            }
            Answer::Ehlo(_) => Err(FilterError::Trap("internal: wrong answer kind".into())),
        }
    }

    async fn call(&self, call: Call<'_>, ctx: &Context) -> Result<Answer, FilterError> {
        let inner = &self.inner;
        // A hook the filter asked not to be called is answered here, as it
        // said it would answer: no instance, nothing copied.
        if inner.skip.skips_call(call.phase(), ctx) {
            return Ok(match call {
                Call::Ehlo => Answer::Ehlo(EhloVerdict { verdict: Verdict::cont(), keywords: inner.skip.ehlo_keywords.clone() }),
                _ => Answer::Verdict(Verdict::cont()),
            });
        }
        let now = ctx.now;
        inner.stats.calls.fetch_add(1, Ordering::Relaxed);
        let deadline = inner.options.limits.deadline;
        // A filter that ran past its deadline lately is a suspect: each of
        // its calls takes a slow-call slot before it starts (waiting counts
        // against the deadline), so its runaway calls queue instead of
        // crowding the threads.
        let early_slot = if inner.suspect() {
            match tokio::time::timeout(deadline, inner.slow_slots.clone().acquire_owned()).await {
                Ok(Ok(p)) => Some(p),
                // A call that never ran did not fail: the wait is load, and
                // load never passes mail (`Busy`, a tempfail whatever the
                // failure policy).
                _ => return Err(FilterError::Busy(deadline)),
            }
        } else {
            None
        };
        // An idle instance of this filter, else a new one, else a wait for
        // either (within the deadline; `Busy` past it).
        let mut pooled = match inner.checkout() {
            Some(p) => p,
            None => inner.make_or_wait(deadline).await?,
        };
        // The deadline counts from here: an instance just made (or a slot
        // just taken) does not eat into the call's own time. The call's one
        // clock read (~60 instructions each; a call made five).
        let started = tokio::time::Instant::now();
        inner.quota.recount_if_due(&inner.store, inner.namespace(), now, started.into_std());
        let end = started + deadline;
        pooled.store.data_mut().begin_call(now, end.into_std(), deadline, early_slot);
        pooled.store.set_epoch_deadline(SLOW_AFTER_TICKS);
        // The epoch callback stops runaway Wasm; the timeout also bounds
        // time spent waiting in host calls (a slow store).
        let result = {
            let _busy = inner.runtime.inner.ticker.busy();
            tokio::time::timeout_at(end + TICK * 2, invoke(&mut pooled, call, ctx)).await
        };
        pooled.store.data().release_slow_slot();
        match result {
            Ok(Ok(answer)) => {
                let failure = pooled.store.data_mut().store_failure.take();
                inner.checkin(pooled);
                match failure {
                    Some(f) => Err(FilterError::Store(f)),
                    None => Ok(answer),
                }
            }
            Ok(Err(e)) => {
                if matches!(e.downcast_ref::<wasmtime::Trap>(), Some(wasmtime::Trap::Interrupt)) {
                    // Its own code was running at the deadline (not a slow
                    // store): a runaway, or a call a starved machine left
                    // waiting. Either way its filter's calls now queue for
                    // the filter's own slow-call slots, which costs a healthy
                    // filter (calls of microseconds) next to nothing.
                    inner.mark_suspect();
                    // How long its code ran: the ticks before it first
                    // yielded, and one for each yield since (it yields at
                    // the first tick after it runs again). A call that ran
                    // for less than half its time spent the rest waiting,
                    // most likely to run again behind other tasks: cut by
                    // the host's load, not by its own code, and load never
                    // passes mail (`Busy`, a tempfail).
                    let ran = TICK * (pooled.store.data().yields + SLOW_AFTER_TICKS as u32);
                    if ran * 2 < deadline {
                        return Err(FilterError::Busy(deadline));
                    }
                    Err(FilterError::Deadline(deadline))
                } else {
                    Err(FilterError::Trap(describe_trap(&e, pooled.store.data())))
                }
            }
            Err(_) => Err(FilterError::Deadline(deadline)),
        }
    }
}

async fn invoke(p: &mut Pooled, call: Call<'_>, ctx: &Context) -> wasmtime::Result<Answer> {
    let s = &mut p.store;
    match &p.world {
        World::V2(w) => {
            use sandbox::{ehlo_from_wit, verdict_from_wit};
            let hooks = w.greyhook_filter_hooks();
            let recipients = sandbox::recipients_to_wit(ctx);
            let c = sandbox::context_to_wit(ctx, &recipients);
            Ok(match call {
                Call::Connect => Answer::Verdict(verdict_from_wit(hooks.call_on_connect(s, c).await?)),
                Call::Ehlo => Answer::Ehlo(ehlo_from_wit(hooks.call_on_ehlo(s, c).await?)),
                Call::Mail(a) => Answer::Verdict(verdict_from_wit(hooks.call_on_mail(s, c, a).await?)),
                Call::Rcpt(a) => Answer::Verdict(verdict_from_wit(hooks.call_on_rcpt(s, c, a).await?)),
                Call::Data(m) => {
                    let headers = sandbox::headers_to_wit(m);
                    Answer::Verdict(verdict_from_wit(hooks.call_on_data(s, c, sandbox::message_to_wit(m, &headers)).await?))
                }
            })
        }
        World::V1(w) => {
            use sandbox::{ehlo_from_v01, verdict_from_v01};
            let hooks = w.greyhook_filter_hooks();
            let recipients = sandbox::recipients_to_v01(ctx);
            let c = sandbox::context_to_v01(ctx, &recipients);
            Ok(match call {
                Call::Connect => Answer::Verdict(verdict_from_v01(hooks.call_on_connect(s, c).await?)),
                Call::Ehlo => Answer::Ehlo(ehlo_from_v01(hooks.call_on_ehlo(s, c).await?)),
                Call::Mail(a) => Answer::Verdict(verdict_from_v01(hooks.call_on_mail(s, c, a).await?)),
                Call::Rcpt(a) => Answer::Verdict(verdict_from_v01(hooks.call_on_rcpt(s, c, a).await?)),
                Call::Data(m) => {
                    let headers = sandbox::headers_to_v01(m);
                    Answer::Verdict(verdict_from_v01(hooks.call_on_data(s, c, sandbox::message_to_v01(m, &headers)).await?))
                }
            })
        }
    }
}
