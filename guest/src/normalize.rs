//! Client networks, address normalisation and the triplet key.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use sha1::{Digest, Sha1};

use crate::bytes;

/// The client's network for greylisting ("class C" tracking in the draft):
/// the address masked to `v4`/`v6` bits, as `192.0.2.0/24` or `2001:db8::/64`.
/// IPv4-mapped IPv6 addresses count as IPv4.
pub fn client_network(ip: IpAddr, v4: u8, v6: u8) -> String {
    let ip = match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4addr => v4addr,
    };
    match ip {
        IpAddr::V4(a) => {
            let len = v4.min(32);
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
            // At every decision: digits written directly into one buffer
            // and copied once (`format!` and `Ipv4Addr`'s `Display` cost
            // several times more in Wasm, and so did a `push_str` a piece:
            // each a `memory.copy` call).
            let mut b = [0u8; 18];
            let mut n = 0;
            for (i, o) in Ipv4Addr::from(u32::from(a) & mask).octets().into_iter().enumerate() {
                if i > 0 {
                    b[n] = b'.';
                    n += 1;
                }
                push_u8(&mut b, &mut n, o);
            }
            b[n] = b'/';
            n += 1;
            push_u8(&mut b, &mut n, len);
            // Digits, dots and a slash: always UTF-8.
            String::from(std::str::from_utf8(&b[..n]).unwrap_or_default())
        }
        IpAddr::V6(a) => {
            let len = v6.min(128);
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - u32::from(len)) };
            format!("{}/{len}", Ipv6Addr::from(u128::from(a) & mask))
        }
    }
}

/// Writes `v` in decimal at `b[*n..]` and moves `n` past it (at most
/// three bytes).
fn push_u8(b: &mut [u8], n: &mut usize, v: u8) {
    if v >= 100 {
        b[*n] = b'0' + v / 100;
        *n += 1;
    }
    if v >= 10 {
        b[*n] = b'0' + v / 10 % 10;
        *n += 1;
    }
    b[*n] = b'0' + v % 10;
    *n += 1;
}

/// Why an address cannot be used in a triplet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadAddress(pub &'static str);

/// The longest address accepted (RFC 5321: 64 local + 1 + 255 domain).
pub const MAX_ADDRESS: usize = 320;

/// Checks an envelope address (without angle brackets) is usable: not too
/// long, no spaces, controls or brackets. The empty string (the null
/// sender) is allowed here; callers decide what it means.
pub fn check_address(a: &str) -> Result<(), BadAddress> {
    if a.len() > MAX_ADDRESS {
        return Err(BadAddress("address longer than 320 bytes"));
    }
    if bytes::find(a.as_bytes(), bytes::not_in_address).is_some() {
        return Err(BadAddress("address contains spaces, control characters or angle brackets"));
    }
    Ok(())
}

/// `a` split at its last `@` (local part, domain). Searched a word at a
/// time from the end (`bytes::rfind`): `rsplit_once`'s `memrchr` cost
/// ~280 instructions a call compiled to Wasm (4 a decision), ~140 native,
/// and a byte loop ~25 a byte of the domain. `@` is ASCII, so the cut is
/// on a character boundary.
pub fn split_at_last_at(a: &str) -> Option<(&str, &str)> {
    let i = bytes::rfind(a.as_bytes(), |x| bytes::equal(x, b'@'))?;
    Some((&a[..i], &a[i + 1..]))
}

/// Normalises a recipient: lower case.
pub fn normalize_recipient(a: &str) -> String {
    a.to_ascii_lowercase()
}

