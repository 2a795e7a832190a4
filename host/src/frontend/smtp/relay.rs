//! The SMTP/LMTP client the SMTP front end relays through: a connection to
//! the next hop taken at a session's first accepted recipient (from a small
//! pool of idle ones, [`Pool`], or opened), each command forwarded as the
//! client's is accepted, so that the client hears `250` for its message
//! only after the next hop said so; given back to the pool when the session
//! ends. When the next hop offers PIPELINING, the envelope the client has
//! already had accepted (XFORWARD, MAIL, the first RCPT) goes in one write.
//!
//! Written by hand rather than with an SMTP client crate: the front end must
//! pass the next hop's exact reply (code, enhanced code, text) back to its
//! client, command by command, and speak LMTP (one reply per recipient at
//! end of data); the crates we looked at (lettre) send whole messages and
//! map replies to their own error types, and have no LMTP.

use std::io::IoSlice;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use smallvec::SmallVec;
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UnixStream};
use tokio_util::either::Either;

use super::wire;

/// Longest reply line read from the next hop, and most lines in one reply.
const MAX_REPLY_LINE: usize = 4096;
const MAX_REPLY_LINES: usize = 100;

/// The next hop.
#[derive(Debug, Clone)]
pub struct NextHop {
    /// `HOST:PORT`, or `unix:/path` for a unix socket (an LMTP server's,
    /// or an MTA's smtpd listening on one).
    pub address: String,
    /// Speak LMTP (`LHLO`, one reply per recipient after the data).
    pub lmtp: bool,
    /// Deadline of connecting and of each reply.
    pub timeout: Duration,
    /// The name we greet it with.
    pub helo_name: String,
}

/// Idle connections to the next hop, kept for the next session instead of
/// a new connection, greeting and EHLO every time (Postfix's own SMTP
/// client keeps a connection cache for the same reason). Bounded in number
/// and idle time; a connection comes back only between transactions and
/// only if it never took XCLIENT (that makes it the client's session at the
/// next hop); one the next hop closed while idle is noticed and dropped
/// before use.
#[derive(Debug)]
pub struct Pool {
    idle: Mutex<Vec<(Relay, Instant)>>,
    /// Most idle connections kept (0: no pooling).
    max: usize,
    /// Longest a connection waits idle.
    max_idle: Duration,
}

/// Transactions one pooled connection carries at most, then it is closed
/// (a bound on what one next-hop session accumulates).
const MAX_REUSE: u32 = 100;

impl Pool {
    /// A pool keeping at most `max` idle connections, each for at most
    /// `max_idle`.
    pub fn new(max: usize, max_idle: Duration) -> Pool {
        Pool { idle: Mutex::new(Vec::new()), max, max_idle }
    }

    /// An idle connection still fit for use, newest first; stale ones are
    /// closed on the way.
    pub fn take(&self) -> Option<Relay> {
        let mut stale = Vec::new();
        let found = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                let Some((r, since)) = idle.pop() else { break None };
                if since.elapsed() < self.max_idle && r.alive() {
                    break Some(r);
                }
                stale.push(r);
            }
        };
        // Dropped outside the lock: closing is a system call.
        drop(stale);
        found
    }

    /// Gives `relay` back after a session: kept if it is between
    /// transactions, never took XCLIENT, has carried fewer than
    /// [`MAX_REUSE`] transactions and there is room; else it is sent QUIT
    /// and closed ([`Relay::quit`]). Never waits: the session that gives it
    /// back has already let its client go, and nothing bounds a wait after
    /// that (a transaction the client left open is not reset for reuse, it
    /// is closed).
    pub fn give_back(&self, relay: Relay) {
        let room = self.max > 0 && self.idle.lock().unwrap_or_else(|p| p.into_inner()).len() < self.max;
        if !room || relay.in_transaction || relay.xclient || relay.transactions >= MAX_REUSE || !relay.alive() {
            relay.quit();
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        // Drop the oldest when over (another session gave one back meanwhile).
        if idle.len() >= self.max {
            idle.remove(0);
        }
        idle.push((relay, Instant::now()));
    }
}

/// The EHLO keywords the front end asks a next hop about, at most 16
/// ([`Relay::has`] answers these from a bit each).
const KNOWN_KEYWORDS: [&str; 8] = ["PIPELINING", "XFORWARD", "SMTPUTF8", "DSN", "SIZE", "8BITMIME", "CHUNKING", "XCLIENT"];

