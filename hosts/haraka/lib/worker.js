'use strict'
// A filter's worker thread: it transpiles the component with jco (when
// given one), instantiates it, and runs one hook call at a time. The main
// thread's watchdog terminates it when a call overruns its deadline, which
// is the only way to stop a JavaScript thread stuck in a Wasm loop (there
// is no epoch interruption in V8). Host calls (store, DNS) are synchronous
// imports, so the worker asks the main thread and blocks on an Atomics
// wait until the answer is in its reply port (Node 20 has no JSPI).

const { parentPort, workerData, receiveMessageOnPort } = require('node:worker_threads')
const { wasiImports, Sink, NotOffered } = require('./wasi')
const { capMemory } = require('./memcap')

const { config, limits, ctrl: ctrlBuffer, port } = workerData
// Shared with the main thread (lib/filter.js, `Slot`): CTRL_WAKE is set and
// notified when an answer is in the reply port; the main thread writes in
// CTRL_BEGUN the host call it has begun to serve; this worker writes in
// CTRL_WAITING the host call it waits for (0: none) and in CTRL_POSTED the
// call whose result it has posted.
const ctrl = new Int32Array(ctrlBuffer)
const [CTRL_WAKE, CTRL_BEGUN, CTRL_WAITING, CTRL_POSTED] = [0, 1, 2, 3]
const MAX_KEY = 256
const MAX_VALUE = 16 * 1024
const LEVELS = ['debug', 'info', 'warn', 'error']

/** The greyhook interfaces a filter may import (besides WASI), by contract. */
const PROVIDED = {
    '0.1.0': ['greyhook:filter/types', 'greyhook:filter/store', 'greyhook:filter/log'],
    '0.2.0': [
        'greyhook:filter/types',
        'greyhook:filter/store',
        'greyhook:filter/log',
        'greyhook:filter/dns',
        'greyhook:filter/auth',
        'greyhook:filter/metrics',
    ],
}
// 0.2.1 adds functions to `metrics` (handles), no interface.
PROVIDED['0.2.1'] = PROVIDED['0.2.0']
// 0.2.2 adds `negotiate`: the hooks a filter asks not to be called.
PROVIDED['0.2.2'] = [...PROVIDED['0.2.0'], 'greyhook:filter/negotiate']
// 0.2.3 adds a function to `negotiate` (on-data for the null sender only).
PROVIDED['0.2.3'] = PROVIDED['0.2.2']

// What the filter said through `negotiate.skip-hooks` during its `init`
// (later calls are ignored, as the contract says): the main thread answers
// those hooks itself. And whether it asked for on-data with the null
// sender only (`negotiate.data-for-null-sender-only`, 0.2.3).
let initializing = false
let skip = null
let dataNullSenderOnly = false

// Metric handles (0.2.1): the series this worker's instance asked for, by
// handle. A series that breaks the rules, or past 256, gets no handle.
const series = []
const MAX_SERIES = 256
function define(kind, name, labels) {
    const ok =
        /^[a-z][a-z0-9_]{0,63}$/.test(name) &&
        Array.isArray(labels) &&
        labels.length <= 4 &&
        labels.every(([k, v]) => /^[a-z][a-z0-9_]{0,63}$/.test(k) && String(v).length <= 64 && !/[\x00-\x1f\x7f]/.test(String(v)))
    if (!ok) return undefined
    const found = series.findIndex((s) => s.kind === kind && s.name === name && JSON.stringify(s.labels) === JSON.stringify(labels))
    if (found >= 0) return found
    if (series.length >= MAX_SERIES) return undefined
    series.push({ kind, name, labels })
    return series.length - 1
}
function byHandle(kind, handle, value) {
    const s = series[handle]
    if (s && s.kind === kind) emit({ type: 'metric', kind, name: s.name, labels: s.labels, value })
}

let hooks = null
let namespace = workerData.namespace || null
let memories = []
let files = workerData.files || null
const output = new Sink()

// The call in progress.
let now = 0
let deadlineAt = 0
let storeCalls = 0
let dnsCalls = 0
let storeFailure = null
// A host call of this call the main thread had not even begun within the
// deadline: Haraka's one thread was too busy. That is load, not a failure
// of the store (or of the filter).
let hostLate = false
let seq = 0

