//! What a filter sees: the generated bindings of the contract's two
//! versions (`wit/greyhook.wit`, 0.2.3 (and 0.2.2, 0.2.1, 0.2.0), and `wit/v0.1/greyhook.wit`), the
//! per-instance host state, and the host side of the imports (`store`,
//! `log`, `dns`, `auth`, `metrics`, `negotiate`; a 0.1.0 filter's `store` and `log` are
//! the same code behind the older types). Also the conversions between the
//! WIT types and [`crate::domain::types`].
//!
//! The sandbox grants no WASI capability. Rust's `std` on `wasm32-wasip2`
//! makes every component import `wasi:cli`, `wasi:io`, `wasi:clocks`,
//! `wasi:random` and `wasi:filesystem` interfaces even when it does no I/O, so
//! they are linked, but empty: no arguments, no environment variables, no
//! preopened directories, no sockets (TCP, UDP and name lookups refused),
//! stdin empty, stdout discarded, stderr kept (bounded) for the log of a trap,
//! and both clocks frozen at zero (a filter gets time only from the
//! context's `now`).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::{HasData, ResourceTable, WasmList, WasmStr};
use wasmtime::{AsContextMut, StoreContextMut, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::dns::{self, Resolver};
use crate::domain::message::{MAX_MESSAGE_ID, bounded_headers, cut};
use crate::domain::types;
use crate::runtime::metrics::{FilterMetrics, MetricKind};
use crate::store::{Condition, Store, WriteOutcome};

/// The bindings generated from `wit/greyhook.wit` (`greyhook:filter@0.2.3`;
/// they run 0.2.0, 0.2.1 and 0.2.2 filters too).
pub(crate) mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "filter",
        imports: { default: async | trappable },
        exports: { default: async },
        // Hook arguments are borrowed (`&str`): a call lowers the host's
        // context into the filter's memory without copying it first.
        ownership: Borrowing { duplicate_if_necessary: true },
    });
}

/// The bindings of `greyhook:filter@0.1.0` (`wit/v0.1/`), for filters built
/// before 0.2.0: loaded unchanged.
pub(crate) mod bindings_v01 {
    wasmtime::component::bindgen!({
        path: "../wit/v0.1",
        world: "filter",
        imports: { default: async | trappable },
        exports: { default: async },
        // Hook arguments are borrowed (`&str`): a call lowers the host's
        // context into the filter's memory without copying it first.
        ownership: Borrowing { duplicate_if_necessary: true },
    });
}

use bindings::greyhook::filter::{
    auth as wit_auth, dns as wit_dns, log as wit_log, metrics as wit_metrics, negotiate as wit_negotiate, store as wit_store, types as wit,
};
use bindings_v01::greyhook::filter::{log as v01_log, store as v01_store, types as v01};

/// Longest store key a filter may use (before namespacing).
pub const MAX_KEY: usize = 256;
/// Largest value a filter may store.
pub const MAX_VALUE: usize = 16 * 1024;
/// Longest log line kept from a filter.
pub const MAX_LOG: usize = 1024;
/// How much of a filter's stderr is kept (for the log line of a trap).
const STDERR_KEEP: usize = 4096;

/// A clock that always says zero: filters must use the context's `now`.
struct FrozenClock;

impl HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

/// The state of one filter instance's wasmtime `Store`.
pub(crate) struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limits: StoreLimits,
    stderr: MemoryOutputPipe,
    store: Arc<dyn Store>,
    /// `namespace/`, prefixed to every key; `None` until the namespace is
    /// known (during `init` of a filter whose namespace is its name).
    prefix: Option<String>,
    /// The filter's name, for its log lines.
    pub(crate) filter: Arc<str>,
    /// The context's `now` of the call in progress: the base of TTLs.
    now: u64,
    store_calls: u32,
    max_store_calls: u32,
    /// The first store failure or limit breach of the call in progress.
    pub(crate) store_failure: Option<String>,
    /// When the call in progress (or `init`) must be over.
    pub(crate) call_deadline: Option<std::time::Instant>,
    /// Times the call in progress yielded at an epoch tick: about the
    /// milliseconds its code ran past its first few (a call that waits, for
    /// DNS or for a thread, is not counted meanwhile).
    pub(crate) yields: u32,
    dns_margin: std::time::Duration,
    /// The filter's shared write and log budgets.
    pub(crate) quota: Arc<Quota>,
    /// Log lines written in the call in progress.
    log_lines: u32,
    /// The slow-call slot this call holds (a suspect filter's calls).
    slow_held: Arc<std::sync::Mutex<Option<tokio::sync::OwnedSemaphorePermit>>>,
    /// The host's resolver (the `dns` and `auth` imports).
    pub(crate) resolver: Resolver,
    /// DNS and `auth` calls made in the call in progress.
    dns_calls: u32,
    /// The filter's metrics (the `metrics` import).
    pub(crate) metrics: Arc<FilterMetrics>,
    /// Namespaced keys of the store call in progress, kept between calls
    /// so that building them allocates nothing once warm ([`link_store`]).
    key_bufs: Vec<String>,
    /// True while `init` runs: the only time `negotiate` is listened to.
    pub(crate) in_init: bool,
    /// What the filter said through `negotiate.skip-hooks` during `init`.
    pub(crate) skip: Option<types::SkipHooks>,
    /// Whether it called `negotiate.data-for-null-sender-only` during `init`.
    pub(crate) data_null_sender_only: bool,
}

impl HostState {
    pub(crate) fn new(store: Arc<dyn Store>, namespace: Option<&str>, filter: Arc<str>, memory: usize, max_store_calls: u32) -> HostState {
        let stderr = MemoryOutputPipe::new(STDERR_KEEP);
        let wasi = WasiCtxBuilder::new()
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .wall_clock(FrozenClock)
            .monotonic_clock(FrozenClock)
            .build();
        HostState {
            wasi,
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new().memory_size(memory).instances(32).tables(64).memories(8).build(),
            stderr,
            store,
            prefix: namespace.map(|n| format!("{n}/")),
            filter,
            now: 0,
            call_deadline: None,
            yields: 0,
            dns_margin: std::time::Duration::ZERO,
            slow_held: Arc::default(),
            quota: Arc::new(Quota::new(&crate::runtime::Limits::default())),
            log_lines: 0,
            store_calls: 0,
            max_store_calls,
            store_failure: None,
            resolver: Resolver::default(),
            dns_calls: 0,
            metrics: Arc::default(),
            key_bufs: Vec::new(),
            in_init: false,
            skip: None,
            data_null_sender_only: false,
        }
    }

