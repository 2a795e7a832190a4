//! The policy protocol from a client's side, with the clock injected.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use greyhook::clock::ManualClock;
use greyhook::daemon::{Daemon, DaemonConfig};
use greyhook::frontend::ListenAddr;
use greyhook_tests::*;

struct Conn {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Conn {
    fn open(port: u16) -> Conn {
        let w = TcpStream::connect(("127.0.0.1", port)).unwrap();
        w.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Conn { r: BufReader::new(w.try_clone().unwrap()), w }
    }

    /// The answer's action, or `None` if the server closed the connection
    /// (EOF or reset). Panics if the server neither answers nor closes
    /// within the read timeout: silence is not a close.
    fn ask_raw(&mut self, req: &[u8]) -> Option<String> {
        if let Err(e) = self.w.write_all(req) {
            return closed_by_peer(e);
        }
        let mut line = String::new();
        match self.r.read_line(&mut line) {
            Ok(0) => return None,
            Ok(_) => {}
            Err(e) => return closed_by_peer(e),
        }
        let mut empty = String::new();
        self.r.read_line(&mut empty).expect("the empty line after the answer");
        assert_eq!(empty, "\n", "a reply ends with an empty line");
        Some(line.trim_end().strip_prefix("action=").expect("action=").to_string())
    }

    fn ask(&mut self, overrides: &[(&str, &str)]) -> String {
        self.ask_raw(policy_request(overrides).as_bytes()).expect("an answer")
    }

