//! A per-call arena allocator for filters (feature `arena`, WebAssembly
//! builds only).
//!
//! A hook call allocates dozens of short-lived strings and vectors (the
//! context's fields, keys, record values, the verdict) and frees them all
//! by the time the host has read its answer. Through the default allocator
//! (dlmalloc in the component) each costs a search of its free lists; here
//! each is a pointer bump in one chunk, which is rewound when nothing in it
//! is alive any more — in a filter that keeps no state, after every call.
//! Written here, not taken from a crate, because what makes it safe and
//! useful is specific to the hook glue (what `init` builds goes to the
//! system allocator; everything else lives for one call).
//!
//! Why it is safe whatever the filter does: the chunk is rewound **only
//! when every allocation in it has been freed** (a count of live blocks),
//! and a freed block is reused before that only if it was the last one.
//! So a filter that keeps something between calls (a cache in a
//! `thread_local`, a leak) never has it overwritten: the chunk just stops
//! being rewound, fills up, and later allocations come from the system
//! allocator. The glue notices that the arena has not been rewound for
//! [`STUCK_AFTER`] calls in a row and logs it once as a warning. (Hooks
//! are meant to keep no state: see [`crate::Filter`].) What does not fit
//! in the chunk, or needs more alignment, comes from the system allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::ptr;

/// Bytes in the arena's one chunk (taken from the system allocator when
/// the arena first serves, after `init`). A call that needs more gets the rest
/// from the system allocator.
pub const CHUNK: usize = 128 * 1024;

/// Calls in a row after which an arena that has not been rewound is
/// reported (a filter that keeps no state rewinds it after every call).
pub const STUCK_AFTER: u32 = 3;

/// The chunk's alignment; a larger alignment goes to the system allocator.
const CHUNK_ALIGN: usize = 16;

/// The allocator: a bump arena once `init` is done, the system allocator
/// before and for what does not fit. Single-threaded (a component
/// instance is).
#[derive(Debug)]
pub struct Arena {
    /// The chunk (null until first used).
    base: Cell<*mut u8>,
    /// Offset of the first free byte in the chunk.
    next: Cell<usize>,
    /// Where allocations in the chunk must end: [`CHUNK`] while the arena
    /// serves, 0 while it does not (during `init`, or without a chunk), so
    /// that one comparison answers both "is there room" and "is it on".
    limit: Cell<usize>,
    /// Allocations in the chunk not freed yet.
    live: Cell<usize>,
    /// Calls begun since the chunk was last rewound.
    since_rewind: Cell<u32>,
    /// Whether being stuck was reported.
    reported: Cell<bool>,
}

// SAFETY: a wasm32 component instance without the `atomics` feature has a
// single thread; nothing else can touch the cells.
#[cfg(all(target_arch = "wasm32", not(target_feature = "atomics")))]
unsafe impl Sync for Arena {}

impl Default for Arena {
    fn default() -> Self {
        Self::new()
    }
}

impl Arena {
    /// An arena that has not taken its chunk yet and does not serve yet.
    pub const fn new() -> Arena {
        Arena {
            base: Cell::new(ptr::null_mut()),
            next: Cell::new(0),
            limit: Cell::new(0),
            live: Cell::new(0),
            since_rewind: Cell::new(0),
            reported: Cell::new(false),
        }
    }

    /// `p`'s offset in the chunk, if it is the chunk's: one subtraction and
    /// comparison (the offset wraps for a block below the chunk).
    #[inline]
    fn offset(&self, p: *mut u8) -> Option<usize> {
        let base = self.base.get();
        let off = (p as usize).wrapping_sub(base as usize);
        (off < CHUNK && !base.is_null()).then_some(off)
    }

    #[cfg(test)]
    fn owns(&self, p: *mut u8) -> bool {
        self.offset(p).is_some()
    }

    /// A bump allocation in the chunk, or null if the arena is not serving
    /// or has no room. (Called for every allocation of a hook call: one
    /// comparison with `limit` covers room, serving and having a chunk.)
    #[inline]
    fn bump(&self, layout: Layout) -> *mut u8 {
        let align = layout.align();
        let start = (self.next.get() + align - 1) & !(align - 1);
        match start.checked_add(layout.size()) {
            Some(end) if end <= self.limit.get() && align <= CHUNK_ALIGN => {
                self.next.set(end);
                self.live.set(self.live.get() + 1);
                // SAFETY: `limit` is non-zero only with a chunk, and
                // `start` is within it.
                unsafe { self.base.get().add(start) }
            }
            _ => ptr::null_mut(),
        }
    }

