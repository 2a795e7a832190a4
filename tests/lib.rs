//! Helpers for greyhook's integration tests (`tests/all`).
//!
//! Client addresses: any 127.x.y.z is a distinct client on loopback
//! ([`connect_from`]); most tests send from 127.0.0.0/24, and the harness's
//! own readiness probes ([`wait_for_port`], [`Process::wait_listening`])
//! come from [`PROBE_FROM`], in a network of their own, so that a probe
//! the filter sees never counts as a test's client.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use greyhook::store::{MemoryStore, Store};
use greyhook::types::{AcceptedRecipient, Context, Decision, Message, Session, Transaction, Verdict};
use greyhook::{Filter, FilterOptions, Runtime, RuntimeConfig};

/// The chaos filter: misbehaves on demand (see `tests/guests/chaos`).
pub const CHAOS_FILTER: &[u8] = include_bytes!(env!("GREYHOOK_CHAOS_FILTER"));
/// The walkthrough's filter (`examples/filters/spf-domain`): greylisting
/// keyed on the SPF-validated sender domain, built on the SDK (0.2.2).
pub const SPF_DOMAIN_FILTER: &[u8] = include_bytes!(env!("GREYHOOK_SPF_DOMAIN_FILTER"));
/// `tests/guests/stateful`: keeps state between calls, with the SDK's arena.
pub const STATEFUL_FILTER: &[u8] = include_bytes!(env!("GREYHOOK_STATEFUL_FILTER"));
/// `tests/guests/v020`: built against the contract's 0.2.0 as released.
pub const V020_FILTER: &[u8] = include_bytes!(env!("GREYHOOK_V020_FILTER"));

/// A real DNS server (dnsmasq) on a free loopback port, answering only
/// from `records` (dnsmasq options such as `--txt-record=NAME,TEXT`,
/// `--host-record=NAME,ADDR` (A and PTR), `--ptr-record=...`), with a TTL
/// of 300 s and every query logged (to count what reached it).
pub struct DnsServer {
    child: std::process::Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl DnsServer {
    /// Starts dnsmasq (Debian's `dnsmasq-base`; the test fails if it is missing).
    pub fn start(records: &[&str]) -> DnsServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("dnsmasq.log");
        let port = free_udp_port();
        let bin = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("dnsmasq is not installed (apt-get install dnsmasq-base): the DNS tests need a real DNS server");
        let child = std::process::Command::new(bin)
            .args(["--keep-in-foreground", "--no-resolv", "--no-hosts", "--conf-file=/dev/null", "--bind-interfaces"])
            .args(["--listen-address=127.0.0.1", "--local-ttl=300", "--log-queries", "--user=root", "--pid-file="])
            .arg(format!("--port={port}"))
            .arg(format!("--log-facility={}", log.display()))
            .args(records)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("dnsmasq starts");
        wait_for_port(port, 10);
        DnsServer { child, port, log, _dir: dir }
    }

    /// `127.0.0.1:PORT`, for `--dns`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// How many queries for `name` (any type) it answered.
    pub fn queries(&self, name: &str) -> usize {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        log.lines().filter(|l| l.contains("query[") && l.contains(&format!(" {name} from"))).count()
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A DNS server that answers every query at once with NXDOMAIN, in a
/// thread of the test process (so it lives and dies with it): what the
/// daemons the tests start use unless a test gives them a real zone
/// ([`DnsServer`]). Hand-written (a dozen lines of the RFC 1035 header)
/// because it must outlive no test and start in no time; the real DNS
/// tests use dnsmasq. Returns `127.0.0.1:PORT`.
pub fn null_dns() -> &'static str {
    static ADDR: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ADDR.get_or_init(|| {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("a UDP port");
        let addr = sock.local_addr().expect("its address").to_string();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while let Ok((n, peer)) = sock.recv_from(&mut buf) {
                // Header, then the question: labels up to the root, type, class.
                let mut end = 12;
                while end < n && buf[end] != 0 {
                    end += 1 + usize::from(buf[end]);
                }
                end += 5;
                if n < 12 || end > n {
                    continue;
                }
                let mut reply = buf[..end].to_vec();
                reply[2] = 0x84 | (buf[2] & 0x01); // QR, AA, RD as asked
                reply[3] = 0x83; // RA, NXDOMAIN
                reply[6..12].fill(0); // no answers, authority or additional records
                let _ = sock.send_to(&reply, peer);
            }
        });
        addr
    })
}

/// `cfg` with its resolver set to [`null_dns`] unless it names servers,
/// and its compiled filters kept in [`TEST_CACHE`] unless it names a
/// `cache_dir`: for the daemons the tests start in-process.
pub fn hermetic(mut cfg: greyhook::daemon::DaemonConfig) -> greyhook::daemon::DaemonConfig {
    if cfg.dns.servers.is_empty() {
        cfg.dns.servers = vec![null_dns().parse().expect("an address")];
    }
    if cfg.chain().is_ok_and(|c| c.iter().all(|f| f.cache_dir.is_none())) {
        cfg.main_filter_mut().cache_dir = Some(Path::new(TEST_CACHE).join("filters"));
    }
    cfg
}

