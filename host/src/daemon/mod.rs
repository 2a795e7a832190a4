//! The daemon behind `greyhook serve`, `greyhook smtp` and every front
//! end's command: it loads the filter chain, opens the store, starts the
//! front ends the configuration turns on (see [`crate::frontend`]), and
//! reloads the chain on file changes, SIGHUP and the control socket.
//!
//! Configuration layers, lowest first: built-in defaults, the TOML file
//! (`--config`, [`DaemonConfig`]), then the command line's flags (`--policy`,
//! `--db`, `--filter`, `--set`...).

mod config;
mod control;
mod files;
mod fresh;
mod memory;
mod overrides;
mod page;
mod status;
mod watch;
mod web;

pub use self::config::*;
use self::control::control_service;
pub use self::files::{OpenFiles, RESERVED_FILES, raise_open_files_limit};
use self::watch::{watch, watch_breaker};
pub use self::web::{MetricsConfig, WebError};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use futures::future::BoxFuture;

use crate::domain::clock::Clock;
use crate::frontend::listen::{ListenAddr, Listener, UnixPerms};
use crate::frontend::{FrontEnd, Hooks};
use crate::runtime::Chain;
use crate::runtime::artifact_cache::ArtifactCache;
use crate::runtime::reload::{BreakerConfig, FilterSource, ReloadError, ReloadOutcome, Reloader};
use crate::runtime::{FilterOptions, Limits, Runtime, RuntimeConfig};
use crate::store::{Store, StoreConfig};

/// How the daemon rereads its configuration at a reload: the files to
/// watch, and a function that reads them again (with the command line's
/// overrides applied on top).
#[derive(Clone)]
pub struct Reconfigure {
    /// Files whose change triggers a reload (the configuration file).
    pub files: Vec<PathBuf>,
    /// Reads the configuration again.
    pub load: Arc<dyn Fn() -> Result<DaemonConfig, DaemonError> + Send + Sync>,
}

/// What the daemon needs to load one filter of the chain.
struct FilterSpec {
    source: FilterSource,
    options: FilterOptions,
    /// The Wasm stack cap, bytes: an engine-wide setting in wasmtime, so
    /// one [`Runtime`] per distinct value.
    stack: usize,
}

fn filter_specs(config: &DaemonConfig) -> Result<Vec<FilterSpec>, DaemonError> {
    let chain = config.chain()?;
    let mut specs: Vec<FilterSpec> = Vec::new();
    for f in &chain {
        let spec = filter_spec(f)?;
        if let Some(ns) = &spec.options.namespace
            && specs.iter().any(|s| s.options.namespace.as_ref() == Some(ns))
        {
            return Err(DaemonError::Invalid(format!("two filters share the store namespace {ns:?}: give each its own")));
        }
        specs.push(spec);
    }
    Ok(specs)
}

fn filter_spec(f: &FilterConfig) -> Result<FilterSpec, DaemonError> {
    let memory = f
        .memory_mib
        .checked_shl(20)
        .filter(|m| (1 << 20..=1 << 30).contains(m))
        .ok_or_else(|| DaemonError::Invalid("filter.memory_mib must be 1 to 1024".into()))?;
    if f.deadline.is_zero() || f.deadline > Duration::from_secs(30) {
        return Err(DaemonError::Invalid("filter.deadline must be between 1ms and 30s".into()));
    }
    if !(64..=16 << 10).contains(&f.stack_kib) {
        return Err(DaemonError::Invalid("filter.stack_kib must be 64 to 16384".into()));
    }
    let source = f.path.clone().map_or(FilterSource::Embedded, FilterSource::File);
    let options = FilterOptions {
        config: toml::to_string(&f.config).map_err(|e| DaemonError::Invalid(e.to_string()))?,
        namespace: f.namespace.clone(),
        limits: Limits {
            deadline: f.deadline,
            memory,
            store_calls: f.store_calls,
            max_ttl: u32::try_from(f.max_ttl.as_secs()).unwrap_or(u32::MAX).max(1),
            write_bytes_per_minute: f.write_bytes_per_minute,
            log_lines_per_second: f.log_lines_per_second,
            max_records: f.max_records,
            ..Limits::default()
        },
        failure_policy: f.failure_policy,
    };
    Ok(FilterSpec { source, options, stack: f.stack_kib << 10 })
}

