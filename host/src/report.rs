//! `greyhook report`: what greylisting did, from the JSON decision log
//! (`[log] decisions = "json"`, [`DecisionRecord`]) — in the spirit of
//! `postgreyreport` and `sqlgrey-logstats`, as text or as one
//! self-contained HTML page with inline SVG charts.
//!
//! A *mail* here is a (sender, recipient) pair, followed across client
//! addresses: greylisting delays it from its first deferral to its first
//! pass after one, and stops it if it never passes. The networks (/24,
//! /64) it was deferred from tell a sender farm that retries from many
//! addresses.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write;
use std::net::IpAddr;

use crate::session::audit::DecisionRecord;

/// Most entries in each "most" list.
pub const TOP: usize = 10;

/// Most distinct mails followed (the log of a busy day fits; past it, new
/// mails are counted but not followed, and the report says so).
pub const MAX_MAILS: usize = 2_000_000;

/// Delay buckets: upper bounds in seconds and their names.
const DELAY_BUCKETS: [(u64, &str); 8] = [
    (60, "< 1 min"),
    (300, "1-5 min"),
    (600, "5-10 min"),
    (1800, "10-30 min"),
    (3600, "30-60 min"),
    (4 * 3600, "1-4 h"),
    (12 * 3600, "4-12 h"),
    (u64::MAX, "> 12 h"),
];

#[derive(Default)]
struct Mail {
    first_deferred: Option<u64>,
    hint: Option<u32>,
    passed: Option<u64>,
    networks: BTreeSet<String>,
    client_at_pass: Option<String>,
}

/// The client's network as greylisting sees it: /24 for IPv4, /64 for IPv6.
pub fn network(client: &str) -> String {
    match client.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => {
            let o = a.octets();
            format!("{}.{}.{}.0/24", o[0], o[1], o[2])
        }
        Ok(IpAddr::V6(a)) => {
            let s = a.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        Err(_) => client.to_string(),
    }
}

fn domain(address: &str) -> String {
    match address.rsplit_once('@') {
        Some((_, d)) => d.to_ascii_lowercase(),
        None if address.is_empty() => "<>".into(),
        None => address.to_ascii_lowercase(),
    }
}

/// What the report says.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Report {
    /// Decision lines read.
    pub decisions: u64,
    /// Decisions by action.
    pub by_action: BTreeMap<String, u64>,
    /// First and last time in the log, Unix seconds.
    pub span: Option<(u64, u64)>,
    /// Mails deferred at least once.
    pub greylisted: u64,
    /// Of those, never passed: what greylisting stopped.
    pub stopped: u64,
    /// Of those, passed later.
    pub delayed: u64,
    /// Mails that passed without being deferred in this log.
    pub passed_untouched: u64,
    /// Delays of the delayed mails by bucket (name, count).
    pub delay_distribution: Vec<(String, u64)>,
    /// Median and 95th percentile delay, seconds.
    pub delay_median: u64,
    /// 95th percentile delay, seconds.
    pub delay_p95: u64,
    /// Sender domains by total delay suffered (domain, seconds, mails).
    pub delayed_domains: Vec<(String, u64, u64)>,
    /// Senders by total delay suffered (address, seconds, mails).
    pub delayed_senders: Vec<(String, u64, u64)>,
    /// Sender domains whose mails were deferred from several networks
    /// (domain, most networks for one mail, mails so deferred).
    pub farms: Vec<(String, usize, u64)>,
    /// Of the delayed mails that were told a retry time, how many came
    /// back within a minute of it (followed the hint) and how many later.
    pub hint_followed: u64,
    /// Came back later than a minute after the hint.
    pub hint_late: u64,
    /// Client networks that followed the hint most (network, mails).
    pub hint_clients: Vec<(String, u64)>,
    /// Mails not followed because of [`MAX_MAILS`].
    pub not_followed: u64,
}