    /// Sets the namespace once it is known (after `init`).
    pub(crate) fn set_namespace(&mut self, namespace: &str) {
        self.prefix = Some(format!("{namespace}/"));
    }

    /// Gives back the slow-call slot, if the call took one.
    pub(crate) fn release_slow_slot(&self) {
        self.slow_held.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Readies the state for a call: `now` (the request's time), the call's
    /// `deadline` and its whole `budget` (the time from its start to the
    /// deadline), the slow-call `slot` it holds if any.
    pub(crate) fn begin_call(
        &mut self,
        now: u64,
        deadline: std::time::Instant,
        budget: std::time::Duration,
        slot: Option<tokio::sync::OwnedSemaphorePermit>,
    ) {
        self.call_deadline = Some(deadline);
        self.yields = 0;
        // A quarter of the hook's time is kept from DNS waits, so that a
        // filter told `timeout` still has time to answer (and to store).
        self.dns_margin = budget / 4;
        self.log_lines = 0;
        *self.slow_held.lock().unwrap_or_else(|p| p.into_inner()) = slot;
        self.now = now;
        self.store_calls = 0;
        self.dns_calls = 0;
        self.store_failure = None;
    }

    /// Counts a DNS or `auth` call; the time it may take: the resolver's
    /// timeout cut at what is left of the hook's deadline (less a quarter
    /// of the hook's time, so that the filter gets `timeout` and can still
    /// answer).
    fn admit_dns(&mut self) -> Result<std::time::Duration, wit_dns::DnsError> {
        self.dns_calls += 1;
        let max = self.resolver.config().max_lookups;
        if self.dns_calls > max {
            return Err(wit_dns::DnsError::Limit(format!("more than {max} DNS lookups in one hook call")));
        }
        let left = self
            .call_deadline
            .map(|d| d.saturating_duration_since(std::time::Instant::now()))
            .unwrap_or(self.resolver.config().timeout)
            .saturating_sub(self.dns_margin);
        if left.is_zero() {
            return Err(wit_dns::DnsError::Timeout);
        }
        Ok(left.min(self.resolver.config().timeout))
    }

    /// What the filter wrote to stderr (e.g. a panic message), lossy.
    pub(crate) fn stderr_text(&self) -> String {
        let b = self.stderr.contents();
        String::from_utf8_lossy(&b).trim().chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
    }

    fn fail(&mut self, msg: String) -> wit_store::StoreError {
        if self.store_failure.is_none() {
            self.store_failure = Some(msg.clone());
        }
        wit_store::StoreError::Unavailable(msg)
    }

    /// Counts a store call and checks the key; returns the namespaced key.
    fn admit(&mut self, key: &str) -> Result<String, wit_store::StoreError> {
        let mut k = String::new();
        let c = self.key_into(key, &mut k);
        self.count_key(c)?;
        Ok(k)
    }

    /// Checks a key and writes it, namespaced, into `out` (whose capacity
    /// is reused); [`Self::count_key`] counts the call and reports. Split
    /// in two so that `key` may borrow the filter's memory (which `&self`
    /// allows and `&mut self` would not).
    fn key_into(&self, key: &str, out: &mut String) -> KeyCheck {
        if key.is_empty() || key.len() > MAX_KEY {
            return KeyCheck::Length(key.len());
        }
        match &self.prefix {
            Some(p) => {
                out.clear();
                out.push_str(p);
                out.push_str(key);
                KeyCheck::Fine
            }
            None => KeyCheck::NoNamespace,
        }
    }

    /// Counts a store call against its limit, then reports the key's check.
    fn count_key(&mut self, c: KeyCheck) -> Result<(), wit_store::StoreError> {
        self.store_calls += 1;
        if self.store_calls > self.max_store_calls {
            let m = format!("more than {} store calls in one hook call", self.max_store_calls);
            self.fail(m.clone());
            return Err(wit_store::StoreError::Limit(m));
        }
        match c {
            KeyCheck::Fine => Ok(()),
            KeyCheck::Length(n) => {
                let m = format!("store key of {n} bytes (1 to {MAX_KEY} allowed)");
                self.fail(m.clone());
                Err(wit_store::StoreError::Limit(m))
            }
            KeyCheck::NoNamespace => Err(self.fail(
                "no store during init: the namespace is the filter's name, known when init returns (set `namespace` to use the store in init)"
                    .into(),
            )),
        }
    }
}

/// How a key stands before its call is counted ([`HostState::key_into`]).
#[derive(Debug, Clone, Copy)]
enum KeyCheck {
    /// Namespaced into the buffer.
    Fine,
    /// Empty or too long: its length.
    Length(usize),
    /// No namespace yet (during `init`).
    NoNamespace,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// Marker for `add_to_linker`: the host interfaces are implemented on [`HostState`] itself.
pub(crate) struct Host;

impl HasData for Host {
    type Data<'a> = &'a mut HostState;
}

impl wit::Host for HostState {}

impl HostState {
    /// What a read hands the filter: a shared store (Redis) can hold
    /// anything another writer put there, so it is held to the write limit.
    fn entry(&mut self, key: &str, e: Option<crate::store::Entry>) -> Result<Option<wit_store::Entry>, wit_store::StoreError> {
        match e {
            Some(e) if e.value.len() > MAX_VALUE => Err(self.fail(format!("stored value of {} bytes under {key}", e.value.len()))),
            e => Ok(e.map(|e| wit_store::Entry { value: e.value, version: e.version })),
        }
    }

    /// Checks a write against the limits and budgets; the namespaced key
    /// and whether it may create a record.
    fn admit_write(&mut self, key: &str, value: &[u8], if_version: Option<u64>) -> Result<(String, bool), wit_store::StoreError> {
        let mut k = String::new();
        let c = self.key_into(key, &mut k);
        let creating = self.admit_write_checked(c, k.len(), value.len(), if_version)?;
        Ok((k, creating))
    }

    /// [`Self::admit_write`] after [`Self::key_into`]: a value of `len`
    /// bytes under a namespaced key of `key_len` bytes.
    fn admit_write_checked(
        &mut self,
        c: KeyCheck,
        key_len: usize,
        len: usize,
        if_version: Option<u64>,
    ) -> Result<bool, wit_store::StoreError> {
        self.count_key(c)?;
        if len > MAX_VALUE {
            let m = format!("store value of {len} bytes (at most {MAX_VALUE})");
            self.fail(m.clone());
            return Err(wit_store::StoreError::Limit(m));
        }
        let cost = (key_len + len) as u64;
        if !self.quota.writes.take(cost) {
            let m = format!("write budget of {} bytes a minute spent", self.quota.writes.per_minute());
            self.fail(m.clone());
            return Err(wit_store::StoreError::Limit(m));
        }
        // A write that may create a record (not a compare-and-swap on an
        // existing version) counts against the record budget.
        let creating = !matches!(if_version, Some(v) if v > 0);
        if creating && self.quota.records_full() {
            let m = format!("record budget of {} records spent", self.quota.max_records);
            self.fail(m.clone());
            return Err(wit_store::StoreError::Limit(m));
        }
        Ok(creating)
    }

    fn written(
        &mut self,
        creating: bool,
        r: Result<WriteOutcome, crate::store::StoreError>,
    ) -> Result<wit_store::WriteOutcome, wit_store::StoreError> {
        match r {
            Ok(WriteOutcome::Written(v)) => {
                if creating {
                    self.quota.records.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(wit_store::WriteOutcome::Written(v))
            }
            Ok(WriteOutcome::Conflict) => Ok(wit_store::WriteOutcome::Conflict),
            Err(e) => Err(self.fail(e.to_string())),
        }
    }
}

// For a 0.2 filter, `get`, `get_many` and `set` are shadowed at run time
// by `link_store` (which reads keys and values in place); `get` and `set`
// still serve 0.1.0 filters, and the generated linker needs them all.
impl wit_store::Host for HostState {
    async fn get(&mut self, key: String) -> wasmtime::Result<Result<Option<wit_store::Entry>, wit_store::StoreError>> {
        let key = match self.admit(&key) {
            Ok(k) => k,
            Err(e) => return Ok(Err(e)),
        };
        Ok(match self.store.get(&key, self.now).await {
            Ok(e) => self.entry(&key, e),
            Err(e) => Err(self.fail(e.to_string())),
        })
    }

    async fn get_many(&mut self, keys: Vec<String>) -> wasmtime::Result<Result<Vec<Option<wit_store::Entry>>, wit_store::StoreError>> {
        let mut full = Vec::with_capacity(keys.len());
        for k in &keys {
            match self.admit(k) {
                Ok(k) => full.push(k),
                Err(e) => return Ok(Err(e)),
            }
        }
        let entries = match self.store.get_many(&full, self.now).await {
            Ok(e) => e,
            Err(e) => return Ok(Err(self.fail(e.to_string()))),
        };
        let mut out = Vec::with_capacity(entries.len());
        for (k, e) in full.iter().zip(entries) {
            match self.entry(k, e) {
                Ok(e) => out.push(e),
                Err(e) => return Ok(Err(e)),
            }
        }
        Ok(Ok(out))
    }

    async fn set_many(
        &mut self,
        writes: Vec<wit_store::Write>,
    ) -> wasmtime::Result<Result<Vec<wit_store::WriteOutcome>, wit_store::StoreError>> {
        let mut batch = Vec::with_capacity(writes.len());
        let mut creating = Vec::with_capacity(writes.len());
        for wit_store::Write { key, value, ttl_seconds, if_version } in writes {
            let (key, c) = match self.admit_write(&key, &value, if_version) {
                Ok(k) => k,
                Err(e) => return Ok(Err(e)),
            };
            let expires_at = self.now.saturating_add(u64::from(ttl_seconds.clamp(1, self.quota.max_ttl)));
            creating.push(c);
            batch.push(crate::store::Write { key, value, expires_at, cond: Condition::from_wit(if_version) });
        }
        let outcomes = match self.store.set_many(&batch, self.now).await {
            Ok(o) => o,
            Err(e) => return Ok(Err(self.fail(e.to_string()))),
        };
        let mut out = Vec::with_capacity(outcomes.len());
        for (c, o) in creating.into_iter().zip(outcomes) {
            match self.written(c, Ok(o)) {
                Ok(o) => out.push(o),
                Err(e) => return Ok(Err(e)),
            }
        }
        Ok(Ok(out))
    }

    async fn set(
        &mut self,
        key: String,
        value: Vec<u8>,
        ttl: u32,
        if_version: Option<u64>,
    ) -> wasmtime::Result<Result<wit_store::WriteOutcome, wit_store::StoreError>> {
        let (key, creating) = match self.admit_write(&key, &value, if_version) {
            Ok(k) => k,
            Err(e) => return Ok(Err(e)),
        };
        let ttl = ttl.clamp(1, self.quota.max_ttl);
        let expires_at = self.now.saturating_add(u64::from(ttl));
        let r = self.store.set(&key, &value, expires_at, Condition::from_wit(if_version), self.now).await;
        Ok(self.written(creating, r))
    }

    async fn delete(&mut self, key: String, if_version: Option<u64>) -> wasmtime::Result<Result<bool, wit_store::StoreError>> {
        let key = match self.admit(&key) {
            Ok(k) => k,
            Err(e) => return Ok(Err(e)),
        };
        Ok(match self.store.delete(&key, Condition::from_wit(if_version), self.now).await {
            Ok(b) => Ok(b),
            Err(e) => Err(self.fail(e.to_string())),
        })
    }
}

impl wit_log::Host for HostState {
    async fn write(&mut self, level: wit_log::Level, message: String) -> wasmtime::Result<()> {
        let enabled = match level {
            wit_log::Level::Debug => tracing::enabled!(target: "greyhook::filter", tracing::Level::DEBUG),
            wit_log::Level::Info => tracing::enabled!(target: "greyhook::filter", tracing::Level::INFO),
            wit_log::Level::Warn => tracing::enabled!(target: "greyhook::filter", tracing::Level::WARN),
            wit_log::Level::Error => tracing::enabled!(target: "greyhook::filter", tracing::Level::ERROR),
        };
        if !enabled {
            return Ok(());
        }
        // A flood of lines (one call logged 10,005) is cut: per call, and
        // per filter per second; what is dropped is counted in one line.
        self.log_lines += 1;
        if self.log_lines > self.quota.log_per_call || !self.quota.logs.take(1) {
            let dropped = self.quota.logs_dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            if dropped.is_power_of_two() {
                tracing::warn!(target: "greyhook::filter", filter = &*self.filter, "filter log lines over the limit: {dropped} dropped so far");
            }
            return Ok(());
        }
        let msg: String = message.chars().take(MAX_LOG).map(|c| if c.is_control() { ' ' } else { c }).collect();
        let filter = &*self.filter;
        match level {
            wit_log::Level::Debug => tracing::debug!(target: "greyhook::filter", filter, "{msg}"),
            wit_log::Level::Info => tracing::info!(target: "greyhook::filter", filter, "{msg}"),
            wit_log::Level::Warn => tracing::warn!(target: "greyhook::filter", filter, "{msg}"),
            wit_log::Level::Error => tracing::error!(target: "greyhook::filter", filter, "{msg}"),
        }
        Ok(())
    }
}

fn ip_from_wit(a: wit::IpAddress) -> IpAddr {
    match a {
        wit::IpAddress::Ipv4((a, b, c, d)) => IpAddr::from([a, b, c, d]),
        wit::IpAddress::Ipv6((a, b, c, d, e, f, g, h)) => IpAddr::from([a, b, c, d, e, f, g, h]),
    }
}

fn dns_error(e: dns::DnsError) -> wit_dns::DnsError {
    match e {
        dns::DnsError::NxDomain => wit_dns::DnsError::Nxdomain,
        dns::DnsError::NoData => wit_dns::DnsError::NoData,
        dns::DnsError::Timeout => wit_dns::DnsError::Timeout,
        dns::DnsError::ServFail(m) => wit_dns::DnsError::Servfail(m),
        dns::DnsError::Limit(m) => wit_dns::DnsError::Limit(m),
    }
}

/// Runs a resolver call within `time`; past it, `timeout` for the filter
/// while the lookup finishes on its own and fills the cache for the retry
/// ([`dns::Resolver::finish_detached`]).
fn within<T, F>(r: &dns::Resolver, time: std::time::Duration, f: F) -> impl Future<Output = Result<T, wit_dns::DnsError>> + '_
where
    T: Send + 'static,
    F: Future<Output = Result<T, dns::DnsError>> + Send + 'static,
{
    use futures::FutureExt;
    // Not an `async fn`: its state would hold `f` by value until the first
    // poll; `finish_detached` boxes it as it is called.
    r.finish_detached(time, f).map(|r| r.map_err(dns_error))
}

impl wit_dns::Host for HostState {
    async fn lookup(&mut self, name: String, kind: wit_dns::RecordType) -> wasmtime::Result<Result<Vec<String>, wit_dns::DnsError>> {
        let time = match self.admit_dns() {
            Ok(t) => t,
            Err(e) => return Ok(Err(e)),
        };
        let kind = match kind {
            wit_dns::RecordType::A => dns::RecordType::A,
            wit_dns::RecordType::Aaaa => dns::RecordType::Aaaa,
            wit_dns::RecordType::Mx => dns::RecordType::Mx,
            wit_dns::RecordType::Txt => dns::RecordType::Txt,
            wit_dns::RecordType::Ptr => dns::RecordType::Ptr,
        };
        let r = self.resolver.clone();
        Ok(within(&self.resolver, time, async move { r.lookup(&name, kind).await }).await)
    }

    async fn reverse(&mut self, address: wit::IpAddress) -> wasmtime::Result<Result<Vec<String>, wit_dns::DnsError>> {
        let time = match self.admit_dns() {
            Ok(t) => t,
            Err(e) => return Ok(Err(e)),
        };
        let (r, ip) = (self.resolver.clone(), ip_from_wit(address));
        Ok(within(&self.resolver, time, async move { r.reverse(ip).await }).await)
    }
}

impl wit_auth::Host for HostState {
    async fn spf(
        &mut self,
        address: wit::IpAddress,
        helo: String,
        sender: String,
    ) -> wasmtime::Result<Result<wit_auth::SpfOutcome, wit_dns::DnsError>> {
        let time = match self.admit_dns() {
            Ok(t) => t,
            Err(e) => return Ok(Err(e)),
        };
        let (r, ip) = (self.resolver.clone(), ip_from_wit(address));
        let out = match within(&self.resolver, time, async move { Ok(r.spf(ip, &helo, &sender).await) }).await {
            Ok(o) => o,
            Err(e) => return Ok(Err(e)),
        };
        let result = match out.result {
            dns::SpfResult::Pass => wit_auth::SpfResult::Pass,
            dns::SpfResult::Fail => wit_auth::SpfResult::Fail,
            dns::SpfResult::SoftFail => wit_auth::SpfResult::Softfail,
            dns::SpfResult::Neutral => wit_auth::SpfResult::Neutral,
            dns::SpfResult::None => wit_auth::SpfResult::None,
            dns::SpfResult::TempError => wit_auth::SpfResult::Temperror,
            dns::SpfResult::PermError => wit_auth::SpfResult::Permerror,
        };
        Ok(Ok(wit_auth::SpfOutcome { result, domain: out.domain }))
    }

    async fn forward_confirmed_name(&mut self, address: wit::IpAddress) -> wasmtime::Result<Result<Option<String>, wit_dns::DnsError>> {
        let time = match self.admit_dns() {
            Ok(t) => t,
            Err(e) => return Ok(Err(e)),
        };
        let (r, ip) = (self.resolver.clone(), ip_from_wit(address));
        Ok(within(&self.resolver, time, async move { r.forward_confirmed(ip).await }).await)
    }
}

impl wit_metrics::Host for HostState {
    // Shadowed at run time by `link_metrics` (which reads the strings in
    // place); kept, and correct, because the generated linker needs it.
    async fn counter_add(&mut self, name: String, labels: Vec<(String, String)>, value: u64) -> wasmtime::Result<()> {
        let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        self.metrics.counter_add(&name, &labels, value);
        Ok(())
    }

    async fn histogram_observe(&mut self, name: String, labels: Vec<(String, String)>, value: f64) -> wasmtime::Result<()> {
        let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        self.metrics.observe(&name, &labels, value);
        Ok(())
    }

    async fn counter(&mut self, name: String, labels: Vec<(String, String)>) -> wasmtime::Result<Option<u32>> {
        let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Ok(self.metrics.define(MetricKind::Counter, &name, &labels))
    }

    async fn histogram(&mut self, name: String, labels: Vec<(String, String)>) -> wasmtime::Result<Option<u32>> {
        let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Ok(self.metrics.define(MetricKind::Histogram, &name, &labels))
    }

    async fn add(&mut self, series: u32, value: u64) -> wasmtime::Result<()> {
        self.metrics.add(series, value);
        Ok(())
    }

    async fn observe(&mut self, series: u32, value: f64) -> wasmtime::Result<()> {
        self.metrics.observe_by(series, value);
        Ok(())
    }
}

impl wit_negotiate::Host for HostState {
    async fn skip_hooks(&mut self, skip: wit_negotiate::HookSet, ehlo_keywords: Vec<String>) -> wasmtime::Result<()> {
        // Outside `init` the filter is already running as loaded: ignored,
        // as the contract says. The keywords are checked when the filter
        // loads (`engine`), where a bad one can name the problem.
        if self.in_init {
            self.skip = Some(skip_from_wit(skip, ehlo_keywords));
        }
        Ok(())
    }

    async fn data_for_null_sender_only(&mut self) -> wasmtime::Result<()> {
        // Ignored outside `init`, as `skip-hooks` is.
        if self.in_init {
            self.data_null_sender_only = true;
        }
        Ok(())
    }
}

/// The phases of a `hook-set`, in order, with the EHLO keywords (kept only
/// when EHLO is skipped).
fn skip_from_wit(set: wit_negotiate::HookSet, ehlo_keywords: Vec<String>) -> types::SkipHooks {
    use wit_negotiate::HookSet;
    let phases: Vec<types::Phase> = [
        (HookSet::CONNECT, types::Phase::Connect),
        (HookSet::EHLO, types::Phase::Ehlo),
        (HookSet::MAIL, types::Phase::Mail),
        (HookSet::RCPT, types::Phase::Rcpt),
        (HookSet::DATA, types::Phase::Data),
    ]
    .into_iter()
    .filter(|(flag, _)| set.contains(*flag))
    .map(|(_, phase)| phase)
    .collect();
    let ehlo_keywords = if phases.contains(&types::Phase::Ehlo) { ehlo_keywords } else { Vec::new() };
    types::SkipHooks { phases, ehlo_keywords, data_null_sender_only: false }
}

/// A metric's labels as the filter passed them, still in its memory.
type WasmLabels = WasmList<(WasmStr, WasmStr)>;

/// Defines the `metrics` import by hand, over the generated one: the name
/// and labels are read in place from the filter's memory (checked UTF-8,
/// no copy), where the generated code copies each into a `String` and the
/// labels into a vector: five allocations on a call that, for a known
/// series, needs none. Synchronous: an update is a short lock.
pub(crate) fn link_metrics(linker: &mut wasmtime::component::Linker<HostState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut m = linker.instance("greyhook:filter/metrics@0.2.3")?;
    m.func_wrap("counter-add", |mut store: StoreContextMut<'_, HostState>, (name, labels, value): (WasmStr, WasmLabels, u64)| {
        with_labels(&mut store, &name, &labels, |metrics, name, labels| metrics.counter_add(name, labels, value))
    })?;
    m.func_wrap("histogram-observe", |mut store: StoreContextMut<'_, HostState>, (name, labels, value): (WasmStr, WasmLabels, f64)| {
        with_labels(&mut store, &name, &labels, |metrics, name, labels| metrics.observe(name, labels, value))
    })?;
    // Handles (0.2.1): asked for as updates by name are made (in place,
    // the labels counted before any is read), then updated with two
    // integers, nothing to read or check but the handle (the generated
    // path would enter an async call for each).
    for (func, kind) in [("counter", MetricKind::Counter), ("histogram", MetricKind::Histogram)] {
        m.func_wrap(func, move |mut store: StoreContextMut<'_, HostState>, (name, labels): (WasmStr, WasmLabels)| {
            let mut handle = None;
            with_labels(&mut store, &name, &labels, |metrics, name, labels| handle = metrics.define(kind, name, labels))?;
            Ok((handle,))
        })?;
    }
    m.func_wrap("add", |store: StoreContextMut<'_, HostState>, (series, value): (u32, u64)| {
        store.data().metrics.add(series, value);
        Ok(())
    })?;
    m.func_wrap("observe", |store: StoreContextMut<'_, HostState>, (series, value): (u32, f64)| {
        store.data().metrics.observe_by(series, value);
        Ok(())
    })?;
    linker.allow_shadowing(false);
    Ok(())
}

