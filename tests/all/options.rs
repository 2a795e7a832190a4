//! Documented options and defaults (README.md, docs/configuration.md),
//! each through the running `greyhook` binary: a test here fails when the
//! behaviour an operator reads about breaks.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use greyhook_tests::*;

/// Runs `greyhook ARGS` with `env` to its end (at most 20 s): (success, stderr).
fn run_to_end(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut cmd = Command::new(greyhook_bin());
    // The run's shared cache (not /var/cache/greyhook when root); `env` may name another.
    cmd.args(args).stdout(Stdio::null()).stderr(Stdio::piped()).env("CACHE_DIRECTORY", TEST_CACHE);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("greyhook runs");
    let until = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > until {
            let _ = child.kill();
            panic!("greyhook {args:?} did not end");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child.stderr.take().expect("stderr").read_to_string(&mut err).expect("stderr");
    (status.success(), err)
}

/// Starts `greyhook ARGS` with `env` (not `GREYHOOK_LOG` unless given),
/// stderr to `dir/log`.
fn spawn_with_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Process {
    let log = dir.join("log");
    let mut cmd = Command::new(greyhook_bin());
    cmd.args(args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .env_remove("GREYHOOK_LOG")
        // The run's shared cache (not /var/cache/greyhook when root); `env` may name another.
        .env("CACHE_DIRECTORY", TEST_CACHE);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Process { child: cmd.spawn().expect("greyhook starts"), log }
}

fn ask(port: u16, sender: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    policy_rcpt(&mut s, "192.0.2.1", sender, "u@example.com", "i").trim_end().to_string()
}

/// Where the store and the control socket go by default (systemd's
/// `STATE_DIRECTORY` and `RUNTIME_DIRECTORY`; the cache is not beside the
/// store, whatever `CACHE_DIRECTORY` says or not), the
/// control socket's mode 0600, and `greyhook status` finding it there.
#[test]
fn default_paths_follow_systemd_directories() {
    let dir = tempfile::tempdir().unwrap();
    let (state, run) = (dir.path().join("state"), dir.path().join("run"));
    std::fs::create_dir_all(&state).unwrap();
    std::fs::create_dir_all(&run).unwrap();
    let port = free_port();
    let env = [("STATE_DIRECTORY", state.to_str().unwrap()), ("RUNTIME_DIRECTORY", run.to_str().unwrap()), ("GREYHOOK_LOG", "info")];
    let mut d = spawn_with_env(dir.path(), &["serve", "--policy", &format!("127.0.0.1:{port}")], &env);
    wait_for_port(port, 30);
    assert!(ask(port, "a@example.org").starts_with("action=451 4.7.1"));
    assert!(state.join("greyhook.db").is_file(), "the default store is $STATE_DIRECTORY/greyhook.db");
    assert!(!state.join("cache").exists(), "compiled filters are not cached beside the store");
    let sock = run.join("control.sock");
    let mode = std::fs::metadata(&sock).expect("the control socket is $RUNTIME_DIRECTORY/control.sock").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "control socket mode {:o}", mode & 0o777);
    let out = Command::new(greyhook_bin()).arg("status").env("RUNTIME_DIRECTORY", &run).output().unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("\nfilter greylist 0.1.0 "), "{out:?}");
    let db = state.join("greyhook.db").display().to_string();
    assert!(d.wait_log(&db, 10), "the startup log says where the store is:\n{}", d.log_text());
    assert!(d.terminate(10));
    assert!(!sock.exists(), "the daemon removes its control socket on exit");
}

/// systemd's `CacheDirectory=` (`$CACHE_DIRECTORY`) is where compiled
/// filters go, for the embedded store too: not beside the store file, where
/// tens of megabytes of machine code would join the state to back up.
#[test]
fn compiled_filters_go_to_the_systemd_cache_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (state, cache) = (dir.path().join("state"), dir.path().join("cache-dir"));
    std::fs::create_dir_all(&state).unwrap();
    let port = free_port();
    let env = [("STATE_DIRECTORY", state.to_str().unwrap()), ("CACHE_DIRECTORY", cache.to_str().unwrap())];
    let args = ["serve", "--policy", &format!("127.0.0.1:{port}"), "--control", &format!("{}/control.sock", dir.path().display())];
    let mut d = spawn_with_env(dir.path(), &args, &env);
    wait_for_port(port, 30);
    assert!(state.join("greyhook.db").is_file(), "the store is still $STATE_DIRECTORY/greyhook.db");
    let cached = std::fs::read_dir(cache.join("filters")).map(|r| r.count()).unwrap_or(0);
    assert!(cached >= 1, "compiled filters are cached in $CACHE_DIRECTORY/filters");
    assert!(!state.join("cache").exists(), "nothing is cached beside the store");
    assert!(d.terminate(10));
}

