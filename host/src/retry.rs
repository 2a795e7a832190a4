//! The retry hint: rendering the draft's `retry=[DD-]HH:MM:SS`, and reading
//! retry hints out of SMTP replies as a client must (seeds 002 and 003), in
//! the draft's format and the informal ones seen in the wild:
//! `retry=2 minutes`, `TIME=300`, `please come back in 00:09:00`,
//! `try again in 240 seconds`, `Greylisted for 5 minutes`.
//!
//! Hand-written: no crate parses these, and a regex engine would be a large
//! dependency for a few fixed shapes.

/// The largest hint the draft's ABNF can express: 99 days, 23:59:59.
pub const MAX_RETRY: u64 = 99 * 86_400 + 86_399;

/// Renders `secs` as `retry=HH:MM:SS`, or `retry=DD-HH:MM:SS` from one day
/// on; clamped to `retry=99-23:59:59` (the ABNF allows two digits of days).
pub fn format_retry(secs: u64) -> String {
    let s = secs.min(MAX_RETRY);
    let (d, h, m, sec) = (s / 86_400, s % 86_400 / 3600, s % 3600 / 60, s % 60);
    if d > 0 { format!("retry={d:02}-{h:02}:{m:02}:{sec:02}") } else { format!("retry={h:02}:{m:02}:{sec:02}") }
}

/// Reads the retry hint from a reply (one or more lines, with or without
/// reply codes): the draft's `retry=` on the last line first, then any
/// known informal form on any line. Returns seconds.
pub fn parse_retry_hint(reply: &str) -> Option<u64> {
    let lines: Vec<String> = reply.lines().map(|l| strip_code(l).to_ascii_lowercase()).collect();
    if let Some(last) = lines.iter().rev().find(|l| !l.trim().is_empty())
        && let Some(s) = find_after(last, "retry=", strict_clock)
    {
        return Some(s);
    }
    lines.iter().rev().find_map(|l| informal(l))
}

fn strip_code(line: &str) -> &str {
    let b = line.as_bytes();
    if b.len() >= 3 && b[..3].iter().all(u8::is_ascii_digit) && (b.len() == 3 || b[3] == b' ' || b[3] == b'-') {
        line.get(4..).unwrap_or("")
    } else {
        line
    }
}

/// Applies `parse` right after each occurrence of `key` in `line`.
fn find_after(line: &str, key: &str, parse: fn(&str) -> Option<u64>) -> Option<u64> {
    let mut from = 0;
    while let Some(i) = line[from..].find(key) {
        let start = from + i + key.len();
        if let Some(v) = parse(&line[start..]) {
            return Some(v);
        }
        from = start;
    }
    None
}

fn informal(line: &str) -> Option<u64> {
    find_after(line, "retry=", |s| strict_clock(s).or_else(|| amount(s, true)))
        .or_else(|| find_after(line, "retry ", |s| strict_clock(s).or_else(|| amount(s, false))))
        .or_else(|| find_after(line, "time=", |s| amount(s, true)))
        .or_else(|| {
            [" in ", " for ", " after ", "wait "].iter().find_map(|k| find_after(line, k, |s| loose_clock(s).or_else(|| amount(s, false))))
        })
}

/// Leading decimal digits of `s` (at most 9) and the rest.
fn digits(s: &str) -> Option<(u64, &str)> {
    let n = s.bytes().take_while(u8::is_ascii_digit).count();
    if n == 0 || n > 9 {
        return None;
    }
    Some((s[..n].parse().ok()?, &s[n..]))
}

/// `[DD-]HH:MM:SS` exactly as in the draft's ABNF.
fn strict_clock(s: &str) -> Option<u64> {
    let two = |s: &str| -> Option<u64> {
        let b = s.as_bytes();
        if b.len() >= 2 && b[0].is_ascii_digit() && b[1].is_ascii_digit() {
            Some(u64::from((b[0] - b'0') * 10 + (b[1] - b'0')))
        } else {
            None
        }
    };
    let (days, rest) = match (two(s), s.as_bytes().get(2)) {
        (Some(d), Some(b'-')) => (d, &s[3..]),
        _ => (0, s),
    };
    let h = two(rest)?;
    let r = rest.get(2..)?.strip_prefix(':')?;
    let m = two(r)?;
    let r = r.get(2..)?.strip_prefix(':')?;
    let sec = two(r)?;
    if r.as_bytes().get(2).is_some_and(u8::is_ascii_digit) || h > 23 || m > 59 || sec > 59 {
        return None;
    }
    Some(days * 86_400 + h * 3600 + m * 60 + sec)
}

/// `H:MM:SS` or `MM:SS` with any number of leading digits.
fn loose_clock(s: &str) -> Option<u64> {
    let (a, r) = digits(s)?;
    let (b, r) = digits(r.strip_prefix(':')?)?;
    match r.strip_prefix(':').and_then(digits) {
        Some((c, _)) if b < 60 && c < 60 => Some(a * 3600 + b * 60 + c),
        None if b < 60 => Some(a * 60 + b),
        _ => None,
    }
}

/// `300`, `300s`, `2 minutes`, `1 hour`, `2d`; a bare number is seconds
/// only where `bare` is set (after `retry=` and `time=`).
fn amount(s: &str, bare: bool) -> Option<u64> {
    let (n, rest) = digits(s)?;
    if rest.starts_with([':', '.', ',', '-']) && rest[1..].starts_with(|c: char| c.is_ascii_digit()) {
        // A malformed clock or a decimal, not an amount.
        return None;
    }
    let rest = rest.trim_start();
    let word: String = rest.chars().take_while(char::is_ascii_alphabetic).collect();
    let mult = match word.as_str() {
        "s" | "sec" | "secs" | "second" | "seconds" => 1,
        "m" | "min" | "mins" | "minute" | "minutes" => 60,
        "h" | "hr" | "hrs" | "hour" | "hours" => 3600,
        "d" | "day" | "days" => 86_400,
        "" if bare => 1,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_abnf() {
        assert_eq!(format_retry(0), "retry=00:00:00");
        assert_eq!(format_retry(120), "retry=00:02:00");
        assert_eq!(format_retry(86_400 + 600), "retry=01-00:10:00");
        assert_eq!(format_retry(u64::MAX), "retry=99-23:59:59");
    }

    #[test]
    fn reads_the_draft_and_the_wild() {
        for (text, want) in [
            ("451 4.7.1. Greylist enabled. retry=00:02:00", 120),
            ("450 Temporary Greylist rejection. retry=01-00:10:00", 87_000),
            ("451 retry=01:00:00 Try again at the suggested retry time.", 3600),
            ("421 Your connection is greylisted. Please try again later (retry=00:01:00)", 60),
            ("451-Greylisted. See policy\r\n451 Retry=00:02:00\r\n", 120),
            ("450 4.7.1 Greylisted. Please Disconnect now. retry=2 minutes", 120),
            ("421 4.7.1 Greylist enabled. Try again later. retry=5 minutes", 300),
            ("451 4.7.1 Greylisted TIME=300", 300),
            ("450 4.2.0 Greylisted, please come back in 00:09:00", 540),
            ("451 4.7.1 Please try again in 240 seconds", 240),
            ("450 4.7.1 Greylisted for 5 minutes", 300),
        ] {
            assert_eq!(parse_retry_hint(text), Some(want), "{text}");
        }
        assert_eq!(parse_retry_hint("451 4.3.0 Try again later"), None);
        assert_eq!(parse_retry_hint("451 retry=24:00:00"), None);
    }
}
