//! What DNS and SPF cost a filter once the cache is warm: the host's
//! resolver called natively (a lookup, a forward-confirmed name, an SPF
//! check), and the walkthrough's SPF filter's on-rcpt decision through
//! Wasm with its imports (`auth.spf`, then `dns.lookup` of the record to
//! judge its scope) against the same decision with them refused at once
//! (`max_lookups = 0`): the difference is what the imports cost a filter;
//! and the reference filter's on-rcpt decision on its DNS-aware default
//! against `identity = ["network"]`. Then what a lookup the cache cannot
//! answer costs: distinct names, each asked of the server, through the
//! host's resolver against the same queries made by hand on a bare UDP
//! socket (a new one for each, as the resolver binds one to a random port
//! for each query): the CPU of this process a lookup, both ways.
//! Ratios measured in one run; a real DNS server (dnsmasq) answers.
//!
//! `cargo bench -p greyhook-tests --bench dns`

use std::sync::Arc;
use std::time::Instant;

use greyhook::dns::{DnsConfig, RecordType, Resolver};
use greyhook::store::MemoryStore;
use greyhook::types::{Context, Session, Transaction};
use greyhook::{FilterOptions, Runtime, RuntimeConfig};
use greyhook_tests::{DnsServer, SPF_DOMAIN_FILTER};

/// This process's CPU time (user and system, all threads) so far, in µs
/// (clock ticks of 10 ms: the cold runs are long enough for hundreds).
fn process_cpu_us() -> f64 {
    greyhook_tests::cpu_ticks(std::process::id()) as f64 * 1e6 / 100.0
}

/// One A query for `name` on a new UDP socket, its answer awaited: the
/// floor under a resolver's cold lookup. Written by hand because it is the
/// bare exchange, with nothing of a resolver around it. The answer must be
/// NXDOMAIN for the query's id.
fn bare_query(server: std::net::SocketAddr, name: &str, id: u16) {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD; one question
    for label in name.split('.') {
        q.push(u8::try_from(label.len()).expect("short label"));
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]); // root, type A, class IN
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    sock.connect(server).expect("connect");
    sock.send(&q).expect("send");
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).expect("recv");
    assert!(n >= 12 && buf[..2] == id.to_be_bytes() && buf[3] & 0x0f == 3, "an NXDOMAIN answer to the query");
}

fn per_call(n: u32, start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e6 / f64::from(n)
}

