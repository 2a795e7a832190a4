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
//! Accepted mail is relayed to the next hop ([`crate::relay`]) command by
//! command; the client's `250` after DATA is the next hop's `250`, so
//! nothing is lost and nothing is accepted twice. A next-hop tempfail comes
//! back as a tempfail.
//!
//! The server side is written by hand (command parsing is a few lines of
//! splitting; owning it keeps every limit and reply under our control):
//! RFC 5321 command and line limits, timeouts, SIZE, PIPELINING (replies in
//! order; we read one command at a time), 8BITMIME, ENHANCEDSTATUSCODES,
//! dot-stuffing, RSET/NOOP/QUIT/HELP/VRFY, STARTTLS with rustls when a
//! certificate is configured (input pipelined after STARTTLS is refused,
//! CVE-2011-0411).

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

use crate::listen::{Conn, Listener};
use crate::relay::{HopReply, NextHop, Relay};
use crate::reply::render;
use crate::session::{Hooks, SmtpSession, keep_headers, message_id};
use crate::types::{Header, Message, Verdict};

/// Settings of the SMTP front end.
#[derive(Clone)]
pub struct SmtpConfig {
    /// Our name in the greeting and EHLO reply.
    pub hostname: String,
    /// Where accepted mail goes.
    pub next_hop: NextHop,
    /// Longest command line, bytes (RFC 5321 says at least 512).
    pub max_line: usize,
    /// Largest message, bytes (announced with SIZE).
    pub max_message_size: usize,
    /// Most recipients per message (RFC 5321: at least 100).
    pub max_recipients: usize,
    /// Wait for a command at most this long.
    pub command_timeout: Duration,
    /// Wait for message data (between lines) at most this long.
    pub data_timeout: Duration,
    /// Errors (bad commands) before the connection is closed.
    pub max_errors: u32,
    /// Most connections at once.
    pub max_connections: usize,
    /// STARTTLS, when a certificate is configured.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

impl SmtpConfig {
    /// Defaults relaying to `next_hop`.
    pub fn new(next_hop: NextHop) -> SmtpConfig {
        SmtpConfig {
            hostname: next_hop.helo_name.clone(),
            next_hop,
            max_line: 2048,
            max_message_size: 25 << 20,
            max_recipients: 100,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(180),
            max_errors: 20,
            max_connections: 256,
            tls: None,
        }
    }
}

/// Our reply when the next hop cannot be reached or dropped the connection.
const HOP_UNAVAILABLE: &str = "451 4.4.1 Next hop unavailable, try again later\r\n";

/// Longest line inside message data; a longer one fails the message.
const MAX_DATA_LINE: usize = 64 << 10;

static SESSIONS: AtomicU64 = AtomicU64::new(0);

/// Accepts SMTP connections on `listener` until `shutdown` is cancelled.
pub async fn serve(listener: Listener, hooks: Hooks, config: Arc<SmtpConfig>, shutdown: CancellationToken) {
    let max = config.max_connections;
    let stop = shutdown.clone();
    crate::listen::accept_loop(listener, max, stop, move |conn, peer| {
        let (hooks, config, shutdown) = (hooks.clone(), config.clone(), shutdown.clone());
        async move {
            let mut c = Connection::new(conn, &peer, hooks, config);
            tokio::select! {
                r = c.run() => if let Err(e) = r { tracing::debug!(%peer, "smtp connection ended: {e}") },
                _ = shutdown.cancelled() => { let _ = c.write("421 4.3.2 Shutting down\r\n").await; }
            }
            if let Some(relay) = c.relay.take() {
                relay.quit().await;
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
}

/// One line from the client.
enum Line {
    Text(Vec<u8>),
    TooLong,
}

/// Reads one LF-ended line, keeping at most `max` bytes; the rest of a
/// longer line is read and dropped, so memory stays bounded.
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R, max: usize) -> Result<Option<Line>, std::io::Error> {
    let mut line = Vec::new();
    let mut too_long = false;
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return Ok(match (too_long, line.is_empty()) {
                (true, _) => Some(Line::TooLong),
                (false, true) => None,
                (false, false) => Some(Line::Text(line)),
            });
        }
        let (chunk, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (&buf[..=i], true),
            None => (buf, false),
        };
        let n = chunk.len();
        if !too_long {
            if line.len() + n > max + 2 {
                too_long = true;
                line = Vec::new();
            } else {
                line.extend_from_slice(chunk);
            }
        }
        r.consume(n);
        if done {
            return Ok(Some(if too_long { Line::TooLong } else { Line::Text(line) }));
        }
    }
}

/// The address inside `<...>` after `FROM:` / `TO:`, and the parameters.
fn parse_path<'a>(arg: &'a str, prefix: &str) -> Option<(String, &'a str)> {
    let rest = arg.get(..prefix.len()).filter(|p| p.eq_ignore_ascii_case(prefix)).map(|_| &arg[prefix.len()..])?;
    let rest = rest.trim_start();
    let rest = rest.strip_prefix('<')?;
    let end = rest.find('>')?;
    let addr = &rest[..end];
    // Source routes (`<@a,@b:user@c>`) are allowed and ignored (RFC 5321 4.1.2).
    let addr = match addr.starts_with('@') {
        true => addr.split_once(':').map_or(addr, |(_, a)| a),
        false => addr,
    };
    if addr.len() > 254 || addr.bytes().any(|b| b.is_ascii_control() || b == b' ' || b == b'<') {
        return None;
    }
    Some((addr.to_string(), rest[end + 1..].trim()))
}

struct Connection {
    io: BufReader<Conn>,
    peer: String,
    hooks: Hooks,
    config: Arc<SmtpConfig>,
    session: Option<SmtpSession>,
    relay: Option<Relay>,
    greeted: bool,
    tls: bool,
    in_transaction: bool,
    recipients: usize,
    errors: u32,
    /// Headers the filters asked for at MAIL and RCPT, added at delivery.
    headers: Vec<Header>,
}

impl Connection {
    fn new(conn: Conn, peer: &str, hooks: Hooks, config: Arc<SmtpConfig>) -> Connection {
        Connection {
            io: BufReader::new(conn),
            peer: peer.to_string(),
            hooks,
            config,
            session: None,
            relay: None,
            greeted: false,
            tls: false,
            in_transaction: false,
            recipients: 0,
            errors: 0,
            headers: Vec::new(),
        }
    }

