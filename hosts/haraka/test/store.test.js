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
    // A certificate beside a key that is not its own (the middle of a
    // renewal): refused at once, not at every handshake.
    const raw = process.env.GREYHOOK_TEST_SENTINEL
    assert.ok(raw, 'GREYHOOK_TEST_SENTINEL names the TLS files to test with (tests/all/haraka.rs sets it)')
    const t = JSON.parse(raw).tls
    const otherKey = path.join(dir, 'other.key')
    const { privateKey } = require('node:crypto').generateKeyPairSync('ec', { namedCurve: 'P-256' })
    fs.writeFileSync(otherKey, privateKey.export({ type: 'pkcs8', format: 'pem' }))
    const loaded = openStore({ kind: 'redis', url: 'rediss://127.0.0.1:1', tls_ca: t.ca, tls_cert: t.cert, tls_key: t.key })
    // rcgen's default expiry, 4096-01-01: what the certificate says, not now.
    assert.deepEqual(loaded.certificate, { path: t.cert, notAfter: Date.UTC(4096, 0, 1) }, 'the pair loads, its expiry read')
    loaded.close()
    assert.throws(open({ tls_cert: t.cert, tls_key: otherKey }), /store.tls_key .*other.key is not the private key of the certificate in tls_cert/)
    fs.rmSync(dir, { recursive: true })
})