struct Shared {
    reloaders: Vec<Reloader>,
    /// The tables a reload cannot change, as started (see [`fixed_tables`]).
    fixed: Vec<(&'static str, String)>,
    /// Each filter's stack cap, fixed at start.
    stacks: Vec<usize>,
    store: Arc<dyn Store>,
    /// The filters' resolver, for its counters in `status`.
    resolver: crate::dns::Resolver,
    /// When the daemon started (`status`'s uptime).
    started: std::time::Instant,
    /// The same, as a wall-clock time.
    started_at: std::time::SystemTime,
    reconfigure: Option<Reconfigure>,
    /// Each filter's last reload (or breaker revert), for `status`.
    last_reload: std::sync::Mutex<Vec<Option<status::LastReload>>>,
    /// Live records in the store at the last count (`u64::MAX`: not counted).
    records: std::sync::atomic::AtomicU64,
    /// The store's backend name (`redb`, `memory`, `redis`).
    store_kind: &'static str,
    /// The store as the log names it (a Redis password hidden).
    store_desc: String,
    /// The redb file, for its size.
    store_file: Option<PathBuf>,
    /// Everything the daemon listens on: front ends, metrics, control.
    listeners: Vec<Listening>,
    /// The filters' clock (`greyhook db` works at its `now`).
    clock: Arc<dyn Clock>,
    /// The file descriptors the settings let peers hold, with the reserve
    /// (`status` shows it beside the open ones and the limit).
    files_needed: u64,
    /// The compiled-filter cache's directory, if there is one.
    compiled_filters: Option<PathBuf>,
}

/// One thing the daemon listens on, as `status` shows it.
struct Listening {
    /// The front end's name, or `metrics`, `control`.
    name: &'static str,
    addresses: Vec<String>,
    /// A front end accepting connections, which it counts (the
    /// `connections_*` metrics by its name).
    front_end: bool,
}

/// What a reload did to each filter of the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// Each filter's outcome, in chain order.
    pub outcomes: Vec<ReloadOutcome>,
    /// Tables changed in the configuration file that a reload does not
    /// apply (`[policy]`, `[store]`, ...): they need a restart.
    pub need_restart: Vec<&'static str>,
}

impl std::fmt::Display for ReloadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, o) in self.outcomes.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{o}")?;
        }
        if !self.need_restart.is_empty() {
            let tables: Vec<String> = self.need_restart.iter().map(|t| format!("[{t}]")).collect();
            write!(f, "; {} changed: not applied, that needs a restart", tables.join(", "))?;
        }
        Ok(())
    }
}

/// The tables a reload leaves alone, each as its settings' debug text (a
/// change of any field changes the text; the sections have no `PartialEq`
/// because some hold types without one).
fn fixed_tables(c: &DaemonConfig) -> Vec<(&'static str, String)> {
    let mut t = vec![
        ("store", format!("{:?}", c.store)),
        ("dns", format!("{:?}", c.dns)),
        ("control", format!("{:?}", c.control)),
        ("log", format!("{:?}", c.log)),
        ("metrics", format!("{:?}", c.metrics)),
    ];
    t.extend(c.front_end_tables());
    t
}

/// A front end started: its name, where it listens, and its serving task.
struct Started {
    name: &'static str,
    endpoints: Vec<ListenAddr>,
    serve: BoxFuture<'static, ()>,
}

macro_rules! start_front_ends {
    ($($table:ident => $front_end:ty,)*) => {
        /// Starts every front end the configuration turns on.
        async fn start_front_ends(config: &DaemonConfig, hooks: &Hooks, shutdown: &CancellationToken) -> Result<Vec<Started>, DaemonError> {
            let mut started = Vec::new();
            $(
                if <$front_end as FrontEnd>::enabled(&config.$table) {
                    let f = <$front_end as FrontEnd>::start(&config.$table).await?;
                    started.push(Started {
                        name: <$front_end as FrontEnd>::NAME,
                        endpoints: f.endpoints(),
                        serve: Box::pin(f.serve(Hooks { front_end: <$front_end as FrontEnd>::NAME, ..hooks.clone() }, shutdown.clone())),
                    });
                }
            )*
            Ok(started)
        }
    };
}
crate::frontend::front_ends!(start_front_ends);

