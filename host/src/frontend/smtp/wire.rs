//! What the SMTP front end reads from a client, byte by byte: lines with
//! their endings, the message data's framing (end of data, dot-stuffing,
//! bare CR and LF), and envelope paths (RFC 5321 4.1.2). Pure functions,
//! no I/O beyond [`read_line`], so they are unit-tested and fuzzed
//! (`fuzz/fuzz_targets/smtp_wire.rs`).
//!
//! Written by hand: no maintained crate parses the server side of SMTP with
//! the limits and the bare-newline rules a before-queue filter needs.

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// What the front end does with a bare LF or a bare CR (one without the
/// other) from a client, in commands and in message data. RFC 5321 2.3.8
/// forbids both; lenient servers that take them as line ends are what SMTP
/// smuggling (CVE-2023-51764 and kin) exploits. Postfix 3.9's
/// `smtpd_forbid_bare_newline` is the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BareNewline {
    /// `521 5.5.2 Error: bare <LF> received` (or `<CR>`) and the
    /// connection is closed (Postfix's `reject`); nothing of the message
    /// is relayed.
    #[default]
    Reject,
    /// Take a bare LF or CR as a line end, as if CRLF (Postfix's
    /// `normalize`); the end of data is still only `CRLF . CRLF`, so a dot
    /// line after a bare newline is data.
    Normalize,
}

/// One line from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Line<'a> {
    /// The line with its ending (LF, or none when the stream ended), in
    /// the caller's buffer.
    Text(&'a [u8]),
    /// Longer than the limit: read and dropped.
    TooLong,
}

/// The capacity [`read_line`]'s buffer keeps from one line to the next: a
/// buffer that held a longer line is let go of at the next line, so a
/// session's long lines do not pin their memory.
const KEEP_LINE_CAPACITY: usize = 4 << 10;

/// Reads one LF-ended line into `line` (which is cleared first and reused
/// from line to line, so a session's lines cost no allocation each),
/// keeping at most `max` bytes (plus CRLF); the rest of a longer line is
/// read and dropped, so memory stays bounded. `None` at the end of the
/// stream.
pub async fn read_line<'a, R: AsyncBufRead + Unpin>(
    r: &mut R,
    max: usize,
    line: &'a mut Vec<u8>,
) -> Result<Option<Line<'a>>, std::io::Error> {
    if line.capacity() > KEEP_LINE_CAPACITY {
        *line = Vec::new();
    }
    line.clear();
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
                line.clear();
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

/// How a line read by [`read_line`] ended, and whether it holds a bare CR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// CRLF, and no CR elsewhere.
    Crlf,
    /// A bare LF at the end, or a bare CR inside.
    Bare,
    /// No line end: the stream ended.
    None,
}

/// The content of `line` (without its ending) and how it ended.
pub fn split_ending(line: &[u8]) -> (&[u8], Ending) {
    let (content, ending) = match line.strip_suffix(b"\r\n") {
        Some(c) => (c, Ending::Crlf),
        None => match line.strip_suffix(b"\n") {
            Some(c) => (c, Ending::Bare),
            None => (line, Ending::None),
        },
    };
    if ending == Ending::Crlf && content.contains(&b'\r') {
        return (content, Ending::Bare);
    }
    (content, ending)
}

/// What one line of message data was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fed {
    /// `CRLF . CRLF`: the end of the data.
    End,
    /// Data, appended.
    Data,
    /// A bare LF or CR under [`BareNewline::Reject`]: the session must end.
    BareNewline,
}

/// Frames message data line by line. What it appends to the message is
/// its content: every line CRLF-ended, the client's dot-stuffing undone,
/// which is what `BDAT` carries as it is. [`stuffed`] gives it back as
/// `DATA` carries it, so no byte sequence a client sends can end the data,
/// or start a command, at the next hop. (Kept stuffed, as it was, the
/// message needed an unstuffed copy of itself for `BDAT`, outside the data
/// budget.)
#[derive(Debug, Clone)]
pub struct DataFramer {
    mode: BareNewline,
    /// The previous line ended with CRLF (the 354 counts as one).
    after_crlf: bool,
    /// A NUL byte was seen (RFC 5321 forbids it; the message is refused).
    nul: bool,
}

