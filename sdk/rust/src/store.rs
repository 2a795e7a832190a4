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
