'use strict'
// haraka-plugin-greyhook: a greyhook filter (a WebAssembly component built
// for the `greyhook:filter` world) inside Haraka. Haraka's connection and
// transaction become the WIT context at connect, HELO/EHLO, MAIL, RCPT and
// end of DATA; the filter's verdict is checked and rendered as greyhook's
// own front ends render it (lib/reply.js). The filter runs in worker
// threads with a deadline (lib/filter.js); its store is in memory or in
// Redis with greyhook's key layout (lib/store.js).

const path = require('node:path')
const fs = require('node:fs')
const ipaddr = require('ipaddr.js')
const constants = require('haraka-constants')
const { Filter, failureVerdict } = require('./lib/filter')
const { expiryWarning, fileStamp, openStore } = require('./lib/store')
const { renderLines } = require('./lib/reply')
const { boundedHeaders, boundedHelo, boundedMessageId } = require('./lib/message')

/** The `[store]` keys that name TLS files. */
const TLS_KEYS = ['tls_ca', 'tls_cert', 'tls_key']

/** The reference filter, shipped in the package (npm run build-filter). */
const REFERENCE = path.join(__dirname, 'filters', 'greylist.wasm')

/** Haraka's own DSN class is recognised by its name; this one carries lines already rendered. */
class DSN {
    constructor(code, reply) {
        this.code = code
        this.reply = reply
    }
}

exports.register = function () {
    this.load_greyhook_ini()
    this.greyhook_ready = this.start_greyhook().catch((e) => {
        this.logcrit(`greyhook: the filter did not load: ${e.message}; its failure policy answers every call`)
        return null
    })
    this.watch_filter_config()
    this.remind_of_certificates()
    this.register_hook('connect', 'greyhook_connect')
    this.register_hook('helo', 'greyhook_helo')
    this.register_hook('ehlo', 'greyhook_helo')
    this.register_hook('capabilities', 'greyhook_capabilities')
    this.register_hook('mail', 'greyhook_mail')
    this.register_hook('rcpt', 'greyhook_rcpt')
    this.register_hook('rcpt_ok', 'greyhook_rcpt_ok')
    this.register_hook('data_post', 'greyhook_data_post')
}

exports.load_greyhook_ini = function () {
    const first = !this.cfg
    this.cfg = this.config.get('greyhook.ini', { booleans: ['+filter.watch'] }, () => {
        this.load_greyhook_ini()
    })
    if (!first) this.restart_greyhook('config/greyhook.ini changed')
}

/**
 * Polls the filter's own configuration file and the store's TLS files
 * (`tls_ca`, `tls_cert`, `tls_key`), once a second, and reloads when one
 * changes: a renewed client certificate opens a new store with it (the
 * store's key includes the files' stamps), with no restart of Haraka. A
 * set that does not load (the new certificate beside the old key, in the
 * middle of a renewal) is refused once and the running store stays.
 */
exports.watch_filter_config = function () {
    const stamps = () => {
        const files = [this.cfg.filter?.config, ...TLS_KEYS.map((k) => this.cfg.store?.[k])].filter(Boolean)
        return new Map(files.map((f) => [f, fileStamp(sitePath(f))]))
    }
    let seen = stamps()
    this.greyhook_config_watch = setInterval(() => {
        const now = stamps()
        const changed = [...now].filter(([f, st]) => seen.get(f) !== st).map(([f]) => f)
        seen = now
        if (changed.length) this.restart_greyhook(`${changed.join(', ')} changed`)
    }, 1000)
    this.greyhook_config_watch.unref()
}

/**
 * Once a day, warns again of a store client certificate near its expiry
 * or past it, as greyhook does: the warning at load is long scrolled away
 * by the time a failed renewal matters.
 */
exports.remind_of_certificates = function () {
    this.greyhook_certificate_reminder = setInterval(async () => {
        const filter = await this.greyhook_ready
        this.warn_of_certificate(filter?.store)
    }, 86_400_000)
    this.greyhook_certificate_reminder.unref()
}

/** Logs expiryWarning's warning for `store`'s client certificate, if it has one. */
exports.warn_of_certificate = function (store) {
    const c = store?.certificate
    const warning = c && expiryWarning(c.path, c.notAfter, Date.now())
    if (warning) this.logwarn(`greyhook: ${warning}`)
}

