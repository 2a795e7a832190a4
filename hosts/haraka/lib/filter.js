'use strict'
// A loaded filter on Haraka's main thread: a small pool of worker threads
// (lib/worker.js), each running one instance of the component; a watchdog
// per call; the host side of the store and DNS imports; checking and the
// failure policy; hot reload of the component file.

const fs = require('node:fs')
const path = require('node:path')
const crypto = require('node:crypto')
const { Worker, MessageChannel } = require('node:worker_threads')
const dns = require('node:dns')
const { checkVerdict, checkEhlo } = require('./reply')
const { StoreError } = require('./store')
const ipaddr = require('ipaddr.js')

const WORKER = path.join(__dirname, 'worker.js')

// Compile a filter's Wasm whole at load, not function by function on its
// first calls: a first call that compiles as it goes can overrun the
// deadline. (A V8 flag, process-wide; workers created later inherit it.)
require('node:v8').setFlagsFromString('--no-wasm-lazy-compilation')

/** Defaults, as greyhook's `[limits]` (docs/configuration.md). */
const DEFAULT_LIMITS = {
    deadlineMs: 100,
    memory: 32 << 20,
    storeCalls: 64,
    maxTtl: 100 * 86400,
    dnsLookups: 16,
    logLinesPerCall: 32,
    logLinesPerSecond: 200,
    logLineBytes: 1024,
    maxQueue: 1000,
    loadMs: 30000,
}

/**
 * Haraka's SPF class. Its default debug log writes every step to stderr
 * (its recursions for `include:` make new instances, so an instance's
 * override is not enough): quietened, unless Haraka's spf plugin has set
 * its own logger.
 */
function spfClass() {
    const { SPF } = require('haraka-plugin-spf/lib/spf')
    if (!SPF.prototype.log_debug.greyhookQuiet && /console\.error/.test(String(SPF.prototype.log_debug))) {
        const quiet = () => {}
        quiet.greyhookQuiet = true
        SPF.prototype.log_debug = quiet
    }
    return SPF
}

/** The hash a generation is known by (an unchanged file is not reloaded). */
function sha256(bytes) {
    return crypto.createHash('sha256').update(bytes).digest('hex')
}

/** A WIT `ip-address` as text, IPv6 in RFC 5952 form (`2001:db8::5`), as resolvers answer. */
function ipText(addr) {
    return (addr.tag === 'ipv4' ? new ipaddr.IPv4(addr.val) : new ipaddr.IPv6(addr.val)).toString()
}

/** `text` as the same RFC 5952 spelling, for comparing addresses; null if not an address. */
function sameSpelling(text) {
    try {
        return ipaddr.parse(text).toString()
    } catch {
        return null
    }
}

/** A `continue` verdict with nothing to add. */
const continueVerdict = () => ({ decision: { tag: 'continue' }, addHeaders: [] })

/** The verdict the failure policy gives at `phase` (as greyhook's `FailurePolicy::verdict`). */
function failureVerdict(policy, phase) {
    if (policy !== 'tempfail') return continueVerdict()
    return {
        decision: {
            tag: 'tempfail',
            val: { code: phase === 'connect' ? 421 : 451, enhanced: '4.3.0', text: ['Temporary local problem, please try again later'] },
        },
        addHeaders: [],
    }
}

// The words of memory shared with each worker (lib/worker.js says what each is).
const [CTRL_BEGUN, CTRL_WAITING, CTRL_POSTED] = [1, 2, 3]

