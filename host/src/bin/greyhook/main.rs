//! The `greyhook` command.

mod new_filter;
mod simulate;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, Result};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use greyhook::clock::{Clock, SystemClock};
use greyhook::store::{MemoryStore, Store};

/// greyhook: greylisting for MTAs, with filters as WebAssembly components.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where `greyhook db` finds the records.
#[derive(clap::Args, Clone)]
struct DbTarget {
    /// A store to open directly: a stopped daemon's redb file (a running
    /// daemon locks it), or `redis://…`. Default: the running daemon's
    /// store, through its control socket.
    #[arg(long)]
    db: Option<String>,
    /// The running daemon's control socket. Default: as `greyhook status`.
    #[arg(long)]
    control: Option<PathBuf>,
    /// The filter's store namespace. Default: `greylist` (the reference filter's).
    #[arg(long, default_value = "greylist")]
    namespace: String,
    #[command(flatten)]
    redis: RedisArgs,
}

/// How the `db` commands reach a Redis store named on the command line
/// (the `[store]` table's Redis keys, as flags).
#[derive(clap::Args, Clone)]
struct RedisArgs {
    /// Redis key prefix, with a `redis://` store.
    #[arg(long, default_value = "greyhook:")]
    prefix: String,
    /// With `rediss://`: the CA file the server's certificate must chain
    /// to (`[store] tls_ca`). Default: the system's roots.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// With `rediss://`: the client certificate to present (`[store]
    /// tls_cert`). Default: none.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// With `rediss://`: the client certificate's key (`[store] tls_key`).
    /// Default: none.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// With `redis+sentinel://`: the ACL user the sentinels require
    /// (`[store] sentinel_user`). Default: none.
    #[arg(long, requires = "sentinel_password")]
    sentinel_user: Option<String>,
    /// With `redis+sentinel://`: the password the sentinels require
    /// (`[store] sentinel_password`; the master's is the URL's). Better
    /// given in the environment, which `ps` does not show. Default: none.
    #[arg(long, env = "GREYHOOK_SENTINEL_PASSWORD", hide_env_values = true)]
    sentinel_password: Option<String>,
}

#[derive(Subcommand)]
enum DbCommand {
    /// List greylist records (readable triplets unless the filter runs
    /// with `privacy = true`); every option narrows.
    List {
        #[command(flatten)]
        target: DbTarget,
        /// A substring of the client identity (network, `spf:domain`…). Default: any.
        #[arg(long)]
        client: Option<String>,
        /// A substring of the sender. Default: any.
        #[arg(long)]
        sender: Option<String>,
        /// A substring of the recipient. Default: any.
        #[arg(long)]
        recipient: Option<String>,
        /// Only greylisted (not passed yet) or passed records. Default: both.
        #[arg(long, value_enum)]
        state: Option<greyhook::admin::State>,
        /// Only records first seen at least this long ago (`10m`, `2h`). Default: any age.
        #[arg(long, value_name = "DURATION")]
        older_than: Option<String>,
        /// Most records printed.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// List the whitelist entries (`greyhook db whitelist`) instead.
        /// Default: the greylist records.
        #[arg(long)]
        whitelists: bool,
    },
    /// Whitelist a client network, a sender domain or a recipient for a
    /// time: the reference filter lets their mail through without
    /// greylisting until it expires (`db delete` ends it sooner).
    Whitelist {
        #[command(flatten)]
        target: DbTarget,
        /// A client address (its network in the filter's grouping, /24 or
        /// /64 by default) or a network of that size (`192.0.2.0/24`).
        /// Default: none; name one of --client, --sender, --recipient.
        #[arg(long, group = "what")]
        client: Option<String>,
        /// A sender domain (`example.org`). Default: none.
        #[arg(long, group = "what")]
        sender: Option<String>,
        /// A recipient address (`user@example.org`). Default: none.
        #[arg(long, group = "what")]
        recipient: Option<String>,
        /// For how long (`7d`, `12h`; at most 10 years).
        #[arg(long = "for", value_name = "DURATION", default_value = "30d")]
        duration: String,
    },
    /// Show one record in full.
    Show {
        #[command(flatten)]
        target: DbTarget,
        /// The key as `list` prints it (with or without the namespace).
        key: String,
    },
    /// Let a greylisted triplet pass at its next attempt.
    Release {
        #[command(flatten)]
        target: DbTarget,
        /// The key as `list` prints it.
        key: String,
    },
    /// Delete a record (the triplet is greylisted afresh).
    Delete {
        #[command(flatten)]
        target: DbTarget,
        /// The key as `list` prints it.
        key: String,
    },
    /// Count the records by namespace and kind (greylisted, passed,
    /// auto-whitelist counts, …).
    Stats {
        #[command(flatten)]
        target: DbTarget,
    },
    /// Copy every live record, with its remaining lifetime, from one store
    /// to another (a redb file to Redis when one host becomes a farm, or
    /// back). Stop the daemons using a redb file first (it is locked).
    Migrate {
        /// The source: `redb:PATH` (or a plain path) or `redis://HOST:PORT/DB`.
        #[arg(long)]
        from: String,
        /// The destination, the same forms.
        #[arg(long)]
        to: String,
        /// The prefix, TLS files and sentinel credentials, on whichever
        /// side is Redis.
        #[command(flatten)]
        redis: RedisArgs,
    },
    /// Check a redb store file (stop the daemon using it first: it is
    /// locked): redb's integrity check and every record read. Prints the
    /// number of records, or why the file cannot be used and what to do;
    /// exits 1 then.
    Check {
        /// The redb file.
        path: PathBuf,
    },
}

