//! The SMTP front end (`greyhook smtp`) driven by real clients: Python's
//! smtplib and raw sockets, with a sink or a real Postfix as the next hop.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use greyhook_tests::*;

/// `greyhook smtp` on a free port with `filters` (TOML tables) relaying
/// to 127.0.0.1:`next_hop`.
fn start(dir: &Path, filters: &str, next_hop: u16, smtp_extra: &str) -> (Process, u16) {
    let port = free_port();
    let cfg = dir.join("greyhook.toml");
    std::fs::write(
        &cfg,
        format!(
            "[control]\nsocket = \"{d}/control.sock\"\n[store]\npath = \"memory\"\n\
             [smtp]\nlisten = [\"127.0.0.1:{port}\"]\nnext_hop = \"127.0.0.1:{next_hop}\"\nhostname = \"greyhook.test\"\n\
             next_hop_timeout = \"5s\"\ncommand_timeout = \"5s\"\ndata_timeout = \"5s\"\n{smtp_extra}\n{filters}\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let p = Process::greyhook(&["smtp", "--config", cfg.to_str().unwrap()], dir.join("log"));
    wait_for_port(port, 30);
    (p, port)
}

const GREYLIST: &str = "[filter.config]\ndelay = 1\n";

#[test]
fn smtplib_sees_421_at_the_greeting() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start();
    let (_d, port) = start(dir.path(), "[filter.config]\nstage = \"connect\"\ndelay = 300\n", sink.port, "");
    let out = python(&format!(
        "import smtplib\ntry:\n    smtplib.SMTP('127.0.0.1', {port}, timeout=10)\n    print('connected')\nexcept smtplib.SMTPConnectError as e:\n    print(e.smtp_code, e.smtp_error.decode())\n"
    ));
    // The first sighting: the harness's port probe came from elsewhere.
    assert_eq!(out.trim(), "421 4.7.1 Greylisted, please try again later retry=00:05:00", "{out}");
    let mut raw = Raw::connect(port);
    assert!(raw.reply().starts_with("421 4.7.1"));
    assert!(raw.closed(), "the connection closes after the 421");
}

/// The harness's readiness probes come from their own address
/// ([`PROBE_FROM`]), not from 127.0.0.1 where most tests send: a probe that
/// reaches the connect hook is a client to the filter, and from 127.0.0.1
/// it started the delay a test went on to measure (CI saw `retry=00:00:01`
/// where a test expected `00:00:02`).
#[test]
fn readiness_probes_are_not_the_tests_client() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start();
    let (d, port) = start(dir.path(), "[filter.config]\nstage = \"connect\"\ndelay = 300\n", sink.port, "");
    let probe = format!("client={PROBE_FROM}");
    assert!(d.wait_log(&probe, 10), "the probe was not greylisted as {PROBE_FROM}:\n{}", d.log_text());
    let decided_before = d.log_text();
    assert!(
        !decided_before.lines().any(|l| l.split_whitespace().any(|w| w.starts_with("client=127.0.0."))),
        "a decision about the tests' network 127.0.0.0/24 before the test connected:\n{decided_before}"
    );
    let mut raw = Raw::connect(port);
    assert_eq!(
        raw.reply().trim_end(),
        "421 4.7.1 Greylisted, please try again later retry=00:05:00",
        "a full delay for the first sighting"
    );
    assert!(raw.closed());
}

#[test]
fn smtplib_sees_greylist_in_ehlo_and_451_at_mail_rcpt_and_data() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start();
    std::fs::write(dir.path().join("chaos.wasm"), CHAOS_FILTER).unwrap();
    // A test filter in front (it tempfails MAIL from tempfail-mail@...),
    // the reference filter behind it with a two-line reply.
    let filters = format!(
        "[[filters]]\npath = \"{}/chaos.wasm\"\nnamespace = \"chaos\"\n\
         [[filters]]\nnamespace = \"greylist\"\n[filters.config]\ndelay = 1\n\
         reply_text = [\"Greylisted, please try again later\", \"See https://greyhook.test/why\"]\n",
        dir.path().display()
    );
    let (_d, port) = start(dir.path(), &filters, sink.port, "");
    let out = python(&format!(
        r#"
import smtplib
s = smtplib.SMTP('127.0.0.1', {port}, timeout=10)
code, msg = s.ehlo('client.example.org')
print('ehlo', code, s.has_extn('greylist'), s.has_extn('pipelining'), s.has_extn('size'), s.has_extn('8bitmime'), s.has_extn('chaos'))
print('mail', *s.mail('tempfail-mail@example.org'))
print('mail-ok', s.mail('someone@example.org')[0])
code, msg = s.rcpt('continue@example.com')  # the test filter passes this one on
print('rcpt', code, repr(msg.decode()))
s.rset()
s.mail('someone@example.org')
code, msg = s.rcpt('continue@example.com')  # past the one-second delay now
if code != 250:
    import time; time.sleep(1.2)
    code, msg = s.rcpt('continue@example.com')
print('rcpt-ok', code)
code, msg = s.data('Message-ID: <tempfail-data@client.example.org>\r\nSubject: x\r\n\r\nbody\r\n')
print('data', code, repr(msg.decode()))
s.quit()
"#
    ));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "ehlo 250 True True True True True", "{out}");
    assert_eq!(lines[1], "mail 451 b'4.7.1 Not now.\\n4.7.1 Senders like you wait a minute retry=00:01:00'", "{out}");
    assert_eq!(lines[2], "mail-ok 250", "{out}");
    assert_eq!(
        lines[3], "rcpt 451 '4.7.1 Greylisted, please try again later\\n4.7.1 See https://greyhook.test/why retry=00:00:01'",
        "the hint is on the last line: {out}"
    );
    assert_eq!(lines[4], "rcpt-ok 250", "{out}");
    assert_eq!(lines[5], "data 451 '4.7.1 Not this message, not now retry=00:02:00'", "451 at the end of DATA: {out}");
    assert!(sink.received().is_empty(), "the tempfailed message was not relayed");
    // On the wire: `451-` then `451 `.
    let mut raw = Raw::connect(port);
    raw.reply();
    raw.send("EHLO client.example.org");
    assert_eq!(
        raw.send("MAIL FROM:<tempfail-mail@example.org>"),
        "451-4.7.1 Not now.\r\n451 4.7.1 Senders like you wait a minute retry=00:01:00\r\n"
    );
    assert!(raw.send("EHLO client.example.org").contains("250-GREYLIST\r\n"));
}

#[test]
fn greylisting_at_data_keys_on_the_message_id_and_relays_the_retry() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start();
    let (_d, port) = start(dir.path(), "[filter.config]\nstage = \"data\"\ndelay = 1\n", sink.port, "");
    let script = format!(
        r#"
import smtplib, sys
msg = 'Message-ID: <{{}}@client.example.org>\r\nSubject: hi\r\n\r\n.a line with a dot\r\nbody\r\n'
s = smtplib.SMTP('127.0.0.1', {port}, timeout=10)
try:
    s.sendmail('a@example.org', ['user@example.com'], msg.format(sys.argv[1]))
    print('accepted')
except smtplib.SMTPDataError as e:
    print(e.smtp_code, e.smtp_error.decode())
s.quit()
"#
    );
    let send = |id: &str| {
        let out = std::process::Command::new("python3").args(["-c", &script, id]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string() + &String::from_utf8_lossy(&out.stderr)
    };
    let first_try = std::time::Instant::now();
    assert_eq!(send("m1"), "451 4.7.1 Greylisted, please try again later retry=00:00:01");
    assert!(sink.received().is_empty(), "nothing relayed on a tempfail");
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(send("m2"), "451 4.7.1 Greylisted, please try again later retry=00:00:01", "another Message-ID is another triplet");
    assert_eq!(send("m1"), "accepted");
    let got = sink.received();
    assert_eq!(got.len(), 1);
    // greyhook's Received: line first, then the filter's header.
    assert!(got[0].starts_with("Received: from "), "{got:?}");
    let after = got[0].split_once(" +0000\r\n").map(|(_, r)| r).unwrap_or("");
    assert!(after.starts_with("X-Greylist: delayed "), "{got:?}");
    assert_delayed(after, 1, first_try);
    assert!(
        got[0].contains("Message-ID: <m1@client.example.org>") && got[0].contains("\r\n.a line with a dot\r\n"),
        "the dot line arrives as sent: {got:?}"
    );
}

