//! Compiles the chaos filter (`tests/guests/chaos`) for the tests.
use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let workspace = manifest.parent().expect("tests/ is inside the workspace").to_path_buf();
    let wasm = wasm_build::build_component(
        &workspace,
        "chaos-guest",
        "chaos_guest.wasm",
        &["tests/guests/chaos/src", "tests/guests/chaos/Cargo.toml", "wit"],
    );
    println!("cargo:rustc-env=GREYHOOK_CHAOS_FILTER={}", wasm.display());
}
