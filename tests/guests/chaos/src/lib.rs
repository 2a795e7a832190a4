//! A filter for greyhook's tests that misbehaves on demand, chosen by the
//! recipient's local part at RCPT (`panic@x`, `loop@x`, ...). Any other
//! recipient gets `accept` with an `X-Chaos: ok` header, and the sender
//! `store@x` exercises the store; the sender `tempfail-mail@x` gets a
//! two-line 451 at MAIL, a message with the Message-ID
//! `<tempfail-data@...>` a 451 at the end of DATA (`<loop-data@...>` a
//! data hook that loops until its deadline, `<count-headers@...>` an
//! `X-Chaos: headers N` header counting the headers handed,
//! `<echo-headers@...>` one showing them), and a client named
//! `panic.example` a trap at connect. `init` refuses the configuration `fail`.

wit_bindgen::generate!({
    path: "../../../wit/v0.1",
    world: "filter",
});

use exports::greyhook::filter::hooks::Guest;
use greyhook::filter::types::{Context, Decision, EhloVerdict, FilterInfo, Header, Message, Reply, Verdict};
use greyhook::filter::{log, store};

static EHLO_PANIC: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn verdict(decision: Decision) -> Verdict {
    Verdict { decision, add_headers: Vec::new(), policy_group: None }
}

fn header(name: &str, value: String) -> Verdict {
    Verdict { decision: Decision::Accept, add_headers: vec![Header { name: name.into(), value }], policy_group: None }
}

#[inline(never)]
fn recurse(n: u64) -> u64 {
    let pad = [n; 64];
    if n == u64::MAX { 0 } else { recurse(n + 1).wrapping_add(std::hint::black_box(pad)[3]) }
}

/// Bounded recursion: about 1 MiB of Wasm stack at depth 20 000, more than
/// the default 512 KiB cap and less than a 4 MiB one.
#[inline(never)]
fn deep(n: u64) -> u64 {
    if n == 0 { 0 } else { deep(std::hint::black_box(n - 1)).wrapping_mul(31).wrapping_add(std::hint::black_box(n)) }
}

struct Chaos;

impl Guest for Chaos {
    fn init(config: String) -> Result<FilterInfo, String> {
        if config.trim() == "fail" {
            return Err("key `fail`: this configuration is refused on purpose".into());
        }
        // A configuration with `ehlo_panic` makes every on-ehlo trap: the
        // host's smoke call at load must refuse such a version.
        EHLO_PANIC.store(config.contains("ehlo_panic"), std::sync::atomic::Ordering::Relaxed);
        Ok(FilterInfo { name: "chaos".into(), version: "0.0.1".into() })
    }

    fn on_connect(c: Context) -> Verdict {
        // A trap at connect when the client's name asks for it.
        if c.session.client_name.as_deref() == Some("panic.example") {
            panic!("chaos: panic at connect");
        }
        verdict(Decision::Continue)
    }

    fn on_ehlo(c: Context) -> EhloVerdict {
        if EHLO_PANIC.load(std::sync::atomic::Ordering::Relaxed) {
            panic!("chaos: panic at ehlo");
        }
        // An invalid keyword only when asked (HELO `bad-ehlo`), so the
        // filter passes the host's reload smoke test otherwise.
        let keywords = if c.session.helo.as_deref() == Some("bad-ehlo") { vec!["X\r\n250 INJECTED".into()] } else { vec!["CHAOS".into()] };
        EhloVerdict { verdict: verdict(Decision::Continue), keywords }
    }

    fn on_mail(_c: Context, sender: String) -> Verdict {
        // A tempfail at MAIL, multi-line, for the front ends' tests.
        if sender.starts_with("tempfail-mail@") {
            return verdict(Decision::Tempfail(Reply {
                code: 451,
                enhanced: Some("4.7.1".into()),
                text: vec!["Not now.".into(), "Senders like you wait a minute".into()],
                retry_after: Some(60),
            }));
        }
        verdict(Decision::Continue)
    }

