//! Reply validation and rendering: a reply the host accepts renders as
//! well-formed SMTP reply lines (code on every line, printable, at most
//! 512 bytes, the hint once and only at the end of the last line of a 4yz).
#![no_main]

use greyhook_fuzz::reply::{check_reply, render_lines};
use greyhook_fuzz::types::Reply;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 5 {
        return;
    }
    let code = u16::from_be_bytes([data[0], data[1]]) % 1000;
    let retry = (data[2] & 1 == 1).then(|| u32::from_be_bytes([0, data[3], data[4], data[2]]));
    let text = String::from_utf8_lossy(&data[5..]);
    let mut parts = text.split('\u{1}');
    let enhanced = parts.next().filter(|e| !e.is_empty()).map(str::to_string);
    let lines: Vec<String> = parts.map(str::to_string).collect();
    let r = Reply { code, enhanced, text: lines, retry_after: retry };
    for tempfail in [true, false] {
        if check_reply(&r, tempfail).is_err() {
            continue;
        }
        let out = render_lines(&r);
        let n = out.len();
        for (i, l) in out.iter().enumerate() {
            assert!(l.starts_with(&code.to_string()), "{l}");
            assert!(l.len() <= 512 && l.bytes().all(|b| b == b'\t' || (32..127).contains(&b)), "{l:?}");
            let hints = l.matches("retry=").count();
            if i + 1 < n || code / 100 != 4 || retry.is_none() {
                assert_eq!(hints, 0, "{l}");
            } else {
                assert_eq!(hints, 1, "{l}");
            }
        }
    }
});
