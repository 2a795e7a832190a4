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

use serde::Deserialize;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::artifact_cache::ArtifactCache;
use crate::chain::Chain;
use crate::clock::Clock;
use crate::engine::{FailurePolicy, FilterOptions, Limits, LoadError, Runtime, RuntimeConfig};
use crate::listen::{ListenAddr, ListenError, Listener, UnixPerms};
use crate::milter::MilterConfig;
use crate::policy::{PolicyConfig, PolicyServer, TempfailAction};
use crate::relay::NextHop;
use crate::reload::{BreakerConfig, FilterSource, ReloadError, ReloadOutcome, Reloader};
use crate::session::Hooks;
use crate::smtp::SmtpConfig;
use crate::store::{Durability, MemoryStore, RedbStore, RedisConfig, RedisStore, Store, StoreError};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

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
    /// Wasm stack cap, KiB. Filters with different caps run in separate
    /// engines; a change needs a restart.
    pub stack_kib: usize,
    /// Crash-loop breaker: this many failures within `breaker_window` (and
    /// at least half the calls) put the previous version back.
    pub breaker_failures: u64,
    /// The breaker's window.
    #[serde(with = "humantime_serde")]
    pub breaker_window: Duration,
    /// How long a reverted version is refused (doubling each time).
    #[serde(with = "humantime_serde")]
    pub breaker_backoff: Duration,
    /// Where compiled filters are kept across restarts (default: `cache/`
    /// beside the store file; none with the memory store).
    pub cache_dir: Option<PathBuf>,
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
            stack_kib: RuntimeConfig::default().max_stack >> 10,
            cache_dir: None,
            breaker_failures: BreakerConfig::default().failures,
            breaker_window: BreakerConfig::default().window,
            breaker_backoff: BreakerConfig::default().backoff,
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
    /// Redis only: put before every key (several deployments on one server).
    pub prefix: String,
    /// Redis only: the bound of every store call.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for StoreSection {
    fn default() -> Self {
        let r = RedisConfig::new("");
        StoreSection {
            path: None,
            durability: Durability::Periodic,
            sweep_interval: Duration::from_secs(60),
            prefix: r.prefix,
            timeout: r.timeout,
        }
    }
}

impl StoreSection {
    /// Opens the store this section names: `memory`, a `redis://` URL, or
    /// a redb file (the default path if unset).
    pub fn open(&self) -> Result<Arc<dyn Store>, DaemonError> {
        Ok(match self.path.as_deref() {
            Some("memory") => Arc::new(MemoryStore::new()),
            Some(url) if url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("redis+unix://") => {
                if self.timeout.is_zero() || self.timeout > Duration::from_secs(30) {
                    return Err(DaemonError::Invalid("store.timeout must be between 1ms and 30s".into()));
                }
                Arc::new(RedisStore::open(RedisConfig { url: url.to_string(), prefix: self.prefix.clone(), timeout: self.timeout })?)
            }
            Some(p) => Arc::new(RedbStore::open(Path::new(p), self.durability)?),
            None => Arc::new(RedbStore::open(&default_db_path(), self.durability)?),
        })
    }

    /// The redb file, if the store is one.
    pub fn redb_path(&self) -> Option<PathBuf> {
        match self.path.as_deref() {
            Some("memory") => None,
            Some(u) if u.contains("://") => None,
            Some(p) => Some(PathBuf::from(p)),
            None => Some(default_db_path()),
        }
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

/// The `[milter]` table: the milter listener (Postfix `smtpd_milters`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MilterSection {
    /// Addresses (none by default): `127.0.0.1:10024`, `unix:/path`.
    pub listen: Vec<ListenAddr>,
    /// Mode of unix sockets, octal text (`"0660"`).
    pub socket_mode: Option<String>,
    /// Owner of unix sockets (user name or uid).
    pub socket_owner: Option<String>,
    /// Group of unix sockets (group name or gid).
    pub socket_group: Option<String>,
    /// Largest milter packet, bytes.
    pub max_packet: usize,
    /// Idle connections are closed after this.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Most connections at once.
    pub max_connections: usize,
}

impl Default for MilterSection {
    fn default() -> Self {
        let m = MilterConfig::default();
        MilterSection {
            listen: Vec::new(),
            socket_mode: None,
            socket_owner: None,
            socket_group: None,
            max_packet: m.max_packet,
            idle_timeout: m.idle_timeout,
            max_connections: m.max_connections,
        }
    }
}

/// `smtp` or `lmtp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HopProtocol {
    /// SMTP (EHLO).
    #[default]
    Smtp,
    /// LMTP (LHLO; one reply per recipient after the data).
    Lmtp,
}

