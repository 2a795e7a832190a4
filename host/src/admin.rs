//! `greyhook db list|show|release|delete|whitelist|stats`: the greylist records an
//! operator can read and change, on any [`Store`] — a stopped daemon's redb
//! file, Redis, or a live daemon's store through its control socket (the
//! daemon runs the same [`run`]).
//!
//! It reads the reference filter's layout (docs/operating.md): keys
//! `NAMESPACE/t/KEY` (a triplet; `c/` at the connect stage) whose value is
//! `FIRST_SEEN PASSED`, then — unless the filter runs with `privacy = true`
//! — a tab and the readable triplet (identity, sender, recipient or
//! Message-ID, tab-separated). Other keys are counted by `stats` and shown
//! raw by `show`.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::{Deserialize, Serialize};

use crate::domain::clock::rfc3339;
use crate::store::{Condition, Store, StoreError, WriteOutcome};

/// Most records one `list` prints.
pub const MAX_LIST: usize = 10_000;

/// How long a released record lives at least: the reference filter's
/// default `max_age`.
pub const RELEASE_TTL: u64 = 35 * 86_400;

/// A record's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Seen, not passed yet.
    Greylisted,
    /// Passed (retried after the delay, or released).
    Passed,
}

/// Which records `list` shows; every field narrows.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ListFilter {
    /// A substring of the identity (the client network, `spf:domain`…).
    pub client: Option<String>,
    /// A substring of the sender.
    pub sender: Option<String>,
    /// A substring of the recipient (or Message-ID).
    pub recipient: Option<String>,
    /// Only this state.
    pub state: Option<State>,
    /// Only records first seen at least this many seconds ago.
    pub older_than: Option<u64>,
    /// At most this many (default 100, at most [`MAX_LIST`]).
    pub limit: Option<usize>,
    /// List the whitelist entries (`wl/…`) instead of the greylist records.
    #[serde(default)]
    pub whitelists: bool,
}

/// What to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Command {
    /// The greylist records that match.
    List {
        /// The filter's namespace.
        namespace: String,
        /// Which.
        filter: ListFilter,
    },
    /// One record in full.
    Show {
        /// The filter's namespace.
        namespace: String,
        /// The key, with or without the namespace.
        key: String,
    },
    /// Lets a greylisted triplet pass at its next attempt.
    Release {
        /// The filter's namespace.
        namespace: String,
        /// The key.
        key: String,
    },
    /// Deletes a record.
    Delete {
        /// The filter's namespace.
        namespace: String,
        /// The key.
        key: String,
    },
    /// Whitelists a client network, a sender domain or a recipient for a
    /// time (the reference filter reads `wl/…` keys before greylisting).
    Whitelist {
        /// The filter's namespace.
        namespace: String,
        /// What is whitelisted.
        kind: WhitelistKind,
        /// The network, domain or address.
        value: String,
        /// For how long, seconds.
        ttl: u64,
    },
    /// Records by namespace and kind.
    Stats,
}

/// What `whitelist` applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WhitelistKind {
    /// A client network (`192.0.2.0/24`, or an address: its /24 or /64).
    Client,
    /// A sender domain.
    Sender,
    /// A recipient address.
    Recipient,
}

/// The longest whitelist lifetime: ten years.
pub const MAX_WHITELIST_TTL: u64 = 10 * 366 * 86_400;

/// How the reference filter groups clients into networks: `ipv4_prefix`
/// and `ipv6_prefix` in its configuration. A client whitelist entry
/// (`wl/client/NETWORK`) is looked up as the client's network of exactly
/// this size, so an entry of another size would never match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientGrouping {
    /// Bits of an IPv4 client's network (the filter's default: 24).
    pub ipv4: u8,
    /// Bits of an IPv6 client's network (the filter's default: 64).
    pub ipv6: u8,
}

impl Default for ClientGrouping {
    fn default() -> Self {
        ClientGrouping { ipv4: 24, ipv6: 64 }
    }
}

