//! Is an SPF pass an identity? The breadth of what a domain's SPF record
//! authorises.
//!
//! An SPF `pass` says the domain lets this address send for it, not that
//! the domain is careful about who else it lets: spammers publish
//! `v=spf1 +all` or `ip4:0.0.0.0/1`, and a filter that keys on any domain
//! whose SPF passed would let a botnet retrying from random addresses pass
//! at its second attempt. [`scope`] walks the record (its `include:`s and
//! `redirect=`, within SPF's own 10-lookup limit) and answers
//! [`Scope::Specific`] only when nothing in it that can give a `pass`
//! authorises more than [`Limits`] allows:
//!
//! - no `all` that passes (`all`, `+all`);
//! - no `ip4` wider than [`Limits::min_ipv4_prefix`] (default /16) and no
//!   `ip6` wider than [`Limits::min_ipv6_prefix`] (default /32); the same
//!   for the CIDR lengths of `a` and `mx` (`a/8`);
//! - no `exists` and no macro (`%{i}`) in a domain: with a wildcard zone
//!   either matches any address its owner likes;
//! - no record that is missing, doubled or does not parse.
//!
//! Mechanisms that cannot give a pass (`-`, `~`, `?` qualifiers) do not
//! count, and neither does `ptr` (it needs the client's own reverse zone).
//! Only the mechanisms are parsed here; the pass itself is the host's
//! check (`auth::spf`).

use crate::host::{DnsError, Host, RecordType};

/// How wide an SPF record may be and still be an identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The shortest IPv4 prefix a passing mechanism may have (16: a /16
    /// at most).
    pub min_ipv4_prefix: u8,
    /// The shortest IPv6 prefix (32).
    pub min_ipv6_prefix: u8,
    /// Most records fetched (the domain's, its includes and redirects);
    /// SPF itself allows 10 lookups.
    pub max_records: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { min_ipv4_prefix: 16, min_ipv6_prefix: 32, max_records: 10 }
    }
}

/// What a domain's SPF record authorises.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Only networks within the limits.
    Specific,
    /// More: the mechanism (or the reason) that makes it so.
    Wide(String),
}

/// The scope of `domain`'s SPF record. `Err` only for a lookup that may
/// succeed later (timeout, server failure, the hook's lookup limit); a
/// missing or broken record is [`Scope::Wide`].
pub fn scope(host: &mut dyn Host, domain: &str, limits: &Limits) -> Result<Scope, DnsError> {
    let mut queue = vec![domain.trim_end_matches('.').to_ascii_lowercase()];
    let mut fetched = 0u32;
    while let Some(d) = queue.pop() {
        fetched += 1;
        if fetched > limits.max_records {
            return Ok(Scope::Wide(format!("more than {} records to follow", limits.max_records)));
        }
        let txt = match host.lookup(&d, RecordType::Txt) {
            Ok(t) => t,
            Err(DnsError::NxDomain | DnsError::NoData) => return Ok(Scope::Wide(format!("no SPF record at {d}"))),
            Err(e) => return Err(e),
        };
        let records: Vec<&String> = txt.iter().filter(|t| is_spf(t)).collect();
        let record = match records.as_slice() {
            [r] => r.as_str(),
            [] => return Ok(Scope::Wide(format!("no SPF record at {d}"))),
            _ => return Ok(Scope::Wide(format!("more than one SPF record at {d}"))),
        };
        match terms(record, limits) {
            Err(why) => return Ok(Scope::Wide(format!("{d}: {why}"))),
            Ok(next) => queue.extend(next),
        }
    }
    Ok(Scope::Specific)
}

/// True for a `v=spf1` record.
fn is_spf(txt: &str) -> bool {
    let t = txt.trim_start();
    t.len() >= 6 && t[..6].eq_ignore_ascii_case("v=spf1") && t[6..].chars().next().is_none_or(|c| c == ' ')
}

