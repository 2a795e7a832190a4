//! A filter that keeps what it saw in a `thread_local` between hook calls,
//! which the contract asks filters not to do, built with the SDK's
//! per-call arena: the arena must notice that memory allocated in a call
//! outlived it and turn itself off, and the filter must keep working.
//!
//! - `on-mail`: allocates and frees, past the arena's chunk too, keeping
//!   nothing; answers `X-Mail: <bytes it built>`.
//! - `on-rcpt`: remembers the recipient; answers `X-Seen: <all so far>`.
//! - `on-connect`: the store calls at and past their limits, chosen by the
//!   client name (`roundtrip`, `cas`, `long-key`, `empty-key`, `many-keys`,
//!   `big-value`); answers `X-Store: <what it read>`.
//! - its configuration names the hooks it asks the host to skip (contract
//!   0.2.2): `skip = mail` (and `on-mail` is answered by the host),
//!   `skip = ehlo` (advertising `XSKIPPED`), `skip = bad-keyword` (an EHLO
//!   keyword with a space in it and a CR: the filter must not load);
//!   `skip = data-with-sender` (0.2.3: `on-data` for the null sender only).
//! - `on-data`: answers `X-Data: <the sender>`.
//! - `on-ehlo`: keeps nothing; sends the `metrics` import what a careless
//!   filter might (labels out of order, a duplicated label, too many
//!   labels, bad names), which the host must sort out or drop.

use std::cell::RefCell;

use greyhook_filter::{Context, EhloVerdict, Filter, Header, Host, Message, Phase, Result, SkipHooks, Verdict};

#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
struct Stateful {
    skip: SkipHooks,
}

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

    fn init(config: &str) -> std::result::Result<Self, String> {
        let skip = match config.trim() {
            "" => SkipHooks::default(),
            "skip = mail" => SkipHooks { phases: vec![Phase::Mail], ..SkipHooks::default() },
            "skip = ehlo" => SkipHooks { phases: vec![Phase::Ehlo], ehlo_keywords: vec!["XSKIPPED".into()], ..SkipHooks::default() },
            "skip = bad-keyword" => {
                SkipHooks { phases: vec![Phase::Ehlo], ehlo_keywords: vec!["GREY LIST\r".into()], ..SkipHooks::default() }
            }
            "skip = data-with-sender" => SkipHooks { data_null_sender_only: true, ..SkipHooks::default() },
            other => return Err(format!("unknown configuration {other:?}")),
        };
        Ok(Stateful { skip })
    }

    fn skip_hooks(&self) -> SkipHooks {
        self.skip.clone()
    }

    fn on_connect(&self, ctx: &Context, host: &mut dyn Host) -> Result<Verdict> {
        use greyhook_filter::WriteOutcome;
        let read = |e: Option<greyhook_filter::Entry>| e.map_or("none".to_string(), |e| String::from_utf8_lossy(&e.value).into_owned());
        let said = match ctx.session.client_name.as_deref().unwrap_or("") {
            "roundtrip" => {
                host.set("k", b"value-1", 60, None)?;
                let one = read(host.get("k")?);
                let many: Vec<String> = host.get_many(&["absent", "k"])?.into_iter().map(read).collect();
                format!("{one} {}", many.join(" "))
            }
            "cas" => {
                let WriteOutcome::Written(v) = host.set("c", b"1", 60, None)? else { return Ok(header("X-Store", "no write".into())) };
                match host.set("c", b"2", 60, Some(v + 1))? {
                    WriteOutcome::Conflict => format!("conflict {}", read(host.get("c")?)),
                    WriteOutcome::Written(_) => "written".into(),
                }
            }
            "long-key" => read(host.get(&"k".repeat(257))?),
            "empty-key" => read(host.get("")?),
            "many-keys" => {
                let keys: Vec<String> = (0..1000).map(|i| format!("k{i}")).collect();
                let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                format!("{}", host.get_many(&keys)?.len())
            }
            "big-value" => format!("{:?}", host.set("big", &vec![0u8; 17 * 1024], 60, None)?),
            _ => "nothing".into(),
        };
        Ok(header("X-Store", said))
    }

    fn on_ehlo(&self, _ctx: &Context, host: &mut dyn Host) -> Result<EhloVerdict> {
        // One series, whatever the order of its labels.
        host.counter_add("odd_total", &[("b", "2"), ("a", "1")], 1);
        host.counter_add("odd_total", &[("a", "1"), ("b", "2")], 2);
        // A duplicated label: the first one given counts.
        host.counter_add("dup_total", &[("k", "first"), ("k", "second")], 1);
        // Dropped: five labels, a bad metric name, a bad label name, a control character.
        host.counter_add("many_total", &[("a", "1"), ("b", "2"), ("c", "3"), ("d", "4"), ("e", "5")], 1);
        host.counter_add("Bad-Name", &[], 1);
        host.counter_add("ok_total", &[("Bad Label", "x")], 1);
        host.observe("odd_seconds", &[("v", "line\nbreak")], 1.0);
        host.observe("odd_seconds", &[("v", "fine")], 0.5);
        // Handles (0.2.1) used wrongly: one never given, a counter's for a
        // histogram's update. Dropped and counted, not a trap.
        #[cfg(target_arch = "wasm32")]
        {
            use greyhook_filter::wasm::bindings::greyhook::filter::metrics;
            metrics::add(4242, 1);
            if let Some(h) = metrics::counter("odd_total", &[("a", "1"), ("b", "2")]) {
                metrics::observe(h, 1.0);
                metrics::add(h, 3);
            }
            if let Some(h) = metrics::histogram("odd_seconds", &[("v", "fine")]) {
                metrics::observe(h, 0.25);
            }
            // A bad name gets no handle (and counts as one dropped update).
            assert!(metrics::counter("Bad-Name", &[]).is_none());
        }
        Ok(EhloVerdict { verdict: Verdict::cont(), keywords: Vec::new() })
    }

    fn on_mail(&self, _ctx: &Context, sender: &str, _host: &mut dyn Host) -> Result<Verdict> {
        // Many small pieces and one larger than the whole arena.
        let small: Vec<String> = (0..1000).map(|i| format!("{sender}{i}")).collect();
        let big = "x".repeat(300 * 1024);
        let n = small.iter().map(String::len).sum::<usize>() + big.len();
        Ok(header("X-Mail", n.to_string()))
    }

    fn on_data(&self, ctx: &Context, _message: &Message, _host: &mut dyn Host) -> Result<Verdict> {
        Ok(header("X-Data", ctx.transaction.sender.clone().unwrap_or_default()))
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