impl ClientGrouping {
    /// The grouping a filter configuration sets (its TOML text, as
    /// `[filter.config]` hands it to the filter), with the reference
    /// filter's defaults for what it leaves out. A value the filter would
    /// refuse cannot be in a loaded filter's configuration; it counts as
    /// the default here.
    pub fn of_filter_config(text: &str) -> ClientGrouping {
        let table: toml::Table = text.parse().unwrap_or_default();
        let bits = |key: &str, most: u8| {
            table.get(key).and_then(toml::Value::as_integer).and_then(|n| u8::try_from(n).ok()).filter(|n| *n <= most)
        };
        let d = ClientGrouping::default();
        ClientGrouping { ipv4: bits("ipv4_prefix", 32).unwrap_or(d.ipv4), ipv6: bits("ipv6_prefix", 128).unwrap_or(d.ipv6) }
    }
}

/// The store key (without namespace) of a whitelist entry, the value
/// checked and normalised as the reference filter keys it, a client
/// network in the filter's `grouping`; an error says what is wrong.
///
/// A client is an address (its network of the grouping's size) or a
/// network of exactly that size: the filter looks up no other, so a wider
/// or narrower one is refused rather than written and never matched. An
/// IPv4-mapped address or network (`::ffff:192.0.2.1`, `::ffff:192.0.2.0/120`)
/// is the IPv4 one it stands for, as the filter sees such a client.
pub fn whitelist_key(kind: WhitelistKind, value: &str, grouping: ClientGrouping) -> Result<String, String> {
    use std::net::IpAddr;
    let v = value.trim();
    match kind {
        WhitelistKind::Client => {
            let (ip, len) = match v.split_once('/') {
                Some((ip, len)) => (ip, Some(len.parse::<u8>().map_err(|_| format!("{v:?}: a prefix length after /"))?)),
                None => (v, None),
            };
            let ip: IpAddr = ip.parse().map_err(|_| format!("{v:?}: an IP address or network such as 192.0.2.0/24"))?;
            let most = if ip.is_ipv4() { 32 } else { 128 };
            if len.is_some_and(|l| l > most) {
                return Err(format!("{v:?}: a prefix length of at most {most}"));
            }
            let (ip, len) = match (ip, ip.to_canonical()) {
                (IpAddr::V6(_), IpAddr::V4(a)) => match len {
                    Some(l) if l < 96 => return Err(format!("{v:?}: an IPv4-mapped network of a /96 or narrower")),
                    l => (IpAddr::V4(a), l.map(|l| l - 96)),
                },
                _ => (ip, len),
            };
            let (bits, setting) = match ip {
                IpAddr::V4(_) => (grouping.ipv4, "ipv4_prefix"),
                IpAddr::V6(_) => (grouping.ipv6, "ipv6_prefix"),
            };
            if let Some(len) = len.filter(|l| *l != bits) {
                return Err(format!(
                    "{v:?}: the filter looks up a client's /{bits} only ({setting} = {bits}), so a /{len} entry would never \
                     match: name an address or a /{bits} network, or list other networks in whitelist_clients in [filter.config]"
                ));
            }
            Ok(format!("wl/client/{}/{bits}", crate::domain::client_network(ip, grouping.ipv4, grouping.ipv6)))
        }
        WhitelistKind::Sender => {
            let d = v.trim_start_matches('@').to_ascii_lowercase();
            let ok = !d.is_empty()
                && d.len() <= 200
                && d.contains('.')
                && d.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
            if !ok {
                return Err(format!("{v:?}: a sender domain such as example.org"));
            }
            Ok(format!("wl/sender/{d}"))
        }
        WhitelistKind::Recipient => {
            let a = v.trim_start_matches('<').trim_end_matches('>').to_ascii_lowercase();
            let ok = a.len() <= 200
                && a.split_once('@').is_some_and(|(l, d)| !l.is_empty() && !d.is_empty())
                && !a.chars().any(|c| c.is_whitespace() || c.is_control());
            if !ok {
                return Err(format!("{v:?}: a recipient address such as user@example.org"));
            }
            Ok(format!("wl/rcpt/{a}"))
        }
    }
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No such record.
    #[error("no record {0}")]
    NotFound(String),
    /// The record is not a greylist record.
    #[error("{0} is not a greylist record of the reference filter's layout")]
    NotGreylist(String),
    /// It changed while being released (a delivery attempt at that moment).
    #[error("{0} changed meanwhile: try again")]
    Conflict(String),
    /// A bad argument.
    #[error("{0}")]
    Invalid(String),
}

