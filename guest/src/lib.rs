//! greyhook's reference greylisting filter.
//!
//! Built for `wasm32-wasip2` this crate is `greylist.wasm`, a component of
//! the `greyhook:filter/filter` world (see `wit/greyhook.wit`). Built
//! natively it is the same logic as a library, so unit tests and the
//! native-vs-Wasm benchmark run exactly the code the component runs.
//!
//! - [`config`]: the operator's configuration (TOML), parsed and validated.
//! - [`normalize`]: client networks, sender and recipient normalisation, the triplet key.
//! - [`identity`]: who the client is (SPF domain, FCrDNS organisation,
//!   network) and whether to greylist it at all (DNSWL, selective greylisting).
//! - [`filter`]: the decisions, against the SDK's [`greyhook_filter::Host`].
//!
//! It is written on the filter SDK (`sdk/rust`, crate `greyhook-filter`):
//! `component.rs` implements [`greyhook_filter::Filter`] and exports it.
#![deny(missing_docs)]

mod bytes;
pub mod config;
pub mod filter;
pub mod identity;
pub mod normalize;

mod component;