/// The `[smtp]` table: the reference SMTP front end (`greyhook smtp`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpSection {
    /// Addresses (none by default): `0.0.0.0:25`, `127.0.0.1:2525`.
    pub listen: Vec<ListenAddr>,
    /// Where accepted mail goes, `HOST:PORT` (required with `listen`).
    pub next_hop: Option<String>,
    /// `smtp` or `lmtp`.
    pub next_hop_protocol: HopProtocol,
    /// Deadline of connecting to the next hop and of each of its replies.
    #[serde(with = "humantime_serde")]
    pub next_hop_timeout: Duration,
    /// Our name in the greeting (default: the system's host name).
    pub hostname: Option<String>,
    /// Largest message, bytes.
    pub max_message_size: usize,
    /// Most recipients per message.
    pub max_recipients: usize,
    /// Longest command line, bytes.
    pub max_line: usize,
    /// Wait for a command at most this long.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Wait for message data at most this long.
    #[serde(with = "humantime_serde")]
    pub data_timeout: Duration,
    /// Most connections at once.
    pub max_connections: usize,
    /// PEM certificate chain: enables STARTTLS (with `tls_key`).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key.
    pub tls_key: Option<PathBuf>,
}

impl Default for SmtpSection {
    fn default() -> Self {
        let c =
            SmtpConfig::new(NextHop { address: String::new(), lmtp: false, timeout: Duration::from_secs(300), helo_name: String::new() });
        SmtpSection {
            listen: Vec::new(),
            next_hop: None,
            next_hop_protocol: HopProtocol::Smtp,
            next_hop_timeout: c.next_hop.timeout,
            hostname: None,
            max_message_size: c.max_message_size,
            max_recipients: c.max_recipients,
            max_line: c.max_line,
            command_timeout: c.command_timeout,
            data_timeout: c.data_timeout,
            max_connections: c.max_connections,
            tls_cert: None,
            tls_key: None,
        }
    }
}