/// A daemon run by a user, with no service manager: its store under
/// `~/.local/state`, its compiled filters under `~/.cache` (or
/// `$XDG_CACHE_HOME`), named in the startup log. As root, greyhook is run
/// as `nobody` (setpriv), which may not write `/var/cache/greyhook`.
#[test]
fn a_user_daemon_keeps_compiled_filters_in_its_cache_home() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    // A copy of the binary nobody can run wherever the checkout is.
    let bin = dir.path().join("greyhook");
    std::fs::copy(greyhook_bin(), &bin).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let root = running_as_root();
    if root {
        std::os::unix::fs::chown(&home, Some(65534), Some(65534)).unwrap();
    }
    for xdg in [None, Some(home.join("xdg-cache"))] {
        let port = free_port();
        let log = dir.path().join("log");
        let mut cmd = if root {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]).arg(&bin);
            c
        } else {
            Command::new(&bin)
        };
        let control = format!("{}/control.sock", home.display());
        cmd.args(["serve", "--policy", &format!("127.0.0.1:{port}"), "--control", &control, "--dns", null_dns()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .env("HOME", &home)
            .env("GREYHOOK_LOG", "info");
        for k in ["CACHE_DIRECTORY", "STATE_DIRECTORY", "RUNTIME_DIRECTORY", "XDG_STATE_HOME", "XDG_CACHE_HOME", "XDG_RUNTIME_DIR"] {
            cmd.env_remove(k);
        }
        if let Some(x) = &xdg {
            cmd.env("XDG_CACHE_HOME", x);
        }
        let mut d = Process { child: cmd.spawn().expect("greyhook starts"), log };
        wait_for_port(port, 30);
        assert!(ask(port, "a@example.org").starts_with("action=451 4.7.1"), "{}", d.log_text());
        let cache = xdg.clone().unwrap_or_else(|| home.join(".cache")).join("greyhook/filters");
        let cached = std::fs::read_dir(&cache).map(|r| r.flatten().filter(|e| e.path().extension().is_some_and(|x| x == "cwasm")).count());
        assert_eq!(cached.unwrap_or(0), 1, "the compiled filter is in {}:\n{}", cache.display(), d.log_text());
        assert!(d.wait_log(&format!("compiled filters: {}", cache.display()), 10), "{}", d.log_text());
        let state = home.join(".local/state/greyhook");
        assert!(state.join("greyhook.db").is_file(), "the store is ~/.local/state/greyhook/greyhook.db");
        assert!(!state.join("cache").exists(), "nothing is cached beside the store");
        assert!(d.terminate(10));
    }
}

/// `cache_dir` names where compiled filters are kept.
#[test]
fn cache_dir_is_where_compiled_filters_go() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("mycache");
    let port = free_port();
    let text = format!(
        "[control]\nsocket = \"{d}/control.sock\"\n[store]\npath = \"memory\"\n[policy]\nlisten = [\"127.0.0.1:{port}\"]\n\
         [filter]\ncache_dir = \"{c}\"\n",
        d = dir.path().display(),
        c = cache.display()
    );
    let mut d = greyhook_with(dir.path(), "serve", &text);
    wait_for_port(port, 30);
    let n = std::fs::read_dir(&cache).map(|r| r.count()).unwrap_or(0);
    assert!(n >= 1, "nothing cached in {}", cache.display());
    assert!(d.terminate(10));
}

/// `log.level`, the `--log` flag over it and the `GREYHOOK_LOG` variable
/// over both: at `warn` no decision lines, at `info` one per decision.
#[test]
fn log_level_and_its_overrides() {
    for (level, flag, env, decisions) in [
        ("warn", None, None, false),
        ("warn", None, Some("info"), true),
        ("info", None, None, true),
        ("info", None, Some("error"), false),
        ("info", Some("warn"), None, false),
        ("warn", Some("info"), None, true),
        ("info", Some("warn"), Some("info"), true),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let text = format!(
            "[control]\nsocket = \"{d}/control.sock\"\n[store]\npath = \"memory\"\n[policy]\nlisten = [\"127.0.0.1:{port}\"]\n\
             [log]\nlevel = \"{level}\"\n",
            d = dir.path().display()
        );
        std::fs::write(dir.path().join("g.toml"), text).unwrap();
        let cfg = dir.path().join("g.toml");
        let env: Vec<(&str, &str)> = env.map(|e| ("GREYHOOK_LOG", e)).into_iter().collect();
        let mut args = vec!["serve", "--config", cfg.to_str().unwrap()];
        if let Some(f) = flag {
            args.extend(["--log", f]);
        }
        let mut d = spawn_with_env(dir.path(), &args, &env);
        wait_for_port(port, 30);
        assert!(ask(port, "a@example.org").starts_with("action=451"));
        if decisions {
            assert!(d.wait_log("action=greylist", 5), "level {level}, --log {flag:?}, GREYHOOK_LOG {env:?}:\n{}", d.log_text());
        } else {
            // The decision line is written before the answer; give a
            // buffered writer a moment anyway.
            std::thread::sleep(Duration::from_millis(200));
            let log = d.log_text();
            assert!(!log.contains("action=greylist"), "level {level}, --log {flag:?}, GREYHOOK_LOG {env:?}:\n{log}");
        }
        assert!(d.terminate(10));
    }
}

