//! The Postfix policy delegation protocol (SMTPD_POLICY_README): Postfix's
//! `check_policy_service` sends `name=value` lines ended by an empty line;
//! greyhook answers `action=...` and an empty line; many requests per
//! connection.
//!
//! `protocol_state` picks the hook: CONNECT → on-connect, HELO/EHLO →
//! on-ehlo, MAIL → on-mail, RCPT → on-rcpt, DATA and END-OF-MESSAGE →
//! on-data (without a Message-ID: the protocol does not carry one). Postfix
//! sends one recipient per request and no recipient list at DATA, so the
//! server keeps per-`instance` transaction state (the accepted recipients and
//! their policy groups), bounded and expired.
//!
//! The protocol cannot advertise an EHLO keyword: `GREYLIST` needs the SMTP
//! front end.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

mod request;

use crate::cache::ShardedLru;
use crate::domain::reply::render_single_line;
use crate::domain::types::{Decision, Message, Phase, Session, Verdict};
use crate::frontend::listen::{Conn, ListenAddr, Listener, UnixPerms};
use crate::frontend::{FrontEnd, FrontEndError, invalid};
use crate::session::{Hooks, SmtpSession};
use request::{Attrs, FrameError, Framer, Request};

/// How a tempfail is sent to Postfix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TempfailAction {
    /// `action=451 4.7.1 ... retry=...`: the draft's code and hint, at once.
    #[default]
    Reply,
    /// `action=DEFER_IF_PERMIT ... retry=...`: Postfix defers only if
    /// the rest of the restrictions would permit, so a later REJECT wins
    /// (fewer retries of mail that would be rejected anyway), at the cost of
    /// Postfix's own code (450) instead of the draft's 451.
    DeferIfPermit,
}

/// The `[policy]` table: the Postfix policy listener.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Addresses: `127.0.0.1:10023`, `[::1]:10023`, `unix:/path`.
    pub listen: Vec<ListenAddr>,
    /// Mode of unix sockets, octal text (`"0660"`).
    pub socket_mode: Option<String>,
    /// Owner of unix sockets (user name or uid).
    pub socket_owner: Option<String>,
    /// Group of unix sockets (group name or gid).
    pub socket_group: Option<String>,
    /// How tempfails are sent.
    pub tempfail_action: TempfailAction,
    /// Longest attribute line, bytes.
    pub max_line: usize,
    /// Most attributes in one request.
    pub max_attributes: usize,
    /// A connection idle this long is closed (Postfix reconnects).
    #[serde(deserialize_with = "crate::settings::duration")]
    pub idle_timeout: Duration,
    /// A request must be complete this long after its first byte, and
    /// the peer must take our answer within it.
    #[serde(deserialize_with = "crate::settings::duration")]
    pub request_timeout: Duration,
    /// The idle timeout while three quarters of `max_connections` are in
    /// use: idle peers make room for others.
    #[serde(deserialize_with = "crate::settings::duration")]
    pub stress_idle_timeout: Duration,
    /// Most connections at once; more wait to be accepted.
    pub max_connections: usize,
    /// Most transactions (Postfix `instance`s) tracked at once.
    pub max_transactions: usize,
    /// A transaction not seen for this long is forgotten.
    #[serde(deserialize_with = "crate::settings::duration")]
    pub transaction_ttl: Duration,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            listen: vec![ListenAddr::Tcp(([127, 0, 0, 1], 10023).into())],
            socket_mode: None,
            socket_owner: None,
            socket_group: None,
            tempfail_action: TempfailAction::Reply,
            max_line: 4096,
            max_attributes: 100,
            idle_timeout: Duration::from_secs(600),
            request_timeout: Duration::from_secs(10),
            stress_idle_timeout: Duration::from_secs(5),
            max_connections: 512,
            max_transactions: 50_000,
            transaction_ttl: Duration::from_secs(1800),
        }
    }
}

/// The policy front end: its listeners, bound.
pub struct Policy {
    config: PolicyConfig,
    listeners: Vec<Listener>,
}

impl FrontEnd for Policy {
    const NAME: &'static str = "policy";
    type Config = PolicyConfig;

    fn enabled(config: &PolicyConfig) -> bool {
        !config.listen.is_empty()
    }

    fn disable(config: &mut PolicyConfig) {
        config.listen.clear();
    }

