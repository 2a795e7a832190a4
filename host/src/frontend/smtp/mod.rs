//! The reference SMTP front end (`greyhook smtp`): a before-queue SMTP
//! server in front of the real MTA, the way OpenBSD's spamd sits in front
//! of sendmail. Every hook acts where the draft says:
//!
//! - connect: `421 ... retry=` at the greeting (then the connection closes);
//! - EHLO: the filters' keywords (`GREYLIST`) among ours;
//! - MAIL, RCPT: `451 ... retry=` (per-recipient `retry=00:00:00` for
//!   recipients of another policy group, seed 000);
//! - end of DATA: `451 ... retry=`, keyed with the Message-ID.
//!
//! Accepted mail is relayed to the next hop (`relay.rs`) command by
//! command; the client's `250` after DATA is the next hop's `250`, so
//! nothing is lost and nothing is accepted twice. A next-hop tempfail comes
//! back as a tempfail.
//!
//! The server side is written by hand (command parsing is a few lines of
//! splitting; owning it keeps every limit and reply under our control):
//! RFC 5321 command and line limits, timeouts, SIZE, PIPELINING (replies in
//! order; we read one command at a time), 8BITMIME, ENHANCEDSTATUSCODES,
//! SMTPUTF8 (passed on to a next hop that offers it), DSN (its parameters
//! checked in `dsn.rs` and passed on), dot-stuffing,
//! RSET/NOOP/QUIT/HELP/VRFY, STARTTLS with rustls when a certificate is
//! configured (input pipelined after STARTTLS is refused,
//! CVE-2011-0411).
//!
//! Against hostile clients (`wire.rs` has the byte-level rules): only
//! `CRLF . CRLF` ends the data, and a bare LF or CR is refused with `521`
//! or taken as a line end ([`BareNewline`]); every read and write has a
//! deadline, shortened while the listener is under stress; a client address
//! may hold only so many connections, a session only so much time, and
//! commands that make no progress are counted; message data held in memory
//! across all connections has a budget (`452 4.3.1` when it is spent).
//! The next hop is connected only once a recipient is accepted.
//!
//! Behind a TCP load balancer the client's address comes from the PROXY
//! protocol header the balancer sends (`proxy.rs`, `proxy_protocol`).

mod dsn;
mod proxy;
mod reader;
pub(crate) mod relay;
mod tls;
pub(crate) mod wire;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::domain::reply::render;
use crate::domain::types::{Header, Message, Verdict};
use crate::frontend::listen::{Admission, Conn, ListenAddr, Listener, Load, UnixPerms, WhenFull};
use crate::frontend::smtp::relay::{HopReply, NextHop, Pool, Relay};
use crate::frontend::{FrontEnd, FrontEndError, invalid};
use crate::session::{Hooks, MAX_TRANSACTION_RECIPIENTS, SmtpSession, keep_headers};
use reader::ClientReader;
pub use wire::BareNewline;
use wire::{DataFramer, Ending, Fed, Line, PathError, parse_path, read_line, split_ending};

/// `smtp` or `lmtp`: how the next hop is spoken to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HopProtocol {
    /// SMTP (EHLO).
    #[default]
    Smtp,
    /// LMTP (LHLO; one reply per recipient after the data).
    Lmtp,
}

/// The `[smtp]` table: the reference SMTP front end (`greyhook smtp`).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpConfig {
    /// Addresses (none by default): `0.0.0.0:25`, `127.0.0.1:2525`.
    pub listen: Vec<ListenAddr>,
    /// Where accepted mail goes, `HOST:PORT` or `unix:/path` (required
    /// with `listen`).
    pub next_hop: Option<String>,
    /// `smtp` or `lmtp`.
    pub next_hop_protocol: HopProtocol,
    /// Deadline of connecting to the next hop and of each of its replies.
    #[serde(deserialize_with = "crate::settings::duration")]
    pub next_hop_timeout: Duration,
    /// Idle next-hop connections kept for the next session (0: a new
    /// connection for every session). Connections that took XCLIENT are
    /// never kept.
    pub next_hop_pool: usize,
    /// Longest a kept connection waits idle (keep it below the next hop's
    /// own idle timeout: Postfix's `smtpd_timeout` is 300 s).
    #[serde(deserialize_with = "crate::settings::duration")]
    pub next_hop_idle: Duration,
    /// Our name in the greeting, the EHLO reply and to the next hop
    /// (default: the system's host name).
    pub hostname: Option<String>,
    /// Longest command line, bytes (RFC 5321 says at least 512).
    pub max_line: usize,
    /// Largest message, bytes (announced with SIZE).
    pub max_message_size: usize,
    /// Most recipients per message (RFC 5321: at least 100; at most
    /// [`MAX_TRANSACTION_RECIPIENTS`]).
    pub max_recipients: usize,
    /// Wait for a command (or for the client to take a reply) at most this long.
    #[serde(deserialize_with = "crate::settings::duration")]
    pub command_timeout: Duration,
    /// Wait for message data (between lines) at most this long.
    #[serde(deserialize_with = "crate::settings::duration")]
    pub data_timeout: Duration,
    /// Both timeouts while the listener is under stress (three quarters
    /// of `max_connections` in use).
    #[serde(deserialize_with = "crate::settings::duration")]
    pub stress_timeout: Duration,
    /// A whole session lasts at most this long.
    #[serde(deserialize_with = "crate::settings::duration")]
    pub session_timeout: Duration,
    /// Errors (bad commands) before the connection is closed.
    pub max_errors: u32,
    /// NOOP, RSET, HELP, VRFY and EHLO/HELO without a message in between
    /// before the connection is closed (Postfix `smtpd_junk_command_limit`).
    pub junk_command_limit: u32,
    /// Most connections at once; more hear `421` and are closed.
    pub max_connections: usize,
    /// Most connections at once from one client address (Postfix
    /// `smtpd_client_connection_count_limit`), counted by
    /// `client_ipv4_prefix` and `client_ipv6_prefix`.
    pub max_connections_per_client: usize,
    /// Clients `max_connections_per_client` does not apply to (Postfix
    /// `smtpd_client_event_limit_exceptions`, `$mynetworks` by default):
    /// loopback by default, where a local process (a monitoring probe, a
    /// proxy, a load test) is not one greedy client. They still count
    /// toward `max_connections`.
    pub limit_exceptions: Vec<crate::domain::Network>,
    /// IPv4 clients in one network of this prefix length count as one
    /// client for `max_connections_per_client` (32: each address alone).
    pub client_ipv4_prefix: u8,
    /// IPv6 clients in one network of this prefix length count as one
    /// client (Postfix `smtpd_client_ipv6_prefix_length`, 84 too): a host
    /// is given a /64 or more, and counted per address it could open
    /// `max_connections_per_client` connections from each of its 2^64.
    pub client_ipv6_prefix: u8,
    /// Bytes of message data held in memory across all connections; a
    /// message that does not fit gets `452 4.3.1`.
    pub max_data_memory: usize,
    /// What a bare LF or CR from a client does.
    pub bare_newline: BareNewline,
    /// PEM certificate chain: enables STARTTLS (with `tls_key`).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key.
    pub tls_key: Option<PathBuf>,
    /// Offer `SMTPUTF8` (RFC 6531: internationalised addresses) and pass
    /// it on. The next hop must offer it too (Postfix does, with
    /// `smtputf8_enable = yes`, its default); a transaction that asks for
    /// it when the next hop does not is answered `451 4.6.7` at its first
    /// recipient. Off: not offered, and a client that asks for it anyway
    /// hears `555`.
    pub smtputf8: bool,
    /// Offer `DSN` (RFC 3461: delivery status notifications) and pass its
    /// parameters (`RET`, `ENVID`, `NOTIFY`, `ORCPT`) on to the next hop,
    /// which sends the notices (Postfix offers DSN by default). A next hop
    /// that does not offer it gets the message without them (logged).
    /// Off: not offered, and the parameters hear `555`; sending MTAs then
    /// report a requested success notice as "relayed" themselves.
    pub dsn: bool,
    /// Every connection starts with a PROXY protocol header (HAProxy's,
    /// version 1 or 2) naming the real client: greyhook sits behind a TCP
    /// load balancer (Postfix `smtpd_upstream_proxy_protocol = haproxy`).
    /// A connection without a valid header within `proxy_timeout` is closed
    /// unanswered. Off: the connection's peer is the client.
    pub proxy_protocol: bool,
    /// With `proxy_protocol`, the peers that may send the header (the load
    /// balancers; loopback by default); a TCP connection from any other
    /// address is closed unread, since whoever sends the header chooses
    /// the client address greylisting keys on. Connections to a unix
    /// socket listener are trusted (its permissions say who connects).
    pub proxy_trusted: Vec<crate::domain::Network>,
    /// Longest wait for the PROXY header (Postfix
    /// `smtpd_upstream_proxy_timeout`); `stress_timeout` if shorter while
    /// the listener is under stress.
    #[serde(deserialize_with = "crate::settings::duration")]
    pub proxy_timeout: Duration,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            listen: Vec::new(),
            next_hop: None,
            next_hop_protocol: HopProtocol::Smtp,
            next_hop_timeout: Duration::from_secs(300),
            next_hop_pool: 16,
            next_hop_idle: Duration::from_secs(10),
            hostname: None,
            max_line: 2048,
            max_message_size: 25 << 20,
            max_recipients: 100,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(180),
            stress_timeout: Duration::from_secs(10),
            session_timeout: Duration::from_secs(1800),
            max_errors: 20,
            junk_command_limit: 20,
            max_connections: 256,
            max_connections_per_client: 10,
            limit_exceptions: ["127.0.0.0/8", "::1"].iter().filter_map(|n| n.parse().ok()).collect(),
            client_ipv4_prefix: 32,
            client_ipv6_prefix: 84,
            max_data_memory: 256 << 20,
            bare_newline: BareNewline::Reject,
            tls_cert: None,
            tls_key: None,
            smtputf8: true,
            dsn: true,
            proxy_protocol: false,
            proxy_trusted: ["127.0.0.0/8", "::1"].iter().filter_map(|n| n.parse().ok()).collect(),
            proxy_timeout: Duration::from_secs(5),
        }
    }
}

