//! Following milter packet boundaries as bytes go by, apart from any I/O so
//! that it can be fuzzed on its own (`fuzz/fuzz_targets/milter_frames.rs`).
//! A packet is a 4-byte big-endian length, then that many bytes (the
//! command byte and its data); `miltr-server` decodes them, this only
//! tells the connection's deadlines whether the MTA is inside a packet.

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
