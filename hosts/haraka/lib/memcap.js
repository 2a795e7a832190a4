'use strict'
// Caps the linear memory a core Wasm module defines, by rewriting the
// maximum in its memory section: past it `memory.grow` fails and the
// filter's allocator traps, as under greyhook's wasmtime limits. V8 has no
// per-instance memory limit and a worker's resourceLimits do not count
// Wasm memory, so without this a runaway filter could take gigabytes
// before its deadline. Hand-written: only the memory section is touched
// (a few LEB128 numbers); no library rewrites one section of a module.

const PAGE = 65536

function readLeb(b, at) {
    let n = 0
    let shift = 0
    for (;;) {
        const byte = b[at++]
        if (byte === undefined) throw new Error('truncated module')
        n += (byte & 0x7f) * 2 ** shift
        shift += 7
        if (!(byte & 0x80)) return [n, at]
        if (shift > 35) throw new Error('LEB128 too long')
    }
}

function leb(n) {
    const out = []
    do {
        let byte = n % 128
        n = Math.floor(n / 128)
        if (n) byte |= 0x80
        out.push(byte)
    } while (n)
    return out
}

/** `bytes` (a core module) with every memory it defines capped at `maxBytes`. */
function capMemory(bytes, maxBytes) {
    const b = Buffer.from(bytes)
    if (b.readUInt32LE(0) !== 0x6d736100) throw new Error('not a core Wasm module')
    const maxPages = Math.max(1, Math.floor(maxBytes / PAGE))
    const parts = [b.subarray(0, 8)]
    let at = 8
    while (at < b.length) {
        const id = b[at]
        const [size, body] = readLeb(b, at + 1)
        const end = body + size
        if (id !== 5) {
            parts.push(b.subarray(at, end))
        } else {
            let [count, p] = readLeb(b, body)
            const out = [...leb(count)]
            for (let i = 0; i < count; i++) {
                const flags = b[p++]
                if (flags & ~0x03) throw new Error(`memory ${i}: 64-bit or unknown limits (flags ${flags})`)
                let min
                ;[min, p] = readLeb(b, p)
                let max = maxPages
                if (flags & 0x01) {
                    let declared
                    ;[declared, p] = readLeb(b, p)
                    max = Math.min(declared, maxPages)
                }
                if (min > max) throw new Error(`memory ${i} starts at ${min * PAGE} bytes, over the limit of ${maxPages * PAGE}`)
                out.push(flags | 0x01, ...leb(min), ...leb(max))
            }
            const content = Buffer.from(out)
            parts.push(Buffer.from([5, ...leb(content.length)]), content)
        }
        at = end
    }
    return new Uint8Array(Buffer.concat(parts))
}

module.exports = { capMemory }
