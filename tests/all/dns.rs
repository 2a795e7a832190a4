//! Contract 0.2's DNS and sender authentication, end to end: a real DNS
//! server (dnsmasq), `greyhook smtp` with `--dns`, the walkthrough's
//! SPF-domain filter (built on the SDK) and raw SMTP clients from distinct
//! loopback addresses.

use std::path::Path;
use std::time::{Duration, Instant};

use greyhook_tests::*;

/// The zone: `big.test` publishes SPF for 127.0/16 and 127.7/16 (a farm:
/// the filter keys only on specific records, nothing wider than a /16) and
/// 192.0.2.0/24, with a forward-confirmed `mx.big.test` = 192.0.2.10 (and
/// 2001:db8::10); `small.test` publishes SPF that never passes a 127.x
/// client; 192.0.2.11's PTR names `liar.test`, which has no A record.
/// (Clients at 127.x are named by the resolver itself, RFC 6761: only the
/// resolver's own tests use the 192.0.2.x names.)
fn zone() -> DnsServer {
    DnsServer::start(&[
        "--txt-record=big.test,v=spf1 ip4:127.0.0.0/16 ip4:127.7.0.0/16 ip4:192.0.2.0/24 -all",
        "--txt-record=small.test,v=spf1 ip4:192.0.2.0/24 -all",
        "--host-record=mx.big.test,192.0.2.10,2001:db8::10",
        "--ptr-record=11.2.0.192.in-addr.arpa,liar.test",
        "--mx-host=big.test,mx.big.test,10",
        // Authoritative for these: unknown names are NXDOMAIN, not REFUSED.
        "--local=/test/",
        "--local=/2.0.192.in-addr.arpa/",
    ])
}

fn start(dir: &Path, dns: &str, dns_table: &str, filter_table: &str, sink: u16) -> (Process, u16) {
    start_env(dir, dns, dns_table, filter_table, sink, &[])
}

/// [`start`] with `env` added to greyhook's environment.
fn start_env(dir: &Path, dns: &str, dns_table: &str, filter_table: &str, sink: u16, env: &[(&str, &std::ffi::OsStr)]) -> (Process, u16) {
    std::fs::write(dir.join("spf.wasm"), SPF_DOMAIN_FILTER).unwrap();
    let port = free_port();
    let p = greyhook_with_env(
        dir,
        "smtp",
        &format!(
            "[control]\nsocket = \"{d}/control.sock\"\n[store]\npath = \"memory\"\n\
             [smtp]\nlisten = [\"127.0.0.1:{port}\"]\nnext_hop = \"127.0.0.1:{sink}\"\nhostname = \"greyhook.test\"\n\
             [dns]\nservers = [\"{dns}\"]\n{dns_table}\n\
             [filter]\npath = \"{d}/spf.wasm\"\ndeadline = \"2s\"\n{filter_table}\n[filter.config]\ndelay = 1\n",
            d = dir.display()
        ),
        env,
    );
    wait_for_port(port, 60);
    (p, port)
}

/// One transaction from `from` (a loopback address): the RCPT reply.
fn attempt(port: u16, from: &str, helo: &str, sender: &str) -> String {
    rcpt_reply(port, from, helo, sender, "bob@example.com")
}