/// A port free for both UDP and TCP on loopback.
pub fn free_udp_port() -> u16 {
    loop {
        let p = free_port();
        if std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

/// A fixed start time for tests: 2023-11-14T22:13:20Z.
pub const T0: u64 = 1_700_000_000;

/// A runtime for tests.
pub fn runtime() -> Runtime {
    Runtime::new(RuntimeConfig::default()).expect("the wasmtime engine starts")
}

/// The deadline of a hook call in the in-process tests' filters. The
/// default (100 ms) is the deadline of a call that runs at once; these
/// tests share 2 cores with daemons, Postfix and each other in a debug
/// build, and a call cut while it waited for a core would be answered by
/// the failure policy (`continue`: the mail passes), making a test of the
/// filter's logic fail by the machine's load. The deadline itself is
/// tested in `sandbox.rs` with its own limits.
pub const TEST_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// Loads the reference filter with `config` over `store`.
pub async fn reference_on(rt: &Runtime, config: &str, store: Arc<dyn Store>) -> Filter {
    let limits = greyhook::Limits { deadline: TEST_DEADLINE, ..greyhook::Limits::default() };
    let options = FilterOptions { config: config.to_string(), limits, ..FilterOptions::default() };
    load_on(rt, greyhook::REFERENCE_FILTER, options, store).await.expect("the reference filter loads")
}

/// The compiled-filter cache the tests share, in the build's `OUT_DIR`:
/// compiling a filter takes ~4 s of CPU in a debug build, loading its
/// artifact milliseconds, and the tests load the same few filters a hundred
/// times. [`load_on`] keeps the artifacts in `filters/` here, and every
/// daemon [`Process::greyhook`] starts gets it as `$CACHE_DIRECTORY` (so
/// `filters/` too), unless its configuration names a `cache_dir`. Artifacts
/// are keyed by the component's hash and the engine's compatibility hash,
/// and written whole, then renamed: sharing is safe.
pub const TEST_CACHE: &str = env!("OUT_DIR");

/// [`Runtime::load`] through [`TEST_CACHE`]. Each test keeps its own
/// [`Runtime`]; only the compile is shared.
pub async fn load_on(rt: &Runtime, bytes: &[u8], options: FilterOptions, store: Arc<dyn Store>) -> Result<Filter, greyhook::LoadError> {
    use greyhook::runtime::artifact_cache::ArtifactCache;
    static CACHE: std::sync::OnceLock<Option<ArtifactCache>> = std::sync::OnceLock::new();
    // One compile at a time: two tests asking for the same filter at once
    // would otherwise both compile it.
    static COMPILING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let cache = CACHE.get_or_init(|| ArtifactCache::open(&Path::new(TEST_CACHE).join("filters")).ok());
    let Some(cache) = cache else { return rt.load(bytes, options, store).await };
    let compiled = {
        let _one = COMPILING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        cache.compile(rt, bytes)?.0
    };
    rt.instantiate_filter(compiled, options, store).await
}

/// Loads the reference filter with `config` over a fresh memory store.
pub async fn reference(config: &str) -> Filter {
    reference_on(&runtime(), config, Arc::new(MemoryStore::new())).await
}

/// An SMTP session driven against a filter, with the clock in the test's hands.
pub struct Client<'f> {
    /// The filter.
    pub filter: &'f Filter,
    /// The session.
    pub session: Session,
    /// The transaction.
    pub tx: Transaction,
    /// The time passed to the filter.
    pub now: u64,
}

impl<'f> Client<'f> {
    /// A session from `ip` at `now`.
    pub fn new(filter: &'f Filter, ip: &str, now: u64) -> Client<'f> {
        let ip: IpAddr = ip.parse().expect("a test IP address");
        Client { filter, session: Session::new("test", ip), tx: Transaction::default(), now }
    }

    /// The context of the next call.
    pub fn ctx(&self) -> Context {
        Context { session: self.session.clone(), transaction: self.tx.clone(), now: self.now }
    }

    /// MAIL FROM (starts a new transaction).
    pub async fn mail(&mut self, sender: &str) -> Verdict {
        self.tx = Transaction::default();
        let v = self.filter.on_mail(&self.ctx(), sender).await;
        self.tx.sender = Some(sender.to_string());
        v
    }

    /// RCPT TO; an accepted recipient joins the transaction.
    pub async fn rcpt(&mut self, rcpt: &str) -> Verdict {
        let v = self.filter.on_rcpt(&self.ctx(), rcpt).await;
        if v.reply().is_none() {
            self.tx
                .recipients
                .push(AcceptedRecipient { address: rcpt.to_string(), policy_group: v.policy_group.clone().unwrap_or_default() });
        }
        v
    }

    /// End of DATA with this Message-ID.
    pub async fn data(&mut self, message_id: Option<&str>) -> Verdict {
        let m = Message { message_id: message_id.map(str::to_string), headers: Vec::new() };
        self.filter.on_data(&self.ctx(), &m).await
    }

    /// One whole transaction: MAIL, RCPT, and the RCPT verdict.
    pub async fn attempt(&mut self, sender: &str, rcpt: &str) -> Verdict {
        self.mail(sender).await;
        self.rcpt(rcpt).await
    }
}

/// The retry hint of a tempfail verdict (`None` if it is not a tempfail).
pub fn retry(v: &Verdict) -> Option<u32> {
    match &v.decision {
        Decision::Tempfail(r) => r.retry_after,
        _ => None,
    }
}

/// The reply code, if any.
pub fn code(v: &Verdict) -> Option<u16> {
    v.reply().map(|r| r.code)
}

/// True if the verdict lets the mail on (continue or accept).
pub fn passes(v: &Verdict) -> bool {
    matches!(v.decision, Decision::Continue | Decision::Accept)
}

/// The `greyhook` binary built by the same `cargo test` run.
pub fn greyhook_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target/<profile>/deps");
    let bin = dir.join("greyhook");
    assert!(bin.exists(), "{} is missing: run the tests with `cargo test --workspace` (it builds the binary)", bin.display());
    bin
}

/// The `policy-load` load generator built by the same `cargo test --workspace` run.
pub fn policy_load_bin() -> PathBuf {
    let bin = greyhook_bin().with_file_name("policy-load");
    assert!(bin.exists(), "{} is missing: run the tests with `cargo test --workspace` (it builds the binary)", bin.display());
    bin
}

/// A free TCP port (checked by binding it on every address, then
/// released), never one this process handed out before: ports are handed
/// out in turn (the kernel may give a port it just released to the next
/// `bind(0)`, and a test that asked for two ports got the same one twice).
pub fn free_port() -> u16 {
    // Below the kernel's ephemeral range (32768-60999 on Linux), from which
    // every outgoing connection takes its local port: a port taken from
    // that range (as binding port 0 does) could be given to some client's
    // connection between this call and the daemon's bind, which then
    // failed with "Address already in use" (seen once in CI, a metrics
    // listener on 0.0.0.0). Here only other listeners compete, and each is
    // checked free on every address.
    const FIRST: u16 = 20_000;
    const COUNT: u16 = 12_000;
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    static START: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
    // Each test process starts elsewhere in the range.
    let start = *START.get_or_init(|| (std::process::id() % u32::from(COUNT)) as u16);
    for _ in 0..COUNT {
        let i = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % COUNT;
        let port = FIRST + (start + i) % COUNT;
        if std::net::TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {FIRST}..{}", FIRST + COUNT)
}

/// The address the harness's readiness probes connect from, in a /24 (and
/// a /16) no test sends from. A probe that reaches a filter (the SMTP front
/// end's connect hook, or Postfix and Haraka asking greyhook about the
/// connection) is a client to it: from 127.0.0.1, where most tests send,
/// it started that client's delay before the test's first message, and a
/// test expecting a full delay saw one a second short. The reference
/// filter tracks a client by its /24, so another 127.0.0.x would do the
/// same.
pub const PROBE_FROM: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 254, 0, 1);

/// A TCP connection to 127.0.0.1:`port` from `from`, within `timeout` if
/// one is given. std's `TcpStream` cannot bind before it connects; socket2
/// can (and the stream it gives is blocking).
fn connect_bound(from: std::net::Ipv4Addr, port: u16, timeout: Option<std::time::Duration>) -> std::io::Result<std::net::TcpStream> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    s.bind(&std::net::SocketAddr::from((from, 0)).into())?;
    let to = std::net::SocketAddr::from(([127, 0, 0, 1], port)).into();
    match timeout {
        Some(t) => s.connect_timeout(&to, t)?,
        None => s.connect(&to)?,
    }
    Ok(s.into())
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`, asked
/// from [`PROBE_FROM`] (the connection is closed at once).
pub fn listening(port: u16) -> bool {
    connect_bound(PROBE_FROM, port, Some(std::time::Duration::from_secs(2))).is_ok()
}

/// Waits until something accepts TCP connections on `port` (at most `secs`),
/// probing from [`PROBE_FROM`].
pub fn wait_for_port(port: u16, secs: u64) {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !listening(port) {
        assert!(std::time::Instant::now() < until, "nothing listens on 127.0.0.1:{port} after {secs}s");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A `greyhook` process, stopped with SIGTERM (then killed) when dropped.
pub struct Process {
    /// The child.
    pub child: std::process::Child,
    /// Where its stderr goes.
    pub log: PathBuf,
}

impl Process {
    /// Starts `greyhook ARGS`, logging to `log`. A daemon command that
    /// names no DNS server (no `--dns`, no `[dns]` in its `--config`) gets
    /// [`null_dns`]: the tests never ask the machine's resolver (whose
    /// answers, and silences, differ from machine to machine).
    pub fn greyhook(args: &[&str], log: PathBuf) -> Process {
        Process::greyhook_env(args, log, &[])
    }

    /// [`Process::greyhook`] with `env` added to its environment.
    pub fn greyhook_env(args: &[&str], log: PathBuf, env: &[(&str, &std::ffi::OsStr)]) -> Process {
        Process::greyhook_under(&[], args, log, env)
    }

    /// [`Process::greyhook_env`] started through `wrapper` (a command and
    /// its arguments that runs the rest, e.g. `prlimit --nofile=256:1100`).
    pub fn greyhook_under(wrapper: &[&str], args: &[&str], log: PathBuf, env: &[(&str, &std::ffi::OsStr)]) -> Process {
        let err = std::fs::File::create(&log).expect("log file");
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let daemon = matches!(args.first().map(String::as_str), Some("serve" | "smtp"));
        let config_names_dns = args
            .iter()
            .position(|a| a == "--config")
            .and_then(|i| args.get(i + 1))
            // At most 1 MiB: a test may name /dev/zero.
            .and_then(|p| {
                use std::io::Read;
                let mut text = String::new();
                std::fs::File::open(p).ok()?.take(1 << 20).read_to_string(&mut text).ok()?;
                Some(text)
            })
            .is_some_and(|t| t.contains("[dns]"));
        if daemon && !config_names_dns && !args.iter().any(|a| a == "--dns") {
            args.extend(["--dns".to_string(), null_dns().to_string()]);
        }
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = std::process::Command::new(program);
                c.args(rest).arg(greyhook_bin());
                c
            }
            None => std::process::Command::new(greyhook_bin()),
        };
        let child = command
            .args(&args)
            .env("GREYHOOK_LOG", "info")
            // The run's compiled-filter cache (see [`TEST_CACHE`]); `env` may name another.
            .env("CACHE_DIRECTORY", TEST_CACHE)
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(err)
            .spawn()
            .expect("greyhook starts");
        Process { child, log }
    }

    /// Sends SIGTERM and waits up to `secs` for a clean exit; true if it exited successfully.
    pub fn terminate(&mut self, secs: u64) -> bool {
        let _ = std::process::Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let until = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.success();
            }
            if std::time::Instant::now() > until {
                let _ = self.child.kill();
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Waits up to `secs` for something to listen on 127.0.0.1:`port`;
    /// panics at once, with the log, if the process exits first.
    pub fn wait_listening(&mut self, port: u16, secs: u64) {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        while std::time::Instant::now() < until {
            if listening(port) {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("greyhook exited ({st}) before listening on {port}:\n{}", self.log_text());
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("nothing listens on 127.0.0.1:{port} after {secs}s:\n{}", self.log_text());
    }

    /// Waits up to `secs` for `needle` to appear in the log; whether it did.
    pub fn wait_log(&self, needle: &str, secs: u64) -> bool {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        while std::time::Instant::now() < until {
            if self.log_text().contains(needle) {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        self.log_text().contains(needle)
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The messages a [`Sink`] accepted, byte for byte.
pub type Messages = Arc<std::sync::Mutex<Vec<Vec<u8>>>>;

/// A next hop for the SMTP front end's tests: a minimal SMTP server on
/// loopback that keeps every message it accepts, and answers DATA with
/// `data_reply` (e.g. a `451` to test tempfail pass-through).
pub struct Sink {
    /// Its port.
    pub port: u16,
    /// The messages accepted, as received (dot-stuffing undone).
    pub messages: Messages,
}

impl Sink {
    /// Starts a sink answering `250 2.0.0 Ok: queued as SINK` after the data.
    pub fn start() -> Sink {
        Sink::with_data_reply("250 2.0.0 Ok: queued as SINK")
    }

    /// Starts a sink answering `data_reply` after the data.
    pub fn with_data_reply(data_reply: &'static str) -> Sink {
        Sink::spawn(vec![data_reply])
    }

    /// Starts a sink that, spoken to in LMTP (`LHLO`), answers each
    /// recipient in turn with the next of `replies` after the data (in SMTP,
    /// the first). It keeps the message if the first reply is positive.
    pub fn spawn(replies: Vec<&'static str>) -> Sink {
        Sink::spawn_tcp(replies, Duration::ZERO)
    }

    /// [`Sink::start`], answering QUIT only after `delay`: a next hop slow
    /// to say goodbye.
    pub fn with_slow_quit(delay: Duration) -> Sink {
        Sink::spawn_tcp(vec!["250 2.0.0 Ok: queued as SINK"], delay)
    }

    fn spawn_tcp(replies: Vec<&'static str>, quit_delay: Duration) -> Sink {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        let messages = Sink::serve(move || l.accept().map(|(c, _)| c), std::net::TcpStream::try_clone, replies, quit_delay);
        Sink { port, messages }
    }

    /// [`Sink::spawn`] on the unix socket `path` (its `port` is 0): an LMTP
    /// server's socket, as Dovecot's.
    pub fn spawn_unix(path: &std::path::Path, replies: Vec<&'static str>) -> Sink {
        let l = std::os::unix::net::UnixListener::bind(path).expect("bind");
        let messages = Sink::serve(move || l.accept().map(|(c, _)| c), std::os::unix::net::UnixStream::try_clone, replies, Duration::ZERO);
        Sink { port: 0, messages }
    }

    /// Serves each connection `accept` takes on a thread of its own
    /// (`clone` gives its writing half), QUIT answered after `quit_delay`;
    /// the messages kept.
    fn serve<C>(
        accept: impl FnMut() -> std::io::Result<C> + Send + 'static,
        clone: fn(&C) -> std::io::Result<C>,
        replies: Vec<&'static str>,
        quit_delay: Duration,
    ) -> Messages
    where
        C: std::io::Read + std::io::Write + Send + 'static,
    {
        let messages: Messages = Arc::new(std::sync::Mutex::new(Vec::new()));
        let m = messages.clone();
        std::thread::spawn(move || {
            for c in std::iter::repeat_with(accept).flatten() {
                let (m, replies) = (m.clone(), replies.clone());
                let w = clone(&c).expect("clone");
                std::thread::spawn(move || sink_session(c, w, &m, &replies, quit_delay));
            }
        });
        messages
    }

    /// The messages accepted so far.
    pub fn received(&self) -> Vec<String> {
        self.received_bytes().iter().map(|m| String::from_utf8_lossy(m).into_owned()).collect()
    }

    /// The messages accepted so far, byte for byte (8-bit data that is
    /// not UTF-8 included).
    pub fn received_bytes(&self) -> Vec<Vec<u8>> {
        self.messages.lock().expect("lock").clone()
    }
}

/// One connection to a [`Sink`]: read from `r`, answered on `w`, QUIT
/// after `quit_delay`.
fn sink_session(
    r: impl std::io::Read,
    mut w: impl std::io::Write,
    m: &std::sync::Mutex<Vec<Vec<u8>>>,
    replies: &[&str],
    quit_delay: Duration,
) {
    use std::io::BufRead;
    let mut r = std::io::BufReader::new(r);
    let _ = w.write_all(b"220 sink ESMTP\r\n");
    // Lines as bytes: message data need not be UTF-8.
    let mut line = Vec::new();
    let (mut lmtp, mut rcpts) = (false, 0usize);
    loop {
        line.clear();
        if r.read_until(b'\n', &mut line).unwrap_or(0) == 0 {
            return;
        }
        let verb = line.get(..4).unwrap_or(b"").to_ascii_uppercase();
        let reply = match &verb[..] {
            b"EHLO" | b"LHLO" => {
                lmtp = verb == b"LHLO";
                "250-sink\r\n250 8BITMIME\r\n".to_string()
            }
            b"MAIL" => {
                rcpts = 0;
                "250 2.1.0 Ok\r\n".to_string()
            }
            b"RCPT" => {
                rcpts += 1;
                "250 2.1.5 Ok\r\n".to_string()
            }
            b"DATA" => {
                let _ = w.write_all(b"354 go\r\n");
                let mut msg = Vec::new();
                loop {
                    line.clear();
                    if r.read_until(b'\n', &mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if line == b".\r\n" {
                        break;
                    }
                    msg.extend_from_slice(line.strip_prefix(b".").unwrap_or(&line));
                }
                if replies[0].starts_with('2') {
                    m.lock().expect("lock").push(msg);
                }
                let n = if lmtp { rcpts } else { 1 };
                (0..n).map(|i| format!("{}\r\n", replies[i % replies.len()])).collect()
            }
            b"QUIT" => {
                std::thread::sleep(quit_delay);
                let _ = w.write_all(b"221 bye\r\n");
                return;
            }
            _ => "250 2.0.0 Ok\r\n".to_string(),
        };
        let _ = w.write_all(reply.as_bytes());
    }
}

/// Whether this process runs as root (CI's tests do): `/proc/self`
/// belongs to the effective user.
pub fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").expect("/proc/self").uid() == 0
}

/// Sends `request` (a whole HTTP/1.1 request) to 127.0.0.1:`port` and
/// reads the answer to its end (within 10 s).
pub fn http(port: u16, request: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).expect("timeout");
    s.write_all(request.as_bytes()).expect("write");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// `GET path` from 127.0.0.1:`port`: the whole answer, headers and all.
pub fn http_get(port: u16, path: &str) -> String {
    http(port, &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
}

/// Runs a Python 3 script (stdlib only: smtplib, socket); returns its stdout.
pub fn python(script: &str) -> String {
    let out = std::process::Command::new("python3").args(["-c", script]).output().expect("python3 runs");
    assert!(out.status.success(), "python failed:\n{script}\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A private redis-server (Debian's package) on a free loopback port with
/// its own temp dir, no persistence; killed when dropped. A missing
/// redis-server fails the test: `.ci/run` installs it.
pub struct RedisServer {
    /// Its port.
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
    extra: Vec<String>,
    /// The files it speaks TLS with (then on `port` alone, no plain port).
    tls: Option<RedisTlsFiles>,
}

impl RedisServer {
    /// Starts one and waits until it answers.
    pub fn start() -> RedisServer {
        RedisServer::with_args(&[])
    }

    /// Starts one with extra `redis-server` arguments (e.g. `--replicaof`).
    pub fn with_args(extra: &[&str]) -> RedisServer {
        RedisServer::started(extra, None)
    }

    /// Starts one that speaks TLS only, with `files`' server certificate,
    /// asking clients for a certificate from `files`' CA (Redis's default,
    /// `tls-auth-clients yes`).
    pub fn with_tls(files: &RedisTlsFiles) -> RedisServer {
        RedisServer::with_tls_args(files, &[])
    }

    /// The same with extra `redis-server` arguments (e.g. `--replicaof`).
    pub fn with_tls_args(files: &RedisTlsFiles, extra: &[&str]) -> RedisServer {
        RedisServer::started(extra, Some(files))
    }

    /// One on a free port and its own directory, not started yet.
    fn unstarted(extra: &[&str], tls: Option<&RedisTlsFiles>) -> RedisServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let extra = extra.iter().map(|a| a.to_string()).collect();
        RedisServer { port: free_port(), dir, child: None, extra, tls: tls.cloned() }
    }

    /// The same, started.
    fn started(extra: &[&str], tls: Option<&RedisTlsFiles>) -> RedisServer {
        let mut r = RedisServer::unstarted(extra, tls);
        r.restart();
        r
    }

    /// The URL of its database 0 (`rediss://` when it speaks TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}/0", self.port)
    }

    /// The files it speaks TLS with, if it does.
    pub fn tls(&self) -> Option<&RedisTlsFiles> {
        self.tls.as_ref()
    }

    /// The `[store]` lines of a greyhook on it: its TLS files, if any
    /// (the CA, the client certificate and key).
    pub fn store_tls_lines(&self) -> String {
        self.tls.as_ref().map(|t| t.store_lines(&t.ca, true)).unwrap_or_default()
    }

    /// The arguments of redis-server or redis-cli for its TLS, if any.
    pub fn tls_args(&self, server: bool) -> Vec<String> {
        let Some(t) = &self.tls else { return Vec::new() };
        let p = |f: &std::path::Path| f.display().to_string();
        if server {
            let (port, mut a) = (self.port.to_string(), vec!["--port".to_string(), "0".into(), "--tls-port".into()]);
            a.extend([port, "--tls-cert-file".into(), p(&t.server_cert), "--tls-key-file".into(), p(&t.server_key)]);
            a.extend(["--tls-ca-cert-file".into(), p(&t.ca), "--tls-cluster".into(), "yes".into()]);
            a.extend(["--tls-replication".into(), "yes".into()]);
            a
        } else {
            t.cli_args(&t.ca)
        }
    }

    /// Kills it (SIGKILL: a crash, not a shutdown).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends it SIGSTOP (`true`) or SIGCONT (`false`): a server that
    /// keeps its connections and answers nothing, like a hung one.
    pub fn pause(&self, stop: bool) {
        let c = self.child.as_ref().expect("running");
        let sig = if stop { "-STOP" } else { "-CONT" };
        let ok = std::process::Command::new("kill").args([sig, &c.id().to_string()]).status().expect("kill runs").success();
        assert!(ok, "kill {sig}");
    }

    /// Starts it again on the same port (after [`RedisServer::kill`]).
    pub fn restart(&mut self) {
        self.kill();
        let bin = ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("redis-server is not installed: run .ci/run (it installs Debian's redis-server package)");
        let port = self.port.to_string();
        let child = std::process::Command::new(bin)
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir"])
            .arg(self.dir.path())
            .args(self.tls_args(true))
            .args(&self.extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        wait_for_port(self.port, 20);
    }

    /// Runs a redis-cli command against it presenting `client`'s client
    /// certificate instead of its own files' (it speaks TLS); the output,
    /// trimmed.
    pub fn cli_as(&self, client: &RedisTlsFiles, args: &[&str]) -> String {
        let own = self.tls.as_ref().expect("a TLS server");
        self.run_cli(client.cli_args(&own.ca), args).trim().to_string()
    }

    /// Runs a redis-cli command against it; its output.
    pub fn cli(&self, args: &[&str]) -> String {
        self.run_cli(self.tls_args(false), args)
    }

    /// redis-cli on it with `tls` arguments; its output.
    fn run_cli(&self, tls: Vec<String>, args: &[&str]) -> String {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(tls)
            .args(args)
            .output()
            .expect("redis-cli runs (installed with redis-server)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// redis-cli's arguments for `password`, if any.
fn cli_auth(password: Option<&str>) -> Vec<&str> {
    password.map(|p| vec!["--no-auth-warning", "-a", p]).unwrap_or_default()
}

/// A private three-node Redis Cluster (no replicas) on free loopback ports,
/// built with `redis-cli --cluster create`; its nodes die when dropped.
pub struct RedisCluster {
    /// The nodes (each a [`RedisServer`]).
    pub nodes: Vec<RedisServer>,
    /// The password every node requires, if any.
    password: Option<String>,
}

impl RedisCluster {
    /// Starts three nodes, joins them and waits until the cluster is ok.
    pub fn start() -> RedisCluster {
        RedisCluster::start_with(None, None)
    }

    /// The same, every node (and the cluster bus) speaking TLS only, and
    /// with `password`, requiring it of clients and of each other
    /// (`requirepass`, `masterauth`).
    pub fn with_tls(files: &RedisTlsFiles, password: Option<&str>) -> RedisCluster {
        RedisCluster::start_with(Some(files), password)
    }

    /// redis-cli on a node, with the password.
    fn cli(&self, node: &RedisServer, args: &[&str]) -> String {
        node.cli(&[&cli_auth(self.password.as_deref())[..], args].concat())
    }

    fn start_with(tls: Option<&RedisTlsFiles>, password: Option<&str>) -> RedisCluster {
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let mut r = RedisServer::unstarted(&[], tls);
            // The cluster bus's port is named, from the same range as the
            // node's: by default it is the node's + 10 000, which for most
            // of the range falls in the kernel's ephemeral ports, where a
            // client's connection may hold it (a node that exited at start,
            // "nothing listens", seen once in CI on a loaded machine).
            let bus = free_port().to_string();
            r.extra = vec!["--cluster-enabled".into(), "yes".into(), "--cluster-config-file".into(), "nodes.conf".into()];
            r.extra.extend(["--cluster-port".into(), bus]);
            if let Some(p) = password {
                r.extra.extend(["--requirepass".into(), p.into(), "--masterauth".into(), p.into()]);
            }
            r.restart();
            nodes.push(r);
        }
        let cluster = RedisCluster { nodes, password: password.map(str::to_string) };
        let nodes = &cluster.nodes;
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let out = std::process::Command::new("redis-cli")
            .args(nodes[0].tls_args(false))
            .args(cli_auth(password))
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli runs (installed with redis-server)");
        assert!(out.status.success(), "redis-cli --cluster create: {}", String::from_utf8_lossy(&out.stdout));
        let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !nodes.iter().all(|n| cluster.cli(n, &["CLUSTER", "INFO"]).contains("cluster_state:ok")) {
            assert!(std::time::Instant::now() < until, "the cluster did not come up");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        cluster
    }

    /// `redis+cluster://` (`rediss+cluster://` with TLS) with two of the
    /// nodes (the third is discovered), and the password (percent-encoded)
    /// before them, for every node.
    pub fn url(&self) -> String {
        let scheme = if self.nodes[0].tls.is_some() { "rediss" } else { "redis" };
        let auth = self.password.as_deref().map(|p| format!(":{}@", p.replace('%', "%25").replace('/', "%2F"))).unwrap_or_default();
        format!("{scheme}+cluster://{auth}127.0.0.1:{},127.0.0.1:{}", self.nodes[0].port, self.nodes[1].port)
    }

    /// The number of keys on every node together.
    pub fn keys(&self) -> usize {
        self.nodes.iter().map(|n| self.cli(n, &["DBSIZE"]).trim().parse::<usize>().unwrap_or(0)).sum()
    }
}

/// PEM files for Redis over TLS, written into a directory: a CA, a server
/// certificate it signed for 127.0.0.1 and `localhost`, a client
/// certificate it signed, and a second CA that signed nothing here.
#[derive(Debug, Clone)]
pub struct RedisTlsFiles {
    /// The CA's certificate.
    pub ca: PathBuf,
    /// The server's certificate and key.
    pub server_cert: PathBuf,
    /// The server's key.
    pub server_key: PathBuf,
    /// The client's certificate.
    pub client_cert: PathBuf,
    /// The client's key.
    pub client_key: PathBuf,
    /// Another CA's certificate: nothing here chains to it.
    pub other_ca: PathBuf,
}

impl RedisTlsFiles {
    /// The `[store]` lines of a greyhook trusting `ca`, with the client
    /// certificate and key if `client`.
    pub fn store_lines(&self, ca: &std::path::Path, client: bool) -> String {
        let mut s = format!("tls_ca = \"{}\"\n", ca.display());
        if client {
            s += &format!("tls_cert = \"{}\"\ntls_key = \"{}\"\n", self.client_cert.display(), self.client_key.display());
        }
        s
    }

    /// redis-cli's arguments for a server whose certificate chains to
    /// `ca`, presenting these files' client certificate.
    fn cli_args(&self, ca: &std::path::Path) -> Vec<String> {
        let p = |f: &std::path::Path| f.display().to_string();
        vec!["--tls".into(), "--cacert".into(), p(ca), "--cert".into(), p(&self.client_cert), "--key".into(), p(&self.client_key)]
    }

    /// Issues them into `dir`.
    pub fn issue(dir: &std::path::Path) -> RedisTlsFiles {
        RedisTlsFiles::issue_with_client_expiry(dir, None)
    }

    /// Issues them into `dir`, the client certificate expiring at
    /// `client_not_after` if given (else rcgen's default, in 4096).
    pub fn issue_with_client_expiry(dir: &std::path::Path, client_not_after: Option<time::OffsetDateTime>) -> RedisTlsFiles {
        use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};
        let ca_params = |name: &str| {
            let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
            p.distinguished_name.push(rcgen::DnType::CommonName, name);
            p
        };
        let write = |name: &str, pem: String| {
            let path = dir.join(name);
            std::fs::write(&path, pem).expect("a PEM file");
            path
        };
        let ca_key = KeyPair::generate().expect("CA key");
        let ca = ca_params("greyhook test CA").self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::new(ca_params("greyhook test CA"), ca_key);
        let leaf = |sans: Vec<String>, purposes: Vec<ExtendedKeyUsagePurpose>, name: &str, not_after: Option<time::OffsetDateTime>| {
            let key = KeyPair::generate().expect("a key");
            let mut p = CertificateParams::new(sans).expect("leaf parameters");
            if let Some(t) = not_after {
                p.not_after = t;
            }
            p.extended_key_usages = purposes;
            p.distinguished_name.push(rcgen::DnType::CommonName, name);
            (p.signed_by(&key, &issuer).expect("a signed certificate"), key)
        };
        // The server's certificate is also what a cluster node presents
        // to the others on the cluster bus: a client's purpose too.
        let both = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let (server, server_key) = leaf(vec!["127.0.0.1".into(), "localhost".into()], both, "redis", None);
        let (client, client_key) = leaf(Vec::new(), vec![ExtendedKeyUsagePurpose::ClientAuth], "greyhook", client_not_after);
        let other_key = KeyPair::generate().expect("CA key");
        let other = ca_params("another CA").self_signed(&other_key).expect("CA certificate");
        RedisTlsFiles {
            ca: write("ca.pem", ca.pem()),
            server_cert: write("redis.pem", server.pem()),
            server_key: write("redis.key", server_key.serialize_pem()),
            client_cert: write("client.pem", client.pem()),
            client_key: write("client.key", client_key.serialize_pem()),
            other_ca: write("other-ca.pem", other.pem()),
        }
    }
}

/// A Redis Sentinel (redis-server in sentinel mode) watching `master` as
/// `mymaster`, quorum 1, quick to fail over; killed when dropped.
pub struct Sentinel {
    /// Its port.
    pub port: u16,
    _dir: tempfile::TempDir,
    child: std::process::Child,
    /// redis-cli's TLS arguments for it (the master's), if it speaks TLS,
    /// and its own password.
    cli_args: Vec<String>,
}

impl Sentinel {
    /// Starts one and waits until it answers.
    pub fn start(master: &RedisServer) -> Sentinel {
        Sentinel::start_with_auth(master, None, None)
    }

    /// The same for a master (and replicas) that require `password`
    /// (`requirepass`, `masterauth`): the sentinel authenticates to them
    /// (`sentinel auth-pass`); and with `own`, a sentinel that requires that
    /// password of its own clients (its `requirepass`).
    pub fn start_with_auth(master: &RedisServer, password: Option<&str>, own: Option<&str>) -> Sentinel {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let conf = dir.path().join("sentinel.conf");
        // With a TLS master, the sentinel speaks TLS only too, to its
        // clients and to the servers it watches, with the master's files.
        let listen = match master.tls() {
            Some(t) => format!(
                "port 0\ntls-port {port}\ntls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\ntls-replication yes\n",
                t.server_cert.display(),
                t.server_key.display(),
                t.ca.display()
            ),
            None => format!("port {port}\n"),
        };
        std::fs::write(
            &conf,
            format!(
                "{listen}bind 127.0.0.1\ndir {}\nsentinel monitor mymaster 127.0.0.1 {} 1\n\
                 sentinel down-after-milliseconds mymaster 500\nsentinel failover-timeout mymaster 3000\n{}",
                dir.path().display(),
                master.port,
                [
                    password.map(|p| format!("sentinel auth-pass mymaster {p}\n")).unwrap_or_default(),
                    own.map(|p| format!("requirepass \"{p}\"\n")).unwrap_or_default()
                ]
                .concat()
            ),
        )
        .expect("sentinel.conf");
        let child = std::process::Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server --sentinel starts");
        wait_for_port(port, 20);
        let mut cli_args = master.tls_args(false);
        cli_args.extend(cli_auth(own).into_iter().map(String::from));
        Sentinel { port, _dir: dir, child, cli_args }
    }

    /// The port of the master it names now.
    pub fn master_port(&self) -> Option<u16> {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(&self.cli_args)
            .args(["SENTINEL", "get-master-addr-by-name", "mymaster"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout).lines().nth(1)?.trim().parse().ok()
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tiny deterministic generator (xorshift64) for random-input tests:
/// the same seed gives the same inputs, so a failure can be replayed.
pub struct Xorshift(pub u64);

impl Xorshift {
    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Postfix's own `smtp-sink` (Debian's postfix package) as a next hop: a
/// real Postfix SMTP reader (it takes a bare LF as a line end, as lenient
/// servers do, so it sees whatever a smuggler could make a next hop see),
/// dumping every message it accepts into its own file. Killed when dropped.
pub struct PostfixSink {
    /// Its port.
    pub port: u16,
    dir: tempfile::TempDir,
    child: std::process::Child,
}

impl PostfixSink {
    /// Starts one and waits until it answers. A missing smtp-sink fails
    /// the test: `.ci/run` installs Postfix.
    pub fn start() -> PostfixSink {
        use std::os::unix::fs::PermissionsExt;
        let bin = "/usr/sbin/smtp-sink";
        assert!(std::path::Path::new(bin).exists(), "{bin} is missing: run .ci/run (it installs Debian's postfix package)");
        let dir = tempfile::tempdir().expect("temp dir");
        // smtp-sink drops privileges to `postfix`, which must write here.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let port = free_port();
        let child = std::process::Command::new(bin)
            .arg("-u")
            .arg("postfix")
            .arg("-d")
            .arg(format!("{}/msg.", dir.path().display()))
            .arg(format!("127.0.0.1:{port}"))
            .arg("64")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("smtp-sink starts");
        wait_for_port(port, 20);
        PostfixSink { port, dir, child }
    }

    /// The messages it took (whole dump files), waiting up to a second
    /// for files still being written.
    pub fn messages(&self) -> Vec<String> {
        std::thread::sleep(std::time::Duration::from_millis(300));
        let mut out = Vec::new();
        for e in std::fs::read_dir(self.dir.path()).expect("dump dir").flatten() {
            let bytes = std::fs::read(e.path()).unwrap_or_default();
            out.push(String::from_utf8_lossy(&bytes).into_owned());
        }
        out
    }
}

impl Drop for PostfixSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP connection to 127.0.0.1:`port` from the loopback address `from`
/// (any 127.x.y.z is a distinct client).
pub fn connect_from(from: &str, port: u16) -> std::net::TcpStream {
    connect_bound(from.parse().expect("a loopback address"), port, None).expect("connect from a loopback alias")
}

/// Whether the peer closed `s` within `secs`: EOF or a reset, read after
/// any bytes still pending; a read timeout is *not* a close (the peer is
/// still there).
pub fn closed_within(s: &mut std::net::TcpStream, secs: u64) -> bool {
    use std::io::Read;
    let until = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let mut b = [0u8; 4096];
    loop {
        let left = until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).expect("timeout");
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => return false,
            Err(_) => return true,
        }
    }
}

/// Whether any of `streams` is closed by the server within `secs`
/// (polled in turns of 50 ms each).
pub fn any_closed_within(streams: &mut [std::net::TcpStream], secs: u64) -> bool {
    use std::io::Read;
    let until = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let mut b = [0u8; 4096];
    while std::time::Instant::now() < until {
        for s in streams.iter_mut() {
            s.set_read_timeout(Some(std::time::Duration::from_millis(50))).expect("timeout");
            match s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => return true,
            }
        }
    }
    false
}

/// Peak resident memory of process `pid` so far (`VmHWM`), KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmHWM")
}

/// Resident memory of process `pid` now (`VmRSS`), KiB.
pub fn rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS")
}

