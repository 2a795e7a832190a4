//! Greylisting keyed on who the sender *is*, not where it sends from.
//!
//! Big senders retry a deferred message from another address, often in
//! another network, so a triplet keyed on the client's /24 never matches
//! and the mail waits for hours. This filter asks the host for the SPF
//! result of the MAIL FROM: when SPF passes, the sender's domain vouches
//! for the client, and the triplet is keyed on that domain, so the retry
//! passes from any address the domain's SPF record allows. Otherwise it
//! keys on the client network, as classic greylisting does.
//!
//! A pass vouches for the client only if the domain's SPF record is
//! specific: spammers publish `v=spf1 +all` or huge ranges, and a botnet
//! retrying from random addresses must not become one identity.
//! `greyhook_filter::spf::scope` walks the record (see docs/sender-farms.md).

use greyhook_filter::net::{client_network, domain_of};
use greyhook_filter::spf::{Limits, Scope, scope};
use greyhook_filter::store::{Update, days, update};
use greyhook_filter::{Context, Filter, Host, Result, SpfResult, Verdict, tempfail, verdict::with_header};
use serde::Deserialize;

/// The configuration (`[filter.config]` in greyhook's file).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpfDomain {
    /// Seconds a new triplet is deferred.
    pub delay: u64,
}

impl Default for SpfDomain {
    fn default() -> Self {
        SpfDomain { delay: 300 }
    }
}

/// How a triplet stands.
enum Seen {
    /// Deferred, this many seconds left.
    Wait(u64),
    /// Passed after this many seconds (first pass) or passed before.
    Pass(Option<u64>),
}

impl Filter for SpfDomain {
    const NAME: &'static str = "spf-domain";
    const VERSION: &'static str = "0.1.0";

    fn init(config: &str) -> std::result::Result<Self, String> {
        toml::from_str(config).map_err(|e| e.to_string())
    }

    fn on_rcpt(&self, ctx: &Context, recipient: &str, host: &mut dyn Host) -> Result<Verdict> {
        let ip = ctx.session.client_address;
        let sender = ctx.transaction.sender.as_deref().unwrap_or("");
        let helo = ctx.session.helo.as_deref().unwrap_or("");
        // Who vouches for this client: the sender's domain if its SPF
        // record passes the client, else only the client's network.
        let identity = match domain_of(sender) {
            Some(_) => match host.spf(ip, helo, sender) {
                Ok(spf) if spf.result == SpfResult::Pass && specific(host, &spf.domain) => format!("spf:{}", spf.domain),
                // A failed or slow lookup is no identity: fall back.
                _ => format!("net:{}", client_network(ip, 24, 64)),
            },
            None => format!("net:{}", client_network(ip, 24, 64)),
        };
        let kind = if identity.starts_with("spf:") { "spf" } else { "network" };
        host.counter_add("identity", &[("kind", kind)], 1);
        let key = format!("t/{identity}/{}/{}", sender.to_ascii_lowercase(), recipient.to_ascii_lowercase());
        let (now, delay) = (ctx.now, self.delay);
        // Read-modify-write under compare-and-swap (retried if another
        // instance or host wrote the record meanwhile).
        let seen = update(host, &key, |record| {
            let first = match record {
                None => None,
                Some(b"passed") => return Update::Write(b"passed".to_vec(), days(35), Seen::Pass(None)),
                // Anything else is the first attempt's time (garbage: start over).
                Some(v) => std::str::from_utf8(v).ok().and_then(|s| s.parse::<u64>().ok()),
            };
            match first {
                None => Update::Write(now.to_string().into_bytes(), days(2), Seen::Wait(delay)),
                Some(t) if now < t.saturating_add(delay) => Update::Keep(Seen::Wait(t + delay - now)),
                // The first pass: remembered for 35 days, refreshed by each pass.
                Some(t) => Update::Write(b"passed".to_vec(), days(35), Seen::Pass(Some(now - t))),
            }
        })?;
        Ok(match seen {
            Seen::Wait(left) => tempfail("Greylisted, please try again later").retry_after(left).into(),
            Seen::Pass(Some(waited)) => {
                host.observe("delay_seconds", &[("kind", kind)], waited as f64);
                with_header("X-Greylist", &format!("delayed {waited} seconds by spf-domain ({kind})"))
            }
            Seen::Pass(None) => Verdict::cont(),
        })
    }
}

/// True if `domain`'s SPF record authorises nothing wider than a /16 (an
/// IPv6 /32), without `+all`, `exists` or macros. A lookup that fails is
/// "no": no identity, never a pass.
fn specific(host: &mut dyn Host, domain: &str) -> bool {
    matches!(scope(host, domain, &Limits::default()), Ok(Scope::Specific))
}

greyhook_filter::export!(SpfDomain);

#[cfg(test)]
mod tests {
    use super::*;
    use greyhook_filter::RecordType;
    use greyhook_filter::testing::Harness;
    use greyhook_filter::verdict::VerdictExt;

    #[test]
    fn an_spf_pass_retry_passes_from_another_network() {
        let mut h = Harness::<SpfDomain>::new("delay = 60").unwrap();
        h.dns().spf("big.example", SpfResult::Pass);
        h.dns().add("big.example", RecordType::Txt, &["v=spf1 ip4:198.51.100.0/24 ip4:203.0.113.0/24 -all"]);
        let mut s = h.session("198.51.100.7");
        s.ehlo("out1.big.example");
        s.mail("news@big.example");
        let first = s.rcpt("bob@example.com");
        assert!(first.is_tempfail());
        assert_eq!(first.retry_after(), Some(60));
        h.advance(61);
        // The retry comes from another /24 of the farm.
        let mut s = h.session("203.0.113.9");
        s.ehlo("out7.big.example");
        s.mail("news@big.example");
        assert!(s.rcpt("bob@example.com").passes());
        assert_eq!(h.host.counters["identity{kind=\"spf\"}"], 2);
    }

    #[test]
    fn an_spf_record_that_allows_everyone_is_no_identity() {
        let mut h = Harness::<SpfDomain>::new("delay = 60").unwrap();
        h.dns().spf("open.example", SpfResult::Pass);
        h.dns().add("open.example", RecordType::Txt, &["v=spf1 +all"]);
        let mut s = h.session("198.51.100.7");
        s.mail("a@open.example");
        assert!(s.rcpt("bob@example.com").is_tempfail());
        h.advance(61);
        let mut s = h.session("203.0.113.9");
        s.mail("a@open.example");
        assert!(s.rcpt("bob@example.com").is_tempfail(), "a bot's retry from elsewhere is a new triplet");
    }

    #[test]
    fn without_spf_the_network_is_the_identity() {
        let mut h = Harness::<SpfDomain>::new("delay = 60").unwrap();
        h.dns().spf("small.example", SpfResult::SoftFail);
        let mut s = h.session("198.51.100.7");
        s.mail("a@small.example");
        assert!(s.rcpt("bob@example.com").is_tempfail());
        h.advance(61);
        let mut s = h.session("203.0.113.9");
        s.mail("a@small.example");
        assert!(s.rcpt("bob@example.com").is_tempfail(), "another network is another triplet");
        let mut s = h.session("198.51.100.8");
        s.mail("a@small.example");
        assert!(s.rcpt("bob@example.com").passes(), "the same /24 retried");
    }

    #[test]
    fn a_bad_configuration_names_the_key() {
        let e = Harness::<SpfDomain>::new("dealy = 5").err().unwrap();
        assert!(e.contains("dealy"), "{e}");
    }
}
