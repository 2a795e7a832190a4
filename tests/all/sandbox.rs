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
        namespace: "chaos".into(),
        failure_policy: policy,
        // A deadline long enough for the memory mode to reach its cap on a
        // busy machine (calls yield at every tick), short for the loop.
        limits: Limits { deadline: Duration::from_millis(250), memory: 16 << 20, ..Limits::default() },
        ..FilterOptions::default()
    };
    (runtime().load(CHAOS_FILTER, options, store.clone()).await.unwrap(), store)
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
        };
        assert_eq!(kind, expect, "{what}: {e}");
        assert!(started.elapsed() < Duration::from_secs(2), "{what} took {:?}", started.elapsed());
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
    assert_eq!(FailurePolicy::Tempfail.verdict(greyhook::types::Phase::Connect).reply().unwrap().code, 421);
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