/// A greylist record, read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Record {
    /// The full key.
    pub key: String,
    /// When first seen, Unix seconds.
    pub first_seen: u64,
    /// When it passed (0: not yet).
    pub passed: u64,
    /// When it expires.
    pub expires_at: u64,
    /// The readable triplet (empty under `privacy`).
    pub triplet: Vec<String>,
}

impl Record {
    fn state(&self) -> State {
        if self.passed > 0 { State::Passed } else { State::Greylisted }
    }

    /// Reads `value` as a greylist record, if `key` is one.
    fn parse(key: &str, namespace: &str, value: &[u8], expires_at: u64) -> Option<Record> {
        let rest = key.strip_prefix(namespace)?.strip_prefix('/')?;
        if !(rest.starts_with("t/") || rest.starts_with("c/")) {
            return None;
        }
        let text = std::str::from_utf8(value).ok()?;
        let mut parts = text.split('\t');
        let (a, b) = parts.next()?.split_once(' ')?;
        Some(Record {
            key: key.to_string(),
            first_seen: a.parse().ok()?,
            passed: b.parse().ok()?,
            expires_at,
            triplet: parts.map(str::to_string).collect(),
        })
    }

    fn encode(&self) -> Vec<u8> {
        let mut s = format!("{} {}", self.first_seen, self.passed);
        for p in &self.triplet {
            s.push('\t');
            s.push_str(p);
        }
        s.into_bytes()
    }

    fn line(&self) -> String {
        let passed = if self.passed == 0 { "-".to_string() } else { rfc3339(self.passed) };
        let triplet = if self.triplet.is_empty() { "(privacy: hashed only)".to_string() } else { self.triplet.join(" ") };
        format!(
            "{}  {:<10}  first={}  passed={}  expires={}  {}",
            self.key,
            match self.state() {
                State::Greylisted => "greylisted",
                State::Passed => "passed",
            },
            rfc3339(self.first_seen),
            passed,
            rfc3339(self.expires_at),
            triplet
        )
    }
}

fn full_key(namespace: &str, key: &str) -> String {
    if key.starts_with(&format!("{namespace}/")) { key.to_string() } else { format!("{namespace}/{key}") }
}

impl Command {
    /// The store namespace the command works in (`stats` counts them all).
    pub fn namespace(&self) -> Option<&str> {
        match self {
            Command::List { namespace, .. }
            | Command::Show { namespace, .. }
            | Command::Release { namespace, .. }
            | Command::Delete { namespace, .. }
            | Command::Whitelist { namespace, .. } => Some(namespace),
            Command::Stats => None,
        }
    }
}

fn contains(hay: Option<&String>, needle: &Option<String>) -> bool {
    match needle {
        None => true,
        Some(n) => hay.is_some_and(|h| h.to_ascii_lowercase().contains(&n.to_ascii_lowercase())),
    }
}

