//! `greyhook replay`: a recorded JSON decision log fed through a candidate
//! filter chain offline, at the recorded times (a manual clock), on a fresh
//! store — the "what if" an operator runs before `greyhook reload`.
//!
//! Each recorded decision becomes the same hook call (connect, MAIL, RCPT
//! or DATA, with the recorded client, names, sender and recipients); the
//! chain's answer is compared with the recorded action, and each mail's
//! fate (passed at once, delayed and by how much, never passed) before and
//! after is compared through [`crate::report::outcomes`].
//!
//! What it cannot replay: the store as it was before the log starts (a
//! replay starts empty, so begin with a log from a fresh store or expect
//! the first day's "known" triplets to differ), DNS answers as they were
//! (the candidate asks the resolver it is given now), and clients that
//! would have behaved differently (a mail now accepted at once would not
//! have retried: the replay still plays the retries that happened).

use std::collections::HashMap;
use std::net::IpAddr;

use crate::domain::clock::{Clock, ManualClock};
use crate::domain::types::{AcceptedRecipient, Context, Message, Session, Transaction};
use crate::report::{MailOutcome, outcomes};
use crate::runtime::Chain;
use crate::session::audit::{DecisionRecord, action};

/// A mail whose fate the candidate changes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Change {
    /// The sender.
    pub sender: String,
    /// The recipient.
    pub recipient: String,
    /// What happened.
    pub before: MailOutcome,
    /// What would happen.
    pub after: MailOutcome,
}

/// What a replay found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Replayed {
    /// Decisions replayed.
    pub decisions: u64,
    /// Of those, answered with the recorded action (and retry time).
    pub same: u64,
    /// Decisions skipped (an unreadable client address).
    pub skipped: u64,
    /// Mails followed.
    pub mails: u64,
    /// Mails whose fate changes, sorted by sender and recipient.
    pub changes: Vec<Change>,
}

/// Replays `records` (in time order) through `chain`.
pub async fn replay(chain: &Chain, mut records: Vec<DecisionRecord>) -> Replayed {
    records.sort_by_key(|d| d.ts);
    let clock = ManualClock::new(records.first().map_or(0, |d| d.ts));
    let mut out = Replayed::default();
    let mut replayed = Vec::with_capacity(records.len());
    // Recipients the candidate accepted so far, per recorded session.
    let mut accepted: HashMap<String, (Option<String>, Vec<AcceptedRecipient>)> = HashMap::new();
    for d in &records {
        let Ok(client) = d.client.parse::<IpAddr>() else {
            out.skipped += 1;
            continue;
        };
        clock.set(d.ts);
        let sid = d.session.clone().unwrap_or_default();
        let mut session = Session::new(sid.clone(), client);
        session.client_name = d.client_name.clone();
        session.helo = d.helo.clone();
        let tx = accepted.entry(sid.clone()).or_default();
        if tx.0 != d.sender {
            *tx = (d.sender.clone(), Vec::new());
        }
        let recipients = if d.phase == "data" {
            d.recipients.iter().map(|r| AcceptedRecipient { address: r.clone(), policy_group: String::new() }).collect()
        } else {
            tx.1.clone()
        };
        let ctx = Context {
            session,
            transaction: Transaction { sender: if d.phase == "mail" { None } else { d.sender.clone() }, recipients },
            now: clock.now(),
        };
        let v = match (d.phase.as_str(), &d.recipient) {
            ("connect", _) => chain.on_connect(&ctx).await,
            ("ehlo", _) => chain.on_ehlo(&ctx).await.verdict,
            ("mail", _) => chain.on_mail(&ctx, d.sender.as_deref().unwrap_or("")).await,
            ("rcpt", Some(rc)) => chain.on_rcpt(&ctx, rc).await,
            ("data", _) => chain.on_data(&ctx, &Message::default()).await,
            _ => {
                out.skipped += 1;
                continue;
            }
        };
        if let (Some(rc), None) = (&d.recipient, v.reply()) {
            tx.1.push(AcceptedRecipient { address: rc.clone(), policy_group: v.policy_group.clone().unwrap_or_default() });
        }
        let mut now = d.clone();
        now.action = action(&v).to_string();
        now.retry = v.reply().and_then(|r| r.retry_after);
        now.code = v.reply().map(|r| r.code);
        out.decisions += 1;
        if now.action == d.action && now.retry == d.retry {
            out.same += 1;
        }
        replayed.push(now);
    }
    let (before, after) = (outcomes(&records), outcomes(&replayed));
    out.mails = before.len() as u64;
    for ((sender, recipient), b) in &before {
        let a = after.get(&(sender.clone(), recipient.clone())).copied().unwrap_or(MailOutcome::Other);
        if a != *b {
            out.changes.push(Change { sender: sender.clone(), recipient: recipient.clone(), before: *b, after: a });
        }
    }
    out
}

impl Replayed {
    /// The replay as text: the summary, then each changed mail side by side.
    pub fn text(&self) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        let _ = writeln!(
            o,
            "replayed {} decisions: {} the same, {} different{}",
            self.decisions,
            self.same,
            self.decisions - self.same,
            if self.skipped > 0 { format!(" ({} skipped)", self.skipped) } else { String::new() }
        );
        let count = |f: &dyn Fn(&Change) -> bool| self.changes.iter().filter(|c| f(c)).count();
        let _ = writeln!(
            o,
            "{} mails: {} unchanged; {} would now be delayed or stopped that were not; {} would now pass sooner; {} would now wait longer",
            self.mails,
            self.mails as usize - self.changes.len(),
            count(&|c| matches!(c.before, MailOutcome::Untouched | MailOutcome::Other)
                && matches!(c.after, MailOutcome::Delayed(_) | MailOutcome::Stopped)),
            count(&|c| sooner(c.before, c.after)),
            count(&|c| sooner(c.after, c.before)),
        );
        if !self.changes.is_empty() {
            let _ = writeln!(o, "\n{:<40} {:<28} {:<22} would happen", "sender", "recipient", "happened");
            for c in &self.changes {
                let _ = writeln!(o, "{:<40} {:<28} {:<22} {}", c.sender, c.recipient, c.before.to_string(), c.after);
            }
        }
        o
    }
}

/// Whether `b` lets the mail through sooner than `a`.
fn sooner(a: MailOutcome, b: MailOutcome) -> bool {
    let rank = |o: MailOutcome| match o {
        MailOutcome::Untouched => 0,
        MailOutcome::Delayed(s) => s.saturating_add(1),
        MailOutcome::Stopped | MailOutcome::Other => u64::MAX,
    };
    rank(b) < rank(a)
}
