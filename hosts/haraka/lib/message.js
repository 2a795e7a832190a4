'use strict'
// How much of a message a filter is handed at DATA: the same bounded view
// greyhook's own host hands every filter (host/src/domain/message.rs), so a
// filter sees the same message under Haraka as under greyhook. The header
// section is the client's; handed whole, a large one could run a filter out
// of memory, and its failure policy let the message through.

/** Most headers handed. */
const MAX_MESSAGE_HEADERS = 200
/** Longest header value handed, bytes (a longer one is cut at a character boundary). */
const MAX_MESSAGE_HEADER_VALUE = 4096
/** Longest header name, bytes (a header with a longer one is left out). */
const MAX_MESSAGE_HEADER_NAME = 256
/** Most bytes of names and values handed in all; the headers past it are left out. */
const MAX_MESSAGE_HEADER_BYTES = 64 << 10
/** Longest Message-ID handed, bytes (a longer one is cut). */
const MAX_MESSAGE_ID = 998
/**
 * Longest HELO name handed, bytes (RFC 5321's limit on a domain): a longer
 * one is cut at a character boundary, as greyhook's front ends cut it
 * (host/src/session/mod.rs, MAX_HELO). Haraka takes a command line of up
 * to 512 bytes.
 */
const MAX_HELO = 255

/** `s` cut to at most `max` bytes of UTF-8, at a character boundary. */
function cut(s, max) {
    if (Buffer.byteLength(s, 'utf8') <= max) return s
    const b = Buffer.from(s, 'utf8')
    let end = max
    // Back to the start of a character: UTF-8 continuation bytes are 10xxxxxx.
    while (end > 0 && (b[end] & 0xc0) === 0x80) end--
    return b.subarray(0, end).toString('utf8')
}

/**
 * A folded text as one line, as greyhook's front ends unfold it: each line
 * trimmed, the empty ones left out, joined by one space.
 */
function unfold(text) {
    return String(text)
        .split(/\r?\n/)
        .map((l) => l.trim())
        .filter((l) => l)
        .join(' ')
}

/**
 * The headers a filter is handed from Haraka's `header_list` (raw lines,
 * folded): unfolded, in order, within the bounds above.
 */
function boundedHeaders(headerList) {
    const out = []
    let left = MAX_MESSAGE_HEADER_BYTES
    for (const raw of headerList) {
        if (out.length >= MAX_MESSAGE_HEADERS || left <= 0) break
        const line = unfold(raw)
        const i = line.indexOf(':')
        if (i <= 0) continue
        const name = line.slice(0, i).trim()
        const size = Buffer.byteLength(name, 'utf8')
        if (size > MAX_MESSAGE_HEADER_NAME || size >= left) continue
        const value = cut(line.slice(i + 1).trim(), Math.min(MAX_MESSAGE_HEADER_VALUE, left - size))
        left -= size + Buffer.byteLength(value, 'utf8')
        out.push({ name, value })
    }
    return out
}

/**
 * The Message-ID as handed, from the first Message-ID header's raw value
 * (Haraka parses them all, wherever they stand): unfolded as greyhook's own
 * front ends do (each line trimmed, joined by one space), cut at
 * MAX_MESSAGE_ID bytes; undefined if none. Keys shared through Redis with a
 * greyhook daemon come out the same.
 */
function boundedMessageId(id) {
    const v = unfold(id || '')
    return v ? cut(v, MAX_MESSAGE_ID) : undefined
}

/** The HELO name as handed: cut to MAX_HELO bytes; undefined if none. */
function boundedHelo(helo) {
    return typeof helo === 'string' && helo.length ? cut(helo, MAX_HELO) : undefined
}

module.exports = {
    boundedHeaders,
    boundedHelo,
    boundedMessageId,
    cut,
    MAX_MESSAGE_HEADERS,
    MAX_MESSAGE_HEADER_VALUE,
    MAX_MESSAGE_HEADER_NAME,
    MAX_MESSAGE_HEADER_BYTES,
    MAX_MESSAGE_ID,
    MAX_HELO,
}
