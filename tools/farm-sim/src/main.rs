//! farm-sim: a simulated day of mail, replayed through the Postfix policy
//! protocol against greylisting servers, with the time injected.
//!
//! The day (deterministic for a `--seed`):
//! - **farms**: four senders, each retrying a deferred message from a
//!   random address of a pool (two big ones spread over 32 /24s, two small
//!   ones over 4), with an Exchange Online-like back-off (1, 5, 15, 30
//!   minutes, then hourly). Two send as their own domain, two for customer
//!   domains whose SPF `include:`s the farm's. Postfix has confirmed their
//!   names (`client_name`).
//! - **single-address senders**: forty ordinary MTAs retrying from their one
//!   address on Postfix's schedule (5 minutes, then doubling up to 4000 s).
//! - **bots** that never retry, and **retrying bots** that come back twice
//!   from random addresses of a botnet, half of them forging a farm's domain.
//!
//! The systems, each fresh and fed the same attempts until it accepts a
//! message (an accepted message is not retried):
//! - `greyhook-network`: the reference filter with `identity = ["network"]`
//!   (classic /24 greylisting), in-process with a manual clock;
//! - `greyhook-dns`: the reference filter on its defaults (`identity =
//!   ["spf", "fcrdns-org", "network"]`), the same, its resolver a private
//!   dnsmasq serving the day's SPF records;
//! - `postgrey`: Debian's postgrey (same /24 tracking, same delay and
//!   auto-whitelisting), its clock driven through libfaketime.
//!
//! It prints, per system, the delay legitimate mail suffered (median, p95,
//! max, for farms and single senders), legitimate mail never accepted within
//! the day, and the bot mail stopped, as a Markdown table.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use greyhook::clock::ManualClock;
use greyhook::daemon::{Daemon, DaemonConfig};
use greyhook::frontend::ListenAddr;

/// The simulated day starts at 2026-12-01T00:00:00Z.
const T0: u64 = 1_796_083_200;
/// How long a sender keeps retrying (the simulated day).
const HORIZON: u64 = 86_400;

#[derive(Parser, Debug)]
#[command(about = "Replays a simulated day of mail through greylisting policy servers (see the module documentation)")]
struct Args {
    /// The seed of the day's mail.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Multiplies the number of messages of every class.
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// The greylisting delay, in seconds, for every system.
    #[arg(long, default_value_t = 300)]
    delay: u64,
    /// The systems to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "greyhook-network,greyhook-dns,postgrey")]
    systems: Vec<System>,
    /// postgrey's program (Debian's `postgrey`).
    #[arg(long, default_value = "/usr/sbin/postgrey")]
    postgrey: PathBuf,
    /// libfaketime, which drives postgrey's clock (Debian's `faketime`).
    #[arg(long, default_value = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")]
    libfaketime: PathBuf,
    /// dnsmasq, the resolver of `greyhook-dns` (Debian's `dnsmasq-base`).
    #[arg(long, default_value = "/usr/sbin/dnsmasq")]
    dnsmasq: PathBuf,
}

/// A system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum System {
    /// greyhook, `identity = ["network"]`.
    GreyhookNetwork,
    /// greyhook on its defaults (SPF, FCrDNS organisation, network).
    GreyhookDns,
    /// Debian's postgrey.
    Postgrey,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::GreyhookNetwork => "greyhook, identity = [\"network\"]",
            System::GreyhookDns => "greyhook, DNS-aware default",
            System::Postgrey => "postgrey 1.37 (Debian)",
        }
    }
}

/// What sent a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    Farm,
    Single,
    Bot,
    RetryingBot,
}

impl Class {
    fn legitimate(self) -> bool {
        matches!(self, Class::Farm | Class::Single)
    }
}

/// One delivery attempt.
#[derive(Debug, Clone)]
struct Attempt {
    at: u64,
    ip: Ipv4Addr,
    /// Postfix's `client_name`: forward-confirmed, or `unknown`.
    name: String,
}

/// One message and every attempt its sender would make.
#[derive(Debug, Clone)]
struct Msg {
    class: Class,
    sender: String,
    rcpt: String,
    attempts: Vec<Attempt>,
}

