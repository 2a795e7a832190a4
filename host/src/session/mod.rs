//! One SMTP session as the filter chain sees it, for front ends that follow
//! the whole conversation (milter, the SMTP front end): the session facts,
//! the transaction so far (sender, accepted recipients and their policy
//! groups), and one call per phase that asks the chain, logs the decision
//! and keeps the transaction up to date.

pub mod audit;

use std::net::IpAddr;
use std::sync::Arc;

use crate::domain::clock::Clock;
use crate::domain::types::{AcceptedRecipient, Context, EhloVerdict, Message, Phase, Session, Transaction, Verdict};
use crate::runtime::Chain;
use crate::session::audit::{action, log_decision};

/// Most recipients remembered in one transaction (the SMTP front end
/// refuses more before asking; a milter peer cannot make us hold more).
pub const MAX_TRANSACTION_RECIPIENTS: usize = 1000;

/// Longest HELO name kept, bytes (RFC 5321's limit on a domain): a longer
/// one is cut at a character boundary, whichever front end brings it (the
/// SMTP front end refuses it with `501` first).
pub const MAX_HELO: usize = 255;

/// `helo` as the session keeps it: at most [`MAX_HELO`] bytes.
pub fn bounded_helo(helo: &str) -> &str {
    crate::domain::message::cut(helo, MAX_HELO)
}

/// The chain, clock and resolver shared by every session of a front end.
#[derive(Clone)]
pub struct Hooks {
    /// The filters.
    pub chain: Chain,
    /// The clock handed to the filters as `now`.
    pub clock: Arc<dyn Clock>,
    /// The resolver a front end that is not told its clients' names (the
    /// SMTP server, OpenSMTPD) looks them up with
    /// ([`SmtpSession::resolve_client`]); `None`: it does not.
    pub resolver: Option<crate::dns::Resolver>,
    /// The front end these sessions come from, for the decision counters
    /// (`greyhook_decisions_total{front_end=…}`); the daemon sets each
    /// front end's name, an MTA that drives sessions itself says
    /// [`Hooks::EMBEDDED`].
    pub front_end: &'static str,
}

impl Hooks {
    /// The front-end name of sessions an embedding MTA drives itself.
    pub const EMBEDDED: &'static str = "embedded";
}

/// The state of one SMTP session.
pub struct SmtpSession {
    hooks: Hooks,
    /// The session and transaction as the filters see them, kept whole so
    /// that a hook is handed it by reference (its `now` is set at each
    /// call) rather than a copy of every string in it.
    ctx: Context,
}

impl SmtpSession {
    /// A session with the client at `client`; `id` names it in logs.
    pub fn new(hooks: Hooks, id: impl Into<String>, client: IpAddr) -> SmtpSession {
        SmtpSession { hooks, ctx: Context { session: Session::new(id, client), transaction: Transaction::default(), now: 0 } }
    }

    /// Looks up the client's names (PTR, then forward confirmation) with
    /// the hooks' resolver, if there is one, into `client_name` and
    /// `reverse_client_name`: for front ends whose MTA does not say them.
    pub async fn resolve_client(&mut self) {
        if let Some(r) = &self.hooks.resolver {
            let (confirmed, reverse) = r.client_names(self.ctx.session.client_address).await;
            self.ctx.session.client_name = confirmed;
            self.ctx.session.reverse_client_name = reverse;
        }
    }

    /// The session facts, for the front end to fill in (client name, TLS,
    /// authenticated user).
    pub fn session_mut(&mut self) -> &mut Session {
        &mut self.ctx.session
    }

    /// The session facts.
    pub fn session(&self) -> &Session {
        &self.ctx.session
    }

    /// The transaction so far.
    pub fn transaction(&self) -> &Transaction {
        &self.ctx.transaction
    }

    /// Logs and counts a decision.
    fn decided(&self, phase: Phase, ctx: &Context, recipient: Option<&str>, v: &Verdict) {
        crate::telemetry::host().decision(self.hooks.front_end, phase.as_str(), action(v));
        log_decision(self.hooks.front_end, phase, ctx, recipient, v);
    }

    /// The context for a hook call now: its time set.
    fn stamp(&mut self) {
        self.ctx.now = self.hooks.clock.now();
    }

    /// The connect hook.
    pub async fn connect(&mut self) -> Verdict {
        self.stamp();
        let v = self.hooks.chain.on_connect(&self.ctx).await;
        self.decided(Phase::Connect, &self.ctx, None, &v);
        v
    }