#[test]
fn seed_000_five_recipients_in_three_policy_groups() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start();
    let filters = "[filter.config]\ndelay = 300\n\
        [[filter.config.policy]]\nname = \"a\"\nrecipients = [\"one@example.com\", \"three@example.com\"]\ngreylist = false\n\
        [[filter.config.policy]]\nname = \"b\"\nrecipients = [\"two@example.com\", \"four@example.com\"]\n\
        [[filter.config.policy]]\nname = \"c\"\nrecipients = [\"five@example.com\"]\ngreylist = false\n";
    let (_d, port) = start(dir.path(), filters, sink.port, "");
    let out = python(&format!(
        r#"
import smtplib
s = smtplib.SMTP('127.0.0.1', {port}, timeout=10)
s.ehlo('client.example.org')
s.mail('sender@example.org')
for r in ['one', 'two', 'three', 'four', 'five']:
    code, msg = s.rcpt(r + '@example.com')
    print(r, code, msg.decode())
print('data', s.data('Subject: x\r\n\r\nhello\r\n')[0])
s.quit()
"#
    ));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "one 250 2.1.5 Ok");
    let other = "451 4.7.1 This recipient has a different policy than the first one; please retry it in a new transaction retry=00:00:00";
    assert_eq!(lines[1], format!("two {other}"));
    assert_eq!(lines[2], "three 250 2.1.5 Ok");
    assert_eq!(lines[3], format!("four {other}"));
    assert_eq!(lines[4], format!("five {other}"));
    assert_eq!(lines[5], "data 250");
    assert_eq!(sink.received().len(), 1);
}

#[test]
fn hostile_clients_get_replies_or_a_closed_connection() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start();
    let (mut d, port) = start(dir.path(), "[filter.config]\nwhitelist_clients = [\"127.0.0.0/8\"]\n", sink.port, "");
    let mut c = Raw::connect(port);
    assert!(c.reply().starts_with("220 greyhook.test"));
    // A 1 MB line.
    c.w.write_all(&vec![b'A'; 1 << 20]).unwrap();
    assert_eq!(c.send(""), "500 5.5.2 Line too long\r\n");
    assert_eq!(c.send("NOOP"), "250 2.0.0 Ok\r\n");
    // Binary garbage.
    c.w.write_all(b"\x00\xff\xfe\x80garbage\r\n").unwrap();
    assert!(c.reply().starts_with("500 5.5.2"));
    assert!(c.send("MAIL FROM:<a@b>").starts_with("503"), "EHLO first");
    // A greeting without a name is answered with the verb the client used.
    assert_eq!(c.send("HELO"), "501 5.5.4 Syntax: HELO hostname\r\n");
    assert_eq!(c.send("EHLO"), "501 5.5.4 Syntax: EHLO hostname\r\n");
    c.send("EHLO client.example.org");
    assert!(c.send("RCPT TO:<x@y>").starts_with("503"), "MAIL first");
    assert!(c.send("MAIL FROM:<a@example.org> SIZE=999999999999").starts_with("552 5.3.4"));
    assert_eq!(c.send("MAIL FROM:<a@example.org>"), "250 2.1.0 Ok\r\n");
    // 10 000 recipients, pipelined: 100 taken, the rest 452.
    let mut batch = String::new();
    for i in 0..10_000 {
        batch.push_str(&format!("RCPT TO:<u{i}@example.com>\r\n"));
    }
    // Written from another thread: the replies must be read meanwhile.
    let mut w = c.w.try_clone().unwrap();
    let writer = std::thread::spawn(move || w.write_all(batch.as_bytes()).unwrap());
    let (mut ok, mut full) = (0, 0);
    for _ in 0..10_000 {
        match c.reply().get(..3) {
            Some("250") => ok += 1,
            Some("452") => full += 1,
            other => panic!("{other:?}"),
        }
    }
    writer.join().unwrap();
    assert_eq!((ok, full), (100, 9_900));
    assert_eq!(c.send("RSET"), "250 2.0.0 Ok\r\n");
    // A client that stops mid-DATA: nothing is relayed.
    c.send("MAIL FROM:<a@example.org>");
    c.send("RCPT TO:<u@example.com>");
    assert!(c.send("DATA").starts_with("354"));
    c.w.write_all(b"Subject: cut\r\n\r\nhalf a mess").unwrap();
    drop(c);
    assert!(d.wait_log("lost connection in DATA", 10), "{}", d.log_text());
    assert!(sink.received().is_empty(), "a message cut off is not relayed");
    // Too many errors close the connection.
    let mut c = Raw::connect(port);
    c.reply();
    let mut last = String::new();
    for _ in 0..20 {
        last = c.send("BOGUS");
    }
    assert!(last.starts_with("421"), "{last}");
    assert!(c.closed());
    // The daemon is unaffected.
    let mut c = Raw::connect(port);
    assert!(c.reply().starts_with("220"));
    assert!(c.send("EHLO again.example.org").starts_with("250-greyhook.test"));
    assert!(d.terminate(10), "{}", d.log_text());
}

#[test]
fn a_next_hop_tempfail_comes_back_as_a_tempfail() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::with_data_reply("451 4.3.0 Sink is full");
    let (_d, port) = start(dir.path(), "[filter.config]\nwhitelist_clients = [\"127.0.0.0/8\"]\n", sink.port, "");
    let mut c = Raw::at_data(port, &["u@example.com"]);
    assert_eq!(c.send("Subject: x\r\n\r\nbody\r\n."), "451 4.3.0 Sink is full\r\n");
    // A dead next hop: a greylisted attempt never needs it (the next hop
    // is connected only once a recipient passes the filters) ...
    let dead = free_port();
    let dir2 = tempfile::tempdir().unwrap();
    let (_d2, port2) = start(dir2.path(), GREYLIST, dead, "");
    let mut c = Raw::connect(port2);
    c.reply();
    c.send("EHLO client.example.org");
    assert_eq!(c.send("MAIL FROM:<a@example.org>"), "250 2.1.0 Ok\r\n");
    assert!(c.send("RCPT TO:<u@example.com>").starts_with("451 4.7.1"), "greylisted without asking the next hop");
    // ... and a recipient that passes gets a tempfail.
    let dir3 = tempfile::tempdir().unwrap();
    let (_d3, port3) = start(dir3.path(), "[filter.config]\nwhitelist_clients = [\"127.0.0.0/8\"]\n", dead, "");
    let mut c = Raw::connect(port3);
    c.reply();
    c.send("EHLO client.example.org");
    assert_eq!(c.send("MAIL FROM:<a@example.org>"), "250 2.1.0 Ok\r\n");
    assert!(c.send("RCPT TO:<u@example.com>").starts_with("451 4.4.1"));
}