/** One worker thread and its bridge. */
class Slot {
    constructor(filter, source, namespace) {
        this.filter = filter
        // Four words shared with the worker (lib/worker.js says what each is).
        this.ctrl = new SharedArrayBuffer(16)
        this.ctrlView = new Int32Array(this.ctrl)
        const { port1, port2 } = new MessageChannel()
        this.port = port1
        this.worker = new Worker(WORKER, {
            workerData: { ...source, config: filter.config, namespace, limits: filter.limits, ctrl: this.ctrl, port: port2 },
            transferList: [port2],
            // The JavaScript heap of the bindings; Wasm memory is capped in the module (lib/memcap.js).
            resourceLimits: { maxOldGenerationSizeMb: 64, maxYoungGenerationSizeMb: 16 },
            stdout: true,
            stderr: true,
        })
        this.worker.stdout.resume()
        this.worker.stderr.resume()
        this.busy = null
        this.dead = false
        this.ready = new Promise((resolve, reject) => {
            this.readyResolve = resolve
            this.readyReject = reject
        })
        this.worker.on('message', (m) => this.onMessage(m))
        this.worker.on('error', (e) => this.onExit(`worker error: ${e.message}`))
        this.worker.on('exit', (code) => this.onExit(`worker exited (${code})`))
    }

    onMessage(m) {
        // The logs and metrics of a call travel with its host calls and result.
        if (m.events) for (const e of m.events) this.onMessage(e)
        switch (m.type) {
            case 'ready':
                this.isReady = true
                this.readyResolve(m)
                break
            case 'failed':
                this.dead = true
                this.readyReject(new Error(m.message))
                this.worker.terminate()
                break
            case 'result': {
                const b = this.busy
                if (!b || b.id !== m.id) return
                this.busy = null
                clearTimeout(b.timer)
                b.resolve(m)
                // A worker of a generation a reload replaced ends after its call.
                if (this.retire) this.kill('reloaded')
                else this.filter.dispatch()
                break
            }
            case 'host':
                this.filter.hostCall(this, m)
                break
            case 'log':
                this.filter.log(m.level, m.message, this)
                break
            case 'metric':
                this.filter.metric(m)
                break
            case 'broken':
                // No fresh instance in this worker: a fresh worker tries again.
                this.filter.log('error', `cannot make a fresh instance: ${m.message}`)
                this.kill()
                this.filter.replace(this)
                break
        }
    }

    onExit(why) {
        if (this.dead && !this.busy) return
        this.dead = true
        this.readyReject(new Error(why))
        const b = this.busy
        if (b) {
            this.busy = null
            clearTimeout(b.timer)
            b.resolve({ ok: false, kind: 'trap', message: why })
        }
        this.filter.replace(this)
    }

    /** Stops the worker (a runaway call, or a reload): its call gets `why`, as a failure of `kind`. */
    kill(why = 'stopped', kind = 'deadline') {
        const b = this.busy
        this.busy = null
        if (b) {
            clearTimeout(b.timer)
            b.resolve({ ok: false, kind, message: why })
        }
        this.dead = true
        this.worker.terminate()
        this.port.close()
    }

    run(job) {
        this.busy = job
        let late = 0
        const watchdog = () => {
            // This timer runs on Haraka's one thread, which load can hold
            // up past the deadline. A worker that has posted its result, or
            // waits for a host call this thread has not begun, is not
            // stuck: this thread is late, and the worker answers by itself
            // (its host call times out at the deadline). Waited for, a
            // bounded number of times; past them the load is the answer.
            const v = this.ctrlView
            const waiting = Atomics.load(v, CTRL_WAITING)
            const posted = Atomics.load(v, CTRL_POSTED) === job.id
            if ((posted || (waiting !== 0 && Atomics.load(v, CTRL_BEGUN) !== waiting)) && late < 10) {
                late++
                job.timer = setTimeout(watchdog, this.filter.limits.deadlineMs)
                return
            }
            // Stuck in its own code (or waiting on a store past the deadline):
            // the only way to stop a thread is to end it; a fresh one replaces it.
            this.kill(`no answer within ${this.filter.limits.deadlineMs} ms`, late < 10 ? 'deadline' : 'overloaded')
            this.filter.replace(this)
        }
        job.timer = setTimeout(watchdog, this.filter.limits.deadlineMs + 10)
        this.worker.postMessage({ type: 'call', id: job.id, hook: job.hook, ctx: job.ctx, arg: job.arg })
    }

