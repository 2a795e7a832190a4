//! The `greyhook` command.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use greyhook::clock::{Clock, SystemClock};
use greyhook::store::{Durability, MemoryStore, RedbStore, Store};
use greyhook::{FilterOptions, Runtime, RuntimeConfig};

/// greyhook: greylisting for MTAs, with filters as WebAssembly components.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load and type-check a filter, run its init, and print its name,
    /// version and imports.
    Check {
        /// The filter (.wasm component); the embedded reference filter if omitted.
        filter: Option<PathBuf>,
        /// The filter's configuration (TOML).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override a key of the filter's configuration (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Replay a scripted SMTP session against a filter and print the replies
    /// as a client sees them.
    Simulate {
        /// The script (plain commands, or JSON events); `-` reads stdin.
        script: PathBuf,
        /// The filter (.wasm component); the embedded reference filter if omitted.
        #[arg(long)]
        filter: Option<PathBuf>,
        /// The filter's configuration (TOML).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override a key of the filter's configuration (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Unix time at which the script starts (default: now).
        #[arg(long)]
        start: Option<u64>,
        /// A redb file to use as the store (default: a fresh in-memory store).
        #[arg(long)]
        db: Option<PathBuf>,
    },
}

fn read(path: &Path) -> Result<Vec<u8>> {
    if path == Path::new("-") {
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut b)?;
        return Ok(b);
    }
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

fn filter_config(config: Option<&Path>, set: &[String]) -> Result<String> {
    let (text, origin) = match config {
        Some(p) => (String::from_utf8(read(p)?).with_context(|| format!("{} is not UTF-8", p.display()))?, p.display().to_string()),
        None => (String::new(), "--set".to_string()),
    };
    Ok(greyhook::config::merge_settings(&text, &origin, set)?)
}

fn filter_bytes(filter: Option<&Path>) -> Result<Vec<u8>> {
    match filter {
        Some(p) => read(p),
        None => Ok(greyhook::REFERENCE_FILTER.to_vec()),
    }
}

async fn run(cli: Cli) -> Result<()> {
    let runtime = Runtime::new(RuntimeConfig::default())?;
    match cli.command {
        Command::Check { filter, config, set } => {
            let name = filter.as_ref().map_or("the reference filter".to_string(), |p| p.display().to_string());
            let bytes = filter_bytes(filter.as_deref())?;
            let options = FilterOptions { config: filter_config(config.as_deref(), &set)?, ..FilterOptions::default() };
            let f = runtime.load(&bytes, options, Arc::new(MemoryStore::new())).await.with_context(|| format!("{name} is refused"))?;
            println!("ok: {name}");
            println!("name: {}", f.info().name);
            println!("version: {}", f.info().version);
            println!("world: greyhook:filter/filter@0.1.0");
            println!("imports:");
            for i in f.imports() {
                let note = if i.starts_with("greyhook:") { "" } else { "  (linked empty: no capability granted)" };
                println!("  {i}{note}");
            }
        }
        Command::Simulate { script, filter, config, set, start, db } => {
            let bytes = filter_bytes(filter.as_deref())?;
            let store: Arc<dyn Store> = match db {
                Some(p) => Arc::new(RedbStore::open(&p, Durability::Immediate)?),
                None => Arc::new(MemoryStore::new()),
            };
            let options = FilterOptions { config: filter_config(config.as_deref(), &set)?, ..FilterOptions::default() };
            let f = runtime.load(&bytes, options, store).await.context("the filter is refused")?;
            let text = String::from_utf8(read(&script)?).context("the script is not UTF-8")?;
            let events = greyhook::simulate::parse_script(&text)?;
            let start = start.unwrap_or_else(|| SystemClock.now());
            for line in greyhook::simulate::run(&f, &events, start).await? {
                println!("{line}");
            }
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("GREYHOOK_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("greyhook: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("greyhook: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
