//! The embedded store at scale: `cargo bench -p greyhook --bench store`
//! (`GH_RECORDS=5000000` by default; `GH_TASKS=4`; `GH_RATE=20000`
//! decisions a second during the sweep; `GH_CACHE_MIB=64`, redb's page
//! cache, as `[store] cache_mib`; `GH_ONLY=restart` skips steps 2, 4 and
//! 5: fill, crash, open).
//!
//! 1. Fills a redb store with `GH_RECORDS` records straight into the file
//!    (`RedbStore::import`), half of them expired.
//! 2. Sweeps them while `GH_TASKS` tasks make a decision's worth of store
//!    calls each (a get, then a compare-and-swap write) on a 2-worker
//!    runtime, timing every call: sweep time, records swept, calls served
//!    meanwhile (paced at `GH_RATE`), their p50, p99 and **max** latency
//!    (target: max ≤ 50 ms).
//! 3. Restart after a crash: a child process opens the file, writes and
//!    flushes, and aborts (as `kill -9` would: nothing closed); the time to
//!    open the file again (target < 1 s).
//! 4. CPU per store call (get + set) at 1, 2, 4 and 8 concurrent tasks:
//!    constant CPU per call as concurrency grows is what lets the store go
//!    on scaling with cores (the write path's lock is held only for the
//!    overlay's lookup and insert).
//! 5. The flush thread's pace, the one serial step of the write path:
//!    `GH_TASKS` tasks write `GH_FLUSH_RECORDS` (default 1 000 000) new
//!    records with keys spread as triplet keys are, then the store is
//!    flushed: the flush's CPU a record, so records a second for one core.
//!    `GH_ONLY=flush` runs only the fill and this step.

use std::sync::Arc;
use std::time::{Duration, Instant};

use greyhook::store::{Condition, DEFAULT_CACHE_BYTES, Durability, RedbOptions, RedbStore, Store};

const NOW: u64 = 1_800_000_000;

fn cpu() -> Duration {
    stat_cpu(std::path::Path::new("/proc/self/stat"))
}

/// utime + stime in a `stat` file of /proc (a process's or a thread's),
/// counted in clock ticks (100 a second).
fn stat_cpu(path: &std::path::Path) -> Duration {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // After the command: state (0), ..., utime (11), stime (12).
    let field = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    let ticks = field(11) + field(12);
    Duration::from_millis(ticks * 10)
}

async fn decision(store: &dyn Store, key: &str) -> Duration {
    timed_decision(store, key).await.0
}

/// A decision's whole time, and that of its get alone.
async fn timed_decision(store: &dyn Store, key: &str) -> (Duration, Duration) {
    let t = Instant::now();
    let cur = store.get(key, NOW).await.expect("get");
    let got = t.elapsed();
    let cond = cur.map_or(Condition::Absent, |e| Condition::Version(e.version));
    store.set(key, b"0123456789abcdef0123456789abcdef", NOW + 86_400, cond, NOW).await.expect("set");
    (t.elapsed(), got)
}

/// A thread that only sleeps 1 ms at a time, noting its longest pause past
/// that and when (seconds from `start`): a pause as long as a slow decision
/// at the same moment is the machine stalling the process, not the store.
fn pause_monitor(start: Instant, stop: Arc<std::sync::atomic::AtomicBool>) -> std::thread::JoinHandle<(Duration, f64)> {
    std::thread::spawn(move || {
        let mut worst = (Duration::ZERO, 0.0);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let t = Instant::now();
            std::thread::sleep(Duration::from_millis(1));
            let pause = t.elapsed().saturating_sub(Duration::from_millis(1));
            if pause > worst.0 {
                worst = (pause, t.duration_since(start).as_secs_f64());
            }
        }
        worst
    })
}

/// CPU time (user + system) of this process's threads named `name`
/// (`/proc/self/task/*/comm`, truncated by the kernel to 15 bytes).
fn thread_cpu(name: &str) -> Duration {
    std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|task| std::fs::read_to_string(task.path().join("comm")).is_ok_and(|c| c.trim_end() == &name[..name.len().min(15)]))
        .map(|task| stat_cpu(&task.path().join("stat")))
        .sum()
}

