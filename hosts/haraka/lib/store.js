'use strict'
// The stores a filter's `store` import reaches, with the semantics of
// greyhook's `Store` trait (host/src/store/mod.rs): every entry has a
// version (never 0, changed by every write) and an expiry by the caller's
// `now`; a write or delete may be conditional: `any`, `absent` (version 0)
// or a version. They run on Haraka's main thread; the filter's worker waits
// for them (lib/bridge.js).

const crypto = require('node:crypto')

/** A store failure: `kind` is `unavailable` or `limit`, as in the WIT `store-error`. */
class StoreError extends Error {
    constructor(kind, message) {
        super(message)
        this.kind = kind
    }
}

/** `cond` as the Redis scripts take it: `any`, `absent` or a version. */
function condArg(cond) {
    if (cond === undefined || cond === null) return 'any'
    if (BigInt(cond) === 0n) return 'absent'
    return BigInt(cond).toString()
}

/** A store in this process's memory (lost at restart), bounded in records. */
class MemoryStore {
    constructor({ maxRecords = 1_000_000 } = {}) {
        this.kind = 'memory'
        this.map = new Map()
        this.maxRecords = maxRecords
        this.nextVersion = 1n
        this.failures = 0
    }

    live(key, now) {
        const e = this.map.get(key)
        return e && e.expiresAt > now ? e : null
    }

    /** The live entry under `key` as the store interface gives it, or null. */
    read(key, now) {
        const e = this.live(key, now)
        return e ? { value: e.value, version: e.version } : null
    }

    async get(key, now) {
        return this.read(key, now)
    }

    async getMany(keys, now) {
        return keys.map((k) => this.read(k, now))
    }

    holds(cond, e) {
        const c = condArg(cond)
        if (c === 'any') return true
        if (c === 'absent') return !e
        return !!e && e.version.toString() === c
    }

    async set(key, value, expiresAt, cond, now) {
        const e = this.live(key, now)
        if (!this.holds(cond, e)) return 0n
        if (!this.map.has(key) && this.map.size >= this.maxRecords) {
            this.sweep(now)
            if (this.map.size >= this.maxRecords) {
                throw new StoreError('limit', `memory store full (${this.maxRecords} records)`)
            }
        }
        const version = this.nextVersion++
        this.map.set(key, { value: Buffer.from(value), version, expiresAt })
        return version
    }

    async delete(key, cond, now) {
        const e = this.live(key, now)
        if (!this.holds(cond, e)) return false
        this.map.delete(key)
        return !!e
    }

    /** Drops expired records; returns how many. */
    sweep(now) {
        let n = 0
        for (const [k, e] of this.map) {
            if (e.expiresAt <= now) {
                this.map.delete(k)
                n++
            }
        }
        return n
    }

    async close() {}
}

// The same scripts as greyhook's Redis store (host/src/store/redis.rs),
// byte for byte: one Redis hash `PREFIX NAMESPACE/KEY` with the fields `v`,
// `ver`, `exp`, written by compare-and-swap inside Redis, so Haraka nodes
// and `greyhook serve` daemons share one greylist without losing updates.
// tests/all/haraka.rs checks that the two copies stay identical.
const CHECK_CONDITION = `
local cur = redis.call('HMGET', KEYS[1], 'ver', 'exp')
local live = cur[1] and cur[2] and tonumber(cur[2]) > tonumber(ARGV[2])
local cond = ARGV[1]
if cond == 'absent' then
  if live then return 0 end
elseif cond ~= 'any' then
  if not live or cur[1] ~= cond then return 0 end
end
`
const SET =
    CHECK_CONDITION +
    `
local ver = ARGV[6]
if cur[1] == ver then ver = ARGV[7] end
redis.call('HSET', KEYS[1], 'v', ARGV[3], 'ver', ver, 'exp', ARGV[4])
local ttl = tonumber(ARGV[5])
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) else redis.call('DEL', KEYS[1]) end
return ver
`
const DELETE =
    CHECK_CONDITION +
    `
redis.call('DEL', KEYS[1])
if live then return 1 else return 0 end
`

/** A fresh version: random, never 0, exact in a Lua double (53 bits), as greyhook's. */
function newVersion() {
    const v = crypto.randomBytes(8).readBigUInt64BE() >> 11n
    return v === 0n ? 1n : v
}

