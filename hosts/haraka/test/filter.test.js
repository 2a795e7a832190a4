'use strict'
// The worker pool: a trap gets a fresh instance, an endless loop is cut at
// the deadline and the worker replaced, invalid verdicts are refused, a
// changed component file is reloaded and a broken one refused. Needs the
// chaos filter (GREYHOOK_CHAOS_WASM, set by tests/all/haraka.rs).
const test = require('node:test')
const assert = require('node:assert')
const fs = require('node:fs')
const os = require('node:os')
const path = require('node:path')
const { Filter } = require('../lib/filter')
const { MemoryStore } = require('../lib/store')

function chaos() {
    const p = process.env.GREYHOOK_CHAOS_WASM
    assert.ok(p && fs.existsSync(p), 'GREYHOOK_CHAOS_WASM names the chaos filter (tests/all/haraka.rs sets it)')
    return p
}

const ctx = (now = 1000) => ({
    session: { id: 's', clientAddress: { tag: 'ipv4', val: [192, 0, 2, 1] }, helo: 'h.example', tls: false },
    transaction: { sender: 'a@example.org', recipients: [] },
    now: BigInt(now),
})

/** A filter whose configuration names the hooks it skips (tests/guests/stateful). */
function stateful() {
    const p = process.env.GREYHOOK_STATEFUL_WASM
    assert.ok(p && fs.existsSync(p), 'GREYHOOK_STATEFUL_WASM names the stateful filter (tests/all/haraka.rs sets it)')
    return p
}

test('hooks a filter skips (contracts 0.2.2, 0.2.3) are answered without a call', async () => {
    const load = async (config) => {
        const f = new Filter({ path: stateful(), config, store: new MemoryStore(), failurePolicy: 'tempfail', limits: { deadlineMs: 5000 }, logger: () => {} })
        await f.load()
        return f
    }
    let f = await load('')
    try {
        const r = await f.call('mail', ctx(), 'a@example.org')
        assert.strictEqual(r.verdict.addHeaders[0]?.name, 'X-Mail', 'without a skip, on-mail runs')
        assert.strictEqual(f.counts.calls, 1)
    } finally {
        f.close()
    }
    f = await load('skip = mail')
    try {
        const r = await f.call('mail', ctx(), 'a@example.org')
        assert.deepStrictEqual(r.verdict, { decision: { tag: 'continue' }, addHeaders: [] })
        assert.strictEqual(f.counts.calls, 0, 'the filter was not called')
        const seen = await f.call('rcpt', ctx(), 'r@example.com')
        assert.strictEqual(seen.verdict.addHeaders[0]?.name, 'X-Seen', 'the hooks it keeps still run')
    } finally {
        f.close()
    }
    f = await load('skip = ehlo')
    try {
        const r = await f.call('ehlo', ctx())
        assert.deepStrictEqual(r.keywords, ['XSKIPPED'])
        assert.strictEqual(f.counts.calls, 0)
    } finally {
        f.close()
    }
    // Contract 0.2.3: on-data for the null sender only.
    f = await load('skip = data-with-sender')
    try {
        const message = { messageId: '<1@example.org>', headers: [] }
        const withSender = ctx()
        withSender.transaction.sender = 'a@example.org'
        const r = await f.call('data', withSender, message)
        assert.deepStrictEqual(r.verdict, { decision: { tag: 'continue' }, addHeaders: [] })
        assert.strictEqual(f.counts.calls, 0, 'a transaction with a sender: the filter was not called')
        const bounce = ctx()
        bounce.transaction.sender = ''
        const b = await f.call('data', bounce, message)
        assert.deepStrictEqual(b.verdict.addHeaders, [{ name: 'X-Data', value: '' }], 'the null sender: on-data runs')
        assert.strictEqual(f.counts.calls, 1)
    } finally {
        f.close()
    }
    await assert.rejects(load('skip = bad-keyword'), /EHLO keywords it gave negotiate.skip-hooks are not valid/)
})

