//! The epoch ticker: the thread that advances wasmtime's epoch every
//! [`TICK`], which is how a running filter call notices it is slow (and
//! yields) or past its deadline (and traps).
//!
//! It ticks only while filters run. Once no call has been in flight for
//! [`IDLE_AFTER`] it parks, and the next call wakes it: an idle daemon
//! used to wake up a thousand times a second for nothing. Epochs only
//! matter while Wasm runs, and a call's deadline is counted in ticks from
//! when it starts (`set_epoch_deadline` is relative), so a frozen epoch
//! between calls changes nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

/// How often the epoch advances while calls run.
pub(crate) const TICK: Duration = Duration::from_millis(1);

/// How long the ticker goes on ticking with no call in flight before it
/// parks (so a steady stream of calls never pays for waking it).
pub(crate) const IDLE_AFTER: Duration = Duration::from_millis(500);

#[derive(Debug, Default)]
struct State {
    stop: AtomicBool,
    /// Calls (and instantiations) running Wasm now.
    active: AtomicUsize,
    /// The ticker is parked or about to park.
    parked: AtomicBool,
}

/// The ticker thread; stops when dropped.
#[derive(Debug)]
pub(crate) struct Ticker {
    state: Arc<State>,
    thread: std::thread::Thread,
}

/// Held while Wasm runs: keeps the ticker ticking.
#[must_use = "the ticker ticks only while the guard lives"]
pub(crate) struct Busy<'a>(&'a State);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, SeqCst);
    }
}

impl Ticker {
    /// Starts the thread; `tick` advances the epoch and returns false once
    /// the engine is gone (the thread then ends).
    pub(crate) fn start(tick: impl Fn() -> bool + Send + 'static) -> std::io::Result<Ticker> {
        let state = Arc::new(State::default());
        let s = state.clone();
        let handle = std::thread::Builder::new().name("greyhook-epoch".into()).spawn(move || {
            let idle_ticks = IDLE_AFTER.as_millis() / TICK.as_millis().max(1);
            let mut idle = 0;
            while !s.stop.load(SeqCst) {
                std::thread::sleep(TICK);
                if !tick() {
                    break;
                }
                if s.active.load(SeqCst) > 0 {
                    idle = 0;
                    continue;
                }
                idle += 1;
                if idle < idle_ticks {
                    continue;
                }
                // Announce the park, then look again: a call that began
                // meanwhile either is seen here or sees `parked` and
                // unparks us (an unpark before the park makes it return
                // at once). Both sides use SeqCst, so one of them sees
                // the other.
                s.parked.store(true, SeqCst);
                while s.active.load(SeqCst) == 0 && !s.stop.load(SeqCst) {
                    std::thread::park();
                }
                s.parked.store(false, SeqCst);
                idle = 0;
            }
        })?;
        Ok(Ticker { state, thread: handle.thread().clone() })
    }

    /// Marks Wasm as running until the guard drops, waking the ticker if it
    /// was parked.
    pub(crate) fn busy(&self) -> Busy<'_> {
        self.state.active.fetch_add(1, SeqCst);
        if self.state.parked.load(SeqCst) {
            self.thread.unpark();
        }
        Busy(&self.state)
    }

    /// Whether the ticker is parked.
    #[cfg(test)]
    fn parked(&self) -> bool {
        self.state.parked.load(SeqCst)
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.state.stop.store(true, SeqCst);
        self.thread.unpark();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn it_parks_when_idle_and_ticks_again_for_a_call() {
        let ticks = Arc::new(AtomicU64::new(0));
        let t = {
            let ticks = ticks.clone();
            Ticker::start(move || {
                ticks.fetch_add(1, SeqCst);
                true
            })
            .unwrap()
        };
        let deadline = std::time::Instant::now() + IDLE_AFTER * 20;
        while !t.parked() {
            assert!(std::time::Instant::now() < deadline, "never parked");
            std::thread::sleep(TICK * 10);
        }
        // Parked: no ticks.
        let before = ticks.load(SeqCst);
        std::thread::sleep(IDLE_AFTER / 2);
        assert!(ticks.load(SeqCst) <= before + 1, "ticked while parked");
        // A call wakes it, and it ticks while the call runs.
        let busy = t.busy();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while ticks.load(SeqCst) < before + 5 {
            assert!(std::time::Instant::now() < deadline, "no ticks during a call");
            std::thread::sleep(TICK);
        }
        assert!(!t.parked());
        drop(busy);
    }
}