/// Store settings: an unknown URL scheme and a Redis `timeout` out of its
/// range are refused at start; `prefix` is where greyhook's keys go.
#[test]
fn store_settings_are_checked_and_the_prefix_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("c.sock");
    let (ok, err) = run_to_end(&["serve", "--db", "foo://x", "--control", c.to_str().unwrap()], &[]);
    assert!(!ok && err.contains("foo://x") && err.contains("redis://"), "{err}");
    let redis = RedisServer::start();
    for t in ["0s", "31s"] {
        let cfg = dir.path().join("t.toml");
        std::fs::write(&cfg, format!("[store]\npath = \"{}\"\ntimeout = \"{t}\"\n[control]\nsocket = \"{}\"\n", redis.url(), c.display()))
            .unwrap();
        let (ok, err) = run_to_end(&["serve", "--config", cfg.to_str().unwrap()], &[]);
        assert!(!ok && err.contains("store.timeout"), "timeout {t}: {err}");
    }
    let port = free_port();
    let text = format!(
        "[control]\nsocket = \"{}\"\n[store]\npath = \"{}\"\nprefix = \"mx7:\"\n[policy]\nlisten = [\"127.0.0.1:{port}\"]\n",
        c.display(),
        redis.url()
    );
    let mut d = greyhook_with(dir.path(), "serve", &text);
    wait_for_port(port, 30);
    assert!(ask(port, "a@example.org").starts_with("action=451"));
    let keys = redis.cli(&["--scan", "--pattern", "*"]);
    assert!(keys.lines().any(|k| k.starts_with("mx7:greylist/")), "{keys}");
    assert!(!keys.lines().any(|k| k.starts_with("greyhook:")), "{keys}");
    assert!(d.terminate(10));
}

/// The policy listener on IPv6 loopback, and a unix socket with the
/// documented owner, group and mode.
#[test]
fn policy_listens_on_ipv6_and_unix_sockets_with_owner_group_and_mode() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let sock = dir.path().join("policy.sock");
    // Root runs the tests in CI; the `postfix` group comes with Postfix.
    let postfix_gid = std::fs::read_to_string("/etc/group")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("postfix:").and_then(|r| r.split(':').nth(1)).and_then(|g| g.parse::<u32>().ok()))
        .expect("a postfix group (.ci/run installs Postfix)");
    let text = format!(
        "[control]\nsocket = \"{d}/control.sock\"\n[store]\npath = \"memory\"\n\
         [policy]\nlisten = [\"[::1]:{port}\", \"unix:{s}\"]\nsocket_mode = \"0640\"\nsocket_group = \"postfix\"\n",
        d = dir.path().display(),
        s = sock.display()
    );
    let mut d = greyhook_with(dir.path(), "serve", &text);
    let until = Instant::now() + Duration::from_secs(30);
    let mut s = loop {
        match std::net::TcpStream::connect(("::1", port)) {
            Ok(s) => break s,
            Err(_) if Instant::now() < until => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("nothing on [::1]:{port}: {e}\n{}", d.log_text()),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let a = policy_rcpt(&mut s, "2001:db8::1", "a@example.org", "u@example.com", "i");
    assert!(a.starts_with("action=451 4.7.1"), "{a}");
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o640);
    assert_eq!(meta.gid(), postfix_gid, "socket_group");
    let mut u = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    u.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    u.write_all(
        b"request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=192.0.2.9\nsender=b@example.org\nrecipient=u@example.com\n\n",
    )
    .unwrap();
    let mut buf = [0u8; 256];
    let n = u.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("action=451 4.7.1"));
    assert!(d.terminate(10));
}

/// `max_connections` on the policy and milter listeners: past it a new
/// peer waits (Postfix queues on its side) and is served once a slot frees.
#[test]
fn policy_and_milter_hold_new_peers_at_max_connections() {
    let dir = tempfile::tempdir().unwrap();
    let (pport, mport) = (free_port(), free_port());
    let text = format!(
        "[control]\nsocket = \"{d}/control.sock\"\n[store]\npath = \"memory\"\n\
         [policy]\nlisten = [\"127.0.0.1:{pport}\"]\nmax_connections = 2\n\
         [milter]\nlisten = [\"127.0.0.1:{mport}\"]\nmax_connections = 2\n",
        d = dir.path().display()
    );
    let mut d = greyhook_with(dir.path(), "serve", &text);
    wait_for_port(pport, 30);
    wait_for_port(mport, 30);
    let req =
        b"request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=192.0.2.1\nsender=a@example.org\nrecipient=u@example.com\n\n";
    let mut held: Vec<std::net::TcpStream> = (0..2)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", pport)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(req).unwrap();
            let mut b = [0u8; 256];
            assert!(s.read(&mut b).unwrap() > 0, "the first two are served");
            s
        })
        .collect();
    let mut third = std::net::TcpStream::connect(("127.0.0.1", pport)).unwrap();
    third.write_all(req).unwrap();
    third.set_read_timeout(Some(Duration::from_millis(700))).unwrap();
    let mut b = [0u8; 256];
    let e = third.read(&mut b).expect_err("a third policy peer is not served while two are connected");
    assert!(matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut), "{e}");
    held.pop();
    third.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert!(third.read(&mut b).unwrap() > 0, "served once a slot is free");

    let optneg = milter_optneg(0);
    let mut mheld: Vec<std::net::TcpStream> = (0..2)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", mport)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(&optneg).unwrap();
            let mut b = [0u8; 64];
            assert!(s.read(&mut b).unwrap() > 0);
            s
        })
        .collect();
    let mut m3 = std::net::TcpStream::connect(("127.0.0.1", mport)).unwrap();
    m3.write_all(&optneg).unwrap();
    m3.set_read_timeout(Some(Duration::from_millis(700))).unwrap();
    assert!(m3.read(&mut b).is_err(), "a third milter peer waits");
    mheld.pop();
    m3.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert!(m3.read(&mut b).unwrap() > 0, "and is served once a slot is free");
    assert!(d.terminate(10));
}

