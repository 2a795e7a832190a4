//! The host's DNS: one resolver for the filters' `dns` and `auth` imports
//! and for the front ends that must name their clients themselves (the SMTP
//! server and OpenSMTPD; Postfix hands its names over).
//!
//! Lookups go through hickory's resolver, whose cache honours each answer's
//! TTL (and caches negative answers for their SOA minimum); SPF is Stalwart's
//! `mail-auth` (RFC 7208, with its 10-lookup and 20-second limits) on the
//! same resolver, with bounded TTL caches of the records it parses. Nothing
//! here is hand-written DNS: only the mapping of answers to the contract's
//! text forms, the error kinds and the FCrDNS walk (which `mail-auth`'s
//! `iprev` does not report the confirming name of).
//!
//! Loopback names and addresses (`localhost`, `127.in-addr.arpa`) are
//! answered by the resolver itself, never sent to a server (RFC 6761): a
//! client at 127.0.0.1 is `localhost`, one at 127.0.0.2 has no confirmed name.
//!
//! Every lookup is bounded in time by [`DnsConfig::timeout`]; the sandbox
//! also cuts it at what is left of the hook's deadline and counts the calls
//! of one hook call ([`DnsConfig::max_lookups`]).

use std::borrow::Borrow;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType as HickoryType};
use mail_auth::{MX, MessageAuthenticator, Parameters, RecordSet, ResolverCache, Txt};
use serde::Deserialize;

/// Most records a lookup returns to a filter.
pub const MAX_RECORDS: usize = 64;
/// Most PTR names checked for forward confirmation.
const MAX_FCRDNS_NAMES: usize = 10;
/// Most lookups left running after the hook that asked was cut off by its
/// deadline ([`Resolver::finish_detached`]); past it they are dropped.
pub const MAX_DETACHED: usize = 256;

/// The `[dns]` table.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct DnsConfig {
    /// Name servers as `HOST:PORT` (`--dns`, repeatable); empty: the
    /// system's resolver configuration (`/etc/resolv.conf`).
    pub servers: Vec<SocketAddr>,
    /// How long one lookup may take, all attempts together.
    #[serde(deserialize_with = "crate::settings::duration")]
    pub timeout: Duration,
    /// Most DNS and `auth` calls one hook call may make.
    pub max_lookups: u32,
    /// Answers the resolver caches (each kept for its TTL).
    pub cache_size: u64,
    /// Whether the SMTP and OpenSMTPD front ends look up their clients'
    /// names (PTR, then forward confirmation) before the connect hook.
    pub resolve_clients: bool,
    /// How long a negative answer (no such name, no records of the type)
    /// is kept at least: one without a TTL (no SOA record in it) would
    /// otherwise be asked for again at every lookup. At most
    /// [`MAX_MIN_NEGATIVE_TTL`]; zero keeps only those that carry a TTL.
    #[serde(deserialize_with = "crate::settings::duration")]
    pub min_negative_ttl: Duration,
}

/// The longest `min_negative_ttl` allowed (an hour: longer would hide a
/// record published since for too long).
pub const MAX_MIN_NEGATIVE_TTL: Duration = Duration::from_secs(3600);

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            servers: Vec::new(),
            timeout: Duration::from_secs(3),
            max_lookups: 20,
            cache_size: 10_000,
            resolve_clients: true,
            // unbound's NORR_TTL: what it keeps a negative answer without
            // an SOA record for.
            min_negative_ttl: Duration::from_secs(5),
        }
    }
}

impl DnsConfig {
    /// Checks the table's bounds.
    pub fn check(&self) -> Result<(), String> {
        if self.min_negative_ttl > MAX_MIN_NEGATIVE_TTL {
            return Err(format!("[dns] min_negative_ttl must be at most {}s", MAX_MIN_NEGATIVE_TTL.as_secs()));
        }
        Ok(())
    }

