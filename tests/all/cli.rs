//! The `greyhook` command, run as an operator runs it.

use std::process::Command;

use greyhook_tests::*;

fn greyhook(args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(greyhook_bin());
    cmd.args(args);
    if args.first() == Some(&"simulate") {
        // The filter's DNS lookups go to the tests' resolver, not the machine's.
        cmd.args(["--dns", null_dns()]);
    }
    let out = cmd.output().expect("greyhook runs");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn check_prints_name_version_and_imports() {
    let (ok, out, err) = greyhook(&["check"]);
    assert!(ok, "{err}");
    assert!(out.contains("name: greylist") && out.contains("version: 0.1.0"), "{out}");
    assert!(out.contains("contract: greyhook:filter@0.2.3"), "{out}");
    assert!(out.contains("capabilities: store, log"), "{out}");
    // Contracts 0.2.2 and 0.2.3: the hooks it needs no call for at the
    // default stage, and DATA for a transaction with a sender.
    assert!(out.contains("skipped hooks: connect, ehlo, mail, data-with-sender\nehlo keywords: GREYLIST\n"), "{out}");
    assert!(out.contains("greyhook:filter/store@0.2.3") && out.contains("greyhook:filter/log@0.2.3"), "{out}");
    assert!(out.contains("wasi:cli/environment") && out.contains("linked empty"), "{out}");

    // A filter built against 0.1.0 (the chaos filter) loads unchanged.
    let dir = tempfile::tempdir().unwrap();
    let chaos = dir.path().join("chaos.wasm");
    std::fs::write(&chaos, CHAOS_FILTER).unwrap();
    let (ok, out, _) = greyhook(&["check", chaos.to_str().unwrap()]);
    assert!(ok && out.contains("name: chaos"), "{out}");
    assert!(out.contains("contract: greyhook:filter@0.1.0") && out.contains("capabilities: store, log\n"), "{out}");
    assert!(out.contains("skipped hooks: none\n") && !out.contains("ehlo keywords"), "{out}");
    // Greylisting at connect, the reference filter needs that hook, and no DATA.
    let (ok, out, err) = greyhook(&["check", "--set", "stage=\"connect\""]);
    assert!(ok && out.contains("skipped hooks: ehlo, mail, data\n"), "{out}{err}");

    let bad = dir.path().join("bad.wasm");
    std::fs::write(&bad, b"not wasm").unwrap();
    let (ok, _, err) = greyhook(&["check", bad.to_str().unwrap()]);
    assert!(!ok && err.contains("not a WebAssembly file"), "{err}");

    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[filter.config]\ndelay = 300\ncolour = \"grey\"\n").unwrap();
    let (ok, _, err) = greyhook(&["check", "--config", cfg.to_str().unwrap()]);
    assert!(!ok && err.contains("colour"), "{err}");
    let (ok, _, err) = greyhook(&["check", "--set", "delay=soon"]);
    assert!(!ok && err.contains("delay"), "{err}");
    // A host table's bounds are checked as the file is read.
    std::fs::write(&cfg, "[dns]\nmin_negative_ttl = \"2h\"\n").unwrap();
    let (ok, _, err) = greyhook(&["check", "--config", cfg.to_str().unwrap()]);
    assert!(!ok && err.contains("min_negative_ttl must be at most 3600s"), "{err}");
    std::fs::write(&cfg, "[dns]\nmin_negative_ttl = \"1h\"\n").unwrap();
    let (ok, _, err) = greyhook(&["check", "--config", cfg.to_str().unwrap()]);
    assert!(ok, "{err}");
}

