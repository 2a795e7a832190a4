//! `greyhook simulate`: replays a scripted SMTP session through the
//! configured filter chain and shows the replies as a client would see
//! them, so an operator can try a policy before deploying it.
//!
//! A plain script has one command a line (`#` starts a comment):
//!
//! ```text
//! CONNECT 192.0.2.1 mail.example.org   # client address, optional verified name
//! EHLO mail.example.org
//! MAIL FROM:<alice@example.org>
//! RCPT TO:<bob@example.com>
//! DATA <id-1@example.org>              # optional Message-ID
//! QUIT
//! WAIT 5m                              # the clock moves on (s, m, h, d)
//! AT 600                               # the clock stands at start + 600 s
//! AUTH alice                           # the session is authenticated as alice
//! RSET
//! ```
//!
//! A line may start with `@SECONDS` to set the time for that command. JSON
//! scripts are an array of events `{"at": 300, "command": "RCPT TO:<b@c>"}`
//! (`at` optional), with the same commands.

use std::net::IpAddr;
use std::sync::Arc;

use thiserror::Error;

use greyhook::Chain;
use greyhook::clock::{Clock, ManualClock};
use greyhook::reply::render_lines;
use greyhook::session::{Hooks, SmtpSession, keep_headers};
use greyhook::types::{Decision, Header, Message, Verdict};

/// A script that cannot be run.
#[derive(Debug, Error)]
#[error("script line {line}: {message}")]
pub struct ScriptError {
    /// 1-based line (or event) number.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// One command at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Absolute offset from the start, seconds, if given.
    pub at: Option<u64>,
    /// The command line.
    pub command: String,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonEvent {
    at: Option<u64>,
    command: String,
}

/// Longest script line.
const MAX_LINE: usize = 4096;
/// Most events in a script.
const MAX_EVENTS: usize = 100_000;

/// Parses a script: JSON if it starts with `[`, else plain.
pub fn parse_script(text: &str) -> Result<Vec<Event>, ScriptError> {
    if text.trim_start().starts_with('[') {
        let ev: Vec<JsonEvent> = serde_json::from_str(text).map_err(|e| ScriptError { line: e.line(), message: e.to_string() })?;
        if ev.len() > MAX_EVENTS {
            return Err(ScriptError { line: MAX_EVENTS, message: "too many events".into() });
        }
        return Ok(ev.into_iter().map(|e| Event { at: e.at, command: e.command }).collect());
    }
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let err = |m: &str| ScriptError { line: i + 1, message: m.to_string() };
        if raw.len() > MAX_LINE || out.len() >= MAX_EVENTS {
            return Err(err("line too long or too many lines"));
        }
        let line = raw.split(" #").next().unwrap_or("").trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (at, command) = match line.strip_prefix('@') {
            Some(rest) => {
                let (t, c) = rest.split_once(char::is_whitespace).ok_or_else(|| err("`@SECONDS` needs a command after it"))?;
                (Some(t.parse().map_err(|_| err("`@` must be followed by whole seconds"))?), c.trim().to_string())
            }
            None => (None, line.to_string()),
        };
        out.push(Event { at, command });
    }
    Ok(out)
}

fn path_arg(arg: &str, prefix: &str) -> Option<String> {
    let rest = arg.get(..prefix.len()).filter(|p| p.eq_ignore_ascii_case(prefix)).map(|_| &arg[prefix.len()..])?;
    let rest = rest.trim();
    let addr = rest.strip_prefix('<')?.split('>').next()?;
    Some(addr.to_string())
}

fn duration(s: &str) -> Option<u64> {
    let s = s.trim();
    let (n, unit) = s.find(|c: char| !c.is_ascii_digit()).map_or((s, ""), |i| (&s[..i], &s[i..]));
    let n: u64 = n.parse().ok()?;
    n.checked_mul(match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    })
}