    /// HELO/EHLO: records the name (at most [`MAX_HELO`] bytes; a new EHLO
    /// also ends any transaction) and asks the chain.
    pub async fn ehlo(&mut self, helo: &str) -> EhloVerdict {
        self.ctx.session.helo = Some(bounded_helo(helo).to_string());
        self.reset();
        self.stamp();
        let v = self.hooks.chain.on_ehlo(&self.ctx).await;
        self.decided(Phase::Ehlo, &self.ctx, None, &v.verdict);
        v
    }

    /// MAIL FROM (`sender` without brackets, empty for `<>`). The
    /// transaction starts when the verdict lets it.
    pub async fn mail(&mut self, sender: &str) -> Verdict {
        self.reset();
        self.stamp();
        let v = self.hooks.chain.on_mail(&self.ctx, sender).await;
        // Logged with its sender; kept only if the transaction starts.
        self.ctx.transaction.sender = Some(sender.to_string());
        self.decided(Phase::Mail, &self.ctx, None, &v);
        if v.reply().is_some() {
            self.ctx.transaction.sender = None;
        }
        v
    }

    /// RCPT TO: asks the chain with the recipients accepted so far, and
    /// remembers the recipient (with its policy group) if it passes.
    pub async fn rcpt(&mut self, recipient: &str) -> Verdict {
        self.stamp();
        let v = self.hooks.chain.on_rcpt(&self.ctx, recipient).await;
        self.decided(Phase::Rcpt, &self.ctx, Some(recipient), &v);
        if v.reply().is_none() && self.ctx.transaction.recipients.len() < MAX_TRANSACTION_RECIPIENTS {
            self.ctx
                .transaction
                .recipients
                .push(AcceptedRecipient { address: recipient.to_string(), policy_group: v.policy_group.clone().unwrap_or_default() });
        }
        v
    }

    /// Whether a filter is called at `phase` in this session as it stands
    /// (see [`Chain::calls`]).
    pub fn calls_filters(&self, phase: Phase) -> bool {
        self.hooks.chain.calls(phase, &self.ctx)
    }

    /// End of DATA: the message's headers (Message-ID among them).
    pub async fn data(&mut self, message: &Message) -> Verdict {
        self.data_with(|| message).await
    }

    /// End of DATA with the message built by `message` only if a filter is
    /// called with it ([`Chain::on_data_with`]): for a front end that would
    /// parse the header section for it. `message` may return the message or
    /// a reference to one.
    pub async fn data_with<M: std::borrow::Borrow<Message>>(&mut self, message: impl FnOnce() -> M) -> Verdict {
        self.stamp();
        let v = self.hooks.chain.on_data_with(&self.ctx, message).await;
        self.decided(Phase::Data, &self.ctx, None, &v);
        v
    }

    /// For a front end that hears the sender again with every command (the
    /// policy protocol, OpenSMTPD's filters): makes the transaction this
    /// sender's, starting a new one if it was another's or none.
    pub fn continue_transaction(&mut self, sender: &str) {
        if self.ctx.transaction.sender.as_deref() != Some(sender) {
            self.ctx.transaction = Transaction { sender: Some(sender.to_string()), recipients: Vec::new() };
        }
    }

    /// Puts a transaction back (a front end whose next hop refused a
    /// recipient the filters accepted drops it this way).
    pub fn restore(&mut self, sender: Option<String>, recipients: Vec<AcceptedRecipient>) {
        self.ctx.transaction = Transaction { sender, recipients };
    }

    /// Ends the transaction (RSET, a new MAIL, after DATA, an abort).
    pub fn reset(&mut self) {
        self.ctx.transaction = Transaction::default();
    }
}

/// Adds the headers a passing verdict asked for to those kept for the
/// message (front ends add them at delivery): each once, at most
/// [`crate::domain::reply::MAX_HEADERS`] in all.
pub fn keep_headers(kept: &mut Vec<crate::domain::types::Header>, v: &Verdict) {
    for h in &v.add_headers {
        if kept.len() < crate::domain::reply::MAX_HEADERS && !kept.contains(h) {
            kept.push(h.clone());
        }
    }
}

/// How much of a header section [`read_header_section`] reads, bytes
/// (lines with their CRLF): 1 MiB, ten times Postfix's
/// `header_size_limit`. Past it, neither headers nor the Message-ID are
/// looked for.
pub const MAX_HEADER_SECTION_READ: usize = 1 << 20;

/// A header's value as one line, as [`read_header_section`] unfolds it:
/// its lines (a milter peer sends a folded value with its line breaks)
/// each trimmed and joined by one space, the empty ones left out, cut at
/// `max` bytes.
pub fn unfolded(value: &str, max: usize) -> String {
    // Sized at once: the result is never longer than the value or `max`
    // (growing from empty was a reallocation path a header).
    let mut out = String::with_capacity(value.len().min(max));
    for part in value.split('\n') {
        push_folded(&mut out, part, max);
    }
    out
}

