//! The milter front end (Postfix `smtpd_milters`, Sendmail
//! `INPUT_MAIL_FILTER`), protocol version 6.
//!
//! The wire protocol's packets (commands, option negotiation, macros,
//! actions and modifications) are parsed and encoded by `miltr-common`
//! (MIT): parsers that return errors instead of panicking, fuzzed
//! upstream. The packet loop is ours (`dialogue.rs`): framing with a size
//! cap, the no-reply steps, and each step's future unboxed. This module
//! maps it onto the filter chain:
//!
//! - connect, HELO, MAIL and RCPT call the matching hooks at once. Postfix
//!   does not wait for our answer to connect, HELO and MAIL
//!   (`SMFIP_NR_CONN`, `SMFIP_NR_HELO`, `SMFIP_NR_MAIL` are negotiated:
//!   three round trips fewer a message); a tempfail or reject the filters
//!   give there is *held* and answered at the next step Postfix waits for
//!   (each RCPT, then end of message), without asking the filters again:
//!   for the rest of the connection after connect, until the next HELO
//!   after HELO, for the transaction after MAIL. A connect-stage `421`
//!   reaches the client at its first RCPT, where Postfix answers it and
//!   hangs up; an MTA that does not offer the no-reply steps gets every
//!   answer where it belongs;
//! - headers are collected (bounded), and `on-data` runs at **end of
//!   message**, with the Message-ID and the headers. Not at end of headers:
//!   milter lets a filter add headers only at end of message, and the draft
//!   greylists DATA after the final dot (`451` at end of DATA), which is
//!   what Postfix does with a milter tempfail there. The body is never sent
//!   to us (`SMFIP_NOBODY` is negotiated).
//! - replies go out as `SMFIR_REPLYCODE` with the exact code, enhanced code
//!   and text, the `retry=` hint on the last line; several lines are joined
//!   with CRLF, which Postfix turns into a multi-line reply.
//!
//! A malformed, oversized or unknown packet closes the connection; Postfix
//! then applies `milter_default_action` (set it to `accept` to fail open).

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use miltr_common::ProtocolError;
use miltr_common::actions::{Action, Continue, Replycode};
use miltr_common::commands::{Connect, Family, Header as MilterHeader, Helo, Macro, Mail, Recipient};
use miltr_common::encoding::Writable;
use miltr_common::modifications::ModificationResponse;
use miltr_common::modifications::headers::AddHeader;
use miltr_common::optneg::{Capability, OptNeg, Protocol};
use tokio_util::sync::CancellationToken;

mod dialogue;
mod frames;

use crate::domain::message::{HeaderBudget, MAX_MESSAGE_HEADER_VALUE, MAX_MESSAGE_ID};
use crate::domain::types::{Decision, Header, Message, Reply, Verdict};
use crate::frontend::listen::{Conn, ListenAddr, Listener, Load, UnixPerms};
use crate::frontend::{FrontEnd, FrontEndError, invalid};
use crate::session::{Hooks, SmtpSession, keep_headers, unfolded};
use frames::FrameTracker;

/// The `[milter]` table: the milter listener (Postfix `smtpd_milters`).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MilterConfig {
    /// Addresses (none by default): `127.0.0.1:10024`, `unix:/path`.
    pub listen: Vec<ListenAddr>,
    /// Mode of unix sockets, octal text (`"0660"`).
    pub socket_mode: Option<String>,
    /// Owner of unix sockets (user name or uid).
    pub socket_owner: Option<String>,
    /// Group of unix sockets (group name or gid).
    pub socket_group: Option<String>,
    /// Largest packet accepted, bytes (a larger one closes the connection).
    pub max_packet: usize,
    /// Most headers collected per message for the filters (the rest are
    /// passed on, looked at only for the Message-ID).
    pub max_headers: usize,
    /// A connection with nothing to say for this long is closed.
    #[serde(deserialize_with = "crate::settings::duration")]
    pub idle_timeout: Duration,
    /// The idle timeout while three quarters of `max_connections` are in use.
    #[serde(deserialize_with = "crate::settings::duration")]
    pub stress_idle_timeout: Duration,
    /// A packet, once begun, must arrive whole within this; and the MTA
    /// must take our reply within it.
    #[serde(deserialize_with = "crate::settings::duration")]
    pub frame_timeout: Duration,
    /// Most connections at once.
    pub max_connections: usize,
}

