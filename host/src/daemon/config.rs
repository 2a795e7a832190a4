//! The daemon's configuration file: one table per part (`[filter]` or
//! `[[filters]]`, `[store]`, `[control]`, `[log]`, `[dns]`, `[metrics]`, and one per front end:
//! `[policy]`, `[milter]`, `[smtp]`, `[opensmtpd]`), parsed strictly (an
//! unknown key or a bad value stops the start with the file, line and key
//! named). Each part owns its table's type; this file only puts them
//! together. Every key is documented in `docs/configuration.md`, which a
//! test checks against these types.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use crate::frontend::{FrontEnd, FrontEndError, ListenError};
use crate::runtime::reload::BreakerConfig;
use crate::runtime::{FailurePolicy, Limits, LoadError, RuntimeConfig};
use crate::settings::duration;
use crate::store::{StoreConfig, StoreError};

pub use crate::settings::MAX_DURATION;

/// The `[filter]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilterConfig {
    /// The filter component; the embedded reference filter if unset.
    pub path: Option<PathBuf>,
    /// Store namespace of the filter's keys (default: the filter's name
    /// from its `init`, `greylist` for the reference filter).
    pub namespace: Option<String>,
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
    /// Where compiled filters are kept across restarts (default:
    /// [`crate::runtime::artifact_cache::default_dir`]).
    pub cache_dir: Option<PathBuf>,
    /// The filter's own configuration, handed to its `init`.
    pub config: toml::Table,
}

impl Default for FilterConfig {
    fn default() -> Self {
        let l = Limits::default();
        FilterConfig {
            path: None,
            namespace: None,
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

/// The `[control]` table: the local socket `greyhook reload` talks to.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// The unix socket's path (mode 0600); see [`default_control_path`].
    pub socket: Option<String>,
}

/// The `[log]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `error`, `warn`, `info` (one line per decision), `debug`, or a
    /// tracing filter such as `info,greyhook::filter=debug`.
    pub level: String,
    /// How decision lines are written: `text` (`key=value`) or `json`
    /// (one object a line, for `greyhook report` and `greyhook replay`).
    pub decisions: crate::session::audit::DecisionFormat,
    /// Most lines waiting for the log's writer ([`MIN_LOG_QUEUE`] to
    /// [`MAX_LOG_QUEUE`]). A line past them is dropped and counted
    /// (`greyhook_log_lines_dropped_total`), so that a log nobody reads
    /// (a stuck pipe or journal) never holds up a request.
    pub queue_lines: usize,
}

/// `[log] queue_lines` by default (also the tools' queue).
pub const DEFAULT_LOG_QUEUE: usize = 128_000;
/// The fewest lines `[log] queue_lines` may hold.
pub const MIN_LOG_QUEUE: usize = 16;
/// The most lines `[log] queue_lines` may hold (a few hundred MB at most).
pub const MAX_LOG_QUEUE: usize = 1_000_000;

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { level: "info".into(), decisions: Default::default(), queue_lines: DEFAULT_LOG_QUEUE }
    }
}

impl LogConfig {
    /// Checks the table's bounds.
    pub fn check(&self) -> Result<(), String> {
        if !(MIN_LOG_QUEUE..=MAX_LOG_QUEUE).contains(&self.queue_lines) {
            return Err(format!("[log] queue_lines must be {MIN_LOG_QUEUE} to {MAX_LOG_QUEUE}"));
        }
        Ok(())
    }
}

/// The largest configuration file read (1 MiB; the annotated example
/// with every key is ~12 KB).
pub const MAX_CONFIG_FILE: u64 = 1 << 20;

macro_rules! daemon_config {
    ($($table:ident => $front_end:ty,)*) => {
        /// The daemon's whole configuration (`greyhook.toml`): the core
        /// tables, and one table per front end (see [`crate::frontend`]).
        #[derive(Debug, Clone, Deserialize, Default)]
        #[serde(deny_unknown_fields, default)]
        pub struct DaemonConfig {
            /// The filter (when there is one).
            pub filter: Option<FilterConfig>,
            /// A chain of filters, asked in order (instead of `[filter]`).
            pub filters: Vec<FilterConfig>,
            /// The store.
            pub store: StoreConfig,
            /// The control socket.
            pub control: ControlConfig,
            /// Logging.
            pub log: LogConfig,
            /// The resolver filters and front ends use.
            pub dns: crate::dns::DnsConfig,
            /// The metrics listener and status page.
            pub metrics: super::MetricsConfig,
            $(
                #[doc = concat!("The `[", stringify!($table), "]` front end's table.")]
                pub $table: <$front_end as FrontEnd>::Config,
            )*
        }

        impl DaemonConfig {
            /// Turns off every front end but the one named `only` (its
            /// command runs it alone), and turns that one on.
            pub fn only_front_end(&mut self, only: &str) {
                $(
                    if only == <$front_end as FrontEnd>::NAME {
                        <$front_end as FrontEnd>::enable(&mut self.$table);
                    } else {
                        <$front_end as FrontEnd>::disable(&mut self.$table);
                    }
                )*
            }

            /// Each front end's table as text, for telling which changed
            /// at a reload (a reload does not restart front ends).
            pub(crate) fn front_end_tables(&self) -> Vec<(&'static str, String)> {
                vec![$((<$front_end as FrontEnd>::NAME, format!("{:?}", self.$table)),)*]
            }
        }
    };
}
crate::frontend::front_ends!(daemon_config);

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
    /// A front end's settings are refused.
    #[error("invalid configuration: {0}")]
    FrontEnd(FrontEndError),
    /// The metrics listener cannot start.
    #[error(transparent)]
    Metrics(#[from] super::WebError),
}

