//! The reference filter, option by option, with injected time.

use greyhook::types::Decision;
use greyhook_tests::*;

#[tokio::test]
async fn first_sight_early_retry_pass_and_header() {
    let f = reference("").await;
    let mut c = Client::new(&f, "192.0.2.10", T0);
    let v = c.attempt("alice@example.org", "bob@example.com").await;
    assert_eq!((code(&v), retry(&v)), (Some(451), Some(300)), "{v:?}");
    let r = v.reply().unwrap();
    assert_eq!(r.enhanced.as_deref(), Some("4.7.1"));
    assert_eq!(greyhook::reply::render(r), "451 4.7.1 Greylisted, please try again later retry=00:05:00\r\n");

    c.now = T0 + 100;
    let v = c.attempt("alice@example.org", "bob@example.com").await;
    assert_eq!(retry(&v), Some(200), "an early retry is told the time left");

    c.now = T0 + 312;
    let v = c.attempt("alice@example.org", "bob@example.com").await;
    assert!(passes(&v), "{v:?}");
    assert_eq!(v.add_headers.len(), 1);
    assert_eq!(v.add_headers[0].name, "X-Greylist");
    assert_eq!(v.add_headers[0].value, "delayed 312 seconds by greyhook");
    assert_eq!(v.policy_group.as_deref(), Some("default"));

    c.now = T0 + 400;
    let v = c.attempt("alice@example.org", "bob@example.com").await;
    assert!(passes(&v) && v.add_headers.is_empty(), "later passes carry no header: {v:?}");

    // Another sender from the same client is a new triplet.
    let v = c.attempt("carol@example.org", "bob@example.com").await;
    assert_eq!(retry(&v), Some(300));
}

#[tokio::test]
async fn retry_window_expires_unretried_records() {
    let f = reference("delay = 60\nretry_window = \"1h\"").await;
    let mut c = Client::new(&f, "192.0.2.10", T0);
    assert_eq!(retry(&c.attempt("a@x.org", "b@y.org").await), Some(60));
    c.now = T0 + 3600 + 1;
    assert_eq!(retry(&c.attempt("a@x.org", "b@y.org").await), Some(60), "an expired record starts over");
    c.now = T0 + 3600 + 61;
    assert!(passes(&c.attempt("a@x.org", "b@y.org").await));
}

#[tokio::test]
async fn passed_triplets_live_max_age_refreshed_on_each_pass() {
    let f = reference("delay = 10\nmax_age = \"1d\"\nauto_whitelist_after = 0").await;
    let mut c = Client::new(&f, "192.0.2.10", T0);
    c.attempt("a@x.org", "b@y.org").await;
    c.now = T0 + 10;
    assert!(passes(&c.attempt("a@x.org", "b@y.org").await));
    c.now += 86_000;
    assert!(passes(&c.attempt("a@x.org", "b@y.org").await), "refreshed");
    c.now += 86_000;
    assert!(passes(&c.attempt("a@x.org", "b@y.org").await), "still fresh: the last pass refreshed it");
    c.now += 86_401;
    assert_eq!(retry(&c.attempt("a@x.org", "b@y.org").await), Some(10), "expired after max_age without a pass");
}

#[tokio::test]
async fn auto_whitelist_after_n_passes() {
    let f = reference("delay = 5\nauto_whitelist_after = 3").await;
    let mut c = Client::new(&f, "198.51.100.7", T0);
    for i in 0..3 {
        let s = format!("s{}@x.org", ["alpha", "beta", "gamma"][i]);
        c.now = T0;
        assert_eq!(retry(&c.attempt(&s, "b@y.org").await), Some(5));
        c.now = T0 + 5;
        assert!(passes(&c.attempt(&s, "b@y.org").await));
    }
    // A new triplet from the same /24 now passes at once.
    let mut other = Client::new(&f, "198.51.100.200", T0 + 6);
    let v = other.attempt("new@z.org", "b@y.org").await;
    assert!(passes(&v) && v.add_headers.is_empty(), "{v:?}");
    // But not from another network.
    let mut far = Client::new(&f, "203.0.113.1", T0 + 6);
    assert_eq!(retry(&far.attempt("new@z.org", "b@y.org").await), Some(5));
}