/// Opens a store named on the command line: `redb:PATH`, a path, `memory`
/// or a `redis://` URL; with how to name it in messages (no password).
fn open_store(spec: &str, redis: &RedisArgs) -> Result<(Arc<dyn Store>, String)> {
    let mut section = greyhook::store::StoreConfig {
        path: Some(spec.strip_prefix("redb:").unwrap_or(spec).to_string()),
        prefix: redis.prefix.clone(),
        timeout: std::time::Duration::from_secs(5),
        ..Default::default()
    };
    // The TLS flags are for the Redis side (`migrate` has two sides), the
    // sentinels' credentials for a Sentinel URL.
    if section.backend().is_some_and(|b| b.name == "redis") {
        (section.tls_ca, section.tls_cert, section.tls_key) = (redis.tls_ca.clone(), redis.tls_cert.clone(), redis.tls_key.clone());
    }
    if is_sentinel(spec) {
        (section.sentinel_user, section.sentinel_password) = (redis.sentinel_user.clone(), redis.sentinel_password.clone());
    }
    // A URL without its password (a redb file's description would add
    // its durability, which means nothing here).
    let shown = if section.redb_path().is_some() { spec.to_string() } else { section.describe() };
    // Its errors name the store (without the password) already.
    let store = section.open()?;
    Ok((store, shown))
}

/// Whether `spec` names a Redis store through Sentinel.
fn is_sentinel(spec: &str) -> bool {
    spec.starts_with("redis+sentinel://") || spec.starts_with("rediss+sentinel://")
}

/// Refuses sentinel credentials when no store named is a Sentinel one:
/// they would be dropped without a word.
fn check_sentinel_flags(redis: &RedisArgs, specs: &[&str]) -> Result<()> {
    if (redis.sentinel_user.is_some() || redis.sentinel_password.is_some()) && !specs.iter().any(|s| is_sentinel(s)) {
        anyhow::bail!(
            "--sentinel-user and --sentinel-password (or $GREYHOOK_SENTINEL_PASSWORD) are for a redis+sentinel:// store; \
             a server's password goes in its URL"
        );
    }
    Ok(())
}

/// `greyhook db list|show|release|delete|stats`: on the store named, or
/// the live daemon's through its control socket.
async fn db_admin(target: DbTarget, cmd: greyhook::admin::Command) -> Result<()> {
    match &target.db {
        Some(spec) => {
            check_sentinel_flags(&target.redis, &[spec])?;
            let (store, _) = open_store(spec, &target.redis)?;
            // A store opened directly comes with no filter configuration: the
            // reference filter's default grouping (docs/operating.md).
            let grouping = greyhook::admin::ClientGrouping::default();
            let out = greyhook::admin::run(&*store, &cmd, SystemClock.now(), grouping).await?;
            store.flush().await?;
            println!("{out}");
            Ok(())
        }
        None => control(target.control, &format!("db {}", serde_json::to_string(&cmd)?)).await,
    }
}

