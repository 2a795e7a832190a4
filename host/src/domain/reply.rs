//! Checking what a filter returns, and rendering replies on the wire.
//!
//! A filter hands back a structured [`Reply`]; the host renders it, so every
//! filter gets the draft's retry hint right: `retry=[DD-]HH:MM:SS` on the
//! only line, or on the last line of a multi-line reply (draft section 2.3).
//! Anything outside the rules below is a filter error, never sent.

use thiserror::Error;

use crate::domain::retry::{push_digits, write_retry};
use crate::domain::types::{Decision, EhloVerdict, Header, Reply, Verdict};

/// Longest text line a filter may return (leaves room for code and hint
/// within RFC 5321's 512-octet reply line).
pub const MAX_TEXT_LINE: usize = 400;
/// Most text lines in one reply.
pub const MAX_LINES: usize = 16;
/// Most headers a verdict may add.
pub const MAX_HEADERS: usize = 16;
/// Longest header name.
pub const MAX_HEADER_NAME: usize = 64;
/// Longest header value (RFC 5322's line limit).
pub const MAX_HEADER_VALUE: usize = 998;
/// Longest policy group name.
pub const MAX_GROUP: usize = 64;
/// Most EHLO keywords.
pub const MAX_KEYWORDS: usize = 16;

/// Why a filter's answer was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum InvalidVerdict {
    /// The reply code does not fit the decision.
    #[error("reply code {0} is not a valid {1} code")]
    Code(u16, &'static str),
    /// The enhanced status code is malformed or of the wrong class.
    #[error("enhanced status code {0:?} is malformed or does not match reply code {1}")]
    Enhanced(String, u16),
    /// A text line has characters outside printable US-ASCII and HT, or is too long.
    #[error("reply text line {0} is not printable US-ASCII of at most 400 characters")]
    Text(usize),
    /// Too many lines.
    #[error("reply has more than 16 lines")]
    TooManyLines,
    /// A text line carries its own `retry=` hint: only the host writes
    /// the hint (from `retry-after`), once, on the last line.
    #[error("reply text line {0} contains \"retry=\": set retry-after instead")]
    HintInText(usize),
    /// A retry hint on a code that cannot carry one: the draft's
    /// greylisting codes are 421, 450 and 451.
    #[error("reply code {0} cannot carry a retry hint (the draft allows 421, 450 and 451)")]
    HintCode(u16),
    /// A header is malformed.
    #[error("header {0} is malformed (name: printable ASCII without ':' up to 64; value: printable up to 998, no CR/LF)")]
    Header(usize),
    /// Too many headers.
    #[error("more than 16 headers")]
    TooManyHeaders,
    /// The policy group is malformed.
    #[error("policy group is not printable ASCII of at most 64 characters")]
    Group,
    /// An EHLO keyword is malformed.
    #[error("EHLO keyword {0} is malformed")]
    Keyword(usize),
}

/// True if `ok` holds for every byte. Each 32-byte chunk is folded without
/// an early exit, which the compiler vectorises (`all` on the bytes tests
/// them one at a time: ~5-6 instructions a byte of every reply line a
/// filter returns and every decision line logged).
pub(crate) fn all_bytes(bytes: &[u8], ok: impl Fn(u8) -> bool) -> bool {
    bytes.chunks(32).all(|c| c.iter().fold(true, |acc, &b| acc & ok(b)))
}

/// True if byte `b` neither is nor begins a control character: not C0 or
/// DEL (single bytes), not 0xC2, with which UTF-8 begins C1 (U+0080 to
/// U+009F). Text whose every byte passes ([`all_bytes`], vectorised) has no
/// control character; text with such a byte may have one, to be told by
/// its characters.
pub(crate) fn control_free(b: u8) -> bool {
    (b >= 0x20) & (b != 0x7f) & (b != 0xc2)
}

fn printable(s: &str) -> bool {
    all_bytes(s.as_bytes(), |b| (b == b'\t') | (b.wrapping_sub(32) < 95))
}

