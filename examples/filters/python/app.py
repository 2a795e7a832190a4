# A greylisting filter in Python, built with componentize-py against
# greyhook's contract (wit/greyhook.wit, greyhook:filter@0.2.3): the first
# attempt of a (client /24, sender, recipient) triplet is deferred with a
# retry hint; a retry after `delay` seconds passes.
#
# componentize-py's mapping: records are dataclasses, variants are one
# class per case (`Decision_Tempfail(reply)`), option<T> is T or None, and
# an import that returns `result` raises `Err` on error.
from wit_world import exports
from wit_world.imports import log, metrics, negotiate, store
from wit_world.imports.types import (
    Context,
    Decision_Continue,
    Decision_Tempfail,
    EhloVerdict,
    FilterInfo,
    IpAddress_Ipv4,
    Message,
    Reply,
    Verdict,
)
from componentize_py_types import Err

DELAY = 60


def network(addr) -> str:
    if isinstance(addr, IpAddress_Ipv4):
        a, b, c, _ = addr.value
        return f"{a}.{b}.{c}.0/24"
    return ":".join(f"{g:x}" for g in addr.value[:4]) + "::/64"


def cont() -> Verdict:
    return Verdict(decision=Decision_Continue(), add_headers=[], policy_group=None)


def tempfail(retry_after: int) -> Verdict:
    reply = Reply(code=451, enhanced="4.7.1", text=["Greylisted by a Python filter"], retry_after=retry_after)
    return Verdict(decision=Decision_Tempfail(reply), add_headers=[], policy_group=None)


class Hooks(exports.Hooks):
    def init(self, config: str) -> FilterInfo:
        # The configuration is TOML; this filter knows one key: `delay = N`.
        global DELAY
        for line in config.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, _, value = line.partition("=")
            if key.strip() != "delay" or not value.strip().isdigit():
                raise Err(f"unknown or bad setting: {line}")
            DELAY = int(value.strip())
        # It decides at RCPT only: the host need not call the other hooks
        # (contract 0.2.2), and advertises GREYLIST at EHLO for it.
        skip = negotiate.HookSet.CONNECT | negotiate.HookSet.EHLO | negotiate.HookSet.MAIL | negotiate.HookSet.DATA
        negotiate.skip_hooks(skip, ["GREYLIST"])
        return FilterInfo(name="py-greylist", version="0.1.0")

    def on_connect(self, ctx: Context) -> Verdict:
        return cont()

    def on_ehlo(self, ctx: Context) -> EhloVerdict:
        return EhloVerdict(verdict=cont(), keywords=["GREYLIST"])

    def on_mail(self, ctx: Context, sender: str) -> Verdict:
        return cont()

    def on_rcpt(self, ctx: Context, recipient: str) -> Verdict:
        sender = (ctx.transaction.sender or "").lower()
        key = f"t/{network(ctx.session.client_address)}/{sender}/{recipient.lower()}"[:256]
        entry = store.get(key)
        if entry is None:
            store.set(key, str(ctx.now).encode(), 2 * 86400, 0)
            metrics.counter_add("greylisted", [("stage", "first")], 1)
            return tempfail(DELAY)
        first = int(entry.value.decode())
        left = first + DELAY - ctx.now
        if left > 0:
            metrics.counter_add("greylisted", [("stage", "early")], 1)
            return tempfail(left)
        log.write(log.Level.INFO, f"passed {key} after {ctx.now - first} s")
        metrics.counter_add("passed", [], 1)
        return cont()

    def on_data(self, ctx: Context, message: Message) -> Verdict:
        return cont()
