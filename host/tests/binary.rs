//! The binary starts and answers `--version` (this test also makes
//! `cargo test --workspace` build it for the integration tests in `tests/`).

#[test]
fn version() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_greyhook")).arg("--version").output().expect("greyhook runs");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("greyhook "));
}
