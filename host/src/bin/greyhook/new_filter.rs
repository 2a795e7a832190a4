//! `greyhook new-filter NAME`: scaffolds a filter crate on the SDK
//! (`sdk/rust`, crate `greyhook-filter`) from the templates in
//! `sdk/rust/template/`, embedded here so the command works from an
//! installed binary.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

const CARGO_TOML: &str = include_str!("../../../../sdk/rust/template/Cargo.toml.tmpl");
const LIB_RS: &str = include_str!("../../../../sdk/rust/template/src/lib.rs.tmpl");
const README: &str = include_str!("../../../../sdk/rust/template/README.md.tmpl");
const GITIGNORE: &str = include_str!("../../../../sdk/rust/template/gitignore.tmpl");

/// Where this binary was built from: its SDK, if the source tree is still there.
fn built_sdk() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk/rust");
    p.join("Cargo.toml").exists().then(|| p.canonicalize().unwrap_or(p))
}

/// Whether `name` can be a filter's name, a crate name and a store
/// namespace: 1 to 64 lower-case letters, digits, `-` and `_`, starting
/// with a letter.
fn valid(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_lowercase()
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'_')
}

/// Creates `dir` (default `./NAME`) with the filter crate.
pub fn run(name: &str, dir: Option<PathBuf>, sdk: Option<PathBuf>) -> Result<()> {
    if !valid(name) {
        bail!("{name:?}: a filter name is 1 to 64 lower-case letters, digits, '-' and '_', starting with a letter");
    }
    let dir = dir.unwrap_or_else(|| PathBuf::from(name));
    if dir.exists() && std::fs::read_dir(&dir).map(|mut d| d.next().is_some()).unwrap_or(true) {
        bail!("{} exists and is not empty: choose another directory", dir.display());
    }
    let sdk = match sdk.or_else(built_sdk) {
        Some(p) => {
            let p = p.canonicalize().with_context(|| format!("the SDK at {}", p.display()))?;
            if !p.join("Cargo.toml").exists() || !p.join("wit/greyhook.wit").exists() {
                bail!("{} is not the greyhook-filter SDK (sdk/rust of the greyhook source)", p.display());
            }
            format!("{{ path = {:?} }}", p.display().to_string())
        }
        None => bail!("this greyhook was built from a source tree that is gone: pass --sdk PATH (sdk/rust of the greyhook source)"),
    };
    let krate = name.replace('-', "_");
    let fill = |t: &str| t.replace("{{name}}", name).replace("{{crate}}", &krate).replace("{{sdk}}", &sdk);
    std::fs::create_dir_all(dir.join("src")).with_context(|| format!("cannot create {}", dir.display()))?;
    for (file, text) in [("Cargo.toml", CARGO_TOML), ("src/lib.rs", LIB_RS), ("README.md", README), (".gitignore", GITIGNORE)] {
        std::fs::write(dir.join(file), fill(text)).with_context(|| format!("cannot write {}", dir.join(file).display()))?;
    }
    println!("created {} (filter {name:?}, on the SDK at {sdk})", dir.display());
    println!("next: cd {} && cargo test && cargo build --target wasm32-wasip2 --release", dir.display());
    println!("then: greyhook check target/wasm32-wasip2/release/{krate}.wasm");
    Ok(())
}