/// A `kB` field of `/proc/PID/status`.
fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

/// A process's user and system CPU time so far (all its threads), in clock
/// ticks (`USER_HZ`, 100 a second on Linux).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the process's stat");
    // The fields after the command name (which may hold spaces) in parentheses.
    let after = &stat[stat.rfind(')').expect("stat's command name") + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

/// `greyhook status` (`--json` if `json`) on the control socket `control`;
/// panics unless it succeeds.
pub fn greyhook_status(control: &std::path::Path, json: bool) -> String {
    let mut args = vec!["status", "--control", control.to_str().expect("utf-8 path")];
    if json {
        args.insert(1, "--json");
    }
    let out = std::process::Command::new(greyhook_bin()).args(&args).output().expect("greyhook status runs");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writes `text` as greyhook.toml in `dir` and starts `greyhook CMD
/// --config` on it (logging to `dir/log`).
pub fn greyhook_with(dir: &std::path::Path, cmd: &str, text: &str) -> Process {
    greyhook_with_env(dir, cmd, text, &[])
}

/// [`greyhook_with`] with `env` added to greyhook's environment.
pub fn greyhook_with_env(dir: &std::path::Path, cmd: &str, text: &str, env: &[(&str, &std::ffi::OsStr)]) -> Process {
    let cfg = dir.join("greyhook.toml");
    std::fs::write(&cfg, text).expect("config");
    Process::greyhook_env(&[cmd, "--config", cfg.to_str().expect("utf-8 path")], dir.join("log"), env)
}

/// One SMTP transaction from the loopback address `from`: greeting, EHLO
/// `helo`, MAIL FROM `sender` (each checked), RCPT TO `rcpt`, QUIT; the
/// RCPT reply.
pub fn rcpt_reply(port: u16, from: &str, helo: &str, sender: &str, rcpt: &str) -> String {
    let mut c = Raw::over(connect_from(from, port));
    assert!(c.reply().starts_with("220"), "greeting");
    assert!(c.send(&format!("EHLO {helo}")).starts_with("250"));
    assert!(c.send(&format!("MAIL FROM:<{sender}>")).starts_with("250"));
    let r = c.send(&format!("RCPT TO:<{rcpt}>"));
    let _ = c.send("QUIT");
    r
}

/// A self-signed certificate for `greyhook.test` and its key written into
/// `dir` (`cert.pem`, `key.pem`); the `[smtp]` lines that enable STARTTLS
/// with them.
pub fn self_signed_tls(dir: &std::path::Path) -> String {
    let cert = rcgen::generate_simple_self_signed(vec!["greyhook.test".to_string()]).expect("certificate");
    std::fs::write(dir.join("cert.pem"), cert.cert.pem()).expect("cert.pem");
    std::fs::write(dir.join("key.pem"), cert.signing_key.serialize_pem()).expect("key.pem");
    format!("tls_cert = \"{d}/cert.pem\"\ntls_key = \"{d}/key.pem\"\n", d = dir.display())
}

/// Copies `from` beside `to` and renames it over `to`, as certificate
/// renewal tools replace a file.
pub fn replace_file(from: &std::path::Path, to: &std::path::Path) {
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp).expect("a copy beside the file");
    std::fs::rename(&tmp, to).expect("renamed over the file");
}

/// A raw client: send lines, read replies.
pub struct Raw {
    /// The writing half.
    pub w: std::net::TcpStream,
    /// The reading half.
    pub r: std::io::BufReader<std::net::TcpStream>,
}

impl Raw {
    /// Connects to 127.0.0.1:`port`.
    pub fn connect(port: u16) -> Raw {
        Raw::over(std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect"))
    }

    /// Over a connected stream.
    pub fn over(s: std::net::TcpStream) -> Raw {
        s.set_read_timeout(Some(std::time::Duration::from_secs(10))).expect("timeout");
        Raw { w: s.try_clone().expect("clone"), r: std::io::BufReader::new(s) }
    }

    /// One whole reply (all its lines; bytes that are not UTF-8, as a
    /// server may echo a client's, shown as U+FFFD).
    pub fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = Vec::new();
            if std::io::BufRead::read_until(&mut self.r, b'\n', &mut line).unwrap_or(0) == 0 {
                return all;
            }
            all.push_str(&String::from_utf8_lossy(&line));
            if line.get(3) != Some(&b'-') {
                return all;
            }
        }
    }

    /// Sends one line (CRLF added), reads the reply.
    pub fn send(&mut self, line: &str) -> String {
        self.send_bytes(line.as_bytes())
    }

    /// Sends one line of any bytes (CRLF added), reads the reply.
    pub fn send_bytes(&mut self, line: &[u8]) -> String {
        std::io::Write::write_all(&mut self.w, &[line, b"\r\n"].concat()).unwrap();
        self.reply()
    }

    /// Connects, says EHLO, MAIL FROM `a@example.org` and RCPT TO each of
    /// `recipients`, checking each is accepted, and sends DATA: ready for
    /// the message.
    pub fn at_data(port: u16, recipients: &[&str]) -> Raw {
        let mut c = Raw::connect(port);
        assert!(c.reply().starts_with("220"));
        assert!(c.send("EHLO client.example.org").starts_with("250"));
        assert_eq!(c.send("MAIL FROM:<a@example.org>"), "250 2.1.0 Ok\r\n");
        for r in recipients {
            assert_eq!(c.send(&format!("RCPT TO:<{r}>")), "250 2.1.5 Ok\r\n");
        }
        assert!(c.send("DATA").starts_with("354"));
        c
    }

    /// True once the server has closed the connection (within 10 s; a
    /// timeout is not a close).
    pub fn closed(&mut self) -> bool {
        closed_within(self.r.get_mut(), 10)
    }
}

