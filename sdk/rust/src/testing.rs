//! A native test harness: run a filter's hooks with plain `cargo test`, no
//! WebAssembly and no greyhook.
//!
//! - [`TestHost`]: a [`Host`] with an in-memory store (TTLs and versions,
//!   compare-and-swap as greyhook's stores do it, expiry by the clock), a
//!   fake resolver ([`TestHost::dns`]: A/AAAA/MX/TXT/PTR records, failures
//!   to inject, forward confirmation computed from the PTR and A records)
//!   with SPF results to hand out, counted metrics and captured log lines.
//! - [`Harness`]: a filter initialised from a configuration, a clock
//!   ([`Harness::advance`]) and [`Harness::session`], a session driver that
//!   keeps the context as the host does (the HELO, the sender, the
//!   recipients accepted so far).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use crate::host::{DnsError, Entry, Host, Level, RecordType, SpfOutcome, SpfResult, StoreError, Write, WriteOutcome};
use crate::{AcceptedRecipient, Context, Decision, EhloVerdict, Filter, Header, Message, Phase, Session, SkipHooks, Transaction, Verdict};

/// Fake DNS answers and SPF results.
#[derive(Debug, Default, Clone)]
pub struct FakeDns {
    records: HashMap<(String, RecordType), Result<Vec<String>, DnsError>>,
    ptr: HashMap<IpAddr, Result<Vec<String>, DnsError>>,
    spf: HashMap<String, SpfResult>,
    spf_clients: HashMap<(IpAddr, String), SpfResult>,
}

fn norm(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl FakeDns {
    /// Answers `name`'s `kind` lookups with `records`.
    pub fn add(&mut self, name: &str, kind: RecordType, records: &[&str]) -> &mut Self {
        self.records.insert((norm(name), kind), Ok(records.iter().map(|r| r.to_string()).collect()));
        self
    }

    /// Answers `name`'s `kind` lookups with an error (e.g. a timeout).
    pub fn fail(&mut self, name: &str, kind: RecordType, error: DnsError) -> &mut Self {
        self.records.insert((norm(name), kind), Err(error));
        self
    }

    /// Gives `ip` the PTR names `names` (add their A/AAAA records with
    /// [`FakeDns::add`] to make one forward-confirmed).
    pub fn ptr(&mut self, ip: &str, names: &[&str]) -> &mut Self {
        self.ptr.insert(parse_ip(ip), Ok(names.iter().map(|n| norm(n)).collect()));
        self
    }

    /// Makes `ip`'s reverse lookups fail.
    pub fn ptr_fail(&mut self, ip: &str, error: DnsError) -> &mut Self {
        self.ptr.insert(parse_ip(ip), Err(error));
        self
    }

    /// The SPF result of `domain` for every client (default `none`).
    pub fn spf(&mut self, domain: &str, result: SpfResult) -> &mut Self {
        self.spf.insert(norm(domain), result);
        self
    }

    /// The SPF result of `domain` for the client `ip` (before [`FakeDns::spf`]'s).
    pub fn spf_for(&mut self, ip: &str, domain: &str, result: SpfResult) -> &mut Self {
        self.spf_clients.insert((parse_ip(ip), norm(domain)), result);
        self
    }
}

fn parse_ip(ip: &str) -> IpAddr {
    ip.parse().unwrap_or_else(|_| panic!("not an IP address: {ip}"))
}

/// A [`Host`] for tests (see the module documentation).
#[derive(Debug, Default)]
pub struct TestHost {
    /// The clock: Unix seconds, the base of TTLs.
    pub now: u64,
    store: BTreeMap<String, (Vec<u8>, u64, u64)>,
    next_version: u64,
    /// The fake resolver and SPF.
    pub dns: FakeDns,
    /// DNS and auth calls made.
    pub dns_calls: u64,
    /// Store calls made (each key of a batch counts).
    pub store_calls: u64,
    /// Counters, by `name{labels}`.
    pub counters: BTreeMap<String, u64>,
    /// Histogram observations, by `name{labels}`.
    pub observations: BTreeMap<String, Vec<f64>>,
    /// Log lines written.
    pub logs: Vec<(Level, String)>,
    /// When set, every store call fails with this (to test the filter's
    /// behaviour when the store is down).
    pub store_down: Option<String>,
}

fn series(name: &str, labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return name.to_string();
    }
    let mut l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    l.sort();
    format!("{name}{{{}}}", l.join(","))
}