#[test]
fn starttls_with_a_configured_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start();
    let tls = self_signed_tls(dir.path());
    let (_d, port) = start(dir.path(), "[filter.config]\nwhitelist_clients = [\"127.0.0.0/8\"]\n", sink.port, &tls);
    let out = python(&format!(
        r#"
import smtplib, ssl
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
s = smtplib.SMTP('127.0.0.1', {port}, timeout=10)
s.ehlo('client.example.org')
print('offered', s.has_extn('starttls'))
print('starttls', s.starttls(context=ctx)[0])
s.ehlo('client.example.org')
print('after', s.has_extn('starttls'), s.has_extn('greylist'))
s.sendmail('a@example.org', ['u@example.com'], 'Subject: tls\r\n\r\nsecret\r\n')
s.quit()
print('sent')
"#
    ));
    assert_eq!(out.trim(), "offered True\nstarttls 220\nafter False True\nsent", "{out}");
    assert!(sink.received()[0].contains("secret"));
    // Pipelining after STARTTLS is refused (CVE-2011-0411).
    let mut c = Raw::connect(port);
    c.reply();
    c.send("EHLO x.example.org");
    c.w.write_all(b"STARTTLS\r\nRSET\r\n").unwrap();
    assert!(c.reply().starts_with("501 5.5.1"));
}

/// A renewed certificate is served from the next handshake on, without a
/// restart or reload: found as an operator meets it, certbot's layout
/// (`live/` names are symlinks into `archive/`, a renewal writes new files
/// and moves the links) with the old certificate served until it expired.
/// Half a renewal (the new certificate, the old key) keeps the pair in use.
#[test]
fn a_renewed_certificate_is_served_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (live, archive) = (dir.path().join("live"), dir.path().join("archive"));
    std::fs::create_dir_all(&live).unwrap();
    std::fs::create_dir_all(&archive).unwrap();
    // Writes pair `n`, expiring at `not_after`, into archive/ and returns
    // its certificate's DER (hex).
    let issue = |n: u32, not_after: time::OffsetDateTime| {
        let mut params = rcgen::CertificateParams::new(vec![format!("mx{n}.greyhook.test")]).unwrap();
        params.not_after = not_after;
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(archive.join(format!("fullchain{n}.pem")), cert.pem()).unwrap();
        std::fs::write(archive.join(format!("privkey{n}.pem")), key.serialize_pem()).unwrap();
        cert.der().iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let (in_2040, soon) = (rcgen::date_time_ymd(2040, 1, 1), time::OffsetDateTime::now_utc() + time::Duration::hours(9 * 24 + 12));
    let point = |name: &str, n: u32| {
        let link = live.join(format!("{name}.pem"));
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(archive.join(format!("{name}{n}.pem")), &link).unwrap();
    };
    let first = issue(1, in_2040);
    point("fullchain", 1);
    point("privkey", 1);
    let sink = Sink::start();
    let tls = format!("tls_cert = \"{l}/fullchain.pem\"\ntls_key = \"{l}/privkey.pem\"\n", l = live.display());
    let metrics = free_port();
    let tables = format!("[filter.config]\nwhitelist_clients = [\"127.0.0.0/8\"]\n[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n");
    let (mut d, port) = start(dir.path(), &tables, sink.port, &tls);
    d.wait_listening(metrics, 30);
    // A page of the metrics listener.
    let get = |path: &str| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", metrics)).unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut s, &mut text).unwrap();
        text
    };
    // When the certificate served expires, for an operator's alert.
    let expiry = || {
        let text = get("/metrics");
        let line = text.lines().find(|l| l.starts_with("greyhook_tls_certificate_expiry_timestamp_seconds{role=\"smtp\"} "));
        line.and_then(|l| l.rsplit(' ').next()?.parse::<i64>().ok()).unwrap_or_else(|| panic!("no expiry gauge:\n{text}"))
    };
    assert_eq!(expiry(), in_2040.unix_timestamp());
    // The certificate a client is shown after STARTTLS.
    let shown = || {
        python(&format!(
            r#"
import smtplib, ssl
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
s = smtplib.SMTP('127.0.0.1', {port}, timeout=10)
s.starttls(context=ctx)
print(s.sock.getpeercert(binary_form=True).hex())
s.quit()
"#
        ))
        .trim()
        .to_string()
    };
    assert_eq!(shown(), first);
    // A renewal that brings a certificate close to its end: served, and
    // the log says so.
    let second = issue(2, soon);
    point("fullchain", 2);
    point("privkey", 2);
    assert_eq!(shown(), second, "the renewed certificate");
    assert!(d.wait_log("the changed certificate is served from now on", 5), "{}", d.log_text());
    assert!(d.wait_log("fullchain.pem: the certificate expires in 9 day(s)", 5), "{}", d.log_text());
    assert_eq!(expiry(), soon.unix_timestamp());
    // `greyhook status` and the status page say so too.
    let status = greyhook_status(&dir.path().join("control.sock"), false);
    let line = format!("certificate smtp: {}/fullchain.pem expires ", live.display());
    assert!(status.lines().any(|l| l.starts_with(&line) && l.ends_with(" (9 days left)")), "{status}");
    let html = get("/");
    assert!(html.contains("<h2>Certificates</h2>") && html.contains("<td class=\"bad\">9</td>"), "{html}");
    let third = issue(3, in_2040);
    point("fullchain", 3);
    assert_eq!(shown(), second, "a certificate without its key is not served");
    assert!(d.wait_log("is not the private key of the certificate", 5), "{}", d.log_text());
    point("privkey", 3);
    assert_eq!(shown(), third, "the pair is whole again");
}

#[test]
fn lmtp_next_hop_answers_per_recipient() {
    let dir = tempfile::tempdir().unwrap();
    let white = "[filter.config]\nwhitelist_clients = [\"127.0.0.0/8\"]\n";
    let ok = Sink::spawn(vec!["250 2.0.0 Ok: delivered"]);
    let (_d, port) = start(dir.path(), white, ok.port, "next_hop_protocol = \"lmtp\"\n");
    let dir2 = tempfile::tempdir().unwrap();
    let mixed = Sink::spawn(vec!["250 2.0.0 Ok: delivered", "452 4.2.2 Mailbox full"]);
    let (_d2, port2) = start(dir2.path(), white, mixed.port, "next_hop_protocol = \"lmtp\"\n");
    let deliver = |port: u16| Raw::at_data(port, &["u1@example.com", "u2@example.com"]).send("Subject: x\r\n\r\nbody\r\n.");
    assert_eq!(deliver(port), "250 2.0.0 Ok: delivered\r\n", "one reply per recipient read, all good");
    assert_eq!(deliver(port2), "452 4.2.2 Mailbox full\r\n", "a refusal among them is passed on");
}

/// LMTP to a server on a unix socket, as Dovecot's usually is
/// (`next_hop = "unix:/path"`): one reply per recipient read after the
/// data, a refusal among them passed on, in one session and the next.
#[test]
fn lmtp_next_hop_on_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("lmtp.sock");
    let sink = Sink::spawn_unix(&sock, vec!["250 2.0.0 Ok: delivered", "452 4.2.2 Mailbox full"]);
    let port = free_port();
    let text = format!(
        "[control]\nsocket = \"{d}/control.sock\"\n[store]\npath = \"memory\"\n\
         [smtp]\nlisten = [\"127.0.0.1:{port}\"]\nnext_hop = \"unix:{s}\"\nnext_hop_protocol = \"lmtp\"\n\
         hostname = \"greyhook.test\"\nnext_hop_timeout = \"5s\"\n\
         [filter.config]\nwhitelist_clients = [\"127.0.0.0/8\"]\n",
        d = dir.path().display(),
        s = sock.display()
    );
    let mut d = greyhook_with(dir.path(), "smtp", &text);
    wait_for_port(port, 30);
    for i in 0..2 {
        let mut c = Raw::at_data(port, &["u1@example.com", "u2@example.com"]);
        assert_eq!(c.send(&format!("Subject: {i}\r\n\r\nbody\r\n.")), "452 4.2.2 Mailbox full\r\n", "{}", d.log_text());
        assert!(c.send("QUIT").starts_with("221"));
    }
    let got = sink.received();
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got[1].contains("Subject: 1") && got[1].contains("by greyhook.test (greyhook)"), "{}", got[1]);
    assert!(d.terminate(10), "{}", d.log_text());
}