    fn on_rcpt(c: Context, recipient: String) -> Verdict {
        let what = recipient.split('@').next().unwrap_or("");
        match what {
            "panic" => panic!("chaos: panic on request"),
            "loop" => loop {
                std::hint::black_box(0u8);
            },
            "memory" => {
                let mut hog: Vec<Vec<u8>> = Vec::new();
                loop {
                    hog.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hog);
                }
            }
            // How much memory the instance may take: MiB allocated until
            // the cap refuses one more (without trapping).
            "memory-probe" => {
                let mut hog: Vec<Vec<u8>> = Vec::new();
                loop {
                    let mut v: Vec<u8> = Vec::new();
                    if v.try_reserve_exact(1 << 20).is_err() {
                        return header("X-Chaos", format!("memory {} MiB", hog.len()));
                    }
                    v.resize(1 << 20, 1);
                    hog.push(std::hint::black_box(v));
                }
            }
            "recurse" => header("X-Chaos", recurse(0).to_string()),
            // The HELO name as handed, for the hosts' bound on it.
            "helo-length" => header("X-Chaos", format!("helo {} bytes", c.session.helo.as_deref().map_or(0, str::len))),
            "deep" => header("X-Chaos", format!("deep {}", deep(20_000) % 10)),
            "continue" => Verdict {
                decision: Decision::Continue,
                add_headers: vec![Header { name: "X-Chaos".into(), value: "passed on".into() }],
                policy_group: None,
            },
            "huge-reply" => {
                verdict(Decision::Tempfail(Reply { code: 451, enhanced: None, text: vec!["x".repeat(1 << 20)], retry_after: None }))
            }
            // Replies the host must refuse (only it writes the hint; the
            // hint only on 421/450/451), and a 421 that must close.
            "hint-in-text" => verdict(Decision::Tempfail(Reply {
                code: 451,
                enhanced: Some("4.7.1".into()),
                text: vec!["Wait retry=24:00:00".into()],
                retry_after: Some(300),
            })),
            "hint-on-452" => {
                verdict(Decision::Tempfail(Reply { code: 452, enhanced: None, text: vec!["full".into()], retry_after: Some(300) }))
            }
            "close-421" => verdict(Decision::Tempfail(Reply {
                code: 421,
                enhanced: Some("4.7.0".into()),
                text: vec!["Go away".into()],
                retry_after: Some(60),
            })),
            "bad-code" => verdict(Decision::Tempfail(Reply { code: 250, enhanced: None, text: vec!["ok?".into()], retry_after: None })),
            "inject" => {
                verdict(Decision::Reject(Reply { code: 550, enhanced: None, text: vec!["no\r\n250 OK".into()], retry_after: None }))
            }
            "inject-header" => header("X-Chaos", "a\r\nBcc: victim@example.com".into()),
            "store-flood" => {
                for i in 0..10_000u32 {
                    if store::set(&format!("k{i}"), b"v", 60, None).is_err() {
                        break;
                    }
                }
                verdict(Decision::Continue)
            }
            // What issue 11 found: 64 writes of 16 KiB with a 136-year
            // TTL, and 10,000 log lines, in one call.
            "quota-flood" => {
                let mut written = 0;
                for i in 0..64u32 {
                    if store::set(&format!("qf{i}"), &vec![7u8; 16 << 10], u32::MAX, None).is_ok() {
                        written += 1;
                    }
                }
                for i in 0..10_000u32 {
                    log::write(log::Level::Warn, &format!("chaos flood line {i}"));
                }
                header("X-Chaos", format!("wrote {written}"))
            }
            "store-big" => {
                let _ = store::set("big", &vec![0u8; 1 << 20], 60, None);
                verdict(Decision::Continue)
            }
            "escape" => {
                // Try to reach another filter's namespace.
                let k = format!("../greylist/{}", c.transaction.sender.unwrap_or_default());
                let _ = store::set(&k, b"x", 60, None);
                match store::get("../greylist/probe") {
                    Ok(Some(_)) => header("X-Chaos", "escaped".into()),
                    _ => header("X-Chaos", "contained".into()),
                }
            }
            "counter" => {
                // Read-modify-write with compare-and-swap until it lands.
                for _ in 0..1000 {
                    let (n, ver) = match store::get("counter") {
                        Ok(Some(e)) => (String::from_utf8_lossy(&e.value).parse::<u64>().unwrap_or(0), e.version),
                        Ok(None) => (0, 0),
                        Err(_) => return verdict(Decision::Continue),
                    };
                    if let Ok(store::WriteOutcome::Written(_)) = store::set("counter", (n + 1).to_string().as_bytes(), 3600, Some(ver)) {
                        return header("X-Chaos", (n + 1).to_string());
                    }
                }
                verdict(Decision::Continue)
            }
            _ => {
                log::write(log::Level::Info, "chaos: ok\r\nforged log line");
                header("X-Chaos", "ok".into())
            }
        }
    }

    fn on_data(_c: Context, m: Message) -> Verdict {
        // A data hook that runs until its deadline cuts it.
        if m.message_id.as_deref().is_some_and(|id| id.starts_with("<loop-data@")) {
            loop {
                std::hint::black_box(0u8);
            }
        }
        // A tempfail at the end of DATA, for the front ends' tests.
        if m.message_id.as_deref().is_some_and(|id| id.starts_with("<tempfail-data@")) {
            return verdict(Decision::Tempfail(Reply {
                code: 451,
                enhanced: Some("4.7.1".into()),
                text: vec!["Not this message, not now".into()],
                retry_after: Some(120),
            }));
        }
        // How many headers the host handed, for the front ends' bounds.
        if m.message_id.as_deref().is_some_and(|id| id.starts_with("<count-headers@")) {
            return header("X-Chaos", format!("headers {}", m.headers.len()));
        }
        // The headers handed, for the front ends' unfolding and bounds:
        // `name=value` each (`name=<N bytes>` past 64 bytes), joined by ` | `.
        if m.message_id.as_deref().is_some_and(|id| id.starts_with("<echo-headers@")) {
            let shown: Vec<String> =
                m.headers
                    .iter()
                    .map(|h| {
                        if h.value.len() > 64 { format!("{}=<{} bytes>", h.name, h.value.len()) } else { format!("{}={}", h.name, h.value) }
                    })
                    .collect();
            return header("X-Chaos", shown.join(" | "));
        }
        verdict(Decision::Continue)
    }
}

export!(Chaos);
