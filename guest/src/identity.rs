//! Who the client is, and whether to greylist it at all: the DNS-aware part
//! of the filter. Every lookup goes through the contract's `dns` and `auth`
//! imports (the host bounds each by the hook's deadline and counts them);
//! a lookup that fails never lets a client skip greylisting.
//!
//! - [`Screen::Exempt`]: authenticated, whitelisted by network or name,
//!   listed on a `dnswl` zone, or (with `greylist_only`) not suspicious.
//! - [`Screen::Greylist`] with the client's [`Identity`]: the first of the
//!   configured kinds that applies — an SPF-validated sender domain whose
//!   record is specific, the organisational domain of a forward-confirmed
//!   name that does not look dynamic, else the client network.

use std::net::IpAddr;

use greyhook_filter::host::{DnsError, Host, Level, RecordType, SpfResult};
use greyhook_filter::net::{looks_dynamic, org_domain};
use greyhook_filter::spf::{self, Scope};

use crate::config::{Config, IdentityKind, Suspicion};
use crate::filter::{Context, Error};
use crate::normalize::{client_network, triplet_key};

/// How long a domain's SPF scope (specific or wide) is remembered in the
/// store, so that its record is walked once an hour, not at every RCPT.
pub const SPF_SCOPE_TTL: u32 = 3600;

/// The client as the triplet key and the auto-whitelist see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// How it was found.
    pub kind: IdentityKind,
    /// Its key form: `spf:example.org`, `org:example.org`, or the network
    /// as before (`192.0.2.0/24`), so that records written with
    /// `identity = ["network"]` stay valid.
    pub key: String,
}

/// The longest domain kept readable in a store key (`awl/spf:…`,
/// `spfscope/…`); a longer one — the sender's domain is the client's to
/// choose, up to 253 bytes — is keyed by its SHA1 (BASE32), so that no key
/// breaks the host's 256-byte limit and turns client input into a filter
/// failure.
pub const MAX_READABLE: usize = 100;

/// `prefix` + `domain`, or + `#` and the domain's hash if it is long.
fn bounded(prefix: &str, domain: &str) -> String {
    if domain.len() <= MAX_READABLE { format!("{prefix}{domain}") } else { format!("{prefix}#{}", triplet_key(&[domain])) }
}

/// What the filter does with a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Screen {
    /// Not greylisted, and why.
    Exempt(String),
    /// Greylisted under this identity.
    Greylist(Identity),
}

/// The client's facts looked up once per hook call.
struct Lookups<'a> {
    ctx: &'a Context,
    confirmed: Option<Result<Option<String>, DnsError>>,
}

impl Lookups<'_> {
    fn ip(&self) -> IpAddr {
        self.ctx.session.client_address
    }

    /// The forward-confirmed name: the front end's (Postfix's
    /// `client_name`, the SMTP server's own lookup), else asked for.
    fn confirmed_name(&mut self, kv: &mut dyn Host) -> Result<Option<String>, DnsError> {
        if let Some(n) = self.ctx.session.client_name.as_deref().filter(|n| !n.is_empty() && *n != "unknown") {
            return Ok(Some(n.to_ascii_lowercase()));
        }
        let ip = self.ip();
        self.confirmed.get_or_insert_with(|| kv.forward_confirmed_name(ip)).clone()
    }
}

/// Counts a failed lookup (a metric and a debug line).
fn dns_failed(kv: &mut dyn Host, check: &str, e: &DnsError) {
    kv.counter_add("dns_failures_total", &[("check", check)], 1);
    kv.log(Level::Debug, &format!("{check}: {e}"));
}

/// The reverse-order query name of `ip` under `zone` (RFC 5782).
pub fn dnsxl_name(ip: IpAddr, zone: &str) -> String {
    let ip = match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            format!("{}.{}.{}.{}.{zone}", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(a) => {
            let mut s = String::with_capacity(64 + zone.len());
            for b in a.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", b & 0xf, b >> 4));
            }
            s.push_str(zone);
            s
        }
    }
}

