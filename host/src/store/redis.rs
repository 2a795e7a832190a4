//! A store in Redis, shared by the MX hosts of a farm: a client greylisted
//! by one greyhook passes on another, as Harris asked of every MX.
//!
//! Each record is one Redis hash `PREFIX KEY` with the fields `v` (value),
//! `ver` (version) and `exp` (expiry, Unix seconds by the caller's clock).
//! Writes and deletes are Lua scripts, so a compare-and-swap is atomic in
//! Redis: two hosts deciding the same triplet at once cannot lose an
//! update. Every operation touches exactly one key, so the layout also
//! suits Redis Cluster (not wired up or tested here; see docs).
//!
//! Expiry: the record is live while `exp > now` (`now` is injected, as for
//! every backend), and Redis expires the key itself `exp - now` seconds
//! after the write, so nothing needs sweeping in normal operation.
//!
//! Failure: every call is bounded by `timeout`; a Redis that is down or
//! slow gives [`StoreError::Backend`] (the filter's failure policy answers)
//! and is counted and logged; the connection manager reconnects by itself.
//! No call ever blocks the async runtime.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{Condition, Entry, Page, Store, StoreError, WriteOutcome};

/// Settings of the Redis store.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port/db`.
    pub url: String,
    /// Put before every key, so several deployments can share a server.
    pub prefix: String,
    /// Bound of every store call.
    pub timeout: Duration,
}

impl RedisConfig {
    /// Defaults (prefix `greyhook:`, 250 ms) for `url`.
    pub fn new(url: impl Into<String>) -> RedisConfig {
        RedisConfig { url: url.into(), prefix: "greyhook:".into(), timeout: Duration::from_millis(250) }
    }
}

/// A [`Store`] in Redis.
pub struct RedisStore {
    conn: ConnectionManager,
    config: RedisConfig,
    set_script: Script,
    delete_script: Script,
    sweep_script: Script,
    failures: AtomicU64,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").field("prefix", &self.config.prefix).finish()
    }
}

/// `KEYS[1]` the record; `ARGV`: value, exp, ttl seconds, condition (`any`,
/// `absent` or a version), now, two version candidates. Returns the new
/// version, or 0 on a conflict.
const SET: &str = r#"
local cur = redis.call('HMGET', KEYS[1], 'ver', 'exp')
local live = cur[1] and cur[2] and tonumber(cur[2]) > tonumber(ARGV[5])
local cond = ARGV[4]
if cond == 'absent' then
  if live then return 0 end
elseif cond ~= 'any' then
  if not live or cur[1] ~= cond then return 0 end
end
local ver = ARGV[6]
if cur[1] == ver then ver = ARGV[7] end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'ver', ver, 'exp', ARGV[2])
local ttl = tonumber(ARGV[3])
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) else redis.call('DEL', KEYS[1]) end
return ver
"#;

/// `KEYS[1]` the record; `ARGV`: condition, now. Returns 1 if a live record
/// was deleted.
const DELETE: &str = r#"
local cur = redis.call('HMGET', KEYS[1], 'ver', 'exp')
local live = cur[1] and cur[2] and tonumber(cur[2]) > tonumber(ARGV[2])
local cond = ARGV[1]
if cond == 'absent' then
  if live then return 0 end
elseif cond ~= 'any' then
  if not live or cur[1] ~= cond then return 0 end
end
redis.call('DEL', KEYS[1])
if live then return 1 else return 0 end
"#;

/// `KEYS` records; `ARGV[1]` now. Deletes those expired by the caller's
/// clock; returns how many.
const SWEEP: &str = r#"
local n = 0
for _, k in ipairs(KEYS) do
  local exp = redis.call('HGET', k, 'exp')
  if exp and tonumber(exp) <= tonumber(ARGV[1]) then
    redis.call('DEL', k)
    n = n + 1
  end
end
return n
"#;

fn cond_arg(c: Condition) -> String {
    match c {
        Condition::Any => "any".into(),
        Condition::Absent => "absent".into(),
        Condition::Version(v) => v.to_string(),
    }
}

/// A fresh version: random, never 0 (unique enough across hosts without a
/// shared counter, which would put a second key in every write).
fn new_version() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    // Lua numbers are doubles: keep versions exact in them (53 bits).
    (h.finish() >> 11).max(1)
}

impl RedisStore {
    /// Connects lazily: greyhook starts even when Redis is down, and every
    /// call tries again (bounded by the timeout) until it is back.
    pub fn open(config: RedisConfig) -> Result<RedisStore, StoreError> {
        let open_err = |e: &dyn std::fmt::Display| StoreError::Open { path: config.url.clone(), reason: e.to_string() };
        let client = redis::Client::open(config.url.as_str()).map_err(|e| open_err(&e))?;
        let mgr = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client, mgr).map_err(|e| open_err(&e))?;
        Ok(RedisStore {
            conn,
            config,
            set_script: Script::new(SET),
            delete_script: Script::new(DELETE),
            sweep_script: Script::new(SWEEP),
            failures: AtomicU64::new(0),
        })
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.config.prefix)
    }

    /// Runs `f` on a connection, bounded by the timeout; failures are
    /// counted and logged (at most once a second, so a dead Redis does not
    /// flood the log).
    async fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let r = tokio::time::timeout(self.config.timeout, f(self.conn.clone())).await;
        let err = match r {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {:?}", self.config.timeout),
        };
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        static LAST_LOG: AtomicU64 = AtomicU64::new(0);
        let sec = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        if LAST_LOG.swap(sec, Ordering::Relaxed) != sec {
            tracing::warn!(failures = n, "redis store: {what} failed: {err} (the filter's failure policy answers)");
        }
        Err(StoreError::Backend(format!("redis {what}: {err}")))
    }
}