impl DataFramer {
    /// A framer for one message.
    pub fn new(mode: BareNewline) -> DataFramer {
        DataFramer { mode, after_crlf: true, nul: false }
    }

    /// Whether the data held a NUL byte.
    pub fn saw_nul(&self) -> bool {
        self.nul
    }

    /// Takes one line as [`read_line`] returned it (LF included) and
    /// appends its content to `out` (unless `discard`, for a message
    /// already refused).
    pub fn feed(&mut self, line: &[u8], out: &mut Vec<u8>, discard: bool) -> Fed {
        let (content, ending) = split_ending(line);
        if ending == Ending::Crlf && content == b"." && self.after_crlf {
            return Fed::End;
        }
        if ending == Ending::Bare && self.mode == BareNewline::Reject {
            return Fed::BareNewline;
        }
        if content.contains(&0) {
            self.nul = true;
        }
        // "CRLF . CRLF": what counts is how the previous line ended.
        self.after_crlf = line.ends_with(b"\r\n");
        if discard {
            return Fed::Data;
        }
        // Under `normalize`, a bare CR inside is a line end too.
        for piece in content.split(|b| *b == b'\r') {
            out.extend_from_slice(piece.strip_prefix(b".").unwrap_or(piece));
            out.extend_from_slice(b"\r\n");
        }
        Fed::Data
    }
}

/// Message content as [`DataFramer`] keeps it (CRLF-ended lines), as
/// `DATA` carries it (RFC 5321 4.5.2): the same bytes in order, with a `.`
/// before every line that starts with one. Given as pieces to write, so
/// that nothing is copied: the content's own slices, cut where a line
/// starts with a dot, and a `"."` before each of those. A message with no
/// such line is one piece.
pub fn stuffed(content: &[u8]) -> Stuffed<'_> {
    Stuffed { content, cuts: memchr::memmem::find_iter(content, b"\n."), start: 0, dot_next: content.first() == Some(&b'.') }
}

/// The pieces of [`stuffed`]. (A type of its own, not closures: a future
/// that holds it across an `.await` stays `Send`.)
#[derive(Debug)]
pub struct Stuffed<'a> {
    content: &'a [u8],
    /// Where each `\n.` is (the line after it starts with a dot), found by
    /// one searcher for the whole message.
    cuts: memchr::memmem::FindIter<'a, 'static>,
    /// Where the next piece of the content starts.
    start: usize,
    /// The next piece is the `"."` a line gets in front.
    dot_next: bool,
}

impl<'a> Iterator for Stuffed<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.dot_next {
            self.dot_next = false;
            return Some(b".");
        }
        let end = match self.cuts.next() {
            Some(newline) => {
                self.dot_next = true;
                newline + 1
            }
            None if self.start < self.content.len() => self.content.len(),
            None => return None,
        };
        let piece = &self.content[self.start..end];
        self.start = end;
        Some(piece)
    }
}

/// Why an envelope path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Not `FROM:<...>` / `TO:<...>`, or characters RFC 5321 does not allow.
    #[error("syntax")]
    Syntax,
    /// Over 254 bytes (RFC 5321 4.5.3.1.3: a path is at most 256 with its brackets).
    #[error("too long")]
    TooLong,
}

/// The longest address inside a path.
pub const MAX_ADDRESS: usize = 254;

