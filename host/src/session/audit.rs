//! One log line per decision, at info, that an operator can grep (target
//! `greyhook::decision`), in the spirit of postgrey's:
//!
//! ```text
//! INFO greyhook::decision: action=greylist phase=rcpt client=192.0.2.1 client_name=mx.example.org sender=<a@example.org> recipient=<b@example.com> code=451 retry=300
//! INFO greyhook::decision: action=pass phase=rcpt client=192.0.2.1 ... header="X-Greylist: delayed 312 seconds by greyhook" group=default
//! ```
//!
//! With `[log] decisions = "json"` the line's message is one JSON object
//! instead, for `greyhook report`, `greyhook replay` and other programs
//! ([`DecisionRecord`]):
//!
//! ```text
//! INFO greyhook::decision: {"v":1,"ts":1700000000,"front_end":"policy","action":"greylist","phase":"rcpt","client":"192.0.2.1",...}
//! ```

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use crate::domain::types::{Context, Decision, Phase, Verdict};

/// How decision lines are written (`[log] decisions`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecisionFormat {
    /// `key=value` words, postgrey-like (the default).
    #[default]
    Text,
    /// One JSON object ([`DecisionRecord`]).
    Json,
}

static JSON: AtomicBool = AtomicBool::new(false);

/// Sets the format of every decision line the process writes (the
/// daemon does, from `[log] decisions`).
pub fn set_format(f: DecisionFormat) {
    JSON.store(f == DecisionFormat::Json, Ordering::Relaxed);
}

/// Where decision lines go when they bypass tracing's formatter
/// ([`write_decisions_to`]).
type Sink = Box<dyn Fn(&[u8]) + Send + Sync>;
static DIRECT: OnceLock<Sink> = OnceLock::new();

/// Hands every decision line to `sink` as a whole line, already formatted
/// as `tracing_subscriber::fmt` (no ANSI colours) formats an event of
/// target `greyhook::decision` (`2026-11-30T12:00:00.000000Z  INFO
/// greyhook::decision: action=…`, then `\n`), instead of sending it through
/// tracing's formatter. tracing's `fmt` layer copies a message into its
/// buffer a character at a time (its ANSI escaping) and a decision line
/// cost a policy request ~8k instructions that way; here it is formatted
/// once into a reused buffer. Whether a line is written still follows the
/// subscriber's filter (`GREYHOOK_LOG`). Control characters in a line,
/// which the filter's output or a client's bytes might carry, are written
/// as `\xHH` (C1 as `\u{HH}`), newlines included, so no line can be
/// forged. Set once, by the binary, with the writer its subscriber uses
/// (the order of lines between the two is kept by that writer); false if
/// a sink was already set.
pub fn write_decisions_to(sink: impl Fn(&[u8]) + Send + Sync + 'static) -> bool {
    DIRECT.set(Box::new(sink)).is_ok()
}

/// Appends `now` as tracing's `fmt` writes its timestamps
/// (`2026-11-30T12:00:00.000000Z`): its fields written into one fixed
/// buffer, pushed at once (a `push_digits` a field cost ~800 instructions a
/// line).
fn write_timestamp(out: &mut String, now: time::OffsetDateTime) {
    let mut b = *b"0000-00-00T00:00:00.000000Z";
    // Writes `v` as the last digits of `field` (zero-padded: the template's
    // zeros), dropping digits that do not fit.
    fn put(field: &mut [u8], mut v: u32) {
        for d in field.iter_mut().rev() {
            *d = b'0' + (v % 10) as u8;
            v /= 10;
        }
    }
    put(&mut b[0..4], u32::try_from(now.year()).unwrap_or(0));
    put(&mut b[5..7], u32::from(u8::from(now.month())));
    put(&mut b[8..10], u32::from(now.day()));
    put(&mut b[11..13], u32::from(now.hour()));
    put(&mut b[14..16], u32::from(now.minute()));
    put(&mut b[17..19], u32::from(now.second()));
    put(&mut b[20..26], now.microsecond());
    // Digits and the template's ASCII: always UTF-8.
    out.push_str(std::str::from_utf8(&b).unwrap_or_default());
}

/// Appends `text` with its control characters written as escapes, and the
/// characters that stand for a peer's bytes that were not UTF-8
/// ([`crate::domain::text`]) as the bytes they stand for (`\xe9`).
fn push_escaped(out: &mut String, text: &str) {
    use std::fmt::Write;
    // No control character (`reply::control_free`) and no byte character
    // (they begin with 0xEE, `text::byte_of`): a byte scan (vectorised)
    // finds there are none, the common case.
    use crate::domain::reply::{all_bytes, control_free};
    if all_bytes(text.as_bytes(), |b| control_free(b) & (b != 0xee)) {
        out.push_str(text);
        return;
    }
    for c in text.chars() {
        match c as u32 {
            // Writing into a String cannot fail.
            n @ (0..=0x1f | 0x7f) => {
                let _ = write!(out, "\\x{n:02x}");
            }
            _ if let Some(b) = crate::domain::text::byte_of(c) => {
                let _ = write!(out, "\\x{b:02x}");
            }
            n @ 0x80..=0x9f => {
                let _ = write!(out, "\\u{{{n:x}}}");
            }
            _ => out.push(c),
        }
    }
}