    async fn write(&mut self, text: &str) -> Result<(), End> {
        let w = self.io.get_mut();
        w.write_all(text.as_bytes()).await?;
        w.flush().await?;
        Ok(())
    }

    async fn line(&mut self, max: usize, timeout: Duration) -> Result<Line, End> {
        match tokio::time::timeout(timeout, read_line(&mut self.io, max)).await {
            Err(_) => Err(End::Timeout),
            Ok(Err(e)) => Err(End::Io(e)),
            Ok(Ok(None)) => Err(End::Closed),
            Ok(Ok(Some(l))) => Ok(l),
        }
    }

    /// Counts a client error; too many close the connection.
    async fn error(&mut self, reply: &str) -> Result<(), End> {
        self.errors += 1;
        if self.errors >= self.config.max_errors {
            self.write("421 4.7.0 Too many errors, closing\r\n").await?;
            return Err(End::Closed);
        }
        self.write(reply).await
    }

    async fn run(&mut self) -> Result<(), End> {
        let ip: IpAddr = match self.peer.parse::<std::net::SocketAddr>() {
            Ok(a) => a.ip(),
            Err(_) => std::net::Ipv4Addr::LOCALHOST.into(),
        };
        let id = format!("smtp{}", SESSIONS.fetch_add(1, Ordering::Relaxed));
        let mut session = SmtpSession::new(self.hooks.clone(), id, ip);
        let v = session.connect().await;
        if let Some(r) = v.reply() {
            // The draft: 421 at the greeting, then the client goes away.
            self.write(&render(r)).await?;
            return Ok(());
        }
        self.session = Some(session);
        self.write(&format!("220 {} ESMTP greyhook\r\n", self.config.hostname)).await?;
        loop {
            let raw = match self.line(self.config.max_line, self.config.command_timeout).await {
                Ok(Line::Text(t)) => t,
                Ok(Line::TooLong) => {
                    self.error("500 5.5.2 Line too long\r\n").await?;
                    continue;
                }
                Err(End::Timeout) => {
                    self.write("421 4.4.2 Timeout exceeded, closing\r\n").await?;
                    return Err(End::Timeout);
                }
                Err(e) => return Err(e),
            };
            let text = String::from_utf8_lossy(&raw);
            let text = text.trim_end_matches(['\r', '\n']);
            let (verb, arg) = text.split_once(' ').unwrap_or((text, ""));
            let arg = arg.trim();
            match verb.to_ascii_uppercase().as_str() {
                "EHLO" | "HELO" if arg.is_empty() => self.error("501 5.5.4 Syntax: EHLO hostname\r\n").await?,
                "EHLO" => self.ehlo(arg, true).await?,
                "HELO" => self.ehlo(arg, false).await?,
                "STARTTLS" => self.starttls().await?,
                "MAIL" => self.mail(arg).await?,
                "RCPT" => self.rcpt(arg).await?,
                "DATA" => self.data().await?,
                "RSET" => {
                    self.reset().await;
                    self.write("250 2.0.0 Ok\r\n").await?;
                }
                "NOOP" => self.write("250 2.0.0 Ok\r\n").await?,
                "HELP" => self.write("214 2.0.0 See RFC 5321\r\n").await?,
                "VRFY" => self.write("252 2.0.0 Cannot VRFY; send some mail and we will see\r\n").await?,
                "QUIT" => {
                    self.write("221 2.0.0 Bye\r\n").await?;
                    return Ok(());
                }
                _ => self.error("500 5.5.2 Command not recognized\r\n").await?,
            }
        }
    }