    /// Serves allocations from now on (after `init`), taking the chunk
    /// from the system allocator the first time (if it cannot, the system
    /// allocator serves everything).
    pub fn resume(&self) {
        if self.base.get().is_null() {
            // SAFETY: a valid, non-zero layout.
            let base = unsafe { System.alloc(Layout::from_size_align(CHUNK, CHUNK_ALIGN).expect("a valid chunk layout")) };
            if base.is_null() {
                return;
            }
            self.base.set(base);
        }
        self.limit.set(CHUNK);
    }

    /// Stops serving (during `init`: what it builds lasts).
    pub fn pause(&self) {
        self.limit.set(0);
    }

    /// A hook call begins. Returns true once, the first time the chunk has
    /// not been rewound for [`STUCK_AFTER`] calls in a row (something the
    /// filter keeps between calls is in it).
    pub fn begin_call(&self) -> bool {
        let n = self.since_rewind.get().saturating_add(1);
        self.since_rewind.set(n);
        if n > STUCK_AFTER && !self.reported.get() {
            self.reported.set(true);
            return true;
        }
        false
    }

    /// Bytes of the chunk in use (for tests and diagnostics).
    pub fn used(&self) -> usize {
        self.next.get()
    }
}

// SAFETY: every pointer handed out is either the system allocator's (and
// given back to it) or a distinct, aligned range of the chunk that is not
// handed out again while it is live: the chunk is rewound only when no
// allocation in it is live, and a freed range is reused before that only if
// it was the last one (nothing after it is live).
unsafe impl GlobalAlloc for Arena {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = self.bump(layout);
        if p.is_null() {
            // SAFETY: the caller's layout, passed on.
            unsafe { system_alloc(layout) }
        } else {
            p
        }
    }

    #[inline]
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        if let Some(off) = self.offset(p) {
            // Saturating: a double free is the caller's undefined behaviour, but
            // the count must not wrap and let the chunk look busy for ever.
            let live = self.live.get().saturating_sub(1);
            self.live.set(live);
            if live == 0 {
                // Nothing in the chunk is alive: all of it is free again.
                self.next.set(0);
                self.since_rewind.set(0);
            } else if off + layout.size() == self.next.get() {
                // The last allocation: its bytes are free again at once.
                self.next.set(off);
            }
        } else {
            // SAFETY: not ours, so the system allocator's.
            unsafe { system_dealloc(p, layout) }
        }
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Some(off) = self.offset(p) else {
            // SAFETY: the system allocator's block, passed on.
            return unsafe { System.realloc(p, layout, new_size) };
        };
        // The last allocation grows or shrinks in place while there is room
        // (a string or vector being pushed to, the common case).
        if off + layout.size() == self.next.get()
            && let Some(end) = off.checked_add(new_size).filter(|&e| e <= self.limit.get())
        {
            self.next.set(end);
            return p;
        }
        // SAFETY: `new_size` with the old alignment is valid (the caller's
        // contract); the new block does not overlap the old one.
        unsafe {
            let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
            let q = self.alloc(new_layout);
            if !q.is_null() {
                ptr::copy_nonoverlapping(p, q, layout.size().min(new_size));
                self.dealloc(p, layout);
            }
            q
        }
    }
}

/// The system allocator's `alloc`, out of line: kept out of the arena's
/// fast path, which then needs no stack frame of its own in a component
/// (wasi-libc's `posix_memalign` takes an out-pointer on the shadow stack)
/// and saves fewer registers: ~10 instructions less an allocation.
///
/// # Safety
///
/// As [`GlobalAlloc::alloc`].
#[cold]
#[inline(never)]
unsafe fn system_alloc(layout: Layout) -> *mut u8 {
    // SAFETY: the caller's contract.
    unsafe { System.alloc(layout) }
}

/// The system allocator's `dealloc`, out of line (see [`system_alloc`]).
///
/// # Safety
///
/// As [`GlobalAlloc::dealloc`].
#[cold]
#[inline(never)]
unsafe fn system_dealloc(p: *mut u8, layout: Layout) {
    // SAFETY: the caller's contract.
    unsafe { System.dealloc(p, layout) }
}

#[cfg(all(feature = "arena", target_arch = "wasm32"))]
#[global_allocator]
static GLOBAL: Arena = Arena::new();

/// Runs `f` (the filter's `init`) with the system allocator: what it
/// builds lasts. Then the arena serves every allocation (the hook calls,
/// and the host's copies of their arguments and of import results).
pub fn lasting<T>(f: impl FnOnce() -> T) -> T {
    #[cfg(all(feature = "arena", target_arch = "wasm32"))]
    {
        GLOBAL.pause();
        let v = f();
        GLOBAL.resume();
        v
    }
    #[cfg(not(all(feature = "arena", target_arch = "wasm32")))]
    {
        f()
    }
}