/// What the settings resolve to at start: our name, the next hop, the TLS
/// acceptor.
struct Resolved {
    hostname: String,
    next_hop: NextHop,
    /// Idle next-hop connections for the next session.
    pool: Pool,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

/// Where the session's next-hop connection came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// The session had it already (an earlier transaction).
    Session,
    /// The pool of idle connections.
    Pooled,
    /// Opened now.
    New,
}

/// The SMTP front end: its listeners, bound, and its resolved settings.
pub struct Smtp {
    config: Arc<SmtpConfig>,
    resolved: Arc<Resolved>,
    listeners: Vec<Listener>,
}

impl FrontEnd for Smtp {
    const NAME: &'static str = "smtp";
    type Config = SmtpConfig;

    fn enabled(config: &SmtpConfig) -> bool {
        !config.listen.is_empty()
    }

    fn disable(config: &mut SmtpConfig) {
        config.listen.clear();
    }

    async fn start(config: &SmtpConfig) -> Result<Smtp, FrontEndError> {
        let s = config;
        let bad = |m: &dyn std::fmt::Display| invalid::<Smtp>(m);
        let address = s.next_hop.clone().ok_or_else(|| bad(&"next_hop is required (HOST:PORT of the MTA behind greyhook)"))?;
        match address.strip_prefix("unix:") {
            Some(path) if !path.starts_with('/') => return Err(bad(&"next_hop unix:PATH needs an absolute path")),
            None if !address.contains(':') => return Err(bad(&"next_hop must be HOST:PORT or unix:/path")),
            _ => {}
        }
        if s.max_line < 512
            || s.max_recipients < 1
            || s.max_recipients > MAX_TRANSACTION_RECIPIENTS
            || s.max_message_size < 1024
            || s.max_connections == 0
            || s.max_connections_per_client == 0
            || s.max_errors == 0
        {
            return Err(bad(&format!(
                "max_line must be at least 512, max_message_size 1024, max_recipients 1 to {MAX_TRANSACTION_RECIPIENTS}, \
                 max_connections, max_connections_per_client and max_errors at least 1"
            )));
        }
        if !(8..=32).contains(&s.client_ipv4_prefix) || !(32..=128).contains(&s.client_ipv6_prefix) {
            return Err(bad(&"client_ipv4_prefix must be 8 to 32, client_ipv6_prefix 32 to 128"));
        }
        if s.max_data_memory < s.max_message_size.min(1 << 20) {
            return Err(bad(&"max_data_memory must hold at least one message of max_message_size (or 1 MiB)"));
        }
        let hostname = s.hostname.clone().unwrap_or_else(system_hostname);
        let tls = match (&s.tls_cert, &s.tls_key) {
            (None, None) => None,
            (Some(c), Some(k)) => Some(tls::acceptor(c, k).map_err(|e| bad(&e))?),
            _ => return Err(bad(&"tls_cert and tls_key go together")),
        };
        let next_hop =
            NextHop { address, lmtp: s.next_hop_protocol == HopProtocol::Lmtp, timeout: s.next_hop_timeout, helo_name: hostname.clone() };
        let mut listeners = Vec::new();
        for a in &s.listen {
            listeners.push(Listener::bind(a, &UnixPerms::default()).await?);
        }
        Ok(Smtp {
            config: Arc::new(config.clone()),
            resolved: Arc::new(Resolved { hostname, next_hop, pool: Pool::new(s.next_hop_pool, s.next_hop_idle), tls }),
            listeners,
        })
    }

    fn endpoints(&self) -> Vec<ListenAddr> {
        self.listeners.iter().map(Listener::local_addr).collect()
    }

    fn open_files(config: &SmtpConfig) -> u64 {
        // A client's connection and its next-hop connection each, the
        // pool's idle ones, refusals being written, and a connection each
        // listener has accepted.
        let n = 2 * config.max_connections + config.next_hop_pool + crate::frontend::listen::MAX_REFUSALS + config.listen.len();
        n as u64
    }

    async fn serve(self, hooks: Hooks, shutdown: CancellationToken) {
        // One `Shared` for every listener: the connection limits and the
        // message memory budget are the front end's.
        let units = (self.config.max_data_memory / BUDGET_UNIT).clamp(1, Semaphore::MAX_PERMITS);
        let shared = Arc::new(Shared {
            hooks,
            load: Load::new(<Smtp as FrontEnd>::NAME, self.config.max_connections),
            config: self.config,
            resolved: self.resolved,
            per_client: Mutex::new(HashMap::new()),
            data_budget: Arc::new(Semaphore::new(units)),
        });
        let tasks: Vec<_> = self.listeners.into_iter().map(|l| tokio::spawn(serve(l, shared.clone(), shutdown.clone()))).collect();
        for t in tasks {
            let _ = t.await;
        }
    }
}

/// The machine's host name (`/proc/sys/kernel/hostname`), or `localhost`.
fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty() && h.len() <= 253)
        .unwrap_or_else(|| "localhost".into())
}

/// Our reply when the next hop cannot be reached or dropped the connection.
const HOP_UNAVAILABLE: &str = "451 4.4.1 Next hop unavailable, try again later\r\n";

