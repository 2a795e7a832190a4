//! What the host offers a filter (the contract's imports): a key-value
//! store with versions and TTLs, DNS lookups, SPF and forward-confirmed
//! reverse DNS, metrics and a log. A hook gets it as `&mut dyn Host`: in a
//! component the calls cross to greyhook; under [`crate::testing`] they go
//! to fakes.

use std::net::IpAddr;

/// A stored value and its version (never 0; changes on every write).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The value.
    pub value: Vec<u8>,
    /// Its version, for a conditional write.
    pub version: u64,
}

/// Why a store call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The store is down or slow; the host's failure policy answers.
    Unavailable(String),
    /// A limit: key over 256 bytes, value over 16 KiB, too many calls.
    Limit(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Unavailable(m) => write!(f, "unavailable: {m}"),
            StoreError::Limit(m) => write!(f, "limit: {m}"),
        }
    }
}

/// The outcome of a conditional write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Written; the new version.
    Written(u64),
    /// The version was not the one required.
    Conflict,
}

/// One write of [`Host::set_many`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Write<'a> {
    /// The key.
    pub key: &'a str,
    /// The value.
    pub value: &'a [u8],
    /// Seconds until it expires (at least 1).
    pub ttl: u32,
    /// `None`: unconditional; `Some(0)`: only if absent; `Some(v)`: only at version `v`.
    pub if_version: Option<u64>,
}

/// A DNS record type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RecordType {
    /// IPv4 addresses as text.
    A,
    /// IPv6 addresses as text.
    Aaaa,
    /// `PREFERENCE NAME`.
    Mx,
    /// Each record's strings joined.
    Txt,
    /// Names of a reverse name.
    Ptr,
}

/// Why a lookup gave no records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsError {
    /// The name does not exist.
    NxDomain,
    /// No records of the type.
    NoData,
    /// No answer in time (the resolver's, or the hook's deadline).
    Timeout,
    /// The resolver failed.
    ServFail(String),
    /// Too many lookups in one hook call, or not a domain name.
    Limit(String),
}

impl std::fmt::Display for DnsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DnsError::NxDomain => f.write_str("NXDOMAIN"),
            DnsError::NoData => f.write_str("no data"),
            DnsError::Timeout => f.write_str("timed out"),
            DnsError::ServFail(m) => write!(f, "resolver failure: {m}"),
            DnsError::Limit(m) => write!(f, "limit: {m}"),
        }
    }
}

/// An SPF result (RFC 7208).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SpfResult {
    /// Authorised.
    Pass,
    /// Not authorised (`-all`).
    Fail,
    /// Probably not (`~all`).
    SoftFail,
    /// No assertion.
    Neutral,
    /// No record.
    None,
    /// A transient DNS error.
    TempError,
    /// A broken record.
    PermError,
}

/// An SPF check's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpfOutcome {
    /// The result.
    pub result: SpfResult,
    /// The domain checked (the MAIL FROM's, or the HELO name for `<>`).
    pub domain: String,
}

/// A log level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Debugging detail.
    Debug,
    /// Normal operation.
    Info,
    /// Worth an operator's look.
    Warn,
    /// A failure.
    Error,
}

/// The host's services, as a hook sees them.
pub trait Host {
    /// Reads a key (expired entries are absent).
    fn get(&mut self, key: &str) -> Result<Option<Entry>, StoreError>;
    /// Reads several keys at once (one round trip to a networked store).
    fn get_many(&mut self, keys: &[&str]) -> Result<Vec<Option<Entry>>, StoreError>;
    /// Writes a key for `ttl` seconds under a condition (see [`Write`]).
    fn set(&mut self, key: &str, value: &[u8], ttl: u32, if_version: Option<u64>) -> Result<WriteOutcome, StoreError>;
    /// Writes several keys at once, each under its own condition.
    fn set_many(&mut self, writes: &[Write<'_>]) -> Result<Vec<WriteOutcome>, StoreError>;
    /// Deletes a key under a condition; true if it existed.
    fn delete(&mut self, key: &str, if_version: Option<u64>) -> Result<bool, StoreError>;
    /// Looks up `name`'s records of `kind` through the host's resolver.
    fn lookup(&mut self, name: &str, kind: RecordType) -> Result<Vec<String>, DnsError>;
    /// The names `ip`'s PTR records give (unverified).
    fn reverse(&mut self, ip: IpAddr) -> Result<Vec<String>, DnsError>;
    /// The SPF result for the client `ip` that said `helo` and sent from
    /// `sender` (`""`: the null sender).
    fn spf(&mut self, ip: IpAddr, helo: &str, sender: &str) -> Result<SpfOutcome, DnsError>;
    /// The first PTR name of `ip` that resolves back to it, if any.
    fn forward_confirmed_name(&mut self, ip: IpAddr) -> Result<Option<String>, DnsError>;
    /// Adds to a counter of this filter. In a component the series' handle
    /// (contract 0.2.1) is asked for the first time an instance updates it
    /// and kept: later updates cross no strings.
    fn counter_add(&mut self, name: &str, labels: &[(&str, &str)], value: u64);
    /// Records an observation in a histogram of this filter (through its
    /// handle in a component, as `counter_add`).
    fn observe(&mut self, name: &str, labels: &[(&str, &str)], value: f64);
    /// Writes a log line, attributed to the filter.
    fn log(&mut self, level: Level, message: &str);
}