/// The milter's `max_packet`: a packet over it closes the connection; one
/// under it is read.
#[test]
fn milter_max_packet_is_the_configured_one() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let text = format!(
        "[control]\nsocket = \"{d}/control.sock\"\n[store]\npath = \"memory\"\n[policy]\nlisten = []\n\
         [milter]\nlisten = [\"127.0.0.1:{port}\"]\nmax_packet = 2048\n",
        d = dir.path().display()
    );
    let mut d = greyhook_with(dir.path(), "serve", &text);
    wait_for_port(port, 30);
    for (size, served) in [(1500usize, true), (4000, false)] {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&milter_optneg(0)).unwrap();
        let mut len = [0u8; 4];
        s.read_exact(&mut len).unwrap();
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut body).unwrap();
        let mut helo = vec![b'h'; size];
        helo.push(0);
        s.write_all(&milter_packet(b'H', &helo)).unwrap();
        let got = s.read(&mut len);
        if served {
            assert_eq!(got.unwrap(), 4, "a {size}-byte packet is answered");
        } else {
            assert!(matches!(got, Ok(0)) || got.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset), "{got:?}");
            assert!(closed_within(&mut s, 5), "a {size}-byte packet closes the connection");
        }
    }
    assert!(d.terminate(10));
}

/// `[smtp]` settings through `greyhook smtp`: the configured `max_line`,
/// `max_recipients` and `max_message_size` (announced with SIZE and not),
/// `command_timeout`, `data_timeout`, `next_hop_timeout`, the default
/// hostname, `next_hop` required, and `--lmtp` on the command line.
#[test]
fn smtp_settings_are_the_configured_ones() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start();
    // A next hop that accepts connections and never greets.
    let mute = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mute_port = mute.local_addr().unwrap().port();
    let start = |hop: u16, extra: &str| {
        let port = free_port();
        let sub = tempfile::tempdir().unwrap().keep();
        let text = format!(
            "[control]\nsocket = \"{d}/control.sock\"\n[store]\npath = \"memory\"\n\
             [smtp]\nlisten = [\"127.0.0.1:{port}\"]\nnext_hop = \"127.0.0.1:{hop}\"\n{extra}\n\
             [filter.config]\nwhitelist_clients = [\"127.0.0.0/8\"]\n",
            d = sub.display()
        );
        let p = greyhook_with(&sub, "smtp", &text);
        wait_for_port(port, 30);
        (p, port)
    };
    let (_d, port) =
        start(sink.port, "max_line = 600\nmax_recipients = 2\nmax_message_size = 2048\ncommand_timeout = \"1s\"\ndata_timeout = \"1s\"");
    let mut c = Raw::connect(port);
    let greeting = c.reply();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert!(greeting.starts_with(&format!("220 {} ", host.trim())), "the default hostname is the system's: {greeting}");
    assert!(c.send(&format!("NOOP {}", "x".repeat(580))).starts_with("250"), "590 bytes fit max_line 600");
    assert_eq!(c.send(&format!("NOOP {}", "x".repeat(600))), "500 5.5.2 Line too long\r\n");
    let ehlo = c.send("EHLO client.example.org");
    assert!(ehlo.contains("250-SIZE 2048\r\n") || ehlo.contains("250 SIZE 2048\r\n"), "{ehlo}");
    assert!(c.send("MAIL FROM:<a@example.org> SIZE=4096").starts_with("552 5.3.4"));
    assert!(c.send("MAIL FROM:<a@example.org>").starts_with("250"));
    assert!(c.send("RCPT TO:<u1@example.com>").starts_with("250"));
    assert!(c.send("RCPT TO:<u2@example.com>").starts_with("250"));
    assert_eq!(c.send("RCPT TO:<u3@example.com>"), "452 4.5.3 Too many recipients\r\n");
    assert!(c.send("DATA").starts_with("354"));
    // Over the size without SIZE: read to its end, then refused.
    let big = format!("Subject: big\r\n\r\n{}\r\n.", "y".repeat(70).repeat(40).as_str().replace("yy", "y\r\n"));
    assert!(big.len() > 2048);
    assert!(c.send(&big).starts_with("552 5.3.4"), "oversize without SIZE");
    assert!(sink.received().is_empty());
    // command_timeout: silence after a command gets 421 and a close.
    let t = Instant::now();
    assert_eq!(c.reply(), "421 4.4.2 Timeout exceeded, closing\r\n");
    assert!(t.elapsed() >= Duration::from_millis(800), "{:?}", t.elapsed());
    assert!(c.closed());
    // data_timeout: silence inside DATA.
    let mut c = Raw::at_data(port, &["u@example.com"]);
    c.w.write_all(b"Subject: slow\r\n").unwrap();
    let t = Instant::now();
    assert!(c.reply().starts_with("421 4.4.2"));
    assert!(t.elapsed() >= Duration::from_millis(800) && t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

    // next_hop_timeout: a next hop that never greets.
    let (_m, mport) = start(mute_port, "next_hop_timeout = \"1s\"");
    let mut c = Raw::connect(mport);
    c.reply();
    c.send("EHLO client.example.org");
    c.send("MAIL FROM:<a@example.org>");
    let t = Instant::now();
    assert_eq!(c.send("RCPT TO:<u@example.com>"), "451 4.4.1 Next hop unavailable, try again later\r\n");
    assert!(t.elapsed() >= Duration::from_millis(800) && t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    drop(mute);

    // next_hop is required.
    let c2 = dir.path().join("c2.sock");
    let (ok, err) = run_to_end(&["smtp", "--listen", "127.0.0.1:0", "--db", "memory", "--control", c2.to_str().unwrap()], &[]);
    assert!(!ok && err.contains("next_hop is required"), "{err}");
    // A unix socket's path must be absolute (relative to what?).
    for (hop, says) in [("unix:greyhook-in", "absolute path"), ("localhost", "HOST:PORT or unix:/path")] {
        let c3 = dir.path().join("c3.sock");
        let args = ["smtp", "--listen", "127.0.0.1:0", "--next-hop", hop, "--db", "memory", "--control", c3.to_str().unwrap()];
        let (ok, err) = run_to_end(&args, &[]);
        assert!(!ok && err.contains(says), "{hop}: {err}");
    }
    // A limit_exceptions entry that is not an address or a network stops the
    // start, with the entry named.
    for bad in ["127.0.0.0/33", "localhost", "10.0.0.0/+8"] {
        let (conf, c4) = (dir.path().join("bad-exceptions.toml"), dir.path().join("c4.sock"));
        std::fs::write(&conf, format!("[smtp]\nlimit_exceptions = [\"{bad}\"]\n")).unwrap();
        let (conf, c4) = (conf.to_str().unwrap(), c4.to_str().unwrap());
        let args = ["smtp", "--config", conf, "--listen", "127.0.0.1:0", "--next-hop", "127.0.0.1:1", "--db", "memory", "--control", c4];
        let (ok, err) = run_to_end(&args, &[]);
        assert!(!ok && err.contains(&format!("invalid network \"{bad}\"")), "{bad}: {err}");
    }

    // --lmtp on the command line: the next hop is spoken to with LHLO and
    // answers per recipient.
    let lmtp = Sink::spawn(vec!["250 2.0.0 Ok: delivered", "452 4.2.2 Mailbox full"]);
    let lport = free_port();
    let cfg = dir.path().join("l.toml");
    std::fs::write(&cfg, "[filter.config]\nwhitelist_clients = [\"127.0.0.0/8\"]\n").unwrap();
    let mut l = Process::greyhook(
        &[
            "smtp",
            "--config",
            cfg.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{lport}"),
            "--next-hop",
            &format!("127.0.0.1:{}", lmtp.port),
            "--lmtp",
            "--db",
            "memory",
            "--control",
            dir.path().join("l.sock").to_str().unwrap(),
        ],
        dir.path().join("l.log"),
    );
    wait_for_port(lport, 30);
    let reply = Raw::at_data(lport, &["u1@example.com", "u2@example.com"]).send("Subject: x\r\n\r\nbody\r\n.");
    assert_eq!(reply, "452 4.2.2 Mailbox full\r\n", "per-recipient LMTP replies: {}", l.log_text());
    assert!(l.terminate(10));
}

/// A chain through `greyhook smtp`: every filter's headers reach the
/// message, and `--filter` and `--set` apply to the last filter (the
/// configuration names a missing file there, and a 300 s delay).
#[test]
fn a_chain_adds_every_filters_headers_and_the_command_line_sets_the_last() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("chaos.wasm"), CHAOS_FILTER).unwrap();
    std::fs::write(d.join("ref.wasm"), greyhook::REFERENCE_FILTER).unwrap();
    let sink = Sink::start();
    let port = free_port();
    let cfg = d.join("g.toml");
    std::fs::write(
        &cfg,
        format!(
            "[control]\nsocket = \"{d}/control.sock\"\n[store]\npath = \"memory\"\n\
             [smtp]\nlisten = [\"127.0.0.1:{port}\"]\nnext_hop = \"127.0.0.1:{hop}\"\n\
             [[filters]]\npath = \"{d}/chaos.wasm\"\nnamespace = \"chaos\"\n\
             [[filters]]\npath = \"{d}/missing.wasm\"\nnamespace = \"greylist\"\n[filters.config]\ndelay = 300\n",
            d = d.display(),
            hop = sink.port
        ),
    )
    .unwrap();
    let mut p = Process::greyhook(
        &["smtp", "--config", cfg.to_str().unwrap(), "--filter", d.join("ref.wasm").to_str().unwrap(), "--set", "delay=1"],
        d.join("log"),
    );
    wait_for_port(port, 30);
    let first_try = Instant::now();
    let mut c = Raw::connect(port);
    c.reply();
    c.send("EHLO client.example.org");
    c.send("MAIL FROM:<a@example.org>");
    assert!(c.send("RCPT TO:<continue@example.com>").ends_with("retry=00:00:01\r\n"), "--set delay=1 reached the last filter");
    std::thread::sleep(Duration::from_millis(1100));
    let mut c = Raw::at_data(port, &["continue@example.com"]);
    assert!(c.send("Subject: x\r\n\r\nbody\r\n.").starts_with("250"));
    let got = sink.received();
    assert_eq!(got.len(), 1, "{}", p.log_text());
    assert!(got[0].contains("X-Chaos: passed on\r\n"), "the first filter's header: {got:?}");
    assert_delayed(&got[0], 1, first_try);
    assert!(p.terminate(10));
}

