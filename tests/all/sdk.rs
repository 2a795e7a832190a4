//! The filter kit as a third party meets it: `greyhook new-filter`
//! scaffolds a crate outside this repository that tests natively, builds
//! for wasm32-wasip2, passes `greyhook check` and greylists through
//! `greyhook serve` as generated.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use greyhook::FilterOptions;
use greyhook_tests::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().unwrap()
}

/// `cargo ARGS` in `dir`, clean of the outer build's settings, with a
/// target directory shared by every run (a second run is quick).
fn cargo(dir: &Path, args: &[&str]) -> (bool, String) {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(dir).args(args).env("CARGO_TARGET_DIR", repo().join("target/scaffold"));
    for v in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "RUSTC_WRAPPER", "CARGO_BUILD_TARGET", "CARGO_MAKEFLAGS", "CARGO_PRIMARY_PACKAGE"] {
        c.env_remove(v);
    }
    let out = c.output().expect("cargo runs");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn new_filter_scaffolds_a_crate_that_tests_builds_and_greylists() {
    let dir = tempfile::tempdir().unwrap();
    let krate = dir.path().join("demo-filter");
    let out = Command::new(greyhook_bin()).args(["new-filter", "demo-filter", "--dir"]).arg(&krate).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for f in ["Cargo.toml", "src/lib.rs", "README.md", ".gitignore"] {
        assert!(krate.join(f).exists(), "{f} was not generated");
    }
    // Refused: an existing directory, a name that cannot be a namespace.
    let again = Command::new(greyhook_bin()).args(["new-filter", "demo-filter", "--dir"]).arg(&krate).output().unwrap();
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("not empty"));
    let bad = Command::new(greyhook_bin()).args(["new-filter", "Demo Filter"]).current_dir(dir.path()).output().unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("a filter name is"));

    let (ok, log) = cargo(&krate, &["test", "--quiet"]);
    assert!(ok, "the generated tests pass natively:\n{log}");
    let (ok, log) = cargo(&krate, &["build", "--quiet", "--release", "--target", "wasm32-wasip2"]);
    assert!(ok, "the generated crate builds a component:\n{log}");
    let wasm = repo().join("target/scaffold/wasm32-wasip2/release/demo_filter.wasm");
    assert!(wasm.exists());

    let out = Command::new(greyhook_bin()).arg("check").arg(&wasm).args(["--set", "delay=1"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("name: demo-filter") && text.contains("namespace: demo-filter") && text.contains("contract: greyhook:filter@0.2.3"),
        "{text}"
    );
    assert!(text.contains("skipped hooks: connect, ehlo, mail, data\nehlo keywords: none\n"), "{text}");

    let (mut d, port) = serve_filter(dir.path(), &wasm, &["--set", "delay=1"]);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let first = policy_rcpt(&mut s, "192.0.2.1", "alice@example.org", "bob@example.com", "i1");
    assert!(first.starts_with("action=451 4.7.1 Greylisted, please try again later retry=00:00:01"), "{first}");
    std::thread::sleep(Duration::from_millis(1100));
    let retry = policy_rcpt(&mut s, "192.0.2.1", "alice@example.org", "bob@example.com", "i2");
    assert!(retry.starts_with("action=DUNNO"), "{retry}\n{}", d.log_text());
    assert!(d.terminate(10));
}

/// `greyhook serve` on the memory store with the filter at `wasm` (and
/// `extra` arguments), listening for policy requests: the daemon and its port.
fn serve_filter(dir: &std::path::Path, wasm: &std::path::Path, extra: &[&str]) -> (Process, u16) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let control = dir.join("c.sock");
    let mut args =
        vec!["serve", "--db", "memory", "--policy", &listen, "--filter", wasm.to_str().unwrap(), "--control", control.to_str().unwrap()];
    args.extend_from_slice(extra);
    let d = Process::greyhook(&args, dir.join("log"));
    wait_for_port(port, 60);
    (d, port)
}