/// The "done when": a filter keyed on the SPF-validated sender
/// domain lets a farm's retry through from another network, while a
/// sender without an SPF pass stays keyed on its network; the SMTP front
/// end names its clients through the same resolver (forward-confirmed or
/// not); lookups are cached (dnsmasq sees one TXT query for many
/// checks); the filter's own metrics reach `greyhook status`.
#[test]
fn spf_validated_senders_pass_their_first_retry_from_another_network() {
    let dns = zone();
    let sink = Sink::start();
    let dir = tempfile::tempdir().unwrap();
    let (d, port) = start(dir.path(), &dns.addr(), "", "", sink.port);

    let first = attempt(port, "127.0.0.2", "mx.big.test", "news@big.test");
    assert!(first.starts_with("451 4.7.1 Greylisted, please try again later retry=00:00:0"), "{first}");
    let other = attempt(port, "127.0.0.3", "liar.test", "a@small.test");
    assert!(other.starts_with("451 4.7.1"), "{other}");
    std::thread::sleep(Duration::from_millis(1300));
    // The farm retries from another /24: SPF passes it, the domain is the key.
    let retry = attempt(port, "127.7.8.9", "out7.big.test", "news@big.test");
    assert!(retry.starts_with("250"), "the SPF-validated retry passes from another network: {retry}\n{}", d.log_text());
    // Without an SPF pass the client network is the key: another network waits again.
    let moved = attempt(port, "127.9.9.9", "liar.test", "a@small.test");
    assert!(moved.starts_with("451 4.7.1"), "no SPF pass: keyed on the network: {moved}");
    let same = attempt(port, "127.0.0.4", "liar.test", "a@small.test");
    assert!(same.starts_with("250"), "the same /24 after the delay: {same}");

    // The front end names its clients through the same resolver: 127.0.0.1
    // is `localhost` (RFC 6761; not the machine's /etc/hosts name, since
    // the operator named the servers), 127.0.0.2 has no confirmed name.
    let local = attempt(port, "127.0.0.1", "mx.big.test", "x@small.test");
    assert!(local.starts_with("451"), "{local}");
    assert!(d.wait_log("client=127.0.0.1 client_name=localhost", 5), "{}", d.log_text());
    assert!(!d.log_text().contains("client=127.0.0.2 client_name="), "{}", d.log_text());
    // One TXT query for big.test served three SPF checks (the cache honours the 300 s TTL).
    assert_eq!(dns.queries("big.test"), 1, "queries for big.test reached the server more than once");

    let status = greyhook_status(&dir.path().join("control.sock"), false);
    assert!(status.contains("spf-domain 0.1.0 namespace=spf-domain contract=0.2.3"), "{status}");
    assert!(status.contains("identity{kind=\"spf\"} 2") && status.contains("identity{kind=\"network\"} 4"), "{status}");
    assert!(status.contains("delay_seconds{kind=\"spf\"} count=1"), "{status}");
}

/// A resolver that does not answer costs bounded time: the connection is
/// greeted within the `[dns] timeout`, the SPF check falls back to the
/// network (the mail is still greylisted, never let through), and the
/// lookups a hook may make are capped.
#[test]
fn a_dead_resolver_costs_bounded_time_and_never_lets_mail_through() {
    let sink = Sink::start();
    let dir = tempfile::tempdir().unwrap();
    // A UDP port nobody answers on (bound and never read).
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dns = silent.local_addr().unwrap().to_string();
    let (d, port) =
        start(dir.path(), &dns, "timeout = \"300ms\"\nmax_lookups = 4\ncache_size = 100\nresolve_clients = true\n", "", sink.port);
    let t = Instant::now();
    let r = attempt(port, "127.0.0.2", "mx.big.test", "news@big.test");
    assert!(r.starts_with("451 4.7.1"), "a DNS failure is no identity: still greylisted: {r}");
    assert!(t.elapsed() < Duration::from_secs(5), "bounded by the timeouts: {:?}", t.elapsed());
    assert!(!d.log_text().contains("client=127.0.0.2 client_name="), "no name without an answer");
}

/// `resolve_clients = false`: the SMTP front end looks nothing up (the
/// decision log names no client), and the filter's own lookups still work.
#[test]
fn client_names_can_be_left_unresolved() {
    let dns = zone();
    let sink = Sink::start();
    let dir = tempfile::tempdir().unwrap();
    let (d, port) = start(dir.path(), &dns.addr(), "resolve_clients = false\n", "", sink.port);
    let r = attempt(port, "127.0.0.2", "mx.big.test", "news@big.test");
    assert!(r.starts_with("451"), "{r}");
    std::thread::sleep(Duration::from_millis(1300));
    let r = attempt(port, "127.7.7.7", "mx.big.test", "news@big.test");
    assert!(r.starts_with("250"), "the SPF identity still works: {r}");
    assert!(d.wait_log("action=", 5));
    assert!(!d.log_text().contains("client_name="), "{}", d.log_text());
}

