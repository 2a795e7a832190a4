//! The mail side of the contract, with no WebAssembly in it: the types a
//! front end fills in and reads back ([`types`]), how a verdict becomes an
//! SMTP reply ([`reply`]) and how a reply's retry hint is read back
//! ([`retry`]), how much of a message a filter is handed ([`message`]), and
//! the clock that hands filters `now` ([`clock`]); and how a client address
//! is read ([`parse_client_address`]) and grouped ([`client_network`]).

pub mod clock;
pub mod message;
pub mod reply;
pub mod retry;
pub use greyhook_types as types;

/// A client address as an MTA writes it: `192.0.2.1`, `2001:db8::1`, with
/// an `IPv6:` prefix (Sendmail, OpenSMTPD), and an IPv6 link-local one
/// with its scope (`fe80::1%eth0`: `getnameinfo`, so Postfix and
/// OpenSMTPD, write it so). The scope is left aside: a front end that
/// could not read such an address took the session for a local one and did
/// not greylist it.
pub fn parse_client_address(s: &str) -> Option<std::net::IpAddr> {
    let s = s.trim();
    let bare = s.get(..5).filter(|p| p.eq_ignore_ascii_case("ipv6:")).map_or(s, |_| &s[5..]);
    let unscoped = match bare.split_once('%') {
        // Only an IPv6 address has a scope.
        Some((a, _)) if a.contains(':') => a,
        _ => bare,
    };
    unscoped.parse().ok()
}

/// The network `ip` belongs to: its first `v4` or `v6` bits (lengths over
/// 32 or 128 count as 32 or 128). An IPv4-mapped IPv6 address
/// (`::ffff:192.0.2.1`, as a dual-stack socket reports an IPv4 client) is
/// the IPv4 address it stands for, as the reference filter counts it: cut
/// as IPv6, every IPv4 client would fall into one network.
pub fn client_network(ip: std::net::IpAddr, v4: u8, v6: u8) -> std::net::IpAddr {
    use std::net::IpAddr;
    match ip.to_canonical() {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(v4.min(32))).unwrap_or(0);
            IpAddr::V4((u32::from(a) & mask).into())
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(v6.min(128))).unwrap_or(0);
            IpAddr::V6((u128::from(a) & mask).into())
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn client_networks_cut_addresses_and_take_mapped_ones_as_ipv4() {
        let net = |s: &str, v4, v6| super::client_network(s.parse().unwrap(), v4, v6).to_string();
        assert_eq!(net("192.0.2.7", 32, 84), "192.0.2.7");
        assert_eq!(net("::ffff:192.0.2.7", 24, 84), "192.0.2.0");
        assert_eq!(net("2001:db8:1:2:3:4:5:6", 32, 84), "2001:db8:1:2:3::");
        assert_eq!(net("2001:db8:1:2:3:0fff:ffff:ffff", 32, 84), "2001:db8:1:2:3::");
        assert_eq!(net("2001:db8:1:2:3:f000::1", 32, 84), "2001:db8:1:2:3:f000::");
        assert_eq!(net("2001:db8::1", 24, 200), "2001:db8::1");
        assert_eq!(net("192.0.2.7", 0, 0), "0.0.0.0");
        assert_eq!(net("2001:db8::1", 0, 0), "::");
    }

    #[test]
    fn client_addresses_as_mtas_write_them() {
        let p = |s: &str| super::parse_client_address(s).map(|a| a.to_string());
        assert_eq!(p("192.0.2.1").as_deref(), Some("192.0.2.1"));
        assert_eq!(p("2001:db8::1").as_deref(), Some("2001:db8::1"));
        assert_eq!(p("IPv6:2001:db8::1").as_deref(), Some("2001:db8::1"));
        assert_eq!(p("fe80::1%eth0").as_deref(), Some("fe80::1"));
        assert_eq!(p("IPv6:fe80::1%2").as_deref(), Some("fe80::1"));
        assert_eq!(p("192.0.2.1%eth0"), None);
        assert_eq!(p("unknown"), None);
        assert_eq!(p(""), None);
    }
}