    reply(seq, message) {
        if (this.dead) return
        this.port.postMessage({ seq, ...message })
        Atomics.store(this.ctrlView, 0, 1)
        Atomics.notify(this.ctrlView, 0)
    }
}

/** A filter loaded from a component file, run in `workers` threads. */
class Filter {
    /**
     * @param {object} o
     * @param {string} o.path the component (`.wasm`)
     * @param {string} [o.config] TOML for the filter's `init`
     * @param {string} [o.namespace] store namespace (default: the filter's name)
     * @param {'continue'|'tempfail'} [o.failurePolicy]
     * @param {object} o.store a store from lib/store.js
     * @param {object} [o.limits] overrides of DEFAULT_LIMITS
     * @param {number} [o.workers] worker threads (default 1)
     * @param {{servers?: string[], timeoutMs?: number}} [o.dns] the resolver of the `dns` import
     * @param {(level: string, message: string) => void} [o.logger]
     */
    constructor(o) {
        this.path = o.path
        this.config = o.config ?? ''
        this.namespace = o.namespace || null
        this.failurePolicy = o.failurePolicy === 'tempfail' ? 'tempfail' : 'continue'
        this.store = o.store
        this.limits = { ...DEFAULT_LIMITS, ...(o.limits || {}) }
        this.workerCount = Math.max(1, Math.min(Number(o.workers) || 1, 64))
        this.logger = o.logger || (() => {})
        this.slots = []
        this.queue = []
        this.nextId = 1
        this.generation = null
        this.counts = { calls: 0, failures: 0, deadline: 0, trap: 0, store: 0, invalid_verdict: 0, overloaded: 0, reloads: 0, refused: 0 }
        this.metrics = new Map()
        // The filter's DNS: the servers the operator names (default: the system's).
        this.dnsTimeoutMs = Number(o.dns?.timeoutMs) || 2000
        this.resolver = new dns.promises.Resolver({ timeout: this.dnsTimeoutMs, tries: 1 })
        if (o.dns?.servers?.length) this.resolver.setServers(o.dns.servers)
        this.closed = false
    }

    /** Loads the component (transpiling it in a worker); throws why it cannot. */
    async load() {
        const bytes = fs.readFileSync(this.path)
        const gen = await this.start(bytes, sha256(bytes))
        this.generation = gen
        this.slots = gen.slots
        this.dispatch()
        return gen.info
    }

    /** Starts a generation: one worker transpiles and initialises, the others reuse its files. */
    async start(bytes, hash) {
        const first = new Slot(this, { component: bytes }, this.namespace)
        const timer = setTimeout(() => first.kill('load timed out'), this.limits.loadMs)
        let ready
        try {
            ready = await first.ready
        } finally {
            clearTimeout(timer)
        }
        // The hooks the filter asked not to be called (contract 0.2.2), from
        // its first instance; their EHLO keywords checked as on-ehlo's are.
        const skip = ready.skip ?? { hooks: [], keywords: [] }
        if (skip.hooks.includes('ehlo')) {
            try {
                checkEhlo({ verdict: continueVerdict(), keywords: skip.keywords })
            } catch (e) {
                first.kill('refused')
                throw new Error(`the EHLO keywords it gave negotiate.skip-hooks are not valid: ${e.message}`)
            }
        }
        // The namespace: the configured one, else each generation's filter's name.
        const gen = { hash, info: ready.info, contract: ready.contract, files: ready.files, namespace: ready.namespace, skip, slots: [first] }
        for (let i = 1; i < this.workerCount; i++) gen.slots.push(new Slot(this, { files: gen.files }, gen.namespace))
        await Promise.all(gen.slots.map((s) => s.ready))
        return gen
    }

    /** Replaces a dead worker of the current generation with a fresh one. */
    replace(slot) {
        const i = this.slots.indexOf(slot)
        if (i < 0 || this.closed) return
        const fresh = new Slot(this, { files: this.generation.files }, this.generation.namespace)
        this.slots[i] = fresh
        fresh.ready.then(
            () => this.dispatch(),
            (e) => this.logger('error', `greyhook: a fresh worker failed: ${e.message}`),
        )
    }