/// A reply from the next hop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HopReply {
    /// The code.
    pub code: u16,
    /// The text lines, without the code and separator (most replies have
    /// one, kept inline).
    pub lines: SmallVec<[String; 1]>,
}

impl HopReply {
    /// 2xx or 3xx.
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    /// As it goes to our client, CRLF-ended lines.
    pub fn render(&self) -> String {
        let n = self.lines.len().max(1);
        let mut out = String::with_capacity(self.lines.iter().map(|l| l.len() + 6).sum::<usize>().max(6));
        for i in 0..n {
            let text = self.lines.get(i).map(String::as_str).unwrap_or("");
            // Written in place (`write!` cost ~400 instructions a reply).
            crate::domain::retry::push_digits(&mut out, u64::from(self.code), 3);
            out.push(if i + 1 == n { ' ' } else { '-' });
            out.push_str(text);
            out.push_str("\r\n");
        }
        out
    }
}

/// Why talking to the next hop failed.
#[derive(Debug, Error)]
pub enum RelayError {
    /// Connecting, reading or writing failed.
    #[error("next hop {0}: {1}")]
    Io(String, std::io::Error),
    /// No reply within the timeout.
    #[error("next hop {0}: no reply within {1:?}")]
    Timeout(String, Duration),
    /// The next hop said something that is not an SMTP reply.
    #[error("next hop {0}: malformed reply {1:?}")]
    Malformed(String, String),
}

/// A connection to the next hop: TCP, or a unix socket.
type HopStream = Either<TcpStream, UnixStream>;

/// A connection to the next hop.
pub struct Relay {
    hop: NextHop,
    conn: BufReader<HopStream>,
    /// The next hop's EHLO/LHLO keywords, upper case.
    keywords: Vec<String>,
    /// Which of [`KNOWN_KEYWORDS`] it offers, a bit each (asked for at
    /// every transaction: a bit test, not a scan of `keywords`).
    known: u16,
    /// Recipients the next hop accepted in this transaction (LMTP replies
    /// once per each after the data).
    accepted: usize,
    /// A MAIL was sent and the transaction has not ended (data or RSET).
    in_transaction: bool,
    /// It took XCLIENT: the next hop sees it as one client's session.
    xclient: bool,
    /// Transactions it carried.
    transactions: u32,
    /// One buffer for the commands written (no allocation per command).
    out: Vec<u8>,
    /// One buffer for the reply lines read.
    line: Vec<u8>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").field("address", &self.hop.address).field("transactions", &self.transactions).finish()
    }
}

impl Relay {
    /// Connects, reads the greeting and says EHLO (LHLO for LMTP). A
    /// negative greeting or EHLO reply is returned as `Ok(Err(reply))`.
    pub async fn connect(hop: &NextHop) -> Result<Result<Relay, HopReply>, RelayError> {
        let connecting = async {
            match hop.address.strip_prefix("unix:") {
                Some(path) => UnixStream::connect(path).await.map(Either::Right),
                None => {
                    let stream = TcpStream::connect(&hop.address).await?;
                    let _ = stream.set_nodelay(true);
                    Ok(Either::Left(stream))
                }
            }
        };
        let stream = tokio::time::timeout(hop.timeout, connecting)
            .await
            .map_err(|_| RelayError::Timeout(hop.address.clone(), hop.timeout))?
            .map_err(|e| RelayError::Io(hop.address.clone(), e))?;
        let mut r = Relay {
            hop: hop.clone(),
            conn: BufReader::new(stream),
            keywords: Vec::new(),
            known: 0,
            accepted: 0,
            in_transaction: false,
            xclient: false,
            transactions: 0,
            out: Vec::with_capacity(512),
            line: Vec::with_capacity(128),
        };
        let greeting = r.reply().await?;
        if greeting.code != 220 {
            return Ok(Err(greeting));
        }
        let hello = if hop.lmtp { "LHLO" } else { "EHLO" };
        let ehlo = r.command(&format!("{hello} {}", hop.helo_name)).await?;
        if ehlo.code != 250 {
            return Ok(Err(ehlo));
        }
        r.set_keywords(&ehlo);
        Ok(Ok(r))
    }