test('redis store: Sentinel URLs read as greyhook reads them, settings that cannot work refused', () => {
    const { openStore, parseSentinelUrl } = require('../lib/store')
    assert.deepStrictEqual(parseSentinelUrl('rediss+sentinel://:s3cret%2Fx@10.0.0.5:26379,[::1]:26380/mymaster/3'), {
        user: undefined,
        password: 's3cret/x',
        nodes: [
            { host: '10.0.0.5', port: 26379 },
            { host: '::1', port: 26380 },
        ],
        service: 'mymaster',
        db: 3,
    })
    assert.strictEqual(parseSentinelUrl('redis://127.0.0.1:6379/0'), null)
    for (const bad of ['redis+sentinel://h:1', 'redis+sentinel://h/m', 'redis+sentinel://h:1/m/x', 'redis+sentinel://:%zz@h:1/m']) {
        assert.throws(() => parseSentinelUrl(bad), /expected redis\+sentinel:\/\//, bad)
    }
    const open = (cfg) => () => openStore({ kind: 'redis', ...cfg })
    assert.throws(open({ url: 'redis://:pw@h:1/0', sentinel_password: 'x' }), /are for a redis\+sentinel:\/\/ URL/)
    assert.throws(open({ url: 'redis+sentinel://h:1/m', sentinel_user: 'u' }), /sentinel_user needs sentinel_password/)
    // A URL it refuses is shown without its password.
    assert.throws(open({ url: 'memcache://:s3cret@h:1' }), (e) => /memcache:\/\/\*\*\*@h:1/.test(e.message) && !/s3cret/.test(e.message))
})

/**
 * GREYHOOK_TEST_SENTINEL (tests/all/haraka.rs sets it): a master and its
 * replica that require a password, and a sentinel that requires one of its
 * own, all TLS only with client certificates, as JSON `{ url,
 * sentinelPassword, sentinel, master, replica, tls: { ca, cert, key } }`.
 */
test('redis store through Sentinel: its own password, the master\'s password and database, a failover followed', async () => {
    const raw = process.env.GREYHOOK_TEST_SENTINEL
    assert.ok(raw, 'GREYHOOK_TEST_SENTINEL names the sentinel to test against (tests/all/haraka.rs sets it)')
    const t = JSON.parse(raw)
    const { createClient } = require('redis')
    const { openStore } = require('../lib/store')
    const prefix = `sen${process.pid}:`
    const far = Math.floor(Date.now() / 1000) + 3600
    const now = far - 3600
    // Opened as the plugin opens greyhook.ini's [store]: the TLS files read and checked.
    const files = { tls_ca: t.tls.ca, tls_cert: t.tls.cert, tls_key: t.tls.key }
    const open = (url, extra = {}) => openStore({ kind: 'redis', url, prefix, timeout_ms: 2000, ...files, ...extra })
    const s = open(t.url, { timeout_ms: 5000, sentinel_password: t.sentinelPassword })
    const master = open(t.master)
    const replica = open(t.replica)
    const without = open(t.url)
    const fs = require('node:fs')
    const pem = (f) => fs.readFileSync(f)
    const tls = { tls: true, rejectUnauthorized: true, ca: pem(t.tls.ca), cert: pem(t.tls.cert), key: pem(t.tls.key) }
    const sentinel = createClient({ url: `rediss://:${encodeURIComponent(t.sentinelPassword)}@${t.sentinel}`, socket: tls })
    sentinel.on('error', () => {})
    const until = async (what, f, ms) => {
        const end = Date.now() + ms
        for (;;) {
            try {
                const r = await f()
                if (r) return r
            } catch (e) {
                if (Date.now() > end) throw new Error(`${what}: ${e.message}`)
            }
            if (Date.now() > end) throw new Error(`${what}: not within ${ms} ms`)
            await new Promise((r) => setTimeout(r, 200))
        }
    }
    try {
        await semantics(s, 'sem/')
        assert.ok((await s.set('before', Buffer.from('1'), far, null, now)) > 0n)
        const e = await master.get('before', now)
        assert.strictEqual(Buffer.from(e.value).toString(), '1', "written to the master's database the URL names")
        await assert.rejects(without.get('before', now), (e) => e.kind === 'unavailable' && /NOAUTH|auth/i.test(e.message))
        // The replica must have the record before the failover, which
        // Sentinel forces without waiting for it (a lagging replica lost it
        // once in CI).
        const direct = createClient({ url: t.master, socket: tls })
        direct.on('error', () => {})
        await direct.connect()
        try {
            await until('the replica has the record', async () => Number(await direct.sendCommand(['WAIT', '1', '2000'])) >= 1, 30000)
        } finally {
            direct.destroy()
        }
        // A failover the sentinel is asked for (it needs to have found the replica first).
        await sentinel.connect()
        await until('the sentinel failed over', () => sentinel.sendCommand(['SENTINEL', 'FAILOVER', 'mymaster']).then(() => true), 30000)
        const replicaPort = Number(new URL(t.replica).port)
        await until(
            'the sentinel names the replica',
            async () => Number((await sentinel.sendCommand(['SENTINEL', 'GET-MASTER-ADDR-BY-NAME', 'mymaster']))[1]) === replicaPort,
            30000,
        )
        // Until the sentinel has demoted the old master, both take writes
        // (a forced failover's window, seen once here): the store has
        // followed once its write lands on the promoted replica.
        await until(
            'the store follows the failover',
            async () => {
                await s.set('after', Buffer.from('2'), far, null, now)
                const after = await replica.get('after', now)
                return after && Buffer.from(after.value).toString() === '2'
            },
            30000,
        )
        const before = await s.get('before', now)
        assert.strictEqual(Buffer.from(before.value).toString(), '1', 'written before the failover')
    } finally {
        for (const c of [s, master, replica, without]) await c.close()
        if (sentinel.isOpen) sentinel.destroy()
    }
})

/**
 * GREYHOOK_TEST_CLUSTER (tests/all/haraka.rs sets it): a three-node Redis
 * Cluster whose nodes speak TLS only and require a password, as JSON
 * `{ url, tls: { ca, cert, key } }`, the URL with the password.
 */
test('redis store on a cluster: every node\'s password and TLS, keys on every slot', async () => {
    const raw = process.env.GREYHOOK_TEST_CLUSTER
    assert.ok(raw, 'GREYHOOK_TEST_CLUSTER names the cluster to test against (tests/all/haraka.rs sets it)')
    const t = JSON.parse(raw)
    const { openStore, parseClusterUrl } = require('../lib/store')
    const prefix = `clu${process.pid}:`
    const files = { tls_ca: t.tls.ca, tls_cert: t.tls.cert, tls_key: t.tls.key }
    const open = (url) => openStore({ kind: 'redis', url, prefix, timeout_ms: 5000, ...files })
    const s = open(t.url)
    const { password, nodes } = parseClusterUrl(t.url)
    assert.ok(password && nodes.length === 2, t.url)
    const without = open(t.url.replace(/\/\/[^@]*@/, '//'))
    try {
        await semantics(s, 'sem/')
        // Twenty keys fall on all three nodes' slots: each read and write
        // goes to its key's node, a batch read too.
        const keys = Array.from({ length: 20 }, (_, i) => `many/${i}`)
        for (const k of keys) assert.ok((await s.set(k, Buffer.from(k), 200, null, 100)) > 0n, k)
        const rows = await s.getMany(keys, 100)
        assert.deepStrictEqual(
            rows.map((r) => Buffer.from(r.value).toString()),
            keys,
        )
        await assert.rejects(without.get('many/0', 100), (e) => e.kind === 'unavailable' && /NOAUTH|auth/i.test(e.message))
    } finally {
        await s.close()
        await without.close()
    }
})

test('a client certificate is warned of from 14 days before its expiry, worded as greyhook words it', () => {
    const { expiryWarning, EXPIRY_WARNING_DAYS } = require('../lib/store')
    const day = 86_400_000
    const now = Date.UTC(2030, 4, 17)
    assert.equal(EXPIRY_WARNING_DAYS, 14)
    assert.equal(expiryWarning('c.pem', now + 30 * day, now), null)
    assert.equal(expiryWarning('c.pem', now + 14 * day, now), null)
    assert.equal(
        expiryWarning('c.pem', now + 14 * day - 1000, now),
        'c.pem: the certificate expires in 13 day(s); renew it (the renewed files are read without a restart)',
    )
    assert.match(expiryWarning('c.pem', now + 10_000, now), /expires in 0 day\(s\)/)
    assert.equal(expiryWarning('c.pem', now - 2 * day - 10_000, now), 'c.pem: the certificate expired 2 day(s) ago; peers refuse it')
})
