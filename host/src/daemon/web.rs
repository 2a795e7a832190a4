//! The metrics listener (`[metrics] listen`, `--metrics`): `GET /metrics`
//! in the Prometheus text format, `GET /` a small self-contained status
//! page (what `greyhook status` says, no external assets), over HTTP/1.1
//! with hyper.
//!
//! It is for a scraper on the same host or network, not for the world: it
//! refuses a non-loopback address unless `public = true`, holds at most
//! `max_connections` at once, gives each connection 10 s, and reads no
//! request body.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::status::Status;
use crate::telemetry::{FnCollector, encode_family, encode_filter_metrics, encode_value};

/// The `[metrics]` table: where the metrics and the status page are served.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `HOST:PORT` to serve on (e.g. `127.0.0.1:9640`); unset: off.
    pub listen: Option<SocketAddr>,
    /// Allow an address that is not loopback (the page and the metrics
    /// name filters, listeners and counts: keep them off the Internet).
    pub public: bool,
    /// Most connections at once (1 to 1024).
    pub max_connections: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { listen: None, public: false, max_connections: 16 }
    }
}

/// Why the metrics listener cannot start.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    /// A setting is refused.
    #[error("[metrics] {0}")]
    Invalid(String),
    /// The address cannot be bound.
    #[error("[metrics] cannot listen on {addr}: {error}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        error: std::io::Error,
    },
}

/// Binds the metrics listener, if configured.
pub(super) async fn bind(config: &MetricsConfig) -> Result<Option<tokio::net::TcpListener>, WebError> {
    let Some(addr) = config.listen else { return Ok(None) };
    if !addr.ip().is_loopback() && !config.public {
        return Err(WebError::Invalid(format!(
            "listen = \"{addr}\" is not a loopback address: set public = true to serve metrics beyond this host"
        )));
    }
    if !(1..=1024).contains(&config.max_connections) {
        return Err(WebError::Invalid("max_connections must be 1 to 1024".into()));
    }
    tokio::net::TcpListener::bind(addr).await.map(Some).map_err(|error| WebError::Bind { addr, error })
}

/// Serves until `shutdown`.
pub(super) async fn serve(listener: tokio::net::TcpListener, max: usize, shared: Arc<Shared>, shutdown: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(max));
    let mut failures = crate::frontend::listen::AcceptFailures::new("metrics");
    loop {
        let (stream, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    failures.failed(&e).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        // Past the limit a connection is closed at once: a scraper retries.
        let Ok(permit) = slots.clone().try_acquire_owned() else { continue };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(respond(&req, &shared)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .max_buf_size(16 * 1024)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(Duration::from_secs(10), conn).await;
            drop(permit);
        });
    }
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r.headers_mut().insert(hyper::header::CACHE_CONTROL, hyper::header::HeaderValue::from_static("no-store"));
    r
}

fn respond<B>(req: &Request<B>, shared: &Arc<Shared>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n".into());
    }
    match req.uri().path() {
        "/metrics" => match metrics_text(shared) {
            Ok(text) => reply(StatusCode::OK, crate::telemetry::CONTENT_TYPE, text),
            Err(_) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", "cannot encode the metrics\n".into()),
        },
        "/" => reply(StatusCode::OK, "text/html; charset=utf-8", super::page::render(&Status::gather(shared))),
        "/status.json" => reply(StatusCode::OK, "application/json", Status::gather(shared).json()),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found: /metrics, / or /status.json\n".into()),
    }
}

