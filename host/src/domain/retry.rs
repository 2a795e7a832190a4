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
    let mut out = String::with_capacity(17);
    write_retry(&mut out, secs);
    out
}

/// Appends what [`format_retry`] returns (replies are rendered in place).
pub(crate) fn write_retry(out: &mut String, secs: u64) {
    let s = secs.min(MAX_RETRY);
    let (d, h, m, sec) = (s / 86_400, s % 86_400 / 3600, s % 3600 / 60, s % 60);
    out.push_str("retry=");
    if d > 0 {
        push_digits(out, d, 2);
        out.push('-');
    }
    push_digits(out, h, 2);
    out.push(':');
    push_digits(out, m, 2);
    out.push(':');
    push_digits(out, sec, 2);
}

/// Appends `v` in decimal, zero-padded to at least `width` digits (reply
/// codes, the retry hint, log timestamps: written in place, no `format!`).
/// Through `itoa`: two digits a step, and no UTF-8 check of the digits
/// (a digit at a time and `from_utf8` cost ~50 instructions a number, six
/// numbers or more a policy request).
pub(crate) fn push_digits(out: &mut String, v: u64, width: usize) {
    let mut buf = itoa::Buffer::new();
    let digits = buf.format(v);
    for _ in digits.len()..width {
        out.push('0');
    }
    out.push_str(digits);
}

/// The delay a client should wait before retrying, read from a whole
/// reply as the server sent it (every line with its code, `451-...` then
/// `451 ...`; CRLF or LF between lines). Only a 4yz reply carries a delay:
/// anything else is `None`, whatever its text says. For SMTP client and MTA
/// authors, and `greyhook hint`.
///
/// ```
/// use greyhook::retry::reply_delay;
/// assert_eq!(reply_delay("451 4.7.1 Greylisted retry=00:05:00\r\n"), Some(300));
/// assert_eq!(reply_delay("451-You should wait another 187 seconds.\r\n451 Try later\r\n"), Some(187));
/// assert_eq!(reply_delay("554 5.4.7 unable to deliver in 840 minutes"), None);
/// ```
pub fn reply_delay(reply: &str) -> Option<u64> {
    let code = reply_code(reply)?;
    retry_delay(code, reply)
}

/// The code of a reply (its first line's), if it starts with one.
pub fn reply_code(reply: &str) -> Option<u16> {
    let first = reply.trim_start().lines().next()?;
    let b = first.as_bytes();
    if b.len() >= 3 && b[..3].iter().all(u8::is_ascii_digit) && matches!(b.get(3), None | Some(b' ') | Some(b'-')) {
        first[..3].parse().ok().filter(|c| (200..600).contains(c))
    } else {
        None
    }
}

/// The delay of a reply whose code is known (`lines` with or without
/// their codes): `None` unless `code` is 4yz.
pub fn retry_delay(code: u16, lines: &str) -> Option<u64> {
    if code / 100 != 4 {
        return None;
    }
    parse_retry_hint(lines)
}

/// Reads the retry hint from a reply's text (one or more lines, with or
/// without reply codes, whatever the code): the draft's `retry=` on the
/// last line first, then any known informal form on any line, the last
/// first. Returns seconds. Prefer [`reply_delay`], which also checks that
/// the reply is a 4yz.
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
            [" in ", " for ", " after ", "wait ", "another "]
                .iter()
                .find_map(|k| find_after(line, k, |s| loose_clock(s).or_else(|| go_duration(s)).or_else(|| amount(s, false))))
        })
}

