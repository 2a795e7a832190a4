//! Sender farms and the DNS-aware reference filter, end to end: a real DNS
//! server (dnsmasq) serving SPF, PTR/A, a DNSBL and a DNSWL zone;
//! `greyhook serve` (policy, `--dns`) asked as Postfix asks, with client
//! addresses in the documentation ranges; `greyhook smtp` with raw SMTP
//! clients from distinct loopback addresses. The filter is the embedded
//! `greylist.wasm` on its defaults (`identity = ["spf", "fcrdns-org",
//! "network"]`) with a one-second delay.

use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use greyhook_tests::*;

/// The test zone:
/// - `farm.test` publishes SPF for four /24s (two of them loopback, for
///   the SMTP front end); `open.test` publishes `+all`; `wide.test` a /8.
/// - `out-a.mail.bigfarm.test` (198.51.100.10) and
///   `out-b.mail.bigfarm.test` (203.0.113.20) forward-confirm;
///   `dsl-192-0-2-50.isp.test` (192.0.2.50) confirms but looks dynamic;
///   192.0.2.66 and 192.0.3.66 have PTRs into `bigfarm.test` that do not
///   confirm (spoofed).
/// - `bl.test` lists 192.0.2.66 and 127.0.5.5; `wl.test` lists 192.0.2.99.
fn zone() -> DnsServer {
    let long = format!("--txt-record={},v=spf1 ip4:198.51.100.0/24 ip4:203.0.113.0/24 -all", long_domain());
    DnsServer::start(&[
        long.as_str(),
        "--txt-record=farm.test,v=spf1 ip4:198.51.100.0/24 ip4:203.0.113.0/24 ip4:127.0.1.0/24 ip4:127.0.2.0/24 -all",
        "--txt-record=open.test,v=spf1 +all",
        "--txt-record=wide.test,v=spf1 ip4:192.0.0.0/8 ip4:127.0.0.0/8 -all",
        "--host-record=out-a.mail.bigfarm.test,198.51.100.10",
        "--host-record=out-b.mail.bigfarm.test,203.0.113.20",
        "--host-record=dsl-192-0-2-50.isp.test,192.0.2.50",
        "--ptr-record=66.2.0.192.in-addr.arpa,out-x.mail.bigfarm.test",
        "--ptr-record=66.3.0.192.in-addr.arpa,out-y.mail.bigfarm.test",
        "--host-record=66.2.0.192.bl.test,127.0.0.2",
        "--host-record=5.5.0.127.bl.test,127.0.0.2",
        "--host-record=99.2.0.192.wl.test,127.0.10.0",
        "--local=/test/",
        "--local=/100.51.198.in-addr.arpa/",
        "--local=/113.0.203.in-addr.arpa/",
        "--local=/2.0.192.in-addr.arpa/",
        "--local=/3.0.192.in-addr.arpa/",
    ])
}

/// A 249-byte sender domain (the client chooses it): its keys must stay
/// within the host's 256-byte limit, or the filter fails and the failure
/// policy answers for it.
fn long_domain() -> String {
    format!("{}.test", ["abcdefghij"; 22].join("."))
}