/// The daemon's metrics: the host's counters, then what is read at scrape
/// time (uptime, filters, store, resolver).
pub(super) fn metrics_text(shared: &Arc<Shared>) -> Result<String, std::fmt::Error> {
    let s = shared.clone();
    let daemon = FnCollector(move |e: &mut DescriptorEncoder| {
        use std::sync::atomic::Ordering::Relaxed;
        encode_family(
            e,
            "build_info",
            "The running greyhook's version",
            MetricType::Gauge,
            &[(vec![("version".into(), env!("CARGO_PKG_VERSION").into())], 1.0)],
        )?;
        encode_value(e, "uptime_seconds", "Seconds since the daemon started", MetricType::Gauge, s.started.elapsed().as_secs_f64())?;
        encode_value(
            e,
            "log_lines_dropped",
            "Log lines dropped because the log's reader fell behind ([log] queue_lines were waiting)",
            MetricType::Counter,
            crate::telemetry::dropped_log_lines() as f64,
        )?;
        let filters: Vec<_> = s.reloaders.iter().map(|r| r.filter()).collect();
        let label = |f: &crate::runtime::Filter| vec![("filter".to_string(), f.info().name.clone())];
        let info: Vec<_> = filters
            .iter()
            .map(|f| {
                let mut l = label(f);
                l.push(("version".into(), f.info().version.clone()));
                l.push(("namespace".into(), f.namespace().to_string()));
                l.push(("contract".into(), f.contract().version().to_string()));
                (l, 1.0)
            })
            .collect();
        encode_family(e, "filter_info", "Each filter serving now", MetricType::Gauge, &info)?;
        let calls: Vec<_> = filters.iter().map(|f| (label(f), f.stats().calls.load(Relaxed) as f64)).collect();
        encode_family(e, "filter_calls", "Hook calls made to each filter", MetricType::Counter, &calls)?;
        let instances: Vec<_> = filters.iter().map(|f| (label(f), f.stats().instances.load(Relaxed) as f64)).collect();
        encode_family(
            e,
            "filter_instances",
            "Instances each filter made (a call that finds none idle makes one)",
            MetricType::Counter,
            &instances,
        )?;
        let samples: Vec<_> = filters.iter().map(|f| (f.info().name.clone(), f.metrics().snapshot())).collect();
        encode_filter_metrics(e, &samples)?;
        let dns = s.resolver.stats();
        encode_value(e, "dns_lookups", "DNS lookups and checks asked for", MetricType::Counter, dns.lookups.load(Relaxed) as f64)?;
        encode_value(e, "dns_failures", "DNS lookups that failed", MetricType::Counter, dns.failures.load(Relaxed) as f64)?;
        encode_value(
            e,
            "dns_cut_by_deadline",
            "DNS lookups a hook's deadline cut off (left to fill the cache)",
            MetricType::Counter,
            dns.detached.load(Relaxed) as f64,
        )?;
        encode_value(e, "store_failures", "Store calls the backend failed since start", MetricType::Counter, s.store.failures() as f64)?;
        encode_value(
            e,
            "store_degraded",
            "1 while records the backend could not write wait in memory",
            MetricType::Gauge,
            if s.store.degraded() { 1.0 } else { 0.0 },
        )?;
        if let Some(open) = super::files::open_now() {
            encode_value(e, "open_files", "File descriptors open now", MetricType::Gauge, open as f64)?;
        }
        if let Some(limit) = super::files::limit_now() {
            encode_value(e, "open_files_limit", "The open-files limit (soft)", MetricType::Gauge, limit as f64)?;
        }
        encode_value(
            e,
            "open_files_needed",
            "File descriptors the connection limits let peers hold, with the reserve",
            MetricType::Gauge,
            s.files_needed as f64,
        )?;
        if let Some(m) = super::memory::resident_now() {
            encode_value(e, "resident_memory_bytes", "Memory resident now", MetricType::Gauge, m.bytes as f64)?;
            encode_value(e, "resident_memory_peak_bytes", "The most memory resident since start", MetricType::Gauge, m.peak_bytes as f64)?;
        }
        if let Some(records) = s.records() {
            encode_value(e, "store_records", "Live records at the last count (each sweep)", MetricType::Gauge, records as f64)?;
        }
        if let Some(size) = s.store_size() {
            encode_value(e, "store_size_bytes", "The store file's size", MetricType::Gauge, size as f64)?;
        }
        Ok(())
    });
    crate::telemetry::encode(vec![Box::new(daemon)])
}
