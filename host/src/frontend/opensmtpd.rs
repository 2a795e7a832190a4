//! The OpenSMTPD front end (`greyhook opensmtpd`): smtpd runs greyhook as a
//! filter process and talks its line protocol (`smtpd-filters(7)`) on
//! stdin and stdout:
//!
//! ```text
//! filter "greyhook" proc-exec "/usr/bin/greyhook opensmtpd --config /etc/greyhook.toml"
//! listen on 0.0.0.0 port 25 filter "greyhook"
//! ```
//!
//! After smtpd's `config|…` lines, greyhook registers for the filter phases
//! `connect`, `helo`, `ehlo`, `mail-from`, `rcpt-to`, `data`, `data-line`
//! and `commit`, and for the reports that keep a session's facts
//! (`link-connect`, `link-tls`, `link-auth`, `tx-reset`,
//! `link-disconnect`). Every request drives the session's
//! [`SmtpSession`]:
//!
//! - connect: a refusal is `disconnect|421 … retry=…` (the draft's 421 at
//!   the greeting, then the connection closes);
//! - HELO/EHLO, MAIL, RCPT: `reject|451 4.7.1 … retry=…`;
//! - DATA: the header section is held (at most `max_header_bytes`), the
//!   data hook runs on it with the Message-ID, the filters' headers
//!   (`X-Greylist`) go out first, then the message unchanged (a longer
//!   section is passed on as it comes until its Message-ID is read, and the
//!   filters' headers go after that); a refusal is
//!   answered at `commit`, after the final dot — the draft's `451` at end
//!   of DATA. smtpd streams the message without waiting: the lines that
//!   come while the hook runs are held (as much again as `max_header_bytes`)
//!   and then, if the hook is slow, passed on without the filters' headers,
//!   so the pipe every session shares is never left unread for it.
//!
//! smtpd's replies through a filter are one line, so a reply's lines are
//! joined (the hint stays last); the EHLO keyword `GREYLIST` cannot be
//! advertised through this protocol.
//!
//! smtpd sends every session over the one pipe and lets each wait for its
//! answer: greyhook answers each session in order, sessions side by side (a
//! slow store delays only the session that waits on it).

use std::collections::HashMap;
use std::net::IpAddr;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::domain::reply::{check_header, render_single_line};
use crate::domain::types::{Header, Verdict};
use crate::frontend::{FrontEnd, FrontEndError, invalid};
use crate::session::{HeaderReader, Hooks, SmtpSession, keep_headers};

/// The `[opensmtpd]` table: the OpenSMTPD filter front end. It runs only
/// as `greyhook opensmtpd`, started by smtpd.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenSmtpdConfig {
    /// Most sessions tracked at once; a new one past it is refused at
    /// connect (`421 4.3.2`).
    pub max_sessions: usize,
    /// Longest line from smtpd, bytes (its own SMTP line limit is 64 KiB).
    pub max_line: usize,
    /// Header section held per message to find the Message-ID before the
    /// data hook runs; past it, the lines are passed on as they come until
    /// the Message-ID is read, and the filters' headers go after it. As much
    /// again of the message's lines is held while the hook runs; past that,
    /// and 50 ms, they go on without the filters' headers.
    pub max_header_bytes: usize,
    /// Set by `greyhook opensmtpd`: this front end serves stdin/stdout.
    #[serde(skip)]
    pub run: bool,
}

impl Default for OpenSmtpdConfig {
    fn default() -> Self {
        OpenSmtpdConfig { max_sessions: 4096, max_line: 128 << 10, max_header_bytes: 64 << 10, run: false }
    }
}

/// The OpenSMTPD front end, on stdin and stdout.
pub struct OpenSmtpd {
    config: OpenSmtpdConfig,
}

