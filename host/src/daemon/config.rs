//! The daemon's configuration file: one table per concern (`[filter]` or
//! `[[filters]]`, `[store]`, `[policy]`, `[milter]`, `[smtp]`, `[control]`,
//! `[log]`), parsed strictly (an unknown key or a bad value stops the start
//! with the file, line and key named), then validated into the settings of
//! each part. Every key is documented in `docs/configuration.md`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use crate::engine::RuntimeConfig;
use crate::engine::{FailurePolicy, Limits, LoadError};
use crate::listen::{ListenAddr, ListenError, UnixPerms};
use crate::milter::MilterConfig;
use crate::policy::{PolicyConfig, TempfailAction};
use crate::relay::NextHop;
use crate::reload::BreakerConfig;
use crate::smtp::SmtpConfig;
use crate::store::{Durability, MemoryStore, RedbStore, RedisConfig, RedisStore, Store, StoreError};

/// The longest duration any setting takes: ten years. Every timeout, TTL
/// and interval is added to "now" somewhere; a value near `u64::MAX`
/// seconds (which `humantime` parses) would overflow that addition and
/// panic the task holding a peer's connection.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 366 * 24 * 3600);

/// A humantime duration (`"300s"`, `"5m"`, `"100d"`) of at most
/// [`MAX_DURATION`].
fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let v: Duration = humantime_serde::deserialize(d)?;
    if v > MAX_DURATION {
        return Err(serde::de::Error::custom(format!(
            "{} is longer than the 10 years any duration may be",
            humantime_serde::re::humantime::format_duration(v)
        )));
    }
    Ok(v)
}

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
    #[serde(deserialize_with = "duration")]
    pub deadline: Duration,
    /// Memory cap of one instance, MiB.
    pub memory_mib: usize,
    /// Most store calls in one hook call.
    pub store_calls: u32,
    /// Longest record lifetime; a longer TTL a filter asks for is cut to it.
    #[serde(deserialize_with = "duration")]
    pub max_ttl: Duration,
    /// Bytes (keys and values) the filter may write per minute; past it,
    /// writes are refused with a store `limit` error.
    pub write_bytes_per_minute: u64,
    /// Log lines the filter may write per second (a tenth of it per call).
    pub log_lines_per_second: u32,
    /// Records the filter may hold (memory and redb stores).
    pub max_records: u64,
    /// Wasm stack cap, KiB. Filters with different caps run in separate
    /// engines; a change needs a restart.
    pub stack_kib: usize,
    /// Crash-loop breaker: this many failures within `breaker_window` (and
    /// at least half the calls) put the previous version back.
    pub breaker_failures: u64,
    /// The breaker's window.
    #[serde(deserialize_with = "duration")]
    pub breaker_window: Duration,
    /// How long a reverted version is refused (doubling each time).
    #[serde(deserialize_with = "duration")]
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
            max_ttl: Duration::from_secs(u64::from(Limits::default().max_ttl)),
            write_bytes_per_minute: Limits::default().write_bytes_per_minute,
            log_lines_per_second: Limits::default().log_lines_per_second,
            max_records: Limits::default().max_records,
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
    #[serde(deserialize_with = "duration")]
    pub sweep_interval: Duration,
    /// Redis only: put before every key (several deployments on one server).
    pub prefix: String,
    /// Redis only: the bound of every store call.
    #[serde(deserialize_with = "duration")]
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
        if let Some(p) = self.redb_path() {
            return Ok(Arc::new(RedbStore::open(&p, self.durability)?));
        }
        Ok(match self.path.as_deref().unwrap_or_default() {
            "memory" => Arc::new(MemoryStore::new()),
            url if ["redis://", "rediss://", "redis+unix://", "redis+cluster://", "redis+sentinel://"]
                .iter()
                .any(|s| url.starts_with(s)) =>
            {
                if self.timeout.is_zero() || self.timeout > Duration::from_secs(30) {
                    return Err(DaemonError::Invalid("store.timeout must be between 1ms and 30s".into()));
                }
                Arc::new(RedisStore::open(RedisConfig { url: url.to_string(), prefix: self.prefix.clone(), timeout: self.timeout })?)
            }
            other => return Err(DaemonError::Invalid(format!("store.path {other:?}: a file, \"memory\" or a redis:// URL"))),
        })
    }

    /// The redb file, if the store is one: anything but `memory` and a URL.
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
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// A request must be complete within this (and our answer taken).
    #[serde(deserialize_with = "duration")]
    pub request_timeout: Duration,
    /// The idle timeout while three quarters of `max_connections` are in use.
    #[serde(deserialize_with = "duration")]
    pub stress_idle_timeout: Duration,
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
            stress_idle_timeout: p.stress_idle_timeout,
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
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// The idle timeout while three quarters of `max_connections` are in use.
    #[serde(deserialize_with = "duration")]
    pub stress_idle_timeout: Duration,
    /// A packet, once begun, must arrive whole within this (and our replies be taken).
    #[serde(deserialize_with = "duration")]
    pub frame_timeout: Duration,
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
            stress_idle_timeout: m.stress_idle_timeout,
            frame_timeout: m.frame_timeout,
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
    #[serde(deserialize_with = "duration")]
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
    #[serde(deserialize_with = "duration")]
    pub command_timeout: Duration,
    /// Wait for message data at most this long.
    #[serde(deserialize_with = "duration")]
    pub data_timeout: Duration,
    /// Both timeouts while three quarters of `max_connections` are in use.
    #[serde(deserialize_with = "duration")]
    pub stress_timeout: Duration,
    /// A whole session lasts at most this long.
    #[serde(deserialize_with = "duration")]
    pub session_timeout: Duration,
    /// Commands without progress (NOOP, RSET, HELP, VRFY, EHLO) before closing.
    pub junk_command_limit: u32,
    /// Most connections at once (more hear `421`).
    pub max_connections: usize,
    /// Most connections at once from one client address.
    pub max_connections_per_client: usize,
    /// Bytes of message data held in memory across all connections.
    pub max_data_memory: usize,
    /// `reject` (521 and close) or `normalize` a bare LF or CR from a client.
    pub bare_newline: crate::smtp::BareNewline,
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
            stress_timeout: c.stress_timeout,
            session_timeout: c.session_timeout,
            junk_command_limit: c.junk_command_limit,
            max_connections: c.max_connections,
            max_connections_per_client: c.max_connections_per_client,
            max_data_memory: c.max_data_memory,
            bare_newline: c.bare_newline,
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
    // The messages hold their cause's text, so the cause is not also a
    // `source` (an error chain printed whole would say it twice).
    #[error("cannot read filter {path}: {error}")]
    FilterFile {
        /// The file.
        path: String,
        /// The error.
        error: std::io::Error,
    },
    /// The filter was refused.
    #[error("filter refused: {0}")]
    Load(LoadError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A listener failed.
    #[error(transparent)]
    Listen(#[from] ListenError),
}

impl From<LoadError> for DaemonError {
    fn from(e: LoadError) -> DaemonError {
        DaemonError::Load(e)
    }
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

    pub(crate) fn unix_perms(&self) -> Result<UnixPerms, DaemonError> {
        let p = &self.policy;
        socket_perms("policy", &p.socket_mode, &p.socket_owner, &p.socket_group)
    }

    pub(crate) fn milter_config(&self) -> Result<(MilterConfig, UnixPerms), DaemonError> {
        let m = &self.milter;
        if !(1024..=16 << 20).contains(&m.max_packet) || m.max_connections == 0 {
            return Err(DaemonError::Invalid("milter.max_packet must be 1024 to 16777216, max_connections at least 1".into()));
        }
        let perms = socket_perms("milter", &m.socket_mode, &m.socket_owner, &m.socket_group)?;
        let config = MilterConfig {
            max_packet: m.max_packet,
            idle_timeout: m.idle_timeout,
            stress_idle_timeout: m.stress_idle_timeout,
            frame_timeout: m.frame_timeout,
            max_connections: m.max_connections,
            ..MilterConfig::default()
        };
        Ok((config, perms))
    }

    /// The SMTP front end's settings, when it listens anywhere.
    pub(crate) fn smtp_config(&self) -> Result<Option<SmtpConfig>, DaemonError> {
        let s = &self.smtp;
        if s.listen.is_empty() {
            return Ok(None);
        }
        let bad = |m: &str| DaemonError::Invalid(format!("smtp.{m}"));
        let next_hop = s.next_hop.clone().ok_or_else(|| bad("next_hop is required (HOST:PORT of the MTA behind greyhook)"))?;
        if !next_hop.contains(':') {
            return Err(bad("next_hop must be HOST:PORT"));
        }
        if s.max_line < 512
            || s.max_recipients < 1
            || s.max_message_size < 1024
            || s.max_connections == 0
            || s.max_connections_per_client == 0
        {
            return Err(bad(
                "max_line must be at least 512, max_message_size 1024, max_recipients, max_connections and max_connections_per_client 1",
            ));
        }
        if s.max_data_memory < s.max_message_size.min(1 << 20) {
            return Err(bad("max_data_memory must hold at least one message of max_message_size (or 1 MiB)"));
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
            stress_timeout: s.stress_timeout,
            session_timeout: s.session_timeout,
            junk_command_limit: s.junk_command_limit,
            max_connections: s.max_connections,
            max_connections_per_client: s.max_connections_per_client,
            max_data_memory: s.max_data_memory,
            bare_newline: s.bare_newline,
            tls,
            ..SmtpConfig::new(hop)
        }))
    }

    pub(crate) fn policy_config(&self) -> Result<PolicyConfig, DaemonError> {
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
            stress_idle_timeout: p.stress_idle_timeout,
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

/// Where `greyhook status` and `greyhook reload` look for a daemon's
/// control socket when none is named: the first of the places
/// [`default_control_path`] would choose that holds a socket, found
/// without creating or writing anything (they only read).
pub fn find_control_path() -> PathBuf {
    let mut candidates = Vec::new();
    if let Some(d) = std::env::var_os("RUNTIME_DIRECTORY").filter(|d| !d.is_empty()) {
        candidates.push(PathBuf::from(d).join("control.sock"));
    }
    candidates.push(PathBuf::from("/run/greyhook/control.sock"));
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        candidates.push(PathBuf::from(d).join("greyhook").join("control.sock"));
    }
    candidates.push(default_db_path().with_file_name("control.sock"));
    candidates.iter().find(|p| p.exists()).cloned().unwrap_or_else(|| candidates[0].clone())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every setting in one file, as an operator might write it.
    const FULL: &str = r#"
[filter]
namespace = "greylist"
failure_policy = "continue"
deadline = "100ms"
memory_mib = 64
max_ttl = "100d"
breaker_window = "1m"
[filter.config]
delay = "5m"
[store]
path = "memory"
sweep_interval = "60s"
timeout = "2s"
[policy]
listen = ["127.0.0.1:10023"]
max_line = 2048
max_attributes = 100
idle_timeout = "10m"
request_timeout = "30s"
[milter]
listen = ["127.0.0.1:10024"]
max_packet = 65536
frame_timeout = "10s"
[smtp]
listen = ["127.0.0.1:2525"]
next_hop = "127.0.0.1:25"
max_line = 1000
max_message_size = 10485760
session_timeout = "30m"
bare_newline = "reject"
[control]
socket = "/tmp/greyhook-test.sock"
[log]
"#;

    /// A bounded, deterministic mutation run over the daemon's TOML (the
    /// cargo-fuzz build leaves out the daemon, which links wasmtime): byte
    /// flips, truncations and numbers swapped for extremes never panic the
    /// parser or the validation the daemon runs at start.
    #[test]
    fn mutated_configuration_never_panics() {
        let extremes = ["0", "-1", "18446744073709551615", "\"18446744073709551615s\"", "\"0s\"", "1e308", "\"\"", "[]", "{}"];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let base = FULL.as_bytes();
        for i in 0..4000 {
            let mut text = base.to_vec();
            match i % 4 {
                0 => {
                    let at = (next() as usize) % text.len();
                    text[at] = next() as u8;
                }
                1 => text.truncate((next() as usize) % text.len()),
                _ => {
                    let lines: Vec<&str> = FULL.lines().collect();
                    let n = (next() as usize) % lines.len();
                    let out: Vec<String> = lines
                        .iter()
                        .enumerate()
                        .map(|(j, l)| match (j == n, l.split_once(" = ")) {
                            (true, Some((k, _))) => format!("{k} = {}", extremes[(next() as usize) % extremes.len()]),
                            _ => l.to_string(),
                        })
                        .collect();
                    text = out.join("\n").into_bytes();
                }
            }
            let text = String::from_utf8_lossy(&text);
            if let Ok(c) = DaemonConfig::parse(&text, "fuzz.toml") {
                let _ = crate::daemon::filter_specs(&c);
                // Every timeout is added to "now" somewhere.
                let fits = |d: Duration| assert!(std::time::Instant::now().checked_add(d).is_some(), "{d:?} accepted in {text}");
                if let Ok(p) = c.policy_config() {
                    [p.idle_timeout, p.request_timeout, p.stress_idle_timeout].into_iter().for_each(fits);
                }
                if let Ok((m, _)) = c.milter_config() {
                    [m.idle_timeout, m.frame_timeout, m.stress_idle_timeout].into_iter().for_each(fits);
                }
                if let Ok(Some(s)) = c.smtp_config() {
                    [s.command_timeout, s.data_timeout, s.session_timeout, s.stress_timeout].into_iter().for_each(fits);
                }
                let _ = c.unix_perms();
                let _ = c.store.redb_path();
            }
        }
    }
}