/// A reload applies the filter tables only: a change to `[policy]` (or any
/// other table the docs say needs a restart) is reported by `greyhook
/// reload` and logged, and the running listener keeps its settings.
#[test]
fn reload_says_which_changes_need_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let text = |max_attributes: u32| {
        format!(
            "[control]\nsocket = \"{d}/control.sock\"\n[store]\npath = \"memory\"\n\
             [policy]\nlisten = [\"127.0.0.1:{port}\"]\nmax_attributes = {max_attributes}\n[filter.config]\ndelay = 300\n",
            d = dir.path().display()
        )
    };
    let mut d = greyhook_with(dir.path(), "serve", &text(100));
    wait_for_port(port, 30);
    let reload = || {
        let out =
            Command::new(greyhook_bin()).args(["reload", "--control", dir.path().join("control.sock").to_str().unwrap()]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(!reload().contains("restart"), "nothing changed");
    std::fs::write(dir.path().join("greyhook.toml"), text(5)).unwrap();
    let out = reload();
    assert!(out.contains("[policy] changed: not applied, that needs a restart"), "{out}");
    assert!(d.wait_log("[policy] changed in the configuration file", 5), "{}", d.log_text());
    // The old limit (100 attributes) still holds: a 10-attribute request is served.
    let a = ask(port, "a@example.org");
    assert!(a.starts_with("action=451"), "{a}");
    assert!(d.terminate(10));
}

/// The files the daemon watches are the configuration file and every
/// filter file, as its startup log lists them: a change to either is
/// applied without a command (no SIGHUP, no `greyhook reload`).
#[test]
fn the_configuration_and_filter_files_are_watched() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_port();
    let filter = d.join("f.wasm");
    std::fs::write(&filter, greyhook::REFERENCE_FILTER).unwrap();
    let text = |delay: u32| {
        format!(
            "[control]\nsocket = \"{d}/control.sock\"\n[store]\npath = \"memory\"\n[policy]\nlisten = [\"127.0.0.1:{port}\"]\n\
             [filter]\npath = \"{f}\"\n[filter.config]\ndelay = {delay}\n",
            d = d.display(),
            f = filter.display()
        )
    };
    let mut p = greyhook_with(d, "serve", &text(300));
    wait_for_port(port, 30);
    assert!(p.wait_log("watching for changes", 10), "{}", p.log_text());
    let log = p.log_text();
    let cfg = d.join("greyhook.toml");
    let line = log.lines().find(|l| l.contains("watching for changes")).unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains(&cfg.display().to_string()) && line.contains(&filter.display().to_string()), "{line}");
    let until = |what: &str, f: &mut dyn FnMut() -> bool| {
        let end = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < end, "{what} was not applied by itself");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    std::fs::write(&cfg, text(120)).unwrap();
    let mut n = 0;
    until("a configuration change", &mut || {
        n += 1;
        ask(port, &format!("c{}@example.org", "x".repeat(n))).ends_with("retry=00:02:00")
    });
    std::fs::write(&filter, CHAOS_FILTER).unwrap();
    until("a filter change", &mut || ask(port, "z@example.org") == "action=PREPEND X-Chaos: ok");
    assert!(p.terminate(10));
}

