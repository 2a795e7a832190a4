//! The filter's configuration: TOML text, every key optional.
//!
//! ```toml
//! delay = "5m"                 # blocking time (a bare number is seconds)
//! retry_window = "2d"          # an unretried record expires after this
//! max_age = "35d"              # a passed triplet lives this long, refreshed on each pass
//! auto_whitelist_after = 5     # passes before a client network skips greylisting (0 = never)
//! ipv4_prefix = 24             # client grouping ("class C" tracking)
//! ipv6_prefix = 64
//! stage = "rcpt"               # "connect", "rcpt" or "data"
//! identity = ["spf", "fcrdns-org", "network"]  # who the client is, first that applies
//! spf_min_ipv4_prefix = 16     # an SPF record authorising a wider network is no identity
//! spf_min_ipv6_prefix = 32
//! greylist_only = []           # e.g. ["no-fcrdns", "dynamic-name", "dnsbl"]: greylist only these clients
//! dnsbl = []                   # e.g. ["zen.spamhaus.org"]
//! dnswl = []                   # e.g. ["list.dnswl.org"]: clients listed skip greylisting
//! whitelist_clients = ["192.0.2.0/24", "2001:db8::/32"]
//! whitelist_client_names = [".google.com"]
//! whitelist_recipients = ["postmaster@", "abuse@", "example.org", "user@example.com"]
//! privacy = false              # true: records keep only the hashed triplet, not the readable one
//! [[policy]]                   # per-recipient policy groups, first match wins
//! name = "no-greylist"
//! recipients = ["vip@example.com", "partner.example"]
//! greylist = false
//! ```

use std::fmt;
use std::net::IpAddr;

use serde::Deserialize;

/// Where the filter greylists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// At the greeting (`421`), keyed on the client network alone.
    Connect,
    /// At RCPT TO (`451`), one triplet per recipient. The null sender is
    /// greylisted at DATA instead.
    #[default]
    Rcpt,
    /// At the end of DATA (`451`), keyed on client network, sender and
    /// Message-ID; one decision covers all recipients.
    Data,
}

/// One way to tell who a client is, for the triplet key and the
/// auto-whitelist (`identity = [...]`, tried in order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdentityKind {
    /// The MAIL FROM domain (the HELO name for `<>`) when SPF passes for
    /// the client and the domain's SPF record is specific.
    Spf,
    /// The organisational domain (Public Suffix List) of the client's
    /// forward-confirmed name, unless the name looks dynamic.
    FcrdnsOrg,
    /// The client's network (`ipv4_prefix`, `ipv6_prefix`): always the last
    /// resort.
    Network,
}

impl IdentityKind {
    /// Its name in the configuration and in logs.
    pub fn name(self) -> &'static str {
        match self {
            IdentityKind::Spf => "spf",
            IdentityKind::FcrdnsOrg => "fcrdns-org",
            IdentityKind::Network => "network",
        }
    }
}

/// What makes a client suspicious, for selective greylisting
/// (`greylist_only = [...]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Suspicion {
    /// The client has no forward-confirmed name.
    NoFcrdns,
    /// The client's name (confirmed, else its PTR) looks like an end-user
    /// access line (`dsl-…`, its address in the name).
    DynamicName,
    /// The client is listed on one of the `dnsbl` zones.
    Dnsbl,
}

/// A duration in the configuration: a bare number of seconds, or a string
/// such as `"300"`, `"90s"`, `"5m"`, `"2h"`, `"35d"`, `"1w"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seconds(pub u64);

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) if n >= 0 => Ok(Seconds(n as u64)),
            Raw::Int(n) => Err(serde::de::Error::custom(format!("negative duration {n}"))),
            Raw::Str(s) => parse_duration(&s).map(Seconds).map_err(serde::de::Error::custom),
        }
    }
}