impl Default for MilterConfig {
    fn default() -> Self {
        MilterConfig {
            listen: Vec::new(),
            socket_mode: None,
            socket_owner: None,
            socket_group: None,
            max_packet: 64 << 10,
            max_headers: 200,
            idle_timeout: Duration::from_secs(600),
            stress_idle_timeout: Duration::from_secs(5),
            frame_timeout: Duration::from_secs(10),
            max_connections: 512,
        }
    }
}

/// The milter front end: its listeners, bound.
pub struct Milter {
    config: MilterConfig,
    listeners: Vec<Listener>,
}

impl FrontEnd for Milter {
    const NAME: &'static str = "milter";
    type Config = MilterConfig;

    fn enabled(config: &MilterConfig) -> bool {
        !config.listen.is_empty()
    }

    fn disable(config: &mut MilterConfig) {
        config.listen.clear();
    }

    async fn start(config: &MilterConfig) -> Result<Milter, FrontEndError> {
        let m = config;
        if !(1024..=16 << 20).contains(&m.max_packet) || m.max_connections == 0 || m.max_headers == 0 {
            return Err(invalid::<Milter>("max_packet must be 1024 to 16777216, max_connections and max_headers at least 1"));
        }
        let perms = UnixPerms::from_settings(&m.socket_mode, &m.socket_owner, &m.socket_group).map_err(invalid::<Milter>)?;
        let mut listeners = Vec::new();
        for a in &m.listen {
            listeners.push(Listener::bind(a, &perms).await?);
        }
        Ok(Milter { config: config.clone(), listeners })
    }

    fn endpoints(&self) -> Vec<ListenAddr> {
        self.listeners.iter().map(Listener::local_addr).collect()
    }

    fn open_files(config: &MilterConfig) -> u64 {
        (config.max_connections + config.listen.len()) as u64
    }

    async fn serve(self, hooks: Hooks, shutdown: CancellationToken) {
        let load = crate::frontend::listen::Load::new(<Milter as FrontEnd>::NAME, self.config.max_connections);
        let tasks: Vec<_> = self
            .listeners
            .into_iter()
            .map(|l| tokio::spawn(serve(l, hooks.clone(), self.config.clone(), load.clone(), shutdown.clone())))
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    }
}

/// One milter conversation (Postfix opens one per SMTP session).
struct Conversation {
    hooks: Hooks,
    config: MilterConfig,
    peer: String,
    session: Option<SmtpSession>,
    /// Macros seen so far (`{auth_authen}`, `i`, ...), bounded.
    auth_user: Option<String>,
    queue_id: Option<String>,
    /// This connection's name (`milter<N>`), for sessions without a queue ID yet.
    conn_id: String,
    /// The headers handed to the filters: unfolded and bounded as every
    /// front end hands them ([`HeaderBudget`]), at most `max_headers`.
    headers: Vec<Header>,
    /// What `headers` may still take.
    header_budget: HeaderBudget,
    /// The message's first Message-ID, looked for among all its headers
    /// (past `max_headers` too), unfolded; empty if that header was.
    message_id: Option<String>,
    /// Headers the filters asked for at MAIL/RCPT, added at end of message.
    pending_headers: Vec<Header>,
    /// The steps the MTA does not wait for an answer to (negotiated).
    no_reply: Protocol,
    /// A refusal given at a step the MTA did not wait for, answered at the
    /// steps it waits for until its scope ends.
    held: Option<Held>,
}