/// `greyhook db migrate`.
async fn migrate(from: &str, to: &str, redis: &RedisArgs) -> Result<()> {
    check_sentinel_flags(redis, &[from, to])?;
    let ((src, from), (dst, to)) = (open_store(from, redis)?, open_store(to, redis)?);
    let now = SystemClock.now();
    let (mut cursor, mut copied) = (None, 0u64);
    loop {
        let page = src.scan(cursor, 1000, now).await.with_context(|| format!("reading {from}"))?;
        for (key, e) in &page.entries {
            dst.set(key, &e.value, e.expires_at, greyhook::store::Condition::Any, now).await.with_context(|| format!("writing {to}"))?;
            copied += 1;
        }
        match page.next {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    dst.flush().await.with_context(|| format!("flushing {to}"))?;
    println!("copied {copied} records from {from} to {to}");
    Ok(())
}

/// Options every daemon command shares (`serve`, `smtp`, and the front
/// ends' own commands such as `opensmtpd`).
#[derive(clap::Args, Clone)]
struct Common {
    /// The configuration file (TOML; see docs/configuration.md). Default:
    /// none, the built-in defaults.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The store: a redb file, `memory`, or `redis://HOST:PORT/DB` (shared
    /// by an MX farm). Default: `[store] path`, else
    /// `$STATE_DIRECTORY/greyhook.db`, `/var/lib/greyhook/greyhook.db` (root)
    /// or `~/.local/state/greyhook/greyhook.db`.
    #[arg(long)]
    db: Option<String>,
    /// The filter component (.wasm). Default: `[filter] path`, else the
    /// embedded reference filter.
    #[arg(long)]
    filter: Option<PathBuf>,
    /// Override a key of the filter's configuration (repeatable), e.g.
    /// `delay=2`. Default: none, the file's or the filter's defaults.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Log level or filter (`info`, `debug`, `info,greyhook::filter=debug`).
    /// Default: `$GREYHOOK_LOG`, else `[log] level`, else `info`.
    #[arg(long)]
    log: Option<String>,
    /// The control socket `greyhook reload` talks to. Default: `[control]
    /// socket`, else `$RUNTIME_DIRECTORY/control.sock`,
    /// `/run/greyhook/control.sock` (root) or
    /// `$XDG_RUNTIME_DIR/greyhook/control.sock`.
    #[arg(long)]
    control: Option<PathBuf>,
    /// A DNS server for the filters' lookups and client names, `HOST:PORT`
    /// (repeatable; replaces `[dns] servers`; default: the system's resolver).
    #[arg(long = "dns", value_name = "HOST:PORT")]
    dns: Vec<std::net::SocketAddr>,
    /// Serve Prometheus metrics (`/metrics`) and a status page (`/`) on
    /// `HOST:PORT`, e.g. `127.0.0.1:9640`; replaces `[metrics] listen`
    /// (default: off; a loopback address unless `[metrics] public = true`).
    #[arg(long = "metrics", value_name = "HOST:PORT")]
    metrics: Option<std::net::SocketAddr>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: the Postfix policy service (127.0.0.1:10023 by
    /// default) with the reference filter and the embedded store, unless
    /// told otherwise.
    Serve {
        #[command(flatten)]
        common: Common,
        /// Policy listener, replacing the file's (repeatable):
        /// `127.0.0.1:10023`, `[::1]:10023` or `unix:/path`. Default:
        /// `[policy] listen`, else `127.0.0.1:10023`.
        #[arg(long = "policy", value_name = "ADDR")]
        policy: Vec<String>,
        /// Milter listener, replacing the file's (repeatable):
        /// `127.0.0.1:10024` or `unix:/path` (Postfix `smtpd_milters`).
        /// Default: `[milter] listen`, else none.
        #[arg(long = "milter", value_name = "ADDR")]
        milter: Vec<String>,
    },
    /// Run the reference SMTP front end: a before-queue SMTP server that
    /// greylists at every phase and relays accepted mail to the next hop.
    /// Same configuration file, store and filters as `serve`; no policy
    /// listener unless `--policy` is given.
    Smtp {
        #[command(flatten)]
        common: Common,
        /// Where to listen (repeatable), e.g. `0.0.0.0:25`; replaces
        /// `smtp.listen`. Default: `[smtp] listen` (one is needed).
        #[arg(long = "listen", value_name = "ADDR")]
        listen: Vec<String>,
        /// The MTA behind greyhook, `HOST:PORT` or `unix:/path`; replaces
        /// `smtp.next_hop`. Default: `[smtp] next_hop` (one is needed).
        #[arg(long = "next-hop", value_name = "HOST:PORT|unix:/path")]
        next_hop: Option<String>,
        /// Speak LMTP to the next hop. Default: SMTP (`[smtp] next_hop_protocol`).
        #[arg(long)]
        lmtp: bool,
        /// Also serve the policy protocol here (repeatable). Default: none.
        #[arg(long = "policy", value_name = "ADDR")]
        policy: Vec<String>,
        /// Also serve milter here (repeatable). Default: none.
        #[arg(long = "milter", value_name = "ADDR")]
        milter: Vec<String>,
    },
    /// Tell the running daemon to reload its filter and configuration now;
    /// prints the version loaded, or why it was refused (exit 1).
    Reload {
        /// The daemon's control socket. Default: the first that exists of
        /// `$RUNTIME_DIRECTORY/control.sock`, `/run/greyhook/control.sock`,
        /// `$XDG_RUNTIME_DIR/greyhook/control.sock`, beside the default store.
        #[arg(long)]
        control: Option<PathBuf>,
    },
    /// Print what the running daemon is doing: version, uptime, listeners,
    /// store (kind, path, size, records, health), resolver, decisions by
    /// action, and each filter with its last reload and its counters.
    Status {
        /// The daemon's control socket. Default: the first that exists of
        /// `$RUNTIME_DIRECTORY/control.sock`, `/run/greyhook/control.sock`,
        /// `$XDG_RUNTIME_DIR/greyhook/control.sock`, beside the default store.
        #[arg(long)]
        control: Option<PathBuf>,
        /// One line of JSON (version, uptime, listeners, store, resolver,
        /// decisions, filters with their last reload and metrics), for
        /// scripts. Default: lines for a person.
        #[arg(long)]
        json: bool,
    },
    /// Read the retry delay a server's reply asks for. Given one whole
    /// reply on stdin (all its lines, as the server sent them), prints the
    /// delay in whole seconds and exits 0, or prints nothing and exits 1
    /// when the reply states none (only a 4yz reply carries a delay). With
    /// `--log`, reads a Postfix or Exim log (FILE, or stdin) and prints one
    /// line per deferral: the queue ID (Postfix) or recipient (Exim), and
    /// the delay or `none`.
    Hint {
        /// Read a mail log instead of one reply. Default: one reply.
        #[arg(long)]
        log: bool,
        /// The log file (default: stdin).
        file: Option<PathBuf>,
    },
    /// Summarise what greylisting did from a JSON decision log (`[log]
    /// decisions = "json"`): mails stopped and delayed, the delay
    /// distribution, the senders and domains delayed most, farms deferred
    /// from many networks, clients that follow retry hints. Text on stdout,
    /// or with `--html FILE` a self-contained page with charts.
    Report {
        /// The log files (greyhook's stderr or journal output; other lines
        /// are skipped). Default: stdin.
        files: Vec<PathBuf>,
        /// Also write the report as HTML to this file. Default: text only.
        #[arg(long, value_name = "FILE")]
        html: Option<PathBuf>,
        /// Print the report as JSON instead of text. Default: text.
        #[arg(long)]
        json: bool,
    },
    /// What if: replay a recorded JSON decision log through the configured
    /// (candidate) filter chain offline, at the recorded times, on a fresh
    /// in-memory store, and print what would change — mails that would be
    /// delayed (and by how much) or pass sooner, side by side with what
    /// happened. Run it before `greyhook reload`.
    Replay {
        /// The log files (as for `report`). Default: stdin.
        files: Vec<PathBuf>,
        #[command(flatten)]
        common: Common,
        /// Print the result as JSON. Default: text.
        #[arg(long)]
        json: bool,
    },
    /// Work on a store.
    Db {
        #[command(subcommand)]
        command: DbCommand,
    },
    /// Load and type-check the filters of the configured chain (or the one
    /// named), run their init, and print each one's name, version and
    /// imports.
    Check {
        /// The filter (.wasm component), in place of the main filter of
        /// the chain (the embedded reference filter if none is configured).
        filter: Option<PathBuf>,
        /// The configuration file (TOML; see docs/configuration.md).
        /// Default: none, the built-in defaults.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override a key of the main filter's configuration (repeatable).
        /// Default: none.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Replay a scripted SMTP session through the configured filter chain
    /// and print the replies as a client sees them. The store is a fresh
    /// in-memory one unless `--db` names another.
    Simulate {
        /// The script (plain commands, or JSON events); `-` reads stdin.
        script: PathBuf,
        #[command(flatten)]
        common: Common,
        /// Unix time at which the script starts (default: now).
        #[arg(long)]
        start: Option<u64>,
    },
    /// Create a filter crate on the Rust SDK (greyhook-filter): a
    /// greylisting filter with its tests and a README, ready for `cargo
    /// test` and `cargo build --target wasm32-wasip2 --release`.
    NewFilter {
        /// The filter's name (its crate name and store namespace).
        name: String,
        /// The directory to create (default: ./NAME).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The SDK (sdk/rust of the greyhook source; default: the one this
        /// greyhook was built from).
        #[arg(long)]
        sdk: Option<PathBuf>,
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

/// The log's flushes are at least this far apart (see [`SpacedFlush`]).
const LOG_FLUSH_GAP: std::time::Duration = std::time::Duration::from_millis(5);

/// stderr through a 64 KiB buffer whose flushes are at least
/// [`LOG_FLUSH_GAP`] apart. The writer thread flushes whenever it has
/// written every line in hand; under load that was nearly every line (it
/// drained the queue faster than requests filled it: ~0.7 `write(2)` and
/// a thread wake-up a policy request). A flush that comes sooner than the
/// gap after the last one first sleeps out the rest of the gap, while the
/// lines of that time queue for the next write. A line alone (a quiet
/// daemon) is written at once; under load a line waits at most the gap.
struct SpacedFlush {
    out: std::io::BufWriter<CountedStderr>,
    last: std::time::Instant,
}

/// stderr, each write counted (`greyhook_log_writes_total`): the
/// buffer's flushes, and its own writes when lines overflow it.
struct CountedStderr;

impl std::io::Write for CountedStderr {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        greyhook::telemetry::host().log_writes.inc();
        note_dropped_lines();
        std::io::stderr().write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Writes, before the lines that follow, how many were dropped since the
/// last write (see [`init_logging`]): the log itself says where it has a
/// gap, once its reader has caught up. Only the writer thread calls it.
fn note_dropped_lines() {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    static NOTED: AtomicU64 = AtomicU64::new(0);
    let dropped = greyhook::telemetry::dropped_log_lines();
    let noted = NOTED.load(Relaxed);
    if dropped > noted {
        NOTED.store(dropped, Relaxed);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let line = format!(
            "{}  WARN greyhook::log: {} log lines dropped: the log's reader fell behind and [log] queue_lines were waiting \
             ({dropped} since start)\n",
            greyhook::clock::rfc3339(now),
            dropped - noted
        );
        let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
    }
}

impl std::io::Write for SpacedFlush {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.out.write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        if self.out.buffer().is_empty() {
            return self.out.flush();
        }
        if let Some(rest) = LOG_FLUSH_GAP.checked_sub(self.last.elapsed()) {
            std::thread::sleep(rest);
        }
        let r = self.out.flush();
        self.last = std::time::Instant::now();
        r
    }
}

/// Logs to stderr through a writer thread, so a decision line costs the
/// request path a channel send, not a write(2). The thread writes through
/// a buffer ([`SpacedFlush`]): one write(2) for all the lines that queued
/// meanwhile, at most one every [`LOG_FLUSH_GAP`]. At most `queue` lines
/// wait for it: past them a line is dropped and counted
/// (`greyhook_log_lines_dropped_total`, and a line in the log once it is
/// read again), never waited for. With a log nobody read (a stuck pipe or
/// journal), every request used to wait for the log once the queue was
/// full: the daemon stopped answering. The guard flushes the queue at exit.
/// Decision lines, the most frequent, are formatted by `session::audit`
/// itself into the same writer (unless stderr is a terminal, where tracing
/// colours them).
fn init_logging(default: &str, queue: usize) -> tracing_appender::non_blocking::WorkerGuard {
    use tracing_subscriber::fmt::MakeWriter;
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("GREYHOOK_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let out = SpacedFlush {
        out: std::io::BufWriter::with_capacity(64 << 10, CountedStderr),
        last: std::time::Instant::now().checked_sub(LOG_FLUSH_GAP).unwrap_or_else(std::time::Instant::now),
    };
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default().lossy(true).buffered_lines_limit(queue).finish(out);
    let dropped = writer.error_counter();
    greyhook::telemetry::count_dropped_log_lines_with(move || dropped.dropped_lines() as u64);
    if !ansi {
        let decisions = writer.clone();
        greyhook::session::audit::write_decisions_to(move |line| {
            // The writer only fails once its thread is gone (at exit).
            let _ = std::io::Write::write_all(&mut decisions.make_writer(), line);
        });
    }
    // Only fails if a subscriber is already set, which nothing here does.
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(writer).try_init();
    guard
}

/// The command line's overrides of the configuration file.
#[derive(Clone)]
struct Overrides {
    common: Common,
    policy: Vec<String>,
    milter: Vec<String>,
    /// `greyhook smtp`: the SMTP listeners (the policy listener is off
    /// unless `--policy` names one).
    smtp: Option<SmtpOverrides>,
    /// `greyhook NAME` for a front end with a command: only it runs.
    only: Option<String>,
}

impl Overrides {
    /// A tool's (`check`, `simulate`): the chain and store of the file, no
    /// front end started.
    fn tool(common: Common) -> Overrides {
        Overrides { common, policy: Vec::new(), milter: Vec::new(), smtp: None, only: None }
    }
}

#[derive(Clone)]
struct SmtpOverrides {
    listen: Vec<String>,
    next_hop: Option<String>,
    lmtp: bool,
}

fn addrs(flag: &str, list: &[String]) -> Result<Vec<greyhook::frontend::ListenAddr>, greyhook::daemon::DaemonError> {
    list.iter().map(|p| p.parse()).collect::<Result<_, _>>().map_err(|e| greyhook::daemon::DaemonError::Invalid(format!("{flag}: {e}")))
}

/// Reads the configuration file (if any) and applies the overrides: run at
/// start and again at every reload.
fn load_config(file: Option<&Path>, o: &Overrides) -> Result<greyhook::daemon::DaemonConfig, greyhook::daemon::DaemonError> {
    use greyhook::daemon::{DaemonConfig, DaemonError};
    let mut cfg = match file {
        Some(p) => DaemonConfig::load(p)?,
        None => DaemonConfig::default(),
    };
    if let Some(smtp) = &o.smtp {
        cfg.policy.listen = Vec::new();
        if !smtp.listen.is_empty() {
            cfg.smtp.listen = addrs("--listen", &smtp.listen)?;
        }
        if cfg.smtp.listen.is_empty() {
            return Err(DaemonError::Invalid("greyhook smtp needs --listen ADDR (or smtp.listen in the file)".into()));
        }
        if smtp.next_hop.is_some() {
            cfg.smtp.next_hop = smtp.next_hop.clone();
        }
        if smtp.lmtp {
            cfg.smtp.next_hop_protocol = greyhook::frontend::smtp::HopProtocol::Lmtp;
        }
    }
    // Naming any listener on the command line names them all: the ones
    // not named (the default policy listener among them) are off.
    if !o.policy.is_empty() || !o.milter.is_empty() {
        cfg.policy.listen = addrs("--policy", &o.policy)?;
        cfg.milter.listen = addrs("--milter", &o.milter)?;
    }
    if let Some(name) = &o.only {
        cfg.only_front_end(name);
    }
    let c = &o.common;
    if c.db.is_some() {
        cfg.store.path = c.db.clone();
    }
    if c.filter.is_some() {
        cfg.main_filter_mut().path = c.filter.clone();
    }
    if let Some(l) = &c.log {
        cfg.log.level = l.clone();
    }
    if let Some(ctl) = &c.control {
        cfg.control.socket = Some(ctl.display().to_string());
    }
    if !c.dns.is_empty() {
        cfg.dns.servers = c.dns.clone();
    }
    if c.metrics.is_some() {
        cfg.metrics.listen = c.metrics;
    }
    cfg.set_filter_keys(&c.set)?;
    cfg.log.check().map_err(greyhook::daemon::DaemonError::Invalid)?;
    cfg.dns.check().map_err(greyhook::daemon::DaemonError::Invalid)?;
    cfg.store.check().map_err(greyhook::daemon::DaemonError::Invalid)?;
    Ok(cfg)
}

async fn serve(overrides: Overrides) -> Result<()> {
    use greyhook::daemon::{Daemon, Reconfigure};
    let file = overrides.common.config.clone();
    let cfg = load_config(file.as_deref(), &overrides)?;
    let _log = init_logging(&cfg.log.level, cfg.log.queue_lines);
    // Before anything opens a socket: the connection limits need more
    // descriptors than the usual soft limit of 1024 (the daemon warns if
    // the hard limit is short too).
    match greyhook::daemon::raise_open_files_limit() {
        Ok((before, after)) if before != after => {
            let show = |l: Option<u64>| l.map_or_else(|| "unlimited".to_string(), |n| n.to_string());
            tracing::info!("open-files limit raised from {} to {}", show(before), show(after));
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot raise the open-files limit to its hard limit: {e}"),
    }
    let reconfigure =
        Reconfigure { files: file.iter().cloned().collect(), load: Arc::new(move || load_config(file.as_deref(), &overrides)) };
    // The handlers are in place before anything listens: a SIGTERM that
    // comes as soon as the first front end answers is a clean shutdown,
    // not death by the default action (seen under load in CI).
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int, mut hup) = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?, signal(SignalKind::hangup())?);
    let daemon = Daemon::start(&cfg, Arc::new(SystemClock), Some(reconfigure)).await?;
    let token = daemon.shutdown_token();
    let reload = daemon.reload_handle();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break }
                _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break }
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading the filter");
                    let _ = reload.reload().await;
                }
            }
        }
        token.cancel();
    });
    daemon.wait().await;
    Ok(())
}