/// A new version whose smoke call fails (here: every on-ehlo traps) is
/// refused at reload, and the serving version stays; at start, such a
/// filter stops the daemon with the reason.
#[test]
fn a_version_that_fails_its_smoke_call_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_port();
    std::fs::write(d.join("chaos.wasm"), CHAOS_FILTER).unwrap();
    let text = |filter: &str| {
        format!(
            "[control]\nsocket = \"{d}/control.sock\"\n[store]\npath = \"memory\"\n[policy]\nlisten = [\"127.0.0.1:{port}\"]\n{filter}\n",
            d = d.display()
        )
    };
    let mut p = greyhook_with(d, "serve", &text(""));
    wait_for_port(port, 30);
    let bad = format!("[filter]\npath = \"{}/chaos.wasm\"\n[filter.config]\nehlo_panic = true\n", d.display());
    std::fs::write(d.join("greyhook.toml"), text(&bad)).unwrap();
    let out = Command::new(greyhook_bin()).args(["reload", "--control", d.join("control.sock").to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("refused") && err.contains("chaos: panic at ehlo"), "{err}");
    assert!(ask(port, "a@example.org").starts_with("action=451 4.7.1 Greylisted"), "the reference filter still serves");
    assert!(p.terminate(10));
    let (ok, err) = run_to_end(&["serve", "--config", d.join("greyhook.toml").to_str().unwrap()], &[]);
    assert!(!ok && err.contains("chaos: panic at ehlo"), "{err}");
    assert_eq!(err.matches("chaos: panic at ehlo").count(), 1, "the reason once: {err}");
    let (ok, err) =
        run_to_end(&["serve", "--filter", "/nonexistent/f.wasm", "--db", "memory", "--control", d.join("c2.sock").to_str().unwrap()], &[]);
    assert!(!ok && err.matches("No such file").count() == 1 && err.contains("/nonexistent/f.wasm"), "{err}");
}