impl FrontEnd for OpenSmtpd {
    const NAME: &'static str = "opensmtpd";
    const COMMAND: Option<&'static str> = Some(
        "Run as an OpenSMTPD filter (smtpd-filters(7)) on stdin/stdout, started by smtpd: \
         `filter \"greyhook\" proc-exec \"greyhook opensmtpd --config FILE\"`. Give it a store and a \
         control socket the filter's user can write (--db, --control).",
    );
    type Config = OpenSmtpdConfig;

    fn enabled(config: &OpenSmtpdConfig) -> bool {
        config.run
    }

    fn enable(config: &mut OpenSmtpdConfig) {
        config.run = true;
    }

    fn disable(config: &mut OpenSmtpdConfig) {
        config.run = false;
    }

    async fn start(config: &OpenSmtpdConfig) -> Result<OpenSmtpd, FrontEndError> {
        if config.max_sessions == 0 || config.max_line < 1024 || config.max_header_bytes < 1024 {
            return Err(invalid::<OpenSmtpd>("max_sessions must be at least 1, max_line and max_header_bytes at least 1024"));
        }
        Ok(OpenSmtpd { config: config.clone() })
    }

    fn open_files(_: &OpenSmtpdConfig) -> u64 {
        // Its pipe is smtpd's stdin and stdout, already open.
        0
    }

    async fn serve(self, hooks: Hooks, shutdown: CancellationToken) {
        if let Err(e) = serve_io(tokio::io::stdin(), tokio::io::stdout(), hooks, self.config, shutdown).await {
            tracing::error!("opensmtpd: {e}");
        }
    }
}

/// Why the conversation with smtpd ended.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// Reading or writing the pipe failed.
    #[error("the pipe to smtpd failed: {0}")]
    Io(#[from] std::io::Error),
    /// smtpd sent a line longer than `max_line`.
    #[error("smtpd sent a line longer than {0} bytes (opensmtpd.max_line)")]
    LineTooLong(usize),
    /// A filter protocol version this front end does not speak.
    #[error("filter protocol version {0} is not supported (0.5 or later is)")]
    Version(String),
}

/// One request or report for a session, in the order smtpd sent them.
#[derive(Debug)]
enum Event {
    /// `report|…|link-connect|SESSION|rdns|fcrdns|src|dest`.
    LinkConnect { rdns: String, fcrdns: bool, client: Option<IpAddr> },
    /// `report|…|link-tls`.
    Tls,
    /// `report|…|link-auth|SESSION|…` with the result `pass`: the user.
    Auth(String),
    /// `report|…|tx-reset`.
    TxReset,
    /// A filter request: its phase, token and parameters.
    Filter { phase: String, token: String, params: String },
    /// A `data-line` request: its token and the line of message data,
    /// byte for byte (8-bit data need not be UTF-8, and goes back as it
    /// came).
    DataLine { token: String, line: Vec<u8> },
}