/// Checks one record's terms; the domains to follow, or why it is wide.
fn terms(record: &str, limits: &Limits) -> Result<Vec<String>, String> {
    let mut follow = Vec::new();
    let mut redirect = None;
    let mut has_all = false;
    for term in record.split_ascii_whitespace().skip(1) {
        let lower = term.to_ascii_lowercase();
        let (qualifier, body) = match lower.as_bytes().first() {
            Some(q @ (b'+' | b'-' | b'~' | b'?')) => (*q, &lower[1..]),
            _ => (b'+', lower.as_str()),
        };
        let name_end = body.find([':', '/', '=']).unwrap_or(body.len());
        let (name, rest) = body.split_at(name_end);
        if let Some(value) = rest.strip_prefix('=') {
            // A modifier: only `redirect` changes what passes.
            if name == "redirect" {
                redirect = Some(domain_arg(value)?);
            }
            continue;
        }
        let passes = qualifier == b'+';
        match name {
            "all" => {
                has_all = true;
                if passes {
                    return Err(format!("{term} authorises every address"));
                }
            }
            "ip4" | "ip6" => {
                let arg = rest.strip_prefix(':').ok_or_else(|| format!("{term}: no address"))?;
                let (addr, len) = match arg.split_once('/') {
                    Some((a, l)) => (a, Some(l.parse::<u8>().map_err(|_| format!("{term}: bad prefix length"))?)),
                    None => (arg, None),
                };
                let v6 = name == "ip6";
                let valid = if v6 { addr.parse::<std::net::Ipv6Addr>().is_ok() } else { addr.parse::<std::net::Ipv4Addr>().is_ok() };
                if !valid {
                    return Err(format!("{term}: bad address"));
                }
                if passes {
                    check_len(term, len, v6, limits)?;
                }
            }
            "a" | "mx" => {
                let (domain, cidr) = match rest.strip_prefix(':') {
                    Some(a) => a.split_at(a.find('/').unwrap_or(a.len())),
                    None => ("", rest),
                };
                if domain.contains('%') && passes {
                    return Err(format!("{term}: a macro can match any address"));
                }
                let (v4, v6) = match cidr.strip_prefix("//") {
                    Some(l6) => (None, Some(l6)),
                    None => match cidr.strip_prefix('/') {
                        Some(c) => match c.split_once("//") {
                            Some((l4, l6)) => (Some(l4), Some(l6)),
                            None => (Some(c), None),
                        },
                        None if cidr.is_empty() => (None, None),
                        None => return Err(format!("{term}: bad CIDR length")),
                    },
                };
                let parse = |l: Option<&str>| -> Result<Option<u8>, String> {
                    l.map(|l| l.parse::<u8>().map_err(|_| format!("{term}: bad CIDR length"))).transpose()
                };
                let (v4, v6) = (parse(v4)?, parse(v6)?);
                if passes {
                    check_len(term, v4, false, limits)?;
                    check_len(term, v6, true, limits)?;
                }
            }
            "ptr" => {}
            "exists" => {
                if passes {
                    return Err(format!("{term}: `exists` can match any address its zone likes"));
                }
            }
            "include" => {
                let d = rest.strip_prefix(':').ok_or_else(|| format!("{term}: no domain"))?;
                if passes {
                    follow.push(domain_arg(d)?);
                }
            }
            _ => return Err(format!("{term}: unknown mechanism")),
        }
    }
    if let Some(d) = redirect.filter(|_| !has_all) {
        follow.push(d);
    }
    Ok(follow)
}

/// A domain argument without macros.
fn domain_arg(d: &str) -> Result<String, String> {
    if d.contains('%') {
        return Err(format!("{d}: a macro can match any address"));
    }
    if d.is_empty() || d.len() > 253 {
        return Err(format!("{d:?}: not a domain"));
    }
    Ok(d.trim_end_matches('.').to_string())
}