/// The reply to a recipient of an SMTPUTF8 transaction when the next hop
/// does not offer SMTPUTF8.
const SMTPUTF8_UNAVAILABLE: &str = "451 4.6.7 SMTPUTF8 not available at the next hop, try again later\r\n";

/// Logs, once a process, that a client's DSN parameters were not passed
/// on because the next hop does not offer DSN: the message goes on
/// without them (its notices are the next hop's ordinary bounces).
fn dsn_not_passed_on() {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "a client asked for delivery status notifications (DSN) and the next hop does not offer DSN: \
             relayed without them (enable DSN there, or set [smtp] dsn = false); said once"
        );
    }
}

/// A RCPT command's DSN parameters `params` as the next hop `hop` takes
/// them: all of them if it offers DSN, else none (and the log says so once).
fn rcpt_params_for<'a>(hop: &Relay, params: &'a str) -> &'a str {
    if hop.has("DSN") {
        return params;
    }
    if !params.is_empty() {
        dsn_not_passed_on();
    }
    ""
}

/// Longest line inside message data; a longer one fails the message.
const MAX_DATA_LINE: usize = 64 << 10;

/// The capacity the buffer of a session's command lines starts with
/// (twice that for the lines of message data): a command's or a data line's
/// usual length, so that it rarely grows.
const LINE_START: usize = 512;

/// The longest command verb (`STARTTLS`).
const VERB_MAX: usize = 8;

/// `verb` in upper case, written into `out` (no allocation a command); a
/// verb longer than any command is none (empty), which no command matches.
fn uppercase_verb<'a>(verb: &str, out: &'a mut [u8; VERB_MAX]) -> &'a [u8] {
    let Some(dst) = out.get_mut(..verb.len()) else { return &[] };
    dst.copy_from_slice(verb.as_bytes());
    dst.make_ascii_uppercase();
    dst
}

/// The capacity a message's buffer starts with.
const BODY_START: usize = 4 * BUDGET_UNIT;

/// The data memory budget counts in units of this many bytes.
const BUDGET_UNIT: usize = 1024;

static SESSIONS: AtomicU64 = AtomicU64::new(0);

/// What every connection of the front end shares, on all its listeners:
/// the hooks, the settings, the load, the connections per client address
/// and the message memory budget.
struct Shared {
    hooks: Hooks,
    config: Arc<SmtpConfig>,
    resolved: Arc<Resolved>,
    load: Arc<Load>,
    per_client: Mutex<HashMap<IpAddr, usize>>,
    data_budget: Arc<Semaphore>,
}

/// A client address's connection, counted until the session ends: until
/// greyhook's closing reply (`221`, `421`, …) is about to be sent, or the
/// connection ends without one. A client may connect again as soon as it
/// has read that reply, which can be before greyhook has closed the old
/// connection and put its next-hop connection back in the pool: counted
/// until then, it would hear `421 4.7.0` with no more sessions open than
/// the limit.
struct ClientSlot(Arc<Shared>, IpAddr);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut m = self.0.per_client.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

impl ClientSlot {
    /// A slot for a connection from `ip`, or none if its network (see
    /// [`crate::domain::client_network`]) has `max_connections_per_client` sessions already.
    fn take(shared: &Arc<Shared>, ip: IpAddr) -> Option<ClientSlot> {
        let ip = crate::domain::client_network(ip, shared.config.client_ipv4_prefix, shared.config.client_ipv6_prefix);
        let mut m = shared.per_client.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= shared.config.max_connections_per_client {
            return None;
        }
        *n += 1;
        Some(ClientSlot(shared.clone(), ip))
    }
}

/// Accepts SMTP connections on `listener` until `shutdown` is cancelled;
/// `shared` is the front end's, shared by all its listeners.
async fn serve(listener: Listener, shared: Arc<Shared>, shutdown: CancellationToken) {
    let load = shared.load.clone();
    let stop = shutdown.clone();
    let full = WhenFull::Refuse("421 4.3.2 Too many connections, try again later\r\n");
    crate::frontend::listen::accept_loop(listener, load, full, stop, move |conn, peer, admission| {
        let (shared, shutdown) = (shared.clone(), shutdown.clone());
        async move {
            let tcp_peer = peer.parse::<std::net::SocketAddr>().ok();
            let mut ip: IpAddr = tcp_peer.map_or(std::net::Ipv4Addr::LOCALHOST.into(), |a| a.ip());
            let mut c = Connection::new(conn, &peer, shared.clone(), admission);
            if shared.config.proxy_protocol {
                match c.proxied(tcp_peer).await {
                    None => return,
                    Some(proxy::Source::Client(a)) => ip = a.ip(),
                    Some(proxy::Source::Proxy) => {}
                }
            }
            let peer = c.peer.clone();
            if !shared.config.limit_exceptions.iter().any(|n| n.contains(ip)) {
                let Some(slot) = ClientSlot::take(&shared, ip) else {
                    tracing::warn!(%peer, limit = shared.config.max_connections_per_client, "too many connections from one client address");
                    crate::telemetry::host().client_limit_refusals.get_or_create(&shared.load.label()).inc();
                    let _ = c.write("421 4.7.0 Too many connections from your address, try again later\r\n").await;
                    return;
                };
                c.slot = Some(slot);
            }
            let limit = shared.config.session_timeout;
            tokio::select! {
                r = tokio::time::timeout(limit, c.run(ip)) => match r {
                    Ok(Err(e)) => tracing::debug!(%peer, "smtp connection ended: {e}"),
                    Ok(Ok(())) => {}
                    Err(_) => {
                        tracing::info!(%peer, "smtp session over its time limit {limit:?}");
                        let _ = c.close_with("421 4.4.2 Session time limit exceeded, closing\r\n").await;
                    }
                },
                _ = shutdown.cancelled() => { let _ = c.close_with("421 4.3.2 Shutting down\r\n").await; }
            }
            // Whatever ended the session, the client is let go (its
            // connection closed, its places under the limits given back)
            // before the next hop's connection is seen to.
            let relay = c.relay.take();
            drop(c);
            if let Some(relay) = relay {
                // The pool keeps it only if it may serve another client.
                shared.resolved.pool.give_back(relay);
            }
        }
    })
    .await
}

/// Why a connection ends early.
#[derive(Debug, thiserror::Error)]
enum End {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("client timed out")]
    Timeout,
    #[error("client closed the connection")]
    Closed,
    #[error("client sent a bare newline")]
    BareNewline,
}

/// The next hop's part of the current transaction.
enum Hop {
    /// Not yet asked (no recipient accepted so far).
    Idle,
    /// MAIL accepted by the next hop.
    Open,
    /// The next hop refused MAIL (or could not be reached): this reply
    /// answers every recipient of the transaction.
    Refused(String),
}

struct Connection {
    io: ClientReader<Conn>,
    peer: String,
    shared: Arc<Shared>,
    config: Arc<SmtpConfig>,
    resolved: Arc<Resolved>,
    session: Option<SmtpSession>,
    relay: Option<Relay>,
    /// The client address's count of sessions (released as the session
    /// ends; see [`ClientSlot`]).
    slot: Option<ClientSlot>,
    /// The session's place under `max_connections`, given back once the
    /// client has been told goodbye.
    admission: Option<Admission>,
    hop: Hop,
    greeted: bool,
    tls: bool,
    in_transaction: bool,
    /// MAIL parameters to forward to the next hop.
    mail_params: Vec<String>,
    /// The transaction asked for SMTPUTF8.
    smtputf8: bool,
    recipients: usize,
    errors: u32,
    junk: u32,
    /// Headers the filters asked for at MAIL and RCPT, added at delivery.
    headers: Vec<Header>,
}

