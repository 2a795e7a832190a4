//! Building blocks of the `greyhook` command that are not a front end:
//! `--set KEY=VALUE` layering over a filter's configuration
//! ([`overrides`]) and the scripted replay of `greyhook simulate`
//! ([`simulate`]).

pub mod overrides;
pub mod simulate;