/// `sweep_interval`: expired records leave the redb file at the interval
/// (five unretried records with a 1 s retry window are gone after the
/// sweep runs; with an hourly sweep they are still in the file).
#[test]
fn sweep_interval_removes_expired_records() {
    for (sweep, left) in [("1s", 0u64), ("1h", 5)] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let db = d.join("g.db");
        let port = free_port();
        let text = format!(
            "[control]\nsocket = \"{d}/control.sock\"\n[store]\npath = \"{db}\"\nsweep_interval = \"{sweep}\"\n\
             [policy]\nlisten = [\"127.0.0.1:{port}\"]\n[filter]\ndeadline = \"5s\"\n\
             [filter.config]\ndelay = 1\nretry_window = \"1s\"\n",
            d = d.display(),
            db = db.display()
        );
        let mut p = greyhook_with(d, "serve", &text);
        wait_for_port(port, 30);
        // A generous deadline: on a loaded 2-core machine the default
        // 100 ms can run out, and the failure policy's DUNNO is not the
        // point here.
        for s in ["a", "b", "c", "d", "e"] {
            let answer = ask(port, &format!("{s}@example.org"));
            assert!(answer.starts_with("action=451"), "{s}: {answer}\n{}", p.log_text());
        }
        std::thread::sleep(Duration::from_millis(3500));
        assert!(p.terminate(10));
        let out = Command::new(greyhook_bin()).args(["db", "check"]).arg(&db).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(text.contains(&format!(" holds {left} records")), "sweep_interval {sweep}: {text}");
    }
}

/// A guard for the rule "every documented option has a test": each key of
/// docs/configuration.md (the annotated file and the reference filter's
/// table) is set by at least one test. It cannot say the test checks the
/// key's effect — review does — but a key documented later without any
/// test fails here.
#[test]
fn every_documented_key_is_set_by_some_test() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let doc = std::fs::read_to_string(root.join("docs/configuration.md")).unwrap();
    let mut keys = std::collections::BTreeSet::new();
    let annotated = doc.split("```toml").nth(1).and_then(|b| b.split("```").next()).expect("the annotated configuration");
    for line in annotated.lines() {
        if let Some((k, _)) = line.split_once(" = ")
            && !k.is_empty()
            && k.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            keys.insert(k.to_string());
        }
    }
    for line in doc.lines().filter(|l| l.starts_with("| `")) {
        if let Some(k) = line.split('`').nth(1).filter(|k| k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')) {
            keys.insert(k.to_string());
        }
    }
    assert!(keys.len() > 60, "the key list was not found: {keys:?}");
    // The tests, and the helpers in tests/lib.rs that write settings for them.
    let mut tests = std::fs::read_to_string(root.join("tests/lib.rs")).unwrap();
    for e in std::fs::read_dir(root.join("tests/all")).unwrap() {
        tests.push_str(&std::fs::read_to_string(e.unwrap().path()).unwrap());
    }
    let set = |k: &str| {
        ["\\n", " ", "\"", "--set\", \""].iter().any(|p| tests.contains(&format!("{p}{k} = ")) || tests.contains(&format!("{p}{k}=")))
    };
    let missing: Vec<&String> = keys.iter().filter(|k| !set(k)).collect();
    assert!(missing.is_empty(), "documented keys no test sets: {missing:?}");
}