    /// One line for the startup log: which servers, and the limits.
    pub fn describe(&self) -> String {
        let servers = if self.servers.is_empty() {
            "the system's resolver (/etc/resolv.conf)".to_string()
        } else {
            format!("servers {}", self.servers.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "))
        };
        format!(
            "{servers}, timeout {:?}, at most {} lookups a hook call, {} cached answers, negative answers kept at least {:?}, client names {}",
            self.timeout,
            self.max_lookups,
            self.cache_size,
            self.min_negative_ttl,
            if self.resolve_clients { "resolved" } else { "not resolved" }
        )
    }
}

/// A DNS record type a filter may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordType {
    /// IPv4 addresses.
    A,
    /// IPv6 addresses.
    Aaaa,
    /// Mail exchangers (`PREFERENCE NAME`).
    Mx,
    /// Text records (each record's strings joined).
    Txt,
    /// Names (of a reverse name).
    Ptr,
}

/// Why a lookup gave no records (the contract's `dns-error`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// The name does not exist.
    #[error("NXDOMAIN")]
    NxDomain,
    /// No records of the type.
    #[error("no data")]
    NoData,
    /// No answer in time.
    #[error("timed out")]
    Timeout,
    /// The resolver failed.
    #[error("resolver failure: {0}")]
    ServFail(String),
    /// A limit (too many lookups in one call, an invalid name).
    #[error("limit: {0}")]
    Limit(String),
}

/// An SPF result (RFC 7208).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpfResult {
    /// Authorised.
    Pass,
    /// Not authorised.
    Fail,
    /// Probably not authorised.
    SoftFail,
    /// No assertion.
    Neutral,
    /// No record.
    None,
    /// Transient error.
    TempError,
    /// Broken record.
    PermError,
}

/// The outcome of an SPF check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpfOutcome {
    /// The result.
    pub result: SpfResult,
    /// The domain checked.
    pub domain: String,
}

/// Why the resolver could not be set up.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot set up the DNS resolver: {0}")]
pub struct SetupError(String);

/// Counters of the resolver.
#[derive(Debug, Default)]
pub struct DnsStats {
    /// Lookups and checks asked for (by filters and front ends).
    pub lookups: AtomicU64,
    /// Of those, the ones that failed (any [`DnsError`]).
    pub failures: AtomicU64,
    /// Lookups a hook's deadline cut off that were left to finish (and
    /// fill the cache) on their own.
    pub detached: AtomicU64,
}

/// The host's resolver. Cheap to clone; built on first use, so that a
/// daemon whose filters never look anything up never reads
/// `/etc/resolv.conf`.
#[derive(Clone)]
pub struct Resolver {
    inner: Arc<Inner>,
}

struct Inner {
    detached: Arc<tokio::sync::Semaphore>,
    config: DnsConfig,
    auth: OnceLock<Result<MessageAuthenticator, SetupError>>,
    caches: Caches,
    stats: DnsStats,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver").field("config", &self.inner.config).finish()
    }
}

impl Default for Resolver {
    fn default() -> Self {
        Resolver::new(DnsConfig::default())
    }
}

impl Resolver {
    /// A resolver with these settings (set up on first use).
    pub fn new(config: DnsConfig) -> Resolver {
        let cap = usize::try_from(config.cache_size).unwrap_or(usize::MAX).max(16);
        Resolver {
            inner: Arc::new(Inner {
                detached: Arc::new(tokio::sync::Semaphore::new(MAX_DETACHED)),
                caches: Caches::new(cap),
                config,
                auth: OnceLock::new(),
                stats: DnsStats::default(),
            }),
        }
    }

    /// Its settings.
    pub fn config(&self) -> &DnsConfig {
        &self.inner.config
    }

    /// Its counters.
    pub fn stats(&self) -> &DnsStats {
        &self.inner.stats
    }

