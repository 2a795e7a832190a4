//! A filter for greyhook's tests built against the contract's 0.2.0
//! (`wit/v0.2.0`, frozen as it was released): a host that speaks a newer
//! 0.2.x must keep loading it and answering its imports, among them the
//! metric updates by name that 0.2.1's handles do not replace.
//!
//! At RCPT it greylists by recipient alone: the first time a `451` with a
//! 60-second retry hint (`greylisted_total` counted, `delay_seconds`
//! observed), after that no opinion (`passed_total` counted).

wit_bindgen::generate!({
    path: "../../../wit/v0.2.0",
    world: "filter",
});

use exports::greyhook::filter::hooks::Guest;
use greyhook::filter::types::{Context, Decision, EhloVerdict, FilterInfo, Message, Reply, Verdict};
use greyhook::filter::{metrics, store};

fn verdict(decision: Decision) -> Verdict {
    Verdict { decision, add_headers: Vec::new(), policy_group: None }
}

struct V020;

impl Guest for V020 {
    fn init(_config: String) -> Result<FilterInfo, String> {
        Ok(FilterInfo { name: "v020".into(), version: "0.1.0".into() })
    }

    fn on_connect(_ctx: Context) -> Verdict {
        verdict(Decision::Continue)
    }

    fn on_ehlo(_ctx: Context) -> EhloVerdict {
        EhloVerdict { verdict: verdict(Decision::Continue), keywords: Vec::new() }
    }

    fn on_mail(_ctx: Context, _sender: String) -> Verdict {
        verdict(Decision::Continue)
    }

    fn on_rcpt(_ctx: Context, recipient: String) -> Verdict {
        let key = format!("seen/{recipient}");
        match store::get_many(std::slice::from_ref(&key)) {
            Ok(found) if found.first().is_some_and(Option::is_some) => {
                metrics::counter_add("passed_total", &[("contract".into(), "0.2.0".into())], 1);
                verdict(Decision::Continue)
            }
            Ok(_) => {
                let _ = store::set(&key, b"1", 3600, Some(0));
                metrics::counter_add("greylisted_total", &[], 1);
                metrics::histogram_observe("delay_seconds", &[], 60.0);
                verdict(Decision::Tempfail(Reply {
                    code: 451,
                    enhanced: Some("4.7.1".into()),
                    text: vec!["Greylisted by a 0.2.0 filter".into()],
                    retry_after: Some(60),
                }))
            }
            Err(_) => verdict(Decision::Continue),
        }
    }

    fn on_data(_ctx: Context, _message: Message) -> Verdict {
        verdict(Decision::Continue)
    }
}

export!(V020);