/// Normalises a sender so that VERP, BATV and SRS senders map to one key:
/// lower case; SRS0/SRS1 rewritten to the original address; BATV `prvs=`
/// and `btv1==` tags removed; a `+extension` removed; runs of digits in
/// the local part replaced by `#`.
pub fn normalize_sender(a: &str) -> String {
    let a = a.to_ascii_lowercase();
    // Slices of `a`, not copies (this runs at every decision); only an SRS1
    // address needs a new string.
    let (mut local, mut domain) = match split_at_last_at(&a) {
        Some((l, d)) => (l, d),
        None => return a,
    };
    // SRS1=HHH=fwd.example==HHH=TT=orig.example=user@relay: the part after
    // `==` has the SRS0 shape.
    let srs0: String;
    if let Some(rest) = local.strip_prefix("srs1=")
        && let Some((_, tail)) = rest.split_once("==")
    {
        srs0 = ["srs0=", tail].concat();
        local = &srs0;
    }
    if let Some(rest) = local.strip_prefix("srs0=") {
        // HHH=TT=orig-domain=orig-local (orig-local may itself contain `=`).
        let mut parts = rest.splitn(4, '=');
        if let (Some(_), Some(_), Some(d), Some(l)) = (parts.next(), parts.next(), parts.next(), parts.next())
            && !d.is_empty()
            && !l.is_empty()
        {
            domain = d;
            local = l;
        }
    }
    if let Some(rest) = local.strip_prefix("prvs=") {
        // prvs=KDDDSSSSSS=user (RFC draft) or prvs=user=KDDDSSSSSS (some MTAs).
        if let Some((a, b)) = rest.split_once('=') {
            local = if is_batv_tag(a) {
                b
            } else if is_batv_tag(b) {
                a
            } else {
                b
            };
        }
    } else if let Some(rest) = local.strip_prefix("btv1==")
        && let Some((_, user)) = rest.split_once("==")
    {
        local = user;
    }
    // (A word-at-a-time search: `split_once('+')`'s char searcher cost
    // ~340 instructions compiled to Wasm.)
    if let Some(plus) = bytes::find(local.as_bytes(), |x| bytes::equal(x, b'+'))
        && plus > 0
    {
        local = &local[..plus];
    }
    let mut out = String::with_capacity(local.len() + domain.len() + 1);
    // Each run of digits as one `#`, the text between copied whole (a
    // `char` at a time cost ~30 instructions a character compiled to
    // Wasm), both found a word at a time. Digits are ASCII, so every cut
    // is on a character boundary.
    let mut rest = local;
    while let Some(i) = bytes::find(rest.as_bytes(), bytes::digit) {
        out.push_str(&rest[..i]);
        out.push('#');
        let run = bytes::find(&rest.as_bytes()[i..], bytes::not_digit).unwrap_or(rest.len() - i);
        rest = &rest[i + run..];
    }
    out.push_str(rest);
    out.push('@');
    out.push_str(domain);
    out
}

fn is_batv_tag(s: &str) -> bool {
    s.len() == 10 && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// The triplet key of the draft's section 2.1: BASE32 (RFC 4648, no
/// padding) of the SHA1 of the client network, sender and recipient (or
/// whatever the stage keys on), each separated by a NUL byte.
pub fn triplet_key(parts: &[&str]) -> String {
    prefixed_triplet_key("", parts)
}

/// `prefix` followed by [`triplet_key`], built in one allocation.
pub fn prefixed_triplet_key(prefix: &str, parts: &[&str]) -> String {
    let mut h = Sha1::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            h.update([0u8]);
        }
        h.update(p.as_bytes());
    }
    let mut key = String::with_capacity(prefix.len() + 32);
    key.push_str(prefix);
    push_base32(&mut key, &h.finalize().into());
    key
}