/// Step 5, the flusher's pace: `tasks` tasks write `total` new records (keys
/// never seen and spread over the key space, as a spam run's triplets
/// are) as fast as they can, then the store is flushed. The one flush
/// thread is the only serial part of the write path: its CPU a record says
/// how many new records a second one core of it writes, whatever the
/// number of cores answering requests.
async fn flusher_pace(store: &Arc<dyn Store>, tasks: usize, total: u64) {
    let flusher0 = thread_cpu("greyhook-redb-flush");
    let t = Instant::now();
    let per_task = total / tasks as u64;
    let writers: Vec<_> = (0..tasks)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                // Refusals (the overlay at its hard limit: more records
                // than the flush keeps pace with), and the first one's text.
                let mut refused = (0u64, None);
                for i in 0..per_task {
                    let key = format!("greylist/new/{:016x}", mix((w as u64) << 48 | i));
                    if let Err(e) = store.set(&key, b"0123456789abcdef0123456789abcdef", NOW + 86_400, Condition::Absent, NOW).await {
                        refused.0 += 1;
                        refused.1.get_or_insert(e.to_string());
                    }
                    if i.is_multiple_of(64) {
                        tokio::task::yield_now().await;
                    }
                }
                refused
            })
        })
        .collect();
    let mut refused = (0, None);
    for w in writers {
        let (n, first) = w.await.expect("writer");
        refused.0 += n;
        refused.1 = refused.1.or(first);
    }
    let wrote = t.elapsed();
    if let (n @ 1.., Some(first)) = &refused {
        println!("flusher: {n} writes refused, the first with: {first}");
    }
    // The writers are done: from here on the process only flushes (the
    // flush thread, and this call on a blocking thread once it has the
    // flush lock), so its CPU is the flush's.
    let flusher = thread_cpu("greyhook-redb-flush") - flusher0;
    let c0 = cpu();
    store.flush().await.expect("flush");
    let drained = t.elapsed() - wrote;
    let flush_cpu = flusher + (cpu() - c0);
    let written = per_task * tasks as u64 - refused.0;
    println!(
        "flusher: {written} new records written in {:.2} s ({:.0}/s by {tasks} tasks on 2 workers), all in the file {:.2} s later; \
         flushing took {:.2} s CPU: {:.2} µs a record, {:.0} records/s for one core",
        wrote.as_secs_f64(),
        written as f64 / wrote.as_secs_f64(),
        drained.as_secs_f64(),
        flush_cpu.as_secs_f64(),
        flush_cpu.as_secs_f64() * 1e6 / written as f64,
        written as f64 / flush_cpu.as_secs_f64().max(1e-9)
    );
}

/// splitmix64's finaliser: distinct inputs, spread-out outputs.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v.get(((v.len() as f64 - 1.0) * p) as usize).copied().unwrap_or_default()
}