/// Serves smtpd's filter protocol on `input`/`output` until the input
/// ends or `shutdown` is cancelled. `greyhook opensmtpd` runs it on stdin
/// and stdout; tests on a pipe.
pub async fn serve_io<R, W>(
    input: R,
    output: W,
    hooks: Hooks,
    config: OpenSmtpdConfig,
    shutdown: CancellationToken,
) -> Result<(), ProtocolError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut input = BufReader::new(input);
    let (out_tx, out_rx) = mpsc::channel::<Vec<u8>>(1024);
    let writer = tokio::spawn(write_lines(output, out_rx));
    let mut line = Vec::new();
    // The handshake: configuration lines until `config|ready`.
    loop {
        let Some(l) = read_line(&mut input, &mut line, config.max_line, &shutdown).await? else {
            return Ok(());
        };
        if l == b"config|ready" {
            break;
        }
        if let Some(v) = l.strip_prefix(b"config|smtpd-version|") {
            tracing::info!("opensmtpd: smtpd {}", String::from_utf8_lossy(v));
        }
    }
    let mut hello = String::new();
    for phase in ["connect", "helo", "ehlo", "mail-from", "rcpt-to", "data", "data-line", "commit"] {
        hello.push_str(&format!("register|filter|smtp-in|{phase}\n"));
    }
    for event in ["link-connect", "link-tls", "link-auth", "tx-reset", "link-disconnect"] {
        hello.push_str(&format!("register|report|smtp-in|{event}\n"));
    }
    hello.push_str("register|ready");
    let _ = out_tx.send(hello.into_bytes()).await;

    let mut sessions: HashMap<String, mpsc::Sender<Event>> = HashMap::new();
    loop {
        let Some(l) = read_line(&mut input, &mut line, config.max_line, &shutdown).await? else {
            break;
        };
        // stream|version|timestamp|subsystem|phase|session|token-or-params…
        // The fields before the parameters are smtpd's own (ASCII); the
        // parameters are read as bytes, since a data line's need not be
        // UTF-8 and must go back as they came.
        let mut f = l.splitn(7, |b| *b == b'|');
        let head: [Option<&str>; 6] = std::array::from_fn(|_| f.next().and_then(|x| std::str::from_utf8(x).ok()));
        let [Some(stream), Some(version), Some(_ts), Some(subsystem), Some(phase), Some(session)] = head else {
            tracing::warn!("opensmtpd: a line that is neither a report nor a filter request: {:?}", String::from_utf8_lossy(l));
            continue;
        };
        let rest = f.next().unwrap_or(b"");
        // A report's parameters as text (only reports read them so).
        let text = || crate::domain::text::from_bytes(rest);
        if !version_ok(version) {
            return Err(ProtocolError::Version(version.to_string()));
        }
        if subsystem != "smtp-in" {
            continue;
        }
        let event = match (stream, phase) {
            ("report", "link-disconnect") => {
                sessions.remove(session);
                continue;
            }
            ("report", "link-connect") => {
                // `rdns|fcrdns|src|dest`, read from the right: every field
                // but the name is smtpd's own.
                let rest = text();
                let mut p = rest.rsplitn(4, '|');
                let (_dest, src, fcrdns, rdns) = (p.next(), p.next(), p.next(), p.next());
                Event::LinkConnect {
                    rdns: rdns.unwrap_or("").to_string(),
                    fcrdns: fcrdns == Some("pass"),
                    client: src.and_then(parse_address),
                }
            }
            ("report", "link-tls") => Event::Tls,
            ("report", "link-auth") => match authenticated(version, &text()) {
                Some(user) => Event::Auth(user.to_string()),
                None => continue,
            },
            ("report", "tx-reset") => Event::TxReset,
            ("report", _) => continue,
            ("filter", _) => {
                // `token|params`; a data line's params are the line, kept
                // as bytes.
                let (token, params) = match rest.iter().position(|b| *b == b'|') {
                    Some(i) => (&rest[..i], &rest[i + 1..]),
                    None => (rest, &b""[..]),
                };
                let token = String::from_utf8_lossy(token).into_owned();
                if phase == "data-line" {
                    Event::DataLine { token, line: params.to_vec() }
                } else {
                    Event::Filter { phase: phase.to_string(), token, params: crate::domain::text::from_bytes(params).into_owned() }
                }
            }
            _ => continue,
        };
        if !sessions.contains_key(session) {
            // Only a connection (its report or its filter request) opens a
            // session: a stray report for an unknown one holds nothing.
            if !matches!(event, Event::LinkConnect { .. } | Event::Filter { .. } | Event::DataLine { .. }) {
                continue;
            }
            // smtpd reports every disconnect, which frees a session.
            if sessions.len() >= config.max_sessions {
                tracing::warn!(session, limit = config.max_sessions, "opensmtpd: too many sessions: refusing this one");
                if let Some(answer) = overloaded(session, &event) {
                    let _ = out_tx.send(answer).await;
                }
                continue;
            }
            let (tx, rx) = mpsc::channel(256);
            tokio::spawn(run_session(session.to_string(), rx, out_tx.clone(), hooks.clone(), config.clone()));
            sessions.insert(session.to_string(), tx);
        }
        if let Some(tx) = sessions.get(session) {
            // A session task ends only when its sender is dropped.
            let _ = tx.send(event).await;
        }
    }
    drop(sessions);
    drop(out_tx);
    let _ = writer.await;
    Ok(())
}

/// The answer for a request of a session refused because too many are
/// tracked (smtpd waits for one to every request); `None` for a report.
fn overloaded(session: &str, event: &Event) -> Option<Vec<u8>> {
    let answer = match event {
        Event::DataLine { token, line } => return Some(dataline_answer(session, token, line)),
        Event::Filter { phase, token, .. } if phase == "connect" => {
            format!("filter-result|{session}|{token}|disconnect|421 4.3.2 Too many sessions, try again later")
        }
        Event::Filter { token, .. } => format!("filter-result|{session}|{token}|reject|451 4.3.2 Too many sessions, try again later"),
        _ => return None,
    };
    Some(answer.into_bytes())
}

