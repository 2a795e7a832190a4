//! A store in Redis, shared by the MX hosts of a farm: a client greylisted
//! by one greyhook passes on another, as Harris asked of every MX.
//!
//! Each record is one Redis hash `PREFIX KEY` with the fields `v` (value),
//! `ver` (version) and `exp` (expiry, Unix seconds by the caller's clock).
//! Writes and deletes are Lua scripts, so a compare-and-swap is atomic in
//! Redis: two hosts deciding the same triplet at once cannot lose an
//! update. Every operation touches exactly one key, so the layout suits
//! Redis Cluster too: `redis+cluster://host1:port1,host2:port2` connects to
//! a cluster (slots followed, redirections handled by the `redis` crate).
//! `redis+sentinel://[USER:PASSWORD@]HOSTS/SERVICE[/DB]` asks the sentinels
//! for the master (the URL's credentials and database are the master's;
//! sentinels that require a password of their own get
//! [`RedisConfig::sentinel_auth`]).
//!
//! TLS: `rediss://` (one server), `rediss+cluster://` (every node) and
//! `rediss+sentinel://` (the sentinels and the master they name) speak TLS
//! (rustls), checking the server's certificate against the
//! system's roots or [`RedisTls::ca`] alone, and present a client
//! certificate when one is named (Redis asks for one by default:
//! `tls-auth-clients yes`). There is no way to skip the check: a farm's
//! records are client addresses and mail addresses. The files are read
//! again when they change, so a renewed client certificate is used without
//! a restart (see [`RedisStore`]).
//!
//! Expiry: the record is live while `exp > now` (`now` is injected, as for
//! every backend), and Redis expires the key itself `exp - now` seconds
//! after the write, so nothing needs sweeping in normal operation.
//!
//! Failure: every call is bounded by `timeout`; a Redis that is down or
//! slow gives [`StoreError::Backend`] (the filter's failure policy answers)
//! and is counted and logged; the connection manager reconnects by itself.
//! No call ever blocks the async runtime.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{Condition, Entry, Page, Store, StoreError, WriteOutcome};
use crate::pem::MAX_PEM_BYTES;

/// Settings of the Redis store.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port/db`, or
    /// `redis+cluster://[user:password@]host1:port1,host2:port2` for a Redis
    /// Cluster (any reachable nodes; the rest are discovered; the
    /// credentials are every node's), or
    /// `redis+sentinel://[user:password@]host1:port1,host2:port2/SERVICE[/db]`
    /// through Sentinel (the credentials and database are the master's);
    /// `rediss…` for each over TLS.
    pub url: String,
    /// Put before every key, so several deployments can share a server.
    pub prefix: String,
    /// Bound of every store call.
    pub timeout: Duration,
    /// The TLS files of a `rediss://`, `rediss+cluster://` or
    /// `rediss+sentinel://` URL.
    pub tls: RedisTls,
    /// What the sentinels themselves require of a `redis+sentinel://`
    /// client (the URL's credentials are the master's).
    pub sentinel_auth: SentinelAuth,
}

/// The credentials the sentinels require of their own clients (Sentinel's
/// `requirepass`, or an ACL user), apart from the master's in the URL.
/// Its debug text hides the password.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SentinelAuth {
    /// The ACL user, with [`SentinelAuth::password`]; `None`: `default`.
    pub user: Option<String>,
    /// The password; `None`: the sentinels are asked without one.
    pub password: Option<String>,
}

impl SentinelAuth {
    /// Whether either is set.
    pub fn is_set(&self) -> bool {
        self.user.is_some() || self.password.is_some()
    }
}

impl std::fmt::Debug for SentinelAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentinelAuth").field("user", &self.user).field("password", &self.password.as_ref().map(|_| "***")).finish()
    }
}

impl RedisConfig {
    /// Defaults (prefix `greyhook:`, 250 ms, the system's roots) for `url`.
    pub fn new(url: impl Into<String>) -> RedisConfig {
        RedisConfig {
            url: url.into(),
            prefix: "greyhook:".into(),
            timeout: Duration::from_millis(250),
            tls: RedisTls::default(),
            sentinel_auth: SentinelAuth::default(),
        }
    }
}

/// The PEM files of a TLS connection to Redis; each is read when the store
/// opens, and read again when any of them changes (see [`RedisStore`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedisTls {
    /// The certificate authority (or authorities) the server's certificate
    /// must chain to, instead of the system's roots.
    pub ca: Option<PathBuf>,
    /// The client certificate chain to present (with [`RedisTls::key`]).
    pub cert: Option<PathBuf>,
    /// The client certificate's private key.
    pub key: Option<PathBuf>,
}

impl RedisTls {
    /// Whether any file is named.
    pub fn is_set(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }

    /// The named files, watched for a change.
    fn watch(&self) -> crate::settings::FileWatch {
        crate::settings::FileWatch::new([&self.ca, &self.cert, &self.key].into_iter().flatten().cloned().collect())
    }

