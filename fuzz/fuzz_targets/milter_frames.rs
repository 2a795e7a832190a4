//! Milter packets as greyhook's milter server reads them: its packet loop's
//! cutting and decoding (`next_packet`, with `miltr-common`'s decoder)
//! never panics and takes the packets a straightforward parse finds, and
//! its packet tracker (which drives the per-packet deadline) agrees with
//! that parse however the stream is split.
#![no_main]

use bytes::BytesMut;
use greyhook_fuzz::milter_frames::{FrameTracker, has_packet, next_packet};
use libfuzzer_sys::fuzz_target;

/// Complete packets in `data`, and whether a packet is left unfinished.
fn reference(mut data: &[u8]) -> (usize, bool) {
    let mut n = 0;
    loop {
        if data.is_empty() {
            return (n, false);
        }
        if data.len() < 4 {
            return (n, true);
        }
        let len = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if data.len() - 4 < len {
            return (n, true);
        }
        data = &data[4 + len..];
        n += 1;
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, data)) = data.split_first() else { return };
    let (packets, unfinished) = reference(data);
    let mut t = FrameTracker::default();
    let mut ended = 0;
    for piece in data.chunks(usize::from(chunk % 13) + 1) {
        ended += t.track(piece).ended;
    }
    assert_eq!(ended, packets);
    assert_eq!(t.in_packet(), unfinished);

    // As the packet loop reads (its default `max_packet`, 64 KiB): every
    // whole packet is taken, decoded or refused, and nothing else.
    let mut buf = BytesMut::from(data);
    let mut taken = 0;
    loop {
        let whole = has_packet(&buf);
        match next_packet(&mut buf, 64 << 10) {
            Ok(Some(_)) => {
                assert!(whole);
                taken += 1;
            }
            Ok(None) => {
                assert!(!whole);
                assert_eq!(taken, packets);
                break;
            }
            Err(_) => break,
        }
    }
});
