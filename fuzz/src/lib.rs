//! The host's parsers of outside input, compiled from their own source
//! files so that a fuzz build does not compile wasmtime (minutes of
//! instrumented build for code no target reaches). Each module is the
//! host's file, unchanged.
#![allow(dead_code, rustdoc::broken_intra_doc_links)]

#[path = "../../host/src/types.rs"]
pub mod types;

#[path = "../../host/src/retry.rs"]
pub mod retry;

#[path = "../../host/src/reply.rs"]
pub mod reply;

/// The SMTP front end's wire syntax (`host/src/smtp/wire.rs`).
#[path = "../../host/src/smtp/wire.rs"]
pub mod smtp_wire;

/// The policy protocol's request framing and attribute parsing
/// (`host/src/policy/request.rs`).
#[path = "../../host/src/policy/request.rs"]
pub mod policy_request;

/// The milter packet-boundary tracker behind the milter deadlines
/// (`host/src/milter/frames.rs`).
#[path = "../../host/src/milter/frames.rs"]
pub mod milter_frames;

/// `--set KEY=VALUE` layering over a filter's TOML (`host/src/config.rs`).
#[path = "../../host/src/config.rs"]
pub mod config;