    fn session(&mut self) -> &mut SmtpSession {
        self.session.as_mut().unwrap_or_else(|| unreachable!("set before the command loop"))
    }

    async fn reset(&mut self) {
        if self.in_transaction
            && let Some(r) = self.relay.as_mut()
            && r.rset().await.is_err()
        {
            self.relay = None;
        }
        self.in_transaction = false;
        self.recipients = 0;
        self.headers.clear();
        self.session().reset();
    }

    async fn ehlo(&mut self, name: &str, extended: bool) -> Result<(), End> {
        if name.len() > 255 || name.bytes().any(|b| b.is_ascii_control()) {
            return self.error("501 5.5.4 Invalid hostname\r\n").await;
        }
        self.reset().await;
        let v = self.session().ehlo(name).await;
        if let Some(r) = v.verdict.reply() {
            let close = r.code == 421;
            self.write(&render(r)).await?;
            return if close { Err(End::Closed) } else { Ok(()) };
        }
        self.greeted = true;
        if !extended {
            return self.write(&format!("250 {}\r\n", self.config.hostname)).await;
        }
        let mut lines = vec![
            self.config.hostname.clone(),
            "PIPELINING".into(),
            format!("SIZE {}", self.config.max_message_size),
            "8BITMIME".into(),
            "ENHANCEDSTATUSCODES".into(),
        ];
        if self.config.tls.is_some() && !self.tls {
            lines.push("STARTTLS".into());
        }
        lines.extend(v.keywords.iter().cloned());
        lines.push("HELP".into());
        let n = lines.len();
        let text: String = lines.iter().enumerate().map(|(i, l)| format!("250{}{l}\r\n", if i + 1 == n { ' ' } else { '-' })).collect();
        self.write(&text).await
    }