    async fn start(config: &PolicyConfig) -> Result<Policy, FrontEndError> {
        let p = config;
        if p.max_line < 256 || p.max_attributes == 0 || p.max_connections == 0 || p.max_transactions == 0 {
            return Err(invalid::<Policy>(
                "max_line must be at least 256, max_attributes, max_connections and max_transactions at least 1",
            ));
        }
        let perms = UnixPerms::from_settings(&p.socket_mode, &p.socket_owner, &p.socket_group).map_err(invalid::<Policy>)?;
        let mut listeners = Vec::new();
        for a in &p.listen {
            listeners.push(Listener::bind(a, &perms).await?);
        }
        Ok(Policy { config: config.clone(), listeners })
    }

    fn endpoints(&self) -> Vec<ListenAddr> {
        self.listeners.iter().map(Listener::local_addr).collect()
    }

    fn open_files(config: &PolicyConfig) -> u64 {
        (config.max_connections + config.listen.len()) as u64
    }

    async fn serve(self, hooks: Hooks, shutdown: CancellationToken) {
        let load = crate::frontend::listen::Load::new(<Policy as FrontEnd>::NAME, self.config.max_connections);
        let server = Arc::new(PolicyServer::new(hooks, self.config));
        let tasks: Vec<_> =
            self.listeners.into_iter().map(|l| tokio::spawn(serve(l, server.clone(), load.clone(), shutdown.clone()))).collect();
        for t in tasks {
            let _ = t.await;
        }
    }
}

/// A Postfix session (`instance`) between two requests: the one session
/// model every front end drives, and when it was last asked about.
struct Tracked {
    session: SmtpSession,
    touched: Instant,
}

/// The policy service: the hooks, and the sessions of the Postfix
/// `instance`s in flight.
pub(crate) struct PolicyServer {
    hooks: Hooks,
    config: PolicyConfig,
    /// By `instance`, at most `max_transactions`: the least recently asked
    /// about first out, in shards with a lock each (see `keep`).
    transactions: ShardedLru<String, Tracked>,
}

