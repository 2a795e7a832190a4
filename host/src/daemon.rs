//! `greyhook serve`: the daemon's configuration file, and running it.
//!
//! Layers, lowest first: built-in defaults, the TOML file (`--config`), then
//! the command line's flags (`--policy`, `--db`, `--filter`, `--set`). The
//! file is parsed strictly: an unknown key or a bad value stops the start
//! with the file, line and key named. Every key is documented in
//! `docs/configuration.md`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Deserialize;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::engine::{FailurePolicy, FilterOptions, Limits, LoadError, Runtime, RuntimeConfig};
use crate::listen::{ListenAddr, ListenError, Listener, UnixPerms};
use crate::policy::{PolicyConfig, PolicyServer, TempfailAction};
use crate::store::{Durability, MemoryStore, RedbStore, Store, StoreError};

/// The `[filter]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilterSection {
    /// The filter component; the embedded reference filter if unset.
    pub path: Option<PathBuf>,
    /// Store namespace of the filter's keys.
    pub namespace: String,
    /// `continue` (fail open) or `tempfail`.
    pub failure_policy: FailurePolicy,
    /// Deadline of one hook call.
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
    /// Memory cap of one instance, MiB.
    pub memory_mib: usize,
    /// Most store calls in one hook call.
    pub store_calls: u32,
    /// The filter's own configuration, handed to its `init`.
    pub config: toml::Table,
}

impl Default for FilterSection {
    fn default() -> Self {
        let l = Limits::default();
        FilterSection {
            path: None,
            namespace: "greylist".into(),
            failure_policy: FailurePolicy::Continue,
            deadline: l.deadline,
            memory_mib: l.memory >> 20,
            store_calls: l.store_calls,
            config: toml::Table::new(),
        }
    }
}

/// The `[store]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// The redb file, or `memory` for a store that is lost on exit.
    pub path: Option<String>,
    /// `periodic` (written and fsynced every second) or `immediate` (every write).
    pub durability: Durability,
    /// How often expired records are swept.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection { path: None, durability: Durability::Periodic, sweep_interval: Duration::from_secs(60) }
    }
}

/// The `[policy]` table: the Postfix policy listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicySection {
    /// Addresses: `127.0.0.1:10023`, `[::1]:10023`, `unix:/path`.
    pub listen: Vec<ListenAddr>,
    /// Mode of unix sockets, octal text (`"0660"`).
    pub socket_mode: Option<String>,
    /// Owner of unix sockets (user name or uid).
    pub socket_owner: Option<String>,
    /// Group of unix sockets (group name or gid).
    pub socket_group: Option<String>,
    /// `reply` (`451 4.7.1 ... retry=`) or `defer_if_permit`.
    pub tempfail_action: TempfailAction,
    /// Longest attribute line, bytes.
    pub max_line: usize,
    /// Most attributes in one request.
    pub max_attributes: usize,
    /// Idle connections are closed after this.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A request must be complete within this.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Most connections at once.
    pub max_connections: usize,
}

impl Default for PolicySection {
    fn default() -> Self {
        let p = PolicyConfig::default();
        PolicySection {
            listen: vec![ListenAddr::Tcp(([127, 0, 0, 1], 10023).into())],
            socket_mode: None,
            socket_owner: None,
            socket_group: None,
            tempfail_action: p.tempfail_action,
            max_line: p.max_line,
            max_attributes: p.max_attributes,
            idle_timeout: p.idle_timeout,
            request_timeout: p.request_timeout,
            max_connections: p.max_connections,
        }
    }
}

/// The `[log]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// `error`, `warn`, `info` (one line per decision), `debug`, or a
    /// tracing filter such as `info,greyhook::filter=debug`.
    pub level: String,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection { level: "info".into() }
    }
}

/// The daemon's whole configuration (`greyhook.toml`).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// The filter.
    pub filter: FilterSection,
    /// The store.
    pub store: StoreSection,
    /// The policy listener.
    pub policy: PolicySection,
    /// Logging.
    pub log: LogSection,
}