/// One deferral in a Postfix or Exim log line: who (the Postfix queue
/// ID, or the Exim recipient) and the delay the server's reply asked for
/// (`None` when it asked for none). `None` for lines that are not a
/// deferral with the server's reply.
///
/// Postfix: `... postfix/smtp[1]: 4BDAC992063: to=<u@example.com>, ...,
/// status=deferred (host mx[192.0.2.1] said: 451 4.7.1 Greylisted
/// retry=00:05:00 (in reply to RCPT TO command))`. Exim: `... 1abcDE-000123-AB
/// == u@example.com R=dnslookup T=remote_smtp defer (-44) H=mx [192.0.2.1]:
/// SMTP error from remote mail server after RCPT TO:<u@example.com>: 451
/// 4.7.1 Greylisted retry=00:05:00`.
pub fn log_deferral(line: &str) -> Option<(String, Option<u64>)> {
    let line = line.trim_end();
    if let Some(i) = line.find("status=deferred (") {
        let id = line[..i].split("]: ").nth(1)?.split(':').next()?.trim().to_string();
        let said = &line[i..];
        let reply = said.split_once(" said: ")?.1;
        let reply = reply.rfind(" (in reply to").map_or(reply, |j| &reply[..j]);
        return Some((id, reply_delay(reply)));
    }
    if let Some(i) = line.find(" == ")
        && let Some(j) = line.find("SMTP error from remote mail server after ")
    {
        let who = line[i + 4..].split_whitespace().next()?.to_string();
        let rest = &line[j..];
        let start = rest.match_indices(": ").map(|(k, _)| k + 2).find(|&k| reply_code(&rest[k..]).is_some())?;
        return Some((who, reply_delay(&rest[start..])));
    }
    None
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

/// A Go duration (`4m59s`, `1h30m0s`, `90s`): at least two parts, or one
/// part followed by the end of a word; units h, m, s.
fn go_duration(s: &str) -> Option<u64> {
    let mut rest = s;
    let mut total = 0u64;
    let mut parts = 0;
    while let Some((n, r)) = digits(rest) {
        let (mult, r) = match r.as_bytes().first() {
            Some(b'h') => (3600, &r[1..]),
            Some(b'm') if !r.starts_with("ms") && !r[1..].starts_with(|c: char| c.is_ascii_alphabetic()) => (60, &r[1..]),
            Some(b's') if !r[1..].starts_with(|c: char| c.is_ascii_alphabetic()) => (1, &r[1..]),
            _ => break,
        };
        total = total.checked_add(n.checked_mul(mult)?)?;
        parts += 1;
        rest = r;
    }
    (parts >= 2).then_some(total)
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
    fn digits_are_padded_to_any_width() {
        for (v, width, want) in [
            (0, 0, "0"),
            (7, 2, "07"),
            (42, 2, "42"),
            (123, 2, "123"),
            (5, 6, "000005"),
            (u64::MAX, 0, "18446744073709551615"),
            (u64::MAX, 20, "18446744073709551615"),
            (3, 22, "0000000000000000000003"),
        ] {
            let mut s = String::from("x");
            push_digits(&mut s, v, width);
            assert_eq!(s, format!("x{want}"), "{v} at width {width}");
        }
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

    #[test]
    fn reads_postfix_and_exim_logs() {
        let pf = "Nov 29 21:44:14 mx postfix/smtp[123]: 4BDAC992063: to=<u@example.com>, relay=mx.example.net[192.0.2.1]:25, delay=1.2, delays=0.1/0/0.5/0.6, dsn=4.7.1, status=deferred (host mx.example.net[192.0.2.1] said: 451 4.7.1 Greylisted, please try again later retry=00:05:00 (in reply to RCPT TO command))";
        assert_eq!(log_deferral(pf), Some(("4BDAC992063".into(), Some(300))));
        let none = pf.replace(" retry=00:05:00", "");
        assert_eq!(log_deferral(&none), Some(("4BDAC992063".into(), None)));
        let exim = "2026-11-29 21:44:14 1vQabc-000123-AB == u@example.com R=dnslookup T=remote_smtp defer (-44) H=mx.example.net [192.0.2.1]: SMTP error from remote mail server after RCPT TO:<u@example.com>: 451-4.7.1 Greylisted\n451 4.7.1 retry in 4m59s";
        assert_eq!(log_deferral(exim), Some(("u@example.com".into(), Some(299))));
        assert_eq!(log_deferral("Nov 29 mx postfix/smtpd[1]: connect from x[192.0.2.1]"), None);
    }

    /// The corpus of real replies in `tests/data/retry-hints.tsv`.
    #[test]
    fn reads_the_corpus() {
        let corpus = include_str!("../../../tests/data/retry-hints.tsv");
        let mut n = 0;
        for line in corpus.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
            let mut cols = line.split('\t');
            let (want, reply, source) = (cols.next().unwrap(), cols.next().unwrap(), cols.next().unwrap_or(""));
            let reply = reply.replace("\\r\\n", "\r\n");
            let want: Option<u64> = if want == "none" { None } else { Some(want.parse().unwrap()) };
            assert_eq!(reply_delay(&reply), want, "{reply:?} ({source})");
            n += 1;
        }
        assert!(n >= 25, "{n} replies");
    }
}
