//! Filters in other languages, built in CI with the tools their authors
//! use and driven through `greyhook serve` as an operator would: a
//! JavaScript filter (componentize-js, from npm) and a Python one
//! (componentize-py, from PyPI). Such components are 12–18 MB and take
//! tens of seconds to compile: the log reports the compile, and a restart
//! (on the memory store) loads the compiled artifact from the cache.
//!
//! The tools are installed by `.ci/run` (`npm ci` in examples/filters/js,
//! a venv with componentize-py in examples/filters/python/.venv); without
//! them these tests fail, saying how to install them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use greyhook_tests::*;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/filters").canonicalize().unwrap()
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(out.status.success(), "{what} failed:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

/// Serves `wasm` on a policy port with a compiled-filter cache in `dir`:
/// the first attempt is deferred with the filter's retry hint, the retry
/// after a second passes, its metrics and the hooks it asked the host to
/// skip (`skips`) show in `greyhook status`; a
/// restart loads it from the cache instead of compiling.
fn drive(dir: &Path, wasm: &Path, name: &str, text: &str, skips: &str) {
    let start = |log: &str| {
        let port = free_port();
        let p = greyhook_with(
            dir,
            "serve",
            &format!(
                "[control]\nsocket = \"{d}/control.sock\"\n[store]\npath = \"memory\"\n[policy]\nlisten = [\"127.0.0.1:{port}\"]\n\
                 [filter]\npath = \"{w}\"\ncache_dir = \"{d}/cache\"\nmemory_mib = 64\n[filter.config]\ndelay = 1\n",
                d = dir.display(),
                w = wasm.display()
            ),
        );
        let mut p = p;
        p.wait_listening(port, 240);
        let _ = std::fs::copy(dir.join("log"), dir.join(log));
        (p, port)
    };
    let (mut d, port) = start("first.log");
    assert!(d.log_text().contains("compiling the filter") && d.log_text().contains("filter compiled in"), "{}", d.log_text());
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let first = policy_rcpt(&mut s, "192.0.2.1", "alice@example.org", "bob@example.com", "i1");
    assert!(first.starts_with(&format!("action=451 4.7.1 {text} retry=00:00:01")), "{first}\n{}", d.log_text());
    std::thread::sleep(Duration::from_millis(1100));
    let retry = policy_rcpt(&mut s, "192.0.2.1", "alice@example.org", "bob@example.com", "i2");
    assert!(retry.starts_with("action=DUNNO"), "{retry}\n{}", d.log_text());
    let status = greyhook_status(&dir.join("control.sock"), false);
    assert!(status.contains(&format!("{name} 0.1.0 namespace={name} contract=0.2.3 skips={skips} ")), "{status}");
    assert!(status.contains("greylisted{stage=\"first\"} 1") && status.contains("passed 1"), "{status}");
    assert!(d.terminate(20));
    // A restart on the memory store: the artifact comes from the cache.
    let (mut d, _) = start("second.log");
    assert!(d.log_text().contains("filter loaded from the compiled-filter cache"), "{}", d.log_text());
    assert!(!d.log_text().contains("compiling the filter"), "{}", d.log_text());
    assert!(d.terminate(20));
}

#[test]
fn a_javascript_filter_greylists_through_greyhook() {
    let tool = examples().join("js/node_modules/.bin/componentize-js");
    assert!(tool.exists(), "componentize-js is not installed: cd examples/filters/js && npm ci (as .ci/run does)");
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("js-greylist.wasm");
    run(
        Command::new(&tool)
            .arg(examples().join("js/filter.js"))
            .arg("--wit")
            .arg(examples().join("../../wit"))
            .args(["--world-name", "filter", "--disable", "http", "--disable", "fetch-event", "-o"])
            .arg(&wasm),
        "componentize-js",
    );
    drive(dir.path(), &wasm, "js-greylist", "Greylisted by a JavaScript filter", "connect,mail");
}

#[test]
fn a_python_filter_greylists_through_greyhook() {
    let tool = examples().join("python/.venv/bin/componentize-py");
    assert!(
        tool.exists(),
        "componentize-py is not installed: python3 -m venv examples/filters/python/.venv && \
         examples/filters/python/.venv/bin/pip install -r examples/filters/python/requirements.txt (as .ci/run does)"
    );
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("py-greylist.wasm");
    run(
        Command::new(&tool)
            .arg("-d")
            .arg(examples().join("../../wit"))
            .args(["-w", "filter", "componentize", "-p"])
            .arg(examples().join("python"))
            .args(["app", "-o"])
            .arg(&wasm),
        "componentize-py",
    );
    drive(dir.path(), &wasm, "py-greylist", "Greylisted by a Python filter", "connect,ehlo,mail,data");
}
