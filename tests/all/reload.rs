//! Hot reload: file changes, refused versions, swaps under load, and the
//! `greyhook reload` command against a running daemon.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use greyhook::clock::ManualClock;
use greyhook::daemon::{Daemon, DaemonConfig, Reconfigure};
use greyhook::frontend::ListenAddr;
use greyhook_tests::*;

fn ask(c: &mut (TcpStream, BufReader<TcpStream>), sender: &str) -> String {
    let req = format!(
        "request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=192.0.2.7\nsender={sender}\nrecipient=user@e2e.test\ninstance=x\n\n"
    );
    c.0.write_all(req.as_bytes()).unwrap();
    let mut line = String::new();
    c.1.read_line(&mut line).unwrap();
    let mut empty = String::new();
    c.1.read_line(&mut empty).unwrap();
    line.trim_end().trim_start_matches("action=").to_string()
}

fn letters(mut n: u32) -> String {
    let mut s = String::new();
    loop {
        s.push((b'a' + (n % 26) as u8) as char);
        n /= 26;
        if n == 0 {
            return s;
        }
    }
}

fn connect(port: u16) -> (TcpStream, BufReader<TcpStream>) {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    (s.try_clone().unwrap(), BufReader::new(s))
}

/// Writes a file the way operators and deploy tools do: a temp file renamed into place.
fn replace(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Starts a daemon on `dir/greyhook.toml`; `watch` also reloads when the file changes.
async fn start(dir: &Path, clock: Arc<ManualClock>, watch: bool) -> (Daemon, u16) {
    let cfg_path = dir.join("greyhook.toml");
    let p = cfg_path.clone();
    let load = move || DaemonConfig::load(&p).map(hermetic);
    let cfg = load().unwrap();
    let files = if watch { vec![cfg_path] } else { Vec::new() };
    let reconfigure = Reconfigure { files, load: Arc::new(load) };
    let d = Daemon::start(&cfg, clock, Some(reconfigure)).await.unwrap();
    let port = match &d.endpoints("policy")[0] {
        ListenAddr::Tcp(a) => a.port(),
        other => panic!("{other}"),
    };
    (d, port)
}

fn config(dir: &Path, delay: u32) -> String {
    format!(
        // A deadline far above a call's cost: on a loaded 2-core machine a
        // call that misses the default 100 ms would answer DUNNO and fail
        // tests that check every reply, while measuring nothing.
        "[filter]\npath = \"{d}/filter.wasm\"\ndeadline = \"5s\"\n[store]\npath = \"memory\"\n[control]\nsocket = \"{d}/control.sock\"\n[policy]\nlisten = [\"127.0.0.1:0\"]\n[filter.config]\nauto_whitelist_after = 0\ndelay = {delay}\n",
        d = dir.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_changes_reload_and_bad_versions_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    std::fs::write(d.join("filter.wasm"), greyhook::REFERENCE_FILTER).unwrap();
    std::fs::write(d.join("greyhook.toml"), config(&d, 300)).unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let (daemon, port) = start(&d, clock.clone(), true).await;
    let d2 = d.clone();
    let clock2 = clock.clone();
    tokio::task::spawn_blocking(move || {
        let mut c = connect(port);
        assert!(ask(&mut c, "a@x.org").ends_with("retry=00:05:00"));
        // A new configuration, renamed into place: the watcher reloads it.
        replace(&d2.join("greyhook.toml"), config(&d2, 60).as_bytes());
        let until = Instant::now() + Duration::from_secs(10);
        while !ask(&mut c, "b@x.org").ends_with("retry=00:01:00") {
            assert!(Instant::now() < until, "the configuration change was not picked up");
            std::thread::sleep(Duration::from_millis(50));
        }
        // The record written before the reload is still honoured: its first
        // sighting stands, under the new delay.
        clock2.advance(30);
        assert!(ask(&mut c, "a@x.org").ends_with("retry=00:00:30"), "the old record counts from its first sighting");
        assert!(ask(&mut c, "new@x.org").ends_with("retry=00:01:00"));
    })
    .await
    .unwrap();

    // Refused versions leave the current one serving.
    for (bad, why) in [(b"garbage".to_vec(), "not a WebAssembly file"), (wat::parse_str("(component)").unwrap(), "greyhook:filter")] {
        std::fs::write(d.join("filter.wasm"), &bad).unwrap();
        let e = daemon.reload().await.expect_err("refused");
        assert!(e.to_string().contains(why), "{e}");
        assert_eq!(daemon.filter().info().name, "greylist");
    }
    std::fs::write(d.join("filter.wasm"), greyhook::REFERENCE_FILTER).unwrap();
    std::fs::write(d.join("greyhook.toml"), config(&d, 60).replace("delay = 60", "delay = \"soon\"")).unwrap();
    let e = daemon.reload().await.expect_err("bad filter config");
    assert!(e.to_string().contains("delay"), "{e}");
    std::fs::write(d.join("greyhook.toml"), config(&d, 60)).unwrap();
    // A new file: the chaos filter.
    std::fs::write(d.join("filter.wasm"), CHAOS_FILTER).unwrap();
    let o = daemon.reload().await.unwrap();
    assert!(o.to_string().starts_with("loaded chaos 0.0.1"), "{o}");
    tokio::task::spawn_blocking(move || {
        let mut c = connect(port);
        assert_eq!(ask(&mut c, "c@x.org"), "PREPEND X-Chaos: ok");
    })
    .await
    .unwrap();
    assert!(daemon.reload().await.unwrap().to_string().starts_with("unchanged"));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_swaps_under_load_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    std::fs::write(d.join("filter.wasm"), greyhook::REFERENCE_FILTER).unwrap();
    std::fs::write(d.join("greyhook.toml"), config(&d, 300)).unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    // Reloads are explicit here, so every one of them is a real swap.
    let (daemon, port) = start(&d, clock.clone(), false).await;
    let before = tokio::task::spawn_blocking(move || ask(&mut connect(port), "early@x.org")).await.unwrap();
    assert!(before.ends_with("retry=00:05:00"));

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Set while the swaps run: what the workers answer then is counted
    // apart, to show the load overlapped the swaps.
    let swapping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for w in 0..4 {
        let (stop, swapping) = (stop.clone(), swapping.clone());
        load.push(tokio::task::spawn_blocking(move || {
            let mut c = connect(port);
            let (mut n, mut greylisted, mut passed) = (0u32, 0u32, 0u32);
            // Bounded: stops when told, or after 200 000 requests.
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 200_000 {
                let during = swapping.load(std::sync::atomic::Ordering::Relaxed);
                // Letters, not digits: the sender normalisation folds digit runs.
                let a = ask(&mut c, &format!("{}-{}@load.example", letters(w), letters(n)));
                let is_greylist = a == "451 4.7.1 Greylisted, please try again later retry=00:05:00";
                let is_pass = a == "PREPEND X-Greylist: delayed 0 seconds by greyhook";
                assert!(is_greylist || is_pass, "reply {n} of worker {w} fits neither version: {a:?}");
                if during && swapping.load(std::sync::atomic::Ordering::Relaxed) {
                    greylisted += u32::from(is_greylist);
                    passed += u32::from(is_pass);
                }
                n += 1;
            }
            (greylisted, passed)
        }));
    }
    // The workers are answering before the swaps begin.
    tokio::time::sleep(Duration::from_millis(200)).await;
    swapping.store(true, std::sync::atomic::Ordering::Relaxed);
    let started = Instant::now();
    for i in 0..100 {
        let delay = if i % 2 == 0 { 0 } else { 300 };
        std::fs::write(d.join("greyhook.toml"), config(&d, delay)).unwrap();
        let o = daemon.reload().await.unwrap();
        assert!(o.to_string().starts_with("loaded greylist"), "{o}");
    }
    swapping.store(false, std::sync::atomic::Ordering::Relaxed);
    let swaps = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut greylisted, mut passed) = (0, 0);
    for l in load {
        let (g, p) = l.await.unwrap();
        greylisted += g;
        passed += p;
    }
    // Both versions answered requests sent while the swaps ran.
    assert!(greylisted > 0 && passed > 0, "during {swaps:?} of swaps: {greylisted} greylisted, {passed} passed");
    // The last version has delay 300; the early record is still there.
    clock.advance(100);
    let after = tokio::task::spawn_blocking(move || ask(&mut connect(port), "early@x.org")).await.unwrap();
    assert!(after.ends_with("retry=00:03:20"), "{after}");
    daemon.stop().await;
}

#[test]
fn greyhook_reload_and_status_talk_to_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The filter is reached through a directory symlink (`cur` -> `a/`):
    // pointing `cur` at `b/` changes the filter without any event in the
    // watched directory (`a/`), so only a SIGHUP can pick it up.
    for sub in ["a", "b"] {
        std::fs::create_dir(d.join(sub)).unwrap();
    }
    std::os::unix::fs::symlink("a", d.join("cur")).unwrap();
    let filter = d.join("cur/filter.wasm");
    std::fs::write(&filter, greyhook::REFERENCE_FILTER).unwrap();
    let control = d.join("control.sock");
    let port = free_port();
    let mut daemon = Process::greyhook(
        &[
            "serve",
            "--policy",
            &format!("127.0.0.1:{port}"),
            "--db",
            "memory",
            "--filter",
            filter.to_str().unwrap(),
            "--control",
            control.to_str().unwrap(),
        ],
        d.join("log"),
    );
    wait_for_port(port, 20);
    let run = |args: &[&str]| {
        let out = std::process::Command::new(greyhook_bin()).args(args).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let c = control.to_str().unwrap();
    let (ok, out, err) = run(&["reload", "--control", c]);
    assert!(ok && out.starts_with("unchanged"), "{out}{err}");
    let (ok, out, _) = run(&["status", "--control", c]);
    assert!(ok && out.contains("\nfilter greylist 0.1.0 "), "{out}");
    std::fs::write(&filter, b"not wasm at all").unwrap();
    let (ok, _, err) = run(&["reload", "--control", c]);
    assert!(!ok && err.contains("refused") && err.contains("not a WebAssembly file"), "{err}");
    let mut conn = connect(port);
    assert!(ask(&mut conn, "a@x.org").starts_with("451 4.7.1"), "still serving");
    std::fs::write(&filter, greyhook::REFERENCE_FILTER).unwrap();
    // Let the watcher's own (debounced, 200 ms) reload of that write pass.
    std::thread::sleep(Duration::from_millis(800));
    let (ok, out, err) = run(&["reload", "--control", c]);
    assert!(ok && out.starts_with("unchanged"), "the good version back: {out}{err}");
    std::fs::write(d.join("b/filter.wasm"), CHAOS_FILTER).unwrap();
    std::os::unix::fs::symlink("b", d.join("cur.new")).unwrap();
    std::fs::rename(d.join("cur.new"), d.join("cur")).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let a = ask(&mut conn, "c@x.org");
    assert!(a.starts_with("451 4.7.1"), "the watcher saw the symlink change ({a}): the test proves nothing\n{}", daemon.log_text());
    let hup = std::process::Command::new("kill").args(["-HUP", &daemon.child.id().to_string()]).status().unwrap();
    assert!(hup.success());
    let until = Instant::now() + Duration::from_secs(10);
    while ask(&mut conn, "b@x.org") != "PREPEND X-Chaos: ok" {
        assert!(Instant::now() < until, "SIGHUP did not reload: {}", daemon.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(daemon.terminate(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_looping_version_is_reverted_and_held_back() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    std::fs::write(d.join("filter.wasm"), greyhook::REFERENCE_FILTER).unwrap();
    let breaker = "breaker_failures = 5\nbreaker_window = \"300ms\"\nbreaker_backoff = \"1h\"\n";
    std::fs::write(d.join("greyhook.toml"), config(&d, 300).replace("[store]", &format!("{breaker}[store]"))).unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let (daemon, port) = start(&d, clock, false).await;
    std::fs::write(d.join("filter.wasm"), CHAOS_FILTER).unwrap();
    assert!(daemon.reload().await.unwrap().to_string().starts_with("loaded chaos"));
    let reverted = tokio::task::spawn_blocking(move || {
        let mut c = connect(port);
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            // The chaos filter panics for this recipient: every call fails.
            let req =
                "request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=192.0.2.7\nsender=a@x.org\nrecipient=panic@e2e.test\n\n";
            c.0.write_all(req.as_bytes()).unwrap();
            let mut line = String::new();
            c.1.read_line(&mut line).unwrap();
            c.1.read_line(&mut String::new()).unwrap();
            if line.contains("Greylisted") {
                return true;
            }
            assert_eq!(line.trim_end(), "action=DUNNO", "the failure policy (continue) answers meanwhile");
            if Instant::now() > until {
                return false;
            }
        }
    })
    .await
    .unwrap();
    assert!(reverted, "the breaker put the reference filter back");
    assert_eq!(daemon.filter().info().name, "greylist");
    let e = daemon.reload().await.expect_err("the chaos version is held back");
    assert!(e.to_string().contains("crash-loop breaker"), "{e}");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_asks_in_order_and_reloads_one_link_alone() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    std::fs::write(d.join("front.wasm"), CHAOS_FILTER).unwrap();
    let text = format!(
        "[[filters]]\npath = \"{d}/front.wasm\"\nnamespace = \"front\"\n\n[[filters]]\nnamespace = \"greylist\"\n[filters.config]\ndelay = 120\n\n\
         [store]\npath = \"memory\"\n[control]\nsocket = \"{d}/control.sock\"\n[policy]\nlisten = [\"127.0.0.1:0\"]\n",
        d = d.display()
    );
    std::fs::write(d.join("greyhook.toml"), &text).unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let (daemon, port) = start(&d, clock, false).await;
    assert_eq!(daemon.filters().iter().map(|f| f.info().name.clone()).collect::<Vec<_>>(), ["chaos", "greylist"]);
    let ask_rcpt = move |rcpt: &str| {
        let mut c = connect(port);
        let req =
            format!("request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=192.0.2.7\nsender=a@x.org\nrecipient={rcpt}\n\n");
        c.0.write_all(req.as_bytes()).unwrap();
        let mut line = String::new();
        c.1.read_line(&mut line).unwrap();
        line.trim_end().trim_start_matches("action=").to_string()
    };
    let r = tokio::task::spawn_blocking(move || (ask_rcpt("vip@e2e.test"), ask_rcpt("continue@e2e.test"))).await.unwrap();
    assert_eq!(r.0, "PREPEND X-Chaos: ok", "the front filter's accept is final: the greylist filter is not asked");
    assert!(r.1.starts_with("451 4.7.1") && r.1.ends_with("retry=00:02:00"), "continue passes on: {}", r.1);
    // Reload only the front filter: the greylist filter's version and records stay.
    let before = Arc::as_ptr(&daemon.filters()[1]);
    std::fs::write(d.join("front.wasm"), greyhook::REFERENCE_FILTER).unwrap();
    let e = daemon.reload().await;
    assert!(e.is_ok(), "{e:?}");
    assert_eq!(Arc::as_ptr(&daemon.filters()[1]), before, "the second link was not touched");
    assert_eq!(daemon.filters()[0].info().name, "greylist");
    // Two filters on one namespace are refused.
    let bad = text.replace("namespace = \"front\"", "namespace = \"greylist\"");
    let e = hermetic(DaemonConfig::parse(&bad, "g.toml").unwrap());
    assert!(Daemon::start(&e, Arc::new(ManualClock::new(T0)), None).await.err().unwrap().to_string().contains("namespace"));
    daemon.stop().await;
}

/// The proof: `policy-load` at full speed against `greyhook serve`
/// while the filter file is replaced 100 times by two builds that answer
/// differently (the greylist filter, 2 s delay: a deferral, or a pass with
/// or without its `X-Greylist` header; the chaos filter: accept with
/// `X-Chaos`), with refused versions (garbage, wrong world, a
/// configuration `init` rejects) thrown in under the same load.
#[test]
fn policy_load_sees_only_the_two_builds_while_they_swap_a_hundred_times() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let filter = d.join("filter.wasm");
    let cfg = d.join("greyhook.toml");
    let port = free_port();
    let control = d.join("control.sock");
    let write_cfg = |delay: &str| {
        let text = format!(
            "[filter]\npath = \"{f}\"\ndeadline = \"5s\"\n[store]\npath = \"memory\"\n[control]\nsocket = \"{c}\"\n[policy]\nlisten = [\"127.0.0.1:{port}\"]\n[filter.config]\nauto_whitelist_after = 0\ndelay = {delay}\n",
            f = filter.display(),
            c = control.display()
        );
        replace(&cfg, text.as_bytes());
    };
    replace(&filter, greyhook::REFERENCE_FILTER);
    write_cfg("2");
    let mut daemon = Process::greyhook(&["serve", "--config", cfg.to_str().unwrap()], d.join("log"));
    wait_for_port(port, 30);

    // A record written before the swaps.
    let mut c = connect(port);
    let r = ask(&mut c, "early@x.org");
    // The delay counts from the record, written before this reply.
    let seeded = Instant::now();
    assert_eq!(r, "451 4.7.1 Greylisted, please try again later retry=00:00:02");

    let load = std::process::Command::new(policy_load_bin())
        .args(["--target", &format!("127.0.0.1:{port}"), "--connections", "4", "--requests", "2000000", "--triplets", "3000"])
        .args(["--seconds", "300", "--timeout", "10"])
        .args(["--expect", "451 4.7.1 Greylisted, please try again later retry=00:00:0"])
        .args(["--expect", "PREPEND X-Greylist: delayed "])
        .args(["--expect", "DUNNO"])
        .args(["--expect", "PREPEND X-Chaos: ok"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();

    let control = |command: &str| {
        let out = std::process::Command::new(greyhook_bin()).args([command, "--control", control.to_str().unwrap()]).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    let reload = || control("reload");
    let wrong_world = wat::parse_str("(component)").unwrap();
    let mut refused = 0;
    for i in 0..100 {
        let (bytes, name) = if i % 2 == 0 { (CHAOS_FILTER, "chaos") } else { (greyhook::REFERENCE_FILTER, "greylist") };
        replace(&filter, bytes);
        // The daemon also watches the file, so it may have swapped already.
        let (ok, out) = reload();
        assert!(ok && (out.starts_with(&format!("loaded {name}")) || out.starts_with("unchanged")), "swap {i}: {out}");
        let (ok, out) = control("status");
        assert!(ok && out.contains(&format!("\nfilter {name} ")), "swap {i}: {out}");
        if i % 10 == 5 {
            let bads = [
                (&b"garbage"[..], "not a WebAssembly file"),
                (&b"\0asm garbage"[..], "invalid component"),
                (&wrong_world[..], "greyhook:filter"),
            ];
            for (bad, why) in bads {
                replace(&filter, bad);
                let (ok, out) = reload();
                assert!(!ok && out.contains("refused") && out.contains(why), "{out}");
                refused += 1;
            }
            replace(&filter, bytes);
            write_cfg("\"not a duration\"");
            let (ok, out) = reload();
            assert!(!ok && out.contains("refused") && out.contains("delay"), "{out}");
            refused += 1;
            write_cfg("2");
            let (ok, out) = reload();
            assert!(ok && out.starts_with("unchanged"), "back to the serving version: {out}");
        }
    }
    let _ = std::process::Command::new("kill").args(["-TERM", &load.id().to_string()]).status();
    let out = load.wait_with_output().unwrap();
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{summary}{}", String::from_utf8_lossy(&out.stderr));
    let counts: Vec<u64> = summary
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("expect_counts="))
        .map(|v| v.split(',').map(|n| n.parse().unwrap()).collect())
        .unwrap_or_default();
    assert!(summary.contains("other=0 errors=0"), "{summary}");
    assert!(counts.len() == 4 && counts[0] > 0 && counts[3] > 0, "both builds answered: {summary}");
    // The daemon refused every bad version it was asked to load (the file
    // watcher may have tried some of them too).
    let logged = daemon.log_text().matches("reload refused").count();
    assert!(logged >= refused && refused == 40, "{logged} refusals logged for {refused} bad versions");

    // The greylist build serves again; the record from before the swaps counts.
    std::thread::sleep(Duration::from_secs(2).saturating_sub(seeded.elapsed()) + Duration::from_millis(100));
    let mut c = connect(port);
    assert!(ask(&mut c, "early@x.org").starts_with("PREPEND X-Greylist: delayed "), "the early record was lost");
    assert_eq!(ask(&mut c, "late@x.org"), "451 4.7.1 Greylisted, please try again later retry=00:00:02");
    assert!(daemon.terminate(10), "{}", daemon.log_text());
}

/// The stack cap is per filter: the same bounded recursion overflows a
/// filter with a 64 KiB stack (failure policy: continue) and fits in the
/// next filter's 4 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stack_cap_is_per_filter() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    std::fs::write(d.join("chaos.wasm"), CHAOS_FILTER).unwrap();
    let text = format!(
        "[[filters]]\npath = \"{d}/chaos.wasm\"\nnamespace = \"small\"\nstack_kib = 64\n\n\
         [[filters]]\npath = \"{d}/chaos.wasm\"\nnamespace = \"big\"\nstack_kib = 4096\n\n\
         [store]\npath = \"memory\"\n[control]\nsocket = \"{d}/control.sock\"\n[policy]\nlisten = [\"127.0.0.1:0\"]\n",
        d = d.display()
    );
    std::fs::write(d.join("greyhook.toml"), &text).unwrap();
    let (daemon, port) = start(&d, Arc::new(ManualClock::new(T0)), false).await;
    let answer = tokio::task::spawn_blocking(move || {
        let mut c = connect(port);
        c.0.write_all(
            b"request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=192.0.2.7\nsender=a@x.org\nrecipient=deep@e2e.test\n\n",
        )
        .unwrap();
        let mut line = String::new();
        c.1.read_line(&mut line).unwrap();
        line
    })
    .await
    .unwrap();
    assert!(answer.starts_with("action=PREPEND X-Chaos: deep"), "{answer}");
    let failures: Vec<u64> = daemon.filters().iter().map(|f| f.stats().failures.load(std::sync::atomic::Ordering::Relaxed)).collect();
    assert_eq!(failures, [1, 0], "the small stack overflowed, the big one did not");
    // A changed cap needs a restart; the reload says so.
    std::fs::write(d.join("greyhook.toml"), text.replace("stack_kib = 64", "stack_kib = 128")).unwrap();
    let e = daemon.reload().await.unwrap_err();
    assert!(e.to_string().contains("stack_kib"), "{e}");
    daemon.stop().await;
}

/// The crash-loop breaker's rules, sampled by hand: it trips only when the
/// failures reach `failures` *and* at least half the calls in the window;
/// a tripped version is refused for `backoff`, then accepted again; a
/// second trip of the same version refuses it twice as long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_needs_half_the_calls_and_doubles_its_backoff() {
    use greyhook::runtime::reload::{BreakerConfig, FilterSource, Reloader};
    let dir = tempfile::tempdir().unwrap();
    let chaos = dir.path().join("chaos.wasm");
    std::fs::write(&chaos, CHAOS_FILTER).unwrap();
    let store: Arc<dyn greyhook::store::Store> = Arc::new(greyhook::store::MemoryStore::new());
    let r = Reloader::start(runtime(), store, FilterSource::Embedded, greyhook::FilterOptions::default(), None).await.unwrap();
    let config = BreakerConfig { failures: 5, window: Duration::from_secs(1), backoff: Duration::from_millis(400) };
    let chaos_options = greyhook::FilterOptions { namespace: Some("chaos".into()), ..Default::default() };
    let load_chaos = || r.reload_with(Some(FilterSource::File(chaos.clone())), Some(chaos_options.clone()));
    assert!(load_chaos().await.unwrap().to_string().starts_with("loaded chaos"));
    let calls = |fail: usize, ok: usize| {
        let f = r.filter();
        async move {
            let c = Client::new(&f, "192.0.2.1", T0);
            for _ in 0..fail {
                f.on_rcpt(&c.ctx(), "panic@x").await;
            }
            for _ in 0..ok {
                f.on_rcpt(&c.ctx(), "fine@x").await;
            }
        }
    };
    // 5 failures in 25 calls: enough failures, not half the calls.
    calls(5, 20).await;
    assert_eq!(r.check_breaker(&config).await, None, "under half the calls");
    // 4 failures in 4 calls: half, but fewer than `failures`.
    calls(4, 0).await;
    assert_eq!(r.check_breaker(&config).await, None, "fewer than breaker_failures");
    // 6 failures in 8 calls: trips, back to the reference filter.
    calls(6, 2).await;
    let why = r.check_breaker(&config).await.expect("tripped");
    assert!(why.contains("failed 6 of 8 calls"), "{why}");
    assert_eq!(r.filter().info().name, "greylist");
    let e = load_chaos().await.unwrap_err().to_string();
    assert!(e.contains("crash-loop breaker"), "{e}");
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert!(load_chaos().await.unwrap().to_string().starts_with("loaded chaos"), "accepted after the back-off");
    // Trip it again: now refused for 800 ms.
    calls(6, 0).await;
    assert!(r.check_breaker(&config).await.is_some());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(load_chaos().await.is_err(), "still refused after the first back-off: it doubled");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(load_chaos().await.is_ok(), "accepted after the doubled back-off");
}

/// A filter's store namespace is its own name from `init` unless its table
/// names one: two different filters never share records by accident, two
/// copies of one filter are refused until they are named apart, and a
/// reload that swaps in another filter moves to that filter's namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filters_namespace_is_its_name_unless_set() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    std::fs::write(d.join("front.wasm"), CHAOS_FILTER).unwrap();
    let base = format!(
        "[store]\npath = \"memory\"\n[control]\nsocket = \"{d}/control.sock\"\n[policy]\nlisten = [\"127.0.0.1:0\"]\n",
        d = d.display()
    );
    let start = |chain: String| {
        let text = format!("{base}{chain}");
        async move {
            let cfg = hermetic(DaemonConfig::parse(&text, "g.toml").unwrap());
            Daemon::start(&cfg, Arc::new(ManualClock::new(T0)), None).await
        }
    };
    let front = format!("[[filters]]\npath = \"{}/front.wasm\"\n", d.display());
    let daemon = start(format!("{front}[[filters]]\n")).await.unwrap();
    let namespaces: Vec<String> = daemon.filters().iter().map(|f| f.namespace().to_string()).collect();
    assert_eq!(namespaces, ["chaos", "greylist"]);
    // Swap the chaos filter for the reference one: another name, so
    // another namespace (not chaos's records) — but the second filter's:
    // refused, the chaos filter keeps serving.
    std::fs::write(d.join("front.wasm"), greyhook::REFERENCE_FILTER).unwrap();
    let e = daemon.reload().await.expect_err("a reload into another filter's namespace is refused");
    assert!(e.to_string().contains("namespace \"greylist\" is another filter's"), "{e}");
    assert_eq!(daemon.filters()[0].namespace(), "chaos");
    daemon.stop().await;
    // With the second filter named apart, the same swap moves the first
    // link to the reference filter's own namespace.
    std::fs::write(d.join("front.wasm"), CHAOS_FILTER).unwrap();
    let daemon = start(format!("{front}[[filters]]\nnamespace = \"main\"\n")).await.unwrap();
    std::fs::write(d.join("front.wasm"), greyhook::REFERENCE_FILTER).unwrap();
    assert!(daemon.reload().await.is_ok());
    let namespaces: Vec<String> = daemon.filters().iter().map(|f| f.namespace().to_string()).collect();
    assert_eq!(namespaces, ["greylist", "main"]);
    daemon.stop().await;

    let e = start("[[filters]]\n[[filters]]\n".into()).await.err().expect("two reference filters share a namespace");
    assert!(e.to_string().contains("share the store namespace \"greylist\""), "{e}");
    let daemon = start("[[filters]]\nnamespace = \"strict\"\n[[filters]]\n".into()).await.unwrap();
    let namespaces: Vec<String> = daemon.filters().iter().map(|f| f.namespace().to_string()).collect();
    assert_eq!(namespaces, ["strict", "greylist"]);
    daemon.stop().await;
}

/// After a reload, the new version keeps its instances for reuse: the
/// version before it (kept for the crash-loop breaker to go back to) held
/// its idle instances, and with them the runtime's places for idle
/// instances, so the new version made an instance anew for every call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_reload_the_new_version_reuses_its_instances() {
    use greyhook::runtime::reload::{FilterSource, Reloader};
    use std::sync::atomic::Ordering::Relaxed;
    let dir = tempfile::tempdir().unwrap();
    let chaos = dir.path().join("chaos.wasm");
    std::fs::write(&chaos, CHAOS_FILTER).unwrap();
    let store: Arc<dyn greyhook::store::Store> = Arc::new(greyhook::store::MemoryStore::new());
    // A resolver that never answers: each call waits for its SPF lookup
    // until the deadline cuts it, so calls at once each take an instance.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let resolver = greyhook::dns::Resolver::new(greyhook::dns::DnsConfig {
        servers: vec![silent.local_addr().unwrap()],
        ..greyhook::dns::DnsConfig::default()
    });
    let rt = greyhook::Runtime::new(greyhook::RuntimeConfig { resolver, ..greyhook::RuntimeConfig::default() }).unwrap();
    let r = Reloader::start(rt, store, FilterSource::Embedded, greyhook::FilterOptions::default(), None).await.unwrap();
    // Calls at once leave the reference filter with idle instances, as
    // many as the runtime keeps (a quarter of its 64 slots).
    let f = r.filter();
    let calls: Vec<_> = (0..64)
        .map(|i| {
            let f = f.clone();
            tokio::spawn(async move {
                let mut c = Client::new(&f, &format!("192.0.2.{}", i + 1), T0);
                c.attempt("a@example.org", "user@example.com").await
            })
        })
        .collect();
    for c in calls {
        c.await.unwrap();
    }
    drop(f);
    let options = greyhook::FilterOptions { namespace: Some("chaos".into()), ..Default::default() };
    assert!(r.reload_with(Some(FilterSource::File(chaos)), Some(options)).await.unwrap().to_string().starts_with("loaded chaos"));
    let f = r.filter();
    let c = Client::new(&f, "192.0.2.200", T0);
    let loaded = f.stats().instances.load(Relaxed);
    for _ in 0..20 {
        f.on_rcpt(&c.ctx(), "fine@x").await;
    }
    let made = f.stats().instances.load(Relaxed) - loaded;
    assert!(made <= 1, "the new version made {made} instances for 20 calls one after another");
}