    /// The files read and checked, as the `redis` crate takes them, and
    /// the client certificate with its key (for [`RedisTls::note_in_use`]).
    fn certificates(&self) -> Result<(redis::TlsCertificates, Option<rustls::sign::CertifiedKey>), String> {
        fn read(what: &str, path: &Path, item: fn(&rustls::pki_types::pem::SectionKind) -> bool) -> Result<Vec<u8>, String> {
            use std::io::Read;
            let shown = path.display();
            let f = std::fs::File::open(path).map_err(|e| format!("tls_{what} {shown}: {e}"))?;
            let mut pem = Vec::new();
            f.take(MAX_PEM_BYTES + 1).read_to_end(&mut pem).map_err(|e| format!("tls_{what} {shown}: {e}"))?;
            if pem.len() as u64 > MAX_PEM_BYTES {
                return Err(format!("tls_{what} {shown}: over {MAX_PEM_BYTES} bytes, not a PEM file"));
            }
            // The crate would say only that the client cannot be built:
            // say which file holds nothing usable.
            use rustls::pki_types::pem::PemObject;
            let found =
                <(rustls::pki_types::pem::SectionKind, Vec<u8>)>::pem_slice_iter(&pem).filter_map(Result::ok).any(|(k, _)| item(&k));
            if !found {
                let wanted = if what == "key" { "PEM private key" } else { "PEM certificate" };
                return Err(format!("tls_{what} {shown}: holds no {wanted}"));
            }
            Ok(pem)
        }
        use rustls::pki_types::pem::SectionKind;
        let cert = |k: &SectionKind| *k == SectionKind::Certificate;
        let key = |k: &SectionKind| matches!(k, SectionKind::PrivateKey | SectionKind::RsaPrivateKey | SectionKind::EcPrivateKey);
        let (client_tls, certified) = match (&self.cert, &self.key) {
            (Some(c), Some(k)) => {
                let (client_cert, client_key) = (read("cert", c, cert)?, read("key", k, key)?);
                // Checked here: the crate would fail every handshake instead.
                let certified = crate::pem::pair(c, &client_cert, k, &client_key).map_err(|e| format!("tls_cert and tls_key: {e}"))?;
                (Some(redis::ClientTlsConfig { client_cert, client_key }), Some(certified))
            }
            (None, None) => (None, None),
            _ => return Err("tls_cert and tls_key go together: a client certificate and its key".into()),
        };
        let root_cert = self.ca.as_deref().map(|p| read("ca", p, cert)).transpose()?;
        Ok((redis::TlsCertificates { client_tls, root_cert }, certified))
    }

    /// Records the client certificate `certified` (from [`RedisTls::certificates`])
    /// as the one in use: called once connections made with it replaced
    /// the old ones, so a set that does not load leaves the gauge and
    /// `status` on the certificate still in use.
    fn note_in_use(&self, certified: Option<&rustls::sign::CertifiedKey>) {
        if let (Some(path), Some(certified)) = (&self.cert, certified) {
            crate::pem::note_expiry("redis", path, certified);
        }
    }
}

/// A connection to one server (reconnecting by itself) or to a cluster
/// (following its slots by itself).
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
    /// The master a sentinel named (see [`Backend::Sentinel`]).
    Master(redis::aio::MultiplexedConnection),
}

/// Where connections come from.
enum Backend {
    /// One connection that looks after itself (server or cluster).
    Fixed(Conn),
    /// Redis Sentinel: the master is asked of the sentinels, and asked again
    /// after any failure (a failover moves it).
    Sentinel {
        client: Box<tokio::sync::Mutex<redis::sentinel::SentinelClient>>,
        current: std::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
    },
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Master(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        p: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(p, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(p, offset, count),
            Conn::Master(c) => c.req_packed_commands(p, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Master(c) => c.get_db(),
        }
    }
}

/// A [`Store`] in Redis.
///
/// With TLS files named, their metadata is looked at once a minute, and at
/// most once a second while calls fail (a reconnection refused for an
/// expired client certificate fails them). When any file changed, they are
/// read again and new connections made with them: a client certificate
/// renewed in place (short-lived ones from an internal CA are renewed
/// daily) is used without a restart. Calls already running finish on the
/// old connections. A set of files that does not load is logged once and
/// the connections in use are kept.
pub struct RedisStore {
    backend: arc_swap::ArcSwap<Backend>,
    /// A cluster URL: SCAN goes to every primary and batches go key by key.
    cluster: bool,
    /// The TLS files' stamps when last looked at, if any file is named.
    tls_files: Option<TlsFiles>,
    config: RedisConfig,
    set_script: Script,
    delete_script: Script,
    sweep_script: Script,
    failures: AtomicU64,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").field("prefix", &self.config.prefix).finish()
    }
}

/// The start of [`SET`] and [`DELETE`]: reads the record and returns 0
/// unless the condition holds against its live entry (the same rule as
/// [`Condition::holds`]). `KEYS[1]` the record; `ARGV[1]` the condition
/// (`any`, `absent` or a version), `ARGV[2]` now. Leaves `cur` and `live`.
macro_rules! check_condition {
    () => {
        r#"
local cur = redis.call('HMGET', KEYS[1], 'ver', 'exp')
local live = cur[1] and cur[2] and tonumber(cur[2]) > tonumber(ARGV[2])
local cond = ARGV[1]
if cond == 'absent' then
  if live then return 0 end
elseif cond ~= 'any' then
  if not live or cur[1] ~= cond then return 0 end
end
"#
    };
}