/// The longest log line `report`, `replay` and `hint --log` read. Decision
/// lines and MTA log lines are far shorter; a longer one is none of them.
const MAX_LOG_LINE: u64 = 64 * 1024;

/// Calls `each` with every line of `r` (its newline included) of at most
/// `max` bytes. A longer line is skipped whole, a buffer at a time, never
/// held: a log with a line of gigabytes, or `/dev/zero`, costs no memory,
/// and no piece of such a line is taken for a line of its own. By hand
/// because std's `read_until` has no bound, and bounding it with `take`
/// alone cuts a long line into pieces that read as lines.
fn for_each_line(mut r: impl std::io::BufRead, max: u64, mut each: impl FnMut(&[u8])) -> std::io::Result<()> {
    use std::io::{BufRead, Read};
    let mut line = Vec::new();
    loop {
        line.clear();
        if (&mut r).take(max + 1).read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        if line.len() as u64 <= max {
            each(&line);
            continue;
        }
        if line.ends_with(b"\n") {
            // Overlong by its newline alone: read whole already.
            continue;
        }
        // The rest of the overlong line, a buffer at a time.
        loop {
            let buf = r.fill_buf()?;
            if buf.is_empty() {
                return Ok(());
            }
            match buf.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    r.consume(i + 1);
                    break;
                }
                None => {
                    let len = buf.len();
                    r.consume(len);
                }
            }
        }
    }
}

