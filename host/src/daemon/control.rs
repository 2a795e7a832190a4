//! The control socket `greyhook reload` and `greyhook status` talk to.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::frontend::listen::Listener;

/// The control socket: one command a connection (`reload` or `status`),
/// one line back.
pub(super) async fn control_service(listener: Listener, shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        let (conn, _) = tokio::select! {
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
            _ = shutdown.cancelled() => return,
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let (r, mut w) = tokio::io::split(conn);
            let mut line = String::new();
            let mut r = tokio::io::BufReader::new(r.take(256));
            let read = tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut line)).await;
            let reply = match (read, line.trim()) {
                (Ok(Ok(_)), "reload") => match shared.reload().await {
                    Ok(o) => format!("ok {o}\n"),
                    Err(e) => format!("refused {e}\n"),
                },
                (Ok(Ok(_)), "status") => {
                    let parts: Vec<String> = shared
                        .reloaders
                        .iter()
                        .map(|r| {
                            let f = r.filter();
                            let s = f.stats();
                            // What the filter counts itself (the `metrics` import).
                            let metrics: Vec<String> = f.metrics().snapshot().iter().map(|m| m.render()).collect();
                            format!(
                                "{} {} namespace={} contract={} calls={} failures={}{}",
                                f.info().name,
                                f.info().version,
                                f.namespace(),
                                f.contract().version(),
                                s.calls.load(std::sync::atomic::Ordering::Relaxed),
                                s.failures.load(std::sync::atomic::Ordering::Relaxed),
                                if metrics.is_empty() { String::new() } else { format!(" metrics=[{}]", metrics.join(", ")) }
                            )
                        })
                        .collect();
                    let health = if shared.store.degraded() { "degraded" } else { "ok" };
                    let dns = shared.resolver.stats();
                    let n = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
                    format!(
                        "ok {}; dns lookups={} failures={} cut_by_deadline={}; store={health} store_failures={}\n",
                        parts.join("; "),
                        n(&dns.lookups),
                        n(&dns.failures),
                        n(&dns.detached),
                        shared.store.failures()
                    )
                }
                (Ok(Ok(_)), "status json") => format!("ok {}\n", status_json(&shared)),
                _ => "error expected `reload`, `status` or `status json`\n".to_string(),
            };
            let _ = w.write_all(reply.as_bytes()).await;
        });
    }
}

/// `greyhook status --json`: what `status` says, for scripts — the version,
/// uptime, each filter with its counters and its own metrics (counters as
/// numbers, histograms as count, sum and buckets), the resolver's and the
/// store's counts. One line of JSON.
fn status_json(shared: &Shared) -> String {
    use crate::runtime::metrics::{BUCKETS, MetricValue};
    use std::sync::atomic::Ordering::Relaxed;
    let filters: Vec<serde_json::Value> = shared
        .reloaders
        .iter()
        .map(|r| {
            let f = r.filter();
            let metrics: Vec<serde_json::Value> = f
                .metrics()
                .snapshot()
                .into_iter()
                .map(|m| {
                    let labels: serde_json::Map<String, serde_json::Value> = m.labels.into_iter().map(|(k, v)| (k, v.into())).collect();
                    let value = match m.value {
                        MetricValue::Counter(n) => serde_json::json!(n),
                        MetricValue::Histogram { count, sum, buckets } => {
                            let bounds: Vec<serde_json::Value> =
                                BUCKETS.iter().map(|b| serde_json::json!(b)).chain([serde_json::json!("+Inf")]).collect();
                            serde_json::json!({ "count": count, "sum": sum, "bounds": bounds, "buckets": buckets })
                        }
                    };
                    serde_json::json!({ "name": m.name, "labels": labels, "value": value })
                })
                .collect();
            serde_json::json!({
                "name": f.info().name,
                "version": f.info().version,
                "namespace": f.namespace(),
                "contract": f.contract().version(),
                "calls": f.stats().calls.load(Relaxed),
                "failures": f.stats().failures.load(Relaxed),
                "metrics": metrics,
            })
        })
        .collect();
    let dns = shared.resolver.stats();
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": shared.started.elapsed().as_secs(),
        "filters": filters,
        "dns": { "lookups": dns.lookups.load(Relaxed), "failures": dns.failures.load(Relaxed), "cut_by_deadline": dns.detached.load(Relaxed) },
        "store": { "health": if shared.store.degraded() { "degraded" } else { "ok" }, "failures": shared.store.failures() },
    })
    .to_string()
}