/// Random sessions: fragments of real commands, garbage bytes, stray
/// CR/LF, dots, long runs, cut at random. Every reply line is an SMTP
/// reply, and the daemon still serves a clean session afterwards.
#[test]
fn random_sessions_get_well_formed_replies_and_leave_the_daemon_serving() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start();
    let (mut d, port) = start(dir.path(), GREYLIST, sink.port, "");
    let mut rng = Xorshift(0x9e37_79b9_7f4a_7c15);
    let mut next = move || rng.next_u64();
    let pieces: [&[u8]; 16] = [
        b"EHLO x.example.org\r\n",
        b"HELO \r\n",
        b"MAIL FROM:<a@example.org>\r\n",
        b"MAIL FROM:<>\r\n",
        b"RCPT TO:<u@example.com>\r\n",
        b"RCPT TO:<\r\n",
        b"DATA\r\n",
        b"Subject: x\r\n\r\nbody\r\n",
        b".\r\n",
        b"\n.\n",
        b"RSET\r\n",
        b"STARTTLS\r\n",
        b"\r\r\n\n",
        b"\x00\xff\x1b[31m",
        b"NOOP",
        b"QUIT\r\n",
    ];
    for round in 0..60 {
        let mut c = Raw::connect(port);
        c.w.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut blob = Vec::new();
        for _ in 0..(next() % 40) {
            match next() % 10 {
                0 => blob.extend((0..next() % 3000).map(|_| (next() & 0xff) as u8)),
                _ => blob.extend_from_slice(pieces[(next() % pieces.len() as u64) as usize]),
            }
        }
        let _ = c.w.write_all(&blob);
        let _ = c.w.shutdown(std::net::Shutdown::Write);
        // Bytes, not a String: a non-UTF-8 byte in a reply is exactly what
        // this must catch. A reset after the replies is a close, not a fault.
        let mut out = Vec::new();
        match std::io::Read::read_to_end(&mut c.r, &mut out) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("round {round}: {e}: greyhook neither answered to the end nor closed"),
        }
        assert!(out.starts_with(b"220 "), "round {round}: {:?}", String::from_utf8_lossy(&out));
        assert!(out.is_empty() || out.ends_with(b"\r\n"), "round {round}: a reply cut short");
        for line in out.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let ok = line.len() >= 5
                && line[..3].iter().all(u8::is_ascii_digit)
                && matches!(line[3], b' ' | b'-')
                && line.ends_with(b"\r")
                && line[..line.len() - 1].iter().all(|b| (32..127).contains(b));
            assert!(
                ok,
                "round {round}: not an SMTP reply line: {:?}\nafter {:?}",
                String::from_utf8_lossy(line),
                String::from_utf8_lossy(&blob)
            );
        }
    }
    let mut c = Raw::connect(port);
    assert!(c.reply().starts_with("220"));
    assert!(c.send("EHLO clean.example.org").starts_with("250-greyhook.test"));
    assert!(d.terminate(10), "{}", d.log_text());
}

/// A next hop that offers PIPELINING and XFORWARD (and CHUNKING, started
/// with [`PipeHop::chunking`]), counts connections, notes for every MAIL
/// whether the RCPT came in the same write and for every message whether it
/// came in one write, keeps every command and BDAT chunk, can refuse the
/// next chunk, and can be told to close each connection after its message
/// (as a next hop that times idle clients out does).
struct PipeHop {
    port: u16,
    s: std::sync::Arc<HopState>,
}

#[derive(Default)]
struct HopState {
    connections: std::sync::atomic::AtomicUsize,
    messages: std::sync::atomic::AtomicUsize,
    /// For each MAIL: (XFORWARD came before it in this transaction, RCPT was already in hand).
    mails: std::sync::Mutex<Vec<(bool, bool)>>,
    /// For each message: it arrived whole (our header, the body, the final
    /// dot or the whole chunk) in the first read after `354` or with its
    /// BDAT line, i.e. in one write.
    whole: std::sync::Mutex<Vec<bool>>,
    /// Every command line, in order.
    commands: std::sync::Mutex<Vec<String>>,
    /// Every command line, in order, with its connection's number.
    numbered: std::sync::Mutex<Vec<(usize, String)>>,
    /// The data of every BDAT chunk.
    chunks: std::sync::Mutex<Vec<Vec<u8>>>,
    /// Answer the next BDAT with `554`.
    refuse_next: std::sync::atomic::AtomicBool,
    close_after_data: std::sync::atomic::AtomicBool,
}

impl PipeHop {
    fn start() -> PipeHop {
        PipeHop::start_with(false)
    }

    /// A next hop that also offers CHUNKING (and answers DATA `503`) and
    /// DSN, as Postfix does.
    fn chunking() -> PipeHop {
        PipeHop::start_with(true)
    }

