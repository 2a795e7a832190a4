//! A chain of filters, evaluated in order until one gives a final verdict
//! (accept, tempfail or reject); `continue` passes the call on. Headers
//! from every filter asked are kept; the first policy group given wins; EHLO
//! keywords are the union. Each link is a [`FilterSlot`], so one filter can
//! be reloaded without touching the others.

use std::sync::Arc;

use crate::domain::reply::MAX_HEADERS;
use crate::domain::types::{Context, Decision, EhloVerdict, Message, Phase, Verdict};
use crate::runtime::Filter;
use crate::runtime::reload::FilterSlot;

/// Filters in order.
#[derive(Clone)]
pub struct Chain {
    links: Arc<Vec<FilterSlot>>,
}

/// Folds `v` into `acc`; true if `v` is final.
fn merge(acc: &mut Verdict, v: Verdict) -> bool {
    let room = MAX_HEADERS.saturating_sub(acc.add_headers.len());
    acc.add_headers.extend(v.add_headers.into_iter().take(room));
    if acc.policy_group.is_none() {
        acc.policy_group = v.policy_group;
    }
    match v.decision {
        Decision::Continue => false,
        d => {
            acc.decision = d;
            true
        }
    }
}

macro_rules! hook {
    ($(#[$doc:meta])* $name:ident($($arg:ident: $ty:ty),*)) => {
        $(#[$doc])*
        pub async fn $name(&self, ctx: &Context $(, $arg: $ty)*) -> Verdict {
            let mut acc = Verdict::cont();
            for link in self.links.iter() {
                let filter = link.load();
                if merge(&mut acc, filter.$name(ctx $(, $arg)*).await) {
                    break;
                }
            }
            acc
        }
    };
}

impl Chain {
    /// A chain of these slots, asked in order (a [`Reloader`]'s slot
    /// follows its reloads; [`FilterSlot::fixed`] holds one filter).
    ///
    /// [`Reloader`]: crate::runtime::reload::Reloader
    pub fn new(links: Vec<FilterSlot>) -> Chain {
        Chain { links: Arc::new(links) }
    }

    /// A chain of one filter that nothing reloads.
    pub fn single(filter: Filter) -> Chain {
        Chain::new(vec![FilterSlot::fixed(filter)])
    }

    /// The slots.
    pub fn links(&self) -> &[FilterSlot] {
        &self.links
    }

    hook!(
        /// The connect hook along the chain.
        on_connect()
    );
    hook!(
        /// The MAIL hook along the chain.
        on_mail(sender: &str)
    );
    hook!(
        /// The RCPT hook along the chain.
        on_rcpt(recipient: &str)
    );
    hook!(
        /// The DATA hook along the chain.
        on_data(message: &Message)
    );

    /// The DATA hook along the chain, with the message built by `message`
    /// only once a filter is to be called with it. A filter that asked not
    /// to be called for this transaction (the reference filter is called
    /// for the null sender only) is answered as it said, `continue`, so a
    /// front end need not parse the header section of most messages. The
    /// skip is decided on the version each link holds for its call, so a
    /// reload cannot leave a filter with a message that was never built.
    /// `message` may return the message or a reference to one.
    pub async fn on_data_with<M: std::borrow::Borrow<Message>>(&self, ctx: &Context, message: impl FnOnce() -> M) -> Verdict {
        let mut acc = Verdict::cont();
        let message = std::cell::LazyCell::new(message);
        for link in self.links.iter() {
            let filter = link.load();
            if filter.skipped().skips_call(Phase::Data, ctx) {
                continue;
            }
            let m: &Message = (*message).borrow();
            if merge(&mut acc, filter.on_data(ctx, m).await) {
                break;
            }
        }
        acc
    }

    /// Whether a filter of the chain is called at `phase` with `ctx` (one
    /// that asked not to be, [`crate::domain::types::SkipHooks`], is not).
    pub fn calls(&self, phase: Phase, ctx: &Context) -> bool {
        self.links.iter().any(|l| !l.load().skipped().skips_call(phase, ctx))
    }

    /// The EHLO hook along the chain: keywords of every filter asked.
    pub async fn on_ehlo(&self, ctx: &Context) -> EhloVerdict {
        let mut acc = Verdict::cont();
        let mut keywords: Vec<String> = Vec::new();
        for link in self.links.iter() {
            let e = link.load().on_ehlo(ctx).await;
            for k in e.keywords {
                if !keywords.iter().any(|have| have.eq_ignore_ascii_case(&k)) {
                    keywords.push(k);
                }
            }
            if merge(&mut acc, e.verdict) {
                break;
            }
        }
        EhloVerdict { verdict: acc, keywords }
    }
}