/// Follows the mails `d` is about; how many it could not follow (past [`MAX_MAILS`]).
fn track(mails: &mut HashMap<(String, String), Mail>, d: &DecisionRecord) -> u64 {
    let sender = d.sender.clone().unwrap_or_default().to_ascii_lowercase();
    let recipients: Vec<String> = match (&d.recipient, d.phase.as_str()) {
        (Some(rc), _) => vec![rc.clone()],
        (None, "data") => d.recipients.clone(),
        _ => return 0,
    };
    let mut lost = 0;
    for rc in recipients {
        let key = (sender.clone(), rc.to_ascii_lowercase());
        let len = mails.len();
        let m = match mails.get_mut(&key) {
            Some(m) => m,
            None if len >= MAX_MAILS => {
                lost += 1;
                continue;
            }
            None => mails.entry(key).or_default(),
        };
        match d.action.as_str() {
            "greylist" if m.passed.is_none() => {
                m.first_deferred.get_or_insert(d.ts);
                if d.retry.is_some() {
                    m.hint = d.retry;
                }
                m.networks.insert(network(&d.client));
            }
            "pass" | "dunno" if m.passed.is_none() => {
                m.passed = Some(d.ts);
                m.client_at_pass = Some(network(&d.client));
            }
            _ => {}
        }
    }
    lost
}

/// What greylisting did to one mail (a sender, recipient pair).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MailOutcome {
    /// Passed without a deferral.
    Untouched,
    /// Deferred, then passed this many seconds after the first deferral.
    Delayed(u64),
    /// Deferred and never passed.
    Stopped,
    /// Neither deferred nor passed (rejected, or only a tempfail).
    Other,
}

impl std::fmt::Display for MailOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MailOutcome::Untouched => f.write_str("passed at once"),
            MailOutcome::Delayed(s) => write!(f, "delayed {}", human(*s)),
            MailOutcome::Stopped => f.write_str("never passed"),
            MailOutcome::Other => f.write_str("neither"),
        }
    }
}

/// Each mail's outcome in these records, by (sender, recipient), lowercase.
pub fn outcomes(records: &[DecisionRecord]) -> BTreeMap<(String, String), MailOutcome> {
    let mut sorted: Vec<&DecisionRecord> = records.iter().collect();
    sorted.sort_by_key(|d| d.ts);
    let mut mails = HashMap::new();
    for d in sorted {
        track(&mut mails, d);
    }
    mails
        .into_iter()
        .map(|(k, m)| {
            let o = match (m.first_deferred, m.passed) {
                (Some(f), Some(p)) => MailOutcome::Delayed(p.saturating_sub(f)),
                (Some(_), None) => MailOutcome::Stopped,
                (None, Some(_)) => MailOutcome::Untouched,
                (None, None) => MailOutcome::Other,
            };
            (k, o)
        })
        .collect()
}