/// True for an answer that means "listed": an address in 127.0.0.0/8,
/// except 127.255.255.x (Spamhaus's "your query was refused" codes) and
/// x.x.x.255 (DNSWL's), which say nothing about the client.
fn listed_answer(a: &str) -> bool {
    match a.parse::<std::net::Ipv4Addr>() {
        Ok(ip) => {
            let o = ip.octets();
            o[0] == 127 && !(o[1] == 255 && o[2] == 255) && o[3] != 255
        }
        Err(_) => false,
    }
}

/// The first of `zones` that lists `ip`; `Err` if none does but one
/// could not be asked.
fn listed_on(kv: &mut dyn Host, ip: IpAddr, zones: &[String], check: &str) -> Result<Option<String>, DnsError> {
    let mut failed = None;
    for zone in zones {
        match kv.lookup(&dnsxl_name(ip, zone), RecordType::A) {
            Ok(answers) if answers.iter().any(|a| listed_answer(a)) => return Ok(Some(zone.clone())),
            Ok(_) | Err(DnsError::NxDomain | DnsError::NoData) => {}
            Err(e) => {
                dns_failed(kv, check, &e);
                failed = Some(e);
            }
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(None),
    }
}

/// Why the client is suspicious, or `None` if it is not. A check that
/// cannot be made counts as suspicious: a broken resolver means plain
/// greylisting, never skipping it.
fn suspicion(c: &Config, l: &mut Lookups<'_>, kv: &mut dyn Host) -> Option<String> {
    for s in &c.greylist_only {
        match s {
            Suspicion::NoFcrdns => match l.confirmed_name(kv) {
                Ok(Some(_)) => {}
                Ok(None) => return Some("no forward-confirmed name".into()),
                Err(e) => {
                    dns_failed(kv, "fcrdns", &e);
                    return Some(format!("forward-confirmed name unknown ({e})"));
                }
            },
            Suspicion::DynamicName => {
                let name = match l.confirmed_name(kv) {
                    Ok(n) => n.or_else(|| l.ctx.session.reverse_client_name.clone()),
                    Err(e) => {
                        dns_failed(kv, "fcrdns", &e);
                        return Some(format!("client name unknown ({e})"));
                    }
                };
                if let Some(n) = name.filter(|n| looks_dynamic(n, l.ip())) {
                    return Some(format!("dynamic-looking name {n}"));
                }
            }
            Suspicion::Dnsbl => match listed_on(kv, l.ip(), &c.dnsbl, "dnsbl") {
                Ok(Some(zone)) => return Some(format!("listed on {zone}")),
                Ok(None) => {}
                Err(e) => return Some(format!("DNSBL unknown ({e})")),
            },
        }
    }
    None
}

/// True if the domain's SPF record is specific (see
/// [`greyhook_filter::spf`]); remembered in the store for an hour.
fn spf_specific(c: &Config, domain: &str, kv: &mut dyn Host) -> Result<bool, Error> {
    let key = bounded("spfscope/", domain);
    if let Some(e) = kv.get(&key)? {
        return Ok(e.value.first() == Some(&b'1'));
    }
    match spf::scope(kv, domain, &c.spf_limits) {
        Ok(Scope::Specific) => {
            kv.set(&key, b"1", SPF_SCOPE_TTL, None)?;
            Ok(true)
        }
        Ok(Scope::Wide(why)) => {
            kv.log(Level::Info, &format!("{domain}: SPF passes but is no identity: {why}"));
            kv.set(&key, format!("0 {why}").as_bytes(), SPF_SCOPE_TTL, None)?;
            Ok(false)
        }
        Err(e) => {
            dns_failed(kv, "spf-scope", &e);
            Ok(false)
        }
    }
}

/// The client's identity: the first configured kind that applies.
fn identity(c: &Config, l: &mut Lookups<'_>, kv: &mut dyn Host) -> Result<Identity, Error> {
    let ctx = l.ctx;
    for kind in &c.identity {
        match kind {
            IdentityKind::Spf => {
                let sender = ctx.transaction.sender.as_deref().unwrap_or("");
                let helo = ctx.session.helo.as_deref().unwrap_or("");
                if ctx.transaction.sender.is_none() || (sender.is_empty() && helo.is_empty()) {
                    continue;
                }
                match kv.spf(l.ip(), helo, sender) {
                    Ok(out) if out.result == SpfResult::Pass => {
                        let domain = out.domain.trim_end_matches('.').to_ascii_lowercase();
                        if !domain.is_empty() && spf_specific(c, &domain, kv)? {
                            return Ok(Identity { kind: *kind, key: bounded("spf:", &domain) });
                        }
                    }
                    Ok(out) if out.result == SpfResult::TempError => dns_failed(kv, "spf", &DnsError::ServFail("temperror".into())),
                    Ok(_) => {}
                    Err(e) => dns_failed(kv, "spf", &e),
                }
            }
            IdentityKind::FcrdnsOrg => match l.confirmed_name(kv) {
                Ok(Some(name)) if name.contains('.') && !looks_dynamic(&name, l.ip()) => {
                    if let Some(org) = org_domain(&name) {
                        return Ok(Identity { kind: *kind, key: bounded("org:", &org) });
                    }
                }
                Ok(_) => {}
                Err(e) => dns_failed(kv, "fcrdns", &e),
            },
            IdentityKind::Network => break,
        }
    }
    Ok(Identity { kind: IdentityKind::Network, key: client_network(l.ip(), c.ipv4_prefix, c.ipv6_prefix) })
}

/// Screens the client: exempt (and why), or greylisted under its identity.
pub fn screen(c: &Config, ctx: &Context, kv: &mut dyn Host) -> Result<Screen, Error> {
    let s = &ctx.session;
    if s.auth_user.as_deref().is_some_and(|u| !u.is_empty()) {
        return Ok(Screen::Exempt("authenticated".into()));
    }
    if c.whitelist_clients.iter().any(|w| w.contains(s.client_address)) {
        return Ok(Screen::Exempt("whitelisted client".into()));
    }
    if let Some(name) = s.client_name.as_deref() {
        let name = name.to_ascii_lowercase();
        let hit = c.whitelist_client_names.iter().any(|suffix| {
            if suffix.starts_with('.') { name.ends_with(suffix.as_str()) } else { name == *suffix || name.ends_with(&format!(".{suffix}")) }
        });
        if hit {
            return Ok(Screen::Exempt("whitelisted client name".into()));
        }
    }
    if !c.dnswl.is_empty() {
        // A DNSWL that cannot be asked whitelists no one.
        if let Ok(Some(zone)) = listed_on(kv, s.client_address, &c.dnswl, "dnswl") {
            kv.counter_add("selective_total", &[("outcome", "dnswl")], 1);
            return Ok(Screen::Exempt(format!("listed on {zone}")));
        }
    }
    let mut l = Lookups { ctx, confirmed: None };
    if !c.greylist_only.is_empty() {
        match suspicion(c, &mut l, kv) {
            None => {
                kv.counter_add("selective_total", &[("outcome", "not-suspicious")], 1);
                return Ok(Screen::Exempt("not suspicious".into()));
            }
            Some(why) => {
                kv.counter_add("selective_total", &[("outcome", "suspicious")], 1);
                kv.log(Level::Debug, &format!("session {}: suspicious: {why}", s.id));
            }
        }
    }
    let id = identity(c, &mut l, kv)?;
    kv.counter_add("identity_total", &[("kind", id.kind.name())], 1);
    Ok(Screen::Greylist(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dnsxl_names_and_answers() {
        assert_eq!(dnsxl_name("192.0.2.7".parse().unwrap(), "bl.example"), "7.2.0.192.bl.example");
        assert_eq!(dnsxl_name("::ffff:192.0.2.7".parse().unwrap(), "bl.example"), "7.2.0.192.bl.example");
        let v6 = dnsxl_name("2001:db8::1".parse().unwrap(), "bl.example");
        assert!(v6.starts_with("1.0.0.0.0.0.0.0.") && v6.ends_with("8.b.d.0.1.0.0.2.bl.example"), "{v6}");
        assert!(listed_answer("127.0.0.2") && listed_answer("127.0.15.10"));
        assert!(!listed_answer("127.255.255.254") && !listed_answer("127.0.0.255") && !listed_answer("10.0.0.2"));
        assert!(!listed_answer("not an address"));
    }

    use greyhook_filter::host::SpfResult;
    use greyhook_filter::testing::Harness;
    use greyhook_filter::verdict::VerdictExt;

    use crate::filter::Greylist;

    const FARM_SPF: &str = "v=spf1 ip4:198.51.100.0/24 ip4:203.0.113.0/24 -all";

    /// A farm: SPF passes from both of its /24s, its record is specific.
    fn farm(config: &str) -> Harness<Greylist> {
        let mut h = Harness::<Greylist>::new(config).unwrap();
        h.dns().add("farm.example", RecordType::Txt, &[FARM_SPF]);
        h.dns().spf_for("198.51.100.10", "farm.example", SpfResult::Pass).spf_for("203.0.113.20", "farm.example", SpfResult::Pass);
        h.dns().add("open.example", RecordType::Txt, &["v=spf1 +all"]).spf("open.example", SpfResult::Pass);
        h
    }

    /// First attempt from `a`, retry after the delay from `b`: passes?
    fn retry_passes(h: &mut Harness<Greylist>, a: &str, b: &str, sender: &str) -> bool {
        let mut s = h.session(a);
        s.ehlo("mx.example");
        s.mail(sender);
        assert_eq!(s.rcpt("user@dest.example").retry_after(), Some(300), "first attempt from {a}");
        h.advance(301);
        let mut s = h.session(b);
        s.ehlo("mx.example");
        s.mail(sender);
        s.rcpt("user@dest.example").passes()
    }

    #[test]
    fn a_farm_passes_at_its_first_retry_from_another_network() {
        let mut h = farm("");
        assert!(retry_passes(&mut h, "198.51.100.10", "203.0.113.20", "news@farm.example"));
        let mut s = h.session("203.0.113.20");
        s.mail("news@farm.example");
        s.rcpt("other@dest.example");
        assert!(h.host.keys().iter().any(|k| k == "awl/spf:farm.example"), "{:?}", h.host.keys());
        assert!(h.host.logs.iter().any(|(_, l)| l.contains("identity=spf:farm.example")), "{:?}", h.host.logs);
        assert_eq!(h.host.counters.get("identity_total{kind=\"spf\"}"), Some(&3));
        // The header names the identity.
        let mut h = farm("");
        let mut s = h.session("198.51.100.10");
        s.mail("news@farm.example");
        s.rcpt("user@dest.example");
        h.advance(301);
        let mut s = h.session("203.0.113.20");
        s.mail("news@farm.example");
        assert!(s.rcpt("user@dest.example").passes());
        assert_eq!(s.headers()[0].value, "delayed 301 seconds by greyhook, identity spf:farm.example");
        // With today's rule, the farm is greylisted again.
        let mut h = farm("identity = [\"network\"]");
        assert!(!retry_passes(&mut h, "198.51.100.10", "203.0.113.20", "news@farm.example"));
    }

    /// The sender's domain is client input: a 249-byte one still keys its
    /// records within the host's limits (here the harness's 256 bytes),
    /// and the farm still passes at its retry.
    #[test]
    fn long_domains_are_hashed_in_keys() {
        let long = format!("{}.example", ["abcdefghij"; 22].join("."));
        assert!(long.len() > 240 && long.len() <= 253);
        let mut h = farm("");
        h.dns().add(&long, RecordType::Txt, &[FARM_SPF]).spf(&long, SpfResult::Pass);
        assert!(retry_passes(&mut h, "198.51.100.10", "203.0.113.20", &format!("a@{long}")));
        assert!(h.host.keys().iter().all(|k| k.len() <= 64), "{:?}", h.host.keys());
        assert!(h.host.keys().iter().any(|k| k.starts_with("awl/spf:#")), "{:?}", h.host.keys());
        assert!(!h.host.logs.iter().any(|(l, _)| *l >= Level::Warn), "{:?}", h.host.logs);
    }

    #[test]
    fn spf_that_is_no_identity() {
        // A bot with the farm's sender outside its record: SPF fails, network.
        let mut h = farm("");
        assert!(!retry_passes(&mut h, "192.0.2.66", "192.0.3.66", "news@farm.example"));
        // `+all` passes from anywhere: no identity, the retry from another /24 is new.
        let mut h = farm("");
        assert!(!retry_passes(&mut h, "192.0.2.66", "192.0.3.66", "bulk@open.example"));
        assert!(h.host.logs.iter().any(|(_, l)| l.contains("no identity") && l.contains("+all")), "{:?}", h.host.logs);
        // Remembered: the record is walked once.
        assert!(h.host.value("spfscope/open.example").is_some_and(|v| v.starts_with(b"0 ")));
        // A record wider than the limit; then the same within a raised one.
        let mut h = farm("");
        h.dns().add("wide.example", RecordType::Txt, &["v=spf1 ip4:192.0.0.0/12 -all"]).spf("wide.example", SpfResult::Pass);
        assert!(!retry_passes(&mut h, "192.0.2.66", "192.0.3.66", "x@wide.example"));
        let mut h = farm("spf_min_ipv4_prefix = 8");
        h.dns().add("wide.example", RecordType::Txt, &["v=spf1 ip4:192.0.0.0/12 -all"]).spf("wide.example", SpfResult::Pass);
        assert!(retry_passes(&mut h, "192.0.2.66", "192.0.3.66", "x@wide.example"));
        // The TXT lookup failing: no identity this time, nothing remembered.
        let mut h = farm("");
        h.dns().fail("slow.example", RecordType::Txt, DnsError::Timeout).spf("slow.example", SpfResult::Pass);
        assert!(!retry_passes(&mut h, "192.0.2.66", "192.0.3.66", "x@slow.example"));
        assert!(h.host.value("spfscope/slow.example").is_none());
    }

    /// A first attempt whose SPF check failed (a lookup cut off by the
    /// deadline goes on and fills the cache) is keyed on the network; the
    /// retry from the same client, keyed on the sender's domain, counts it
    /// and does not wait out a second delay.
    #[test]
    fn a_first_attempt_keyed_on_the_network_counts_for_the_retry() {
        for (first, retry_at, passes) in [(SpfResult::TempError, 301, true), (SpfResult::TempError, 100, false)] {
            let mut h = Harness::<Greylist>::new("").unwrap();
            h.dns().add("farm.example", RecordType::Txt, &[FARM_SPF]).spf("farm.example", first);
            let mut s = h.session("198.51.100.10");
            s.mail("news@farm.example");
            assert_eq!(s.rcpt("user@dest.example").retry_after(), Some(300));
            assert!(h.host.logs.iter().all(|(_, l)| !l.contains("identity=spf:")), "keyed on the network: {:?}", h.host.logs);
            h.advance(retry_at);
            h.dns().spf("farm.example", SpfResult::Pass);
            let mut s = h.session("198.51.100.10");
            s.mail("news@farm.example");
            let v = s.rcpt("user@dest.example");
            assert_eq!(v.passes(), passes, "retry after {retry_at} s: {v:?}");
            if !passes {
                // Told what is left of the first attempt's delay, not a new one.
                assert_eq!(v.retry_after(), Some(300 - retry_at as u32));
                // And the farm's next address, in another network, finds the
                // record under its domain: it passes once the delay is out.
                h.advance(300 - retry_at + 1);
                let mut s = h.session("203.0.113.20");
                s.mail("news@farm.example");
                assert!(s.rcpt("user@dest.example").passes());
            }
            assert_eq!(h.host.counters.get("network_carried_total{identity=\"spf\"}"), Some(&1), "{:?}", h.host.counters);
            assert!(h.host.logs.iter().any(|(_, l)| l.contains("first seen under the client network, now identity=spf:farm.example")));
        }
        // Another client in another network: nothing to carry over, a new triplet.
        let mut h = Harness::<Greylist>::new("").unwrap();
        h.dns().add("farm.example", RecordType::Txt, &[FARM_SPF]).spf("farm.example", SpfResult::TempError);
        let mut s = h.session("198.51.100.10");
        s.mail("news@farm.example");
        s.rcpt("user@dest.example");
        h.advance(301);
        h.dns().spf("farm.example", SpfResult::Pass);
        let mut s = h.session("203.0.113.20");
        s.mail("news@farm.example");
        assert_eq!(s.rcpt("user@dest.example").retry_after(), Some(300));
        // Nor for another recipient from the same client.
        let mut s = h.session("198.51.100.10");
        s.mail("news@farm.example");
        assert_eq!(s.rcpt("other@dest.example").retry_after(), Some(300));
        assert_eq!(h.host.counters.get("network_carried_total{identity=\"spf\"}"), None);
    }

    /// Switching from `identity = ["network"]` to the default: triplets
    /// passed or pending under the network identity still count.
    #[test]
    fn switching_from_the_network_identity_keeps_its_triplets() {
        let mut h = Harness::<Greylist>::new("identity = [\"network\"]\nauto_whitelist_after = 0").unwrap();
        h.dns().add("farm.example", RecordType::Txt, &[FARM_SPF]).spf("farm.example", SpfResult::Pass);
        for rcpt in ["passed@dest.example", "pending@dest.example"] {
            let mut s = h.session("198.51.100.10");
            s.mail("news@farm.example");
            assert_eq!(s.rcpt(rcpt).retry_after(), Some(300));
        }
        h.advance(301);
        let mut s = h.session("198.51.100.10");
        s.mail("news@farm.example");
        assert!(s.rcpt("passed@dest.example").passes());
        h.filter = <Greylist as greyhook_filter::Filter>::init("auto_whitelist_after = 0").unwrap();
        h.advance(3600);
        let mut s = h.session("198.51.100.10");
        s.mail("news@farm.example");
        assert!(s.rcpt("passed@dest.example").passes(), "passed before: known");
        // The pending one's retry window (default 2 days) is still open.
        assert!(s.rcpt("pending@dest.example").passes(), "seen before the switch, retried after it");
        assert_eq!(h.host.counters.get("network_carried_total{identity=\"spf\"}"), Some(&2), "{:?}", h.host.counters);
        assert!(h.host.logs.iter().any(|(_, l)| l.contains("identity=spf:farm.example")));
    }

    #[test]
    fn forward_confirmed_organisation() {
        let mut h = Harness::<Greylist>::new("").unwrap();
        for (ip, name) in [("198.51.100.10", "mail-a1.outbound.bigfarm.co.uk"), ("203.0.113.20", "mail-b7.eu.bigfarm.co.uk")] {
            h.dns().ptr(ip, &[name]).add(name, RecordType::A, &[ip]);
        }
        assert!(retry_passes(&mut h, "198.51.100.10", "203.0.113.20", "alerts@service.example"));
        assert!(h.host.keys().iter().any(|k| k == "awl/org:bigfarm.co.uk"), "{:?}", h.host.keys());
        // A spoofed PTR (no A record back) is no identity.
        let mut h = Harness::<Greylist>::new("").unwrap();
        h.dns().ptr("192.0.2.66", &["mail-a1.outbound.bigfarm.co.uk"]).ptr("192.0.3.66", &["mail-b7.outbound.bigfarm.co.uk"]);
        assert!(!retry_passes(&mut h, "192.0.2.66", "192.0.3.66", "alerts@service.example"));
        // A dynamic-looking confirmed name is no identity either.
        let mut h = Harness::<Greylist>::new("").unwrap();
        for (ip, name) in [("192.0.2.66", "dsl-192-0-2-66.isp.example"), ("192.0.3.66", "dsl-192-0-3-66.isp.example")] {
            h.dns().ptr(ip, &[name]).add(name, RecordType::A, &[ip]);
        }
        assert!(!retry_passes(&mut h, "192.0.2.66", "192.0.3.66", "alerts@service.example"));
        // The front end's confirmed name counts without a lookup.
        let mut h = Harness::<Greylist>::new("identity = [\"fcrdns-org\"]").unwrap();
        let mut s = h.session("198.51.100.10");
        s.client_name("out1.mailer.example.org");
        s.mail("a@b.example");
        assert_eq!(s.rcpt("c@d.example").retry_after(), Some(300));
        assert_eq!(h.host.dns_calls, 0);
        assert!(h.host.keys().iter().any(|k| k.starts_with("t/")));
    }

    #[test]
    fn dns_down_is_plain_greylisting() {
        let mut h =
            Harness::<Greylist>::new("greylist_only = [\"no-fcrdns\", \"dnsbl\"]\ndnsbl = [\"bl.example\"]\ndnswl = [\"wl.example\"]")
                .unwrap();
        h.dns().spf("farm.example", SpfResult::TempError);
        h.dns().ptr_fail("198.51.100.10", DnsError::Timeout).ptr_fail("198.51.100.11", DnsError::Timeout);
        h.dns().fail("10.100.51.198.bl.example", RecordType::A, DnsError::Timeout);
        h.dns().fail("10.100.51.198.wl.example", RecordType::A, DnsError::ServFail("down".into()));
        // Same /24: the network identity; greylisted, and the retry passes.
        assert!(retry_passes(&mut h, "198.51.100.10", "198.51.100.11", "news@farm.example"));
        assert!(h.host.counters.keys().any(|k| k.starts_with("dns_failures_total")), "{:?}", h.host.counters);
        assert!(h.host.keys().iter().any(|k| k == "awl/198.51.100.0/24"));
    }

    #[test]
    fn selective_greylisting() {
        let config = "greylist_only = [\"no-fcrdns\", \"dynamic-name\", \"dnsbl\"]\ndnsbl = [\"bl.example\"]\ndnswl = [\"wl.example\"]";
        let mut h = Harness::<Greylist>::new(config).unwrap();
        let good = "mail.good.example";
        h.dns().ptr("198.51.100.10", &[good]).add(good, RecordType::A, &["198.51.100.10"]);
        let dynamic = "198-51-100-12.pool.isp.example";
        h.dns().ptr("198.51.100.12", &[dynamic]).add(dynamic, RecordType::A, &["198.51.100.12"]);
        let listed = "mx.listed.example";
        h.dns().ptr("198.51.100.13", &[listed]).add(listed, RecordType::A, &["198.51.100.13"]);
        h.dns().add("13.100.51.198.bl.example", RecordType::A, &["127.0.0.2"]);
        // Refused-query codes are not listings.
        h.dns().add("10.100.51.198.bl.example", RecordType::A, &["127.255.255.254"]);
        h.dns().add("14.100.51.198.wl.example", RecordType::A, &["127.0.15.0"]);
        let first = |h: &mut Harness<Greylist>, ip: &str| {
            let mut s = h.session(ip);
            s.mail("a@sender.example");
            s.rcpt("b@dest.example")
        };
        assert!(first(&mut h, "198.51.100.10").passes(), "a confirmed, clean client is not greylisted");
        assert!(first(&mut h, "198.51.100.11").is_tempfail(), "no confirmed name");
        assert!(first(&mut h, "198.51.100.12").is_tempfail(), "dynamic-looking name");
        assert!(first(&mut h, "198.51.100.13").is_tempfail(), "listed on the DNSBL");
        assert!(first(&mut h, "198.51.100.14").passes(), "on the DNSWL, though it has no name");
        assert_eq!(h.host.counters.get("selective_total{outcome=\"dnswl\"}"), Some(&1));
        assert_eq!(h.host.counters.get("selective_total{outcome=\"not-suspicious\"}"), Some(&1));
        assert_eq!(h.host.counters.get("selective_total{outcome=\"suspicious\"}"), Some(&3));
    }
}