/// The JSON decision lines of `files` (stdin if none), in order read.
fn read_decisions(files: &[PathBuf]) -> Result<Vec<greyhook::session::audit::DecisionRecord>> {
    use std::io::BufRead;
    let mut records = Vec::new();
    let mut read = |r: Box<dyn BufRead>, name: &str| -> Result<()> {
        for_each_line(r, MAX_LOG_LINE, |line| {
            if let Some(d) = greyhook::session::audit::DecisionRecord::parse_line(&String::from_utf8_lossy(line)) {
                records.push(d);
            }
        })
        .with_context(|| format!("reading {name}"))
    };
    if files.is_empty() {
        read(Box::new(std::io::stdin().lock()), "stdin")?;
    }
    for f in files {
        let file = std::fs::File::open(f).with_context(|| format!("cannot read {}", f.display()))?;
        read(Box::new(std::io::BufReader::new(file)), &f.display().to_string())?;
    }
    if records.is_empty() {
        anyhow::bail!("no JSON decision lines found: run the daemon with `[log] decisions = \"json\"` (docs/operating.md)");
    }
    Ok(records)
}

/// `greyhook report`.
fn report(files: &[PathBuf], html: Option<&Path>, json: bool) -> Result<()> {
    let r = greyhook::report::build(read_decisions(files)?);
    if let Some(p) = html {
        std::fs::write(p, r.html()).with_context(|| format!("cannot write {}", p.display()))?;
    }
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        print!("{}", r.text());
    }
    Ok(())
}

