'use strict'
// The stores' semantics (greyhook's `Store` trait), and compare-and-swap in
// Redis under two concurrent clients: no update lost. The Redis tests need
// GREYHOOK_TEST_REDIS (tests/all/haraka.rs starts a redis-server and sets
// it); without it they fail, they do not skip.
const test = require('node:test')
const assert = require('node:assert')
const { MemoryStore, RedisStore } = require('../lib/store')

async function semantics(s, prefix) {
    const k = `${prefix}k`
    assert.strictEqual(await s.get(k, 100), null)
    const v1 = await s.set(k, Buffer.from('a'), 200, 0n, 100)
    assert.ok(v1 > 0n, 'absent: written')
    assert.strictEqual(await s.set(k, Buffer.from('b'), 200, 0n, 100), 0n, 'absent: conflict when present')
    const e = await s.get(k, 100)
    assert.strictEqual(Buffer.from(e.value).toString(), 'a')
    assert.strictEqual(e.version, v1)
    assert.strictEqual(await s.set(k, Buffer.from('c'), 200, v1 + 1n, 100), 0n, 'wrong version: conflict')
    const v2 = await s.set(k, Buffer.from('c'), 200, v1, 100)
    assert.ok(v2 > 0n && v2 !== v1, 'version changes on every write')
    assert.strictEqual(await s.get(k, 200), null, 'expired at exp')
    assert.strictEqual(await s.delete(k, v1, 100), false, 'delete with a stale version')
    assert.strictEqual(await s.delete(k, v2, 100), true)
    assert.strictEqual(await s.get(k, 100), null)
    const many = await s.getMany([`${prefix}x`, `${prefix}y`], 100)
    assert.deepStrictEqual(many, [null, null])
}

test('memory store', async () => {
    await semantics(new MemoryStore(), '')
    const s = new MemoryStore({ maxRecords: 2 })
    await s.set('a', Buffer.from('1'), 200, null, 100)
    await s.set('b', Buffer.from('1'), 150, null, 100)
    await assert.rejects(s.set('c', Buffer.from('1'), 200, null, 100), /full/)
    // An expired record makes room.
    assert.ok((await s.set('c', Buffer.from('1'), 200, null, 160)) > 0n)
})

function redisUrl() {
    const url = process.env.GREYHOOK_TEST_REDIS
    assert.ok(url, 'GREYHOOK_TEST_REDIS names the redis-server to test against (tests/all/haraka.rs sets it)')
    return url
}

test('redis store: the same semantics', async () => {
    const s = new RedisStore({ url: redisUrl(), prefix: `t${process.pid}:`, timeoutMs: 2000 })
    try {
        await semantics(s, 'sem/')
    } finally {
        await s.close()
    }
})

test('redis store: two clients incrementing one record lose no update', async () => {
    const url = redisUrl()
    const prefix = `cas${process.pid}:`
    const a = new RedisStore({ url, prefix, timeoutMs: 2000 })
    const b = new RedisStore({ url, prefix, timeoutMs: 2000 })
    const EACH = 200
    let conflicts = 0
    const inc = async (s) => {
        for (let i = 0; i < EACH; i++) {
            for (;;) {
                const e = await s.get('counter', 100)
                const n = e ? Number(Buffer.from(e.value).toString()) : 0
                const v = await s.set('counter', Buffer.from(String(n + 1)), 1000, e ? e.version : 0n, 100)
                if (v !== 0n) break
                conflicts++
            }
        }
    }
    try {
        // Several increments in flight per client, as on a busy node.
        await Promise.all([inc(a), inc(a), inc(b), inc(b)])
        const e = await a.get('counter', 100)
        assert.strictEqual(Buffer.from(e.value).toString(), String(4 * EACH))
        assert.ok(conflicts > 0, 'the clients did race')
    } finally {
        await a.close()
        await b.close()
    }
})

test('redis store: down is unavailable, within the timeout', async () => {
    const s = new RedisStore({ url: 'redis://127.0.0.1:1', timeoutMs: 200 })
    const t = Date.now()
    await assert.rejects(s.get('k', 1), (e) => e.kind === 'unavailable')
    assert.ok(Date.now() - t < 1500)
    await s.close()
})

test('redis store: TLS settings that cannot work are refused, naming the key', () => {
    const fs = require('node:fs')
    const os = require('node:os')
    const path = require('node:path')
    const { openStore } = require('../lib/store')
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'greyhook-tls-'))
    const ca = path.join(dir, 'ca.pem')
    fs.writeFileSync(ca, '-----BEGIN CERTIFICATE-----\nMA==\n-----END CERTIFICATE-----\n')
    const notPem = path.join(dir, 'x.pem')
    fs.writeFileSync(notPem, 'hello')
    const big = path.join(dir, 'big.pem')
    fs.writeFileSync(big, Buffer.alloc((1 << 20) + 1, 65))
    const open = (extra) => () => openStore({ kind: 'redis', url: 'rediss://127.0.0.1:1', ...extra })
    assert.throws(open({ url: 'redis://127.0.0.1:1', tls_ca: ca }), /need a TLS URL/)
    assert.throws(open({ tls_cert: ca }), /tls_cert and tls_key go together/)
    assert.throws(open({ tls_ca: notPem }), /store.tls_ca .*holds no PEM certificate/)
    assert.throws(open({ tls_cert: ca, tls_key: ca }), /store.tls_key .*holds no PEM private key/)
    assert.throws(open({ tls_ca: big }), /not a PEM file/)
    fs.rmSync(dir, { recursive: true })
})