#[tokio::test]
async fn ipv4_24_and_ipv6_64_grouping() {
    let f = reference("delay = 5").await;
    let mut a = Client::new(&f, "192.0.2.1", T0);
    a.attempt("a@x.org", "b@y.org").await;
    let mut b = Client::new(&f, "192.0.2.254", T0 + 5);
    assert!(passes(&b.attempt("a@x.org", "b@y.org").await), "same /24");
    let mut c = Client::new(&f, "192.0.3.1", T0 + 5);
    assert_eq!(retry(&c.attempt("a@x.org", "b@y.org").await), Some(5), "another /24");

    let mut a = Client::new(&f, "2001:db8:1:2::1", T0);
    a.attempt("a@x.org", "b@y.org").await;
    let mut b = Client::new(&f, "2001:db8:1:2:ffff::9", T0 + 5);
    assert!(passes(&b.attempt("a@x.org", "b@y.org").await), "same /64");
    let mut c = Client::new(&f, "2001:db8:1:3::1", T0 + 5);
    assert_eq!(retry(&c.attempt("a@x.org", "b@y.org").await), Some(5), "another /64");

    let f = reference("delay = 5\nipv4_prefix = 32").await;
    let mut a = Client::new(&f, "192.0.2.1", T0);
    a.attempt("a@x.org", "b@y.org").await;
    let mut b = Client::new(&f, "192.0.2.2", T0 + 5);
    assert_eq!(retry(&b.attempt("a@x.org", "b@y.org").await), Some(5), "/32 tracks hosts");
}

#[tokio::test]
async fn sender_normalisation() {
    let f = reference("delay = 5\nauto_whitelist_after = 0").await;
    for (first, retry_as) in [
        ("Alice@Example.ORG", "alice@example.org"),
        ("list+bounce-1@x.org", "list+bounce-2@x.org"),
        ("prvs=1234abcdef=user@x.org", "prvs=9876fedcba=user@x.org"),
        ("SRS0=ab12=TT=orig.example=alice@fwd.example", "SRS0=cd34=UU=orig.example=alice@fwd.example"),
        ("SRS1=x=fwd1.example==ab=TT=orig.example=bob@fwd2.example", "SRS0=cd=UU=orig.example=bob@fwd3.example"),
        ("bounce-12345@lists.example", "bounce-67890@lists.example"),
    ] {
        let mut c = Client::new(&f, "192.0.2.1", T0);
        assert_eq!(retry(&c.attempt(first, "rcpt@y.org").await), Some(5), "{first}");
        c.now = T0 + 5;
        assert!(passes(&c.attempt(retry_as, "rcpt@y.org").await), "{first} then {retry_as}");
    }
    // Off: each spelling is its own sender.
    let f = reference("delay = 5\nnormalize_sender = false").await;
    let mut c = Client::new(&f, "192.0.2.1", T0);
    c.attempt("bounce-1@l.example", "r@y.org").await;
    c.now = T0 + 5;
    assert_eq!(retry(&c.attempt("bounce-2@l.example", "r@y.org").await), Some(5));
}

#[tokio::test]
async fn static_whitelists() {
    let f = reference(
        "whitelist_clients = [\"203.0.113.0/24\", \"2001:db8:aa::/48\"]\nwhitelist_client_names = [\".trusted.example\", \"mx.partner.example\"]\nwhitelist_recipients = [\"spamlovers.example\", \"open@y.org\"]",
    )
    .await;
    assert!(passes(&Client::new(&f, "203.0.113.9", T0).attempt("a@x.org", "b@y.org").await));
    assert!(passes(&Client::new(&f, "2001:db8:aa:1::5", T0).attempt("a@x.org", "b@y.org").await));
    let mut c = Client::new(&f, "192.0.2.1", T0);
    c.session.client_name = Some("out3.Trusted.Example".into());
    assert!(passes(&c.attempt("a@x.org", "b@y.org").await));
    c.session.client_name = Some("mx.partner.example".into());
    assert!(passes(&c.attempt("a@x.org", "b@y.org").await));
    c.session.client_name = Some("evil-mx.partner.example.attacker.net".into());
    assert_eq!(code(&c.attempt("a@x.org", "b@y.org").await), Some(451));
    c.session.client_name = None;
    for r in ["postmaster@y.org", "Abuse@y.org", "anyone@spamlovers.example", "open@y.org"] {
        assert!(passes(&c.attempt("a@x.org", r).await), "{r}");
    }
    assert_eq!(code(&c.attempt("a@x.org", "closed@y.org").await), Some(451));
}