/// The `[control]` table: the local socket `greyhook reload` talks to.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ControlSection {
    /// The unix socket's path (mode 0600); see [`default_control_path`].
    pub socket: Option<String>,
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
    /// The filter (when there is one).
    pub filter: Option<FilterSection>,
    /// A chain of filters, asked in order (instead of `[filter]`).
    pub filters: Vec<FilterSection>,
    /// The store.
    pub store: StoreSection,
    /// The policy listener.
    pub policy: PolicySection,
    /// The milter listener.
    pub milter: MilterSection,
    /// The SMTP front end.
    pub smtp: SmtpSection,
    /// The control socket.
    pub control: ControlSection,
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

    /// The filters in chain order: `[[filters]]`, or `[filter]`, or the
    /// default (the reference filter).
    pub fn chain(&self) -> Result<Vec<FilterSection>, DaemonError> {
        match (&self.filter, self.filters.is_empty()) {
            (Some(_), false) => Err(DaemonError::Invalid("use either [filter] or [[filters]], not both".into())),
            (Some(f), true) => Ok(vec![f.clone()]),
            (None, false) => Ok(self.filters.clone()),
            (None, true) => Ok(vec![FilterSection::default()]),
        }
    }

    /// The filter the command line's `--filter` and `--set` apply to: the
    /// last of the chain (the greylisting one, behind any allow-lists).
    pub fn main_filter_mut(&mut self) -> &mut FilterSection {
        if self.filters.is_empty() {
            self.filter.get_or_insert_with(FilterSection::default)
        } else {
            let n = self.filters.len() - 1;
            &mut self.filters[n]
        }
    }

    /// Applies `--set KEY=VALUE` overrides to the main filter's configuration.
    pub fn set_filter_keys(&mut self, sets: &[String]) -> Result<(), DaemonError> {
        if sets.is_empty() {
            return Ok(());
        }
        let f = self.main_filter_mut();
        let base = toml::to_string(&f.config).map_err(|e| DaemonError::Invalid(e.to_string()))?;
        let merged = crate::config::merge_settings(&base, "--set", sets).map_err(|e| DaemonError::Invalid(e.to_string()))?;
        f.config = merged.parse().map_err(|e: toml::de::Error| DaemonError::Invalid(e.to_string()))?;
        Ok(())
    }

    fn unix_perms(&self) -> Result<UnixPerms, DaemonError> {
        let p = &self.policy;
        socket_perms("policy", &p.socket_mode, &p.socket_owner, &p.socket_group)
    }

    fn milter_config(&self) -> Result<(MilterConfig, UnixPerms), DaemonError> {
        let m = &self.milter;
        if !(1024..=16 << 20).contains(&m.max_packet) || m.max_connections == 0 {
            return Err(DaemonError::Invalid("milter.max_packet must be 1024 to 16777216, max_connections at least 1".into()));
        }
        let perms = socket_perms("milter", &m.socket_mode, &m.socket_owner, &m.socket_group)?;
        let config = MilterConfig {
            max_packet: m.max_packet,
            idle_timeout: m.idle_timeout,
            max_connections: m.max_connections,
            ..MilterConfig::default()
        };
        Ok((config, perms))
    }

    /// The SMTP front end's settings, when it listens anywhere.
    fn smtp_config(&self) -> Result<Option<SmtpConfig>, DaemonError> {
        let s = &self.smtp;
        if s.listen.is_empty() {
            return Ok(None);
        }
        let bad = |m: &str| DaemonError::Invalid(format!("smtp.{m}"));
        let next_hop = s.next_hop.clone().ok_or_else(|| bad("next_hop is required (HOST:PORT of the MTA behind greyhook)"))?;
        if !next_hop.contains(':') {
            return Err(bad("next_hop must be HOST:PORT"));
        }
        if s.max_line < 512 || s.max_recipients < 1 || s.max_message_size < 1024 || s.max_connections == 0 {
            return Err(bad("max_line must be at least 512, max_message_size 1024, max_recipients and max_connections 1"));
        }
        let hostname = s.hostname.clone().unwrap_or_else(system_hostname);
        let tls = match (&s.tls_cert, &s.tls_key) {
            (None, None) => None,
            (Some(c), Some(k)) => Some(tls_acceptor(c, k)?),
            _ => return Err(bad("tls_cert and tls_key go together")),
        };
        let hop = NextHop {
            address: next_hop,
            lmtp: s.next_hop_protocol == HopProtocol::Lmtp,
            timeout: s.next_hop_timeout,
            helo_name: hostname.clone(),
        };
        Ok(Some(SmtpConfig {
            hostname,
            max_line: s.max_line,
            max_message_size: s.max_message_size,
            max_recipients: s.max_recipients,
            command_timeout: s.command_timeout,
            data_timeout: s.data_timeout,
            max_connections: s.max_connections,
            tls,
            ..SmtpConfig::new(hop)
        }))
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

fn socket_perms(table: &str, mode: &Option<String>, owner: &Option<String>, group: &Option<String>) -> Result<UnixPerms, DaemonError> {
    let mode = match mode {
        Some(m) => Some(
            u32::from_str_radix(m.trim_start_matches("0o"), 8)
                .map_err(|_| DaemonError::Invalid(format!("{table}.socket_mode {m:?} is not octal (e.g. \"0660\")")))?,
        ),
        None => None,
    };
    Ok(UnixPerms { mode, owner: owner.clone(), group: group.clone() })
}

/// The machine's host name (`/proc/sys/kernel/hostname`), or `localhost`.
fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty() && h.len() <= 253)
        .unwrap_or_else(|| "localhost".into())
}

/// A TLS acceptor from PEM files.
fn tls_acceptor(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor, DaemonError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |what: &Path, e: String| DaemonError::Invalid(format!("smtp TLS: {}: {e}", what.display()));
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad(cert, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(cert, e.to_string()))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(cert, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad(cert, e.to_string()))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Where the store lives by default: `$STATE_DIRECTORY` (systemd's
/// `StateDirectory=`), else `/var/lib/greyhook` when it can be created
/// (root), else `$XDG_STATE_HOME/greyhook` or `~/.local/state/greyhook`.
pub fn default_db_path() -> PathBuf {
    if let Some(p) = systemd_or_system("STATE_DIRECTORY", "/var/lib/greyhook", "greyhook.db") {
        return p;
    }
    let state = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("."));
    state.join("greyhook").join("greyhook.db")
}

/// `$ENV/file` when systemd set `ENV`, else `system/file` when that
/// directory can be created and written.
fn systemd_or_system(env: &str, system: &str, file: &str) -> Option<PathBuf> {
    if let Some(d) = std::env::var_os(env).filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join(file));
    }
    let system = PathBuf::from(system);
    (std::fs::create_dir_all(&system).is_ok() && tempfile_probe(&system)).then(|| system.join(file))
}

