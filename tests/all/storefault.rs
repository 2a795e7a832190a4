//! The redb store meets a full disk and damaged files, through the running
//! `greyhook serve`: records are never silently lost, a file is never a
//! panic.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use greyhook_tests::*;

/// One policy request on a fresh connection: the action.
fn ask(port: u16, client: &str, sender: &str, rcpt: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    policy_rcpt(&mut s, client, sender, rcpt, "x")
}

/// A distinct sender for triplet `i` (letters only: the reference filter
/// folds digits in senders together, VERP-style).
fn sender(i: usize) -> String {
    let mut n = i;
    let mut s = String::new();
    loop {
        s.push((b'a' + (n % 26) as u8) as char);
        n /= 26;
        if n == 0 {
            break;
        }
    }
    format!("{s}@example.org")
}

/// A distinct client network for triplet `i`.
fn client(i: usize) -> String {
    format!("10.{}.{}.1", i / 250, i % 250)
}

fn serve_on(dir: &Path, db: &Path, durability: &str, port: u16) -> Process {
    serve_with_delay(dir, db, durability, port, 1)
}

/// (A 5 s hook deadline: these tests are about what the store keeps, and
/// an fsync per write on a machine busy compiling must not turn a
/// decision into the failure policy's.)
fn serve_with_delay(dir: &Path, db: &Path, durability: &str, port: u16, delay: u64) -> Process {
    let text = format!(
        "[control]\nsocket = \"{d}/control.sock\"\n[store]\npath = \"{db}\"\ndurability = \"{durability}\"\n\
         [policy]\nlisten = [\"127.0.0.1:{port}\"]\n[filter]\ndeadline = \"5s\"\n[filter.config]\ndelay = {delay}\n",
        d = dir.display(),
        db = db.display()
    );
    let p = greyhook_with(dir, "serve", &text);
    wait_for_port(port, 30);
    p
}

/// `greyhook status` of the daemon whose control socket is in `dir`.
fn status(dir: &Path) -> String {
    greyhook_status(&dir.join("control.sock"), false)
}