/// docs/writing-filters.md shows the walkthrough's code as CI compiles and
/// tests it: every block marked `<!-- file: PATH -->` is that file, whole.
#[test]
fn the_walkthrough_shows_the_code_ci_compiles() {
    let doc = std::fs::read_to_string(repo().join("docs/writing-filters.md")).unwrap();
    let mut shown = 0;
    for part in doc.split("<!-- file: ").skip(1) {
        let (path, rest) = part.split_once(" -->").expect("a closed file marker");
        let body = rest.split_once("```").and_then(|(_, b)| b.split_once('\n')).map(|(_, b)| b).expect("a code block after the marker");
        let code = body.split("```").next().unwrap_or("");
        let file = std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(code == file, "docs/writing-filters.md shows an old {path}: update the page from the file");
        shown += 1;
    }
    assert!(shown >= 2, "the walkthrough's code blocks are marked");
}

/// The stateful test filter (`tests/guests/stateful`), over a memory store.
async fn stateful() -> greyhook::Filter {
    load_on(&runtime(), STATEFUL_FILTER, FilterOptions::default(), std::sync::Arc::new(greyhook::store::MemoryStore::new()))
        .await
        .expect("the stateful filter loads")
}

/// The SDK's per-call arena (feature `arena`, on in the reference filter)
/// with a filter that breaks the contract's "hooks keep no state": memory
/// allocated in one call and kept in a `thread_local` must stay intact
/// while later calls allocate and free around it (the arena is rewound only
/// when nothing in it is alive), and calls that allocate more than the
/// arena holds are served by the system allocator.
#[tokio::test]
async fn a_filter_that_keeps_state_still_works_with_the_sdk_arena() {
    let f = stateful().await;
    let header = |v: &greyhook::types::Verdict| v.add_headers.iter().map(|h| format!("{}: {}", h.name, h.value)).collect::<String>();
    let mut c = Client::new(&f, "192.0.2.1", T0);
    // Allocation-heavy calls that keep nothing: the arena rewinds each time.
    for _ in 0..3 {
        let v = f.try_on_mail(&c.ctx(), "a@example.org").await.expect("on-mail");
        assert_eq!(header(&v), format!("X-Mail: {}", 300 * 1024 + (0..1000).map(|i| format!("a@example.org{i}").len()).sum::<usize>()));
    }
    c.tx.sender = Some("a@example.org".into());
    let mut want = Vec::new();
    for r in ["r1@example.com", "r2@example.com", "r3@example.com", "r4@example.com"] {
        want.push(r);
        // Allocations in between: freed arena memory would be handed out again here.
        f.try_on_mail(&c.ctx(), "b@example.org").await.expect("on-mail");
        let v = f.try_on_rcpt(&c.ctx(), r).await.expect("on-rcpt");
        assert_eq!(header(&v), format!("X-Seen: {}", want.join(",")), "what the filter kept is intact");
    }
}

/// The store calls a filter of contract 0.2 makes (keys and values read in
/// place from its memory): what it writes it reads back, through `get` and
/// `get-many`; a compare-and-swap on a stale version conflicts; and an
/// empty or too long key, more keys than the call limit and a value over
/// the limit fail the call as a store failure, with the reason.
#[tokio::test]
async fn store_calls_of_a_filter_are_checked_at_the_boundary() {
    let f = stateful().await;
    let mut c = Client::new(&f, "192.0.2.1", T0);
    let mut connect = async |name: &str| {
        c.session.client_name = Some(name.into());
        f.try_on_connect(&c.ctx()).await
    };
    let header = |v: greyhook::types::Verdict| v.add_headers.iter().map(|h| h.value.clone()).collect::<String>();
    assert_eq!(header(connect("roundtrip").await.expect("roundtrip")), "value-1 none value-1");
    assert_eq!(header(connect("cas").await.expect("cas")), "conflict 1");
    for (name, want) in [
        ("long-key", "store key of 257 bytes (1 to 256 allowed)"),
        ("empty-key", "store key of 0 bytes (1 to 256 allowed)"),
        ("many-keys", "store calls in one hook call"),
        ("big-value", "store value of 17408 bytes (at most 16384)"),
    ] {
        match connect(name).await {
            Err(greyhook::FilterError::Store(m)) => assert!(m.contains(want), "{name}: {m}"),
            other => panic!("{name}: {other:?}"),
        }
    }
    // The failures left the instance fit for the next call.
    assert_eq!(header(connect("roundtrip").await.expect("roundtrip again")), "value-1 none value-1");
}