/** A store in Redis with greyhook's key layout and scripts. */
class RedisStore {
    /**
     * `url`, as greyhook's `[store] path`: `redis://…`, `rediss://…`; a
     * Redis Cluster, `redis+cluster://[USER:]PASSWORD@HOST:PORT,…` (the
     * credentials every node's); or through Sentinel
     * `redis+sentinel://[USER:]PASSWORD@HOST:PORT,…/SERVICE[/DB]` (the
     * credentials and database the master's), where `sentinel`
     * `{ user, password }` are what the sentinels themselves require
     * (greyhook's `sentinel_user`, `sentinel_password`). Each over TLS as
     * `rediss…`.
     * `tls` (with a `rediss…` URL): PEM contents `{ ca, cert, key }`, as
     * greyhook's `[store] tls_ca`, `tls_cert`, `tls_key`; the server's
     * certificate is always checked (against `ca` alone when given, else
     * Node's roots).
     */
    constructor({ url, prefix = 'greyhook:', timeoutMs = 250, tls = null, sentinel = null }) {
        const { createClient, createCluster, createSentinel, RESP_TYPES } = require('redis')
        this.kind = 'redis'
        this.url = url
        this.prefix = prefix
        this.timeoutMs = timeoutMs
        this.failures = 0
        const socket = { connectTimeout: timeoutMs, reconnectStrategy: (n) => Math.min(n * 100, 1000) }
        if (tls) Object.assign(socket, { tls: true, rejectUnauthorized: true }, tls)
        const through = parseSentinelUrl(url)
        const cluster = parseClusterUrl(url)
        if (sentinel && !through) throw new Error('store.sentinel_user and sentinel_password are for a redis+sentinel:// URL')
        if (cluster) {
            // Every node's settings (TLS, the password) are the defaults:
            // the nodes discovered from the named ones get them too.
            const defaults = { socket, disableOfflineQueue: true }
            if (cluster.password !== undefined) Object.assign(defaults, { username: cluster.user, password: cluster.password })
            this.client = createCluster({ rootNodes: cluster.nodes.map((n) => ({ socket: { host: n.host, port: n.port } })), defaults })
            // Routed by the command's key (every command here has one).
            this.send = (key, args, options) => this.client.sendCommand(key, false, args, options)
        } else if (through) {
            const node = { socket, disableOfflineQueue: true, database: through.db }
            if (through.password !== undefined) Object.assign(node, { username: through.user, password: through.password })
            const own = { socket }
            if (sentinel?.password !== undefined) Object.assign(own, { username: sentinel.user, password: sentinel.password })
            this.client = createSentinel({
                name: through.service,
                sentinelRootNodes: through.nodes,
                nodeClientOptions: node,
                sentinelClientOptions: own,
                // The nodes' errors (a refused password) reach `lastError`.
                passthroughClientErrorEvents: true,
            })
            // node-redis's sentinel takes the command's read-only flag first.
            this.send = (_key, args, options) => this.client.sendCommand(false, args, options)
        } else {
            this.client = createClient({ url, socket, disableOfflineQueue: true })
            this.send = (_key, args, options) => this.client.sendCommand(args, options)
        }
        // A down Redis must not crash Haraka: errors are counted and the
        // filter's failure policy answers. The last one since a call was
        // answered is kept for the message of a failed call: a wrong
        // password is otherwise only a timeout, or a cluster's "All the
        // root nodes are unavailable".
        this.lastError = null
        this.client.on('error', (e) => {
            this.lastError = String(e?.message ?? e).slice(0, 200)
        })
        this.buffers = { typeMapping: { [RESP_TYPES.BLOB_STRING]: Buffer } }
        this.sha = {}
        for (const [name, src] of Object.entries({ set: SET, delete: DELETE })) {
            this.sha[name] = { src, sha: crypto.createHash('sha1').update(src).digest('hex') }
        }
        this.connecting = null
    }

    async connected() {
        if (this.client.isReady) return
        if (!this.connecting) {
            this.connecting = this.client.connect().catch((e) => {
                this.connecting = null
                throw e
            })
        }
        await this.connecting
    }