/// Runs `events` through `chain` with the clock starting at `start`, and
/// returns the transcript (`C:` and `S:` lines, and `H:` for headers the
/// filters add to an accepted message). Each `CONNECT` opens an
/// [`SmtpSession`], the same session model the front ends drive.
pub async fn run(chain: &Chain, events: &[Event], start: u64) -> Result<Vec<String>, ScriptError> {
    let clock = Arc::new(ManualClock::new(start));
    let hooks = Hooks { chain: chain.clone(), clock: clock.clone(), resolver: None, front_end: Hooks::EMBEDDED };
    let mut out = Vec::new();
    let mut session: Option<SmtpSession> = None;
    let mut headers: Vec<Header> = Vec::new();
    let mut banner_refused = false;
    for (i, ev) in events.iter().enumerate() {
        let err = |m: String| ScriptError { line: i + 1, message: m };
        if let Some(at) = ev.at {
            clock.set(start.saturating_add(at));
        }
        let (verb, arg) = ev.command.split_once(char::is_whitespace).map_or((ev.command.as_str(), ""), |(v, a)| (v, a.trim()));
        let verb = verb.to_ascii_uppercase();
        match verb.as_str() {
            "WAIT" => {
                let d = duration(arg).ok_or_else(|| err(format!("WAIT {arg:?}: expected e.g. 300, 90s, 5m, 2h, 1d")))?;
                clock.set(clock.now().saturating_add(d));
                out.push(format!("-- {d} s later"));
                continue;
            }
            "AT" => {
                clock.set(start.saturating_add(arg.parse().map_err(|_| err("AT takes whole seconds".into()))?));
                continue;
            }
            "CONNECT" => {
                let mut words = arg.split_whitespace();
                let ip: IpAddr =
                    words.next().and_then(|w| w.parse().ok()).ok_or_else(|| err("CONNECT needs a client IP address".into()))?;
                let mut s = SmtpSession::new(hooks.clone(), format!("sim-{}", i + 1), ip);
                s.session_mut().client_name = words.next().map(str::to_string);
                out.push(format!("-- connect from {ip}"));
                let v = s.connect().await;
                banner_refused = v.reply().is_some();
                show(&mut out, &v, "220 greyhook ESMTP (simulation)");
                headers.clear();
                session = Some(s);
                continue;
            }
            _ => {}
        }
        let s = session.as_mut().ok_or_else(|| err(format!("{verb} before CONNECT")))?;
        out.push(format!("C: {}", ev.command));
        if banner_refused && verb != "QUIT" {
            out.push("S: 421 4.7.1 the connection was refused at the greeting".into());
            continue;
        }
        match verb.as_str() {
            "EHLO" | "HELO" => {
                let v = s.ehlo(arg).await;
                headers.clear();
                if v.verdict.reply().is_some() {
                    show(&mut out, &v.verdict, "");
                } else if verb == "HELO" {
                    out.push("S: 250 greyhook".into());
                } else {
                    let mut lines = vec!["greyhook".to_string()];
                    lines.extend(v.keywords.iter().cloned());
                    lines.push("PIPELINING".into());
                    let n = lines.len();
                    for (j, l) in lines.iter().enumerate() {
                        out.push(format!("S: 250{}{l}", if j + 1 == n { ' ' } else { '-' }));
                    }
                }
            }
            "AUTH" => {
                s.session_mut().auth_user = Some(arg.to_string());
                out.push("S: 235 2.7.0 Authentication successful".into());
            }
            "MAIL" => {
                let from = path_arg(arg, "FROM:").ok_or_else(|| err("expected MAIL FROM:<address>".into()))?;
                headers.clear();
                let v = s.mail(&from).await;
                if show(&mut out, &v, "250 2.1.0 Ok") {
                    keep_headers(&mut headers, &v);
                }
            }
            "RCPT" => {
                let to = path_arg(arg, "TO:").ok_or_else(|| err("expected RCPT TO:<address>".into()))?;
                if s.transaction().sender.is_none() {
                    out.push("S: 503 5.5.1 Error: need MAIL command".into());
                    continue;
                }
                let v = s.rcpt(&to).await;
                if show(&mut out, &v, "250 2.1.5 Ok") {
                    keep_headers(&mut headers, &v);
                }
            }
            "DATA" => {
                if s.transaction().recipients.is_empty() {
                    out.push("S: 554 5.5.1 Error: no valid recipients".into());
                    continue;
                }
                out.push("S: 354 End data with <CR><LF>.<CR><LF>".into());
                out.push("C: (message)".into());
                let message_id = (!arg.is_empty()).then(|| arg.to_string());
                let msg = Message { message_id, headers: Vec::new() };
                let v = s.data(&msg).await;
                if show(&mut out, &v, "250 2.0.0 Ok: queued") {
                    keep_headers(&mut headers, &v);
                    out.extend(headers.iter().map(|h| format!("H: {}: {}", h.name, h.value)));
                }
                s.reset();
                headers.clear();
            }
            "RSET" => {
                s.reset();
                headers.clear();
                out.push("S: 250 2.0.0 Ok".into());
            }
            "QUIT" => {
                out.push("S: 221 2.0.0 Bye".into());
                session = None;
            }
            _ => return Err(err(format!("unknown command {verb:?}"))),
        }
    }
    Ok(out)
}

/// Prints the verdict's reply, or `ok` if it has none; true if accepted.
fn show(out: &mut Vec<String>, v: &Verdict, ok: &str) -> bool {
    match &v.decision {
        Decision::Tempfail(r) | Decision::Reject(r) => {
            out.extend(render_lines(r).into_iter().map(|l| format!("S: {l}")));
            false
        }
        Decision::Continue | Decision::Accept => {
            if !ok.is_empty() {
                out.push(format!("S: {ok}"));
            }
            true
        }
    }
}
