'use strict'
// The header section a filter is handed under Haraka keeps to the bounds
// greyhook's own host keeps (host/src/domain/message.rs and its tests).
const test = require('node:test')
const assert = require('node:assert')
const m = require('../lib/message')

test('small headers are handed whole, unfolded and in order', () => {
    const h = m.boundedHeaders(['Subject: a\r\n b\r\n', 'Message-ID: <x@y>\r\n', 'not a header\r\n'])
    assert.deepStrictEqual(h, [
        { name: 'Subject', value: 'a b' },
        { name: 'Message-ID', value: '<x@y>' },
    ])
    // As greyhook's front ends (host/src/session/mod.rs's tests): each line
    // trimmed and joined by one space, none before a value that starts on
    // the next line.
    assert.deepStrictEqual(m.boundedHeaders(['Subject: first\r\n\tsecond\r\n', 'X-Fold:\r\n\tlater  \r\n   more\r\n']), [
        { name: 'Subject', value: 'first second' },
        { name: 'X-Fold', value: 'later more' },
    ])
})

test('values are cut at a character boundary and the section is bounded', () => {
    const long = 'é'.repeat(5000)
    const h = m.boundedHeaders(Array.from({ length: 300 }, (_, i) => `X-${i}: ${long}\r\n`))
    assert.ok(h.every((x) => Buffer.byteLength(x.value) <= m.MAX_MESSAGE_HEADER_VALUE && /^é*$/.test(x.value)))
    assert.strictEqual(Buffer.byteLength(h[0].value), 4096)
    const bytes = h.reduce((n, x) => n + Buffer.byteLength(x.name) + Buffer.byteLength(x.value), 0)
    assert.ok(bytes <= m.MAX_MESSAGE_HEADER_BYTES && bytes > m.MAX_MESSAGE_HEADER_BYTES - 8, String(bytes))
    assert.strictEqual(h.length, 16, '15 whole values and the cut 16th, as the host')
    const many = m.boundedHeaders(Array.from({ length: 300 }, (_, i) => `X-${i}: v\r\n`))
    assert.strictEqual(many.length, m.MAX_MESSAGE_HEADERS)
})

test('a header with an overlong name is left out; the Message-ID is cut', () => {
    assert.deepStrictEqual(m.boundedHeaders([`${'N'.repeat(300)}: v\r\n`, 'Subject: s\r\n']), [{ name: 'Subject', value: 's' }])
    assert.strictEqual(m.cut('aé', 2), 'a')
    assert.strictEqual(m.cut('abc', 10), 'abc')
    assert.strictEqual(Buffer.byteLength(m.boundedMessageId(`<${'a'.repeat(2000)}@x>`)), m.MAX_MESSAGE_ID)
    assert.strictEqual(m.boundedMessageId('  '), undefined)
    // Folded, as Haraka keeps a raw value: unfolded as greyhook does.
    assert.strictEqual(m.boundedMessageId('\r\n <a\r\n\tb@x>\r\n'), '<a b@x>')
})

test('a HELO name is handed within 255 bytes, cut at a character boundary, as greyhook cuts it', () => {
    assert.strictEqual(m.boundedHelo('mx.example.org'), 'mx.example.org')
    assert.strictEqual(m.boundedHelo(''), undefined)
    assert.strictEqual(m.boundedHelo(undefined), undefined)
    // Byte 255 is the second of 'é''s two (tests/all/milter.rs,
    // a_helo_name_is_kept_to_255_octets, sends the same name to greyhook).
    const long = 'a'.repeat(254) + 'é' + 'b'.repeat(250)
    assert.strictEqual(m.boundedHelo(long), 'a'.repeat(254))
    assert.strictEqual(Buffer.byteLength(m.boundedHelo('x'.repeat(400))), m.MAX_HELO)
})
