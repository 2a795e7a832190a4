//! The retry-hint reader on any text: no panic, only 4yz replies give a
//! delay, and log lines parse without panicking.
#![no_main]

use greyhook_fuzz::retry::{log_deferral, parse_retry_hint, reply_code, reply_delay};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    let _ = parse_retry_hint(&s);
    if reply_delay(&s).is_some() {
        assert_eq!(reply_code(&s).map(|c| c / 100), Some(4));
    }
    for line in s.lines() {
        let _ = log_deferral(line);
    }
});