fn valid_enhanced(e: &str, code: u16) -> bool {
    // One pass over the bytes (a `split('.')` and `parse` were ~250
    // instructions on every tempfail a filter returns).
    let (mut field, mut len, mut class) = (0, 0, 0u16);
    for &c in e.as_bytes() {
        match c {
            b'0'..=b'9' => {
                len += 1;
                if len > 3 {
                    return false;
                }
                if field == 0 {
                    class = class * 10 + u16::from(c - b'0');
                }
            }
            b'.' if len > 0 && field < 2 => {
                field += 1;
                len = 0;
            }
            _ => return false,
        }
    }
    field == 2 && len > 0 && class == code / 100
}

/// Checks a reply for a tempfail (`4yz`) or reject (`5yz`).
pub fn check_reply(r: &Reply, tempfail: bool) -> Result<(), InvalidVerdict> {
    let (class, what) = if tempfail { (4, "tempfail (4yz)") } else { (5, "reject (5yz)") };
    if r.code / 100 != class || r.code % 100 / 10 > 5 {
        return Err(InvalidVerdict::Code(r.code, what));
    }
    if let Some(e) = &r.enhanced
        && !valid_enhanced(e, r.code)
    {
        return Err(InvalidVerdict::Enhanced(e.clone(), r.code));
    }
    if r.text.len() > MAX_LINES {
        return Err(InvalidVerdict::TooManyLines);
    }
    for (i, l) in r.text.iter().enumerate() {
        if l.len() > MAX_TEXT_LINE || !printable(l) {
            return Err(InvalidVerdict::Text(i));
        }
        if has_retry_hint(l.as_bytes()) {
            return Err(InvalidVerdict::HintInText(i));
        }
    }
    if r.retry_after.is_some() && !matches!(r.code, 421 | 450 | 451) {
        return Err(InvalidVerdict::HintCode(r.code));
    }
    Ok(())
}

/// True if `line` holds `retry=` in any case (the host alone writes the
/// hint). Looks only at each `=`, not at every six-byte window.
fn has_retry_hint(line: &[u8]) -> bool {
    memchr::memchr_iter(b'=', line).any(|i| i >= 5 && line[i - 5..i].eq_ignore_ascii_case(b"retry"))
}

/// Checks a header the filter wants added.
pub fn check_header(h: &Header) -> bool {
    !h.name.is_empty()
        && h.name.len() <= MAX_HEADER_NAME
        && h.name.bytes().all(|b| (33..127).contains(&b) && b != b':')
        && h.value.len() <= MAX_HEADER_VALUE
        && printable(&h.value)
}

/// Checks a whole verdict.
pub fn check_verdict(v: &Verdict) -> Result<(), InvalidVerdict> {
    match &v.decision {
        Decision::Tempfail(r) => check_reply(r, true)?,
        Decision::Reject(r) => check_reply(r, false)?,
        Decision::Continue | Decision::Accept => {}
    }
    if v.add_headers.len() > MAX_HEADERS {
        return Err(InvalidVerdict::TooManyHeaders);
    }
    if let Some(i) = v.add_headers.iter().position(|h| !check_header(h)) {
        return Err(InvalidVerdict::Header(i));
    }
    if let Some(g) = &v.policy_group
        && (g.len() > MAX_GROUP || !g.bytes().all(|b| (33..127).contains(&b)))
    {
        return Err(InvalidVerdict::Group);
    }
    Ok(())
}

/// Checks an EHLO verdict (RFC 5321 `ehlo-keyword *(SP ehlo-param)`).
pub fn check_ehlo(v: &EhloVerdict) -> Result<(), InvalidVerdict> {
    check_verdict(&v.verdict)?;
    if v.keywords.len() > MAX_KEYWORDS {
        return Err(InvalidVerdict::Keyword(MAX_KEYWORDS));
    }
    for (i, k) in v.keywords.iter().enumerate() {
        let mut words = k.split(' ');
        let kw = words.next().unwrap_or("");
        let ok = kw.len() <= 64
            && kw.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && kw.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && k.len() <= 200
            && words.all(|p| !p.is_empty() && p.bytes().all(|b| (33..127).contains(&b)));
        if !ok {
            return Err(InvalidVerdict::Keyword(i));
        }
    }
    Ok(())
}

/// Renders a reply as SMTP reply lines, without line ends: the code on every
/// line (`-` after it on all but the last), the enhanced code after it, and
/// the retry hint at the end of the last line.
pub fn render_lines(r: &Reply) -> Vec<String> {
    lines(r)
        .map(|(text, last)| {
            let mut line = String::with_capacity(64);
            write_line(&mut line, r, text, last);
            line
        })
        .collect()
}