fn parse_entry(fields: (Option<Vec<u8>>, Option<String>, Option<String>)) -> Option<Entry> {
    match fields {
        (Some(value), Some(ver), Some(exp)) => Some(Entry { value, version: ver.parse().ok()?, expires_at: exp.parse().ok()? }),
        _ => None,
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn get(&self, key: &str, now: u64) -> Result<Option<Entry>, StoreError> {
        let k = self.key(key);
        let fields: (Option<Vec<u8>>, Option<String>, Option<String>) = self
            .call("get", |mut c| async move { redis::cmd("HMGET").arg(&k).arg("v").arg("ver").arg("exp").query_async(&mut c).await })
            .await?;
        Ok(parse_entry(fields).filter(|e| e.expires_at > now))
    }

    async fn set(&self, key: &str, value: &[u8], expires_at: u64, cond: Condition, now: u64) -> Result<WriteOutcome, StoreError> {
        let k = self.key(key);
        let ttl = expires_at.saturating_sub(now).min(i64::MAX as u64);
        let (v1, v2) = (new_version(), new_version());
        let script = &self.set_script;
        let ver: u64 = self
            .call("set", |mut c| async move {
                script
                    .key(&k)
                    .arg(value)
                    .arg(expires_at)
                    .arg(ttl)
                    .arg(cond_arg(cond))
                    .arg(now)
                    .arg(v1)
                    .arg(if v2 == v1 { v1 ^ 1 } else { v2 })
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(if ver == 0 { WriteOutcome::Conflict } else { WriteOutcome::Written(ver) })
    }

    async fn delete(&self, key: &str, cond: Condition, now: u64) -> Result<bool, StoreError> {
        let k = self.key(key);
        let script = &self.delete_script;
        let n: u64 =
            self.call("delete", |mut c| async move { script.key(&k).arg(cond_arg(cond)).arg(now).invoke_async(&mut c).await }).await?;
        Ok(n == 1)
    }

    async fn sweep(&self, now: u64) -> Result<u64, StoreError> {
        // Redis expires records by itself; this catches records whose
        // expiry by the caller's clock came first (clock skew, tests).
        let mut cursor: u64 = 0;
        let mut total = 0;
        let pattern = format!("{}*", self.config.prefix);
        loop {
            let (next, keys): (u64, Vec<String>) = {
                let p = pattern.clone();
                self.call("sweep", |mut c| async move {
                    redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(&p).arg("COUNT").arg(1000).query_async(&mut c).await
                })
                .await?
            };
            if !keys.is_empty() {
                let script = &self.sweep_script;
                let n: u64 = self
                    .call("sweep", |mut c| async move {
                        let mut inv = script.prepare_invoke();
                        for k in &keys {
                            inv.key(k);
                        }
                        inv.arg(now).invoke_async(&mut c).await
                    })
                    .await?;
                total += n;
            }
            if next == 0 {
                return Ok(total);
            }
            cursor = next;
        }
    }

    fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        // Redis persists on its own terms (RDB/AOF, configured there).
        Ok(())
    }

    async fn scan(&self, cursor: Option<String>, limit: usize, now: u64) -> Result<Page, StoreError> {
        let start: u64 = match cursor {
            Some(c) => c.parse().map_err(|_| StoreError::Backend(format!("bad redis scan cursor {c:?}")))?,
            None => 0,
        };
        let pattern = format!("{}*", self.config.prefix);
        let count = limit.clamp(1, 10_000);
        let (next, keys): (u64, Vec<String>) = self
            .call("scan", |mut c| async move {
                redis::cmd("SCAN").arg(start).arg("MATCH").arg(&pattern).arg("COUNT").arg(count).query_async(&mut c).await
            })
            .await?;
        let mut page = Page { entries: Vec::with_capacity(keys.len()), next: (next != 0).then(|| next.to_string()) };
        for k in keys {
            let Some(short) = k.strip_prefix(&self.config.prefix) else { continue };
            let kk = k.clone();
            let fields: (Option<Vec<u8>>, Option<String>, Option<String>) = self
                .call("scan", |mut c| async move { redis::cmd("HMGET").arg(&kk).arg("v").arg("ver").arg("exp").query_async(&mut c).await })
                .await?;
            if let Some(e) = parse_entry(fields).filter(|e| e.expires_at > now) {
                page.entries.push((short.to_string(), e));
            }
        }
        Ok(page)
    }
}
