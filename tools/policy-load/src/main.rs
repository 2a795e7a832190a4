//! `policy-load`: drives a Postfix policy server (greyhook, postgrey...)
//! with N connections × M requests over K distinct triplets, each request
//! the 29 attributes a Postfix 3.7.11 smtpd sends at RCPT, and prints one
//! `key=value` line: requests/s, p50/p99 latency, and how the answers split
//! (defer / pass / other). Every loop is bounded by the counts and by
//! `--timeout` per request.
//!
//! It checks the greylisting invariant a fresh server must keep while the
//! run is shorter than its delay: every answer is a deferral (a first
//! sighting is deferred; a repeat within the delay is deferred). With
//! `--expect-defer` any other answer makes it exit non-zero. With
//! `--expect PREFIX` (repeatable) every answer must start with one of the
//! prefixes; the count for each is printed as `expect_counts=a,b,...`.
//!
//! The run ends when every connection has sent its requests, after
//! `--seconds`, or at SIGINT/SIGTERM; the summary is printed in every case.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// The RCPT-stage request a real Postfix 3.7.11 sent (shared/data).
const TEMPLATE: &str = include_str!("postfix-3.7.11-rcpt.txt");

#[derive(Parser, Clone)]
#[command(about)]
struct Args {
    /// The policy server, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:10023")]
    target: String,
    /// Concurrent connections.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Requests per connection.
    #[arg(long, default_value_t = 5000)]
    requests: usize,
    /// Distinct triplets (client, sender, recipient).
    #[arg(long, default_value_t = 10_000)]
    triplets: usize,
    /// A salt for the senders, so that separate runs use separate triplets.
    #[arg(long, default_value = "run")]
    salt: String,
    /// Per-request timeout.
    #[arg(long, default_value = "10", value_name = "SECONDS")]
    timeout: u64,
    /// Exit non-zero if any answer is not a deferral.
    #[arg(long)]
    expect_defer: bool,
    /// An accepted answer (the text after `action=` starts with it); repeat
    /// for each. Any other answer makes the run exit non-zero.
    #[arg(long, value_name = "PREFIX")]
    expect: Vec<String>,
    /// Stop after this long even if requests are left.
    #[arg(long, value_name = "SECONDS")]
    seconds: Option<f64>,
}

