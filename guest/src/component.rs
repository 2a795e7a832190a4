//! The component glue: WIT types in, [`crate::filter`] decisions out.

use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::config::Config;
use crate::filter::{self, Greylist, Kv, KvError, Level};

wit_bindgen::generate!({
    path: "../wit",
    world: "filter",
});

use exports::greyhook::filter::hooks::Guest;
use greyhook::filter::types::{
    AcceptedRecipient, Context, Decision, EhloVerdict, FilterInfo, Header, IpAddress, Message, Reply, Session, Transaction, Verdict,
};
use greyhook::filter::{log, store};

thread_local! {
    static FILTER: RefCell<Option<Greylist>> = const { RefCell::new(None) };
}

/// The WIT store and log as a [`Kv`].
struct HostKv;

impl Kv for HostKv {
    fn get(&mut self, key: &str) -> Result<Option<(Vec<u8>, u64)>, KvError> {
        match store::get(key) {
            Ok(e) => Ok(e.map(|e| (e.value, e.version))),
            Err(e) => Err(store_error(e)),
        }
    }
    fn set(&mut self, key: &str, value: &[u8], ttl: u32, if_version: Option<u64>) -> Result<Option<u64>, KvError> {
        match store::set(key, value, ttl, if_version) {
            Ok(store::WriteOutcome::Written(v)) => Ok(Some(v)),
            Ok(store::WriteOutcome::Conflict) => Ok(None),
            Err(e) => Err(store_error(e)),
        }
    }
    fn log(&mut self, level: Level, msg: &str) {
        let level = match level {
            Level::Debug => log::Level::Debug,
            Level::Info => log::Level::Info,
            Level::Warn => log::Level::Warn,
            Level::Error => log::Level::Error,
        };
        log::write(level, msg);
    }
}

fn store_error(e: store::StoreError) -> KvError {
    match e {
        store::StoreError::Unavailable(m) => KvError(format!("store unavailable: {m}")),
        store::StoreError::Limit(m) => KvError(format!("store limit: {m}")),
    }
}

/// The WIT context as the contract's Rust types. Every record is taken
/// apart whole (no `..`): a field added to the WIT stops this compiling
/// until it is carried.
fn ctx(c: Context) -> filter::Context {
    let Context { session, transaction, now } = c;
    let Session { id, client_address, client_name, helo, auth_user, tls } = session;
    let client_address = match client_address {
        IpAddress::Ipv4((a, b, cc, d)) => IpAddr::V4(Ipv4Addr::new(a, b, cc, d)),
        IpAddress::Ipv6((a, b, cc, d, e, f, g, h)) => IpAddr::V6(Ipv6Addr::new(a, b, cc, d, e, f, g, h)),
    };
    let Transaction { sender, recipients } = transaction;
    filter::Context {
        session: filter::Session { id, client_address, client_name, helo, auth_user, tls },
        transaction: filter::Transaction {
            sender,
            recipients: recipients
                .into_iter()
                .map(|AcceptedRecipient { address, policy_group }| filter::AcceptedRecipient { address, policy_group })
                .collect(),
        },
        now,
    }
}

fn reply(r: filter::Reply) -> Reply {
    let filter::Reply { code, enhanced, text, retry_after } = r;
    Reply { code, enhanced, text, retry_after }
}

/// The filter's verdict as the WIT's (taken apart whole, as [`ctx`]).
fn verdict(v: filter::Verdict) -> Verdict {
    let filter::Verdict { decision, add_headers, policy_group } = v;
    Verdict {
        decision: match decision {
            filter::Decision::Continue => Decision::Continue,
            filter::Decision::Accept => Decision::Accept,
            filter::Decision::Tempfail(r) => Decision::Tempfail(reply(r)),
            filter::Decision::Reject(r) => Decision::Reject(reply(r)),
        },
        add_headers: add_headers.into_iter().map(|filter::Header { name, value }| Header { name, value }).collect(),
        policy_group,
    }
}

/// Runs a hook against the configured filter; a store failure or a missing
/// `init` gives `continue` and a log line (never a trap).
fn run(f: impl FnOnce(&Greylist, &mut HostKv) -> Result<filter::Verdict, KvError>) -> Verdict {
    FILTER.with(|cell| {
        let guard = cell.borrow();
        let mut kv = HostKv;
        let Some(g) = guard.as_ref() else {
            kv.log(Level::Error, "hook called before init; answering continue");
            return verdict(filter::Verdict::cont());
        };
        match f(g, &mut kv) {
            Ok(v) => verdict(v),
            Err(e) => {
                kv.log(Level::Warn, &format!("giving up on this call: {}", e.0));
                verdict(filter::Verdict::cont())
            }
        }
    })
}

struct Component;

impl Guest for Component {
    fn init(config: String) -> Result<FilterInfo, String> {
        let c = Config::parse(&config).map_err(|e| e.0)?;
        FILTER.with(|cell| *cell.borrow_mut() = Some(Greylist::new(c)));
        Ok(FilterInfo { name: filter::NAME.into(), version: filter::VERSION.into() })
    }

    fn on_connect(c: Context) -> Verdict {
        run(|g, kv| g.on_connect(&ctx(c), kv))
    }

    fn on_ehlo(_c: Context) -> EhloVerdict {
        let keywords = FILTER.with(|cell| cell.borrow().as_ref().map(Greylist::ehlo_keywords).unwrap_or_default());
        EhloVerdict { verdict: verdict(filter::Verdict::cont()), keywords }
    }

    fn on_mail(_c: Context, _sender: String) -> Verdict {
        verdict(filter::Verdict::cont())
    }

    fn on_rcpt(c: Context, recipient: String) -> Verdict {
        run(|g, kv| g.on_rcpt(&ctx(c), &recipient, kv))
    }

    fn on_data(c: Context, message: Message) -> Verdict {
        run(|g, kv| g.on_data(&ctx(c), message.message_id.as_deref(), kv))
    }
}

export!(Component);
