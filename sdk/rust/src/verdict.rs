//! Building verdicts: `tempfail("Greylisted").retry_after(300)` is a
//! `451 4.7.1 Greylisted retry=00:05:00` on the wire (`421` at connect:
//! the host picks the code for the phase unless one is set).

use greyhook_types::{Decision, Header, Reply, Verdict};

/// A reply being built; `.into()` makes it a [`Verdict`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyBuilder {
    reject: bool,
    reply: Reply,
    headers: Vec<Header>,
}

/// A temporary failure: `451 4.7.1 TEXT` (a `421` at connect, where the
/// draft puts greylisting at the greeting: use [`ReplyBuilder::code`]).
pub fn tempfail(text: &str) -> ReplyBuilder {
    ReplyBuilder {
        reject: false,
        reply: Reply { code: 451, enhanced: Some("4.7.1".into()), text: lines(text), retry_after: None },
        headers: Vec::new(),
    }
}

/// A permanent failure: `550 5.7.1 TEXT`.
pub fn reject(text: &str) -> ReplyBuilder {
    ReplyBuilder {
        reject: true,
        reply: Reply { code: 550, enhanced: Some("5.7.1".into()), text: lines(text), retry_after: None },
        headers: Vec::new(),
    }
}

fn lines(text: &str) -> Vec<String> {
    text.lines().map(str::to_string).collect()
}

impl ReplyBuilder {
    /// The reply code (4yz for a tempfail, 5yz for a reject).
    pub fn code(mut self, code: u16) -> Self {
        self.reply.code = code;
        self
    }

    /// The enhanced status code (its class must match the code's), or none.
    pub fn enhanced(mut self, enhanced: Option<&str>) -> Self {
        self.reply.enhanced = enhanced.map(str::to_string);
        self
    }

    /// Seconds the client should wait: the draft's `retry=` hint on the
    /// last line (clamped to 99 days by the host).
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.reply.retry_after = Some(u32::try_from(secs).unwrap_or(u32::MAX));
        self
    }

    /// The reply as built.
    pub fn reply(&self) -> &Reply {
        &self.reply
    }

    /// The verdict.
    pub fn verdict(self) -> Verdict {
        let decision = if self.reject { Decision::Reject(self.reply) } else { Decision::Tempfail(self.reply) };
        Verdict { decision, add_headers: self.headers, policy_group: None }
    }
}

impl From<ReplyBuilder> for Verdict {
    fn from(b: ReplyBuilder) -> Verdict {
        b.verdict()
    }
}

/// `accept`: no later filter is asked about this phase.
pub fn accept() -> Verdict {
    Verdict { decision: Decision::Accept, ..Verdict::cont() }
}

/// "No opinion" with a header to add if the message is accepted.
pub fn with_header(name: &str, value: &str) -> Verdict {
    Verdict { add_headers: vec![Header { name: name.into(), value: value.into() }], ..Verdict::cont() }
}

/// Questions a test asks of a verdict.
pub trait VerdictExt {
    /// A temporary failure.
    fn is_tempfail(&self) -> bool;
    /// A permanent failure.
    fn is_reject(&self) -> bool;
    /// Neither: the mail goes on (continue or accept).
    fn passes(&self) -> bool;
    /// The `retry=` hint, if any.
    fn retry_after(&self) -> Option<u32>;
}

impl VerdictExt for Verdict {
    fn is_tempfail(&self) -> bool {
        matches!(self.decision, Decision::Tempfail(_))
    }
    fn is_reject(&self) -> bool {
        matches!(self.decision, Decision::Reject(_))
    }
    fn passes(&self) -> bool {
        matches!(self.decision, Decision::Continue | Decision::Accept)
    }
    fn retry_after(&self) -> Option<u32> {
        self.reply().and_then(|r| r.retry_after)
    }
}
