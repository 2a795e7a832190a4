//! The greylisting decisions, independent of how they are called.
//!
//! [`Greylist`] holds the validated configuration; each hook takes the
//! context (the contract's own types, [`greyhook_types`], which the host
//! uses too) and the SDK's [`Host`] (the store and the host's other
//! imports). The component glue converts the WIT bindings to those types
//! once and hands the SDK's WIT-backed [`Host`]; the native benchmark and
//! tests hand one over the host's store directly.

use crate::config::{Config, IdentityKind, Stage};
use crate::identity::{self, Identity, Screen};
use crate::normalize::{self, check_address, normalize_recipient, normalize_sender, prefixed_triplet_key};

pub use greyhook_filter::{Error, Host, Level};

/// Reads a key as `(value, version)`.
fn get(kv: &mut dyn Host, key: &str) -> Result<Option<(Vec<u8>, u64)>, Error> {
    Ok(kv.get(key)?.map(|e| (e.value, e.version)))
}

/// A conditional write; `None` is a version conflict.
fn set(kv: &mut dyn Host, key: &str, value: &[u8], ttl: u32, if_version: Option<u64>) -> Result<Option<u64>, Error> {
    Ok(match kv.set(key, value, ttl, if_version)? {
        greyhook_filter::WriteOutcome::Written(v) => Some(v),
        greyhook_filter::WriteOutcome::Conflict => None,
    })
}

pub use greyhook_types::{AcceptedRecipient, Context, Decision, Header, Reply, Session, Transaction, Verdict};

/// The verdict with its policy group set (RCPT).
fn with_group(mut v: Verdict, g: &str) -> Verdict {
    v.policy_group = Some(g.to_string());
    v
}

/// The filter's name as reported by `init`.
pub const NAME: &str = "greylist";
/// The filter's version as reported by `init`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// How a triplet stands.
enum Outcome {
    /// Blocked for this many more seconds; `first`: seen for the first time.
    Defer { left: u64, first: bool },
    /// Passed now for the first time, after waiting this many seconds.
    FirstPass(u64),
    /// Passed before.
    Known,
}

/// A triplet record: when first seen and when it passed (0 = not yet).
///
/// Stored as `FIRST_SEEN PASSED`, then (unless `privacy`) a tab and the
/// readable triplet, its parts separated by tabs (identity, sender,
/// recipient or Message-ID) — the layout `greyhook db` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Record {
    first_seen: u64,
    passed: u64,
}

impl Record {
    fn encode(&self, readable: Option<&[&str]>) -> Vec<u8> {
        // Written directly: this runs at every decision, and `format!` is
        // several times dearer in Wasm.
        let mut s = String::with_capacity(24 + readable.map_or(0, |r| r.iter().map(|p| p.len() + 1).sum()));
        let mut digits = itoa::Buffer::new();
        s.push_str(digits.format(self.first_seen));
        s.push(' ');
        s.push_str(digits.format(self.passed));
        for p in readable.into_iter().flatten() {
            s.push('\t');
            // A tab or line break in a part would break the layout. Parts
            // are nearly always printable ASCII, copied whole; a `char` at
            // a time cost ~15 instructions a character in Wasm.
            if printable_ascii(p.as_bytes()) {
                s.push_str(p);
            } else {
                s.extend(p.chars().map(|c| if c.is_control() { ' ' } else { c }));
            }
        }
        s.into_bytes()
    }
    /// The record `encode` wrote: `FIRST_SEEN PASSED`, then the readable
    /// parts after a tab (not read back). Read as bytes, the numbers a
    /// digit at a time: a UTF-8 check of the whole value, two searches
    /// and `parse` cost ~600 instructions a decision in Wasm.
    fn decode(b: &[u8]) -> Option<Record> {
        let (first_seen, rest) = leading_number(b)?;
        let (passed, rest) = leading_number(rest.strip_prefix(b" ")?)?;
        matches!(rest.first(), None | Some(b'\t')).then_some(Record { first_seen, passed })
    }
}