/// Why the daemon cannot start or stopped.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// The configuration file cannot be read or parsed.
    #[error("{path}: {message}")]
    Config {
        /// The file.
        path: String,
        /// What is wrong, with line and key.
        message: String,
    },
    /// A value out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// The filter file cannot be read.
    #[error("cannot read filter {path}: {source}")]
    FilterFile {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The filter was refused.
    #[error("filter refused: {0}")]
    Load(#[from] LoadError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A listener failed.
    #[error(transparent)]
    Listen(#[from] ListenError),
}

impl DaemonConfig {
    /// Parses a configuration file's text; errors name `path`, the line and the key.
    pub fn parse(text: &str, path: &str) -> Result<DaemonConfig, DaemonError> {
        toml::from_str(text).map_err(|e| DaemonError::Config { path: path.to_string(), message: e.to_string().trim().to_string() })
    }

    /// Reads and parses a configuration file.
    pub fn load(path: &Path) -> Result<DaemonConfig, DaemonError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| DaemonError::Config { path: path.display().to_string(), message: e.to_string() })?;
        DaemonConfig::parse(&text, &path.display().to_string())
    }

    /// Applies `--set KEY=VALUE` overrides to the filter's configuration.
    pub fn set_filter_keys(&mut self, sets: &[String]) -> Result<(), DaemonError> {
        let base = toml::to_string(&self.filter.config).map_err(|e| DaemonError::Invalid(e.to_string()))?;
        let merged = crate::config::merge_settings(&base, "--set", sets).map_err(|e| DaemonError::Invalid(e.to_string()))?;
        self.filter.config = merged.parse().map_err(|e: toml::de::Error| DaemonError::Invalid(e.to_string()))?;
        Ok(())
    }

    fn unix_perms(&self) -> Result<UnixPerms, DaemonError> {
        let mode = match &self.policy.socket_mode {
            Some(m) => Some(
                u32::from_str_radix(m.trim_start_matches("0o"), 8)
                    .map_err(|_| DaemonError::Invalid(format!("policy.socket_mode {m:?} is not octal (e.g. \"0660\")")))?,
            ),
            None => None,
        };
        Ok(UnixPerms { mode, owner: self.policy.socket_owner.clone(), group: self.policy.socket_group.clone() })
    }

    fn policy_config(&self) -> Result<PolicyConfig, DaemonError> {
        let p = &self.policy;
        if p.max_line < 256 || p.max_attributes == 0 || p.max_connections == 0 {
            return Err(DaemonError::Invalid("policy.max_line must be at least 256, max_attributes and max_connections at least 1".into()));
        }
        Ok(PolicyConfig {
            tempfail_action: p.tempfail_action,
            max_line: p.max_line,
            max_attributes: p.max_attributes,
            idle_timeout: p.idle_timeout,
            request_timeout: p.request_timeout,
            max_connections: p.max_connections,
            ..PolicyConfig::default()
        })
    }
}

/// Where the store lives by default: `$STATE_DIRECTORY` (systemd's
/// `StateDirectory=`), else `/var/lib/greyhook` when it can be created
/// (root), else `$XDG_STATE_HOME/greyhook` or `~/.local/state/greyhook`.
pub fn default_db_path() -> PathBuf {
    if let Some(d) = std::env::var_os("STATE_DIRECTORY").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("greyhook.db");
    }
    let system = PathBuf::from("/var/lib/greyhook");
    if std::fs::create_dir_all(&system).is_ok() && tempfile_probe(&system) {
        return system.join("greyhook.db");
    }
    let state = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("."));
    state.join("greyhook").join("greyhook.db")
}

fn tempfile_probe(dir: &Path) -> bool {
    let p = dir.join(".greyhook-write-test");
    let ok = std::fs::write(&p, b"").is_ok();
    let _ = std::fs::remove_file(&p);
    ok
}

