//! Running filters: the wasmtime engine and its sandbox ([`Runtime`],
//! [`Filter`]), compiled filters kept across restarts (`artifact_cache`),
//! hot reload with a crash-loop breaker ([`reload`]) and the chain the
//! front ends ask ([`Chain`]).

pub mod artifact_cache;
mod chain;
mod engine;
pub mod metrics;
pub mod reload;
pub(crate) mod sandbox;
mod ticker;

pub use self::chain::Chain;
pub use self::engine::*;