// Log lines and metrics of the call in progress: they travel with its next
// message to the main thread (a host call or the result) rather than one
// message each. Outside a call (init) they are posted at once.
let events = null
const MAX_EVENTS = 256

function emit(e) {
    if (events === null) parentPort.postMessage(e)
    else if (events.length < MAX_EVENTS) events.push(e)
}

/** The events gathered so far, handed over with a message. */
function takeEvents() {
    const e = events
    events = events === null ? null : []
    return e && e.length ? e : undefined
}

const storeError = (tag, message) => ({ payload: { tag, val: message } })

/** Asks the main thread and waits for its answer (bounded by the call's deadline). */
function host(op, args, reserveMs = 0) {
    const id = ++seq
    Atomics.store(ctrl, CTRL_WAITING, id)
    parentPort.postMessage({ type: 'host', seq: id, op, args, events: takeEvents() })
    try {
        for (;;) {
            Atomics.store(ctrl, CTRL_WAKE, 0)
            let m
            while ((m = receiveMessageOnPort(port))) {
                if (m.message.seq === id) return m.message
            }
            const left = deadlineAt - reserveMs - Date.now()
            if (left <= 0) {
                if (Atomics.load(ctrl, CTRL_BEGUN) !== id) hostLate = true
                return { ok: false, kind: 'unavailable', message: 'no answer from the host within the deadline', error: { tag: 'timeout' } }
            }
            Atomics.wait(ctrl, CTRL_WAKE, 0, left)
        }
    } finally {
        Atomics.store(ctrl, CTRL_WAITING, 0)
    }
}

function fail(message) {
    if (storeFailure === null) storeFailure = message
    return storeError('unavailable', message)
}

/** A broken store limit: the call's failure, and the `limit` error the filter sees. */
function limit(message) {
    fail(message)
    return storeError('limit', message)
}

/** A write's outcome in the WIT's shape (version 0: conflict). */
const outcome = (v) => (v === 0n ? { tag: 'conflict' } : { tag: 'written', val: v })

function admit(key) {
    storeCalls++
    if (storeCalls > limits.storeCalls) {
        throw limit(`more than ${limits.storeCalls} store calls in one hook call`)
    }
    if (typeof key !== 'string' || Buffer.byteLength(key) === 0 || Buffer.byteLength(key) > MAX_KEY) {
        throw limit(`store key of ${Buffer.byteLength(String(key))} bytes (1 to ${MAX_KEY} allowed)`)
    }
    if (namespace === null) {
        throw fail('no store during init: the namespace is the filter\'s name, known when init returns (set `namespace` to use the store in init)')
    }
    return `${namespace}/${key}`
}

function admitWrite(key, value) {
    const k = admit(key)
    if (value.byteLength > MAX_VALUE) {
        throw limit(`store value of ${value.byteLength} bytes (at most ${MAX_VALUE})`)
    }
    return k
}

function checkRead(key, e) {
    if (e && e.value.byteLength > MAX_VALUE) throw fail(`stored value of ${e.value.byteLength} bytes under ${key}`)
    return e ? { value: new Uint8Array(e.value), version: BigInt(e.version) } : undefined
}

/** The answer of a host call, or the store error it becomes. */
function answer(r) {
    if (r.ok) return r.value
    throw r.kind === 'limit' ? limit(r.message) : fail(r.message)
}

const ttlOf = (ttl) => Math.min(Math.max(1, Number(ttl)), limits.maxTtl)
const condOf = (v) => (v === undefined || v === null ? null : BigInt(v))

const store = {
    get(key) {
        const k = admit(key)
        return checkRead(key, answer(host('get', { key: k, now })))
    },
    getMany(keys) {
        const ks = keys.map(admit)
        return answer(host('getMany', { keys: ks, now })).map((e, i) => checkRead(keys[i], e))
    },
    set(key, value, ttl, ifVersion) {
        const k = admitWrite(key, value)
        return outcome(answer(host('set', { key: k, value, expiresAt: now + ttlOf(ttl), cond: condOf(ifVersion), now })))
    },
    delete(key, ifVersion) {
        const k = admit(key)
        return answer(host('delete', { key: k, cond: condOf(ifVersion), now }))
    },
    setMany(writes) {
        const ws = writes.map((w) => ({ key: admitWrite(w.key, w.value), value: w.value, expiresAt: now + ttlOf(w.ttlSeconds), cond: condOf(w.ifVersion) }))
        return answer(host('setMany', { writes: ws, now })).map(outcome)
    },
}