/// Defines the hot store calls (`get`, `get-many`, `set`) by hand, over the
/// generated ones: keys and values are read in place from the filter's
/// memory (checked UTF-8) where the generated code copies each into a
/// `String` or `Vec`, and the namespaced keys are written into buffers the
/// instance keeps ([`HostState::key_into`]). The checks, budgets and
/// failures are those of the generated path (`delete` and `set-many` still
/// take it), through the same helpers.
pub(crate) fn link_store(linker: &mut wasmtime::component::Linker<HostState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut m = linker.instance("greyhook:filter/store@0.2.3")?;
    m.func_wrap_async("get", |mut store: StoreContextMut<'_, HostState>, (key,): (WasmStr,)| {
        Box::new(async move {
            let mut bufs = take_key_bufs(&mut store, 1);
            let r = match admit_keys(&mut store, std::iter::once(Ok(key)), &mut bufs) {
                Ok(()) => {
                    let (st, now) = (store.data().store.clone(), store.data().now);
                    Ok(match st.get(&bufs[0], now).await {
                        Ok(e) => store.data_mut().entry(&bufs[0], e),
                        Err(e) => Err(store.data_mut().fail(e.to_string())),
                    })
                }
                Err(e) => e.map(Err),
            };
            put_key_bufs(&mut store, bufs);
            Ok((r?,))
        })
    })?;
    m.func_wrap_async("get-many", |mut store: StoreContextMut<'_, HostState>, (keys,): (WasmList<WasmStr>,)| {
        Box::new(async move {
            // Every key counts as a store call: past the limit the call
            // fails, so no more keys than that are read (or buffered).
            let n = keys.len().min(store.data().max_store_calls as usize + 1);
            let mut bufs = take_key_bufs(&mut store, n);
            // Inline for a filter's usual handful of keys: no allocation.
            let handles: smallvec::SmallVec<[wasmtime::Result<WasmStr>; 8]> = keys.iter(store.as_context_mut())?.take(n).collect();
            let r = match admit_keys(&mut store, handles, &mut bufs) {
                Ok(()) => {
                    let (st, now) = (store.data().store.clone(), store.data().now);
                    Ok(match st.get_many(&bufs[..n], now).await {
                        Ok(entries) => {
                            let h = store.data_mut();
                            // Sized at once: collected through `Result`, the
                            // vector grew from nothing (a reallocation at the
                            // fifth key, ~550 instructions a decision).
                            let mut out = Vec::with_capacity(n);
                            bufs[..n].iter().zip(entries).try_for_each(|(k, e)| h.entry(k, e).map(|e| out.push(e))).map(|()| out)
                        }
                        Err(e) => Err(store.data_mut().fail(e.to_string())),
                    })
                }
                Err(e) => e.map(Err),
            };
            put_key_bufs(&mut store, bufs);
            Ok((r?,))
        })
    })?;
    m.func_wrap_async(
        "set",
        |mut store: StoreContextMut<'_, HostState>, (key, value, ttl, if_version): (WasmStr, WasmList<u8>, u32, Option<u64>)| {
            Box::new(async move {
                let mut bufs = take_key_bufs(&mut store, 1);
                let c = store.data().key_into(&key.to_str(&store)?, &mut bufs[0]);
                let admitted = store.data_mut().admit_write_checked(c, bufs[0].len(), value.len(), if_version);
                let r = match admitted {
                    Ok(creating) => {
                        let (st, now, max_ttl) = (store.data().store.clone(), store.data().now, store.data().quota.max_ttl);
                        let expires_at = now.saturating_add(u64::from(ttl.clamp(1, max_ttl)));
                        let w = st.set(&bufs[0], value.as_le_slice(&store), expires_at, Condition::from_wit(if_version), now).await;
                        store.data_mut().written(creating, w)
                    }
                    Err(e) => Err(e),
                };
                put_key_bufs(&mut store, bufs);
                Ok((r,))
            })
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// Key buffers an instance keeps between calls (a call with more keys,
/// up to the store-call limit, uses more, and the extra are dropped after).
const KEEP_KEY_BUFS: usize = 16;

/// The instance's key buffers, at least `n` of them (taken out of the
/// state while the call uses the first `n`; put back after by
/// [`put_key_bufs`], so that their capacity serves the next call).
fn take_key_bufs(store: &mut StoreContextMut<'_, HostState>, n: usize) -> Vec<String> {
    let mut bufs = std::mem::take(&mut store.data_mut().key_bufs);
    if bufs.len() < n {
        bufs.resize_with(n, String::new);
    }
    bufs
}

/// Gives the key buffers back to the instance, at most [`KEEP_KEY_BUFS`].
fn put_key_bufs(store: &mut StoreContextMut<'_, HostState>, mut bufs: Vec<String>) {
    bufs.truncate(KEEP_KEY_BUFS);
    store.data_mut().key_bufs = bufs;
}

/// Reads each key from the filter's memory and admits it into `bufs`
/// ([`HostState::key_into`], [`HostState::count_key`]). `Err(Ok(e))`: a store error the filter is
/// answered; `Err(Err(e))`: a string that is not UTF-8 (a trap, as for
/// every string a filter passes).
fn admit_keys(
    store: &mut StoreContextMut<'_, HostState>,
    keys: impl IntoIterator<Item = wasmtime::Result<WasmStr>>,
    bufs: &mut [String],
) -> Result<(), wasmtime::Result<wit_store::StoreError>> {
    for (k, out) in keys.into_iter().zip(bufs.iter_mut()) {
        let k = k.map_err(Err)?;
        let c = store.data().key_into(&k.to_str(&*store).map_err(Err)?, out);
        store.data_mut().count_key(c).map_err(Ok)?;
    }
    Ok(())
}

/// Calls `f` with the filter's metrics, and the name and labels as `&str`s
/// borrowed from the filter's memory. More labels than a series may have
/// is counted as dropped without reading them; invalid UTF-8 traps, as it
/// does for every string a filter passes.
fn with_labels(
    store: &mut StoreContextMut<'_, HostState>,
    name: &WasmStr,
    labels: &WasmLabels,
    f: impl FnOnce(&FilterMetrics, &str, &[(&str, &str)]),
) -> wasmtime::Result<()> {
    use crate::runtime::metrics::MAX_LABELS;
    use wasmtime::AsContext;
    let n = labels.len();
    if n > MAX_LABELS {
        store.data().metrics.count_dropped();
        return Ok(());
    }
    let mut handles: [Option<(WasmStr, WasmStr)>; MAX_LABELS] = Default::default();
    for (slot, l) in handles.iter_mut().zip(labels.iter(store.as_context_mut())?) {
        *slot = Some(l?);
    }
    let store = store.as_context();
    let name = name.to_str(&store)?;
    let mut strs: [(std::borrow::Cow<'_, str>, std::borrow::Cow<'_, str>); MAX_LABELS] = Default::default();
    for (slot, (k, v)) in strs.iter_mut().zip(handles.iter().flatten()) {
        *slot = (k.to_str(&store)?, v.to_str(&store)?);
    }
    let mut refs = [("", ""); MAX_LABELS];
    for (r, (k, v)) in refs.iter_mut().zip(&strs) {
        *r = (k.as_ref(), v.as_ref());
    }
    f(&store.data().metrics, &name, &refs[..n]);
    Ok(())
}

// ---- greyhook:filter@0.1.0: the same store and log behind the old types ----

impl v01::Host for HostState {}

fn v01_store_error(e: wit_store::StoreError) -> v01_store::StoreError {
    match e {
        wit_store::StoreError::Unavailable(m) => v01_store::StoreError::Unavailable(m),
        wit_store::StoreError::Limit(m) => v01_store::StoreError::Limit(m),
    }
}

impl v01_store::Host for HostState {
    async fn get(&mut self, key: String) -> wasmtime::Result<Result<Option<v01_store::Entry>, v01_store::StoreError>> {
        let r = wit_store::Host::get(self, key).await?;
        Ok(r.map(|e| e.map(|wit_store::Entry { value, version }| v01_store::Entry { value, version })).map_err(v01_store_error))
    }

    async fn set(
        &mut self,
        key: String,
        value: Vec<u8>,
        ttl: u32,
        if_version: Option<u64>,
    ) -> wasmtime::Result<Result<v01_store::WriteOutcome, v01_store::StoreError>> {
        let r = wit_store::Host::set(self, key, value, ttl, if_version).await?;
        Ok(r.map(|o| match o {
            wit_store::WriteOutcome::Written(v) => v01_store::WriteOutcome::Written(v),
            wit_store::WriteOutcome::Conflict => v01_store::WriteOutcome::Conflict,
        })
        .map_err(v01_store_error))
    }

    async fn delete(&mut self, key: String, if_version: Option<u64>) -> wasmtime::Result<Result<bool, v01_store::StoreError>> {
        Ok(wit_store::Host::delete(self, key, if_version).await?.map_err(v01_store_error))
    }
}

impl v01_log::Host for HostState {
    async fn write(&mut self, level: v01_log::Level, message: String) -> wasmtime::Result<()> {
        let level = match level {
            v01_log::Level::Debug => wit_log::Level::Debug,
            v01_log::Level::Info => wit_log::Level::Info,
            v01_log::Level::Warn => wit_log::Level::Warn,
            v01_log::Level::Error => wit_log::Level::Error,
        };
        wit_log::Host::write(self, level, message).await
    }
}

/// A token bucket: `rate` a second, holding at most `burst`.
#[derive(Debug)]
pub(crate) struct Bucket {
    rate: f64,
    burst: f64,
    state: std::sync::Mutex<(f64, std::time::Instant)>,
}

impl Bucket {
    fn new(rate: f64, burst: f64) -> Bucket {
        Bucket { rate, burst, state: std::sync::Mutex::new((burst, std::time::Instant::now())) }
    }

    /// Takes `n` tokens if there are that many.
    pub(crate) fn take(&self, n: u64) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * self.rate).min(self.burst);
        s.1 = now;
        if s.0 >= n as f64 {
            s.0 -= n as f64;
            true
        } else {
            false
        }
    }

    fn per_minute(&self) -> u64 {
        (self.rate * 60.0) as u64
    }
}

