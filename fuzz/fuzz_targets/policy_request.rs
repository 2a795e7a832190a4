//! The policy server's request reader: no panic; however the peer's bytes
//! are cut into reads, the same requests come out, each within the line and
//! attribute limits, or the same limit is reported.
#![no_main]

use greyhook_fuzz::policy_request::{Attrs, Framer};
use libfuzzer_sys::fuzz_target;

const MAX_LINE: usize = 64;
const MAX_ATTRIBUTES: usize = 8;

/// Feeds `data` in reads of `chunk` bytes; the requests framed, then the
/// error if any.
fn frame(data: &[u8], chunk: usize) -> (Vec<Vec<u8>>, Option<String>) {
    let mut f = Framer::new(MAX_LINE, MAX_ATTRIBUTES);
    let mut out = Vec::new();
    for piece in data.chunks(chunk.max(1)) {
        f.buffer().extend_from_slice(piece);
        loop {
            match f.next_request() {
                Ok(Some(r)) => out.push(r),
                Ok(None) => break,
                Err(e) => return (out, Some(e.to_string())),
            }
        }
        // Bounded: never more than one request in progress (and one read) held.
        assert!(f.buffer().len() <= (MAX_ATTRIBUTES + 1) * (MAX_LINE + 2) + chunk.max(1), "buffer grew to {}", f.buffer().len());
    }
    (out, None)
}

/// The same reading without copies (what the daemon does): the same
/// requests, and each split at the lines the framer found the same as
/// when searched again.
fn frame_in_place(data: &[u8], chunk: usize) -> (Vec<Vec<u8>>, Option<String>) {
    let mut f = Framer::new(MAX_LINE, MAX_ATTRIBUTES);
    let mut out = Vec::new();
    for piece in data.chunks(chunk.max(1)) {
        f.buffer().extend_from_slice(piece);
        loop {
            match f.advance() {
                Ok(true) => {
                    let r = f.request().expect("the request advance() completed");
                    if let Ok(text) = std::str::from_utf8(r.bytes) {
                        let (a, b) = (Attrs::from_lines(text, r.lines), Attrs::parse(text));
                        assert_eq!(a.is_ok(), b.is_ok());
                        if let (Ok(a), Ok(b)) = (a, b) {
                            assert_eq!(a.len(), b.len());
                        }
                    }
                    out.push(r.bytes.to_vec());
                }
                Ok(false) => break,
                Err(e) => return (out, Some(e.to_string())),
            }
        }
    }
    (out, None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, data)) = data.split_first() else { return };
    let whole = frame(data, data.len());
    let split = frame(data, usize::from(chunk % 17) + 1);
    assert_eq!(whole, split, "framing depends on how the bytes were read");
    assert_eq!(whole, frame_in_place(data, usize::from(chunk % 13) + 1), "framing in place differs");
    for r in &whole.0 {
        let lines: Vec<&[u8]> = r.split(|b| *b == b'\n').filter(|l| !l.is_empty() && *l != b"\r").collect();
        assert!(!lines.is_empty() && lines.len() <= MAX_ATTRIBUTES);
        assert!(lines.iter().all(|l| l.strip_suffix(b"\r").unwrap_or(l).len() <= MAX_LINE));
        let text = String::from_utf8_lossy(r);
        if let Ok(a) = Attrs::parse(&text) {
            assert_eq!(a.len(), lines.len());
            let _ = a.get("request");
        }
    }
});