    /// Whether the server closes the connection within `secs` (a read
    /// timeout is not a close).
    fn closed_within(&mut self, secs: u64) -> bool {
        assert!(self.r.buffer().is_empty(), "unread answer: {:?}", String::from_utf8_lossy(self.r.buffer()));
        closed_within(self.r.get_mut(), secs)
    }
}

/// `None` for an error that means the peer closed; panics on a timeout.
fn closed_by_peer<T>(e: std::io::Error) -> Option<T> {
    assert!(
        !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
        "the server neither answered nor closed: {e}"
    );
    None
}

async fn daemon(filter_config: &str, policy: &str) -> (Daemon, Arc<ManualClock>, u16) {
    let dir = tempfile::tempdir().unwrap().keep();
    let text = format!(
        "[store]\npath = \"memory\"\n[control]\nsocket = \"{}\"\n[policy]\nlisten = [\"127.0.0.1:0\"]\n{policy}\n[filter.config]\n{filter_config}\n",
        dir.join("control.sock").display()
    );
    let cfg = hermetic(DaemonConfig::parse(&text, "test.toml").unwrap());
    let clock = Arc::new(ManualClock::new(T0));
    let d = Daemon::start(&cfg, clock.clone(), None).await.unwrap();
    let port = match &d.endpoints("policy")[0] {
        ListenAddr::Tcp(a) => a.port(),
        other => panic!("{other}"),
    };
    (d, clock, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greylists_then_prepends_on_one_connection() {
    let (d, clock, port) = daemon("", "").await;
    tokio::task::spawn_blocking(move || {
        let mut c = Conn::open(port);
        assert_eq!(c.ask(&[]), "451 4.7.1 Greylisted, please try again later retry=00:05:00");
        clock.advance(120);
        assert_eq!(c.ask(&[]), "451 4.7.1 Greylisted, please try again later retry=00:03:00");
        clock.advance(180);
        assert_eq!(c.ask(&[]), "PREPEND X-Greylist: delayed 300 seconds by greyhook");
        assert_eq!(c.ask(&[]), "DUNNO");
        assert_eq!(c.ask(&[("sasl_username", "alice"), ("sender", "new@example.org")]), "DUNNO", "authenticated");
        assert_eq!(c.ask(&[("protocol_state", "VRFY")]), "DUNNO");
        // The state is matched whatever its case, and only whole.
        for state in ["rcpt", "Rcpt"] {
            let a = c.ask(&[("protocol_state", state), ("sender", &format!("{state}@example.org"))]);
            assert!(a.starts_with("451 4.7.1"), "{state}: {a}");
        }
        for state in ["RCPTX", "RCP", ""] {
            assert_eq!(c.ask(&[("protocol_state", state), ("sender", "other@example.org")]), "DUNNO", "{state:?}");
        }
    })
    .await
    .unwrap();
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_instance_policy_groups_and_data_stage() {
    let cfg = "whitelist_clients = [\"127.0.0.0/8\"]\n[[filter.config.policy]]\nname = \"strict\"\nrecipients = [\"two@e2e.test\"]\n";
    let (d, _clock, port) = daemon(cfg, "").await;
    tokio::task::spawn_blocking(move || {
        let mut c = Conn::open(port);
        assert_eq!(c.ask(&[("recipient", "one@e2e.test"), ("instance", "i1")]), "DUNNO");
        assert_eq!(
            c.ask(&[("recipient", "two@e2e.test"), ("instance", "i1")]),
            "451 4.7.1 This recipient has a different policy than the first one; please retry it in a new transaction retry=00:00:00"
        );
        assert_eq!(c.ask(&[("recipient", "three@e2e.test"), ("instance", "i1")]), "DUNNO");
        // A new message (instance) starts over: two may come first.
        assert_eq!(c.ask(&[("recipient", "two@e2e.test"), ("instance", "i2")]), "DUNNO");
        assert!(c.ask(&[("recipient", "one@e2e.test"), ("instance", "i2")]).ends_with("retry=00:00:00"));
    })
    .await
    .unwrap();
    d.stop().await;

    let (d, clock, port) = daemon("stage = \"data\"\ndelay = 60", "").await;
    tokio::task::spawn_blocking(move || {
        let mut c = Conn::open(port);
        assert_eq!(c.ask(&[("instance", "m1")]), "DUNNO", "no decision at RCPT at stage data");
        assert_eq!(
            c.ask(&[("instance", "m1"), ("protocol_state", "DATA"), ("recipient", "")]),
            "451 4.7.1 Greylisted, please try again later retry=00:01:00"
        );
        clock.advance(60);
        assert_eq!(c.ask(&[("instance", "m2")]), "DUNNO");
        assert_eq!(
            c.ask(&[("instance", "m2"), ("protocol_state", "END-OF-MESSAGE"), ("recipient", "")]),
            "PREPEND X-Greylist: delayed 60 seconds by greyhook"
        );
    })
    .await
    .unwrap();
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_defined_answer() {
    let (d, _clock, port) = daemon("", "max_line = 512\nmax_attributes = 40\nidle_timeout = \"300ms\"\nrequest_timeout = \"1500ms\"").await;
    tokio::task::spawn_blocking(move || {
        let mut c = Conn::open(port);
        assert_eq!(
            c.ask_raw(b"request=smtpd_access_policy\nclient_address=127.0.0.1\nprotocol_state=RCPT\nsender=\xff\xfe@x\nrecipient=a@b\n\n")
                .unwrap()
                .get(..9),
            Some("451 4.7.1"),
            "invalid UTF-8 from the client is greylisted, not let through"
        );
        assert_eq!(c.ask(&[("request", "junk")]), "DUNNO", "not smtpd_access_policy");
        assert_eq!(c.ask_raw(b"protocol_state=RCPT\nclient_address=127.0.0.1\n\n").unwrap(), "DUNNO", "no request attribute");
        assert_eq!(c.ask(&[("client_address", "")]), "DUNNO", "no client address");
        assert_eq!(c.ask(&[("client_address", "999.1.1.1")]), "DUNNO", "bad client address");
        assert_eq!(c.ask_raw(b"request=smtpd_access_policy\nthis line has no equals sign\n\n").unwrap(), "DUNNO");
        let stray = format!("\n\n{}", policy_request(&[("sender", "x@y.z")]));
        assert!(c.ask_raw(stray.as_bytes()).unwrap().starts_with("451 4.7.1"), "stray empty lines are skipped");

        // The configured limits, not the defaults (4096 bytes, 100
        // attributes): 512 bytes pass, 513 close; 40 attributes pass, 41 close.
        let sender_of_len = |n: usize| format!("{}@x.example", "s".repeat(n - "sender=".len() - "@x.example".len()));
        assert_eq!(format!("sender={}", sender_of_len(512)).len(), 512);
        let mut c = Conn::open(port);
        let a = c.ask(&[("sender", &sender_of_len(512))]);
        assert!(a.starts_with("451 4.7.1"), "a 512-byte line is served: {a}");
        assert_eq!(c.ask_raw(policy_request(&[("sender", &sender_of_len(513))]).as_bytes()), None, "a 513-byte line closes the connection");
        let with_attributes = |n: usize| {
            let base = policy_request(&[("sender", "many@x.example")]);
            let have = base.lines().filter(|l| !l.is_empty()).count();
            assert!(have < n, "the base request has {have} attributes");
            let extra: String = (have..n).map(|i| format!("x_extra{i}=1\n")).collect();
            format!("{}\n{extra}\n", base.trim_end_matches('\n'))
        };
        let mut c = Conn::open(port);
        assert!(c.ask_raw(with_attributes(40).as_bytes()).expect("40 attributes are served").starts_with("451 4.7.1"));
        assert_eq!(c.ask_raw(with_attributes(41).as_bytes()), None, "41 attributes close the connection");

        // A request begun and not finished is cut at request_timeout (1.5 s),
        // not at the idle timeout (300 ms).
        let mut c = Conn::open(port);
        c.w.write_all(b"request=smtpd_access_policy\n").unwrap();
        let t = std::time::Instant::now();
        assert!(c.closed_within(5), "a half request is cut");
        assert!(t.elapsed() >= Duration::from_millis(1300), "cut at {:?}, before request_timeout", t.elapsed());

        // An idle connection is closed at idle_timeout.
        let mut c = Conn::open(port);
        let t = std::time::Instant::now();
        assert!(c.closed_within(5), "idle connections are closed");
        assert!(t.elapsed() >= Duration::from_millis(250), "closed at {:?}, before idle_timeout", t.elapsed());

        let mut c = Conn::open(port);
        assert!(c.ask(&[("sender", "still@served.example")]).starts_with("451 4.7.1"), "the daemon still serves");
    })
    .await
    .unwrap();
    d.stop().await;
}

#[test]
fn config_errors_name_file_line_and_key() {
    let e = DaemonConfig::parse("[policy]\nlisten = [\"127.0.0.1:10023\"]\nlsiten = 1\n", "greyhook.toml").unwrap_err().to_string();
    assert!(e.contains("greyhook.toml") && e.contains("line 3") && e.contains("lsiten"), "{e}");
    let e = DaemonConfig::parse("[policy]\nlisten = [\"nowhere\"]\n", "g.toml").unwrap_err().to_string();
    assert!(e.contains("line 2") && e.contains("nowhere"), "{e}");
    let e = DaemonConfig::parse("[filter]\nfailure_policy = \"explode\"\n", "g.toml").unwrap_err().to_string();
    assert!(e.contains("g.toml") && e.contains("line 2") && e.contains("failure_policy") && e.contains("explode"), "{e}");
    let e = DaemonConfig::parse("[store]\nsweep_interval = \"often\"\n", "g.toml").unwrap_err().to_string();
    assert!(e.contains("g.toml") && e.contains("line 2") && e.contains("sweep_interval"), "{e}");
}

const GREYLISTED: &str = "451 4.7.1 Greylisted, please try again later retry=00:05:00";

/// The reference filter's documented keys through the daemon (time
/// injected): `add_header = false`, `ipv6_prefix`, the auto-whitelist's
/// life (`max_age`), `reply_text` lines (up to 8, joined with `; ` by this
/// protocol), `whitelist_client_names` subdomains and suffixes, and
/// `whitelist_recipients` patterns with the always-passing `postmaster@`
/// and `abuse@`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_filter_keys_through_the_daemon() {
    let (d, clock, port) = daemon(
        "add_header = false\nipv6_prefix = 48\nauto_whitelist_after = 1\nmax_age = \"1d\"\n\
         whitelist_client_names = [\"mx.example.org\", \".trusted.example\"]\n\
         whitelist_recipients = [\"hostmaster@\", \"vip@example.com\", \"open.example\"]",
        "",
    )
    .await;
    let c2 = clock.clone();
    tokio::task::spawn_blocking(move || {
        let clock = c2;
        let mut c = Conn::open(port);
        let v6 = |addr: &str, sender: &str| vec![("client_address", addr.to_string()), ("sender", sender.to_string())];
        let ask = |c: &mut Conn, kv: Vec<(&str, String)>| {
            let kv: Vec<(&str, &str)> = kv.iter().map(|(k, v)| (*k, v.as_str())).collect();
            c.ask(&kv)
        };
        assert_eq!(ask(&mut c, v6("2001:db8:1:2::1", "a@x.org")), GREYLISTED);
        clock.advance(300);
        // Another /64 in the same /48 is the same client network; no header.
        assert_eq!(ask(&mut c, v6("2001:db8:1:ff::9", "a@x.org")), "DUNNO", "ipv6_prefix = 48, add_header = false");
        // One pass auto-whitelists the /48 ...
        assert_eq!(ask(&mut c, v6("2001:db8:1:3::1", "new@x.org")), "DUNNO", "auto_whitelist_after = 1");
        assert_eq!(ask(&mut c, v6("2001:db8:2::1", "new@x.org")), GREYLISTED, "another /48 is another network");
        // ... for max_age.
        clock.advance(86_400 + 1);
        assert_eq!(ask(&mut c, v6("2001:db8:1:4::1", "later@x.org")), GREYLISTED, "the auto-whitelist lives max_age");

        let named = |name: &str| {
            vec![("client_address", "192.0.2.50".to_string()), ("client_name", name.to_string()), ("sender", format!("s@{name}"))]
        };
        assert_eq!(ask(&mut c, named("mx.example.org")), "DUNNO");
        assert_eq!(ask(&mut c, named("out3.mx.example.org")), "DUNNO", "and its subdomains");
        assert_eq!(ask(&mut c, named("evilmx.example.org")), GREYLISTED, "not a subdomain");
        assert_eq!(ask(&mut c, named("a.trusted.example")), "DUNNO", "a suffix");
        assert_eq!(ask(&mut c, named("trusted.example.evil")), GREYLISTED);

        let rcpt =
            |r: &str| vec![("client_address", "192.0.2.60".to_string()), ("sender", "z@y.org".to_string()), ("recipient", r.to_string())];
        for r in ["hostmaster@any.example", "vip@example.com", "anyone@open.example", "postmaster@x.example", "abuse@x.example"] {
            assert_eq!(ask(&mut c, rcpt(r)), "DUNNO", "{r} is never greylisted");
        }
        for r in ["vip@example.net", "anyone@sub.open.example.evil", "user@example.com"] {
            assert_eq!(ask(&mut c, rcpt(r)), GREYLISTED, "{r} is greylisted");
        }
    })
    .await
    .unwrap();
    d.stop().await;

    // reply_text: eight lines are joined with "; " by the policy protocol;
    // nine are refused at start, naming the key.
    let eight: Vec<String> = (1..=8).map(|i| format!("\"line {i}\"")).collect();
    let (d, _clock, port) = daemon(&format!("reply_text = [{}]", eight.join(", ")), "").await;
    let a = tokio::task::spawn_blocking(move || Conn::open(port).ask(&[])).await.unwrap();
    assert_eq!(a, "451 4.7.1 line 1; line 2; line 3; line 4; line 5; line 6; line 7; line 8 retry=00:05:00");
    d.stop().await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[store]\npath = \"memory\"\n[control]\nsocket = \"{}\"\n[policy]\nlisten = [\"127.0.0.1:0\"]\n[filter.config]\nreply_text = [{}, \"line 9\"]\n",
        dir.path().join("c.sock").display(),
        eight.join(", ")
    );
    let cfg = hermetic(DaemonConfig::parse(&text, "test.toml").unwrap());
    let e = Daemon::start(&cfg, Arc::new(ManualClock::new(T0)), None).await.err().expect("nine lines are refused");
    assert!(e.to_string().contains("reply_text"), "{e}");
}

/// In a chain the first filter that names a policy group decides it: two
/// reference filters (namespaces `a` and `b`) group `one@` and `two@`
/// differently (`a`: two groups; `b`: one). Seed 000 then sends `two@` away
/// with `retry=00:00:00` only if the first filter's groups count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_chain_the_first_policy_group_wins() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[store]\npath = \"memory\"\n[control]\nsocket = \"{}\"\n[policy]\nlisten = [\"127.0.0.1:0\"]\n\
         [[filters]]\nnamespace = \"a\"\n[filters.config]\n\
         [[filters.config.policy]]\nname = \"x\"\nrecipients = [\"one@example.com\"]\ngreylist = false\n\
         [[filters.config.policy]]\nname = \"y\"\nrecipients = [\"two@example.com\"]\ngreylist = false\n\
         [[filters]]\nnamespace = \"b\"\n[filters.config]\n\
         [[filters.config.policy]]\nname = \"p\"\nrecipients = [\"one@example.com\", \"two@example.com\"]\ngreylist = false\n",
        dir.path().join("c.sock").display()
    );
    let cfg = hermetic(DaemonConfig::parse(&text, "test.toml").unwrap());
    let d = Daemon::start(&cfg, Arc::new(ManualClock::new(T0)), None).await.unwrap();
    let port = match &d.endpoints("policy")[0] {
        ListenAddr::Tcp(a) => a.port(),
        other => panic!("{other}"),
    };
    tokio::task::spawn_blocking(move || {
        let mut c = Conn::open(port);
        assert_eq!(c.ask(&[("recipient", "one@example.com"), ("instance", "t1")]), "DUNNO");
        let a = c.ask(&[("recipient", "two@example.com"), ("instance", "t1")]);
        assert!(a.starts_with("451 4.7.1 ") && a.ends_with("retry=00:00:00"), "the first filter's groups decide: {a}");
    })
    .await
    .unwrap();
    d.stop().await;
}

/// Seed 000 through the policy protocol (time injected): a recipient sent
/// away with `retry=00:00:00` starts its greylist record then, so when the
/// client retries it in a new transaction five minutes later it is told
/// the five minutes left of its ten, and passes at ten — one delay, not two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_000_sent_away_recipient_pays_one_delay() {
    let (d, clock, port) = daemon(
        "[[filter.config.policy]]\nname = \"open\"\nrecipients = [\"one@example.com\"]\ngreylist = false\n\
         [[filter.config.policy]]\nname = \"strict\"\nrecipients = [\"two@example.com\"]\ndelay = \"10m\"\n",
        "",
    )
    .await;
    tokio::task::spawn_blocking(move || {
        let mut c = Conn::open(port);
        let rcpt = |c: &mut Conn, r: &str, t: &str| c.ask(&[("recipient", r), ("instance", t), ("sender", "jq@mail.example.com")]);
        assert_eq!(rcpt(&mut c, "one@example.com", "t1"), "DUNNO");
        let a = rcpt(&mut c, "two@example.com", "t1");
        assert!(a.starts_with("451 4.7.1 ") && a.ends_with("retry=00:00:00"), "{a}");
        clock.advance(300);
        assert_eq!(rcpt(&mut c, "two@example.com", "t2"), "451 4.7.1 Greylisted, please try again later retry=00:05:00");
        clock.advance(300);
        let a = rcpt(&mut c, "two@example.com", "t3");
        assert!(a.starts_with("PREPEND X-Greylist: delayed 600 seconds"), "one delay, not two: {a}");
    })
    .await
    .unwrap();
    d.stop().await;
}