/// A line of message data given back to smtpd, byte for byte.
fn dataline_answer(session: &str, token: &str, line: &[u8]) -> Vec<u8> {
    let mut out = format!("filter-dataline|{session}|{token}|").into_bytes();
    out.extend_from_slice(line);
    out
}

/// `0.5`, `0.6`, `0.7`…: the versions with the session before the token.
fn version_ok(v: &str) -> bool {
    version(v).is_some_and(|mm| mm >= (0, 5))
}

/// A protocol version's major and minor numbers.
fn version(v: &str) -> Option<(u32, u32)> {
    let mut p = v.split('.');
    Some((p.next()?.parse().ok()?, p.next()?.parse().ok()?))
}

/// The user a `link-auth` report authenticated, if its result is `pass`.
///
/// The user name is the client's own (smtpd escapes only whitespace and
/// control characters), so it may be `pass`, or hold `|`: the result is
/// told by its place alone, never by its value. Protocol 0.5 and 0.6 write
/// `user|result` (the result is last), 0.7 and later `result|user`.
fn authenticated<'a>(version_: &str, params: &'a str) -> Option<&'a str> {
    let (user, result) = if version(version_).is_some_and(|mm| mm >= (0, 7)) {
        let (result, user) = params.split_once('|')?;
        (user, result)
    } else {
        params.rsplit_once('|')?
    };
    (result == "pass" && !user.is_empty()).then_some(user)
}

/// A client address as smtpd writes it: `192.0.2.1`, `192.0.2.1:25`,
/// `[IPv6:2001:db8::1]:25`, `IPv6:2001:db8::1`, and a link-local one with
/// its scope (`[fe80::1%eth0]:25`, from `getnameinfo`; the scope is left
/// aside); `None` for a unix socket (a local submission, not greylisted).
fn parse_address(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    if let Ok(sa) = s.parse::<std::net::SocketAddr>() {
        return Some(sa.ip());
    }
    let unbracketed = match s.strip_prefix('[') {
        Some(r) => r.split(']').next()?,
        None => s,
    };
    let ip = crate::domain::parse_client_address(unbracketed);
    if ip.is_none() && !s.eq_ignore_ascii_case("local") && !s.starts_with("unix:") {
        tracing::warn!("opensmtpd: a client address greyhook cannot read: {s:?}; the session is taken for a local one");
    }
    ip
}

/// Reads one line (without its newline) of at most `max` bytes into `buf`
/// (reused line after line), as bytes; `None` at the end of the input or at
/// shutdown.
async fn read_line<'a, R: AsyncRead + Unpin>(
    r: &mut BufReader<R>,
    buf: &'a mut Vec<u8>,
    max: usize,
    shutdown: &CancellationToken,
) -> Result<Option<&'a [u8]>, ProtocolError> {
    buf.clear();
    let read = async {
        loop {
            let available = r.fill_buf().await?;
            if available.is_empty() {
                return Ok::<bool, ProtocolError>(!buf.is_empty());
            }
            let (take, done) = match available.iter().position(|b| *b == b'\n') {
                Some(i) => (i + 1, true),
                None => (available.len(), false),
            };
            if buf.len() + take > max + 1 {
                return Err(ProtocolError::LineTooLong(max));
            }
            buf.extend_from_slice(&available[..take]);
            r.consume(take);
            if done {
                return Ok(true);
            }
        }
    };
    let got = tokio::select! {
        r = read => r?,
        _ = shutdown.cancelled() => return Ok(None),
    };
    if !got {
        return Ok(None);
    }
    while matches!(buf.last(), Some(b'\n' | b'\r')) {
        buf.pop();
    }
    Ok(Some(buf.as_slice()))
}

/// Writes the answers, as they come, to smtpd.
async fn write_lines<W: AsyncWrite + Unpin>(mut w: W, mut rx: mpsc::Receiver<Vec<u8>>) {
    let mut out = Vec::with_capacity(4096);
    while let Some(first) = rx.recv().await {
        out.clear();
        out.extend_from_slice(&first);
        out.push(b'\n');
        // Whatever else is ready goes in the same write.
        while let Ok(more) = rx.try_recv() {
            out.extend_from_slice(&more);
            out.push(b'\n');
        }
        if let Err(e) = async {
            w.write_all(&out).await?;
            w.flush().await
        }
        .await
        {
            tracing::error!("opensmtpd: cannot write to smtpd: {e}");
            return;
        }
    }
}

