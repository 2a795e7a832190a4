//! The host's own metrics, in the Prometheus text format through the
//! `prometheus-client` crate: decisions, filter failures, connections,
//! store operations, DNS lookups and reloads, counted where they happen,
//! plus (at scrape time) what the daemon and its filters report.
//!
//! The counters are **one set per process** ([`host`]), as with the
//! `metrics` crate's global recorder: an MTA that embeds two daemons in
//! one process sees their sum. [`encode`] renders them with any extra
//! [`Collector`] (the daemon adds its filters', store's and resolver's).
//!
//! Every label value here comes from the host (front-end, phase, action,
//! filter and operation names), never from a peer, so the number of series
//! is bounded by the configuration; a filter's own metrics are bounded by
//! [`crate::runtime::metrics::MAX_SERIES`].

use std::sync::LazyLock;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::runtime::metrics::{BUCKETS, MetricSample, MetricValue};

/// The `Content-Type` of what [`encode`] writes.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Labels of [`HostMetrics::decisions`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// The front end (`policy`, `milter`, `smtp`, `opensmtpd`, or
    /// `embedded` for an MTA that drives sessions itself).
    pub front_end: &'static str,
    /// The SMTP phase.
    pub phase: &'static str,
    /// The action as the decision log names it (`greylist`, `pass`, ...).
    pub action: &'static str,
}

/// Labels of [`HostMetrics::filter_failures`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// The filter's name.
    pub filter: String,
    /// `trap`, `deadline`, `invalid_verdict`, `store` (a store failure or
    /// a store limit) or `instantiate` (no instance could be made).
    pub kind: &'static str,
}

/// A label set of one filter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FilterLabel {
    /// The filter's name.
    pub filter: String,
}

/// A label set of one front end.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FrontEndLabel {
    /// The front end's name.
    pub front_end: &'static str,
}

/// Labels of [`HostMetrics::proxy_refusals`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// The front end's name.
    pub front_end: &'static str,
    /// Why: `untrusted`, `malformed`, `timeout` or `closed`.
    pub reason: &'static str,
}

/// A label set of one store operation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    /// `get`, `set`, `delete`, `get_many`, `set_many`, `sweep`, `flush`, `scan`, `count`.
    pub op: &'static str,
}

/// A label set of one certificate's use.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabel {
    /// `smtp` (STARTTLS's certificate) or `redis` (the store's client certificate).
    pub role: &'static str,
}

/// A label set of one result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `loaded`, `unchanged`, `refused`, or `reverted` (the crash-loop breaker).
    pub result: &'static str,
}

/// Latency buckets, seconds: 50 µs to 5 s.
const LATENCY_BUCKETS: [f64; 12] = [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0, 5.0];

