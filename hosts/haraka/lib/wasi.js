'use strict'
// The WASI a filter gets inside Haraka: as in greyhook's wasmtime sandbox,
// nothing of the machine. No environment, arguments, files, network or
// terminal; stdin is empty; stdout and stderr go to a bounded buffer (a
// panic message lands in the log); the clocks stand still at the call's
// `now`. Written by hand, not taken from @bytecodealliance/preview2-shim:
// the shim gives the real process environment, filesystem and clocks, and
// routes every write through its own I/O worker thread.

const crypto = require('node:crypto')

/** Keep at most this much of what a filter writes to stdout/stderr. */
const OUTPUT_KEEP = 4096

class WasiError {
    constructor(message) {
        this.message = message
    }
    toDebugString() {
        return this.message
    }
}

class Pollable {
    ready() {
        return true
    }
    block() {}
}

class InputStream {
    read() {
        throw { payload: { tag: 'closed' } }
    }
    blockingRead() {
        throw { payload: { tag: 'closed' } }
    }
    skip() {
        throw { payload: { tag: 'closed' } }
    }
    blockingSkip() {
        throw { payload: { tag: 'closed' } }
    }
    subscribe() {
        return new Pollable()
    }
}

class OutputStream {
    constructor(sink) {
        this.sink = sink
    }
    checkWrite() {
        return 65536n
    }
    write(bytes) {
        this.sink.push(bytes)
    }
    blockingWriteAndFlush(bytes) {
        this.sink.push(bytes)
    }
    flush() {}
    blockingFlush() {}
    writeZeroes() {}
    blockingWriteZeroesAndFlush() {}
    subscribe() {
        return new Pollable()
    }
}

/** A bounded capture of a filter's output. */
class Sink {
    constructor() {
        this.parts = []
        this.size = 0
    }
    push(bytes) {
        if (this.size >= OUTPUT_KEEP) return
        const b = Buffer.from(bytes).subarray(0, OUTPUT_KEEP - this.size)
        this.parts.push(b)
        this.size += b.length
    }
    take() {
        const s = Buffer.concat(this.parts).toString('utf8')
        this.parts = []
        this.size = 0
        return s.replace(/[\x00-\x1f\x7f]+/g, ' ').trim()
    }
}

class NotOffered extends Error {}

/**
 * The WASI imports, keyed as jco's `instantiate` asks for them. `clock()`
 * gives the call's `now` in seconds. Interfaces a filter cannot use here
 * (sockets, HTTP) are absent, so such a filter is refused at load.
 */
function wasiImports(clock, output) {
    const stdout = new OutputStream(output)
    const stderr = new OutputStream(output)
    const stdin = new InputStream()
    const none = () => undefined
    const cantExit = (status) => {
        throw new NotOffered(`the filter called exit(${JSON.stringify(status)})`)
    }
    const wall = {
        now: () => ({ seconds: BigInt(clock()), nanoseconds: 0 }),
        resolution: () => ({ seconds: 1n, nanoseconds: 0 }),
    }
    const monotonic = {
        now: () => BigInt(clock()) * 1_000_000_000n,
        resolution: () => 1_000_000_000n,
        subscribeInstant: () => new Pollable(),
        subscribeDuration: () => new Pollable(),
    }
    const bytes = (n) => crypto.randomBytes(Math.min(Number(n), 1 << 16))
    const u64 = () => crypto.randomBytes(8).readBigUInt64LE()
    class Descriptor {}
    class DirectoryEntryStream {}
    class TerminalInput {}
    class TerminalOutput {}
    return {
        'wasi:cli/environment': { getEnvironment: () => [], getArguments: () => [], initialCwd: none },
        'wasi:cli/exit': { exit: cantExit, exitWithCode: cantExit },
        'wasi:cli/stdin': { getStdin: () => stdin },
        'wasi:cli/stdout': { getStdout: () => stdout },
        'wasi:cli/stderr': { getStderr: () => stderr },
        'wasi:cli/terminal-input': { TerminalInput },
        'wasi:cli/terminal-output': { TerminalOutput },
        'wasi:cli/terminal-stdin': { getTerminalStdin: none },
        'wasi:cli/terminal-stdout': { getTerminalStdout: none },
        'wasi:cli/terminal-stderr': { getTerminalStderr: none },
        'wasi:io/error': { Error: WasiError },
        'wasi:io/poll': { Pollable, poll: (list) => new Uint32Array(list.map((_, i) => i)) },
        'wasi:io/streams': { InputStream, OutputStream },
        'wasi:clocks/wall-clock': wall,
        'wasi:clocks/monotonic-clock': monotonic,
        'wasi:random/random': { getRandomBytes: bytes, getRandomU64: u64 },
        'wasi:random/insecure': { getInsecureRandomBytes: bytes, getInsecureRandomU64: u64 },
        'wasi:random/insecure-seed': { insecureSeed: () => [u64(), u64()] },
        // No directory is opened to a filter: it sees an empty filesystem.
        'wasi:filesystem/preopens': { getDirectories: () => [] },
        'wasi:filesystem/types': {
            Descriptor,
            DirectoryEntryStream,
            filesystemErrorCode: none,
        },
    }
}

module.exports = { wasiImports, Sink, NotOffered }