/// A reply's text lines (one empty line if it has none), each with whether
/// it is the last.
fn lines(r: &Reply) -> impl Iterator<Item = (&str, bool)> {
    let n = r.text.len().max(1);
    (0..n).map(move |i| (r.text.get(i).map_or("", String::as_str), i + 1 == n))
}

/// Appends one reply line (no line end) with `text`: code, separator,
/// enhanced code, text and, on the last line of a tempfail, the retry hint;
/// no trailing blanks. Written in place: a reply is rendered at every
/// deferral, and the `format!`s this replaced cost a policy request ~5k
/// instructions.
fn write_line(out: &mut String, r: &Reply, text: &str, last: bool) {
    let start = out.len();
    push_digits(out, u64::from(r.code), 3);
    out.push(if last { ' ' } else { '-' });
    if let Some(e) = &r.enhanced {
        out.push_str(e);
        out.push(' ');
    }
    out.push_str(text);
    // The hint belongs to a tempfail (4yz) only.
    if last
        && r.code / 100 == 4
        && let Some(s) = r.retry_after
    {
        if !out[start..].ends_with(' ') {
            out.push(' ');
        }
        write_retry(out, u64::from(s));
    }
    let kept = out.trim_end().len();
    out.truncate(kept);
}

/// Renders a reply as it goes on the wire, every line ended by CRLF.
pub fn render(r: &Reply) -> String {
    let mut out = String::with_capacity(64 * r.text.len().max(1));
    for (text, last) in lines(r) {
        write_line(&mut out, r, text, last);
        out.push_str("\r\n");
    }
    out
}