#[test]
fn simulate_shows_the_replies_a_client_sees() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("s.txt");
    std::fs::write(
        &script,
        "CONNECT 192.0.2.1\nEHLO mail.example.org\nMAIL FROM:<alice@example.org>\nRCPT TO:<bob@example.com>\nQUIT\n\
         WAIT 1m\nCONNECT 192.0.2.1\nEHLO x\nMAIL FROM:<alice@example.org>\nRCPT TO:<bob@example.com>\nQUIT\n\
         @120 CONNECT 192.0.2.1\nEHLO x\nMAIL FROM:<alice@example.org>\nRCPT TO:<bob@example.com>\nDATA <m@x>\nQUIT\n",
    )
    .unwrap();
    let (ok, out, err) = greyhook(&["simulate", script.to_str().unwrap(), "--set", "delay=2m", "--start", "1700000000"]);
    assert!(ok, "{err}");
    assert!(out.contains("S: 250-GREYLIST"), "{out}");
    assert!(out.contains("S: 451 4.7.1 Greylisted, please try again later retry=00:02:00"), "{out}");
    assert!(out.contains("S: 451 4.7.1 Greylisted, please try again later retry=00:01:00"), "{out}");
    assert!(out.contains("S: 250 2.0.0 Ok: queued") && out.contains("H: X-Greylist: delayed 120 seconds by greyhook"), "{out}");

    let json = dir.path().join("s.json");
    std::fs::write(&json, r#"[{"command":"CONNECT 192.0.2.1"},{"command":"MAIL FROM:<a@x.org>"},{"command":"RCPT TO:<b@y.org>"},{"at":300,"command":"RCPT TO:<b@y.org>"}]"#).unwrap();
    let (ok, out, err) = greyhook(&["simulate", json.to_str().unwrap(), "--start", "1700000000"]);
    assert!(ok, "{err}");
    assert!(out.contains("retry=00:05:00") && out.contains("S: 250 2.1.5 Ok"), "{out}");

    std::fs::write(&script, "MAIL FROM:<a@b>\n").unwrap();
    let (ok, _, err) = greyhook(&["simulate", script.to_str().unwrap()]);
    assert!(!ok && err.contains("line 1"), "{err}");
}

/// Filters' memories reserve 4 GiB of address space each, so the compiled
/// code needs no bounds checks; where `ulimit -v` refuses that, greyhook
/// says so and runs them with explicit checks, with the same answers.
#[test]
fn filters_run_with_bounds_checks_when_address_space_is_limited() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("s.txt");
    std::fs::write(&script, "CONNECT 192.0.2.1\nMAIL FROM:<a@x.org>\nRCPT TO:<b@y.org>\nWAIT 6m\nRCPT TO:<b@y.org>\n").unwrap();
    let run = |limit: Option<&str>| {
        let shell = format!(
            "{} exec \"$0\" simulate \"$1\" --start 1700000000 --dns {}",
            limit.map(|l| format!("ulimit -v {l} &&")).unwrap_or_default(),
            null_dns()
        );
        let out = Command::new("sh").args(["-c", &shell, greyhook_bin().to_str().unwrap(), script.to_str().unwrap()]).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (ok, fast, err) = run(None);
    assert!(ok, "{err}");
    assert!(!err.contains("bounds checks"), "no fallback without a limit: {err}");
    assert!(fast.contains("retry=00:05:00") && fast.contains("S: 250 2.1.5 Ok"), "{fast}");
    // 20 GB: room for every memory's cap, not for 4 GiB each.
    let (ok, slow, err) = run(Some("20000000"));
    assert!(ok, "{err}");
    assert!(err.contains("explicit bounds checks"), "the fallback is logged: {err}");
    assert_eq!(slow, fast);
}

