//! A real Postfix (Debian's package) asks greyhook through
//! `check_policy_service`, over TCP and over a unix socket; swaks is the
//! SMTP client. `.ci/run` installs both; a missing one fails the test.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use greyhook_tests::*;

const POSTFIX: &str = "/usr/sbin/postfix";

/// A private Postfix instance: config, queue and log in a temp dir; smtpd on
/// a loopback port and on the unix socket [`Postfix::unix_smtpd`]; every accepted message is put on hold so the test can
/// read it back with postcat.
struct Postfix {
    dir: PathBuf,
    port: u16,
}

const MASTER_CF: &str = "\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
";

impl Postfix {
    /// Starts Postfix; `policy` (if any) goes into the recipient
    /// restrictions, `extra` is appended to main.cf.
    fn start(root: &Path, policy: Option<&str>, extra: &str) -> Postfix {
        assert!(Path::new(POSTFIX).exists(), "Postfix is not installed: run .ci/run (it installs Debian's postfix package)");
        let dir = root.join("postfix");
        for d in ["etc", "queue", "data"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let status = Command::new("chown").args(["postfix", dir.join("data").to_str().unwrap()]).status().unwrap();
        assert!(status.success(), "chown postfix (the tests run as root, as CI does)");
        let port = free_port();
        let d = dir.display();
        let policy = policy.map(|p| format!("check_policy_service {p}, ")).unwrap_or_default();
        let base = format!(
            "compatibility_level = 3.6\nqueue_directory = {d}/queue\ndata_directory = {d}/data\nmail_owner = postfix\nsetgid_group = postdrop\n\
             inet_interfaces = 127.0.0.1\ninet_protocols = ipv4\nmyhostname = mx.e2e.test\nmydomain = e2e.test\nmydestination = e2e.test\n\
             mynetworks = 10.255.255.0/24\nlocal_recipient_maps =\nalias_maps =\nalias_database =\nsmtputf8_enable = no\nbiff = no\n\
             maillog_file = {d}/maillog\nmaillog_file_prefixes = {d}\n\
             smtpd_recipient_restrictions = reject_unauth_destination, {policy}permit\n\
             smtpd_end_of_data_restrictions = check_client_access static:HOLD\n"
        );
        std::fs::write(dir.join("etc/main.cf"), main_cf(&base, extra)).unwrap();
        std::fs::write(
            dir.join("etc/master.cf"),
            format!("127.0.0.1:{port} inet n - n - - smtpd\ngreyhook-in unix n - n - - smtpd\n{MASTER_CF}"),
        )
        .unwrap();
        let out = Command::new(POSTFIX).args(["-c", dir.join("etc").to_str().unwrap(), "start"]).output().unwrap();
        assert!(out.status.success(), "postfix start: {}", String::from_utf8_lossy(&out.stderr));
        wait_for_port(port, 20);
        Postfix { dir, port }
    }

    /// The unix socket its second smtpd listens on (master.cf's public
    /// `greyhook-in` service), as a `next_hop`.
    fn unix_smtpd(&self) -> String {
        format!("unix:{}/queue/public/greyhook-in", self.dir.display())
    }

    /// Sends one message with swaks; returns its transcript.
    fn send(&self, from: &str, to: &str, local: &str) -> String {
        swaks(self.port, &["--local-interface", local, "--from", from, "--to", to])
    }

    /// The held message's text.
    fn message(&self, transcript: &str) -> String {
        let id = transcript
            .lines()
            .find_map(|l| l.split("queued as ").nth(1))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|| panic!("no queue id in:\n{transcript}"));
        for _ in 0..100 {
            let out = Command::new("postcat").args(["-c", self.dir.join("etc").to_str().unwrap(), "-q", &id]).output().unwrap();
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("message {id} not found in the queue")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("maillog")).unwrap_or_default()
    }

