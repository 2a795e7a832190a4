//! The filter contract's types (`wit/greyhook.wit`, `greyhook:filter/types`)
//! as plain Rust, with the WIT's names (`client-address` is
//! `client_address`, `add-headers` is `add_headers`): what a host hands a
//! filter and what the filter answers.
//!
//! One definition for both sides: the greyhook host's front ends fill them
//! in and read them back (and convert them to and from the wasmtime
//! bindings at the component boundary), and a Rust filter converts the
//! wit-bindgen bindings to them once and writes its logic, and its native
//! tests, against them. No hand-written mirror can drift: a field added to
//! the WIT is added here, and both conversions stop compiling until they
//! carry it.
#![deny(missing_docs)]

use std::net::IpAddr;

/// What is known about the SMTP session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// An identifier for logs (e.g. Postfix's `instance`).
    pub id: String,
    /// The client's address.
    pub client_address: IpAddr,
    /// The client's forward-confirmed name, if any (Postfix's `client_name`).
    pub client_name: Option<String>,
    /// The name its PTR record gives, confirmed or not (Postfix's
    /// `reverse_client_name`); not to be trusted on its own.
    pub reverse_client_name: Option<String>,
    /// The HELO/EHLO argument, once sent.
    pub helo: Option<String>,
    /// The authenticated identity, if any.
    pub auth_user: Option<String>,
    /// Whether TLS is in use.
    pub tls: bool,
}

impl Session {
    /// A session for `client` with nothing else known yet.
    pub fn new(id: impl Into<String>, client: IpAddr) -> Session {
        Session {
            id: id.into(),
            client_address: client,
            client_name: None,
            reverse_client_name: None,
            helo: None,
            auth_user: None,
            tls: false,
        }
    }
}

/// A recipient accepted earlier in the transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedRecipient {
    /// The address, without angle brackets.
    pub address: String,
    /// The policy group it was accepted under (empty if none).
    pub policy_group: String,
}

/// The mail transaction so far.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Transaction {
    /// MAIL FROM without brackets; `Some("")` is `<>`; `None` before MAIL.
    pub sender: Option<String>,
    /// Recipients accepted so far.
    pub recipients: Vec<AcceptedRecipient>,
}

/// The context of one hook call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    /// The session.
    pub session: Session,
    /// The transaction.
    pub transaction: Transaction,
    /// Unix seconds, as the host's clock says (injected in tests).
    pub now: u64,
}

/// A message header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Field name.
    pub name: String,
    /// Field value, unfolded.
    pub value: String,
}

/// The message at the DATA hook.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Message {
    /// The Message-ID header's value.
    pub message_id: Option<String>,
    /// All headers in order.
    pub headers: Vec<Header>,
}

/// A structured SMTP reply (the host checks it and renders it, with the
/// `retry=` hint on the last line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Reply code (4yz or 5yz).
    pub code: u16,
    /// Enhanced status code such as `4.7.1`.
    pub enhanced: Option<String>,
    /// Text lines.
    pub text: Vec<String>,
    /// Retry hint, seconds.
    pub retry_after: Option<u32>,
}

/// What a filter decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No opinion.
    Continue,
    /// Accept; later filters are not asked.
    Accept,
    /// Temporary failure.
    Tempfail(Reply),
    /// Permanent failure.
    Reject(Reply),
}

/// A hook's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The decision.
    pub decision: Decision,
    /// Headers to add to the message.
    pub add_headers: Vec<Header>,
    /// The recipient's policy group (RCPT).
    pub policy_group: Option<String>,
}

impl Verdict {
    /// The `continue` verdict with nothing else.
    pub fn cont() -> Verdict {
        Verdict { decision: Decision::Continue, add_headers: Vec::new(), policy_group: None }
    }

    /// The reply to send, if the decision carries one.
    pub fn reply(&self) -> Option<&Reply> {
        match &self.decision {
            Decision::Tempfail(r) | Decision::Reject(r) => Some(r),
            _ => None,
        }
    }
}

/// The answer to EHLO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EhloVerdict {
    /// The decision about the session.
    pub verdict: Verdict,
    /// EHLO keywords to advertise.
    pub keywords: Vec<String>,
}

/// A filter's name and version, from its `init`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterInfo {
    /// Name.
    pub name: String,
    /// Version.
    pub version: String,
}

/// The SMTP phase a hook belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Connection (greeting).
    Connect,
    /// HELO/EHLO.
    Ehlo,
    /// MAIL FROM.
    Mail,
    /// RCPT TO.
    Rcpt,
    /// End of DATA.
    Data,
}

impl Phase {
    /// Its name in logs and metrics: `connect`, `ehlo`, `mail`, `rcpt`, `data`.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Connect => "connect",
            Phase::Ehlo => "ehlo",
            Phase::Mail => "mail",
            Phase::Rcpt => "rcpt",
            Phase::Data => "data",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The hooks a filter has no use for (contract 0.2.2, `negotiate.skip-hooks`,
/// and 0.2.3, `negotiate.data-for-null-sender-only`, said during `init`):
/// the host does not call them and answers each itself, `continue` with
/// nothing to add, and at EHLO with [`SkipHooks::ehlo_keywords`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SkipHooks {
    /// The phases whose hook is not called (empty: every hook is called).
    pub phases: Vec<Phase>,
    /// The keywords advertised at EHLO for the filter when [`Phase::Ehlo`]
    /// is among [`SkipHooks::phases`] (ignored otherwise).
    pub ehlo_keywords: Vec<String>,
    /// `on-data` is called only for the null sender (`MAIL FROM:<>`): a
    /// transaction with a sender has it answered as a skipped hook.
    pub data_null_sender_only: bool,
}

impl SkipHooks {
    /// Whether the hook of `phase` is skipped (always: the call's context
    /// aside, see [`SkipHooks::skips_call`]).
    pub fn skips(&self, phase: Phase) -> bool {
        self.phases.contains(&phase)
    }

    /// Whether the hook of `phase`, called with `ctx`, is skipped: always
    /// ([`SkipHooks::skips`]), or `on-data` for a transaction with a sender
    /// when [`SkipHooks::data_null_sender_only`].
    pub fn skips_call(&self, phase: Phase, ctx: &Context) -> bool {
        self.skips(phase)
            || (phase == Phase::Data && self.data_null_sender_only && ctx.transaction.sender.as_deref().is_some_and(|s| !s.is_empty()))
    }

    /// What is skipped, by name as `greyhook status` and `check` show it:
    /// the phases, then `data-with-sender` when `on-data` is called only
    /// for the null sender (and not skipped outright).
    pub fn names(&self) -> Vec<&'static str> {
        let mut names: Vec<&'static str> = self.phases.iter().map(|p| p.as_str()).collect();
        if self.data_null_sender_only && !self.skips(Phase::Data) {
            names.push("data-with-sender");
        }
        names
    }
}