function admitDns() {
    dnsCalls++
    if (dnsCalls > limits.dnsLookups) {
        throw { payload: { tag: 'limit', val: `more than ${limits.dnsLookups} DNS lookups in one hook call` } }
    }
}

function dnsAnswer(r) {
    if (r.ok) return r.value
    throw { payload: r.error ?? { tag: 'servfail', val: String(r.message) } }
}

/** A quarter of the hook's time is kept from DNS waits, so that the filter can still answer (as in greyhook). */
const dnsReserve = () => limits.deadlineMs / 4

const imports = {
    ...wasiImports(() => now, output),
    'greyhook:filter/store': store,
    'greyhook:filter/log': {
        write(level, message) {
            emit({ type: 'log', level: LEVELS.includes(level) ? level : 'info', message: String(message) })
        },
    },
    'greyhook:filter/metrics': {
        counterAdd(name, labels, value) {
            emit({ type: 'metric', kind: 'counter', name, labels, value: Number(value) })
        },
        histogramObserve(name, labels, value) {
            emit({ type: 'metric', kind: 'histogram', name, labels, value })
        },
        counter(name, labels) {
            return define('counter', name, labels)
        },
        histogram(name, labels) {
            return define('histogram', name, labels)
        },
        add(handle, value) {
            byHandle('counter', handle, Number(value))
        },
        observe(handle, value) {
            byHandle('histogram', handle, value)
        },
    },
    'greyhook:filter/negotiate': {
        skipHooks(set, keywords) {
            if (!initializing) return
            skip = { hooks: Object.keys(HOOKS).filter((h) => set && set[h] === true), keywords: Array.from(keywords ?? [], String) }
        },
        dataForNullSenderOnly() {
            if (initializing) dataNullSenderOnly = true
        },
    },
    'greyhook:filter/dns': {
        lookup(name, kind) {
            admitDns()
            return dnsAnswer(host('dns', { name, kind }, dnsReserve()))
        },
        reverse(address) {
            admitDns()
            return dnsAnswer(host('reverse', { address }, dnsReserve()))
        },
    },
    'greyhook:filter/auth': {
        spf(address, helo, sender) {
            admitDns()
            return dnsAnswer(host('spf', { address, helo, sender }, dnsReserve()))
        },
        forwardConfirmedName(address) {
            admitDns()
            return dnsAnswer(host('fcrdns', { address }, dnsReserve()))
        },
    },
}

/** Transpiles the component (once per load; respawned workers reuse the files). */
async function transpile(bytes) {
    const { transpile } = await import('@bytecodealliance/jco')
    const out = await transpile(bytes, { name: 'filter', instantiation: 'sync', typescript: false, base64Cutoff: 0 })
    const hooksExport = out.exports.map(([n]) => n).find((n) => n.startsWith('greyhook:filter/hooks@'))
    if (!hooksExport) {
        throw new Error(`it exports no greyhook:filter/hooks interface (exports: ${out.exports.map(([n]) => n).join(', ') || 'none'}); build it for the greyhook:filter/filter world`)
    }
    const version = hooksExport.split('@')[1]
    if (!PROVIDED[version]) {
        throw new Error(`it exports ${hooksExport}; this host runs greyhook:filter@0.1.0, @0.2.0, @0.2.1, @0.2.2 and @0.2.3 filters`)
    }
    const offered = new Set([...PROVIDED[version], ...Object.keys(wasiImports(() => 0, new Sink()))])
    const refused = out.imports.filter((i) => !offered.has(i))
    if (refused.length) {
        throw new Error(`it imports ${refused.join(', ')}, which this host does not offer: greyhook gives filters no network, HTTP or files (see docs/writing-filters.md)`)
    }
    const entries = Object.entries(out.files)
    const js = Buffer.from(entries.find(([n]) => n.endsWith('.js'))[1]).toString('utf8')
    const modules = Object.fromEntries(entries.filter(([n]) => n.endsWith('.wasm')).map(([n, b]) => [n, new Uint8Array(b)]))
    return { js, modules, hooksExport, version }
}

let instantiateFn = null
let compiled = null