#[tokio::test]
async fn authenticated_sessions_are_never_greylisted() {
    let f = reference("").await;
    let mut c = Client::new(&f, "192.0.2.1", T0);
    c.session.auth_user = Some("alice".into());
    assert!(passes(&c.attempt("a@x.org", "b@y.org").await));
    c.mail("").await;
    c.rcpt("b@y.org").await;
    assert!(passes(&c.data(Some("<1@x>")).await), "not even the null sender at DATA");
}

#[tokio::test]
async fn null_sender_is_greylisted_at_data_not_rcpt() {
    let f = reference("delay = 30").await;
    let mut c = Client::new(&f, "192.0.2.1", T0);
    c.mail("").await;
    assert!(passes(&c.rcpt("b@y.org").await), "never at RCPT");
    let v = c.data(Some("<bounce-1@x.org>")).await;
    assert_eq!((code(&v), retry(&v)), (Some(451), Some(30)));
    c.now = T0 + 30;
    c.mail("").await;
    c.rcpt("b@y.org").await;
    let v = c.data(Some("<bounce-1@x.org>")).await;
    assert!(passes(&v) && v.add_headers[0].value == "delayed 30 seconds by greyhook", "{v:?}");
    // A non-null sender is not touched at DATA in the rcpt stage.
    c.mail("a@x.org").await;
    c.tx.recipients.push(greyhook::types::AcceptedRecipient { address: "b@y.org".into(), policy_group: "default".into() });
    assert!(passes(&c.data(Some("<2@x>")).await));
}

/// A front end builds the message for DATA only when a filter of the chain
/// is called with it: the reference filter, at its default stage, is
/// called for the null sender only.
#[tokio::test]
async fn the_chain_builds_the_message_only_for_a_filter_that_is_called() {
    let f = reference("delay = 30").await;
    let chain = greyhook::Chain::single(f.clone());
    let mut c = Client::new(&f, "192.0.2.1", T0);
    c.mail("a@x.org").await;
    c.tx.recipients.push(greyhook::types::AcceptedRecipient { address: "b@y.org".into(), policy_group: "default".into() });
    let built = std::cell::Cell::new(0);
    let message = || {
        built.set(built.get() + 1);
        greyhook::types::Message { message_id: Some("<1@x.org>".into()), headers: Vec::new() }
    };
    assert!(passes(&chain.on_data_with(&c.ctx(), message).await));
    assert_eq!(built.get(), 0, "a message with a sender: no DATA call, nothing built");
    c.mail("").await;
    assert!(passes(&c.rcpt("b@y.org").await), "a bounce is not greylisted at RCPT");
    c.tx.recipients.push(greyhook::types::AcceptedRecipient { address: "b@y.org".into(), policy_group: "default".into() });
    let v = chain.on_data_with(&c.ctx(), message).await;
    assert_eq!((code(&v), retry(&v), built.get()), (Some(451), Some(30), 1), "a bounce: built once and greylisted");
}

