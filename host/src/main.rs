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
    /// Run the daemon: the Postfix policy service (127.0.0.1:10023 by
    /// default) with the reference filter and the embedded store, unless
    /// told otherwise.
    Serve {
        /// The configuration file (TOML; see docs/configuration.md).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Policy listener, replacing the file's (repeatable):
        /// `127.0.0.1:10023`, `[::1]:10023` or `unix:/path`.
        #[arg(long = "policy", value_name = "ADDR")]
        policy: Vec<String>,
        /// The store: a redb file, or `memory`.
        #[arg(long)]
        db: Option<String>,
        /// The filter component (.wasm).
        #[arg(long)]
        filter: Option<PathBuf>,
        /// Override a key of the filter's configuration (repeatable), e.g. `delay=2`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Log level or filter (`info`, `debug`, `info,greyhook::filter=debug`).
        #[arg(long)]
        log: Option<String>,
    },
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

/// Logs to stderr through a writer thread, so a decision line costs the
/// request path a channel send, not a write(2). Lines are never dropped
/// (the channel blocks when full); the guard flushes them at exit.
fn init_logging(default: &str) -> tracing_appender::non_blocking::WorkerGuard {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("GREYHOOK_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default().lossy(false).finish(std::io::stderr());
    // Only fails if a subscriber is already set, which nothing here does.
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(writer).try_init();
    guard
}

async fn serve(
    config: Option<PathBuf>,
    policy: Vec<String>,
    db: Option<String>,
    filter: Option<PathBuf>,
    set: Vec<String>,
    log: Option<String>,
) -> Result<()> {
    use greyhook::daemon::{Daemon, DaemonConfig};
    let mut cfg = match &config {
        Some(p) => DaemonConfig::load(p)?,
        None => DaemonConfig::default(),
    };
    if !policy.is_empty() {
        cfg.policy.listen = policy.iter().map(|p| p.parse()).collect::<Result<_, _>>()?;
    }
    if db.is_some() {
        cfg.store.path = db;
    }
    if filter.is_some() {
        cfg.filter.path = filter;
    }
    if let Some(l) = log {
        cfg.log.level = l;
    }
    cfg.set_filter_keys(&set)?;
    let _log = init_logging(&cfg.log.level);
    let daemon = Daemon::start(&cfg, Arc::new(SystemClock)).await?;
    let token = daemon.shutdown_token();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        token.cancel();
    });
    daemon.wait().await;
    Ok(())
}

async fn run(cli: Cli) -> Result<()> {
    if let Command::Serve { config, policy, db, filter, set, log } = cli.command {
        return serve(config, policy, db, filter, set, log).await;
    }
    let _log = init_logging("warn");
    let runtime = Runtime::new(RuntimeConfig::default())?;
    match cli.command {
        Command::Serve { .. } => unreachable!("handled above"),
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