    /** Reloads if the component file changed; a filter that fails to load is not swapped in. */
    async reload() {
        let gen
        try {
            const bytes = fs.readFileSync(this.path)
            const hash = sha256(bytes)
            if (this.generation && hash === this.generation.hash) return { result: 'unchanged' }
            gen = await this.start(bytes, hash)
        } catch (e) {
            this.counts.refused++
            this.logger('error', `greyhook: reload of ${this.path} refused: ${e.message}; the running filter stays`)
            return { result: 'refused', reason: e.message }
        }
        const old = this.slots
        this.generation = gen
        this.slots = gen.slots
        this.counts.reloads++
        // Calls in flight on the old workers finish there; idle ones end now.
        for (const s of old) {
            if (!s.busy) s.kill('reloaded')
            else s.retire = true
        }
        this.dispatch()
        this.logger('notice', `greyhook: loaded ${gen.info.name} ${gen.info.version} from ${this.path}`)
        return { result: 'loaded', info: gen.info }
    }

    /** Polls the component file every `intervalMs` and reloads when it changes. */
    watch(intervalMs = 1000) {
        let busy = false
        this.watcher = setInterval(async () => {
            if (busy) return
            busy = true
            try {
                await this.reload()
            } finally {
                busy = false
            }
        }, intervalMs)
        this.watcher.unref()
    }

    idleSlot() {
        return this.slots.find((s) => !s.busy && !s.dead && s.isReady)
    }

    dispatch() {
        while (this.queue.length) {
            const slot = this.idleSlot()
            if (!slot) return
            const job = this.queue.shift()
            if (job.cancelled) continue
            clearTimeout(job.queueTimer)
            slot.run(job)
        }
    }

    /**
     * Calls `hook` (`connect`, `ehlo`, `mail`, `rcpt`, `data`) and answers
     * with a checked verdict: `{verdict, keywords?, failure?}`. Never throws:
     * a failure gives the failure policy's verdict and says why.
     */
    async call(hook, ctx, arg) {
        // A hook the filter asked not to be called: answered here, as it
        // said it would answer, without a worker.
        // On-data for the null sender only (0.2.3): a transaction with a
        // sender is answered the same way.
        const skip = this.generation?.skip
        if (skip && (skip.hooks.includes(hook) || (hook === 'data' && skip.dataNullSenderOnly && ctx?.transaction?.sender))) {
            const verdict = continueVerdict()
            return hook === 'ehlo' ? { verdict, keywords: [...skip.keywords] } : { verdict }
        }
        this.counts.calls++
        let r
        if (this.queue.length >= this.limits.maxQueue) {
            r = { ok: false, kind: 'overloaded', message: `more than ${this.limits.maxQueue} calls waiting` }
        } else {
            r = await new Promise((resolve) => {
                const job = { id: this.nextId++, hook, ctx, arg, resolve }
                // Waiting for a worker is bounded too: at most the deadline
                // again, then the failure policy answers.
                job.queueTimer = setTimeout(() => {
                    if (this.queue.includes(job)) {
                        job.cancelled = true
                        this.queue.splice(this.queue.indexOf(job), 1)
                        resolve({ ok: false, kind: 'overloaded', message: 'no worker free within the deadline' })
                    }
                }, this.limits.deadlineMs * 10)
                this.queue.push(job)
                this.dispatch()
            })
        }
        if (r.ok) {
            try {
                if (hook === 'ehlo') {
                    checkEhlo(r.value)
                    return { verdict: r.value.verdict, keywords: r.value.keywords ?? [] }
                }
                checkVerdict(r.value)
                return { verdict: r.value }
            } catch (e) {
                r = { ok: false, kind: 'invalid_verdict', message: e.message }
            }
        }
        this.counts.failures++
        this.counts[r.kind] = (this.counts[r.kind] || 0) + 1
        // Load is not a failure of the filter: a call that found no worker
        // in time is a tempfail whatever the policy, as greyhook's `busy`
        // (with `continue`, a flood would pass its mail ungreylisted).
        const policy = r.kind === 'overloaded' ? 'tempfail' : this.failurePolicy
        this.logger('error', `greyhook: filter ${this.generation?.info?.name ?? this.path} failed at ${hook}: ${r.kind}: ${r.message}; answered: ${policy}`)
        return { verdict: failureVerdict(policy, hook), keywords: [], failure: `${r.kind}: ${r.message}` }
    }