/// `greyhook hint`.
fn hint(log: bool, file: Option<&Path>) -> Result<()> {
    use std::io::Read;
    let input: Box<dyn std::io::Read> = match file {
        Some(p) => Box::new(std::fs::File::open(p).with_context(|| format!("cannot read {}", p.display()))?),
        None => Box::new(std::io::stdin()),
    };
    if log {
        return for_each_line(std::io::BufReader::new(input), MAX_LOG_LINE, |line| {
            if let Some((who, delay)) = greyhook::retry::log_deferral(&String::from_utf8_lossy(line)) {
                println!("{who} {}", delay.map_or_else(|| "none".to_string(), |d| d.to_string()));
            }
        })
        .context("reading the log");
    }
    // One reply: at most 100 lines of 512 bytes (RFC 5321's limits, with room).
    let mut text = String::new();
    input.take(64 << 10).read_to_string(&mut text).context("the reply must be text")?;
    match greyhook::retry::reply_delay(&text) {
        Some(d) => {
            println!("{d}");
            Ok(())
        }
        None => std::process::exit(1),
    }
}

/// `greyhook reload` / `greyhook status`: one command on the control socket.
async fn control(path: Option<PathBuf>, command: &str) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let path = path.unwrap_or_else(greyhook::daemon::find_control_path);
    let mut s = tokio::net::UnixStream::connect(&path).await.with_context(|| {
        format!("cannot reach the daemon at {} (is `greyhook serve` running? --control names another socket)", path.display())
    })?;
    s.write_all(format!("{command}\n").as_bytes()).await?;
    let mut reply = String::new();
    tokio::time::timeout(std::time::Duration::from_secs(120), s.take(64 * 1024).read_to_string(&mut reply))
        .await
        .context("no answer from the daemon")??;
    let reply = reply.trim();
    match reply.strip_prefix("ok ") {
        Some(r) => {
            println!("{r}");
            Ok(())
        }
        None => anyhow::bail!(
            "{}",
            reply
                .strip_prefix("refused ")
                .map(|r| format!("refused, the current version keeps serving: {r}"))
                .unwrap_or_else(|| reply.to_string())
        ),
    }
}

