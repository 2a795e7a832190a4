//! A filter is untrusted: traps, runaway loops, memory bombs and invalid
//! answers are contained, the failure policy answers, and the next call works.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use greyhook::store::{Condition, MemoryStore, Store};
use greyhook::types::Decision;
use greyhook::{FailurePolicy, FilterError, FilterOptions, Limits, LoadError};
use greyhook_tests::*;

async fn chaos(policy: FailurePolicy) -> (greyhook::Filter, Arc<MemoryStore>) {
    let store = Arc::new(MemoryStore::new());
    let options = FilterOptions {
        namespace: Some("chaos".into()),
        failure_policy: policy,
        // A deadline long enough for the memory mode to reach its cap, and
        // for every ordinary call, on a busy 2-core machine running the
        // other tests (calls yield at every tick); the loop pays it once.
        limits: Limits { deadline: Duration::from_secs(1), memory: 16 << 20, ..Limits::default() },
        ..FilterOptions::default()
    };
    (load_on(&runtime(), CHAOS_FILTER, options, store.clone()).await.unwrap(), store)
}

#[tokio::test]
async fn every_misbehaviour_is_contained_and_the_next_call_works() {
    let (f, _) = chaos(FailurePolicy::Continue).await;
    let c = Client::new(&f, "192.0.2.1", T0);
    for (what, expect) in [
        ("panic", "trap"),
        ("loop", "deadline"),
        ("memory", "trap"),
        ("recurse", "trap"),
        ("huge-reply", "invalid"),
        ("bad-code", "invalid"),
        ("inject", "invalid"),
        ("inject-header", "invalid"),
        ("store-flood", "store"),
        ("store-big", "store"),
    ] {
        let started = Instant::now();
        let e = f.try_on_rcpt(&c.ctx(), &format!("{what}@x")).await.expect_err(what);
        let kind = match &e {
            FilterError::Trap(_) => "trap",
            FilterError::Deadline(_) => "deadline",
            FilterError::Invalid(_) => "invalid",
            FilterError::Store(_) => "store",
            FilterError::Instantiate(_) => "instantiate",
            FilterError::Busy(_) => "busy",
            _ => "another kind",
        };
        assert_eq!(kind, expect, "{what}: {e}");
        // Contained within the deadline and some slack for a loaded machine.
        assert!(started.elapsed() < Duration::from_secs(4), "{what} took {:?}", started.elapsed());
        // The policy answers through the non-try API, and the next call works.
        assert_eq!(f.on_rcpt(&c.ctx(), &format!("{what}@x")).await.decision, Decision::Continue);
        let ok = f.try_on_rcpt(&c.ctx(), "fine@x").await.expect("the next call works");
        assert_eq!(ok.add_headers[0].value, "ok");
    }
    assert_eq!(f.stats().failures.load(Ordering::Relaxed), 10);
}

#[tokio::test]
async fn panic_message_reaches_the_error() {
    let (f, _) = chaos(FailurePolicy::Continue).await;
    let c = Client::new(&f, "192.0.2.1", T0);
    let e = f.try_on_rcpt(&c.ctx(), "panic@x").await.unwrap_err();
    assert!(e.to_string().contains("chaos: panic on request"), "{e}");
}

#[tokio::test]
async fn tempfail_policy_answers_451_and_421_at_connect() {
    let (f, _) = chaos(FailurePolicy::Tempfail).await;
    let c = Client::new(&f, "192.0.2.1", T0);
    let v = f.on_rcpt(&c.ctx(), "panic@x").await;
    assert_eq!(greyhook::reply::render(v.reply().unwrap()), "451 4.3.0 Temporary local problem, please try again later\r\n");
    // A trap in on-connect itself: the greeting-stage answer is 421.
    let mut c = Client::new(&f, "192.0.2.1", T0);
    c.session.client_name = Some("panic.example".into());
    assert!(matches!(f.try_on_connect(&c.ctx()).await, Err(FilterError::Trap(_))));
    let v = f.on_connect(&c.ctx()).await;
    assert_eq!(greyhook::reply::render(v.reply().unwrap()), "421 4.3.0 Temporary local problem, please try again later\r\n");
}

#[tokio::test]
async fn invalid_ehlo_keyword_is_refused() {
    let (f, _) = chaos(FailurePolicy::Continue).await;
    let mut c = Client::new(&f, "192.0.2.1", T0);
    c.session.helo = Some("bad-ehlo".into());
    assert!(matches!(f.try_on_ehlo(&c.ctx()).await, Err(FilterError::Invalid(_))));
    assert!(f.on_ehlo(&c.ctx()).await.keywords.is_empty());
}

