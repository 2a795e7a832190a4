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

/// The verdict test vectors both hosts pass (`tests/data/verdict-vectors.json`;
/// haraka-plugin-greyhook runs the same file in `hosts/haraka/test/`).
#[test]
fn shared_verdict_vectors() {
    use greyhook::reply::{check_ehlo, check_verdict, render_single_line};
    use greyhook::types::{Decision, EhloVerdict, Header, Verdict};
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/data/verdict-vectors.json")).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let vectors = doc["vectors"].as_array().unwrap();
    assert!(vectors.len() >= 40);
    for v in vectors {
        let name = v["name"].as_str().unwrap();
        let j = &v["verdict"];
        let reply = j.get("reply").map(|r| Reply {
            code: r["code"].as_u64().unwrap() as u16,
            enhanced: r.get("enhanced").and_then(|e| e.as_str()).map(String::from),
            text: r["text"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect(),
            retry_after: r.get("retry_after").and_then(|n| n.as_u64()).map(|n| n as u32),
        });
        let decision = match j["decision"].as_str().unwrap() {
            "continue" => Decision::Continue,
            "accept" => Decision::Accept,
            "tempfail" => Decision::Tempfail(reply.clone().unwrap()),
            "reject" => Decision::Reject(reply.clone().unwrap()),
            d => panic!("{name}: decision {d}"),
        };
        let add_headers = j
            .get("add_headers")
            .and_then(|h| h.as_array())
            .map(|hs| {
                hs.iter().map(|h| Header { name: h["name"].as_str().unwrap().into(), value: h["value"].as_str().unwrap().into() }).collect()
            })
            .unwrap_or_default();
        let verdict = Verdict { decision, add_headers, policy_group: j.get("policy_group").and_then(|g| g.as_str()).map(String::from) };
        let checked = match j.get("keywords").and_then(|k| k.as_array()) {
            Some(k) => check_ehlo(&EhloVerdict { verdict, keywords: k.iter().map(|k| k.as_str().unwrap().to_string()).collect() }),
            None => check_verdict(&verdict),
        };
        let e = &v["expect"];
        if e["valid"].as_bool().unwrap() {
            assert!(checked.is_ok(), "{name}: {checked:?}");
            if let Some(lines) = e.get("lines") {
                let want: Vec<&str> = lines.as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect();
                assert_eq!(render_lines(reply.as_ref().unwrap()), want, "{name}");
            }
            if let Some(single) = e.get("single_line") {
                assert_eq!(render_single_line(reply.as_ref().unwrap()), single.as_str().unwrap(), "{name}");
            }
        } else {
            let err = format!("{:?}", checked.expect_err(name));
            let kind = err.split('(').next().unwrap();
            assert_eq!(kind, e["error"].as_str().unwrap(), "{name}: {err}");
        }
    }
}