/// The decimal number `b` starts with (at least one digit, no sign, at
/// most `u64::MAX`) and the bytes after it.
fn leading_number(b: &[u8]) -> Option<(u64, &[u8])> {
    let mut v: u64 = 0;
    let mut n = 0;
    for &c in b {
        if !c.is_ascii_digit() {
            break;
        }
        let d = u64::from(c - b'0');
        // Nineteen digits always fit; from the twentieth on the overflow
        // check (in Wasm a 128-bit multiplication, a call of its own).
        v = if n < 19 { v * 10 + d } else { v.checked_mul(10)?.checked_add(d)? };
        n += 1;
    }
    (n > 0).then(|| (v, &b[n..]))
}

/// Whether every byte of `b` is printable ASCII (`0x20..=0x7e`), read
/// eight bytes at a time (`bytes::not_printable_ascii`): a byte loop
/// compiled to Wasm also pays an interruption check a byte.
fn printable_ascii(b: &[u8]) -> bool {
    crate::bytes::find(b, crate::bytes::not_printable_ascii).is_none()
}

/// How often a compare-and-swap is retried before the call gives up.
const CAS_TRIES: usize = 4;

/// The reference greylisting filter.
#[derive(Debug, Clone)]
pub struct Greylist {
    /// The configuration in force.
    pub config: Config,
}

fn ttl(secs: u64) -> u32 {
    u32::try_from(secs.max(1)).unwrap_or(u32::MAX)
}

impl Greylist {
    /// A filter with this configuration.
    pub fn new(config: Config) -> Greylist {
        Greylist { config }
    }

    fn tempfail(&self, code: u16, text: Vec<String>, retry: u64) -> Decision {
        Decision::Tempfail(Reply {
            code,
            enhanced: Some("4.7.1".into()),
            text,
            retry_after: Some(u32::try_from(retry).unwrap_or(u32::MAX)),
        })
    }

    /// Screens the client (see [`crate::identity`]); an exemption is
    /// logged at debug (the identity is logged with the triplet's outcome).
    fn screen(&self, ctx: &Context, kv: &mut dyn Host) -> Result<Option<Identity>, Error> {
        match identity::screen(&self.config, ctx, kv)? {
            Screen::Exempt(why) => {
                let reason = match why.as_str() {
                    "authenticated" => "authenticated",
                    w if w.starts_with("whitelisted client") => "whitelist-client",
                    // Listed on a DNSWL or not suspicious (`selective_total` says which).
                    _ => "selective",
                };
                kv.counter_add("skipped_total", &[("reason", reason)], 1);
                kv.log(Level::Debug, &format!("session {}: {}: {why}", ctx.session.id, ctx.session.client_address));
                Ok(None)
            }
            Screen::Greylist(id) => Ok(Some(id)),
        }
    }

    /// The store-held whitelist keys for this client, sender and
    /// recipients (`greyhook db whitelist` writes them, with their
    /// lifetime): `wl/client/NETWORK` (the client's /24 or /64 as the
    /// filter groups it), `wl/sender/DOMAIN`, `wl/rcpt/ADDRESS`.
    fn whitelist_keys(&self, ctx: &Context, id: &Identity, sender: &str, recipients: &[String]) -> Vec<String> {
        // The network identity's key is the client network already.
        let key = match id.kind {
            IdentityKind::Network => ["wl/client/", &id.key].concat(),
            _ => ["wl/client/", &self.client_network(ctx)].concat(),
        };
        let mut keys = Vec::with_capacity(2 + recipients.len());
        keys.push(key);
        // Bounded so a key stays within the host's 256 bytes.
        if let Some((_, d)) = normalize::split_at_last_at(sender).filter(|(_, d)| !d.is_empty() && d.len() <= 200) {
            let mut k = ["wl/sender/", d].concat();
            k.make_ascii_lowercase();
            keys.push(k);
        }
        keys.extend(recipients.iter().filter_map(|r| rcpt_whitelist_key(r)));
        keys
    }