    /// Whether the connection is still usable while idle: nothing unread
    /// (a next hop that timed us out sends `421` and closes) and not closed.
    fn alive(&self) -> bool {
        if !self.conn.buffer().is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        let read = match self.conn.get_ref() {
            Either::Left(tcp) => tcp.try_read(&mut probe),
            Either::Right(unix) => unix.try_read(&mut probe),
        };
        matches!(read, Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// Whether the next hop took XCLIENT on this connection (it then sees
    /// the session as the client's, and XFORWARD is not needed).
    pub fn took_xclient(&self) -> bool {
        self.xclient
    }

    /// Whether the next hop announced `keyword` (upper case, e.g.
    /// `XFORWARD`).
    pub fn has(&self, keyword: &str) -> bool {
        match KNOWN_KEYWORDS.iter().position(|k| *k == keyword) {
            Some(i) => self.known & (1 << i) != 0,
            None => self.offer(keyword).is_some(),
        }
    }

    /// Takes the keywords of an EHLO/LHLO reply (its lines after the first).
    fn set_keywords(&mut self, ehlo: &HopReply) {
        self.keywords = ehlo.lines.iter().skip(1).map(|l| l.to_ascii_uppercase()).collect();
        self.known = KNOWN_KEYWORDS.iter().enumerate().filter(|(_, k)| self.offer(k).is_some()).fold(0, |bits, (i, _)| bits | 1 << i);
    }

    /// The EHLO line of the next hop that announces `keyword`, if any.
    fn offer(&self, keyword: &str) -> Option<&str> {
        self.keywords.iter().find(|k| k.split_ascii_whitespace().next() == Some(keyword)).map(String::as_str)
    }

    /// Tells the next hop who the real client is with Postfix's XCLIENT
    /// (it then treats the session as that client's: its restrictions, its
    /// logs, its `Received:` line), if the next hop offers it: `attrs` are
    /// `NAME=VALUE` pairs, sent only when the next hop listed the name.
    /// XCLIENT restarts the session (a new greeting), so EHLO is said again.
    /// True if the next hop took it.
    pub async fn xclient(&mut self, attrs: &[(&str, String)]) -> Result<bool, RelayError> {
        let Some(offered) = self.offer("XCLIENT").map(str::to_string) else {
            return Ok(false);
        };
        let names: Vec<&str> = offered.split_whitespace().skip(1).collect();
        let sent: Vec<String> = attrs.iter().filter(|(n, _)| names.contains(n)).map(|(n, v)| format!("{n}={}", xtext(v))).collect();
        if sent.is_empty() {
            return Ok(false);
        }
        let r = self.command(&format!("XCLIENT {}", sent.join(" "))).await?;
        if r.code != 220 {
            tracing::debug!(code = r.code, "next hop refused XCLIENT");
            return Ok(false);
        }
        self.xclient = true;
        // Postfix takes the HELO of this EHLO over XCLIENT's: say the
        // client's own.
        let hello = if self.hop.lmtp { "LHLO" } else { "EHLO" };
        let name = attrs
            .iter()
            .find(|(n, v)| *n == "HELO" && !v.starts_with('[') && !v.is_empty() && v.bytes().all(|b| b.is_ascii_graphic()))
            .map_or_else(|| self.hop.helo_name.clone(), |(_, v)| v.clone());
        let ehlo = self.command(&format!("{hello} {name}")).await?;
        if ehlo.code != 250 {
            return Err(RelayError::Malformed(self.hop.address.clone(), format!("EHLO after XCLIENT: {}", ehlo.code)));
        }
        self.set_keywords(&ehlo);
        Ok(true)
    }

    /// Sends one command line and reads the reply.
    pub async fn command(&mut self, line: &str) -> Result<HopReply, RelayError> {
        self.push(&[line]);
        self.send().await?;
        self.reply().await
    }

    /// Adds a command line (its parts, then CRLF) to what goes out next.
    fn push(&mut self, parts: &[&str]) {
        for p in parts {
            self.out.extend_from_slice(p.as_bytes());
        }
        self.out.extend_from_slice(b"\r\n");
    }

    /// Writes what was pushed, in one write.
    async fn send(&mut self) -> Result<(), RelayError> {
        let out = std::mem::take(&mut self.out);
        let r = self.write(&out).await;
        self.out = out;
        self.out.clear();
        r
    }

    /// Whether the next hop takes commands in groups (RFC 2920).
    pub fn pipelining(&self) -> bool {
        self.has("PIPELINING")
    }

    /// Opens a transaction: `xforward` (a whole XFORWARD line, if any),
    /// MAIL FROM and, if given, the first RCPT TO — written together when
    /// the next hop offers PIPELINING, one at a time otherwise. The MAIL
    /// reply, and the RCPT reply if one was sent and MAIL was accepted. A
    /// refused XFORWARD is logged and the transaction goes on without it.
    pub async fn open(
        &mut self,
        xforward: Option<&str>,
        from: &str,
        params: &str,
        rcpt: Option<(&str, &str)>,
    ) -> Result<(HopReply, Option<HopReply>), RelayError> {
        self.accepted = 0;
        self.in_transaction = true;
        self.transactions += 1;
        let pipelined = self.pipelining();
        if let Some(x) = xforward {
            self.push(&[x]);
            if !pipelined {
                self.send().await?;
                self.xforward_reply().await?;
            }
        }
        let sep = if params.is_empty() { "" } else { " " };
        self.push(&["MAIL FROM:<", from, ">", sep, params]);
        if let (true, Some((to, params))) = (pipelined, rcpt) {
            self.push_rcpt(to, params);
        }
        self.send().await?;
        if pipelined && xforward.is_some() {
            self.xforward_reply().await?;
        }
        let mail = self.reply().await?;
        let first = match rcpt {
            // Pipelined: its reply comes whatever MAIL's was.
            Some(_) if pipelined => Some(self.reply().await?),
            Some((to, params)) if mail.is_positive() => {
                self.push_rcpt(to, params);
                self.send().await?;
                Some(self.reply().await?)
            }
            _ => None,
        };
        if let Some(r) = &first
            && r.is_positive()
            && mail.is_positive()
        {
            self.accepted += 1;
        }
        let first = first.filter(|_| mail.is_positive());
        Ok((mail, first))
    }

    async fn xforward_reply(&mut self) -> Result<(), RelayError> {
        let r = self.reply().await?;
        if !r.is_positive() {
            tracing::debug!(code = r.code, "next hop refused XFORWARD; relaying without it");
        }
        Ok(())
    }

    /// `RCPT TO:<to>` and its parameters `params` (if any), to be sent.
    fn push_rcpt(&mut self, to: &str, params: &str) {
        let sep = if params.is_empty() { "" } else { " " };
        self.push(&["RCPT TO:<", to, ">", sep, params]);
    }

    /// RCPT TO with `params` (none if empty); counts the recipients the
    /// next hop accepted.
    pub async fn rcpt(&mut self, to: &str, params: &str) -> Result<HopReply, RelayError> {
        self.push_rcpt(to, params);
        self.send().await?;
        let r = self.reply().await?;
        if r.is_positive() {
            self.accepted += 1;
        }
        Ok(r)
    }

    /// DATA, then `prefix` (header lines of ours) and `message` (its
    /// content, CRLF lines: [`crate::frontend::smtp::wire::DataFramer`]'s
    /// output) dot-stuffed, and the final dot: the next hop's verdict, or
    /// for LMTP the first failure among the per-recipient replies (or the
    /// first success when all succeeded). Written without a copy, in one
    /// write unless many lines start with a dot ([`wire::stuffed`]'s
    /// pieces, [`STUFFED_PIECES`] a write).
    ///
    /// A next hop that offers CHUNKING (RFC 3030; Postfix does) gets
    /// `BDAT <size> LAST` and the message in the same write instead: no
    /// wait for `354`, one round trip fewer a message.
    pub async fn data(&mut self, prefix: &[u8], message: &[u8]) -> Result<HopReply, RelayError> {
        if !self.hop.lmtp && self.has("CHUNKING") {
            return self.bdat(prefix, message).await;
        }
        let go = self.command("DATA").await?;
        if go.code != 354 {
            return Ok(go);
        }
        let end: &[u8] = if crlf_ended(message) { b".\r\n" } else { b"\r\n.\r\n" };
        let mut pieces = wire::stuffed(message);
        let mut batch = vec![IoSlice::new(prefix)];
        loop {
            batch.extend(pieces.by_ref().take(STUFFED_PIECES - batch.len()).map(IoSlice::new));
            let last = batch.len() < STUFFED_PIECES;
            if last {
                batch.push(IoSlice::new(end));
            }
            self.write_all_vectored(&mut batch).await?;
            if last {
                break;
            }
            batch.clear();
        }
        self.in_transaction = false;
        if !self.hop.lmtp {
            return self.reply().await;
        }
        let mut first_bad: Option<HopReply> = None;
        let mut first_good: Option<HopReply> = None;
        for _ in 0..self.accepted.max(1) {
            let r = self.reply().await?;
            if r.is_positive() {
                first_good.get_or_insert(r);
            } else {
                first_bad.get_or_insert(r);
            }
        }
        if let (Some(bad), Some(_)) = (&first_bad, &first_good) {
            tracing::warn!(code = bad.code, "LMTP next hop accepted some recipients and refused others; the client is told the refusal");
        }
        first_bad.or(first_good).ok_or_else(|| RelayError::Malformed(self.hop.address.clone(), "no LMTP reply".into()))
    }

    /// The message in one `BDAT <size> LAST` chunk: `prefix` and `message`
    /// as they are (BDAT data is not dot-stuffed), CRLF-ended.
    /// RFC 3030 lets the next hop keep the transaction after a refused
    /// chunk, so a refusal is followed by RSET at once: the connection is
    /// then fit for the client's next transaction or, pooled, for the next
    /// session. If the reset fails the connection stays in the
    /// transaction, and is closed instead of pooled.
    async fn bdat(&mut self, prefix: &[u8], message: &[u8]) -> Result<HopReply, RelayError> {
        let crlf: &[u8] = if crlf_ended(message) { b"" } else { b"\r\n" };
        let mut size = String::with_capacity(20);
        crate::domain::retry::push_digits(&mut size, (prefix.len() + message.len() + crlf.len()) as u64, 1);
        self.push(&["BDAT ", &size, " LAST"]);
        let head = std::mem::take(&mut self.out);
        let written =
            self.write_all_vectored(&mut [IoSlice::new(&head), IoSlice::new(prefix), IoSlice::new(message), IoSlice::new(crlf)]).await;
        self.out = head;
        self.out.clear();
        written?;
        let r = self.reply().await?;
        self.in_transaction = !r.is_positive() && !matches!(self.rset().await, Ok(ref reset) if reset.code == 250);
        Ok(r)
    }

    /// RSET (the transaction is abandoned).
    pub async fn rset(&mut self) -> Result<HopReply, RelayError> {
        self.accepted = 0;
        let r = self.command("RSET").await?;
        self.in_transaction = false;
        Ok(r)
    }

    /// Sends QUIT and closes the connection without waiting for the answer
    /// (as Postfix's own SMTP client does, `smtp_skip_quit_response =
    /// yes`): one write that does not wait either, into a socket that has
    /// nothing else to send. A next hop that then finds the connection
    /// closed has read the QUIT first.
    pub fn quit(self) {
        let quit = b"QUIT\r\n";
        let _ = match self.conn.get_ref() {
            Either::Left(tcp) => tcp.try_write(quit),
            Either::Right(unix) => unix.try_write(quit),
        };
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), RelayError> {
        self.write_all_vectored(&mut [IoSlice::new(bytes)]).await
    }

    /// Writes `parts` in as few system calls as the socket takes (one,
    /// usually), each byte once, within the timeout.
    async fn write_all_vectored(&mut self, mut parts: &mut [IoSlice<'_>]) -> Result<(), RelayError> {
        let t = self.hop.timeout;
        let stream = self.conn.get_mut();
        let written = tokio::time::timeout(t, async {
            IoSlice::advance_slices(&mut parts, 0);
            while !parts.is_empty() {
                match stream.write_vectored(parts).await? {
                    0 => return Err(std::io::Error::from(std::io::ErrorKind::WriteZero)),
                    n => IoSlice::advance_slices(&mut parts, n),
                }
            }
            Ok(())
        });
        match written.await {
            Err(_) => Err(RelayError::Timeout(self.hop.address.clone(), t)),
            Ok(r) => r.map_err(|e| RelayError::Io(self.hop.address.clone(), e)),
        }
    }

    /// Reads one (possibly multi-line) reply, bounded in size and time.
    async fn reply(&mut self) -> Result<HopReply, RelayError> {
        let t = self.hop.timeout;
        match tokio::time::timeout(t, self.read_reply()).await {
            Ok(r) => r,
            Err(_) => Err(RelayError::Timeout(self.hop.address.clone(), t)),
        }
    }

    async fn read_reply(&mut self) -> Result<HopReply, RelayError> {
        let addr = || self.hop.address.clone();
        let mut lines = SmallVec::new();
        loop {
            self.line.clear();
            let n = (&mut self.conn)
                .take(MAX_REPLY_LINE as u64)
                .read_until(b'\n', &mut self.line)
                .await
                .map_err(|e| RelayError::Io(addr(), e))?;
            if n == 0 {
                return Err(RelayError::Io(addr(), std::io::ErrorKind::UnexpectedEof.into()));
            }
            let text = String::from_utf8_lossy(&self.line);
            let text = text.trim_end();
            let code: Option<u16> = text.get(..3).and_then(|c| c.parse().ok()).filter(|c| (200..600).contains(c));
            let sep = text.as_bytes().get(3).copied();
            let (Some(code), true) = (code, matches!(sep, None | Some(b' ') | Some(b'-'))) else {
                return Err(RelayError::Malformed(addr(), printable(text)));
            };
            lines.push(printable(text.get(4..).unwrap_or("")));
            if sep != Some(b'-') {
                return Ok(HopReply { code, lines });
            }
            if lines.len() >= MAX_REPLY_LINES {
                return Err(RelayError::Malformed(addr(), "reply too long".into()));
            }
        }
    }
}

/// Whether message data ends its last line (or is empty): what
/// [`crate::frontend::smtp::wire::DataFramer`] keeps always does, and the
/// next hop gets a CRLF added where it would not.
fn crlf_ended(message: &[u8]) -> bool {
    message.is_empty() || message.ends_with(b"\r\n")
}

/// How many pieces of a dot-stuffed message go in one write (`writev`
/// takes up to 1 024): a message whose lines all start with a dot is
/// written in several, each piece a slice of the message, not a copy.
const STUFFED_PIECES: usize = 512;

/// A reply line as it may go to our client: no control characters survive
/// (the common case, none, is one copy rather than one push a character).
/// A line none of whose bytes can begin one (`reply::control_free`) has
/// none, found by a byte scan (vectorised; the `char` scan cost ~12
/// instructions a character, ~900 a message).
fn printable(text: &str) -> String {
    use crate::domain::reply::{all_bytes, control_free};
    let plain = all_bytes(text.as_bytes(), control_free);
    if plain || !text.contains(char::is_control) {
        text.to_string()
    } else {
        text.chars().map(|c| if c.is_control() { '?' } else { c }).collect()
    }
}

/// RFC 3461 xtext, as XCLIENT and XFORWARD values are written: `+`, `=`
/// and bytes outside `!`..`~` as `+HH`.
pub fn xtext(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if (33..=126).contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_lines_keep_no_control_character() {
        for (line, want) in [
            ("250 2.0.0 Ok: queued as 4F3A", "250 2.0.0 Ok: queued as 4F3A"),
            ("a\tb\rc\u{7f}d\u{0}", "a?b?c?d?"),
            ("caf\u{e9} \u{a0}\u{85}x\u{9f}", "caf\u{e9} \u{a0}?x?"),
            ("\u{2028}\u{c0}", "\u{2028}\u{c0}"),
        ] {
            assert_eq!(printable(line), want, "{line:?}");
        }
        // Every character up to U+0800 (all one- and two-byte UTF-8), as
        // the plain definition says.
        for c in (0..0x800u32).filter_map(char::from_u32) {
            let line = format!("x{c}y");
            let want: String = line.chars().map(|c| if c.is_control() { '?' } else { c }).collect();
            assert_eq!(printable(&line), want, "U+{:04X}", c as u32);
        }
    }

    #[test]
    fn xtext_encodes_what_it_must() {
        assert_eq!(xtext("mx.example.org"), "mx.example.org");
        assert_eq!(xtext("a b+c=d"), "a+20b+2Bc+3Dd");
    }

    #[test]
    fn replies_render_with_the_code_on_every_line() {
        let r = HopReply { code: 250, lines: smallvec::smallvec!["2.0.0 Ok".into(), "queued as X".into()] };
        assert_eq!(r.render(), "250-2.0.0 Ok\r\n250 queued as X\r\n");
        assert!(r.is_positive());
        assert!(!HopReply { code: 451, lines: SmallVec::new() }.is_positive());
    }
}