    /** Runs `f`, bounded by the timeout; failures become `unavailable`. */
    async call(what, f) {
        let timer
        try {
            return await Promise.race([
                (async () => {
                    await this.connected()
                    const r = await f()
                    // Answered: an earlier error no longer says anything.
                    this.lastError = null
                    return r
                })(),
                new Promise((_, reject) => {
                    timer = setTimeout(() => reject(new Error(`no answer within ${this.timeoutMs} ms`)), this.timeoutMs)
                }),
            ])
        } catch (e) {
            this.failures++
            // A cluster that could reach none of its nodes says only that;
            // the nodes' own refusal (NOAUTH) came as an error event.
            const last =
                this.lastError && !String(e.message).includes(this.lastError) ? ` (the connection's last error: ${this.lastError})` : ''
            throw new StoreError('unavailable', `redis ${what}: ${e.message}${last}`)
        } finally {
            clearTimeout(timer)
        }
    }

    async script(name, keys, args) {
        const { src, sha } = this.sha[name]
        try {
            return await this.send(keys[0], ['EVALSHA', sha, String(keys.length), ...keys, ...args])
        } catch (e) {
            if (!String(e.message).startsWith('NOSCRIPT')) throw e
            return await this.send(keys[0], ['EVAL', src, String(keys.length), ...keys, ...args])
        }
    }

    static entry(fields, now) {
        const [v, ver, exp] = fields ?? []
        if (v == null || ver == null || exp == null) return null
        if (!(Number(exp.toString()) > now)) return null
        let version
        try {
            version = BigInt(ver.toString())
        } catch {
            return null
        }
        return { value: Buffer.from(v), version }
    }

    async get(key, now) {
        const k = this.prefix + key
        const fields = await this.call('get', () => this.send(k, ['HMGET', k, 'v', 'ver', 'exp'], this.buffers))
        return RedisStore.entry(fields, now)
    }

    async getMany(keys, now) {
        // Sent together: node-redis pipelines commands of one tick, one round trip.
        const rows = await this.call('get_many', () =>
            Promise.all(keys.map((k) => this.send(this.prefix + k, ['HMGET', this.prefix + k, 'v', 'ver', 'exp'], this.buffers))),
        )
        return rows.map((f) => RedisStore.entry(f, now))
    }

    async set(key, value, expiresAt, cond, now) {
        const ttl = Math.max(0, expiresAt - now)
        const v1 = newVersion()
        let v2 = newVersion()
        if (v2 === v1) v2 = v1 ^ 1n
        const ver = await this.call('set', () =>
            this.script(
                'set',
                [this.prefix + key],
                [condArg(cond), String(now), Buffer.from(value), String(expiresAt), String(ttl), v1.toString(), v2.toString()],
            ),
        )
        return BigInt(ver)
    }

    async delete(key, cond, now) {
        const n = await this.call('delete', () => this.script('delete', [this.prefix + key], [condArg(cond), String(now)]))
        return Number(n) === 1
    }

    sweep() {
        // Redis expires records by itself.
        return 0
    }

    async close() {
        // A client still trying to connect is dropped; a ready one finishes its commands.
        try {
            if (this.client.isReady) await this.client.close()
            else if (this.client.isOpen) this.client.destroy()
        } catch {
            // already closed
        }
    }
}

/**
 * `[USER:]PASSWORD@HOST:PORT,HOST:PORT` (the part of a Sentinel or Cluster
 * URL before its path) as `{ user, password, nodes }`, the credentials
 * percent-decoded, as greyhook reads them; throws `shape` when it cannot.
 */
function parseNodes(authHosts, shape) {
    const at = authHosts.lastIndexOf('@')
    const [auth, hosts] = at < 0 ? [null, authHosts] : [authHosts.slice(0, at), authHosts.slice(at + 1)]
    const nodes = []
    for (const n of hosts.split(',').filter((n) => n !== '')) {
        const hp = /^(?:\[([0-9A-Fa-f:.]+)\]|([^:[\]]+)):(\d{1,5})$/.exec(n)
        if (!hp || Number(hp[3]) < 1 || Number(hp[3]) > 65535) throw new Error(shape)
        nodes.push({ host: hp[1] ?? hp[2], port: Number(hp[3]) })
    }
    if (nodes.length === 0) throw new Error(shape)
    let user
    let password
    if (auth !== null) {
        const colon = auth.indexOf(':')
        try {
            if (colon < 0) password = decodeURIComponent(auth)
            else {
                user = decodeURIComponent(auth.slice(0, colon)) || undefined
                password = decodeURIComponent(auth.slice(colon + 1))
            }
        } catch {
            throw new Error(shape)
        }
    }
    return { user, password, nodes }
}

