//! Write [greyhook](https://example.invalid/greyhook) filters in Rust.
//!
//! A filter is a WebAssembly component of the `greyhook:filter@0.2.1`
//! contract (vendored in this crate's `wit/`). With this crate it is a type
//! that implements [`Filter`] — every hook defaults to "no opinion" — and
//! one line, [`export!`], that makes it the component's exports when built
//! for `wasm32-wasip2` and does nothing natively, so the same crate runs
//! its unit tests with plain `cargo test` against the [`testing`] harness
//! (an in-memory store with TTLs and compare-and-swap, a fake resolver and
//! SPF, an injectable clock, and a session driver).
//!
//! ```
//! use greyhook_filter::{Context, Filter, Host, Result, Verdict, tempfail};
//! use greyhook_filter::verdict::VerdictExt;
//!
//! /// Tempfails every first attempt from a sender domain, for 60 seconds.
//! struct Slow;
//!
//! impl Filter for Slow {
//!     const NAME: &'static str = "slow";
//!     const VERSION: &'static str = "0.1.0";
//!
//!     fn init(_config: &str) -> std::result::Result<Self, String> {
//!         Ok(Slow)
//!     }
//!
//!     fn on_rcpt(&self, ctx: &Context, _recipient: &str, host: &mut dyn Host) -> Result<Verdict> {
//!         let sender = ctx.transaction.sender.as_deref().unwrap_or("");
//!         let key = format!("seen/{}", sender.rsplit('@').next().unwrap_or(""));
//!         let first = greyhook_filter::store::get_u64(host, &key)?;
//!         match first {
//!             Some(t) if ctx.now >= t + 60 => Ok(Verdict::cont()),
//!             Some(t) => Ok(tempfail("Try again later").retry_after(t + 60 - ctx.now).into()),
//!             None => {
//!                 greyhook_filter::store::set_u64(host, &key, ctx.now, greyhook_filter::store::days(1))?;
//!                 Ok(tempfail("Try again later").retry_after(60).into())
//!             }
//!         }
//!     }
//! }
//!
//! greyhook_filter::export!(Slow);
//!
//! // Natively, the harness drives it:
//! let mut h = greyhook_filter::testing::Harness::<Slow>::new("").unwrap();
//! let mut s = h.session("192.0.2.1");
//! s.mail("a@example.org");
//! assert!(s.rcpt("b@example.com").is_tempfail());
//! h.advance(61);
//! let mut s = h.session("192.0.2.1");
//! s.mail("a@example.org");
//! assert!(s.rcpt("b@example.com").passes());
//! ```
//!
//! Modules: [`host`] (what the host offers: store, DNS, SPF, metrics, log),
//! [`verdict`] (reply builders), [`store`] (typed values and a bounded
//! compare-and-swap loop), [`net`] (client networks, domains), [`testing`]
//! (the native harness), [`arena`] (the per-call arena allocator, feature
//! `arena`).
#![deny(missing_docs)]

pub mod arena;
pub mod host;
pub mod net;
#[doc(hidden)]
pub mod series;
pub mod spf;
pub mod store;
pub mod testing;
pub mod verdict;

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod wasm;

pub use greyhook_types::{
    AcceptedRecipient, Context, Decision, EhloVerdict, FilterInfo, Header, Message, Phase, Reply, Session, SkipHooks, Transaction, Verdict,
};
pub use host::{DnsError, Entry, Host, Level, RecordType, SpfOutcome, SpfResult, StoreError, WriteOutcome};
pub use verdict::{ReplyBuilder, reject, tempfail};

/// The contract version this crate builds filters for.
pub const CONTRACT: &str = "greyhook:filter@0.2.3";

/// Why a hook gave up. The exported glue logs it (`warn`) and answers
/// "no opinion" (`continue`); when a store call failed during the hook the
/// host applies the operator's failure policy instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(pub String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Error {
        Error(format!("store: {e}"))
    }
}

impl From<DnsError> for Error {
    fn from(e: DnsError) -> Error {
        Error(format!("dns: {e}"))
    }
}

impl From<String> for Error {
    fn from(e: String) -> Error {
        Error(e)
    }
}

impl From<&str> for Error {
    fn from(e: &str) -> Error {
        Error(e.to_string())
    }
}