/// What a filter hands the `metrics` import is sorted out at the boundary
/// (which the host reads in place from the filter's memory): label order
/// does not make another series, the first of a duplicated label counts,
/// and too many labels, bad names and control characters are dropped and
/// counted, never stored.
#[tokio::test]
async fn metrics_from_a_filter_are_checked_at_the_boundary() {
    let f = stateful().await;
    let c = Client::new(&f, "192.0.2.1", T0);
    for _ in 0..2 {
        f.try_on_ehlo(&c.ctx()).await.expect("on-ehlo");
    }
    let got: Vec<String> = f.metrics().snapshot().iter().map(|s| s.render()).collect();
    // odd_total: 1 + 2 by name, 3 through the raw handle, a call;
    // odd_seconds: 0.5 by name, 0.25 through a raw handle.
    assert_eq!(got, ["dup_total{k=\"first\"} 2", "odd_seconds{v=\"fine\"} count=4 sum=1.5", "odd_total{a=\"1\",b=\"2\"} 12"], "{got:#?}");
    assert_eq!(f.metrics().dropped(), 2 * 7, "seven updates a call dropped (four by name, two by handle, one handle refused)");
}

/// Contract 0.2.2: the hooks a filter asks (in `init`) not to be called are
/// answered by the host, `continue` and the EHLO keywords it gave, without
/// a call (none counted, no instance taken); the others run as before; bad
/// keywords keep the filter from loading, naming them. Contract 0.2.3:
/// `on-data` asked for the null sender only is answered by the host for
/// every other sender.
#[tokio::test]
async fn the_hooks_a_filter_skips_are_not_called() {
    let load = |config: &str| {
        let options = FilterOptions { config: config.into(), ..FilterOptions::default() };
        async move { load_on(&runtime(), STATEFUL_FILTER, options, std::sync::Arc::new(greyhook::store::MemoryStore::new())).await }
    };
    // Without a skip, on-mail runs: its header says so.
    let f = load("").await.expect("loads");
    assert!(f.skipped().phases.is_empty());
    let c = Client::new(&f, "192.0.2.1", T0);
    let v = f.try_on_mail(&c.ctx(), "a@example.org").await.expect("on-mail");
    assert_eq!(v.add_headers.first().map(|h| h.name.as_str()), Some("X-Mail"), "{v:?}");
    assert_eq!(f.stats().calls.load(std::sync::atomic::Ordering::Relaxed), 1);

    let f = load("skip = mail").await.expect("loads");
    assert_eq!(f.skipped().phases, [greyhook::types::Phase::Mail]);
    let c = Client::new(&f, "192.0.2.1", T0);
    for _ in 0..3 {
        let v = f.try_on_mail(&c.ctx(), "a@example.org").await.expect("on-mail");
        assert_eq!(v, greyhook::types::Verdict::cont(), "answered by the host");
    }
    let v = f.try_on_rcpt(&c.ctx(), "r1@example.com").await.expect("on-rcpt");
    assert!(v.add_headers.iter().any(|h| h.name == "X-Seen"), "the hooks it did not skip are called: {v:?}");
    assert_eq!(f.stats().calls.load(std::sync::atomic::Ordering::Relaxed), 1, "only on-rcpt reached the filter");

    let f = load("skip = ehlo").await.expect("loads");
    let mut c = Client::new(&f, "192.0.2.1", T0);
    c.session.helo = Some("mx.example.org".into());
    let e = f.try_on_ehlo(&c.ctx()).await.expect("on-ehlo");
    assert_eq!((e.verdict, e.keywords), (greyhook::types::Verdict::cont(), vec!["XSKIPPED".to_string()]));
    assert_eq!(f.stats().calls.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert_eq!(f.metrics().snapshot().len(), 0, "its on-ehlo (which counts metrics) never ran");

    // Contract 0.2.3: on-data for the null sender only. A transaction with
    // a sender is answered by the host; a bounce's (and one with no MAIL
    // seen) reaches the filter.
    let f = load("skip = data-with-sender").await.expect("loads");
    assert_eq!(f.skipped().names(), ["data-with-sender"]);
    let c = Client::new(&f, "192.0.2.1", T0);
    let message = greyhook::types::Message { message_id: Some("<1@example.org>".into()), headers: Vec::new() };
    let with = |sender: Option<&str>| {
        let mut ctx = c.ctx();
        ctx.transaction.sender = sender.map(str::to_string);
        ctx
    };
    let v = f.try_on_data(&with(Some("a@example.org")), &message).await.expect("on-data");
    assert_eq!(v, greyhook::types::Verdict::cont(), "answered by the host");
    assert_eq!(f.stats().calls.load(std::sync::atomic::Ordering::Relaxed), 0);
    for sender in [Some(""), None] {
        let v = f.try_on_data(&with(sender), &message).await.expect("on-data");
        assert_eq!(v.add_headers.first().map(|h| (h.name.as_str(), h.value.as_str())), Some(("X-Data", "")), "{v:?}");
    }
    assert_eq!(f.stats().calls.load(std::sync::atomic::Ordering::Relaxed), 2, "the null sender's calls reached the filter");

    let err = load("skip = bad-keyword").await.expect_err("a bad keyword refuses the filter");
    let text = err.to_string();
    assert!(text.contains("EHLO keywords") && text.contains("skip-hooks"), "{text}");
}

/// A filter built against the contract's 0.2.0 as released (before metric
/// handles) loads in this 0.2.3 host unchanged: its exports are found, its
/// store calls and metric updates by name are answered.
#[tokio::test]
async fn a_filter_built_against_0_2_0_still_loads_and_runs() {
    let f = load_on(&runtime(), V020_FILTER, FilterOptions::default(), std::sync::Arc::new(greyhook::store::MemoryStore::new()))
        .await
        .expect("the 0.2.0 filter loads");
    assert_eq!(f.contract().to_string(), "greyhook:filter@0.2.0");
    let c = Client::new(&f, "192.0.2.1", T0);
    let first = f.try_on_rcpt(&c.ctx(), "bob@example.org").await.expect("no trap");
    assert_eq!((code(&first), retry(&first)), (Some(451), Some(60)), "{first:?}");
    let again = f.try_on_rcpt(&c.ctx(), "bob@example.org").await.expect("no trap");
    assert_eq!(code(&again), None, "{again:?}");
    let got: Vec<String> = f.metrics().snapshot().iter().map(|s| s.render()).collect();
    assert_eq!(got, ["delay_seconds count=1 sum=60", "greylisted_total 1", "passed_total{contract=\"0.2.0\"} 1"], "{got:#?}");
    assert_eq!(f.metrics().dropped(), 0);
}

/// The same filter under `greyhook serve`: that the arena cannot be
/// rewound is in the log, once.
#[test]
fn the_arena_turning_off_is_logged_once() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("stateful.wasm");
    std::fs::write(&wasm, STATEFUL_FILTER).unwrap();
    let (mut d, port) = serve_filter(dir.path(), &wasm, &[]);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for i in 0..6 {
        let a = policy_rcpt(&mut s, "192.0.2.1", "alice@example.org", &format!("r{i}@example.com"), &format!("i{i}"));
        assert!(a.starts_with("action=PREPEND X-Seen: "), "{a}");
    }
    assert!(d.wait_log("the per-call arena cannot be rewound", 10), "{}", d.log_text());
    assert_eq!(d.log_text().matches("per-call arena cannot be rewound").count(), 1, "{}", d.log_text());
    assert!(d.terminate(10));
}
