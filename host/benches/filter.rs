//! on-rcpt decisions per second: the reference filter as a Wasm component in
//! the host, against the same logic (`greylist-guest` as a native library)
//! over the same store, on the in-memory and the redb store. Prints both
//! rates and the ratio, measured in one run: each side's calls in blocks
//! that alternate with the other side's, so both meet the same spells of
//! a shared machine.
//!
//! `cargo bench -p greyhook --bench filter` (or `-- --quick`; `-- --mail`
//! times a bare hook call with no store calls; `-- --haraka` runs the same
//! workload inside the Haraka host, `hosts/haraka/bench/percall.js`, and
//! prints the ratio to this host's; `-- --instructions` counts instructions
//! a decision under callgrind, and an on-data call's, see [`instructions`]).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use greyhook::runtime::metrics::FilterMetrics;
use greyhook::store::{Condition, Durability, MemoryStore, RedbStore, Store, WriteOutcome};
use greyhook::types::{AcceptedRecipient, Context, Message, Session, Transaction};
use greyhook::{FilterOptions, Runtime, RuntimeConfig};
use greyhook_filter::host::Write;
use greyhook_filter::{DnsError, Entry, Host, Level, RecordType, SpfOutcome, StoreError, WriteOutcome as SdkOutcome};
use greylist_guest::config::Config;
use greylist_guest::filter::Greylist;

const T0: u64 = 1_700_000_000;
const TRIPLETS: u64 = 5_000;

/// The guest logic's host, over the host's store and metrics (as the Wasm
/// imports do: the same keys, the same series updated); it makes no DNS
/// calls.
struct HostKv<'a> {
    store: &'a dyn Store,
    metrics: &'a FilterMetrics,
    now: u64,
}

fn err(e: greyhook::store::StoreError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl Host for HostKv<'_> {
    fn get(&mut self, key: &str) -> Result<Option<Entry>, StoreError> {
        let k = format!("greylist/{key}");
        futures::executor::block_on(self.store.get(&k, self.now))
            .map(|e| e.map(|e| Entry { value: e.value, version: e.version }))
            .map_err(err)
    }
    fn get_many(&mut self, keys: &[&str]) -> Result<Vec<Option<Entry>>, StoreError> {
        keys.iter().map(|k| self.get(k)).collect()
    }
    fn set(&mut self, key: &str, value: &[u8], ttl: u32, if_version: Option<u64>) -> Result<SdkOutcome, StoreError> {
        let k = format!("greylist/{key}");
        let at = self.now + u64::from(ttl.max(1));
        match futures::executor::block_on(self.store.set(&k, value, at, Condition::from_wit(if_version), self.now)) {
            Ok(WriteOutcome::Written(v)) => Ok(SdkOutcome::Written(v)),
            Ok(WriteOutcome::Conflict) => Ok(SdkOutcome::Conflict),
            Err(e) => Err(err(e)),
        }
    }
    fn set_many(&mut self, writes: &[Write<'_>]) -> Result<Vec<SdkOutcome>, StoreError> {
        writes.iter().map(|w| self.set(w.key, w.value, w.ttl, w.if_version)).collect()
    }
    fn delete(&mut self, key: &str, if_version: Option<u64>) -> Result<bool, StoreError> {
        let k = format!("greylist/{key}");
        futures::executor::block_on(self.store.delete(&k, Condition::from_wit(if_version), self.now)).map_err(err)
    }
    fn lookup(&mut self, _: &str, _: RecordType) -> Result<Vec<String>, DnsError> {
        Err(DnsError::NoData)
    }
    fn reverse(&mut self, _: IpAddr) -> Result<Vec<String>, DnsError> {
        Err(DnsError::NoData)
    }
    fn spf(&mut self, _: IpAddr, _: &str, _: &str) -> Result<SpfOutcome, DnsError> {
        Err(DnsError::NoData)
    }
    fn forward_confirmed_name(&mut self, _: IpAddr) -> Result<Option<String>, DnsError> {
        Ok(None)
    }
    fn counter_add(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.metrics.counter_add(name, labels, value);
    }
    fn observe(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.metrics.observe(name, labels, value);
    }
    fn log(&mut self, _: Level, _: &str) {}
}

/// The context of decision `i`, in the types the host hands the Wasm
/// filter (greyhook-types), which the native side is given too.
fn workload(i: u64) -> Context {
    let t = i % TRIPLETS;
    let ip = IpAddr::from([10, (t >> 8) as u8, t as u8, 1]);
    // Each round over the triplets is 100 s later: rounds 0-2 are deferred
    // (delay 300), later rounds pass: both paths of the algorithm run.
    Context {
        session: Session::new("b", ip),
        transaction: Transaction { sender: Some(format!("sender{t}x@example.org")), recipients: Vec::new() },
        now: T0 + (i / TRIPLETS) * 100,
    }
}

/// Both sides greylist on the client network: this benchmark measures the
/// decision through Wasm against native code, not DNS (whose imports
/// `cargo bench -p greyhook-tests --bench dns` measures).
const CONFIG: &str = "identity = [\"network\"]";

fn options() -> FilterOptions {
    FilterOptions { config: CONFIG.into(), ..FilterOptions::default() }
}

/// The native side: the guest logic as a library over `store`.
struct Native<'a> {
    g: Greylist,
    metrics: FilterMetrics,
    store: &'a dyn Store,
}

