//! The component glue behind [`crate::export!`]: the bindings of the
//! vendored WIT, the host's imports as a [`Host`], and the conversions
//! between the WIT records and [`greyhook_types`]. Not for direct use.

use std::any::Any;
use std::cell::RefCell;
use std::net::IpAddr;

use crate::host::{self, DnsError, Entry, Host, Level, RecordType, SpfOutcome, SpfResult, StoreError, Write, WriteOutcome};
use crate::{Filter, Verdict};

/// The bindings of `wit/greyhook.wit` (`greyhook:filter@0.2.3`).
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "filter",
        pub_export_macro: true,
        export_macro_name: "__greyhook_export",
        default_bindings_module: "greyhook_filter::wasm::bindings",
        // Imports take borrowed arguments (`&[&str]` keys, `&[(&str, &str)]`
        // labels): a store or metrics call copies nothing before crossing.
        ownership: Borrowing { duplicate_if_necessary: true },
    });
}

use bindings::exports::greyhook::filter::hooks as wit_hooks;
use bindings::greyhook::filter::{auth, dns, log, metrics, negotiate, store, types as wit};

thread_local! {
    static FILTER: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
}

/// The host's imports.
struct WasmHost;

fn store_error(e: store::StoreError) -> StoreError {
    match e {
        store::StoreError::Unavailable(m) => StoreError::Unavailable(m),
        store::StoreError::Limit(m) => StoreError::Limit(m),
    }
}

fn outcome(o: store::WriteOutcome) -> WriteOutcome {
    match o {
        store::WriteOutcome::Written(v) => WriteOutcome::Written(v),
        store::WriteOutcome::Conflict => WriteOutcome::Conflict,
    }
}

fn dns_error(e: dns::DnsError) -> DnsError {
    match e {
        dns::DnsError::Nxdomain => DnsError::NxDomain,
        dns::DnsError::NoData => DnsError::NoData,
        dns::DnsError::Timeout => DnsError::Timeout,
        dns::DnsError::Servfail(m) => DnsError::ServFail(m),
        dns::DnsError::Limit(m) => DnsError::Limit(m),
    }
}

fn ip_to_wit(ip: IpAddr) -> wit::IpAddress {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            wit::IpAddress::Ipv4((o[0], o[1], o[2], o[3]))
        }
        IpAddr::V6(a) => {
            let g = a.segments();
            wit::IpAddress::Ipv6((g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]))
        }
    }
}