/// A refusal held for the next answered step.
struct Held {
    action: Action,
    /// What ends it.
    until: HeldUntil,
}

/// What ends a [`Held`] refusal, narrowest first: a step ends the
/// refusals no wider than its own scope (MAIL a transaction's, HELO a
/// HELO's or a transaction's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum HeldUntil {
    /// The transaction (refused at MAIL).
    Transaction,
    /// The next HELO (refused at HELO).
    Helo,
    /// The connection (refused at connect).
    Connection,
}

/// `SMFIF_SETSYMLIST`: the milter may send its own macro lists. miltr-common
/// 0.1 does not name the flag; it keeps unknown flag bits as they are.
const SETSYMLIST: Capability = Capability::from_bits_retain(0x100);

/// The macros we read, asked for by name at each stage
/// (`SMFIF_SETSYMLIST`): `{auth_authen}` at MAIL (authenticated senders are
/// not greylisted) and the queue ID `i` (it names the message in the
/// decision log). Postfix otherwise evaluates and sends its default lists
/// (`milter_connect_macros` and the rest, a dozen macros a message), which
/// we would only parse and drop. A stage's list cannot be empty (an MTA
/// keeps its default for a stage not named), so stages where we need none
/// ask for `i` too: it is undefined before the queue file exists, and an
/// undefined macro is not sent.
///
/// As the negotiation reply carries them: for each stage its number
/// (`SMFIM_CONNECT` 0 … `SMFIM_EOH` 6, four bytes, big-endian), then its
/// names, space-separated and NUL-terminated. Written out here once:
/// miltr-common 0.1 would build and join the lists anew for every
/// connection (~12k instructions measured, more than the macros save, and
/// Postfix connects for every SMTP session).
const MACRO_LISTS: &[u8] = b"\0\0\0\x00i\0\
    \0\0\0\x01i\0\
    \0\0\0\x02i {auth_authen}\0\
    \0\0\0\x03i\0\
    \0\0\0\x04i\0\
    \0\0\0\x05i\0\
    \0\0\0\x06i\0";

/// What follows the three words of our negotiation reply: the macro lists
/// if the MTA offered to take them (`capabilities` as negotiated), else
/// nothing.
pub(super) fn macro_lists(capabilities: Capability) -> &'static [u8] {
    if capabilities.contains(SETSYMLIST) { MACRO_LISTS } else { &[] }
}

/// The steps whose answer we ask the MTA not to wait for.
const NO_REPLY_EARLY: Protocol = Protocol::NR_CONNECT.union(Protocol::NR_HELO).union(Protocol::NR_MAIL);

static CONNECTIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The milter reply for a verdict: continue, or the filter's reply as
/// `SMFIR_REPLYCODE`. An accept is sent as continue too: a milter accept
/// would skip end of message, where the filter's headers are added.
fn action(v: &Verdict) -> Action {
    match &v.decision {
        Decision::Continue | Decision::Accept => Continue.into(),
        Decision::Tempfail(r) | Decision::Reject(r) => replycode(r).into(),
    }
}

fn replycode(r: &Reply) -> Replycode {
    // The rendered reply, lines joined by CRLF; `Replycode` writes the
    // code and a space in front, so the first line's code is left off.
    // Postfix rewrites the separator of every line but the last to `-`.
    let lines = crate::domain::reply::render_lines(r);
    let joined = lines.join("\r\n");
    // The code is validated (4xx/5xx) before it gets here.
    let digits = [(r.code / 100 % 10) as u8, (r.code / 10 % 10) as u8, (r.code % 10) as u8];
    Replycode::without_xcode(digits, joined.get(4..).unwrap_or(""))
}

impl Conversation {
    fn session(&mut self) -> Option<&mut SmtpSession> {
        self.session.as_mut()
    }

