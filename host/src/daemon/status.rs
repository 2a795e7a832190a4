//! What `greyhook status` says: gathered once into [`Status`], rendered as
//! text for an operator or as JSON for scripts (the same facts both ways).

use std::sync::atomic::Ordering::Relaxed;
use std::time::SystemTime;

use serde::Serialize;

use super::Shared;
use crate::runtime::metrics::{BUCKETS, MetricValue};

/// The last reload of one filter (or the crash-loop breaker's revert).
#[derive(Debug, Clone, Serialize)]
pub(super) struct LastReload {
    /// When, RFC 3339.
    pub at: String,
    /// Whether the new version (or configuration) took effect.
    pub ok: bool,
    /// What happened (`loaded …`, `unchanged …`, `refused: …`, `reverted: …`).
    pub result: String,
}

impl LastReload {
    pub(super) fn now(ok: bool, result: impl Into<String>) -> LastReload {
        LastReload { at: rfc3339(SystemTime::now()), ok, result: result.into() }
    }
}

/// A wall-clock time as RFC 3339 (UTC, seconds).
fn rfc3339(t: SystemTime) -> String {
    crate::domain::clock::rfc3339(t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()))
}

#[derive(Debug, Serialize)]
struct FilterStatus {
    name: String,
    version: String,
    namespace: String,
    contract: String,
    /// The hooks it asked not to be called (contracts 0.2.2, 0.2.3), which the
    /// host answers for it.
    skipped_hooks: Vec<&'static str>,
    calls: u64,
    failures: u64,
    /// Instances made (a call that finds none idle makes one).
    instances: u64,
    last_reload: Option<LastReload>,
    metrics: Vec<serde_json::Value>,
    /// The metrics as `name{labels} value` (text only).
    #[serde(skip)]
    metrics_text: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Listener {
    name: String,
    addresses: Vec<String>,
    /// A front end's connections since start (none for the metrics and
    /// control listeners, or a front end on its MTA's pipe).
    connections: Option<ConnectionsStatus>,
}

/// A front end's connections (its `connections_*` metrics).
#[derive(Debug, Serialize)]
struct ConnectionsStatus {
    /// In hand now.
    active: i64,
    /// Accepted since start.
    total: u64,
    /// Refused because every slot (`max_connections`) was taken.
    refused: u64,
    /// Refused because their client held `max_connections_per_client`.
    refused_per_client: u64,
}

impl ConnectionsStatus {
    fn of(front_end: &'static str) -> ConnectionsStatus {
        let m = crate::telemetry::host();
        let label = crate::telemetry::FrontEndLabel { front_end };
        // Looked up without making a series (a front end with no
        // per-client limit has no `client_limit_refusals_total`).
        let count = |f: &prometheus_client::metrics::family::Family<_, prometheus_client::metrics::counter::Counter>| {
            f.get(&label).map_or(0, |c| c.get())
        };
        ConnectionsStatus {
            active: m.connections_active.get(&label).map_or(0, |g| g.get()),
            total: count(&m.connections),
            refused: count(&m.connections_refused),
            refused_per_client: count(&m.client_limit_refusals),
        }
    }
}

#[derive(Debug, Serialize)]
struct StoreStatus {
    kind: String,
    path: String,
    size_bytes: Option<u64>,
    records: Option<u64>,
    health: &'static str,
    failures: u64,
}

#[derive(Debug, Serialize)]
struct DnsStatus {
    lookups: u64,
    failures: u64,
    cut_by_deadline: u64,
}

/// The process's file descriptors: open now, the limit, and what the
/// connection limits let peers hold (see `docs/operating.md`, "Open files").
#[derive(Debug, Serialize)]
struct FilesStatus {
    open: Option<u64>,
    limit: Option<u64>,
    needed: u64,
}

/// A TLS certificate in use and when it expires.
#[derive(Debug, Serialize)]
struct CertificateStatus {
    /// `smtp` (STARTTLS) or `redis` (the store's client certificate).
    role: &'static str,
    path: String,
    /// RFC 3339.
    expires_at: String,
    /// Whole days left (negative once expired).
    days_left: i64,
}

/// The compiled-filter cache: where, and what it holds now.
#[derive(Debug, Serialize)]
struct CompiledFiltersStatus {
    /// `None`: filters are compiled at every start.
    dir: Option<String>,
    artifacts: u64,
    size_bytes: u64,
}

impl CompiledFiltersStatus {
    fn of(dir: Option<&std::path::Path>) -> CompiledFiltersStatus {
        let (mut artifacts, mut size_bytes) = (0, 0);
        for e in dir.and_then(|d| std::fs::read_dir(d).ok()).into_iter().flatten().flatten() {
            if e.path().extension().is_some_and(|x| x == "cwasm") {
                artifacts += 1;
                size_bytes += e.metadata().map_or(0, |m| m.len());
            }
        }
        CompiledFiltersStatus { dir: dir.map(|d| d.display().to_string()), artifacts, size_bytes }
    }
}

/// Everything `status` reports.
#[derive(Debug, Serialize)]
pub(super) struct Status {
    version: &'static str,
    started_at: String,
    uptime_seconds: u64,
    listeners: Vec<Listener>,
    store: StoreStatus,
    dns: DnsStatus,
    files: FilesStatus,
    /// The process's resident memory (`None` without `/proc`).
    memory: Option<super::memory::Resident>,
    certificates: Vec<CertificateStatus>,
    compiled_filters: CompiledFiltersStatus,
    /// Log lines dropped because the log's reader fell behind.
    log_lines_dropped: u64,
    decisions: serde_json::Map<String, serde_json::Value>,
    /// The last 24 hours: each hour with decisions, by action.
    last_day: Vec<HourStatus>,
    filters: Vec<FilterStatus>,
}

#[derive(Debug, Serialize)]
struct HourStatus {
    /// The hour's start, RFC 3339.
    hour: String,
    decisions: serde_json::Map<String, serde_json::Value>,
}

fn metric_json(m: crate::runtime::metrics::MetricSample) -> serde_json::Value {
    let labels: serde_json::Map<String, serde_json::Value> = m.labels.into_iter().map(|(k, v)| (k, v.into())).collect();
    let value = match m.value {
        MetricValue::Counter(n) => serde_json::json!(n),
        MetricValue::Histogram { count, sum, buckets } => {
            let bounds: Vec<serde_json::Value> = BUCKETS.iter().map(|b| serde_json::json!(b)).chain([serde_json::json!("+Inf")]).collect();
            serde_json::json!({ "count": count, "sum": sum, "bounds": bounds, "buckets": buckets })
        }
    };
    serde_json::json!({ "name": m.name, "labels": labels, "value": value })
}

impl Status {
    /// Reads the daemon's state now.
    pub(super) fn gather(shared: &Shared) -> Status {
        let reloads = shared.last_reload.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let filters = shared
            .reloaders
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let f = r.filter();
                let samples = f.metrics().snapshot();
                FilterStatus {
                    name: f.info().name.clone(),
                    version: f.info().version.clone(),
                    namespace: f.namespace().to_string(),
                    contract: f.contract().version().to_string(),
                    skipped_hooks: f.skipped().names(),
                    calls: f.stats().calls.load(Relaxed),
                    failures: f.stats().failures.load(Relaxed),
                    instances: f.stats().instances.load(Relaxed),
                    last_reload: reloads.get(i).cloned().flatten(),
                    metrics_text: samples.iter().map(|m| m.render()).collect(),
                    metrics: samples.into_iter().map(metric_json).collect(),
                }
            })
            .collect();
        let dns = shared.resolver.stats();
        let store = StoreStatus {
            kind: shared.store_kind.to_string(),
            path: shared.store_desc.clone(),
            size_bytes: shared.store_size(),
            records: shared.records(),
            health: if shared.store.degraded() { "degraded" } else { "ok" },
            failures: shared.store.failures(),
        };
        let decisions = crate::telemetry::host().decisions_by_action().into_iter().map(|(a, n)| (a.to_string(), n.into())).collect();
        Status {
            version: env!("CARGO_PKG_VERSION"),
            started_at: rfc3339(shared.started_at),
            uptime_seconds: shared.started.elapsed().as_secs(),
            listeners: shared
                .listeners
                .iter()
                .map(|l| Listener {
                    name: l.name.to_string(),
                    addresses: l.addresses.clone(),
                    connections: l.front_end.then(|| ConnectionsStatus::of(l.name)),
                })
                .collect(),
            store,
            dns: DnsStatus {
                lookups: dns.lookups.load(Relaxed),
                failures: dns.failures.load(Relaxed),
                cut_by_deadline: dns.detached.load(Relaxed),
            },
            files: FilesStatus { open: super::files::open_now(), limit: super::files::limit_now(), needed: shared.files_needed },
            memory: super::memory::resident_now(),
            certificates: crate::pem::in_use()
                .into_iter()
                .map(|(role, path, not_after)| CertificateStatus {
                    role,
                    path,
                    expires_at: crate::domain::clock::rfc3339(not_after.max(0) as u64),
                    days_left: crate::pem::days_left(not_after),
                })
                .collect(),
            compiled_filters: CompiledFiltersStatus::of(shared.compiled_filters.as_deref()),
            log_lines_dropped: crate::telemetry::dropped_log_lines(),
            decisions,
            last_day: crate::telemetry::host()
                .last_day()
                .into_iter()
                .map(|(h, counts)| HourStatus {
                    hour: crate::domain::clock::rfc3339(h),
                    decisions: crate::telemetry::ACTIONS.iter().zip(counts).map(|(a, n)| (a.to_string(), n.into())).collect(),
                })
                .collect(),
            filters,
        }
    }

    /// One line of JSON.
    pub(super) fn json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":{:?}}}", e.to_string()))
    }

    /// Lines for an operator.
    pub(super) fn text(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let up = self.uptime_seconds;
        let _ = writeln!(
            out,
            "greyhook {}, up {}d {:02}h{:02}m{:02}s (since {})",
            self.version,
            up / 86_400,
            up / 3600 % 24,
            up / 60 % 60,
            up % 60,
            self.started_at
        );
        for l in &self.listeners {
            let counts = l.connections.as_ref().map_or(String::new(), |c| {
                format!(
                    " connections active={} total={} refused={} refused_per_client={}",
                    c.active, c.total, c.refused, c.refused_per_client
                )
            });
            let _ = writeln!(
                out,
                "listener {}: {}{counts}",
                l.name,
                if l.addresses.is_empty() { "(its MTA's pipe)".into() } else { l.addresses.join(", ") }
            );
        }
        let s = &self.store;
        let size = s.size_bytes.map_or(String::new(), |b| format!(" size={b}"));
        let records = s.records.map_or(String::new(), |n| format!(" records={n}"));
        let _ = writeln!(out, "store {}: {}{size}{records} health={} store_failures={}", s.kind, s.path, s.health, s.failures);
        let _ =
            writeln!(out, "dns lookups={} failures={} cut_by_deadline={}", self.dns.lookups, self.dns.failures, self.dns.cut_by_deadline);
        let show = |n: Option<u64>| n.map_or_else(|| "unknown".to_string(), |n| n.to_string());
        let f = &self.files;
        let limit = f.limit.map_or_else(|| "unlimited".to_string(), |n| n.to_string());
        let _ = writeln!(out, "files open={} limit={limit} needed={}", show(f.open), f.needed);
        if let Some(m) = &self.memory {
            let _ = writeln!(out, "memory resident={} peak={}", m.bytes, m.peak_bytes);
        }
        for c in &self.certificates {
            let left = if c.days_left < 0 { "expired".to_string() } else { format!("{} days left", c.days_left) };
            let _ = writeln!(out, "certificate {}: {} expires {} ({left})", c.role, c.path, c.expires_at);
        }
        let c = &self.compiled_filters;
        let _ = match &c.dir {
            Some(d) => writeln!(out, "compiled filters: {d} artifacts={} size={}", c.artifacts, c.size_bytes),
            None => writeln!(out, "compiled filters: not cached"),
        };
        if self.log_lines_dropped > 0 {
            let _ = writeln!(out, "log lines dropped={} (the log's reader fell behind)", self.log_lines_dropped);
        }
        let d: Vec<String> = self.decisions.iter().map(|(a, n)| format!("{a}={n}")).collect();
        let _ = writeln!(out, "decisions {}", d.join(" "));
        for f in &self.filters {
            let _ = writeln!(
                out,
                "filter {} {} namespace={} contract={} skips={} calls={} failures={} instances={}",
                f.name,
                f.version,
                f.namespace,
                f.contract,
                if f.skipped_hooks.is_empty() { "none".to_string() } else { f.skipped_hooks.join(",") },
                f.calls,
                f.failures,
                f.instances
            );
            match &f.last_reload {
                Some(r) => {
                    let _ = writeln!(out, "  last reload {}: {}", r.at, r.result);
                }
                None => {
                    let _ = writeln!(out, "  last reload: none since start");
                }
            }
            if !f.metrics_text.is_empty() {
                let _ = writeln!(out, "  metrics {}", f.metrics_text.join(", "));
            }
        }
        out.trim_end().to_string()
    }
}
