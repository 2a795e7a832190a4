//! Compiles the chaos filter (`tests/guests/chaos`, contract 0.1.0), the
//! walkthrough's SPF filter (`examples/filters/spf-domain`, 0.2.2 through
//! the SDK), a filter that keeps state with the SDK's arena on
//! (`tests/guests/stateful`) and one built against 0.2.0 as released
//! (`tests/guests/v020`) for the tests.
use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let workspace = manifest.parent().expect("tests/ is inside the workspace").to_path_buf();
    let wasm = wasm_build::build_component(
        &workspace,
        "chaos-guest",
        "chaos_guest.wasm",
        &["tests/guests/chaos/src", "tests/guests/chaos/Cargo.toml", "wit/v0.1"],
    );
    println!("cargo:rustc-env=GREYHOOK_CHAOS_FILTER={}", wasm.display());
    // The walkthrough's filter (docs/writing-filters.md), on the SDK.
    let wasm = wasm_build::build_component(
        &workspace,
        "spf-domain-filter",
        "spf_domain_filter.wasm",
        &[
            "examples/filters/spf-domain/src",
            "examples/filters/spf-domain/Cargo.toml",
            "sdk/rust/src",
            "sdk/rust/wit",
            "sdk/rust/Cargo.toml",
        ],
    );
    println!("cargo:rustc-env=GREYHOOK_SPF_DOMAIN_FILTER={}", wasm.display());
    // A filter that keeps state between calls with the SDK's arena on.
    let wasm = wasm_build::build_component(
        &workspace,
        "stateful-guest",
        "stateful_guest.wasm",
        &["tests/guests/stateful/src", "tests/guests/stateful/Cargo.toml", "sdk/rust/src", "sdk/rust/wit", "sdk/rust/Cargo.toml"],
    );
    println!("cargo:rustc-env=GREYHOOK_STATEFUL_FILTER={}", wasm.display());
    // A filter built against 0.2.0 as released (`wit/v0.2.0`).
    let wasm = wasm_build::build_component(
        &workspace,
        "v020-guest",
        "v020_guest.wasm",
        &["tests/guests/v020/src", "tests/guests/v020/Cargo.toml", "wit/v0.2.0"],
    );
    println!("cargo:rustc-env=GREYHOOK_V020_FILTER={}", wasm.display());
}
