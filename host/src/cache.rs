//! Bounded least-recently-used maps (the policy service's transactions,
//! the resolver's answer caches).

use std::hash::Hash;
use std::num::NonZeroUsize;

/// An LRU map of at most `capacity` entries (at least 1): full, `push`
/// drops the entry used least recently for a new key, reusing its node.
/// Built unbounded and then resized because `lru::LruCache::new` allocates
/// its table for the whole capacity at once (50 000 transactions, 10 000
/// answers of each of five kinds), whether or not that many ever come.
pub(crate) fn lru<K: Hash + Eq, V>(capacity: usize) -> lru::LruCache<K, V> {
    let mut cache = lru::LruCache::unbounded();
    cache.resize(NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN));
    cache
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_full_map_drops_the_least_recently_used() {
        let mut c = super::lru(2);
        c.push(1, 'a');
        c.push(2, 'b');
        c.get(&1);
        c.push(3, 'c');
        assert_eq!((c.len(), c.contains(&1), c.contains(&2), c.contains(&3)), (2, true, false, true));
        // A key already there is replaced, nothing dropped.
        c.push(3, 'd');
        assert_eq!((c.len(), c.peek(&1), c.peek(&3)), (2, Some(&'a'), Some(&'d')));
        assert_eq!(super::lru::<u8, u8>(0).cap().get(), 1);
    }
}