/**
 * Loads the filter again with the current configuration and swaps it in
 * once it answers; the old one finishes its calls first. A configuration
 * that does not load is refused and the running filter stays. The store
 * is kept (records survive) unless its own settings changed.
 */
exports.restart_greyhook = function (why) {
    const previous = this.greyhook_ready
    this.greyhook_ready = (async () => {
        const old = await previous
        try {
            const fresh = await this.start_greyhook(old)
            this.lognotice(`greyhook: reloaded (${why})`)
            if (old && old !== fresh) {
                old.close({ graceful: true }).then(() => {
                    if (old.store !== fresh.store) old.store.close()
                })
            }
            return fresh
        } catch (e) {
            this.logerror(`greyhook: reload refused (${why}): ${e.message}; the running filter stays`)
            return old
        }
    })()
}

/** Where a configured path points: relative paths are in Haraka's config directory. */
function sitePath(p) {
    return path.resolve(process.env.HARAKA || process.cwd(), 'config', p)
}

/** `section.key` as a whole number in [min, max], or its default; throws naming the key. */
function whole(section, key, min, max) {
    const v = section[key]
    if (v === undefined || v === '') return undefined
    const n = Number(v)
    if (!Number.isInteger(n) || n < min || n > max) throw new Error(`${key} = ${JSON.stringify(v)}: a whole number from ${min} to ${max}`)
    return n
}

/** Starts the configured filter; `old`'s store is reused when its settings are unchanged. */
exports.start_greyhook = async function (old) {
    const f = this.cfg.filter || {}
    const s = this.cfg.store || {}
    const d = this.cfg.dns || {}
    const file = f.path ? sitePath(f.path) : REFERENCE
    const config = f.config ? fs.readFileSync(sitePath(f.config), 'utf8') : ''
    if (f.failure_policy && !['continue', 'tempfail'].includes(f.failure_policy)) {
        throw new Error(`filter.failure_policy = ${JSON.stringify(f.failure_policy)}: continue or tempfail`)
    }
    if (f.namespace && !/^[A-Za-z0-9._-]{1,64}$/.test(f.namespace)) {
        throw new Error(`filter.namespace = ${JSON.stringify(f.namespace)}: 1 to 64 letters, digits, '-', '_' or '.'`)
    }
    // TLS files, as greyhook's [store] tls_ca, tls_cert, tls_key (relative to config/).
    const tls = {}
    for (const k of TLS_KEYS) if (s[k]) tls[k] = sitePath(s[k])
    const storeSettings = { kind: s.kind, url: s.url, prefix: s.prefix, timeout_ms: s.timeout_ms, max_records: s.max_records, ...tls }
    // The sentinels' own credentials, as greyhook's [store] sentinel_user, sentinel_password.
    for (const k of ['sentinel_user', 'sentinel_password']) if (s[k] !== undefined) storeSettings[k] = s[k]
    // Changed TLS files (a renewal) make a new store.
    const storeKey = JSON.stringify({ ...storeSettings, files: Object.values(tls).map(fileStamp) })
    const store = old && old.storeKey === storeKey ? old.store : openStore(storeSettings)
    const limits = {}
    const deadline = whole(f, 'deadline_ms', 1, 60000)
    if (deadline !== undefined) limits.deadlineMs = deadline
    const calls = whole(f, 'store_calls', 1, 10000)
    if (calls !== undefined) limits.storeCalls = calls
    const mem = whole(f, 'memory_mb', 1, 4096)
    if (mem !== undefined) limits.memory = mem * 1024 * 1024
    const workers = whole(f, 'workers', 1, 64)
    const level = { debug: 'logdebug', info: 'loginfo', notice: 'lognotice', warn: 'logwarn', error: 'logerror' }
    const filter = new Filter({
        path: file,
        config,
        namespace: f.namespace,
        failurePolicy: f.failure_policy,
        store,
        limits,
        workers,
        dns: { servers: d.servers ? String(d.servers).split(/[\s,]+/).filter(Boolean) : [], timeoutMs: d.timeout_ms },
        logger: (l, m) => this[level[l] || 'loginfo'](m),
    })
    filter.storeKey = storeKey
    let info
    try {
        info = await filter.load()
    } catch (e) {
        await filter.close()
        if (store !== old?.store) await store.close()
        throw e
    }
    this.loginfo(`greyhook: loaded ${info.name} ${info.version} from ${file} (store ${store.kind}, ${filter.workerCount} worker(s), deadline ${filter.limits.deadlineMs} ms)`)
    if (store !== old?.store) this.warn_of_certificate(store)
    if (this.cfg.filter?.watch !== false) filter.watch()
    return filter
}

