//! The reference filter's address handling and configuration: no panic on
//! any sender, recipient or configuration text.
#![no_main]

use greylist_guest::normalize::{check_address, normalize_recipient, normalize_sender, triplet_key};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    let _ = check_address(&s);
    let n = normalize_sender(&s);
    let r = normalize_recipient(&s);
    assert_eq!(triplet_key(&["192.0.2.0/24", &n, &r]).len(), 32);
    let _ = greylist_guest::config::Config::parse(&s);
});
