//! Hot reload, measured: how long a reload takes (`Daemon::reload`, the
//! path `greyhook reload` and SIGHUP take) cold (compile) and warm (the
//! compiled component is reused: a configuration change or a swap back);
//! a configuration file change until a policy request sees the new version,
//! through the file watcher; and the p99 latency of policy requests with
//! and without configuration reloads every 50 ms.
//! `cargo bench -p greyhook --bench reload`.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use greyhook::clock::SystemClock;
use greyhook::daemon::{Daemon, DaemonConfig, Reconfigure};
use greyhook::frontend::ListenAddr;

/// The reference filter with a custom section appended: the same filter,
/// different bytes (so it must be compiled again).
fn variant(n: u32) -> Vec<u8> {
    let mut b = greyhook::REFERENCE_FILTER.to_vec();
    let name = b"greyhook-bench";
    let payload = n.to_le_bytes();
    b.push(0);
    b.push((1 + name.len() + payload.len()) as u8);
    b.push(name.len() as u8);
    b.extend_from_slice(name);
    b.extend_from_slice(&payload);
    b
}

fn load(port: u16, stop: Arc<AtomicBool>, worker: usize) -> Vec<u32> {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut r = BufReader::new(s.try_clone().expect("clone"));
    let mut w = s;
    let mut lat = Vec::new();
    let mut line = String::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) && n < 1_000_000 {
        let req = format!(
            "request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=10.0.{worker}.1\nsender=s{n}x@bench.example\nrecipient=user@e2e.test\n\n"
        );
        let t = Instant::now();
        w.write_all(req.as_bytes()).expect("write");
        line.clear();
        r.read_line(&mut line).expect("read");
        assert!(line.starts_with("action="), "{line}");
        line.clear();
        r.read_line(&mut line).expect("read");
        lat.push(t.elapsed().as_micros() as u32);
        n += 1;
    }
    lat
}

fn p99(mut v: Vec<u32>) -> (usize, u32, u32) {
    v.sort_unstable();
    let n = v.len();
    (n, v[n / 2], v[(n * 99 / 100).min(n - 1)])
}