/// What all instances of one filter may write and log (see
/// [`crate::runtime::Limits`]).
#[derive(Debug)]
pub(crate) struct Quota {
    writes: Bucket,
    logs: Bucket,
    log_per_call: u32,
    logs_dropped: std::sync::atomic::AtomicU64,
    max_ttl: u32,
    /// The record budget, and the filter's records: counted in the store
    /// every minute where the store can count ([`Store::count_prefix`]),
    /// plus the records created since. Not enforced before a first count.
    pub(crate) max_records: u64,
    pub(crate) records: std::sync::atomic::AtomicU64,
    counted: std::sync::atomic::AtomicBool,
    /// When the last count was started (ms since `born`), or `u64::MAX` for never.
    count_started: std::sync::atomic::AtomicU64,
    born: std::time::Instant,
}

impl Quota {
    pub(crate) fn new(l: &crate::runtime::Limits) -> Quota {
        let per_sec = l.write_bytes_per_minute as f64 / 60.0;
        let logs = f64::from(l.log_lines_per_second.max(1));
        Quota {
            // A minute's worth at once at most.
            writes: Bucket::new(per_sec, l.write_bytes_per_minute as f64),
            logs: Bucket::new(logs, logs),
            log_per_call: (l.log_lines_per_second / 10).max(1),
            logs_dropped: std::sync::atomic::AtomicU64::new(0),
            max_ttl: l.max_ttl.max(1),
            max_records: l.max_records,
            records: std::sync::atomic::AtomicU64::new(0),
            counted: std::sync::atomic::AtomicBool::new(false),
            count_started: std::sync::atomic::AtomicU64::new(u64::MAX),
            born: std::time::Instant::now(),
        }
    }