/// One decision as the JSON decision log writes it (version 1). Fields
/// that do not apply are left out.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DecisionRecord {
    /// The format's version: 1.
    pub v: u32,
    /// When, Unix seconds (the `now` the filters were given).
    pub ts: u64,
    /// The front end (`policy`, `milter`, `smtp`, `opensmtpd`, `embedded`).
    #[serde(default)]
    pub front_end: String,
    /// As in the text line: `greylist`, `pass`, `dunno`, `tempfail`, `reject`, `policy-group`.
    pub action: String,
    /// `connect`, `ehlo`, `mail`, `rcpt`, `data`.
    pub phase: String,
    /// The client's address.
    pub client: String,
    /// Its forward-confirmed name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_name: Option<String>,
    /// Its HELO name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub helo: Option<String>,
    /// The envelope sender (empty for `<>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
    /// The recipient (RCPT decisions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient: Option<String>,
    /// The accepted recipients (DATA decisions).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recipients: Vec<String>,
    /// The reply code, when the verdict is a reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u16>,
    /// The retry hint, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<u32>,
    /// The first header the verdict adds (`X-Greylist: delayed …`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// The recipient's policy group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The session's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
}

impl DecisionRecord {
    /// The record of a decision.
    pub fn new(front_end: &str, phase: Phase, ctx: &Context, recipient: Option<&str>, v: &Verdict) -> DecisionRecord {
        let s = &ctx.session;
        let reply = v.reply();
        DecisionRecord {
            v: 1,
            ts: ctx.now,
            front_end: front_end.to_string(),
            action: action(v).to_string(),
            phase: phase.as_str().to_string(),
            client: s.client_address.to_string(),
            client_name: s.client_name.clone(),
            helo: s.helo.clone(),
            sender: ctx.transaction.sender.clone(),
            recipient: recipient.map(str::to_string),
            recipients: if phase == Phase::Data {
                ctx.transaction.recipients.iter().map(|r| r.address.clone()).collect()
            } else {
                Vec::new()
            },
            code: reply.map(|r| r.code),
            retry: reply.and_then(|r| r.retry_after),
            header: v.add_headers.first().map(|h| format!("{}: {}", h.name, h.value)),
            group: v.policy_group.clone(),
            session: Some(s.id.clone()).filter(|i| !i.is_empty()),
        }
    }

    /// Reads the record from a log line: the JSON object after the
    /// `greyhook::decision:` target (or the whole line); `None` for any
    /// other line.
    pub fn parse_line(line: &str) -> Option<DecisionRecord> {
        const TARGET: &str = "greyhook::decision: ";
        let json = match line.find(TARGET) {
            // Only where the target stands: after a timestamp and a level,
            // not inside another line's message (a filter's log line that
            // quotes a peer's text could otherwise forge a decision).
            Some(i) if i <= 64 && !line[..i].contains("::") && !line[..i].contains(['"', '{', '<', '@']) => &line[i + TARGET.len()..],
            Some(_) => return None,
            None => line,
        };
        let json = json.trim();
        if !json.starts_with('{') {
            return None;
        }
        serde_json::from_str(json).ok().filter(|r: &DecisionRecord| r.v == 1)
    }
}

/// The short name of a verdict's action.
pub fn action(v: &Verdict) -> &'static str {
    match &v.decision {
        Decision::Continue if v.add_headers.is_empty() => "dunno",
        Decision::Continue | Decision::Accept => "pass",
        // Seed 000: a recipient of another policy group, sent to a new
        // transaction at once (`retry=00:00:00`), is not greylisting.
        Decision::Tempfail(r) if r.retry_after == Some(0) && v.policy_group.is_some() => "policy-group",
        // Greylisting states its delay; a tempfail without one is something
        // else (the failure policy answering for a failed filter, or a
        // filter's own temporary refusal), and an operator must tell them apart.
        Decision::Tempfail(r) if r.retry_after.is_none() => "tempfail",
        Decision::Tempfail(_) => "greylist",
        Decision::Reject(_) => "reject",
    }
}