/// Where a message's data stands.
enum Data {
    /// Not in DATA.
    Idle,
    /// In the header section: its lines held (dot-escaped, as smtpd sent
    /// them), at most `max_header_bytes`, and read for the filters.
    /// `streaming` once past `max_header_bytes` with no Message-ID read:
    /// the lines are passed on as they come, and the reader looks on for
    /// the Message-ID.
    Headers { lines: Vec<Vec<u8>>, bytes: usize, reader: HeaderReader, streaming: bool },
    /// Headers sent on: the rest of the message is echoed.
    Body,
}

/// One smtpd session: its facts, transaction and message data.
struct Conversation {
    id: String,
    hooks: Hooks,
    config: OpenSmtpdConfig,
    out: mpsc::Sender<Vec<u8>>,
    session: Option<SmtpSession>,
    rdns: Option<String>,
    /// Whether smtpd forward-confirmed `rdns`.
    fcrdns: bool,
    tls: bool,
    auth: Option<String>,
    /// Headers the filters asked for at MAIL and RCPT.
    headers: Vec<Header>,
    data: Data,
    /// The data hook's verdict, answered at `commit`.
    data_verdict: Option<Verdict>,
    /// What smtpd sends this session.
    rx: mpsc::Receiver<Event>,
    /// Events received while the data hook ran, handled before `rx`'s.
    backlog: std::collections::VecDeque<Event>,
}

async fn run_session(id: String, rx: mpsc::Receiver<Event>, out: mpsc::Sender<Vec<u8>>, hooks: Hooks, config: OpenSmtpdConfig) {
    let mut c = Conversation {
        id,
        hooks,
        config,
        out,
        session: None,
        rdns: None,
        fcrdns: false,
        tls: false,
        auth: None,
        headers: Vec::new(),
        data: Data::Idle,
        data_verdict: None,
        rx,
        backlog: std::collections::VecDeque::new(),
    };
    loop {
        let event = match c.backlog.pop_front() {
            Some(e) => e,
            None => match c.rx.recv().await {
                Some(e) => e,
                None => return,
            },
        };
        c.event(event).await;
    }
}

impl Conversation {
    async fn send(&self, line: Vec<u8>) {
        let _ = self.out.send(line).await;
    }

    async fn result(&self, token: &str, answer: &str) {
        self.send(format!("filter-result|{}|{token}|{answer}", self.id).into_bytes()).await;
    }

    async fn dataline(&self, token: &str, line: &[u8]) {
        self.send(dataline_answer(&self.id, token, line)).await;
    }

    /// The session, created from what is known when the client is. The
    /// client's names come from greyhook's resolver when it has one (the
    /// one the filters' lookups use, so both agree), else from smtpd's
    /// `rdns` and `fcrdns`.
    async fn begin(&mut self, client: Option<IpAddr>) {
        if self.session.is_none()
            && let Some(ip) = client
        {
            let mut s = SmtpSession::new(self.hooks.clone(), self.id.clone(), ip);
            if self.hooks.resolver.is_some() {
                s.resolve_client().await;
            } else {
                let rdns = self.rdns.clone().filter(|n| !n.is_empty() && !n.starts_with('['));
                s.session_mut().client_name = rdns.clone().filter(|_| self.fcrdns);
                s.session_mut().reverse_client_name = rdns;
            }
            let f = s.session_mut();
            f.tls = self.tls;
            f.auth_user = self.auth.clone();
            self.session = Some(s);
        }
    }

    async fn event(&mut self, e: Event) {
        match e {
            Event::LinkConnect { rdns, fcrdns, client } => {
                self.rdns = Some(rdns);
                self.fcrdns = fcrdns;
                self.begin(client).await;
            }
            Event::Tls => {
                self.tls = true;
                if let Some(s) = self.session.as_mut() {
                    s.session_mut().tls = true;
                }
            }
            Event::Auth(user) => {
                self.auth = Some(user.clone());
                if let Some(s) = self.session.as_mut() {
                    s.session_mut().auth_user = Some(user);
                }
            }
            Event::TxReset => self.end_transaction(),
            Event::Filter { phase, token, params } => self.filter(&phase, &token, &params).await,
            Event::DataLine { token, line } => self.data_line(&token, &line).await,
        }
    }

