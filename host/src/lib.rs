//! greyhook: the reference host for greylisting filters written as
//! WebAssembly components against `wit/greyhook.wit`.
//!
//! An MTA front end builds a [`types::Context`] per SMTP phase, calls the
//! matching hook of a [`Filter`] and renders the [`types::Verdict`] with
//! [`reply`]. The filter runs sandboxed in wasmtime ([`engine`]) and keeps
//! state in a [`store::Store`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use greyhook::{Runtime, RuntimeConfig, FilterOptions, store::MemoryStore, types::*};
//! let runtime = Runtime::new(RuntimeConfig::default())?;
//! let filter = runtime.load(greyhook::REFERENCE_FILTER, FilterOptions::default(), Arc::new(MemoryStore::new())).await?;
//! let ctx = Context {
//!     session: Session::new("s1", "192.0.2.1".parse()?),
//!     transaction: Transaction { sender: Some("a@example.org".into()), recipients: vec![] },
//!     now: 1_700_000_000,
//! };
//! let verdict = filter.on_rcpt(&ctx, "b@example.com").await;
//! if let Some(reply) = verdict.reply() {
//!     print!("{}", greyhook::reply::render(reply)); // 451 4.7.1 Greylisted ... retry=00:05:00
//! }
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod artifact_cache;
pub mod audit;
pub mod chain;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod listen;
pub mod milter;
pub mod policy;
pub mod relay;
pub mod reload;
pub mod reply;
pub mod retry;
mod sandbox;
pub mod session;
pub mod simulate;
pub mod smtp;
pub mod store;
pub mod types;

pub use engine::{CompiledFilter, FailurePolicy, Filter, FilterError, FilterOptions, Limits, LoadError, Runtime, RuntimeConfig};

/// The reference greylisting filter (`guest/`), built for `wasm32-wasip2`
/// and embedded: what greyhook runs when no filter is named.
pub const REFERENCE_FILTER: &[u8] = include_bytes!(env!("GREYHOOK_REFERENCE_FILTER"));