/// A message read into memory, with its share of the data budget.
struct Body {
    bytes: Vec<u8>,
    _budget: Option<OwnedSemaphorePermit>,
}

impl Connection {
    fn new(conn: Conn, peer: &str, shared: Arc<Shared>, admission: Admission) -> Connection {
        Connection {
            io: ClientReader::new(conn),
            peer: peer.to_string(),
            config: shared.config.clone(),
            resolved: shared.resolved.clone(),
            shared,
            session: None,
            relay: None,
            slot: None,
            admission: Some(admission),
            hop: Hop::Idle,
            greeted: false,
            tls: false,
            in_transaction: false,
            mail_params: Vec::new(),
            smtputf8: false,
            recipients: 0,
            errors: 0,
            junk: 0,
            headers: Vec::new(),
        }
    }

    /// Writes to the client, which must take it within the command timeout
    /// (a client that pipelines and never reads cannot hold us).
    async fn write(&mut self, text: &str) -> Result<(), End> {
        let (normal, stressed) = (self.config.command_timeout, self.config.stress_timeout);
        let w = self.io.get_mut();
        let written = self.shared.load.timeout(normal, stressed, async {
            w.write_all(text.as_bytes()).await?;
            w.flush().await
        });
        match written.await {
            Some(r) => Ok(r?),
            None => Err(End::Timeout),
        }
    }

    /// Ends the session with `text` (`221`, or a reply that closes the
    /// connection): the client address's slot is released first, so a
    /// client that reconnects as soon as it reads the reply is counted
    /// right; the session's place under `max_connections` right after the
    /// write (which `max_connections` still bounds while it waits on a
    /// client that does not read).
    async fn close_with(&mut self, text: &str) -> Result<(), End> {
        self.slot = None;
        let written = self.write(text).await;
        self.admission = None;
        written
    }

