//! `policy-load` against a tiny policy server that answers what it is told.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::Command;

/// Serves `answer` to every request on every connection, until the test ends.
fn server(answer: &'static str) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut w = c.try_clone().unwrap();
                let mut line = String::new();
                let mut r = BufReader::new(c);
                loop {
                    line.clear();
                    match r.read_line(&mut line) {
                        Ok(0) | Err(_) => return,
                        Ok(_) if line == "\n" => {
                            if w.write_all(format!("action={answer}\n\n").as_bytes()).is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                    }
                }
            });
        }
    });
    port
}

fn run(port: u16, extra: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_policy-load"))
        .args(["--target", &format!("127.0.0.1:{port}"), "--connections", "2", "--requests", "50", "--timeout", "5"])
        .args(extra)
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn answers_are_counted_and_checked() {
    let port = server("DUNNO");
    let (ok, out) = run(port, &[]);
    assert!(ok && out.contains("requests=100 ") && out.contains("pass=100 ") && out.contains("errors=0"), "{out}");
    let (ok, out) = run(port, &["--expect", "DEFER", "--expect", "DUN"]);
    assert!(ok && out.contains("expect_counts=0,100"), "{out}");
    let (ok, out) = run(port, &["--expect", "451 "]);
    assert!(!ok && out.contains("other=100"), "{out}");
    let (ok, _) = run(port, &["--expect-defer"]);
    assert!(!ok, "a pass breaks the greylisting invariant");
}

#[test]
fn a_dead_server_is_an_error_and_a_deadline_ends_the_run() {
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (ok, out) = run(closed, &[]);
    assert!(!ok && out.contains("errors=100"), "{out}");
    let port = server("DUNNO");
    let out = Command::new(env!("CARGO_BIN_EXE_policy-load"))
        .args(["--target", &format!("127.0.0.1:{port}"), "--connections", "1", "--requests", "10000000", "--seconds", "0.5"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("errors=0"), "{text}");
}