/// Parses `"300"`, `"90s"`, `"5m"`, `"2h"`, `"2d"`, `"1w"` into seconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => (&t[..i], t[i..].trim()),
        None => (t, ""),
    };
    let n: u64 = num.parse().map_err(|_| format!("invalid duration {s:?}: expected e.g. 300, \"90s\", \"5m\", \"2h\", \"2d\""))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 604_800,
        _ => return Err(format!("invalid duration unit in {s:?}: use s, m, h, d or w")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("duration {s:?} is too large"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    name: String,
    recipients: Vec<String>,
    #[serde(default = "yes")]
    greylist: bool,
    delay: Option<Seconds>,
}

fn yes() -> bool {
    true
}

/// `reply_text`: one line, or several (the retry hint ends the last).
#[derive(Deserialize)]
#[serde(untagged)]
enum ReplyText {
    One(String),
    Lines(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    delay: Seconds,
    retry_window: Seconds,
    max_age: Seconds,
    auto_whitelist_after: u32,
    ipv4_prefix: u8,
    ipv6_prefix: u8,
    stage: Stage,
    identity: Vec<IdentityKind>,
    spf_min_ipv4_prefix: u8,
    spf_min_ipv6_prefix: u8,
    greylist_only: Vec<Suspicion>,
    dnsbl: Vec<String>,
    dnswl: Vec<String>,
    normalize_sender: bool,
    add_header: bool,
    ehlo_keyword: bool,
    privacy: bool,
    reply_text: ReplyText,
    whitelist_clients: Vec<String>,
    whitelist_client_names: Vec<String>,
    whitelist_recipients: Vec<String>,
    policy: Vec<RawPolicy>,
}

impl Default for RawConfig {
    fn default() -> Self {
        RawConfig {
            delay: Seconds(300),
            retry_window: Seconds(2 * 86_400),
            max_age: Seconds(35 * 86_400),
            auto_whitelist_after: 5,
            ipv4_prefix: 24,
            ipv6_prefix: 64,
            stage: Stage::Rcpt,
            identity: vec![IdentityKind::Spf, IdentityKind::FcrdnsOrg, IdentityKind::Network],
            spf_min_ipv4_prefix: 16,
            spf_min_ipv6_prefix: 32,
            greylist_only: Vec::new(),
            dnsbl: Vec::new(),
            dnswl: Vec::new(),
            normalize_sender: true,
            add_header: true,
            ehlo_keyword: true,
            privacy: false,
            reply_text: ReplyText::One("Greylisted, please try again later".into()),
            whitelist_clients: Vec::new(),
            whitelist_client_names: Vec::new(),
            whitelist_recipients: Vec::new(),
            policy: Vec::new(),
        }
    }
}

/// A client network in CIDR form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cidr {
    /// The network address.
    pub addr: IpAddr,
    /// The prefix length.
    pub len: u8,
}

impl Cidr {
    /// Parses `192.0.2.0/24`, `2001:db8::/32` or a bare address (a host).
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a.trim().parse().map_err(|_| format!("invalid address in {s:?}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            Some(l) => l.trim().parse::<u8>().map_err(|_| format!("invalid prefix length in {s:?}"))?,
            None => max,
        };
        if len > max {
            return Err(format!("prefix length {len} is over {max} in {s:?}"));
        }
        Ok(Cidr { addr, len })
    }

    /// True if `ip` lies in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = if self.len == 0 { 0 } else { u32::MAX << (32 - u32::from(self.len)) };
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = if self.len == 0 { 0 } else { u128::MAX << (128 - u32::from(self.len)) };
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// How a recipient pattern matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecipientPattern {
    /// `user@example.com`: this address.
    Address(String),
    /// `postmaster@`: this local part at any domain.
    LocalPart(String),
    /// `example.com` or `@example.com`: any address at this domain.
    Domain(String),
}

/// A normalised recipient's local part and domain (`""` without an `@`),
/// as [`RecipientPattern::matches_split`] takes them.
pub fn split_recipient(rcpt: &str) -> (&str, &str) {
    crate::normalize::split_at_last_at(rcpt).unwrap_or((rcpt, ""))
}

impl RecipientPattern {
    fn parse(s: &str) -> Result<RecipientPattern, String> {
        let s = s.trim().to_ascii_lowercase();
        if s.is_empty() {
            return Err("empty recipient pattern".into());
        }
        Ok(match s.split_once('@') {
            None => RecipientPattern::Domain(s),
            Some(("", d)) if !d.is_empty() => RecipientPattern::Domain(d.to_string()),
            Some((l, "")) if !l.is_empty() => RecipientPattern::LocalPart(l.to_string()),
            Some((l, d)) if !l.is_empty() && !d.is_empty() => RecipientPattern::Address(s.clone()),
            _ => return Err(format!("invalid recipient pattern {s:?}")),
        })
    }

    /// True if the normalised (lower-case) `rcpt` matches.
    pub fn matches(&self, rcpt: &str) -> bool {
        self.matches_split(rcpt, split_recipient(rcpt))
    }

    /// [`Self::matches`] for a recipient already split by
    /// [`split_recipient`] (a recipient is matched against every pattern:
    /// split once).
    pub fn matches_split(&self, rcpt: &str, (local, domain): (&str, &str)) -> bool {
        match self {
            RecipientPattern::Address(a) => a == rcpt,
            RecipientPattern::LocalPart(l) => l == local,
            RecipientPattern::Domain(d) => d == domain,
        }
    }
}

/// A per-recipient policy group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The group's name, handed back by the host with each accepted recipient.
    pub name: String,
    /// Who belongs to it.
    pub recipients: Vec<RecipientPattern>,
    /// Whether its recipients are greylisted at all.
    pub greylist: bool,
    /// Its blocking time in seconds.
    pub delay: u64,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Blocking time, seconds.
    pub delay: u64,
    /// How long an unretried record is kept, seconds.
    pub retry_window: u64,
    /// How long a passed triplet (and an auto-whitelist entry) lives, seconds.
    pub max_age: u64,
    /// Passes after which a client network is auto-whitelisted (0 = never).
    pub auto_whitelist_after: u32,
    /// IPv4 client grouping prefix.
    pub ipv4_prefix: u8,
    /// IPv6 client grouping prefix.
    pub ipv6_prefix: u8,
    /// Where to greylist.
    pub stage: Stage,
    /// How the client is identified, in order; always ends with `Network`.
    pub identity: Vec<IdentityKind>,
    /// An SPF record is an identity only if no passing mechanism is wider.
    pub spf_limits: greyhook_filter::spf::Limits,
    /// Greylist only clients that meet one of these (empty: every client).
    pub greylist_only: Vec<Suspicion>,
    /// DNS block lists (zones) for [`Suspicion::Dnsbl`].
    pub dnsbl: Vec<String>,
    /// DNS allow lists (zones): listed clients skip greylisting.
    pub dnswl: Vec<String>,
    /// Whether senders are normalised (case, +ext, BATV, SRS, digits).
    pub normalize_sender: bool,
    /// Whether the first pass adds `X-Greylist`.
    pub add_header: bool,
    /// Whether `GREYLIST` is advertised in EHLO.
    pub ehlo_keyword: bool,
    /// Keep only the hashed triplet in a record (the draft's privacy
    /// advice, postgrey's `--privacy`); otherwise the readable triplet is
    /// kept beside it for `greyhook db`.
    pub privacy: bool,
    /// The reply text for a greylisted attempt.
    pub reply_text: Vec<String>,
    /// Client networks never greylisted.
    pub whitelist_clients: Vec<Cidr>,
    /// Client name suffixes never greylisted (`.example.org`, or a whole name).
    pub whitelist_client_names: Vec<String>,
    /// Recipients never greylisted (always includes `postmaster@` and `abuse@`).
    pub whitelist_recipients: Vec<RecipientPattern>,
    /// Per-recipient policy groups, first match wins; the rest are `default`.
    pub policies: Vec<Policy>,
}