/// `max_transactions` and `transaction_ttl`: Postfix sends one recipient
/// per request, so a session's accepted recipients (and their policy
/// groups) are kept between requests, within both limits. Past either, the
/// transaction is forgotten: the next recipient is the first again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_are_kept_within_max_transactions_and_transaction_ttl() {
    let cfg = "whitelist_clients = [\"127.0.0.0/8\"]\n[[filter.config.policy]]\nname = \"strict\"\nrecipients = [\"two@e2e.test\"]\n";
    let sent_away =
        "451 4.7.1 This recipient has a different policy than the first one; please retry it in a new transaction retry=00:00:00";
    for (policy, forgotten) in [("", false), ("max_transactions = 1\n", true), ("transaction_ttl = \"1s\"\n", true)] {
        let (d, _clock, port) = daemon(cfg, policy).await;
        tokio::task::spawn_blocking(move || {
            let mut c = Conn::open(port);
            assert_eq!(c.ask(&[("recipient", "one@e2e.test"), ("instance", "i1")]), "DUNNO");
            // Another session's transaction, then a pause longer than 1 s.
            assert_eq!(c.ask(&[("recipient", "one@e2e.test"), ("instance", "other")]), "DUNNO");
            std::thread::sleep(Duration::from_millis(1300));
            let answer = c.ask(&[("recipient", "two@e2e.test"), ("instance", "i1")]);
            match forgotten {
                false => assert_eq!(answer, sent_away, "[policy] {policy:?}"),
                true => assert_eq!(answer, "DUNNO", "[policy] {policy:?}: the transaction of i1 is forgotten"),
            }
        })
        .await
        .unwrap();
        d.stop().await;
    }
}