fn check_len(term: &str, len: Option<u8>, v6: bool, limits: &Limits) -> Result<(), String> {
    let (max, min) = if v6 { (128, limits.min_ipv6_prefix) } else { (32, limits.min_ipv4_prefix) };
    match len {
        Some(l) if l > max => Err(format!("{term}: bad prefix length")),
        Some(l) if l < min => Err(format!("{term} is wider than /{min}")),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestHost;

    fn scope_of(records: &[(&str, &str)]) -> Scope {
        let mut h = TestHost::new(0);
        for (name, txt) in records {
            h.dns.add(name, RecordType::Txt, &[txt, "google-site-verification=x"]);
        }
        scope(&mut h, records[0].0, &Limits::default()).unwrap()
    }

    fn wide(s: Scope) -> String {
        match s {
            Scope::Wide(w) => w,
            Scope::Specific => panic!("specific"),
        }
    }

    #[test]
    fn specific_records() {
        let farm = "v=spf1 ip4:198.51.100.0/24 ip4:203.0.113.0/24 ip6:2001:db8::/48 include:_spf.farm.example -all";
        assert_eq!(scope_of(&[("farm.example", farm), ("_spf.farm.example", "v=spf1 a mx/24 ptr ~all")]), Scope::Specific);
        // Only qualifiers that can pass count.
        assert_eq!(scope_of(&[("d.example", "v=spf1 -ip4:0.0.0.0/0 ?all")]), Scope::Specific);
        assert_eq!(scope_of(&[("d.example", "V=SPF1 IP4:192.0.2.1 -ALL")]), Scope::Specific);
        assert_eq!(scope_of(&[("d.example", "v=spf1 ip4:192.0.2.0/16 -all")]), Scope::Specific);
        assert_eq!(scope_of(&[("d.example", "v=spf1 -include:%{i}.x.example -all")]), Scope::Specific);
    }

    #[test]
    fn wide_records() {
        assert!(wide(scope_of(&[("d.example", "v=spf1 +all")])).contains("+all"));
        assert!(wide(scope_of(&[("d.example", "v=spf1 all")])).contains("all"));
        assert!(wide(scope_of(&[("d.example", "v=spf1 ip4:0.0.0.0/1 -all")])).contains("wider than /16"));
        assert!(wide(scope_of(&[("d.example", "v=spf1 ip6:2000::/3 -all")])).contains("wider than /32"));
        assert!(wide(scope_of(&[("d.example", "v=spf1 a/8 -all")])).contains("wider"));
        assert!(wide(scope_of(&[("d.example", "v=spf1 mx//16 -all")])).contains("wider"));
        assert!(wide(scope_of(&[("d.example", "v=spf1 exists:%{i}.bl.example -all")])).contains("exists"));
        assert!(wide(scope_of(&[("d.example", "v=spf1 a:%{i}.x.example -all")])).contains("macro"));
        assert!(wide(scope_of(&[("d.example", "v=spf1 include:%{d}.x.example -all")])).contains("macro"));
        assert!(wide(scope_of(&[("d.example", "v=spf1 frobnicate -all")])).contains("unknown"));
        assert!(wide(scope_of(&[("d.example", "v=spf1 ip4:192.0.2.0/40 -all")])).contains("prefix"));
        // Through an include and a redirect.
        assert!(wide(scope_of(&[("d.example", "v=spf1 include:i.example -all"), ("i.example", "v=spf1 +all")])).contains("i.example"));
        assert!(wide(scope_of(&[("d.example", "v=spf1 redirect=r.example"), ("r.example", "v=spf1 ip4:10.0.0.0/8 -all")])).contains("/8"));
        // A redirect after `all` is ignored (RFC 7208 section 6.1).
        assert_eq!(scope_of(&[("d.example", "v=spf1 -all redirect=r.example"), ("r.example", "v=spf1 +all")]), Scope::Specific);
        // Missing, doubled, looping records.
        assert!(wide(scope_of(&[("d.example", "v=spf1 include:gone.example -all")])).contains("no SPF record at gone.example"));
        let mut h = TestHost::new(0);
        h.dns.add("two.example", RecordType::Txt, &["v=spf1 -all", "v=spf1 +all"]);
        assert!(wide(scope(&mut h, "two.example", &Limits::default()).unwrap()).contains("more than one"));
        h.dns.add("loop.example", RecordType::Txt, &["v=spf1 include:loop.example -all"]);
        assert!(wide(scope(&mut h, "loop.example", &Limits::default()).unwrap()).contains("more than 10"));
    }

    #[test]
    fn failures_are_errors() {
        let mut h = TestHost::new(0);
        h.dns.fail("d.example", RecordType::Txt, DnsError::Timeout);
        assert_eq!(scope(&mut h, "d.example", &Limits::default()), Err(DnsError::Timeout));
    }
}
