//! Which keys a store file may hold: a Bloom filter the embedded store
//! asks before it reads its file, so that a key the file does not hold
//! costs a hash and a few bit probes instead of a walk down the B-tree.
//!
//! Most keys a greylisting filter reads are not there: the whitelist keys
//! of every decision (client, sender domain, recipient), the
//! auto-whitelist count of a new client, the triplet of a first attempt.
//! Each such read walked redb's tree to a leaf (~1 350 instructions a key,
//! five a decision; `docs/performance.md`).
//!
//! The filter answers "maybe" or "no", never a wrong "no": every key the
//! file holds was either read into the filter when it was built, or noted
//! by the write transaction that put it there, before that transaction
//! committed ([`super::redb`] keeps that order). A false "maybe" only costs
//! the read the store made before. Keys removed from the file (expiry,
//! deletion) stay in the filter until it is built again, which happens
//! when it has noted more keys than it was sized for.

use std::sync::atomic::{AtomicUsize, Ordering};

use fastbloom::AtomicBloomFilter;

/// The share of "maybe"s for keys the file does not hold, at capacity.
const FALSE_POSITIVES: f64 = 0.01;

/// The smallest capacity a filter is built for (about 300 KB).
pub const MIN_KEYS: usize = 1 << 18;

/// The most memory one filter takes: 64 MiB, about 56M keys at
/// [`FALSE_POSITIVES`]. A file with more keys gets more false "maybe"s
/// (reads the store would have made anyway), never a wrong "no".
pub const MAX_BITS: usize = 64 << 23;

/// A Bloom filter of keys, safe to note into and ask from many threads.
pub struct KeyFilter {
    bloom: AtomicBloomFilter<foldhash::fast::RandomState>,
    /// The keys it is sized for.
    capacity: usize,
    /// Keys noted that set at least one new bit (a key noted again, e.g.
    /// a record rewritten, sets none and is not counted).
    keys: AtomicUsize,
}

impl std::fmt::Debug for KeyFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyFilter").field("capacity", &self.capacity).field("keys", &self.keys()).finish()
    }
}

impl KeyFilter {
    /// An empty filter for `keys` keys (at least [`MIN_KEYS`], at most
    /// [`MAX_BITS`] of memory), hashed with a seed of this process's own
    /// (so keys a peer chooses cannot be made to collide offline; a
    /// collision would only cost a read anyway).
    pub fn with_capacity(keys: usize) -> KeyFilter {
        let capacity = keys.max(MIN_KEYS);
        let bits = fastbloom::optimal_size(capacity, FALSE_POSITIVES).clamp(64, MAX_BITS);
        let bloom = AtomicBloomFilter::with_num_bits(bits).hasher(foldhash::fast::RandomState::default()).expected_items(capacity);
        KeyFilter { bloom, capacity, keys: AtomicUsize::new(0) }
    }

    /// Notes that the file may hold `key`. True when this note took the
    /// filter past its capacity (once: the caller asks for a new one).
    pub fn note(&self, key: &str) -> bool {
        if self.bloom.insert(key) {
            return false;
        }
        self.keys.fetch_add(1, Ordering::Relaxed) + 1 == self.capacity + 1
    }

    /// False only if the file cannot hold `key`.
    pub fn may_hold(&self, key: &str) -> bool {
        self.bloom.contains(key)
    }

    /// Whether more keys were noted than it was sized for.
    pub fn is_full(&self) -> bool {
        self.keys() > self.capacity
    }

    /// Distinct keys noted (about: two keys that set the same bits count once).
    pub fn keys(&self) -> usize {
        self.keys.load(Ordering::Relaxed)
    }

    /// Its memory, in bytes.
    pub fn bytes(&self) -> usize {
        self.bloom.num_bits() / 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noted_keys_are_always_found_and_most_others_are_not() {
        let f = KeyFilter::with_capacity(10_000);
        for i in 0..10_000 {
            f.note(&format!("t/key-{i}"));
        }
        assert!((0..10_000).all(|i| f.may_hold(&format!("t/key-{i}"))), "a noted key is never refused");
        let false_maybes = (0..100_000).filter(|i| f.may_hold(&format!("wl/other-{i}"))).count();
        // Sized for MIN_KEYS, so far under 1% here.
        assert!(false_maybes < 1_000, "{false_maybes} false maybes in 100 000");
        assert!(!f.is_full());
    }

    #[test]
    fn past_its_capacity_it_says_so_once() {
        let f = KeyFilter::with_capacity(0);
        assert_eq!(f.capacity, MIN_KEYS);
        let crossings = (0..MIN_KEYS + 20_000).filter(|i| f.note(&format!("k{i}"))).count();
        assert_eq!(crossings, 1);
        assert!(f.is_full());
        // Noting a key again counts nothing.
        let before = f.keys();
        f.note("k1");
        assert_eq!(f.keys(), before);
    }

    #[test]
    fn memory_is_bounded() {
        assert!(KeyFilter::with_capacity(usize::MAX / 1024).bytes() <= MAX_BITS / 8);
        assert!(KeyFilter::with_capacity(0).bytes() < 400 << 10);
    }
}