fn greyhook_stdin(args: &[&str], input: &str) -> (Option<i32>, String) {
    use std::io::Write;
    let mut child = Command::new(greyhook_bin())
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("greyhook runs");
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `greyhook hint`: one reply on stdin → the delay, or exit 1; `--log`
/// reads a Postfix log and lists the deferrals.
#[test]
fn hint_reads_replies_and_logs() {
    assert_eq!(greyhook_stdin(&["hint"], "451-4.7.1 Greylisted\r\n451 4.7.1 Come back retry=00:05:00\r\n"), (Some(0), "300\n".into()));
    assert_eq!(greyhook_stdin(&["hint"], "451-You should wait another 187 seconds.\r\n451 Later\r\n"), (Some(0), "187\n".into()));
    assert_eq!(greyhook_stdin(&["hint"], "451 4.7.1 Try again later\r\n"), (Some(1), String::new()));
    assert_eq!(greyhook_stdin(&["hint"], "554 5.4.7 unable to deliver in 840 minutes\r\n"), (Some(1), String::new()));
    let log = "\
Nov 29 21:44:14 mx postfix/smtp[123]: 4BDAC992063: to=<u@example.com>, relay=mx.example.net[192.0.2.1]:25, delay=1.2, delays=0.1/0/0.5/0.6, dsn=4.7.1, status=deferred (host mx.example.net[192.0.2.1] said: 451 4.7.1 Greylisted, please try again later retry=00:05:00 (in reply to RCPT TO command))
Nov 29 21:44:15 mx postfix/smtp[124]: 5CDAC992064: to=<v@example.org>, relay=mx.example.org[192.0.2.2]:25, delay=1.2, delays=0.1/0/0.5/0.6, dsn=4.7.1, status=deferred (host mx.example.org[192.0.2.2] said: 451 4.7.1 Try again later (in reply to RCPT TO command))
Nov 29 21:44:16 mx postfix/smtp[125]: 6DDAC992065: to=<w@example.org>, relay=mx.example.org[192.0.2.2]:25, delay=1, status=sent (250 2.0.0 Ok)
";
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("maillog");
    std::fs::write(&f, log).unwrap();
    let (ok, out, _) = greyhook(&["hint", "--log", f.to_str().unwrap()]);
    assert!(ok);
    assert_eq!(out, "4BDAC992063 300\n5CDAC992064 none\n");
    // A line over 64 KiB is skipped whole, as `report` and `replay` skip
    // it: its tail is no line of its own. Found so: the tail of such a line
    // was read as a line, and a deferral written there was listed.
    let tail = "Nov 29 21:44:17 mx postfix/smtp[126]: 7EEAC992066: to=<x@example.org>, relay=mx.example.org[192.0.2.2]:25, \
                delay=1, dsn=4.7.1, status=deferred (host mx.example.org[192.0.2.2] said: 451 4.7.1 Greylisted retry=00:09:00 \
                (in reply to RCPT TO command))";
    let long = format!("{}{}\n{log}", "x".repeat(70_000), tail);
    std::fs::write(&f, long).unwrap();
    let (ok, out, _) = greyhook(&["hint", "--log", f.to_str().unwrap()]);
    assert!(ok);
    assert_eq!(out, "4BDAC992063 300\n5CDAC992064 none\n", "the overlong line's tail was read as a line");
}

/// Found by fuzzing the configuration: a duration near `u64::MAX` seconds
/// parsed, and the first milter packet then panicked a worker ("overflow
/// when adding duration to instant"). The daemon must refuse it at start,
/// naming the key.
#[test]
fn serve_refuses_durations_that_would_overflow() {
    let dir = tempfile::tempdir().unwrap();
    for (table, key) in [("policy", "idle_timeout"), ("milter", "frame_timeout"), ("smtp", "next_hop_timeout"), ("filter", "max_ttl")] {
        let cfg = dir.path().join("g.toml");
        std::fs::write(
            &cfg,
            format!(
                "[store]\npath = \"memory\"\n[control]\nsocket = \"{}\"\n[{table}]\n{key} = \"18446744073709551615s\"\n",
                dir.path().join("c.sock").display()
            ),
        )
        .unwrap();
        let mut child = Command::new(greyhook_bin())
            .args(["serve", "--config", cfg.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("greyhook serve started with {table}.{key} of 2^64 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert!(!status.success() && err.contains(key) && err.contains("10 years"), "{table}.{key}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// `simulate --config` runs the whole configured chain, as the daemon
/// would: with two greylisting filters (delays 2 and 7 minutes, their own
/// namespaces) the first answers first; once it lets the triplet pass, the
/// second is asked and greylists in turn.
#[test]
fn simulate_runs_the_configured_chain() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("greyhook.toml");
    std::fs::write(
        &cfg,
        "[[filters]]\nnamespace = \"first\"\n[filters.config]\ndelay = \"2m\"\n\
         [[filters]]\nnamespace = \"second\"\n[filters.config]\ndelay = \"7m\"\n",
    )
    .unwrap();
    let script = dir.path().join("s.txt");
    std::fs::write(
        &script,
        "CONNECT 192.0.2.1\nMAIL FROM:<alice@example.org>\nRCPT TO:<bob@example.com>\nQUIT\n\
         @121 CONNECT 192.0.2.1\nMAIL FROM:<alice@example.org>\nRCPT TO:<bob@example.com>\nQUIT\n",
    )
    .unwrap();
    let (ok, out, err) = greyhook(&["simulate", script.to_str().unwrap(), "--config", cfg.to_str().unwrap(), "--start", "1700000000"]);
    assert!(ok, "{err}");
    let tempfails: Vec<&str> = out.lines().filter(|l| l.starts_with("S: 451")).collect();
    assert_eq!(tempfails.len(), 2, "{out}");
    assert!(tempfails[0].ends_with("retry=00:02:00"), "the first filter answers first:\n{out}");
    assert!(tempfails[1].ends_with("retry=00:07:00"), "then the second is asked:\n{out}");
}

/// What the host does not provide is refused before anything runs, with a
/// message that names the import and says how to build without it (not
/// wasmtime's linker text): `wasi:http` (componentize-js adds it unless
/// told not to), a newer contract, a component that is no filter.
#[test]
fn unknown_imports_and_contracts_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            r#"(component (import "wasi:http/outgoing-handler@0.2.3" (instance)) (instance $h) (export "greyhook:filter/hooks@0.2.0" (instance $h)))"#,
            &["it imports wasi:http/outgoing-handler@0.2.3, which greyhook does not provide", "--disable http"][..],
        ),
        (
            r#"(component (import "greyhook:filter/dns@0.2.0" (instance)) (instance $h) (export "greyhook:filter/hooks@0.1.0" (instance $h)))"#,
            &["it imports greyhook:filter/dns@0.2.0, which a greyhook:filter@0.1.0 filter cannot import"][..],
        ),
        (
            r#"(component (instance $h) (export "greyhook:filter/hooks@0.3.0" (instance $h)))"#,
            &["it exports greyhook:filter/hooks@0.3.0; this host runs greyhook:filter@0.1.0, @0.2.0, @0.2.1, @0.2.2 and @0.2.3 filters"][..],
        ),
        (r#"(component)"#, &["it exports no greyhook:filter/hooks interface"][..]),
    ];
    for (i, (text, needles)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("f{i}.wasm"));
        std::fs::write(&path, wat::parse_str(text).unwrap()).unwrap();
        let (ok, _, err) = greyhook(&["check", path.to_str().unwrap()]);
        assert!(!ok, "case {i} was accepted");
        for n in *needles {
            assert!(err.contains(n), "case {i}: {n:?} not in {err}");
        }
        assert!(!err.contains("matching implementation was not found in the linker"), "{err}");
    }
    // The daemon refuses it too, and its compiled artifact does not stay
    // in the cache (a componentize-js artifact is tens of megabytes).
    let cfg = dir.path().join("g.toml");
    std::fs::write(
        &cfg,
        format!(
            "[store]\npath = \"memory\"\n[policy]\nlisten = [\"127.0.0.1:{}\"]\n[control]\nsocket = \"{d}/c.sock\"\n\
             [filter]\npath = \"{d}/f0.wasm\"\ncache_dir = \"{d}/cache\"\n",
            free_port(),
            d = dir.path().display()
        ),
    )
    .unwrap();
    let (ok, _, err) = greyhook(&["serve", "--config", cfg.to_str().unwrap()]);
    assert!(!ok && err.contains("wasi:http/outgoing-handler"), "{err}");
    let left: Vec<_> = std::fs::read_dir(dir.path().join("cache")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "a refused component's artifact stayed: {left:?}");
}

/// `greyhook status`, `reload` and `db list` only look for a daemon's
/// control socket: run by root on a machine where no daemon ever ran, they
/// create no directory and write nothing under `/var/lib`, `/var/cache` or
/// `/run` (they once created `/var/lib/greyhook` and a probe file in it).
/// Root's view is a private mount namespace with those three empty, so the
/// machine's own are not touched; as another user, its home stays empty.
#[test]
fn looking_for_the_daemon_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let root = running_as_root();
    let bin = greyhook_bin();
    let commands = format!("{b} status || true; {b} reload || true; {b} db list || true", b = bin.display());
    let script = if root {
        // Each directory is a fresh tmpfs; after the commands, list what
        // is in them.
        format!(
            "set -e; for d in /var/lib /var/cache /run; do mount -t tmpfs greyhook-test $d; done; \
             {commands}; find /var/lib /var/cache /run -mindepth 1"
        )
    } else {
        format!("{commands}; find {h} -mindepth 1", h = home.display())
    };
    let mut cmd = if root {
        let mut c = Command::new("unshare");
        c.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
        c
    } else {
        let mut c = Command::new("sh");
        c.args(["-c", &script]);
        c
    };
    for k in ["CACHE_DIRECTORY", "STATE_DIRECTORY", "RUNTIME_DIRECTORY", "XDG_STATE_HOME", "XDG_CACHE_HOME", "XDG_RUNTIME_DIR"] {
        cmd.env_remove(k);
    }
    let out = cmd.env("HOME", &home).output().expect("sh runs");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the script failed: {stdout}\n{stderr}");
    assert!(stderr.contains("cannot reach the daemon"), "each command says no daemon runs: {stderr}");
    assert_eq!(stdout.trim(), "", "created while looking for a daemon:\n{stdout}\n{stderr}");
}

/// A front end's own command (`greyhook opensmtpd`) is listed in `greyhook
/// --help` with what it does, and its `--help` starts with that too (both
/// once showed the shared options' description instead).
#[test]
fn a_front_ends_own_command_says_what_it_does() {
    let (ok, out, err) = greyhook(&["--help"]);
    assert!(ok, "{err}");
    let line = out.lines().find(|l| l.trim_start().starts_with("opensmtpd ")).unwrap_or_else(|| panic!("no opensmtpd in:\n{out}"));
    assert!(line.contains("OpenSMTPD") && !line.contains("Options every daemon command shares"), "{line}");
    let (ok, out, err) = greyhook(&["opensmtpd", "--help"]);
    assert!(ok, "{err}");
    let first = out.lines().next().unwrap_or_default();
    assert!(first.contains("OpenSMTPD") && !first.contains("Options every"), "{out}");
    assert!(out.contains("--config <CONFIG>") && out.contains("--db <DB>"), "the shared options are there: {out}");
}

/// A configuration for `greyhook serve` in `dir`: its control socket
/// there, the store at `db`, the policy service on `port`, then `extra`.
fn serve_config(dir: &std::path::Path, db: &std::path::Path, port: u16, extra: &str) -> String {
    format!(
        "[control]\nsocket = \"{d}/control.sock\"\n[store]\npath = \"{db}\"\n[policy]\nlisten = [\"127.0.0.1:{port}\"]\n{extra}",
        d = dir.display(),
        db = db.display()
    )
}

/// A configuration refused at start leaves nothing behind: two filters of
/// the chain sharing a store namespace were refused only after the store
/// file (and its directory) had been created.
#[test]
fn a_refused_chain_creates_no_store_file() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state").join("greyhook.db");
    let cfg = dir.path().join("greyhook.toml");
    let chain = "[[filters]]\nnamespace = \"main\"\n[[filters]]\nnamespace = \"main\"\n";
    std::fs::write(&cfg, serve_config(dir.path(), &db, 0, chain)).unwrap();
    let (ok, _, err) = greyhook(&["serve", "--config", cfg.to_str().unwrap()]);
    assert!(!ok && err.contains("share the store namespace \"main\""), "{err}");
    assert!(!db.parent().unwrap().exists(), "the refused configuration left {}", db.parent().unwrap().display());
}