fn latency() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// What the host counts (see the module documentation; names as exported,
/// each with the `greyhook_` prefix).
#[derive(Debug)]
pub struct HostMetrics {
    /// `decisions_total{front_end,phase,action}`: every decision made.
    pub decisions: Family<DecisionLabels, Counter>,
    /// `filter_failures_total{filter,kind}`: calls the failure policy answered.
    pub filter_failures: Family<FailureLabels, Counter>,
    /// `breaker_trips_total{filter}`: versions the crash-loop breaker reverted.
    pub breaker_trips: Family<FilterLabel, Counter>,
    /// `connections_total{front_end}`: connections accepted.
    pub connections: Family<FrontEndLabel, Counter>,
    /// `connections_refused_total{front_end}`: refused for the connection limit.
    pub connections_refused: Family<FrontEndLabel, Counter>,
    /// `client_limit_refusals_total{front_end}`: connections refused
    /// because their client held its `max_connections_per_client`.
    pub client_limit_refusals: Family<FrontEndLabel, Counter>,
    /// `proxy_refusals_total{front_end,reason}`: connections closed
    /// for want of a valid PROXY protocol header (`[smtp] proxy_protocol`).
    pub proxy_refusals: Family<ReasonLabels, Counter>,
    /// `connections_active{front_end}`: connections in hand now.
    pub connections_active: Family<FrontEndLabel, Gauge>,
    /// `accept_failures_total{front_end}`: accepts that failed (the
    /// process or the machine out of file descriptors or buffers); the
    /// control and metrics listeners count as `control` and `metrics`.
    pub accept_failures: Family<FrontEndLabel, Counter>,
    /// `store_operation_seconds{op}`: each store operation's latency (its
    /// `_count` is the number of operations).
    pub store_latency: Family<OpLabel, Histogram, fn() -> Histogram>,
    /// `store_operation_failures_total{op}`: operations the backend failed.
    pub store_failures: Family<OpLabel, Counter>,
    /// `dns_lookup_seconds`: how long each DNS lookup took (cache hits included).
    pub dns_latency: Histogram,
    /// `dns_cache_hits_total`: lookups answered from the cache.
    pub dns_cache_hits: Counter,
    /// `reloads_total{result}`: reloads by outcome, per filter.
    pub reloads: Family<ResultLabel, Counter>,
    /// `tls_certificate_expiry_timestamp_seconds{role}`: when the
    /// certificate in use expires, Unix seconds (alert on it minus `time()`).
    pub tls_expiry: Family<RoleLabel, Gauge>,
    /// `log_writes_total`: writes of the log to its file descriptor (each
    /// carries every line queued since the last; counted by the writer).
    pub log_writes: Counter,
    /// Decisions by action over every front end, for `greyhook status`.
    actions: [std::sync::atomic::AtomicU64; ACTIONS.len()],
    /// Decisions by action in each of the last 24 hours (the status page's chart).
    hours: [Hour; 24],
}

/// One hour's decisions by action; a slot is reused 24 hours later.
#[derive(Debug, Default)]
struct Hour {
    /// Which hour (Unix seconds / 3600) the counts are of.
    hour: std::sync::atomic::AtomicU64,
    counts: [std::sync::atomic::AtomicU64; ACTIONS.len()],
}

/// Where the count of dropped log lines comes from (the log's writer, set
/// up by the binary); unset, none are dropped.
static LOG_DROPPED: std::sync::OnceLock<Box<dyn Fn() -> u64 + Send + Sync>> = std::sync::OnceLock::new();

/// Names where the count of log lines dropped because the log's reader
/// fell behind comes from (`greyhook_log_lines_dropped_total`); the first
/// call wins.
pub fn count_dropped_log_lines_with(count: impl Fn() -> u64 + Send + Sync + 'static) {
    let _ = LOG_DROPPED.set(Box::new(count));
}

/// Log lines dropped so far because the log's reader fell behind.
pub fn dropped_log_lines() -> u64 {
    LOG_DROPPED.get().map_or(0, |f| f())
}

/// The actions a decision can have ([`crate::session::audit::action`]).
pub const ACTIONS: [&str; 6] = ["greylist", "pass", "dunno", "tempfail", "reject", "policy-group"];

impl HostMetrics {
    fn new() -> HostMetrics {
        HostMetrics {
            decisions: Family::default(),
            filter_failures: Family::default(),
            breaker_trips: Family::default(),
            connections: Family::default(),
            connections_refused: Family::default(),
            client_limit_refusals: Family::default(),
            proxy_refusals: Family::default(),
            connections_active: Family::default(),
            accept_failures: Family::default(),
            store_latency: Family::new_with_constructor(latency),
            store_failures: Family::default(),
            dns_latency: latency(),
            dns_cache_hits: Counter::default(),
            reloads: Family::default(),
            tls_expiry: Family::default(),
            log_writes: Counter::default(),
            actions: Default::default(),
            hours: Default::default(),
        }
    }