/// A short lower-case word (senders and recipients use letters: the
/// reference filter folds digit runs in senders, as VERP needs).
fn word(rng: &mut fastrand::Rng, len: usize) -> String {
    (0..len).map(|_| rng.alphabetic().to_ascii_lowercase()).collect()
}

/// The day's mail and the DNS records (dnsmasq options) it needs.
fn day(seed: u64, scale: f64) -> (Vec<Msg>, Vec<String>) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let n = |base: f64| ((base * scale).round() as usize).max(1);
    let users: Vec<String> = (0..30).map(|_| word(&mut rng, 6)).collect();
    let mut dns = vec!["--local=/example/".to_string(), "--local=/10.in-addr.arpa/".to_string()];
    let mut msgs = Vec::new();

    // Farms: two big ones with pools over 32 /24s (Outlook-like), two
    // small ones over 4; the odd ones send for customer domains whose SPF
    // includes the farm's (SendGrid-like), the even ones as themselves.
    for k in 1..=4u8 {
        let nets = if k <= 2 { 32 } else { 4 };
        let spf = if nets == 32 {
            format!("v=spf1 ip4:10.{k}.0.0/19 -all")
        } else {
            format!("v=spf1 {} -all", (0..nets).map(|n| format!("ip4:10.{k}.{n}.0/24")).collect::<Vec<_>>().join(" "))
        };
        let customers: Vec<String> = if k % 2 == 0 {
            dns.push(format!("--txt-record=farm{k}.example,{spf}"));
            vec![format!("farm{k}.example")]
        } else {
            dns.push(format!("--txt-record=_spf.farm{k}.example,{spf}"));
            (0..if k == 1 { 40 } else { 10 })
                .map(|_| {
                    let d = format!("{}.example", word(&mut rng, 7));
                    dns.push(format!("--txt-record={d},v=spf1 include:_spf.farm{k}.example ~all"));
                    d
                })
                .collect()
        };
        for _ in 0..n(100.0) {
            let start = rng.u64(0..HORIZON * 5 / 6);
            let mut offsets = vec![0, 60, 300, 900, 1800];
            offsets.extend((1..24).map(|h| h * 3600));
            let mut attempts = Vec::new();
            for o in offsets {
                let o = if o == 0 { 0 } else { o + rng.u64(0..120) };
                if o >= HORIZON {
                    break;
                }
                let (net, host) = (rng.u8(0..nets), rng.u8(10..13));
                attempts.push(Attempt {
                    at: T0 + start + o,
                    ip: Ipv4Addr::new(10, k, net, host),
                    name: format!("o{net}-{host}.out.farm{k}.example"),
                });
            }
            let domain = &customers[rng.usize(0..customers.len())];
            let local = ["news", "alerts", "billing", "noreply", "team"][rng.usize(0..5)];
            msgs.push(Msg { class: Class::Farm, sender: format!("{local}@{domain}"), rcpt: String::new(), attempts });
        }
    }

    // Single-address senders, half with SPF.
    let servers: Vec<(Ipv4Addr, String, String)> = (0..40u8)
        .map(|i| {
            let d = format!("{}.example", word(&mut rng, 8));
            let ip = Ipv4Addr::new(10, 100, i, 10);
            if i % 2 == 0 {
                dns.push(format!("--txt-record={d},v=spf1 ip4:{ip} -all"));
            }
            (ip, format!("mail.{d}"), d)
        })
        .collect();
    for _ in 0..n(200.0) {
        let (ip, name, domain) = servers[rng.usize(0..servers.len())].clone();
        let start = rng.u64(0..HORIZON * 5 / 6);
        // Postfix: minimal_backoff_time 300 s, doubling, maximal 4000 s,
        // at the next queue run (up to a minute later).
        let mut offsets = vec![0u64];
        let (mut t, mut backoff) = (0u64, 300u64);
        while t + backoff < HORIZON {
            t += backoff + rng.u64(0..60);
            offsets.push(t);
            backoff = (backoff * 2).min(4000);
        }
        let attempts = offsets.into_iter().map(|o| Attempt { at: T0 + start + o, ip, name: name.clone() }).collect();
        msgs.push(Msg { class: Class::Single, sender: format!("{}@{domain}", word(&mut rng, 5)), rcpt: String::new(), attempts });
    }

    // Bots: from a botnet of dynamic addresses, some named like it.
    let bot_attempt = |rng: &mut fastrand::Rng, at: u64| {
        let ip = Ipv4Addr::new(10, rng.u8(200..250), rng.u8(0..=255), rng.u8(1..255));
        let o = ip.octets();
        let name = if rng.bool() { format!("dsl-{}-{}-{}-{}.dyn.isp.example", o[0], o[1], o[2], o[3]) } else { "unknown".into() };
        Attempt { at, ip, name }
    };
    let forged = |rng: &mut fastrand::Rng| format!("{}@farm{}.example", word(rng, 6), rng.u8(1..=2));
    for _ in 0..n(500.0) {
        let at = T0 + rng.u64(0..HORIZON * 5 / 6);
        let sender = if rng.u8(0..4) == 0 { forged(&mut rng) } else { format!("{}@{}.example", word(&mut rng, 6), word(&mut rng, 9)) };
        let attempts = vec![bot_attempt(&mut rng, at)];
        msgs.push(Msg { class: Class::Bot, sender, rcpt: String::new(), attempts });
    }
    for _ in 0..n(200.0) {
        let at = T0 + rng.u64(0..HORIZON * 5 / 6);
        let sender = if rng.bool() { forged(&mut rng) } else { format!("{}@{}.example", word(&mut rng, 6), word(&mut rng, 9)) };
        let (r1, r2) = (rng.u64(400..900), rng.u64(1800..3600));
        let attempts = vec![bot_attempt(&mut rng, at), bot_attempt(&mut rng, at + r1), bot_attempt(&mut rng, at + r2)];
        msgs.push(Msg { class: Class::RetryingBot, sender, rcpt: String::new(), attempts });
    }
    for m in &mut msgs {
        m.rcpt = format!("{}@dest.example", users[rng.usize(0..users.len())]);
    }
    (msgs, dns)
}

