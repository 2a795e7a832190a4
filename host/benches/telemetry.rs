//! What the operator's view costs on the request path, measured against
//! the same work without it, in one run: counting a decision
//! (`greyhook_decisions_total` and the status counters) against one plain
//! atomic add, and a store read through the measuring wrapper
//! (`store::Metered`) against the same read on the bare memory store.
//! `cargo bench -p greyhook --bench telemetry`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use greyhook::store::{Condition, MemoryStore, Metered, Store};

const N: u32 = 2_000_000;

fn per_op(f: &mut dyn FnMut(u32)) -> f64 {
    // Warm up, then the best of three runs.
    for i in 0..N / 10 {
        f(i);
    }
    (0..3)
        .map(|_| {
            let t = Instant::now();
            for i in 0..N {
                f(i);
            }
            t.elapsed().as_nanos() as f64 / f64::from(N)
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let plain = AtomicU64::new(0);
    let native = per_op(&mut |_| {
        plain.fetch_add(1, Ordering::Relaxed);
    });
    let m = greyhook::telemetry::host();
    let counted = per_op(&mut |i| m.decision("policy", "rcpt", if i % 2 == 0 { "greylist" } else { "pass" }));
    println!("count a decision: {counted:.1} ns (a plain atomic add: {native:.1} ns; {:.1}x)", counted / native);

    let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    let bare = MemoryStore::new();
    let metered = Metered::new(std::sync::Arc::new(MemoryStore::new()));
    for s in [&bare as &dyn Store, &metered as &dyn Store] {
        rt.block_on(s.set("greylist/t/KEY", b"1 0", u64::MAX, Condition::Any, 1)).expect("set");
    }
    let read = |s: &dyn Store| per_op(&mut |_| drop(rt.block_on(s.get("greylist/t/KEY", 1))));
    let (b, w) = (read(&bare), read(&metered));
    println!("store get: {w:.1} ns through Metered (bare memory store: {b:.1} ns; +{:.1} ns, {:.2}x)", w - b, w / b);
}