    fn end_transaction(&mut self) {
        self.headers.clear();
        self.data = Data::Idle;
        self.data_verdict = None;
        if let Some(s) = self.session.as_mut() {
            s.reset();
        }
    }

    async fn filter(&mut self, phase: &str, token: &str, params: &str) {
        if phase == "connect" {
            // `rdns|src`: the address is the last field, smtpd's own.
            let (rdns, src) = params.rsplit_once('|').unwrap_or(("", params));
            if self.rdns.is_none() {
                self.rdns = Some(rdns.to_string());
            }
            self.begin(parse_address(src)).await;
        }
        let Some(s) = self.session.as_mut() else {
            // A unix-socket (local) session: nothing to greylist on.
            tracing::debug!(session = %self.id, phase, "opensmtpd: no client address (local submission): proceed");
            return self.result(token, "proceed").await;
        };
        let verdict = match phase {
            "connect" => {
                let v = s.connect().await;
                if let Some(r) = v.reply() {
                    return self.result(token, &format!("disconnect|{}", render_single_line(r))).await;
                }
                v
            }
            "helo" | "ehlo" => s.ehlo(params).await.verdict,
            "mail-from" => {
                self.headers.clear();
                self.data = Data::Idle;
                self.data_verdict = None;
                let v = s.mail(params).await;
                keep_headers(&mut self.headers, &v);
                v
            }
            "rcpt-to" => {
                let v = s.rcpt(params).await;
                if v.reply().is_none() {
                    keep_headers(&mut self.headers, &v);
                }
                v
            }
            "data" => {
                self.data = Data::Headers { lines: Vec::new(), bytes: 0, reader: HeaderReader::default(), streaming: false };
                self.data_verdict = None;
                return self.result(token, "proceed").await;
            }
            "commit" => {
                let v = self.data_verdict.take();
                self.end_transaction();
                match v.as_ref().and_then(Verdict::reply) {
                    Some(r) => return self.result(token, &format!("reject|{}", render_single_line(r))).await,
                    None => return self.result(token, "proceed").await,
                }
            }
            other => {
                tracing::debug!(session = %self.id, phase = other, "opensmtpd: a phase greyhook did not register for: proceed");
                return self.result(token, "proceed").await;
            }
        };
        match verdict.reply() {
            Some(r) => self.result(token, &format!("reject|{}", render_single_line(r))).await,
            None => self.result(token, "proceed").await,
        }
    }