    fn records_full(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.counted.load(Relaxed) && self.records.load(Relaxed) >= self.max_records
    }

    /// Counts the filter's records in the store if the last count is a
    /// minute old (or there was none), in the background. `at`: the
    /// monotonic time of the call (read once a call by the caller).
    pub(crate) fn recount_if_due(self: &Arc<Self>, store: &Arc<dyn Store>, namespace: &str, now: u64, at: std::time::Instant) {
        use std::sync::atomic::Ordering::Relaxed;
        let ms = at.saturating_duration_since(self.born).as_millis() as u64;
        let last = self.count_started.load(Relaxed);
        if last != u64::MAX && ms.saturating_sub(last) < 60_000 {
            return;
        }
        if self.count_started.compare_exchange(last, ms, Relaxed, Relaxed).is_err() {
            return;
        }
        // Built only when due: this check runs at every hook call.
        let prefix = format!("{namespace}/");
        // A weak reference: a count not yet run must not keep a store (and
        // its file lock) alive after its filter is gone.
        let (quota, store) = (self.clone(), Arc::downgrade(store));
        tokio::spawn(async move {
            let Some(store) = store.upgrade() else { return };
            match store.count_prefix(&prefix, now).await {
                Ok(Some(n)) => {
                    quota.records.store(n, Relaxed);
                    quota.counted.store(true, Relaxed);
                }
                Ok(None) => {}
                Err(e) => tracing::debug!("counting the filter's records failed: {e}"),
            }
        });
    }
}