/// A start refused after the store is opened (filters that share a
/// namespace by their names alone, which only loading them tells; a
/// listener's address in use) removes the store file and the directories
/// that start created, as a start refused before does; a store that was
/// there before the start is kept, records and all.
#[test]
fn a_start_refused_after_the_store_opens_leaves_only_what_was_there() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let db = state.join("sub").join("greyhook.db");
    let config = |extra: &str, port: u16| serve_config(dir.path(), &db, port, extra);
    let cfg = dir.path().join("greyhook.toml");
    let serve = |text: &str| {
        std::fs::write(&cfg, text).unwrap();
        greyhook(&["serve", "--config", cfg.to_str().unwrap(), "--dns", null_dns()])
    };

    // Two reference filters with no `namespace`: both are named "greylist".
    let (ok, _, err) = serve(&config("[[filters]]\n[[filters]]\n", 0));
    assert!(!ok && err.contains("share the store namespace \"greylist\""), "{err}");
    assert!(!state.exists(), "the refused start left {}", state.display());

    // The policy listener's address is taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().port();
    let (ok, _, err) = serve(&config("", busy));
    assert!(!ok && err.contains(&busy.to_string()), "{err}");
    assert!(!state.exists(), "the refused start left {}", state.display());

    // A store from an earlier run, with a record in it, is kept.
    let port = free_port();
    std::fs::write(&cfg, config("", port)).unwrap();
    let mut daemon = Process::greyhook(&["serve", "--config", cfg.to_str().unwrap()], dir.path().join("log"));
    wait_for_port(port, 30);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let answer = policy_rcpt(&mut s, "192.0.2.7", "kept@sender.example", "rcpt@example.org", "a1");
    assert!(answer.contains("451"), "{answer}");
    drop(s);
    assert!(daemon.terminate(10), "{}", std::fs::read_to_string(&daemon.log).unwrap_or_default());
    let (ok, _, err) = serve(&config("", busy));
    assert!(!ok && err.contains(&busy.to_string()), "{err}");
    let (ok, out, err) = greyhook(&["db", "list", "--db", db.to_str().unwrap()]);
    assert!(ok && out.contains("kept@sender.example"), "{out}{err}");
    let (ok, _, err) = serve(&config("[[filters]]\n[[filters]]\n", 0));
    assert!(!ok && err.contains("share the store namespace"), "{err}");
    let (ok, out, err) = greyhook(&["db", "list", "--db", db.to_str().unwrap()]);
    assert!(ok && out.contains("kept@sender.example"), "{out}{err}");
    drop(taken);
}