test('traps, loops and invalid verdicts', async () => {
    const logs = []
    const f = new Filter({ path: chaos(), store: new MemoryStore(), failurePolicy: 'tempfail', limits: { deadlineMs: 1000, memory: 16 << 20 }, logger: (l, m) => logs.push(m) })
    await f.load()
    try {
        let r = await f.call('rcpt', ctx(), 'ok@example.com')
        assert.strictEqual(r.failure, undefined)
        assert.deepStrictEqual(r.verdict.addHeaders, [{ name: 'X-Chaos', value: 'ok' }])
        r = await f.call('rcpt', ctx(), 'panic@example.com')
        assert.match(r.failure, /^trap: /)
        assert.strictEqual(r.verdict.decision.val.code, 451)
        r = await f.call('rcpt', ctx(), 'ok@example.com')
        assert.strictEqual(r.failure, undefined, 'a fresh instance after the trap')
        const t = Date.now()
        r = await f.call('rcpt', ctx(), 'loop@example.com')
        assert.match(r.failure, /^deadline: /)
        assert.ok(Date.now() - t < 4000)
        r = await f.call('rcpt', ctx(), 'ok@example.com')
        assert.strictEqual(r.failure, undefined, 'a fresh worker after the loop')
        r = await f.call('rcpt', ctx(), 'bad-code@example.com')
        assert.match(r.failure, /^invalid_verdict: reply code 250/)
        r = await f.call('rcpt', ctx(), 'inject-header@example.com')
        assert.match(r.failure, /^invalid_verdict: header 0/)
        r = await f.call('rcpt', ctx(), 'store-flood@example.com')
        assert.match(r.failure, /^store: more than 64 store calls/)
        r = await f.call('connect', ctx())
        assert.strictEqual(r.failure, undefined)
        // A memory bomb traps at the cap (16 MiB here): a trap, not cut at the deadline.
        r = await f.call('rcpt', ctx(), 'memory@example.com')
        assert.match(r.failure, /^trap: /)
        r = await f.call('rcpt', ctx(), 'memory-probe@example.com')
        const mib = Number(/memory (\d+) MiB/.exec(r.verdict.addHeaders[0]?.value)?.[1])
        assert.ok(mib > 4 && mib < 16, `an instance gets under 16 MiB: ${mib}`)
        // The log line a filter writes cannot forge another.
        assert.ok(logs.some((m) => m.includes('chaos: ok  forged log line')), logs.join('\n'))
        // While one call loops, the others queue and are answered after it.
        const many = await Promise.all([f.call('rcpt', ctx(), 'loop@example.com'), f.call('rcpt', ctx(), 'ok@example.com')])
        assert.match(many[0].failure, /^deadline/)
        assert.strictEqual(many[1].failure, undefined)
    } finally {
        await f.close()
    }
})

test('a filter logs at most logLinesPerSecond lines a second', async () => {
    const logs = []
    const f = new Filter({ path: chaos(), store: new MemoryStore(), limits: { logLinesPerSecond: 50 }, logger: (l, m) => logs.push(m) })
    await f.load()
    try {
        // Within one second by the clock: at most 50 of the filter's lines.
        const until = Math.floor(Date.now() / 1000) + 1
        while (Math.floor(Date.now() / 1000) < until) await new Promise((r) => setTimeout(r, 5))
        for (let i = 0; i < 120; i++) await f.call('rcpt', ctx(), 'ok@example.com')
        const inSecond = logs.filter((m) => m.includes('chaos: ok')).length
        assert.ok(inSecond <= 100 && inSecond >= 50, `${inSecond} lines`)
        await new Promise((r) => setTimeout(r, 1100))
        await f.call('rcpt', ctx(), 'ok@example.com')
        assert.ok(logs.some((m) => /log lines of the filter dropped/.test(m)), logs.slice(-3).join('\n'))
    } finally {
        await f.close()
    }
})

test('reload: a new file is swapped in, a broken one refused', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'greyhook-reload-'))
    const file = path.join(dir, 'f.wasm')
    fs.copyFileSync(chaos(), file)
    const f = new Filter({ path: file, store: new MemoryStore(), logger: () => {} })
    await f.load()
    try {
        assert.deepStrictEqual(await f.reload(), { result: 'unchanged' })
        fs.writeFileSync(file, 'not wasm')
        const r = await f.reload()
        assert.strictEqual(r.result, 'refused')
        assert.strictEqual((await f.call('rcpt', ctx(), 'ok@example.com')).failure, undefined, 'the running filter stays')
        // A changed component (one custom section more) is loaded.
        const bytes = fs.readFileSync(chaos())
        const section = Buffer.concat([Buffer.from([0, 6, 5]), Buffer.from('greyx')])
        fs.writeFileSync(file, Buffer.concat([bytes, section]))
        assert.strictEqual((await f.reload()).result, 'loaded')
        assert.strictEqual((await f.call('rcpt', ctx(), 'ok@example.com')).failure, undefined)
    } finally {
        await f.close()
        fs.rmSync(dir, { recursive: true })
    }
})

test('forward-confirmed names compare addresses, not their spellings (IPv6)', async () => {
    const f = new Filter({ path: chaos(), store: new MemoryStore() })
    // A resolver that answers as Node's does: AAAA records in RFC 5952 form.
    f.resolver = {
        reverse: async () => ['mx.example.test.'],
        resolve4: async () => ['192.0.2.5'],
        resolve6: async () => ['2001:db8::5'],
    }
    const v6 = { tag: 'ipv6', val: [0x2001, 0xdb8, 0, 0, 0, 0, 0, 5] }
    assert.deepStrictEqual(await f.dns('fcrdns', { address: v6 }), { ok: true, value: 'mx.example.test' })
    const other = { tag: 'ipv6', val: [0x2001, 0xdb8, 0, 0, 0, 0, 0, 6] }
    assert.deepStrictEqual(await f.dns('fcrdns', { address: other }), { ok: true, value: undefined })
    const v4 = { tag: 'ipv4', val: [192, 0, 2, 5] }
    assert.deepStrictEqual(await f.dns('fcrdns', { address: v4 }), { ok: true, value: 'mx.example.test' })
})