fn tempfile_probe(dir: &Path) -> bool {
    let p = dir.join(".greyhook-write-test");
    let ok = std::fs::write(&p, b"").is_ok();
    let _ = std::fs::remove_file(&p);
    ok
}

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

/// The control socket's path by default: `$RUNTIME_DIRECTORY/control.sock`
/// (systemd's `RuntimeDirectory=`), else `/run/greyhook/control.sock` when it
/// can be created (root), else `$XDG_RUNTIME_DIR/greyhook/control.sock`, else
/// beside the default store.
pub fn default_control_path() -> PathBuf {
    if let Some(p) = systemd_or_system("RUNTIME_DIRECTORY", "/run/greyhook", "control.sock") {
        return p;
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("greyhook").join("control.sock");
    }
    default_db_path().with_file_name("control.sock")
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
        if specs.iter().any(|s| s.options.namespace == spec.options.namespace) {
            return Err(DaemonError::Invalid(format!(
                "two filters share the store namespace {:?}: give each its own",
                spec.options.namespace
            )));
        }
        specs.push(spec);
    }
    Ok(specs)
}

fn filter_spec(f: &FilterSection) -> Result<FilterSpec, DaemonError> {
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
        limits: Limits { deadline: f.deadline, memory, store_calls: f.store_calls, ..Limits::default() },
        failure_policy: f.failure_policy,
    };
    Ok(FilterSpec { source, options, stack: f.stack_kib << 10 })
}

struct Shared {
    reloaders: Vec<Reloader>,
    /// Each filter's stack cap, fixed at start.
    stacks: Vec<usize>,
    store: Arc<dyn Store>,
    reconfigure: Option<Reconfigure>,
}

/// What a reload did to each filter of the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadReport(pub Vec<ReloadOutcome>);

impl std::fmt::Display for ReloadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, o) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{o}")?;
        }
        Ok(())
    }
}