    /// Registers every metric in `r` (they are shared handles: counting
    /// goes on into the same values).
    fn register(&self, r: &mut Registry) {
        r.register("decisions", "Decisions by front end, SMTP phase and action", self.decisions.clone());
        r.register("filter_failures", "Filter calls answered by the failure policy, by kind", self.filter_failures.clone());
        r.register("breaker_trips", "Filter versions the crash-loop breaker reverted", self.breaker_trips.clone());
        r.register("connections", "Connections accepted, by front end", self.connections.clone());
        r.register("connections_refused", "Connections refused because every slot was taken", self.connections_refused.clone());
        r.register("client_limit_refusals", "Connections refused for max_connections_per_client", self.client_limit_refusals.clone());
        r.register(
            "proxy_refusals",
            "Connections closed for want of a valid PROXY header, by reason (untrusted, malformed, timeout, closed)",
            self.proxy_refusals.clone(),
        );
        r.register("connections_active", "Connections in hand now", self.connections_active.clone());
        r.register("accept_failures", "Failed accepts (out of file descriptors), by listener", self.accept_failures.clone());
        r.register("store_operation_seconds", "Store operations and their latency", self.store_latency.clone());
        r.register("store_operation_failures", "Store operations the backend failed", self.store_failures.clone());
        r.register("dns_lookup_seconds", "DNS lookups and their latency (cache hits included)", self.dns_latency.clone());
        r.register("dns_cache_hits", "DNS lookups answered from the cache", self.dns_cache_hits.clone());
        r.register("reloads", "Filter reloads by result", self.reloads.clone());
        r.register(
            "tls_certificate_expiry_timestamp_seconds",
            "When the certificate in use expires (Unix seconds), by role: smtp (STARTTLS), redis (the store's client certificate)",
            self.tls_expiry.clone(),
        );
        r.register("log_writes", "Writes of the log (each carries every line queued since the last)", self.log_writes.clone());
    }

    /// Counts a decision.
    pub fn decision(&self, front_end: &'static str, phase: &'static str, action: &'static str) {
        self.decision_counter(front_end, phase, action).inc();
        if let Some(i) = ACTIONS.iter().position(|a| *a == action) {
            use std::sync::atomic::Ordering::Relaxed;
            self.actions[i].fetch_add(1, Relaxed);
            let hour = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() / 3600);
            let slot = &self.hours[(hour % 24) as usize];
            let seen = slot.hour.load(Relaxed);
            // A new hour takes the slot over; the one thread that wins
            // clears it (a decision racing with the clearing may be lost:
            // this is a chart, the counters above are exact).
            if seen != hour && slot.hour.compare_exchange(seen, hour, Relaxed, Relaxed).is_ok() {
                for c in &slot.counts {
                    c.store(0, Relaxed);
                }
            }
            slot.counts[i].fetch_add(1, Relaxed);
        }
    }

    /// The counter of `decisions_total` for these labels. The family's
    /// `get_or_create` hashes the three labels (SipHash) and takes its lock
    /// at every decision (~570 instructions, several a message); each
    /// thread keeps the handles of the process's metrics ([`host`]) it has
    /// used instead (a handle shares the family's value; the label sets
    /// are few and fixed, the cache bounded).
    fn decision_counter(&self, front_end: &'static str, phase: &'static str, action: &'static str) -> Counter {
        type Key = [&'static str; 3];
        const MAX_CACHED: usize = 64;
        thread_local! {
            static CACHE: std::cell::RefCell<Vec<(Key, Counter)>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        if !std::ptr::eq(self, host()) {
            return self.decisions.get_or_create(&DecisionLabels { front_end, phase, action }).clone();
        }
        let key: Key = [front_end, phase, action];
        CACHE.with(|cache| {
            let mut cache = cache.borrow_mut();
            if let Some((_, c)) = cache.iter().find(|(k, _)| *k == key) {
                return c.clone();
            }
            let c = self.decisions.get_or_create(&DecisionLabels { front_end, phase, action }).clone();
            if cache.len() < MAX_CACHED {
                cache.push((key, c.clone()));
            }
            c
        })
    }

    /// The last 24 hours' decisions by action, oldest first: (hour start
    /// in Unix seconds, counts in [`ACTIONS`] order); hours with none are
    /// left out.
    pub fn last_day(&self) -> Vec<(u64, Vec<u64>)> {
        use std::sync::atomic::Ordering::Relaxed;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() / 3600);
        let mut out: Vec<(u64, Vec<u64>)> = self
            .hours
            .iter()
            .map(|h| (h.hour.load(Relaxed), h.counts.iter().map(|c| c.load(Relaxed)).collect::<Vec<u64>>()))
            .filter(|(h, c)| *h + 24 > now && *h <= now && c.iter().any(|n| *n > 0))
            .map(|(h, c)| (h * 3600, c))
            .collect();
        out.sort_by_key(|(h, _)| *h);
        out
    }

    /// Decisions so far by action, over every front end (each of [`ACTIONS`]).
    pub fn decisions_by_action(&self) -> Vec<(&'static str, u64)> {
        ACTIONS.iter().zip(&self.actions).map(|(a, n)| (*a, n.load(std::sync::atomic::Ordering::Relaxed))).collect()
    }
}