#[tokio::test]
async fn data_stage_keys_on_message_id_one_decision_for_all() {
    let f = reference("stage = \"data\"\ndelay = 60").await;
    let mut c = Client::new(&f, "192.0.2.1", T0);
    c.mail("a@x.org").await;
    assert!(passes(&c.rcpt("b@y.org").await));
    assert!(passes(&c.rcpt("c@y.org").await));
    let v = c.data(Some("<msg-1@x.org>")).await;
    assert_eq!((code(&v), retry(&v)), (Some(451), Some(60)));
    c.now = T0 + 60;
    c.mail("a@x.org").await;
    c.rcpt("b@y.org").await;
    c.rcpt("c@y.org").await;
    assert!(passes(&c.data(Some("<msg-1@x.org>")).await), "same Message-ID passes");
    c.mail("a@x.org").await;
    c.rcpt("b@y.org").await;
    assert_eq!(retry(&c.data(Some("<msg-2@x.org>")).await), Some(60), "a new Message-ID is a new key");
}

#[tokio::test]
async fn seed_000_per_recipient_policy_groups() {
    let cfg = r#"
whitelist_clients = ["192.0.2.0/24"]
[[policy]]
name = "strict"
recipients = ["two@example.com", "four@example.com"]
delay = "10m"
[[policy]]
name = "open"
recipients = ["five@example.com"]
greylist = false
"#;
    let f = reference(cfg).await;
    let mut c = Client::new(&f, "192.0.2.5", T0);
    c.mail("jqpublic@mail.example.com").await;
    let mut lines = Vec::new();
    for r in ["one", "two", "three", "four", "five"] {
        let v = c.rcpt(&format!("{r}@example.com")).await;
        lines.push(match v.reply() {
            Some(rep) => greyhook::reply::render(rep),
            None => "250 2.1.5 Ok\r\n".into(),
        });
    }
    let retry0 =
        "451 4.7.1 This recipient has a different policy than the first one; please retry it in a new transaction retry=00:00:00\r\n";
    assert_eq!(lines, vec!["250 2.1.5 Ok\r\n", retry0, "250 2.1.5 Ok\r\n", retry0, retry0]);
    assert_eq!(c.tx.recipients.iter().map(|r| r.policy_group.as_str()).collect::<Vec<_>>(), ["default", "default"]);
    // The client retries two and four at once, in a new transaction: they
    // share a group and are accepted together; five goes alone.
    c.mail("jqpublic@mail.example.com").await;
    assert!(passes(&c.rcpt("two@example.com").await));
    assert!(passes(&c.rcpt("four@example.com").await));
    assert_eq!(retry(&c.rcpt("five@example.com").await), Some(0));
    assert!(passes(&c.rcpt("postmaster@example.com").await), "postmaster fits any group");
    c.mail("jqpublic@mail.example.com").await;
    assert!(passes(&c.rcpt("five@example.com").await));
}

#[tokio::test]
async fn per_recipient_delay_and_opt_out() {
    let cfg = "[[policy]]\nname = \"slow\"\nrecipients = [\"slow.example\"]\ndelay = \"1h\"\n[[policy]]\nname = \"none\"\nrecipients = [\"vip@y.org\"]\ngreylist = false";
    let f = reference(cfg).await;
    let mut c = Client::new(&f, "192.0.2.1", T0);
    assert_eq!(retry(&c.attempt("a@x.org", "u@slow.example").await), Some(3600));
    assert_eq!(retry(&c.attempt("a@x.org", "u@y.org").await), Some(300));
    let v = c.attempt("a@x.org", "vip@y.org").await;
    assert!(passes(&v) && v.policy_group.as_deref() == Some("none"));
}

#[tokio::test]
async fn connect_stage_421_keyed_on_network() {
    let f = reference("stage = \"connect\"\ndelay = 120").await;
    let c = Client::new(&f, "192.0.2.1", T0);
    let v = f.on_connect(&c.ctx()).await;
    assert_eq!((code(&v), retry(&v)), (Some(421), Some(120)));
    assert_eq!(greyhook::reply::render(v.reply().unwrap()), "421 4.7.1 Greylisted, please try again later retry=00:02:00\r\n");
    let c = Client::new(&f, "192.0.2.99", T0 + 120);
    let v = f.on_connect(&c.ctx()).await;
    assert!(passes(&v) && v.add_headers.is_empty(), "the /24 passed: {v:?}");
    let mut c = Client::new(&f, "192.0.2.99", T0 + 121);
    assert!(passes(&c.attempt("a@x.org", "b@y.org").await), "no RCPT greylisting at stage connect");
}