/// `items` joined by `, ` for `greyhook check`, or `none`.
fn listed<S: std::borrow::Borrow<str>>(items: &[S]) -> String {
    if items.is_empty() { "none".to_string() } else { items.join(", ") }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve { common, policy, milter } => {
            return serve(Overrides { common, policy, milter, smtp: None, only: None }).await;
        }
        Command::Smtp { common, listen, next_hop, lmtp, policy, milter } => {
            return serve(Overrides { common, policy, milter, smtp: Some(SmtpOverrides { listen, next_hop, lmtp }), only: None }).await;
        }
        Command::Hint { log, file } => return hint(log, file.as_deref()),
        Command::NewFilter { name, dir, sdk } => return new_filter::run(&name, dir, sdk),
        Command::Reload { control: c } => return control(c, "reload").await,
        Command::Status { control: c, json } => return control(c, if json { "status json" } else { "status" }).await,
        Command::Report { files, html, json } => return report(&files, html.as_deref(), json),
        Command::Db { command: DbCommand::Migrate { from, to, redis } } => {
            let _log = init_logging("warn", greyhook::daemon::DEFAULT_LOG_QUEUE);
            return migrate(&from, &to, &redis).await;
        }
        Command::Db { command: DbCommand::Whitelist { target, client, sender, recipient, duration } } => {
            use greyhook::admin::WhitelistKind;
            let (kind, value) = match (client, sender, recipient) {
                (Some(c), _, _) => (WhitelistKind::Client, c),
                (_, Some(s), _) => (WhitelistKind::Sender, s),
                (_, _, Some(r)) => (WhitelistKind::Recipient, r),
                _ => anyhow::bail!("name what to whitelist: --client, --sender or --recipient"),
            };
            let ttl = humantime_serde::re::humantime::parse_duration(&duration)
                .with_context(|| format!("--for {duration:?}: a duration such as 7d or 12h"))?
                .as_secs();
            let namespace = target.namespace.clone();
            return db_admin(target, greyhook::admin::Command::Whitelist { namespace, kind, value, ttl }).await;
        }
        Command::Db { command: DbCommand::List { target, client, sender, recipient, state, older_than, limit, whitelists } } => {
            let _log = init_logging("warn", greyhook::daemon::DEFAULT_LOG_QUEUE);
            let older_than = match older_than {
                Some(d) => Some(
                    humantime_serde::re::humantime::parse_duration(&d)
                        .with_context(|| format!("--older-than {d:?}: a duration such as 10m or 2h"))?
                        .as_secs(),
                ),
                None => None,
            };
            let filter = greyhook::admin::ListFilter { client, sender, recipient, state, older_than, limit: Some(limit), whitelists };
            let namespace = target.namespace.clone();
            return db_admin(target, greyhook::admin::Command::List { namespace, filter }).await;
        }
        Command::Db { command: DbCommand::Show { target, key } } => {
            let namespace = target.namespace.clone();
            return db_admin(target, greyhook::admin::Command::Show { namespace, key }).await;
        }
        Command::Db { command: DbCommand::Release { target, key } } => {
            let namespace = target.namespace.clone();
            return db_admin(target, greyhook::admin::Command::Release { namespace, key }).await;
        }
        Command::Db { command: DbCommand::Delete { target, key } } => {
            let namespace = target.namespace.clone();
            return db_admin(target, greyhook::admin::Command::Delete { namespace, key }).await;
        }
        Command::Db { command: DbCommand::Stats { target } } => return db_admin(target, greyhook::admin::Command::Stats).await,
        Command::Db { command: DbCommand::Check { path } } => {
            let _log = init_logging("error", greyhook::daemon::DEFAULT_LOG_QUEUE);
            let n = greyhook::store::RedbStore::check(&path)?;
            println!("ok: {} holds {n} records", path.display());
            return Ok(());
        }
        _ => {}
    }
    let _log = init_logging("warn", greyhook::daemon::DEFAULT_LOG_QUEUE);
    match cli.command {
        Command::Serve { .. }
        | Command::Smtp { .. }
        | Command::Reload { .. }
        | Command::Status { .. }
        | Command::Db { .. }
        | Command::Report { .. }
        | Command::NewFilter { .. }
        | Command::Hint { .. } => {
            unreachable!("handled above")
        }
        Command::Check { filter, config, set } => {
            let common =
                Common { config, db: Some("memory".into()), filter, set, log: None, control: None, dns: Vec::new(), metrics: None };
            let cfg = load_config(common.config.clone().as_deref(), &Overrides::tool(common))?;
            let loaded = greyhook::daemon::load_chain(&cfg, Arc::new(MemoryStore::new()), None).await?;
            for r in &loaded.reloaders {
                let f = r.filter();
                let name = f.info().name.clone();
                println!("ok: {name}");
                println!("name: {name}");
                println!("version: {}", f.info().version);
                println!("namespace: {}", f.namespace());
                println!("contract: {}", f.contract());
                let caps: Vec<&str> = f
                    .imports()
                    .iter()
                    .filter_map(|i| i.strip_prefix("greyhook:filter/"))
                    .map(|i| i.split('@').next().unwrap_or(i))
                    .filter(|i| *i != "types" && *i != "negotiate")
                    .collect();
                println!("capabilities: {}", listed(&caps));
                // The hooks it asked not to be called (contracts 0.2.2
                // and 0.2.3).
                let skip = f.skipped();
                let skipped = skip.names();
                println!("skipped hooks: {}", listed(&skipped));
                if skip.skips(greyhook::types::Phase::Ehlo) {
                    println!("ehlo keywords: {}", listed(&skip.ehlo_keywords));
                }
                println!("imports:");
                for i in f.imports() {
                    let note = if i.starts_with("greyhook:") { "" } else { "  (linked empty: no capability granted)" };
                    println!("  {i}{note}");
                }
            }
        }
        Command::Replay { files, mut common, json } => {
            common.db = Some("memory".into());
            let records = read_decisions(&files)?;
            let cfg = load_config(common.config.clone().as_deref(), &Overrides::tool(common))?;
            let store = cfg.store.open().context("cannot open the store")?;
            let loaded = greyhook::daemon::load_chain(&cfg, store, None).await.context("the filter chain is refused")?;
            let r = greyhook::replay::replay(&loaded.chain(), records).await;
            match json {
                true => println!("{}", serde_json::to_string(&r)?),
                false => print!("{}", r.text()),
            }
        }
        Command::Simulate { script, mut common, start } => {
            // A simulation never touches the daemon's store unless told to.
            common.db.get_or_insert_with(|| "memory".into());
            let cfg = load_config(common.config.clone().as_deref(), &Overrides::tool(common))?;
            let store = cfg.store.open().context("cannot open the store")?;
            let loaded = greyhook::daemon::load_chain(&cfg, store.clone(), None).await.context("the filter chain is refused")?;
            let text = String::from_utf8(read(&script)?).context("the script is not UTF-8")?;
            let events = simulate::parse_script(&text)?;
            let start = start.unwrap_or_else(|| SystemClock.now());
            for line in simulate::run(&loaded.chain(), &events, start).await? {
                println!("{line}");
            }
            store.flush().await?;
        }
    }
    Ok(())
}

