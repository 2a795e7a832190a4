//! An MX farm: two `greyhook serve` daemons sharing one real redis-server.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use greyhook_tests::*;

/// A `greyhook serve` on its own policy port, on the shared Redis.
fn daemon(dir: &Path, name: &str, redis: &RedisServer, sets: &[&str]) -> (Process, u16) {
    daemon_with(dir, name, &redis.url(), sets, "250ms")
}

/// The same on the store at `url`, with another store timeout.
fn daemon_with(dir: &Path, name: &str, url: &str, sets: &[&str], store_timeout: &str) -> (Process, u16) {
    daemon_store(dir, name, url, sets, &format!("timeout = \"{store_timeout}\"\n"))
}

/// The same with these lines in its `[store]` table.
fn daemon_store(dir: &Path, name: &str, url: &str, sets: &[&str], store_lines: &str) -> (Process, u16) {
    let port = free_port();
    let control = dir.join(format!("{name}.sock"));
    let cfg = dir.join(format!("{name}.toml"));
    // The hook's deadline bounds its store calls too: keep it above them.
    std::fs::write(&cfg, format!("[store]\n{store_lines}[filter]\ndeadline = \"20s\"\n")).unwrap();
    let mut args = vec![
        "serve".to_string(),
        "--config".into(),
        cfg.display().to_string(),
        "--policy".into(),
        format!("127.0.0.1:{port}"),
        "--db".into(),
        url.to_string(),
        "--control".into(),
        control.display().to_string(),
    ];
    for s in sets {
        args.push("--set".into());
        args.push(s.to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let p = Process::greyhook(&args, dir.join(format!("{name}.log")));
    wait_for_port(port, 30);
    (p, port)
}

fn ask(port: u16, client: &str, sender: &str, recipient: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = format!(
        "request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address={client}\nsender={sender}\nrecipient={recipient}\ninstance={sender}{recipient}\n\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    line.trim_end().trim_start_matches("action=").to_string()
}

/// Found by the store suite's `get_many` case: on a Redis Cluster, the
/// reference filter's read of its keys in one call (which hash to
/// different slots) failed with CROSSSLOT, so every RCPT was answered by
/// the failure policy (let through) instead of greylisted.
#[test]
fn a_farm_on_a_redis_cluster_greylists_and_passes_the_retry() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = RedisCluster::start();
    let (_d1, mx1) = daemon_with(dir.path(), "mx1", &cluster.url(), &["delay=2", "auto_whitelist_after=2"], "2s");
    let (_d2, mx2) = daemon_with(dir.path(), "mx2", &cluster.url(), &["delay=2", "auto_whitelist_after=2"], "2s");
    let c = "192.0.2.10";
    let first_try = Instant::now();
    for (mx, sender) in [(mx1, "a@example.org"), (mx2, "a@example.org"), (mx1, "b@example.org")] {
        let a = ask(mx, c, sender, "u@example.com");
        assert!(a.starts_with("451 4.7.1 Greylisted, please try again later retry=00:00:0"), "greylisted, not the failure policy: {a}");
    }
    std::thread::sleep(Duration::from_millis(2100));
    let a = ask(mx2, c, "a@example.org", "u@example.com");
    assert!(a.starts_with("PREPEND X-Greylist: delayed "), "mx1's record counts on mx2: {a}");
    assert_delayed(&a, 2, first_try);
    assert!(ask(mx1, c, "b@example.org", "u@example.com").starts_with("PREPEND X-Greylist"));
    // Two passes: the client network is auto-whitelisted, its count kept on the cluster.
    assert_eq!(ask(mx2, c, "new@example.org", "u@example.com"), "DUNNO");
}

/// The `[store]` lines of a daemon on Redis over TLS: trusting `ca`, with
/// the client certificate unless `client` is false.
fn tls_lines(files: &RedisTlsFiles, ca: &Path, client: bool) -> String {
    format!("timeout = \"2s\"\n{}", files.store_lines(ca, client))
}

/// A farm whose MX hosts reach Redis across a network: `rediss://`, the
/// server's certificate checked against the CA named (`tls_ca`) and a client
/// certificate presented (`tls_cert`, `tls_key`: Redis asks for one by
/// default). Before, `rediss://` was refused at start ("the feature is not
/// enabled"), so a farm's triplets (client addresses, mail addresses)
/// crossed the network in clear. A server whose certificate does not chain
/// to the CA, or a daemon with no client certificate, gets no record
/// through: the failure policy answers, and the log says why.
#[test]
fn a_farm_on_redis_over_tls_checks_both_ends() {
    let dir = tempfile::tempdir().unwrap();
    let files = RedisTlsFiles::issue(dir.path());
    let redis = RedisServer::with_tls(&files);
    let url = redis.url();
    assert!(url.starts_with("rediss://"), "{url}");
    let sets = ["delay=2", "auto_whitelist_after=2"];
    let (_d1, mx1) = daemon_store(dir.path(), "mx1", &url, &sets, &tls_lines(&files, &files.ca, true));
    let (_d2, mx2) = daemon_store(dir.path(), "mx2", &url, &sets, &tls_lines(&files, &files.ca, true));
    let c = "192.0.2.10";
    let first_try = Instant::now();
    let a = ask(mx1, c, "a@example.org", "u@example.com");
    assert!(a.starts_with("451 4.7.1 Greylisted, please try again later retry=00:00:0"), "greylisted, not the failure policy: {a}");
    std::thread::sleep(Duration::from_millis(2100));
    let a = ask(mx2, c, "a@example.org", "u@example.com");
    assert!(a.starts_with("PREPEND X-Greylist: delayed "), "mx1's record, over TLS, counts on mx2: {a}");
    assert_delayed(&a, 2, first_try);
    let records = redis.cli(&["DBSIZE"]);
    assert_ne!(records.trim(), "0", "the records are in the TLS server");

    // A server greyhook cannot verify, and a daemon without a client
    // certificate: every call fails, the failure policy (`continue`) answers.
    for (name, lines, why) in
        [("wrong-ca", tls_lines(&files, &files.other_ca, true), "certificate"), ("no-client-cert", tls_lines(&files, &files.ca, false), "")]
    {
        let (d, mx) = daemon_store(dir.path(), name, &url, &sets, &lines);
        assert_eq!(ask(mx, c, "new@example.org", "u@example.com"), "DUNNO", "{name}: the failure policy, nothing written");
        // (The log is written by its own thread: wait for the line.)
        assert!(d.wait_log("redis store: ", 10), "{name}: the log says the store failed: {}", std::fs::read_to_string(&d.log).unwrap());
        let log = std::fs::read_to_string(&d.log).unwrap();
        assert!(log.contains(why), "{name}: the log says why: {log}");
    }
    assert_eq!(redis.cli(&["DBSIZE"]), records, "nothing written by the two: {}", redis.cli(&["KEYS", "*"]));

    // `greyhook db` takes the same files as flags: the farm's records copied
    // off the TLS server into a redb file.
    let copy = dir.path().join("copy.db");
    let out = std::process::Command::new(greyhook_bin())
        .args(["db", "migrate", "--from", &url, "--to"])
        .arg(format!("redb:{}", copy.display()))
        .arg("--tls-ca")
        .arg(&files.ca)
        .arg("--tls-cert")
        .arg(&files.client_cert)
        .arg("--tls-key")
        .arg(&files.client_key)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}{}", String::from_utf8_lossy(&out.stderr));
    assert!(said.starts_with(&format!("copied {} records", records.trim())), "{said}");

    // Settings that cannot work are refused at start, naming what is wrong.
    for (name, store_url, lines, says) in [
        (
            "half",
            url.clone(),
            format!("tls_ca = \"{}\"\ntls_cert = \"{}\"\n", files.ca.display(), files.client_cert.display()),
            "tls_cert and tls_key go together",
        ),
        ("plain", url.replacen("rediss://", "redis://", 1), tls_lines(&files, &files.ca, true), "need a TLS URL"),
        ("not-pem", url.clone(), format!("tls_ca = \"{}\"\n", files.client_key.display()), "holds no PEM certificate"),
        // TLS files with a redb file: the farm meant would be this host's alone.
        ("file", dir.path().join("local.db").display().to_string(), tls_lines(&files, &files.ca, true), "not a redb file"),
    ] {
        let cfg = dir.path().join(format!("{name}.toml"));
        std::fs::write(&cfg, format!("[store]\npath = \"{store_url}\"\n{lines}")).unwrap();
        let out = std::process::Command::new(greyhook_bin())
            .args(["serve", "--policy", "127.0.0.1:0", "--control"])
            .arg(dir.path().join(format!("{name}.sock")))
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{name}: {err}");
    }
}

/// A client certificate renewed in place is used without a restart. Found
/// as an operator with short-lived client certificates meets it (an
/// internal CA that issues them for a day, or a move to a new CA): Redis
/// came to trust only the new certificate, greyhook reconnected with the
/// one it had read at start, was refused, and the failure policy let every
/// message through until someone restarted it.
#[test]
fn a_renewed_redis_client_certificate_is_used_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let files = RedisTlsFiles::issue(dir.path());
    let renewed_dir = dir.path().join("renewed");
    std::fs::create_dir(&renewed_dir).unwrap();
    // The renewed certificate expires in 9 days and a half: warned of.
    let soon = time::OffsetDateTime::now_utc() + time::Duration::hours(9 * 24 + 12);
    let renewed = RedisTlsFiles::issue_with_client_expiry(&renewed_dir, Some(soon));
    let redis = RedisServer::with_tls(&files);
    // The daemon's client certificate and key, replaced by the renewal,
    // and its CA file, which the renewal's first try leaves unreadable.
    let (cert, key, ca) = (dir.path().join("greyhook.pem"), dir.path().join("greyhook.key"), dir.path().join("greyhook-ca.pem"));
    std::fs::copy(&files.client_cert, &cert).unwrap();
    std::fs::copy(&files.client_key, &key).unwrap();
    std::fs::copy(&files.ca, &ca).unwrap();
    let lines =
        format!("timeout = \"2s\"\ntls_ca = \"{}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n", ca.display(), cert.display(), key.display());
    let (d, mx) = daemon_store(dir.path(), "mx", &redis.url(), &["delay=60"], &lines);
    // `greyhook status`'s line for the client certificate in use.
    let status_line = || {
        let out = greyhook_status(&dir.path().join("mx.sock"), false);
        out.lines().find(|l| l.starts_with("certificate redis: ")).map(str::to_string).unwrap_or_else(|| panic!("{out}"))
    };
    let in_use_at_start = status_line();
    assert!(in_use_at_start.contains(" expires 4096-01-01"), "rcgen's default expiry: {in_use_at_start}");
    let c = "192.0.2.10";
    let greylisted = |a: &str| a.starts_with("451 4.7.1 Greylisted");
    let a = ask(mx, c, "a@example.org", "u0@example.com");
    assert!(greylisted(&a), "greylisted, not the failure policy: {a}");

    // The renewal: the new pair written beside the old and renamed over
    // it; Redis trusts only the new CA from now on and drops its clients.
    // First with the CA file holding no certificate: that set does not
    // load, and the certificate in use is still the old one.
    std::fs::write(dir.path().join("garbage.pem"), "not a certificate\n").unwrap();
    replace_file(&dir.path().join("garbage.pem"), &ca);
    replace_file(&renewed.client_cert, &cert);
    replace_file(&renewed.client_key, &key);
    assert_eq!(redis.cli(&["CONFIG", "SET", "tls-ca-cert-file", &renewed.ca.display().to_string()]).trim(), "OK");
    assert_ne!(redis.cli(&["PING"]).trim(), "PONG", "the old client certificate is refused now");
    let renewed_cli = |args: &[&str]| redis.cli_as(&renewed, args);
    assert_eq!(renewed_cli(&["PING"]), "PONG", "the renewed one is let in");
    let records = renewed_cli(&["DBSIZE"]);
    let killed = renewed_cli(&["CLIENT", "KILL", "TYPE", "normal"]);
    assert_ne!(killed, "0", "greyhook's connection dropped");

    let until = Instant::now() + Duration::from_secs(15);
    while !d.log_text().contains("the changed TLS files do not load") {
        let a = ask(mx, c, "a@example.org", "u0@example.com");
        assert!(!greylisted(&a) && Instant::now() < until, "the set without a CA loaded: {a}\n{}", d.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(status_line(), in_use_at_start, "the gauge and status stay on the certificate in use");
    replace_file(&files.ca, &ca);

    // The next calls fail at most for a second (the reconnection with the
    // old certificate is refused), then the renewed files are read.
    let until = Instant::now() + Duration::from_secs(15);
    let mut answers = Vec::new();
    loop {
        let a = ask(mx, c, "a@example.org", &format!("u{}@example.com", answers.len() + 1));
        if greylisted(&a) {
            break;
        }
        answers.push(a);
        assert!(Instant::now() < until, "never greylisted again: {answers:?}\n{}", d.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(answers.len() <= 15, "the failure policy answered for long: {answers:?}");
    assert!(d.wait_log("the TLS files changed; new connections use them", 5), "{}", d.log_text());
    let warning = format!("{}: the certificate expires in 9 day(s); renew it", cert.display());
    assert!(d.wait_log(&warning, 5), "{}", d.log_text());
    assert!(status_line().ends_with(" (9 days left)"), "{}", status_line());
    assert_ne!(renewed_cli(&["DBSIZE"]), records, "written through the renewed certificate");
}

/// A Redis Cluster whose nodes speak TLS only (`rediss+cluster://`): the
/// nodes discovered from the two named are reached over TLS too. The nodes
/// require a password, named once before the nodes
/// (`rediss+cluster://:PASSWORD@H1,H2`): before, the `redis` crate took it
/// as the first node's alone and refused the URL ("Cannot use different
/// password among initial nodes").
#[test]
fn a_farm_on_a_password_protected_redis_cluster_over_tls_greylists_and_passes_the_retry() {
    let dir = tempfile::tempdir().unwrap();
    let files = RedisTlsFiles::issue(dir.path());
    let cluster = RedisCluster::with_tls(&files, Some("cluster/pass"));
    let url = cluster.url();
    assert!(url.starts_with("rediss+cluster://:cluster%2Fpass@"), "{url}");
    let lines = tls_lines(&files, &files.ca, true);
    let (_d1, mx1) = daemon_store(dir.path(), "mx1", &url, &["delay=2"], &lines);
    let (_d2, mx2) = daemon_store(dir.path(), "mx2", &url, &["delay=2"], &lines);
    let c = "192.0.2.10";
    let first_try = Instant::now();
    // Three triplets: their keys fall on different nodes' slots.
    for s in ["a@example.org", "b@example.org", "c@example.org"] {
        let a = ask(mx1, c, s, "u@example.com");
        assert!(a.starts_with("451 4.7.1 Greylisted, please try again later retry=00:00:0"), "greylisted, not the failure policy: {a}");
    }
    std::thread::sleep(Duration::from_millis(2100));
    for s in ["a@example.org", "b@example.org", "c@example.org"] {
        let a = ask(mx2, c, s, "u@example.com");
        assert!(a.starts_with("PREPEND X-Greylist: delayed "), "mx1's record counts on mx2: {a}");
        assert_delayed(&a, 2, first_try);
    }
    assert!(cluster.keys() >= 3, "the records are on the cluster's nodes");
    // Without the password, every call fails and the failure policy
    // answers, the reason logged.
    let bare = url.replacen(":cluster%2Fpass@", "", 1);
    let (d, mx) = daemon_store(dir.path(), "no-password", &bare, &["delay=2"], &lines);
    assert_eq!(ask(mx, c, "new@example.org", "u@example.com"), "DUNNO", "the failure policy");
    assert!(d.wait_log("redis store: ", 10), "the log says the store failed: {}", std::fs::read_to_string(&d.log).unwrap());
    let log = std::fs::read_to_string(&d.log).unwrap();
    assert!(log.contains("NOAUTH") || log.contains("Authentication"), "the log says why: {log}");
}

#[test]
fn a_retry_on_the_other_mx_passes_and_auto_whitelisting_counts_across_both() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start();
    let (_d1, mx1) = daemon(dir.path(), "mx1", &redis, &["delay=2", "auto_whitelist_after=2"]);
    let (_d2, mx2) = daemon(dir.path(), "mx2", &redis, &["delay=2", "auto_whitelist_after=2"]);
    let c = "192.0.2.10";
    // (Records keep whole seconds: a second boundary between two calls
    // makes 2 s left into 1 s, a 2 s wait into 3.)
    let greylisted = |a: String| a.starts_with("451 4.7.1 Greylisted, please try again later retry=00:00:0") && !a.ends_with("00:00:00");
    let first_try = Instant::now();
    let a = ask(mx1, c, "a@example.org", "u@example.com");
    assert!(greylisted(a.clone()) && a.ends_with("retry=00:00:02"), "{a}");
    // The draft: a greylisted client tries the next MX at once; it is greylisted there too.
    let a = ask(mx2, c, "a@example.org", "u@example.com");
    assert!(greylisted(a.clone()), "{a}");
    assert!(greylisted(ask(mx2, c, "b@example.org", "u@example.com")));
    std::thread::sleep(Duration::from_millis(2100));
    let a = ask(mx2, c, "a@example.org", "u@example.com");
    assert!(a.starts_with("PREPEND X-Greylist: delayed "), "mx1's record counts on mx2: {a}");
    assert_delayed(&a, 2, first_try);
    assert!(ask(mx1, c, "b@example.org", "u@example.com").starts_with("PREPEND X-Greylist"), "and mx2's on mx1");
    // Two passes, one on each MX: the client network is auto-whitelisted on both.
    assert_eq!(ask(mx1, c, "new@example.org", "u@example.com"), "DUNNO");
    assert_eq!(ask(mx2, c, "new2@example.org", "u@example.com"), "DUNNO");
    assert_eq!(redis.cli(&["HGET", "greyhook:greylist/awl/192.0.2.0/24", "v"]).trim(), "2");
}

/// Both daemons under `policy-load` on the same triplets at once: every
/// triplet passes for the first time exactly once in the farm, there is one
/// record per triplet, and every first pass is counted once.
#[test]
fn two_daemons_under_load_on_the_same_triplets_lose_no_update() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start();
    let sets = ["delay=0", "auto_whitelist_after=1000000"];
    // A generous store timeout: on a loaded CI machine a write that lands
    // but answers late would be counted as failed (and fail open).
    let (_d1, mx1) = daemon_with(dir.path(), "mx1", &redis.url(), &sets, "10s");
    let (_d2, mx2) = daemon_with(dir.path(), "mx2", &redis.url(), &sets, "10s");
    let triplets = 400;
    let load = |port: u16| {
        std::process::Command::new(policy_load_bin())
            .args(["--target", &format!("127.0.0.1:{port}"), "--connections", "4", "--requests", "400"])
            .args(["--triplets", &triplets.to_string(), "--salt", "farm", "--timeout", "20"])
            .args(["--expect", "PREPEND X-Greylist: delayed 0 seconds by greyhook", "--expect", "DUNNO"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (load(mx1), load(mx2));
    let mut first_passes = 0u64;
    let mut total = 0u64;
    for child in [a, b] {
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success() && text.contains("other=0 errors=0"), "{text}");
        let counts: Vec<u64> = text
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("expect_counts="))
            .map(|v| v.split(',').map(|n| n.parse().unwrap()).collect())
            .unwrap();
        first_passes += counts[0];
        total += counts[0] + counts[1];
    }
    assert_eq!(total, 2 * 4 * 400);
    assert_eq!(first_passes, triplets, "each triplet's first pass happened once in the whole farm");
    let keys = |pattern: &str| {
        redis.cli(&["--scan", "--pattern", pattern]).lines().filter(|l| !l.is_empty()).map(str::to_string).collect::<Vec<_>>()
    };
    assert_eq!(keys("greyhook:greylist/t/*").len() as u64, triplets, "one record per triplet");
    let awl = keys("greyhook:greylist/awl/*");
    let counted: u64 = awl.iter().map(|k| redis.cli(&["HGET", k, "v"]).trim().parse::<u64>().unwrap()).sum();
    assert_eq!(counted, triplets, "every first pass counted once towards auto-whitelisting");
}

#[test]
fn redis_down_fails_open_within_the_timeout_and_greylisting_resumes_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = RedisServer::start();
    let (mut d1, mx1) = daemon(dir.path(), "mx1", &redis, &["delay=300"]);
    let load = std::process::Command::new(policy_load_bin())
        .args(["--target", &format!("127.0.0.1:{mx1}"), "--connections", "2", "--requests", "1000000", "--seconds", "120"])
        .args(["--triplets", "5000", "--timeout", "5"])
        .args(["--expect", "451 4.7.1 Greylisted, please try again later retry=00:0", "--expect", "DUNNO"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(ask(mx1, "192.0.2.20", "a@example.org", "u@example.com").starts_with("451 "));
    redis.kill();
    // Fail open, quickly: the store timeout (250 ms) bounds every call.
    let started = Instant::now();
    assert_eq!(ask(mx1, "192.0.2.21", "b@example.org", "u@example.com"), "DUNNO");
    assert!(started.elapsed() < Duration::from_secs(2), "answered in {:?}", started.elapsed());
    std::thread::sleep(Duration::from_millis(500));
    redis.restart();
    // Greylisting resumes without restarting greyhook: a fresh triplet
    // each try (letters: the filter folds digits in senders together).
    let resumed = |what: &str, d: &Process| {
        let until = Instant::now() + Duration::from_secs(15);
        for i in 0u32.. {
            let fresh: String = format!("{i:x}").bytes().map(|b| (b'a' + b % 32) as char).collect();
            if ask(mx1, "192.0.2.22", &format!("{what}{fresh}@example.org"), "u@example.com").starts_with("451 ") {
                return;
            }
            assert!(Instant::now() < until, "greylisting did not resume after {what}: {}", d.log_text());
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    resumed("killed", &d1);
    // A hung Redis (SIGSTOP: connections stay open, nothing answers) is
    // what the timeout is for: fail open within it, not at once.
    redis.pause(true);
    let started = Instant::now();
    assert_eq!(ask(mx1, "192.0.2.23", "d@example.org", "u@example.com"), "DUNNO");
    let took = started.elapsed();
    redis.pause(false);
    assert!(took >= Duration::from_millis(200) && took < Duration::from_secs(3), "a hung Redis answered in {took:?} (timeout 250 ms)");
    resumed("paused", &d1);
    let _ = std::process::Command::new("kill").args(["-TERM", &load.id().to_string()]).status();
    let out = load.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("other=0 errors=0"), "every reply came, greylist or fail-open: {text}");
    let status = greyhook_status(&dir.path().join("mx1.sock"), false);
    let failures: u64 = status
        .split("store_failures=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("status names store_failures");
    assert!(failures > 0, "the failures were counted: {status}");
    assert!(d1.wait_log("redis store", 10), "and logged");
    assert!(d1.terminate(10));
}

/// `greyhook db migrate`: a redb file to Redis and back, with the records'
/// remaining lifetimes; expired records stay behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn db_migrate_copies_records_with_their_remaining_ttl_both_ways() {
    use greyhook::store::{Condition, Durability, RedbStore, Store};
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let src = dir.path().join("one-host.db");
    {
        let s = RedbStore::open(&src, Durability::Immediate).unwrap();
        for i in 0..1500u64 {
            s.set(&format!("greylist/t/{i:04}"), format!("r{i}").as_bytes(), now + 1000 + i, Condition::Any, now).await.unwrap();
        }
        s.set("greylist/t/old", b"gone", now.saturating_sub(5), Condition::Any, now.saturating_sub(100)).await.unwrap();
    }
    let run = |from: String, to: String| {
        let out = std::process::Command::new(greyhook_bin()).args(["db", "migrate", "--from", &from, "--to", &to]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let url = redis.url();
    let out = tokio::task::spawn_blocking({
        let (src, url) = (src.clone(), url.clone());
        move || run(format!("redb:{}", src.display()), url)
    })
    .await
    .unwrap();
    assert!(out.contains("copied 1500 records"), "{out}");
    assert_eq!(redis.cli(&["HGET", "greyhook:greylist/t/0007", "v"]).trim(), "r7");
    let ttl: u64 = redis.cli(&["TTL", "greyhook:greylist/t/0007"]).trim().parse().unwrap();
    assert!((1000..=1007).contains(&ttl), "the remaining lifetime: {ttl}");
    assert_eq!(redis.cli(&["EXISTS", "greyhook:greylist/t/old"]).trim(), "0");
    // And back, to a new file.
    let back = dir.path().join("back.db");
    let out = tokio::task::spawn_blocking({
        let back = back.clone();
        move || run(url, format!("redb:{}", back.display()))
    })
    .await
    .unwrap();
    assert!(out.contains("copied 1500 records"), "{out}");
    let s = RedbStore::open(&back, Durability::Immediate).unwrap();
    let e = s.get("greylist/t/1499", now).await.unwrap().unwrap();
    assert_eq!((e.value.as_slice(), e.expires_at), (&b"r1499"[..], now + 2499));
}

/// Redis Sentinel: greyhook asks the sentinel for the master, and when the
/// master dies and the sentinel promotes the replica, greyhook follows
/// without a restart; records written before the failover are still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_is_followed_without_a_restart() {
    sentinel_failover(None).await;
}

/// The same hardened: the master, its replica and the sentinel speak TLS
/// only, with client certificates, and the servers require a password
/// (`requirepass`) and keep greyhook's records in database 3:
/// `rediss+sentinel://:PASSWORD@HOST:PORT/mymaster/3`, the sentinel and the
/// masters it names reached over TLS with the `tls_*` files, the master
/// with the URL's password and database. Before, the URL's password went
/// to the first sentinel only and the database number was refused. The
/// sentinel requires a password of its own too (`sentinel_password`),
/// which greyhook could not give before: every call failed and the
/// failure policy let mail through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_over_tls_with_a_password_failover_is_followed_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    sentinel_failover(Some(RedisTlsFiles::issue(dir.path()))).await;
}

/// A failover through a sentinel; with `tls`, the hardened deployment.
async fn sentinel_failover(tls: Option<RedisTlsFiles>) {
    use greyhook::store::{Condition, RedisConfig, RedisStore, RedisTls, SentinelAuth, Store, WriteOutcome};
    const PASSWORD: &str = "s3cret/for-the-farm";
    const SENTINEL_PASSWORD: &str = "the sentinel's own";
    let hardened = tls.is_some();
    let auth: &[&str] = if hardened { &["--requirepass", PASSWORD, "--masterauth", PASSWORD] } else { &[] };
    let mut master = match &tls {
        Some(t) => RedisServer::with_tls_args(t, auth),
        None => RedisServer::start(),
    };
    let replica_of = master.port.to_string();
    let mut replica_args = vec!["--replicaof", "127.0.0.1", &replica_of];
    replica_args.extend(auth);
    let replica = match &tls {
        Some(t) => RedisServer::with_tls_args(t, &replica_args),
        None => RedisServer::with_args(&replica_args),
    };
    let sentinel = Sentinel::start_with_auth(&master, hardened.then_some(PASSWORD), hardened.then_some(SENTINEL_PASSWORD));
    // redis-cli's arguments for the data: the password and the database.
    let data: &[&str] = if hardened { &["--no-auth-warning", "-a", PASSWORD, "-n", "3"] } else { &[] };
    let cli = |server: &RedisServer, args: &[&str]| server.cli(&[data, args].concat());
    let url = match hardened {
        // The password percent-encoded, as in any Redis URL.
        true => format!("rediss+sentinel://:s3cret%2Ffor-the-farm@127.0.0.1:{}/mymaster/3", sentinel.port),
        false => format!("redis+sentinel://127.0.0.1:{}/mymaster", sentinel.port),
    };
    let files =
        tls.as_ref().map(|t| RedisTls { ca: Some(t.ca.clone()), cert: Some(t.client_cert.clone()), key: Some(t.client_key.clone()) });
    let sentinel_auth = SentinelAuth { user: None, password: hardened.then(|| SENTINEL_PASSWORD.to_string()) };
    let config =
        RedisConfig { timeout: std::time::Duration::from_secs(2), tls: files.unwrap_or_default(), sentinel_auth, ..RedisConfig::new(&url) };
    let store = RedisStore::open(config).unwrap();
    // The sentinel may take a moment to answer for its master after start
    // (longer on a loaded machine): retry the first write, bounded.
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        // `Any`: a retried write whose first try landed still succeeds.
        match store.set("before", b"1", T0 + 3600, Condition::Any, T0).await {
            Ok(w) => {
                assert!(matches!(w, WriteOutcome::Written(_)), "{w:?}");
                break;
            }
            Err(e) => {
                assert!(Instant::now() < until, "the first write through the sentinel failed: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    if let Some(t) = &tls {
        sentinel_password_checked(t, &url, &sentinel);
    }
    // Make sure the replica has it before the master dies. Its first sync
    // can take longer than one WAIT on a loaded machine (CI once saw "0"
    // after 5 s): asked again, bounded at 30 s in all.
    let until = Instant::now() + Duration::from_secs(30);
    let mut acked = cli(&master, &["WAIT", "1", "5000"]);
    while acked.trim() != "1" && Instant::now() < until {
        acked = cli(&master, &["WAIT", "1", "5000"]);
    }
    assert_eq!(acked.trim(), "1", "the replica never acknowledged the write");
    master.kill();
    let until = Instant::now() + Duration::from_secs(30);
    while sentinel.master_port() != Some(replica.port) {
        assert!(Instant::now() < until, "the sentinel did not fail over");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        match store.get("before", T0).await {
            Ok(e) => {
                assert_eq!(e.map(|e| e.value), Some(b"1".to_vec()), "written before the failover");
                break;
            }
            Err(e) => {
                assert!(Instant::now() < until, "greyhook did not follow the failover: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    assert!(matches!(store.set("after", b"2", T0 + 3600, Condition::Absent, T0).await.unwrap(), WriteOutcome::Written(_)));
    assert_eq!(cli(&replica, &["HGET", "greyhook:after", "v"]).trim(), "2", "written to the promoted replica");
    if hardened {
        let ours = cli(&replica, &["KEYS", "greyhook:*"]);
        assert_eq!(ours.lines().count(), 2, "both records in database 3: {ours}");
        let db0 = replica.cli(&["--no-auth-warning", "-a", PASSWORD, "DBSIZE"]);
        assert_eq!(db0.trim(), "0", "nothing in database 0");
    }
    assert!(store.failures() > 0, "the outage was counted");
}

/// Through a sentinel that requires its own password: a daemon given it
/// (`[store] sentinel_password`) greylists; one without it and one with a
/// wrong one answer with the failure policy and log the sentinel's reason;
/// `greyhook db` takes it from `$GREYHOOK_SENTINEL_PASSWORD`. Under their
/// own prefix: the daemons' sweeps, on the real clock, would remove the
/// records the test wrote at its fixed time.
fn sentinel_password_checked(t: &RedisTlsFiles, url: &str, sentinel: &Sentinel) {
    let dir = tempfile::tempdir().unwrap();
    let tls = format!("prefix = \"check:\"\n{}", t.store_lines(&t.ca, true));
    let c = "192.0.2.10";
    for (name, lines, answer, why) in [
        ("given", format!("sentinel_password = \"the sentinel's own\"\n{tls}"), "451 4.7.1 Greylisted", ""),
        // The ACL's `default` user is the one `requirepass` sets.
        ("user", format!("sentinel_user = \"default\"\nsentinel_password = \"the sentinel's own\"\n{tls}"), "451 4.7.1 Greylisted", ""),
        ("missing", tls.clone(), "DUNNO", "NOAUTH"),
        ("wrong", format!("sentinel_password = \"not it\"\n{tls}"), "DUNNO", "Password authentication failed"),
    ] {
        let (d, mx) = daemon_store(dir.path(), name, url, &["delay=2"], &format!("timeout = \"2s\"\n{lines}"));
        let a = ask(mx, c, &format!("{name}@example.org"), "u@example.com");
        assert!(a.starts_with(answer), "{name}: {a}: {}", std::fs::read_to_string(&d.log).unwrap());
        if !why.is_empty() {
            assert!(d.wait_log("redis store: ", 10), "{name}: the log says the store failed: {}", std::fs::read_to_string(&d.log).unwrap());
            let log = std::fs::read_to_string(&d.log).unwrap();
            assert!(log.contains(why), "{name}: the log says why: {log}");
        }
    }
    let db = |password: Option<&str>| {
        let mut cmd = std::process::Command::new(greyhook_bin());
        cmd.args(["db", "list", "--prefix", "check:", "--db", url]).arg("--tls-ca").arg(&t.ca).arg("--tls-cert").arg(&t.client_cert);
        cmd.arg("--tls-key").arg(&t.client_key).env_remove("GREYHOOK_SENTINEL_PASSWORD");
        if let Some(p) = password {
            cmd.env("GREYHOOK_SENTINEL_PASSWORD", p);
        }
        let out = cmd.output().unwrap();
        (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    };
    let (ok, said) = db(Some("the sentinel's own"));
    assert!(ok && said.contains("given@example.org") && said.contains("user@example.org"), "{said}");
    assert!(!said.contains("missing@") && !said.contains("wrong@"), "nothing written by the failing two: {said}");
    let (ok, said) = db(None);
    assert!(!ok && said.contains("NOAUTH"), "{said}");
    assert!(!said.contains("s3cret"), "the master's password is not shown: {said}");
    // The credentials with a store that has no sentinels are refused.
    let (ok, said) = {
        let out = std::process::Command::new(greyhook_bin())
            .args(["db", "list", "--db", "memory"])
            .env("GREYHOOK_SENTINEL_PASSWORD", "x")
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    assert!(!ok && said.contains("are for a redis+sentinel:// store"), "{said}");
    assert!(sentinel.master_port().is_some(), "the sentinel still answers");
}
