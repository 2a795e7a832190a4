//! One log line per decision, at info, that an operator can grep (target
//! `greyhook::decision`), in the spirit of postgrey's:
//!
//! ```text
//! INFO greyhook::decision: action=greylist phase=rcpt client=192.0.2.1 client_name=mx.example.org sender=<a@example.org> recipient=<b@example.com> code=451 retry=300
//! INFO greyhook::decision: action=pass phase=rcpt client=192.0.2.1 ... header="X-Greylist: delayed 312 seconds by greyhook" group=default
//! ```

use crate::domain::types::{Context, Decision, Phase, Verdict};

/// The short name of a verdict's action.
pub fn action(v: &Verdict) -> &'static str {
    match &v.decision {
        Decision::Continue if v.add_headers.is_empty() => "dunno",
        Decision::Continue | Decision::Accept => "pass",
        // Seed 000: a recipient of another policy group, sent to a new
        // transaction at once (`retry=00:00:00`), is not greylisting.
        Decision::Tempfail(r) if r.retry_after == Some(0) && v.policy_group.is_some() => "policy-group",
        // Greylisting states its delay; a tempfail without one is something
        // else (the failure policy answering for a failed filter, or a
        // filter's own temporary refusal), and an operator must tell them apart.
        Decision::Tempfail(r) if r.retry_after.is_none() => "tempfail",
        Decision::Tempfail(_) => "greylist",
        Decision::Reject(_) => "reject",
    }
}

/// Logs one decision.
pub fn log_decision(phase: Phase, ctx: &Context, recipient: Option<&str>, v: &Verdict) {
    if !tracing::enabled!(target: "greyhook::decision", tracing::Level::INFO) {
        return;
    }
    let s = &ctx.session;
    let mut line = format!("action={} phase={phase} client={}", action(v), s.client_address);
    if let Some(n) = &s.client_name {
        line.push_str(&format!(" client_name={n}"));
    }
    if let Some(snd) = &ctx.transaction.sender {
        line.push_str(&format!(" sender=<{snd}>"));
    }
    if let Some(r) = recipient {
        line.push_str(&format!(" recipient=<{r}>"));
    }
    if let Some(r) = v.reply() {
        line.push_str(&format!(" code={}", r.code));
        if let Some(t) = r.retry_after {
            line.push_str(&format!(" retry={t}"));
        }
    }
    if let Some(h) = v.add_headers.first() {
        line.push_str(&format!(" header=\"{}: {}\"", h.name, h.value));
    }
    if let Some(g) = &v.policy_group {
        line.push_str(&format!(" group={g}"));
    }
    if !s.id.is_empty() {
        line.push_str(&format!(" session={}", s.id));
    }
    tracing::info!(target: "greyhook::decision", "{line}");
}
