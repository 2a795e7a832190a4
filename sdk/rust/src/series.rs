//! Metric handles kept per instance (contract 0.2.1), behind
//! [`crate::Host::counter_add`] and [`crate::Host::observe`] in a
//! component: the first update of a series asks the host for its handle
//! (`metrics.counter` or `metrics.histogram`: the name and labels cross
//! once), and every later one sends the handle (`metrics.add` or
//! `metrics.observe`: two numbers, nothing for the host to read or check).
//! A filter calls the same `counter_add` as before and gets this for free.
//!
//! Written here, not taken from a crate: it is a small table whose only
//! subtleties are the contract's (what a refused series means) and the
//! per-call arena's (its entries must outlive the call that made them).
//!
//! - Entries are matched on the name and every label exactly (a hash only
//!   skips the comparison of entries that cannot match), so label values a
//!   filter takes from a peer cannot make one series count as another.
//! - A series the host refuses (a rule, its series limit) is remembered
//!   without a handle and updated by name, so the host still counts each
//!   update it drops.
//! - At most [`MAX_ENTRIES`] series are kept (the host keeps no more than
//!   256 a filter); past that, updates go by name.
//! - Entries are allocated outside the per-call arena
//!   ([`crate::arena::lasting`]): they live as long as the instance.

use std::cell::RefCell;

/// Most series remembered (the host's limit a filter).
pub const MAX_ENTRIES: usize = 256;

/// A metric's kind: a handle is for one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `metrics.counter`, updated with `metrics.add`.
    Counter,
    /// `metrics.histogram`, updated with `metrics.observe`.
    Histogram,
}

/// One series the host was asked about.
#[derive(Debug)]
struct Entry {
    hash: u64,
    kind: Kind,
    name: Box<str>,
    labels: Box<[(Box<str>, Box<str>)]>,
    /// `None`: the host refused the series (updates go by name).
    handle: Option<u32>,
}

impl Entry {
    fn is(&self, hash: u64, kind: Kind, name: &str, labels: &[(&str, &str)]) -> bool {
        use crate::store::same_key as eq;
        self.hash == hash
            && self.kind == kind
            && eq(&self.name, name)
            && self.labels.len() == labels.len()
            && self.labels.iter().zip(labels).all(|((k, v), (k2, v2))| eq(k, k2) && eq(v, v2))
    }
}

/// The series an instance has asked the host about.
#[derive(Debug, Default)]
pub struct Handles {
    entries: Vec<Entry>,
}

/// What [`Handles::lookup`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// The series' handle.
    Handle(u32),
    /// The host refused the series: update it by name.
    ByName,
    /// Not asked yet: ask with `define`.
    Unknown,
}

/// A hash of a series' name and labels: each string's length, and its
/// first and last eight bytes (or all its bytes, if fewer). Only a filter:
/// matches are confirmed byte by byte, so it need not read every byte.
fn hash(name: &str, labels: &[(&str, &str)]) -> u64 {
    const K: u64 = 0x0000_0100_0000_01b3;
    fn mix(mut h: u64, s: &str) -> u64 {
        let b = s.as_bytes();
        h = (h ^ b.len() as u64).wrapping_mul(K);
        let word = |c: &[u8]| <[u8; 8]>::try_from(c).map_or(0, u64::from_le_bytes);
        if b.len() >= 8 {
            h = (h ^ word(&b[..8])).wrapping_mul(K);
            h = (h ^ word(&b[b.len() - 8..])).wrapping_mul(K);
        } else {
            h = (h ^ crate::store::short_word(b)).wrapping_mul(K);
        }
        h
    }
    let mut h = mix(0xcbf2_9ce4_8422_2325, name);
    for (k, v) in labels {
        h = mix(mix(h, k), v);
    }
    h
}

impl Handles {
    /// What is known of the series `name{labels}` of `kind`.
    pub fn lookup(&self, kind: Kind, name: &str, labels: &[(&str, &str)]) -> Found {
        let h = hash(name, labels);
        match self.entries.iter().find(|e| e.is(h, kind, name, labels)) {
            Some(Entry { handle: Some(id), .. }) => Found::Handle(*id),
            Some(_) => Found::ByName,
            None => Found::Unknown,
        }
    }

