//! The SMTP/LMTP client the SMTP front end relays through: one connection
//! to the next hop per client session, opened at the first MAIL, each
//! command forwarded as the client's is accepted, so that the client hears
//! `250` for its message only after the next hop said so.
//!
//! Written by hand rather than with an SMTP client crate: the front end must
//! pass the next hop's exact reply (code, enhanced code, text) back to its
//! client, command by command, and speak LMTP (one reply per recipient at
//! end of data); the crates we looked at (lettre) send whole messages and
//! map replies to their own error types, and have no LMTP.

use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Longest reply line read from the next hop, and most lines in one reply.
const MAX_REPLY_LINE: usize = 4096;
const MAX_REPLY_LINES: usize = 100;

/// The next hop.
#[derive(Debug, Clone)]
pub struct NextHop {
    /// `HOST:PORT`.
    pub address: String,
    /// Speak LMTP (`LHLO`, one reply per recipient after the data).
    pub lmtp: bool,
    /// Deadline of connecting and of each reply.
    pub timeout: Duration,
    /// The name we greet it with.
    pub helo_name: String,
}

/// A reply from the next hop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HopReply {
    /// The code.
    pub code: u16,
    /// The text lines, without the code and separator.
    pub lines: Vec<String>,
}

impl HopReply {
    /// 2xx or 3xx.
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    /// As it goes to our client, CRLF-ended lines.
    pub fn render(&self) -> String {
        let n = self.lines.len().max(1);
        let mut out = String::new();
        for i in 0..n {
            let text = self.lines.get(i).map(String::as_str).unwrap_or("");
            let sep = if i + 1 == n { ' ' } else { '-' };
            out.push_str(&format!("{}{sep}{text}\r\n", self.code));
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

/// A connection to the next hop.
pub struct Relay {
    hop: NextHop,
    conn: BufReader<TcpStream>,
    /// The next hop's EHLO/LHLO keywords, upper case.
    keywords: Vec<String>,
    /// Recipients the next hop accepted in this transaction (LMTP replies
    /// once per each after the data).
    accepted: usize,
}

impl Relay {
    /// Connects, reads the greeting and says EHLO (LHLO for LMTP). A
    /// negative greeting or EHLO reply is returned as `Ok(Err(reply))`.
    pub async fn connect(hop: &NextHop) -> Result<Result<Relay, HopReply>, RelayError> {
        let stream = tokio::time::timeout(hop.timeout, TcpStream::connect(&hop.address))
            .await
            .map_err(|_| RelayError::Timeout(hop.address.clone(), hop.timeout))?
            .map_err(|e| RelayError::Io(hop.address.clone(), e))?;
        let _ = stream.set_nodelay(true);
        let mut r = Relay { hop: hop.clone(), conn: BufReader::new(stream), keywords: Vec::new(), accepted: 0 };
        let greeting = r.reply().await?;
        if greeting.code != 220 {
            return Ok(Err(greeting));
        }
        let hello = if hop.lmtp { "LHLO" } else { "EHLO" };
        let ehlo = r.command(&format!("{hello} {}", hop.helo_name)).await?;
        if ehlo.code != 250 {
            return Ok(Err(ehlo));
        }
        r.keywords = ehlo.lines.iter().skip(1).map(|l| l.to_ascii_uppercase()).collect();
        Ok(Ok(r))
    }

    /// Whether the next hop announced `keyword` (e.g. `XFORWARD`).
    pub fn has(&self, keyword: &str) -> bool {
        self.keywords.iter().any(|k| k.split_whitespace().next() == Some(keyword))
    }

    /// Tells the next hop who the real client is with Postfix's XCLIENT
    /// (it then treats the session as that client's: its restrictions, its
    /// logs, its `Received:` line), if the next hop offers it: `attrs` are
    /// `NAME=VALUE` pairs, sent only when the next hop listed the name.
    /// XCLIENT restarts the session (a new greeting), so EHLO is said again.
    /// True if the next hop took it.
    pub async fn xclient(&mut self, attrs: &[(&str, String)]) -> Result<bool, RelayError> {
        let Some(offered) = self.keywords.iter().find(|k| k.split_whitespace().next() == Some("XCLIENT")).cloned() else {
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
        self.keywords = ehlo.lines.iter().skip(1).map(|l| l.to_ascii_uppercase()).collect();
        Ok(true)
    }

    /// Sends one command line and reads the reply.
    pub async fn command(&mut self, line: &str) -> Result<HopReply, RelayError> {
        self.write(format!("{line}\r\n").as_bytes()).await?;
        self.reply().await
    }

    /// MAIL FROM.
    pub async fn mail(&mut self, from: &str, params: &str) -> Result<HopReply, RelayError> {
        self.accepted = 0;
        let sep = if params.is_empty() { "" } else { " " };
        self.command(&format!("MAIL FROM:<{from}>{sep}{params}")).await
    }

    /// RCPT TO; counts the recipients the next hop accepted.
    pub async fn rcpt(&mut self, to: &str) -> Result<HopReply, RelayError> {
        let r = self.command(&format!("RCPT TO:<{to}>")).await?;
        if r.is_positive() {
            self.accepted += 1;
        }
        Ok(r)
    }

    /// DATA, then `prefix` (header lines of ours) and `message` (CRLF
    /// lines, already dot-stuffed: [`crate::frontend::smtp::wire::DataFramer`]'s
    /// output) and the final dot: the next hop's verdict, or for LMTP the
    /// first failure among the per-recipient replies (or the first success
    /// when all succeeded). Written as it is, without a copy.
    pub async fn data(&mut self, prefix: &[u8], message: &[u8]) -> Result<HopReply, RelayError> {
        let go = self.command("DATA").await?;
        if go.code != 354 {
            return Ok(go);
        }
        self.write(prefix).await?;
        self.write(message).await?;
        let end: &[u8] = if message.is_empty() || message.ends_with(b"\r\n") { b".\r\n" } else { b"\r\n.\r\n" };
        self.write(end).await?;
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

    /// RSET (the transaction is abandoned).
    pub async fn rset(&mut self) -> Result<HopReply, RelayError> {
        self.accepted = 0;
        self.command("RSET").await
    }

    /// QUIT, without waiting long for the answer.
    pub async fn quit(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.command("QUIT")).await;
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), RelayError> {
        let t = self.hop.timeout;
        let addr = self.hop.address.clone();
        tokio::time::timeout(t, self.conn.get_mut().write_all(bytes))
            .await
            .map_err(|_| RelayError::Timeout(addr.clone(), t))?
            .map_err(|e| RelayError::Io(addr, e))
    }

    /// Reads one (possibly multi-line) reply, bounded in size and time.
    async fn reply(&mut self) -> Result<HopReply, RelayError> {
        let t = self.hop.timeout;
        let addr = self.hop.address.clone();
        tokio::time::timeout(t, self.read_reply()).await.map_err(|_| RelayError::Timeout(addr, t))?
    }

    async fn read_reply(&mut self) -> Result<HopReply, RelayError> {
        let addr = self.hop.address.clone();
        let mut lines = Vec::new();
        loop {
            let mut raw = Vec::new();
            let n = (&mut self.conn)
                .take(MAX_REPLY_LINE as u64)
                .read_until(b'\n', &mut raw)
                .await
                .map_err(|e| RelayError::Io(addr.clone(), e))?;
            // Passed on to our client: no control characters survive.
            let line: String = String::from_utf8_lossy(&raw).trim_end().chars().map(|c| if c.is_control() { '?' } else { c }).collect();
            if n == 0 {
                return Err(RelayError::Io(addr, std::io::ErrorKind::UnexpectedEof.into()));
            }
            let code: Option<u16> = line.get(..3).and_then(|c| c.parse().ok()).filter(|c| (200..600).contains(c));
            let sep = line.as_bytes().get(3).copied();
            let (Some(code), true) = (code, matches!(sep, None | Some(b' ') | Some(b'-'))) else {
                return Err(RelayError::Malformed(addr, line));
            };
            lines.push(line.get(4..).unwrap_or("").to_string());
            if sep != Some(b'-') {
                return Ok(HopReply { code, lines });
            }
            if lines.len() >= MAX_REPLY_LINES {
                return Err(RelayError::Malformed(addr, "reply too long".into()));
            }
        }
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
    fn xtext_encodes_what_it_must() {
        assert_eq!(xtext("mx.example.org"), "mx.example.org");
        assert_eq!(xtext("a b+c=d"), "a+20b+2Bc+3Dd");
    }

    #[test]
    fn replies_render_with_the_code_on_every_line() {
        let r = HopReply { code: 250, lines: vec!["2.0.0 Ok".into(), "queued as X".into()] };
        assert_eq!(r.render(), "250-2.0.0 Ok\r\n250 queued as X\r\n");
        assert!(r.is_positive());
        assert!(!HopReply { code: 451, lines: vec![] }.is_positive());
    }
}