exports.shutdown = function () {
    clearInterval(this.greyhook_config_watch)
    clearInterval(this.greyhook_certificate_reminder)
    this.greyhook_ready?.then((f) => {
        f?.close()
        f?.store?.close()
    })
}

/** The client's address as the WIT `ip-address` (IPv4-mapped IPv6 as IPv4). */
function witAddress(ip) {
    const a = ipaddr.process(String(ip))
    return a.kind() === 'ipv4' ? { tag: 'ipv4', val: a.octets } : { tag: 'ipv6', val: a.parts }
}

/** An envelope address as the WIT gives it (`''` for the null sender). */
function addressOf(a) {
    if (!a || a.isNull?.()) return ''
    return String(typeof a.address === 'function' ? a.address() : a.address)
}

const orNone = (s) => (typeof s === 'string' && s.length ? s : undefined)

/** Haraka's connection and transaction as the WIT `context`. */
function context(connection) {
    const r = connection.remote || {}
    const rdns = ['NXDOMAIN', 'DNSERROR', 'Unknown', ''].includes(r.host) ? undefined : orNone(r.host)
    const fcrdns = connection.results?.get?.('fcrdns')?.fcrdns
    const txn = connection.transaction
    const g = txn?.notes?.greyhook
    let sender
    if (txn?.mail_from) sender = addressOf(txn.mail_from)
    return {
        session: {
            id: String(connection.uuid),
            clientAddress: witAddress(r.ip),
            clientName: Array.isArray(fcrdns) ? orNone(fcrdns[0]) : undefined,
            reverseClientName: rdns,
            helo: boundedHelo(connection.hello?.host),
            authUser: orNone(connection.notes?.auth_user),
            tls: !!connection.tls?.enabled,
        },
        transaction: { sender, recipients: g ? g.recipients : [] },
        now: BigInt(Math.floor(Date.now() / 1000)),
    }
}

/** The reply as Haraka sends it: the lines greyhook renders, without their codes. */
function dsn(reply) {
    const lines = renderLines(reply).map((l) => l.slice(4))
    // Haraka drops blank lines and would send nothing for a reply with no
    // text and no enhanced code: give it one word.
    if (!lines.some((l) => /\S/.test(l))) lines.push(reply.code >= 500 ? 'Rejected' : 'Try again later')
    return new DSN(reply.code, lines)
}

/** Calls the filter; when it could not be loaded, its failure policy answers. */
async function ask(plugin, hook, connection, arg) {
    const filter = await plugin.greyhook_ready
    if (!filter) return { verdict: failureVerdict(plugin.cfg.filter?.failure_policy, hook), failure: 'the filter is not loaded' }
    return filter.call(hook, context(connection), arg)
}

/** Answers Haraka for a verdict; `connect` closes after a tempfail/reject, as the draft's 421. */
function answer(next, verdict, phase) {
    const d = verdict.decision
    if (d.tag === 'tempfail') return next(phase === 'connect' ? constants.denysoftdisconnect : constants.denysoft, dsn(d.val))
    if (d.tag === 'reject') return next(phase === 'connect' ? constants.denydisconnect : constants.deny, dsn(d.val))
    // `accept` ends the filter chain in greyhook; in Haraka it must not
    // accept a recipient on the MTA's behalf (that would bypass relay
    // control), so it lets Haraka's other plugins decide, as `continue`.
    return next()
}

/** Keeps the headers a verdict adds, for the end of DATA. */
function keepHeaders(connection, verdict) {
    const hs = verdict.addHeaders || []
    if (!hs.length || !connection.transaction) return
    const g = notes(connection)
    for (const h of hs) {
        if (!g.headers.some((x) => x.name === h.name && x.value === h.value) && g.headers.length < 16) g.headers.push(h)
    }
}