#[tokio::test]
async fn keys_are_namespaced_per_filter() {
    let (f, store) = chaos(FailurePolicy::Continue).await;
    store.set("greylist/probe", b"secret", T0 + 100, Condition::Any, T0).await.unwrap();
    let mut c = Client::new(&f, "192.0.2.1", T0);
    c.tx.sender = Some("planted".into());
    let v = f.try_on_rcpt(&c.ctx(), "escape@x").await.unwrap();
    assert_eq!(v.add_headers[0].value, "contained");
    assert_eq!(store.get("greylist/planted", T0).await.unwrap(), None);
    assert!(store.get("chaos/../greylist/planted", T0).await.unwrap().is_some(), "it stayed under chaos/");
}

#[tokio::test]
async fn load_errors_name_the_problem() {
    let rt = runtime();
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let load = |bytes: Vec<u8>, config: &str| {
        let (rt, store, config) = (rt.clone(), store.clone(), config.to_string());
        async move { rt.load(&bytes, FilterOptions { config, ..Default::default() }, store).await }
    };
    let e = load(b"#!/bin/sh\necho hi\n".to_vec(), "").await.unwrap_err();
    assert!(matches!(e, LoadError::NotWasm), "{e}");
    let e = load(wat::parse_str("(module)").unwrap(), "").await.unwrap_err();
    assert!(matches!(e, LoadError::CoreModule), "{e}");
    assert!(e.to_string().contains("not a component"));
    let e = load(wat::parse_str("(component)").unwrap(), "").await.unwrap_err();
    assert!(matches!(e, LoadError::World(_)), "{e}");
    assert!(e.to_string().contains("greyhook:filter"), "{e}");
    let e = load(wat::parse_str(r#"(component (import "evil:net/socket" (instance)))"#).unwrap(), "").await.unwrap_err();
    assert!(matches!(e, LoadError::World(_)), "{e}");
    let mut truncated = greyhook::REFERENCE_FILTER.to_vec();
    truncated.truncate(truncated.len() / 2);
    let e = load(truncated, "").await.unwrap_err();
    assert!(matches!(e, LoadError::Compile(_)), "{e}");
    let e = load(CHAOS_FILTER.to_vec(), "fail").await.unwrap_err();
    assert!(matches!(e, LoadError::Init(_)), "{e}");
    assert!(e.to_string().contains("`fail`"), "{e}");
}

/// The `[filter]` limits and failure policy through the daemon, as an
/// operator sets them: `failure_policy = "tempfail"` answers 451 (421 at
/// connect) for a trap, `deadline` cuts a loop at its value, `memory_mib`
/// caps a memory bomb, `store_calls` bounds the writes of one call (counted
/// in a real Redis).
#[test]
fn filter_limits_and_failure_policy_through_the_daemon() {
    use std::io::{Read, Write};
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("chaos.wasm"), CHAOS_FILTER).unwrap();
    let port = free_port();
    let text = format!(
        "[control]\nsocket = \"{d}/control.sock\"\n[store]\npath = \"{url}\"\n[policy]\nlisten = [\"127.0.0.1:{port}\"]\n\
         [filter]\npath = \"{d}/chaos.wasm\"\nnamespace = \"chaos\"\nfailure_policy = \"tempfail\"\ndeadline = \"400ms\"\n\
         memory_mib = 16\nstore_calls = 10\n",
        d = dir.path().display(),
        url = redis.url()
    );
    let mut d = greyhook_with(dir.path(), "serve", &text);
    wait_for_port(port, 30);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let tempfail = "action=451 4.3.0 Temporary local problem, please try again later";
    let a = policy_rcpt(&mut s, "192.0.2.1", "a@example.org", "panic@x.example", "i1");
    assert_eq!(a.trim_end(), tempfail);
    // A trap at connect is answered with 421.
    s.write_all(b"request=smtpd_access_policy\nprotocol_state=CONNECT\nclient_address=192.0.2.1\nclient_name=panic.example\n\n").unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap();
    assert_eq!(String::from_utf8_lossy(&buf[..n]).trim_end(), "action=421 4.3.0 Temporary local problem, please try again later");
    // The deadline: a loop is cut at 400 ms, not before, not much after.
    let t = Instant::now();
    let a = policy_rcpt(&mut s, "192.0.2.1", "a@example.org", "loop@x.example", "i2");
    let took = t.elapsed();
    assert_eq!(a.trim_end(), tempfail);
    assert!(took >= Duration::from_millis(380) && took < Duration::from_secs(3), "loop cut after {took:?}");
    // The memory cap: a bomb traps; a probe gets under 16 MiB (the
    // default cap is 64).
    let a = policy_rcpt(&mut s, "192.0.2.1", "a@example.org", "memory@x.example", "i3");
    assert_eq!(a.trim_end(), tempfail);
    let a = policy_rcpt(&mut s, "192.0.2.1", "a@example.org", "memory-probe@x.example", "i3");
    let mib: u32 =
        a.trim_end().strip_prefix("action=PREPEND X-Chaos: memory ").and_then(|r| r.strip_suffix(" MiB")).unwrap().parse().unwrap();
    assert!((8..16).contains(&mib), "{mib} MiB with memory_mib = 16");
    // Store calls: 10 writes, then a store limit error.
    let a = policy_rcpt(&mut s, "192.0.2.1", "a@example.org", "store-flood@x.example", "i4");
    assert_eq!(a.trim_end(), tempfail);
    let keys = redis.cli(&["--scan", "--pattern", "greyhook:chaos/k*"]).lines().filter(|l| !l.is_empty()).count();
    assert_eq!(keys, 10, "store_calls = 10");
    // And an ordinary call still works.
    let a = policy_rcpt(&mut s, "192.0.2.1", "a@example.org", "fine@x.example", "i5");
    assert_eq!(a.trim_end(), "action=PREPEND X-Chaos: ok");
    // The log is written by a background thread: wait for the last call's line.
    assert!(d.wait_log("forged log line", 10), "{}", d.log_text());
    let log = d.log_text();
    assert!(log.contains("exceeded its deadline of 400ms") && log.contains("chaos: panic at connect"), "{log}");
    // The failure policy's answers are logged as what they are.
    assert!(log.contains("action=tempfail phase=rcpt") && log.contains("action=tempfail phase=connect"), "{log}");
    assert!(!log.contains("action=greylist"), "a failed filter is not greylisting: {log}");
    // The filter's "chaos: ok\r\nforged log line" stays one line.
    assert!(log.contains("chaos: ok  forged log line"), "{log}");
    assert!(!log.lines().any(|l| l.starts_with("forged")), "a filter forged a log line: {log}");
    assert!(d.terminate(10));
}

/// Voluntary context switches of `pid`'s thread named `name`.
fn thread_switches(pid: u32, name: &str) -> u64 {
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == name {
            let status = std::fs::read_to_string(t.path().join("status")).unwrap();
            return status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse().ok())
                .expect("voluntary_ctxt_switches");
        }
    }
    panic!("no thread {name} in process {pid}");
}