impl Shared {
    /// Reloads every filter of the chain (an unchanged one is left alone);
    /// the first refusal is returned, the others still take effect.
    async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let specs = match &self.reconfigure {
            Some(r) => {
                let cfg = (r.load)().map_err(|e| ReloadError::Options(e.to_string()))?;
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
        for (r, spec) in self.reloaders.iter().zip(specs) {
            let result = match spec {
                Some((source, options)) => r.reload_with(Some(source), Some(options)).await,
                None => r.reload().await,
            };
            match result {
                Ok(o) => outcomes.push(o),
                Err(e) => {
                    refused.get_or_insert(e);
                }
            }
        }
        match refused {
            Some(e) => Err(e),
            None => Ok(ReloadReport(outcomes)),
        }
    }
}

/// A running daemon: its listeners' addresses and the handle to stop it.
pub struct Daemon {
    /// The policy listeners' bound addresses.
    pub policy_addrs: Vec<ListenAddr>,
    /// The milter listeners' bound addresses.
    pub milter_addrs: Vec<ListenAddr>,
    /// The SMTP front end's bound addresses.
    pub smtp_addrs: Vec<ListenAddr>,
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
        let specs = filter_specs(config)?;
        let chain_sections = config.chain()?;
        let max_memory = specs.iter().map(|s| s.options.limits.memory).max().unwrap_or(0).max(RuntimeConfig::default().max_memory);
        // wasmtime caps the stack per engine: one runtime per distinct cap
        // (usually one for the whole chain).
        let mut runtimes: Vec<(usize, Runtime)> = Vec::new();
        for s in &specs {
            if !runtimes.iter().any(|(stack, _)| *stack == s.stack) {
                let rc = RuntimeConfig { max_memory, max_stack: s.stack, ..RuntimeConfig::default() };
                runtimes.push((s.stack, Runtime::new(rc)?));
            }
        }
        let db_path = config.store.redb_path();
        let store = config.store.open()?;
        let cache_dir = chain_sections
            .iter()
            .find_map(|f| f.cache_dir.clone())
            .or_else(|| db_path.as_ref().and_then(|p| p.parent()).map(|d| d.join("cache")));
        let cache = match cache_dir {
            Some(d) => match ArtifactCache::open(&d) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!("no compiled-filter cache in {}: {e}", d.display());
                    None
                }
            },
            None => None,
        };
        let mut reloaders = Vec::new();
        let mut watched: Vec<PathBuf> = reconfigure.as_ref().map(|r| r.files.clone()).unwrap_or_default();
        let mut stacks = Vec::new();
        for FilterSpec { source, options, stack } in specs {
            if let FilterSource::File(p) = &source {
                watched.push(p.clone());
            }
            let runtime = runtimes.iter().find(|(s, _)| *s == stack).map(|(_, r)| r.clone()).unwrap_or_else(|| unreachable!("built above"));
            stacks.push(stack);
            let reloader = Reloader::start(runtime, store.clone(), source, options, cache.clone()).await.map_err(|e| match e {
                ReloadError::Load(l) => DaemonError::Load(l),
                ReloadError::Read { path, source } => DaemonError::FilterFile { path, source },
                other => DaemonError::Invalid(other.to_string()),
            })?;
            let info = reloader.filter().info().clone();
            tracing::info!(name = %info.name, version = %info.version, namespace = %reloader.filter().options().namespace, "filter loaded");
            reloaders.push(reloader);
        }
        let chain = Chain::new(reloaders.iter().map(Reloader::slot).collect());
        let hooks = Hooks { chain: chain.clone(), clock: clock.clone() };
        let server = Arc::new(PolicyServer::new(chain, clock.clone(), config.policy_config()?));
        let (milter_config, milter_perms) = config.milter_config()?;
        let smtp_config = config.smtp_config()?;
        if config.policy.listen.is_empty() && config.milter.listen.is_empty() && smtp_config.is_none() {
            return Err(DaemonError::Invalid("nothing to listen on: give policy.listen, milter.listen or smtp.listen".into()));
        }
        let perms = config.unix_perms()?;
        let mut listeners = Vec::new();
        for a in &config.policy.listen {
            let l = Listener::bind(a, &perms).await?;
            tracing::info!("policy service listening on {}", l.local_addr());
            listeners.push(l);
        }
        let mut milters = Vec::new();
        for a in &config.milter.listen {
            let l = Listener::bind(a, &milter_perms).await?.quickack();
            tracing::info!("milter service listening on {}", l.local_addr());
            milters.push(l);
        }
        let mut smtps = Vec::new();
        for a in &config.smtp.listen {
            let l = Listener::bind(a, &UnixPerms::default()).await?;
            tracing::info!("SMTP front end listening on {}", l.local_addr());
            smtps.push(l);
        }
        let control_path = config.control.socket.clone().map_or_else(default_control_path, PathBuf::from);
        let control =
            Listener::bind(&ListenAddr::Unix(control_path.clone()), &UnixPerms { mode: Some(0o600), ..UnixPerms::default() }).await?;
        let policy_addrs = listeners.iter().map(Listener::local_addr).collect();
        let milter_addrs = milters.iter().map(Listener::local_addr).collect();
        let smtp_addrs = smtps.iter().map(Listener::local_addr).collect();
        let shutdown = CancellationToken::new();
        let shared = Arc::new(Shared { reloaders, stacks, store: store.clone(), reconfigure });
        let mut tasks: Vec<_> =
            listeners.into_iter().map(|l| tokio::spawn(crate::policy::serve(l, server.clone(), shutdown.clone()))).collect();
        for l in milters {
            tasks.push(tokio::spawn(crate::milter::serve(l, hooks.clone(), milter_config.clone(), shutdown.clone())));
        }
        if let Some(c) = smtp_config {
            let c = Arc::new(c);
            for l in smtps {
                tasks.push(tokio::spawn(crate::smtp::serve(l, hooks.clone(), c.clone(), shutdown.clone())));
            }
        }
        tasks.push(tokio::spawn(housekeeping(store.clone(), clock, config.store.clone(), shutdown.clone())));
        tasks.push(tokio::spawn(control_service(control, shared.clone(), shutdown.clone())));
        for (i, f) in chain_sections.iter().enumerate() {
            let breaker = BreakerConfig {
                failures: f.breaker_failures,
                window: f.breaker_window.max(Duration::from_millis(10)),
                backoff: f.breaker_backoff,
            };
            tasks.push(tokio::spawn(watch_breaker(shared.clone(), i, breaker, shutdown.clone())));
        }
        match watch(watched, shared.clone(), shutdown.clone()) {
            Ok(t) => tasks.push(t),
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
        Ok(Daemon { policy_addrs, milter_addrs, smtp_addrs, control_path, shared, shutdown, done })
    }

    /// Reloads the filter (rereading the configuration, if the daemon was
    /// started with a [`Reconfigure`]). A refused version leaves the current
    /// one serving.
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        self.shared.reload().await
    }

    /// The last filter of the chain, as serving now.
    pub fn filter(&self) -> Arc<crate::engine::Filter> {
        self.shared.reloaders.last().map(Reloader::filter).unwrap_or_else(|| unreachable!("a chain has at least one filter"))
    }

    /// Every filter of the chain, in order, as serving now.
    pub fn filters(&self) -> Vec<Arc<crate::engine::Filter>> {
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

/// The control socket: one command a connection (`reload` or `status`),
/// one line back.
async fn control_service(listener: Listener, shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        let (conn, _) = tokio::select! {
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
            _ = shutdown.cancelled() => return,
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let (r, mut w) = tokio::io::split(conn);
            let mut line = String::new();
            let mut r = tokio::io::BufReader::new(r.take(256));
            let read = tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut line)).await;
            let reply = match (read, line.trim()) {
                (Ok(Ok(_)), "reload") => match shared.reload().await {
                    Ok(o) => format!("ok {o}\n"),
                    Err(e) => format!("refused {e}\n"),
                },
                (Ok(Ok(_)), "status") => {
                    let parts: Vec<String> = shared
                        .reloaders
                        .iter()
                        .map(|r| {
                            let f = r.filter();
                            let s = f.stats();
                            format!(
                                "{} {} namespace={} calls={} failures={}",
                                f.info().name,
                                f.info().version,
                                f.options().namespace,
                                s.calls.load(std::sync::atomic::Ordering::Relaxed),
                                s.failures.load(std::sync::atomic::Ordering::Relaxed)
                            )
                        })
                        .collect();
                    format!("ok {}; store_failures={}\n", parts.join("; "), shared.store.failures())
                }
                _ => "error expected `reload` or `status`\n".to_string(),
            };
            let _ = w.write_all(reply.as_bytes()).await;
        });
    }
}