/// The resolver speaks plain DNS (UDP, then TCP) to the servers it is
/// given, so it has no use for the system's CA certificates. Found with
/// a profiler: hickory builds a TLS verifier from them unless handed a
/// TLS configuration, so the first lookup read and parsed every file in
/// `/etc/ssl/certs` (~150, 18M instructions) on the thread serving that
/// request, and where there are none it warned "Error loading CA root
/// certificate". Here the certificate store is missing: lookups (client
/// names, SPF) work and nothing is said about certificates.
#[test]
fn the_resolver_reads_no_ca_certificates() {
    let dns = zone();
    let sink = Sink::start();
    let dir = tempfile::tempdir().unwrap();
    let none = dir.path().join("no-such-certificates");
    let env = [("SSL_CERT_FILE", none.as_os_str()), ("SSL_CERT_DIR", none.as_os_str())];
    let (d, port) = start_env(dir.path(), &dns.addr(), "", "", sink.port, &env);
    let r = attempt(port, "127.0.0.2", "mx.big.test", "news@big.test");
    assert!(r.starts_with("451"), "{r}");
    std::thread::sleep(Duration::from_millis(1300));
    let r = attempt(port, "127.7.7.7", "mx.big.test", "news@big.test");
    assert!(r.starts_with("250"), "the SPF identity, looked up: {r}");
    assert!(d.wait_log("action=pass", 5), "{}", d.log_text());
    let log = d.log_text();
    assert!(!log.to_lowercase().contains("certificate"), "{log}");
}

/// The resolver against a real server: every record type in the
/// contract's text form, typed errors, forward confirmation, SPF, and a
/// cache that honours the TTL (a second lookup never reaches the server).
/// Prints the cost of a warm lookup, FCrDNS and SPF check (measured, not
/// asserted).
#[test]
fn the_resolver_answers_in_the_contracts_forms_and_caches() {
    use greyhook::dns::{DnsConfig, DnsError, RecordType, Resolver, SpfResult};
    let dns = zone();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let r = Resolver::new(DnsConfig { servers: vec![dns.addr().parse().unwrap()], ..DnsConfig::default() });
        assert_eq!(r.lookup("mx.big.test", RecordType::A).await.unwrap(), vec!["192.0.2.10"]);
        assert_eq!(r.lookup("MX.big.test.", RecordType::Aaaa).await.unwrap(), vec!["2001:db8::10"]);
        assert_eq!(r.lookup("big.test", RecordType::Mx).await.unwrap(), vec!["10 mx.big.test"]);
        assert_eq!(
            r.lookup("big.test", RecordType::Txt).await.unwrap(),
            vec!["v=spf1 ip4:127.0.0.0/16 ip4:127.7.0.0/16 ip4:192.0.2.0/24 -all"]
        );
        assert_eq!(r.lookup("10.2.0.192.in-addr.arpa", RecordType::Ptr).await.unwrap(), vec!["mx.big.test"]);
        assert_eq!(r.lookup("nowhere.test", RecordType::A).await, Err(DnsError::NxDomain));
        assert_eq!(r.lookup("mx.big.test", RecordType::Txt).await, Err(DnsError::NoData));
        assert!(matches!(r.lookup("bad name", RecordType::A).await, Err(DnsError::Limit(_))));
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert_eq!(r.reverse(ip("192.0.2.11")).await.unwrap(), vec!["liar.test"]);
        assert_eq!(r.forward_confirmed(ip("192.0.2.10")).await.unwrap().as_deref(), Some("mx.big.test"));
        assert_eq!(r.forward_confirmed(ip("192.0.2.11")).await.unwrap(), None, "liar.test has no A record");
        assert_eq!(r.forward_confirmed(ip("192.0.2.99")).await.unwrap(), None, "no PTR at all");
        assert_eq!(r.client_names(ip("192.0.2.11")).await, (None, Some("liar.test".to_string())));
        let spf = r.spf(ip("192.0.2.10"), "mx.big.test", "news@big.test").await;
        assert_eq!((spf.result, spf.domain.as_str()), (SpfResult::Pass, "big.test"));
        assert_eq!(r.spf(ip("198.51.100.1"), "x", "a@small.test").await.result, SpfResult::Fail);
        assert_eq!(r.spf(ip("192.0.2.10"), "mx.big.test", "").await.domain, "mx.big.test", "the null sender: HELO identity");

        let before = dns.queries("big.test");
        let n = 2000;
        let t = Instant::now();
        for _ in 0..n {
            r.lookup("big.test", RecordType::Txt).await.unwrap();
        }
        let lookup = t.elapsed() / n;
        let t = Instant::now();
        for _ in 0..n {
            r.forward_confirmed(ip("192.0.2.10")).await.unwrap();
        }
        let fcrdns = t.elapsed() / n;
        let t = Instant::now();
        for _ in 0..n {
            assert_eq!(r.spf(ip("192.0.2.10"), "mx.big.test", "news@big.test").await.result, SpfResult::Pass);
        }
        let spf = t.elapsed() / n;
        assert_eq!(dns.queries("big.test"), before, "warm: nothing reached the server");
        eprintln!("warm cache, per call: lookup {lookup:?}, forward-confirmed name {fcrdns:?}, spf {spf:?}");
    });
}