impl TestHost {
    /// A host whose clock says `now`.
    pub fn new(now: u64) -> TestHost {
        TestHost { now, ..TestHost::default() }
    }

    /// The live (unexpired) keys of the store, sorted.
    pub fn keys(&self) -> Vec<String> {
        self.store.iter().filter(|(_, (_, _, exp))| *exp > self.now).map(|(k, _)| k.clone()).collect()
    }

    /// A live value.
    pub fn value(&self, key: &str) -> Option<&[u8]> {
        self.store.get(key).filter(|(_, _, exp)| *exp > self.now).map(|(v, _, _)| v.as_slice())
    }

    fn check(&mut self, key: &str) -> Result<(), StoreError> {
        self.store_calls += 1;
        if let Some(m) = &self.store_down {
            return Err(StoreError::Unavailable(m.clone()));
        }
        // The host's limits.
        if key.is_empty() || key.len() > 256 {
            return Err(StoreError::Limit(format!("store key of {} bytes (1 to 256 allowed)", key.len())));
        }
        Ok(())
    }
}

impl Host for TestHost {
    fn get(&mut self, key: &str) -> Result<Option<Entry>, StoreError> {
        self.check(key)?;
        Ok(self.store.get(key).filter(|(_, _, exp)| *exp > self.now).map(|(v, ver, _)| Entry { value: v.clone(), version: *ver }))
    }

    fn get_many(&mut self, keys: &[&str]) -> Result<Vec<Option<Entry>>, StoreError> {
        keys.iter().map(|k| self.get(k)).collect()
    }

    fn set(&mut self, key: &str, value: &[u8], ttl: u32, if_version: Option<u64>) -> Result<WriteOutcome, StoreError> {
        self.check(key)?;
        if value.len() > 16 * 1024 {
            return Err(StoreError::Limit(format!("store value of {} bytes (at most 16384)", value.len())));
        }
        let current = self.store.get(key).filter(|(_, _, exp)| *exp > self.now).map(|(_, ver, _)| *ver);
        let holds = match if_version {
            None => true,
            Some(0) => current.is_none(),
            Some(v) => current == Some(v),
        };
        if !holds {
            return Ok(WriteOutcome::Conflict);
        }
        self.next_version += 1;
        let v = self.next_version;
        self.store.insert(key.to_string(), (value.to_vec(), v, self.now + u64::from(ttl.max(1))));
        Ok(WriteOutcome::Written(v))
    }

