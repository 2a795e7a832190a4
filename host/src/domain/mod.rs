//! The mail side of the contract, with no WebAssembly in it: the types a
//! front end fills in and reads back ([`types`]), how a verdict becomes an
//! SMTP reply ([`reply`]) and how a reply's retry hint is read back
//! ([`retry`]), how much of a message a filter is handed ([`message`]), and
//! the clock that hands filters `now` ([`clock`]), how a peer's bytes that
//! may not be UTF-8 become text without losing any ([`text`]); and how a client address
//! is read ([`parse_client_address`]), grouped ([`client_network`]) and
//! matched against a setting's networks ([`Network`]).

pub mod clock;
pub mod message;
pub mod reply;
pub mod retry;
pub mod text;
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

/// Writes `ip` as its `Display` writes it (a dotted quad; RFC 5952 for
/// IPv6), in pieces handed to `push`: into whatever buffer the caller
/// writes (the SMTP front end's bytes, a decision line's `String`). IPv4
/// without the formatting machinery, which cost ~1 100 instructions a call,
/// three times a message through `greyhook smtp` (the peer, the Received
/// line, XFORWARD) and once a decision line.
pub fn write_ip(ip: std::net::IpAddr, mut push: impl FnMut(&str)) {
    match ip {
        std::net::IpAddr::V4(a) => {
            for (i, o) in a.octets().into_iter().enumerate() {
                if i > 0 {
                    push(".");
                }
                push(itoa::Buffer::new().format(o));
            }
        }
        std::net::IpAddr::V6(a) => {
            /// `fmt`'s output handed to `push` as it comes.
            struct Pieces<F>(F);
            impl<F: FnMut(&str)> std::fmt::Write for Pieces<F> {
                fn write_str(&mut self, s: &str) -> std::fmt::Result {
                    (self.0)(s);
                    Ok(())
                }
            }
            use std::fmt::Write as _;
            // `Pieces` never fails.
            let _ = write!(Pieces(push), "{a}");
        }
    }
}

/// Appends `ip` as its `Display` writes it, by [`write_ip`].
pub fn push_ip(out: &mut Vec<u8>, ip: std::net::IpAddr) {
    write_ip(ip, |s| out.extend_from_slice(s.as_bytes()));
}

/// `addr` as its `Display` writes it (`192.0.2.1:25`, `[2001:db8::1]:25`),
/// by [`push_ip`].
pub fn socket_addr_text(addr: std::net::SocketAddr) -> String {
    let mut out = Vec::with_capacity(48);
    match addr {
        std::net::SocketAddr::V4(a) => push_ip(&mut out, (*a.ip()).into()),
        std::net::SocketAddr::V6(_) => return addr.to_string(),
    }
    out.push(b':');
    out.extend_from_slice(itoa::Buffer::new().format(addr.port()).as_bytes());
    // Only ASCII digits and dots were written.
    String::from_utf8(out).unwrap_or_else(|_| addr.to_string())
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

/// A network of client addresses in a setting: `192.0.2.0/24`,
/// `2001:db8::/32`, or one address (`127.0.0.1`, `::1`). An IPv4-mapped
/// client (`::ffff:192.0.2.1`) is in an IPv4 network, as
/// [`client_network`] counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    /// The first address, the bits past the prefix cleared.
    base: std::net::IpAddr,
    prefix: u8,
}

impl Network {
    /// Whether `ip` is in this network.
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.base.is_ipv4() && client_network(ip, self.prefix, self.prefix) == self.base
    }
}

/// A network that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("invalid network {0:?}: use ADDRESS or ADDRESS/PREFIX (127.0.0.0/8, ::1, 2001:db8::/32)")]
pub struct NetworkError(String);

impl std::str::FromStr for Network {
    type Err = NetworkError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || NetworkError(s.to_string());
        let (addr, prefix) = s.trim().split_once('/').map_or((s.trim(), None), |(a, p)| (a, Some(p)));
        let ip: std::net::IpAddr = addr.parse().map_err(|_| bad())?;
        let ip = ip.to_canonical();
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            // Digits only: `u8::from_str` also takes a leading `+`.
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?
            }
            Some(_) => return Err(bad()),
        };
        Ok(Network { base: client_network(ip, prefix, prefix), prefix })
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

impl<'de> serde::Deserialize<'de> for Network {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    /// Written as `Display` writes them, for every octet value and the
    /// ports' extremes.
    #[test]
    fn addresses_are_written_as_display_writes_them() {
        use std::net::{IpAddr, Ipv4Addr, SocketAddr};
        let mut addrs: Vec<IpAddr> = (0..=255u8).map(|o| Ipv4Addr::new(o, 255 - o, o / 2, o.wrapping_mul(7)).into()).collect();
        addrs.extend(
            ["0.0.0.0", "255.255.255.255", "2001:db8::1", "::ffff:192.0.2.1", "::", "fe80::1:2:3:4"].map(|a| a.parse::<IpAddr>().unwrap()),
        );
        for ip in addrs {
            let mut out = Vec::new();
            super::push_ip(&mut out, ip);
            assert_eq!(String::from_utf8(out).unwrap(), ip.to_string());
            let mut line = String::from("client=");
            super::write_ip(ip, |s| line.push_str(s));
            assert_eq!(line, format!("client={ip}"));
            for port in [0, 9, 10, 25, 65535] {
                let a = SocketAddr::new(ip, port);
                assert_eq!(super::socket_addr_text(a), a.to_string());
            }
        }
    }

    #[test]
    fn networks_parse_and_hold_their_addresses() {
        let net = |s: &str| s.parse::<super::Network>();
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let lo = net("127.0.0.0/8").unwrap();
        assert!(lo.contains(ip("127.1.2.3")) && lo.contains(ip("::ffff:127.0.0.1")) && !lo.contains(ip("128.0.0.1")));
        assert!(!lo.contains(ip("::1")) && !lo.contains(ip("7f00::1")), "an IPv6 address is never in an IPv4 network");
        let one = net("::1").unwrap();
        assert!(one.contains(ip("::1")) && !one.contains(ip("::2")) && one.to_string() == "::1/128");
        assert_eq!(net("192.0.2.77/24").unwrap().to_string(), "192.0.2.0/24", "host bits are cleared");
        assert_eq!(net("::ffff:10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8", "a mapped address is IPv4");
        assert!(net("0.0.0.0/0").unwrap().contains(ip("203.0.113.9")));
        for bad in
            ["", "/8", "127.0.0.1/", "127.0.0.1/33", "::1/129", "127.0.0.1/+8", "127.0.0.1/-1", "localhost", "127.0.0.0/8/8", "1.2.3.4 /8"]
        {
            assert!(net(bad).is_err(), "{bad:?} accepted");
        }
    }

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