    fn start_with(chunking: bool) -> PipeHop {
        use std::io::{BufRead, Read};
        use std::sync::atomic::Ordering::SeqCst;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let hop = PipeHop { port: l.local_addr().unwrap().port(), s: Default::default() };
        let hs = hop.s.clone();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let n = hs.connections.fetch_add(1, SeqCst);
                let hs = hs.clone();
                std::thread::spawn(move || {
                    let mut w = c.try_clone().unwrap();
                    let mut r = std::io::BufReader::new(c);
                    let _ = w.write_all(b"220 hop ESMTP\r\n");
                    let mut line = String::new();
                    let mut xforward = false;
                    loop {
                        line.clear();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        hs.commands.lock().unwrap().push(line.trim_end().to_string());
                        hs.numbered.lock().unwrap().push((n, line.trim_end().to_string()));
                        let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
                        let reply: &[u8] = match verb.as_str() {
                            "EHLO" if chunking => {
                                b"250-hop\r\n250-PIPELINING\r\n250-CHUNKING\r\n250-DSN\r\n250-XFORWARD NAME ADDR PROTO HELO\r\n250 8BITMIME\r\n"
                            }
                            "EHLO" => b"250-hop\r\n250-PIPELINING\r\n250-XFORWARD NAME ADDR PROTO HELO\r\n250 8BITMIME\r\n",
                            "XFOR" => {
                                xforward = true;
                                b"250 2.0.0 Ok\r\n"
                            }
                            "MAIL" => {
                                hs.mails.lock().unwrap().push((xforward, r.buffer().starts_with(b"RCPT")));
                                b"250 2.1.0 Ok\r\n"
                            }
                            "RCPT" => b"250 2.1.5 Ok\r\n",
                            "RSET" => {
                                xforward = false;
                                b"250 2.0.0 Ok\r\n"
                            }
                            "DATA" if chunking => b"503 5.5.1 use BDAT\r\n",
                            "BDAT" if chunking => {
                                let size: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
                                assert!(line.trim_end().ends_with(" LAST"), "{line}");
                                hs.whole.lock().unwrap().push(r.buffer().len() == size);
                                let mut data = vec![0; size];
                                r.read_exact(&mut data).unwrap();
                                hs.chunks.lock().unwrap().push(data);
                                xforward = false;
                                if hs.refuse_next.swap(false, SeqCst) {
                                    b"554 5.7.1 no thanks\r\n"
                                } else {
                                    hs.messages.fetch_add(1, SeqCst);
                                    b"250 2.0.0 Ok: queued\r\n"
                                }
                            }
                            "DATA" => {
                                let _ = w.write_all(b"354 go\r\n");
                                let first = r.fill_buf().map(|b| b.starts_with(b"Received:") && b.ends_with(b"\r\n.\r\n"));
                                hs.whole.lock().unwrap().push(first.unwrap_or(false));
                                loop {
                                    line.clear();
                                    if r.read_line(&mut line).unwrap_or(0) == 0 || line == ".\r\n" {
                                        break;
                                    }
                                }
                                hs.messages.fetch_add(1, SeqCst);
                                xforward = false;
                                let _ = w.write_all(b"250 2.0.0 Ok: queued\r\n");
                                if hs.close_after_data.load(SeqCst) {
                                    let _ = w.write_all(b"421 4.4.2 hop closing idle connection\r\n");
                                    return;
                                }
                                continue;
                            }
                            "QUIT" => {
                                let _ = w.write_all(b"221 bye\r\n");
                                return;
                            }
                            _ => b"502 5.5.2 no\r\n",
                        };
                        let _ = w.write_all(reply);
                    }
                });
            }
        });
        hop
    }

    fn connections(&self) -> usize {
        self.s.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn messages(&self) -> usize {
        self.s.messages.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// `n` messages, each in its own SMTP session, from smtplib; `pause`
/// seconds between sessions.
fn send_sessions(port: u16, n: usize, pause: f64) {
    let out = python(&format!(
        "import smtplib, time\n\
         for i in range({n}):\n\
         \x20   s = smtplib.SMTP('127.0.0.1', {port}, timeout=10)\n\
         \x20   s.sendmail('a@sender.test', ['b%d@dest.test' % i], 'Subject: %d\\r\\n\\r\\nhi\\r\\n' % i)\n\
         \x20   s.quit()\n\
         \x20   time.sleep({pause})\n\
         print('sent')\n"
    ));
    assert_eq!(out.trim(), "sent");
}

/// Found by measuring: every session opened its own next-hop connection
/// (greeting, EHLO and QUIT each time) and sent XFORWARD, MAIL and RCPT
/// one round trip at a time. Now idle connections are pooled between
/// sessions and the envelope is pipelined to a next hop that offers it.
#[test]
fn next_hop_connections_are_reused_and_the_envelope_pipelined() {
    let dir = tempfile::tempdir().unwrap();
    let hop = PipeHop::start();
    let (_d, port) = start(dir.path(), "[filter.config]\ndelay = 0\n", hop.port, "next_hop_pool = 2\nnext_hop_idle = \"1s\"\n");
    send_sessions(port, 3, 0.0);
    assert_eq!(hop.messages(), 3, "{}", std::fs::read_to_string(dir.path().join("log")).unwrap_or_default());
    assert_eq!(hop.connections(), 1, "three sessions, one next-hop connection");
    let mails = hop.s.mails.lock().unwrap().clone();
    assert_eq!(mails, vec![(true, true); 3], "XFORWARD before every MAIL, RCPT in the same write");
    let whole = hop.s.whole.lock().unwrap().clone();
    assert_eq!(whole, vec![true; 3], "our Received: line, the message and the final dot in one write");

    // A kept connection the next hop closed is noticed: a new one is opened.
    hop.s.close_after_data.store(true, std::sync::atomic::Ordering::SeqCst);
    send_sessions(port, 2, 0.2);
    assert_eq!(hop.messages(), 5, "no message lost to a closed connection");
    assert_eq!(hop.connections(), 2, "the first kept connection carried one more message, then a new one");
    hop.s.close_after_data.store(false, std::sync::atomic::Ordering::SeqCst);

    // next_hop_idle: one idle longer is not used again.
    send_sessions(port, 1, 0.0);
    let before = hop.connections();
    std::thread::sleep(Duration::from_millis(1500));
    send_sessions(port, 1, 0.0);
    assert_eq!(hop.connections(), before + 1, "a connection idle past next_hop_idle is closed, not reused");
    assert_eq!(hop.messages(), 7);

    // next_hop_pool = 0: a connection per session, as before.
    let dir2 = tempfile::tempdir().unwrap();
    let hop2 = PipeHop::start();
    let (_d2, port2) = start(dir2.path(), "[filter.config]\ndelay = 0\n", hop2.port, "next_hop_pool = 0\n");
    send_sessions(port2, 2, 0.0);
    assert_eq!((hop2.messages(), hop2.connections()), (2, 2));
}

/// One message with `body` (lines without the final dot) from
/// a@sender.test to b@dest.test in a session of its own: the reply to
/// its final dot.
fn message_in_a_session(port: u16, body: &str) -> String {
    let mut c = Raw::connect(port);
    assert!(c.reply().starts_with("220"));
    assert!(c.send("EHLO client.example").starts_with("250"));
    assert!(c.send("MAIL FROM:<a@sender.test>").starts_with("250"));
    assert!(c.send("RCPT TO:<b@dest.test>").starts_with("250"));
    assert!(c.send("DATA").starts_with("354"));
    let r = c.send(&format!("{body}\r\n."));
    let _ = c.send("QUIT");
    r
}

/// A next hop without CHUNKING gets the message through DATA, dot-stuffed
/// again: greyhook keeps the content (the client's stuffing undone) and
/// stuffs it as it writes, a slice at a time, in several writes when many
/// lines start with a dot. A line that is a lone dot in the content never
/// ends the data at the next hop; the next hop reads the content back
/// exactly.
#[test]
fn a_next_hop_without_chunking_gets_the_data_dot_stuffed() {
    let sink = Sink::start();
    let dir = tempfile::tempdir().unwrap();
    let (_d, port) = start(dir.path(), "[filter.config]\ndelay = 0\n", sink.port, "");
    let send = |body: &str| message_in_a_session(port, body);
    let r = send("..Subject: dots\r\n\r\n..leading dot\r\n...two\r\n..\r\nplain\r\nQUIT");
    assert!(r.starts_with("250 2.0.0 Ok: queued"), "{r}");
    // More lines starting with a dot than one write takes pieces.
    let many: Vec<String> = (0..1500).map(|i| format!("..{i}")).collect();
    let r = send(&many.join("\r\n"));
    assert!(r.starts_with("250 2.0.0 Ok: queued"), "{r}");
    let got = sink.received();
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got[0].ends_with("\r\n.Subject: dots\r\n\r\n.leading dot\r\n..two\r\n.\r\nplain\r\nQUIT\r\n"), "{:?}", got[0]);
    let want: String = (0..1500).map(|i| format!(".{i}\r\n")).collect();
    assert!(got[1].ends_with(&format!("\r\n{want}")), "{:?}", &got[1][got[1].len().saturating_sub(200)..]);
}

/// A next hop that offers CHUNKING gets the message as `BDAT <size> LAST`
/// in the same write as its data (no `354` round trip), the client's
/// dot-stuffing undone and the size exact; a refused chunk is followed by
/// RSET before the connection serves another session.
#[test]
fn a_chunking_next_hop_gets_bdat_in_one_write() {
    use std::sync::atomic::Ordering::SeqCst;
    let hop = PipeHop::chunking();
    let dir = tempfile::tempdir().unwrap();
    let (_d, port) = start(dir.path(), "[filter.config]\ndelay = 0\n", hop.port, "next_hop_pool = 2\n");
    let send = |body: &str| message_in_a_session(port, body);
    let r = send("Subject: dots\r\n\r\n..leading dot\r\n...two\r\nplain");
    assert!(r.starts_with("250 2.0.0 Ok: queued"), "{r}");
    assert_eq!(hop.s.whole.lock().unwrap().clone(), vec![true], "BDAT and its data in one write");
    let text = String::from_utf8(hop.s.chunks.lock().unwrap()[0].clone()).unwrap();
    assert!(text.starts_with("Received: from client.example"), "{text}");
    assert!(text.ends_with("Subject: dots\r\n\r\n.leading dot\r\n..two\r\nplain\r\n"), "unstuffed, CRLF-ended: {text:?}");
    // A refused chunk: the client hears the refusal; the connection is reset
    // before the next session uses it.
    hop.s.refuse_next.store(true, SeqCst);
    let r = send("Subject: no\r\n\r\nx");
    assert!(r.starts_with("554 5.7.1 no thanks"), "{r}");
    let r = send("Subject: again\r\n\r\ny");
    assert!(r.starts_with("250"), "{r}");
    // No line starts with a dot: sent as the client's data are, size exact.
    let last = String::from_utf8(hop.s.chunks.lock().unwrap().last().unwrap().clone()).unwrap();
    assert!(last.starts_with("Received: ") && last.ends_with("\r\nSubject: again\r\n\r\ny\r\n"), "{last:?}");
    let cmds = hop.s.commands.lock().unwrap().clone();
    assert!(!cmds.iter().any(|c| c == "DATA"), "{cmds:?}");
    // The refused chunk was the second; what its connection heard next
    // (found by connection: the third session may have taken another).
    let numbered = hop.s.numbered.lock().unwrap().clone();
    let refused = numbered.iter().enumerate().filter(|(_, (_, c))| c.starts_with("BDAT")).nth(1).unwrap().0;
    let conn = numbered[refused].0;
    let next = numbered[refused + 1..].iter().find(|(n, _)| *n == conn).map(|(_, c)| c.as_str());
    assert_eq!(next, Some("RSET"), "{numbered:?}");
}

/// Contracts 0.2.2 and 0.2.3 from outside: at its default stage the
/// reference filter asks greyhook not to call its connect, EHLO and MAIL
/// hooks, and its DATA hook for any sender but the null one, so a session
/// through `greyhook smtp` costs one filter call a RCPT and none before
/// it, a message with a sender none after it, and a bounce one at end of
/// DATA (where it is greylisted), as the daemon's own count (`greyhook
/// status`) shows, while the client still sees `GREYLIST` at EHLO, the 451
/// at RCPT and the bounce's 451 after the final dot.
#[test]
fn the_smtp_front_end_calls_only_the_hooks_the_filter_needs() {
    let sink = Sink::start();
    let dir = tempfile::tempdir().unwrap();
    let config = "[filter.config]\ndelay = 60\nwhitelist_recipients = [\"postmaster@\"]\n";
    let (_p, port) = start(dir.path(), config, sink.port, "");
    let control = dir.path().join("control.sock");
    let status = |json: bool| greyhook_status(&control, json);
    let text = status(false);
    assert!(text.contains("contract=0.2.3 skips=connect,ehlo,mail,data-with-sender calls=0 failures=0"), "{text}");
    let calls = || -> u64 {
        let json: serde_json::Value = serde_json::from_str(&status(true)).expect("status --json");
        json["filters"][0]["calls"].as_u64().expect("calls")
    };

    let mut c = Raw::connect(port);
    assert!(c.reply().starts_with("220"));
    let ehlo = c.send("EHLO client.example.org");
    assert!(ehlo.lines().any(|l| l.get(4..) == Some("GREYLIST")), "the keyword it gave for skipped EHLOs: {ehlo}");
    assert!(c.send("MAIL FROM:<a@example.org>").starts_with("250"));
    for r in ["b@example.com", "c@example.com"] {
        let reply = c.send(&format!("RCPT TO:<{r}>"));
        assert!(reply.starts_with("451") && reply.contains("retry="), "{reply}");
    }
    // A recipient it does not greylist: the message is relayed, and
    // nobody asks the filter about it at end of DATA.
    assert!(c.send("RCPT TO:<postmaster@example.com>").starts_with("250"));
    assert!(c.send("DATA").starts_with("354"));
    let r = c.send("Subject: with a sender\r\nMessage-ID: <1@example.org>\r\n\r\nbody\r\n.");
    assert!(r.starts_with("250"), "{r}");
    assert_eq!(calls(), 3, "one call a RCPT, none at connect, EHLO, MAIL or DATA");

    // A bounce: passed at RCPT, greylisted after the final dot, where the
    // DATA hook is called for it.
    assert!(c.send("MAIL FROM:<>").starts_with("250"));
    assert!(c.send("RCPT TO:<d@example.com>").starts_with("250"));
    assert!(c.send("DATA").starts_with("354"));
    let r = c.send("Subject: a bounce\r\nMessage-ID: <2@example.org>\r\n\r\nbody\r\n.");
    assert!(r.starts_with("451") && r.contains("retry="), "{r}");
    assert!(c.send("QUIT").starts_with("221"));
    assert_eq!(sink.received().len(), 1, "the message with a sender, not the bounce");

    let json: serde_json::Value = serde_json::from_str(&status(true)).expect("status --json");
    let f = &json["filters"][0];
    assert_eq!(f["skipped_hooks"], serde_json::json!(["connect", "ehlo", "mail", "data-with-sender"]), "{json}");
    assert_eq!(f["calls"].as_u64(), Some(5), "the bounce's RCPT and DATA: {json}");
}

/// SMTPUTF8 (RFC 6531), found by sending mail to an internationalised
/// address through `greyhook smtp`: it was not offered, so a sending MTA
/// bounced such mail (Postfix: "SMTPUTF8 is required, but was not offered
/// by host"), and `MAIL FROM:<…> SMTPUTF8` heard `555`. Now it is offered
/// and passed on (`postfix::greyhook_smtp_relays_smtputf8_mail_to_postfix`);
/// a next hop that does not offer it makes the transaction's recipients
/// wait (`451 4.6.7`) instead of losing the mail; the parameter takes no
/// value; and with `smtputf8 = false` it is neither offered nor taken.
#[test]
fn smtputf8_is_offered_and_asked_of_the_next_hop() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start();
    let (_d, port) = start(dir.path(), "[filter.config]\ndelay = 0\n", sink.port, "");
    let mut c = Raw::connect(port);
    assert!(c.reply().starts_with("220"));
    let ehlo = c.send("EHLO client.example");
    assert!(ehlo.contains("250-SMTPUTF8\r\n"), "{ehlo}");
    assert!(c.send("MAIL FROM:<jörg@exämple.org> SMTPUTF8").starts_with("250 "));
    // The sink offers no SMTPUTF8.
    let r = c.send("RCPT TO:<müller@dest.test>");
    assert!(r.starts_with("451 4.6.7 SMTPUTF8 not available at the next hop"), "{r}");
    assert!(c.send("RSET").starts_with("250"));
    let r = c.send("MAIL FROM:<a@example.org> SMTPUTF8=yes");
    assert!(r.starts_with("555 5.5.4"), "{r}");
    // A transaction without it still goes through.
    assert!(c.send("MAIL FROM:<a@example.org>").starts_with("250"));
    assert!(c.send("RCPT TO:<b@dest.test>").starts_with("250"));
    assert!(c.send("DATA").starts_with("354"));
    assert!(c.send("Subject: plain\r\n\r\nx\r\n.").starts_with("250"));
    assert_eq!(sink.received().len(), 1);

    let dir = tempfile::tempdir().unwrap();
    let (_d, port) = start(dir.path(), "[filter.config]\ndelay = 0\n", sink.port, "smtputf8 = false");
    let mut c = Raw::connect(port);
    assert!(c.reply().starts_with("220"));
    let ehlo = c.send("EHLO client.example");
    assert!(!ehlo.contains("SMTPUTF8"), "{ehlo}");
    let r = c.send("MAIL FROM:<jörg@exämple.org> SMTPUTF8");
    assert!(r.starts_with("555 5.5.4"), "{r}");
}