/// Adds one line of a folded value to `out`: trimmed, after a space if
/// `out` has text, and only as much as keeps `out` within `max` bytes.
fn push_folded(out: &mut String, line: &str, max: usize) {
    let line = line.trim();
    let room = max.saturating_sub(out.len() + usize::from(!out.is_empty()));
    if line.is_empty() || room == 0 {
        return;
    }
    if !out.is_empty() {
        out.push(' ');
    }
    out.push_str(crate::domain::message::cut(line, room));
}

/// A message's header section from its lines (CR/LF already cut), up to
/// the first empty line: folded lines unfolded, and no more kept than a
/// filter is handed (the host's budget, `domain::message`: values cut at
/// 4096 bytes, at most 200 headers and 64 KiB of names and values, a
/// header whose name is over 256 bytes left out). Shared by
/// the front ends that see the message (SMTP, OpenSMTPD), whose message
/// size limits would otherwise let a client make them copy megabytes.
///
/// The Message-ID is the first `Message-ID` header's value, unfolded and
/// trimmed, wherever it stands among the lines given: past the filter's
/// budget too (a bounce's own trace lines can push it there, and without
/// it the reference filter's DATA key falls back to the recipients).
/// Looking for it holds no more than 998 bytes (RFC 5322's line limit).
///
/// No more than [`MAX_HEADER_SECTION_READ`] bytes of lines are read: a
/// client's message may be 25 MiB of header lines, and this runs in one go
/// on a thread that serves other clients.
pub fn read_header_section<S: AsRef<str>>(lines: impl IntoIterator<Item = S>) -> Message {
    let mut reader = HeaderReader::default();
    for line in lines {
        if !reader.push(line.as_ref()) {
            break;
        }
    }
    reader.finish()
}

/// [`read_header_section`] a line at a time, for a front end that gets a
/// message's lines one by one and may not hold them all (OpenSMTPD): what
/// it keeps is the filter's bounded view and the Message-ID, never the
/// lines.
#[derive(Debug, Default)]
pub struct HeaderReader {
    headers: Vec<crate::domain::types::Header>,
    budget: crate::domain::message::HeaderBudget,
    /// Whether the last header line was kept (its folded lines go with it).
    kept: bool,
    /// The Message-ID once its header is seen, and whether the lines
    /// folded into it are still to come.
    id: Option<String>,
    in_id: bool,
    /// Bytes of the section read: the lines are the client's, and past
    /// the filter's budget they are only looked through.
    read: usize,
    done: bool,
}

impl HeaderReader {
    /// Takes the next line of the section (CR/LF cut, dot-stuffing undone);
    /// false once it wants no more: at the empty line that ends the
    /// section, past [`MAX_HEADER_SECTION_READ`], or at a header after the
    /// Message-ID once no more headers fit. The line that gets false is
    /// not taken.
    pub fn push(&mut self, text: &str) -> bool {
        use crate::domain::message::MAX_MESSAGE_ID;
        if self.done {
            return false;
        }
        self.read += text.len() + 2;
        if text.is_empty() || self.read > MAX_HEADER_SECTION_READ {
            self.done = true;
            return false;
        }
        if text.starts_with([' ', '\t']) {
            if let Some(id) = self.id.as_mut().filter(|_| self.in_id) {
                push_folded(id, text, MAX_MESSAGE_ID);
            }
            if let Some(last) = self.headers.last_mut().filter(|_| self.kept) {
                let more = self.budget.extend(last.value.len(), text.trim());
                if !more.is_empty() && !last.value.is_empty() {
                    last.value.push(' ');
                }
                last.value.push_str(more);
            }
            return true;
        }
        self.in_id = false;
        if self.budget.spent() && self.id.is_some() {
            self.done = true;
            return false;
        }
        if let Some((name, value)) = text.split_once(':') {
            if self.id.is_none() && name.trim().eq_ignore_ascii_case("message-id") {
                self.id = Some(unfolded(value, MAX_MESSAGE_ID));
                self.in_id = true;
            }
            self.kept = match self.budget.take(name.trim(), value.trim()) {
                Some((name, value)) => {
                    self.headers.push(crate::domain::types::Header { name: name.to_string(), value: value.to_string() });
                    true
                }
                None => false,
            };
        }
        true
    }

    /// Whether the Message-ID has been read whole: its header was seen,
    /// and a line after it that is not folded into it.
    pub fn has_message_id(&self) -> bool {
        self.id.is_some() && !self.in_id
    }