#[tokio::test]
async fn ehlo_advertises_greylist() {
    let f = reference("").await;
    let c = Client::new(&f, "192.0.2.1", T0);
    let e = f.on_ehlo(&c.ctx()).await;
    assert_eq!(e.keywords, vec!["GREYLIST".to_string()]);
    assert_eq!(e.verdict.decision, Decision::Continue);
    let f = reference("ehlo_keyword = false").await;
    assert!(f.on_ehlo(&c.ctx()).await.keywords.is_empty());
}

#[tokio::test]
async fn unusable_addresses_are_greylisted_never_trap() {
    let f = reference("").await;
    let mut c = Client::new(&f, "192.0.2.1", T0);
    let long = format!("{}@x.org", "a".repeat(400));
    for (s, r) in
        [("a b@x.org", "b@y.org"), ("a@x.org", "b\u{7f}@y.org"), (long.as_str(), "b@y.org"), ("a@x.org", "<b@y.org>"), ("a@x.org", "")]
    {
        c.mail(s).await;
        let v = f.try_on_rcpt(&c.ctx(), r).await.expect("no trap");
        // Client input the filter cannot normalise is keyed on its raw
        // bytes and greylisted, never let through.
        assert_eq!(retry(&v), Some(300), "{s:?} {r:?}: {v:?}");
    }
    assert_eq!(f.stats().failures.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[tokio::test]
async fn bad_config_is_refused_naming_the_key() {
    let rt = runtime();
    for (cfg, key) in
        [("dleay = 3", "dleay"), ("delay = \"soon\"", "delay"), ("ipv6_prefix = 200", "ipv6_prefix"), ("stage = \"helo\"", "stage")]
    {
        let e = load_on(
            &rt,
            greyhook::REFERENCE_FILTER,
            greyhook::FilterOptions { config: cfg.into(), ..Default::default() },
            std::sync::Arc::new(greyhook::store::MemoryStore::new()),
        )
        .await
        .expect_err(cfg);
        assert!(matches!(e, greyhook::LoadError::Init(_)), "{e}");
        assert!(e.to_string().contains(key), "{cfg}: {e}");
    }
}

/// Seed 000: a recipient sent away with `retry=00:00:00` has its greylist
/// record started then, so its retry in a new transaction waits out one
/// delay, not two; the answer carries its group (logged as
/// `action=policy-group`, not as greylisting).
#[tokio::test]
async fn seed_000_retry_pays_one_delay_not_two() {
    let cfg = "[[policy]]\nname = \"strict\"\nrecipients = [\"two@example.com\"]\ndelay = \"10m\"\n";
    let f = reference(cfg).await;
    let mut c = Client::new(&f, "198.51.100.7", T0);
    c.mail("jqpublic@mail.example.com").await;
    assert_eq!(retry(&c.rcpt("one@example.com").await), Some(300), "first recipient greylisted");
    // `one` is not accepted, so `two` is first in this transaction: give it
    // a companion of another group instead.
    c.tx.recipients.push(greyhook::types::AcceptedRecipient { address: "one@example.com".into(), policy_group: "default".into() });
    let v = c.rcpt("two@example.com").await;
    assert_eq!(retry(&v), Some(0));
    assert_eq!(v.policy_group.as_deref(), Some("strict"));
    assert_eq!(greyhook::session::audit::action(&v), "policy-group");
    // Retried at once in a new transaction: the record started 0 s ago.
    c.mail("jqpublic@mail.example.com").await;
    assert_eq!(retry(&c.rcpt("two@example.com").await), Some(600));
    // Ten minutes after it was first sent away, it passes.
    c.now = T0 + 600;
    c.mail("jqpublic@mail.example.com").await;
    assert!(passes(&c.rcpt("two@example.com").await), "one delay, not two");
}
