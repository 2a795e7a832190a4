'use strict'
// Per-call cost of the reference filter's on-rcpt inside the Haraka host
// (jco, a worker thread, the store on the main thread), the same work as
// `cargo bench -p greyhook --bench filter` does through wasmtime: calls
// over 5,000 triplets on the memory store, with the network identity (no
// DNS), the same workload as that bench. Prints wall and CPU time per call
// (CPU: every thread of the process), one at a time and 8 in flight.
// `cargo bench -p greyhook --bench filter -- --haraka` runs this beside
// the wasmtime host and prints the ratio.
//
//   node bench/percall.js [filter.wasm] [calls] [--json]
const path = require('node:path')
const { Filter } = require('../lib/filter')
const { MemoryStore } = require('../lib/store')

const wasm = process.argv[2] || path.join(__dirname, '../filters/greylist.wasm')
const calls = Number(process.argv[3]) || 20000

const T0 = 1_700_000_000
const TRIPLETS = 5000
if (!(calls >= TRIPLETS)) throw new Error(`at least ${TRIPLETS} calls`)

/** Call `i` of the workload: host/benches/filter.rs's `workload`. */
const ctx = (i) => {
    const t = i % TRIPLETS
    return {
        session: { id: 'b', clientAddress: { tag: 'ipv4', val: [10, (t >> 8) & 255, t & 255, 1] }, tls: false },
        transaction: { sender: `sender${t}x@example.org`, recipients: [] },
        now: BigInt(T0 + Math.floor(i / TRIPLETS) * 100),
    }
}

async function run(f, inFlight) {
    let next = 0
    let failures = 0
    const cpu0 = process.cpuUsage()
    const t0 = process.hrtime.bigint()
    const lane = async () => {
        while (next < calls) {
            const i = next++
            const r = await f.call('rcpt', ctx(i), 'user@example.com')
            if (r.failure) failures++
        }
    }
    await Promise.all(Array.from({ length: inFlight }, lane))
    const wall = Number(process.hrtime.bigint() - t0) / 1000 / calls
    const c = process.cpuUsage(cpu0)
    const cpu = (c.user + c.system) / calls
    if (failures) throw new Error(`${failures} calls failed: the figures would be wrong`)
    return { wall, cpu }
}

;(async () => {
    const f = new Filter({ path: wasm, config: 'identity = ["network"]\n', store: new MemoryStore(), workers: 2, limits: { deadlineMs: 1000 }, logger: () => {} })
    await f.load()
    await run(f, 1) // warm up
    // A fresh store for each measured run, as the Rust bench does.
    f.store = new MemoryStore()
    const one = await run(f, 1)
    f.store = new MemoryStore()
    const eight = await run(f, 8)
    await f.close()
    if (process.argv.includes('--json')) return console.log(JSON.stringify({ one, eight }))
    console.log(`haraka host, on-rcpt, ${calls} calls over 5000 triplets, memory store, 2 workers`)
    console.log(`| in flight | wall µs/call | CPU µs/call |`)
    console.log(`|---|---|---|`)
    console.log(`| 1 | ${one.wall.toFixed(1)} | ${one.cpu.toFixed(1)} |`)
    console.log(`| 8 | ${eight.wall.toFixed(1)} | ${eight.cpu.toFixed(1)} |`)
})()