/// A policy connection.
struct Policy {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Policy {
    fn connect(port: u16) -> Result<Policy> {
        let w = TcpStream::connect(("127.0.0.1", port)).with_context(|| format!("connect to 127.0.0.1:{port}"))?;
        w.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Policy { r: BufReader::new(w.try_clone()?), w })
    }

    /// Asks about one attempt: true if the server lets it through.
    fn ask(&mut self, m: &Msg, a: &Attempt, n: usize) -> Result<bool> {
        let req = format!(
            "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\nclient_address={ip}\nclient_name={name}\n\
             reverse_client_name={rev}\nhelo_name={helo}\nsender={s}\nrecipient={r}\ninstance=sim.{n}\n\n",
            ip = a.ip,
            name = a.name,
            rev = a.name,
            helo = if a.name == "unknown" { format!("[{}]", a.ip) } else { a.name.clone() },
            s = m.sender,
            r = m.rcpt,
        );
        self.w.write_all(req.as_bytes())?;
        let mut action = String::new();
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line)? == 0 {
                bail!("the policy server closed the connection");
            }
            if line.trim().is_empty() {
                break;
            }
            if let Some(v) = line.trim().strip_prefix("action=") {
                action = v.to_string();
            }
        }
        let a = action.to_ascii_uppercase();
        Ok(a.starts_with("DUNNO") || a.starts_with("PREPEND") || a.starts_with("OK"))
    }
}

/// A child process killed when dropped.
struct Kid(Child);

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    loop {
        let p = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok() {
            return Ok(p);
        }
    }
}

