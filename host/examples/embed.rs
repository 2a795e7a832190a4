//! Embedding greyhook in an MTA: load a filter, give it a store, drive one
//! SMTP session through a chain, send the replies it returns, and sweep
//! the store — everything an MTA author needs, in the order they need it.
//!
//! `cargo run -p greyhook --example embed` prints the conversation: the
//! first attempt is greylisted at RCPT with the draft's `451 … retry=`,
//! the retry after the delay passes with an `X-Greylist` header.

use std::sync::Arc;

use greyhook::clock::{Clock, ManualClock};
use greyhook::store::{RedbStore, Store};
use greyhook::types::Message;
use greyhook::{Chain, FilterOptions, Hooks, Runtime, RuntimeConfig, SmtpSession};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // 1. The runtime: one wasmtime engine with greyhook's sandbox limits.
    let runtime = Runtime::new(RuntimeConfig::default())?;

    // 2. A store the filter keeps its triplets in: the embedded redb file
    //    (or MemoryStore, or RedisStore for an MX farm).
    let dir = tempfile::tempdir()?;
    let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.path().join("greyhook.db"), Default::default())?);

    // 3. A filter: the reference greylisting filter, with its own settings
    //    (TOML) — a 5-minute delay. Any component built against
    //    `wit/greyhook.wit` loads the same way from its bytes.
    let options = FilterOptions { config: "delay = \"5m\"".into(), ..FilterOptions::default() };
    let filter = runtime.load(greyhook::REFERENCE_FILTER, options, store.clone()).await?;
    println!("loaded {} {}", filter.info().name, filter.info().version);

    // 4. The chain (one filter here; `Chain::new` takes several, and a
    //    `runtime::reload::Reloader` slot for hot reload) and the clock that
    //    hands filters `now` (a manual one, so the 5 minutes pass at once).
    let clock = Arc::new(ManualClock::new(1_700_000_000));
    let hooks = Hooks { chain: Chain::single(filter), clock: clock.clone(), resolver: None, front_end: Hooks::EMBEDDED };

    // 5. One SMTP session per client connection; one call per command.
    for attempt in 1..=2 {
        println!("-- attempt {attempt} at {}", clock.now());
        let mut session = SmtpSession::new(hooks.clone(), format!("conn-{attempt}"), "192.0.2.1".parse()?);
        // 6. A verdict with a reply is sent as is (the draft's codes and
        //    `retry=` hint, rendered and checked by the host) and ends the
        //    transaction; none means the MTA answers as it would without
        //    greyhook. Headers a verdict asks for are added at delivery.
        let mut refused = false;
        for command in ["CONNECT", "EHLO mail.example.org", "MAIL FROM:<alice@example.org>", "RCPT TO:<bob@example.com>"] {
            let verdict = match command.split_whitespace().next() {
                Some("CONNECT") => session.connect().await,
                Some("EHLO") => session.ehlo("mail.example.org").await.verdict,
                Some("MAIL") => session.mail("alice@example.org").await,
                _ => session.rcpt("bob@example.com").await,
            };
            println!("C: {command}");
            if let Some(reply) = verdict.reply() {
                print!("S: {}", greyhook::reply::render(reply));
                refused = true;
                break;
            }
            println!("S: (the MTA's own 2xx)");
            for h in &verdict.add_headers {
                println!("   header to add: {}: {}", h.name, h.value);
            }
        }
        if !refused {
            // The header section's lines as the MTA read them (CRLF cut,
            // up to the empty line): read as greyhook's own front ends
            // read them, unfolded and bounded, with the Message-ID found
            // wherever it stands.
            let message: Message = greyhook::session::read_header_section(["Subject: hello", "Message-ID:", " <m1@example.org>"]);
            let verdict = session.data(&message).await;
            println!("C: DATA …\nS: {}", verdict.reply().map_or("(the MTA's own 250)".to_string(), greyhook::reply::render));
        }
        clock.advance(6 * 60);
    }

    // 7. Housekeeping the MTA runs now and then: expired records go.
    let swept = store.sweep(clock.now() + 400 * 24 * 3600).await?;
    println!("swept {swept} expired records");
    store.flush().await?;
    Ok(())
}