    async fn starttls(&mut self) -> Result<(), End> {
        let Some(acceptor) = self.config.tls.clone().filter(|_| !self.tls) else {
            return self.error("502 5.5.1 STARTTLS not available\r\n").await;
        };
        if !self.io.buffer().is_empty() {
            // Commands pipelined after STARTTLS would be taken as sent under TLS.
            self.write("501 5.5.1 Nothing may follow STARTTLS\r\n").await?;
            return Err(End::Closed);
        }
        self.write("220 2.0.0 Ready to start TLS\r\n").await?;
        let plain = std::mem::replace(&mut self.io, BufReader::new(Box::pin(tokio::io::empty()))).into_inner();
        let tls = tokio::time::timeout(self.config.command_timeout, acceptor.accept(plain)).await.map_err(|_| End::Timeout)??;
        self.io = BufReader::new(Box::pin(tls));
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
        let Some((sender, params)) = parse_path(arg, "FROM:") else {
            return self.error("501 5.5.4 Syntax: MAIL FROM:<address>\r\n").await;
        };
        let mut forward = Vec::new();
        for p in params.split_whitespace() {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            match k.to_ascii_uppercase().as_str() {
                "SIZE" => match v.parse::<u64>() {
                    Ok(n) if n > self.config.max_message_size as u64 => {
                        return self.write("552 5.3.4 Message size exceeds fixed limit\r\n").await;
                    }
                    Ok(_) => forward.push(p.to_string()),
                    Err(_) => return self.error("501 5.5.4 Bad SIZE parameter\r\n").await,
                },
                "BODY" if v.eq_ignore_ascii_case("8BITMIME") || v.eq_ignore_ascii_case("7BIT") => forward.push(p.to_string()),
                _ => return self.error("555 5.5.4 Unsupported MAIL parameter\r\n").await,
            }
        }
        let v = self.session().mail(&sender).await;
        if let Some(r) = v.reply() {
            return self.write(&render(r)).await;
        }
        // The next hop must take the sender too before the client hears 250.
        let xf = self.session.as_ref().map(|s| xforward(s.session()));
        let hop = match self.relay_ready().await {
            Ok(r) => r,
            Err(reply) => {
                self.session().reset();
                return self.write(&reply).await;
            }
        };
        // Tell it who the client is (Postfix resets XFORWARD attributes
        // after every transaction, so before every MAIL).
        if hop.has("XFORWARD")
            && let Some(line) = xf
            && !matches!(hop.command(&line).await, Ok(ref rep) if rep.is_positive())
        {
            tracing::debug!("next hop refused XFORWARD; relaying without it");
        }
        // Only the parameters it announced.
        forward.retain(|p| {
            let k = p.split('=').next().unwrap_or("").to_ascii_uppercase();
            (k == "SIZE" && hop.has("SIZE")) || (k == "BODY" && hop.has("8BITMIME"))
        });
        match hop.mail(&sender, &forward.join(" ")).await {
            Ok(r) if r.is_positive() => {
                self.in_transaction = true;
                self.headers.clear();
                keep_headers(&mut self.headers, &v);
                self.write("250 2.1.0 Ok\r\n").await
            }
            Ok(r) => {
                self.session().reset();
                self.write(&r.render()).await
            }
            Err(e) => {
                tracing::warn!("{e}");
                self.relay = None;
                self.session().reset();
                self.write(HOP_UNAVAILABLE).await
            }
        }
    }