    /// The held refusal's answer, if one is in force.
    fn held(&self) -> Option<Action> {
        self.held.as_ref().map(|h| h.action.clone())
    }

    /// At a step that starts a new `scope` (HELO, MAIL): the held
    /// refusal's answer if it outlives the scope (the step is refused
    /// without asking the filters), else none, and a narrower one ends.
    fn held_beyond(&mut self, scope: HeldUntil) -> Option<Action> {
        match &self.held {
            Some(h) if h.until > scope => Some(h.action.clone()),
            _ => {
                self.held = None;
                None
            }
        }
    }

    /// Holds `v`'s refusal if the MTA is not waiting for this step's
    /// answer (`step`), to give it at the next step it waits for. Returns
    /// the answer for this step.
    fn answer_or_hold(&mut self, step: Protocol, until: HeldUntil, v: &Verdict) -> Action {
        let a = action(v);
        if v.reply().is_some() && self.no_reply.contains(step) {
            self.held = Some(Held { action: a.clone(), until });
        }
        a
    }

    /// The session's name in the decision log: the message's queue ID
    /// once the MTA has told it, else the connection's own name.
    fn name_session(&mut self) {
        let id = self.queue_id.as_deref().unwrap_or(&self.conn_id);
        if let Some(s) = self.session.as_mut() {
            // Called at every macro packet (~10 a message): a copy only when
            // the name changes, into the string it replaces.
            let current = &mut s.session_mut().id;
            if current != id {
                current.clear();
                current.push_str(id);
            }
        }
    }

    /// Forgets the message's headers, its Message-ID and the headers the
    /// filters asked to add (a new MAIL, or the transaction's end).
    fn forget_message(&mut self) {
        self.headers.clear();
        self.header_budget = HeaderBudget::default();
        self.message_id = None;
        self.pending_headers.clear();
    }

    /// Forgets what belonged to the transaction that ended.
    fn end_transaction(&mut self) {
        if self.held.as_ref().is_some_and(|h| h.until == HeldUntil::Transaction) {
            self.held = None;
        }
        self.forget_message();
        self.queue_id = None;
        self.name_session();
    }
}

impl dialogue::Steps for Conversation {
    fn option_negotiation(&mut self, theirs: OptNeg) -> Result<OptNeg, ProtocolError> {
        let ours = OptNeg {
            // Headers (ours, at end of message), and our own macro lists.
            capabilities: Capability::SMFIF_ADDHDRS.union(SETSYMLIST),
            // No body, no DATA command, no end of headers, no unknown
            // commands: we need none of them. Headers without waiting for
            // a reply to each (`SMFIP_NR_HDR`): we only collect them.
            // No answer awaited at connect, HELO and MAIL (a refusal
            // there is held for RCPT; see the module's documentation).
            protocol: Protocol::NO_BODY
                | Protocol::NO_DATA
                | Protocol::NO_END_OF_HEADER
                | Protocol::NO_UNKNOWN
                | Protocol::NR_HEADER
                | NO_REPLY_EARLY,
            ..OptNeg::default()
        };
        let (protocol, capabilities) = (ours.protocol, ours.capabilities);
        let mut merged = ours.merge_compatible(&theirs).map_err(ProtocolError::CompatibilityError)?;
        // Ask only for protocol steps the MTA can skip; keep our wishes.
        merged.protocol = protocol & theirs.protocol;
        merged.capabilities = capabilities & theirs.capabilities;
        // Our macro lists follow the three words (`macro_lists`), if the
        // MTA offered to take them; `merged` carries none of its own.
        self.no_reply = merged.protocol & NO_REPLY_EARLY;
        Ok(merged)
    }

