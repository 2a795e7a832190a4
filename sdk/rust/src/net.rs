//! Address and name helpers filters keep writing: the client's network
//! (the /24 and /64 greylisting tracks by default), a sender's domain, the
//! organisational domain of a name (feature `psl`).

use std::net::IpAddr;

/// The client's network in CIDR form, `v4_prefix` bits of an IPv4 address
/// (24 for "class C" tracking) or `v6_prefix` bits of an IPv6 one (64);
/// IPv4-mapped IPv6 addresses count as IPv4.
pub fn client_network(ip: IpAddr, v4_prefix: u8, v6_prefix: u8) -> String {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(a) => {
            let p = v4_prefix.min(32);
            let mask = if p == 0 { 0 } else { u32::MAX << (32 - u32::from(p)) };
            format!("{}/{p}", std::net::Ipv4Addr::from(u32::from(a) & mask))
        }
        IpAddr::V6(a) => {
            let p = v6_prefix.min(128);
            let mask = if p == 0 { 0 } else { u128::MAX << (128 - u32::from(p)) };
            format!("{}/{p}", std::net::Ipv6Addr::from(u128::from(a) & mask))
        }
    }
}

/// The domain of an address (`user@Example.ORG` is `example.org`); `None`
/// for the null sender or an address without `@`.
pub fn domain_of(address: &str) -> Option<String> {
    let (_, d) = address.rsplit_once('@')?;
    let d = d.trim_end_matches('.').to_ascii_lowercase();
    (!d.is_empty()).then_some(d)
}

/// The organisational domain of a name by the Public Suffix List:
/// `out3.mail.example.co.uk` is `example.co.uk`, `a.b.outlook.com` is
/// `outlook.com`; `None` for a public suffix itself or a name that is not
/// one. (Feature `psl`: the list is compiled in, about a megabyte.)
#[cfg(feature = "psl")]
pub fn org_domain(name: &str) -> Option<String> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    psl::domain_str(&name).map(str::to_string)
}

/// Words that name end-user access lines in reverse names
/// (`dsl-…`, `…dynamic…`, `cpe-…`, `pool-…`): hosts there are not mail
/// servers, and one provider's customers share its domain.
const DYNAMIC_WORDS: &[&str] = &[
    "dyn",
    "dynamic",
    "dynip",
    "dhcp",
    "dsl",
    "adsl",
    "vdsl",
    "xdsl",
    "cable",
    "dial",
    "dialup",
    "dialin",
    "ppp",
    "pppoe",
    "pool",
    "cpe",
    "broadband",
    "residential",
    "customer",
    "client",
    "dip",
    "ftth",
    "fttx",
    "mobile",
    "wireless",
    "ip",
];

/// True if `name` looks like the reverse name of an end-user access line
/// rather than a mail server: it holds the client's IPv4 address (in
/// order or reversed, dotted, dashed, underscored or zero-padded, or as 8
/// hex digits), or one of the words access providers use for pools of
/// customers (`dynamic`, `dsl`, `cpe`, `pool`, `dhcp`, … as a word of the
/// name, so `mailpool` is not one). A heuristic in the spirit of
/// SpamAssassin's `RDNS_DYNAMIC` and Haraka's `fcrdns`; it is for
/// choosing whom to greylist, never for accepting mail.
pub fn looks_dynamic(name: &str, ip: IpAddr) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let v4 = match ip {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(a) => a.to_ipv4_mapped(),
    };
    if let Some(a) = v4 {
        let o = a.octets();
        let mut forms = Vec::new();
        for order in [[o[0], o[1], o[2], o[3]], [o[3], o[2], o[1], o[0]]] {
            for sep in ["-", ".", "_", ""] {
                let s: Vec<String> = order.iter().map(|b| if sep.is_empty() { format!("{b:03}") } else { b.to_string() }).collect();
                forms.push(s.join(sep));
            }
        }
        forms.push(format!("{:08x}", u32::from(a)));
        // Within a label or across labels, but bounded by non-digits.
        let bounded = |f: &str| {
            name.match_indices(f).any(|(i, _)| {
                let before = name[..i].chars().next_back();
                let after = name[i + f.len()..].chars().next();
                !before.is_some_and(|c| c.is_ascii_alphanumeric()) && !after.is_some_and(|c| c.is_ascii_alphanumeric())
                    || (!before.is_some_and(|c| c.is_ascii_digit()) && !after.is_some_and(|c| c.is_ascii_digit()) && f.len() >= 7)
            })
        };
        if forms.iter().any(|f| bounded(f)) {
            return true;
        }
    }
    name.split(|c: char| !c.is_ascii_alphabetic()).any(|w| DYNAMIC_WORDS.contains(&w))
}

/// The last `labels` labels of a name (`mail.eu.example.org`, 2:
/// `example.org`): a crude organisational domain for names under a
/// one-label suffix, without the Public Suffix List (see `org_domain`,
/// feature `psl`).
pub fn last_labels(name: &str, labels: usize) -> String {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let parts: Vec<&str> = name.split('.').collect();
    parts[parts.len().saturating_sub(labels)..].join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_and_domains() {
        assert_eq!(client_network("192.0.2.77".parse().unwrap(), 24, 64), "192.0.2.0/24");
        assert_eq!(client_network("::ffff:192.0.2.77".parse().unwrap(), 24, 64), "192.0.2.0/24");
        assert_eq!(client_network("2001:db8:1:2:3::1".parse().unwrap(), 24, 64), "2001:db8:1:2::/64");
        assert_eq!(client_network("192.0.2.77".parse().unwrap(), 0, 64), "0.0.0.0/0");
        assert_eq!(domain_of("A@Example.ORG").as_deref(), Some("example.org"));
        assert_eq!(domain_of(""), None);
        assert_eq!(last_labels("mail.eu.example.org.", 2), "example.org");
        assert_eq!(last_labels("org", 2), "org");
    }

    #[test]
    fn dynamic_names() {
        let ip: IpAddr = "203.0.113.7".parse().unwrap();
        for name in [
            "203-0-113-7.example.net",
            "7.113.0.203.example.net",
            "host203_0_113_7.isp.example",
            "c-203-0-113-7.hsd1.example.com",
            "ip203000113007.example.com",
            "cb007107.example.org",
            "dsl-nowhere.example.net",
            "pool-abc.ftth.example.net",
            "x.dynamic.example.net",
            "cpe001122.cable.example",
        ] {
            assert!(looks_dynamic(name, ip), "{name}");
        }
        for name in [
            "mail.example.org",
            "mx1.mailpool.example.com",
            "mail-db8eur05on2100.outbound.protection.outlook.com",
            "o7.ptr1234.sendgrid.net",
            "localhost",
        ] {
            assert!(!looks_dynamic(name, ip), "{name}");
        }
    }

    #[cfg(feature = "psl")]
    #[test]
    fn organisational_domains_by_the_public_suffix_list() {
        assert_eq!(org_domain("out3.Mail.Example.co.uk.").as_deref(), Some("example.co.uk"));
        assert_eq!(org_domain("mail-db5eur01.outbound.protection.outlook.com").as_deref(), Some("outlook.com"));
        assert_eq!(org_domain("co.uk"), None);
        // An unlisted top-level domain is a one-label suffix (the list's `*` rule).
        assert_eq!(org_domain("out-a.mail.bigfarm.test").as_deref(), Some("bigfarm.test"));
        assert_eq!(org_domain("localhost"), None);
    }
}