/// Runs `cmd` on `store` at `now`; the text to print. `grouping` is how
/// the filter that owns the namespace groups clients (a client whitelist
/// entry is written in it).
pub async fn run(store: &dyn Store, cmd: &Command, now: u64, grouping: ClientGrouping) -> Result<String, AdminError> {
    match cmd {
        Command::List { namespace, filter } => {
            let limit = filter.limit.unwrap_or(100).clamp(1, MAX_LIST);
            let (mut out, mut shown, mut matched) = (String::new(), 0usize, 0u64);
            let prefix = format!("{namespace}/");
            let mut cursor = None;
            loop {
                let page = store.scan(cursor, 1000, now).await?;
                for (key, e) in &page.entries {
                    if !key.starts_with(&prefix) {
                        continue;
                    }
                    if filter.whitelists {
                        if key[prefix.len()..].starts_with("wl/") {
                            matched += 1;
                            if shown < limit {
                                let _ = writeln!(out, "{key}  until {}", rfc3339(e.expires_at));
                                shown += 1;
                            }
                        }
                        continue;
                    }
                    let Some(r) = Record::parse(key, namespace, &e.value, e.expires_at) else { continue };
                    let ok = contains(r.triplet.first(), &filter.client)
                        && contains(r.triplet.get(1), &filter.sender)
                        && contains(r.triplet.get(2), &filter.recipient)
                        && filter.state.is_none_or(|s| s == r.state())
                        && filter.older_than.is_none_or(|o| r.first_seen.saturating_add(o) <= now);
                    if ok {
                        matched += 1;
                        if shown < limit {
                            let _ = writeln!(out, "{}", r.line());
                            shown += 1;
                        }
                    }
                }
                match page.next {
                    Some(n) => cursor = Some(n),
                    None => break,
                }
            }
            let _ = write!(out, "{matched} records match, {shown} shown");
            Ok(out)
        }
        Command::Show { namespace, key } => {
            let key = full_key(namespace, key);
            let e = store.get(&key, now).await?.ok_or_else(|| AdminError::NotFound(key.clone()))?;
            Ok(match Record::parse(&key, namespace, &e.value, e.expires_at) {
                Some(r) => format!(
                    "{}\nversion {}\nidentity {}\nsender {}\nrecipient {}",
                    r.line(),
                    e.version,
                    r.triplet.first().map_or("-", String::as_str),
                    r.triplet.get(1).map_or("-", String::as_str),
                    r.triplet.get(2).map_or("-", String::as_str),
                ),
                None => {
                    format!(
                        "{key}  expires={}  version {}  value {:?}",
                        rfc3339(e.expires_at),
                        e.version,
                        String::from_utf8_lossy(&e.value)
                    )
                }
            })
        }
        Command::Release { namespace, key } => {
            let key = full_key(namespace, key);
            let e = store.get(&key, now).await?.ok_or_else(|| AdminError::NotFound(key.clone()))?;
            let mut r = Record::parse(&key, namespace, &e.value, e.expires_at).ok_or_else(|| AdminError::NotGreylist(key.clone()))?;
            if r.passed > 0 {
                return Ok(format!("{key} has passed already"));
            }
            r.passed = now;
            let expires = e.expires_at.max(now.saturating_add(RELEASE_TTL));
            match store.set(&key, &r.encode(), expires, Condition::Version(e.version), now).await? {
                WriteOutcome::Written(_) => Ok(format!("released {key}: its next attempt passes")),
                WriteOutcome::Conflict => Err(AdminError::Conflict(key)),
            }
        }
        Command::Delete { namespace, key } => {
            let key = full_key(namespace, key);
            match store.delete(&key, Condition::Any, now).await? {
                true => Ok(format!("deleted {key}")),
                false => Err(AdminError::NotFound(key)),
            }
        }
        Command::Whitelist { namespace, kind, value, ttl } => {
            let key = full_key(namespace, &whitelist_key(*kind, value, grouping).map_err(AdminError::Invalid)?);
            if *ttl == 0 || *ttl > MAX_WHITELIST_TTL {
                return Err(AdminError::Invalid("the whitelist's time must be 1 second to 10 years".into()));
            }
            let until = now.saturating_add(*ttl);
            store.set(&key, format!("whitelisted at {now}").as_bytes(), until, Condition::Any, now).await?;
            Ok(format!("whitelisted {key} until {}", rfc3339(until)))
        }
        Command::Stats => {
            let mut counts: BTreeMap<String, u64> = BTreeMap::new();
            let mut cursor = None;
            loop {
                let page = store.scan(cursor, 1000, now).await?;
                for (key, e) in &page.entries {
                    let mut parts = key.splitn(3, '/');
                    let (ns, kind) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                    let kind = match kind {
                        "t" | "c" => match Record::parse(key, ns, &e.value, e.expires_at).map(|r| r.state()) {
                            Some(State::Passed) => format!("{kind} passed"),
                            Some(State::Greylisted) => format!("{kind} greylisted"),
                            None => format!("{kind} other"),
                        },
                        k => k.to_string(),
                    };
                    *counts.entry(format!("{ns} {kind}")).or_default() += 1;
                }
                match page.next {
                    Some(n) => cursor = Some(n),
                    None => break,
                }
            }
            let total: u64 = counts.values().sum();
            let mut out: String = counts.iter().map(|(k, n)| format!("{k} {n}\n")).collect();
            let _ = write!(out, "total {total}");
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    #[tokio::test]
    async fn list_release_show_delete_stats() {
        let s = MemoryStore::new();
        let now = 1_000_000;
        let g = ClientGrouping::default();
        s.set("greylist/t/AAA", b"999000 0\t192.0.2\ta@x.test\tb@y.test", now + 100, Condition::Any, now).await.unwrap();
        s.set("greylist/t/BBB", b"990000 995000\t198.51.100\tc@z.test\tb@y.test", now + 100, Condition::Any, now).await.unwrap();
        s.set("greylist/t/CCC", b"999999 0", now + 100, Condition::Any, now).await.unwrap();
        s.set("greylist/awl/192.0.2", b"3", now + 100, Condition::Any, now).await.unwrap();
        let list = |f: ListFilter| Command::List { namespace: "greylist".into(), filter: f };
        let out = run(&s, &list(ListFilter { sender: Some("A@X".into()), ..Default::default() }), now, g).await.unwrap();
        assert!(out.contains("greylist/t/AAA  greylisted") && out.ends_with("1 records match, 1 shown"), "{out}");
        let out = run(&s, &list(ListFilter { state: Some(State::Greylisted), ..Default::default() }), now, g).await.unwrap();
        assert!(out.contains("(privacy: hashed only)") && out.ends_with("2 records match, 2 shown"), "{out}");
        let out = run(&s, &list(ListFilter { older_than: Some(5000), ..Default::default() }), now, g).await.unwrap();
        assert!(out.ends_with("1 records match, 1 shown") && out.contains("BBB"), "{out}");
        let ns = || "greylist".to_string();
        let out = run(&s, &Command::Release { namespace: ns(), key: "t/AAA".into() }, now, g).await.unwrap();
        assert!(out.starts_with("released greylist/t/AAA"), "{out}");
        let v = s.get("greylist/t/AAA", now).await.unwrap().unwrap();
        assert_eq!(v.value, b"999000 1000000\t192.0.2\ta@x.test\tb@y.test");
        assert!(v.expires_at >= now + RELEASE_TTL);
        let out = run(&s, &Command::Show { namespace: ns(), key: "greylist/t/AAA".into() }, now, g).await.unwrap();
        assert!(out.contains("passed=") && out.contains("sender a@x.test"), "{out}");
        let out = run(&s, &Command::Stats, now, g).await.unwrap();
        assert!(out.contains("greylist t passed 2") && out.contains("greylist t greylisted 1") && out.ends_with("total 4"), "{out}");
        run(&s, &Command::Delete { namespace: ns(), key: "t/CCC".into() }, now, g).await.unwrap();
        assert!(matches!(run(&s, &Command::Delete { namespace: ns(), key: "t/CCC".into() }, now, g).await, Err(AdminError::NotFound(_))));
        assert!(matches!(
            run(&s, &Command::Release { namespace: ns(), key: "awl/192.0.2".into() }, now, g).await,
            Err(AdminError::NotGreylist(_))
        ));
        let wl = |kind, value: &str| Command::Whitelist { namespace: ns(), kind, value: value.into(), ttl: 3600 };
        run(&s, &wl(WhitelistKind::Client, "192.0.2.77"), now, g).await.unwrap();
        assert!(s.get("greylist/wl/client/192.0.2.0/24", now).await.unwrap().is_some_and(|e| e.expires_at == now + 3600));
        run(&s, &wl(WhitelistKind::Sender, "@Example.ORG"), now, g).await.unwrap();
        assert!(s.get("greylist/wl/sender/example.org", now).await.unwrap().is_some());
        assert_eq!(whitelist_key(WhitelistKind::Client, "2001:db8::1", g).unwrap(), "wl/client/2001:db8::/64");
        assert_eq!(whitelist_key(WhitelistKind::Recipient, "<Bob@Y.test>", g).unwrap(), "wl/rcpt/bob@y.test");
        for (k, bad) in
            [(WhitelistKind::Client, "10.0.0.0/4"), (WhitelistKind::Sender, "no spaces.org x"), (WhitelistKind::Recipient, "nobody")]
        {
            assert!(matches!(run(&s, &wl(k, bad), now, g).await, Err(AdminError::Invalid(_))), "{bad}");
        }
        let f = ListFilter { whitelists: true, ..Default::default() };
        let out = run(&s, &Command::List { namespace: ns(), filter: f }, now, g).await.unwrap();
        assert!(out.contains("greylist/wl/sender/example.org  until") && out.ends_with("2 records match, 2 shown"), "{out}");
    }

    /// A client entry is the network the filter looks up, in its grouping:
    /// nothing else is written.
    #[test]
    fn client_whitelists_are_in_the_filters_grouping() {
        let g = ClientGrouping::of_filter_config("delay = \"5m\"\nipv4_prefix = 28\nipv6_prefix = 48\n");
        assert_eq!(g, ClientGrouping { ipv4: 28, ipv6: 48 });
        assert_eq!(ClientGrouping::of_filter_config(""), ClientGrouping::default());
        assert_eq!(ClientGrouping::of_filter_config("ipv4_prefix = 300"), ClientGrouping::default());
        let key = |v: &str| whitelist_key(WhitelistKind::Client, v, g);
        assert_eq!(key("198.18.7.9").unwrap(), "wl/client/198.18.7.0/28");
        assert_eq!(key(" 198.18.7.0/28 ").unwrap(), "wl/client/198.18.7.0/28");
        assert_eq!(key("::ffff:198.18.8.1").unwrap(), "wl/client/198.18.8.0/28");
        assert_eq!(key("::ffff:198.18.9.0/124").unwrap(), "wl/client/198.18.9.0/28");
        assert_eq!(key("2001:db8:1:2::9").unwrap(), "wl/client/2001:db8:1::/48");
        assert_eq!(key("2001:db8:1::/48").unwrap(), "wl/client/2001:db8:1::/48");
        for bad in ["198.18.0.0/16", "198.18.7.0/24", "198.18.7.9/32", "2001:db8::/64", "::ffff:198.18.9.0/64", "198.18.7.0/99", "x/28"] {
            assert!(key(bad).is_err(), "{bad}");
        }
        assert!(key("198.18.0.0/16").unwrap_err().contains("ipv4_prefix = 28"));
        let everything = ClientGrouping { ipv4: 0, ipv6: 0 };
        assert_eq!(whitelist_key(WhitelistKind::Client, "198.18.7.9", everything).unwrap(), "wl/client/0.0.0.0/0");
    }
}
