// A greylisting filter in JavaScript, built with componentize-js against
// greyhook's contract (wit/greyhook.wit, greyhook:filter@0.2.3): the first
// attempt of a (client /24, sender, recipient) triplet is deferred with a
// retry hint; a retry after `delay` seconds passes. It reads the triplet
// and a per-sender count with one getMany and writes both with one
// setMany (one round trip each to a networked store).
//
// jco's mapping: records are objects with camelCase fields, u64 is BigInt,
// option<T> is T or undefined, a variant is { tag, val }, and a `result`
// import throws its error.
import { getMany, setMany } from 'greyhook:filter/store@0.2.3';
import { write } from 'greyhook:filter/log@0.2.3';
import { counterAdd } from 'greyhook:filter/metrics@0.2.3';
import { skipHooks } from 'greyhook:filter/negotiate@0.2.3';

let delay = 60;

function network(addr) {
  if (addr.tag === 'ipv4') {
    const [a, b, c] = addr.val;
    return `${a}.${b}.${c}.0/24`;
  }
  return addr.val.slice(0, 4).map((g) => g.toString(16)).join(':') + '::/64';
}

const cont = () => ({ decision: { tag: 'continue' }, addHeaders: [], policyGroup: undefined });

export const hooks = {
  init(config) {
    // The configuration is TOML; this filter knows one key: `delay = N`.
    for (const line of config.split('\n')) {
      const m = line.match(/^\s*delay\s*=\s*(\d+)\s*$/);
      if (m) delay = Number(m[1]);
      else if (line.trim() !== '' && !line.trim().startsWith('#')) throw `unknown setting: ${line.trim()}`;
    }
    // Nothing to decide at connect or MAIL: the host need not call those
    // hooks (contract 0.2.2). EHLO still runs, for its keyword.
    skipHooks({ connect: true, mail: true }, []);
    return { name: 'js-greylist', version: '0.1.0' };
  },
  onConnect(ctx) {
    return cont();
  },
  onEhlo(ctx) {
    return { verdict: cont(), keywords: ['GREYLIST'] };
  },
  onMail(ctx, sender) {
    return cont();
  },
  onRcpt(ctx, recipient) {
    const sender = (ctx.transaction.sender ?? '').toLowerCase();
    const key = `t/${network(ctx.session.clientAddress)}/${sender}/${recipient.toLowerCase()}`.slice(0, 256);
    const now = ctx.now;
    // The triplet and the sender's deferral count in one call (one round
    // trip to a networked store), written back in one call too.
    const countKey = `deferred/${sender}`.slice(0, 256);
    const [entry, count] = getMany([key, countKey]);
    if (entry === undefined) {
      const n = count === undefined ? 0 : Number(new TextDecoder().decode(count.value));
      const [written] = setMany([
        { key, value: new TextEncoder().encode(String(now)), ttlSeconds: 2 * 86400, ifVersion: 0n },
        { key: countKey, value: new TextEncoder().encode(String(n + 1)), ttlSeconds: 86400, ifVersion: count?.version ?? 0n },
      ]);
      // Another instance wrote the triplet first: its first sighting stands.
      if (written.tag === 'conflict') write('debug', `${key}: first sighting raced`);
      counterAdd('greylisted', [['stage', 'first']], 1n);
      return tempfail(delay);
    }
    const first = BigInt(new TextDecoder().decode(entry.value));
    const left = first + BigInt(delay) - now;
    if (left > 0n) {
      counterAdd('greylisted', [['stage', 'early']], 1n);
      return tempfail(Number(left));
    }
    write('info', `passed ${key} after ${now - first} s`);
    counterAdd('passed', [], 1n);
    return cont();
  },
  onData(ctx, message) {
    return cont();
  },
};

function tempfail(retryAfter) {
  return {
    decision: {
      tag: 'tempfail',
      val: { code: 451, enhanced: '4.7.1', text: ['Greylisted by a JavaScript filter'], retryAfter },
    },
    addHeaders: [],
    policyGroup: undefined,
  };
}
