'use strict'
// Checking what a filter returns, and rendering replies: a line-for-line
// port of greyhook's `host/src/domain/reply.rs` and `format_retry`, so a
// filter's verdict is refused or rendered exactly as the wasmtime host does.
// Both hosts pass the same test vectors (tests/data/verdict-vectors.json).

const MAX_TEXT_LINE = 400
const MAX_LINES = 16
const MAX_HEADERS = 16
const MAX_HEADER_NAME = 64
const MAX_HEADER_VALUE = 998
const MAX_GROUP = 64
const MAX_KEYWORDS = 16
/** The largest hint the draft's ABNF can express: 99 days, 23:59:59. */
const MAX_RETRY = 99 * 86400 + 86399

/** Why a verdict was refused; `kind` is the Rust `InvalidVerdict` variant. */
class InvalidVerdict extends Error {
    constructor(kind, message) {
        super(message)
        this.kind = kind
    }
}

const printable = (s) => {
    for (let i = 0; i < s.length; i++) {
        const c = s.charCodeAt(i)
        if (c !== 9 && (c < 32 || c >= 127)) return false
    }
    return true
}
const graphic = (s) => {
    for (let i = 0; i < s.length; i++) {
        const c = s.charCodeAt(i)
        if (c < 33 || c >= 127) return false
    }
    return true
}
const isString = (s) => typeof s === 'string'

function validEnhanced(e, code) {
    const parts = e.split('.')
    return (
        parts.length === 3 &&
        parts.every((p) => /^[0-9]{1,3}$/.test(p)) &&
        Number(parts[0]) === Math.floor(code / 100)
    )
}

/** Checks a reply for a tempfail (4yz) or a reject (5yz); throws InvalidVerdict. */
function checkReply(r, tempfail) {
    const cls = tempfail ? 4 : 5
    const what = tempfail ? 'tempfail (4yz)' : 'reject (5yz)'
    const code = r.code
    if (!Number.isInteger(code) || Math.floor(code / 100) !== cls || Math.floor((code % 100) / 10) > 5) {
        throw new InvalidVerdict('Code', `reply code ${code} is not a valid ${what} code`)
    }
    if (r.enhanced != null && (!isString(r.enhanced) || !validEnhanced(r.enhanced, code))) {
        throw new InvalidVerdict('Enhanced', `enhanced status code ${JSON.stringify(r.enhanced)} is malformed or does not match reply code ${code}`)
    }
    const text = r.text ?? []
    if (!Array.isArray(text)) throw new InvalidVerdict('Text', 'reply text is not a list')
    if (text.length > MAX_LINES) throw new InvalidVerdict('TooManyLines', 'reply has more than 16 lines')
    text.forEach((l, i) => {
        if (!isString(l) || l.length > MAX_TEXT_LINE || !printable(l)) {
            throw new InvalidVerdict('Text', `reply text line ${i} is not printable US-ASCII of at most 400 characters`)
        }
        if (l.toLowerCase().includes('retry=')) {
            throw new InvalidVerdict('HintInText', `reply text line ${i} contains "retry=": set retry-after instead`)
        }
    })
    if (r.retryAfter != null && ![421, 450, 451].includes(code)) {
        throw new InvalidVerdict('HintCode', `reply code ${code} cannot carry a retry hint (the draft allows 421, 450 and 451)`)
    }
}

/** Whether a header the filter wants added is well formed. */
function checkHeader(h) {
    return (
        h != null &&
        isString(h.name) &&
        isString(h.value) &&
        h.name.length > 0 &&
        h.name.length <= MAX_HEADER_NAME &&
        graphic(h.name) &&
        !h.name.includes(':') &&
        h.value.length <= MAX_HEADER_VALUE &&
        printable(h.value)
    )
}

/** Checks a whole verdict (jco's shape: `{decision: {tag, val}, addHeaders, policyGroup}`). */
function checkVerdict(v) {
    const d = v?.decision
    switch (d?.tag) {
        case 'tempfail':
            checkReply(d.val ?? {}, true)
            break
        case 'reject':
            checkReply(d.val ?? {}, false)
            break
        case 'continue':
        case 'accept':
            break
        default:
            throw new InvalidVerdict('Code', `unknown decision ${JSON.stringify(d?.tag)}`)
    }
    const headers = v.addHeaders ?? []
    if (headers.length > MAX_HEADERS) throw new InvalidVerdict('TooManyHeaders', 'more than 16 headers')
    const bad = headers.findIndex((h) => !checkHeader(h))
    if (bad >= 0) {
        throw new InvalidVerdict('Header', `header ${bad} is malformed (name: printable ASCII without ':' up to 64; value: printable up to 998, no CR/LF)`)
    }
    const g = v.policyGroup
    if (g != null && (!isString(g) || g.length > MAX_GROUP || !graphic(g))) {
        throw new InvalidVerdict('Group', 'policy group is not printable ASCII of at most 64 characters')
    }
}

/** Checks an EHLO verdict (RFC 5321 `ehlo-keyword *(SP ehlo-param)`). */
function checkEhlo(v) {
    checkVerdict(v.verdict)
    const kws = v.keywords ?? []
    if (kws.length > MAX_KEYWORDS) throw new InvalidVerdict('Keyword', `EHLO keyword ${MAX_KEYWORDS} is malformed`)
    kws.forEach((k, i) => {
        const ok =
            isString(k) &&
            k.length <= 200 &&
            (() => {
                const [kw, ...params] = k.split(' ')
                return kw.length <= 64 && /^[A-Za-z0-9][A-Za-z0-9-]*$/.test(kw) && params.every((p) => p.length > 0 && graphic(p))
            })()
        if (!ok) throw new InvalidVerdict('Keyword', `EHLO keyword ${i} is malformed`)
    })
}

const two = (n) => String(n).padStart(2, '0')

/** `retry=HH:MM:SS`, or `retry=DD-HH:MM:SS` from one day on; clamped to 99 days. */
function formatRetry(secs) {
    const s = Math.min(Math.max(0, Math.floor(Number(secs))), MAX_RETRY)
    const d = Math.floor(s / 86400)
    const h = Math.floor((s % 86400) / 3600)
    const m = Math.floor((s % 3600) / 60)
    const sec = s % 60
    return d > 0 ? `retry=${two(d)}-${two(h)}:${two(m)}:${two(sec)}` : `retry=${two(h)}:${two(m)}:${two(sec)}`
}

/**
 * Renders a (checked) reply as SMTP reply lines without line ends: the code
 * on every line (`-` after it on all but the last), the enhanced code after
 * it, and the retry hint at the end of the last line.
 */
function renderLines(r) {
    const text = r.text?.length ? r.text : ['']
    const n = text.length
    return text.map((t, i) => {
        let line = `${r.code}${i + 1 === n ? ' ' : '-'}`
        if (r.enhanced != null) line += `${r.enhanced} `
        line += t
        if (i + 1 === n && Math.floor(r.code / 100) === 4 && r.retryAfter != null) {
            if (!line.endsWith(' ')) line += ' '
            line += formatRetry(r.retryAfter)
        }
        return line.replace(/[ \t]+$/, '')
    })
}

/** One line, for protocols that carry only one: `451 4.7.1 a; b retry=00:05:00`. */
function renderSingleLine(r) {
    return renderLines({ ...r, text: [(r.text ?? []).join('; ')] }).join('')
}

module.exports = {
    InvalidVerdict,
    checkReply,
    checkHeader,
    checkVerdict,
    checkEhlo,
    formatRetry,
    renderLines,
    renderSingleLine,
    MAX_RETRY,
}