/// A configuration error; its text names the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Most zones in `dnsbl` and in `dnswl` (each costs a lookup per client).
pub const MAX_ZONES: usize = 8;

/// A plausible DNS zone name: labels of letters, digits, `-` and `_`.
fn valid_zone(z: &str) -> bool {
    let z = z.trim_end_matches('.');
    !z.is_empty()
        && z.len() <= 200
        && z.split('.').all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
}

/// The name of the policy group of recipients no `[[policy]]` matches.
pub const DEFAULT_GROUP: &str = "default";

impl Default for Config {
    fn default() -> Self {
        Config::parse("").unwrap_or_else(|_| unreachable!("the defaults are valid"))
    }
}

impl Config {
    /// Parses and validates TOML text (empty text gives the defaults).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| ConfigError(format!("invalid filter configuration: {}", e.to_string().trim())))?;
        let bad = |key: &str, msg: String| ConfigError(format!("invalid filter configuration: key `{key}`: {msg}"));
        if raw.ipv4_prefix > 32 {
            return Err(bad("ipv4_prefix", format!("{} is over 32", raw.ipv4_prefix)));
        }
        if raw.ipv6_prefix > 128 {
            return Err(bad("ipv6_prefix", format!("{} is over 128", raw.ipv6_prefix)));
        }
        const MAX: u64 = 99 * 86_400;
        for (k, v) in [("delay", raw.delay.0), ("retry_window", raw.retry_window.0), ("max_age", raw.max_age.0)] {
            if v > MAX {
                return Err(bad(k, format!("{v} seconds is over 99 days")));
            }
        }
        if raw.retry_window.0 < raw.delay.0 {
            return Err(bad("retry_window", "must not be shorter than `delay`".into()));
        }
        if raw.max_age.0 == 0 || raw.retry_window.0 == 0 {
            return Err(bad(if raw.max_age.0 == 0 { "max_age" } else { "retry_window" }, "must be positive".into()));
        }
        if raw.spf_min_ipv4_prefix > 32 {
            return Err(bad("spf_min_ipv4_prefix", format!("{} is over 32", raw.spf_min_ipv4_prefix)));
        }
        if raw.spf_min_ipv6_prefix > 128 {
            return Err(bad("spf_min_ipv6_prefix", format!("{} is over 128", raw.spf_min_ipv6_prefix)));
        }
        let mut identity = Vec::new();
        for k in raw.identity {
            if identity.contains(&k) {
                return Err(bad("identity", format!("{:?} is listed twice", k.name())));
            }
            identity.push(k);
        }
        if let Some(i) = identity.iter().position(|k| *k == IdentityKind::Network)
            && i + 1 != identity.len()
        {
            return Err(bad("identity", "\"network\" matches every client: it must come last".into()));
        }
        if identity.last() != Some(&IdentityKind::Network) {
            identity.push(IdentityKind::Network);
        }
        for (key, zones) in [("dnsbl", &raw.dnsbl), ("dnswl", &raw.dnswl)] {
            if zones.len() > MAX_ZONES {
                return Err(bad(key, format!("at most {MAX_ZONES} zones")));
            }
            if let Some(z) = zones.iter().find(|z| !valid_zone(z)) {
                return Err(bad(key, format!("{z:?} is not a DNS zone name")));
            }
        }
        if raw.greylist_only.contains(&Suspicion::Dnsbl) && raw.dnsbl.is_empty() {
            return Err(bad("greylist_only", "\"dnsbl\" needs at least one zone in `dnsbl`".into()));
        }
        let reply_text = match raw.reply_text {
            ReplyText::One(t) => vec![t],
            ReplyText::Lines(l) => l,
        };
        if reply_text.is_empty() || reply_text.len() > 8 {
            return Err(bad("reply_text", "must have 1 to 8 lines".into()));
        }
        if reply_text.iter().any(|t| t.len() > 300 || !t.bytes().all(|b| b == b'\t' || (32..127).contains(&b))) {
            return Err(bad("reply_text", "every line must be printable US-ASCII, at most 300 characters".into()));
        }
        let whitelist_clients =
            raw.whitelist_clients.iter().map(|s| Cidr::parse(s)).collect::<Result<Vec<_>, _>>().map_err(|e| bad("whitelist_clients", e))?;
        let mut whitelist_recipients = vec![RecipientPattern::LocalPart("postmaster".into()), RecipientPattern::LocalPart("abuse".into())];
        for r in &raw.whitelist_recipients {
            whitelist_recipients.push(RecipientPattern::parse(r).map_err(|e| bad("whitelist_recipients", e))?);
        }
        let mut policies = Vec::new();
        for (i, p) in raw.policy.iter().enumerate() {
            let key = format!("policy[{i}]");
            if p.name.is_empty() || p.name.len() > 64 || p.name == DEFAULT_GROUP {
                return Err(bad(&format!("{key}.name"), format!("{:?} must be 1 to 64 characters and not {DEFAULT_GROUP:?}", p.name)));
            }
            if policies.iter().any(|q: &Policy| q.name == p.name) {
                return Err(bad(&format!("{key}.name"), format!("{:?} is used twice", p.name)));
            }
            let recipients = p
                .recipients
                .iter()
                .map(|r| RecipientPattern::parse(r))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(&format!("{key}.recipients"), e))?;
            let delay = p.delay.map_or(raw.delay.0, |d| d.0);
            if delay > raw.retry_window.0 {
                return Err(bad(&format!("{key}.delay"), "must not be longer than `retry_window`".into()));
            }
            policies.push(Policy { name: p.name.clone(), recipients, greylist: p.greylist, delay });
        }
        Ok(Config {
            delay: raw.delay.0,
            retry_window: raw.retry_window.0,
            max_age: raw.max_age.0,
            auto_whitelist_after: raw.auto_whitelist_after,
            ipv4_prefix: raw.ipv4_prefix,
            ipv6_prefix: raw.ipv6_prefix,
            stage: raw.stage,
            identity,
            spf_limits: greyhook_filter::spf::Limits {
                min_ipv4_prefix: raw.spf_min_ipv4_prefix,
                min_ipv6_prefix: raw.spf_min_ipv6_prefix,
                ..Default::default()
            },
            greylist_only: raw.greylist_only,
            dnsbl: raw.dnsbl.iter().map(|z| z.trim_end_matches('.').to_ascii_lowercase()).collect(),
            dnswl: raw.dnswl.iter().map(|z| z.trim_end_matches('.').to_ascii_lowercase()).collect(),
            normalize_sender: raw.normalize_sender,
            privacy: raw.privacy,
            add_header: raw.add_header,
            ehlo_keyword: raw.ehlo_keyword,
            reply_text,
            whitelist_clients,
            whitelist_client_names: raw.whitelist_client_names.iter().map(|s| s.trim().to_ascii_lowercase()).collect(),
            whitelist_recipients,
            policies,
        })
    }

    /// The policy group a normalised recipient falls in: `(name, greylist, delay)`.
    pub fn policy_for(&self, rcpt: &str) -> (&str, bool, u64) {
        if self.policies.is_empty() {
            return (DEFAULT_GROUP, true, self.delay);
        }
        let split = split_recipient(rcpt);
        for p in &self.policies {
            if p.recipients.iter().any(|r| r.matches_split(rcpt, split)) {
                return (&p.name, p.greylist, p.delay);
            }
        }
        (DEFAULT_GROUP, true, self.delay)
    }

    /// The policy group called `name` (`default` if none is).
    pub fn policy_named(&self, name: &str) -> (bool, u64) {
        self.policies.iter().find(|p| p.name == name).map_or((true, self.delay), |p| (p.greylist, p.delay))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_postgreys() {
        let c = Config::default();
        assert_eq!((c.delay, c.retry_window, c.max_age, c.auto_whitelist_after), (300, 172_800, 3_024_000, 5));
        assert_eq!((c.ipv4_prefix, c.ipv6_prefix, c.stage), (24, 64, Stage::Rcpt));
    }

    #[test]
    fn durations() {
        let c = Config::parse("delay = \"5m\"\nretry_window = \"2d\"\nmax_age = 86400").unwrap();
        assert_eq!((c.delay, c.retry_window, c.max_age), (300, 172_800, 86_400));
        assert_eq!(parse_duration("1w"), Ok(604_800));
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::parse("dleay = 3").unwrap_err().0;
        assert!(e.contains("dleay"), "{e}");
        let e = Config::parse("delay = \"soon\"").unwrap_err().0;
        assert!(e.contains("delay"), "{e}");
        let e = Config::parse("ipv4_prefix = 33").unwrap_err().0;
        assert!(e.contains("ipv4_prefix"), "{e}");
        let e = Config::parse("whitelist_clients = [\"10.0.0.0/99\"]").unwrap_err().0;
        assert!(e.contains("whitelist_clients"), "{e}");
        let e = Config::parse("[[policy]]\nname = \"x\"\nrecipients = [\"a@\"]\ncolour = 1").unwrap_err().0;
        assert!(e.contains("colour"), "{e}");
    }

    #[test]
    fn identity_and_selective() {
        let c = Config::default();
        assert_eq!(c.identity, vec![IdentityKind::Spf, IdentityKind::FcrdnsOrg, IdentityKind::Network]);
        assert_eq!((c.spf_limits.min_ipv4_prefix, c.spf_limits.min_ipv6_prefix), (16, 32));
        assert!(c.greylist_only.is_empty() && c.dnsbl.is_empty() && c.dnswl.is_empty());
        let c = Config::parse("identity = [\"fcrdns-org\"]").unwrap();
        assert_eq!(c.identity, vec![IdentityKind::FcrdnsOrg, IdentityKind::Network], "network is implied last");
        assert_eq!(Config::parse("identity = [\"network\"]").unwrap().identity, vec![IdentityKind::Network]);
        for (text, key) in [
            ("identity = [\"network\", \"spf\"]", "identity"),
            ("identity = [\"spf\", \"spf\"]", "identity"),
            ("identity = [\"dkim\"]", "identity"),
            ("spf_min_ipv4_prefix = 33", "spf_min_ipv4_prefix"),
            ("greylist_only = [\"dnsbl\"]", "greylist_only"),
            ("greylist_only = [\"ugly\"]", "greylist_only"),
            ("dnsbl = [\"bad zone\"]", "dnsbl"),
            ("dnswl = [\"\"]", "dnswl"),
        ] {
            let e = Config::parse(text).unwrap_err().0;
            assert!(e.contains(key), "{text}: {e}");
        }
        let c = Config::parse("greylist_only = [\"no-fcrdns\", \"dnsbl\"]\ndnsbl = [\"BL.Example.\"]").unwrap();
        assert_eq!((c.greylist_only.len(), c.dnsbl.as_slice()), (2, &["bl.example".to_string()][..]));
    }

    #[test]
    fn cidr() {
        let c = Cidr::parse("192.0.2.0/24").unwrap();
        assert!(c.contains("192.0.2.77".parse().unwrap()));
        assert!(!c.contains("192.0.3.1".parse().unwrap()));
        let c = Cidr::parse("2001:db8::/32").unwrap();
        assert!(c.contains("2001:db8:1::1".parse().unwrap()));
        assert!(!c.contains("2001:db9::1".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains("8.8.8.8".parse().unwrap()));
    }
}
