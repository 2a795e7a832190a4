//! Store helpers: typed values, TTLs, and [`update`], the bounded
//! compare-and-swap loop every read-modify-write needs (two instances —
//! or two hosts of a farm — may update one record at once).

use crate::host::{Host, WriteOutcome};
use crate::{Error, Result};

/// How many times [`update`] retries a write that lost a race.
pub const UPDATE_TRIES: usize = 4;

/// `n` seconds as a TTL (at least 1, at most `u32::MAX`).
pub fn secs(n: u64) -> u32 {
    u32::try_from(n.max(1)).unwrap_or(u32::MAX)
}

/// `n` minutes as a TTL.
pub fn minutes(n: u64) -> u32 {
    secs(n.saturating_mul(60))
}

/// `n` hours as a TTL.
pub fn hours(n: u64) -> u32 {
    secs(n.saturating_mul(3600))
}

/// `n` days as a TTL.
pub fn days(n: u64) -> u32 {
    secs(n.saturating_mul(86_400))
}

/// Reads a UTF-8 value; `None` if absent (or not UTF-8).
pub fn get_str(host: &mut dyn Host, key: &str) -> Result<Option<String>> {
    Ok(host.get(key)?.and_then(|e| String::from_utf8(e.value).ok()))
}

/// Writes a text value unconditionally.
pub fn set_str(host: &mut dyn Host, key: &str, value: &str, ttl: u32) -> Result<()> {
    host.set(key, value.as_bytes(), ttl, None)?;
    Ok(())
}

/// Reads a number written by [`set_u64`]; `None` if absent or not a number.
pub fn get_u64(host: &mut dyn Host, key: &str) -> Result<Option<u64>> {
    Ok(get_str(host, key)?.and_then(|s| s.trim().parse().ok()))
}

/// Writes a number unconditionally.
pub fn set_u64(host: &mut dyn Host, key: &str, value: u64, ttl: u32) -> Result<()> {
    set_str(host, key, &value.to_string(), ttl)
}

/// What [`update`]'s function decides about a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update<T> {
    /// Write this value (for `ttl` seconds) and return `T` once written.
    Write(Vec<u8>, u32, T),
    /// Leave the record as it is and return `T`.
    Keep(T),
}

/// Reads `key`, lets `f` decide from its current value (`None`: absent)
/// and writes the result only if nobody changed the record meanwhile;
/// retries from a fresh read at most [`UPDATE_TRIES`] times, then gives up
/// with an error (a record that hot is a fault, not a decision).
pub fn update<T>(host: &mut dyn Host, key: &str, mut f: impl FnMut(Option<&[u8]>) -> Update<T>) -> Result<T> {
    for _ in 0..UPDATE_TRIES {
        let current = host.get(key)?;
        let version = current.as_ref().map_or(0, |e| e.version);
        match f(current.as_ref().map(|e| e.value.as_slice())) {
            Update::Keep(t) => return Ok(t),
            Update::Write(value, ttl, t) => match host.set(key, &value, ttl, Some(version))? {
                WriteOutcome::Written(_) => return Ok(t),
                WriteOutcome::Conflict => continue,
            },
        }
    }
    Err(Error(format!("{key}: the record kept changing under compare-and-swap")))
}

/// Adds `by` to a counter record (created at 0) and returns the new count.
pub fn increment(host: &mut dyn Host, key: &str, by: u64, ttl: u32) -> Result<u64> {
    update(host, key, |v| {
        let n = v.and_then(|b| std::str::from_utf8(b).ok()).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0).saturating_add(by);
        Update::Write(n.to_string().into_bytes(), ttl, n)
    })
}