    /// Reads a line into `buf` ([`read_line`]).
    async fn line<'b>(&mut self, max: usize, timeout: Duration, buf: &'b mut Vec<u8>) -> Result<Line<'b>, End> {
        let stressed = self.config.stress_timeout;
        match self.shared.load.timeout(timeout, stressed, read_line(&mut self.io, max, buf)).await {
            None => Err(End::Timeout),
            Some(Err(e)) => Err(End::Io(e)),
            Some(Ok(None)) => Err(End::Closed),
            Some(Ok(Some(l))) => Ok(l),
        }
    }

    /// Counts a client error; too many close the connection.
    async fn error(&mut self, reply: &str) -> Result<(), End> {
        self.errors += 1;
        if self.errors >= self.config.max_errors {
            self.close_with("421 4.7.0 Too many errors, closing\r\n").await?;
            return Err(End::Closed);
        }
        self.write(reply).await
    }

    /// Counts a command that makes no progress; too many close the connection.
    async fn junk(&mut self, reply: &str) -> Result<(), End> {
        self.junk += 1;
        if self.junk > self.config.junk_command_limit {
            self.close_with("421 4.7.0 Too many commands without mail, closing\r\n").await?;
            return Err(End::Closed);
        }
        self.write(reply).await
    }

    /// Tells the client about a bare newline and ends the session.
    async fn bare_newline(&mut self) -> Result<(), End> {
        tracing::info!(peer = %self.peer, "bare <LF> or <CR> from the client: 521 and closing");
        self.close_with("521 5.5.2 Error: bare <LF> or <CR> received; lines end with <CR><LF>\r\n").await?;
        Err(End::BareNewline)
    }

    /// Reads the PROXY header (`proxy_protocol`) from a connection of
    /// `tcp_peer` (none: a unix socket's): whom it names, with
    /// [`Connection::peer`] set to a client it names; none if the
    /// connection is to be closed unanswered (the peer may not send one,
    /// or sent none valid in time), which is logged and counted.
    async fn proxied(&mut self, tcp_peer: Option<std::net::SocketAddr>) -> Option<proxy::Source> {
        let refused = |reason: &'static str| {
            let m = crate::telemetry::host();
            let label = crate::telemetry::ReasonLabels { front_end: <Smtp as FrontEnd>::NAME, reason };
            m.proxy_refusals.get_or_create(&label).inc();
        };
        if let Some(p) = tcp_peer
            && !self.config.proxy_trusted.iter().any(|n| n.contains(p.ip()))
        {
            tracing::warn!(peer = %self.peer, "connection closed: not in proxy_trusted, so it may not send a PROXY header");
            refused("untrusted");
            return None;
        }
        let (normal, stressed) = (self.config.proxy_timeout, self.config.stress_timeout.min(self.config.proxy_timeout));
        let source = match self.shared.load.timeout(normal, stressed, proxy::read_header(&mut self.io)).await {
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                match e {
                    proxy::ProxyError::Closed => tracing::debug!(peer = %self.peer, "{e}"),
                    _ => tracing::warn!(peer = %self.peer, "connection closed: {e}"),
                }
                refused(e.reason());
                return None;
            }
            None => {
                tracing::warn!(peer = %self.peer, "connection closed: no PROXY header within {normal:?}");
                refused("timeout");
                return None;
            }
        };
        if let proxy::Source::Client(a) = source {
            tracing::debug!(client = %a, proxy = %self.peer, "PROXY header");
            self.peer = a.to_string();
        }
        Some(source)
    }

    /// Sends a filter's reply; a `421` closes the connection (RFC 5321 3.8).
    async fn filter_reply(&mut self, r: &crate::domain::types::Reply) -> Result<(), End> {
        if r.code == 421 {
            self.close_with(&render(r)).await?;
            return Err(End::Closed);
        }
        self.write(&render(r)).await
    }

    async fn run(&mut self, ip: IpAddr) -> Result<(), End> {
        let id = format!("smtp{}", SESSIONS.fetch_add(1, Ordering::Relaxed));
        let mut session = SmtpSession::new(self.shared.hooks.clone(), id, ip);
        // The client's names, as Postfix's smtpd finds them (bounded by
        // `[dns] timeout`; a failure leaves them unknown).
        session.resolve_client().await;
        let v = session.connect().await;
        if let Some(r) = v.reply() {
            // The draft: 421 at the greeting, then the client goes away.
            self.close_with(&render(r)).await?;
            return Ok(());
        }
        self.session = Some(session);
        self.write(&format!("220 {} ESMTP greyhook\r\n", self.resolved.hostname)).await?;
        // The session's command lines, one buffer for all of them, at a
        // size that holds a command without growing.
        let mut buf = Vec::with_capacity(LINE_START);
        loop {
            let raw = match self.line(self.config.max_line, self.config.command_timeout, &mut buf).await {
                Ok(Line::Text(t)) => t,
                Ok(Line::TooLong) => {
                    self.error("500 5.5.2 Line too long\r\n").await?;
                    continue;
                }
                Err(End::Timeout) => {
                    self.close_with("421 4.4.2 Timeout exceeded, closing\r\n").await?;
                    return Err(End::Timeout);
                }
                Err(e) => return Err(e),
            };
            let (content, ending) = split_ending(raw);
            match (ending, self.config.bare_newline) {
                // The stream ended in the middle of a command: nobody is
                // left to answer.
                (Ending::None, _) => return Err(End::Closed),
                (Ending::Bare, BareNewline::Reject) => return self.bare_newline().await,
                _ => {}
            }
            if content.contains(&b'\r') {
                self.error("500 5.5.2 Bare <CR> in command\r\n").await?;
                continue;
            }
            // A command is UTF-8 or it is refused, as Postfix's smtpd refuses
            // it: read with replacement characters, an address would be
            // relayed as another one (a Latin-1 `été@` as `�t�@`), and
            // different senders would make one triplet.
            let Ok(text) = std::str::from_utf8(content) else {
                self.error("500 5.5.2 Error: bad UTF-8 syntax\r\n").await?;
                continue;
            };
            let (verb, arg) = text.split_once(' ').unwrap_or((text, ""));
            let arg = arg.trim();
            let mut upper = [0u8; VERB_MAX];
            match uppercase_verb(verb, &mut upper) {
                b"EHLO" if arg.is_empty() => self.error("501 5.5.4 Syntax: EHLO hostname\r\n").await?,
                b"HELO" if arg.is_empty() => self.error("501 5.5.4 Syntax: HELO hostname\r\n").await?,
                b"EHLO" => self.ehlo(arg, true).await?,
                b"HELO" => self.ehlo(arg, false).await?,
                b"STARTTLS" => self.starttls().await?,
                b"MAIL" => self.mail(arg).await?,
                b"RCPT" => self.rcpt(arg).await?,
                b"DATA" => self.data().await?,
                b"RSET" => {
                    self.reset().await;
                    self.junk("250 2.0.0 Ok\r\n").await?;
                }
                b"NOOP" => self.junk("250 2.0.0 Ok\r\n").await?,
                b"HELP" => self.junk("214 2.0.0 See RFC 5321\r\n").await?,
                b"VRFY" => self.junk("252 2.0.0 Cannot VRFY; send some mail and we will see\r\n").await?,
                b"QUIT" => {
                    self.close_with("221 2.0.0 Bye\r\n").await?;
                    return Ok(());
                }
                _ => self.error("500 5.5.2 Command not recognized\r\n").await?,
            }
        }
    }

    fn session(&mut self) -> &mut SmtpSession {
        self.session.as_mut().unwrap_or_else(|| unreachable!("set before the command loop"))
    }

    /// Ends the transaction, here and at the next hop.
    async fn reset(&mut self) {
        if matches!(self.hop, Hop::Open)
            && let Some(r) = self.relay.as_mut()
            && r.rset().await.is_err()
        {
            self.relay = None;
        }
        self.end_transaction();
    }

    fn end_transaction(&mut self) {
        self.hop = Hop::Idle;
        self.in_transaction = false;
        self.mail_params.clear();
        self.smtputf8 = false;
        self.recipients = 0;
        self.headers.clear();
        self.session().reset();
    }

    async fn ehlo(&mut self, name: &str, extended: bool) -> Result<(), End> {
        if name.len() > 255 || name.bytes().any(|b| b.is_ascii_control()) {
            return self.error("501 5.5.4 Invalid hostname\r\n").await;
        }
        self.junk += 1;
        if self.junk > self.config.junk_command_limit {
            self.close_with("421 4.7.0 Too many commands without mail, closing\r\n").await?;
            return Err(End::Closed);
        }
        self.reset().await;
        let v = self.session().ehlo(name).await;
        if let Some(r) = v.verdict.reply() {
            let r = r.clone();
            return self.filter_reply(&r).await;
        }
        self.greeted = true;
        // Written into one buffer, without `format!` (a `String` and a
        // `format!` a line cost ~2k instructions a session).
        let mut text = String::with_capacity(256);
        if !extended {
            for part in ["250 ", &self.resolved.hostname, "\r\n"] {
                text.push_str(part);
            }
            return self.write(&text).await;
        }
        // HELP is always the last line.
        let line = |text: &mut String, l: &str| {
            text.push_str("250-");
            text.push_str(l);
            text.push_str("\r\n");
        };
        line(&mut text, &self.resolved.hostname);
        line(&mut text, "PIPELINING");
        text.push_str("250-SIZE ");
        crate::domain::retry::push_digits(&mut text, self.config.max_message_size as u64, 0);
        text.push_str("\r\n");
        line(&mut text, "8BITMIME");
        line(&mut text, "ENHANCEDSTATUSCODES");
        if self.config.smtputf8 {
            line(&mut text, "SMTPUTF8");
        }
        if self.config.dsn {
            line(&mut text, "DSN");
        }
        if self.resolved.tls.is_some() && !self.tls {
            line(&mut text, "STARTTLS");
        }
        for k in &v.keywords {
            line(&mut text, k);
        }
        text.push_str("250 HELP\r\n");
        self.write(&text).await
    }

    async fn starttls(&mut self) -> Result<(), End> {
        let Some(acceptor) = self.resolved.tls.clone().filter(|_| !self.tls) else {
            return self.error("502 5.5.1 STARTTLS not available\r\n").await;
        };
        if !self.io.buffer().is_empty() {
            // Commands pipelined after STARTTLS would be taken as sent under TLS.
            self.write("501 5.5.1 Nothing may follow STARTTLS\r\n").await?;
            return Err(End::Closed);
        }
        self.write("220 2.0.0 Ready to start TLS\r\n").await?;
        let plain = std::mem::replace(&mut self.io, ClientReader::new(Box::pin(tokio::io::empty()))).into_inner();
        // The handshake is a wait like any other: cut at `stress_timeout`
        // under stress (Postfix: `smtpd_starttls_timeout`), else a client
        // that says STARTTLS and goes quiet holds its slot for the whole
        // command timeout.
        let (normal, stressed) = (self.config.command_timeout, self.config.stress_timeout);
        let tls = self.shared.load.timeout(normal, stressed, acceptor.accept(plain)).await.ok_or(End::Timeout)??;
        self.io = ClientReader::new(Box::pin(tls));
        self.tls = true;
        self.greeted = false;
        self.reset().await;
        let s = self.session().session_mut();
        s.tls = true;
        s.helo = None;
        Ok(())
    }

    async fn mail(&mut self, arg: &str) -> Result<(), End> {
        if !self.greeted {
            return self.error("503 5.5.1 Send EHLO first\r\n").await;
        }
        if self.in_transaction {
            return self.error("503 5.5.1 Nested MAIL command\r\n").await;
        }
        let (sender, params) = match parse_path(arg, "FROM:") {
            Ok(p) => p,
            Err(PathError::TooLong) => return self.error("501 5.1.7 Sender address too long\r\n").await,
            Err(PathError::Syntax) => return self.error("501 5.1.7 Bad sender address syntax\r\n").await,
        };
        let mut forward = Vec::new();
        let mut smtputf8 = false;
        let mut dsn_seen = [false; 2];
        for p in params.split_whitespace() {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            if self.config.dsn && dsn::is_mail_param(k) {
                match dsn::mail_param(k, v, &mut dsn_seen) {
                    Ok(p) => forward.push(p),
                    Err(reply) => return self.error(reply).await,
                }
                continue;
            }
            match k.to_ascii_uppercase().as_str() {
                "SIZE" => match v.parse::<u64>() {
                    Ok(n) if n > self.config.max_message_size as u64 => {
                        return self.write("552 5.3.4 Message size exceeds fixed limit\r\n").await;
                    }
                    Ok(_) => forward.push(p.to_string()),
                    Err(_) => return self.error("501 5.5.4 Bad SIZE parameter\r\n").await,
                },
                "BODY" if v.eq_ignore_ascii_case("8BITMIME") || v.eq_ignore_ascii_case("7BIT") => forward.push(p.to_string()),
                // RFC 6531: a keyword without a value.
                "SMTPUTF8" if self.config.smtputf8 && p.len() == k.len() => {
                    if !smtputf8 {
                        forward.push("SMTPUTF8".to_string());
                    }
                    smtputf8 = true;
                }
                _ => return self.error("555 5.5.4 Unsupported MAIL parameter\r\n").await,
            }
        }
        let v = self.session().mail(&sender).await;
        if let Some(r) = v.reply() {
            let r = r.clone();
            return self.filter_reply(&r).await;
        }
        // The next hop hears of the transaction only when a recipient
        // passes the filters: a greylisted attempt costs it nothing.
        self.in_transaction = true;
        self.hop = Hop::Idle;
        self.mail_params = forward;
        self.smtputf8 = smtputf8;
        self.headers.clear();
        keep_headers(&mut self.headers, &v);
        self.write("250 2.1.0 Ok\r\n").await
    }

    /// Opens the transaction at the next hop (taking a pooled connection
    /// or connecting): the client's address with XFORWARD, MAIL, and the
    /// first recipient `rcpt` (pipelined when the next hop allows). The
    /// next hop's reply to `rcpt`, or `None` when the transaction was open
    /// already (then the caller sends RCPT); `Err` is the reply for the
    /// client's recipient.
    async fn open_hop(&mut self, rcpt: &str, rcpt_params: &str) -> Result<Option<HopReply>, String> {
        match &self.hop {
            Hop::Open => return Ok(None),
            Hop::Refused(reply) => return Err(reply.clone()),
            Hop::Idle => {}
        }
        let sender = self.session().transaction().sender.clone().unwrap_or_default();
        let xf = self.session.as_ref().map(|s| xforward(s.session()));
        let params = std::mem::take(&mut self.mail_params);
        let result = self.hop_mail(&sender, params, xf, rcpt, rcpt_params).await;
        self.hop = match &result {
            Ok(_) => Hop::Open,
            Err(reply) => Hop::Refused(reply.clone()),
        };
        result.map(Some)
    }

    async fn hop_mail(
        &mut self,
        sender: &str,
        mut forward: Vec<String>,
        xf: Option<String>,
        rcpt: &str,
        rcpt_params: &str,
    ) -> Result<HopReply, String> {
        // A pooled connection the next hop dropped meanwhile fails at once:
        // then once more on a new connection.
        for attempt in 0..2 {
            let origin = self.relay_ready().await?;
            let Some(hop) = self.relay.as_mut() else { return Err(HOP_UNAVAILABLE.into()) };
            // Tell it who the client is: XCLIENT once per new connection
            // where it is offered (the next hop then treats the session as
            // the client's; such a connection is never pooled), else
            // XFORWARD before every MAIL (Postfix resets XFORWARD
            // attributes after every transaction).
            if origin == Origin::New
                && let Err(e) = hop.xclient(&self.session.as_ref().map(|s| xclient_attrs(s.session())).unwrap_or_default()).await
            {
                tracing::warn!("{e}");
                self.relay = None;
                return Err(HOP_UNAVAILABLE.into());
            }
            let Some(hop) = self.relay.as_mut() else { return Err(HOP_UNAVAILABLE.into()) };
            // XCLIENT is asked of a new connection only: the pool never
            // holds one that took it.
            let xf = xf.as_deref().filter(|_| !hop.took_xclient() && hop.has("XFORWARD"));
            if self.smtputf8 && !hop.has("SMTPUTF8") {
                // Not passed on without it: the next hop could not take
                // the addresses. Temporary: the operator can turn
                // SMTPUTF8 on at the next hop, or off here.
                tracing::warn!(
                    "a client asked for SMTPUTF8 and the next hop does not offer it (set [smtp] smtputf8 = false, or enable it there)"
                );
                return Err(SMTPUTF8_UNAVAILABLE.into());
            }
            // Only the parameters it announced (SMTPUTF8 is checked above).
            let dsn_here = hop.has("DSN");
            if !dsn_here && forward.iter().any(|p| dsn::is_mail_param(p.split('=').next().unwrap_or(""))) {
                dsn_not_passed_on();
            }
            let rcpt_params = rcpt_params_for(hop, rcpt_params);
            forward.retain(|p| {
                let k = p.split('=').next().unwrap_or("").to_ascii_uppercase();
                (k == "SIZE" && hop.has("SIZE"))
                    || (k == "BODY" && hop.has("8BITMIME"))
                    || k == "SMTPUTF8"
                    || (dsn_here && dsn::is_mail_param(&k))
            });
            match hop.open(xf, sender, &forward.join(" "), Some((rcpt, rcpt_params))).await {
                Ok((mail, Some(first))) if mail.is_positive() => return Ok(first),
                Ok((mail, _)) => return Err(mail.render()),
                Err(e) if origin == Origin::Pooled && attempt == 0 => {
                    tracing::debug!("pooled next-hop connection failed ({e}); opening a new one");
                    self.relay = None;
                }
                Err(e) => {
                    tracing::warn!("{e}");
                    self.relay = None;
                    return Err(HOP_UNAVAILABLE.into());
                }
            }
        }
        Err(HOP_UNAVAILABLE.into())
    }

    /// The relay connection: the session's own, one from the pool, or a new
    /// one; or the reply for our client.
    async fn relay_ready(&mut self) -> Result<Origin, String> {
        if self.relay.is_some() {
            return Ok(Origin::Session);
        }
        if let Some(r) = self.resolved.pool.take() {
            self.relay = Some(r);
            return Ok(Origin::Pooled);
        }
        match Relay::connect(&self.resolved.next_hop).await {
            Ok(Ok(r)) => {
                self.relay = Some(r);
                Ok(Origin::New)
            }
            Ok(Err(reply)) => {
                tracing::warn!(code = reply.code, "next hop refused the session");
                // Its greeting or EHLO refused us: tell the client in our
                // words, keeping the class (permanent or temporary).
                let (code, enhanced) = if reply.code >= 500 { (554, "5.4.1") } else { (451, "4.4.1") };
                Err(format!("{code} {enhanced} Next hop refused the session: {}\r\n", reply.lines.join(" ")))
            }
            Err(e) => {
                tracing::warn!("{e}");
                Err(HOP_UNAVAILABLE.into())
            }
        }
    }

    async fn rcpt(&mut self, arg: &str) -> Result<(), End> {
        if !self.in_transaction {
            return self.error("503 5.5.1 Need MAIL before RCPT\r\n").await;
        }
        let (rcpt, params) = match parse_path(arg, "TO:") {
            Ok(p) => p,
            Err(PathError::TooLong) => return self.error("501 5.1.3 Recipient address too long\r\n").await,
            Err(PathError::Syntax) => return self.error("501 5.1.3 Bad recipient address syntax\r\n").await,
        };
        let rcpt_params = match dsn::rcpt_params(params, self.config.dsn, self.smtputf8) {
            Ok(p) => p,
            Err(reply) => return self.error(reply).await,
        };
        if rcpt.is_empty() {
            return self.error("501 5.1.3 Bad recipient address syntax\r\n").await;
        }
        if self.recipients >= self.config.max_recipients {
            return self.write("452 4.5.3 Too many recipients\r\n").await;
        }
        let v = self.session().rcpt(&rcpt).await;
        if let Some(r) = v.reply() {
            let r = r.clone();
            return self.filter_reply(&r).await;
        }
        let first = match self.open_hop(&rcpt, &rcpt_params).await {
            Ok(first) => first,
            Err(reply) => {
                self.forget_last_recipient();
                return self.write(&reply).await;
            }
        };
        let Some(hop) = self.relay.as_mut() else {
            self.forget_last_recipient();
            return self.write(HOP_UNAVAILABLE).await;
        };
        let answer = match first {
            Some(r) => Ok(r),
            None => {
                let params = rcpt_params_for(hop, &rcpt_params);
                hop.rcpt(&rcpt, params).await
            }
        };
        match answer {
            Ok(r) if r.is_positive() => {
                self.recipients += 1;
                self.junk = 0;
                keep_headers(&mut self.headers, &v);
                self.write("250 2.1.5 Ok\r\n").await
            }
            Ok(r) => {
                self.forget_last_recipient();
                self.write(&r.render()).await
            }
            Err(e) => {
                tracing::warn!("{e}");
                self.relay = None;
                self.end_transaction();
                self.write(HOP_UNAVAILABLE).await
            }
        }
    }

    /// The filter accepted a recipient the next hop refused: it is not part
    /// of the transaction (its policy group must not count).
    fn forget_last_recipient(&mut self) {
        let s = self.session();
        let mut t = s.transaction().clone();
        t.recipients.pop();
        let sender = t.sender.clone();
        s.reset();
        s.restore(sender, t.recipients);
    }

    async fn data(&mut self) -> Result<(), End> {
        if !self.in_transaction {
            return self.error("503 5.5.1 Need MAIL command\r\n").await;
        }
        if self.recipients == 0 {
            return self.error("554 5.5.1 No valid recipients\r\n").await;
        }
        self.write("354 End data with <CR><LF>.<CR><LF>\r\n").await?;
        let message = self.read_message().await?;
        let result = match message {
            Err(reply) => {
                if let Some(hop) = self.relay.as_mut()
                    && hop.rset().await.is_err()
                {
                    self.relay = None;
                }
                self.write(reply).await
            }
            Ok(body) => self.deliver(body).await,
        };
        self.end_transaction();
        result
    }

    /// Reads the message up to `CRLF . CRLF` ([`DataFramer`]); a message
    /// over the size limit, with an overlong line or a NUL, or that does
    /// not fit in the data memory budget is read to its end and refused.
    async fn read_message(&mut self) -> Result<Result<Body, &'static str>, End> {
        let mut framer = DataFramer::new(self.config.bare_newline);
        // Most messages fit here in one allocation (it grew by doubling
        // from nothing: five reallocations for a short message); charged
        // to the budget like any growth.
        let mut body = Body { bytes: Vec::with_capacity(BODY_START), _budget: None };
        let mut reserved = 0usize;
        let mut refused: Option<&'static str> = None;
        let mut buf = Vec::with_capacity(2 * LINE_START);
        loop {
            let line = match self.line(MAX_DATA_LINE, self.config.data_timeout, &mut buf).await {
                Err(End::Timeout) => {
                    // As at a command: say why before closing (Postfix:
                    // "421 4.4.2 Error: timeout exceeded").
                    tracing::info!(peer = %self.peer, "timeout in DATA: nothing relayed");
                    self.close_with("421 4.4.2 Timeout exceeded, closing\r\n").await?;
                    return Err(End::Timeout);
                }
                Err(e) => return Err(e),
                Ok(Line::TooLong) => {
                    refused.get_or_insert("552 5.3.4 Message line too long\r\n");
                    continue;
                }
                Ok(Line::Text(l)) => l,
            };
            if !line.ends_with(b"\n") {
                // End of stream without the final dot: the client vanished
                // (Postfix: "lost connection after DATA").
                tracing::info!(peer = %self.peer, "lost connection in DATA: nothing relayed");
                return Err(End::Closed);
            }
            match framer.feed(line, &mut body.bytes, refused.is_some()) {
                Fed::End => break,
                Fed::BareNewline => {
                    self.bare_newline().await?;
                    return Err(End::BareNewline);
                }
                Fed::Data => {}
            }
            if refused.is_some() {
                continue;
            }
            let (len, cap) = (body.bytes.len(), body.bytes.capacity());
            if len > self.config.max_message_size {
                refused = Some("552 5.3.4 Message size exceeds fixed limit\r\n");
            } else if cap > reserved {
                // What the message really holds in memory (the vector grows
                // geometrically) is charged to the budget.
                let units = (cap - reserved).div_ceil(BUDGET_UNIT).min(u32::MAX as usize) as u32;
                match self.shared.data_budget.clone().try_acquire_many_owned(units) {
                    Ok(p) => {
                        reserved += units as usize * BUDGET_UNIT;
                        match body._budget.as_mut() {
                            Some(all) => all.merge(p),
                            None => body._budget = Some(p),
                        }
                    }
                    Err(_) => {
                        tracing::warn!(peer = %self.peer, "message data memory budget spent: 452");
                        refused = Some("452 4.3.1 Insufficient system storage, try again later\r\n");
                    }
                }
            }
            if refused.is_some() {
                body = Body { bytes: Vec::new(), _budget: None };
                reserved = 0;
            }
        }
        if framer.saw_nul() {
            refused.get_or_insert("554 5.6.0 Message contains NUL characters\r\n");
        }
        Ok(refused.map_or(Ok(body), Err))
    }

    async fn deliver(&mut self, body: Body) -> Result<(), End> {
        let v: Verdict = self.session().data_with(|| parse_headers(&body.bytes)).await;
        if let Some(r) = v.reply() {
            if let Some(hop) = self.relay.as_mut()
                && hop.rset().await.is_err()
            {
                self.relay = None;
            }
            let r = r.clone();
            return self.filter_reply(&r).await;
        }
        let mut prefix = Vec::with_capacity(256);
        // Our own trace line first (RFC 5321 4.4): whoever reads the
        // message downstream sees the real client, XCLIENT or not.
        if let Some(s) = self.session.as_ref() {
            received_line(&mut prefix, &self.resolved.hostname, self.tls, self.smtputf8, s.session(), s.transaction());
        }
        keep_headers(&mut self.headers, &v);
        for h in &self.headers {
            for part in [h.name.as_bytes(), b": ", h.value.as_bytes(), b"\r\n"] {
                prefix.extend_from_slice(part);
            }
        }
        let Some(hop) = self.relay.as_mut() else {
            return self.write(HOP_UNAVAILABLE).await;
        };
        match hop.data(&prefix, &body.bytes).await {
            Ok(r) => {
                let reply: HopReply = r;
                self.junk = 0;
                self.write(&reply.render()).await
            }
            Err(e) => {
                // We cannot know whether the next hop took it; a tempfail
                // makes the client retry (a duplicate at worst, never a loss).
                tracing::warn!("{e}");
                self.relay = None;
                self.write("451 4.4.1 Next hop did not answer, try again later\r\n").await
            }
        }
    }
}