/// Request for triplet `t`; `attempt` makes the `instance` attribute unique,
/// as Postfix does per mail transaction (a repeat of a triplet is a new
/// delivery attempt, so a new transaction).
fn request(t: usize, attempt: usize, salt: &str) -> String {
    // One /24 per triplet (for up to 65 536 triplets), so that per-network
    // state (auto-whitelisting) is not shared between triplets.
    let client = format!("10.{}.{}.{}", (t >> 8) & 255, t & 255, 1 + (t >> 16) % 254);
    let mut out = String::with_capacity(700);
    for line in TEMPLATE.lines().filter(|l| !l.is_empty()) {
        match line.split_once('=') {
            Some(("client_address", _)) => out.push_str(&format!("client_address={client}\n")),
            Some(("client_name", _)) | Some(("reverse_client_name", _)) => {
                out.push_str(&format!("{}=unknown\n", line.split('=').next().unwrap_or("")))
            }
            Some(("sender", _)) => out.push_str(&format!("sender=user{t}-{salt}@sender{}.example\n", t % 97)),
            Some(("instance", _)) => out.push_str(&format!("instance={attempt:x}.{salt}\n")),
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out.push('\n');
    out
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    defer: u64,
    pass: u64,
    other: u64,
    errors: u64,
    first_other: Option<String>,
    expected: Vec<u64>,
}

async fn connection(args: Args, index: usize, stop: Arc<AtomicBool>) -> Tally {
    let mut t =
        Tally { latencies_us: Vec::with_capacity(args.requests.min(1 << 20)), expected: vec![0; args.expect.len()], ..Tally::default() };
    let timeout = Duration::from_secs(args.timeout);
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(&args.target)).await {
        Ok(Ok(s)) => s,
        _ => {
            t.errors += args.requests as u64;
            return t;
        }
    };
    let _ = stream.set_nodelay(true);
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut line = String::new();
    for j in 0..args.requests {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let triplet = (index * args.requests + j) % args.triplets.max(1);
        let req = request(triplet, index * args.requests + j, &args.salt);
        let start = Instant::now();
        let answer = tokio::time::timeout(timeout, async {
            w.write_all(req.as_bytes()).await?;
            line.clear();
            r.read_line(&mut line).await?;
            let action = line.trim_end().to_string();
            line.clear();
            r.read_line(&mut line).await?;
            Ok::<_, std::io::Error>(action)
        })
        .await;
        match answer {
            Ok(Ok(a)) if a.starts_with("action=") => {
                t.latencies_us.push(start.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                let a = &a["action=".len()..];
                let upper = a.to_ascii_uppercase();
                if !args.expect.is_empty() {
                    match args.expect.iter().position(|p| a.starts_with(p.as_str())) {
                        Some(i) => t.expected[i] += 1,
                        None => {
                            t.other += 1;
                            t.first_other.get_or_insert_with(|| a.to_string());
                            continue;
                        }
                    }
                }
                if a.starts_with('4') || upper.starts_with("DEFER") {
                    t.defer += 1;
                } else if upper.starts_with("DUNNO") || upper.starts_with("PREPEND") || upper.starts_with("OK") {
                    t.pass += 1;
                } else {
                    t.other += 1;
                    t.first_other.get_or_insert_with(|| a.to_string());
                }
            }
            _ => {
                // A broken connection ends this worker: count the rest as errors.
                t.errors += (args.requests - j) as u64;
                return t;
            }
        }
    }
    t
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.connections == 0 || args.requests == 0 || args.connections > 10_000 || args.requests > 10_000_000 {
        bail!("--connections must be 1..=10000 and --requests 1..=10000000");
    }
    if args.seconds.is_some_and(|s| !(s > 0.0 && s < 86_400.0)) {
        bail!("--seconds must be between 0 and 86400");
    }
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    {
        // Ends the run early: a deadline, Ctrl-C or SIGTERM. Workers finish
        // the request in hand, so the summary stays exact.
        let stop = stop.clone();
        let seconds = args.seconds;
        tokio::spawn(async move {
            let deadline = async {
                match seconds {
                    Some(s) => tokio::time::sleep(Duration::from_secs_f64(s)).await,
                    None => std::future::pending().await,
                }
            };
            let term = async {
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(mut s) => {
                        s.recv().await;
                    }
                    Err(_) => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = deadline => {}
                _ = tokio::signal::ctrl_c() => {}
                _ = term => {}
            }
            stop.store(true, Ordering::Relaxed);
        });
    }
    let handles: Vec<_> = (0..args.connections).map(|i| tokio::spawn(connection(args.clone(), i, stop.clone()))).collect();
    let mut all = Tally { expected: vec![0; args.expect.len()], ..Tally::default() };
    for h in handles {
        let t = h.await.context("worker")?;
        for (a, b) in all.expected.iter_mut().zip(&t.expected) {
            *a += b;
        }
        all.latencies_us.extend(t.latencies_us);
        all.defer += t.defer;
        all.pass += t.pass;
        all.other += t.other;
        all.errors += t.errors;
        if all.first_other.is_none() {
            all.first_other = t.first_other;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    all.latencies_us.sort_unstable();
    let pct = |p: f64| {
        all.latencies_us
            .get(((all.latencies_us.len() as f64 * p) as usize).min(all.latencies_us.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    let n = all.latencies_us.len();
    let counts: Vec<String> = all.expected.iter().map(u64::to_string).collect();
    println!(
        "requests={n} seconds={secs:.3} rps={:.0} p50_us={} p99_us={} defer={} pass={} other={} errors={} expect_counts={}",
        n as f64 / secs,
        pct(0.50),
        pct(0.99),
        all.defer,
        all.pass,
        all.other,
        all.errors,
        counts.join(",")
    );
    if let Some(o) = &all.first_other {
        eprintln!("policy-load: unexpected answer, e.g. {o:?}");
    }
    if all.errors > 0 {
        bail!("{} requests failed", all.errors);
    }
    if !args.expect.is_empty() && all.other > 0 {
        bail!("{} answers matched none of the --expect prefixes", all.other);
    }
    if args.expect_defer && (all.pass > 0 || all.other > 0) {
        bail!("greylisting invariant broken: {} answers were not deferrals", all.pass + all.other);
    }
    Ok(())
}
