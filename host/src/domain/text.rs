//! A peer's bytes as text, without losing any of them.
//!
//! The contract hands filters strings, and an MTA may hand greyhook bytes
//! that are not UTF-8: Postfix with `smtputf8_enable = no` passes a
//! Latin-1 `été@example.org` to its policy service and milter as it came.
//! Read with U+FFFD in place of each bad byte (`String::from_utf8_lossy`),
//! `\xe9t\xe9@` and `\xe8t\xe8@` were one sender, so one triplet: a sender
//! never seen before passed greylisting as another's retry, and a
//! Message-ID as another message's. [`from_bytes`] keeps every byte: UTF-8
//! stays as it is, and each byte that is not part of UTF-8 becomes a
//! character of its own. Written here because no crate does this mapping
//! (Python's `surrogateescape` does the same with lone surrogates, which a
//! Rust `str` cannot hold).

use std::borrow::Cow;

/// The character a byte that is not UTF-8 becomes is this plus the byte:
/// the bytes 0x80–0xFF (the only ones that can be out of place in UTF-8)
/// become the private-use characters U+EF80–U+EFFF, the mapping MirOS's
/// OPTU-8 uses. A string that already has those characters in it reads
/// the same as one with the bytes they stand for; both are the peer's own
/// choice, so the two meeting in one triplet lets nothing past
/// greylisting that the same sender twice would not.
const BYTE_CHAR_BASE: u32 = 0xEF00;

/// `bytes` as text: borrowed when they are UTF-8 (checked on the standard
/// library's fast path), otherwise with each byte of every sequence that
/// is not UTF-8 mapped to `BYTE_CHAR_BASE + byte`, so that different byte
/// strings stay different strings.
pub fn from_bytes(bytes: &[u8]) -> Cow<'_, str> {
    if let Ok(text) = std::str::from_utf8(bytes) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(bytes.len() + bytes.len() / 2);
    for chunk in bytes.utf8_chunks() {
        out.push_str(chunk.valid());
        out.extend(chunk.invalid().iter().map(|&b| byte_char(b)));
    }
    Cow::Owned(out)
}

/// The character standing for the out-of-place byte `b` (always 0x80 or
/// over: every ASCII byte is UTF-8 on its own).
fn byte_char(b: u8) -> char {
    char::from_u32(BYTE_CHAR_BASE + u32::from(b)).unwrap_or(char::REPLACEMENT_CHARACTER)
}

/// The byte `c` stands for, if [`from_bytes`] made it of one (U+EF80 to
/// U+EFFF), e.g. to write it back as `\xe9`. Those characters are UTF-8's
/// 0xEE 0xBE/0xBF then a third byte: text without a 0xEE byte has none.
pub fn byte_of(c: char) -> Option<u8> {
    u32::from(c).checked_sub(BYTE_CHAR_BASE).and_then(|b| u8::try_from(b).ok()).filter(|b| *b >= 0x80)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_is_borrowed_as_it_is() {
        for s in ["", "user@example.org", "été@exämple.org", "\u{EF80}"] {
            assert!(matches!(from_bytes(s.as_bytes()), Cow::Borrowed(t) if t == s));
        }
    }

    #[test]
    fn each_out_of_place_byte_is_its_own_character() {
        assert_eq!(from_bytes(b"\xe9t\xe9@x"), "\u{EFE9}t\u{EFE9}@x");
        assert_eq!(from_bytes(b"\xff\xfe"), "\u{EFFF}\u{EFFE}");
        // A truncated sequence: each of its bytes stands alone, and the
        // UTF-8 after it is kept.
        assert_eq!(from_bytes(b"a\xc3(\xe2\x82\xc3\xa9"), "a\u{EFC3}(\u{EFE2}\u{EF82}é");
        assert_ne!(from_bytes(b"\xe9t\xe9@x"), from_bytes(b"\xe8t\xe8@x"));
        assert_eq!(from_bytes(b"\x80").chars().count(), 1);
    }

    #[test]
    fn each_byte_character_gives_its_byte_back() {
        for b in 0x80..=0xffu8 {
            let text = from_bytes(&[b]).into_owned();
            let c = text.chars().next().unwrap_or_default();
            assert_eq!(byte_of(c), Some(b));
            assert_eq!(c.to_string().as_bytes()[0], 0xee);
        }
        for c in ['a', 'é', '\u{EF00}', '\u{EF7F}', '\u{F000}', char::REPLACEMENT_CHARACTER] {
            assert_eq!(byte_of(c), None, "{c:?}");
        }
    }

    #[test]
    fn different_bytes_stay_different_text() {
        // Every one- and two-byte string that is not UTF-8 reads as text of
        // its own (no two of them alike), and none as U+FFFD.
        let mut seen = std::collections::HashSet::new();
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                let bytes = [a, b];
                if std::str::from_utf8(&bytes).is_ok() {
                    continue;
                }
                let text = from_bytes(&bytes).into_owned();
                assert!(!text.contains(char::REPLACEMENT_CHARACTER), "{bytes:?}");
                assert!(seen.insert(text), "{bytes:?} read like another");
            }
        }
    }
}
