//! greyhook's integration tests, one binary (as wasmtime's `tests/all`):
//! the filters run as real components in the real host.

mod cli;
mod dns;
mod farm;
mod farms;
mod greylist;
mod haraka;
mod hostile;
mod languages;
mod milter;
mod observe;
mod opensmtpd;
mod options;
mod policy;
mod postfix;
mod reload;
mod reply;
mod sandbox;
mod sdk;
mod smtp;
mod store;
mod storefault;