/// A PROXY protocol version 2 header for a TCP client at `src` (IPv4 or
/// IPv6) connecting to port 25, as HAProxy's `send-proxy-v2` sends it.
fn proxy_v2(src: std::net::SocketAddr) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    match src {
        std::net::SocketAddr::V4(a) => {
            h.extend([0x21, 0x11, 0, 12]);
            h.extend(a.ip().octets());
            h.extend([127, 0, 0, 1]);
        }
        std::net::SocketAddr::V6(a) => {
            h.extend([0x21, 0x21, 0, 36]);
            h.extend(a.ip().octets());
            h.extend(std::net::Ipv6Addr::LOCALHOST.octets());
        }
    }
    h.extend(src.port().to_be_bytes());
    h.extend(25u16.to_be_bytes());
    h
}

/// One message through `c`, whose greeting has been read: accepted.
fn one_message(c: &mut Raw, rcpt: &str) {
    assert!(c.send("EHLO client.example.org").starts_with("250"));
    assert_eq!(c.send("MAIL FROM:<a@sender.test>"), "250 2.1.0 Ok\r\n");
    assert_eq!(c.send(&format!("RCPT TO:<{rcpt}>")), "250 2.1.5 Ok\r\n");
    assert!(c.send("DATA").starts_with("354"));
    assert!(c.send("Subject: hi\r\n\r\nhi\r\n.").starts_with("250"));
    assert!(c.send("QUIT").starts_with("221"));
}