impl<'a> Native<'a> {
    fn new(store: &'a dyn Store) -> Self {
        Native { g: Greylist::new(Config::parse(CONFIG).expect("valid")), metrics: FilterMetrics::default(), store }
    }

    /// Decisions `calls` of [`workload`], timed: µs a decision.
    fn run(&self, calls: std::ops::Range<u64>) -> f64 {
        let n = calls.end - calls.start;
        let start = Instant::now();
        for i in calls {
            let ctx = workload(i);
            let mut host = HostKv { store: self.store, metrics: &self.metrics, now: ctx.now };
            let v = self.g.on_rcpt(&ctx, "user@example.com", &mut host).expect("native call");
            std::hint::black_box(v);
        }
        start.elapsed().as_secs_f64() * 1e6 / n as f64
    }
}

fn native(store: &dyn Store, n: u64) -> f64 {
    1e6 / Native::new(store).run(0..n)
}

/// The same decisions through the reference filter as a component: µs a
/// decision.
async fn wasm_run(f: &greyhook::Filter, calls: std::ops::Range<u64>) -> f64 {
    let n = calls.end - calls.start;
    let start = Instant::now();
    for i in calls {
        let ctx = workload(i);
        let v = f.try_on_rcpt(&ctx, "user@example.com").await.expect("wasm call");
        std::hint::black_box(v);
    }
    start.elapsed().as_secs_f64() * 1e6 / n as f64
}

async fn wasm(rt: &Runtime, store: Arc<dyn Store>, n: u64) -> f64 {
    let f = rt.load(greyhook::REFERENCE_FILTER, options(), store).await.expect("the reference filter loads");
    1e6 / wasm_run(&f, 0..n).await
}