    /// The relay connection, opened if there is none yet; or the reply for
    /// our client.
    async fn relay_ready(&mut self) -> Result<&mut Relay, String> {
        if self.relay.is_none() {
            match Relay::connect(&self.config.next_hop).await {
                Ok(Ok(r)) => {
                    self.relay = Some(r);
                }
                Ok(Err(reply)) => {
                    tracing::warn!(code = reply.code, "next hop refused the session");
                    // Its greeting or EHLO refused us: tell the client in our
                    // words, keeping the class (permanent or temporary).
                    let (code, enhanced) = if reply.code >= 500 { (554, "5.4.1") } else { (451, "4.4.1") };
                    return Err(format!("{code} {enhanced} Next hop refused the session: {}\r\n", reply.lines.join(" ")));
                }
                Err(e) => {
                    tracing::warn!("{e}");
                    return Err(HOP_UNAVAILABLE.into());
                }
            }
        }
        self.relay.as_mut().ok_or_else(|| HOP_UNAVAILABLE.to_string())
    }

    async fn rcpt(&mut self, arg: &str) -> Result<(), End> {
        if !self.in_transaction {
            return self.error("503 5.5.1 Need MAIL before RCPT\r\n").await;
        }
        let Some((rcpt, params)) = parse_path(arg, "TO:") else {
            return self.error("501 5.5.4 Syntax: RCPT TO:<address>\r\n").await;
        };
        if !params.is_empty() {
            return self.error("555 5.5.4 Unsupported RCPT parameter\r\n").await;
        }
        if rcpt.is_empty() {
            return self.error("501 5.1.3 Bad recipient address syntax\r\n").await;
        }
        if self.recipients >= self.config.max_recipients {
            return self.write("452 4.5.3 Too many recipients\r\n").await;
        }
        let v = self.session().rcpt(&rcpt).await;
        if let Some(r) = v.reply() {
            return self.write(&render(r)).await;
        }
        let Some(hop) = self.relay.as_mut() else {
            return self.write(HOP_UNAVAILABLE).await;
        };
        match hop.rcpt(&rcpt).await {
            Ok(r) if r.is_positive() => {
                self.recipients += 1;
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
                self.in_transaction = false;
                self.recipients = 0;
                self.session().reset();
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
            Err(reply) => self.write(reply).await,
            Ok(body) => self.deliver(body).await,
        };
        self.in_transaction = false;
        self.recipients = 0;
        self.headers.clear();
        self.session().reset();
        result
    }

    /// Reads the message up to the final dot, undoing dot-stuffing and
    /// normalising line ends to CRLF; a message over the size limit or with
    /// an overlong line is read to its end and refused.
    async fn read_message(&mut self) -> Result<Result<Vec<u8>, &'static str>, End> {
        let mut body = Vec::new();
        let mut refused: Option<&'static str> = None;
        loop {
            let line = match self.line(MAX_DATA_LINE, self.config.data_timeout).await? {
                Line::TooLong => {
                    refused.get_or_insert("552 5.3.4 Message line too long\r\n");
                    continue;
                }
                Line::Text(l) => l,
            };
            // Only CRLF.CRLF ends the message: a "." line ended by a bare LF
            // is data (SMTP smuggling, CVE-2023-51764 and kin). It is
            // relayed dot-stuffed, so the next hop cannot take it for an end
            // either.
            if line == b".\r\n" {
                return Ok(refused.map_or(Ok(body), Err));
            }
            if !line.ends_with(b"\n") {
                // End of stream without the final dot: the client vanished.
                return Err(End::Closed);
            }
            let content = &line[..line.len() - 1];
            let content = content.strip_suffix(b"\r").unwrap_or(content);
            let content = content.strip_prefix(b".").unwrap_or(content);
            if refused.is_none() {
                if body.len() + content.len() + 2 > self.config.max_message_size {
                    refused = Some("552 5.3.4 Message size exceeds fixed limit\r\n");
                    body = Vec::new();
                } else {
                    body.extend_from_slice(content);
                    body.extend_from_slice(b"\r\n");
                }
            }
        }
    }

