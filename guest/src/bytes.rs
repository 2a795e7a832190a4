//! Byte searches eight bytes at a time, for the few scans every decision
//! makes over an address (is it usable, where is its `+`, its last `@`,
//! its digits) and over a record's readable parts (printable ASCII?). Compiled to Wasm, a byte loop pays an interruption check and
//! a bounds check at every byte; these read a word at a time and find the
//! matching byte with one count of trailing zeros.
//!
//! Written here rather than taken from a crate: `memchr` finds given bytes
//! only (not classes such as "a digit" or "a control character"), and its
//! setup costs more than these addresses' ten to forty bytes take to scan.
//!
//! A class is a function from a word (eight bytes, little-endian) to its
//! *flags*: the high bit of each byte set exactly when that byte is in the
//! class, every other bit clear. Each class below works on the bytes' low
//! seven bits, where adding a constant under `0x80` cannot carry into the
//! next byte, and then clears the flags of bytes from `0x80` up: so a flag
//! never depends on a neighbouring byte, and the first flag is the first
//! match.

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// The low seven bits of each byte.
fn low(x: u64) -> u64 {
    x & !HIGH
}

/// Flags of the bytes equal to `v` (ASCII).
pub fn equal(x: u64, v: u8) -> u64 {
    debug_assert!(v < 0x80);
    let z = low(x) ^ (u64::from(v) * ONES);
    // `z + 0x7f` sets a byte's high bit unless its low bits are zero.
    !(z.wrapping_add(0x7f * ONES)) & !x & HIGH
}

/// Flags of the ASCII digits.
pub fn digit(x: u64) -> u64 {
    let y = low(x);
    // `y + 0x50` reaches the high bit from `0x30` ('0') up, `y + 0x46` from
    // `0x3a` (after '9') up.
    y.wrapping_add(0x50 * ONES) & !y.wrapping_add(0x46 * ONES) & !x & HIGH
}

/// Flags of the bytes that are not ASCII digits.
pub fn not_digit(x: u64) -> u64 {
    !digit(x) & HIGH
}

/// Flags of the bytes an envelope address may not contain: controls and
/// space (up to `0x20`), DEL, `<` and `>`.
pub fn not_in_address(x: u64) -> u64 {
    let y = low(x);
    // `<` (0x3c) and `>` (0x3e) differ only in bit 1.
    let angle = !((y | (0x02 * ONES)) ^ (0x3e * ONES)).wrapping_add(0x7f * ONES);
    (!y.wrapping_add(0x5f * ONES) | y.wrapping_add(ONES) | angle) & !x & HIGH
}

/// Flags of the bytes that are not printable ASCII (outside `0x20..=0x7e`).
pub fn not_printable_ascii(x: u64) -> u64 {
    let y = low(x);
    // `y + 0x60` reaches the high bit from `0x20` up, `y + 1` only at
    // `0x7f`; every byte from `0x80` up is flagged.
    ((!y.wrapping_add(0x60 * ONES) | y.wrapping_add(ONES)) & !x | x) & HIGH
}

/// The position of the first byte of `b` in `class` (see the module
/// documentation), if any.
pub fn find(b: &[u8], class: impl Fn(u64) -> u64) -> Option<usize> {
    let word = |c: &[u8]| <[u8; 8]>::try_from(c).map_or(0, u64::from_le_bytes);
    let at = |flags: u64| (flags.trailing_zeros() / 8) as usize;
    let n = b.len();
    if n < 8 {
        let (x, valid) = short_word(b);
        return match class(x) & valid {
            0 => None,
            f if at(f) < 4 => Some(at(f)),
            f => Some(at(f) - 4 + (n - 4)),
        };
    }
    let mut i = 0;
    while i + 8 <= n {
        let flags = class(word(&b[i..i + 8]));
        if flags != 0 {
            return Some(i + at(flags));
        }
        i += 8;
    }
    if i == n {
        return None;
    }
    // The last eight bytes, less those already read.
    let flags = class(word(&b[n - 8..])) & (u64::MAX << (8 * (i + 8 - n)));
    (flags != 0).then(|| n - 8 + at(flags))
}

