//! The epoch ticker: the thread that advances wasmtime's epoch, which is
//! how a running filter call notices it is slow (and yields) or past its
//! deadline (and traps).
//!
//! It ticks every [`TICK`] only while a call is in flight. Decisions take
//! microseconds, so at almost every wake-up none is: then it sleeps
//! [`QUIET_TICK`] instead. Under a steady load of short calls that is a
//! quarter of the wake-ups. Each is a timer, a context switch and a system
//! call: ~20 µs of CPU on a shared 2-core machine, which at a thousand
//! wake-ups a second was ~20 µs a message through the SMTP front end
//! (`docs/performance.md`). The price: a call that starts during a quiet
//! sleep is first looked at when that sleep ends, so a runaway yields or
//! traps up to [`QUIET_TICK`] later than it would have; from then on the
//! ticker ticks every [`TICK`] again.
//!
//! Once no call has begun for [`IDLE_AFTER`] it parks, and the next call
//! wakes it: an idle daemon used to wake up a thousand times a second for
//! nothing. Epochs only matter while Wasm runs, and a call's deadline is
//! counted in ticks from when it starts (`set_epoch_deadline` is relative),
//! so a frozen epoch between calls changes nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

/// How often the epoch advances while a call is in flight.
pub(crate) const TICK: Duration = Duration::from_millis(1);

/// How long the ticker sleeps after a wake-up that found no call in flight.
pub(crate) const QUIET_TICK: Duration = Duration::from_millis(4);

/// How long the ticker goes on ticking with no call begun before it parks
/// (so a steady stream of calls never pays for waking it).
pub(crate) const IDLE_AFTER: Duration = Duration::from_millis(500);

/// One call in [`State::calls`]: the in-flight count is the low half...
const IN_FLIGHT: u64 = 1;
/// ...and the high half counts calls begun (wrapping), so the ticker sees a
/// call that began and ended between two of its wake-ups.
const BEGUN: u64 = 1 << 32;

#[derive(Debug, Default)]
struct State {
    stop: AtomicBool,
    /// Calls (and instantiations) running Wasm now, and calls begun: one
    /// atomic, so a call pays one read-modify-write to begin, as before.
    calls: AtomicU64,
    /// The ticker is parked or about to park.
    parked: AtomicBool,
}

impl State {
    fn in_flight(calls: u64) -> bool {
        calls & (BEGUN - 1) != 0
    }
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
        self.0.calls.fetch_sub(IN_FLIGHT, SeqCst);
    }
}

impl Ticker {
    /// Starts the thread; `tick` advances the epoch and returns false once
    /// the engine is gone (the thread then ends).
    pub(crate) fn start(tick: impl Fn() -> bool + Send + 'static) -> std::io::Result<Ticker> {
        let state = Arc::new(State::default());
        let s = state.clone();
        let handle = std::thread::Builder::new().name("greyhook-epoch".into()).spawn(move || {
            let mut seen = s.calls.load(SeqCst);
            let mut last_call = Instant::now();
            let mut sleep = TICK;
            while !s.stop.load(SeqCst) {
                std::thread::sleep(sleep);
                if !tick() {
                    break;
                }
                let now = s.calls.load(SeqCst);
                let busy = State::in_flight(now);
                sleep = if busy { TICK } else { QUIET_TICK };
                if busy || now >> 32 != seen >> 32 {
                    seen = now;
                    last_call = Instant::now();
                    continue;
                }
                if last_call.elapsed() < IDLE_AFTER {
                    continue;
                }
                // Announce the park, then look again: a call that began
                // meanwhile either is seen here or sees `parked` and
                // unparks us (an unpark before the park makes it return
                // at once). Both sides use SeqCst, so one of them sees
                // the other.
                s.parked.store(true, SeqCst);
                while !State::in_flight(s.calls.load(SeqCst)) && !s.stop.load(SeqCst) {
                    std::thread::park();
                }
                s.parked.store(false, SeqCst);
                seen = s.calls.load(SeqCst);
                last_call = Instant::now();
                sleep = TICK;
            }
        })?;
        Ok(Ticker { state, thread: handle.thread().clone() })
    }

    /// Marks Wasm as running until the guard drops, waking the ticker if it
    /// was parked.
    pub(crate) fn busy(&self) -> Busy<'_> {
        self.state.calls.fetch_add(IN_FLIGHT + BEGUN, SeqCst);
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

    /// A ticker that counts its ticks.
    fn counting() -> (Arc<AtomicU64>, Ticker) {
        let ticks = Arc::new(AtomicU64::new(0));
        let t = {
            let ticks = ticks.clone();
            Ticker::start(move || {
                ticks.fetch_add(1, SeqCst);
                true
            })
            .unwrap()
        };
        (ticks, t)
    }

    #[test]
    fn it_parks_when_idle_and_ticks_again_for_a_call() {
        let (ticks, t) = counting();
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

    /// Short calls, none in flight when the ticker looks: it ticks at the
    /// quiet pace, yet never parks, since calls keep beginning.
    #[test]
    fn short_calls_get_quiet_ticks_and_keep_it_awake() {
        let (ticks, t) = counting();
        let began = std::time::Instant::now();
        let before = ticks.load(SeqCst);
        while began.elapsed() < IDLE_AFTER * 2 {
            drop(t.busy());
            assert!(!t.parked(), "parked while calls kept beginning");
            std::thread::sleep(TICK * 5);
        }
        let n = ticks.load(SeqCst) - before;
        let most = (began.elapsed().as_micros() / QUIET_TICK.as_micros()) as u64 + 5;
        assert!(n <= most, "{n} ticks in {:?}: not the quiet pace (at most {most})", began.elapsed());
    }

    /// A call in flight gets a tick every millisecond again.
    #[test]
    fn a_call_in_flight_gets_ticks_every_tick() {
        let (ticks, t) = counting();
        let busy = t.busy();
        // The first quiet sleep may still be running.
        std::thread::sleep(QUIET_TICK * 2);
        let before = ticks.load(SeqCst);
        let began = std::time::Instant::now();
        std::thread::sleep(QUIET_TICK * 25);
        let n = ticks.load(SeqCst) - before;
        let quiet_pace = (began.elapsed().as_micros() / QUIET_TICK.as_micros()) as u64;
        // Sleeps overrun on a loaded machine; twice the quiet pace is
        // still far from it.
        assert!(n > quiet_pace * 2, "{n} ticks in {:?} with a call in flight", began.elapsed());
        drop(busy);
    }
}