/// Sends one Postfix policy request at RCPT (`client`, `sender`,
/// `recipient`, `instance`) on `s` and reads the answer up to its empty
/// line (`action=...\n\n`). Panics if the connection closes first.
pub fn policy_rcpt(s: &mut std::net::TcpStream, client: &str, sender: &str, rcpt: &str, instance: &str) -> String {
    policy_exchange(
        s,
        &format!(
            "request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address={client}\nsender={sender}\nrecipient={rcpt}\ninstance={instance}\n\n"
        ),
    )
}

/// Sends one policy `request` (ending with its empty line) on `s` and reads
/// the answer, through its empty line.
pub fn policy_exchange(s: &mut std::net::TcpStream, request: &str) -> String {
    use std::io::{Read, Write};
    s.write_all(request.as_bytes()).expect("send a policy request");
    let mut out = Vec::new();
    let mut b = [0u8; 512];
    while !out.ends_with(b"\n\n") {
        let n = s.read(&mut b).expect("read a policy answer");
        assert!(n > 0, "policy connection closed");
        out.extend_from_slice(&b[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The delay an `X-Greylist: delayed N seconds by greyhook` header in
/// `text` states, checked to be at least `min` seconds and at most the time
/// since `first_try` (rounded up: records keep whole seconds). A bound from
/// the test's own clock, not a guess at how fast a loaded machine is.
pub fn assert_delayed(text: &str, min: u64, first_try: std::time::Instant) -> u64 {
    let n: u64 = text
        .split("X-Greylist: delayed ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no X-Greylist header in {text:?}"));
    let max = first_try.elapsed().as_secs() + 1;
    assert!((min..=max).contains(&n), "delayed {n} seconds; expected {min} to {max}: {text:?}");
    n
}

/// One milter packet as an MTA sends it: the 4-byte big-endian length of
/// what follows, the command byte, the data.
pub fn milter_packet(cmd: u8, data: &[u8]) -> Vec<u8> {
    let len = u32::try_from(data.len() + 1).expect("a test packet fits a u32 length");
    let mut p = len.to_be_bytes().to_vec();
    p.push(cmd);
    p.extend_from_slice(data);
    p
}

/// An MTA's option negotiation packet: protocol version 6, every action
/// (0x1ff), and the `protocol` flags it offers.
pub fn milter_optneg(protocol: u32) -> Vec<u8> {
    let data: Vec<u8> = [6u32, 0x1ff, protocol].iter().flat_map(|v| v.to_be_bytes()).collect();
    milter_packet(b'O', &data)
}

/// The exact request a Postfix 3.7.11 smtpd sent at RCPT (a copy of shared/data/).
const POSTFIX_POLICY_REQUEST: &str = include_str!("../tools/policy-load/src/postfix-3.7.11-rcpt.txt");

/// That request with `overrides` (attribute, value) replacing or added to
/// its attributes, ending with the empty line.
pub fn policy_request(overrides: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for line in POSTFIX_POLICY_REQUEST.lines().filter(|l| !l.is_empty()) {
        let key = line.split('=').next().unwrap_or("");
        match overrides.iter().find(|(k, _)| *k == key) {
            Some((_, v)) => out.push_str(&format!("{key}={v}\n")),
            None => out.push_str(&format!("{line}\n")),
        }
    }
    for (k, v) in overrides {
        if !POSTFIX_POLICY_REQUEST.lines().any(|l| l.starts_with(&format!("{k}="))) {
            out.push_str(&format!("{k}={v}\n"));
        }
    }
    out.push('\n');
    out
}