    /** Serves a worker's store or DNS call. */
    async hostCall(slot, m) {
        // Begun: a worker whose call timed out waiting for this answer
        // tells load (not begun) from a slow store or resolver.
        Atomics.store(slot.ctrlView, CTRL_BEGUN, m.seq)
        let answer
        try {
            const a = m.args
            switch (m.op) {
                case 'get':
                    answer = { ok: true, value: await this.store.get(a.key, a.now) }
                    break
                case 'getMany':
                    answer = { ok: true, value: await this.store.getMany(a.keys, a.now) }
                    break
                case 'set':
                    answer = { ok: true, value: await this.store.set(a.key, a.value, a.expiresAt, a.cond, a.now) }
                    break
                case 'setMany': {
                    const out = []
                    for (const w of a.writes) out.push(await this.store.set(w.key, w.value, w.expiresAt, w.cond, a.now))
                    answer = { ok: true, value: out }
                    break
                }
                case 'delete':
                    answer = { ok: true, value: await this.store.delete(a.key, a.cond, a.now) }
                    break
                case 'dns':
                case 'reverse':
                case 'fcrdns':
                    answer = await this.dns(m.op, a)
                    break
                case 'spf':
                    answer = await this.spf(a)
                    break
                default:
                    answer = { ok: false, kind: 'unavailable', message: `unknown host call ${m.op}` }
            }
        } catch (e) {
            answer = { ok: false, kind: e instanceof StoreError ? e.kind : 'unavailable', message: e.message }
        }
        slot.reply(m.seq, answer)
    }

    /** DNS through Node's resolver (answers bounded to 64 records). */
    async dns(op, a) {
        const err = (e) => {
            const code = e?.code
            if (code === 'ENOTFOUND') return { ok: false, error: { tag: 'nxdomain' } }
            if (code === 'ENODATA') return { ok: false, error: { tag: 'no-data' } }
            if (code === 'ETIMEOUT') return { ok: false, error: { tag: 'timeout' } }
            return { ok: false, error: { tag: 'servfail', val: String(code || e?.message || e) } }
        }
        try {
            if (op === 'dns') {
                const name = String(a.name).replace(/\.$/, '')
                if (!/^[A-Za-z0-9_.-]{1,253}$/.test(name)) return { ok: false, error: { tag: 'limit', val: 'not a valid domain name' } }
                let out
                switch (a.kind) {
                    case 'a':
                        out = await this.resolver.resolve4(name)
                        break
                    case 'aaaa':
                        out = await this.resolver.resolve6(name)
                        break
                    case 'mx':
                        out = (await this.resolver.resolveMx(name)).map((r) => `${r.priority} ${r.exchange.toLowerCase()}`)
                        break
                    case 'txt':
                        out = (await this.resolver.resolveTxt(name)).map((r) => r.join(''))
                        break
                    case 'ptr':
                        out = (await this.resolver.resolvePtr(name)).map((n) => n.toLowerCase())
                        break
                    default:
                        return { ok: false, error: { tag: 'limit', val: `record type ${a.kind}` } }
                }
                return { ok: true, value: out.slice(0, 64) }
            }
            const want = ipText(a.address)
            const names = (await this.resolver.reverse(want)).map((n) => n.toLowerCase().replace(/\.$/, '')).slice(0, 64)
            if (op === 'reverse') return { ok: true, value: names }
            for (const n of names.slice(0, 10)) {
                const addrs = await (a.address.tag === 'ipv4' ? this.resolver.resolve4(n) : this.resolver.resolve6(n)).catch(() => [])
                if (addrs.some((x) => sameSpelling(x) === want)) return { ok: true, value: n }
            }
            return { ok: true, value: undefined }
        } catch (e) {
            return err(e)
        }
    }