/// Why a connection was closed on the client.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("request not completed within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl PolicyServer {
    /// A server answering with `hooks`' chain and clock.
    pub fn new(hooks: Hooks, config: PolicyConfig) -> PolicyServer {
        let transactions = ShardedLru::new(config.max_transactions);
        PolicyServer { hooks, config, transactions }
    }

    /// Answers one request (its attribute lines, without the final empty
    /// line): the `action=...` value.
    pub async fn answer(&self, request: Request<'_>) -> String {
        // Invalid UTF-8 (a client's bytes in sender, recipient or HELO, as
        // Postfix with `smtputf8_enable = no` passes them) is not a reason
        // to let the mail through: the filters see each bad byte as a
        // character of its own, so two such senders stay two triplets, and
        // greylist it like any other.
        let text = crate::domain::text::from_bytes(request.bytes);
        let attrs = match &text {
            // The bytes as they came: split at the lines the framer found.
            std::borrow::Cow::Borrowed(t) => Attrs::from_lines(t, request.lines),
            // Each bad byte became a character of more bytes: the lines
            // are found again.
            std::borrow::Cow::Owned(t) => Attrs::parse(t),
        };
        let attrs = match attrs {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("{e}: DUNNO");
                return "DUNNO".into();
            }
        };
        if attrs.get("request") != Some("smtpd_access_policy") {
            tracing::warn!(request = ?attrs.get("request"), "not an smtpd_access_policy request: DUNNO");
            return "DUNNO".into();
        }
        let Some(client) = attrs.get("client_address").and_then(crate::domain::parse_client_address) else {
            tracing::warn!(client_address = ?attrs.get("client_address"), "policy request without a usable client_address: DUNNO");
            return "DUNNO".into();
        };
        let get = |k: &str| attrs.get(k).filter(|v| !v.is_empty());
        // Matched without regard to case, without an upper-case copy.
        let state = attrs.get("protocol_state").unwrap_or("");
        let is = |names: &[&str]| names.iter().any(|n| state.eq_ignore_ascii_case(n));
        let phase = if is(&["RCPT"]) {
            Phase::Rcpt
        } else if is(&["CONNECT"]) {
            Phase::Connect
        } else if is(&["EHLO", "HELO"]) {
            Phase::Ehlo
        } else if is(&["MAIL"]) {
            Phase::Mail
        } else if is(&["DATA", "END-OF-MESSAGE"]) {
            Phase::Data
        } else {
            tracing::debug!(state = ?attrs.get("protocol_state"), "protocol state without a hook (VRFY, ETRN...): DUNNO");
            return "DUNNO".into();
        };
        let instance = get("instance").unwrap_or("");
        // Postfix sends every session fact with every request: they are
        // the truth, whatever the session held before.
        let facts = Session {
            id: instance.to_string(),
            client_address: client,
            client_name: get("client_name").filter(|n| *n != "unknown").map(str::to_string),
            reverse_client_name: get("reverse_client_name").filter(|n| *n != "unknown").map(str::to_string),
            helo: get("helo_name").map(|h| crate::session::bounded_helo(h).to_string()),
            auth_user: get("sasl_username").map(str::to_string),
            tls: get("encryption_protocol").is_some(),
        };
        let sender = attrs.get("sender").unwrap_or("");
        let recipient = attrs.get("recipient").unwrap_or("");
        let kept = self.take(instance, client);
        let known = kept.is_some();
        let mut session = kept.unwrap_or_else(|| SmtpSession::new(self.hooks.clone(), instance, client));
        *session.session_mut() = facts;
        let verdict = match phase {
            Phase::Connect => session.connect().await,
            Phase::Ehlo => session.ehlo(get("helo_name").unwrap_or("")).await.verdict,
            Phase::Mail => session.mail(sender).await,
            Phase::Rcpt => {
                // One recipient per request, the sender with each: a policy
                // service asked only at RCPT never saw the MAIL.
                session.continue_transaction(sender);
                session.rcpt(recipient).await
            }
            Phase::Data => {
                session.continue_transaction(sender);
                let count = get("recipient_count").and_then(|c| c.parse::<usize>().ok()).unwrap_or(0);
                if known || count == 0 || !session.calls_filters(Phase::Data) {
                    session.data(&Message::default()).await
                } else {
                    self.data_of_a_lost_transaction(&mut session, recipient, count).await
                }
            }
        };
        if !instance.is_empty() {
            self.keep(instance, session);
        }
        self.action(&verdict)
    }

    /// DATA for a transaction whose RCPT requests are not known here (its
    /// `count` recipients accepted by Postfix, none kept): pushed out of
    /// `max_transactions` by other transactions, or asked of a daemon since
    /// restarted, or never asked at RCPT. Answered on the transaction's
    /// recipients as the filters would have, never on none: a bounce,
    /// greylisted at DATA, would pass, and a client can push its own
    /// transaction out. Postfix names the recipient when there is one: it
    /// is asked again as at RCPT. Several it does not name: a temporary
    /// failure, and the retry is asked about afresh.
    async fn data_of_a_lost_transaction(&self, session: &mut SmtpSession, recipient: &str, count: usize) -> Verdict {
        if count == 1 && !recipient.is_empty() {
            tracing::info!(instance = %session.session().id, "policy: a transaction not known at DATA: its recipient asked again");
            let v = session.rcpt(recipient).await;
            if v.reply().is_some() {
                return v;
            }
            return session.data(&Message::default()).await;
        }
        tracing::warn!(
            instance = %session.session().id,
            recipients = count,
            "policy: a transaction not known at DATA (pushed out of max_transactions, or greyhook restarted) and its \
             recipients not named: tempfail"
        );
        crate::runtime::FailurePolicy::Tempfail.verdict(Phase::Data)
    }

    /// The session of `instance` from an earlier request, if it is still
    /// live and from the same client.
    fn take(&self, instance: &str, client: IpAddr) -> Option<SmtpSession> {
        if instance.is_empty() {
            return None;
        }
        let t = self.transactions.pop(instance)?;
        (t.touched.elapsed() < self.config.transaction_ttl && t.session.session().client_address == client).then_some(t.session)
    }

    /// Keeps the session of `instance` for its next request, within
    /// `max_transactions`: the one asked about least recently makes room
    /// (an expired one is among the least recent), in constant time. A busy
    /// MX keeps the limit's worth in normal traffic, so every request pays
    /// for this: a scan of all of them, as it was, cut 15 000 requests a
    /// second to 225.
    ///
    /// The table is every request's one shared point, taken twice a
    /// request: it is split in up to 16 shards by instance, each with its
    /// own lock (the default `max_transactions`, 50 000, makes 16 of 3 125),
    /// and the key is made before a lock is taken and the session pushed
    /// out dropped after it is released. One lock for all was held 0.59 µs
    /// a pop or push (400 000 requests on 2 connections): ~22–30% of the
    /// time at 188.9k requests a second.
    fn keep(&self, instance: &str, session: SmtpSession) {
        let evicted = self.transactions.push(instance.to_string(), Tracked { session, touched: Instant::now() });
        drop(evicted);
    }

    fn action(&self, v: &Verdict) -> String {
        match &v.decision {
            Decision::Continue | Decision::Accept => match v.add_headers.first() {
                // One action per reply: the protocol can prepend one header.
                Some(h) => format!("PREPEND {}: {}", h.name, h.value),
                None => "DUNNO".into(),
            },
            Decision::Tempfail(r) if self.config.tempfail_action == TempfailAction::DeferIfPermit => {
                // Postfix supplies the code (450 4.7.1); the text keeps the hint last.
                let line = render_single_line(&crate::domain::types::Reply { enhanced: None, ..r.clone() });
                format!("DEFER_IF_PERMIT {}", line.get(4..).unwrap_or(""))
            }
            Decision::Tempfail(r) | Decision::Reject(r) => render_single_line(r),
        }
    }

    /// Serves one connection until the peer closes it, it idles out, it
    /// breaks a limit, or shutdown is asked for (after the request in hand).
    pub async fn handle(self: Arc<Self>, conn: Conn, peer: String, load: Arc<crate::frontend::listen::Load>, shutdown: CancellationToken) {
        let (r, mut w) = tokio::io::split(conn);
        let mut reader = RequestReader::new(r, &self.config, load);
        let mut out = Vec::with_capacity(256);
        loop {
            match reader.next(&shutdown).await {
                Ok(true) => {
                    let Some(request) = reader.framer.request() else { return };
                    let action = self.answer(request).await;
                    out.clear();
                    out.extend_from_slice(b"action=");
                    out.extend_from_slice(action.as_bytes());
                    out.extend_from_slice(b"\n\n");
                    match tokio::time::timeout(self.config.request_timeout, w.write_all(&out)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, "policy client went away: {e}");
                            return;
                        }
                        Err(_) => {
                            tracing::warn!(%peer, "policy client does not read its answers: closing");
                            return;
                        }
                    }
                }
                Ok(false) => return,
                Err(e) => {
                    tracing::warn!(%peer, "closing policy connection: {e}");
                    return;
                }
            }
        }
    }
}