/// `ehlo_keyword` and `normalize_sender` through `greyhook smtp`, set on
/// the command line: with `ehlo_keyword=false` EHLO does not advertise
/// GREYLIST; with `normalize_sender=false` VERP senders `bounce-1@` and
/// `bounce-2@` are two triplets (folded into one by default).
#[test]
fn ehlo_keyword_and_normalize_sender_through_the_smtp_front_end() {
    let sink = Sink::start();
    for (sets, advertised, folded) in [(&[][..], true, true), (&["ehlo_keyword=false", "normalize_sender=false"][..], false, false)] {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut args = vec![
            "smtp".to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--next-hop".into(),
            format!("127.0.0.1:{}", sink.port),
            "--db".into(),
            "memory".into(),
            "--control".into(),
            dir.path().join("c.sock").display().to_string(),
            "--set".into(),
            "delay=1".into(),
        ];
        for s in sets {
            args.extend(["--set".to_string(), s.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut p = Process::greyhook(&args, dir.path().join("log"));
        wait_for_port(port, 30);
        let attempt = |sender: &str| {
            let mut c = Raw::connect(port);
            c.reply();
            let ehlo = c.send("EHLO client.example.org");
            c.send(&format!("MAIL FROM:<{sender}>"));
            (ehlo.contains("GREYLIST"), c.send("RCPT TO:<u@example.com>"))
        };
        let (ehlo, first) = attempt("bounce-1@lists.example");
        assert_eq!(ehlo, advertised, "{sets:?}");
        assert!(first.starts_with("451 4.7.1"), "{first}");
        std::thread::sleep(Duration::from_millis(1100));
        let (_, second) = attempt("bounce-2@lists.example");
        assert_eq!(second.starts_with("250"), folded, "{sets:?}: {second}");
        assert!(p.terminate(10));
    }
}

/// A SIGTERM that comes the moment greyhook listens is a clean shutdown
/// (exit 0), not death by the signal's default action: the handlers are
/// installed before the first listener. Found in CI, where a test stopped
/// a daemon just after its first answer and saw it killed.
#[test]
fn sigterm_at_once_after_start_is_a_clean_shutdown() {
    for _ in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let text = format!(
            "[control]\nsocket = \"{d}/control.sock\"\n[store]\npath = \"memory\"\n[policy]\nlisten = [\"127.0.0.1:{port}\"]\n",
            d = dir.path().display()
        );
        let mut d = greyhook_with(dir.path(), "serve", &text);
        let until = Instant::now() + Duration::from_secs(60);
        while !greyhook_tests::listening(port) {
            assert!(Instant::now() < until, "greyhook never listened:\n{}", d.log_text());
            std::thread::sleep(Duration::from_millis(1));
        }
        let pid = d.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let status = loop {
            if let Some(s) = d.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < until, "greyhook did not stop after SIGTERM:\n{}", d.log_text());
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(status.success(), "SIGTERM right after start: {status:?}\n{}", d.log_text());
    }
}

/// Found in review: `greyhook db` put the store's URL as typed in front of
/// an error that could not open it (`cannot open redis://:s3cret@host:
/// …`), and `db migrate` printed both URLs when done: a Redis password on
/// the terminal and in any script's log. Each now shows `redis://***@host`.
#[test]
fn db_commands_never_show_a_redis_password() {
    let run = |args: &[&str]| {
        let out = Command::new(greyhook_bin()).args(args).output().unwrap();
        (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    };
    let (ok, said) = run(&["db", "list", "--db", "redis://:s3cret@127.0.0.1:1/0", "--tls-ca", "/nonexistent"]);
    assert!(!ok && said.contains("redis://***@127.0.0.1:1/0") && said.contains("need a TLS URL"), "{said}");
    assert!(!said.contains("s3cret"), "{said}");
    let (ok, said) = run(&["db", "migrate", "--from", "memory", "--to", "rediss://:s3cret@127.0.0.1:1/0"]);
    assert!(ok && said.contains("copied 0 records from memory to rediss://***@127.0.0.1:1/0"), "{said}");
    assert!(!said.contains("s3cret"), "{said}");
    let (ok, said) =
        run(&["db", "migrate", "--from", "redis+sentinel://:s3cret@127.0.0.1:1/mymaster", "--to", "memory", "--sentinel-user", "u"]);
    assert!(!ok && said.contains("--sentinel-password"), "a user without a password: {said}");
    let (ok, said) = run(&["db", "stats", "--db", "redis://:s3cret@127.0.0.1:1/0", "--sentinel-password", "pw"]);
    assert!(!ok && said.contains("are for a redis+sentinel:// store") && !said.contains("s3cret"), "{said}");
}