    fn macro_(&mut self, m: Macro) {
        for (name, value) in m.macros() {
            tracing::trace!(name = %String::from_utf8_lossy(name), "milter: macro");
            let value = crate::domain::text::from_bytes(value);
            if value.len() > 320 {
                continue;
            }
            match name {
                b"{auth_authen}" if !value.is_empty() => self.auth_user = Some(value.into_owned()),
                // Postfix sends `i` empty (or not at all) at MAIL and
                // assigns the queue ID later: an empty value clears it, so
                // the previous message's ID never names this one.
                // (Sent again at each stage: copied only when it changes.)
                b"i" => {
                    let id = Some(&*value).filter(|v| !v.is_empty());
                    if self.queue_id.as_deref() != id {
                        self.queue_id = id.map(str::to_owned);
                    }
                }
                _ => {}
            }
        }
        if let (Some(s), Some(u)) = (self.session.as_mut(), &self.auth_user)
            && s.session_mut().auth_user.as_ref() != Some(u)
        {
            s.session_mut().auth_user = Some(u.clone());
        }
        self.name_session();
    }

    async fn connect(&mut self, c: Connect) -> Action {
        let addr: Option<IpAddr> = match c.family {
            Family::Inet | Family::Inet6 => {
                let a = crate::domain::parse_client_address(&c.address());
                if a.is_none() {
                    tracing::warn!(peer = %self.peer, address = %c.address(), "milter: a client address greyhook cannot read; not greylisted");
                }
                a
            }
            _ => None,
        };
        let Some(addr) = addr else {
            // A local (unix socket) or unknown client: nothing to greylist.
            tracing::debug!(peer = %self.peer, "milter: non-IP client, accepted without asking");
            return Continue.into();
        };
        let mut s = SmtpSession::new(self.hooks.clone(), self.conn_id.clone(), addr);
        let name = c.hostname();
        // Postfix sends `unknown` or `[address]` for an unverified name.
        if name != "unknown" && !name.starts_with('[') && !name.is_empty() && name.len() <= 255 {
            s.session_mut().client_name = Some(name.into_owned());
        }
        let v = s.connect().await;
        self.session = Some(s);
        self.held = None;
        self.answer_or_hold(Protocol::NR_CONNECT, HeldUntil::Connection, &v)
    }

    async fn helo(&mut self, h: Helo) -> Action {
        // A new HELO: the last one's refusal (and any transaction's) ends.
        if let Some(a) = self.held_beyond(HeldUntil::Helo) {
            return a;
        }
        let Some(s) = self.session() else { return Continue.into() };
        let name = field(&h, h.helo(), 0);
        let v = s.ehlo(&name).await;
        self.answer_or_hold(Protocol::NR_HELO, HeldUntil::Helo, &v.verdict)
    }

    async fn mail(&mut self, m: Mail) -> Action {
        self.forget_message();
        // Refused for the session: no transaction, no filter asked. A new
        // MAIL: the last transaction's refusal ends.
        if let Some(a) = self.held_beyond(HeldUntil::Transaction) {
            return a;
        }
        let auth = self.auth_user.clone();
        self.name_session();
        let Some(s) = self.session() else { return Continue.into() };
        s.session_mut().auth_user = auth;
        let sender = strip_brackets(&field(&m, m.sender(), 0));
        let v = s.mail(&sender).await;
        // Headers given at MAIL/RCPT can only be added at end of message.
        if v.reply().is_none() {
            keep_headers(&mut self.pending_headers, &v);
        }
        self.answer_or_hold(Protocol::NR_MAIL, HeldUntil::Transaction, &v)
    }

    async fn rcpt(&mut self, r: Recipient) -> Action {
        if let Some(a) = self.held() {
            return a;
        }
        let Some(s) = self.session() else { return Continue.into() };
        let rcpt = strip_brackets(&field(&r, r.recipient(), 0));
        let v = s.rcpt(&rcpt).await;
        // Headers given at MAIL/RCPT can only be added at end of message.
        if v.reply().is_none() {
            keep_headers(&mut self.pending_headers, &v);
        }
        action(&v)
    }