impl Host for WasmHost {
    fn get(&mut self, key: &str) -> Result<Option<Entry>, StoreError> {
        store::get(key).map(|e| e.map(|e| Entry { value: e.value, version: e.version })).map_err(store_error)
    }
    fn get_many(&mut self, keys: &[&str]) -> Result<Vec<Option<Entry>>, StoreError> {
        store::get_many(keys)
            .map(|v| v.into_iter().map(|e| e.map(|e| Entry { value: e.value, version: e.version })).collect())
            .map_err(store_error)
    }
    fn set(&mut self, key: &str, value: &[u8], ttl: u32, if_version: Option<u64>) -> Result<WriteOutcome, StoreError> {
        store::set(key, value, ttl, if_version).map(outcome).map_err(store_error)
    }
    fn set_many(&mut self, writes: &[Write<'_>]) -> Result<Vec<WriteOutcome>, StoreError> {
        let writes: Vec<store::Write<'_>> =
            writes.iter().map(|w| store::Write { key: w.key, value: w.value, ttl_seconds: w.ttl, if_version: w.if_version }).collect();
        store::set_many(&writes).map(|v| v.into_iter().map(outcome).collect()).map_err(store_error)
    }
    fn delete(&mut self, key: &str, if_version: Option<u64>) -> Result<bool, StoreError> {
        store::delete(key, if_version).map_err(store_error)
    }
    fn lookup(&mut self, name: &str, kind: RecordType) -> Result<Vec<String>, DnsError> {
        let kind = match kind {
            RecordType::A => dns::RecordType::A,
            RecordType::Aaaa => dns::RecordType::Aaaa,
            RecordType::Mx => dns::RecordType::Mx,
            RecordType::Txt => dns::RecordType::Txt,
            RecordType::Ptr => dns::RecordType::Ptr,
        };
        dns::lookup(name, kind).map_err(dns_error)
    }
    fn reverse(&mut self, ip: IpAddr) -> Result<Vec<String>, DnsError> {
        dns::reverse(ip_to_wit(ip)).map_err(dns_error)
    }
    fn spf(&mut self, ip: IpAddr, helo: &str, sender: &str) -> Result<SpfOutcome, DnsError> {
        let o = auth::spf(ip_to_wit(ip), helo, sender).map_err(dns_error)?;
        let result = match o.result {
            auth::SpfResult::Pass => SpfResult::Pass,
            auth::SpfResult::Fail => SpfResult::Fail,
            auth::SpfResult::Softfail => SpfResult::SoftFail,
            auth::SpfResult::Neutral => SpfResult::Neutral,
            auth::SpfResult::None => SpfResult::None,
            auth::SpfResult::Temperror => SpfResult::TempError,
            auth::SpfResult::Permerror => SpfResult::PermError,
        };
        Ok(SpfOutcome { result, domain: o.domain })
    }
    fn forward_confirmed_name(&mut self, ip: IpAddr) -> Result<Option<String>, DnsError> {
        auth::forward_confirmed_name(ip_to_wit(ip)).map_err(dns_error)
    }
    fn counter_add(&mut self, name: &str, l: &[(&str, &str)], value: u64) {
        // Through the series' handle (crate::series): its name and labels
        // cross once an instance, not on every update.
        crate::series::update(
            crate::series::Kind::Counter,
            name,
            l,
            || metrics::counter(name, l),
            |id| metrics::add(id, value),
            || metrics::counter_add(name, l, value),
        );
    }
    fn observe(&mut self, name: &str, l: &[(&str, &str)], value: f64) {
        crate::series::update(
            crate::series::Kind::Histogram,
            name,
            l,
            || metrics::histogram(name, l),
            |id| metrics::observe(id, value),
            || metrics::histogram_observe(name, l, value),
        );
    }
    fn log(&mut self, level: Level, message: &str) {
        let level = match level {
            host::Level::Debug => log::Level::Debug,
            host::Level::Info => log::Level::Info,
            host::Level::Warn => log::Level::Warn,
            host::Level::Error => log::Level::Error,
        };
        log::write(level, message);
    }
}

// ---- WIT records <-> greyhook_types, each taken apart whole ----

fn context(c: wit::Context) -> crate::Context {
    let wit::Context { session, transaction, now } = c;
    let wit::Session { id, client_address, client_name, reverse_client_name, helo, auth_user, tls } = session;
    let client_address = match client_address {
        wit::IpAddress::Ipv4((a, b, c, d)) => IpAddr::from([a, b, c, d]),
        wit::IpAddress::Ipv6((a, b, c, d, e, f, g, h)) => IpAddr::from([a, b, c, d, e, f, g, h]),
    };
    let wit::Transaction { sender, recipients } = transaction;
    crate::Context {
        session: crate::Session { id, client_address, client_name, reverse_client_name, helo, auth_user, tls },
        transaction: crate::Transaction {
            sender,
            recipients: recipients
                .into_iter()
                .map(|wit::AcceptedRecipient { address, policy_group }| crate::AcceptedRecipient { address, policy_group })
                .collect(),
        },
        now,
    }
}

fn message(m: wit::Message) -> crate::Message {
    let wit::Message { message_id, headers } = m;
    crate::Message { message_id, headers: headers.into_iter().map(|wit::Header { name, value }| crate::Header { name, value }).collect() }
}

fn reply(r: crate::Reply) -> wit::Reply {
    let crate::Reply { code, enhanced, text, retry_after } = r;
    wit::Reply { code, enhanced, text, retry_after }
}

fn verdict(v: Verdict) -> wit::Verdict {
    let Verdict { decision, add_headers, policy_group } = v;
    wit::Verdict {
        decision: match decision {
            crate::Decision::Continue => wit::Decision::Continue,
            crate::Decision::Accept => wit::Decision::Accept,
            crate::Decision::Tempfail(r) => wit::Decision::Tempfail(reply(r)),
            crate::Decision::Reject(r) => wit::Decision::Reject(reply(r)),
        },
        add_headers: add_headers.into_iter().map(|crate::Header { name, value }| wit::Header { name, value }).collect(),
        policy_group,
    }
}

/// Runs a hook on the filter `init` made; an error or a missing `init` is
/// logged and answered "no opinion" (never a trap).
fn run<F: Filter, T>(default: impl FnOnce() -> T, f: impl FnOnce(&F, &mut WasmHost) -> crate::Result<T>) -> T {
    FILTER.with(|cell| {
        let guard = cell.borrow();
        let mut host = WasmHost;
        let Some(filter) = guard.as_ref().and_then(|b| b.downcast_ref::<F>()) else {
            host.log(Level::Error, "hook called before init; answering continue");
            return default();
        };
        match f(filter, &mut host) {
            Ok(v) => v,
            Err(e) => {
                host.log(Level::Warn, &format!("giving up on this call: {e}"));
                default()
            }
        }
    })
}

/// `init`.
pub fn init<F: Filter>(config: String) -> Result<wit_hooks::FilterInfo, String> {
    // The filter lasts: never in the per-call arena.
    crate::arena::lasting(|| {
        let f = F::init(&config)?;
        let skip = f.skip_hooks();
        if !skip.phases.is_empty() {
            let keywords: Vec<&str> = skip.ehlo_keywords.iter().map(String::as_str).collect();
            negotiate::skip_hooks(hook_set(&skip), &keywords);
        }
        if skip.data_null_sender_only {
            negotiate::data_for_null_sender_only();
        }
        FILTER.with(|cell| *cell.borrow_mut() = Some(Box::new(f)));
        Ok(wit_hooks::FilterInfo { name: F::NAME.into(), version: F::VERSION.into() })
    })
}

/// The WIT `hook-set` of the phases `skip` names.
fn hook_set(skip: &crate::SkipHooks) -> negotiate::HookSet {
    use crate::Phase;
    skip.phases.iter().fold(negotiate::HookSet::empty(), |set, phase| {
        set | match phase {
            Phase::Connect => negotiate::HookSet::CONNECT,
            Phase::Ehlo => negotiate::HookSet::EHLO,
            Phase::Mail => negotiate::HookSet::MAIL,
            Phase::Rcpt => negotiate::HookSet::RCPT,
            Phase::Data => negotiate::HookSet::DATA,
        }
    })
}

/// Runs one hook's glue, warning once if the per-call arena
/// ([`crate::arena`]) is held by something the filter keeps between calls.
fn hook<T>(f: impl FnOnce() -> T) -> T {
    if crate::arena::begin_call() {
        WasmHost.log(
            Level::Warn,
            "memory allocated in hook calls is kept between them (hooks should keep no state); the per-call arena cannot be rewound and the system allocator serves what does not fit",
        );
    }
    f()
}

/// `on-connect`.
pub fn on_connect<F: Filter>(c: wit::Context) -> wit::Verdict {
    hook(move || verdict(run::<F, _>(Verdict::cont, |f, h| f.on_connect(&context(c), h))))
}

/// `on-ehlo`.
pub fn on_ehlo<F: Filter>(c: wit::Context) -> wit::EhloVerdict {
    hook(move || {
        let none = || crate::EhloVerdict { verdict: Verdict::cont(), keywords: Vec::new() };
        let crate::EhloVerdict { verdict: v, keywords } = run::<F, _>(none, |f, h| f.on_ehlo(&context(c), h));
        wit::EhloVerdict { verdict: verdict(v), keywords }
    })
}

/// `on-mail`.
pub fn on_mail<F: Filter>(c: wit::Context, sender: String) -> wit::Verdict {
    hook(move || verdict(run::<F, _>(Verdict::cont, |f, h| f.on_mail(&context(c), &sender, h))))
}

/// `on-rcpt`.
pub fn on_rcpt<F: Filter>(c: wit::Context, recipient: String) -> wit::Verdict {
    hook(move || verdict(run::<F, _>(Verdict::cont, |f, h| f.on_rcpt(&context(c), &recipient, h))))
}

/// `on-data`.
pub fn on_data<F: Filter>(c: wit::Context, m: wit::Message) -> wit::Verdict {
    hook(move || verdict(run::<F, _>(Verdict::cont, |f, h| f.on_data(&context(c), &message(m), h))))
}