macro_rules! open_files_needed {
    ($($table:ident => $front_end:ty,)*) => {
        /// The file descriptors each front end the configuration turns on
        /// (and the metrics listener) lets its peers hold at most.
        fn open_files_needed(config: &DaemonConfig) -> Vec<(&'static str, u64)> {
            let mut needed = Vec::new();
            $(
                if <$front_end as FrontEnd>::enabled(&config.$table) {
                    needed.push((<$front_end as FrontEnd>::NAME, <$front_end as FrontEnd>::open_files(&config.$table)));
                }
            )*
            if config.metrics.listen.is_some() {
                needed.push(("metrics", config.metrics.max_connections as u64));
            }
            needed
        }
    };
}
crate::frontend::front_ends!(open_files_needed);

impl Shared {
    /// How the filter that keeps its records in `namespace` groups clients
    /// (its configuration as loaded now), for `greyhook db whitelist
    /// --client`; the reference filter's defaults for a namespace no filter
    /// of the chain uses.
    fn client_grouping(&self, namespace: Option<&str>) -> crate::admin::ClientGrouping {
        namespace
            .and_then(|ns| self.reloaders.iter().map(Reloader::filter).find(|f| f.namespace() == ns))
            .map_or_else(Default::default, |f| crate::admin::ClientGrouping::of_filter_config(&f.options().config))
    }

    /// Reloads every filter of the chain (an unchanged one is left alone);
    /// the first refusal is returned, the others still take effect.
    async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let r = self.reload_chain().await;
        if let Err(e) = &r {
            // Refused before any filter was tried (the configuration):
            // every filter's last reload says so.
            let mut last = self.last_reload.lock().unwrap_or_else(|p| p.into_inner());
            if matches!(e, ReloadError::Options(_)) && last.iter().all(|l| l.as_ref().is_none_or(|l| l.ok)) {
                for l in last.iter_mut() {
                    *l = Some(status::LastReload::now(false, format!("refused: {e}")));
                }
            }
        }
        r
    }

    /// Live records at the last count, if counted yet.
    fn records(&self) -> Option<u64> {
        Some(self.records.load(std::sync::atomic::Ordering::Relaxed)).filter(|n| *n != u64::MAX)
    }

    /// The redb file's size now (none for memory and Redis stores).
    fn store_size(&self) -> Option<u64> {
        self.store_file.as_ref().and_then(|p| std::fs::metadata(p).ok()).map(|m| m.len())
    }

    /// Records filter `i`'s reload (or revert) for `status` and the counters.
    fn record_reload(&self, i: usize, ok: bool, result: String, kind: &'static str) {
        crate::telemetry::host().reloads.get_or_create(&crate::telemetry::ResultLabel { result: kind }).inc();
        let mut last = self.last_reload.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = last.get_mut(i) {
            *l = Some(status::LastReload::now(ok, result));
        }
    }

    async fn reload_chain(&self) -> Result<ReloadReport, ReloadError> {
        let mut need_restart = Vec::new();
        let specs = match &self.reconfigure {
            Some(r) => {
                let cfg = (r.load)().map_err(|e| ReloadError::Options(e.to_string()))?;
                for ((table, now), (_, then)) in fixed_tables(&cfg).iter().zip(&self.fixed) {
                    if now != then {
                        tracing::warn!("[{table}] changed in the configuration file: not applied until a restart");
                        need_restart.push(*table);
                    }
                }
                let specs = filter_specs(&cfg).map_err(|e| ReloadError::Options(e.to_string()))?;
                if specs.len() != self.reloaders.len() {
                    return Err(ReloadError::Options("the number of filters changed: that needs a restart".into()));
                }
                if specs.iter().zip(&self.stacks).any(|(s, old)| s.stack != *old) {
                    return Err(ReloadError::Options("filter.stack_kib changed: that needs a restart".into()));
                }
                specs.into_iter().map(|s| Some((s.source, s.options))).collect()
            }
            None => vec![None; self.reloaders.len()],
        };
        let mut outcomes = Vec::new();
        let mut refused = None;
        for (i, (r, spec)) in self.reloaders.iter().zip(specs).enumerate() {
            let namespace = r.filter().namespace().to_string();
            // A version whose namespace another filter of the chain uses
            // (a filter swapped for another with no `namespace` set) would
            // read and overwrite that filter's records: refused.
            let others: Vec<String> =
                self.reloaders.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, o)| o.filter().namespace().to_string()).collect();
            let check = move |f: &crate::runtime::Filter| match others.iter().any(|o| o == f.namespace()) {
                true => Err(format!(
                    "its store namespace {:?} is another filter's of the chain (a filter's namespace is its name unless \
                     `namespace` sets one): give it its own",
                    f.namespace()
                )),
                false => Ok(()),
            };
            let (source, options) = spec.map_or((None, None), |(s, o)| (Some(s), Some(o)));
            let result = r.reload_checked(source, options, &check).await;
            let now = r.filter().namespace().to_string();
            if now != namespace {
                // A new filter (another name) with no `namespace` set: it
                // does not see the old one's records, by design.
                tracing::warn!("the reloaded filter keeps its records in namespace {now:?}, no longer {namespace:?}");
            }
            match result {
                Ok(o) => {
                    let kind = if matches!(o, ReloadOutcome::Unchanged { .. }) { "unchanged" } else { "loaded" };
                    self.record_reload(i, true, o.to_string(), kind);
                    outcomes.push(o)
                }
                Err(e) => {
                    self.record_reload(i, false, format!("refused: {e}"), "refused");
                    refused.get_or_insert(e);
                }
            }
        }
        match refused {
            Some(e) => Err(e),
            None => Ok(ReloadReport { outcomes, need_restart }),
        }
    }
}