/// A second daemon that watches its configuration file: each round writes
/// a new delay and asks with fresh triplets until the reply's hint shows
/// it. The time from the write to that reply.
fn watched(rt: &tokio::runtime::Runtime) -> Vec<Duration> {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg_path = dir.path().join("greyhook.toml");
    let cfg = |delay: u32| {
        format!(
            "[store]\npath = \"memory\"\n[control]\nsocket = \"{}\"\n[policy]\nlisten = [\"127.0.0.1:0\"]\n[log]\nlevel = \"warn\"\n[filter.config]\ndelay = {delay}\nidentity = [\"network\"]\n",
            dir.path().join("control.sock").display()
        )
    };
    std::fs::write(&cfg_path, cfg(300)).expect("write");
    let p = cfg_path.clone();
    let reconf = Reconfigure { files: vec![cfg_path.clone()], load: Arc::new(move || DaemonConfig::load(&p)) };
    let daemon =
        rt.block_on(Daemon::start(&DaemonConfig::load(&cfg_path).expect("config"), Arc::new(SystemClock), Some(reconf))).expect("daemon");
    let port = match &daemon.endpoints("policy")[0] {
        ListenAddr::Tcp(a) => a.port(),
        other => panic!("{other}"),
    };
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut r = BufReader::new(s.try_clone().expect("clone"));
    let mut w = s;
    let mut n = 0u64;
    let mut ask = |n: &mut u64| {
        *n += 1;
        // Letters, not digits: the filter folds digit runs in senders.
        let name: String = format!("{n:x}").bytes().map(|b| (b'a' + b % 32) as char).collect();
        let req = format!(
            "request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=10.9.9.9\nsender=w{name}@bench.example\nrecipient=user@e2e.test\n\n"
        );
        w.write_all(req.as_bytes()).expect("write");
        let mut line = String::new();
        r.read_line(&mut line).expect("read");
        r.read_line(&mut String::new()).expect("read");
        line
    };
    let mut times = Vec::new();
    for round in 0..10u32 {
        // Delays 121 s, 122 s, ...: each round's hint is new.
        let delay = 121 + round;
        let hint = format!("retry=00:02:{:02}", delay - 120);
        let t = Instant::now();
        std::fs::write(&cfg_path, cfg(delay)).expect("write");
        while !ask(&mut n).contains(&hint) {
            assert!(t.elapsed() < Duration::from_secs(10), "the watcher did not reload");
            std::thread::sleep(Duration::from_millis(1));
        }
        times.push(t.elapsed());
        // Let the debounce window close before the next write.
        std::thread::sleep(Duration::from_millis(300));
    }
    rt.block_on(daemon.stop());
    times
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio");
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_path_buf();
    let wasm = d.join("filter.wasm");
    std::fs::write(&wasm, variant(0)).expect("write");
    let cfg_path = d.join("greyhook.toml");
    let cfg = |delay: u32| {
        format!(
            "[filter]\npath = \"{}\"\n[store]\npath = \"memory\"\n[control]\nsocket = \"{}\"\n[policy]\nlisten = [\"127.0.0.1:0\"]\n[log]\nlevel = \"warn\"\n[filter.config]\ndelay = {delay}\nidentity = [\"network\"]\n",
            wasm.display(),
            d.join("control.sock").display()
        )
    };
    std::fs::write(&cfg_path, cfg(300)).expect("write");
    let p = cfg_path.clone();
    let reconf = Reconfigure { files: Vec::new(), load: Arc::new(move || DaemonConfig::load(&p)) };
    let daemon =
        rt.block_on(Daemon::start(&DaemonConfig::load(&cfg_path).expect("config"), Arc::new(SystemClock), Some(reconf))).expect("daemon");
    let port = match &daemon.endpoints("policy")[0] {
        ListenAddr::Tcp(a) => a.port(),
        other => panic!("{other}"),
    };

    let mut cold = Vec::new();
    for i in 1..=5 {
        std::fs::write(&wasm, variant(i)).expect("write");
        let t = Instant::now();
        rt.block_on(daemon.reload()).expect("reload");
        cold.push(t.elapsed());
    }
    // A file seen before (e.g. after a restart): its artifact from the disk cache.
    let cache = greyhook::runtime::artifact_cache::ArtifactCache::open(&d.join("artifacts")).expect("cache");
    let runtime = greyhook::Runtime::new(greyhook::RuntimeConfig::default()).expect("engine");
    let mut disk = Vec::new();
    for i in 0..6 {
        let bytes = variant(100 + i % 2);
        let t = Instant::now();
        let (_, origin) = cache.compile(&runtime, &bytes).expect("compile");
        if origin == greyhook::runtime::artifact_cache::Origin::Cached {
            disk.push(t.elapsed());
        }
    }
    let mut warm = Vec::new();
    for i in 0..20 {
        std::fs::write(&cfg_path, cfg(if i % 2 == 0 { 120 } else { 300 })).expect("write");
        let t = Instant::now();
        rt.block_on(daemon.reload()).expect("reload");
        warm.push(t.elapsed());
    }
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    println!("Daemon::reload until the new version serves (greyhook reload, SIGHUP), median:");
    println!("  cold (new filter bytes: compile):          {:>8.1} ms", median(cold).as_secs_f64() * 1e3);
    println!("  warm (config change, component kept):      {:>8.2} ms", median(warm).as_secs_f64() * 1e3);
    println!(
        "  artifact from the disk cache:              {:>8.2} ms (load only; add the warm figure for init and smoke call)",
        median(disk).as_secs_f64() * 1e3
    );
    println!(
        "config file written until a request sees it (file watcher, 200 ms debounce included), median of 10: {:>6.0} ms",
        median(watched(&rt)).as_secs_f64() * 1e3
    );

    for swaps in [false, true] {
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..4)
            .map(|w| {
                let stop = stop.clone();
                std::thread::spawn(move || load(port, stop, w))
            })
            .collect();
        let until = Instant::now() + Duration::from_secs(3);
        let mut n = 0;
        while Instant::now() < until {
            if swaps {
                std::fs::write(&cfg_path, cfg(if n % 2 == 0 { 120 } else { 300 })).expect("write");
                rt.block_on(daemon.reload()).expect("reload");
                n += 1;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        stop.store(true, Ordering::Relaxed);
        let lat: Vec<u32> = workers.into_iter().flat_map(|w| w.join().expect("worker")).collect();
        let (count, p50, p99) = p99(lat);
        println!(
            "policy requests, 4 connections, 3 s, {}: {count} requests, p50 {p50} µs, p99 {p99} µs",
            if swaps { format!("{n} config reloads (warm)") } else { "no reloads".into() }
        );
    }
    rt.block_on(daemon.stop());
}
