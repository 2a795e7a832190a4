//! The reference filter as a [`greyhook_filter::Filter`]: the SDK does the
//! component glue (bindings, conversions, the store and log imports), so
//! this is only which hook calls which decision.

use greyhook_filter::{Context, EhloVerdict, Filter, Host, Message, Phase, Result, SkipHooks, Verdict};

use crate::config::{Config, Stage};
use crate::filter::{self, Greylist};

impl Filter for Greylist {
    const NAME: &'static str = filter::NAME;
    const VERSION: &'static str = filter::VERSION;

    fn init(config: &str) -> std::result::Result<Self, String> {
        Ok(Greylist::new(Config::parse(config).map_err(|e| e.0)?))
    }

    /// What the filter never needs called: MAIL (it decides at RCPT, with
    /// the sender in the context), EHLO (its keyword is the
    /// configuration's, the same for every client), connect unless it
    /// greylists there, DATA when it greylists at connect, and at RCPT,
    /// DATA for any sender but the null one (the bounces it decides after
    /// the final dot). Three filter calls a message fewer at the default
    /// stage (two for a bounce), three with the connect hook.
    fn skip_hooks(&self) -> SkipHooks {
        let stage = self.config.stage;
        let mut phases = vec![Phase::Ehlo, Phase::Mail];
        phases.push(if stage == Stage::Connect { Phase::Data } else { Phase::Connect });
        SkipHooks { phases, ehlo_keywords: self.ehlo_keywords(), data_null_sender_only: stage == Stage::Rcpt }
    }

    fn on_connect(&self, ctx: &Context, host: &mut dyn Host) -> Result<Verdict> {
        Greylist::on_connect(self, ctx, host)
    }

    fn on_ehlo(&self, _ctx: &Context, _host: &mut dyn Host) -> Result<EhloVerdict> {
        Ok(EhloVerdict { verdict: Verdict::cont(), keywords: self.ehlo_keywords() })
    }

    fn on_rcpt(&self, ctx: &Context, recipient: &str, host: &mut dyn Host) -> Result<Verdict> {
        Greylist::on_rcpt(self, ctx, recipient, host)
    }

    fn on_data(&self, ctx: &Context, message: &Message, host: &mut dyn Host) -> Result<Verdict> {
        Greylist::on_data(self, ctx, message.message_id.as_deref(), host)
    }
}

greyhook_filter::export!(Greylist);

#[cfg(test)]
mod tests {
    use greyhook_filter::testing::Harness;
    use greyhook_filter::verdict::VerdictExt;

    use crate::filter::Greylist;

    /// The reference filter through the SDK's harness, as a third party
    /// tests theirs: first sight tempfails with the delay, the retry after
    /// it passes with the header, and the store holds one triplet.
    #[test]
    fn greylists_through_the_harness() {
        let mut h = Harness::<Greylist>::new("delay = 60").unwrap();
        let mut s = h.session("192.0.2.1");
        assert_eq!(s.ehlo("mx.example.org").keywords, vec!["GREYLIST".to_string()]);
        s.mail("alice@example.org");
        let v = s.rcpt("bob@example.com");
        assert!(v.is_tempfail());
        assert_eq!(v.retry_after(), Some(60));
        h.advance(61);
        let mut s = h.session("192.0.2.9");
        s.mail("alice@example.org");
        assert!(s.rcpt("bob@example.com").passes());
        assert_eq!(s.headers()[0].name, "X-Greylist");
        assert!(h.host.keys().iter().any(|k| k.starts_with("t/")));
        assert!(Harness::<Greylist>::new("delay = \"soon\"").is_err());
    }

    /// The hooks it asks the host to skip follow its stage: never MAIL or
    /// EHLO (whose keyword goes with the skip, or none when turned off),
    /// connect unless it greylists there, DATA when it does, and at RCPT
    /// DATA for every sender but the null one.
    #[test]
    fn skips_the_hooks_its_stage_does_not_use() {
        use greyhook_filter::Phase::*;
        let skip = |config: &str| Harness::<Greylist>::new(config).unwrap().skip;
        let s = skip("");
        assert_eq!((s.phases, s.ehlo_keywords), (vec![Ehlo, Mail, Connect], vec!["GREYLIST".to_string()]));
        assert_eq!(skip("stage = \"data\"").phases, vec![Ehlo, Mail, Connect]);
        assert_eq!(skip("stage = \"connect\"").phases, vec![Ehlo, Mail, Data]);
        assert_eq!(skip("ehlo_keyword = false").ehlo_keywords, Vec::<String>::new());
        // DATA for the null sender only at RCPT; every message at stage data.
        assert!(s.data_null_sender_only);
        assert!(!skip("stage = \"data\"").data_null_sender_only);
        // At RCPT a bounce is still greylisted after the final dot; a message
        // with a sender passed at RCPT is not asked about again.
        let mut h = Harness::<Greylist>::new("").unwrap();
        let mut bounce = h.session("192.0.2.1");
        bounce.mail("");
        assert!(bounce.rcpt("bob@example.com").passes());
        assert!(bounce.data(Some("<1@example.org>"), &[]).is_tempfail());
        h.advance(400);
        let mut s = h.session("192.0.2.1");
        s.mail("alice@example.org");
        assert!(s.rcpt("bob@example.com").is_tempfail());
        // Were DATA asked (it is not, the harness skipping as the host
        // does), its answer would be no different: nothing to decide.
        assert!(s.data(Some("<2@example.org>"), &[]).passes());
        // At stage connect the connect hook still greylists: 421 at the greeting.
        let mut h = Harness::<Greylist>::new("stage = \"connect\"").unwrap();
        assert!(h.session("192.0.2.1").connect().is_tempfail());
    }
}