/**
 * `redis+sentinel://[USER:PASSWORD@]HOST:PORT,HOST:PORT/SERVICE[/DB]` (or
 * `rediss+sentinel://`) as `{ user, password, nodes, service, db }`, as
 * greyhook reads it; `null` for any other URL. Throws on a Sentinel URL it
 * cannot read.
 */
function parseSentinelUrl(url) {
    const m = /^rediss?\+sentinel:\/\/(.*)$/.exec(url || '')
    if (!m) return null
    const shape = `store.url ${JSON.stringify(redactUrl(url))}: expected redis+sentinel://[USER:PASSWORD@]HOST:PORT,HOST:PORT/SERVICE[/DB]`
    const rest = m[1]
    const slash = rest.indexOf('/')
    const [authHosts, path] = slash < 0 ? [rest, ''] : [rest.slice(0, slash), rest.slice(slash + 1)]
    const [service, db, ...more] = path.replace(/\/+$/, '').split('/')
    if (!service || more.length > 0 || (db !== undefined && !/^\d{1,5}$/.test(db))) throw new Error(shape)
    return { ...parseNodes(authHosts, shape), service, db: db === undefined ? undefined : Number(db) }
}

/**
 * `redis+cluster://[USER:PASSWORD@]HOST:PORT,HOST:PORT` (or
 * `rediss+cluster://`) as `{ user, password, nodes }`, the credentials
 * every node's, as greyhook reads it; `null` for any other URL. Throws on a
 * Cluster URL it cannot read (a cluster has one database: none is named).
 */