    async fn deliver(&mut self, body: Vec<u8>) -> Result<(), End> {
        let headers = parse_headers(&body);
        let message = Message { message_id: message_id(&headers), headers };
        let v: Verdict = self.session().data(&message).await;
        if let Some(r) = v.reply() {
            if let Some(hop) = self.relay.as_mut()
                && hop.rset().await.is_err()
            {
                self.relay = None;
            }
            return self.write(&render(r)).await;
        }
        let mut out = Vec::with_capacity(body.len() + 256);
        keep_headers(&mut self.headers, &v);
        for h in &self.headers {
            out.extend_from_slice(format!("{}: {}\r\n", h.name, h.value).as_bytes());
        }
        out.extend_from_slice(&body);
        let Some(hop) = self.relay.as_mut() else {
            return self.write(HOP_UNAVAILABLE).await;
        };
        match hop.data(&out).await {
            Ok(r) => {
                let reply: HopReply = r;
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

/// The XFORWARD line for a session: client address, name, HELO.
fn xforward(s: &crate::types::Session) -> String {
    // XFORWARD values are xtext-like: no spaces or controls.
    let clean = |v: &str| v.chars().filter(|c| c.is_ascii_graphic() && *c != '+' && *c != '=').collect::<String>();
    let name = s.client_name.as_deref().map(clean).filter(|n| !n.is_empty()).unwrap_or_else(|| "[UNAVAILABLE]".into());
    let helo = s.helo.as_deref().map(clean).filter(|n| !n.is_empty()).unwrap_or_else(|| "[UNAVAILABLE]".into());
    format!("XFORWARD ADDR={} NAME={name} HELO={helo} PROTO=ESMTP", s.client_address)
}

/// The header section of a message (up to the first empty line), unfolded,
/// at most 200 headers.
pub fn parse_headers(message: &[u8]) -> Vec<Header> {
    let mut out: Vec<Header> = Vec::new();
    for line in message.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        let text = String::from_utf8_lossy(line);
        if line[0] == b' ' || line[0] == b'\t' {
            if let Some(last) = out.last_mut()
                && last.value.len() < 4096
            {
                last.value.push(' ');
                last.value.push_str(text.trim());
            }
            continue;
        }
        if out.len() >= 200 {
            break;
        }
        if let Some((name, value)) = text.split_once(':') {
            out.push(Header { name: name.trim().to_string(), value: value.trim().to_string() });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_parameters() {
        assert_eq!(parse_path("FROM:<a@b.c> SIZE=10", "FROM:"), Some(("a@b.c".into(), "SIZE=10")));
        assert_eq!(parse_path("from: <>", "FROM:"), Some(("".into(), "")));
        assert_eq!(parse_path("TO:<@r1,@r2:u@d>", "TO:"), Some(("u@d".into(), "")));
        assert_eq!(parse_path("TO:u@d", "TO:"), None);
        assert_eq!(parse_path("TO:<u@d", "TO:"), None);
        assert_eq!(parse_path("FROM:<a\u{1}b>", "FROM:"), None);
    }

    #[test]
    fn headers_are_unfolded_and_end_at_the_empty_line() {
        let h = parse_headers(b"Subject: a\r\n b\r\nMessage-ID: <x@y>\r\n\r\nNot: a header\r\n");
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].value, "a b");
        assert_eq!(message_id(&h).as_deref(), Some("<x@y>"));
    }

    #[tokio::test]
    async fn long_lines_are_dropped_not_kept() {
        let input = [b'a'; 100_000];
        let mut r = tokio::io::BufReader::new(&input[..]);
        assert!(matches!(read_line(&mut r, 10).await.unwrap(), Some(Line::TooLong)), "cut off by the end of the stream");
        let data = [vec![b'x'; 5000], b"\r\nNOOP\r\n".to_vec()].concat();
        let mut r = tokio::io::BufReader::new(&data[..]);
        assert!(matches!(read_line(&mut r, 512).await.unwrap(), Some(Line::TooLong)));
        assert!(matches!(read_line(&mut r, 512).await.unwrap(), Some(Line::Text(t)) if t == b"NOOP\r\n"));
        assert!(read_line(&mut r, 512).await.unwrap().is_none());
    }
}