    /// One line of message data: held while in the header section, then
    /// echoed. The end of the headers (or of the data, or of the budget)
    /// runs the data hook. Held lines go back with a later line's token:
    /// smtpd's token names this filter's place in the session's chain
    /// (`filter_data_next` in `lka_filter.c` looks the filter up by it), the
    /// same for every data line, not the line.
    async fn data_line(&mut self, token: &str, line: &[u8]) {
        let Data::Headers { lines, bytes, reader, streaming } = &mut self.data else {
            if line == b"." {
                self.data = Data::Idle;
            }
            return self.dataline(token, line).await;
        };
        // The reader wants no more at the empty line, past 1 MiB, or once
        // the Message-ID is read and no more headers fit.
        // The filters read the header section as text; what goes back to
        // smtpd is the line as it came.
        let read_all = line == b"." || !reader.push(&crate::domain::text::from_bytes(unescape(line)));
        if !read_all {
            if *streaming {
                // Past `max_header_bytes` with no Message-ID yet: the lines
                // go on as they come until it is read; the filters' headers
                // then go before the line after it.
                if !reader.has_message_id() {
                    return self.dataline(token, line).await;
                }
            } else {
                *bytes += line.len() + 2;
                if *bytes <= self.config.max_header_bytes {
                    lines.push(line.to_vec());
                    return;
                }
                if !reader.has_message_id() {
                    // A bounce's trace lines can push its Message-ID past
                    // `max_header_bytes`, and without it the reference
                    // filter's DATA key falls back to the recipients.
                    tracing::debug!(session = %self.id, "opensmtpd: header section over max_header_bytes: passed on while the Message-ID is looked for");
                    *streaming = true;
                    let held = std::mem::take(lines);
                    for l in held.iter().map(Vec::as_slice).chain([line]) {
                        self.dataline(token, l).await;
                    }
                    return;
                }
            }
        }
        let message = std::mem::take(reader).finish();
        // The lines held, and this one: the filters' headers go before them.
        let mut held: Vec<(String, Vec<u8>)> = std::mem::take(lines).into_iter().map(|l| (token.to_string(), l)).collect();
        held.push((token.to_string(), line.to_vec()));
        // smtpd sends the rest of the message without waiting, and all
        // sessions share its pipe: waiting for the hook with those lines
        // unread would make the reader of the pipe, and so every other
        // session, wait for it too. They are held while the hook runs, at
        // most `max_header_bytes` of them; past that, once the hook has had
        // `HOOK_GRACE`, they are passed on without the filters' headers
        // (the verdict is still answered at `commit`).
        let mut hold = Held { lines: held, bytes: 0, budget: self.config.max_header_bytes, passed_on: false, ended: line == b"." };
        if let Some(s) = self.session.as_mut() {
            let hook = s.data(&message);
            tokio::pin!(hook);
            let grace = tokio::time::sleep(HOOK_GRACE);
            tokio::pin!(grace);
            let v = loop {
                let full = hold.full();
                tokio::select! {
                    biased;
                    v = &mut hook => break v,
                    _ = &mut grace, if full => {
                        tracing::debug!(session = %self.id, "opensmtpd: the data hook is slow: the message goes on without the filters' headers");
                        hold.pass_on(&self.out, &self.id).await;
                    }
                    e = self.rx.recv(), if !full && self.backlog.len() < MAX_BACKLOG => {
                        // Everything ready is taken before the hook runs
                        // again: each poll of a busy hook runs it a while.
                        let mut e = e;
                        loop {
                            let Some(event) = e else { return }; // smtpd reported the disconnect.
                            hold.take(event, &mut self.backlog, &self.out, &self.id).await;
                            if hold.full() || self.backlog.len() >= MAX_BACKLOG {
                                break;
                            }
                            e = match self.rx.try_recv() {
                                Ok(event) => Some(event),
                                Err(mpsc::error::TryRecvError::Empty) => break,
                                Err(mpsc::error::TryRecvError::Disconnected) => None,
                            };
                        }
                    }
                }
            };
            if v.reply().is_none() {
                keep_headers(&mut self.headers, &v);
            }
            self.data_verdict = Some(v);
        }
        let Held { lines: held, passed_on, ended, .. } = hold;
        if !passed_on {
            // The filters' headers first, then the message as it came.
            let added: Vec<String> = self.headers.iter().filter(|h| check_header(h)).map(|h| format!("{}: {}", h.name, h.value)).collect();
            for h in added {
                self.dataline(token, h.as_bytes()).await;
            }
            for (token, l) in held {
                self.dataline(&token, &l).await;
            }
        }
        self.data = if ended { Data::Idle } else { Data::Body };
    }
}

/// A message's lines held while its data hook runs.
struct Held {
    /// Token and line, as smtpd sent them.
    lines: Vec<(String, Vec<u8>)>,
    /// Bytes of the lines that came after the hook began.
    bytes: usize,
    budget: usize,
    /// The lines were passed on without the filters' headers.
    passed_on: bool,
    /// The final dot is among them (or was passed on).
    ended: bool,
}

impl Held {
    /// Over the budget with the lines still held: read no more until the
    /// hook answers or its grace is over.
    fn full(&self) -> bool {
        self.bytes > self.budget && !self.passed_on
    }

    /// One event that came while the hook runs: a line of the message is
    /// held (or passed on, once lines are); the rest waits for the verdict.
    async fn take(&mut self, event: Event, backlog: &mut std::collections::VecDeque<Event>, out: &mpsc::Sender<Vec<u8>>, id: &str) {
        match event {
            Event::DataLine { token, line } if backlog.is_empty() && !self.ended => {
                self.ended = line == b".";
                if self.passed_on {
                    let _ = out.send(dataline_answer(id, &token, &line)).await;
                } else {
                    self.bytes += line.len() + 2;
                    self.lines.push((token, line));
                }
            }
            // `commit`, and reports, wait for the verdict.
            other => backlog.push_back(other),
        }
    }

    /// Passes on the lines held, and from now on each as it comes.
    async fn pass_on(&mut self, out: &mpsc::Sender<Vec<u8>>, id: &str) {
        for (token, l) in self.lines.drain(..) {
            let _ = out.send(dataline_answer(id, &token, &l)).await;
        }
        self.passed_on = true;
    }
}