static HOST: LazyLock<HostMetrics> = LazyLock::new(HostMetrics::new);

/// The process's host metrics.
pub fn host() -> &'static HostMetrics {
    &HOST
}

/// Renders the host metrics and `extra` collectors in the Prometheus text
/// format (version 0.0.4), every name prefixed `greyhook_`.
pub fn encode(extra: Vec<Box<dyn Collector>>) -> Result<String, std::fmt::Error> {
    let mut r = Registry::with_prefix("greyhook");
    host().register(&mut r);
    for c in extra {
        r.register_collector(c);
    }
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &r)?;
    Ok(out)
}

/// Encodes one gauge or counter without labels from a collector.
pub fn encode_value(encoder: &mut DescriptorEncoder, name: &str, help: &str, kind: MetricType, value: f64) -> Result<(), std::fmt::Error> {
    let mut m = encoder.encode_descriptor(name, help, None, kind)?;
    match kind {
        MetricType::Counter => m.encode_counter::<prometheus_client::encoding::NoLabelSet, _, f64>(&value, None),
        _ => m.encode_gauge(&value),
    }
}

/// Encodes one family of values (counter or gauge) labelled by `labels`.
pub fn encode_family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    series: &[(Vec<(String, String)>, f64)],
) -> Result<(), std::fmt::Error> {
    if series.is_empty() {
        return Ok(());
    }
    let mut m = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in series {
        let mut s = m.encode_family(labels)?;
        match kind {
            MetricType::Counter => s.encode_counter::<prometheus_client::encoding::NoLabelSet, _, f64>(value, None)?,
            _ => s.encode_gauge(value)?,
        }
    }
    Ok(())
}

