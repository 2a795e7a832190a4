//! greyhook: the reference host for greylisting filters written as
//! WebAssembly components against `wit/greyhook.wit`.
//!
//! The crate is laid out the way a request flows:
//!
//! - [`types`], [`reply`], [`retry`], [`clock`] — the mail side of the
//!   contract: what a front end hands a filter, what comes back, how it
//!   is written to the client;
//! - [`runtime`] — filters in wasmtime: [`Runtime`] compiles and sandboxes
//!   them, a [`Filter`] answers the hooks, a [`Chain`] asks several in order,
//!   and [`runtime::reload`] swaps a new version in while requests run;
//! - [`session`] — [`SmtpSession`], the one model of an SMTP session and
//!   its transaction that every front end drives, with the decision log;
//! - [`store`] — where filters keep state ([`store::Store`]; memory, redb,
//!   Redis);
//! - [`frontend`] — the MTA protocols (Postfix policy, milter, an SMTP
//!   server, OpenSMTPD), each behind [`frontend::FrontEnd`];
//! - [`daemon`] — the configuration file and the running daemon that puts
//!   them together (the `greyhook` command is a thin layer over it, in
//!   `src/bin/greyhook/`).
//!
//! An MTA that embeds greyhook needs the first four: load a filter, make a
//! session per connection, call it at each SMTP command, send the reply it
//! returns. `examples/embed.rs` does it whole; in short:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use greyhook::{Chain, FilterOptions, Hooks, Runtime, RuntimeConfig, SmtpSession};
//! use greyhook::{clock::SystemClock, store::MemoryStore};
//! let runtime = Runtime::new(RuntimeConfig::default())?;
//! let filter = runtime.load(greyhook::REFERENCE_FILTER, FilterOptions::default(), Arc::new(MemoryStore::new())).await?;
//! let hooks = Hooks { chain: Chain::single(filter), clock: Arc::new(SystemClock), resolver: None, front_end: Hooks::EMBEDDED };
//! let mut session = SmtpSession::new(hooks, "s1", "192.0.2.1".parse()?);
//! session.mail("a@example.org").await;
//! let verdict = session.rcpt("b@example.com").await;
//! if let Some(reply) = verdict.reply() {
//!     print!("{}", greyhook::reply::render(reply)); // 451 4.7.1 Greylisted ... retry=00:05:00
//! }
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod admin;
mod cache;
pub mod daemon;
pub mod dns;
mod domain;
pub mod frontend;
mod pem;
pub mod replay;
pub mod report;
pub mod runtime;
pub mod session;
mod settings;
pub mod store;
pub mod telemetry;

pub use domain::{clock, reply, retry, types};
pub use runtime::{Chain, CompiledFilter, FailurePolicy, Filter, FilterError, FilterOptions, Limits, LoadError, Runtime, RuntimeConfig};
pub use session::{Hooks, SmtpSession};

/// The reference greylisting filter (`guest/`), built for `wasm32-wasip2`
/// and embedded: what greyhook runs when no filter is named. Present with
/// the `reference-filter` feature (on by default); without it the library
/// builds without the WebAssembly target.
#[cfg(feature = "reference-filter")]
pub const REFERENCE_FILTER: &[u8] = greyhook_reference::WASM;
