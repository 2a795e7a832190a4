//! The reference greylisting filter (`guest/`) as a WebAssembly component,
//! built for `wasm32-wasip2` when this crate builds and embedded as bytes.
//!
//! A crate of its own so that the host library (`greyhook`) builds without
//! the WebAssembly target: its `reference-filter` feature (on by default,
//! and what the `greyhook` binary runs) pulls this in.
#![deny(missing_docs)]

/// The component's bytes.
pub const WASM: &[u8] = include_bytes!(env!("GREYHOOK_REFERENCE_FILTER"));