/// A [`Host`] that answers the first read of each of `keys` from one
/// `get-many` (one round trip to a networked store), then reads through:
/// code written as a series of `get`s costs one crossing for them all.
/// Everything else goes to the host as it is.
///
/// It borrows the keys rather than copying them (five copies a decision in
/// the reference filter), so they outlive it.
pub struct Prefetch<'h, 'k> {
    host: &'h mut dyn Host,
    fetched: Vec<(&'k str, Option<crate::host::Entry>)>,
}

impl<'h, 'k> Prefetch<'h, 'k> {
    /// Reads `keys` at once.
    pub fn new(host: &'h mut dyn Host, keys: &[&'k str]) -> Result<Prefetch<'h, 'k>> {
        let got = host.get_many(keys)?;
        Ok(Prefetch { host, fetched: keys.iter().copied().zip(got).collect() })
    }

    /// Where `key` is among the keys not read yet.
    fn position(&self, key: &str) -> Option<usize> {
        // The same string the keys were given as (the usual case: a filter
        // reads the keys it prefetched) is found without reading its bytes:
        // a borrowed `str` cannot change while it is borrowed, so two with
        // the same address and length hold the same bytes. Any other is
        // compared byte for byte.
        let same = |k: &str| std::ptr::eq(k, key) || same_key(k, key);
        self.fetched.iter().position(|(k, _)| same(k))
    }
}

/// `a == b`, eight bytes at a time. In a component `==` on strings is
/// wasi-libc's byte-at-a-time `memcmp`, and a prefetched key (40-odd
/// bytes) is compared at every read.
pub(crate) fn same_key(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let n = a.len();
    if n != b.len() {
        return false;
    }
    let word = |c: &[u8]| <[u8; 8]>::try_from(c).map_or(0, u64::from_ne_bytes);
    if n < 8 {
        return short_word(a) == short_word(b);
    }
    // Whole words, then the last eight bytes (overlapping the last word
    // compared: no byte-by-byte tail).
    let (mut ca, mut cb) = (a.chunks_exact(8), b.chunks_exact(8));
    (&mut ca).zip(&mut cb).all(|(x, y)| word(x) == word(y)) && word(&a[n - 8..]) == word(&b[n - 8..])
}

/// All the bytes of `b` (fewer than eight) in one number, without a loop:
/// its first and last four bytes (overlapping), or for one to three bytes
/// its first, middle and last. Two slices of the same length give the same
/// number exactly when their bytes are equal. (A byte loop costs a
/// compiled component an interruption check at every byte; label values
/// and short names are compared and hashed at every metric update.)
pub(crate) fn short_word(b: &[u8]) -> u64 {
    let n = b.len();
    let quad = |c: &[u8]| <[u8; 4]>::try_from(c).map_or(0, u32::from_le_bytes);
    match n {
        0 => 0,
        1..=3 => u64::from(b[0]) | u64::from(b[n / 2]) << 8 | u64::from(b[n - 1]) << 16,
        4..=7 => u64::from(quad(&b[..4])) | u64::from(quad(&b[n - 4..])) << 32,
        _ => 0,
    }
}