// ---- conversions between crate::domain::types and the WIT types ----
// Both sides have the WIT's names (`greyhook-types`). Every record is taken
// apart whole and built whole (no `..`): a field added to either side stops
// these compiling until it is carried.

/// The client address as the contract has it (an IPv4-mapped IPv6 address
/// as IPv4).
fn ip_to_wit(ip: &IpAddr) -> wit::IpAddress {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            wit::IpAddress::Ipv4((o[0], o[1], o[2], o[3]))
        }
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => {
                let o = v4.octets();
                wit::IpAddress::Ipv4((o[0], o[1], o[2], o[3]))
            }
            None => {
                let g = a.segments();
                wit::IpAddress::Ipv6((g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]))
            }
        },
    }
}

/// The accepted recipients, borrowed, for [`context_to_wit`].
pub(crate) fn recipients_to_wit(c: &types::Context) -> Vec<wit::AcceptedRecipient<'_>> {
    c.transaction
        .recipients
        .iter()
        .map(|types::AcceptedRecipient { address, policy_group }| wit::AcceptedRecipient { address, policy_group })
        .collect()
}

/// The context as the hook's argument, borrowed from `c` (nothing is
/// copied until wasmtime writes it into the filter's memory).
pub(crate) fn context_to_wit<'a>(c: &'a types::Context, recipients: &'a [wit::AcceptedRecipient<'a>]) -> wit::Context<'a> {
    let types::Context { session, transaction, now } = c;
    let types::Session { id, client_address, client_name, reverse_client_name, helo, auth_user, tls } = session;
    let types::Transaction { sender, recipients: _ } = transaction;
    wit::Context {
        session: wit::Session {
            id,
            client_address: ip_to_wit(client_address),
            client_name: client_name.as_deref(),
            reverse_client_name: reverse_client_name.as_deref(),
            helo: helo.as_deref(),
            auth_user: auth_user.as_deref(),
            tls: *tls,
        },
        transaction: wit::Transaction { sender: sender.as_deref(), recipients },
        now: *now,
    }
}