    fn set_many(&mut self, writes: &[Write<'_>]) -> Result<Vec<WriteOutcome>, StoreError> {
        writes.iter().map(|w| self.set(w.key, w.value, w.ttl, w.if_version)).collect()
    }

    fn delete(&mut self, key: &str, if_version: Option<u64>) -> Result<bool, StoreError> {
        self.check(key)?;
        let current = self.store.get(key).filter(|(_, _, exp)| *exp > self.now).map(|(_, ver, _)| *ver);
        let holds = match if_version {
            None => true,
            Some(0) => current.is_none(),
            Some(v) => current == Some(v),
        };
        Ok(holds && current.is_some() && self.store.remove(key).is_some())
    }

    fn lookup(&mut self, name: &str, kind: RecordType) -> Result<Vec<String>, DnsError> {
        self.dns_calls += 1;
        self.dns.records.get(&(norm(name), kind)).cloned().unwrap_or(Err(DnsError::NxDomain))
    }

    fn reverse(&mut self, ip: IpAddr) -> Result<Vec<String>, DnsError> {
        self.dns_calls += 1;
        self.dns.ptr.get(&ip).cloned().unwrap_or(Err(DnsError::NxDomain))
    }

    fn spf(&mut self, ip: IpAddr, helo: &str, sender: &str) -> Result<SpfOutcome, DnsError> {
        self.dns_calls += 1;
        let domain = crate::net::domain_of(sender).unwrap_or_else(|| norm(helo));
        let result =
            self.dns.spf_clients.get(&(ip, domain.clone())).or_else(|| self.dns.spf.get(&domain)).copied().unwrap_or(SpfResult::None);
        Ok(SpfOutcome { result, domain })
    }

    fn forward_confirmed_name(&mut self, ip: IpAddr) -> Result<Option<String>, DnsError> {
        self.dns_calls += 1;
        let names = match self.dns.ptr.get(&ip).cloned().unwrap_or(Err(DnsError::NxDomain)) {
            Ok(n) => n,
            Err(DnsError::NxDomain | DnsError::NoData) => return Ok(None),
            Err(e) => return Err(e),
        };
        let kind = if ip.is_ipv4() { RecordType::A } else { RecordType::Aaaa };
        for n in names {
            if let Some(Ok(addrs)) = self.dns.records.get(&(n.clone(), kind))
                && addrs.iter().any(|a| a.parse::<IpAddr>().ok() == Some(ip))
            {
                return Ok(Some(n));
            }
        }
        Ok(None)
    }

    fn counter_add(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        *self.counters.entry(series(name, labels)).or_default() += value;
    }

    fn observe(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.observations.entry(series(name, labels)).or_default().push(value);
    }

    fn log(&mut self, level: Level, message: &str) {
        self.logs.push((level, message.to_string()));
    }
}

/// A filter with a [`TestHost`] and a clock. The hooks the filter skips
/// ([`Filter::skip_hooks`]) are answered as a host answers them, without
/// calling the filter.
pub struct Harness<F: Filter> {
    /// The filter, initialised.
    pub filter: F,
    /// What the filter's [`Filter::skip_hooks`] said after `init`.
    pub skip: SkipHooks,
    /// Its host (store, DNS, metrics, log; `host.now` is the clock).
    pub host: TestHost,
    sessions: u64,
}

/// The clock a [`Harness`] starts at (2024-01-01T00:00:00Z).
pub const START: u64 = 1_704_067_200;

impl<F: Filter> Harness<F> {
    /// Initialises the filter with `config` (TOML text, as the operator
    /// writes it), the clock at [`START`].
    pub fn new(config: &str) -> Result<Harness<F>, String> {
        let filter = F::init(config)?;
        let skip = filter.skip_hooks();
        Ok(Harness { filter, skip, host: TestHost::new(START), sessions: 0 })
    }

    /// Moves the clock on by `secs` seconds.
    pub fn advance(&mut self, secs: u64) {
        self.host.now += secs;
    }

    /// The fake resolver, to add records and SPF results to.
    pub fn dns(&mut self) -> &mut FakeDns {
        &mut self.host.dns
    }

    /// A new session from the client `ip`; its connect hook is not called
    /// until [`SessionDriver::connect`] (or not at all).
    pub fn session(&mut self, ip: &str) -> SessionDriver<'_, F> {
        self.sessions += 1;
        let session = Session::new(format!("test{}", self.sessions), parse_ip(ip));
        SessionDriver { h: self, session, transaction: Transaction::default(), headers: Vec::new() }
    }
}

/// One SMTP session against the filter, the context kept as the host keeps it.
pub struct SessionDriver<'h, F: Filter> {
    h: &'h mut Harness<F>,
    session: Session,
    transaction: Transaction,
    headers: Vec<Header>,
}

fn failed(e: crate::Error, h: &mut TestHost) -> Verdict {
    // As in a component: logged, and "no opinion".
    h.log(Level::Warn, &format!("giving up on this call: {e}"));
    Verdict::cont()
}