/// `KEYS[1]` the record; `ARGV`: condition, now, value, exp, ttl seconds,
/// two version candidates. Returns the new version, or 0 on a conflict.
const SET: &str = concat!(
    check_condition!(),
    r#"
local ver = ARGV[6]
if cur[1] == ver then ver = ARGV[7] end
redis.call('HSET', KEYS[1], 'v', ARGV[3], 'ver', ver, 'exp', ARGV[4])
local ttl = tonumber(ARGV[5])
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) else redis.call('DEL', KEYS[1]) end
return ver
"#
);

/// `KEYS[1]` the record; `ARGV`: condition, now. Returns 1 if a live record
/// was deleted.
const DELETE: &str = concat!(
    check_condition!(),
    r#"
redis.call('DEL', KEYS[1])
if live then return 1 else return 0 end
"#
);

/// `KEYS` records; `ARGV[1]` now. Deletes those expired by the caller's
/// clock; returns how many.
const SWEEP: &str = r#"
local n = 0
for _, k in ipairs(KEYS) do
  local exp = redis.call('HGET', k, 'exp')
  if exp and tonumber(exp) <= tonumber(ARGV[1]) then
    redis.call('DEL', k)
    n = n + 1
  end
end
return n
"#;

/// Follows the TLS files of a store (see [`RedisStore`]).
struct TlsFiles {
    watch: crate::settings::FileWatch,
    /// When the files were last looked at, Unix seconds.
    checked: AtomicU64,
}

/// How often the TLS files are looked at while calls succeed...
const TLS_CHECK_SECS: u64 = 60;
/// ...and while they fail.
const TLS_CHECK_FAILING_SECS: u64 = 1;

fn unix_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn cond_arg(c: Condition) -> String {
    match c {
        Condition::Any => "any".into(),
        Condition::Absent => "absent".into(),
        Condition::Version(v) => v.to_string(),
    }
}

/// A fresh version: random, never 0 (unique enough across hosts without a
/// shared counter, which would put a second key in every write).
fn new_version() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    // Lua numbers are doubles: keep versions exact in them (53 bits).
    (h.finish() >> 11).max(1)
}

/// `USER:PASSWORD` (either may be empty) as the crate reads the
/// credentials of `redis://USER:PASSWORD@…`: percent-decoded.
fn credentials(auth: &str) -> Result<(Option<String>, Option<String>), String> {
    use redis::IntoConnectionInfo;
    let info = format!("redis://{auth}@127.0.0.1/").as_str().into_connection_info().map_err(|e| e.to_string())?;
    let r = info.redis_settings();
    Ok((r.username().map(str::to_string), r.password().map(str::to_string)))
}

