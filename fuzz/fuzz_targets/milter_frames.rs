//! Milter packets as greyhook's milter server reads them: `miltr-server`'s
//! decoder (the one the server runs, via its fuzzing entry) never panics,
//! and greyhook's own packet tracker (which drives the per-packet deadline)
//! agrees with a straightforward parse of the stream however it is split.
#![no_main]

use bytes::BytesMut;
use greyhook_fuzz::milter_frames::FrameTracker;
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

    let mut buf = BytesMut::from(data);
    for _ in 0..1024 {
        match miltr_server::fuzzing::fuzz_parse(&mut buf) {
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
});