fn wait_port(port: u16, what: &str, kid: &mut Kid) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(st) = kid.0.try_wait()? {
            bail!("{what} exited: {st}");
        }
        if Instant::now() > until {
            bail!("{what} did not listen on port {port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// dnsmasq serving the day's records on a loopback port.
fn dnsmasq(bin: &Path, records: &[String]) -> Result<(Kid, u16)> {
    let port = free_port()?;
    let child = Command::new(bin)
        .args(["--keep-in-foreground", "--no-resolv", "--no-hosts", "--conf-file=/dev/null", "--bind-interfaces"])
        .args(["--listen-address=127.0.0.1", "--local-ttl=3600", "--user=root", "--pid-file="])
        .arg(format!("--port={port}"))
        .args(records)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot run {} (Debian's dnsmasq-base)", bin.display()))?;
    let mut kid = Kid(child);
    wait_port(port, "dnsmasq", &mut kid)?;
    Ok((kid, port))
}

/// `YYYY-MM-DD hh:mm:ss` (UTC) for libfaketime. By hand: the civil-from-days
/// conversion (H. Hinnant) is a dozen lines, no date library needed.
fn utc(t: u64) -> String {
    let (days, secs) = ((t / 86_400) as i64, t % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

/// When each message was accepted (`None`: never), for one system.
fn replay(msgs: &[Msg], mut set_time: impl FnMut(u64) -> Result<()>, policy: &mut Policy) -> Result<Vec<Option<u64>>> {
    let mut events: Vec<(u64, usize, usize)> =
        msgs.iter().enumerate().flat_map(|(i, m)| m.attempts.iter().enumerate().map(move |(j, a)| (a.at, i, j))).collect();
    events.sort();
    let mut accepted = vec![None; msgs.len()];
    for (n, (at, i, j)) in events.into_iter().enumerate() {
        if accepted[i].is_some() {
            continue;
        }
        set_time(at)?;
        if policy.ask(&msgs[i], &msgs[i].attempts[j], n)? {
            accepted[i] = Some(at);
        }
    }
    Ok(accepted)
}

async fn run_greyhook(msgs: Vec<Msg>, delay: u64, dns_port: u16, identity: &str) -> Result<Vec<Option<u64>>> {
    let dir = tempfile::tempdir()?;
    let text = format!(
        "[store]\npath = \"memory\"\n[control]\nsocket = \"{}\"\n[policy]\nlisten = [\"127.0.0.1:0\"]\n\
         [dns]\nservers = [\"127.0.0.1:{dns_port}\"]\n[filter]\ndeadline = \"2s\"\n[filter.config]\ndelay = {delay}\n{identity}\n",
        dir.path().join("control.sock").display()
    );
    let cfg = DaemonConfig::parse(&text, "farm-sim.toml")?;
    let clock = Arc::new(ManualClock::new(T0));
    let d = Daemon::start(&cfg, clock.clone(), None).await?;
    let port = match d.endpoints("policy").first() {
        Some(ListenAddr::Tcp(a)) => a.port(),
        other => bail!("no TCP policy listener: {other:?}"),
    };
    let r = tokio::task::spawn_blocking(move || {
        let mut p = Policy::connect(port)?;
        replay(
            &msgs,
            |t| {
                clock.set(t);
                Ok(())
            },
            &mut p,
        )
    })
    .await?;
    d.stop().await;
    r
}

fn run_postgrey(args: &Args, msgs: &[Msg]) -> Result<Vec<Option<u64>>> {
    for (p, pkg) in [(&args.postgrey, "postgrey"), (&args.libfaketime, "faketime")] {
        if !p.exists() {
            bail!("{} is missing (apt-get install {pkg})", p.display());
        }
    }
    let dir = tempfile::tempdir()?;
    let (db, clockfile) = (dir.path().join("db"), dir.path().join("clock"));
    std::fs::create_dir(&db)?;
    // postgrey drops to its own user: let it write its database.
    let _ = Command::new("chown").args(["-R", "postgrey"]).arg(dir.path()).status();
    std::fs::write(&clockfile, utc(T0))?;
    let port = free_port()?;
    let child = Command::new(&args.postgrey)
        .arg(format!("--inet=127.0.0.1:{port}"))
        .arg(format!("--dbdir={}", db.display()))
        .arg(format!("--delay={}", args.delay))
        .env("LD_PRELOAD", &args.libfaketime)
        .env("FAKETIME_TIMESTAMP_FILE", &clockfile)
        .env("FAKETIME_NO_CACHE", "1")
        .env("TZ", "UTC")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot run {}", args.postgrey.display()))?;
    let mut kid = Kid(child);
    wait_port(port, "postgrey", &mut kid)?;
    let mut p = Policy::connect(port)?;
    let r = replay(msgs, |t| Ok(std::fs::write(&clockfile, utc(t))?), &mut p);
    drop(kid);
    r
}

/// The `q` quantile of sorted `v`.
fn quantile(v: &[u64], q: f64) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    Some(v[i.min(v.len() - 1)])
}

fn minutes(s: Option<u64>) -> String {
    match s {
        Some(s) if s < 60 => format!("{s} s"),
        Some(s) => format!("{:.1} min", s as f64 / 60.0),
        None => "–".into(),
    }
}

/// One row of the table.
fn row(name: &str, msgs: &[Msg], accepted: &[Option<u64>]) -> String {
    let mut delays: BTreeMap<Class, Vec<u64>> = BTreeMap::new();
    let (mut lost, mut legit, mut bots, mut stopped) = (0, 0, 0, 0);
    for (m, a) in msgs.iter().zip(accepted) {
        if m.class.legitimate() {
            legit += 1;
            match a {
                Some(t) => delays.entry(m.class).or_default().push(t - m.attempts[0].at),
                None => lost += 1,
            }
        } else {
            bots += 1;
            if a.is_none() {
                stopped += 1;
            }
        }
    }
    let stats = |c: Class| {
        let mut v = delays.get(&c).cloned().unwrap_or_default();
        v.sort_unstable();
        format!("{} / {} / {}", minutes(quantile(&v, 0.5)), minutes(quantile(&v, 0.95)), minutes(v.last().copied()))
    };
    format!(
        "| {name} | {} | {} | {lost} of {legit} | {stopped} of {bots} ({:.1} %) |",
        stats(Class::Farm),
        stats(Class::Single),
        100.0 * stopped as f64 / bots.max(1) as f64
    )
}

fn main() -> Result<()> {
    let args = Args::parse();
    let (msgs, records) = day(args.seed, args.scale);
    let count = |c: Class| msgs.iter().filter(|m| m.class == c).count();
    println!(
        "farm-sim: seed {}, {} farm messages, {} from single-address senders, {} from bots that never retry, {} from bots retrying from random addresses; delay {} s",
        args.seed,
        count(Class::Farm),
        count(Class::Single),
        count(Class::Bot),
        count(Class::RetryingBot),
        args.delay
    );
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut rows = Vec::new();
    for system in &args.systems {
        let started = Instant::now();
        let accepted = match system {
            System::GreyhookNetwork | System::GreyhookDns => {
                let (_dns, dns_port) = dnsmasq(&args.dnsmasq, &records)?;
                let identity = if *system == System::GreyhookNetwork { "identity = [\"network\"]" } else { "" };
                rt.block_on(run_greyhook(msgs.clone(), args.delay, dns_port, identity))?
            }
            System::Postgrey => run_postgrey(&args, &msgs)?,
        };
        eprintln!("farm-sim: {} replayed in {:.1} s", system.name(), started.elapsed().as_secs_f64());
        rows.push(row(system.name(), &msgs, &accepted));
    }
    println!();
    println!(
        "| system | farm mail delay: median / p95 / max | single-address sender delay: median / p95 / max | legitimate mail never accepted | bot mail stopped |"
    );
    println!("|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_unix_time() {
        assert_eq!(utc(T0), "2026-12-01 00:00:00");
        assert_eq!(utc(951_782_400 + 3_723), "2000-02-29 01:02:03");
    }

    #[test]
    fn the_day_is_deterministic_and_bounded() {
        let (a, ra) = day(7, 0.2);
        let (b, rb) = day(7, 0.2);
        assert_eq!((a.len(), ra), (b.len(), rb));
        assert!(a.iter().zip(&b).all(|(x, y)| x.sender == y.sender && x.attempts.len() == y.attempts.len()));
        for m in &a {
            let first = m.attempts[0].at;
            assert!(m.attempts.iter().all(|t| t.at >= first && t.at < first + HORIZON));
        }
        // Farms retry from more than one /24.
        let farm = a.iter().find(|m| m.class == Class::Farm).unwrap();
        let nets: std::collections::BTreeSet<[u8; 3]> =
            farm.attempts.iter().map(|t| [t.ip.octets()[0], t.ip.octets()[1], t.ip.octets()[2]]).collect();
        assert!(nets.len() > 1);
    }
}
