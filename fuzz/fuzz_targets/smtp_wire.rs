//! SMTP command paths and DATA framing: no panic; whatever the client
//! sends, the framed output is CRLF lines with no lone dot (nothing the
//! next hop could take for the end of data).
#![no_main]

use greyhook_fuzz::smtp_wire::{BareNewline, DataFramer, Fed, parse_path};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        for prefix in ["FROM:", "TO:"] {
            if let Ok((addr, _)) = parse_path(s, prefix) {
                assert!(addr.len() <= 254);
                assert!(!addr.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0));
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
            assert_ne!(l, b".\r", "a lone dot reached the output");
        }
    }
});