impl Host for Prefetch<'_, '_> {
    fn get(&mut self, key: &str) -> std::result::Result<Option<crate::host::Entry>, crate::host::StoreError> {
        match self.position(key) {
            // Once: a second read (after a conflict) must see the store.
            Some(i) => Ok(self.fetched.swap_remove(i).1),
            None => self.host.get(key),
        }
    }
    fn get_many(&mut self, keys: &[&str]) -> std::result::Result<Vec<Option<crate::host::Entry>>, crate::host::StoreError> {
        self.host.get_many(keys)
    }
    fn set(
        &mut self,
        key: &str,
        value: &[u8],
        ttl: u32,
        if_version: Option<u64>,
    ) -> std::result::Result<WriteOutcome, crate::host::StoreError> {
        self.fetched.retain(|(k, _)| !same_key(k, key));
        self.host.set(key, value, ttl, if_version)
    }
    fn set_many(&mut self, writes: &[crate::host::Write<'_>]) -> std::result::Result<Vec<WriteOutcome>, crate::host::StoreError> {
        self.fetched.retain(|(k, _)| !writes.iter().any(|w| same_key(w.key, k)));
        self.host.set_many(writes)
    }
    fn delete(&mut self, key: &str, if_version: Option<u64>) -> std::result::Result<bool, crate::host::StoreError> {
        self.fetched.retain(|(k, _)| !same_key(k, key));
        self.host.delete(key, if_version)
    }
    fn lookup(&mut self, name: &str, kind: crate::RecordType) -> std::result::Result<Vec<String>, crate::DnsError> {
        self.host.lookup(name, kind)
    }
    fn reverse(&mut self, ip: std::net::IpAddr) -> std::result::Result<Vec<String>, crate::DnsError> {
        self.host.reverse(ip)
    }
    fn spf(&mut self, ip: std::net::IpAddr, helo: &str, sender: &str) -> std::result::Result<crate::SpfOutcome, crate::DnsError> {
        self.host.spf(ip, helo, sender)
    }
    fn forward_confirmed_name(&mut self, ip: std::net::IpAddr) -> std::result::Result<Option<String>, crate::DnsError> {
        self.host.forward_confirmed_name(ip)
    }
    fn counter_add(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.host.counter_add(name, labels, value)
    }
    fn observe(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.host.observe(name, labels, value)
    }
    fn log(&mut self, level: crate::Level, message: &str) {
        self.host.log(level, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestHost;

    #[test]
    fn keys_compare_as_strings_do() {
        let keys =
            ["", "a", "abcdefgh", "abcdefgh1", "abcdefgh2", "t/ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", "t/ABCDEFGHIJKLMNOPQRSTUVWXYZ234568"];
        for a in keys {
            for b in keys {
                assert_eq!(same_key(a, b), a == b, "{a:?} {b:?}");
            }
        }
        // Every length, a difference at every position (words, the
        // overlapping last word, the short path).
        for n in 0..40 {
            let a: String = (0..n).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
            assert!(same_key(&a, &a.clone()));
            for i in 0..n {
                let mut b = a.clone().into_bytes();
                b[i] = b'#';
                let b = String::from_utf8(b).unwrap();
                assert!(!same_key(&a, &b), "{a:?} {b:?}");
            }
        }
    }

    #[test]
    fn prefetch_reads_once_then_through_and_update_retries() {
        let mut h = TestHost::new(100);
        set_u64(&mut h, "a", 1, 60).unwrap();
        let calls = h.store_calls;
        let mut p = Prefetch::new(&mut h, &["a", "b"]).unwrap();
        assert_eq!(get_u64(&mut p, "a").unwrap(), Some(1));
        assert_eq!(get_u64(&mut p, "b").unwrap(), None);
        assert_eq!(h.store_calls, calls + 2, "two keys, one batch");
        // Keys found by their bytes when they are other strings than the
        // ones prefetched.
        let (a, b) = (String::from("a"), String::from("b"));
        let mut p = Prefetch::new(&mut h, &[&a, &b]).unwrap();
        let (a2, b2) = (a.clone(), b.clone());
        assert_eq!(get_u64(&mut p, &b2).unwrap(), None);
        assert_eq!(get_u64(&mut p, &a2).unwrap(), Some(1));
        assert_eq!(h.store_calls, calls + 4, "two keys, one batch");
        // A key that shares its address with a prefetched one but not its
        // length is another key.
        let ab = String::from("ab");
        let mut p = Prefetch::new(&mut h, &[&ab[..1]]).unwrap();
        assert_eq!(get_u64(&mut p, &ab).unwrap(), None);
        assert_eq!(h.store_calls, calls + 6, "read through");
        let mut p = Prefetch::new(&mut h, &["a"]).unwrap();
        // A write between: the next read sees the store, not the batch.
        set_u64(&mut p, "a", 2, 60).unwrap();
        assert_eq!(get_u64(&mut p, "a").unwrap(), Some(2));
        assert_eq!(increment(&mut h, "n", 2, 60).unwrap(), 2);
        assert_eq!(increment(&mut h, "n", 3, 60).unwrap(), 5);
        h.now += 61;
        assert_eq!(get_u64(&mut h, "n").unwrap(), None, "expired");
    }
}
