//! The policy protocol from a client's side, with the clock injected.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use greyhook::clock::ManualClock;
use greyhook::daemon::{Daemon, DaemonConfig};
use greyhook::listen::ListenAddr;
use greyhook_tests::*;

/// The exact request a Postfix 3.7.11 smtpd sent at RCPT (a copy of shared/data/).
const POSTFIX_REQUEST: &str = include_str!("../../tools/policy-load/src/postfix-3.7.11-rcpt.txt");

fn request(overrides: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for line in POSTFIX_REQUEST.lines().filter(|l| !l.is_empty()) {
        let key = line.split('=').next().unwrap_or("");
        match overrides.iter().find(|(k, _)| *k == key) {
            Some((_, v)) => out.push_str(&format!("{key}={v}\n")),
            None => out.push_str(&format!("{line}\n")),
        }
    }
    for (k, v) in overrides {
        if !POSTFIX_REQUEST.lines().any(|l| l.starts_with(&format!("{k}="))) {
            out.push_str(&format!("{k}={v}\n"));
        }
    }
    out.push('\n');
    out
}

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

    fn ask_raw(&mut self, req: &[u8]) -> Option<String> {
        self.w.write_all(req).ok()?;
        let mut line = String::new();
        if self.r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let mut empty = String::new();
        self.r.read_line(&mut empty).ok()?;
        assert_eq!(empty, "\n", "a reply ends with an empty line");
        Some(line.trim_end().strip_prefix("action=").expect("action=").to_string())
    }

    fn ask(&mut self, overrides: &[(&str, &str)]) -> String {
        self.ask_raw(request(overrides).as_bytes()).expect("an answer")
    }

    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.r.read(&mut b), Ok(0) | Err(_))
    }
}

async fn daemon(filter_config: &str, policy: &str) -> (Daemon, Arc<ManualClock>, u16) {
    let dir = tempfile::tempdir().unwrap().keep();
    let text = format!(
        "[store]\npath = \"memory\"\n[control]\nsocket = \"{}\"\n[policy]\nlisten = [\"127.0.0.1:0\"]\n{policy}\n[filter.config]\n{filter_config}\n",
        dir.join("control.sock").display()
    );
    let cfg = DaemonConfig::parse(&text, "test.toml").unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let d = Daemon::start(&cfg, clock.clone(), None).await.unwrap();
    let port = match &d.policy_addrs[0] {
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
    let (d, _clock, port) = daemon("", "max_line = 512\nmax_attributes = 40\nidle_timeout = \"300ms\"").await;
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
        let stray = format!("\n\n{}", request(&[("sender", "x@y.z")]));
        assert!(c.ask_raw(stray.as_bytes()).unwrap().starts_with("451 4.7.1"), "stray empty lines are skipped");

        let mut c = Conn::open(port);
        let long = format!("request=smtpd_access_policy\nsender={}\n\n", "x".repeat(100_000));
        assert_eq!(c.ask_raw(long.as_bytes()), None, "an over-long line closes the connection");

        let mut c = Conn::open(port);
        let many: String = (0..1000).map(|i| format!("a{i}=b\n")).collect::<String>() + "\n";
        assert_eq!(c.ask_raw(many.as_bytes()), None, "too many attributes close the connection");

        let mut c = Conn::open(port);
        c.w.write_all(b"request=smtpd_access_policy\n").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        drop(c);

        let mut c = Conn::open(port);
        std::thread::sleep(Duration::from_millis(600));
        assert!(c.closed(), "idle connections are closed");

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
    assert!(e.contains("failure_policy") || e.contains("explode"), "{e}");
    let e = DaemonConfig::parse("[store]\nsweep_interval = \"often\"\n", "g.toml").unwrap_err().to_string();
    assert!(e.contains("sweep_interval") || e.contains("line 2"), "{e}");
}