/// Renders a reply on one line, for protocols that carry only one (the
/// Postfix policy protocol): `451 4.7.1 text; more text retry=00:05:00`.
pub fn render_single_line(r: &Reply) -> String {
    let joined;
    let text = match r.text.as_slice() {
        [] => "",
        [one] => one.as_str(),
        many => {
            joined = many.join("; ");
            joined.as_str()
        }
    };
    let mut out = String::with_capacity(64);
    write_line(&mut out, r, text, true);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(code: u16, text: &[&str], retry: Option<u32>) -> Reply {
        Reply {
            code,
            enhanced: Some(format!("{}.7.1", code / 100)),
            text: text.iter().map(|s| s.to_string()).collect(),
            retry_after: retry,
        }
    }

    #[test]
    fn single_and_multi_line() {
        assert_eq!(render(&reply(451, &["Greylisted"], Some(300))), "451 4.7.1 Greylisted retry=00:05:00\r\n");
        assert_eq!(
            render(&reply(451, &["Greylisted.", "See policy"], Some(120))),
            "451-4.7.1 Greylisted.\r\n451 4.7.1 See policy retry=00:02:00\r\n"
        );
        assert_eq!(render(&reply(421, &[], Some(60))), "421 4.7.1 retry=00:01:00\r\n");
        assert_eq!(render_single_line(&reply(451, &["a", "b"], Some(0))), "451 4.7.1 a; b retry=00:00:00");
    }

    #[test]
    fn the_hint_and_the_digits_are_written_in_place() {
        for (secs, want) in [
            (0, "retry=00:00:00"),
            (1, "retry=00:00:01"),
            (59, "retry=00:00:59"),
            (60, "retry=00:01:00"),
            (3599, "retry=00:59:59"),
            (3600, "retry=01:00:00"),
            (86_399, "retry=23:59:59"),
            (86_400, "retry=01-00:00:00"),
            (90_061, "retry=01-01:01:01"),
            (8_639_999, "retry=99-23:59:59"),
            (8_640_000, "retry=99-23:59:59"),
            (u64::from(u32::MAX), "retry=99-23:59:59"),
            (u64::MAX, "retry=99-23:59:59"),
        ] {
            let mut out = String::new();
            write_retry(&mut out, secs);
            assert_eq!(out, want, "{secs}");
        }
        let mut out = String::new();
        push_digits(&mut out, u64::MAX, 3);
        assert_eq!(out, u64::MAX.to_string());
        out.clear();
        push_digits(&mut out, 7, 3);
        assert_eq!(out, "007");
        assert_eq!(render(&reply(451, &["a "], None)), "451 4.7.1 a\r\n", "no trailing blank");
        let bare = Reply { code: 250, enhanced: None, text: vec![], retry_after: Some(5) };
        assert_eq!(render(&bare), "250\r\n", "no hint but on a tempfail");
        assert_eq!(render_lines(&reply(451, &["x", "y"], Some(61))), vec!["451-4.7.1 x", "451 4.7.1 y retry=00:01:01"]);
    }

    #[test]
    fn checks() {
        assert!(check_reply(&reply(451, &["x"], None), true).is_ok());
        assert!(check_reply(&reply(550, &["x"], None), true).is_err());
        assert!(check_reply(&reply(451, &["x\r\nDATA"], None), true).is_err());
        let mut r = reply(451, &["x"], None);
        r.enhanced = Some("5.7.1".into());
        assert!(check_reply(&r, true).is_err());
        for (e, ok) in [
            ("4.7.1", true),
            ("4.123.999", true),
            ("4.7", false),
            ("4.7.1.1", false),
            ("4..1", false),
            ("4.7.", false),
            ("4.7.1234", false),
            ("4.x.1", false),
            ("04.7.1", true),
            ("", false),
        ] {
            assert_eq!(valid_enhanced(e, 451), ok, "{e:?}");
        }
        // Printable: tab, space to '~'; a bad byte anywhere in a long line
        // (across the 32-byte chunks the check folds) is found.
        for (text, ok) in [("a\tb ~", true), ("\x1f", false), ("\x7f", false), ("é", false), ("", true)] {
            assert_eq!(printable(text), ok, "{text:?}");
        }
        for at in [0, 31, 32, 33, 63, 64, 99] {
            let mut line = vec![b'x'; 100];
            line[at] = b'\n';
            assert!(!printable(std::str::from_utf8(&line).unwrap()), "a newline at {at}");
            assert!(printable(&"x".repeat(at + 1)));
        }
        assert!(check_header(&Header { name: "X-Greylist".into(), value: "delayed 3 seconds".into() }));
        assert!(!check_header(&Header { name: "X-A".into(), value: "a\r\nBcc: evil".into() }));
        assert!(!check_header(&Header { name: "X A:".into(), value: "v".into() }));
        // Only the host writes the hint, and only on a greylisting code.
        assert_eq!(check_reply(&reply(451, &["wait", "then RETRY=24:00:00"], Some(300)), true), Err(InvalidVerdict::HintInText(1)));
        for (line, hint) in [
            ("retry=1", true),
            ("xRetry=", true),
            ("retry =1", false),
            ("=retry", false),
            ("etry=", false),
            ("retr=retry=", true),
            ("", false),
        ] {
            assert_eq!(has_retry_hint(line.as_bytes()), hint, "{line:?}");
        }
        assert_eq!(check_reply(&reply(452, &["x"], Some(300)), true), Err(InvalidVerdict::HintCode(452)));
        assert_eq!(check_reply(&reply(550, &["x"], Some(300)), false), Err(InvalidVerdict::HintCode(550)));
        assert!(check_reply(&reply(450, &["x"], Some(300)), true).is_ok());
        assert!(check_reply(&reply(452, &["x"], None), true).is_ok());
        assert_eq!(render(&reply(550, &["x"], Some(300))), "550 5.7.1 x\r\n", "no hint on a 5yz");
    }

    /// The plain reading of an enhanced status code (RFC 3463): three
    /// dot-separated fields of one to three digits, the class the code's.
    fn enhanced_plainly(e: &str, code: u16) -> bool {
        let digits = |p: &str| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit());
        let parts: Vec<&str> = e.split('.').collect();
        parts.len() == 3 && parts.iter().all(|p| digits(p)) && parts[0].parse::<u16>().ok() == Some(code / 100)
    }

    proptest::proptest! {
        #[test]
        fn enhanced_codes_are_read_as_the_plain_reading_does(
            parts in proptest::collection::vec(proptest::sample::select(vec!["4", "5", "04", "7", "1", "123", "1234", ".", "..", "x", "", "\u{e9}"]), 0..8),
            code in proptest::sample::select(vec![421u16, 451, 550, 250]),
        ) {
            let e = parts.concat();
            proptest::prop_assert_eq!(valid_enhanced(&e, code), enhanced_plainly(&e, code), "{:?} {}", e, code);
        }
    }
}
