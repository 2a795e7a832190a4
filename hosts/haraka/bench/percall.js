'use strict'
// Per-call cost of the reference filter's on-rcpt inside the Haraka host
// (jco, a worker thread, the store on the main thread), the same work as
// `cargo bench -p greyhook --bench filter` does through wasmtime: calls
// over 5,000 triplets on the memory store, with the network identity (no
// DNS). Prints wall and CPU time per call (CPU: every thread of the
// process), one at a time and 8 in flight.
//
//   node bench/percall.js [filter.wasm] [calls]
const path = require('node:path')
const { Filter } = require('../lib/filter')
const { MemoryStore } = require('../lib/store')

const wasm = process.argv[2] || path.join(__dirname, '../filters/greylist.wasm')
const calls = Number(process.argv[3]) || 20000

const ctx = (i, now) => ({
    session: { id: `s${i}`, clientAddress: { tag: 'ipv4', val: [10, (i >> 8) & 255, i & 255, 1] }, helo: 'mx.example.org', tls: false },
    transaction: { sender: `s${i % 5000}@example.org`, recipients: [] },
    now: BigInt(now),
})

async function run(f, inFlight) {
    const now = 1_700_000_000
    let next = 0
    let failures = 0
    const cpu0 = process.cpuUsage()
    const t0 = process.hrtime.bigint()
    const lane = async () => {
        while (next < calls) {
            const i = next++
            const r = await f.call('rcpt', ctx(i % 5000, now + Math.floor(i / 5000) * 400), `r${i % 5000}@example.com`)
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
    const one = await run(f, 1)
    const eight = await run(f, 8)
    console.log(`haraka host, on-rcpt, ${calls} calls over 5000 triplets, memory store, 2 workers`)
    console.log(`| in flight | wall µs/call | CPU µs/call |`)
    console.log(`|---|---|---|`)
    console.log(`| 1 | ${one.wall.toFixed(1)} | ${one.cpu.toFixed(1)} |`)
    console.log(`| 8 | ${eight.wall.toFixed(1)} | ${eight.cpu.toFixed(1)} |`)
    await f.close()
})()