/// `greyhook serve --dns DNS` with a policy listener, a one-second delay,
/// `dns_table` in `[dns]` and `filter_config` added to the filter's table.
fn serve(dir: &Path, dns: &str, dns_table: &str, filter_config: &str) -> (Process, u16) {
    let port = free_port();
    let cfg = dir.join("greyhook.toml");
    std::fs::write(
        &cfg,
        format!(
            "[control]\nsocket = \"{d}/control.sock\"\n[store]\npath = \"memory\"\n\
             [policy]\nlisten = [\"127.0.0.1:{port}\"]\n[dns]\n{dns_table}\n\
             [filter]\ndeadline = \"2s\"\n[filter.config]\ndelay = 1\n{filter_config}\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let mut p = Process::greyhook(&["serve", "--config", cfg.to_str().unwrap(), "--dns", dns], dir.join("log"));
    p.wait_listening(port, 60);
    (p, port)
}

/// A policy request at RCPT as Postfix sends it: `client_name` is
/// Postfix's forward-confirmed name (`unknown` if none),
/// `reverse_client_name` the PTR.
fn ask(port: u16, client: &str, client_name: &str, ptr: &str, sender: &str) -> String {
    ask_in(port, &format!("{client}-{sender}"), client, client_name, ptr, sender)
}

/// [`ask`] in the transaction `instance` (a retry is a new one).
fn ask_in(port: u16, instance: &str, client: &str, client_name: &str, ptr: &str, sender: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = format!(
        "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\nclient_address={client}\n\
         client_name={client_name}\nreverse_client_name={ptr}\nhelo_name=mx.sender.test\nsender={sender}\n\
         recipient=user@dest.test\ninstance={instance}\n\n"
    );
    policy_exchange(&mut s, &req).trim().to_string()
}

/// `greyhook serve` asking the DNS server at `dns` with a 5 s resolver
/// timeout, the hook's `deadline`, and a one-second delay: the daemon and
/// its policy port.
fn serve_with_deadline(dir: &Path, dns: &str, deadline: &str) -> (Process, u16) {
    let port = free_port();
    let mut d = greyhook_with(
        dir,
        "serve",
        &format!(
            "[control]\nsocket = \"{d}/control.sock\"\n[store]\npath = \"memory\"\n[policy]\nlisten = [\"127.0.0.1:{port}\"]\n\
             [dns]\nservers = [\"{dns}\"]\ntimeout = \"5s\"\n[filter]\ndeadline = \"{deadline}\"\n[filter.config]\ndelay = 1\n",
            d = dir.display()
        ),
    );
    d.wait_listening(port, 60);
    (d, port)
}

fn deferred(a: &str) -> bool {
    a.starts_with("action=451 4.7.1") && a.contains("retry=")
}

fn passed(a: &str) -> bool {
    a.starts_with("action=PREPEND X-Greylist: delayed") || a == "action=DUNNO"
}

/// The cases through the policy front end.
#[test]
fn policy_farms_pass_at_their_first_retry_and_bots_do_not() {
    let dns = zone();
    let dir = tempfile::tempdir().unwrap();
    let (d, port) = serve(dir.path(), &dns.addr(), "", "");

    // First attempts.
    let farm = ask(port, "198.51.100.10", "out-a.mail.bigfarm.test", "out-a.mail.bigfarm.test", "news@farm.test");
    assert!(deferred(&farm), "{farm}");
    let bot = ask(port, "192.0.2.66", "unknown", "out-x.mail.bigfarm.test", "news@farm.test");
    assert!(deferred(&bot), "{bot}");
    let open = ask(port, "192.0.2.77", "unknown", "unknown", "bulk@open.test");
    assert!(deferred(&open), "{open}");
    let wide = ask(port, "192.0.2.78", "unknown", "unknown", "bulk@wide.test");
    assert!(deferred(&wide), "{wide}");
    let org = ask(port, "198.51.100.10", "out-a.mail.bigfarm.test", "out-a.mail.bigfarm.test", "alerts@nospf.test");
    assert!(deferred(&org), "{org}");
    let spoof = ask(port, "192.0.2.66", "unknown", "out-x.mail.bigfarm.test", "alerts@nospf.test");
    assert!(deferred(&spoof), "{spoof}");
    let long = ask(port, "198.51.100.10", "unknown", "unknown", &format!("a@{}", long_domain()));
    assert!(deferred(&long), "a long SPF domain is greylisted, not answered by the failure policy: {long}");
    std::thread::sleep(Duration::from_millis(1300));

    // The farm retries from another /24, inside its SPF record: passes, keyed on the domain.
    let farm = ask(port, "203.0.113.20", "out-b.mail.bigfarm.test", "out-b.mail.bigfarm.test", "news@farm.test");
    assert!(farm.starts_with("action=PREPEND X-Greylist: delayed") && farm.ends_with("identity spf:farm.test"), "{farm}");
    // A bot with the same sender from an address outside the record: SPF fails, keyed on its network.
    let bot = ask(port, "192.0.3.66", "unknown", "out-y.mail.bigfarm.test", "news@farm.test");
    assert!(deferred(&bot), "outside the SPF record: greylisted again: {bot}");
    // `+all` and a /8 pass SPF from anywhere: no identity, greylisted again from another /24.
    let open = ask(port, "192.0.3.77", "unknown", "unknown", "bulk@open.test");
    assert!(deferred(&open), "+all is no identity: {open}");
    let wide = ask(port, "192.0.3.78", "unknown", "unknown", "bulk@wide.test");
    assert!(deferred(&wide), "a /8 is no identity: {wide}");
    // No SPF: the organisation of a forward-confirmed name, which the
    // filter confirms itself when Postfix says `unknown`.
    let org = ask(port, "203.0.113.20", "unknown", "out-b.mail.bigfarm.test", "alerts@nospf.test");
    assert!(org.starts_with("action=PREPEND X-Greylist: delayed") && org.ends_with("identity org:bigfarm.test"), "{org}");
    // A PTR into the same organisation that does not confirm is no identity.
    let spoof = ask(port, "192.0.3.66", "unknown", "out-y.mail.bigfarm.test", "alerts@nospf.test");
    assert!(deferred(&spoof), "a spoofed PTR is no identity: {spoof}");
    let long = ask(port, "203.0.113.20", "unknown", "unknown", &format!("a@{}", long_domain()));
    assert!(long.starts_with("action=PREPEND X-Greylist: delayed") && long.contains("identity spf:#"), "{long}");
    // The network identity still works for the same /24.
    let same = ask(port, "192.0.2.67", "unknown", "unknown", "bulk@open.test");
    assert!(passed(&same), "{same}");

    // The startup log names the resolver the filters use.
    assert!(d.wait_log(&format!("dns: servers {}, timeout 3s", dns.addr()), 5), "{}", d.log_text());
    // The log names the identities; the filter's metrics count them.
    assert!(d.wait_log("identity=spf:farm.test (spf)", 5), "{}", d.log_text());
    assert!(d.log_text().contains("open.test: SPF passes but is no identity"), "{}", d.log_text());
    // Every path above (DNS, SPF, hashed keys) kept nothing past its call:
    // the reference filter's per-call arena was rewound after each.
    assert!(!d.log_text().contains("per-call arena cannot be rewound"), "{}", d.log_text());
    let status = greyhook_status(&dir.path().join("control.sock"), false);
    assert!(status.contains("identity_total{kind=\"spf\"} 4"), "{status}");
    assert!(status.lines().any(|l| l.starts_with("filter greylist ") && l.contains(" failures=0 ")), "{status}");
    assert!(status.contains("identity_total{kind=\"fcrdns-org\"} 2"), "{status}");
    let lookups: u64 = status.split("dns lookups=").nth(1).and_then(|r| r.split(' ').next()).and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(lookups >= 10, "the resolver's own count: {status}");
    // The same for scripts.
    let out = greyhook_status(&dir.path().join("control.sock"), true);
    let json: serde_json::Value = serde_json::from_str(&out).expect("status --json prints JSON");
    let f = &json["filters"][0];
    assert_eq!((f["name"].as_str(), f["contract"].as_str(), f["failures"].as_u64()), (Some("greylist"), Some("0.2.3"), Some(0)), "{json}");
    let spf = f["metrics"].as_array().unwrap().iter().find(|m| m["name"] == "identity_total" && m["labels"]["kind"] == "spf");
    assert_eq!(spf.map(|m| m["value"].clone()), Some(serde_json::json!(4)), "{json}");
    let delay = f["metrics"].as_array().unwrap().iter().find(|m| m["name"] == "delay_seconds").expect("a histogram");
    assert!(delay["value"]["count"].as_u64().is_some_and(|n| n >= 1) && delay["value"]["bounds"].as_array().is_some(), "{json}");
    assert!(json["dns"]["lookups"].as_u64() >= Some(10) && json["store"]["health"] == "ok", "{json}");
    assert!(json["version"].is_string() && json["uptime_seconds"].is_u64(), "{json}");
    // The host's caches: the farm's record was fetched once for its SPF
    // checks and the scope walk (then remembered in the store).
    assert_eq!(dns.queries("farm.test"), 1, "TXT queries for farm.test");
}

/// Selective greylisting: only suspicious clients are greylisted; a DNSWL
/// listing skips it; with the resolver gone, everyone is greylisted and
/// nothing waits longer than the DNS timeout.
#[test]
fn selective_greylisting_against_real_dnsbl_and_dnswl_zones() {
    let dns = zone();
    let dir = tempfile::tempdir().unwrap();
    let config = "greylist_only = [\"no-fcrdns\", \"dynamic-name\", \"dnsbl\"]\ndnsbl = [\"bl.test\"]\ndnswl = [\"wl.test\"]\n";
    let (_d, port) = serve(dir.path(), &dns.addr(), "", config);
    let clean = ask(port, "198.51.100.10", "out-a.mail.bigfarm.test", "out-a.mail.bigfarm.test", "a@nospf.test");
    assert_eq!(clean, "action=DUNNO", "a confirmed, unlisted client is not greylisted");
    let confirmed_here = ask(port, "203.0.113.20", "unknown", "out-b.mail.bigfarm.test", "a@nospf.test");
    assert_eq!(confirmed_here, "action=DUNNO", "confirmed by the filter's own lookup");
    let dynamic = ask(port, "192.0.2.50", "dsl-192-0-2-50.isp.test", "dsl-192-0-2-50.isp.test", "a@nospf.test");
    assert!(deferred(&dynamic), "dynamic-looking name: {dynamic}");
    let spoofed = ask(port, "192.0.3.66", "unknown", "out-y.mail.bigfarm.test", "a@nospf.test");
    assert!(deferred(&spoofed), "no confirmed name: {spoofed}");
    let whitelisted = ask(port, "192.0.2.99", "unknown", "unknown", "a@nospf.test");
    assert_eq!(whitelisted, "action=DUNNO", "listed on the DNSWL");
    drop(dns);

    // The resolver gone: plain greylisting for everyone, in bounded time.
    let dir = tempfile::tempdir().unwrap();
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let (_d, port) = serve(dir.path(), &silent.local_addr().unwrap().to_string(), "timeout = \"300ms\"\n", config);
    let t = Instant::now();
    let a = ask(port, "198.51.100.10", "unknown", "out-a.mail.bigfarm.test", "news@farm.test");
    assert!(deferred(&a), "DNS down: greylisted, never let through: {a}");
    assert!(t.elapsed() < Duration::from_secs(3), "bounded by the DNS timeout: {:?}", t.elapsed());
    // Keyed on the network then: the same /24 passes after the delay.
    std::thread::sleep(Duration::from_millis(1300));
    let a = ask(port, "198.51.100.11", "unknown", "unknown", "news@farm.test");
    assert!(passed(&a), "{a}");
}

/// A resolver slower than the hook's deadline: the answer comes within
/// the deadline (the filter is told `timeout` with a quarter of it left to
/// answer), the client is greylisted on its network, and the lookup cut off
/// goes on in the background to fill the cache for the retry (counted).
#[test]
fn the_hook_deadline_bounds_dns_waits() {
    let dir = tempfile::tempdir().unwrap();
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let (d, port) = serve_with_deadline(dir.path(), &silent.local_addr().unwrap().to_string(), "400ms");
    let t = Instant::now();
    let a = ask(port, "198.51.100.10", "unknown", "unknown", "news@farm.test");
    assert!(deferred(&a), "{a}\n{}", d.log_text());
    assert!(t.elapsed() < Duration::from_millis(2500), "bounded by the 400 ms deadline, not the 5 s DNS timeout: {:?}", t.elapsed());
    let status = greyhook_status(&dir.path().join("control.sock"), false);
    assert!(status.lines().any(|l| l.starts_with("filter greylist ") && l.contains(" failures=0 ")), "answered in time: {status}");
    assert!(status.contains("dns_failures_total{check=\"spf\"} 1"), "{status}");
    assert!(!status.contains("cut_by_deadline=0"), "{status}");
}

/// A DNS server in front of `upstream` that holds each answer for
/// `SlowDns::DELAY` while it is slow (until [`SlowDns::fast`]): a resolver
/// slower than the hook's deadline, then a normal one.
struct SlowDns {
    addr: std::net::SocketAddr,
    slow: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl SlowDns {
    const DELAY: Duration = Duration::from_secs(2);

    fn start(upstream: &str) -> SlowDns {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        let upstream: std::net::SocketAddr = upstream.parse().unwrap();
        let slow = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let s = slow.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends with the test process. A thread a query, so that an
            // answer held back holds no other.
            while let Ok((n, from)) = sock.recv_from(&mut buf) {
                let (query, reply_to, s) = (buf[..n].to_vec(), sock.try_clone().unwrap(), s.clone());
                std::thread::spawn(move || {
                    if s.load(std::sync::atomic::Ordering::SeqCst) {
                        std::thread::sleep(SlowDns::DELAY);
                    }
                    let up = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                    up.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    up.send_to(&query, upstream).unwrap();
                    let mut answer = [0u8; 4096];
                    if let Ok(m) = up.recv(&mut answer) {
                        let _ = reply_to.send_to(&answer[..m], from);
                    }
                });
            }
        });
        SlowDns { addr, slow }
    }

    fn fast(&self) {
        self.slow.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Found with a resolver slower than the hook's deadline: the first
/// attempt's SPF check was cut off, so it was keyed on the client network;
/// the check went on and filled the cache, so the retry from the same
/// client was keyed on the sender's domain, a triplet never seen, and
/// greylisted for a second delay. The retry now counts the first attempt.
#[test]
fn a_first_attempt_cut_off_by_slow_dns_counts_at_the_retry() {
    let dns = zone();
    let slow = SlowDns::start(&dns.addr());
    let dir = tempfile::tempdir().unwrap();
    let (d, port) = serve_with_deadline(dir.path(), &slow.addr.to_string(), "1s");
    let ask_as = |instance: &str| ask_in(port, instance, "198.51.100.10", "unknown", "unknown", "news@farm.test");
    let a = ask_as("first");
    assert!(deferred(&a), "{a}\n{}", d.log_text());
    assert!(!d.log_text().contains("identity=spf:farm.test"), "the first attempt is keyed on the network:\n{}", d.log_text());
    slow.fast();
    // The delay (1 s) is out, and the cut-off check has filled the cache.
    std::thread::sleep(SlowDns::DELAY + Duration::from_millis(1500));
    let a = ask_as("retry");
    assert!(passed(&a), "the retry passes: {a}\n{}", d.log_text());
    let status = greyhook_status(&dir.path().join("control.sock"), false);
    assert!(status.contains("network_carried_total{identity=\"spf\"} 1"), "{status}\n{}", d.log_text());
    assert!(d.wait_log("now identity=spf:farm.test", 10), "{}", d.log_text());
    assert!(!status.contains("cut_by_deadline=0"), "the first attempt's lookup was cut off: {status}");
}

/// One SMTP transaction from `from`: the RCPT reply.
fn attempt(port: u16, from: &str, sender: &str) -> String {
    rcpt_reply(port, from, "mx.sender.test", sender, "user@dest.test")
}

/// The same through `greyhook smtp`, from loopback addresses in several /24s.
#[test]
fn smtp_farm_retries_from_another_network_pass() {
    let dns = zone();
    let sink = Sink::start();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut d = greyhook_with(
        dir.path(),
        "smtp",
        &format!(
            "[store]\npath = \"memory\"\n[control]\nsocket = \"{d}/control.sock\"\n\
             [smtp]\nlisten = [\"127.0.0.1:{port}\"]\nnext_hop = \"127.0.0.1:{sink}\"\nhostname = \"greyhook.test\"\n\
             [dns]\nservers = [\"{dns}\"]\n[filter]\ndeadline = \"2s\"\n[filter.config]\ndelay = 1\n",
            d = dir.path().display(),
            sink = sink.port,
            dns = dns.addr()
        ),
    );
    d.wait_listening(port, 60);
    for (from, sender) in [("127.0.1.10", "news@farm.test"), ("127.0.5.5", "news@farm.test"), ("127.0.7.7", "bulk@open.test")] {
        let r = attempt(port, from, sender);
        assert!(r.starts_with("451 4.7.1") && r.contains("retry=00:00:0"), "{from} {sender}: {r}");
    }
    std::thread::sleep(Duration::from_millis(1300));
    let r = attempt(port, "127.0.2.20", "news@farm.test");
    assert!(r.starts_with("250"), "the farm's retry from another /24 passes: {r}\n{}", d.log_text());
    let r = attempt(port, "127.0.6.6", "news@farm.test");
    assert!(r.starts_with("451 4.7.1"), "a bot outside the SPF record is greylisted again: {r}");
    let r = attempt(port, "127.0.8.8", "bulk@open.test");
    assert!(r.starts_with("451 4.7.1"), "+all is no identity: {r}");
    assert!(d.wait_log("identity=spf:farm.test", 5), "{}", d.log_text());
}