impl From<FrontEndError> for DaemonError {
    fn from(e: FrontEndError) -> DaemonError {
        match e {
            FrontEndError::Listen(l) => DaemonError::Listen(l),
            other => DaemonError::FrontEnd(other),
        }
    }
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

    /// Reads and parses a configuration file (at most
    /// [`MAX_CONFIG_FILE`] bytes of UTF-8).
    pub fn load(path: &Path) -> Result<DaemonConfig, DaemonError> {
        let err = |message: String| DaemonError::Config { path: path.display().to_string(), message };
        let bytes = crate::settings::read_bounded(path, MAX_CONFIG_FILE).map_err(|e| err(e.to_string()))?;
        let text = String::from_utf8(bytes).map_err(|_| err("not UTF-8 text".into()))?;
        DaemonConfig::parse(&text, &path.display().to_string())
    }

    /// The filters in chain order: `[[filters]]`, or `[filter]`, or the
    /// default (the reference filter).
    pub fn chain(&self) -> Result<Vec<FilterConfig>, DaemonError> {
        match (&self.filter, self.filters.is_empty()) {
            (Some(_), false) => Err(DaemonError::Invalid("use either [filter] or [[filters]], not both".into())),
            (Some(f), true) => Ok(vec![f.clone()]),
            (None, false) => Ok(self.filters.clone()),
            (None, true) => Ok(vec![FilterConfig::default()]),
        }
    }

