//! The host's parsers of outside input, compiled from their own source
//! files so that a fuzz build does not compile wasmtime (minutes of
//! instrumented build for code no target reaches). Each module is the
//! host's file, unchanged.
#![allow(dead_code, rustdoc::broken_intra_doc_links)]

/// The host's `domain` module (`host/src/domain/`), as the other files
/// name it (`crate::domain::…`).
#[path = "../../host/src/domain"]
pub mod domain {
    pub mod reply;
    pub mod retry;
    pub use greyhook_types as types;
}
pub use domain::{reply, retry, types};

/// The SMTP front end's wire syntax (`host/src/frontend/smtp/wire.rs`).
#[path = "../../host/src/frontend/smtp/wire.rs"]
pub mod smtp_wire;

/// The SMTP front end's DSN parameters (`host/src/frontend/smtp/dsn.rs`).
#[path = "../../host/src/frontend/smtp/dsn.rs"]
pub mod smtp_dsn;

/// The policy protocol's request framing and attribute parsing
/// (`host/src/frontend/policy/request.rs`).
#[path = "../../host/src/frontend/policy/request.rs"]
pub mod policy_request;

/// The milter packet-boundary tracker behind the milter deadlines
/// (`host/src/frontend/milter/frames.rs`).
#[path = "../../host/src/frontend/milter/frames.rs"]
pub mod milter_frames;

/// `--set KEY=VALUE` layering over a filter's TOML (`host/src/daemon/overrides.rs`).
#[path = "../../host/src/daemon/overrides.rs"]
pub mod config;