function parseClusterUrl(url) {
    if (!/^rediss?\+cluster:\/\//.test(url || '')) return null
    const shape = `store.url ${JSON.stringify(redactUrl(url))}: expected redis+cluster://[USER:PASSWORD@]HOST:PORT,HOST:PORT`
    const m = /^rediss?\+cluster:\/\/([^/]*)\/?$/.exec(url)
    if (!m) throw new Error(shape)
    return parseNodes(m[1], shape)
}

/** A store URL without its password, for messages (as greyhook's). */
function redactUrl(url) {
    const scheme = url.indexOf('://')
    const at = url.lastIndexOf('@')
    return scheme >= 0 && at > scheme ? `${url.slice(0, scheme)}://***${url.slice(at)}` : url
}

/** The largest PEM file read for TLS (as greyhook's `MAX_PEM_BYTES`). */
const MAX_PEM_BYTES = 1 << 20

/**
 * The TLS files `[store]` names (`tls_ca`, `tls_cert`, `tls_key`), read and
 * checked, as `{ tls, certificate }`: `tls` the PEM contents node-redis
 * takes (`null` when it names none), `certificate` the client
 * certificate's `{ path, notAfter }` (for expiryWarning) or `null`.
 * Refused, as greyhook refuses them: with a `redis://` URL, a certificate
 * without its key, a file that is not PEM or is over 1 MiB.
 */
function tlsFiles(cfg) {
    if (!['tls_ca', 'tls_cert', 'tls_key'].some((k) => cfg[k])) return { tls: null, certificate: null }
    if (!/^rediss(\+sentinel|\+cluster)?:\/\//.test(cfg.url)) {
        throw new Error('store.tls_ca, tls_cert and tls_key need a TLS URL: rediss://, rediss+sentinel:// or rediss+cluster://')
    }
    if (!cfg.tls_cert !== !cfg.tls_key) throw new Error('store.tls_cert and tls_key go together: a client certificate and its key')
    const fs = require('node:fs')
    const read = (key, kind) => {
        const path = cfg[key]
        if (fs.statSync(path).size > MAX_PEM_BYTES) throw new Error(`store.${key} ${path}: over ${MAX_PEM_BYTES} bytes, not a PEM file`)
        const pem = fs.readFileSync(path, 'utf8')
        if (!kind.test(pem)) throw new Error(`store.${key} ${path}: holds no PEM ${key === 'tls_key' ? 'private key' : 'certificate'}`)
        return pem
    }
    const tls = {}
    let certificate = null
    if (cfg.tls_ca) tls.ca = read('tls_ca', /-----BEGIN CERTIFICATE-----/)
    if (cfg.tls_cert) {
        tls.cert = read('tls_cert', /-----BEGIN CERTIFICATE-----/)
        tls.key = read('tls_key', /-----BEGIN (RSA |EC )?PRIVATE KEY-----/)
        // Checked here, as greyhook checks them: Redis would refuse every
        // handshake instead (as in the middle of a renewal, the new
        // certificate beside the old key).
        const crypto = require('node:crypto')
        let x509
        let matches
        try {
            x509 = new crypto.X509Certificate(tls.cert)
            matches = x509.checkPrivateKey(crypto.createPrivateKey(tls.key))
        } catch (e) {
            throw new Error(`store.tls_cert ${cfg.tls_cert} and tls_key ${cfg.tls_key}: ${e.message}`)
        }
        if (!matches) throw new Error(`store.tls_key ${cfg.tls_key} is not the private key of the certificate in tls_cert ${cfg.tls_cert}`)
        certificate = { path: cfg.tls_cert, notAfter: Date.parse(x509.validTo) }
    }
    return { tls, certificate }
}

/**
 * Warned of (in Haraka's log) when the client certificate in use has less
 * than this many days left, as greyhook warns: at load and once a day.
 */
const EXPIRY_WARNING_DAYS = 14

/**
 * The warning for the certificate in `path` that expires at `notAfter`
 * (milliseconds since the epoch), seen at `now`; `null` if it needs none.
 * Worded as greyhook's.
 */
function expiryWarning(path, notAfter, now) {
    const day = 86_400_000
    if (notAfter <= now) return `${path}: the certificate expired ${Math.floor((now - notAfter) / day)} day(s) ago; peers refuse it`
    const days = Math.floor((notAfter - now) / day)
    if (days >= EXPIRY_WARNING_DAYS) return null
    return `${path}: the certificate expires in ${days} day(s); renew it (the renewed files are read without a restart)`
}

/**
 * What identifies a file's content without reading it (modification time,
 * length, inode; following symlinks), to see a renewal: `PATH:missing` when
 * it cannot be looked at.
 */
function fileStamp(path) {
    try {
        const st = require('node:fs').statSync(path)
        return `${path}:${st.mtimeMs}:${st.size}:${st.dev}:${st.ino}`
    } catch {
        return `${path}:missing`
    }
}

/** Opens the store the `[store]` section names. */
function openStore(cfg = {}) {
    const kind = cfg.kind || 'memory'
    if (kind === 'memory') return new MemoryStore({ maxRecords: Number(cfg.max_records) || 1_000_000 })
    if (kind === 'redis') {
        if (!/^rediss?(\+sentinel|\+cluster)?:\/\//.test(cfg.url || '')) {
            throw new Error(
                `store.url ${JSON.stringify(redactUrl(cfg.url || ''))}: ` +
                    'expected redis://host:port[/db], redis+sentinel://HOST:PORT,…/SERVICE[/DB] or redis+cluster://HOST:PORT,…',
            )
        }
        const timeoutMs = Number(cfg.timeout_ms ?? 250)
        if (!(timeoutMs >= 1 && timeoutMs <= 30000)) throw new Error('store.timeout_ms must be between 1 and 30000')
        let sentinel = null
        if (cfg.sentinel_user !== undefined || cfg.sentinel_password !== undefined) {
            if (!parseSentinelUrl(cfg.url)) {
                throw new Error(
                    "store.sentinel_user and sentinel_password are for a redis+sentinel:// URL; a server's password goes in its URL",
                )
            }
            if (cfg.sentinel_password === undefined) throw new Error('store.sentinel_user needs sentinel_password')
            // (Haraka's ini reader turns a number-like value into a number.)
            const user = cfg.sentinel_user === undefined ? undefined : String(cfg.sentinel_user)
            sentinel = { user, password: String(cfg.sentinel_password) }
        }
        const { tls, certificate } = tlsFiles(cfg)
        const store = new RedisStore({ url: cfg.url, prefix: cfg.prefix ?? 'greyhook:', timeoutMs, tls, sentinel })
        // The client certificate's file and expiry, for expiryWarning.
        store.certificate = certificate
        return store
    }
    throw new Error(`store.kind ${JSON.stringify(kind)}: expected memory or redis`)
}

module.exports = {
    EXPIRY_WARNING_DAYS,
    expiryWarning,
    fileStamp,
    MemoryStore,
    RedisStore,
    StoreError,
    openStore,
    parseSentinelUrl,
    parseClusterUrl,
    SCRIPTS: { CHECK_CONDITION, SET, DELETE },
}