/// µs per on-rcpt call of the filter `wasm` (configured with `config`,
/// its lookups through `resolver`): the same client (HELO `mx.big.test`),
/// sender and recipient each call, after one call that warms everything.
async fn on_rcpt_cost(resolver: Resolver, wasm: &[u8], config: String, ip: std::net::IpAddr, n: u32) -> f64 {
    let rt = Runtime::new(RuntimeConfig { resolver, ..RuntimeConfig::default() }).expect("runtime");
    let options = FilterOptions { config, ..FilterOptions::default() };
    let f = rt.load(wasm, options, Arc::new(MemoryStore::new())).await.expect("the filter loads");
    let ctx = |now| {
        let mut s = Session::new("bench", ip);
        s.helo = Some("mx.big.test".into());
        Context { session: s, transaction: Transaction { sender: Some("a@big.test".into()), recipients: Vec::new() }, now }
    };
    f.on_rcpt(&ctx(1_700_000_000), "b@example.com").await;
    let t = Instant::now();
    for i in 0..n {
        std::hint::black_box(f.on_rcpt(&ctx(1_700_000_100 + u64::from(i)), "b@example.com").await);
    }
    per_call(n, t)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dns = DnsServer::start(&[
        "--txt-record=big.test,v=spf1 ip4:192.0.2.0/24 -all",
        "--host-record=mx.big.test,192.0.2.10",
        "--local=/test/",
        "--local=/2.0.192.in-addr.arpa/",
    ]);
    let config = DnsConfig { servers: vec![dns.addr().parse().expect("address")], ..DnsConfig::default() };
    let r = Resolver::new(config.clone());
    let ip = "192.0.2.10".parse().expect("ip");
    let n = 20_000;
    // Warm the caches.
    r.lookup("big.test", RecordType::Txt).await.expect("lookup");
    r.forward_confirmed(ip).await.expect("fcrdns");
    r.spf(ip, "mx.big.test", "a@big.test").await;
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(r.lookup("big.test", RecordType::Txt).await.expect("lookup"));
    }
    let lookup = per_call(n, t);
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(r.forward_confirmed(ip).await.expect("fcrdns"));
    }
    let fcrdns = per_call(n, t);
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(r.spf(ip, "mx.big.test", "a@big.test").await);
    }
    let spf = per_call(n, t);
    println!("native, warm cache: lookup {lookup:.2} µs, forward-confirmed name {fcrdns:.2} µs, spf {spf:.2} µs per call");

    // Through Wasm: the SPF filter's decision with and without its import.
    let mut rates = Vec::new();
    for max_lookups in [20, 0] {
        let resolver = Resolver::new(DnsConfig { max_lookups, ..config.clone() });
        rates.push(on_rcpt_cost(resolver, SPF_DOMAIN_FILTER, "delay = 1".into(), ip, n).await);
    }
    println!(
        "through Wasm, on-rcpt of the SPF filter: {:.2} µs with its imports (spf, the record's TXT), {:.2} µs with them refused at once: they cost {:.2} µs ({:.2}x)",
        rates[0],
        rates[1],
        rates[0] - rates[1],
        rates[0] / rates[1]
    );

    // The reference filter: its DNS-aware default (an SPF pass whose record
    // is specific: the spf import, and the record's scope read from the
    // store) against `identity = ["network"]`, the same triplet each call.
    let mut rates = Vec::new();
    for identity in ["", "identity = [\"network\"]"] {
        let options = format!("delay = 1\nauto_whitelist_after = 0\n{identity}");
        rates.push(on_rcpt_cost(Resolver::new(config.clone()), greyhook::REFERENCE_FILTER, options, ip, n).await);
    }
    println!(
        "through Wasm, on-rcpt of the reference filter: {:.2} µs DNS-aware (identity spf), {:.2} µs identity network: {:.2}x",
        rates[0],
        rates[1],
        rates[0] / rates[1]
    );

    // Cold: names the cache has never seen (NXDOMAIN from the server), one
    // at a time, through the resolver and by hand.
    let cold = 10_000u32;
    let server: std::net::SocketAddr = dns.addr().parse().expect("address");
    let (cpu, t) = (process_cpu_us(), Instant::now());
    // On a runtime worker, where the daemon's hooks make theirs.
    let worker = r.clone();
    tokio::spawn(async move {
        for i in 0..cold {
            let name = format!("n{i}.cold.test");
            std::hint::black_box(worker.lookup(&name, RecordType::A).await.expect_err("no such name"));
        }
    })
    .await
    .expect("the lookups run");
    let (resolver_cpu, resolver_wall) = ((process_cpu_us() - cpu) / f64::from(cold), per_call(cold, t));
    assert_eq!(dns.queries("n0.cold.test") + dns.queries(&format!("n{}.cold.test", cold - 1)), 2, "each name asked once");
    let (cpu, t) = (process_cpu_us(), Instant::now());
    for i in 0..cold {
        bare_query(server, &format!("n{i}.bare.test"), (i % 65_536) as u16);
    }
    let (bare_cpu, bare_wall) = ((process_cpu_us() - cpu) / f64::from(cold), per_call(cold, t));
    println!(
        "cold lookups (NXDOMAIN from the server, {cold} distinct names): the resolver {resolver_cpu:.1} µs CPU ({resolver_wall:.1} µs wall), \
         a bare UDP query on a new socket {bare_cpu:.1} µs CPU ({bare_wall:.1} µs wall): {:.2}x the CPU",
        resolver_cpu / bare_cpu
    );
}