    /// True if one of `keys` (see [`Self::whitelist_keys`]) is in the store.
    fn db_whitelisted(&self, keys: &[String], kv: &mut dyn Host) -> Result<bool, Error> {
        for k in keys {
            if get(kv, k)?.is_some() {
                kv.counter_add("skipped_total", &[("reason", "whitelist-db")], 1);
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// True if the identity is auto-whitelisted (`awl/IDENTITY` counts its passes).
    fn auto_whitelisted(&self, id: &Identity, kv: &mut dyn Host) -> Result<bool, Error> {
        if self.config.auto_whitelist_after == 0 {
            return Ok(false);
        }
        Ok(match get(kv, &["awl/", &id.key].concat())? {
            Some((v, _)) => {
                std::str::from_utf8(&v).ok().and_then(|s| s.parse::<u32>().ok()).unwrap_or(0) >= self.config.auto_whitelist_after
            }
            None => false,
        })
    }

    /// Counts a pass of the client identity towards auto-whitelisting.
    fn count_pass(&self, id: &Identity, kv: &mut dyn Host) -> Result<(), Error> {
        if self.config.auto_whitelist_after == 0 {
            return Ok(());
        }
        greyhook_filter::store::increment(kv, &["awl/", &id.key].concat(), 1, ttl(self.config.max_age))?;
        Ok(())
    }

    /// The client's network as the network identity names it (its /24 or
    /// /64, by `ipv4_prefix` and `ipv6_prefix`).
    fn client_network(&self, ctx: &Context) -> String {
        let c = &self.config;
        normalize::client_network(ctx.session.client_address, c.ipv4_prefix, c.ipv6_prefix)
    }

    /// The key the triplet `parts` (keyed on `id`) has under the client's
    /// network instead, when `id` is a DNS identity; `None` for the network
    /// identity itself.
    fn network_key(&self, ctx: &Context, id: &Identity, prefix: &str, parts: &[&str]) -> Option<String> {
        if id.kind == IdentityKind::Network {
            return None;
        }
        let net = self.client_network(ctx);
        let mut p: Vec<&str> = parts.to_vec();
        *p.first_mut()? = &net;
        Some(prefixed_triplet_key(prefix, &p))
    }

    /// Looks up and updates a greylist record under compare-and-swap.
    ///
    /// `carried`: for a triplet keyed on a DNS identity, the key the same
    /// triplet has under the client's network (see [`Self::network_key`]),
    /// asked for only when `key` has no live record. A first attempt whose
    /// lookups failed or were cut off by the deadline was keyed on the
    /// network; the lookup cut off went on and filled the cache, so the
    /// retry from the same client gets the DNS identity. Without this, that
    /// retry would be a first sight and wait out a second delay. With it,
    /// the new record starts from the network record's times: no weaker
    /// than `identity = ["network"]`, under which that record would decide.
    fn check(
        &self,
        key: &str,
        parts: &[&str],
        carried: impl Fn() -> Option<String>,
        delay: u64,
        now: u64,
        kv: &mut dyn Host,
    ) -> Result<(Outcome, bool), Error> {
        let readable = (!self.config.privacy).then_some(parts);
        let c = &self.config;
        let is_live = |r: &Record| {
            if r.passed > 0 { r.passed.saturating_add(c.max_age) > now } else { r.first_seen.saturating_add(c.retry_window) > now }
        };
        for _ in 0..CAS_TRIES {
            let (rec, ver) = match get(kv, key)? {
                Some((v, ver)) => (Record::decode(&v), ver),
                None => (None, 0),
            };
            let mut live = rec.filter(is_live);
            let mut was_carried = false;
            if live.is_none()
                && let Some(k) = carried()
            {
                live = get(kv, &k)?.and_then(|(v, _)| Record::decode(&v)).filter(is_live);
                was_carried = live.is_some();
            }
            let (next, outcome, life) = match live {
                // No blocking time: the first sighting passes.
                None if delay == 0 => (Record { first_seen: now, passed: now }, Outcome::FirstPass(0), c.max_age),
                None => (Record { first_seen: now, passed: 0 }, Outcome::Defer { left: delay, first: true }, c.retry_window),
                Some(r) if r.passed > 0 => (Record { first_seen: r.first_seen, passed: now }, Outcome::Known, c.max_age),
                Some(r) if now < r.first_seen.saturating_add(delay) => {
                    let early = Outcome::Defer { left: r.first_seen.saturating_add(delay) - now, first: false };
                    if !was_carried {
                        return Ok((early, false));
                    }
                    // Carried over: the record is written under `key` with
                    // the network record's first sighting.
                    (r, early, r.first_seen.saturating_add(c.retry_window).saturating_sub(now))
                }
                Some(r) => {
                    (Record { first_seen: r.first_seen, passed: now }, Outcome::FirstPass(now.saturating_sub(r.first_seen)), c.max_age)
                }
            };
            if set(kv, key, &next.encode(readable), ttl(life), Some(ver))?.is_some() {
                return Ok((outcome, was_carried));
            }
        }
        Err(Error(format!("{key}: the record kept changing under compare-and-swap")))
    }

    /// Greylists `parts` (the triplet or its stand-in) under `key`, their
    /// [`triplet_key_for`] `code` (computed once by the caller, which has
    /// usually asked the store for it already), and builds the verdict.
    #[allow(clippy::too_many_arguments)] // all of them the decision's own
    fn greylist(
        &self,
        ctx: &Context,
        id: &Identity,
        key: &str,
        parts: &[&str],
        delay: u64,
        code: u16,
        kv: &mut dyn Host,
    ) -> Result<Verdict, Error> {
        debug_assert_eq!(key, triplet_key_for(code, parts));
        let prefix = key_prefix(code);
        let (outcome, carried) = self.check(key, parts, || self.network_key(ctx, id, prefix, parts), delay, ctx.now, kv)?;
        if carried {
            kv.counter_add("network_carried_total", &[("identity", id.kind.name())], 1);
            kv.log(
                Level::Info,
                &format!(
                    "session {}: first seen under the client network, now identity={}: its first attempt counts",
                    ctx.session.id, id.key
                ),
            );
        }
        let (name, kind) = (
            match outcome {
                Outcome::Defer { first: true, .. } => "new",
                Outcome::Defer { first: false, .. } => "too-early",
                Outcome::FirstPass(_) => "passed",
                Outcome::Known => "known",
            },
            id.kind.name(),
        );
        kv.counter_add("triplets_total", &[("outcome", name), ("identity", kind)], 1);
        // The host logs every decision; the filter adds the identity (the
        // same session id) when it is not the client network.
        if id.kind != IdentityKind::Network && !matches!(outcome, Outcome::Known) {
            let said = if matches!(outcome, Outcome::Defer { .. }) { "greylisted" } else { name };
            kv.log(Level::Info, &format!("session {}: {said} identity={} ({kind})", ctx.session.id, id.key));
        }
        Ok(match outcome {
            Outcome::Defer { left, .. } => {
                Verdict { decision: self.tempfail(code, self.config.reply_text.clone(), left), ..Verdict::cont() }
            }
            Outcome::FirstPass(waited) => {
                self.count_pass(id, kv)?;
                kv.observe("delay_seconds", &[("identity", kind)], waited as f64);
                let mut v = Verdict::cont();
                if self.config.add_header {
                    // The client network is in the Received header already.
                    let value = match id.kind {
                        IdentityKind::Network => format!("delayed {waited} seconds by greyhook"),
                        _ => format!("delayed {waited} seconds by greyhook, identity {}", id.key),
                    };
                    v.add_headers.push(Header { name: "X-Greylist".into(), value });
                }
                v
            }
            Outcome::Known => Verdict::cont(),
        })
    }

    /// The sender as it goes into a triplet key. An address the filter
    /// cannot normalise (spaces, a quoted local part, controls, over 320
    /// bytes, U+FFFD from invalid UTF-8) is client input, not a host fault:
    /// it is keyed on its raw bytes and greylisted like any other, never
    /// let through.
    fn key_sender(&self, ctx: &Context, sender: &str, kv: &mut dyn Host) -> String {
        match check_address(sender) {
            Ok(()) if self.config.normalize_sender => normalize_sender(sender),
            Ok(()) => sender.to_ascii_lowercase(),
            Err(e) => {
                kv.log(Level::Info, &format!("session {}: sender keyed on its raw bytes: {}", ctx.session.id, e.0));
                raw_key(sender)
            }
        }
    }

    /// The recipient as it goes into a triplet key (see [`Self::key_sender`]).
    fn key_recipient(&self, ctx: &Context, recipient: &str, kv: &mut dyn Host) -> String {
        match check_address(recipient) {
            Ok(()) if !recipient.is_empty() => normalize_recipient(recipient),
            Ok(()) => raw_key(recipient),
            Err(e) => {
                kv.log(Level::Info, &format!("session {}: recipient keyed on its raw bytes: {}", ctx.session.id, e.0));
                raw_key(recipient)
            }
        }
    }

    /// The connect hook: greylists the client network at stage `connect`.
    pub fn on_connect(&self, ctx: &Context, kv: &mut dyn Host) -> Result<Verdict, Error> {
        if self.config.stage != Stage::Connect {
            return Ok(Verdict::cont());
        }
        let Some(id) = self.screen(ctx, kv)? else { return Ok(Verdict::cont()) };
        if self.auto_whitelisted(&id, kv)? {
            kv.counter_add("skipped_total", &[("reason", "auto-whitelist")], 1);
            return Ok(Verdict::cont());
        }
        if self.db_whitelisted(&self.whitelist_keys(ctx, &id, "", &[]), kv)? {
            return Ok(Verdict::cont());
        }
        let parts = [id.key.as_str()];
        let v = self.greylist(ctx, &id, &triplet_key_for(421, &parts), &parts, self.config.delay, 421, kv)?;
        // No message to put a header in yet.
        Ok(Verdict { add_headers: Vec::new(), ..v })
    }

    /// The EHLO hook: advertises `GREYLIST`.
    pub fn ehlo_keywords(&self) -> Vec<String> {
        if self.config.ehlo_keyword { vec!["GREYLIST".into()] } else { Vec::new() }
    }

    /// The RCPT hook.
    pub fn on_rcpt(&self, ctx: &Context, recipient: &str, kv: &mut dyn Host) -> Result<Verdict, Error> {
        let sender = ctx.transaction.sender.as_deref().unwrap_or("");
        let rcpt = self.key_recipient(ctx, recipient, kv);
        let split = crate::config::split_recipient(&rcpt);
        let always = self.config.whitelist_recipients.iter().any(|p| p.matches_split(&rcpt, split));
        let (group, greylist, delay) = self.config.policy_for(&rcpt);
        // Seed 000: without PRDR, accept only recipients that share the
        // first accepted recipient's policy; ask for the others again at once
        // in a new transaction. Whitelisted recipients (postmaster) fit any.
        let group = match ctx.transaction.recipients.first().map(|r| &r.policy_group) {
            Some(first) if always => first.clone(),
            Some(first) if first != group => {
                kv.log(Level::Info, &format!("{recipient}: policy group {group} differs from {first}: retry at once"));
                // Its greylist record starts now, so the client's retry in a
                // new transaction waits out one delay, not two.
                if greylist
                    && self.config.stage == Stage::Rcpt
                    && !sender.is_empty()
                    && let Some(id) = self.screen(ctx, kv)?
                    && !self.auto_whitelisted(&id, kv)?
                {
                    let s = self.key_sender(ctx, sender, kv);
                    let parts = [id.key.as_str(), &s, &rcpt];
                    let carried = || self.network_key(ctx, &id, key_prefix(451), &parts);
                    self.check(&triplet_key_for(451, &parts), &parts, carried, delay, ctx.now, kv)?;
                }
                // The group goes with the answer, so the host logs it as
                // what it is (action=policy-group).
                let decision = self.tempfail(
                    451,
                    vec!["This recipient has a different policy than the first one; please retry it in a new transaction".into()],
                    0,
                );
                return Ok(with_group(Verdict { decision, ..Verdict::cont() }, group));
            }
            _ => group.to_string(),
        };
        if always || !greylist || self.config.stage != Stage::Rcpt || sender.is_empty() {
            // Whitelisted or opted out, or decided at another stage (the
            // null sender is greylisted at DATA, never at RCPT).
            if always {
                kv.counter_add("skipped_total", &[("reason", "whitelist-recipient")], 1);
            } else if !greylist {
                kv.counter_add("skipped_total", &[("reason", "policy-off")], 1);
            }
            return Ok(with_group(Verdict::cont(), &group));
        }
        let Some(id) = self.screen(ctx, kv)? else { return Ok(with_group(Verdict::cont(), &group)) };
        let sender = self.key_sender(ctx, sender, kv);
        // The auto-whitelist count and the triplet in one crossing (one
        // round trip to Redis); the write after it is the second.
        let parts = [id.key.as_str(), &sender, &rcpt];
        let (awl, triplet) = (["awl/", &id.key].concat(), triplet_key_for(451, &parts));
        let wl = self.whitelist_keys(ctx, &id, ctx.transaction.sender.as_deref().unwrap_or(""), std::slice::from_ref(&rcpt));
        let mut keys: Vec<&str> = wl.iter().map(String::as_str).collect();
        if self.config.auto_whitelist_after > 0 {
            keys.push(&awl);
        }
        keys.push(&triplet);
        let kv = &mut greyhook_filter::store::Prefetch::new(kv, &keys)?;
        if self.db_whitelisted(&wl, kv)? {
            kv.log(Level::Debug, &format!("session {}: whitelisted in the store", ctx.session.id));
            return Ok(with_group(Verdict::cont(), &group));
        }
        if self.auto_whitelisted(&id, kv)? {
            kv.counter_add("skipped_total", &[("reason", "auto-whitelist")], 1);
            kv.log(Level::Debug, &format!("session {}: {} auto-whitelisted", ctx.session.id, id.key));
            return Ok(with_group(Verdict::cont(), &group));
        }
        Ok(with_group(self.greylist(ctx, &id, &triplet, &parts, delay, 451, kv)?, &group))
    }

    /// The DATA hook: greylists at stage `data`, and the null sender at stage `rcpt`.
    pub fn on_data(&self, ctx: &Context, message_id: Option<&str>, kv: &mut dyn Host) -> Result<Verdict, Error> {
        let sender = ctx.transaction.sender.as_deref().unwrap_or("");
        let at_data = self.config.stage == Stage::Data || (self.config.stage == Stage::Rcpt && sender.is_empty());
        let recipients = &ctx.transaction.recipients;
        if !at_data || recipients.is_empty() {
            return Ok(Verdict::cont());
        }
        let whitelisted = |r: &str| self.config.whitelist_recipients.iter().any(|p| p.matches(&normalize_recipient(r)));
        if recipients.iter().all(|r| whitelisted(&r.address)) {
            kv.counter_add("skipped_total", &[("reason", "whitelist-recipient")], 1);
            return Ok(Verdict::cont());
        }
        let group = &recipients[0].policy_group;
        let (greylist, delay) = self.config.policy_named(group);
        if !greylist {
            return Ok(Verdict::cont());
        }
        let Some(id) = self.screen(ctx, kv)? else { return Ok(Verdict::cont()) };
        if self.auto_whitelisted(&id, kv)? {
            kv.counter_add("skipped_total", &[("reason", "auto-whitelist")], 1);
            return Ok(Verdict::cont());
        }
        // The client or sender whitelisted, or every recipient: the message goes through.
        if self.db_whitelisted(&self.whitelist_keys(ctx, &id, sender, &[]), kv)? {
            return Ok(Verdict::cont());
        }
        let rcpt_keys: Option<Vec<String>> = recipients.iter().map(|r| rcpt_whitelist_key(&normalize_recipient(&r.address))).collect();
        if let Some(k) = rcpt_keys.filter(|k| !k.is_empty())
            && all_listed(&k, kv)?
        {
            return Ok(Verdict::cont());
        }
        let sender = self.key_sender(ctx, sender, kv);
        // The Message-ID joins the key; without one, the recipients stand in.
        let mid = match message_id.map(str::trim).filter(|m| !m.is_empty() && m.len() <= 998) {
            Some(m) => m.to_string(),
            None => {
                let mut r: Vec<String> = recipients.iter().map(|a| self.key_recipient(ctx, &a.address, kv)).collect();
                r.sort();
                r.join(",")
            }
        };
        let parts = [id.key.as_str(), &sender, &mid];
        self.greylist(ctx, &id, &triplet_key_for(451, &parts), &parts, delay, 451, kv)
    }
}

/// The store key prefix of the records a reply `code` greylists: `c/` for
/// the connection stage's (`421`), `t/` for triplets.
fn key_prefix(code: u16) -> &'static str {
    if code == 421 { "c/" } else { "t/" }
}

/// The store key of `parts` greylisted with reply `code` ([`key_prefix`]).
fn triplet_key_for(code: u16, parts: &[&str]) -> String {
    prefixed_triplet_key(key_prefix(code), parts)
}

/// The key form of an address that cannot be normalised: its bytes as
/// they are, marked so that no normalised address can collide with it.
fn raw_key(a: &str) -> String {
    format!("raw:{a}")
}

/// Re-exported for the glue: the address checks.
pub use normalize::BadAddress;

/// The store-held whitelist key of a normalised recipient (none past 200
/// bytes: such a recipient cannot be whitelisted this way).
fn rcpt_whitelist_key(rcpt: &str) -> Option<String> {
    (rcpt.len() <= 200).then(|| ["wl/rcpt/", rcpt].concat())
}

/// True if every key is in the store (a DATA-stage message whose recipients
/// are all whitelisted).
fn all_listed(keys: &[String], kv: &mut dyn Host) -> Result<bool, Error> {
    for k in keys {
        if get(kv, k)?.is_none() {
            return Ok(false);
        }
    }
    kv.counter_add("skipped_total", &[("reason", "whitelist-db")], 1);
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    use greyhook_filter::testing::TestHost as Mem;

    #[test]
    fn printable_ascii_is_told_at_every_byte_and_position() {
        // Every byte value at every position of every length up to 20,
        // against the plain definition.
        for n in 1..20 {
            for i in 0..n {
                for v in 0..=255u8 {
                    let mut b = vec![b'a'; n];
                    b[i] = v;
                    assert_eq!(printable_ascii(&b), b.iter().all(|c| (0x20..0x7f).contains(c)), "{b:?}");
                }
            }
        }
        assert!(printable_ascii(b""));
    }

    #[test]
    fn a_record_keeps_its_parts_readable_and_control_characters_out() {
        let r = Record { first_seen: 17, passed: 0 };
        let parts = ["192.0.2.1", "alice@example.org", "bob@example.com"];
        assert_eq!(r.encode(Some(&parts)), b"17 0\t192.0.2.1\talice@example.org\tbob@example.com");
        let odd = ["a\tb\r\nc\u{7f}d\u{85}e", "ünï\u{1}", "\u{0}longer than eight bytes\u{9f}"];
        assert_eq!(String::from_utf8(r.encode(Some(&odd))).unwrap(), "17 0\ta b  c d e\tünï \t longer than eight bytes ");
        assert_eq!(r.encode(None), b"17 0");
        assert_eq!(Record::decode(&r.encode(Some(&odd))), Some(r));
    }

    #[test]
    fn records_are_read_back_exactly_and_nothing_else_is() {
        let r = Record { first_seen: u64::MAX, passed: 0 };
        assert_eq!(Record::decode(&r.encode(None)), Some(r));
        let r = Record { first_seen: 9_999_999_999_999_999_999, passed: u64::MAX - 1 };
        assert_eq!(Record::decode(&r.encode(None)), Some(r));
        assert_eq!(Record::decode(b"0000000000000000000000017 2"), Some(Record { first_seen: 17, passed: 2 }));
        assert_eq!(Record::decode(b"17 2"), Some(Record { first_seen: 17, passed: 2 }));
        assert_eq!(Record::decode(b"17 2\t\xff\xfe"), Some(Record { first_seen: 17, passed: 2 }));
        for bad in [
            &b""[..],
            b"17",
            b"17 ",
            b" 2",
            b"17  2",
            b"+17 2",
            b"17 -2",
            b"17 2 3",
            b"17 2x",
            b"1.5 2",
            b"18446744073709551616 0",
            b"0 99999999999999999999",
            b"17\t2",
        ] {
            assert_eq!(Record::decode(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    fn ctx(ip: &str, sender: &str, now: u64) -> Context {
        Context {
            session: Session::new("t", ip.parse().unwrap()),
            transaction: Transaction { sender: Some(sender.into()), recipients: Vec::new() },
            now,
        }
    }

    fn retry(v: &Verdict) -> Option<u32> {
        match &v.decision {
            Decision::Tempfail(r) => r.retry_after,
            _ => None,
        }
    }

    #[test]
    fn first_early_then_pass() {
        let g = Greylist::new(Config::default());
        let mut kv = Mem::default();
        let v = g.on_rcpt(&ctx("192.0.2.1", "a@x.org", 1000), "b@y.org", &mut kv).unwrap();
        assert_eq!(retry(&v), Some(300));
        let v = g.on_rcpt(&ctx("192.0.2.1", "a@x.org", 1100), "b@y.org", &mut kv).unwrap();
        assert_eq!(retry(&v), Some(200));
        let v = g.on_rcpt(&ctx("192.0.2.200", "a@x.org", 1300), "b@y.org", &mut kv).unwrap();
        assert_eq!(v.decision, Decision::Continue);
        assert_eq!(v.add_headers, vec![Header { name: "X-Greylist".into(), value: "delayed 300 seconds by greyhook".into() }]);
        assert_eq!(v.policy_group.as_deref(), Some("default"));
    }

    /// Client input the filter cannot normalise is greylisted on its raw
    /// bytes, never let through; distinct raw addresses are distinct keys.
    #[test]
    fn unusable_addresses_are_greylisted_on_their_raw_bytes() {
        let g = Greylist::new(Config::default());
        let long = format!("{}@evil.example", "x".repeat(400));
        for (sender, rcpt) in [
            ("\"a b\"@evil.example", "v@d.example"),
            ("spam@evil.example", "\"v w\"@d.example"),
            (long.as_str(), "v@d.example"),
            ("a\tb@evil.example", "v@d.example"),
            ("a\u{7f}@evil.example", "v@d.example"),
            ("\u{fffd}@evil.example", "v@d.example"),
            ("spam@evil.example", ""),
        ] {
            let mut kv = Mem::default();
            let v = g.on_rcpt(&ctx("192.0.2.1", sender, 1000), rcpt, &mut kv).unwrap();
            assert_eq!(retry(&v), Some(300), "{sender:?} -> {rcpt:?}");
            let v = g.on_rcpt(&ctx("192.0.2.1", sender, 1400), rcpt, &mut kv).unwrap();
            assert_eq!(v.decision, Decision::Continue, "the retry passes: {sender:?}");
            let other = g.on_rcpt(&ctx("192.0.2.1", &format!("{sender}x"), 1400), rcpt, &mut kv).unwrap();
            assert_eq!(retry(&other), Some(300), "another raw sender is another triplet");
        }
        // At DATA (null sender, or stage data) too.
        let mut kv = Mem::default();
        let mut c = ctx("192.0.2.1", "\"a b\"@evil.example", 1000);
        c.transaction.recipients = vec![AcceptedRecipient { address: "v@d.example".into(), policy_group: "default".into() }];
        let g = Greylist::new(Config { stage: Stage::Data, ..Config::default() });
        assert_eq!(retry(&g.on_data(&c, None, &mut kv).unwrap()), Some(300));
    }
}