/** A fresh instance, initialised with the operator's configuration. */
function instantiate() {
    memories = []
    const instantiateCore = (module, importObject) => {
        const inst = new WebAssembly.Instance(module, importObject)
        for (const v of Object.values(inst.exports)) if (v instanceof WebAssembly.Memory) memories.push(v)
        return inst
    }
    const exported = instantiateFn((name) => compiled[name], imports, instantiateCore)
    const h = exported[files.hooksExport]
    // init runs with the store closed until the namespace is known.
    now = Math.floor(Date.now() / 1000)
    deadlineAt = Date.now() + limits.deadlineMs
    storeCalls = 0
    let info
    skip = null
    dataNullSenderOnly = false
    initializing = true
    try {
        info = h.init(config)
    } catch (e) {
        const why = e && Object.hasOwn(e, 'payload') ? e.payload : e?.message || String(e)
        throw new Error(`init refused the configuration: ${why}`)
    } finally {
        initializing = false
    }
    if (!namespace) {
        if (!/^[A-Za-z0-9._-]{1,64}$/.test(info.name)) {
            throw new Error(`the filter's name ${JSON.stringify(info.name)} cannot be its store namespace: set namespace`)
        }
        namespace = info.name
    }
    hooks = h
    return info
}

function memoryBytes() {
    return memories.reduce((n, m) => n + m.buffer.byteLength, 0)
}

const HOOKS = {
    connect: (ctx) => hooks.onConnect(ctx),
    ehlo: (ctx) => hooks.onEhlo(ctx),
    mail: (ctx, arg) => hooks.onMail(ctx, arg),
    rcpt: (ctx, arg) => hooks.onRcpt(ctx, arg),
    data: (ctx, arg) => hooks.onData(ctx, arg),
}

function call({ id, hook, ctx, arg }) {
    now = Number(ctx.now)
    deadlineAt = Date.now() + limits.deadlineMs
    storeCalls = 0
    dnsCalls = 0
    storeFailure = null
    hostLate = false
    events = []
    output.take()
    let result
    try {
        result = { ok: true, value: HOOKS[hook](ctx, arg) }
        if (storeFailure !== null && hostLate) {
            result = { ok: false, kind: 'overloaded', message: `Haraka's main thread did not begin a store call within the deadline (${storeFailure})` }
        } else if (storeFailure !== null) result = { ok: false, kind: 'store', message: storeFailure }
        else if (memoryBytes() > limits.memory) {
            result = { ok: false, kind: 'trap', message: `memory of ${memoryBytes()} bytes, over the limit of ${limits.memory}` }
        }
    } catch (e) {
        const stderr = output.take()
        const what = e instanceof NotOffered ? e.message : e?.message || String(e)
        result = { ok: false, kind: 'trap', message: stderr ? `${what} (stderr: ${stderr})` : what }
    }
    if (!result.ok && result.kind === 'trap') {
        // A trapped component instance cannot be entered again: a fresh one.
        try {
            instantiate()
        } catch (e) {
            parentPort.postMessage({ type: 'result', id, ...result, events: takeEvents() })
            events = null
            parentPort.postMessage({ type: 'broken', message: e.message })
            return
        }
    }
    Atomics.store(ctrl, CTRL_POSTED, id)
    parentPort.postMessage({ type: 'result', id, ...result, events: takeEvents() })
    events = null
}

async function main() {
    try {
        if (!files) files = await transpile(workerData.component)
        const source = `data:text/javascript;base64,${Buffer.from(files.js).toString('base64')}`
        instantiateFn = (await import(source)).instantiate
        compiled = Object.fromEntries(Object.entries(files.modules).map(([n, b]) => [n, new WebAssembly.Module(capMemory(b, limits.memory))]))
        const info = instantiate()
        // Let what loading left queued run now (after a transpile, jco's
        // module setup takes a few hundred ms), not in the first call's time.
        await new Promise((r) => setTimeout(r, 0))
        const said = skip || dataNullSenderOnly ? { hooks: [], keywords: [], ...skip, dataNullSenderOnly } : null
        parentPort.postMessage({ type: 'ready', info, contract: files.version, namespace, skip: said, files: workerData.files ? null : files })
    } catch (e) {
        parentPort.postMessage({ type: 'failed', message: e?.message || String(e) })
        return
    }
    parentPort.on('message', (m) => {
        if (m.type === 'call') call(m)
    })
}

main()
