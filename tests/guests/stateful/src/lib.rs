//! A filter that keeps what it saw in a `thread_local` between hook calls,
//! which the contract asks filters not to do, built with the SDK's
//! per-call arena: the arena must notice that memory allocated in a call
//! outlived it and turn itself off, and the filter must keep working.
//!
//! - `on-mail`: allocates and frees, past the arena's chunk too, keeping
//!   nothing; answers `X-Mail: <bytes it built>`.
//! - `on-rcpt`: remembers the recipient; answers `X-Seen: <all so far>`.

use std::cell::RefCell;

use greyhook_filter::{Context, Filter, Header, Host, Result, Verdict};

#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
struct Stateful;

thread_local! {
    static SEEN: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
fn header(name: &str, value: String) -> Verdict {
    let mut v = Verdict::cont();
    v.add_headers.push(Header { name: name.into(), value });
    v
}

impl Filter for Stateful {
    const NAME: &'static str = "stateful";
    const VERSION: &'static str = "0.1.0";

    fn init(_config: &str) -> std::result::Result<Self, String> {
        Ok(Stateful)
    }

    fn on_mail(&self, _ctx: &Context, sender: &str, _host: &mut dyn Host) -> Result<Verdict> {
        // Many small pieces and one larger than the whole arena.
        let small: Vec<String> = (0..1000).map(|i| format!("{sender}{i}")).collect();
        let big = "x".repeat(300 * 1024);
        let n = small.iter().map(String::len).sum::<usize>() + big.len();
        Ok(header("X-Mail", n.to_string()))
    }

    fn on_rcpt(&self, _ctx: &Context, recipient: &str, _host: &mut dyn Host) -> Result<Verdict> {
        let seen = SEEN.with(|s| {
            let mut s = s.borrow_mut();
            s.push(recipient.to_string());
            s.join(",")
        });
        Ok(header("X-Seen", seen))
    }
}

greyhook_filter::export!(Stateful);