/// A hook call begins: true once, if the arena turned out to be held by
/// something the filter keeps between calls (see [`Arena::begin_call`]).
pub fn begin_call() -> bool {
    #[cfg(all(feature = "arena", target_arch = "wasm32"))]
    {
        GLOBAL.begin_call()
    }
    #[cfg(not(all(feature = "arena", target_arch = "wasm32")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).unwrap()
    }

    fn serving() -> Arena {
        let a = Arena::new();
        a.resume();
        a
    }

    #[test]
    fn allocations_are_bumped_and_the_chunk_rewound_when_all_are_freed() {
        let a = serving();
        unsafe {
            let p = a.alloc(layout(10, 1));
            let q = a.alloc(layout(8, 8));
            let r = a.alloc(layout(4, 1));
            assert!(a.owns(p) && a.owns(q) && a.owns(r));
            assert_eq!(q as usize % 8, 0);
            assert!(q as usize >= p as usize + 10, "no overlap");
            p.write_bytes(1, 10);
            q.write_bytes(2, 8);
            a.dealloc(p, layout(10, 1));
            assert!(a.used() >= 22, "not rewound while q and r live");
            assert_eq!(*q.add(7), 2);
            a.dealloc(q, layout(8, 8));
            a.dealloc(r, layout(4, 1));
        }
        assert_eq!(a.used(), 0, "rewound");
        assert!(!a.begin_call());
    }

    #[test]
    fn before_resume_and_past_the_chunk_memory_is_the_systems() {
        let a = Arena::new();
        unsafe {
            let p = a.alloc(layout(32, 8));
            assert!(!a.owns(p), "not serving yet (init)");
            a.dealloc(p, layout(32, 8));
            a.resume();
            let big = a.alloc(layout(CHUNK + 1, 8));
            assert!(!big.is_null() && !a.owns(big), "too big for the chunk");
            let over = a.alloc(layout(64, 64));
            assert!(!a.owns(over), "an alignment over the chunk's");
            a.dealloc(big, layout(CHUNK + 1, 8));
            a.dealloc(over, layout(64, 64));
        }
    }

    #[test]
    fn the_last_allocation_grows_in_place_and_others_move() {
        let a = serving();
        unsafe {
            let p = a.alloc(layout(4, 1));
            p.copy_from(b"abcd".as_ptr(), 4);
            let p2 = a.realloc(p, layout(4, 1), 100);
            assert_eq!(p, p2, "grown in place");
            let q = a.alloc(layout(4, 1));
            let p3 = a.realloc(p2, layout(100, 1), 200);
            assert_ne!(p3, p2, "no longer the last: moved");
            assert_eq!(std::slice::from_raw_parts(p3, 4), b"abcd");
            a.dealloc(q, layout(4, 1));
            a.dealloc(p3, layout(200, 1));
        }
        assert_eq!(a.used(), 0);
    }

    #[test]
    fn a_system_block_reallocated_stays_the_systems() {
        let a = Arena::new();
        unsafe {
            let p = a.alloc(layout(16, 8));
            a.resume();
            let q = a.realloc(p, layout(16, 8), 64);
            assert!(!a.owns(q));
            a.dealloc(q, layout(64, 8));
        }
    }

    #[test]
    fn what_a_filter_keeps_is_never_overwritten_and_being_stuck_is_reported_once() {
        let a = serving();
        // A call keeps one block; later calls allocate and free around it.
        let kept = unsafe { a.alloc(layout(24, 8)) };
        unsafe { kept.write_bytes(7, 24) };
        let mut reported = 0;
        for _ in 0..10_000 {
            reported += usize::from(a.begin_call());
            unsafe {
                let t = a.alloc(layout(100, 8));
                let u = a.alloc(layout(50, 1));
                t.write_bytes(0xAA, 100);
                u.write_bytes(0xBB, 50);
                a.dealloc(t, layout(100, 8));
                a.dealloc(u, layout(50, 1));
            }
        }
        assert_eq!(reported, 1, "reported once");
        assert!(a.used() > 0, "never rewound while the kept block lives");
        unsafe {
            assert!((0..24).all(|i| *kept.add(i) == 7), "the kept block was not overwritten");
            // Full (the freed blocks in the middle are not reused): the
            // system allocator serves the rest.
            let filled = (0..CHUNK).map(|_| a.alloc(layout(64, 8))).collect::<Vec<_>>();
            assert!(filled.iter().any(|p| !a.owns(*p)), "past the chunk: the system's");
            for p in filled {
                a.dealloc(p, layout(64, 8));
            }
            a.dealloc(kept, layout(24, 8));
        }
        assert_eq!(a.used(), 0, "rewound once the kept block is freed");
    }
}