/// Builds the report from decision records (in log order).
pub fn build(records: impl IntoIterator<Item = DecisionRecord>) -> Report {
    let mut r = Report::default();
    let mut mails: HashMap<(String, String), Mail> = HashMap::new();
    // Several files, or a journal merged from hosts: in time order (stable,
    // so one second's lines keep their order).
    let mut records: Vec<DecisionRecord> = records.into_iter().collect();
    records.sort_by_key(|d| d.ts);
    for d in records {
        r.decisions += 1;
        *r.by_action.entry(d.action.clone()).or_default() += 1;
        r.span = Some(r.span.map_or((d.ts, d.ts), |(a, b)| (a.min(d.ts), b.max(d.ts))));
        r.not_followed += track(&mut mails, &d);
    }
    let mut delays = Vec::new();
    let mut by_domain: HashMap<String, (u64, u64)> = HashMap::new();
    let mut by_sender: HashMap<String, (u64, u64)> = HashMap::new();
    let mut farms: HashMap<String, (usize, u64)> = HashMap::new();
    let mut hint_clients: HashMap<String, u64> = HashMap::new();
    for ((sender, _), m) in &mails {
        let Some(first) = m.first_deferred else {
            r.passed_untouched += u64::from(m.passed.is_some());
            continue;
        };
        r.greylisted += 1;
        if m.networks.len() >= 3 {
            let f = farms.entry(domain(sender)).or_default();
            f.0 = f.0.max(m.networks.len());
            f.1 += 1;
        }
        match m.passed {
            None => r.stopped += 1,
            Some(p) => {
                r.delayed += 1;
                let delay = p.saturating_sub(first);
                delays.push(delay);
                let e = by_domain.entry(domain(sender)).or_default();
                e.0 += delay;
                e.1 += 1;
                let e = by_sender.entry(if sender.is_empty() { "<>".into() } else { sender.clone() }).or_default();
                e.0 += delay;
                e.1 += 1;
                if let Some(h) = m.hint {
                    if delay <= u64::from(h) + 60 {
                        r.hint_followed += 1;
                        *hint_clients.entry(m.client_at_pass.clone().unwrap_or_default()).or_default() += 1;
                    } else {
                        r.hint_late += 1;
                    }
                }
            }
        }
    }
    delays.sort_unstable();
    let pct = |p: f64| delays.get(((delays.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(0);
    r.delay_median = pct(0.5);
    r.delay_p95 = pct(0.95);
    r.delay_distribution = DELAY_BUCKETS
        .iter()
        .enumerate()
        .map(|(i, (hi, name))| {
            let lo = if i == 0 { 0 } else { DELAY_BUCKETS[i - 1].0 };
            (name.to_string(), delays.iter().filter(|d| **d >= lo && **d < *hi).count() as u64)
        })
        .collect();
    let top = |m: HashMap<String, (u64, u64)>| {
        let mut v: Vec<(String, u64, u64)> = m.into_iter().map(|(k, (s, n))| (k, s, n)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v.truncate(TOP);
        v
    };
    r.delayed_domains = top(by_domain);
    r.delayed_senders = top(by_sender);
    let mut f: Vec<(String, usize, u64)> = farms.into_iter().map(|(k, (n, m))| (k, n, m)).collect();
    f.sort_by(|a, b| b.2.cmp(&a.2).then(b.1.cmp(&a.1)).then(a.0.cmp(&b.0)));
    f.truncate(TOP);
    r.farms = f;
    let mut h: Vec<(String, u64)> = hint_clients.into_iter().collect();
    h.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    h.truncate(TOP);
    r.hint_clients = h;
    r
}

/// Seconds in words: `4m12s`, `2h05m`.
pub fn human(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{}h{:02}m", s / 3600, s / 60 % 60),
    }
}

impl Report {
    /// The report as text.
    pub fn text(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "greyhook report: {} decisions", self.decisions);
        if let Some((a, b)) = self.span {
            let _ = writeln!(o, "from {} to {} ({})", a, b, human(b - a));
        }
        let acts: Vec<String> = self.by_action.iter().map(|(a, n)| format!("{a}={n}")).collect();
        let _ = writeln!(o, "actions: {}", acts.join(" "));
        let _ = writeln!(
            o,
            "\nmails greylisted: {} — stopped (never retried): {}, delayed then passed: {}; passed without delay: {}",
            self.greylisted, self.stopped, self.delayed, self.passed_untouched
        );
        if self.delayed > 0 {
            let _ = writeln!(o, "delay suffered: median {}, p95 {}", human(self.delay_median), human(self.delay_p95));
            for (b, n) in &self.delay_distribution {
                let _ = writeln!(o, "  {b:>10}  {n}");
            }
        }
        let _ = writeln!(o, "\nsender domains delayed most (total delay, mails):");
        for (d, s, n) in &self.delayed_domains {
            let _ = writeln!(o, "  {d}  {}  {n}", human(*s));
        }
        let _ = writeln!(o, "\nsenders delayed most (total delay, mails):");
        for (d, s, n) in &self.delayed_senders {
            let _ = writeln!(o, "  {d}  {}  {n}", human(*s));
        }
        let _ = writeln!(o, "\nfarms re-greylisted from many networks (most networks for one mail, mails):");
        for (d, nets, n) in &self.farms {
            let _ = writeln!(o, "  {d}  {nets} networks  {n}");
        }
        let _ = writeln!(
            o,
            "\nretry hints: {} delayed mails came back within a minute of the hinted time, {} later",
            self.hint_followed, self.hint_late
        );
        for (c, n) in &self.hint_clients {
            let _ = writeln!(o, "  {c}  {n}");
        }
        if self.not_followed > 0 {
            let _ = writeln!(o, "\n({} decisions about mails past the first {MAX_MAILS} were not followed)", self.not_followed);
        }
        o
    }

    /// The report as one self-contained HTML page (inline SVG, no scripts,
    /// nothing fetched).
    pub fn html(&self) -> String {
        let mut b = String::new();
        let _ = write!(b, "<h1>greyhook report</h1><p>{} decisions", self.decisions);
        if let Some((a, z)) = self.span {
            let _ = write!(b, " over {}", human(z - a));
        }
        b.push_str("</p>");
        let _ = write!(
            b,
            "<table><tr><th>mails greylisted</th><td>{}</td></tr><tr><th>stopped (never retried)</th><td>{}</td></tr>\
             <tr><th>delayed, then passed</th><td>{}</td></tr><tr><th>delay median / p95</th><td>{} / {}</td></tr>\
             <tr><th>passed without delay</th><td>{}</td></tr></table>",
            self.greylisted,
            self.stopped,
            self.delayed,
            human(self.delay_median),
            human(self.delay_p95),
            self.passed_untouched
        );
        let bars = |v: &[(String, u64)]| v.iter().map(|(k, n)| (k.clone(), *n as f64)).collect::<Vec<_>>();
        b.push_str(&bar_chart(
            "what greylisting did to each mail",
            &[
                ("stopped".into(), self.stopped as f64),
                ("delayed".into(), self.delayed as f64),
                ("untouched".into(), self.passed_untouched as f64),
            ],
        ));
        b.push_str(&bar_chart("delay suffered before passing (mails)", &bars(&self.delay_distribution)));
        let minutes = |v: &[(String, u64, u64)]| v.iter().map(|(k, s, _)| (k.clone(), (*s as f64 / 60.0).round())).collect::<Vec<_>>();
        b.push_str(&bar_chart("sender domains delayed most (minutes in all)", &minutes(&self.delayed_domains)));
        b.push_str(&bar_chart("senders delayed most (minutes in all)", &minutes(&self.delayed_senders)));
        let farms: Vec<(String, f64)> = self.farms.iter().map(|(d, _, n)| (d.clone(), *n as f64)).collect();
        b.push_str(&bar_chart("farms: mails re-greylisted from 3 or more networks", &farms));
        b.push_str(&bar_chart(
            "retry hints",
            &[("came back at the hint".into(), self.hint_followed as f64), ("came back later".into(), self.hint_late as f64)],
        ));
        b.push_str(&bar_chart("networks that follow the hint (mails)", &bars(&self.hint_clients)));
        page("greyhook report", &b)
    }
}

/// Escapes text for HTML.
pub(crate) fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '&' => o.push_str("&amp;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// A whole self-contained page around `body`: inline style, nothing fetched.
pub(crate) fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\
         <meta name=\"viewport\" content=\"width=device-width\"><style>body{{font-family:sans-serif;margin:2em;color:#222;background:#fff}}\
         table{{border-collapse:collapse}}th,td{{text-align:left;padding:2px 10px}}th{{color:#555}}\
         svg text{{font-size:12px;fill:#222}}svg text.t{{font-weight:bold}}rect.bar{{fill:#4a78b5}}.ok{{color:#262}}\
         .bad,.degraded{{color:#b22}}figure{{margin:0 0 1em 0}}</style></head><body>{body}</body></html>",
        esc(title)
    )
}

/// A horizontal bar chart of `(label, value)` as inline SVG, titled `title`.
pub(crate) fn bar_chart(title: &str, bars: &[(String, f64)]) -> String {
    let max = bars.iter().map(|b| b.1).fold(0.0_f64, f64::max).max(1.0);
    let (row, label_w, bar_w) = (22.0, 220.0, 360.0);
    let h = row * bars.len() as f64 + 30.0;
    let mut s = format!(
        "<figure><svg xmlns=\"http://www.w3.org/2000/svg\" role=\"img\" aria-label=\"{t}\" width=\"{w}\" height=\"{h}\" \
         viewBox=\"0 0 {w} {h}\"><title>{t}</title><text x=\"0\" y=\"16\" class=\"t\">{t}</text>",
        t = esc(title),
        w = label_w + bar_w + 80.0,
    );
    for (i, (label, v)) in bars.iter().enumerate() {
        let y = 26.0 + row * i as f64;
        let len = (v / max * bar_w).max(if *v > 0.0 { 1.0 } else { 0.0 });
        let _ = write!(
            s,
            "<text x=\"{lx}\" y=\"{ty}\" text-anchor=\"end\">{l}</text><rect class=\"bar\" x=\"{label_w}\" y=\"{y}\" width=\"{len:.1}\" \
             height=\"{bh}\"/><text x=\"{vx:.1}\" y=\"{ty}\">{v}</text>",
            lx = label_w - 6.0,
            ty = y + 14.0,
            l = esc(label),
            bh = row - 6.0,
            vx = label_w + len + 4.0,
        );
    }
    s.push_str("</svg></figure>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(ts: u64, action: &str, client: &str, sender: &str, rcpt: &str, retry: Option<u32>) -> DecisionRecord {
        DecisionRecord {
            v: 1,
            ts,
            action: action.into(),
            phase: "rcpt".into(),
            client: client.into(),
            sender: Some(sender.into()),
            recipient: Some(rcpt.into()),
            retry,
            ..Default::default()
        }
    }

    #[test]
    fn stopped_delayed_farms_and_hints() {
        let r = build([
            rec(0, "greylist", "192.0.2.1", "a@one.test", "x@d.test", Some(300)),
            rec(310, "pass", "192.0.2.1", "a@one.test", "x@d.test", None),
            rec(0, "greylist", "198.51.100.1", "spam@bot.test", "x@d.test", Some(300)),
            rec(0, "greylist", "203.0.113.1", "n@farm.test", "y@d.test", Some(300)),
            rec(900, "greylist", "203.0.114.1", "n@farm.test", "y@d.test", Some(300)),
            rec(1800, "greylist", "203.0.115.1", "n@farm.test", "y@d.test", Some(300)),
            rec(3600, "pass", "203.0.113.9", "n@farm.test", "y@d.test", None),
            rec(5000, "dunno", "192.0.2.1", "a@one.test", "z@d.test", None),
        ]);
        assert_eq!((r.greylisted, r.stopped, r.delayed, r.passed_untouched), (3, 1, 2, 1));
        assert_eq!((r.delay_median, r.delay_p95), (3600, 3600), "two delays: 310 and 3600");
        assert_eq!(r.farms, vec![("farm.test".to_string(), 3, 1)]);
        assert_eq!((r.hint_followed, r.hint_late), (1, 1));
        assert_eq!(r.delayed_domains[0], ("farm.test".to_string(), 3600, 1));
        assert!(r.text().contains("stopped (never retried): 1"));
        let html = r.html();
        assert!(html.contains("<svg") && !html.contains("<script"), "{html}");
    }

    #[test]
    fn labels_are_escaped_and_bars_scaled() {
        let svg = bar_chart("a<b", &[("<script>".into(), 10.0), ("x".into(), 5.0)]);
        assert!(!svg.contains("<script>") && svg.contains("&lt;script&gt;"), "{svg}");
        assert!(svg.contains("width=\"360.0\"") && svg.contains("width=\"180.0\""), "{svg}");
    }
}