    /// Sets the resolver up now (to report a bad system configuration at
    /// start rather than at the first lookup).
    pub fn check(&self) -> Result<(), SetupError> {
        self.auth().map(|_| ())
    }

    fn auth(&self) -> Result<&MessageAuthenticator, SetupError> {
        self.inner.auth.get_or_init(|| build(&self.inner.config)).as_ref().map_err(Clone::clone)
    }

    /// Runs the lookup `f` for at most `within`; past it, `Timeout` for the
    /// caller while `f` goes on as its own task (it is bounded by
    /// [`DnsConfig::timeout`] itself) and warms the cache. A cold SPF chain
    /// may take longer than a hook's deadline; cut off, it would be asked
    /// again cold at the client's retry and give another identity then.
    /// At most [`MAX_DETACHED`] run on after their callers; beyond that the
    /// lookup is dropped with the caller.
    ///
    /// The lookup runs in the caller's task until it is cut off: a task of
    /// its own from the start, as it was, cost each cold lookup a spawn and
    /// a hand-off between runtime workers. A panic in it (the resolver
    /// reading a server's answer) is a `ServFail`, not the caller's.
    ///
    /// `f` is boxed as this is called, not at the first poll: a lookup's
    /// future is large (an SPF check's ~6 KB), and the future this returns
    /// is moved by its callers (a filter's host call, which the engine
    /// moves as it calls it); held by value it was copied each time (~4% of
    /// a request's CPU when every request looked something up).
    pub fn finish_detached<T, F>(&self, within: Duration, f: F) -> impl Future<Output = Result<T, DnsError>> + '_
    where
        T: Send + 'static,
        F: Future<Output = Result<T, DnsError>> + Send + 'static,
    {
        use futures::FutureExt;
        let mut f = Box::pin(std::panic::AssertUnwindSafe(f).catch_unwind());
        let answered =
            |r: std::thread::Result<Result<T, DnsError>>| r.unwrap_or_else(|_| Err(DnsError::ServFail("the lookup panicked".into())));
        async move {
            // A cache hit is ready at the first poll: no timer for it.
            if let std::task::Poll::Ready(r) = std::future::poll_fn(|cx| std::task::Poll::Ready(f.as_mut().poll(cx))).await {
                return answered(r);
            }
            match tokio::time::timeout(within, &mut f).await {
                Ok(r) => answered(r),
                Err(_) => {
                    if let Ok(permit) = self.inner.detached.clone().try_acquire_owned() {
                        self.inner.stats.detached.fetch_add(1, Ordering::Relaxed);
                        tokio::spawn(async move {
                            let _ = f.await;
                            drop(permit);
                        });
                    }
                    Err(DnsError::Timeout)
                }
            }
        }
    }