/// The client of `redis+sentinel://[USER:PASSWORD@]HOST:PORT,…/SERVICE[/DB]`
/// (`rest`, after the scheme): the credentials and the database are the
/// master's (what the data connection authenticates with, as in
/// `redis://:PASSWORD@HOST/DB`); the sentinels are asked with
/// `sentinel_auth`, if any. With `tls`, the sentinels and the masters they
/// name are reached over TLS with `certificates` (none: the system's roots).
fn sentinel_client(
    rest: &str,
    tls: bool,
    certificates: Option<redis::TlsCertificates>,
    sentinel_auth: &SentinelAuth,
) -> Result<redis::sentinel::SentinelClient, String> {
    use redis::IntoConnectionInfo;
    const SHAPE: &str = "expected redis+sentinel://[USER:PASSWORD@]HOST:PORT,HOST:PORT/SERVICE[/DB]";
    let (hosts, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (auth, hosts) = match hosts.rsplit_once('@') {
        Some((auth, hosts)) => (Some(auth), hosts),
        None => (None, hosts),
    };
    let path = path.trim_end_matches('/');
    let (service, db) = match path.split_once('/') {
        Some((service, db)) => (service, Some(db.parse::<i64>().ok().filter(|d| (0..=15_999).contains(d)).ok_or(SHAPE)?)),
        None => (path, None),
    };
    let scheme = if tls { "rediss" } else { "redis" };
    let nodes: Vec<&str> = hosts.split(',').filter(|n| !n.is_empty()).collect();
    // The crate would take a host without a port as Redis's 6379, where a
    // data server, not a sentinel, listens.
    if let Some(n) = nodes.iter().find(|n| !n.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok_and(|p| p > 0))) {
        return Err(format!("sentinel {n}: name its port (sentinels listen on 26379 unless configured otherwise); {SHAPE}"));
    }
    let addrs = nodes
        .iter()
        .map(|n| format!("{scheme}://{n}").as_str().into_connection_info().map(|i| i.addr().clone()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if addrs.is_empty() || service.is_empty() {
        return Err(SHAPE.into());
    }
    let mut b = redis::sentinel::SentinelClientBuilder::new(addrs, service, redis::sentinel::SentinelServerType::Master)
        .map_err(|e| e.to_string())?;
    if let Some(auth) = auth {
        let (user, password) = credentials(auth)?;
        if let Some(u) = user {
            b = b.set_client_to_redis_username(u);
        }
        if let Some(p) = password {
            b = b.set_client_to_redis_password(p);
        }
    }
    if let Some(db) = db {
        b = b.set_client_to_redis_db(db);
    }
    if let Some(u) = &sentinel_auth.user {
        b = b.set_client_to_sentinel_username(u);
    }
    if let Some(p) = &sentinel_auth.password {
        b = b.set_client_to_sentinel_password(p);
    }
    if tls {
        b = b.set_client_to_sentinel_tls_mode(redis::TlsMode::Secure).set_client_to_redis_tls_mode(redis::TlsMode::Secure);
        if let Some(c) = certificates {
            b = b.set_client_to_sentinel_certificates(c.clone()).set_client_to_redis_certificates(c);
        }
    }
    b.build().map_err(|e| e.to_string())
}

/// Whether `url` speaks TLS.
fn is_tls(url: &str) -> bool {
    ["rediss://", "rediss+cluster://", "rediss+sentinel://"].iter().any(|s| url.starts_with(s))
}

/// What follows the scheme of a Sentinel URL, if `url` is one.
fn sentinel_rest(url: &str) -> Option<&str> {
    url.strip_prefix("redis+sentinel://").or_else(|| url.strip_prefix("rediss+sentinel://"))
}

/// The nodes of a cluster URL and the scheme each is reached with, if
/// `url` is one.
fn cluster_nodes(url: &str) -> Option<(&str, &'static str)> {
    url.strip_prefix("redis+cluster://").map(|n| (n, "redis")).or_else(|| url.strip_prefix("rediss+cluster://").map(|n| (n, "rediss")))
}

/// The connections of `config` (already checked by [`RedisStore::open`]),
/// made with `certificates`.
fn build_backend(config: &RedisConfig, certificates: Option<redis::TlsCertificates>) -> Result<Backend, String> {
    let tls = is_tls(&config.url);
    let backend = match (sentinel_rest(&config.url), cluster_nodes(&config.url)) {
        (Some(rest), _) => {
            let client = sentinel_client(rest, tls, certificates, &config.sentinel_auth)?;
            Backend::Sentinel { client: Box::new(tokio::sync::Mutex::new(client)), current: std::sync::Mutex::new(None) }
        }
        (None, Some((nodes, scheme))) => {
            // `[USER:]PASSWORD@` before the nodes is every node's (the
            // crate wants it on each node otherwise, and refuses the
            // URL when the nodes differ).
            let ((user, password), nodes) = match nodes.rsplit_once('@') {
                Some((auth, nodes)) => (credentials(auth)?, nodes),
                None => ((None, None), nodes),
            };
            let nodes: Vec<String> =
                nodes.trim_end_matches('/').split(',').filter(|n| !n.is_empty()).map(|n| format!("{scheme}://{n}")).collect();
            if nodes.is_empty() {
                return Err("no cluster nodes: redis+cluster://[USER:PASSWORD@]host1:port1,host2:port2".into());
            }
            let mut builder = redis::cluster::ClusterClient::builder(nodes);
            if let Some(u) = user {
                builder = builder.username(u);
            }
            if let Some(p) = password {
                builder = builder.password(p);
            }
            if let Some(c) = certificates {
                builder = builder.certs(c);
            }
            let client = builder.build().map_err(|e| e.to_string())?;
            let cfg = redis::cluster::ClusterConfig::new().set_connection_timeout(config.timeout).set_response_timeout(config.timeout);
            Backend::Fixed(Conn::Cluster(client.get_pending_async_connection_with_config(cfg)))
        }
        (None, None) => {
            let client = match certificates {
                Some(c) => redis::Client::build_with_tls(config.url.as_str(), c),
                None => redis::Client::open(config.url.as_str()),
            }
            .map_err(|e| e.to_string())?;
            let mgr = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(config.timeout))
                .set_response_timeout(Some(config.timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_secs(1));
            Backend::Fixed(Conn::Single(ConnectionManager::new_lazy_with_config(client, mgr).map_err(|e| e.to_string())?))
        }
    };
    Ok(backend)
}

impl RedisStore {
    /// Connects lazily: greyhook starts even when Redis is down, and every
    /// call tries again (bounded by the timeout) until it is back.
    pub fn open(config: RedisConfig) -> Result<RedisStore, StoreError> {
        let open_err = |e: &dyn std::fmt::Display| StoreError::Open { path: super::redacted(&config.url), reason: e.to_string() };
        let tls = is_tls(&config.url);
        if tls && config.url.contains('#') {
            // The crate's `#insecure` skips the check of the server's
            // certificate; built without that feature, every call would
            // fail at connect instead. Refused here, with the reason.
            return Err(open_err(&"a URL fragment (#insecure): the server's certificate is always checked; name its CA with tls_ca"));
        }
        if config.tls.is_set() && !tls {
            return Err(open_err(&"tls_ca, tls_cert and tls_key need a TLS URL: rediss://, rediss+cluster:// or rediss+sentinel://"));
        }
        // Watched from before the read: a change meanwhile is seen next.
        let tls_files = config.tls.is_set().then(|| TlsFiles { watch: config.tls.watch(), checked: AtomicU64::new(unix_secs()) });
        // Only what was named: with no file, the crate's own path (the
        // system's roots, no client certificate).
        let (certificates, client) = if config.tls.is_set() {
            let (certificates, client) = config.tls.certificates().map_err(|e| open_err(&e))?;
            (Some(certificates), client)
        } else {
            (None, None)
        };
        if config.sentinel_auth.is_set() && sentinel_rest(&config.url).is_none() {
            return Err(open_err(
                &"sentinel_user and sentinel_password are for the sentinels of a redis+sentinel:// URL; a server's password goes in its URL",
            ));
        }
        if config.sentinel_auth.user.is_some() && config.sentinel_auth.password.is_none() {
            return Err(open_err(&"sentinel_user needs sentinel_password"));
        }
        let backend = build_backend(&config, certificates).map_err(|e| open_err(&e))?;
        config.tls.note_in_use(client.as_ref());
        Ok(RedisStore {
            backend: arc_swap::ArcSwap::from_pointee(backend),
            cluster: cluster_nodes(&config.url).is_some(),
            tls_files,
            config,
            set_script: Script::new(SET),
            delete_script: Script::new(DELETE),
            sweep_script: Script::new(SWEEP),
            failures: AtomicU64::new(0),
        })
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.config.prefix)
    }

    /// Runs `f` on a connection, bounded by the timeout; failures are
    /// counted and logged (at most once a second, so a dead Redis does not
    /// flood the log).
    async fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let r = tokio::time::timeout(self.config.timeout, async {
            let conn = self.connection().await?;
            f(conn).await
        })
        .await;
        let err = match r {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {:?}", self.config.timeout),
        };
        if let Backend::Sentinel { current, .. } = &**self.backend.load() {
            // Ask the sentinels again next time: the master may have moved
            // (a demoted master answers READONLY, a dead one not at all).
            *current.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        // A reconnection refused for an expired client certificate fails
        // every call until the renewed files are read.
        self.follow_tls_files(TLS_CHECK_FAILING_SECS);
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        static LAST_LOG: AtomicU64 = AtomicU64::new(0);
        let sec = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        if LAST_LOG.swap(sec, Ordering::Relaxed) != sec {
            tracing::warn!(failures = n, "redis store: {what} failed: {err} (the filter's failure policy answers)");
        }
        Err(StoreError::Backend(format!("redis {what}: {err}")))
    }
}

impl RedisStore {
    /// Looks at the TLS files if `every` seconds have passed since they
    /// were last looked at (one caller at a time), and when any changed,
    /// reads them and makes new connections with them.
    fn follow_tls_files(&self, every: u64) {
        let Some(files) = &self.tls_files else { return };
        let (now, checked) = (unix_secs(), files.checked.load(Ordering::Relaxed));
        if now < checked.saturating_add(every)
            || files.checked.compare_exchange(checked, now, Ordering::Relaxed, Ordering::Relaxed).is_err()
        {
            return;
        }
        if !files.watch.changed() {
            return;
        }
        let shown = super::redacted(&self.config.url);
        match self.config.tls.certificates().and_then(|(c, client)| build_backend(&self.config, Some(c)).map(|b| (b, client))) {
            Ok((backend, client)) => {
                self.backend.store(std::sync::Arc::new(backend));
                self.config.tls.note_in_use(client.as_ref());
                tracing::info!("redis store {shown}: the TLS files changed; new connections use them");
            }
            Err(e) => tracing::warn!("redis store {shown}: the changed TLS files do not load ({e}); the connections in use are kept"),
        }
    }

    /// A connection: the fixed one, or the sentinel's current master
    /// (asked for, and connected to, when there is none).
    async fn connection(&self) -> redis::RedisResult<Conn> {
        self.follow_tls_files(TLS_CHECK_SECS);
        match &*self.backend.load_full() {
            Backend::Fixed(c) => Ok(c.clone()),
            Backend::Sentinel { client, current } => {
                if let Some(c) = current.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                    return Ok(Conn::Master(c));
                }
                let master = client.lock().await.async_get_client().await?;
                let c = master.get_multiplexed_async_connection().await?;
                *current.lock().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
                Ok(Conn::Master(c))
            }
        }
    }
}