    /// The filter the command line's `--filter` and `--set` apply to: the
    /// last of the chain (the greylisting one, behind any allow-lists).
    pub fn main_filter_mut(&mut self) -> &mut FilterConfig {
        if self.filters.is_empty() {
            self.filter.get_or_insert_with(FilterConfig::default)
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
        let merged = super::overrides::merge_settings(&base, "--set", sets).map_err(|e| DaemonError::Invalid(e.to_string()))?;
        f.config = merged.parse().map_err(|e: toml::de::Error| DaemonError::Invalid(e.to_string()))?;
        Ok(())
    }
}

/// Where `greyhook status` and `greyhook reload` look for a daemon's
/// control socket when none is named: the first of the places
/// [`default_control_path`] would choose that holds a socket, found
/// without creating or writing anything (they only read).
pub fn find_control_path() -> PathBuf {
    let mut candidates = runtime_candidates();
    // Beside the default store, wherever `default_db_path` would put it,
    // named without its probe (which creates `/var/lib/greyhook`).
    candidates.extend(crate::store::default_db_candidates().into_iter().map(|p| p.with_file_name("control.sock")));
    candidates.iter().find(|p| p.exists()).cloned().unwrap_or_else(|| candidates[0].clone())
}

/// The control socket's path by default: `$RUNTIME_DIRECTORY/control.sock`
/// (systemd's `RuntimeDirectory=`), else `/run/greyhook/control.sock` when it
/// can be created (root), else `$XDG_RUNTIME_DIR/greyhook/control.sock`, else
/// beside the default store.
pub fn default_control_path() -> PathBuf {
    // The system directory only if it can be created and written (root).
    let system = Path::new(SYSTEM_RUNTIME_DIR).join("control.sock");
    runtime_candidates()
        .into_iter()
        .find(|p| *p != system || crate::settings::writable_system_dir(SYSTEM_RUNTIME_DIR, "control.sock").is_some())
        .unwrap_or_else(|| crate::store::default_db_path().with_file_name("control.sock"))
}

/// The control socket's directory for a daemon run by root with no service
/// manager.
const SYSTEM_RUNTIME_DIR: &str = "/run/greyhook";

/// The runtime directories' places for the control socket, in
/// [`default_control_path`]'s order, named without creating or probing
/// anything.
fn runtime_candidates() -> Vec<PathBuf> {
    let mut candidates: Vec<PathBuf> = crate::settings::systemd_dir("RUNTIME_DIRECTORY", "control.sock").into_iter().collect();
    candidates.push(Path::new(SYSTEM_RUNTIME_DIR).join("control.sock"));
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        candidates.push(PathBuf::from(d).join("greyhook").join("control.sock"));
    }
    candidates
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
check_at_open_mib = 256
cache_mib = 64
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
                let (p, m, s) = (&c.policy, &c.milter, &c.smtp);
                [p.idle_timeout, p.request_timeout, p.stress_idle_timeout, p.transaction_ttl].into_iter().for_each(fits);
                [m.idle_timeout, m.frame_timeout, m.stress_idle_timeout].into_iter().for_each(fits);
                [s.command_timeout, s.data_timeout, s.session_timeout, s.stress_timeout, s.next_hop_timeout, s.next_hop_idle]
                    .into_iter()
                    .for_each(fits);
                [c.store.sweep_interval, c.store.timeout].into_iter().for_each(fits);
                for perms in [(&p.socket_mode, &p.socket_owner, &p.socket_group), (&m.socket_mode, &m.socket_owner, &m.socket_group)] {
                    let _ = crate::frontend::listen::UnixPerms::from_settings(perms.0, perms.1, perms.2);
                }
                // Without a path it would be the default one, which is
                // probed by creating `/var/lib/greyhook` (as root).
                if c.store.path.is_some() {
                    let _ = c.store.redb_path();
                }
            }
        }
    }

    /// The field names a settings type takes, as serde's derive lists them
    /// (read by a deserializer that only looks at them).
    fn fields<T: serde::de::DeserializeOwned>() -> Vec<&'static str> {
        use serde::de::{Error as _, Visitor};
        struct Collect<'a>(&'a mut Vec<&'static str>);
        impl<'de> serde::Deserializer<'de> for Collect<'_> {
            type Error = serde::de::value::Error;
            fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
                Err(Self::Error::custom("not a struct"))
            }
            fn deserialize_struct<V: Visitor<'de>>(
                self,
                _: &'static str,
                fields: &'static [&'static str],
                _: V,
            ) -> Result<V::Value, Self::Error> {
                self.0.extend(fields);
                Err(Self::Error::custom("collected"))
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
                unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
            }
        }
        let mut out = Vec::new();
        let _ = T::deserialize(Collect(&mut out));
        out
    }

    macro_rules! front_end_tables {
        ($($table:ident => $front_end:ty,)*) => {
            vec![$((stringify!($table), fields::<<$front_end as FrontEnd>::Config>()),)*]
        };
    }

    /// `docs/configuration.md` is the one reference of the settings: every
    /// key it shows exists (the annotated file parses strictly), and every
    /// key of every table's type (the front ends' from their registry) is
    /// shown in its table.
    #[test]
    fn the_reference_documents_every_key_of_the_code() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md")).unwrap();
        let annotated = doc.split("```toml").nth(1).and_then(|b| b.split("```").next()).expect("the annotated configuration");
        if let Err(e) = DaemonConfig::parse(annotated, "docs/configuration.md") {
            panic!("the annotated configuration does not parse: {e}");
        }
        let mut documented: Vec<(String, String)> = Vec::new();
        let mut table = String::new();
        for line in annotated.lines() {
            let code = line.split('#').next().unwrap_or("").trim();
            if let Some(t) = code.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
                table = t.trim_matches(['[', ']']).to_string();
                // `[filter.config]` shows the key `config` of `[filter]`.
                if let Some((parent, key)) = table.split_once('.') {
                    documented.push((parent.to_string(), key.to_string()));
                }
            } else if let Some((k, _)) = code.split_once(" = ") {
                documented.push((table.clone(), k.trim().to_string()));
            }
        }
        let mut tables = vec![
            ("filter", fields::<FilterConfig>()),
            ("store", fields::<StoreConfig>()),
            ("dns", fields::<crate::dns::DnsConfig>()),
            ("control", fields::<ControlConfig>()),
            ("log", fields::<LogConfig>()),
            ("metrics", fields::<crate::daemon::MetricsConfig>()),
        ];
        tables.extend(crate::frontend::front_ends!(front_end_tables));
        let top = fields::<DaemonConfig>();
        let mut missing = Vec::new();
        for (t, keys) in &tables {
            assert!(top.contains(t) && !keys.is_empty(), "[{t}] is not a table of the file");
            for k in keys {
                if !documented.iter().any(|(dt, dk)| dt == t && dk == k) {
                    missing.push(format!("{t}.{k}"));
                }
            }
        }
        assert!(missing.is_empty(), "keys of the code that docs/configuration.md does not show: {missing:?}");
    }
}