    /// Waits up to 10 s for `what` in Postfix's log (postlogd writes it
    /// asynchronously); whether it came.
    fn log_has(&self, what: &str) -> bool {
        for _ in 0..200 {
            if self.log().contains(what) {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        false
    }
}

/// `base` (one parameter a line) with `extra` after it, less the base's
/// parameters that `extra` sets again.
///
/// Found when a test hung in `postfix stop`: a parameter set twice makes
/// every Postfix process warn ("overriding earlier entry") each time it
/// reads main.cf, postlogd too, and postlogd sends its warnings to its own
/// socket. Linux queues only 10 datagrams on a unix socket by default
/// (`net.unix.max_dgram_qlen`), so a burst of those warnings at start-up
/// could fill the queue while postlogd was blocked writing to it: postlogd
/// then never read again, and every Postfix process that logged after it
/// hung, `postfix stop` among them.
fn main_cf(base: &str, extra: &str) -> String {
    let param = |l: &str| {
        if l.starts_with(char::is_whitespace) || l.starts_with('#') { None } else { l.split_once('=').map(|(k, _)| k.trim().to_string()) }
    };
    let set_again: Vec<String> = extra.lines().filter_map(param).collect();
    let mut cf: String = base.lines().filter(|l| param(l).is_none_or(|k| !set_again.contains(&k))).flat_map(|l| [l, "\n"]).collect();
    cf.push_str(extra);
    cf
}

#[test]
fn main_cf_sets_each_parameter_once() {
    let cf = main_cf("a = 1\nb = 2\nc = 3\n", "# b again\nb =\n    x, y\nd = 4\n");
    assert_eq!(cf, "a = 1\nc = 3\n# b again\nb =\n    x, y\nd = 4\n");
}

/// Runs swaks against 127.0.0.1:`port` with `args`; returns its transcript.
fn swaks(port: u16, args: &[&str]) -> String {
    let out = Command::new("swaks")
        .args(["--server", &format!("127.0.0.1:{port}"), "--helo", "client.example.org", "--timeout", "20"])
        .args(["--add-header", "Subject: greyhook e2e"])
        .args(args)
        .output()
        .expect("swaks runs (installed by .ci/run)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Drop for Postfix {
    /// `postfix stop`, given 30 s; then the master is killed, so that a
    /// Postfix that hangs cannot hang the test run (its other processes
    /// exit when the master is gone).
    fn drop(&mut self) {
        let Ok(mut stop) = Command::new(POSTFIX)
            .args(["-c", self.dir.join("etc").to_str().unwrap(), "stop"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
        else {
            return;
        };
        for _ in 0..300 {
            if !matches!(stop.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        eprintln!("postfix stop did not end within 30 s: killing its master\n{}", self.log());
        let _ = stop.kill();
        let _ = stop.wait();
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("queue/pid/master.pid")) {
            let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
        }
    }
}

/// Finds the client's view of the RCPT reply and checks it is a tempfail
/// with the retry hint ending its last line.
fn rcpt_tempfail<'a>(transcript: &'a str, code: &str, hint: &str) -> &'a str {
    let line = transcript.lines().find(|l| l.starts_with("<** 4")).unwrap_or_else(|| panic!("no tempfail in:\n{transcript}"));
    assert!(line.starts_with(&format!("<** {code} 4.7.1 ")), "{line}");
    assert!(line.ends_with(hint), "the hint ends the line: {line}");
    line
}

fn greylist_through_postfix(root: &Path, listen: &str, policy: &str, extra_config: &str, code: &str) {
    let cfg = root.join("greyhook.toml");
    std::fs::write(
        &cfg,
        format!(
            "[control]\nsocket = \"{}/control.sock\"\n[policy]\nlisten = [\"{listen}\"]\nsocket_mode = \"0660\"\nsocket_owner = \"postfix\"\n{extra_config}\n\
             [filter.config]\ndelay = 2\nipv4_prefix = 32\nwhitelist_clients = [\"127.0.0.3\"]\n",
            root.display()
        ),
    )
    .unwrap();
    let db = root.join("greyhook.db");
    let mut daemon =
        Process::greyhook(&["serve", "--config", cfg.to_str().unwrap(), "--db", db.to_str().unwrap()], root.join("greyhook.log"));
    if let Some(port) = listen.strip_prefix("127.0.0.1:") {
        wait_for_port(port.parse().unwrap(), 20);
    } else {
        let sock = PathBuf::from(listen.trim_start_matches("unix:"));
        for _ in 0..200 {
            if sock.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(sock.exists(), "no socket: {}", daemon.log_text());
    }
    let pf = Postfix::start(root, Some(policy), "");

    let first_try = std::time::Instant::now();
    let first = pf.send("sender@example.org", "user@e2e.test", "127.0.0.1");
    let line = rcpt_tempfail(&first, code, "Greylisted, please try again later retry=00:00:02");
    assert!(line.contains("Recipient address rejected"), "{line}");

    std::thread::sleep(std::time::Duration::from_millis(2100));
    let second = pf.send("sender@example.org", "user@e2e.test", "127.0.0.1");
    assert!(second.contains("queued as"), "retry after the delay:\n{second}\n{}\n{}", pf.log(), daemon.log_text());
    let msg = pf.message(&second);
    assert_delayed(&msg, 2, first_try);

    let third = pf.send("other@example.net", "user@e2e.test", "127.0.0.1");
    rcpt_tempfail(&third, code, "retry=00:00:02");

    let white = pf.send("sender@example.org", "user@e2e.test", "127.0.0.3");
    assert!(white.contains("queued as"), "a whitelisted client passes at once:\n{white}");
    assert!(!pf.message(&white).contains("X-Greylist"), "and carries no header");

    wait_for_log(&daemon, "action=greylist phase=rcpt client=127.0.0.1");
    let log = daemon.log_text();
    assert!(
        log.contains("action=greylist phase=rcpt client=127.0.0.1")
            && log.contains("sender=<sender@example.org> recipient=<user@e2e.test>"),
        "{log}"
    );
    drop(pf);
    assert!(daemon.terminate(10), "clean exit on SIGTERM: {}", daemon.log_text());
    assert!(daemon.wait_log("store flushed; stopped", 10));
}

fn traversable(dir: &Path) {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn postfix_over_tcp() {
    let root = tempfile::tempdir().unwrap();
    traversable(root.path());
    let port = free_port();
    greylist_through_postfix(root.path(), &format!("127.0.0.1:{port}"), &format!("inet:127.0.0.1:{port}"), "", "451");
}

#[test]
fn postfix_over_unix_socket_with_defer_if_permit() {
    let root = tempfile::tempdir().unwrap();
    traversable(root.path());
    let sock = root.path().join("policy.sock");
    let s = sock.display().to_string();
    greylist_through_postfix(root.path(), &format!("unix:{s}"), &format!("unix:{s}"), "tempfail_action = \"defer_if_permit\"", "450");
}

fn wait_for_log(p: &Process, what: &str) {
    for _ in 0..200 {
        if p.log_text().contains(what) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("greyhook did not log {what:?}: {}", p.log_text());
}

/// `greyhook serve` with a milter listener and the reference filter
/// configured by `filter_config` (its `[filter.config]` table), and a
/// Postfix in `r` using it as its milter with `milter_default_action`.
fn postfix_with_milter(r: &Path, filter_config: &str, default_action: &str) -> (Process, Postfix) {
    postfix_with_milter_logging(r, filter_config, default_action, "info")
}

/// [`postfix_with_milter`] with greyhook logging at `log` (`GREYHOOK_LOG`).
fn postfix_with_milter_logging(r: &Path, filter_config: &str, default_action: &str, log: &str) -> (Process, Postfix) {
    let mport = free_port();
    let daemon = serve_for_postfix(r, &format!("[policy]\nlisten = []\n[milter]\nlisten = [\"127.0.0.1:{mport}\"]\n"), filter_config, log);
    wait_for_port(mport, 20);
    let pf = Postfix::start(
        r,
        None,
        &format!("smtpd_milters = inet:127.0.0.1:{mport}\nmilter_default_action = {default_action}\nmilter_protocol = 6\n"),
    );
    (daemon, pf)
}

/// `greyhook serve` with a policy listener and the reference filter
/// configured by `filter_config`, and a Postfix in `r` asking it at RCPT.
fn postfix_with_policy(r: &Path, filter_config: &str) -> (Process, Postfix) {
    let port = free_port();
    let daemon = serve_for_postfix(r, &format!("[policy]\nlisten = [\"127.0.0.1:{port}\"]\n"), filter_config, "info");
    wait_for_port(port, 20);
    let pf = Postfix::start(r, Some(&format!("inet:127.0.0.1:{port}")), "");
    (daemon, pf)
}

/// `greyhook serve` in `r` (made traversable for Postfix) with a memory
/// store, the front-end tables `listeners`, the reference filter's
/// `[filter.config]` and logging at `log`.
fn serve_for_postfix(r: &Path, listeners: &str, filter_config: &str, log: &str) -> Process {
    traversable(r);
    let cfg = r.join("greyhook.toml");
    std::fs::write(
        &cfg,
        format!(
            "[control]\nsocket = \"{d}/control.sock\"\n[store]\npath = \"memory\"\n{listeners}[filter.config]\n{filter_config}",
            d = r.display()
        ),
    )
    .unwrap();
    let env = [("GREYHOOK_LOG", std::ffi::OsStr::new(log))];
    Process::greyhook_env(&["serve", "--config", cfg.to_str().unwrap()], r.join("greyhook.log"), &env)
}

/// Postfix with `smtputf8_enable = no` (the harness's, and any Postfix
/// before compatibility level 1) takes 8-bit addresses that are not UTF-8,
/// and hands them to its policy service and milter byte for byte. Found
/// with a raw socket through a real Postfix: greyhook read each bad byte as
/// U+FFFD, so the Latin-1 senders `\xe9t\xe9@` and `\xe8t\xe8@` made one
/// triplet, and a sender never seen before passed as the other's retry.
/// Each must be its own triplet; the retry of the first still passes, and
/// the decision log shows the bytes as `\xe9`.
#[test]
fn postfix_latin1_senders_are_distinct_triplets() {
    for front in ["policy", "milter"] {
        let root = tempfile::tempdir().unwrap();
        let config = "delay = 2\nipv4_prefix = 32\n";
        let (mut daemon, pf) =
            if front == "policy" { postfix_with_policy(root.path(), config) } else { postfix_with_milter(root.path(), config, "accept") };
        let mut c = Raw::over(connect_from("127.0.0.9", pf.port));
        assert!(c.reply().starts_with("220"), "{front}: greeting");
        assert!(c.send("EHLO client.example.org").starts_with("250"));
        let mut attempt = |sender: &[u8]| {
            let _ = c.send("RSET");
            let mail = c.send_bytes(&[&b"MAIL FROM:<"[..], sender, b">"].concat());
            assert!(mail.starts_with("250"), "{front}: Postfix takes a Latin-1 sender: {mail}\n{}", pf.log());
            c.send("RCPT TO:<user@e2e.test>")
        };
        let first = attempt(b"\xe9t\xe9@example.org");
        assert!(first.starts_with("451"), "{front}: first sighting greylisted: {first}\n{}", daemon.log_text());
        std::thread::sleep(std::time::Duration::from_millis(2100));
        let other = attempt(b"\xe8t\xe8@example.org");
        assert!(other.starts_with("451"), "{front}: another sender, never seen, is greylisted: {other}\n{}", daemon.log_text());
        let retry = attempt(b"\xe9t\xe9@example.org");
        assert!(retry.starts_with("250"), "{front}: the first sender's retry passes: {retry}\n{}", daemon.log_text());
        // The decision log shows the bytes the client sent.
        wait_for_log(&daemon, "sender=<\\xe8t\\xe8@example.org>");
        let _ = c.send("QUIT");
        drop(pf);
        assert!(daemon.terminate(10), "{front}: {}", daemon.log_text());
    }
}

/// greyhook gives Postfix its own macro lists (`SMFIF_SETSYMLIST`): only
/// the queue ID `i` and `{auth_authen}` arrive, not Postfix's default dozen
/// (`j`, `_`, `{daemon_name}`, `{rcpt_addr}`...), which greyhook would only
/// parse and drop. Postfix's own lists are still there to be overridden:
/// this fails if Postfix ignores ours.
#[test]
fn postfix_sends_the_milter_only_the_macros_it_asked_for() {
    let root = tempfile::tempdir().unwrap();
    let (mut daemon, pf) = postfix_with_milter_logging(root.path(), "delay = 0\n", "tempfail", "info,greyhook::frontend::milter=trace");
    let out = swaks(pf.port, &["--local-interface", "127.0.0.1", "--from", "sender@example.org", "--to", "user@e2e.test"]);
    assert!(out.contains("queued as"), "delivered:\n{out}\n{}", pf.log());
    drop(pf);
    assert!(daemon.terminate(10), "{}", daemon.log_text());
    let log = daemon.log_text();
    let names: Vec<&str> =
        log.lines().filter(|l| l.contains("milter: macro")).filter_map(|l| l.split("name=").nth(1)).map(str::trim).collect();
    // The queue ID is defined from end of headers on (and maybe RCPT).
    assert!(names.contains(&"i"), "no queue ID macro arrived:\n{log}");
    let unasked: Vec<&&str> = names.iter().filter(|n| !["i", "{auth_authen}"].contains(n)).collect();
    assert!(unasked.is_empty(), "macros greyhook did not ask for: {unasked:?}\n{log}");
}

/// Postfix asks greyhook over milter; the filter greylists at DATA with the
/// Message-ID in the key; the retry passes and carries `X-Greylist`.
#[test]
fn postfix_milter_greylists_at_end_of_data() {
    let root = tempfile::tempdir().unwrap();
    let (mut daemon, pf) = postfix_with_milter(
        root.path(),
        "stage = \"data\"\ndelay = 2\nipv4_prefix = 32\n\
         reply_text = [\"Greylisted, please try again later\", \"See https://greyhook.test/why\"]\n",
        "tempfail",
    );
    let send = |id: &str| {
        let mid = format!("Message-Id: <{id}@client.example.org>");
        swaks(pf.port, &["--local-interface", "127.0.0.1", "--from", "sender@example.org", "--to", "user@e2e.test", "--header", &mid])
    };
    let first_try = std::time::Instant::now();
    let first = send("one");
    let lines: Vec<&str> = first.lines().filter(|l| l.starts_with("<** ")).collect();
    assert_eq!(
        lines,
        ["<** 451-4.7.1 Greylisted, please try again later", "<** 451 4.7.1 See https://greyhook.test/why retry=00:00:02"],
        "a two-line reply at end of DATA, the hint last:\n{first}\n{}",
        pf.log()
    );
    assert!(first.contains(" -> .\n") || first.contains("-> ."), "the reply came after the data:\n{first}");
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let second = send("one");
    assert!(second.contains("queued as"), "the retry with the same Message-ID passes:\n{second}\n{}", daemon.log_text());
    let msg = pf.message(&second);
    assert_delayed(&msg, 2, first_try);
    let other = send("two");
    assert!(other.contains("<** 451 4.7.1"), "another Message-ID is greylisted:\n{other}");
    wait_for_log(&daemon, "action=greylist phase=data client=127.0.0.1");
    drop(pf);
    assert!(daemon.terminate(10), "{}", daemon.log_text());
}

/// Postfix does not wait for the milter's answer at connect, HELO and MAIL
/// (greyhook negotiates the no-reply steps): a connect-stage tempfail is
/// held and given at RCPT, where Postfix answers it (and hangs up: a 421);
/// the retry after the delay is delivered.
#[test]
fn postfix_milter_gives_a_connect_stage_tempfail_at_rcpt() {
    let root = tempfile::tempdir().unwrap();
    let (mut daemon, pf) = postfix_with_milter(root.path(), "stage = \"connect\"\ndelay = 2\nipv4_prefix = 32\n", "accept");
    // Not from 127.0.0.1: the harness's readiness probe of Postfix's port
    // comes from there, and Postfix passes that connect to the milter too,
    // so 127.0.0.1 would already be a second (or more) into its delay.
    let send = || swaks(pf.port, &["--local-interface", "127.0.0.7", "--from", "sender@example.org", "--to", "user@e2e.test"]);
    let first = send();
    let refused: Vec<&str> = first.lines().filter(|l| l.starts_with("<** ")).collect();
    assert_eq!(refused, ["<** 421 4.7.1 Greylisted, please try again later retry=00:00:02"], "421 at RCPT:\n{first}\n{}", pf.log());
    assert!(first.contains("RCPT TO:<user@e2e.test>"), "{first}");
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let second = send();
    assert!(second.contains("queued as"), "the retry passes:\n{second}\n{}", daemon.log_text());
    // (No X-Greylist header: at connect there is no message to put it in.)
    wait_for_log(&daemon, "action=greylist phase=connect client=127.0.0.7");
    drop(pf);
    assert!(daemon.terminate(10), "{}", daemon.log_text());
}

/// `greyhook smtp` on a free port in front of the Postfix at `next_hop`
/// (`HOST:PORT` or `unix:/path`; 2 s delay), and a send from client
/// 127.0.0.5 through it.
fn greyhook_smtp_before(r: &Path, next_hop: &str) -> (Process, impl Fn() -> String + use<>) {
    let (daemon, _, send) = greyhook_smtp_on_port(r, next_hop);
    (daemon, send)
}

/// [`greyhook_smtp_before`], with the port it listens on.
fn greyhook_smtp_on_port(r: &Path, next_hop: &str) -> (Process, u16, impl Fn() -> String + use<>) {
    let sport = free_port();
    let daemon = Process::greyhook(
        &[
            "smtp",
            "--listen",
            &format!("127.0.0.1:{sport}"),
            "--next-hop",
            next_hop,
            "--db",
            "memory",
            "--control",
            r.join("control.sock").to_str().unwrap(),
            "--set",
            "delay=2",
        ],
        r.join("greyhook.log"),
    );
    wait_for_port(sport, 20);
    // The client comes from 127.0.0.5; greyhook talks to Postfix from 127.0.0.1.
    let send = move || {
        swaks(
            sport,
            &["--from", "sender@example.org", "--to", "user@e2e.test", "--ehlo", "client.example.org", "--local-interface", "127.0.0.5"],
        )
    };
    (daemon, sport, send)
}

/// Whether a swaks transcript shows Postfix's reply to a BDAT message
/// (`250 2.0.0 Ok: 478 bytes queued as ID`) passed back to the client.
fn bdat_queued(transcript: &str) -> bool {
    transcript.lines().any(|l| l.starts_with("<-  250 2.0.0 Ok: ") && l.contains(" bytes queued as "))
}

/// `greyhook smtp` in front of a real Postfix: greylisted at RCPT, the
/// retry is relayed (with XCLIENT) and Postfix's own `250 ... queued as`
/// reaches the client; the message in Postfix's queue carries the header.
#[test]
fn greyhook_smtp_relays_to_postfix() {
    relays_to_postfix(false);
}

/// The same with Postfix's smtpd on a unix socket as the next hop
/// (`next_hop = "unix:/path"`, a master.cf `unix` service): no TCP between
/// greyhook and its MTA. Postfix counts a unix-socket client as
/// 127.0.0.1, so XCLIENT is allowed the same way.
#[test]
fn greyhook_smtp_relays_to_postfix_on_a_unix_socket() {
    relays_to_postfix(true);
}

fn relays_to_postfix(unix: bool) {
    let root = tempfile::tempdir().unwrap();
    traversable(root.path());
    let r = root.path();
    let pf = Postfix::start(r, None, "smtpd_authorized_xclient_hosts = 127.0.0.1\n");
    let hop = if unix { pf.unix_smtpd() } else { format!("127.0.0.1:{}", pf.port) };
    let (mut daemon, send) = greyhook_smtp_before(r, &hop);
    let first = send();
    assert!(first.contains("<-  250-GREYLIST"), "EHLO advertises GREYLIST:\n{first}");
    rcpt_tempfail(&first, "451", "Greylisted, please try again later retry=00:00:02");
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let second = send();
    // Postfix offers CHUNKING, so greyhook relays with BDAT, and Postfix's
    // reply to it ("Ok: N bytes queued as ID") reaches the client as it is.
    assert!(bdat_queued(&second), "Postfix's reply reaches the client:\n{second}\n{}", daemon.log_text());
    let msg = pf.message(&second);
    assert!(msg.contains("X-Greylist: delayed"), "{msg}");
    // XCLIENT: Postfix sees the real client, in its log and its own Received line.
    assert!(pf.log_has("client=unknown[127.0.0.5]"), "{}", pf.log());
    let postfix_received = msg.lines().find(|l| l.contains("Received: from")).unwrap_or_default().to_string();
    assert!(postfix_received.contains("client.example.org (unknown [127.0.0.5])"), "{msg}");
    // And greyhook's own trace line names the client and its HELO.
    assert!(
        msg.contains("Received: from client.example.org (unknown [127.0.0.5])") && msg.contains("(greyhook) with ESMTP id smtp"),
        "{msg}"
    );
    assert!(!msg.contains("[127.0.0.1]"), "loopback is named nowhere: {msg}");
    drop(pf);
    assert!(daemon.terminate(10), "{}", daemon.log_text());
}

/// A next hop that allows XFORWARD but not XCLIENT: Postfix logs the
/// original client (`orig_client=`) beside the connecting one (greyhook on
/// 127.0.0.1), and greyhook's own Received: line names the client.
#[test]
fn greyhook_smtp_falls_back_to_xforward() {
    let root = tempfile::tempdir().unwrap();
    traversable(root.path());
    let r = root.path();
    let pf = Postfix::start(r, None, "smtpd_authorized_xforward_hosts = 127.0.0.1\n");
    let (mut daemon, send) = greyhook_smtp_before(r, &format!("127.0.0.1:{}", pf.port));
    rcpt_tempfail(&send(), "451", "Greylisted, please try again later retry=00:00:02");
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let second = send();
    assert!(bdat_queued(&second), "{second}\n{}", daemon.log_text());
    assert!(pf.log_has("orig_client=unknown[127.0.0.5]"), "Postfix saw the XFORWARD attributes:\n{}", pf.log());
    let msg = pf.message(&second);
    assert!(msg.contains("Received: from client.example.org (unknown [127.0.0.5])"), "{msg}");
    drop(pf);
    assert!(daemon.terminate(10), "{}", daemon.log_text());
}

/// SMTPUTF8 (RFC 6531) through `greyhook smtp` to a real Postfix with
/// `smtputf8_enable = yes` (Postfix's default): Python's smtplib sends
/// from and to internationalised addresses, asking for SMTPUTF8; the first
/// attempt is greylisted at RCPT, the retry is relayed with SMTPUTF8 and
/// Postfix queues it, and greyhook's Received line says `UTF8SMTP`.
/// Before, greyhook did not offer SMTPUTF8: smtplib refused to send, as a
/// sending MTA bounces such mail.
#[test]
fn greyhook_smtp_relays_smtputf8_mail_to_postfix() {
    let (out, msg) = smtplib_through_greyhook_to_postfix(
        "smtputf8_enable = yes\n",
        "smtputf8",
        "'jörg@exämple.org', ['SMTPUTF8']",
        "'müller@e2e.test'",
        "'From: jörg@exämple.org\\r\\nTo: müller@e2e.test\\r\\nSubject: grüße\\r\\n\\r\\nhallo\\r\\n'.encode()",
    );
    assert!(out.starts_with("offered"), "{out}");
    assert!(msg.contains("müller@e2e.test"), "{msg}");
    assert!(msg.contains("(greyhook) with UTF8SMTP id smtp"), "{msg}");
}

/// A sender's request for delivery status notifications reaches Postfix
/// behind `greyhook smtp` (RFC 3461): Postfix, which delivers or bounces,
/// then sends the notices, "delivered" instead of the sending MTA's
/// "relayed". Python's smtplib asks; the held message's envelope
/// (`postcat`) shows what Postfix took.
#[test]
fn greyhook_smtp_passes_dsn_requests_to_postfix() {
    let (out, msg) = smtplib_through_greyhook_to_postfix(
        "",
        "dsn",
        "'sender@example.org', ['RET=HDRS', 'ENVID=QQ314159']",
        "'user@e2e.test', ['NOTIFY=SUCCESS,DELAY', 'ORCPT=rfc822;user+2B1@e2e.test']",
        "b'Subject: dsn\\r\\n\\r\\nhi\\r\\n'",
    );
    assert!(out.starts_with("offered"), "{out}");
    for (what, record) in [
        // Postfix's own codes: RET=HDRS is 2, NOTIFY's SUCCESS 2 and DELAY 8.
        ("RET=HDRS", "named_attribute: ret_flags=2"),
        ("ENVID", "named_attribute: envelope_id=QQ314159"),
        ("ORCPT", "named_attribute: dsn_orig_rcpt=rfc822;user+1@e2e.test"),
        ("NOTIFY=SUCCESS,DELAY", "named_attribute: notify_flags=10"),
    ] {
        assert!(msg.contains(record), "{what}: no {record:?} in the queue file:\n{msg}");
    }
}

/// One message sent with Python's smtplib from 127.0.0.5 through
/// `greyhook smtp` (a 2 s delay) to a real Postfix with `postfix_extra` in
/// its main.cf: `s.mail(MAIL)`, `s.rcpt(RCPT)` and `s.data(DATA)` (Python
/// arguments), once and, greylisted, again 2.1 s later. Each attempt
/// first prints whether EHLO offered `extension`. The transcript, and the
/// message Postfix queued (its `postcat` text).
fn smtplib_through_greyhook_to_postfix(postfix_extra: &str, extension: &str, mail: &str, rcpt: &str, data: &str) -> (String, String) {
    let root = tempfile::tempdir().unwrap();
    traversable(root.path());
    let r = root.path();
    let pf = Postfix::start(r, None, &format!("smtpd_authorized_xclient_hosts = 127.0.0.1\n{postfix_extra}"));
    let (mut daemon, port, _) = greyhook_smtp_on_port(r, &format!("127.0.0.1:{}", pf.port));
    let out = python(&format!(
        "import smtplib, time\n\
         def attempt():\n\
         \x20   s = smtplib.SMTP('127.0.0.1', {port}, local_hostname='client.example.org', source_address=('127.0.0.5', 0), timeout=10)\n\
         \x20   s.ehlo()\n\
         \x20   print('offered' if s.has_extn('{extension}') else 'not offered')\n\
         \x20   print(s.mail({mail}))\n\
         \x20   code, text = s.rcpt({rcpt})\n\
         \x20   print(code, text.decode())\n\
         \x20   if code == 250:\n\
         \x20       code, text = s.data({data})\n\
         \x20       print(code, text.decode())\n\
         \x20   s.quit()\n\
         attempt()\n\
         time.sleep(2.1)\n\
         attempt()\n"
    ));
    assert!(out.contains("451 4.7.1 Greylisted"), "the first attempt is greylisted:\n{out}");
    let queued =
        out.lines().find(|l| l.starts_with("250 ") && l.contains("queued as ")).unwrap_or_else(|| panic!("{out}\n{}", daemon.log_text()));
    let msg = pf.message(queued);
    drop(pf);
    assert!(daemon.terminate(10), "{}", daemon.log_text());
    (out, msg)
}

/// The README's Postfix lines, exactly as shown (the port changed), with
/// a real Postfix: an ordinary sender is greylisted at RCPT and the null
/// sender at DATA; both pass on retry.
#[test]
fn the_readme_postfix_lines_greylist_the_null_sender_too() {
    let root = tempfile::tempdir().unwrap();
    traversable(root.path());
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    let block = readme
        .split("# /etc/postfix/main.cf\n")
        .nth(1)
        .and_then(|r| r.split("```").next())
        .expect("the README shows main.cf lines")
        .to_string();
    assert!(block.contains("smtpd_data_restrictions"), "{block}");
    let port = free_port();
    let lines = block.replace("127.0.0.1:10023", &format!("127.0.0.1:{port}"));
    let mut daemon = greyhook_with(
        root.path(),
        "serve",
        &format!(
            "[control]\nsocket = \"{d}/control.sock\"\n[store]\npath = \"memory\"\n[policy]\nlisten = [\"127.0.0.1:{port}\"]\n\
             [filter.config]\ndelay = 2\n",
            d = root.path().display()
        ),
    );
    wait_for_port(port, 20);
    let pf = Postfix::start(root.path(), None, &lines);
    let first = pf.send("sender@example.org", "user@e2e.test", "127.0.0.1");
    rcpt_tempfail(&first, "451", "retry=00:00:02");
    let bounce = pf.send("<>", "user@e2e.test", "127.0.0.1");
    let line = bounce.lines().find(|l| l.starts_with("<** 4")).unwrap_or_else(|| panic!("the null sender is greylisted:\n{bounce}"));
    assert!(line.starts_with("<** 451 4.7.1") && line.ends_with("retry=00:00:02"), "{line}");
    assert!(bounce.contains("~> DATA") || bounce.contains(" -> DATA"), "at DATA: {bounce}");
    std::thread::sleep(std::time::Duration::from_millis(2100));
    assert!(pf.send("sender@example.org", "user@e2e.test", "127.0.0.1").contains("queued as"));
    let again = pf.send("<>", "user@e2e.test", "127.0.0.1");
    assert!(again.contains("queued as"), "the bounce passes on retry:\n{again}\n{}", daemon.log_text());
    assert!(daemon.wait_log("action=greylist phase=data", 10), "{}", daemon.log_text());
    // The README's lines replace the base's recipient restrictions rather
    // than set them twice (see `main_cf`).
    assert!(!pf.log().contains("overriding earlier entry"), "{}", pf.log());
    drop(pf);
    assert!(daemon.terminate(10));
}