/// The message's headers, borrowed, for [`message_to_wit`]: the bounded
/// view every filter is handed ([`crate::domain::message`]).
pub(crate) fn headers_to_wit(m: &types::Message) -> Vec<wit::HeaderParam<'_>> {
    bounded_headers(&m.headers).map(|(name, value)| wit::HeaderParam { name, value }).collect()
}

/// The message as the DATA hook's argument, borrowed from `m`.
pub(crate) fn message_to_wit<'a>(m: &'a types::Message, headers: &'a [wit::HeaderParam<'a>]) -> wit::Message<'a> {
    let types::Message { message_id, headers: _ } = m;
    wit::Message { message_id: message_id.as_deref().map(|id| cut(id, MAX_MESSAGE_ID)), headers }
}

fn reply_from_wit(r: wit::Reply) -> types::Reply {
    let wit::Reply { code, enhanced, text, retry_after } = r;
    types::Reply { code, enhanced, text, retry_after }
}

pub(crate) fn verdict_from_wit(v: wit::Verdict) -> types::Verdict {
    let wit::Verdict { decision, add_headers, policy_group } = v;
    types::Verdict {
        decision: match decision {
            wit::Decision::Continue => types::Decision::Continue,
            wit::Decision::Accept => types::Decision::Accept,
            wit::Decision::Tempfail(r) => types::Decision::Tempfail(reply_from_wit(r)),
            wit::Decision::Reject(r) => types::Decision::Reject(reply_from_wit(r)),
        },
        add_headers: add_headers.into_iter().map(|wit::HeaderResult { name, value }| types::Header { name, value }).collect(),
        policy_group,
    }
}

