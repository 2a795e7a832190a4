//! Bounded least-recently-used maps (the policy service's transactions,
//! the resolver's answer caches).

use std::borrow::Borrow;
use std::hash::{BuildHasher, Hash};
use std::num::NonZeroUsize;
use std::sync::{Mutex, MutexGuard};

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

/// A shard holds at least this many entries: a map smaller than two of
/// them is one shard, so its eviction is exactly least-recently-used.
const MIN_SHARD: usize = 2048;

/// At most this many shards.
const MAX_SHARDS: usize = 16;

/// An LRU map of at most `capacity` entries shared between threads, split
/// by a hash of the key into shards that each have their own lock and an
/// equal part of the capacity, so that threads working on different keys
/// rarely wait for each other. Full, a shard drops *its* entry used least
/// recently: with thousands of entries a shard and keys spread by the hash,
/// that is close to the least recent overall. A map of under 4 096 entries
/// is one shard, exact.
///
/// The hash is seeded at random when the map is made (foldhash), so which
/// keys share a shard cannot be predicted from outside.
pub(crate) struct ShardedLru<K, V> {
    shards: Box<[Mutex<lru::LruCache<K, V>>]>,
    spread: foldhash::fast::RandomState,
}

impl<K: Hash + Eq, V> ShardedLru<K, V> {
    /// A map of at most `capacity` entries (at least 1), in
    /// `capacity / 2048` shards, at least 1 and at most 16, whose
    /// capacities add up to `capacity`.
    pub(crate) fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        let n = (capacity / MIN_SHARD).clamp(1, MAX_SHARDS);
        let shards = (0..n).map(|i| Mutex::new(lru(capacity / n + usize::from(i < capacity % n)))).collect();
        ShardedLru { shards, spread: foldhash::fast::RandomState::default() }
    }

    /// The shard `key` belongs in, locked: for work on one entry that a
    /// single `pop` or `push` does not do (a `get` that checks a TTL). Hold
    /// it for one map operation or two, never across an `.await`.
    pub(crate) fn shard<Q: Hash + ?Sized>(&self, key: &Q) -> MutexGuard<'_, lru::LruCache<K, V>> {
        let i = if self.shards.len() == 1 { 0 } else { (self.spread.hash_one(key) % self.shards.len() as u64) as usize };
        // Every critical section is a single map operation, which leaves a
        // map whole even if it panicked: a poisoned lock is used as it is.
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the entry of `key` out of the map.
    pub(crate) fn pop<Q: Hash + Eq + ?Sized>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        self.shard(key).pop(key)
    }

    /// Puts `value` in as the most recent entry of its shard and hands back
    /// what made room for it: the old value of `key`, or the shard's least
    /// recent entry when the shard was full. The caller drops it, after the
    /// shard's lock is released.
    pub(crate) fn push(&self, key: K, value: V) -> Option<(K, V)> {
        self.shard(&key).push(key, value)
    }

    /// The number of entries, shard by shard (not one instant's count).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::ShardedLru;

    /// Capacities add up to the limit, a flood of keys never holds more
    /// than it, a small map is one exact LRU, and a kept key comes back.
    #[test]
    fn a_sharded_map_holds_its_capacity_and_no_more() {
        for (capacity, shards) in [(0, 1), (1, 1), (50, 1), (4095, 1), (4096, 2), (20_000, 9), (50_000, 16), (1_000_000, 16)] {
            let m: ShardedLru<String, usize> = ShardedLru::new(capacity);
            assert_eq!(m.shards.len(), shards, "{capacity}");
            let total: usize = m.shards.iter().map(|s| s.lock().unwrap().cap().get()).sum();
            assert_eq!(total, capacity.max(1), "{capacity}");
        }
        let m = ShardedLru::new(50_000);
        for i in 0..200_000usize {
            m.push(format!("instance-{i}"), i);
        }
        assert_eq!(m.len(), 50_000);
        // The newest entries are all there: every shard dropped its oldest.
        assert!((199_000..200_000).all(|i| m.pop(&format!("instance-{i}")) == Some(i)));
        assert_eq!(m.pop("instance-0"), None);
        // A key pushed again replaces its value and hands the old one back.
        assert_eq!(m.push("k".to_string(), 1), None);
        assert_eq!(m.push("k".to_string(), 2), Some(("k".to_string(), 1)));
        // One shard: exactly the least recent goes.
        let small = ShardedLru::new(2);
        small.push("a", 1);
        small.push("b", 2);
        assert_eq!(small.push("c", 3), Some(("a", 1)));
        assert_eq!((small.pop("b"), small.pop("c"), small.len()), (Some(2), Some(3), 0));
    }

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