/// Blocks each side's calls are timed in, alternating (see [`main`]).
const BLOCKS: u64 = 20;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--ir-child") {
        ir_child(&args[i + 1], args[i + 2].parse().expect("a call count"), std::path::Path::new(&args[i + 3]));
        return;
    }
    if args.iter().any(|a| a == "--instructions") {
        instructions();
        return;
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let n = if quick { 20_000 } else { 200_000 };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio");
    let runtime = Runtime::new(RuntimeConfig::default()).expect("engine");
    let dir = tempfile::tempdir().expect("tempdir");
    if std::env::args().any(|a| a == "--mail") {
        rt.block_on(async {
            let f = runtime.load(greyhook::REFERENCE_FILTER, options(), Arc::new(MemoryStore::new())).await.unwrap();
            let ctx = Context { session: Session::new("b", IpAddr::from([10, 0, 0, 1])), transaction: Transaction::default(), now: T0 };
            for _ in 0..2 {
                let start = Instant::now();
                for _ in 0..n {
                    std::hint::black_box(f.try_on_mail(&ctx, "a@b").await.unwrap());
                }
                println!("on-mail (no store calls): {:.2} µs", start.elapsed().as_secs_f64() * 1e6 / n as f64);
            }
        });
        return;
    }
    if std::env::args().any(|a| a == "--haraka") {
        haraka(&rt, &runtime, n);
        return;
    }
    // Each side makes `n` decisions on its own fresh store, in `BLOCKS`
    // blocks that alternate between the sides (which side goes first
    // alternates too), so that both meet the same spells of this shared
    // machine: the figures are each side's mean over all its blocks, and
    // the spread is that of the blocks' own ratios (the early blocks defer
    // new triplets, the later ones pass known ones).
    println!("on-rcpt decisions, {n} calls a side over {TRIPLETS} triplets, one thread, in {BLOCKS} alternating blocks");
    println!(
        "{:<16} {:>12} {:>12} {:>10} {:>10} {:>12} {:>16}",
        "store", "native/s", "wasm/s", "native µs", "wasm µs", "wasm/native", "blocks' ratios"
    );
    for (name, mk) in [
        ("memory", Box::new(|_: u32| Arc::new(MemoryStore::new()) as Arc<dyn Store>) as Box<dyn Fn(u32) -> Arc<dyn Store>>),
        (
            "redb (periodic)",
            Box::new(|k: u32| {
                Arc::new(RedbStore::open(&dir.path().join(format!("b{k}.db")), Durability::Periodic).expect("redb")) as Arc<dyn Store>
            }),
        ),
    ] {
        // Warm up on stores of their own, then measure on fresh ones.
        rt.block_on(wasm(&runtime, mk(0), n / 10));
        native(&*mk(1), n / 10);
        let f = rt.block_on(runtime.load(greyhook::REFERENCE_FILTER, options(), mk(2))).expect("the reference filter loads");
        let native_store = mk(3);
        let nat = Native::new(&*native_store);
        let block = n / BLOCKS;
        let (mut w, mut v) = (Vec::new(), Vec::new());
        for b in 0..BLOCKS {
            let calls = b * block..(b + 1) * block;
            if b % 2 == 0 {
                w.push(rt.block_on(wasm_run(&f, calls.clone())));
                v.push(nat.run(calls));
            } else {
                v.push(nat.run(calls.clone()));
                w.push(rt.block_on(wasm_run(&f, calls)));
            }
        }
        let mut ratios: Vec<f64> = w.iter().zip(&v).map(|(a, b)| a / b).collect();
        ratios.sort_by(f64::total_cmp);
        let spread = format!("{:.2}-{:.2}", ratios[0], ratios[ratios.len() - 1]);
        let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
        let (wm, nm) = (mean(&w), mean(&v));
        println!("{name:<16} {:>12.0} {:>12.0} {nm:>10.2} {wm:>10.2} {:>12.2} {spread:>16}", 1e6 / nm, 1e6 / wm, wm / nm);
    }
}

/// The same on-rcpt workload through wasmtime (here) and through the
/// Haraka host (jco in a worker thread; node, with `npm ci` done in
/// `hosts/haraka`), in one run.
fn haraka(rt: &tokio::runtime::Runtime, runtime: &Runtime, n: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let wasm_file = dir.path().join("greylist.wasm");
    std::fs::write(&wasm_file, greyhook::REFERENCE_FILTER).expect("write the filter");
    rt.block_on(wasm(runtime, Arc::new(MemoryStore::new()), n / 10));
    let w = rt.block_on(wasm(runtime, Arc::new(MemoryStore::new()), n));
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../hosts/haraka/bench/percall.js");
    let out = std::process::Command::new("node")
        .arg(&script)
        .arg(&wasm_file)
        .arg(n.to_string())
        .arg("--json")
        .output()
        .expect("node (the Haraka host's bench)");
    assert!(out.status.success(), "the Haraka bench failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the Haraka bench's JSON");
    let f = |k: &str, m: &str| v[k][m].as_f64().expect("a figure");
    let us = 1e6 / w;
    println!("on-rcpt, {n} calls over {TRIPLETS} triplets, memory store, the reference filter");
    println!("{:<34} {:>12} {:>12} {:>14}", "host", "wall µs", "CPU µs", "CPU / wasmtime");
    println!("{:<34} {:>12.2} {:>12.2} {:>14.2}", "wasmtime (one thread)", us, us, 1.0);
    for (name, k) in [("haraka, 1 call in flight", "one"), ("haraka, 8 calls in flight", "eight")] {
        println!("{name:<34} {:>12.2} {:>12.2} {:>14.2}", f(k, "wall"), f(k, "cpu"), f(k, "cpu") / us);
    }
}