/// A private tmpfs of `size` mounted at a temp dir (unmounted when dropped):
/// a disk that can really fill up.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("mount runs");
        assert!(st.success(), "mounting a tmpfs needs root (CI runs as root)");
        SmallDisk { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills it to the last byte; returns the filler file.
    fn fill(&self) -> PathBuf {
        let p = self.path().join("filler");
        let mut f = std::fs::File::create(&p).unwrap();
        let chunk = vec![0u8; 4096];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.write_all(&[0u8]);
        p
    }

    fn remount_ro(&self) {
        let st = std::process::Command::new("mount").args(["-o", "remount,ro"]).arg(self.path()).status().unwrap();
        assert!(st.success());
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// An LD_PRELOAD shim that makes every fsync and fdatasync take
/// `SLOW_SYNC_MS` milliseconds longer: a slow disk (also for the benches).
const SLOW_SYNC_C: &str = include_str!("../../bench/slowsync.c");

/// A disk whose every fsync takes 1.5 s under a daemon whose redb file
/// grows: no request waits for the disk. redb holds its page allocator's
/// lock across the fsync that makes a grown file durable, and every read
/// transaction begun meanwhile waited for it, so a request waited a whole
/// fsync (found by `cargo bench --bench store` with fsync slowed: 110 ms
/// stalls at 5M records with a 100 ms fsync). Requests now read a snapshot
/// taken by the thread that committed. The shim is built with the
/// system's C compiler (the one that links Rust).
#[test]
fn requests_never_wait_for_a_slow_disk() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("slowsync.c");
    let shim = dir.path().join("slowsync.so");
    std::fs::write(&src, SLOW_SYNC_C).unwrap();
    let built = std::process::Command::new("cc").args(["-shared", "-fPIC", "-O2", "-o"]).arg(&shim).arg(&src).arg("-ldl").status();
    assert!(built.is_ok_and(|s| s.success()), "cc builds the slow-fsync shim");
    let db = dir.path().join("g.db");
    let port = free_port();
    let text = format!(
        "[control]\nsocket = \"{d}/control.sock\"\n[store]\npath = \"{db}\"\n\
         [policy]\nlisten = [\"127.0.0.1:{port}\"]\n[filter]\ndeadline = \"10s\"\n[filter.config]\ndelay = 60\n",
        d = dir.path().display(),
        db = db.display()
    );
    let cfg = dir.path().join("greyhook.toml");
    std::fs::write(&cfg, text).unwrap();
    let mut d = Process::greyhook_env(
        &["serve", "--config", cfg.to_str().unwrap()],
        dir.path().join("log"),
        &[("LD_PRELOAD", shim.as_os_str()), ("SLOW_SYNC_MS", "1500".as_ref())],
    );
    wait_for_port(port, 60);
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", d.child.id())).unwrap();
    assert!(maps.contains("slowsync.so"), "the shim is loaded");
    let size = || std::fs::metadata(&db).map_or(0, |m| m.len());
    let start_size = size();
    // New triplets for 10 s: every flush (one fsync of 1.5 s, two with
    // redb's quick repair) writes thousands of records and the file grows.
    let (mut worst, mut n) = (Duration::ZERO, 0);
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until && n < 50_000 {
        let t = Instant::now();
        let a = ask(port, &client(n), &sender(n), "u@example.com");
        worst = worst.max(t.elapsed());
        assert!(a.starts_with("action=451"), "{n}: {a}\n{}", d.log_text());
        n += 1;
    }
    let grown = size();
    assert!(d.terminate(60), "{}", d.log_text());
    assert!(grown > start_size, "the file grew meanwhile ({start_size} -> {grown} bytes): else this shows nothing");
    assert!(worst < Duration::from_secs(1), "{n} requests: the slowest took {worst:?} (an fsync is 1.5 s)\n{}", d.log_text());
}

/// Disk full, then space freed: records written meanwhile are kept,
/// greylisting goes on, `status` says the store is degraded, and once the
/// disk has room they reach the file without a restart (a restart then
/// finds every one of them).
#[test]
fn a_full_disk_loses_no_records() {
    for durability in ["periodic", "immediate"] {
        let disk = SmallDisk::mount("8m");
        let dir = tempfile::tempdir().unwrap();
        let db = disk.path().join("greyhook.db");
        let port = free_port();
        let mut d = serve_on(dir.path(), &db, durability, port);
        assert!(ask(port, "192.0.2.1", "warm@example.org", "u@example.com").starts_with("action=451"));
        std::thread::sleep(Duration::from_millis(1500));
        let filler = disk.fill();
        // First sightings while the disk is full: still greylisted.
        let n = 300;
        for i in 0..n {
            let a = ask(port, &client(i), &sender(i), "u@example.com");
            assert!(a.starts_with("action=451"), "{durability} {i}: {a}\n{}", d.log_text());
        }
        let until = Instant::now() + Duration::from_secs(10);
        while !status(dir.path()).contains(" health=degraded ") {
            assert!(Instant::now() < until, "{durability}: status never said degraded: {}\n{}", status(dir.path()), d.log_text());
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(d.wait_log("store degraded", 10), "{}", d.log_text());
        std::fs::remove_file(filler).unwrap();
        let until = Instant::now() + Duration::from_secs(15);
        while !status(dir.path()).contains(" health=ok ") {
            assert!(Instant::now() < until, "{durability}: never recovered: {}\n{}", status(dir.path()), d.log_text());
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(d.wait_log("store recovered", 10), "{}", d.log_text());
        assert!(d.terminate(10), "{}", d.log_text());
        // A new process on the same file knows every triplet.
        std::thread::sleep(Duration::from_millis(1100));
        let d2 = serve_on(dir.path(), &db, durability, port);
        let again = (0..n)
            .filter(|i| !ask(port, &client(*i), &sender(*i), "u@example.com").starts_with("action=PREPEND X-Greylist: delayed"))
            .count();
        // A retry after the delay passes with the X-Greylist header only if
        // its first-sighting record was kept.
        assert_eq!(again, 0, "{durability}: {again} of {n} triplets were forgotten\n{}", d2.log_text());
    }
}

/// Damaged and unwritable store files: greyhook refuses with a message
/// that says what to do, never a panic; `greyhook db check` says the same.
#[test]
fn damaged_store_files_are_refused_not_panicked_on() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.db");
    let port = free_port();
    let mut d = serve_on(dir.path(), &good, "immediate", port);
    for i in 0..2000 {
        assert!(ask(port, &client(i), &sender(i), "u@example.com").starts_with("action=451"));
    }
    assert!(d.terminate(10));
    let bytes = std::fs::read(&good).unwrap();
    assert!(bytes.len() > 16 << 10, "a store with some pages: {}", bytes.len());
    let mut rng = Xorshift(0x5eed);
    let mut random_middle = bytes.clone();
    let mid = bytes.len() / 2;
    for b in &mut random_middle[mid - bytes.len() / 8..mid + bytes.len() / 8] {
        *b = rng.next_u64() as u8;
    }
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", bytes[..bytes.len() / 2].to_vec()),
        ("zeroed", vec![0u8; bytes.len()]),
        ("random-middle", random_middle),
        ("header-garbage", (0..4096).map(|_| rng.next_u64() as u8).chain(bytes[4096..].iter().copied()).collect()),
        ("empty", Vec::new()),
    ];
    for (name, content) in cases {
        let case = tempfile::tempdir().unwrap();
        let db = case.path().join("g.db");
        std::fs::write(&db, &content).unwrap();
        let check = std::process::Command::new(greyhook_bin()).args(["db", "check"]).arg(&db).output().unwrap();
        let check_err = String::from_utf8_lossy(&check.stderr).into_owned();
        assert!(!check_err.contains("panicked") && check.status.code() != Some(101), "{name}: db check panicked: {check_err}");
        let port = free_port();
        let text = format!(
            "[control]\nsocket = \"{d}/control.sock\"\n[store]\npath = \"{db}\"\n[policy]\nlisten = [\"127.0.0.1:{port}\"]\n",
            d = case.path().display(),
            db = db.display()
        );
        let mut p = greyhook_with(case.path(), "serve", &text);
        let until = Instant::now() + Duration::from_secs(30);
        let outcome = loop {
            if let Ok(Some(st)) = p.child.try_wait() {
                break Some(st);
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break None;
            }
            assert!(Instant::now() < until, "{name}: neither served nor refused");
            std::thread::sleep(Duration::from_millis(50));
        };
        let log = p.log_text();
        assert!(!log.contains("panicked"), "{name}: {log}");
        match outcome {
            Some(st) => {
                assert_ne!(st.code(), Some(101), "{name}: a panic exit: {log}");
                assert!(!st.success(), "{name}");
                assert!(log.contains("damaged") && log.contains("move it aside"), "{name}: the message says what to do: {log}");
                assert!(!check.status.success() && check_err.contains("damaged"), "{name}: db check agrees: {check_err}");
            }
            None => {
                // redb repaired or the damage hit free space: it must serve.
                assert!(ask(port, "192.0.2.1", "a@example.org", "u@example.com").starts_with("action="), "{name}");
                assert!(p.terminate(10), "{name}: {}", p.log_text());
            }
        }
    }
    // A good file checks fine.
    let check = std::process::Command::new(greyhook_bin()).args(["db", "check"]).arg(&good).output().unwrap();
    let out = String::from_utf8_lossy(&check.stdout).into_owned();
    let n: u64 = out.split(" holds ").nth(1).and_then(|r| r.split(' ').next()).and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(check.status.success() && n >= 2000, "{check:?}");
    // On a read-only file system: a clear refusal, not a panic.
    let disk = SmallDisk::mount("16m");
    let db = disk.path().join("g.db");
    std::fs::copy(&good, &db).unwrap();
    disk.remount_ro();
    let case = tempfile::tempdir().unwrap();
    let text = format!(
        "[control]\nsocket = \"{d}/control.sock\"\n[store]\npath = \"{db}\"\n[policy]\nlisten = [\"127.0.0.1:{p}\"]\n",
        d = case.path().display(),
        db = db.display(),
        p = free_port()
    );
    let mut p = greyhook_with(case.path(), "serve", &text);
    let st = p.child.wait().unwrap();
    let log = p.log_text();
    assert!(!st.success() && st.code() != Some(101) && !log.contains("panicked"), "{log}");
    assert!(log.contains("g.db"), "names the file: {log}");
}

/// Records survive the daemon's end, on its redb file: a clean stop
/// (SIGTERM), a SIGKILL once the periodic flush (1 s) has run, and a
/// SIGKILL right after the answer with `durability = "immediate"`. After
/// the restart the same triplet is told the time *left* (under a minute);
/// a lost record would start a new minute.
#[test]
fn records_survive_a_restart_of_the_daemon() {
    for (durability, signal, before_kill) in [("periodic", "TERM", 0), ("periodic", "KILL", 2500), ("immediate", "KILL", 0)] {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("greyhook.db");
        let port = free_port();
        let mut p = serve_with_delay(dir.path(), &db, durability, port, 60);
        let first = ask(port, "192.0.2.1", "a@example.org", "u@example.com");
        assert!(first.trim_end().ends_with("retry=00:01:00"), "{first}");
        std::thread::sleep(Duration::from_millis(before_kill));
        let pid = p.child.id().to_string();
        assert!(std::process::Command::new("kill").args([&format!("-{signal}"), &pid]).status().unwrap().success());
        let st = p.child.wait().unwrap();
        assert_eq!(st.success(), signal == "TERM", "{durability}/{signal}: {st:?}");
        std::thread::sleep(Duration::from_millis(1100));
        let _p = serve_with_delay(dir.path(), &db, durability, port, 60);
        let again = ask(port, "192.0.2.1", "a@example.org", "u@example.com");
        assert!(again.contains("retry=00:00:5"), "{durability}/{signal}: the record was lost: {again}");
    }
}

/// Waits up to `secs` for a daemon that must refuse to start (`what`) to
/// exit; its status.
fn refused_within(p: &mut Process, secs: u64, what: &str) -> std::process::ExitStatus {
    let until = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(st) = p.child.try_wait().unwrap() {
            return st;
        }
        assert!(Instant::now() < until, "{what} must be refused: {}", p.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A file larger than `[store] check_at_open_mib` opens at once (a restart
/// at millions of records must not take seconds) and is read through in
/// the background: a malformed record, which the full check at open
/// refuses, is then found while greyhook serves and logged with what to
/// do; requests are answered meanwhile, never a panic. A good file read
/// through this way says so.
#[test]
fn a_large_store_opens_at_once_and_is_checked_in_the_background() {
    use greyhook::store::{Durability, RedbStore};
    const RECORDS: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("records");
    let dir = tempfile::tempdir().unwrap();
    let make = |name: &str, malformed: bool| {
        let db = dir.path().join(name);
        let s = RedbStore::open(&db, Durability::Immediate).unwrap();
        s.import((0..20_000u64).map(|i| (format!("greylist/t/{i:08}"), vec![b'v'; 40], 4_000_000_000))).unwrap();
        drop(s);
        if malformed {
            // Shorter than a record's version and expiry: no record at all.
            let r = redb::Database::create(&db).unwrap();
            let txn = r.begin_write().unwrap();
            txn.open_table(RECORDS).unwrap().insert("greylist/t/00012345", b"bad".as_slice()).unwrap();
            txn.commit().unwrap();
        }
        db
    };
    let serve = |db: &Path, check_at_open_mib: u64| {
        let case = tempfile::tempdir().unwrap();
        let port = free_port();
        let text = format!(
            "[control]\nsocket = \"{d}/control.sock\"\n[store]\npath = \"{db}\"\ncheck_at_open_mib = {check_at_open_mib}\n\
             [policy]\nlisten = [\"127.0.0.1:{port}\"]\n",
            d = case.path().display(),
            db = db.display()
        );
        let p = greyhook_with(case.path(), "serve", &text);
        (p, port, case)
    };
    let bad = make("bad.db", true);
    // Within the bound (the default, 256 MiB): refused before serving.
    let (mut p, _, _case) = serve(&bad, 256);
    let st = refused_within(&mut p, 30, "a malformed record within the bound");
    let log = p.log_text();
    assert!(!st.success() && log.contains("malformed") && log.contains("move it aside"), "{st:?}: {log}");
    // Past the bound: served at once, the damage found and logged.
    let (mut p, port, _case) = serve(&bad, 0);
    p.wait_listening(port, 30);
    assert!(ask(port, "192.0.2.1", "a@example.org", "u@example.com").starts_with("action="));
    assert!(p.wait_log("move it aside", 20), "the damage is logged: {}", p.log_text());
    let log = p.log_text();
    assert!(log.contains("malformed") && !log.contains("panicked"), "{log}");
    assert!(ask(port, "192.0.2.2", "b@example.org", "u@example.com").starts_with("action="), "still answering");
    assert!(p.terminate(10), "{}", p.log_text());
    // A good file past the bound: read through, nothing found.
    let good = make("good.db", false);
    let (mut p, port, _case) = serve(&good, 0);
    p.wait_listening(port, 30);
    assert!(p.wait_log("no damage found", 20), "{}", p.log_text());
    assert!(p.log_text().contains("records=20000"), "{}", p.log_text());
    assert!(ask(port, "192.0.2.1", "a@example.org", "u@example.com").starts_with("action="));
    assert!(p.terminate(10), "{}", p.log_text());
}

/// The resident memory of a running `greyhook serve`, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// redb keeps the file's pages in a cache of its own, 1 GiB by default:
/// a store of a million records held over 1 GB of memory. `[store]
/// cache_mib` bounds it (64 MiB by default). Each daemon here reads every
/// page of a ~100 MB file (the background check of a file past
/// `check_at_open_mib`): on a 4 MiB cache it stays small, on a 512 MiB one
/// it holds the file. The setting is logged, and a value past its bound is
/// refused before the daemon serves.
#[test]
fn the_store_s_page_cache_is_bounded_by_cache_mib() {
    use greyhook::store::{Durability, RedbStore};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("big.db");
    let s = RedbStore::open(&db, Durability::Immediate).unwrap();
    s.import((0..150_000u64).map(|i| (format!("greylist/t/{i:08}"), vec![b'v'; 400], 4_000_000_000))).unwrap();
    drop(s);
    let file_kib = std::fs::metadata(&db).unwrap().len() >> 10;
    let serve = |cache: &str| {
        let case = tempfile::tempdir().unwrap();
        let port = free_port();
        let text = format!(
            "[control]\nsocket = \"{d}/control.sock\"\n[store]\npath = \"{db}\"\ncheck_at_open_mib = 0\n{cache}\n\
             [policy]\nlisten = [\"127.0.0.1:{port}\"]\n",
            d = case.path().display(),
            db = db.display()
        );
        (greyhook_with(case.path(), "serve", &text), port, case)
    };
    let mut rss = Vec::new();
    for (cache, shown) in [("cache_mib = 4", "cache 4 MiB"), ("cache_mib = 512", "cache 512 MiB")] {
        let (mut p, port, _case) = serve(cache);
        p.wait_listening(port, 60);
        assert!(p.wait_log("no damage found", 120), "{}", p.log_text());
        assert!(p.log_text().contains(shown), "the cache is logged: {}", p.log_text());
        assert!(ask(port, "192.0.2.1", "a@example.org", "u@example.com").starts_with("action="));
        rss.push(rss_kib(p.child.id()));
        assert!(p.terminate(10), "{}", p.log_text());
    }
    let (small, large) = (rss[0], rss[1]);
    assert!(
        large > small + file_kib / 2,
        "a 512 MiB cache holds the {file_kib} KiB file read through ({large} KiB), a 4 MiB one does not ({small} KiB)"
    );
    // Past the bound: refused with the setting named.
    let (mut p, _, _case) = serve("cache_mib = 100000");
    let st = refused_within(&mut p, 30, "cache_mib past its bound");
    assert!(!st.success() && p.log_text().contains("cache_mib must be 0 to 65536"), "{st:?}: {}", p.log_text());
}