/// Appends BASE32 (RFC 4648, upper case, no padding) of a SHA1 digest:
/// 32 characters, five bits each. Written by hand for this one length
/// (every decision hashes a triplet): `data_encoding`'s encoder, for any
/// base, length and padding, cost ~780 instructions a key compiled to Wasm.
fn push_base32(out: &mut String, digest: &[u8; 20]) {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut text = [0u8; 32];
    // Five bytes make eight characters.
    for (five, eight) in digest.chunks_exact(5).zip(text.chunks_exact_mut(8)) {
        let v = five.iter().fold(0u64, |v, &b| v << 8 | u64::from(b));
        for (i, c) in eight.iter_mut().enumerate() {
            *c = ALPHABET[(v >> (35 - 5 * i)) as usize & 31];
        }
    }
    // The alphabet is ASCII: always UTF-8.
    out.push_str(std::str::from_utf8(&text).unwrap_or_default());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_written_as_rfc_4648_base32() {
        // RFC 4648's test vectors are not 20 bytes long: the digests of
        // 5 000 strings against `data_encoding`, and every byte value at
        // every position.
        let check = |d: [u8; 20]| {
            let mut s = String::from("p/");
            push_base32(&mut s, &d);
            assert_eq!(s, format!("p/{}", data_encoding::BASE32_NOPAD.encode(&d)));
        };
        for i in 0..5_000u32 {
            check(Sha1::digest(i.to_le_bytes()).into());
        }
        for pos in 0..20 {
            for v in 0..=255u8 {
                let mut d = [0u8; 20];
                d[pos] = v;
                check(d);
            }
        }
    }

    #[test]
    fn networks() {
        assert_eq!(client_network("192.0.2.77".parse().unwrap(), 24, 64), "192.0.2.0/24");
        assert_eq!(client_network("192.0.2.77".parse().unwrap(), 32, 64), "192.0.2.77/32");
        assert_eq!(client_network("2001:db8:1:2:3:4:5:6".parse().unwrap(), 24, 64), "2001:db8:1:2::/64");
        assert_eq!(client_network("::ffff:192.0.2.9".parse().unwrap(), 24, 64), "192.0.2.0/24");
        assert_eq!(client_network("10.200.3.4".parse().unwrap(), 0, 64), "0.0.0.0/0");
        assert_eq!(client_network("10.200.3.4".parse().unwrap(), 16, 64), "10.200.0.0/16");
        // Every octet value at every place, every prefix length, against
        // `Display`.
        for len in 0..=32u8 {
            for place in 0..4 {
                for v in 0..=255u8 {
                    let mut o = [198, 51, 100, 7];
                    o[place] = v;
                    let a = Ipv4Addr::from(o);
                    let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
                    let want = format!("{}/{len}", Ipv4Addr::from(u32::from(a) & mask));
                    assert_eq!(client_network(IpAddr::V4(a), len, 64), want);
                }
            }
        }
    }

    #[test]
    fn senders() {
        assert_eq!(normalize_sender("John.Doe@Example.COM"), "john.doe@example.com");
        assert_eq!(normalize_sender("list+bounces-123@x.org"), "list@x.org");
        assert_eq!(normalize_sender("bounce-12345-67@x.org"), "bounce-#-#@x.org");
        assert_eq!(normalize_sender("1a22b333@x.org"), "#a#b#@x.org");
        assert_eq!(normalize_sender("ü12ä3ö@x.org"), "ü#ä#ö@x.org");
        assert_eq!(normalize_sender("007@x.org"), "#@x.org");
        assert_eq!(normalize_sender("prvs=1234abcdef=user@x.org"), "user@x.org");
        assert_eq!(normalize_sender("prvs=user=1234abcdef@x.org"), "user@x.org");
        assert_eq!(normalize_sender("btv1==123abc==user@x.org"), "user@x.org");
        assert_eq!(normalize_sender("SRS0=HHH=TT=orig.example=alice@fwd.example"), "alice@orig.example");
        assert_eq!(normalize_sender("SRS1=HHH=fwd1.example==HHH=TT=orig.example=alice@fwd2.example"), "alice@orig.example");
        assert_eq!(normalize_sender(""), "");
        assert_eq!(normalize_sender("postmaster"), "postmaster");
        // The last `@` splits; a leading `+` is not an extension; the
        // first `+` starts one.
        assert_eq!(normalize_sender("\"a@b\"@X.org"), "\"a@b\"@x.org");
        assert_eq!(normalize_sender("+tag@x.org"), "+tag@x.org");
        assert_eq!(normalize_sender("a+b+c@x.org"), "a@x.org");
        assert_eq!(normalize_sender("Ünï+x@Ex.org"), "Ünï@ex.org");
        assert_eq!(split_at_last_at("a@b@c"), Some(("a@b", "c")));
        assert_eq!(split_at_last_at("@"), Some(("", "")));
        assert_eq!(split_at_last_at("é"), None);
    }

    #[test]
    fn key_is_sha1_base32() {
        let k = triplet_key(&["192.0.2.0/24", "a@b", "c@d"]);
        assert_eq!(k.len(), 32);
        assert!(k.bytes().all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b)));
        assert_ne!(k, triplet_key(&["192.0.2.0/24", "a@bc", "@d"]));
        // The well-known SHA1 of "abc", BASE32.
        assert_eq!(triplet_key(&["abc"]), "VGMT4NSHA2AWVOR6EVYXQUGCNSONBWE5");
    }

    #[test]
    fn addresses() {
        assert!(check_address("a@b").is_ok());
        assert!(check_address("").is_ok());
        assert!(check_address("a b@c").is_err());
        assert!(check_address(&"x".repeat(400)).is_err());
    }
}