/// The position of the last byte of `b` in `class`, if any.
pub fn rfind(b: &[u8], class: impl Fn(u64) -> u64) -> Option<usize> {
    let word = |c: &[u8]| <[u8; 8]>::try_from(c).map_or(0, u64::from_le_bytes);
    let last = |flags: u64| 7 - (flags.leading_zeros() / 8) as usize;
    let n = b.len();
    if n < 8 {
        let (x, valid) = short_word(b);
        return match class(x) & valid {
            0 => None,
            f if n >= 4 && last(f) >= 4 => Some(last(f) - 4 + (n - 4)),
            f => Some(last(f)),
        };
    }
    let mut end = n;
    while end >= 8 {
        let flags = class(word(&b[end - 8..end]));
        if flags != 0 {
            return Some(end - 8 + last(flags));
        }
        end -= 8;
    }
    if end == 0 {
        return None;
    }
    // The first eight bytes, less those already read.
    let flags = class(word(&b[..8])) & ((1u64 << (8 * end)) - 1);
    (flags != 0).then(|| last(flags))
}

/// The bytes of `b` (fewer than eight) in one word, and the mask of the
/// bytes that hold them: from four bytes on, the first four in the low
/// half and the last four (overlapping) in the high half; under four, each
/// in its own place.
fn short_word(b: &[u8]) -> (u64, u64) {
    let n = b.len();
    let quad = |c: &[u8]| <[u8; 4]>::try_from(c).map_or(0, |q| u64::from(u32::from_le_bytes(q)));
    match n {
        0..=3 => (b.iter().enumerate().fold(0, |x, (i, &c)| x | u64::from(c) << (8 * i)), (1u64 << (8 * n)) - 1),
        _ => (quad(&b[..4]) | quad(&b[n - 4..]) << 32, u64::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every byte value at every position of every length up to 20 (the
    /// rest of the bytes `fill`), against the plain definition.
    fn matches_plain(class: impl Fn(u64) -> u64, plain: impl Fn(u8) -> bool, fill: u8) {
        assert!(!plain(fill));
        for n in 0..20 {
            for i in 0..n {
                for v in 0..=255u8 {
                    let mut b = vec![fill; n];
                    b[i] = v;
                    let b = b;
                    assert_eq!(find(&b, &class), b.iter().position(|&c| plain(c)), "{b:?}");
                    assert_eq!(rfind(&b, &class), b.iter().rposition(|&c| plain(c)), "{b:?}");
                    // A second match never hides the first, nor the first
                    // the last.
                    for j in [0, n - 1] {
                        let mut b = b.clone();
                        b[j] = v;
                        assert_eq!(find(&b, &class), b.iter().position(|&c| plain(c)), "{b:?}");
                        assert_eq!(rfind(&b, &class), b.iter().rposition(|&c| plain(c)), "{b:?}");
                    }
                }
            }
        }
        assert_eq!(find(b"", &class), None);
        assert_eq!(rfind(b"", &class), None);
    }

    #[test]
    fn digits_are_found_where_they_are() {
        matches_plain(digit, |c| c.is_ascii_digit(), b'a');
        matches_plain(digit, |c| c.is_ascii_digit(), 0xc3);
        matches_plain(not_digit, |c| !c.is_ascii_digit(), b'7');
    }

    #[test]
    fn an_ascii_byte_is_found_where_it_is() {
        for v in [b'+', b'@', b'=', 0, 0x7f] {
            matches_plain(|x| equal(x, v), |c| c == v, if v == b'a' { b'b' } else { b'a' });
        }
        matches_plain(|x| equal(x, b'+'), |c| c == b'+', 0xab);
    }

    #[test]
    fn bytes_that_are_not_printable_ascii_are_found_where_they_are() {
        let plain = |c: u8| !(0x20..0x7f).contains(&c);
        matches_plain(not_printable_ascii, plain, b'a');
        matches_plain(not_printable_ascii, plain, b'~');
    }

    #[test]
    fn bytes_no_address_may_contain_are_found_where_they_are() {
        let plain = |c: u8| c <= b' ' || c == 0x7f || c == b'<' || c == b'>';
        matches_plain(not_in_address, plain, b'a');
        matches_plain(not_in_address, plain, 0xe9);
    }
}