    /// Remembers the host's answer for `name{labels}` of `kind` (a handle,
    /// or `None` if it refused the series). Nothing is remembered past
    /// [`MAX_ENTRIES`]: such a series is asked about again next time.
    pub fn remember(&mut self, kind: Kind, name: &str, labels: &[(&str, &str)], handle: Option<u32>) {
        if self.entries.len() >= MAX_ENTRIES {
            return;
        }
        let hash = hash(name, labels);
        // The entry outlives the call: not in the per-call arena.
        crate::arena::lasting(|| {
            self.entries.push(Entry {
                hash,
                kind,
                name: name.into(),
                labels: labels.iter().map(|(k, v)| (Box::from(*k), Box::from(*v))).collect(),
                handle,
            });
        });
    }
}

thread_local! {
    static HANDLES: RefCell<Handles> = const { RefCell::new(Handles { entries: Vec::new() }) };
}

/// Updates the series `name{labels}` of `kind`: through its handle if the
/// host gave one, else asking for it first with `define` (a refusal there
/// is this update dropped, and counted by the host); by name (`by_name`)
/// if the host refused the series before, so that it counts each drop.
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
pub(crate) fn update(
    kind: Kind,
    name: &str,
    labels: &[(&str, &str)],
    define: impl FnOnce() -> Option<u32>,
    by_handle: impl FnOnce(u32),
    by_name: impl FnOnce(),
) {
    let found = HANDLES.with(|h| h.borrow().lookup(kind, name, labels));
    let handle = match found {
        Found::Handle(id) => Some(id),
        Found::ByName => None,
        Found::Unknown => {
            let got = define();
            HANDLES.with(|h| h.borrow_mut().remember(kind, name, labels, got));
            // A refusal was this update's drop (the host counted it).
            let Some(id) = got else { return };
            Some(id)
        }
    };
    match handle {
        Some(id) => by_handle(id),
        None => by_name(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_matched_exactly_and_refusals_remembered() {
        let mut h = Handles::default();
        assert_eq!(h.lookup(Kind::Counter, "passed", &[("stage", "rcpt")]), Found::Unknown);
        h.remember(Kind::Counter, "passed", &[("stage", "rcpt")], Some(3));
        h.remember(Kind::Counter, "Bad", &[], None);
        assert_eq!(h.lookup(Kind::Counter, "passed", &[("stage", "rcpt")]), Found::Handle(3));
        assert_eq!(h.lookup(Kind::Counter, "Bad", &[]), Found::ByName);
        // Another kind, value, label order, or boundary is another series.
        assert_eq!(h.lookup(Kind::Histogram, "passed", &[("stage", "rcpt")]), Found::Unknown);
        assert_eq!(h.lookup(Kind::Counter, "passed", &[("stage", "data")]), Found::Unknown);
        assert_eq!(h.lookup(Kind::Counter, "passed", &[("stag", "ercpt")]), Found::Unknown);
        assert_eq!(h.lookup(Kind::Counter, "passed", &[]), Found::Unknown);
        assert_eq!(h.lookup(Kind::Counter, "passed", &[("stage", "rcpt"), ("x", "")]), Found::Unknown);
    }

    #[test]
    fn no_more_than_the_limit_is_remembered() {
        let mut h = Handles::default();
        for i in 0..MAX_ENTRIES + 5 {
            h.remember(Kind::Counter, "many", &[("i", &i.to_string())], u32::try_from(i).ok());
        }
        assert_eq!(h.lookup(Kind::Counter, "many", &[("i", "7")]), Found::Handle(7));
        assert_eq!(h.lookup(Kind::Counter, "many", &[("i", &MAX_ENTRIES.to_string())]), Found::Unknown);
    }

    #[test]
    fn the_first_update_defines_and_later_ones_use_the_handle() {
        let calls = RefCell::new(Vec::new());
        let run = |name: &str, answer: Option<u32>| {
            update(
                Kind::Counter,
                name,
                &[("k", "v")],
                || {
                    calls.borrow_mut().push(format!("define {name}"));
                    answer
                },
                |id| calls.borrow_mut().push(format!("add {id}")),
                || calls.borrow_mut().push(format!("by name {name}")),
            )
        };
        run("ok_total", Some(9));
        run("ok_total", Some(9));
        run("Refused", None);
        run("Refused", None);
        assert_eq!(*calls.borrow(), ["define ok_total", "add 9", "add 9", "define Refused", "by name Refused"]);
    }
}