/// A negative answer that carries no SOA record (dnsmasq's, and some
/// broken servers') has no TTL to be cached for: it was asked again at
/// every lookup, so a flood of clients without PTR records, or senders of a
/// domain without SPF, cost a DNS round trip each (~100 µs of greyhook's
/// CPU a lookup). It is now kept for `min_negative_ttl` (unbound keeps
/// such answers 5 s): asked once within it, and again once it has passed.
#[test]
fn a_negative_answer_without_a_ttl_is_kept_for_min_negative_ttl() {
    use greyhook::dns::{DnsConfig, DnsError, RecordType, Resolver};
    let dns = zone();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let config = DnsConfig { servers: vec![dns.addr().parse().unwrap()], ..DnsConfig::default() };
        assert_eq!(config.min_negative_ttl, Duration::from_secs(5), "the documented default");
        let r = Resolver::new(DnsConfig { min_negative_ttl: Duration::from_millis(1500), ..config.clone() });
        let ip = "192.0.2.99".parse::<std::net::IpAddr>().unwrap();
        for _ in 0..50 {
            assert_eq!(r.lookup("nowhere.test", RecordType::A).await, Err(DnsError::NxDomain));
            assert_eq!(r.lookup("mx.big.test", RecordType::Txt).await, Err(DnsError::NoData));
            assert_eq!(r.forward_confirmed(ip).await.unwrap(), None, "no PTR at all");
        }
        assert_eq!(dns.queries("nowhere.test"), 1, "NXDOMAIN asked once");
        assert_eq!(dns.queries("mx.big.test"), 1, "no data asked once");
        assert_eq!(dns.queries("99.2.0.192.in-addr.arpa"), 1, "no PTR asked once");
        tokio::time::sleep(Duration::from_millis(1700)).await;
        assert_eq!(r.lookup("nowhere.test", RecordType::A).await, Err(DnsError::NxDomain));
        assert_eq!(dns.queries("nowhere.test"), 2, "asked again once min_negative_ttl has passed");
        // Zero keeps no negative answer without a TTL (hickory's default).
        let r = Resolver::new(DnsConfig { min_negative_ttl: Duration::ZERO, ..config });
        for _ in 0..3 {
            assert_eq!(r.lookup("nowhere2.test", RecordType::A).await, Err(DnsError::NxDomain));
        }
        assert_eq!(dns.queries("nowhere2.test"), 3);
    });
}

/// `max_lookups` bounds a hook call's DNS and `auth` calls: with none
/// allowed the filter's SPF check gets `limit` and it falls back to the
/// client network (the farm's retry from another network waits again).
#[test]
fn the_lookup_limit_is_enforced_per_hook_call() {
    let dns = zone();
    let sink = Sink::start();
    let dir = tempfile::tempdir().unwrap();
    let (d, port) = start(dir.path(), &dns.addr(), "max_lookups = 0\n", "", sink.port);
    assert!(attempt(port, "127.0.0.2", "mx.big.test", "news@big.test").starts_with("451"));
    std::thread::sleep(Duration::from_millis(1300));
    let r = attempt(port, "127.7.7.7", "mx.big.test", "news@big.test");
    assert!(r.starts_with("451"), "no SPF without lookups: keyed on the network: {r}\n{}", d.log_text());
    assert_eq!(dns.queries("big.test"), 0, "nothing was asked");
}