/// The chain's filters, loaded, each behind its [`Reloader`].
pub struct Loaded {
    /// One per filter, in chain order.
    pub reloaders: Vec<Reloader>,
    /// Each filter's Wasm stack cap (fixed until a restart).
    stacks: Vec<usize>,
    /// The filter files (to watch for changes).
    files: Vec<PathBuf>,
    /// The resolver the filters' `dns` and `auth` imports use (`[dns]`),
    /// for the front ends to share.
    pub resolver: crate::dns::Resolver,
}

impl Loaded {
    /// The chain of these filters, following their reloads.
    pub fn chain(&self) -> Chain {
        Chain::new(self.reloaders.iter().map(Reloader::slot).collect())
    }
}

/// Loads the configured chain (`[filter]` or `[[filters]]`, with their
/// limits) on `store`: what the daemon serves, and what `greyhook
/// simulate` and `greyhook check` run.
pub async fn load_chain(config: &DaemonConfig, store: Arc<dyn Store>, cache: Option<ArtifactCache>) -> Result<Loaded, DaemonError> {
    load_specs(config, filter_specs(config)?, store, cache).await
}

/// [`load_chain`] with the chain's `specs` already made from `config`.
async fn load_specs(
    config: &DaemonConfig,
    specs: Vec<FilterSpec>,
    store: Arc<dyn Store>,
    cache: Option<ArtifactCache>,
) -> Result<Loaded, DaemonError> {
    let resolver = crate::dns::Resolver::new(config.dns.clone());
    let max_memory = specs.iter().map(|s| s.options.limits.memory).max().unwrap_or(0).max(RuntimeConfig::default().max_memory);
    // wasmtime caps the stack per engine: one runtime per distinct cap
    // (usually one for the whole chain).
    let mut runtimes: Vec<(usize, Runtime)> = Vec::new();
    for s in &specs {
        if !runtimes.iter().any(|(stack, _)| *stack == s.stack) {
            let rc = RuntimeConfig { max_memory, max_stack: s.stack, resolver: resolver.clone(), ..RuntimeConfig::default() };
            runtimes.push((s.stack, Runtime::new(rc)?));
        }
    }
    let (mut reloaders, mut stacks, mut files) = (Vec::new(), Vec::new(), Vec::new());
    for FilterSpec { source, options, stack } in specs {
        if let FilterSource::File(p) = &source {
            files.push(p.clone());
        }
        let runtime = runtimes.iter().find(|(s, _)| *s == stack).map(|(_, r)| r.clone()).unwrap_or_else(|| unreachable!("built above"));
        stacks.push(stack);
        let reloader = Reloader::start(runtime, store.clone(), source, options, cache.clone()).await.map_err(|e| match e {
            ReloadError::Load(l) => DaemonError::Load(l),
            ReloadError::Read { path, error } => DaemonError::FilterFile { path, error },
            other => DaemonError::Invalid(other.to_string()),
        })?;
        let info = reloader.filter().info().clone();
        tracing::info!(name = %info.name, version = %info.version, namespace = %reloader.filter().namespace(), "filter loaded");
        reloaders.push(reloader);
    }
    // A namespace left to the filter's name is known only now.
    let names: Vec<String> = reloaders.iter().map(|r| r.filter().namespace().to_string()).collect();
    if let Some((i, ns)) = names.iter().enumerate().find(|(i, ns)| names[..*i].contains(ns)) {
        return Err(DaemonError::Invalid(format!(
            "filters {} and {} of the chain share the store namespace {ns:?} (a filter's namespace is its name unless \
             `namespace` sets one): give each its own",
            names.iter().position(|n| n == ns).map_or(0, |p| p + 1),
            i + 1
        )));
    }
    Ok(Loaded { reloaders, stacks, files, resolver })
}