    fn count<T>(&self, r: Result<T, DnsError>) -> Result<T, DnsError> {
        self.inner.stats.lookups.fetch_add(1, Ordering::Relaxed);
        if r.is_err() {
            self.inner.stats.failures.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Runs a lookup within the resolver's timeout, counting it (an answer
    /// ready at the first poll came from a cache) and its latency.
    async fn timed<T>(&self, f: impl Future<Output = Result<T, DnsError>>) -> Result<T, DnsError> {
        let start = std::time::Instant::now();
        let mut f = std::pin::pin!(f);
        let r = match std::future::poll_fn(|cx| std::task::Poll::Ready(f.as_mut().poll(cx))).await {
            std::task::Poll::Ready(r) => {
                crate::telemetry::host().dns_cache_hits.inc();
                r
            }
            std::task::Poll::Pending => match tokio::time::timeout(self.inner.config.timeout, f).await {
                Ok(r) => r,
                Err(_) => Err(DnsError::Timeout),
            },
        };
        crate::telemetry::host().dns_latency.observe(start.elapsed().as_secs_f64());
        self.count(r)
    }

    /// The records of `name`, in the contract's text forms.
    pub async fn lookup(&self, name: &str, kind: RecordType) -> Result<Vec<String>, DnsError> {
        self.timed(self.lookup_untimed(name, kind)).await
    }

    async fn lookup_untimed(&self, name: &str, kind: RecordType) -> Result<Vec<String>, DnsError> {
        let name = checked_name(name)?;
        let auth = self.auth().map_err(|e| DnsError::ServFail(e.0))?;
        let t = match kind {
            RecordType::A => HickoryType::A,
            RecordType::Aaaa => HickoryType::AAAA,
            RecordType::Mx => HickoryType::MX,
            RecordType::Txt => HickoryType::TXT,
            RecordType::Ptr => HickoryType::PTR,
        };
        let lookup = auth.resolver().lookup(name.as_str(), t).await.map_err(net_error)?;
        let mut out = Vec::new();
        for r in lookup.answers() {
            if out.len() >= MAX_RECORDS {
                break;
            }
            let text = match (&r.data, kind) {
                (RData::A(a), RecordType::A) => a.0.to_string(),
                (RData::AAAA(a), RecordType::Aaaa) => a.0.to_string(),
                (RData::MX(mx), RecordType::Mx) => format!("{} {}", mx.preference, name_text(&mx.exchange.to_ascii())),
                (RData::TXT(txt), RecordType::Txt) => txt
                    .txt_data
                    .iter()
                    .map(|s| String::from_utf8_lossy(s))
                    .collect::<String>()
                    .chars()
                    .filter(|c| !c.is_control())
                    .collect(),
                (RData::PTR(p), RecordType::Ptr) => name_text(&p.0.to_ascii()),
                // CNAMEs on the way and records of other types are not answers.
                _ => continue,
            };
            out.push(text);
        }
        if out.is_empty() {
            return Err(DnsError::NoData);
        }
        Ok(out)
    }

    /// The names the PTR records of `ip` give (unverified).
    pub async fn reverse(&self, ip: IpAddr) -> Result<Vec<String>, DnsError> {
        self.timed(self.reverse_untimed(ip)).await
    }

    async fn reverse_untimed(&self, ip: IpAddr) -> Result<Vec<String>, DnsError> {
        let auth = self.auth().map_err(|e| DnsError::ServFail(e.0))?;
        let set = auth.ptr_lookup(ip, Some(&self.inner.caches.ptr)).await.map_err(auth_error)?;
        let names: Vec<String> = set.rrset.iter().take(MAX_RECORDS).map(|n| name_text(n)).filter(|n| !n.is_empty()).collect();
        if names.is_empty() { Err(DnsError::NoData) } else { Ok(names) }
    }

    /// The first name the PTR records of `ip` give that resolves back to
    /// `ip` (FCrDNS); `None` if none does.
    pub async fn forward_confirmed(&self, ip: IpAddr) -> Result<Option<String>, DnsError> {
        self.timed(self.forward_confirmed_untimed(ip)).await
    }

    async fn forward_confirmed_untimed(&self, ip: IpAddr) -> Result<Option<String>, DnsError> {
        let names = match self.reverse_untimed(ip).await {
            Ok(n) => n,
            Err(DnsError::NxDomain | DnsError::NoData) => return Ok(None),
            Err(e) => return Err(e),
        };
        let auth = self.auth().map_err(|e| DnsError::ServFail(e.0))?;
        let mut last_err = None;
        for name in names.iter().take(MAX_FCRDNS_NAMES) {
            let confirmed = match ip {
                IpAddr::V4(v4) => auth.ipv4_lookup(name.as_str(), Some(&self.inner.caches.ipv4)).await.map(|s| s.rrset.contains(&v4)),
                IpAddr::V6(v6) => auth.ipv6_lookup(name.as_str(), Some(&self.inner.caches.ipv6)).await.map(|s| s.rrset.contains(&v6)),
            };
            match confirmed.map_err(auth_error) {
                Ok(true) => return Ok(Some(name.clone())),
                Ok(false) | Err(DnsError::NxDomain | DnsError::NoData) => {}
                Err(e) => last_err = Some(e),
            }
        }
        match last_err {
            Some(e) => Err(e),
            None => Ok(None),
        }
    }

    /// Both names of a client, as Postfix gives them: `(client_name,
    /// reverse_client_name)`, the forward-confirmed one and the PTR one.
    /// Failures are `None` (and counted).
    pub async fn client_names(&self, ip: IpAddr) -> (Option<String>, Option<String>) {
        let reverse = self.reverse(ip).await.ok().and_then(|n| n.into_iter().next());
        if reverse.is_none() {
            return (None, None);
        }
        let confirmed = self.forward_confirmed(ip).await.ok().flatten();
        (confirmed, reverse)
    }

    /// The SPF result of the client `ip` that said `helo` and gave the
    /// MAIL FROM `sender`: the MAIL FROM identity, or for the null sender
    /// (`""`) the HELO identity. DNS failures during the
    /// check are [`SpfResult::TempError`]; the whole check is bounded by
    /// [`DnsConfig::timeout`] (then `TempError` too).
    pub async fn spf(&self, ip: IpAddr, helo: &str, sender: &str) -> SpfOutcome {
        let domain = match sender.rsplit_once('@') {
            Some((_, d)) if !sender.is_empty() => d.to_ascii_lowercase(),
            _ => helo.to_ascii_lowercase(),
        };
        let r = self
            .timed(async {
                let auth = self.auth().map_err(|e| DnsError::ServFail(e.0))?;
                // RFC 7208 section 2.4: the MAIL FROM identity; for the null
                // sender, `postmaster@` the HELO name (mail-auth 0.13's
                // combined check skips MAIL FROM when HELO does not pass).
                use mail_auth::spf::verify::SpfParameters;
                let params = if sender.is_empty() {
                    SpfParameters::verify_ehlo(ip, helo, "localhost")
                } else {
                    SpfParameters::verify_mail_from(ip, helo, "localhost", sender)
                };
                let c = &self.inner.caches;
                let params = Parameters::new(params)
                    .with_txt_cache(&c.txt)
                    .with_mx_cache(&c.mx)
                    .with_ptr_cache(&c.ptr)
                    .with_ipv4_cache(&c.ipv4)
                    .with_ipv6_cache(&c.ipv6);
                let out = auth.verify_spf(params).await;
                Ok(SpfOutcome { result: spf_result(out.result()), domain: out.domain().trim_end_matches('.').to_ascii_lowercase() })
            })
            .await;
        r.unwrap_or(SpfOutcome { result: SpfResult::TempError, domain })
    }
}

fn build(c: &DnsConfig) -> Result<MessageAuthenticator, SetupError> {
    let (config, mut opts) = if c.servers.is_empty() {
        hickory_resolver::system_conf::read_system_conf()
            .map_err(|e| SetupError(format!("reading the system's resolver configuration: {e}")))?
    } else {
        let servers = c
            .servers
            .iter()
            .map(|s| {
                let mut udp = ConnectionConfig::udp();
                udp.port = s.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = s.port();
                NameServerConfig::new(s.ip(), true, vec![udp, tcp])
            })
            .collect();
        let mut opts = ResolverOpts::default();
        // Named servers are the whole truth: /etc/hosts is the system's
        // configuration, not theirs.
        opts.use_hosts_file = hickory_resolver::config::ResolveHosts::Never;
        (ResolverConfig::from_name_servers(servers), opts)
    };
    opts.timeout = c.timeout;
    opts.attempts = 2;
    opts.cache_size = c.cache_size;
    // A negative answer without an SOA record has no TTL, and hickory then
    // keeps it for `negative_min_ttl`, by default none at all.
    opts.negative_min_ttl = Some(c.min_negative_ttl.min(MAX_MIN_NEGATIVE_TTL));
    // Names are absolute: "example.org" never becomes "example.org.corp.lan".
    opts.ndots = 0;
    // (What `MessageAuthenticator::new` does, plus the TLS configuration.)
    let resolver = hickory_resolver::TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
        .with_options(opts)
        .with_tls_config(no_tls().map_err(|e| SetupError(format!("TLS configuration: {e}")))?)
        .build()
        .map_err(|e| SetupError(e.to_string()))?;
    Ok(MessageAuthenticator(resolver))
}

/// The resolver's TLS configuration: no trusted roots. It speaks plain DNS
/// only (UDP, then TCP, to the servers named or resolv.conf's) and never
/// opens TLS, but left to itself it builds its default configuration at the
/// first lookup, reading and parsing every CA certificate of the system
/// (~150 files, ~18M instructions, on the thread serving that request) and
/// warning where there are none. Were a TLS server ever configured, every
/// handshake would fail verification: closed, not open.
fn no_tls() -> Result<rustls::ClientConfig, rustls::Error> {
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth())
}

/// A name the contract accepts: 1 to 253 bytes of letters, digits, `-`,
/// `_` and `.`, made absolute.
fn checked_name(name: &str) -> Result<String, DnsError> {
    let bare = name.strip_suffix('.').unwrap_or(name);
    let ok = !bare.is_empty()
        && bare.len() <= 253
        && bare
            .split('.')
            .all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    if !ok {
        return Err(DnsError::Limit(format!("not a domain name: {:?}", name.chars().take(64).collect::<String>())));
    }
    Ok(format!("{bare}."))
}

fn name_text(n: &str) -> String {
    n.trim_end_matches('.').to_ascii_lowercase()
}

fn net_error(e: NetError) -> DnsError {
    if e.is_nx_domain() {
        DnsError::NxDomain
    } else if e.is_no_records_found() {
        DnsError::NoData
    } else if matches!(e, NetError::Timeout) {
        DnsError::Timeout
    } else {
        DnsError::ServFail(e.to_string())
    }
}

fn auth_error(e: mail_auth::Error) -> DnsError {
    match e {
        mail_auth::Error::Dns(mail_auth::DnsError::RecordNotFound(hickory_resolver::proto::op::ResponseCode::NXDomain)) => {
            DnsError::NxDomain
        }
        mail_auth::Error::Dns(mail_auth::DnsError::RecordNotFound(_)) => DnsError::NoData,
        other => DnsError::ServFail(other.to_string()),
    }
}

fn spf_result(r: mail_auth::SpfResult) -> SpfResult {
    match r {
        mail_auth::SpfResult::Pass => SpfResult::Pass,
        mail_auth::SpfResult::Fail => SpfResult::Fail,
        mail_auth::SpfResult::SoftFail => SpfResult::SoftFail,
        mail_auth::SpfResult::Neutral => SpfResult::Neutral,
        mail_auth::SpfResult::None => SpfResult::None,
        mail_auth::SpfResult::TempError => SpfResult::TempError,
        mail_auth::SpfResult::PermError => SpfResult::PermError,
    }
}

/// A cache of `capacity` entries, each valid until its answer's TTL runs
/// out. When full, the entry used least recently makes room, in constant
/// time: a scan for expired entries at every insert, as it was, cost each
/// lookup the whole cache once a client's own short-lived answers kept it
/// full, and emptying it whole threw the good answers away with the rest.
/// An expired entry is dropped when it is next asked for. Split by key
/// into shards with a lock each (`capacity / 2048`, at most 16: the default
/// 10 000 makes 4), as every filter's lookups on every core come here.
struct TtlCache<K: Hash + Eq, V> {
    map: crate::cache::ShardedLru<K, (V, Instant)>,
}

impl<K: Hash + Eq, V: Clone> TtlCache<K, V> {
    fn new(capacity: usize) -> Self {
        TtlCache { map: crate::cache::ShardedLru::new(capacity) }
    }
}

impl<K: Hash + Eq, V: Clone> ResolverCache<K, V> for TtlCache<K, V> {
    fn get<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut map = self.map.shard(name);
        match map.get(name) {
            Some((v, until)) if *until > Instant::now() => Some(v.clone()),
            Some(_) => {
                map.pop(name);
                None
            }
            None => None,
        }
    }