    /// The headers and the Message-ID read.
    pub fn finish(self) -> Message {
        Message { message_id: self.id.filter(|v| !v.is_empty()), headers: self.headers }
    }
}

#[cfg(test)]
mod tests {
    use super::read_header_section;

    fn unfold_headers<S: AsRef<str>>(lines: impl IntoIterator<Item = S>) -> Vec<crate::domain::types::Header> {
        read_header_section(lines).headers
    }

    #[test]
    fn a_huge_header_section_is_kept_to_the_filters_bounds() {
        let long = "a".repeat(60_000);
        let mut lines: Vec<String> = (0..300).map(|i| format!("X-{i}: {long}")).collect();
        lines.insert(1, format!(" {long}"));
        let h = unfold_headers(&lines);
        assert!(h.iter().all(|h| h.value.len() <= 4096), "values cut");
        let bytes: usize = h.iter().map(|h| h.name.len() + h.value.len()).sum();
        assert!(bytes <= 64 << 10, "{bytes}");
        assert_eq!(h.len(), 16, "15 whole values and the cut 16th");
        let short = unfold_headers(["Subject: a", "\tb", "Message-ID: <x@y>", "", "X: body"]);
        assert_eq!(short.len(), 2);
        assert_eq!(short[0].value, "a b");
        // A value that starts on the next line: no space before it, as
        // `unfolded` (the milter) gives it.
        let later = unfold_headers(["X-Fold:", "\tlater  ", "   more", "Subject: s"]);
        assert_eq!(later[0].value, "later more");
        assert_eq!(later[0].value, super::unfolded("\n\tlater  \n   more", 4096));
        // A header left out (its name over 256 bytes) takes its folded lines with it.
        let named = unfold_headers([format!("{}: v", "N".repeat(300)), " folded".into(), "Subject: s".into()]);
        assert_eq!((named.len(), named[0].name.as_str(), named[0].value.as_str()), (1, "Subject", "s"));
    }

    #[test]
    fn a_header_reader_says_when_the_message_id_is_read_whole() {
        let mut r = super::HeaderReader::default();
        assert!(r.push("Subject: s") && !r.has_message_id());
        assert!(r.push("Message-ID:") && !r.has_message_id(), "its value may come on the next lines");
        assert!(r.push("\t<a@b>") && !r.has_message_id());
        assert!(r.push("X-After: x") && r.has_message_id());
        assert!(!r.push("") && !r.push("X-Body-Line: y"), "nothing after the empty line");
        let m = r.finish();
        assert_eq!((m.message_id.as_deref(), m.headers.len()), (Some("<a@b>"), 3));
    }

    #[test]
    fn the_message_id_is_found_past_the_filters_bounds() {
        let filler: Vec<String> = (0..250).map(|i| format!("Received: from hop{i}; {}", "x".repeat(400))).collect();
        let with = |tail: &[&str]| {
            let mut lines = filler.clone();
            lines.extend(tail.iter().map(|l| l.to_string()));
            read_header_section(&lines)
        };
        let m = with(&["Message-ID: <a@b>", "Subject: s"]);
        assert_eq!(m.message_id.as_deref(), Some("<a@b>"));
        assert!(m.headers.len() < 200 && !m.headers.iter().any(|h| h.name == "Message-ID"), "the filter's bounds still hold");
        // Folded, the first of two, and none in the body.
        assert_eq!(with(&["Message-ID:", " <f@b>", "Message-ID: <g@b>"]).message_id.as_deref(), Some("<f@b>"));
        assert_eq!(with(&["", "Message-ID: <body@b>"]).message_id, None);
        assert_eq!(with(&["message-id :  ", "Subject: s"]).message_id, None, "an empty one is none");
        // Held to RFC 5322's line limit, folded lines and all.
        let long = "y".repeat(700);
        let m = with(&[&format!("Message-ID: <{long}"), &format!("\t{long}>")]);
        assert_eq!(m.message_id.map(|id| id.len()), Some(998));
        // Read no further than MAX_HEADER_SECTION_READ, found or not.
        let pulled = std::cell::Cell::new(0usize);
        let endless = std::iter::repeat("X-Filler: 0123456789012345678901234567890123456789").inspect(|_| pulled.set(pulled.get() + 1));
        assert_eq!(read_header_section(endless).message_id, None);
        assert_eq!(pulled.get(), super::MAX_HEADER_SECTION_READ / 52 + 1, "lines pulled");
        // Within the bounds it is the value the filter is handed.
        let m = read_header_section(["Subject: a", "Message-ID: <x@y>", "\t(comment)"]);
        assert_eq!(m.message_id.as_deref(), Some("<x@y> (comment)"));
        assert_eq!(m.headers[1].value, "<x@y> (comment)");
    }
}