/// Behind a TCP load balancer every client came from the balancer's
/// address: one greylisting identity and one per-client limit for the
/// whole Internet. With `proxy_protocol` the header the balancer sends
/// (version 1 or 2) names the client, which the filter, the per-client
/// limit and the `Received:` line then see; a connection without a valid
/// header, too slow with it, or from a peer not in `proxy_trusted` is
/// closed unanswered, and each is counted.
#[test]
fn behind_a_load_balancer_the_proxy_header_names_the_client() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start();
    let metrics = free_port();
    let (d, port) = start(
        dir.path(),
        &format!("[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n[filter.config]\ndelay = 0\nauto_whitelist_after = 0\n"),
        sink.port,
        "proxy_protocol = true\nproxy_timeout = \"1s\"\nproxy_trusted = [\"127.0.0.1/32\", \"127.254.0.0/16\"]\n\
         max_connections_per_client = 1\n",
    );

    // Version 1, then version 2 with an IPv6 client.
    let mut c = Raw::connect(port);
    c.w.write_all(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n").unwrap();
    assert!(c.reply().starts_with("220 greyhook.test"));
    one_message(&mut c, "b1@dest.test");
    let mut c = Raw::connect(port);
    c.w.write_all(&proxy_v2("[2001:db8::7]:40001".parse().unwrap())).unwrap();
    assert!(c.reply().starts_with("220 greyhook.test"));
    one_message(&mut c, "b2@dest.test");
    let got = sink.received();
    assert_eq!(got.len(), 2, "{}", d.log_text());
    assert!(got[0].contains(" [192.0.2.7])"), "{}", got[0]);
    assert!(got[1].contains(" [IPv6:2001:db8::7])"), "{}", got[1]);
    for client in ["client=192.0.2.7 ", "client=2001:db8::7 "] {
        assert!(d.wait_log(client, 5), "the filter saw {client}:\n{}", d.log_text());
    }
    assert!(!d.log_text().contains("client=127.0.0.1 "), "the balancer's address is nobody's identity:\n{}", d.log_text());

    // The per-client limit counts the real client, not the balancer.
    let proxied = |from: &str| {
        let mut c = Raw::connect(port);
        c.w.write_all(format!("PROXY TCP4 {from} 127.0.0.1 40000 25\r\n").as_bytes()).unwrap();
        let r = c.reply();
        (c, r)
    };
    let (_held, r) = proxied("192.0.2.9");
    assert!(r.starts_with("220"), "{r:?}");
    let (_c, r) = proxied("192.0.2.9");
    assert!(r.starts_with("421 4.7.0"), "a second from 192.0.2.9 is over its limit of 1: {r:?}");
    let (_c, r) = proxied("192.0.2.10");
    assert!(r.starts_with("220"), "another client is not: {r:?}");

    // No header: SMTP at once, nothing at all, or a peer not trusted to
    // send one (with a valid header).
    let mut c = Raw::connect(port);
    assert_eq!(c.send("EHLO client.example.org"), "", "no reply without a header");
    assert!(c.closed());
    let mut silent = Raw::connect(port);
    let t = std::time::Instant::now();
    assert!(silent.closed(), "closed after proxy_timeout");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let mut c = Raw::over(connect_from("127.0.0.5", port));
    c.w.write_all(b"PROXY TCP4 192.0.2.11 127.0.0.1 40000 25\r\n").unwrap();
    assert_eq!(c.reply(), "", "127.0.0.5 is not in proxy_trusted");
    assert!(c.closed());
    assert!(!d.log_text().contains("client=192.0.2.11 "));

    let scrape = http_get(metrics, "/metrics");
    for reason in ["untrusted", "malformed", "timeout"] {
        let series = format!("greyhook_proxy_refusals_total{{front_end=\"smtp\",reason=\"{reason}\"}} 1");
        assert!(scrape.lines().any(|l| l == series), "{series} in\n{scrape}");
    }
}

/// The same through a real HAProxy, with `send-proxy-v2` and `send-proxy`
/// (version 1): Python's smtplib connects from 127.0.0.77 and 127.0.0.78 to
/// HAProxy, which connects to greyhook from 127.0.0.1; the filter and the
/// next hop see the clients.
#[test]
fn through_haproxy_greyhook_sees_the_clients() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start();
    let (d, port) = start(dir.path(), "[filter.config]\ndelay = 0\n", sink.port, "proxy_protocol = true\n");
    let (v2, v1) = (free_port(), free_port());
    let cfg = dir.path().join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 100\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             listen v2\n  bind 127.0.0.1:{v2}\n  server greyhook 127.0.0.1:{port} send-proxy-v2\n\
             listen v1\n  bind 127.0.0.1:{v1}\n  server greyhook 127.0.0.1:{port} send-proxy\n"
        ),
    )
    .unwrap();
    let haproxy = ["/usr/sbin/haproxy", "/usr/local/sbin/haproxy"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("HAProxy is installed (.ci/run installs Debian's haproxy)");
    let mut lb = std::process::Command::new(haproxy)
        .args(["-db", "-f", cfg.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("haproxy.log")).unwrap())
        .spawn()
        .unwrap();
    wait_for_port(v2, 10);
    wait_for_port(v1, 10);
    let out = python(&format!(
        "import smtplib\n\
         for port, src in (({v2}, '127.0.0.77'), ({v1}, '127.0.0.78')):\n\
         \x20   s = smtplib.SMTP('127.0.0.1', port, timeout=10, source_address=(src, 0))\n\
         \x20   s.sendmail('a@sender.test', ['b@dest.test'], 'Subject: via %d\\r\\n\\r\\nhi\\r\\n' % port)\n\
         \x20   s.quit()\n\
         print('sent')\n"
    ));
    let _ = lb.kill();
    let _ = lb.wait();
    assert_eq!(out.trim(), "sent", "{}", d.log_text());
    let got = sink.received();
    assert_eq!(got.len(), 2);
    assert!(got[0].contains("[127.0.0.77]") && got[0].contains(&format!("via {v2}")), "{}", got[0]);
    assert!(got[1].contains("[127.0.0.78]") && got[1].contains(&format!("via {v1}")), "{}", got[1]);
    for client in ["client=127.0.0.77 ", "client=127.0.0.78 "] {
        assert!(d.wait_log(client, 5), "the filter saw {client}:\n{}", d.log_text());
    }
}