/// An idle daemon sleeps: its epoch thread (which lets a deadline stop a
/// runaway filter) used to wake every millisecond, busy or not, a thousand
/// wake-ups a second for nothing. It now parks while no filter runs, and a
/// runaway call after a long idle spell is still cut at its deadline.
#[test]
fn an_idle_daemon_sleeps_and_still_stops_a_runaway_filter() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("chaos.wasm"), CHAOS_FILTER).unwrap();
    let port = free_port();
    let text = format!(
        "[control]\nsocket = \"{d}/control.sock\"\n[store]\npath = \"memory\"\n[policy]\nlisten = [\"127.0.0.1:{port}\"]\n\
         [filter]\npath = \"{d}/chaos.wasm\"\nnamespace = \"chaos\"\nfailure_policy = \"tempfail\"\ndeadline = \"400ms\"\n",
        d = dir.path().display(),
    );
    let mut d = greyhook_with(dir.path(), "serve", &text);
    wait_for_port(port, 30);
    let pid = d.child.id();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(policy_rcpt(&mut s, "192.0.2.1", "a@example.org", "fine@x.example", "i1").trim_end(), "action=PREPEND X-Chaos: ok");
    // Idle: after a moment the epoch thread stops waking up.
    let idle = |label: &str| {
        std::thread::sleep(Duration::from_millis(1500));
        let before = thread_switches(pid, "greyhook-epoch");
        std::thread::sleep(Duration::from_secs(2));
        let woke = thread_switches(pid, "greyhook-epoch") - before;
        assert!(woke < 20, "{label}: the epoch thread woke {woke} times in 2 s of idleness");
    };
    idle("after a call");
    // A runaway call now: the thread wakes and the deadline holds.
    let t = Instant::now();
    let a = policy_rcpt(&mut s, "192.0.2.1", "a@example.org", "loop@x.example", "i2");
    let took = t.elapsed();
    assert_eq!(a.trim_end(), "action=451 4.3.0 Temporary local problem, please try again later");
    assert!(took >= Duration::from_millis(380) && took < Duration::from_secs(3), "loop cut after {took:?}");
    assert_eq!(policy_rcpt(&mut s, "192.0.2.1", "a@example.org", "fine@x.example", "i3").trim_end(), "action=PREPEND X-Chaos: ok");
    idle("after the runaway");
    assert!(d.terminate(10), "{}", d.log_text());
}