/// Logs one decision (from front end `front_end`).
pub fn log_decision(front_end: &str, phase: Phase, ctx: &Context, recipient: Option<&str>, v: &Verdict) {
    if !tracing::enabled!(target: "greyhook::decision", tracing::Level::INFO) {
        return;
    }
    // Written into buffers kept per thread, no allocation per line or per
    // field (a decision line was ~14% of a policy request's instructions
    // when it was built from seven `format!`s).
    thread_local! {
        static LINE: std::cell::RefCell<(String, String)> = const { std::cell::RefCell::new((String::new(), String::new())) };
    }
    LINE.with(|cell| {
        let Ok(mut bufs) = cell.try_borrow_mut() else { return };
        let (text, line) = &mut *bufs;
        text.clear();
        if JSON.load(Ordering::Relaxed) {
            let r = DecisionRecord::new(front_end, phase, ctx, recipient, v);
            // Serialising plain strings and numbers cannot fail.
            text.push_str(&serde_json::to_string(&r).unwrap_or_default());
        } else {
            write_text(text, phase, ctx, recipient, v);
        }
        match DIRECT.get() {
            Some(sink) => {
                line.clear();
                write_timestamp(line, time::OffsetDateTime::now_utc());
                line.push_str("  INFO greyhook::decision: ");
                push_escaped(line, text);
                line.push('\n');
                sink(line.as_bytes());
            }
            None => tracing::info!(target: "greyhook::decision", "{}", text.as_str()),
        }
        for b in [text, line] {
            if b.capacity() > 4096 {
                // One long line does not keep its memory on every thread.
                *b = String::new();
            }
        }
    });
}

/// The text form of a decision line.
fn write_text(line: &mut String, phase: Phase, ctx: &Context, recipient: Option<&str>, v: &Verdict) {
    use crate::domain::retry::push_digits;
    let s = &ctx.session;
    // Strings pushed as they are, numbers by `push_digits`: `write!` cost
    // ~150 instructions a field.
    for part in ["action=", action(v), " phase=", phase.as_str(), " client="] {
        line.push_str(part);
    }
    // Without `fmt` for IPv4 (~1 000 instructions a line).
    crate::domain::write_ip(s.client_address, |t| line.push_str(t));
    if let Some(n) = &s.client_name {
        line.push_str(" client_name=");
        line.push_str(n);
    }
    if let Some(snd) = &ctx.transaction.sender {
        for part in [" sender=<", snd, ">"] {
            line.push_str(part);
        }
    }
    if let Some(r) = recipient {
        for part in [" recipient=<", r, ">"] {
            line.push_str(part);
        }
    }
    if let Some(r) = v.reply() {
        line.push_str(" code=");
        push_digits(line, u64::from(r.code), 0);
        if let Some(t) = r.retry_after {
            line.push_str(" retry=");
            push_digits(line, u64::from(t), 0);
        }
    }
    if let Some(h) = v.add_headers.first() {
        for part in [" header=\"", &h.name, ": ", &h.value, "\""] {
            line.push_str(part);
        }
    }
    if let Some(g) = &v.policy_group {
        line.push_str(" group=");
        line.push_str(g);
    }
    if !s.id.is_empty() {
        line.push_str(" session=");
        line.push_str(&s.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_wherever_they_are() {
        for (c, escaped) in [('\n', "\\x0a"), ('\u{7f}', "\\x7f"), ('\u{85}', "\\u{85}"), ('\u{efe9}', "\\xe9")] {
            for at in [0, 31, 32, 33, 64, 90] {
                let mut text = "x".repeat(100);
                text.insert(at, c);
                let mut out = String::new();
                push_escaped(&mut out, &text);
                assert_eq!(out, format!("{}{escaped}{}", &text[..at], &text[at + c.len_utf8()..]), "{c:?} at {at}");
            }
        }
        let mut out = String::new();
        push_escaped(&mut out, "plain é ünï \u{e000}\u{ef7f}");
        assert_eq!(out, "plain é ünï \u{e000}\u{ef7f}");
    }

    #[test]
    fn timestamps_are_written_as_tracing_writes_them() {
        for (unix_nanos, want) in [
            (1_764_504_000_123_456_789i128, "2025-11-30T12:00:00.123456Z"),
            (4_102_444_799_000_001_000, "2099-12-31T23:59:59.000001Z"),
            (0, "1970-01-01T00:00:00.000000Z"),
        ] {
            let mut s = String::from(">");
            write_timestamp(&mut s, time::OffsetDateTime::from_unix_timestamp_nanos(unix_nanos).unwrap());
            assert_eq!(s, format!(">{want}"));
        }
    }

    #[test]
    fn only_real_decision_lines_are_read() {
        let real =
            r#"2026-11-30T12:00:00.000000Z  INFO greyhook::decision: {"v":1,"ts":5,"action":"pass","phase":"rcpt","client":"192.0.2.1"}"#;
        assert_eq!(DecisionRecord::parse_line(real).map(|r| r.ts), Some(5));
        let bare = r#"{"v":1,"ts":6,"action":"pass","phase":"rcpt","client":"192.0.2.1"}"#;
        assert_eq!(DecisionRecord::parse_line(bare).map(|r| r.ts), Some(6));
        // A filter's line quoting a peer's sender that imitates one.
        let forged = r#"2026-11-30T12:00:00Z  INFO greyhook::filter: session 1: sender keyed on its raw bytes: x greyhook::decision: {"v":1,"ts":7,"action":"pass","phase":"rcpt","client":"192.0.2.1"}"#;
        assert_eq!(DecisionRecord::parse_line(forged), None);
        assert_eq!(DecisionRecord::parse_line("INFO greyhook::decision: action=pass phase=rcpt"), None);
        assert_eq!(DecisionRecord::parse_line(r#"{"v":2,"ts":1}"#), None);
    }
}