/// Watches `files` (through their directories, so an atomic rename into
/// place is seen) and reloads, debounced, when one changes.
fn watch(files: Vec<PathBuf>, shared: Arc<Shared>, shutdown: CancellationToken) -> Result<tokio::task::JoinHandle<()>, notify::Error> {
    use notify::Watcher;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(16);
    let names: Vec<PathBuf> = files.iter().map(|f| std::path::absolute(f).unwrap_or_else(|_| f.clone())).collect();
    let wanted = names.clone();
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev {
            let relevant = !matches!(ev.kind, notify::EventKind::Access(_)) && ev.paths.iter().any(|p| wanted.iter().any(|w| w == p));
            if relevant {
                let _ = tx.try_send(());
            }
        }
    })?;
    let mut dirs: Vec<PathBuf> = names.iter().filter_map(|n| n.parent().map(Path::to_path_buf)).collect();
    dirs.sort();
    dirs.dedup();
    for d in &dirs {
        watcher.watch(d, notify::RecursiveMode::NonRecursive)?;
    }
    Ok(tokio::spawn(async move {
        let _watcher = watcher;
        loop {
            tokio::select! {
                m = rx.recv() => if m.is_none() { return },
                _ = shutdown.cancelled() => return,
            }
            // Debounce: an editor or `cp` writes in several steps.
            tokio::time::sleep(Duration::from_millis(200)).await;
            while rx.try_recv().is_ok() {}
            let _ = shared.reload().await;
        }
    }))
}

/// Samples the filter's failures every window and trips the breaker.
async fn watch_breaker(shared: Arc<Shared>, link: usize, config: BreakerConfig, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(config.window);
    loop {
        tokio::select! {
            _ = tick.tick() => { let _ = shared.reloaders[link].check_breaker(&config).await; }
            _ = shutdown.cancelled() => return,
        }
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