/// The same from outside: `greyhook serve` with a resolver that never
/// answers (so policy requests at once each hold an instance, as a busy
/// resolver makes them), then `greyhook reload`, then requests one after
/// another: `greyhook status` shows how many instances the new version made.
#[test]
fn after_a_reload_the_running_daemon_reuses_instances() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_port();
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let config = |delay: u32| {
        format!(
            "[control]\nsocket = \"{d}/control.sock\"\n[store]\npath = \"memory\"\n[policy]\nlisten = [\"127.0.0.1:{port}\"]\n\
             [dns]\nservers = [\"{dns}\"]\n[filter.config]\ndelay = {delay}\n",
            d = d.display(),
            dns = silent.local_addr().unwrap()
        )
    };
    let mut p = greyhook_with(d, "serve", &config(300));
    p.wait_listening(port, 60);
    let ask = |s: &mut TcpStream, client: &str| policy_rcpt(s, client, "a@example.org", "u@example.com", "i");
    let at_once: Vec<_> = (0..32)
        .map(|i| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                ask(&mut s, &format!("10.0.{i}.1"))
            })
        })
        .collect();
    for t in at_once {
        assert!(t.join().unwrap().starts_with("action="));
    }
    let status = || greyhook_status(&d.join("control.sock"), false);
    let instances = |status: &str| -> u64 {
        let line = status.lines().find(|l| l.starts_with("filter greylist ")).unwrap_or_else(|| panic!("{status}"));
        line.rsplit_once(" instances=").and_then(|(_, n)| n.parse().ok()).unwrap_or_else(|| panic!("{line}"))
    };
    assert!(instances(&status()) >= 8, "calls at once made instances: {}", status());
    std::fs::write(d.join("greyhook.toml"), config(301)).unwrap();
    let out = std::process::Command::new(greyhook_bin()).args(["reload", "--control"]).arg(d.join("control.sock")).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("loaded greylist"), "{}", String::from_utf8_lossy(&out.stdout));
    let loaded = instances(&status());
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    for i in 0..20 {
        assert!(ask(&mut s, &format!("10.1.{i}.1")).starts_with("action="));
    }
    let made = instances(&status()) - loaded;
    assert!(made <= 1, "the new version made {made} instances for 20 requests one after another\n{}", status());
}