function notes(connection) {
    const n = connection.transaction.notes
    if (!n.greyhook) n.greyhook = { recipients: [], pending: new Map(), headers: [] }
    return n.greyhook
}

/**
 * Whether Haraka lost bytes of what the client sent. It reads a command
 * line as UTF-8 and puts U+FFFD in place of each byte that is not, so the
 * Latin-1 senders `\xe9t\xe9@` and `\xe8t\xe8@` reached the filter as
 * one address: one triplet, and a sender never seen passed as another's
 * retry. The bytes are gone by the time a plugin runs, so such a command
 * is refused, as Postfix's smtpd and `greyhook smtp` refuse a command
 * line that is not UTF-8 (greyhook's policy service and milter, handed
 * the bytes, keep each as a character of its own instead).
 */
function lostBytes(s) {
    return typeof s === 'string' && s.includes('\uFFFD')
}

/** The refusal of a command Haraka could not read as UTF-8. */
const BAD_UTF8 = new DSN(500, ['5.5.2 Error: bad UTF-8 syntax'])

/**
 * Runs a hook and answers; a failure before the filter answers is the
 * failure policy's (continue). A command whose name or address lost bytes
 * ({@link lostBytes}) is refused before the filter is asked.
 */
function hookRunner(hook, argOf, after) {
    return function (next, connection, params) {
        const arg = argOf ? argOf(connection, params) : undefined
        // The address MAIL and RCPT hand the filter, or the name Haraka
        // hands the EHLO hook.
        if (lostBytes(arg ?? params)) return next(constants.deny, BAD_UTF8)
        run(this, hook, connection, arg, next, (r) => {
            if (after) after(connection, r, params)
        })
    }
}

/**
 * Asks the filter and answers Haraka exactly once: a fault on this side
 * (not the client's input) lets the mail go on, as the failure policy
 * `continue` does.
 */
function run(plugin, hook, connection, arg, next, before) {
    let r
    ask(plugin, hook, connection, arg)
        .then((got) => {
            r = got
            if (r.failure) connection.results?.add?.(plugin, { err: r.failure })
            keepHeaders(connection, r.verdict)
            before(r)
        })
        .catch((e) => {
            plugin.logerror(`greyhook: ${hook}: ${e.message}`, connection)
            r = null
        })
        .then(() => (r ? answer(next, r.verdict, hook) : next()))
}

exports.greyhook_connect = hookRunner('connect')

exports.greyhook_helo = hookRunner('ehlo', null, (connection, r) => {
    connection.notes.greyhook_keywords = r.keywords || []
})

exports.greyhook_capabilities = function (next, connection) {
    for (const k of connection.notes.greyhook_keywords || []) {
        if (!connection.capabilities.includes(k)) connection.capabilities.push(k)
    }
    next()
}

exports.greyhook_mail = hookRunner('mail', (connection, params) => addressOf(params[0]))

exports.greyhook_rcpt = hookRunner(
    'rcpt',
    (connection, params) => addressOf(params[0]),
    (connection, r, params) => {
        const g = notes(connection)
        if (r.verdict.policyGroup != null && g.pending.size < 1000) g.pending.set(addressOf(params[0]), r.verdict.policyGroup)
    },
)

exports.greyhook_rcpt_ok = function (next, connection, rcpt) {
    // The recipients Haraka accepted, with the policy group the filter gave each.
    if (connection.transaction) {
        const g = notes(connection)
        const address = addressOf(rcpt)
        if (g.recipients.length < 1000) g.recipients.push({ address, policyGroup: g.pending.get(address) ?? '' })
    }
    next()
}

exports.greyhook_data_post = function (next, connection) {
    const txn = connection.transaction
    // The bounded view greyhook's own host hands a filter (lib/message.js).
    const headers = boundedHeaders(txn.header.header_list)
    const message = { messageId: boundedMessageId(txn.header.get_all('Message-ID')[0]), headers }
    run(this, 'data', connection, message, next, (r) => {
        // The headers every verdict of the transaction added, once the
        // filter lets the message through.
        const d = r.verdict.decision.tag
        if (d !== 'tempfail' && d !== 'reject') for (const h of notes(connection).headers) txn.add_header(h.name, h.value)
    })
}

// For tests and tools: the pieces, without Haraka.
exports._internals = { context, dsn, lostBytes, witAddress }