/// What the command line asks for: one of the commands above, or a front
/// end's own command (`greyhook opensmtpd`), which the front ends declare
/// (`greyhook::frontend::commands`), not this file.
enum Invocation {
    Cli(Cli),
    FrontEnd(String, Common),
}

/// The whole command line: [`Cli`] and the front ends' own commands.
fn command() -> clap::Command {
    let mut cmd = Cli::command();
    for (name, about) in greyhook::frontend::commands() {
        // The about after the shared options: `augment_args` sets the
        // command's about to `Common`'s own doc comment.
        cmd = cmd.subcommand(Common::augment_args(clap::Command::new(name)).about(about).long_about(None));
    }
    cmd
}

fn parse_command_line() -> Invocation {
    let front_ends = greyhook::frontend::commands();
    let matches = command().get_matches();
    let parsed = match matches.subcommand() {
        Some((name, sub)) if front_ends.iter().any(|(n, _)| *n == name) => {
            Common::from_arg_matches(sub).map(|c| Invocation::FrontEnd(name.to_string(), c))
        }
        _ => Cli::from_arg_matches(&matches).map(Invocation::Cli),
    };
    parsed.unwrap_or_else(|e| e.exit())
}

fn main() -> std::process::ExitCode {
    let invocation = parse_command_line();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("greyhook: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = match invocation {
        Invocation::Cli(cli) => rt.block_on(run(cli)),
        Invocation::FrontEnd(name, common) => {
            rt.block_on(serve(Overrides { common, policy: Vec::new(), milter: Vec::new(), smtp: None, only: Some(name) }))
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("greyhook: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every option that takes a value says its default in `--help`.
    #[test]
    fn every_flag_says_its_default() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let takes_value = a.get_action().takes_values() && !a.is_positional() && !a.is_required_set();
                let help = a.get_long_help().or(a.get_help()).map(ToString::to_string).unwrap_or_default().to_lowercase();
                if takes_value && a.get_default_values().is_empty() && !help.contains("default") {
                    missing.push(format!("{path} --{}", a.get_long().unwrap_or(a.get_id().as_str())));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&command(), "greyhook", &mut missing);
        assert!(missing.is_empty(), "flags whose --help gives no default: {missing:?}");
    }

    /// Lines up to the bound are read, a longer one is skipped whole (not
    /// in pieces), and the line after it is read, at every boundary.
    #[test]
    fn overlong_lines_are_skipped_whole() {
        let lines = |text: &[u8], max| {
            let mut got = Vec::new();
            for_each_line(text, max, |l| got.push(String::from_utf8_lossy(l).into_owned())).unwrap();
            got
        };
        assert_eq!(lines(b"ab\ncd\nla", 3), ["ab\n", "cd\n", "la"]);
        assert_eq!(lines(b"abc\nd\n", 4), ["abc\n", "d\n"]);
        assert_eq!(lines(b"abcd\nd\n", 4), ["d\n"], "over by its newline");
        assert_eq!(lines(b"abcde\nd\n", 4), ["d\n"]);
        assert_eq!(lines(&[b"x".repeat(100_000), b"\nok\n".to_vec()].concat(), 4), ["ok\n"]);
        assert_eq!(lines(&b"x".repeat(100_000), 4), Vec::<String>::new());
        assert_eq!(lines(b"", 4), Vec::<String>::new());
    }
}