/// How long a data hook may run, once its message's lines held are over
/// `max_header_bytes`, before they are passed on without the filters'
/// headers (the pipe waits meanwhile).
const HOOK_GRACE: std::time::Duration = std::time::Duration::from_millis(50);

/// Events a session keeps while its data hook runs (`commit`, reports):
/// smtpd sends a session none but its message's lines until it has them
/// all back, so more means a broken peer, and the pipe waits.
const MAX_BACKLOG: usize = 64;

/// A data line as the message has it: a dot-escaped line unescaped.
fn unescape(raw: &[u8]) -> &[u8] {
    raw.strip_prefix(b".").filter(|_| raw.starts_with(b"..")).unwrap_or(raw)
}

/// How long a test waits for an answer.
#[cfg(test)]
const ANSWER: std::time::Duration = std::time::Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_in_every_form_smtpd_writes() {
        assert_eq!(parse_address("127.0.0.1"), Some([127, 0, 0, 1].into()));
        assert_eq!(parse_address("192.0.2.7:2525"), Some([192, 0, 2, 7].into()));
        assert_eq!(parse_address("[IPv6:2001:db8::1]:25"), "2001:db8::1".parse().ok());
        assert_eq!(parse_address("IPv6:2001:db8::1"), "2001:db8::1".parse().ok());
        assert_eq!(parse_address("[fe80::1%eth0]:25"), "fe80::1".parse().ok());
        assert_eq!(parse_address("fe80::1%2"), "fe80::1".parse().ok());
        assert_eq!(parse_address("[IPv6:fe80::1%em0]:25"), "fe80::1".parse().ok());
        assert_eq!(parse_address("unix:/var/run/smtpd.sock"), None);
        assert_eq!(parse_address("localhost"), None);
    }

    #[test]
    fn versions() {
        assert!(version_ok("0.5") && version_ok("0.6") && version_ok("0.7") && version_ok("1.0"));
        assert!(!version_ok("0.4") && !version_ok("x") && !version_ok(""));
    }

    #[test]
    fn only_a_passed_auth_names_a_user() {
        // 0.5 and 0.6: user|result.
        assert_eq!(authenticated("0.6", "alice|pass"), Some("alice"));
        assert_eq!(authenticated("0.6", "a|b|pass"), Some("a|b"));
        assert_eq!(authenticated("0.6", "pass|fail"), None);
        assert_eq!(authenticated("0.5", "pass|error"), None);
        assert_eq!(authenticated("0.6", "x|pass|fail"), None);
        // 0.7 and later: result|user.
        assert_eq!(authenticated("0.7", "pass|alice"), Some("alice"));
        assert_eq!(authenticated("0.7", "pass|a|b"), Some("a|b"));
        assert_eq!(authenticated("0.7", "fail|pass"), None);
        assert_eq!(authenticated("1.0", "fail|pass|pass"), None);
        // Nothing to name, or no result at all.
        assert_eq!(authenticated("0.6", "|pass"), None);
        assert_eq!(authenticated("0.7", "pass"), None);
    }

    #[test]
    fn headers_are_unfolded_and_unescaped() {
        let lines: [&[u8]; 4] = [b"Subject: a", b"\tb", b"Message-ID: <x@y>", b"..X: dot"];
        let m = crate::session::read_header_section(lines.map(|l| String::from_utf8_lossy(unescape(l))));
        assert_eq!(m.headers[0].value, "a b");
        assert_eq!(m.message_id.as_deref(), Some("<x@y>"));
        assert_eq!(m.headers[2].name, ".X");
    }

    /// A line longer than the limit ends the conversation with an error,
    /// without holding it.
    #[tokio::test]
    async fn overlong_lines_end_the_conversation() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let (r, w) = tokio::io::split(server);
        let long = format!("config|x|{}\n", "a".repeat(4096));
        client.write_all(long.as_bytes()).await.unwrap();
        let mut line = Vec::new();
        let mut reader = BufReader::new(r);
        let got = tokio::time::timeout(ANSWER, read_line(&mut reader, &mut line, 1024, &CancellationToken::new())).await.unwrap();
        assert!(matches!(got, Err(ProtocolError::LineTooLong(1024))), "{got:?}");
        drop(w);
    }
}