pub(crate) fn ehlo_from_wit(v: wit::EhloVerdict) -> types::EhloVerdict {
    let wit::EhloVerdict { verdict, keywords } = v;
    types::EhloVerdict { verdict: verdict_from_wit(verdict), keywords }
}

// ---- 0.1.0 conversions: the 0.2.0 records less what 0.1.0 lacks ----

/// The accepted recipients, borrowed, for [`context_to_v01`].
pub(crate) fn recipients_to_v01(c: &types::Context) -> Vec<v01::AcceptedRecipient<'_>> {
    c.transaction
        .recipients
        .iter()
        .map(|types::AcceptedRecipient { address, policy_group }| v01::AcceptedRecipient { address, policy_group })
        .collect()
}

/// [`context_to_wit`] for a 0.1.0 filter (which has no reverse client name).
pub(crate) fn context_to_v01<'a>(c: &'a types::Context, recipients: &'a [v01::AcceptedRecipient<'a>]) -> v01::Context<'a> {
    let types::Context { session, transaction, now } = c;
    let types::Session { id, client_address, client_name, reverse_client_name: _, helo, auth_user, tls } = session;
    let client_address = match ip_to_wit(client_address) {
        wit::IpAddress::Ipv4(a) => v01::IpAddress::Ipv4(a),
        wit::IpAddress::Ipv6(a) => v01::IpAddress::Ipv6(a),
    };
    let types::Transaction { sender, recipients: _ } = transaction;
    v01::Context {
        session: v01::Session {
            id,
            client_address,
            client_name: client_name.as_deref(),
            helo: helo.as_deref(),
            auth_user: auth_user.as_deref(),
            tls: *tls,
        },
        transaction: v01::Transaction { sender: sender.as_deref(), recipients },
        now: *now,
    }
}

/// [`headers_to_wit`] for a 0.1.0 filter.
pub(crate) fn headers_to_v01(m: &types::Message) -> Vec<v01::HeaderParam<'_>> {
    bounded_headers(&m.headers).map(|(name, value)| v01::HeaderParam { name, value }).collect()
}

/// [`message_to_wit`] for a 0.1.0 filter.
pub(crate) fn message_to_v01<'a>(m: &'a types::Message, headers: &'a [v01::HeaderParam<'a>]) -> v01::Message<'a> {
    let types::Message { message_id, headers: _ } = m;
    v01::Message { message_id: message_id.as_deref().map(|id| cut(id, MAX_MESSAGE_ID)), headers }
}

fn reply_from_v01(r: v01::Reply) -> types::Reply {
    let v01::Reply { code, enhanced, text, retry_after } = r;
    types::Reply { code, enhanced, text, retry_after }
}

pub(crate) fn verdict_from_v01(v: v01::Verdict) -> types::Verdict {
    let v01::Verdict { decision, add_headers, policy_group } = v;
    types::Verdict {
        decision: match decision {
            v01::Decision::Continue => types::Decision::Continue,
            v01::Decision::Accept => types::Decision::Accept,
            v01::Decision::Tempfail(r) => types::Decision::Tempfail(reply_from_v01(r)),
            v01::Decision::Reject(r) => types::Decision::Reject(reply_from_v01(r)),
        },
        add_headers: add_headers.into_iter().map(|v01::HeaderResult { name, value }| types::Header { name, value }).collect(),
        policy_group,
    }
}

pub(crate) fn ehlo_from_v01(v: v01::EhloVerdict) -> types::EhloVerdict {
    let v01::EhloVerdict { verdict, keywords } = v;
    types::EhloVerdict { verdict: verdict_from_v01(verdict), keywords }
}