fn parse_entry(fields: (Option<Vec<u8>>, Option<String>, Option<String>)) -> Option<Entry> {
    match fields {
        (Some(value), Some(ver), Some(exp)) => Some(Entry { value, version: ver.parse().ok()?, expires_at: exp.parse().ok()? }),
        _ => None,
    }
}

impl RedisStore {
    /// The live entry under `full_key` (prefix included), if any.
    async fn read(&self, what: &str, full_key: String, now: u64) -> Result<Option<Entry>, StoreError> {
        let fields: (Option<Vec<u8>>, Option<String>, Option<String>) = self
            .call(what, |mut c| async move { redis::cmd("HMGET").arg(&full_key).arg("v").arg("ver").arg("exp").query_async(&mut c).await })
            .await?;
        Ok(parse_entry(fields).filter(|e| e.expires_at > now))
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn get(&self, key: &str, now: u64) -> Result<Option<Entry>, StoreError> {
        self.read("get", self.key(key), now).await
    }

    async fn get_many(&self, keys: &[String], now: u64) -> Result<Vec<Option<Entry>>, StoreError> {
        if self.cluster {
            // A cluster refuses a pipeline whose keys hash to different
            // slots (CROSSSLOT): each key is asked alone, all at once (the
            // cluster connection multiplexes them: still one round trip).
            let reads = keys.iter().map(|k| self.read("get_many", self.key(k), now));
            return futures::future::try_join_all(reads).await;
        }
        // One pipeline: one round trip for the whole batch.
        let full: Vec<String> = keys.iter().map(|k| self.key(k)).collect();
        let rows: Vec<(Option<Vec<u8>>, Option<String>, Option<String>)> = self
            .call("get_many", |mut c| async move {
                let mut p = redis::pipe();
                for k in &full {
                    p.cmd("HMGET").arg(k).arg("v").arg("ver").arg("exp");
                }
                p.query_async(&mut c).await
            })
            .await?;
        Ok(rows.into_iter().map(|f| parse_entry(f).filter(|e| e.expires_at > now)).collect())
    }

    async fn set(&self, key: &str, value: &[u8], expires_at: u64, cond: Condition, now: u64) -> Result<WriteOutcome, StoreError> {
        let k = self.key(key);
        let ttl = expires_at.saturating_sub(now).min(i64::MAX as u64);
        let (v1, v2) = (new_version(), new_version());
        let script = &self.set_script;
        let ver: u64 = self
            .call("set", |mut c| async move {
                script
                    .key(&k)
                    .arg(cond_arg(cond))
                    .arg(now)
                    .arg(value)
                    .arg(expires_at)
                    .arg(ttl)
                    .arg(v1)
                    .arg(if v2 == v1 { v1 ^ 1 } else { v2 })
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(if ver == 0 { WriteOutcome::Conflict } else { WriteOutcome::Written(ver) })
    }

    async fn delete(&self, key: &str, cond: Condition, now: u64) -> Result<bool, StoreError> {
        let k = self.key(key);
        let script = &self.delete_script;
        let n: u64 =
            self.call("delete", |mut c| async move { script.key(&k).arg(cond_arg(cond)).arg(now).invoke_async(&mut c).await }).await?;
        Ok(n == 1)
    }

    async fn sweep(&self, now: u64) -> Result<u64, StoreError> {
        // Redis expires records by itself; this catches records whose
        // expiry by the caller's clock came first (clock skew, tests).
        let mut total = 0;
        for node in self.nodes().await? {
            let mut cursor: u64 = 0;
            loop {
                let (next, keys) = self.scan_node(node.as_ref(), cursor, 1000).await?;
                // One key per script call on a cluster (keys of one call
                // must share a slot); all of a batch on one server.
                let batches: Vec<Vec<String>> = match node {
                    Some(_) => keys.into_iter().map(|k| vec![k]).collect(),
                    None if keys.is_empty() => Vec::new(),
                    None => vec![keys],
                };
                for batch in batches {
                    let script = &self.sweep_script;
                    let n: u64 = self
                        .call("sweep", |mut c| async move {
                            let mut inv = script.prepare_invoke();
                            for k in &batch {
                                inv.key(k);
                            }
                            inv.arg(now).invoke_async(&mut c).await
                        })
                        .await?;
                    total += n;
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(total)
    }

    /// Counted with SCAN over the whole keyspace (1,000 keys a step, on
    /// every primary of a cluster): about a second a minute at 5 million
    /// keys, paid by the background task of the record budget, never by a
    /// request. Keys that Redis has not yet expired are counted.
    async fn count_prefix(&self, prefix: &str, _now: u64) -> Result<Option<u64>, StoreError> {
        let mut total = 0u64;
        for node in self.nodes().await? {
            let mut cursor: u64 = 0;
            loop {
                let (next, keys) = self.scan_node_matching(node.as_ref(), cursor, 1000, prefix).await?;
                total += keys.len() as u64;
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(Some(total))
    }

    fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        // Redis persists on its own terms (RDB/AOF, configured there).
        Ok(())
    }

    async fn scan(&self, cursor: Option<String>, limit: usize, now: u64) -> Result<Page, StoreError> {
        // The cursor is `NODE:CURSOR`: the index of the node (a cluster's
        // primaries in address order; 0 for one server) and its SCAN cursor.
        let (node_index, start): (usize, u64) = match &cursor {
            Some(c) => c
                .split_once(':')
                .and_then(|(n, c)| Some((n.parse().ok()?, c.parse().ok()?)))
                .ok_or_else(|| StoreError::Backend(format!("bad redis scan cursor {c:?}")))?,
            None => (0, 0),
        };
        let nodes = self.nodes().await?;
        let Some(node) = nodes.get(node_index) else { return Ok(Page::default()) };
        let (next, keys) = self.scan_node(node.as_ref(), start, limit.clamp(1, 10_000)).await?;
        let next = match (next, node_index + 1 < nodes.len()) {
            (0, true) => Some(format!("{}:0", node_index + 1)),
            (0, false) => None,
            (n, _) => Some(format!("{node_index}:{n}")),
        };
        let mut page = Page { entries: Vec::with_capacity(keys.len()), next };
        for k in keys {
            let Some(short) = k.strip_prefix(&self.config.prefix) else { continue };
            if let Some(e) = self.read("scan", k.clone(), now).await? {
                page.entries.push((short.to_string(), e));
            }
        }
        Ok(page)
    }
}

impl RedisStore {
    /// The nodes to SCAN: `[None]` for one server; each primary of a
    /// cluster, in address order.
    async fn nodes(&self) -> Result<Vec<Option<(String, u16)>>, StoreError> {
        if !self.cluster {
            return Ok(vec![None]);
        }
        let text: String =
            self.call("cluster nodes", |mut c| async move { redis::cmd("CLUSTER").arg("NODES").query_async(&mut c).await }).await?;
        let mut primaries: Vec<(String, u16)> = text
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let flags = f.get(2)?;
                if !flags.split(',').any(|x| x == "master") || flags.contains("fail") {
                    return None;
                }
                let addr = f.get(1)?.split('@').next()?;
                let (host, port) = addr.rsplit_once(':')?;
                Some((host.to_string(), port.parse().ok()?))
            })
            .collect();
        primaries.sort();
        Ok(primaries.into_iter().map(Some).collect())
    }

    /// One SCAN step on `node` (`None`: the only server).
    async fn scan_node(&self, node: Option<&(String, u16)>, cursor: u64, count: usize) -> Result<(u64, Vec<String>), StoreError> {
        self.scan_node_matching(node, cursor, count, "").await
    }

    /// One SCAN step on `node` over the keys that start with greyhook's
    /// prefix and then `prefix` (glob characters in either are escaped).
    async fn scan_node_matching(
        &self,
        node: Option<&(String, u16)>,
        cursor: u64,
        count: usize,
        prefix: &str,
    ) -> Result<(u64, Vec<String>), StoreError> {
        let mut pattern = String::with_capacity(self.config.prefix.len() + prefix.len() + 1);
        for ch in self.config.prefix.chars().chain(prefix.chars()) {
            if matches!(ch, '*' | '?' | '[' | ']' | '\\' | '^') {
                pattern.push('\\');
            }
            pattern.push(ch);
        }
        pattern.push('*');
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(count);
        match node {
            None => self.call("scan", |mut c| async move { cmd.query_async(&mut c).await }).await,
            Some((host, port)) => {
                let routing = redis::cluster_routing::RoutingInfo::SingleNode(redis::cluster_routing::SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                });
                self.call("scan", |c| async move {
                    let Conn::Cluster(mut c) = c else { unreachable!("nodes() gives addresses only for a cluster") };
                    let v = c.route_command(cmd, routing).await?;
                    Ok(redis::from_redis_value(v)?)
                })
                .await
            }
        }
    }
}

/// Opens the Redis backend from the `[store]` table (see [`super::BACKENDS`]).
pub(super) fn open(url: &str, config: &super::StoreConfig) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    if config.timeout.is_zero() || config.timeout > Duration::from_secs(30) {
        return Err(StoreError::Open { path: super::redacted(url), reason: "store.timeout must be between 1ms and 30s".into() });
    }
    let c = RedisConfig {
        url: url.to_string(),
        prefix: config.prefix.clone(),
        timeout: config.timeout,
        tls: config.tls(),
        sentinel_auth: config.sentinel_auth(),
    };
    Ok(std::sync::Arc::new(RedisStore::open(c)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(url: &str, tls: RedisTls) -> String {
        match RedisStore::open(RedisConfig { tls, ..RedisConfig::new(url) }) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{url} opened"),
        }
    }

    /// An error names the store without the password in its URL.
    #[test]
    fn open_errors_hide_the_password() {
        let e = refused("redis://:s3cret@127.0.0.1:1/0", RedisTls { ca: Some("/nonexistent".into()), ..RedisTls::default() });
        assert!(e.contains("redis://***@127.0.0.1:1/0") && e.contains("need a TLS URL") && !e.contains("s3cret"), "{e}");
        let e = refused("rediss://:s3cret@127.0.0.1:1/0", RedisTls { ca: Some("/nonexistent".into()), ..RedisTls::default() });
        assert!(e.contains("tls_ca /nonexistent") && !e.contains("s3cret"), "{e}");
        let table = crate::store::StoreConfig { timeout: Duration::ZERO, ..Default::default() };
        let e = open("redis://:s3cret@127.0.0.1:1/0", &table).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("store.timeout") && !e.contains("s3cret"), "{e}");
    }

    #[test]
    fn tls_files_are_bounded_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.pem");
        std::fs::write(&big, vec![b'A'; MAX_PEM_BYTES as usize + 1]).unwrap();
        let e = refused("rediss://127.0.0.1:1/0", RedisTls { ca: Some(big), ..RedisTls::default() });
        assert!(e.contains("not a PEM file"), "{e}");
        let e = refused("rediss://127.0.0.1:1/0", RedisTls { cert: Some(dir.path().join("c.pem")), ..RedisTls::default() });
        assert!(e.contains("tls_cert and tls_key go together"), "{e}");
        let e = refused("rediss://127.0.0.1:1/#insecure", RedisTls::default());
        assert!(e.contains("always checked"), "{e}");
        let e = refused("rediss+sentinel://127.0.0.1:1", RedisTls::default());
        assert!(e.contains("expected redis+sentinel://"), "{e}");
        for url in ["redis+sentinel://10.0.0.5/mymaster", "redis+sentinel://10.0.0.5:26379,[::1]/mymaster"] {
            let e = refused(url, RedisTls::default());
            assert!(e.contains(": name its port"), "{url}: {e}");
        }
    }

    /// The sentinels' own credentials: only with a Sentinel URL, a user only
    /// with a password, and never in the debug text.
    #[test]
    fn sentinel_credentials_go_with_a_sentinel_url() {
        let with = |url: &str, user: Option<&str>, password: Option<&str>| {
            let sentinel_auth = SentinelAuth { user: user.map(Into::into), password: password.map(Into::into) };
            RedisStore::open(RedisConfig { sentinel_auth, ..RedisConfig::new(url) }).err().map(|e| e.to_string())
        };
        for url in ["redis://127.0.0.1:1/0", "rediss://127.0.0.1:1/0", "redis+cluster://127.0.0.1:1"] {
            let e = with(url, None, Some("pw")).unwrap_or_default();
            assert!(e.contains("are for the sentinels of a redis+sentinel:// URL"), "{url}: {e}");
        }
        let e = with("redis+sentinel://127.0.0.1:1/mymaster", Some("u"), None).unwrap_or_default();
        assert!(e.contains("sentinel_user needs sentinel_password"), "{e}");
        assert_eq!(with("redis+sentinel://127.0.0.1:1/mymaster", Some("u"), Some("pw")), None);
        assert_eq!(with("rediss+sentinel://127.0.0.1:1/mymaster", None, Some("pw")), None);
        let table = crate::store::StoreConfig { sentinel_password: Some("pw".into()), ..Default::default() };
        let shown = format!("{:?}", table.sentinel_auth());
        assert!(shown.contains("***") && !shown.contains("pw"), "{shown}");
        for path in ["memory", "/tmp/x.db"] {
            let table = crate::store::StoreConfig { path: Some(path.into()), ..table.clone() };
            let e = table.open().err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains("sentinel_password are for Redis"), "{path}: {e}");
        }
    }

    /// Changed TLS files make new connections; unchanged ones or a set that
    /// does not load keep those in use.
    #[tokio::test]
    async fn changed_tls_files_make_new_connections() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("client.pem"), dir.path().join("client.key"));
        let issue = || {
            let c = rcgen::generate_simple_self_signed(vec!["greyhook.test".to_string()]).unwrap();
            (c.cert.pem(), c.signing_key.serialize_pem())
        };
        let (c, k) = issue();
        std::fs::write(&cert, &c).unwrap();
        std::fs::write(&key, &k).unwrap();
        let tls = RedisTls { ca: Some(cert.clone()), cert: Some(cert.clone()), key: Some(key.clone()) };
        let store = RedisStore::open(RedisConfig { tls, ..RedisConfig::new("rediss://127.0.0.1:1/0") }).unwrap();
        let first = store.backend.load_full();
        store.follow_tls_files(0);
        assert!(std::sync::Arc::ptr_eq(&first, &store.backend.load_full()), "nothing changed");
        let (c, k) = issue();
        std::fs::write(dir.path().join("new.pem"), &c).unwrap();
        std::fs::rename(dir.path().join("new.pem"), &cert).unwrap();
        std::fs::write(&key, &k).unwrap();
        store.follow_tls_files(0);
        let second = store.backend.load_full();
        assert!(!std::sync::Arc::ptr_eq(&first, &second), "renewed files make new connections");
        // Half a renewal: a new certificate beside the old key.
        let (c, k) = issue();
        std::fs::write(&cert, &c).unwrap();
        store.follow_tls_files(0);
        assert!(std::sync::Arc::ptr_eq(&second, &store.backend.load_full()), "a certificate without its key keeps the connections");
        std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\ncut short").unwrap();
        store.follow_tls_files(0);
        assert!(std::sync::Arc::ptr_eq(&second, &store.backend.load_full()), "a broken key keeps the connections in use");
        // Looked at once a minute while calls succeed.
        std::fs::write(&key, &k).unwrap();
        store.follow_tls_files(TLS_CHECK_SECS);
        assert!(std::sync::Arc::ptr_eq(&second, &store.backend.load_full()), "not looked at again within the minute");
        store.follow_tls_files(0);
        assert!(!std::sync::Arc::ptr_eq(&second, &store.backend.load_full()), "the mended key is read");
    }
}