/// Delivery status notifications (RFC 3461) pass through: `DSN` is
/// offered, `RET`, `ENVID`, `NOTIFY` and `ORCPT` are checked and passed to a
/// next hop that offers DSN, and left out (the message still relayed) for
/// one that does not. Before, the parameters heard `555`, so a sender asking
/// for a success notice got "relayed" from its own MTA instead of the
/// final hop's "delivered".
#[test]
fn dsn_parameters_are_checked_and_passed_on() {
    let dir = tempfile::tempdir().unwrap();
    let hop = PipeHop::chunking();
    let (d, port) = start(dir.path(), "[filter.config]\ndelay = 0\n", hop.port, "");
    let send = |port: u16, rcpts: &[&str]| {
        python(&format!(
            "import smtplib\n\
             s = smtplib.SMTP('127.0.0.1', {port}, timeout=10)\n\
             s.ehlo()\n\
             print('offered' if s.has_extn('dsn') else 'not offered')\n\
             print(s.sendmail('a@sender.test', {rcpts:?}, 'Subject: dsn\\r\\n\\r\\nhi\\r\\n', \
             mail_options=['RET=HDRS', 'ENVID=QQ+2B314159'], rcpt_options=['NOTIFY=SUCCESS,FAILURE', 'ORCPT=rfc822;b+2B1@dest.test']))\n\
             s.quit()\n"
        ))
    };
    let out = send(port, &["b1@dest.test", "b2@dest.test"]);
    assert_eq!(out.trim(), "offered\n{}", "{}", d.log_text());
    let commands = hop.s.commands.lock().unwrap().clone();
    let mail = commands.iter().find(|c| c.starts_with("MAIL")).unwrap();
    assert_eq!(mail, "MAIL FROM:<a@sender.test> RET=HDRS ENVID=QQ+2B314159", "{commands:?}");
    let rcpts: Vec<_> = commands.iter().filter(|c| c.starts_with("RCPT")).collect();
    assert_eq!(
        rcpts,
        [
            "RCPT TO:<b1@dest.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b+2B1@dest.test",
            "RCPT TO:<b2@dest.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b+2B1@dest.test"
        ],
        "the first pipelined with MAIL, the second on its own"
    );

    // Checked as RFC 3461 says; a bad one counts as an error.
    let mut c = Raw::connect(port);
    assert!(c.reply().starts_with("220"));
    assert!(c.send("EHLO client.example.org").contains("250-DSN\r\n"));
    assert!(c.send("MAIL FROM:<a@sender.test> RET=ALL").starts_with("501 5.5.4 Bad RET"));
    assert!(c.send("MAIL FROM:<a@sender.test> RET=FULL RET=HDRS").starts_with("501 5.5.4 Duplicate RET"));
    assert!(c.send(&format!("MAIL FROM:<a@sender.test> ENVID={}", "x".repeat(101))).starts_with("501 5.5.4 Bad ENVID"));
    assert!(c.send("MAIL FROM:<a@sender.test> ENVID=a=b").starts_with("501 5.5.4 Bad ENVID"));
    assert_eq!(c.send("MAIL FROM:<a@sender.test> ret=full envid=X"), "250 2.1.0 Ok\r\n");
    assert!(c.send("RCPT TO:<c@dest.test> NOTIFY=NEVER,SUCCESS").starts_with("501 5.5.4 Bad NOTIFY"));
    assert!(c.send("RCPT TO:<c@dest.test> ORCPT=rfc822").starts_with("501 5.5.4 Bad ORCPT"));
    assert!(c.send("RCPT TO:<c@dest.test> NOTIFY=DELAY NOTIFY=DELAY").starts_with("501 5.5.4 Duplicate NOTIFY"));
    assert!(c.send("RCPT TO:<c@dest.test> FOO=1").starts_with("555 5.5.4"));
    assert_eq!(c.send("RCPT TO:<c@dest.test> notify=never"), "250 2.1.5 Ok\r\n");
    assert!(c.send("QUIT").starts_with("221"));
    let commands = hop.s.commands.lock().unwrap().clone();
    assert!(commands.iter().any(|c| c == "MAIL FROM:<a@sender.test> RET=FULL ENVID=X"), "{commands:?}");
    assert!(commands.iter().any(|c| c == "RCPT TO:<c@dest.test> NOTIFY=NEVER"), "{commands:?}");

    // A next hop without DSN: the message goes on without the parameters.
    let dir2 = tempfile::tempdir().unwrap();
    let plain = PipeHop::start();
    let (d2, port2) = start(dir2.path(), "[filter.config]\ndelay = 0\n", plain.port, "");
    send_sessions(port2, 1, 0.0);
    assert!(!d2.log_text().contains("DSN"), "no DSN asked, none missed (SIZE left out is not DSN):\n{}", d2.log_text());
    assert_eq!(send(port2, &["b3@dest.test", "b4@dest.test"]).trim(), "offered\n{}");
    assert_eq!(plain.messages(), 2);
    let commands = plain.s.commands.lock().unwrap().clone();
    assert!(commands.iter().any(|c| c == "MAIL FROM:<a@sender.test>"), "{commands:?}");
    assert!(commands.iter().any(|c| c == "RCPT TO:<b3@dest.test>") && commands.iter().any(|c| c == "RCPT TO:<b4@dest.test>"));
    assert!(d2.wait_log("the next hop does not offer DSN", 5), "{}", d2.log_text());
    // Asked at RCPT only, it is said too.
    let dir4 = tempfile::tempdir().unwrap();
    let (d4, port4) = start(dir4.path(), "[filter.config]\ndelay = 0\n", plain.port, "");
    let mut c = Raw::connect(port4);
    assert!(c.reply().starts_with("220"));
    assert!(c.send("EHLO client.example.org").starts_with("250"));
    assert_eq!(c.send("MAIL FROM:<a@sender.test>"), "250 2.1.0 Ok\r\n");
    assert_eq!(c.send("RCPT TO:<b5@dest.test> NOTIFY=SUCCESS"), "250 2.1.5 Ok\r\n");
    assert!(c.send("QUIT").starts_with("221"));
    assert!(d4.wait_log("the next hop does not offer DSN", 5), "{}", d4.log_text());
    assert!(plain.s.commands.lock().unwrap().iter().any(|c| c == "RCPT TO:<b5@dest.test>"));

    // dsn = false: not offered, and the parameters are refused.
    let dir3 = tempfile::tempdir().unwrap();
    let (_d3, port3) = start(dir3.path(), "[filter.config]\ndelay = 0\n", plain.port, "dsn = false\n");
    let mut c = Raw::connect(port3);
    assert!(c.reply().starts_with("220"));
    assert!(!c.send("EHLO client.example.org").contains("DSN"));
    assert!(c.send("MAIL FROM:<a@sender.test> RET=FULL").starts_with("555"));
    assert_eq!(c.send("MAIL FROM:<a@sender.test>"), "250 2.1.0 Ok\r\n");
    assert!(c.send("RCPT TO:<c@dest.test> NOTIFY=SUCCESS").starts_with("555"));
}