/// The filter instances in use are bounded (the pooling allocator's size
/// less its idle reserve): a call that finds them all busy waits for one
/// within its deadline, and is not failed for the load alone. One that
/// cannot get one for a whole deadline is a `Busy` overload, answered with
/// a tempfail even under the `continue` failure policy: a flood of clients
/// must not pass its mail ungreylisted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_wait_for_a_free_instance_and_overload_is_a_tempfail() {
    use greyhook::RuntimeConfig;
    use greyhook::dns::{DnsConfig, Resolver};
    // A resolver that never answers: a call doing an SPF check holds its
    // instance for the lookup's timeout.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let resolver = Resolver::new(DnsConfig {
        servers: vec![silent.local_addr().unwrap()],
        timeout: Duration::from_millis(1500),
        ..DnsConfig::default()
    });
    // One instance in all: one in use at a time, none kept idle.
    let rt = greyhook::Runtime::new(RuntimeConfig { max_instances: 1, resolver, ..RuntimeConfig::default() }).unwrap();
    let load = |config: &str, deadline: Duration| {
        let options = FilterOptions {
            config: config.into(),
            namespace: Some(format!("n{}", deadline.as_millis())),
            failure_policy: FailurePolicy::Continue,
            limits: Limits { deadline, ..Limits::default() },
        };
        load_on(&rt, greyhook::REFERENCE_FILTER, options, Arc::new(MemoryStore::new()))
    };
    let slow = Arc::new(load("delay = 300", Duration::from_secs(4)).await.unwrap());
    let quick = load("delay = 300\nidentity = [\"network\"]", Duration::from_millis(300)).await.unwrap();
    // Calls beyond the one instance wait their turn: all are greylisted.
    let calls = (0..8).map(|i| {
        let quick = &quick;
        async move {
            let mut c = Client::new(quick, &format!("192.0.2.{i}"), T0);
            c.attempt("a@example.org", &format!("u{i}@example.com")).await
        }
    });
    for v in futures::future::join_all(calls).await {
        assert_eq!(code(&v), Some(451), "{v:?}");
        assert_eq!(v.reply().and_then(|r| r.enhanced.clone()).as_deref(), Some("4.7.1"), "{v:?}");
    }
    assert_eq!(quick.stats().failures.load(Ordering::Relaxed), 0);
    // A call that waits for its SPF lookup holds the only instance for
    // over a second; the quick filter's call cannot get it within 300 ms.
    let holder = {
        let slow = slow.clone();
        tokio::spawn(async move {
            let c = Client::new(&slow, "192.0.2.99", T0);
            let mut ctx = c.ctx();
            ctx.transaction.sender = Some("news@spf.example.org".into());
            slow.on_rcpt(&ctx, "u@example.com").await
        })
    };
    // In flight (counted just before it takes the slot), then well into
    // its lookup.
    let until = Instant::now() + Duration::from_secs(10);
    while slow.stats().calls.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < until, "the slow call never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let c = Client::new(&quick, "192.0.2.50", T0);
    let started = Instant::now();
    let e = quick.try_on_rcpt(&c.ctx(), "v@example.com").await.expect_err("no instance free");
    assert!(matches!(e, FilterError::Busy(_)), "{e}");
    assert!(started.elapsed() >= Duration::from_millis(300), "waited its deadline: {:?}", started.elapsed());
    // Answered with a tempfail, not the `continue` policy.
    let v = quick.on_rcpt(&c.ctx(), "v@example.com").await;
    assert_eq!(code(&v), Some(451), "{v:?}");
    assert_eq!(v.reply().and_then(|r| r.enhanced.clone()).as_deref(), Some("4.3.0"), "{v:?}");
    assert_eq!(code(&holder.await.unwrap()), Some(451), "the slow call greylists too");
    // Free again: the next call gets the instance.
    let mut c = Client::new(&quick, "192.0.2.51", T0);
    assert_eq!(code(&c.attempt("a@example.org", "w@example.com").await), Some(451));
}