/// A running daemon: where its front ends listen and the handle to stop it.
pub struct Daemon {
    /// Each running front end's name and the addresses it is bound to.
    endpoints: Vec<(&'static str, Vec<ListenAddr>)>,
    /// The control socket's path.
    pub control_path: PathBuf,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

impl Daemon {
    /// Loads the filter, opens the store, binds the listeners and starts
    /// serving in the background, with reloads on file changes and on the
    /// control socket.
    pub async fn start(config: &DaemonConfig, clock: Arc<dyn Clock>, reconfigure: Option<Reconfigure>) -> Result<Daemon, DaemonError> {
        let chain_sections = config.chain()?;
        // What the configuration alone can refuse is refused before the
        // store or the compiled-filter cache is opened (either may create
        // files and directories).
        let specs = filter_specs(config)?;
        let db_path = config.store.redb_path();
        // Removed again (when dropped) if the start fails from here on; kept
        // at the end. Declared before the store, so dropped after it.
        let fresh = db_path.as_deref().map(fresh::Fresh::before);
        let store: Arc<dyn Store> = Arc::new(crate::store::Metered::new(config.store.open()?));
        crate::session::audit::set_format(config.log.decisions);
        tracing::info!("store: {}", config.store.describe());
        tracing::info!("dns: {}", config.dns.describe());
        let cache_dir = chain_sections.iter().find_map(|f| f.cache_dir.clone()).or_else(crate::runtime::artifact_cache::default_dir);
        let cache = match cache_dir {
            Some(d) => match ArtifactCache::open(&d) {
                Ok(c) => {
                    tracing::info!("compiled filters: {}", d.display());
                    Some(c)
                }
                Err(e) => {
                    tracing::warn!(
                        "no compiled-filter cache in {}: {e}; filters are compiled at every start (set [filter] cache_dir)",
                        d.display()
                    );
                    None
                }
            },
            None => {
                tracing::info!("compiled filters: not cached (no cache_dir, $CACHE_DIRECTORY, /var/cache/greyhook or $HOME)");
                None
            }
        };
        let compiled_filters = cache.as_ref().map(|c| c.dir().to_path_buf());
        let Loaded { reloaders, stacks, files, resolver } = load_specs(config, specs, store.clone(), cache).await?;
        let mut watched: Vec<PathBuf> = reconfigure.as_ref().map(|r| r.files.clone()).unwrap_or_default();
        watched.extend(files);
        let chain = Chain::new(reloaders.iter().map(Reloader::slot).collect());
        let hooks = Hooks {
            chain,
            clock: clock.clone(),
            resolver: config.dns.resolve_clients.then_some(resolver.clone()),
            front_end: Hooks::EMBEDDED,
        };
        let shutdown = CancellationToken::new();
        let files = OpenFiles::now(open_files_needed(config));
        if let Err(warning) = files.check() {
            tracing::warn!("{warning}");
        }
        let front_ends = start_front_ends(config, &hooks, &shutdown).await?;
        if front_ends.is_empty() {
            return Err(DaemonError::Invalid("nothing to listen on: give policy.listen, milter.listen or smtp.listen".into()));
        }
        for f in &front_ends {
            let at: Vec<String> = f.endpoints.iter().map(ToString::to_string).collect();
            match at.is_empty() {
                true => tracing::info!("{} front end started", f.name),
                false => tracing::info!("{} front end listening on {}", f.name, at.join(", ")),
            }
        }
        let control_path = config.control.socket.clone().map_or_else(default_control_path, PathBuf::from);
        let control =
            Listener::bind(&ListenAddr::Unix(control_path.clone()), &UnixPerms { mode: Some(0o600), ..UnixPerms::default() }).await?;
        tracing::info!("control socket {} (greyhook status, greyhook reload)", control_path.display());
        let web = web::bind(&config.metrics).await?;
        let mut listeners: Vec<Listening> = front_ends
            .iter()
            .map(|f| Listening {
                name: f.name,
                addresses: f.endpoints.iter().map(ToString::to_string).collect(),
                // A front end on its MTA's pipe accepts no connections.
                front_end: !f.endpoints.is_empty(),
            })
            .collect();
        if let Some(addr) = web.as_ref().and_then(|w| w.local_addr().ok()) {
            tracing::info!("metrics on http://{addr}/metrics, status page on http://{addr}/");
            listeners.push(Listening { name: "metrics", addresses: vec![addr.to_string()], front_end: false });
        }
        listeners.push(Listening { name: "control", addresses: vec![control_path.display().to_string()], front_end: false });
        let n = reloaders.len();
        let shared = Arc::new(Shared {
            reloaders,
            fixed: fixed_tables(config),
            stacks,
            store: store.clone(),
            resolver,
            started: std::time::Instant::now(),
            started_at: std::time::SystemTime::now(),
            reconfigure,
            last_reload: std::sync::Mutex::new(vec![None; n]),
            records: std::sync::atomic::AtomicU64::new(u64::MAX),
            store_kind: config.store.backend().map_or("redb", |b| b.name),
            store_desc: config.store.describe(),
            store_file: db_path.clone(),
            listeners,
            clock: clock.clone(),
            files_needed: files.total(),
            compiled_filters,
        });
        let endpoints = front_ends.iter().map(|f| (f.name, f.endpoints.clone())).collect();
        let mut tasks = Vec::new();
        for f in front_ends {
            // A front end that ends by itself (its MTA closed the pipe)
            // ends the daemon; a listener ends only at shutdown.
            let (name, stop) = (f.name, shutdown.clone());
            tasks.push(tokio::spawn(async move {
                f.serve.await;
                if !stop.is_cancelled() {
                    tracing::info!("the {name} front end ended: stopping");
                    stop.cancel();
                }
            }));
        }
        tasks.push(tokio::spawn(housekeeping(shared.clone(), clock, config.store.clone(), shutdown.clone())));
        tasks.push(tokio::spawn(certificate_reminders(shutdown.clone())));
        if let Some(w) = web {
            tasks.push(tokio::spawn(web::serve(w, config.metrics.max_connections, shared.clone(), shutdown.clone())));
        }
        tasks.push(tokio::spawn(control_service(control, shared.clone(), shutdown.clone())));
        for (i, f) in chain_sections.iter().enumerate() {
            let breaker = BreakerConfig {
                failures: f.breaker_failures,
                window: f.breaker_window.max(Duration::from_millis(10)),
                backoff: f.breaker_backoff,
            };
            tasks.push(tokio::spawn(watch_breaker(shared.clone(), i, breaker, shutdown.clone())));
        }
        let names: Vec<String> = watched.iter().map(|p| p.display().to_string()).collect();
        match watch(watched, shared.clone(), shutdown.clone()) {
            Ok(t) => {
                if !names.is_empty() {
                    tracing::info!("watching for changes (then reloading): {}", names.join(", "));
                }
                tasks.push(t)
            }
            Err(e) => tracing::warn!("cannot watch the filter and configuration files (reload with SIGHUP or `greyhook reload`): {e}"),
        }
        let done = tokio::spawn(async move {
            for t in tasks {
                let _ = t.await;
            }
            match store.flush().await {
                Ok(()) => tracing::info!("store flushed; stopped"),
                Err(e) => tracing::error!("flushing the store at shutdown failed: {e}"),
            }
        });
        if let Some(f) = fresh {
            f.keep();
        }
        Ok(Daemon { endpoints, control_path, shared, shutdown, done })
    }

    /// The addresses front end `name` (`policy`, `milter`, `smtp`...) is
    /// bound to; empty if it does not run or does not listen.
    pub fn endpoints(&self, name: &str) -> Vec<ListenAddr> {
        self.endpoints.iter().find(|(n, _)| *n == name).map(|(_, e)| e.clone()).unwrap_or_default()
    }

    /// Reloads the filter (rereading the configuration, if the daemon was
    /// started with a [`Reconfigure`]). A refused version leaves the current
    /// one serving.
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        self.shared.reload().await
    }

    /// The last filter of the chain, as serving now.
    pub fn filter(&self) -> Arc<crate::runtime::Filter> {
        self.shared.reloaders.last().map(Reloader::filter).unwrap_or_else(|| unreachable!("a chain has at least one filter"))
    }

    /// Every filter of the chain, in order, as serving now.
    pub fn filters(&self) -> Vec<Arc<crate::runtime::Filter>> {
        self.shared.reloaders.iter().map(Reloader::filter).collect()
    }

    /// A handle that reloads the filter, for signal handlers.
    pub fn reload_handle(&self) -> ReloadHandle {
        ReloadHandle(self.shared.clone())
    }

    /// A token that stops the daemon when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops accepting, lets requests in flight finish, flushes the store.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.done.await;
    }

