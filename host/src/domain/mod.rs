//! The mail side of the contract, with no WebAssembly in it: the types a
//! front end fills in and reads back ([`types`]), how a verdict becomes an
//! SMTP reply ([`reply`]) and how a reply's retry hint is read back
//! ([`retry`]), and the clock that hands filters `now` ([`clock`]).

pub mod clock;
pub mod reply;
pub mod retry;
pub use greyhook_types as types;
