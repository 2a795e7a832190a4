//! The store backends: compare-and-swap under concurrency, expiry, and
//! redb's persistence across a restart. The same suite runs on every backend.

use std::sync::Arc;

use greyhook::store::{Condition, Durability, MemoryStore, RedbStore, RedisConfig, RedisStore, Store, WriteOutcome};
use greyhook_tests::*;

async fn cas_increment(store: &dyn Store, key: &str) -> u32 {
    let mut conflicts = 0;
    loop {
        let (n, cond) = match store.get(key, T0).await.unwrap() {
            Some(e) => (String::from_utf8(e.value).unwrap().parse::<u64>().unwrap(), Condition::Version(e.version)),
            None => (0, Condition::Absent),
        };
        tokio::task::yield_now().await;
        match store.set(key, (n + 1).to_string().as_bytes(), T0 + 3600, cond, T0).await.unwrap() {
            WriteOutcome::Written(_) => return conflicts,
            WriteOutcome::Conflict => conflicts += 1,
        }
    }
}

async fn suite(store: Arc<dyn Store>) {
    // Basic semantics.
    assert_eq!(store.get("k", T0).await.unwrap(), None);
    let v1 = match store.set("k", b"a", T0 + 10, Condition::Absent, T0).await.unwrap() {
        WriteOutcome::Written(v) => v,
        c => panic!("{c:?}"),
    };
    assert_eq!(store.set("k", b"b", T0 + 10, Condition::Absent, T0).await.unwrap(), WriteOutcome::Conflict);
    assert_eq!(store.set("k", b"b", T0 + 10, Condition::Version(v1 + 1000), T0).await.unwrap(), WriteOutcome::Conflict);
    let v2 = match store.set("k", b"b", T0 + 10, Condition::Version(v1), T0).await.unwrap() {
        WriteOutcome::Written(v) => v,
        c => panic!("{c:?}"),
    };
    assert_ne!(v1, v2);
    let e = store.get("k", T0).await.unwrap().unwrap();
    assert_eq!((e.value.as_slice(), e.version, e.expires_at), (&b"b"[..], v2, T0 + 10));
    // Expiry: absent once expired, and an expired key counts as absent.
    assert_eq!(store.get("k", T0 + 10).await.unwrap(), None);
    assert!(matches!(store.set("k", b"c", T0 + 20, Condition::Absent, T0 + 10).await.unwrap(), WriteOutcome::Written(_)));
    assert!(!store.delete("k", Condition::Version(1_000_000), T0 + 10).await.unwrap());
    assert!(store.delete("k", Condition::Any, T0 + 10).await.unwrap());
    assert_eq!(store.get("k", T0 + 10).await.unwrap(), None);
    // Sweep.
    for i in 0..50 {
        store.set(&format!("s{i}"), b"x", T0 + 5 + (i % 2), Condition::Any, T0).await.unwrap();
    }
    assert_eq!(store.sweep(T0 + 5).await.unwrap(), 25);
    assert_eq!(store.sweep(T0 + 6).await.unwrap(), 25);
    assert_eq!(store.get("s1", T0).await.unwrap(), None);

    // Compare-and-swap under concurrent callers loses no update.
    let tasks = 8;
    let each = 50;
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let s = store.clone();
        handles.push(tokio::spawn(async move {
            let mut c = 0;
            for _ in 0..each {
                c += cas_increment(&*s, "counter").await;
            }
            c
        }));
    }
    let mut conflicts = 0;
    for h in handles {
        conflicts += h.await.unwrap();
    }
    let e = store.get("counter", T0).await.unwrap().unwrap();
    assert_eq!(String::from_utf8(e.value).unwrap(), (tasks * each).to_string(), "no lost update ({conflicts} conflicts retried)");

    // Scanning pages through every live entry exactly once.
    for i in 0..25 {
        store.set(&format!("p/{i:02}"), b"v", T0 + 100, Condition::Any, T0).await.unwrap();
    }
    store.set("p/dead", b"v", T0 + 1, Condition::Any, T0).await.unwrap();
    let (mut cursor, mut seen) = (None, Vec::new());
    for _ in 0..1000 {
        let page = store.scan(cursor, 7, T0 + 50).await.unwrap();
        seen.extend(page.entries.into_iter().map(|(k, e)| (k, e.expires_at)));
        cursor = page.next;
        if cursor.is_none() {
            break;
        }
    }
    seen.sort();
    let want: Vec<(String, u64)> =
        (0..25).map(|i| (format!("p/{i:02}"), T0 + 100)).chain([("counter".to_string(), T0 + 3600)]).collect::<Vec<_>>();
    let mut want = want;
    want.sort();
    assert_eq!(seen, want, "every live entry once, the expired one left out");

    // Reading several keys answers as reading each: live, missing, expired,
    // deleted, repeated, in the order asked; with a write-behind store, some
    // from the file (flushed) and some from what is not written yet.
    store.flush().await.unwrap();
    store.set("m/deleted", b"v", T0 + 100, Condition::Any, T0).await.unwrap();
    assert!(store.delete("m/deleted", Condition::Any, T0).await.unwrap());
    let keys: Vec<String> = ["p/03", "m/missing", "p/dead", "m/deleted", "counter", "p/03", "p/24"].iter().map(|k| k.to_string()).collect();
    let many = store.get_many(&keys, T0 + 50).await.unwrap();
    let mut each = Vec::new();
    for k in &keys {
        each.push(store.get(k, T0 + 50).await.unwrap());
    }
    assert_eq!(many, each, "get_many answers as get does for {keys:?}");
    assert_eq!(many.iter().map(Option::is_some).collect::<Vec<_>>(), [true, false, false, false, true, true, true]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_store_suite() {
    suite(Arc::new(MemoryStore::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redb_store_suite() {
    let dir = tempfile::tempdir().unwrap();
    suite(Arc::new(RedbStore::open(&dir.path().join("periodic.db"), Durability::Periodic).unwrap())).await;
    suite(Arc::new(RedbStore::open(&dir.path().join("immediate.db"), Durability::Immediate).unwrap())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_store_suite() {
    let redis = RedisServer::start();
    let store = RedisStore::open(RedisConfig { timeout: std::time::Duration::from_secs(2), ..RedisConfig::new(redis.url()) }).unwrap();
    suite(Arc::new(store)).await;
    // A second deployment on the same server sees none of it.
    let other = RedisStore::open(RedisConfig {
        prefix: "other:".into(),
        timeout: std::time::Duration::from_secs(2),
        ..RedisConfig::new(redis.url())
    })
    .unwrap();
    assert_eq!(other.get("counter", T0).await.unwrap(), None);
    // Redis expires the records itself, `exp - now` seconds after the write.
    let ttl: i64 = redis.cli(&["TTL", "greyhook:counter"]).trim().parse().unwrap();
    assert!((3590..=3600).contains(&ttl), "{ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_cluster_store_suite() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start).await.unwrap();
    let store = RedisStore::open(RedisConfig { timeout: std::time::Duration::from_secs(2), ..RedisConfig::new(cluster.url()) }).unwrap();
    suite(Arc::new(store)).await;
    // The records are spread over the nodes.
    let per_node: Vec<usize> = cluster.nodes.iter().map(|n| n.cli(&["DBSIZE"]).trim().parse().unwrap()).collect();
    assert!(per_node.iter().filter(|n| **n > 0).count() >= 2, "{per_node:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn filter_cas_through_wasm_loses_no_update() {
    // Many concurrent hook calls of the chaos filter's CAS counter, through
    // the real host imports and every backend.
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start();
    let stores: Vec<Arc<dyn Store>> = vec![
        Arc::new(MemoryStore::new()),
        Arc::new(RedbStore::open(&dir.path().join("c.db"), Durability::Periodic).unwrap()),
        Arc::new(RedisStore::open(RedisConfig { timeout: std::time::Duration::from_secs(2), ..RedisConfig::new(redis.url()) }).unwrap()),
    ];
    // Eight callers on one key retry a lot (more over the network): room
    // for the retries, so the test is about lost updates, not limits.
    let options = greyhook::FilterOptions {
        namespace: Some("chaos".into()),
        limits: greyhook::Limits { store_calls: 10_000, deadline: std::time::Duration::from_secs(20), ..Default::default() },
        ..Default::default()
    };
    for store in stores {
        let rt = runtime();
        let f = load_on(&rt, CHAOS_FILTER, options.clone(), store.clone()).await.unwrap();
        let mut handles = Vec::new();
        for _ in 0..8 {
            let f = f.clone();
            handles.push(tokio::spawn(async move {
                for _ in 0..40 {
                    let c = Client::new(&f, "192.0.2.1", T0);
                    let v = f.try_on_rcpt(&c.ctx(), "counter@x").await.unwrap();
                    assert_eq!(v.add_headers.len(), 1, "{v:?}");
                }
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
        let e = store.get("chaos/counter", T0).await.unwrap().unwrap();
        assert_eq!(e.value, b"320");
    }
}

/// In one process: a flushed record is read back after the store is
/// closed and opened again, and a second opener is refused while the first
/// holds the file. (A real daemon killed and restarted on its file:
/// `storefault::records_survive_a_restart_of_the_daemon`.)
#[tokio::test]
async fn redb_reads_back_a_flushed_record_after_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("greyhook.db");
    {
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(&path, Durability::Periodic).unwrap());
        let f = reference_on(&runtime(), "delay = 60", store.clone()).await;
        let mut c = Client::new(&f, "192.0.2.1", T0);
        assert_eq!(retry(&c.attempt("a@x.org", "b@y.org").await), Some(60));
        store.flush().await.unwrap();
        // A second process cannot open it while this one has it.
        assert!(RedbStore::open(&path, Durability::Periodic).is_err());
    }
    let store: Arc<dyn Store> = Arc::new(RedbStore::open(&path, Durability::Periodic).unwrap());
    let f = reference_on(&runtime(), "delay = 60", store).await;
    let mut c = Client::new(&f, "192.0.2.1", T0 + 30);
    assert_eq!(retry(&c.attempt("a@x.org", "b@y.org").await), Some(30), "the record survived the restart");
    c.now = T0 + 60;
    assert!(passes(&c.attempt("a@x.org", "b@y.org").await));
}

/// Another writer on a shared Redis can put anything under a key: what
/// reaches the filter is held to the store's value limit, and the call is
/// answered by the failure policy instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_record_from_a_shared_store_never_reaches_the_filter() {
    let redis = RedisServer::start();
    let store: Arc<dyn Store> =
        Arc::new(RedisStore::open(RedisConfig { timeout: std::time::Duration::from_secs(2), ..RedisConfig::new(redis.url()) }).unwrap());
    let big = "9".repeat(100_000);
    let exp = (T0 + 3600).to_string();
    redis.cli(&["HSET", "greyhook:chaos/counter", "v", &big, "ver", "7", "exp", &exp]);
    let f = load_on(&runtime(), CHAOS_FILTER, greyhook::FilterOptions { namespace: Some("chaos".into()), ..Default::default() }, store)
        .await
        .unwrap();
    let c = Client::new(&f, "192.0.2.1", T0);
    let e = f.try_on_rcpt(&c.ctx(), "counter@x").await.unwrap_err();
    assert!(e.to_string().contains("100000 bytes"), "{e}");
    assert!(passes(&f.on_rcpt(&c.ctx(), "counter@x").await), "the failure policy (continue) answers");
}

/// Compare-and-swap on the redb store while flushes move records from the
/// overlay into the file under the writers' feet (a write reads the file
/// outside the overlay's lock): no update is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redb_cas_loses_no_update_while_flushes_run() {
    let dir = tempfile::tempdir().unwrap();
    let redb = RedbStore::open(&dir.path().join("f.db"), Durability::Periodic).unwrap();
    // Expired records for a sweep to commit batches of meanwhile: the
    // sweep and the flushes both take the read snapshot again after they
    // commit, and a snapshot older than the last flush would hide records.
    redb.import((0..30_000).map(|i| (format!("old{i}"), vec![b'x'; 8], T0 - 1))).unwrap();
    let store: Arc<dyn Store> = Arc::new(redb);
    let flusher = {
        let store = store.clone();
        tokio::spawn(async move {
            for _ in 0..200 {
                store.flush().await.unwrap();
                tokio::task::yield_now().await;
            }
        })
    };
    let sweeper = {
        let store = store.clone();
        tokio::spawn(async move { store.sweep(T0).await.unwrap() })
    };
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..50 {
                    cas_increment(&*store, &format!("k{}", i % 5)).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    flusher.await.unwrap();
    assert_eq!(sweeper.await.unwrap(), 30_000, "the sweep removed every expired record");
    let mut total = 0;
    for i in 0..5 {
        let e = store.get(&format!("k{i}"), T0).await.unwrap().unwrap();
        total += String::from_utf8(e.value).unwrap().parse::<u64>().unwrap();
    }
    assert_eq!(total, 400, "8 tasks × 50 increments");
}

/// A sweep of many expired records runs off the runtime's threads and in
/// short transactions: with one runtime worker, a task that ticks every
/// millisecond keeps ticking during it, and writes go on (found: the sweep
/// ran inline on a worker, 11.6 s for 640k records, and a write that met a
/// full overlay flushed behind it).
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_redb_sweep_does_not_stop_the_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let redb = RedbStore::open(&dir.path().join("s.db"), Durability::Periodic).unwrap();
    let n = 200_000u64;
    let imported = redb.import((0..n).map(|i| (format!("r{i:08}"), vec![b'x'; 40], if i % 2 == 0 { T0 - 1 } else { T0 + 3600 }))).unwrap();
    assert_eq!(imported, n);
    let store: Arc<dyn Store> = Arc::new(redb);
    let sweep = {
        let store = store.clone();
        tokio::spawn(async move {
            let t = std::time::Instant::now();
            let swept = store.sweep(T0).await.unwrap();
            (swept, t.elapsed())
        })
    };
    // The writer is a task too, so it competes with the sweep for the one
    // worker (the test's own body runs on another thread).
    let writer = {
        let store = store.clone();
        let done = sweep.abort_handle();
        tokio::spawn(async move {
            let mut worst = std::time::Duration::ZERO;
            let mut writes = 0u64;
            let mut last = std::time::Instant::now();
            while !done.is_finished() {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                let key = format!("w{writes}");
                assert!(matches!(store.set(&key, b"v", T0 + 60, Condition::Absent, T0).await.unwrap(), WriteOutcome::Written(_)));
                writes += 1;
                worst = worst.max(last.elapsed());
                last = std::time::Instant::now();
            }
            (writes, worst)
        })
    };
    let (writes, worst) = writer.await.unwrap();
    let (swept, took) = sweep.await.unwrap();
    assert_eq!(swept, n / 2, "every expired record swept");
    assert_eq!(store.get("r00000001", T0).await.unwrap().map(|e| e.value.len()), Some(40), "live records kept");
    assert_eq!(store.get("r00000000", T0 - 10).await.unwrap(), None, "expired records gone from the file");
    eprintln!("swept {swept} in {took:?}; {writes} writes meanwhile, longest gap {worst:?}");
    assert!(writes >= 5, "writes went on during a {took:?} sweep ({writes})");
    assert!(worst < std::time::Duration::from_millis(500), "the runtime stalled {worst:?} during the sweep");
}