    /// Waits until the daemon stops (its shutdown token was cancelled).
    pub async fn wait(self) {
        let _ = self.done.await;
    }
}

/// Reloads the daemon's filter from anywhere (a signal handler).
#[derive(Clone)]
pub struct ReloadHandle(Arc<Shared>);

impl ReloadHandle {
    /// Reloads; see [`Daemon::reload`].
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        self.0.reload().await
    }
}

/// Warns again, once a day, of a TLS certificate in use that is near its
/// expiry or past it ([`crate::pem::remind`]): the warning at load is
/// long scrolled away by the time a failed renewal matters.
async fn certificate_reminders(shutdown: CancellationToken) {
    let every = crate::pem::REMINDER_INTERVAL;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            _ = tick.tick() => crate::pem::remind(),
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Sweeps expired records every `sweep_interval`, then counts the live
/// ones (for `status` and `greyhook_store_records`).
async fn housekeeping(shared: Arc<Shared>, clock: Arc<dyn Clock>, cfg: StoreConfig, shutdown: CancellationToken) {
    let store = &shared.store;
    let mut sweep = tokio::time::interval(cfg.sweep_interval.max(Duration::from_secs(1)));
    loop {
        tokio::select! {
            _ = sweep.tick() => {
                match store.sweep(clock.now()).await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!("swept {n} expired records"),
                    Err(e) => tracing::error!("store sweep failed: {e}"),
                }
                if let Ok(Some(n)) = store.count_prefix("", clock.now()).await {
                    shared.records.store(n, std::sync::atomic::Ordering::Relaxed);
                }
            }
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    /// The log as a test reads it.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The daily reminder itself, a day at a time on tokio's paused clock:
    /// a certificate with nine days left is warned of when it is loaded,
    /// then once every 24 hours, never in between, and not after shutdown.
    #[tokio::test(start_paused = true)]
    async fn a_certificate_near_expiry_is_warned_of_once_a_day() {
        let log = Captured::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt().with_ansi(false).with_writer(move || writer.clone()).finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        // Other tests' certificates may be in use too: only this file's lines count.
        let path = std::path::Path::new("/etc/reminder-test/fullchain.pem");
        let warnings = || String::from_utf8_lossy(&log.0.lock().unwrap()).lines().filter(|l| l.contains(path.to_str().unwrap())).count();

        let mut params = rcgen::CertificateParams::new(vec!["greyhook.test".to_string()]).unwrap();
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(9) + time::Duration::hours(12);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let pair = crate::pem::pair(path, cert.pem().as_bytes(), path, key.serialize_pem().as_bytes()).unwrap();
        crate::pem::note_expiry("reminder-test", path, &pair);
        assert_eq!(warnings(), 1, "warned of at load");
        assert!(String::from_utf8_lossy(&log.0.lock().unwrap()).contains("fullchain.pem: the certificate expires in 9 day(s)"));

        let shutdown = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(super::certificate_reminders(shutdown.clone()));
        let day = crate::pem::REMINDER_INTERVAL;
        tokio::time::sleep(day - std::time::Duration::from_secs(60)).await;
        assert_eq!(warnings(), 1, "nothing more within the day");
        tokio::time::sleep(std::time::Duration::from_secs(120)).await;
        assert_eq!(warnings(), 2, "again a day later");
        tokio::time::sleep(day).await;
        assert_eq!(warnings(), 3, "and the day after");
        shutdown.cancel();
        task.await.unwrap();
        tokio::time::sleep(day * 2).await;
        assert_eq!(warnings(), 3, "none after shutdown");
    }
}