    fn header(&mut self, h: MilterHeader) -> Action {
        let (name, raw) = (field(&h, h.name(), 0), field(&h, h.value(), 1));
        if self.message_id.is_none() && name.eq_ignore_ascii_case("message-id") {
            // A bounce's own trace lines can push it past `max_headers`;
            // without it the reference filter's DATA key falls back to
            // the recipients.
            self.message_id = Some(unfolded(&raw, MAX_MESSAGE_ID));
        }
        if self.headers.len() < self.config.max_headers && !self.header_budget.spent() {
            // Unfolded as `greyhook smtp` and OpenSMTPD unfold the lines they
            // read: the MTA sends a folded value with its line breaks.
            let mut value = unfolded(&raw, MAX_MESSAGE_HEADER_VALUE);
            // What the budget takes is a prefix of the value: cut in place.
            if let Some((name, kept)) = self.header_budget.take(name.trim(), &value).map(|(n, v)| (n.to_string(), v.len())) {
                value.truncate(kept);
                self.headers.push(Header { name, value });
            }
        }
        Continue.into()
    }

    async fn end_of_body(&mut self) -> ModificationResponse {
        if let Some(Action::Replycode(r)) = self.held() {
            self.end_transaction();
            return ModificationResponse::builder().build(r);
        }
        let headers = std::mem::take(&mut self.headers);
        let message_id = self.message_id.take().filter(|id| !id.is_empty());
        let mut add = std::mem::take(&mut self.pending_headers);
        let Some(s) = self.session() else { return ModificationResponse::empty_continue() };
        // Built only for a filter called at DATA (the reference filter is
        // called for the null sender only).
        let v = s.data_with(|| Message { message_id, headers }).await;
        s.reset();
        self.end_transaction();
        if let Some(r) = v.reply() {
            return ModificationResponse::builder().build(replycode(r));
        }
        add.extend(v.add_headers.iter().cloned());
        let mut b = ModificationResponse::builder();
        for h in &add {
            b.push(AddHeader::new(h.name.as_bytes(), h.value.as_bytes()));
        }
        b.contin()
    }

    fn quit_nc(&mut self) {
        // The MTA reuses this connection for another SMTP session.
        self.session = None;
        self.auth_user = None;
        self.held = None;
        self.end_transaction();
    }

    fn abort(&mut self) {
        // The transaction ended (RSET, a new MAIL, a rejected DATA...).
        if let Some(s) = self.session() {
            s.reset();
        }
        self.end_transaction();
    }
}

/// A command's field as text with none of its bytes lost. `lossy` is
/// what `miltr-common` gives for it (`String::from_utf8_lossy`, which
/// turns every byte that is not UTF-8 into U+FFFD, so that two senders
/// differing only in such bytes were one triplet), and is kept when it is
/// borrowed: the bytes were UTF-8. Otherwise the field is read again from
/// the command's own encoding (its `index`th NUL-ended field, which
/// `miltr-common` offers no other way to reach) with
/// [`text::from_bytes`](crate::domain::text::from_bytes).
fn field<'a>(cmd: &impl Writable, lossy: Cow<'a, str>, index: usize) -> Cow<'a, str> {
    if let Cow::Borrowed(_) = lossy {
        return lossy;
    }
    let mut encoded = bytes::BytesMut::with_capacity(cmd.len());
    cmd.write(&mut encoded);
    let raw = encoded[..].split(|b| *b == 0).nth(index).unwrap_or_default();
    Cow::Owned(crate::domain::text::from_bytes(raw).into_owned())
}

fn strip_brackets(s: &str) -> String {
    let t = s.trim();
    t.strip_prefix('<').and_then(|t| t.strip_suffix('>')).unwrap_or(t).to_string()
}