/// A hook's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A greyhook filter. Every hook has a default that answers "no opinion";
/// implement the ones the filter decides at. Hooks are stateless: anything
/// to remember between calls goes through the `host`'s store (the host may
/// run many instances, on many machines).
pub trait Filter: Sized + 'static {
    /// The filter's name, e.g. `spf-domain`: in the host's logs, and its
    /// store namespace unless the operator sets one. Letters, digits, `-`,
    /// `_` and `.`; 1 to 64 characters.
    const NAME: &'static str;
    /// The filter's version.
    const VERSION: &'static str;

    /// Builds the filter from the operator's configuration (TOML text;
    /// empty for defaults). An error refuses the filter: name the bad key.
    fn init(config: &str) -> std::result::Result<Self, String>;

    /// The hooks this filter has no use for, asked once right after
    /// [`Filter::init`] and told to the host (contract 0.2.2's
    /// `negotiate.skip-hooks`): the host then does not call them and
    /// answers each itself, `continue` with nothing to add, and at EHLO
    /// with [`SkipHooks::ehlo_keywords`]. Skip every hook the filter would
    /// answer that way anyway: each costs the host a call at every SMTP
    /// step of its phase. [`SkipHooks::data_null_sender_only`] (0.2.3's
    /// `negotiate.data-for-null-sender-only`) keeps `on-data` for the null
    /// sender alone, for a filter that decides at RCPT and leaves DATA for
    /// the bounces it cannot key on a sender. Derive it from the
    /// configuration alone (the host asks the first instance and applies
    /// the answer to all). The default skips none. The
    /// [`testing::Harness`] skips them too.
    fn skip_hooks(&self) -> SkipHooks {
        SkipHooks::default()
    }

    /// The client connected (a tempfail is a `421` at the greeting).
    fn on_connect(&self, ctx: &Context, host: &mut dyn Host) -> Result<Verdict> {
        let _ = (ctx, host);
        Ok(Verdict::cont())
    }

    /// HELO/EHLO; the keywords are advertised where the front end can.
    fn on_ehlo(&self, ctx: &Context, host: &mut dyn Host) -> Result<EhloVerdict> {
        let _ = (ctx, host);
        Ok(EhloVerdict { verdict: Verdict::cont(), keywords: Vec::new() })
    }

    /// MAIL FROM (`""` is the null sender).
    fn on_mail(&self, ctx: &Context, sender: &str, host: &mut dyn Host) -> Result<Verdict> {
        let _ = (ctx, sender, host);
        Ok(Verdict::cont())
    }

    /// RCPT TO.
    fn on_rcpt(&self, ctx: &Context, recipient: &str, host: &mut dyn Host) -> Result<Verdict> {
        let _ = (ctx, recipient, host);
        Ok(Verdict::cont())
    }

    /// End of DATA.
    fn on_data(&self, ctx: &Context, message: &Message, host: &mut dyn Host) -> Result<Verdict> {
        let _ = (ctx, message, host);
        Ok(Verdict::cont())
    }
}

/// Makes `$filter` (a type implementing [`Filter`]) the component's
/// exports when building for `wasm32-wasip2`; natively it expands to
/// nothing, so `cargo test` builds the same crate without the bindings.
/// Use it once, at the crate root of a `cdylib` crate.
#[macro_export]
macro_rules! export {
    ($filter:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            use $crate::wasm::bindings::exports::greyhook::filter::hooks as __hooks;
            struct __GreyhookComponent;
            impl __hooks::Guest for __GreyhookComponent {
                fn init(config: ::std::string::String) -> ::std::result::Result<__hooks::FilterInfo, ::std::string::String> {
                    $crate::wasm::init::<$filter>(config)
                }
                fn on_connect(c: __hooks::Context) -> __hooks::Verdict {
                    $crate::wasm::on_connect::<$filter>(c)
                }
                fn on_ehlo(c: __hooks::Context) -> __hooks::EhloVerdict {
                    $crate::wasm::on_ehlo::<$filter>(c)
                }
                fn on_mail(c: __hooks::Context, sender: ::std::string::String) -> __hooks::Verdict {
                    $crate::wasm::on_mail::<$filter>(c, sender)
                }
                fn on_rcpt(c: __hooks::Context, recipient: ::std::string::String) -> __hooks::Verdict {
                    $crate::wasm::on_rcpt::<$filter>(c, recipient)
                }
                fn on_data(c: __hooks::Context, m: __hooks::Message) -> __hooks::Verdict {
                    $crate::wasm::on_data::<$filter>(c, m)
                }
            }
    $crate::wasm::bindings::__greyhook_export!(__GreyhookComponent with_types_in $crate::wasm::bindings);
        };
    };
}

#[cfg(test)]
mod tests {
    /// The vendored contract is the repository's: the SDK builds filters
    /// for exactly what the host links.
    #[test]
    fn the_vendored_wit_is_the_contract() {
        let vendored = include_str!("../wit/greyhook.wit");
        let contract = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../wit/greyhook.wit")).unwrap();
        assert_eq!(vendored, contract, "sdk/rust/wit/greyhook.wit differs from wit/greyhook.wit: copy it over");
        assert!(vendored.contains(&format!("package {};", super::CONTRACT)));
    }
}
