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

    #[cfg(feature = "psl")]
    #[test]
    fn organisational_domains_by_the_public_suffix_list() {
        assert_eq!(org_domain("out3.Mail.Example.co.uk.").as_deref(), Some("example.co.uk"));
        assert_eq!(org_domain("mail-db5eur01.outbound.protection.outlook.com").as_deref(), Some("outlook.com"));
        assert_eq!(org_domain("co.uk"), None);
    }
}