/// Serves one milter connection until the MTA quits, it idles out, it
/// sends something malformed, or shutdown is asked for.
async fn handle(hooks: Hooks, config: MilterConfig, load: Arc<Load>, conn: Conn, peer: String, shutdown: CancellationToken) {
    let deadlines = Deadlines { idle: config.idle_timeout, stress_idle: config.stress_idle_timeout, frame: config.frame_timeout, load };
    let max_packet = config.max_packet;
    let mut conv = Conversation {
        hooks,
        config,
        peer: peer.clone(),
        session: None,
        auth_user: None,
        queue_id: None,
        conn_id: format!("milter{}", CONNECTIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)),
        headers: Vec::new(),
        header_budget: HeaderBudget::default(),
        message_id: None,
        pending_headers: Vec::new(),
        no_reply: Protocol::empty(),
        held: None,
    };
    let mut io = PeerDeadlines::new(conn, deadlines);
    // On the heap, made in place: the packet loop holds the future of the
    // step in hand (a filter call's is a few kilobytes), and the
    // connection's future is moved on its way to being spawned.
    let dialogue = Box::pin(dialogue::run(&mut conv, &mut io, max_packet));
    tokio::select! {
        r = dialogue => match r {
            Ok(()) => tracing::debug!(%peer, "milter connection closed"),
            Err(e) => tracing::info!(%peer, "milter connection closed: {e}"),
        },
        _ = shutdown.cancelled() => tracing::debug!(%peer, "milter connection closed at shutdown"),
    }
}

/// Accepts milter connections on `listener` until `shutdown` is cancelled;
/// `load` is the front end's, shared by all its listeners.
async fn serve(
    listener: Listener,
    hooks: Hooks,
    config: MilterConfig,
    load: Arc<crate::frontend::listen::Load>,
    shutdown: CancellationToken,
) {
    let stop = shutdown.clone();
    let l = load.clone();
    crate::frontend::listen::accept_loop(listener, load, crate::frontend::listen::WhenFull::Wait, stop, move |conn, peer, admission| {
        admission.hold(handle(hooks.clone(), config.clone(), l.clone(), conn, peer, shutdown.clone()))
    })
    .await
}

/// The time limits of one milter connection.
struct Deadlines {
    idle: Duration,
    stress_idle: Duration,
    frame: Duration,
    load: Arc<Load>,
}