impl<F: Filter> SessionDriver<'_, F> {
    /// Sets the client's forward-confirmed name (as a front end does).
    pub fn client_name(&mut self, name: &str) -> &mut Self {
        self.session.client_name = Some(name.into());
        self.session.reverse_client_name = Some(name.into());
        self
    }

    /// Marks the session authenticated as `user`.
    pub fn auth(&mut self, user: &str) -> &mut Self {
        self.session.auth_user = Some(user.into());
        self
    }

    /// The context of the next hook call.
    pub fn context(&self) -> Context {
        Context { session: self.session.clone(), transaction: self.transaction.clone(), now: self.h.host.now }
    }

    /// Headers the filter asked for so far in this transaction.
    pub fn headers(&self) -> &[Header] {
        &self.headers
    }

    fn keep(&mut self, v: Verdict) -> Verdict {
        if matches!(v.decision, Decision::Continue | Decision::Accept) {
            self.headers.extend(v.add_headers.iter().cloned());
        }
        v
    }

    /// The connect hook.
    pub fn connect(&mut self) -> Verdict {
        if self.h.skip.skips(Phase::Connect) {
            return Verdict::cont();
        }
        let ctx = self.context();
        let v = self.h.filter.on_connect(&ctx, &mut self.h.host).unwrap_or_else(|e| failed(e, &mut self.h.host));
        self.keep(v)
    }

    /// HELO/EHLO `name`.
    pub fn ehlo(&mut self, name: &str) -> EhloVerdict {
        self.session.helo = Some(name.into());
        if self.h.skip.skips(Phase::Ehlo) {
            return EhloVerdict { verdict: Verdict::cont(), keywords: self.h.skip.ehlo_keywords.clone() };
        }
        let ctx = self.context();
        self.h
            .filter
            .on_ehlo(&ctx, &mut self.h.host)
            .unwrap_or_else(|e| EhloVerdict { verdict: failed(e, &mut self.h.host), keywords: Vec::new() })
    }

    /// MAIL FROM (starts a transaction).
    pub fn mail(&mut self, sender: &str) -> Verdict {
        self.transaction = Transaction { sender: Some(sender.into()), recipients: Vec::new() };
        self.headers.clear();
        if self.h.skip.skips(Phase::Mail) {
            return Verdict::cont();
        }
        let ctx = self.context();
        let v = self.h.filter.on_mail(&ctx, sender, &mut self.h.host).unwrap_or_else(|e| failed(e, &mut self.h.host));
        if !matches!(v.decision, Decision::Continue | Decision::Accept) {
            self.transaction.sender = None;
        }
        self.keep(v)
    }

    /// RCPT TO; a recipient that is not refused joins the transaction.
    pub fn rcpt(&mut self, recipient: &str) -> Verdict {
        let v = if self.h.skip.skips(Phase::Rcpt) {
            Verdict::cont()
        } else {
            let ctx = self.context();
            self.h.filter.on_rcpt(&ctx, recipient, &mut self.h.host).unwrap_or_else(|e| failed(e, &mut self.h.host))
        };
        if matches!(v.decision, Decision::Continue | Decision::Accept) {
            self.transaction
                .recipients
                .push(AcceptedRecipient { address: recipient.into(), policy_group: v.policy_group.clone().unwrap_or_default() });
        }
        self.keep(v)
    }

    /// End of DATA with this Message-ID and headers.
    pub fn data(&mut self, message_id: Option<&str>, headers: &[(&str, &str)]) -> Verdict {
        let ctx = self.context();
        if self.h.skip.skips_call(Phase::Data, &ctx) {
            return Verdict::cont();
        }
        let m = Message {
            message_id: message_id.map(str::to_string),
            headers: headers.iter().map(|(n, v)| Header { name: n.to_string(), value: v.to_string() }).collect(),
        };
        let v = self.h.filter.on_data(&ctx, &m, &mut self.h.host).unwrap_or_else(|e| failed(e, &mut self.h.host));
        self.keep(v)
    }

    /// The host of the harness (to look at the store or the metrics).
    pub fn host(&mut self) -> &mut TestHost {
        &mut self.h.host
    }
}