/// A running daemon: its listeners' addresses and the handle to stop it.
pub struct Daemon {
    /// The policy listeners' bound addresses.
    pub policy_addrs: Vec<ListenAddr>,
    shutdown: CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

impl Daemon {
    /// Loads the filter, opens the store, binds the listeners and starts
    /// serving in the background.
    pub async fn start(config: &DaemonConfig, clock: Arc<dyn Clock>) -> Result<Daemon, DaemonError> {
        let f = &config.filter;
        let memory = f
            .memory_mib
            .checked_shl(20)
            .filter(|m| (1 << 20..=1 << 30).contains(m))
            .ok_or_else(|| DaemonError::Invalid("filter.memory_mib must be 1 to 1024".into()))?;
        if f.deadline.is_zero() || f.deadline > Duration::from_secs(30) {
            return Err(DaemonError::Invalid("filter.deadline must be between 1ms and 30s".into()));
        }
        let runtime =
            Runtime::new(RuntimeConfig { max_memory: memory.max(RuntimeConfig::default().max_memory), ..RuntimeConfig::default() })?;
        let bytes = match &f.path {
            Some(p) => std::fs::read(p).map_err(|source| DaemonError::FilterFile { path: p.display().to_string(), source })?,
            None => crate::REFERENCE_FILTER.to_vec(),
        };
        let store: Arc<dyn Store> = match config.store.path.as_deref() {
            Some("memory") => Arc::new(MemoryStore::new()),
            Some(p) => Arc::new(RedbStore::open(Path::new(p), config.store.durability)?),
            None => Arc::new(RedbStore::open(&default_db_path(), config.store.durability)?),
        };
        let options = FilterOptions {
            config: toml::to_string(&f.config).map_err(|e| DaemonError::Invalid(e.to_string()))?,
            namespace: f.namespace.clone(),
            limits: Limits { deadline: f.deadline, memory, store_calls: f.store_calls, ..Limits::default() },
            failure_policy: f.failure_policy,
        };
        let filter = runtime.load(&bytes, options, store.clone()).await?;
        tracing::info!(name = %filter.info().name, version = %filter.info().version, "filter loaded");
        let filter = Arc::new(ArcSwap::from_pointee(filter));
        let server = Arc::new(PolicyServer::new(filter, clock.clone(), config.policy_config()?));
        let perms = config.unix_perms()?;
        let mut listeners = Vec::new();
        for a in &config.policy.listen {
            let l = Listener::bind(a, &perms).await?;
            tracing::info!("policy service listening on {}", l.local_addr());
            listeners.push(l);
        }
        let policy_addrs = listeners.iter().map(Listener::local_addr).collect();
        let shutdown = CancellationToken::new();
        let tasks: Vec<_> =
            listeners.into_iter().map(|l| tokio::spawn(crate::policy::serve(l, server.clone(), shutdown.clone()))).collect();
        let housekeeping = tokio::spawn(housekeeping(store.clone(), clock, config.store.clone(), shutdown.clone()));
        let done = tokio::spawn(async move {
            for t in tasks {
                let _ = t.await;
            }
            let _ = housekeeping.await;
            match store.flush().await {
                Ok(()) => tracing::info!("store flushed; stopped"),
                Err(e) => tracing::error!("flushing the store at shutdown failed: {e}"),
            }
        });
        Ok(Daemon { policy_addrs, shutdown, done })
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

async fn housekeeping(store: Arc<dyn Store>, clock: Arc<dyn Clock>, cfg: StoreSection, shutdown: CancellationToken) {
    let mut sweep = tokio::time::interval(cfg.sweep_interval.max(Duration::from_secs(1)));
    loop {
        tokio::select! {
            _ = sweep.tick() => match store.sweep(clock.now()).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!("swept {n} expired records"),
                Err(e) => tracing::error!("store sweep failed: {e}"),
            },
            _ = shutdown.cancelled() => return,
        }
    }
}
