//! A [`Store`] that counts and times every operation of the store it
//! wraps (`greyhook_store_operation_seconds{op}`,
//! `greyhook_store_operation_failures_total{op}`): what the daemon puts in
//! front of whichever backend it opened, so a new backend is measured
//! without a line of its own.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

use super::{Condition, Entry, Page, Store, StoreError, Write, WriteOutcome};
use crate::telemetry::OpLabel;

/// Each operation's histogram and failure counter, taken once.
struct Op {
    latency: Histogram,
    failures: Counter,
}

impl Op {
    fn new(op: &'static str) -> Op {
        let m = crate::telemetry::host();
        Op {
            latency: m.store_latency.get_or_create_owned(&OpLabel { op }),
            failures: m.store_failures.get_or_create_owned(&OpLabel { op }),
        }
    }

    fn record<T>(&self, start: Instant, r: Result<T, StoreError>) -> Result<T, StoreError> {
        self.latency.observe(start.elapsed().as_secs_f64());
        if r.is_err() {
            self.failures.inc();
        }
        r
    }
}

/// Wraps a store with the operation metrics.
pub struct Metered {
    inner: Arc<dyn Store>,
    ops: [Op; 8],
}

const GET: usize = 0;
const SET: usize = 1;
const DELETE: usize = 2;
const GET_MANY: usize = 3;
const SET_MANY: usize = 4;
const SWEEP: usize = 5;
const FLUSH: usize = 6;
const SCAN: usize = 7;

impl Metered {
    /// `inner`, measured.
    pub fn new(inner: Arc<dyn Store>) -> Metered {
        let ops = ["get", "set", "delete", "get_many", "set_many", "sweep", "flush", "scan"].map(Op::new);
        Metered { inner, ops }
    }
}

#[async_trait]
impl Store for Metered {
    async fn get(&self, key: &str, now: u64) -> Result<Option<Entry>, StoreError> {
        let t = Instant::now();
        self.ops[GET].record(t, self.inner.get(key, now).await)
    }

    async fn set(&self, key: &str, value: &[u8], expires_at: u64, cond: Condition, now: u64) -> Result<WriteOutcome, StoreError> {
        let t = Instant::now();
        self.ops[SET].record(t, self.inner.set(key, value, expires_at, cond, now).await)
    }

    async fn delete(&self, key: &str, cond: Condition, now: u64) -> Result<bool, StoreError> {
        let t = Instant::now();
        self.ops[DELETE].record(t, self.inner.delete(key, cond, now).await)
    }

    async fn get_many(&self, keys: &[String], now: u64) -> Result<Vec<Option<Entry>>, StoreError> {
        let t = Instant::now();
        self.ops[GET_MANY].record(t, self.inner.get_many(keys, now).await)
    }

    async fn set_many(&self, writes: &[Write], now: u64) -> Result<Vec<WriteOutcome>, StoreError> {
        let t = Instant::now();
        self.ops[SET_MANY].record(t, self.inner.set_many(writes, now).await)
    }

    async fn sweep(&self, now: u64) -> Result<u64, StoreError> {
        let t = Instant::now();
        self.ops[SWEEP].record(t, self.inner.sweep(now).await)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        let t = Instant::now();
        self.ops[FLUSH].record(t, self.inner.flush().await)
    }

    async fn scan(&self, cursor: Option<String>, limit: usize, now: u64) -> Result<Page, StoreError> {
        let t = Instant::now();
        self.ops[SCAN].record(t, self.inner.scan(cursor, limit, now).await)
    }

    async fn count_prefix(&self, prefix: &str, now: u64) -> Result<Option<u64>, StoreError> {
        self.inner.count_prefix(prefix, now).await
    }

    fn failures(&self) -> u64 {
        self.inner.failures()
    }

    fn degraded(&self) -> bool {
        self.inner.degraded()
    }
}