/// The store's options: periodic durability, `GH_CACHE_MIB` of page cache.
fn options() -> RedbOptions {
    let mib: usize = std::env::var("GH_CACHE_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_CACHE_BYTES >> 20);
    RedbOptions { durability: Durability::Periodic, cache_bytes: mib << 20, ..RedbOptions::default() }
}

fn main() {
    let dir = std::env::var("GH_BENCH_CHILD").ok();
    if let Some(path) = dir {
        // The crashing child: open, write, flush, abort.
        let store = RedbStore::open_with(std::path::Path::new(&path), &options()).expect("open");
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("rt");
        rt.block_on(async {
            for i in 0..1000 {
                decision(&store, &format!("crash{i}")).await;
            }
            store.flush().await.expect("flush");
        });
        std::process::abort();
    }
    let n: u64 = std::env::var("GH_RECORDS").ok().and_then(|v| v.parse().ok()).unwrap_or(5_000_000);
    let tasks: usize = std::env::var("GH_TASKS").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    // The load during the sweep, decisions a second (each writes a record):
    // about what one greyhook process answers at most on 2 cores.
    let rate: u64 = std::env::var("GH_RATE").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("bench.db");
    let store = RedbStore::open_with(&path, &options()).expect("open");
    let t = Instant::now();
    let value = vec![b'v'; 60];
    store
        .import((0..n).map(|i| (format!("greylist/t/{i:016x}"), value.clone(), if i % 2 == 0 { NOW - 1 } else { NOW + 86_400 })))
        .expect("import");
    println!("filled {n} records in {:.1} s", t.elapsed().as_secs_f64());
    let store: Arc<dyn Store> = Arc::new(store);

    let only = std::env::var("GH_ONLY").unwrap_or_default();
    let flush_records: u64 = std::env::var("GH_FLUSH_RECORDS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
    rt.block_on(async {
        if only == "flush" {
            return flusher_pace(&store, tasks, flush_records).await;
        }
        if only == "restart" {
            return;
        }
        let start = Instant::now();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let monitor = pause_monitor(start, stop.clone());
        let sweep = {
            let store = store.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                (store.sweep(NOW).await.expect("sweep"), t.elapsed())
            })
        };
        let done = sweep.abort_handle();
        let workers: Vec<_> = (0..tasks)
            .map(|w| {
                let store = store.clone();
                let done = done.clone();
                tokio::spawn(async move {
                    let mut lat = Vec::new();
                    let mut i = 0u64;
                    // Paced: `rate` decisions a second in all, a share each
                    // millisecond.
                    let per_ms = (rate / 1000 / tasks as u64).max(1);
                    let mut tick = tokio::time::interval(Duration::from_millis(1));
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    while !done.is_finished() {
                        if i.is_multiple_of(per_ms) {
                            tick.tick().await;
                        }
                        // Live records, new ones and expired ones alike.
                        let key = format!("greylist/t/{:016x}", (i * 7919 + w as u64 * 104_729) % (n + n / 10));
                        let at = start.elapsed().as_secs_f64();
                        let (took, got) = timed_decision(&*store, &key).await;
                        lat.push((took, got, at));
                        i += 1;
                        // As a request does between its calls (reading the
                        // next one): the store's calls never wait here, and a
                        // task that never yields would starve the sweep's.
                        tokio::task::yield_now().await;
                    }
                    lat
                })
            })
            .collect();
        let mut lat = Vec::new();
        for w in workers {
            lat.extend(w.await.expect("worker"));
        }
        let (swept, took) = sweep.await.expect("sweep task");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (pause, pause_at) = monitor.join().expect("monitor");
        lat.sort_by_key(|l| std::cmp::Reverse(l.0));
        let slowest: Vec<String> = lat.iter().take(3).map(|(t, g, at)| format!("{t:.1?} (get {g:.1?}) at {at:.1} s")).collect();
        let mut lat: Vec<Duration> = lat.into_iter().map(|l| l.0).collect();
        let max = lat.iter().max().copied().unwrap_or_default();
        println!(
            "sweep: {swept} records in {:.1} s; {} decisions meanwhile ({:.0}/s), p50 {:?} p99 {:?} max {:?} (target max <= 50 ms: {})",
            took.as_secs_f64(),
            lat.len(),
            lat.len() as f64 / took.as_secs_f64(),
            pct(&mut lat, 0.5),
            pct(&mut lat, 0.99),
            max,
            if max <= Duration::from_millis(50) { "met" } else { "NOT met" }
        );
        println!("  slowest: {}; longest pause of a thread that only sleeps: {pause:.1?} at {pause_at:.1} s", slowest.join(", "));

        println!("CPU per decision (get + compare-and-swap set), 2 workers:");
        for conc in [1usize, 2, 4, 8] {
            let per_task = 20_000u64;
            let c0 = cpu();
            let t = Instant::now();
            let ts: Vec<_> = (0..conc)
                .map(|w| {
                    let store = store.clone();
                    tokio::spawn(async move {
                        for i in 0..per_task {
                            decision(&*store, &format!("c{conc}/{w}/{}", i % 5000)).await;
                        }
                    })
                })
                .collect();
            for t in ts {
                t.await.expect("task");
            }
            let calls = conc as u64 * per_task;
            let wall = t.elapsed();
            let c = cpu() - c0;
            println!(
                "  {conc} tasks: {:.0} decisions/s, {:.2} µs CPU each",
                calls as f64 / wall.as_secs_f64(),
                c.as_secs_f64() * 1e6 / calls as f64
            );
        }
        flusher_pace(&store, tasks, flush_records).await;
    });
    drop(rt);
    if only == "flush" {
        return;
    }
    drop(store);
    // The flusher thread may hold the store a while (it looks once a second,
    // and the last holder writes what the overlay still has): wait until the
    // file can be opened, then close it for the child.
    let t = Instant::now();
    loop {
        match RedbStore::open_with(&path, &options()) {
            Ok(s) => break drop(s),
            Err(e) if t.elapsed() > Duration::from_secs(300) => panic!("the store stays open: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }

    // A crash with the file full: a child writes and aborts.
    let status = std::process::Command::new(std::env::current_exe().expect("exe")).env("GH_BENCH_CHILD", &path).status().expect("child");
    assert!(!status.success(), "the child aborts");
    let t = Instant::now();
    let store = RedbStore::open_with(&path, &options()).expect("reopen after the crash");
    let open = t.elapsed();
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("rt");
    let kept = rt.block_on(store.get("greylist/t/0000000000000001", NOW)).expect("get").is_some();
    let crash = rt.block_on(store.get("crash999", NOW)).expect("get").is_some();
    let mb = std::fs::metadata(&path).map_or(0, |m| m.len()) >> 20;
    println!(
        "restart after a crash with {} records ({mb} MiB file): open in {:.2} s (target < 1 s: {}); records kept: {kept}, the crashed process's flushed write kept: {crash}",
        n / 2,
        open.as_secs_f64(),
        if open < Duration::from_secs(1) { "met" } else { "NOT met" }
    );
}
