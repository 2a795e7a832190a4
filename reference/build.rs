//! Compiles the reference filter (`guest/`) to `greylist.wasm` for
//! `wasm32-wasip2` (through `tools/wasm-build`), to be embedded.
use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let workspace = manifest.parent().expect("reference/ is inside the workspace").to_path_buf();
    let wasm = wasm_build::build_component(
        &workspace,
        "greylist-guest",
        "greylist_guest.wasm",
        &["guest/src", "guest/Cargo.toml", "types/src", "sdk/rust/src", "sdk/rust/wit", "sdk/rust/Cargo.toml"],
    );
    println!("cargo:rustc-env=GREYHOOK_REFERENCE_FILTER={}", wasm.display());
}