/// Reads requests from a connection through a [`Framer`], bounded in
/// time: idle between requests (shorter under stress) and per request.
struct RequestReader<R> {
    r: R,
    framer: Framer,
    idle: Duration,
    stress_idle: Duration,
    request_timeout: Duration,
    load: Arc<crate::frontend::listen::Load>,
}

impl<R: tokio::io::AsyncRead + Unpin> RequestReader<R> {
    fn new(r: R, c: &PolicyConfig, load: Arc<crate::frontend::listen::Load>) -> Self {
        RequestReader {
            r,
            framer: Framer::new(c.max_line, c.max_attributes),
            idle: c.idle_timeout,
            stress_idle: c.stress_idle_timeout,
            request_timeout: c.request_timeout,
            load,
        }
    }

    /// Reads until a request is complete (`true`: the framer's
    /// [`Framer::request`], in place) or the connection ends (`false`:
    /// peer closed, idle, or shutdown between requests).
    async fn next(&mut self, shutdown: &CancellationToken) -> Result<bool, ConnError> {
        let mut deadline = None;
        loop {
            if self.framer.advance()? {
                return Ok(true);
            }
            if self.framer.pending() && deadline.is_none() {
                deadline = Some(tokio::time::Instant::now() + self.request_timeout);
            }
            let buf = self.framer.buffer();
            let n = match deadline {
                Some(d) => {
                    tokio::time::timeout_at(d, self.r.read_buf(buf)).await.map_err(|_| ConnError::Timeout(self.request_timeout))??
                }
                None => tokio::select! {
                    r = self.load.timeout(self.idle, self.stress_idle, self.r.read_buf(buf)) => match r {
                        None => return Ok(false),
                        Some(r) => r?,
                    },
                    _ = shutdown.cancelled() => return Ok(false),
                },
            };
            if n == 0 {
                return Ok(false);
            }
        }
    }
}

/// Accepts connections on `listener` until `shutdown` is cancelled, then
/// lets every connection finish the request in hand and returns. `load`
/// is the front end's, shared by all its listeners.
async fn serve(listener: Listener, server: Arc<PolicyServer>, load: Arc<crate::frontend::listen::Load>, shutdown: CancellationToken) {
    let stop = shutdown.clone();
    let l = load.clone();
    crate::frontend::listen::accept_loop(listener, load, crate::frontend::listen::WhenFull::Wait, stop, move |conn, peer, admission| {
        admission.hold(server.clone().handle(conn, peer, l.clone(), shutdown.clone()))
    })
    .await
}
