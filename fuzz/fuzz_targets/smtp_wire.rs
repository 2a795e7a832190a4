//! SMTP command paths, DSN parameters and DATA framing: no panic;
//! whatever the client sends, DSN parameters passed on are the ones RFC 3461
//! names, each once, with no space or control inside (nothing that could
//! add a command at the next hop), and the framed content is CRLF lines
//! which, dot-stuffed as DATA carries them (`stuffed`), hold no lone dot
//! (nothing the next hop could take for the end of data) and read back as
//! the same content.
#![no_main]

use greyhook_fuzz::smtp_dsn::{MAX_ENVID, MAX_ORCPT, is_mail_param, mail_param, rcpt_params};
use greyhook_fuzz::smtp_wire::{BareNewline, DataFramer, Fed, parse_path, stuffed};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        for prefix in ["FROM:", "TO:"] {
            if let Ok((addr, _)) = parse_path(s, prefix) {
                assert!(addr.len() <= 254);
                assert!(!addr.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0));
            }
        }
        let clean = |p: &str| !p.is_empty() && !p.chars().any(|c| c.is_control() || c.is_whitespace());
        for utf8 in [false, true] {
            if let Ok(out) = rcpt_params(s, true, utf8) {
                let words: Vec<&str> = if out.is_empty() { Vec::new() } else { out.split(' ').collect() };
                assert!(words.len() <= 2 && words.iter().all(|w| clean(w)), "{out:?}");
                assert!(words.iter().filter(|w| w.starts_with("NOTIFY=")).count() <= 1, "{out:?}");
                assert!(words.iter().filter(|w| w.starts_with("ORCPT=")).count() <= 1, "{out:?}");
                assert!(words.iter().all(|w| w.starts_with("NOTIFY=") || (w.starts_with("ORCPT=") && w.len() <= MAX_ORCPT)), "{out:?}");
            }
        }
        let mut seen = [false; 2];
        for p in s.split_whitespace() {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            if is_mail_param(k)
                && let Ok(out) = mail_param(k, v, &mut seen)
            {
                assert!(clean(&out) && out.is_ascii(), "{out:?}");
                assert!(out == "RET=FULL" || out == "RET=HDRS" || (out.starts_with("ENVID=") && out.len() <= 6 + MAX_ENVID), "{out:?}");
            }
        }
    }
    for mode in [BareNewline::Reject, BareNewline::Normalize] {
        let mut f = DataFramer::new(mode);
        let mut out = Vec::new();
        for line in data.split_inclusive(|b| *b == b'\n') {
            match f.feed(line, &mut out, false) {
                Fed::Data => {}
                Fed::End | Fed::BareNewline => break,
            }
        }
        assert!(out.is_empty() || out.ends_with(b"\r\n"));
        for l in out.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            assert!(l.ends_with(b"\r") && !l[..l.len() - 1].contains(&b'\r'), "{l:?}");
        }
        // As DATA carries it to the next hop: no lone dot, and every line
        // the content's with a dot in front if it starts with one.
        let sent = stuffed(&out).collect::<Vec<_>>().concat();
        let (mut back, mut lines) = (Vec::new(), 0);
        for l in sent.split_inclusive(|b| *b == b'\n') {
            assert_ne!(l, b".\r\n", "a lone dot reached the next hop");
            back.extend_from_slice(l.strip_prefix(b".").unwrap_or(l));
            lines += 1;
        }
        assert_eq!(back, out);
        assert_eq!(lines, out.split_inclusive(|b| *b == b'\n').count());
    }
});