/// Encodes the metrics filters defined through the contract's `metrics`
/// import: each name as `greyhook_filter_NAME` (a trailing `_total` of a
/// counter's name is not doubled) with the filter's name as the `filter`
/// label. Two filters that use one name for different kinds: the first
/// kind wins, the other's series are left out.
pub fn encode_filter_metrics(encoder: &mut DescriptorEncoder, filters: &[(String, Vec<MetricSample>)]) -> Result<(), std::fmt::Error> {
    use std::collections::BTreeMap;
    let mut by_name: BTreeMap<String, Vec<(&str, &MetricSample)>> = BTreeMap::new();
    for (filter, samples) in filters {
        for s in samples {
            let base = match s.value {
                MetricValue::Counter(_) => s.name.strip_suffix("_total").unwrap_or(&s.name),
                MetricValue::Histogram { .. } => &s.name,
            };
            by_name.entry(format!("filter_{base}")).or_default().push((filter, s));
        }
    }
    for (name, series) in by_name {
        let Some((_, first)) = series.first() else { continue };
        let histogram = matches!(first.value, MetricValue::Histogram { .. });
        let kind = if histogram { MetricType::Histogram } else { MetricType::Counter };
        let help = format!("Defined by the filter ({})", first.name);
        let mut m = encoder.encode_descriptor(&name, &help, None, kind)?;
        for (filter, s) in series {
            let mut labels: Vec<(String, String)> = vec![("filter".to_string(), filter.to_string())];
            labels.extend(s.labels.iter().filter(|(k, _)| k != "filter").cloned());
            match &s.value {
                MetricValue::Counter(n) if !histogram => {
                    m.encode_family(&labels)?.encode_counter::<prometheus_client::encoding::NoLabelSet, _, f64>(n, None)?
                }
                MetricValue::Histogram { count, sum, buckets } if histogram => {
                    let pairs: Vec<(f64, u64)> = BUCKETS.iter().copied().chain([f64::INFINITY]).zip(buckets.iter().copied()).collect();
                    m.encode_family(&labels)?.encode_histogram::<prometheus_client::encoding::NoLabelSet>(*sum, *count, &pairs, None)?
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// A [`Collector`] from a closure, for values read at scrape time.
pub struct FnCollector<F>(pub F);

impl<F> std::fmt::Debug for FnCollector<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FnCollector")
    }
}

impl<F> Collector for FnCollector<F>
where
    F: Fn(&mut DescriptorEncoder) -> Result<(), std::fmt::Error> + Send + Sync + 'static,
{
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        (self.0)(&mut encoder)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decisions counted through a thread's cached handles land in the
    /// family's series, from every thread, label set by label set; another
    /// instance's are its own. (A front-end name of its own: other tests
    /// count into the process's metrics at the same time.)
    #[test]
    fn cached_decision_counters_count_into_the_family() {
        const FE: &str = "cache-test";
        let other = HostMetrics::new();
        other.decision(FE, "rcpt", "pass");
        let m = host();
        let value = |m: &HostMetrics, phase: &'static str| {
            m.decisions.get_or_create(&DecisionLabels { front_end: FE, phase, action: "pass" }).get()
        };
        for _ in 0..3 {
            m.decision(FE, "rcpt", "pass");
        }
        m.decision(FE, "data", "pass");
        std::thread::scope(|s| {
            s.spawn(|| m.decision(FE, "rcpt", "pass"));
        });
        assert_eq!((value(m, "rcpt"), value(m, "data")), (4, 1));
        assert_eq!((value(&other, "rcpt"), value(&other, "data")), (1, 0));
    }

    #[test]
    fn filter_metrics_are_prefixed_labelled_and_not_doubled() {
        let samples = vec![
            MetricSample { name: "triplets_total".into(), labels: vec![("outcome".into(), "new".into())], value: MetricValue::Counter(3) },
            MetricSample {
                name: "delay_seconds".into(),
                labels: vec![],
                value: MetricValue::Histogram {
                    count: 1,
                    sum: 300.0,
                    buckets: {
                        let mut b = vec![0; BUCKETS.len() + 1];
                        b[10] = 1;
                        b
                    },
                },
            },
        ];
        let text = encode(vec![Box::new(FnCollector(move |e: &mut DescriptorEncoder| {
            encode_filter_metrics(e, &[("greylist".to_string(), samples.clone())])
        }))])
        .unwrap();
        assert!(text.contains("greyhook_filter_triplets_total{filter=\"greylist\",outcome=\"new\"} 3"), "{text}");
        assert!(text.contains("greyhook_filter_delay_seconds_bucket{filter=\"greylist\",le=\"300\"} 1"), "{text}");
        assert!(text.contains("greyhook_filter_delay_seconds_count{filter=\"greylist\"} 1"), "{text}");
        assert!(!text.contains("_total_total"), "{text}");
    }
}