/// Calls per run under callgrind: the figure is the difference between the
/// two runs divided by the difference in calls, so loading, compiling and
/// the first call's warm-up cancel out.
const IR_CALLS: [u64; 2] = [2_000, 12_000];

/// Instructions a decision, native and through Wasm, counted by callgrind
/// (deterministic, unlike time on a shared machine): each side runs
/// [`IR_CALLS`] decisions in a child process under `valgrind --tool=callgrind`
/// and the per-call figure is the difference. The breakdown groups the
/// Wasm side's instructions by where they ran (callgrind's self cost per
/// function, also differenced): the guest's own code (JIT code, which
/// callgrind cannot name), wasmtime (calls in and out, lifting and
/// lowering, the fiber), greyhook's host glue (imports, limits,
/// conversions), the store, the host's allocator, and the rest.
fn instructions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let me = std::env::current_exe().expect("own path");
    let child = |tool: &[&str], side: &str, n: u64| {
        let status = std::process::Command::new("valgrind")
            .args(tool)
            .args(["--smc-check=all-non-file", "-q"])
            .arg(&me)
            .args(["--ir-child", side, &n.to_string()])
            .arg(dir.path().join("cache"))
            .status()
            .expect("valgrind (Debian's `valgrind` package)");
        assert!(status.success(), "{side} under valgrind failed");
    };
    // The filter is compiled once, under valgrind (whose CPU the compiled
    // code must match), into an artifact cache the measured runs load.
    child(&["--tool=none"], "wasm", 1);
    let mut per_call = Vec::new();
    for side in ["native", "wasm"] {
        let mut totals = Vec::new();
        for n in IR_CALLS {
            let out = dir.path().join(format!("cg.{side}.{n}"));
            child(&["--tool=callgrind", &format!("--callgrind-out-file={}", out.display())], side, n);
            totals.push(groups(&out));
        }
        let calls = (IR_CALLS[1] - IR_CALLS[0]) as f64;
        let diff: Vec<(&str, f64)> =
            totals[1].iter().zip(&totals[0]).map(|((name, b), (_, a))| (*name, (*b as f64 - *a as f64) / calls)).collect();
        per_call.push(diff);
    }
    let total = |g: &[(&str, f64)]| g.iter().map(|(_, v)| v).sum::<f64>();
    let (native, wasm) = (total(&per_call[0]), total(&per_call[1]));
    // What an on-data call costs the reference filter's host for a message
    // with a sender: answered by the host since contract 0.2.3 (the
    // filter asks for the null sender's only), a call before.
    let mut data = Vec::new();
    for n in IR_CALLS {
        let out = dir.path().join(format!("cg.data.{n}"));
        child(&["--tool=callgrind", &format!("--callgrind-out-file={}", out.display())], "data", n);
        data.push(groups(&out).iter().map(|(_, v)| *v as f64).sum::<f64>());
    }
    let data = (data[1] - data[0]) / (IR_CALLS[1] - IR_CALLS[0]) as f64;
    println!("on-rcpt decisions, memory store, instructions a call (callgrind, {} − {} calls)", IR_CALLS[1], IR_CALLS[0]);
    println!("{:<12} {:>10.0}", "native", native);
    println!("{:<12} {:>10.0}", "wasm", wasm);
    println!("{:<12} {:>10.2}", "wasm/native", wasm / native);
    println!("on-data, a message with a sender and six headers: {data:.0} instructions a call");
    for (title, side, all) in [("the Wasm side", &per_call[1], wasm), ("the native side", &per_call[0], native)] {
        println!("\nwhere {title}'s instructions go, a call:");
        for (name, v) in side.iter().filter(|(_, v)| v.abs() >= 0.5) {
            println!("  {name:<40} {v:>8.0} {:>6.1}%", 100.0 * v / all);
        }
    }
}

/// The groups of [`instructions`]' breakdown, in order: a function counts
/// in the first whose test matches its (file, function, object).
const GROUPS: [&str; 7] = [
    "guest code (JIT: filter, its allocator)",
    "wasmtime (calls, lift/lower, fiber)",
    "store (greyhook::store)",
    "host glue (greyhook: imports, limits)",
    "host allocator (libc malloc/free)",
    "libc mem*/str*",
    "other (std, tokio, hashing, fmt)",
];

