'use strict'
// The verdict vectors greyhook's own host passes too (tests/all/reply.rs).
const test = require('node:test')
const assert = require('node:assert')
const path = require('node:path')
const fs = require('node:fs')
const { checkVerdict, checkEhlo, renderLines, renderSingleLine, InvalidVerdict } = require('../lib/reply')

const doc = JSON.parse(fs.readFileSync(path.join(__dirname, '../../../tests/data/verdict-vectors.json'), 'utf8'))

/** A vector's verdict in jco's shape. */
function jco(v) {
    const reply = v.reply && {
        code: v.reply.code,
        enhanced: v.reply.enhanced,
        text: v.reply.text,
        retryAfter: v.reply.retry_after,
    }
    const decision = reply ? { tag: v.decision, val: reply } : { tag: v.decision }
    return { verdict: { decision, addHeaders: v.add_headers ?? [], policyGroup: v.policy_group }, reply }
}

test('the shared verdict vectors', () => {
    assert.ok(doc.vectors.length >= 40)
    for (const v of doc.vectors) {
        const { verdict, reply } = jco(v.verdict)
        const check = () => (v.verdict.keywords ? checkEhlo({ verdict, keywords: v.verdict.keywords }) : checkVerdict(verdict))
        if (v.expect.valid) {
            assert.doesNotThrow(check, v.name)
            if (v.expect.lines) assert.deepStrictEqual(renderLines(reply), v.expect.lines, v.name)
            if (v.expect.single_line) assert.strictEqual(renderSingleLine(reply), v.expect.single_line, v.name)
        } else {
            assert.throws(check, (e) => e instanceof InvalidVerdict && e.kind === v.expect.error, v.name)
        }
    }
})
