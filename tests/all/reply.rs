//! Replies as rendered on the wire, checked against the draft's ABNF, and
//! the client-side retry hint parser.

use greyhook::reply::{render, render_lines};
use greyhook::retry::{MAX_RETRY, format_retry, parse_retry_hint};
use greyhook::types::Reply;
use proptest::prelude::*;

/// The draft's section 2.3 grammar, checked by hand: every line `Reply-Code`
/// then `-` (all but the last) or SP, a `textstring` (HT, SP, printable
/// US-ASCII), and `retrytime` only at the end of the last line.
fn matches_abnf(wire: &str) -> bool {
    let Some(body) = wire.strip_suffix("\r\n") else { return false };
    let lines: Vec<&str> = body.split("\r\n").collect();
    for (i, l) in lines.iter().enumerate() {
        let last = i + 1 == lines.len();
        let b = l.as_bytes();
        if b.len() < 3 || !["421", "450", "451"].contains(&&l[..3]) {
            return false;
        }
        let rest = &l[3..];
        let text = match (last, rest.as_bytes().first()) {
            (_, None) => "",
            (false, Some(b'-')) | (true, Some(b' ')) => &rest[1..],
            _ => return false,
        };
        if !text.bytes().all(|c| c == b'\t' || (32..=126).contains(&c)) {
            return false;
        }
        if last {
            let Some(pos) = text.rfind("retry=") else { return false };
            if pos > 0 && text.as_bytes()[pos - 1] != b' ' {
                return false;
            }
            if !is_retrytime(&text[pos + 6..]) {
                return false;
            }
        }
    }
    true
}

fn is_retrytime(s: &str) -> bool {
    let two = |x: &str, max: u32| x.len() == 2 && x.bytes().all(|c| c.is_ascii_digit()) && x.parse::<u32>().is_ok_and(|v| v <= max);
    let (days, clock) = match s.split_once('-') {
        Some((d, c)) => (Some(d), c),
        None => (None, s),
    };
    let parts: Vec<&str> = clock.split(':').collect();
    days.is_none_or(|d| two(d, 99)) && parts.len() == 3 && two(parts[0], 23) && two(parts[1], 59) && two(parts[2], 59)
}

/// `[DD-]HH:MM:SS` for `secs`, capped at 99-23:59:59, written without
/// the crate's formatter.
fn independent_hint(secs: u32) -> String {
    let secs = u64::from(secs).min(100 * 86_400 - 1);
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 { format!("{d:02}-{h:02}:{m:02}:{s:02}") } else { format!("{h:02}:{m:02}:{s:02}") }
}

fn reply(code: u16, text: Vec<String>, retry: u32) -> Reply {
    Reply { code, enhanced: Some(format!("{}.7.1", code / 100)), text, retry_after: Some(retry) }
}

#[test]
fn draft_examples_and_clamp() {
    let one = render(&reply(451, vec!["Greylisted".into()], 120));
    assert_eq!(one, "451 4.7.1 Greylisted retry=00:02:00\r\n");
    assert!(matches_abnf(&one));
    let multi = render(&reply(451, vec!["Greylisted.".into(), "See policy".into()], 90_061));
    assert_eq!(multi, "451-4.7.1 Greylisted.\r\n451 4.7.1 See policy retry=01-01:01:01\r\n");
    assert!(matches_abnf(&multi));
    let clamped = render(&reply(451, vec![], u32::MAX));
    assert_eq!(clamped, "451 4.7.1 retry=99-23:59:59\r\n");
    assert!(matches_abnf(&clamped));
    assert_eq!(format_retry(100 * 86_400), "retry=99-23:59:59");
    assert!(!matches_abnf("451 Greylisted retry=00:60:00\r\n"), "the checker itself rejects bad hints");
    assert!(!matches_abnf("451-retry=00:01:00\r\n451 x\r\n"), "and hints not on the last line");
}

fn line() -> impl Strategy<Value = String> {
    // Printable US-ASCII and HT, without text that looks like a hint.
    proptest::string::string_regex("[\t -~]{0,80}").unwrap().prop_filter("no hint-like text", |s| {
        let l = s.to_ascii_lowercase();
        !l.contains("retry") && !l.contains("time=")
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn render_matches_abnf_and_parses_back(code in prop_oneof![Just(421u16), Just(450), Just(451)],
                                           text in proptest::collection::vec(line(), 0..5),
                                           secs in any::<u32>()) {
        let r = reply(code, text.clone(), secs);
        let wire = render(&r);
        prop_assert!(matches_abnf(&wire), "{wire:?}");
        // Independent of the crate's own parser: the hint written out by
        // hand, the code and enhanced code on every line, the text in order.
        let hint = independent_hint(secs);
        prop_assert!(wire.ends_with(&format!("retry={hint}\r\n")), "{wire:?} should end with retry={hint}");
        let lines: Vec<&str> = wire.trim_end_matches("\r\n").split("\r\n").collect();
        for (i, l) in lines.iter().enumerate() {
            let sep = if i + 1 == lines.len() { ' ' } else { '-' };
            let prefix = format!("{code}{sep}{}.7.1", code / 100);
            prop_assert!(l.starts_with(&prefix), "line {i} {l:?} should start with {prefix:?}");
        }
        for t in text.iter().map(|t| t.trim()).filter(|t| !t.is_empty()) {
            prop_assert!(wire.contains(t), "{t:?} missing from {wire:?}");
        }
        prop_assert_eq!(parse_retry_hint(&wire), Some(u64::from(secs).min(MAX_RETRY)));
        let lines = render_lines(&r);
        prop_assert!(lines.iter().all(|l| l.len() <= 512));
    }

    #[test]
    fn parser_never_panics(s in "\\PC{0,200}") {
        let _ = parse_retry_hint(&s);
    }
}
