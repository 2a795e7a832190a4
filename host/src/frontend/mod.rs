//! The MTA front ends: each speaks one MTA's protocol and drives the same
//! [`SmtpSession`](crate::session::SmtpSession) through the filter chain.
//!
//! | module | MTA | how it is reached |
//! |---|---|---|
//! | [`policy`] | Postfix `check_policy_service` | a socket (`[policy]`) |
//! | [`milter`] | Postfix/Sendmail `smtpd_milters` | a socket (`[milter]`) |
//! | [`smtp`] | any (a before-queue SMTP server) | a socket (`[smtp]`, `greyhook smtp`) |
//! | [`opensmtpd`] | OpenSMTPD `filter proc-exec` | stdin/stdout (`greyhook opensmtpd`) |
//!
//! A front end implements [`FrontEnd`]: its name (its table in the
//! configuration file and its name in logs), its own settings type,
//! `open_files` (the descriptors its limits let peers hold), and `start`
//! (check the settings, take what it serves on) then `serve(hooks,
//! shutdown)`. Its listeners share one `listen::Load`: a limit is the
//! front end's, whatever it listens on. A front end need not be a socket listener: the OpenSMTPD one
//! serves the pipe smtpd opened.
//!
//! **Adding a front end** is one new module here and one line in the
//! `front_ends!` list below: the daemon's configuration gains its table, `greyhook
//! serve` starts it when its settings ask for it, a reload leaves it alone,
//! and (with [`FrontEnd::COMMAND`]) `greyhook NAME` runs it alone.

use std::fmt::Debug;
use std::future::Future;

use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

pub(crate) mod listen;
pub mod milter;
pub mod opensmtpd;
pub mod policy;
pub mod smtp;

pub use self::listen::{ListenAddr, ListenError};
pub use crate::session::Hooks;

/// Every front end, once: `table => type`. The daemon's configuration
/// (one table each), its start-up and its reload check are generated from
/// this list; `greyhook --help` lists the commands of those that have one.
///
/// It calls the macro it is given with the list, so that each place that
/// needs every front end is written once for all of them.
macro_rules! front_ends {
    ($then:ident) => {
        $then! {
            policy => $crate::frontend::policy::Policy,
            milter => $crate::frontend::milter::Milter,
            smtp => $crate::frontend::smtp::Smtp,
            opensmtpd => $crate::frontend::opensmtpd::OpenSmtpd,
        }
    };
}
pub(crate) use front_ends;

/// Why a front end could not start.
#[derive(Debug, thiserror::Error)]
pub enum FrontEndError {
    /// A setting is out of range or missing; names the key.
    #[error("[{table}] {message}")]
    Invalid {
        /// The front end's table.
        table: &'static str,
        /// What is wrong, naming the key.
        message: String,
    },
    /// A listener could not be bound.
    #[error(transparent)]
    Listen(#[from] ListenError),
}

/// One MTA protocol greyhook answers (see the module documentation).
pub trait FrontEnd: Sized + Send + 'static {
    /// The table of its settings in the configuration file (`policy` is
    /// `[policy]`), its name in logs and, with [`FrontEnd::COMMAND`], the
    /// name of its command.
    const NAME: &'static str;

    /// `Some(about)` when `greyhook NAME` runs this front end alone (an MTA
    /// that starts its filter as a process, like OpenSMTPD): the command
    /// takes the options every daemon command takes (`--config`, `--db`,
    /// `--filter`, `--set`, `--control`, `--log`).
    const COMMAND: Option<&'static str> = None;

    /// Its settings: the whole table, every key with a default.
    type Config: DeserializeOwned + Default + Debug + Clone + Send + Sync + 'static;

    /// Whether these settings ask for it to run (it listens somewhere).
    fn enabled(config: &Self::Config) -> bool;

    /// Turns it on in `config` when it runs as its own command (and is the
    /// only front end then).
    fn enable(config: &mut Self::Config) {
        let _ = config;
    }

    /// Turns it off in `config` (another front end's command runs).
    fn disable(config: &mut Self::Config);

    /// The most file descriptors these settings let its peers hold at
    /// once: a connection each up to its limit, what each may open (the
    /// SMTP front end's next-hop connection), and one each listener may
    /// hold while it waits for a free slot. The daemon adds them up and
    /// warns at start when the process's open-files limit is lower (see
    /// [`crate::daemon::OpenFiles`]). Its listeners themselves, and the
    /// pipe of a front end that is not a listener, are in
    /// [`crate::daemon::RESERVED_FILES`].
    fn open_files(config: &Self::Config) -> u64;

    /// Checks the settings and takes what it serves on (binds its sockets),
    /// so that a bad setting or a taken port stops the daemon's start.
    fn start(config: &Self::Config) -> impl Future<Output = Result<Self, FrontEndError>> + Send;

    /// Where it listens, for the log and for tests that bind port 0.
    fn endpoints(&self) -> Vec<ListenAddr> {
        Vec::new()
    }

    /// Serves until `shutdown` is cancelled (then lets the requests in hand
    /// finish) or, for a front end that is not a listener, until its peer
    /// goes away. When it returns by itself, the daemon stops.
    fn serve(self, hooks: Hooks, shutdown: CancellationToken) -> impl Future<Output = ()> + Send;
}

macro_rules! commands {
    ($($table:ident => $front_end:ty,)*) => {
        /// The front ends that run as a command of their own (`greyhook
        /// NAME`), each with what its `--help` says.
        pub fn commands() -> Vec<(&'static str, &'static str)> {
            let mut out = Vec::new();
            $(
                if let Some(about) = <$front_end as FrontEnd>::COMMAND {
                    out.push((<$front_end as FrontEnd>::NAME, about));
                }
            )*
            out
        }
    };
}
front_ends!(commands);

/// The error for a bad setting of front end `F`.
pub(crate) fn invalid<F: FrontEnd>(message: impl std::fmt::Display) -> FrontEndError {
    FrontEndError::Invalid { table: F::NAME, message: message.to_string() }
}