    fn remove<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.pop(name).map(|(v, _)| v)
    }

    fn insert(&self, key: K, value: V, valid_until: Instant) {
        self.map.push(key, (value, valid_until));
    }
}

/// The caches `mail-auth` fills during SPF and FCrDNS checks (positive
/// answers; the resolver's own cache keeps the negative ones).
struct Caches {
    txt: TtlCache<Box<str>, Txt>,
    mx: TtlCache<Box<str>, RecordSet<MX>>,
    ipv4: TtlCache<Box<str>, RecordSet<Ipv4Addr>>,
    ipv6: TtlCache<Box<str>, RecordSet<Ipv6Addr>>,
    ptr: TtlCache<IpAddr, RecordSet<Box<str>>>,
}

impl Caches {
    fn new(cap: usize) -> Caches {
        Caches {
            txt: TtlCache::new(cap),
            mx: TtlCache::new(cap),
            ipv4: TtlCache::new(cap),
            ipv6: TtlCache::new(cap),
            ptr: TtlCache::new(cap),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Full, the cache drops the entry used least recently, not all of
    /// them; an expired entry is a miss.
    #[test]
    fn a_full_cache_drops_the_least_recently_used() {
        let c: TtlCache<u32, u32> = TtlCache::new(3);
        let later = Instant::now() + Duration::from_secs(60);
        for k in 0..3 {
            c.insert(k, k * 10, later);
        }
        assert_eq!(c.get(&0), Some(0), "used: now the most recent");
        c.insert(3, 30, later);
        assert_eq!((c.get(&1), c.get(&0), c.get(&2), c.get(&3)), (None, Some(0), Some(20), Some(30)));
        // 0 is the least recent now, and makes room for 4.
        c.insert(4, 40, Instant::now());
        assert_eq!(c.get(&4), None, "expired");
        assert_eq!(c.map.len(), 2, "the expired one is dropped when asked for");
        assert_eq!(c.get(&0), None);
        assert_eq!(c.remove(&2), Some(20));
    }

    #[test]
    fn names_are_checked_and_made_absolute() {
        assert_eq!(checked_name("Example.org").unwrap(), "Example.org.");
        assert_eq!(checked_name("example.org.").unwrap(), "example.org.");
        assert!(matches!(checked_name(""), Err(DnsError::Limit(_))));
        assert!(matches!(checked_name("a..b"), Err(DnsError::Limit(_))));
        assert!(matches!(checked_name("a b.org"), Err(DnsError::Limit(_))));
        assert!(matches!(checked_name(&"a".repeat(64)), Err(DnsError::Limit(_))));
    }

    #[tokio::test]
    async fn an_unreachable_server_is_a_bounded_failure() {
        // Nothing listens on port 9 of loopback: refused at once or timed out.
        let r = Resolver::new(DnsConfig {
            servers: vec!["127.0.0.1:9".parse().unwrap()],
            timeout: Duration::from_millis(300),
            ..DnsConfig::default()
        });
        let t = Instant::now();
        let e = r.lookup("example.org", RecordType::A).await.unwrap_err();
        assert!(matches!(e, DnsError::Timeout | DnsError::ServFail(_)), "{e:?}");
        assert!(t.elapsed() < Duration::from_secs(2));
        let spf = r.spf("192.0.2.1".parse().unwrap(), "mx.example.org", "a@example.org").await;
        assert_eq!(spf.result, SpfResult::TempError);
        assert_eq!(spf.domain, "example.org");
        assert_eq!(r.stats().lookups.load(Ordering::Relaxed), 2);
    }
}
