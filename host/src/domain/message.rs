//! How much of a message a filter is handed at DATA.
//!
//! The header section comes from the client, and a front end may read one
//! as large as its message size limit lets it be (`greyhook smtp`: 25 MiB).
//! Handed whole, it went string by string into the filter's memory (capped
//! at 32 MiB): a bounce with 200 headers of 60 000 bytes ran the reference
//! filter out of memory, and the failure policy passed it ungreylisted.
//! So the host hands every filter, from every front end and from an
//! embedding MTA alike, a bounded view: the headers in order, at most
//! [`MAX_MESSAGE_HEADERS`] of them and [`MAX_MESSAGE_HEADER_BYTES`] of
//! names and values in all, each value cut at [`MAX_MESSAGE_HEADER_VALUE`]
//! bytes, a header with a name over [`MAX_MESSAGE_HEADER_NAME`] bytes left
//! out, and the Message-ID cut at [`MAX_MESSAGE_ID`] bytes. The front ends
//! that parse the header section themselves (`greyhook smtp`, OpenSMTPD)
//! keep no more than this in memory either ([`HeaderBudget`]).

use crate::domain::types::Header;

/// Most headers a filter is handed.
pub const MAX_MESSAGE_HEADERS: usize = 200;
/// Longest header value handed (a longer one is cut at a character
/// boundary): four of RFC 5322's 998-octet lines, unfolded.
pub const MAX_MESSAGE_HEADER_VALUE: usize = 4096;
/// Longest header name handed (a header with a longer one is left out).
pub const MAX_MESSAGE_HEADER_NAME: usize = 256;
/// Most bytes of header names and values handed in all; the headers past
/// it are left out.
pub const MAX_MESSAGE_HEADER_BYTES: usize = 64 << 10;
/// Longest Message-ID handed (a longer one is cut at a character
/// boundary): RFC 5322's line limit.
pub const MAX_MESSAGE_ID: usize = 998;

/// `s` cut to at most `max` bytes, at a character boundary.
pub fn cut(s: &str, max: usize) -> &str {
    &s[..s.floor_char_boundary(max)]
}

/// What the headers a filter is handed may hold: counts headers and bytes
/// as they are taken, in order.
#[derive(Debug, Clone)]
pub struct HeaderBudget {
    headers: usize,
    bytes: usize,
}

impl Default for HeaderBudget {
    fn default() -> Self {
        HeaderBudget { headers: MAX_MESSAGE_HEADERS, bytes: MAX_MESSAGE_HEADER_BYTES }
    }
}

impl HeaderBudget {
    /// The header `name: value` as it is handed: `None` if it is left out
    /// (its name too long, or no room left), else the name and the value,
    /// cut to what is left of the budget (a prefix of the value given).
    pub fn take<'a>(&mut self, name: &'a str, value: &'a str) -> Option<(&'a str, &'a str)> {
        if self.headers == 0 || name.len() > MAX_MESSAGE_HEADER_NAME || name.len() >= self.bytes {
            return None;
        }
        let value = cut(value, MAX_MESSAGE_HEADER_VALUE.min(self.bytes - name.len()));
        self.headers -= 1;
        self.bytes -= name.len() + value.len();
        Some((name, value))
    }

    /// The part of a folded line's text `more` that may be added to a
    /// value already `have` bytes long (a front end unfolding a header
    /// section), after a space unless the value is empty, counted against
    /// the budget.
    pub fn extend<'a>(&mut self, have: usize, more: &'a str) -> &'a str {
        let space = usize::from(have > 0);
        let room = MAX_MESSAGE_HEADER_VALUE.saturating_sub(have + space).min(self.bytes.saturating_sub(space));
        let more = cut(more, room);
        if !more.is_empty() {
            self.bytes -= space + more.len();
        }
        more
    }

    /// Whether no more headers fit.
    pub fn spent(&self) -> bool {
        self.headers == 0 || self.bytes == 0
    }
}

/// The headers of `headers` a filter is handed, in order (see the module
/// documentation).
pub fn bounded_headers(headers: &[Header]) -> impl Iterator<Item = (&str, &str)> {
    let mut budget = HeaderBudget::default();
    headers.iter().map_while(move |h| if budget.spent() { None } else { Some(budget.take(&h.name, &h.value)) }).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(name: &str, value: &str) -> Header {
        Header { name: name.into(), value: value.into() }
    }

    #[test]
    fn small_headers_are_handed_whole_and_in_order() {
        let hs = [h("Subject", "hi"), h("Message-ID", "<a@b>")];
        let got: Vec<_> = bounded_headers(&hs).collect();
        assert_eq!(got, [("Subject", "hi"), ("Message-ID", "<a@b>")]);
    }

    #[test]
    fn values_are_cut_at_a_character_boundary_and_the_section_is_bounded() {
        let long = "é".repeat(5000);
        let hs: Vec<Header> = (0..300).map(|i| h(&format!("X-{i}"), &long)).collect();
        let got: Vec<_> = bounded_headers(&hs).collect();
        assert!(got.iter().all(|(_, v)| v.len() <= MAX_MESSAGE_HEADER_VALUE && v.chars().all(|c| c == 'é')));
        assert_eq!(got[0].1.len(), 4096);
        let bytes: usize = got.iter().map(|(n, v)| n.len() + v.len()).sum();
        assert!(bytes <= MAX_MESSAGE_HEADER_BYTES && bytes > MAX_MESSAGE_HEADER_BYTES - 8, "{bytes}");
        assert_eq!(got.len(), 16, "15 whole values and the cut 16th");
        let many: Vec<Header> = (0..300).map(|i| h(&format!("X-{i}"), "v")).collect();
        assert_eq!(bounded_headers(&many).count(), MAX_MESSAGE_HEADERS);
    }

    #[test]
    fn a_header_with_an_overlong_name_is_left_out() {
        let hs = [h(&"N".repeat(300), "v"), h("Subject", "s")];
        assert_eq!(bounded_headers(&hs).collect::<Vec<_>>(), [("Subject", "s")]);
        assert_eq!(cut("aé", 2), "a");
        assert_eq!(cut("abc", 10), "abc");
    }
}
