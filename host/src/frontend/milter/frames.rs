//! Milter packet boundaries, apart from any I/O so that they can be fuzzed
//! on their own (`fuzz/fuzz_targets/milter_frames.rs`). A packet is a
//! 4-byte big-endian length, then that many bytes (the command byte and
//! its data): [`next_packet`] cuts the packet loop's input into packets,
//! bounded, and has `miltr-common` decode each; [`FrameTracker`] follows
//! the boundaries as bytes go by, which tells the connection's deadlines
//! whether the MTA is inside a packet.

use bytes::{Buf, BytesMut};
use miltr_common::ProtocolError;
use miltr_common::decoding::ClientCommand;

/// The length a packet at the start of `input` announces, once its four
/// length bytes are in.
fn announced(input: &[u8]) -> Option<usize> {
    let head: [u8; 4] = input.get(..4)?.try_into().ok()?;
    Some(u32::from_be_bytes(head) as usize)
}

/// Whether `input` holds a whole packet.
pub fn has_packet(input: &BytesMut) -> bool {
    announced(input).is_some_and(|len| input.len() - 4 >= len)
}

/// Takes the next whole packet out of `input` and parses it; `None` if more
/// bytes are needed. A length over `max_packet` is an error before any of it
/// is read.
pub fn next_packet(input: &mut BytesMut, max_packet: usize) -> Result<Option<ClientCommand>, ProtocolError> {
    let Some(len) = announced(input) else { return Ok(None) };
    if len > max_packet {
        return Err(ProtocolError::TooMuchData(len));
    }
    if input.len() - 4 < len {
        input.reserve(4 + len - input.len());
        return Ok(None);
    }
    input.advance(4);
    let packet = input.split_to(len);
    Ok(Some(ClientCommand::parse(packet)?))
}

/// Where a byte stream stands in the milter packet framing.
#[derive(Debug, Default, Clone)]
pub struct FrameTracker {
    /// Length bytes of the packet being read, and how many so far.
    head: [u8; 4],
    head_len: usize,
    /// Bytes of the current packet's body still to come.
    body_left: u64,
}

impl FrameTracker {
    /// Whether a packet has begun and not yet ended.
    pub fn in_packet(&self) -> bool {
        self.head_len > 0 || self.body_left > 0
    }

    /// Follows the framing over `bytes`, the next bytes of the stream.
    /// Returns whether a packet began in them (its deadline starts) and how
    /// many packets ended in them.
    pub fn track(&mut self, mut bytes: &[u8]) -> Tracked {
        let mut t = Tracked::default();
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let n = usize::try_from(self.body_left).map_or(bytes.len(), |left| left.min(bytes.len()));
                self.body_left -= n as u64;
                bytes = &bytes[n..];
                if self.body_left == 0 {
                    t.ended += 1;
                }
                continue;
            }
            if self.head_len == 0 {
                t.began = true;
            }
            self.head[self.head_len] = bytes[0];
            self.head_len += 1;
            bytes = &bytes[1..];
            if self.head_len == 4 {
                self.head_len = 0;
                self.body_left = u64::from(u32::from_be_bytes(self.head));
                if self.body_left == 0 {
                    t.ended += 1;
                }
            }
        }
        t
    }
}

/// What [`FrameTracker::track`] saw in one read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tracked {
    /// A packet began (its first length byte arrived).
    pub began: bool,
    /// How many packets ended.
    pub ended: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_are_cut_at_their_length_and_bounded() {
        let mut b = BytesMut::from(&[0u8, 0, 0, 1, b'Q', 0, 0][..]);
        assert!(has_packet(&b));
        assert!(matches!(next_packet(&mut b, 1024), Ok(Some(ClientCommand::Quit(_)))));
        assert!(!has_packet(&b));
        assert!(matches!(next_packet(&mut b, 1024), Ok(None)));
        let mut big = BytesMut::from(&[0u8, 1, 0, 0][..]);
        assert!(next_packet(&mut big, 1024).is_err());
        let mut empty = BytesMut::from(&[0u8, 0, 0, 0][..]);
        assert!(next_packet(&mut empty, 1024).is_err());
    }

    #[test]
    fn packets_split_anywhere_are_followed() {
        let stream = [&[0, 0, 0, 2, b'O', 1][..], &[0, 0, 0, 0], &[0, 0, 1, 0]].concat();
        let mut whole = FrameTracker::default();
        assert_eq!(whole.track(&stream), Tracked { began: true, ended: 2 });
        assert!(whole.in_packet());
        for cut in 0..stream.len() {
            let mut t = FrameTracker::default();
            let a = t.track(&stream[..cut]);
            let b = t.track(&stream[cut..]);
            assert_eq!(a.ended + b.ended, 2, "cut at {cut}");
            assert!(t.in_packet());
        }
    }
}