/// Parses `FROM:<path> params` / `TO:<path> params` (`prefix` is `FROM:`
/// or `TO:`, matched without case): the address as the client wrote it
/// (quoted local parts keep their quotes; a source route is dropped, RFC
/// 5321 4.1.2) and the parameters. The address is a Mailbox of RFC 5321
/// (dot-string or quoted-string local part, domain or address literal),
/// with UTF-8 allowed where Postfix allows it, or a bare local part
/// (`<postmaster>`), or empty (`<>`).
pub fn parse_path<'a>(arg: &'a str, prefix: &str) -> Result<(String, &'a str), PathError> {
    let rest = arg.get(..prefix.len()).filter(|p| p.eq_ignore_ascii_case(prefix)).map(|_| &arg[prefix.len()..]).ok_or(PathError::Syntax)?;
    let rest = rest.trim_start_matches(' ').strip_prefix('<').ok_or(PathError::Syntax)?;
    let b = rest.as_bytes();
    let mut i = 0;
    // A-d-l ":" (source route): skipped.
    if b.first() == Some(&b'@') {
        let colon = rest.find(':').ok_or(PathError::Syntax)?;
        if rest[..colon].bytes().any(|c| !(c.is_ascii_alphanumeric() || matches!(c, b'@' | b',' | b'.' | b'-' | b'[' | b']'))) {
            return Err(PathError::Syntax);
        }
        i = colon + 1;
    }
    let start = i;
    if b.get(i) == Some(&b'"') {
        i += 1;
        loop {
            match b.get(i) {
                Some(b'"') => break,
                Some(b'\\') if matches!(b.get(i + 1), Some(32..=126)) => i += 2,
                Some(c) if (32..=126).contains(c) && *c != b'\\' || *c >= 0x80 => i += 1,
                _ => return Err(PathError::Syntax),
            }
        }
        i += 1;
    } else {
        let atext = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&c) || c >= 0x80;
        let dot_start = i;
        while let Some(&c) = b.get(i) {
            if atext(c) || c == b'.' {
                i += 1;
            } else {
                break;
            }
        }
        let local = &b[dot_start..i];
        if !local.is_empty() && (local[0] == b'.' || local[local.len() - 1] == b'.' || local.windows(2).any(|w| w == b"..")) {
            return Err(PathError::Syntax);
        }
    }
    let local_len = i - start;
    if b.get(i) == Some(&b'@') {
        if local_len == 0 {
            return Err(PathError::Syntax);
        }
        i += 1;
        let d = i;
        if b.get(i) == Some(&b'[') {
            while let Some(&c) = b.get(i) {
                i += 1;
                if c == b']' {
                    break;
                }
                if !(33..=126).contains(&c) || (c == b'[' && i - 1 != d) || c == b'\\' {
                    return Err(PathError::Syntax);
                }
            }
            if b[i - 1] != b']' {
                return Err(PathError::Syntax);
            }
        } else {
            while let Some(&c) = b.get(i) {
                if c.is_ascii_alphanumeric() || c == b'-' || c == b'.' || c >= 0x80 {
                    i += 1;
                } else {
                    break;
                }
            }
            let domain = &b[d..i];
            if domain.is_empty() || domain[0] == b'.' || domain.windows(2).any(|w| w == b"..") {
                return Err(PathError::Syntax);
            }
        }
    } else if start != 0 && local_len == 0 {
        // A source route with nothing after it.
        return Err(PathError::Syntax);
    }
    if b.get(i) != Some(&b'>') {
        return Err(PathError::Syntax);
    }
    let address = &rest[start..i];
    if address.len() > MAX_ADDRESS {
        return Err(PathError::TooLong);
    }
    let params = &rest[i + 1..];
    if !params.is_empty() && !params.starts_with(' ') {
        return Err(PathError::Syntax);
    }
    Ok((address.to_string(), params.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_parameters() {
        let ok = |a: &str, p: &str| parse_path(a, p).map(|(a, r)| (a, r.to_string()));
        assert_eq!(ok("FROM:<a@b.c> SIZE=10", "FROM:"), Ok(("a@b.c".into(), "SIZE=10".into())));
        assert_eq!(ok("from: <>", "FROM:"), Ok(("".into(), "".into())));
        assert_eq!(ok("TO:<@r1,@r2:u@d>", "TO:"), Ok(("u@d".into(), "".into())));
        assert_eq!(ok("TO:<\"a b\"@x.example>", "TO:"), Ok(("\"a b\"@x.example".into(), "".into())));
        assert_eq!(ok("TO:<\"a\\\"b>c\"@x>", "TO:"), Ok(("\"a\\\"b>c\"@x".into(), "".into())));
        assert_eq!(ok("TO:<Postmaster>", "TO:"), Ok(("Postmaster".into(), "".into())));
        assert_eq!(ok("TO:<u@[192.0.2.1]>", "TO:"), Ok(("u@[192.0.2.1]".into(), "".into())));
        assert_eq!(ok("TO:<jörg@bücher.example>", "TO:"), Ok(("jörg@bücher.example".into(), "".into())));
        for bad in [
            "TO:u@d",
            "TO:<u@d",
            "TO:<a\u{1}b@c>",
            "TO:<a b@c>",
            "TO:<a\tb@c>",
            "TO:<a\u{7f}@c>",
            "TO:<\"a\u{1}\"@c>",
            "TO:<\"open@c>",
            "TO:<@x>",
            "TO:<.a@x>",
            "TO:<a..b@x>",
            "TO:<a@>",
            "TO:<a@b c>",
            "TO:<a@b>x",
            "TO:<@r1:>",
        ] {
            assert_eq!(parse_path(bad, "TO:"), Err(PathError::Syntax), "{bad:?}");
        }
        let long = format!("TO:<{}@example.org>", "x".repeat(300));
        assert_eq!(parse_path(&long, "TO:"), Err(PathError::TooLong));
    }

    fn frame(mode: BareNewline, input: &[u8]) -> (Vec<Fed>, Vec<u8>) {
        let mut f = DataFramer::new(mode);
        let mut out = Vec::new();
        let mut steps = Vec::new();
        for line in input.split_inclusive(|b| *b == b'\n') {
            let s = f.feed(line, &mut out, false);
            steps.push(s);
            if s != Fed::Data {
                break;
            }
        }
        (steps, out)
    }

    #[test]
    fn only_crlf_dot_crlf_ends_the_data() {
        let (s, out) = frame(BareNewline::Reject, b"Subject: x\r\n\r\n..dot\r\n.x\r\n.\r\n");
        assert_eq!(s.last(), Some(&Fed::End));
        assert_eq!(out, b"Subject: x\r\n\r\n.dot\r\nx\r\n");
        assert_eq!(stuffed(&out).collect::<Vec<_>>().concat(), b"Subject: x\r\n\r\n..dot\r\nx\r\n");
        for smuggle in [&b"a\n.\r\n"[..], b"a\r\n.\n", b"a\n.\n", b"a\r.\r\n", b"a\r\n.\r\r\n"] {
            let (s, _) = frame(BareNewline::Reject, smuggle);
            assert_eq!(s.last(), Some(&Fed::BareNewline), "{smuggle:?}");
            let (s, out) = frame(BareNewline::Normalize, smuggle);
            assert!(s.iter().all(|s| *s == Fed::Data), "{smuggle:?}: {s:?}");
            // Whatever was sent, the output is CRLF lines, and as DATA
            // carries it no lone dot.
            assert!(out.split(|b| *b == b'\n').all(|l| l.is_empty() || (l.ends_with(b"\r") && !l[..l.len() - 1].contains(&b'\r'))));
            let sent = stuffed(&out).collect::<Vec<_>>().concat();
            assert!(!sent.windows(5).any(|w| w == b"\r\n.\r\n") && !sent.starts_with(b".\r\n"), "{smuggle:?}: {sent:?}");
        }
    }

    /// What [`stuffed`] must give, written the plain way: each line with a
    /// dot in front if it starts with one.
    fn stuffed_plainly(content: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for line in content.split_inclusive(|b| *b == b'\n') {
            if line.first() == Some(&b'.') {
                out.push(b'.');
            }
            out.extend_from_slice(line);
        }
        out
    }

    #[test]
    fn content_is_stuffed_as_data_carries_it_without_a_copy() {
        for c in [&b""[..], b".", b".\r\n", b"..\r\n", b"a\r\n.\r\nb.\r\n.c\r\n", b"\n.\n..", b"plain\r\n"] {
            assert_eq!(stuffed(c).collect::<Vec<_>>().concat(), stuffed_plainly(c), "{c:?}");
        }
        // A message with no line starting with a dot is one piece: itself.
        let plain = b"Subject: x\r\n\r\nbody.\r\n";
        assert!(matches!(stuffed(plain).collect::<Vec<_>>()[..], [p] if std::ptr::eq(p, &plain[..])));
        assert_eq!(stuffed(b"").count(), 0);
    }

    proptest::proptest! {
        #[test]
        fn stuffing_matches_the_plain_reading_and_undoes_the_framer(
            parts in proptest::collection::vec(proptest::sample::select(vec![".", "..", "a", "\r\n", "\n", "\r"]), 0..40),
        ) {
            let content = parts.concat().into_bytes();
            proptest::prop_assert_eq!(stuffed(&content).collect::<Vec<_>>().concat(), stuffed_plainly(&content));
            // What the framer keeps of client data, stuffed again, reads
            // back (through a framer) as the same content, and never holds
            // the end of the data before its end.
            let (_, kept) = frame(BareNewline::Normalize, &content);
            let sent = stuffed(&kept).collect::<Vec<_>>().concat();
            proptest::prop_assert!(!sent.windows(5).any(|w| w == b"\r\n.\r\n") && !sent.starts_with(b".\r\n"));
            let (steps, again) = frame(BareNewline::Reject, &[&sent[..], b".\r\n"].concat());
            proptest::prop_assert_eq!(steps.last(), Some(&Fed::End));
            proptest::prop_assert_eq!(again, kept);
        }
    }

    #[test]
    fn nul_is_noticed() {
        let mut f = DataFramer::new(BareNewline::Reject);
        let mut out = Vec::new();
        assert_eq!(f.feed(b".\0\r\n", &mut out, false), Fed::Data);
        assert!(f.saw_nul());
    }

    #[tokio::test]
    async fn long_lines_are_dropped_not_kept() {
        let input = [b'a'; 100_000];
        let mut r = tokio::io::BufReader::new(&input[..]);
        let mut line = Vec::new();
        assert!(matches!(read_line(&mut r, 10, &mut line).await.unwrap(), Some(Line::TooLong)), "cut off by the end of the stream");
        assert!(line.capacity() <= 12, "{}", line.capacity());
        let data = [vec![b'x'; 5000], b"\r\nNOOP\r\n".to_vec()].concat();
        let mut r = tokio::io::BufReader::new(&data[..]);
        assert!(matches!(read_line(&mut r, 512, &mut line).await.unwrap(), Some(Line::TooLong)));
        assert!(matches!(read_line(&mut r, 512, &mut line).await.unwrap(), Some(Line::Text(t)) if t == b"NOOP\r\n"));
        assert!(read_line(&mut r, 512, &mut line).await.unwrap().is_none());
    }

    /// The buffer is reused from line to line, and one that held a long
    /// line is let go of at the next.
    #[tokio::test]
    async fn the_line_buffer_is_reused_and_shrinks_after_a_long_line() {
        let long = [vec![b'x'; 20_000], b"\r\n".to_vec()].concat();
        let data = [b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n", &long[..], b"DATA\r\n"].concat();
        let mut r = tokio::io::BufReader::new(&data[..]);
        let mut line = Vec::new();
        assert!(
            matches!(read_line(&mut r, 64 << 10, &mut line).await.unwrap(), Some(Line::Text(t)) if t == b"MAIL FROM:<a@example.org>\r\n")
        );
        let (first, capacity) = (line.as_ptr(), line.capacity());
        assert!(
            matches!(read_line(&mut r, 64 << 10, &mut line).await.unwrap(), Some(Line::Text(t)) if t == b"RCPT TO:<b@example.org>\r\n")
        );
        assert_eq!((line.as_ptr(), line.capacity()), (first, capacity), "the same allocation");
        assert!(matches!(read_line(&mut r, 64 << 10, &mut line).await.unwrap(), Some(Line::Text(t)) if t == &long[..]));
        assert!(matches!(read_line(&mut r, 64 << 10, &mut line).await.unwrap(), Some(Line::Text(t)) if t == b"DATA\r\n"));
        assert!(line.capacity() <= KEEP_LINE_CAPACITY, "{}", line.capacity());
    }
}
