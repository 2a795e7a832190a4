//! Compiles a guest crate of this workspace to a `wasm32-wasip2` component
//! from a build script.
//!
//! Cargo cannot build one crate for two targets in one invocation, so the
//! build scripts of `host` and `tests` run a nested `cargo build` with its own
//! target directory (`target/guests`, so the outer build's lock is not
//! contended) and the `wasm` profile of the workspace. Written by hand because
//! it is thirty lines and every crate that does this pulls a large tree.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The guests' code generation flags. `simd128` lets `memchr`, the
/// string searches of `core` and LLVM's vectoriser use Wasm SIMD, which
/// every Wasm engine greyhook targets compiles (wasmtime, V8 for jco).
const GUEST_RUSTFLAGS: &str = "-Ctarget-feature=+simd128";

/// Builds `package` (a member of the workspace rooted at `workspace`) for
/// `wasm32-wasip2` and returns the path of the component it produced.
///
/// Tells Cargo to rerun the calling build script when any of `watch` changes.
///
/// # Panics
/// Panics (failing the build with the compiler's message) when the nested
/// build fails; this runs only in build scripts, where that is the way to fail.
pub fn build_component(workspace: &Path, package: &str, artifact: &str, watch: &[&str]) -> PathBuf {
    for w in watch {
        println!("cargo:rerun-if-changed={}", workspace.join(w).display());
    }
    println!("cargo:rerun-if-changed={}", workspace.join("Cargo.lock").display());
    // The `wasm` profile lives in the workspace manifest.
    println!("cargo:rerun-if-changed={}", workspace.join("Cargo.toml").display());
    let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => PathBuf::from(d).join("guests"),
        None => workspace.join("target").join("guests"),
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args(["build", "--profile", "wasm", "--target", "wasm32-wasip2", "-p", package])
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer build's settings are for the host target, not the guest.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CLIPPY_ARGS",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_MAKEFLAGS",
        "__CARGO_FIX_PLZ",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("CARGO_ENCODED_RUSTFLAGS", GUEST_RUSTFLAGS);
    let status = cmd.status().expect("run cargo for the wasm32-wasip2 guest");
    assert!(
        status.success(),
        "building the {package} guest for wasm32-wasip2 failed (is the target installed? `rustup target add wasm32-wasip2`)"
    );
    let path = target_dir.join("wasm32-wasip2").join("wasm").join(artifact);
    assert!(path.exists(), "guest build produced no {}", path.display());
    path
}