fn group_of(file: &str, func: &str, object: &str) -> usize {
    if object == "???" {
        0
    } else if func.starts_with("wasmtime") || func.starts_with("<wasmtime") || func.starts_with("cranelift") {
        1
    } else if func.contains("greyhook::store::") {
        2
    } else if func.contains("greyhook::") || func.contains("greyhook_types::") || func.contains("greylist_guest::") {
        3
    } else if file.contains("malloc") {
        4
    } else if object.contains("libc.so") {
        5
    } else {
        6
    }
}

/// Self instructions in a callgrind output file, summed per [`GROUPS`]
/// (parsed from `callgrind_annotate --inclusive=no`, whose lines read
/// `COUNT (PERCENT)  FILE:FUNCTION [OBJECT]`).
fn groups(file: &std::path::Path) -> Vec<(&'static str, u64)> {
    let out = std::process::Command::new("callgrind_annotate")
        .args(["--inclusive=no", "--threshold=100", "--context=0"])
        .arg(file)
        .output()
        .expect("callgrind_annotate");
    assert!(out.status.success(), "callgrind_annotate failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut sums: Vec<(&str, u64)> = GROUPS.iter().map(|n| (*n, 0)).collect();
    let mut seen = false;
    for line in text.lines() {
        let line = line.trim_start();
        let Some((count, rest)) = line.split_once(' ') else { continue };
        let Ok(count) = count.replace(',', "").parse::<u64>() else { continue };
        let Some((_, rest)) = rest.split_once(")  ") else { continue };
        if rest.starts_with("PROGRAM TOTALS") {
            continue;
        }
        let (location, object) = rest.rsplit_once(" [").map_or((rest, ""), |(l, o)| (l, o.trim_end_matches(']')));
        let (file, func) = location.split_once(':').unwrap_or(("", location));
        sums[group_of(file, func, object)].1 += count;
        seen = true;
    }
    assert!(seen, "no function costs in callgrind_annotate's output:\n{text}");
    sums
}

/// The message of the `data` side: the six headers a message from
/// Postfix's `smtp-source` has when the milter or `greyhook smtp` sees it.
fn message() -> Message {
    let headers = [
        (
            "Received",
            "from client.example.org (client.example.org [192.0.2.1]) by mx.example.com (Postfix) with ESMTP id 6177298E046 for <user@example.com>; Thu,  3 Dec 2026 02:53:01 +0000 (UTC)",
        ),
        ("From", "<alice@example.org>"),
        ("To", "<user@example.com>"),
        ("Date", "Thu,  3 Dec 2026 02:53:01 +0000"),
        ("Message-Id", "<20261203025301.6177298E046@client.example.org>"),
        ("Subject", "hello"),
    ];
    // As the SMTP front end reads them.
    greyhook::session::read_header_section(headers.iter().map(|(n, v)| format!("{n}: {v}")))
}

/// One side's decisions for [`instructions`], run under callgrind (`data`:
/// the on-data call of a message with a sender instead).
fn ir_child(side: &str, n: u64, cache: &std::path::Path) {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    match side {
        "native" => {
            native(&*store, n);
        }
        _ => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio");
            // Valgrind gives a process less address space than the default pool
            // reserves; two instances' worth fits, and the figure is that of
            // the production code (guard pages, no explicit bounds checks).
            let runtime = Runtime::new(RuntimeConfig { max_instances: 2, ..RuntimeConfig::default() }).expect("engine");
            assert!(runtime.guard_pages(), "memories got no guard-page reservation: the figure would be the slow fallback's");
            let cache = greyhook::runtime::artifact_cache::ArtifactCache::open(cache).expect("cache dir");
            let (compiled, _) = cache.compile(&runtime, greyhook::REFERENCE_FILTER).expect("the reference filter");
            rt.block_on(async {
                let f = runtime.instantiate_filter(compiled, options(), store).await.expect("instantiates");
                let message = message();
                for i in 0..n {
                    let mut ctx = workload(i);
                    if side == "data" {
                        ctx.transaction
                            .recipients
                            .push(AcceptedRecipient { address: "user@example.com".into(), policy_group: String::new() });
                        std::hint::black_box(f.try_on_data(&ctx, &message).await.expect("wasm call"));
                    } else {
                        std::hint::black_box(f.try_on_rcpt(&ctx, "user@example.com").await.expect("wasm call"));
                    }
                }
            });
        }
    }
}