/// Appends our `Received:` line (RFC 5321 4.4) for the transaction to
/// `out`: `Received: from HELO (NAME [IP]) by HOST (greyhook) with ESMTP
/// id ID for <RCPT>; DATE`, folded, CRLF-ended. `hostname` is ours, `tls`
/// whether the client used STARTTLS (`ESMTPS`), `utf8` whether the
/// transaction asked for SMTPUTF8 (RFC 6531's `UTF8SMTP`, `UTF8SMTPS`).
/// Written in place: every message pays for it.
fn received_line(
    out: &mut Vec<u8>,
    hostname: &str,
    tls: bool,
    utf8: bool,
    session: &crate::domain::types::Session,
    transaction: &crate::domain::types::Transaction,
) {
    // Comment and domain-literal specials out, at most 255 bytes.
    let clean = |b: &u8| b.is_ascii_graphic() && !matches!(b, b'(' | b')' | b'[' | b']' | b';' | b'\\');
    out.extend_from_slice(b"Received: from ");
    push_filtered(out, session.helo.as_deref(), clean, 255, "unknown");
    out.extend_from_slice(b" (");
    push_filtered(out, session.client_name.as_deref(), clean, 255, "unknown");
    out.extend_from_slice(if session.client_address.is_ipv6() { b" [IPv6:" } else { b" [" });
    crate::domain::push_ip(out, session.client_address);
    out.extend_from_slice(b"])\r\n\tby ");
    out.extend_from_slice(hostname.as_bytes());
    out.extend_from_slice(b" (greyhook) with ");
    out.extend_from_slice(match (utf8, tls) {
        (false, false) => b"ESMTP id ",
        (false, true) => b"ESMTPS id ",
        (true, false) => b"UTF8SMTP id ",
        (true, true) => b"UTF8SMTPS id ",
    });
    push_filtered(out, Some(&session.id), clean, 255, "");
    if let [one] = transaction.recipients.as_slice() {
        out.extend_from_slice(b"\r\n\tfor <");
        if one.address.contains(char::is_control) {
            let mut utf8 = [0; 4];
            for c in one.address.chars().filter(|c| !c.is_control()) {
                out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
            }
        } else {
            out.extend_from_slice(one.address.as_bytes());
        }
        out.push(b'>');
    }
    out.extend_from_slice(b";\r\n\t");
    if time::OffsetDateTime::now_utc().format_into(out, &time::format_description::well_known::Rfc2822).is_err() {
        out.extend_from_slice(b"Thu, 01 Jan 1970 00:00:00 +0000");
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends the bytes of `value` that `keep` allows, at most `max` of them,
/// or `empty` when none is left.
fn push_filtered(out: &mut Vec<u8>, value: Option<&str>, keep: impl Fn(&u8) -> bool, max: usize, empty: &str) {
    let start = out.len();
    let value = value.unwrap_or("").as_bytes();
    if value.len() <= max && value.iter().all(&keep) {
        // The usual case, in one copy rather than a byte at a time.
        out.extend_from_slice(value);
    } else {
        out.extend(value.iter().filter(|b| keep(b)).take(max));
    }
    if out.len() == start {
        out.extend_from_slice(empty.as_bytes());
    }
}

/// The XCLIENT attributes for a session (values raw; xtext-encoded when sent).
fn xclient_attrs(s: &crate::domain::types::Session) -> Vec<(&'static str, String)> {
    let addr = match s.client_address {
        IpAddr::V6(a) => format!("IPV6:{a}"),
        a => a.to_string(),
    };
    let name = s.client_name.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| "[UNAVAILABLE]".into());
    let helo = s.helo.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| "[UNAVAILABLE]".into());
    vec![("ADDR", addr), ("NAME", name), ("HELO", helo), ("PROTO", "ESMTP".into())]
}