    /**
     * SPF (RFC 7208) for the `auth.spf` import, by Haraka's own SPF library
     * (haraka-plugin-spf) over this filter's resolver: the MAIL FROM
     * identity, or for the null sender `postmaster@` the HELO name, as
     * greyhook's host does; a failure on the way is `temperror`.
     */
    async spf(a) {
        const SPF = spfClass()
        const domain = (a.sender.includes('@') && a.sender ? a.sender.slice(a.sender.lastIndexOf('@') + 1) : a.helo).toLowerCase()
        const ip = ipText(a.address)
        const names = ['none', 'none', 'pass', 'fail', 'softfail', 'neutral', 'temperror', 'permerror']
        if (!/^[a-z0-9_.-]{1,253}$/.test(domain) || !domain.includes('.')) return { ok: true, value: { result: 'none', domain } }
        try {
            const spf = new SPF()
            spf.resolver = this.resolver
            spf.helo = a.helo || 'unknown'
            spf.dns_timeout_ms = this.dnsTimeoutMs
            const r = await spf.check_host(ip, domain, a.sender || `postmaster@${domain}`)
            return { ok: true, value: { result: names[r] || 'temperror', domain } }
        } catch {
            return { ok: true, value: { result: 'temperror', domain } }
        }
    }

    /** A filter's log line: control characters stripped, length and count bounded. */
    log(level, message, slot) {
        if (slot) {
            const b = slot.busy
            if (b) {
                b.logLines = (b.logLines || 0) + 1
                if (b.logLines > this.limits.logLinesPerCall) return
            }
        }
        // And at most logLinesPerSecond a second for the filter as a whole.
        const sec = Math.floor(Date.now() / 1000)
        if (this.logSecond !== sec) {
            if (this.logDropped) this.logger('warn', `greyhook: ${this.logDropped} log lines of the filter dropped (over ${this.limits.logLinesPerSecond} a second)`)
            this.logSecond = sec
            this.logLines = 0
            this.logDropped = 0
        }
        if (++this.logLines > this.limits.logLinesPerSecond) {
            this.logDropped++
            return
        }
        const clean = String(message).replace(/[\x00-\x1f\x7f]/g, ' ').slice(0, this.limits.logLineBytes)
        this.logger(level, `greyhook[${this.generation?.info?.name ?? 'filter'}]: ${clean}`)
    }

    /** A filter's counter or histogram, kept in memory (at most 256 series). */
    metric(m) {
        if (!/^[a-z][a-z0-9_]{0,63}$/.test(m.name) || !Array.isArray(m.labels) || m.labels.length > 4) return
        const key = `${m.name}{${m.labels.map(([k, v]) => `${k}=${JSON.stringify(String(v).slice(0, 64))}`).join(',')}}`
        if (!this.metrics.has(key) && this.metrics.size >= 256) return
        const cur = this.metrics.get(key) || { kind: m.kind, sum: 0, count: 0 }
        cur.sum += Number(m.value) || 0
        cur.count += 1
        this.metrics.set(key, cur)
    }

    /**
     * Stops the file watch and the workers. Graceful (a configuration
     * reload): calls in flight and queued finish first, so no request is
     * lost; otherwise (shutdown) they get the failure policy at once.
     */
    async close({ graceful = false } = {}) {
        clearInterval(this.watcher)
        if (graceful) {
            const until = Date.now() + this.limits.deadlineMs * 10 + 1000
            while ((this.queue.length || this.slots.some((s) => s.busy)) && Date.now() < until) {
                await new Promise((r) => setTimeout(r, 10))
            }
        }
        this.closed = true
        for (const s of this.slots) s.kill('closed')
        for (const j of this.queue) j.resolve({ ok: false, kind: 'overloaded', message: 'closed' })
        this.queue = []
    }
}

module.exports = { Filter, failureVerdict, DEFAULT_LIMITS }
