//! The mail side of the contract, with no WebAssembly in it: the types a
//! front end fills in and reads back ([`types`]), how a verdict becomes an
//! SMTP reply ([`reply`]) and how a reply's retry hint is read back
//! ([`retry`]), how much of a message a filter is handed ([`message`]), and
//! the clock that hands filters `now` ([`clock`]).

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

#[cfg(test)]
mod tests {
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