/// The XFORWARD line for a session: client address, name, HELO.
fn xforward(s: &crate::domain::types::Session) -> String {
    // XFORWARD values are xtext-like: no spaces or controls.
    let clean = |b: &u8| b.is_ascii_graphic() && *b != b'+' && *b != b'=';
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(b"XFORWARD ADDR=");
    crate::domain::push_ip(&mut out, s.client_address);
    out.extend_from_slice(b" NAME=");
    push_filtered(&mut out, s.client_name.as_deref(), clean, usize::MAX, "[UNAVAILABLE]");
    out.extend_from_slice(b" HELO=");
    push_filtered(&mut out, s.helo.as_deref(), clean, usize::MAX, "[UNAVAILABLE]");
    out.extend_from_slice(b" PROTO=ESMTP");
    // Only ASCII was written.
    String::from_utf8(out).unwrap_or_default()
}

/// The header section of a message (up to the first empty line), unfolded,
/// as a filter is handed it, and its Message-ID
/// ([`crate::session::read_header_section`]).
pub fn parse_headers(message: &[u8]) -> Message {
    crate::session::read_header_section(
        message.split(|b| *b == b'\n').map(|l| crate::domain::text::from_bytes(l.strip_suffix(b"\r").unwrap_or(l))),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs_are_matched_in_any_case_and_long_ones_match_nothing() {
        let mut out = [0u8; VERB_MAX];
        assert_eq!(uppercase_verb("ehlo", &mut out), b"EHLO");
        assert_eq!(uppercase_verb("StartTls", &mut out), b"STARTTLS");
        assert_eq!(uppercase_verb("", &mut out), b"");
        assert_eq!(uppercase_verb("STARTTLSX", &mut out), b"");
        // Not ASCII: left as it is, so it matches no command.
        assert_eq!(uppercase_verb("ehlö", &mut out), "EHLö".as_bytes());
    }

    #[test]
    fn the_received_line_keeps_specials_and_controls_out() {
        use crate::domain::types::{AcceptedRecipient, Session, Transaction};
        let mut s = Session::new("AB(12);", "192.0.2.1".parse().unwrap());
        s.helo = Some("[evil] (helo)\\x".into());
        s.client_name = Some("".into());
        let one = AcceptedRecipient { address: "b\u{7}ü@dest.test".into(), policy_group: String::new() };
        let t = Transaction { sender: Some("a@x".into()), recipients: vec![one.clone()] };
        let mut out = b"X".to_vec();
        received_line(&mut out, "mx.example", false, false, &s, &t);
        let text = String::from_utf8(out).unwrap();
        let (head, date) = text.rsplit_once("\t").unwrap();
        assert_eq!(
            head,
            "XReceived: from evilhelox (unknown [192.0.2.1])\r\n\tby mx.example (greyhook) with ESMTP id AB12\r\n\tfor <bü@dest.test>;\r\n"
        );
        assert!(date.ends_with(" +0000\r\n") && date.len() == 33, "{date:?}");
        // IPv6, TLS, two recipients (no `for`), and a long HELO cut at 255.
        s.client_address = "2001:db8::1".parse().unwrap();
        s.helo = Some("h".repeat(300));
        s.client_name = Some("c.example".into());
        let t = Transaction { sender: None, recipients: vec![one.clone(), one] };
        let mut out = Vec::new();
        received_line(&mut out, "mx", true, false, &s, &t);
        let text = String::from_utf8(out).unwrap();
        let want =
            format!("Received: from {} (c.example [IPv6:2001:db8::1])\r\n\tby mx (greyhook) with ESMTPS id AB12;\r\n\t", "h".repeat(255));
        assert!(text.starts_with(&want), "{text}");
    }

    #[test]
    fn the_xforward_line_has_no_spaces_or_xtext_specials_in_values() {
        let mut s = crate::domain::types::Session::new("id", "2001:db8::2".parse().unwrap());
        assert_eq!(xforward(&s), "XFORWARD ADDR=2001:db8::2 NAME=[UNAVAILABLE] HELO=[UNAVAILABLE] PROTO=ESMTP");
        s.client_name = Some("a b+c=d".into());
        s.helo = Some("é\r\n".into());
        assert_eq!(xforward(&s), "XFORWARD ADDR=2001:db8::2 NAME=abcd HELO=[UNAVAILABLE] PROTO=ESMTP");
    }

    #[test]
    fn headers_are_unfolded_and_end_at_the_empty_line() {
        let m = parse_headers(b"Subject: a\r\n b\r\nMessage-ID: <x@y>\r\n\r\nNot: a header\r\n");
        assert_eq!(m.headers.len(), 2);
        assert_eq!(m.headers[0].value, "a b");
        assert_eq!(m.message_id.as_deref(), Some("<x@y>"));
    }

    #[test]
    fn message_ids_that_are_not_utf8_stay_apart() {
        // Read with U+FFFD for each bad byte, both were one Message-ID, so
        // one DATA-stage triplet.
        let a = parse_headers(b"Message-ID: <\xe9t\xe9@x>\r\n\r\n").message_id;
        let b = parse_headers(b"Message-ID: <\xe8t\xe8@x>\r\n\r\n").message_id;
        assert_eq!(a.as_deref(), Some("<\u{EFE9}t\u{EFE9}@x>"));
        assert_ne!(a, b);
    }
}