/// A stream whose reads fail with `TimedOut` when the MTA idles between
/// packets longer than the idle timeout (shorter while the listener is under
/// stress), or takes longer than the frame timeout to send a packet it has
/// begun, and whose writes fail when the MTA does not take them within the
/// frame timeout. The packet loop reads and writes without deadlines; this
/// follows the packet framing (a 4-byte big-endian length, then that many
/// bytes) as the bytes go by, so a peer announcing a large packet and
/// trickling it cannot hold a slot.
struct PeerDeadlines {
    inner: Conn,
    d: Deadlines,
    /// Where the stream stands in the packet framing.
    frames: FrameTracker,
    /// When the wait in hand ends: idle or inside a packet.
    read_deadline: tokio::time::Instant,
    since: tokio::time::Instant,
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    write_timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl PeerDeadlines {
    fn new(inner: Conn, d: Deadlines) -> PeerDeadlines {
        let now = tokio::time::Instant::now();
        PeerDeadlines {
            inner,
            frames: FrameTracker::default(),
            read_deadline: now + d.idle,
            since: now,
            timer: Box::pin(tokio::time::sleep(d.idle)),
            write_timer: None,
            d,
        }
    }

    fn in_packet(&self) -> bool {
        self.frames.in_packet()
    }

    /// Follows the framing over bytes just read; a packet that begins
    /// starts the frame deadline.
    fn track(&mut self, bytes: &[u8]) {
        let now = tokio::time::Instant::now();
        if self.frames.track(bytes).began {
            self.read_deadline = now + self.d.frame;
        }
        if !self.in_packet() {
            self.since = now;
        }
    }

    /// When the current wait must end: the frame deadline inside a packet,
    /// else the idle limit (re-checked each second for stress).
    fn deadline(&self) -> tokio::time::Instant {
        if self.in_packet() {
            return self.read_deadline;
        }
        let end = self.since + self.idle_limit();
        end.min(tokio::time::Instant::now() + Duration::from_secs(1))
    }

    /// The idle limit now: shorter while the listener is under stress.
    fn idle_limit(&self) -> Duration {
        if self.d.load.stressed() { self.d.stress_idle.min(self.d.idle) } else { self.d.idle }
    }
}

impl dialogue::AckNow for PeerDeadlines {
    fn ack_now(&self) {
        self.inner.as_ref().get_ref().ack_now();
    }
}

impl tokio::io::AsyncRead for PeerDeadlines {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let this = &mut *self;
        let before = buf.filled().len();
        match this.inner.as_mut().poll_read(cx, buf) {
            Poll::Ready(r) => {
                this.track(&buf.filled()[before..]);
                Poll::Ready(r)
            }
            Poll::Pending => loop {
                let end = this.deadline();
                // A timer set earlier than `end` stays: when it fires the
                // limits are checked again and it is set anew (moving it
                // later at every read cost a timer-wheel update each).
                if this.timer.deadline() > end || this.timer.is_elapsed() {
                    this.timer.as_mut().reset(end);
                }
                match this.timer.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(()) => {
                        let now = tokio::time::Instant::now();
                        let over = if this.in_packet() { now >= this.read_deadline } else { now >= this.since + this.idle_limit() };
                        if over {
                            let what = if this.in_packet() { "milter peer stalled inside a packet" } else { "milter peer idle" };
                            return Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, what)));
                        }
                    }
                }
            },
        }
    }
}

impl tokio::io::AsyncWrite for PeerDeadlines {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::task::Poll;
        let this = &mut *self;
        match this.inner.as_mut().poll_write(cx, buf) {
            Poll::Ready(r) => {
                this.write_timer = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let frame = this.d.frame;
                let t = this.write_timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(frame)));
                match t.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "milter peer does not read"))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        self.inner.as_mut().poll_flush(cx)
    }
    fn poll_shutdown(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        self.inner.as_mut().poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_that_are_not_utf8_keep_every_byte() {
        // `miltr-common` reads these with U+FFFD for each bad byte.
        let m = Mail::from(&b"<\xe9t\xe9@x>"[..]);
        assert_eq!(field(&m, m.sender(), 0), "<\u{EFE9}t\u{EFE9}@x>");
        let r = Recipient::from(&b"<\xe8@x>"[..]);
        assert_eq!(field(&r, r.recipient(), 0), "<\u{EFE8}@x>");
        let h = Helo::from(&b"h\xe9lo"[..]);
        assert_eq!(field(&h, h.helo(), 0), "h\u{EFE9}lo");
        let h = MilterHeader::new(b"Message-ID", b"<\xe9@x>");
        assert_eq!((field(&h, h.name(), 0), field(&h, h.value(), 1)), ("Message-ID".into(), "<\u{EFE9}@x>".into()));
        // UTF-8 is what the crate gave, not read again.
        let m = Mail::from("<été@x>".as_bytes());
        assert!(matches!(field(&m, m.sender(), 0), Cow::Borrowed("<été@x>")));
    }

    #[test]
    fn replycode_keeps_code_enhanced_code_and_hint_last() {
        let r = Reply {
            code: 451,
            enhanced: Some("4.7.1".into()),
            text: vec!["Greylisted.".into(), "Come back later".into()],
            retry_after: Some(300),
        };
        let rc = replycode(&r);
        assert_eq!(rc.message(), "4.7.1 Greylisted.\r\n451 4.7.1 Come back later retry=00:05:00");
        assert_eq!(strip_brackets("<a@b>"), "a@b");
        assert_eq!(strip_brackets("<>"), "");
    }
}
