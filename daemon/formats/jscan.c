/*
 * jscan.c - the strict JSON scanner of jscan.h: pass 1 (jscan_check: the grammar as a loop
 * over an explicit stack, and the duplicate-key check at each object's end) and the pass-2
 * cursor. Nothing here recurses, so a hostile nesting cannot exhaust a pool thread's stack.
 */
#include "jscan.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

#include "strhash.h"

/* One key of an object still open: where its opening quote is, and its decoded bytes' hash. */
typedef struct jkey {
    uint64_t hash;
    uint32_t at; /* the text is at most 100 MB (ST_HEADER_MAX); checked in jscan_check */
} jkey_t;

typedef struct frame {
    bool object;
    size_t keys_start; /* this object's first key in check.keys */
    size_t members;
} frame_t;

struct check {
    const uint8_t *p;
    size_t len, i;
    jscan_err_t *err;
    jkey_t *keys; /* the keys of every open object, innermost last */
    size_t nkeys, keys_cap;
    uint32_t *table; /* scratch hash table for one object's keys */
    size_t table_cap;
    char *a, *b; /* decoded keys, for hashing escaped ones and comparing equal hashes */
    size_t a_cap, b_cap;
};

static bool is_ws(uint8_t c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

static bool is_digit(uint8_t c)
{
    return c >= '0' && c <= '9';
}

__attribute__((format(printf, 4, 5))) static int fail(struct check *c, jscan_fail_t kind,
                                                       size_t at, const char *fmt, ...)
{
    va_list ap;

    c->err->kind = kind;
    c->err->at = at;
    va_start(ap, fmt);
    vsnprintf(c->err->msg, sizeof(c->err->msg), fmt, ap);
    va_end(ap);
    return -1;
}

static bool hex4(const uint8_t *p, size_t len, size_t i, unsigned *ret)
{
    unsigned v = 0;

    if (len < 4 || i > len - 4)
        return false;
    for (size_t k = i; k < i + 4; k++) {
        uint8_t ch = p[k];

        v <<= 4;
        if (is_digit(ch))
            v |= (unsigned)(ch - '0');
        else if (ch >= 'a' && ch <= 'f')
            v |= (unsigned)(ch - 'a' + 10);
        else if (ch >= 'A' && ch <= 'F')
            v |= (unsigned)(ch - 'A' + 10);
        else
            return false;
    }
    *ret = v;
    return true;
}

static void put(char *out, size_t cap, size_t *n, uint8_t byte)
{
    if (*n < cap)
        out[*n] = (char)byte;
    (*n)++;
}

/*
 * Decodes the checked string whose opening quote is at *pos into out[0..cap), always
 * NUL-terminated (cut short if it needs cap bytes or more); returns the full decoded length and
 * leaves *pos past the closing quote.
 */
static size_t decode(const uint8_t *p, size_t *pos, char *out, size_t cap)
{
    size_t i = *pos + 1, n = 0;

    while (p[i] != '"') {
        unsigned u = 0, lo = 0xdc00; /* hex4() sets them: pass 1 checked the escapes */

        if (p[i] != '\\') {
            put(out, cap, &n, p[i++]);
            continue;
        }
        switch (p[i + 1]) {
        case 'b': u = '\b'; break;
        case 'f': u = '\f'; break;
        case 'n': u = '\n'; break;
        case 'r': u = '\r'; break;
        case 't': u = '\t'; break;
        case 'u':
            (void)hex4(p, SIZE_MAX, i + 2, &u);
            if (u >= 0xd800 && u <= 0xdbff) { /* a pair, as pass 1 made sure */
                (void)hex4(p, SIZE_MAX, i + 8, &lo);
                u = 0x10000 + ((u - 0xd800) << 10) + (lo - 0xdc00);
                i += 6;
            }
            i += 4;
            break;
        default: u = p[i + 1]; break; /* " \ / */
        }
        i += 2;
        if (u < 0x80) {
            put(out, cap, &n, (uint8_t)u);
        } else if (u < 0x800) {
            put(out, cap, &n, (uint8_t)(0xc0 | u >> 6));
            put(out, cap, &n, (uint8_t)(0x80 | (u & 0x3f)));
        } else if (u < 0x10000) {
            put(out, cap, &n, (uint8_t)(0xe0 | u >> 12));
            put(out, cap, &n, (uint8_t)(0x80 | (u >> 6 & 0x3f)));
            put(out, cap, &n, (uint8_t)(0x80 | (u & 0x3f)));
        } else {
            put(out, cap, &n, (uint8_t)(0xf0 | u >> 18));
            put(out, cap, &n, (uint8_t)(0x80 | (u >> 12 & 0x3f)));
            put(out, cap, &n, (uint8_t)(0x80 | (u >> 6 & 0x3f)));
            put(out, cap, &n, (uint8_t)(0x80 | (u & 0x3f)));
        }
    }
    if (cap)
        out[n < cap ? n : cap - 1] = '\0'; /* truncated, if it must be, but always a string */
    *pos = i + 1;
    return n;
}

/* Decodes the key at \p at into *buf, grown as needed; returns its length, or -1 (no memory). */
static ssize_t decode_key(struct check *c, size_t at, char **buf, size_t *cap)
{
    size_t pos = at, n = decode(c->p, &pos, *buf, *cap);

    if (n >= *cap) {
        char *nb = realloc(*buf, n + 1);

        if (!nb)
            return -1;
        *buf = nb;
        *cap = n + 1;
        pos = at;
        (void)decode(c->p, &pos, *buf, *cap);
    }
    return (ssize_t)n;
}

/* A string at c->i: checked, and for a key, hashed over its decoded bytes. */
static int scan_string(struct check *c, uint64_t *ret_hash)
{
    const uint8_t *p = c->p;
    size_t open = c->i, i = c->i + 1;
    bool escaped = false;

    for (;;) {
        uint8_t ch;
        unsigned u, lo;

        if (i >= c->len)
            return fail(c, JSCAN_SYNTAX, open, "string never ends");
        ch = p[i];
        if (ch == '"')
            break;
        if (ch < 0x20)
            return fail(c, JSCAN_SYNTAX, i, "control character 0x%02x in a string", ch);
        if (ch != '\\') {
            i++;
            continue;
        }
        escaped = true;
        if (i + 1 >= c->len)
            return fail(c, JSCAN_SYNTAX, open, "string never ends");
        if (p[i + 1] && strchr("\"\\/bfnrt", p[i + 1])) {
            i += 2;
            continue;
        }
        if (p[i + 1] != 'u')
            return fail(c, JSCAN_SYNTAX, i, "invalid escape '\\%c'",
                        p[i + 1] >= 0x20 && p[i + 1] < 0x7f ? p[i + 1] : '?');
        if (!hex4(p, c->len, i + 2, &u))
            return fail(c, JSCAN_SYNTAX, i, "invalid \\u escape");
        if (u == 0)
            return fail(c, JSCAN_SYNTAX, i, "\\u0000 in a string");
        if (u >= 0xdc00 && u <= 0xdfff)
            return fail(c, JSCAN_SYNTAX, i, "lone low surrogate \\u%04x", u);
        if (u >= 0xd800 && u <= 0xdbff) {
            if (i + 7 >= c->len || p[i + 6] != '\\' || p[i + 7] != 'u' ||
                !hex4(p, c->len, i + 8, &lo) || lo < 0xdc00 || lo > 0xdfff)
                return fail(c, JSCAN_SYNTAX, i, "lone high surrogate \\u%04x", u);
            i += 6;
        }
        i += 6;
    }
    c->i = i + 1;
    if (ret_hash) {
        ssize_t n;

        if (!escaped) {
            *ret_hash = strhash(p + open + 1, i - open - 1);
            return 0;
        }
        n = decode_key(c, open, &c->a, &c->a_cap);
        if (n < 0)
            return fail(c, JSCAN_NOMEM, open, "out of memory");
        *ret_hash = strhash(c->a, (size_t)n);
    }
    return 0;
}

static int scan_number(struct check *c)
{
    const uint8_t *p = c->p;
    size_t s = c->i, i = c->i;
    bool neg = false, real = false;

    if (p[i] == '-') {
        neg = true;
        i++;
    }
    if (i >= c->len || !is_digit(p[i]))
        return fail(c, JSCAN_SYNTAX, s, "invalid number");
    if (p[i] == '0')
        i++;
    else
        while (i < c->len && is_digit(p[i]))
            i++;
    if (i < c->len && p[i] == '.') {
        real = true;
        if (++i >= c->len || !is_digit(p[i]))
            return fail(c, JSCAN_SYNTAX, s, "invalid number: no digit after '.'");
        while (i < c->len && is_digit(p[i]))
            i++;
    }
    if (i < c->len && (p[i] == 'e' || p[i] == 'E')) {
        real = true;
        if (++i < c->len && (p[i] == '+' || p[i] == '-'))
            i++;
        if (i >= c->len || !is_digit(p[i]))
            return fail(c, JSCAN_SYNTAX, s, "invalid number: no digit in the exponent");
        while (i < c->len && is_digit(p[i]))
            i++;
    }
    if (i - s > JSCAN_MAX_NUMBER)
        return fail(c, JSCAN_SYNTAX, s, "number of %zu bytes, at most %u are supported", i - s,
                    JSCAN_MAX_NUMBER);
    if (real) {
        /* strtod in the "C" locale, which the daemon never changes (no setlocale call). */
        char buf[JSCAN_MAX_NUMBER + 1];

        memcpy(buf, p + s, i - s);
        buf[i - s] = '\0';
        if (isinf(strtod(buf, NULL)))
            return fail(c, JSCAN_SYNTAX, s, "real number overflows a double");
    } else {
        uint64_t v = 0;

        if (neg && i - s == 2 && p[s + 1] == '0')
            return fail(c, JSCAN_SYNTAX, s, "\"-0\" is not a non-negative integer");
        for (size_t k = s + neg; k < i; k++) {
            if (v > (UINT64_MAX - 9) / 10)
                return fail(c, JSCAN_SYNTAX, s, "integer too big");
            v = v * 10 + (uint64_t)(p[k] - '0');
        }
        if (v > (uint64_t)INT64_MAX + neg)
            return fail(c, JSCAN_SYNTAX, s, neg ? "negative integer too big" : "integer too big");
    }
    c->i = i;
    return 0;
}

static int scan_literal(struct check *c)
{
    static const char *const words[] = {"true", "false", "null"};

    for (size_t w = 0; w < 3; w++) {
        size_t n = strlen(words[w]);

        if (c->len - c->i >= n && memcmp(c->p + c->i, words[w], n) == 0) {
            c->i += n;
            return 0;
        }
    }
    return fail(c, JSCAN_SYNTAX, c->i, "invalid literal");
}

/* Renders a decoded key for a message: at most 60 bytes, control characters as '?'. */
static const char *shown(const char *s, size_t n, char *buf, size_t size)
{
    size_t o = 0;

    for (size_t k = 0; k < n && k < 60 && o + 4 < size; k++)
        buf[o++] = (unsigned char)s[k] < 0x20 || s[k] == 0x7f ? '?' : s[k];
    if (n > 60)
        buf[o++] = '.', buf[o++] = '.', buf[o++] = '.';
    buf[o] = '\0';
    return buf;
}

/* 1 if keys x and y (indices into c->keys, equal hashes) decode to the same bytes. */
static int same_key(struct check *c, size_t x, size_t y)
{
    ssize_t nx = decode_key(c, c->keys[x].at, &c->a, &c->a_cap);
    ssize_t ny = decode_key(c, c->keys[y].at, &c->b, &c->b_cap);

    if (nx < 0 || ny < 0)
        return fail(c, JSCAN_NOMEM, c->keys[y].at, "out of memory");
    if (nx != ny || memcmp(c->a, c->b, (size_t)nx) != 0)
        return 0;
    return fail(c, JSCAN_DUP, c->keys[y].at, "key '%s' appears twice in one object",
                shown(c->b, (size_t)ny, (char[80]){0}, 80));
}

/*
 * The duplicate check for the object whose keys are c->keys[start..nkeys), in document
 * order, so the first repeat reported is the first in the text. Small objects (a tensor's
 * fields) compare hashes pairwise; larger ones go through an open-addressed table.
 */
static int close_object(struct check *c, size_t start)
{
    size_t n = c->nkeys - start, cap = 16;
    int r = 0;

    if (n <= 16) {
        for (size_t y = start + 1; y < c->nkeys && r == 0; y++)
            for (size_t x = start; x < y && r == 0; x++)
                if (c->keys[x].hash == c->keys[y].hash)
                    r = same_key(c, x, y);
        goto out;
    }
    while (cap < 2 * n)
        cap *= 2;
    if (cap > c->table_cap) {
        uint32_t *t = realloc(c->table, cap * sizeof(*t));

        if (!t)
            return fail(c, JSCAN_NOMEM, c->keys[start].at, "out of memory");
        c->table = t;
        c->table_cap = cap;
    }
    memset(c->table, 0xff, cap * sizeof(*c->table));
    for (size_t y = start; y < c->nkeys && r == 0; y++) {
        size_t h = (size_t)c->keys[y].hash & (cap - 1);

        for (; c->table[h] != UINT32_MAX && r == 0; h = (h + 1) & (cap - 1))
            if (c->keys[start + c->table[h]].hash == c->keys[y].hash)
                r = same_key(c, start + c->table[h], y);
        c->table[h] = (uint32_t)(y - start);
    }
out:
    c->nkeys = start;
    return r < 0 ? -1 : 0;
}

static int add_key(struct check *c, uint64_t hash, size_t at)
{
    if (c->nkeys >= JSCAN_MAX_KEYS)
        return fail(c, JSCAN_LIMIT, at, "more than 2^21 keys in the objects open here");
    if (c->nkeys == c->keys_cap) {
        size_t ncap = c->keys_cap ? 2 * c->keys_cap : 64;
        jkey_t *k;

        k = realloc(c->keys, ncap * sizeof(*k));
        if (!k)
            return fail(c, JSCAN_NOMEM, at, "out of memory");
        c->keys = k;
        c->keys_cap = ncap;
    }
    c->keys[c->nkeys++] = (jkey_t){.hash = hash, .at = (uint32_t)at};
    return 0;
}

static void skip_ws(struct check *c)
{
    while (c->i < c->len && is_ws(c->p[c->i]))
        c->i++;
}

/* The next byte, or 0 at the end (a NUL in the text is refused wherever it is). */
static uint8_t peek(const struct check *c)
{
    return c->i < c->len ? c->p[c->i] : 0;
}

int jscan_check(const uint8_t *p, size_t len, size_t *ret_members, jscan_err_t *err)
{
    enum { VALUE, KEY, AFTER } state = VALUE;
    struct check c = {.p = p, .len = len, .err = err};
    frame_t stack[JSCAN_MAX_DEPTH];
    size_t depth = 0, members = 0;
    int r = 0;

    if (len > UINT32_MAX)
        return fail(&c, JSCAN_LIMIT, 0, "text of %zu bytes, at most 2^32 - 1 supported", len);
    skip_ws(&c);
    if (peek(&c) != '{' && peek(&c) != '[')
        return fail(&c, JSCAN_SYNTAX, c.i, c.i < len ? "'{' or '[' expected" : "no JSON value");
    while (r == 0) {
        uint8_t ch;

        skip_ws(&c);
        ch = peek(&c);
        if (state == KEY) {
            uint64_t hash;
            size_t at = c.i;

            if (ch != '"') {
                r = fail(&c, JSCAN_SYNTAX, c.i, "string key expected");
                break;
            }
            r = scan_string(&c, &hash);
            if (r == 0)
                r = add_key(&c, hash, at);
            if (r < 0)
                break;
            stack[depth - 1].members++;
            skip_ws(&c);
            if (peek(&c) != ':') {
                r = fail(&c, JSCAN_SYNTAX, c.i, "':' expected after a key");
                break;
            }
            c.i++;
            state = VALUE;
        } else if (state == VALUE) {
            state = AFTER;
            if (ch == '{' || ch == '[') {
                if (depth == JSCAN_MAX_DEPTH) {
                    r = fail(&c, JSCAN_SYNTAX, c.i, "nested deeper than %u", JSCAN_MAX_DEPTH);
                    break;
                }
                stack[depth++] = (frame_t){.object = ch == '{', .keys_start = c.nkeys};
                c.i++;
                skip_ws(&c);
                if (peek(&c) == (ch == '{' ? '}' : ']'))
                    continue; /* empty: AFTER closes it */
                state = ch == '{' ? KEY : VALUE;
            } else if (ch == '"') {
                r = scan_string(&c, NULL);
            } else if (ch == '-' || is_digit(ch)) {
                r = scan_number(&c);
            } else if (ch == 't' || ch == 'f' || ch == 'n') {
                r = scan_literal(&c);
            } else {
                r = fail(&c, JSCAN_SYNTAX, c.i, c.i < len ? "unexpected character" :
                                                           "value expected, text ends");
            }
        } else { /* AFTER a value, or at an empty container's closing bracket */
            frame_t *f = &stack[depth - 1];

            if (ch == ',') {
                c.i++;
                state = f->object ? KEY : VALUE;
                continue;
            }
            if (ch != (f->object ? '}' : ']')) {
                r = fail(&c, JSCAN_SYNTAX, c.i, f->object ? "',' or '}' expected"
                                                          : "',' or ']' expected");
                break;
            }
            c.i++;
            if (f->object)
                r = close_object(&c, f->keys_start);
            if (--depth == 0) {
                members = f->object ? f->members : 0;
                break;
            }
        }
    }
    if (r == 0) {
        skip_ws(&c);
        if (c.i != len)
            r = fail(&c, JSCAN_SYNTAX, c.i, "trailing characters after the JSON value");
    }
    free(c.keys);
    free(c.table);
    free(c.a);
    free(c.b);
    if (r == 0)
        *ret_members = members;
    return r;
}

/*
 * UTF-8 as Rust's str::from_utf8 checks it (the reference decodes the whole header so, before
 * any JSON is seen): overlong forms, UTF-16 surrogates and code points past U+10FFFF are
 * refused wherever they are.
 */
size_t jscan_utf8(const uint8_t *p, size_t len)
{
    size_t i = 0;

    while (i < len) {
        uint8_t c = p[i];
        size_t n;
        uint8_t lo = 0x80, hi = 0xbf;

        if (c < 0x80) {
            i++;
            continue;
        }
        if (c >= 0xc2 && c <= 0xdf)
            n = 1;
        else if (c >= 0xe0 && c <= 0xef) {
            n = 2;
            if (c == 0xe0)
                lo = 0xa0; /* overlong */
            if (c == 0xed)
                hi = 0x9f; /* surrogates */
        } else if (c >= 0xf0 && c <= 0xf4) {
            n = 3;
            if (c == 0xf0)
                lo = 0x90; /* overlong */
            if (c == 0xf4)
                hi = 0x8f; /* past U+10FFFF */
        } else
            return i;
        if (len - i <= n)
            return i;
        if (p[i + 1] < lo || p[i + 1] > hi)
            return i;
        for (size_t k = 2; k <= n; k++)
            if (p[i + k] < 0x80 || p[i + k] > 0xbf)
                return i;
        i += n + 1;
    }
    return len;
}

/* ---- pass 2 ------------------------------------------------------------------------------- */

int jscan_ws(jscan_t *j)
{
    while (j->at < j->len && is_ws(j->p[j->at]))
        j->at++;
    return j->at < j->len ? j->p[j->at] : 0;
}

/* The end of the number at \p i, and whether it has a fraction or an exponent. */
static size_t number_end(const jscan_t *j, size_t i, bool *ret_real)
{
    bool real = false;

    for (; i < j->len; i++) {
        char c = j->p[i];

        if (c == '.' || c == 'e' || c == 'E')
            real = true;
        else if (!is_digit(c) && c != '-' && c != '+')
            break;
    }
    *ret_real = real;
    return i;
}

const char *jscan_kind(const jscan_t *j)
{
    bool real;

    switch (j->at < j->len ? j->p[j->at] : 0) {
    case '{': return "an object";
    case '[': return "an array";
    case '"': return "a string";
    case 't':
    case 'f': return "a boolean";
    case 'n': return "null";
    default:
        (void)number_end(j, j->at, &real);
        return real ? "a real number" : "an integer";
    }
}

size_t jscan_string(jscan_t *j, char *out, size_t cap)
{
    return decode(j->p, &j->at, out, cap);
}

char *jscan_strdup(jscan_t *j)
{
    jscan_t probe = *j;
    size_t n = jscan_string(&probe, NULL, 0);
    char *out = malloc(n + 1);

    if (out)
        (void)jscan_string(j, out, n + 1);
    return out;
}

bool jscan_uint(jscan_t *j, uint64_t *ret)
{
    bool real;
    uint8_t ch = j->at < j->len ? j->p[j->at] : 0;
    size_t end;
    uint64_t v = 0;

    if (!is_digit(ch)) { /* negative, or not a number */
        jscan_skip(j);
        return false;
    }
    end = number_end(j, j->at, &real);
    for (size_t k = j->at; k < end && !real; k++)
        v = v * 10 + (uint64_t)(j->p[k] - '0'); /* pass 1: within int64 */
    j->at = end;
    if (real)
        return false;
    *ret = v;
    return true;
}

void jscan_skip(jscan_t *j)
{
    size_t depth = 0;
    bool real;

    do {
        uint8_t ch;

        (void)jscan_ws(j);
        ch = j->p[j->at];
        if (ch == '"') {
            for (j->at++; j->p[j->at] != '"'; j->at++)
                if (j->p[j->at] == '\\')
                    j->at++;
            j->at++;
        } else if (ch == '{' || ch == '[') {
            depth++;
            j->at++;
        } else if (ch == '}' || ch == ']') {
            depth--;
            j->at++;
        } else if (ch == ',' || ch == ':') {
            j->at++;
        } else if (ch == '-' || is_digit(ch)) {
            j->at = number_end(j, j->at, &real);
        } else { /* true, false, null */
            while (j->at < j->len && j->p[j->at] >= 'a' && j->p[j->at] <= 'z')
                j->at++;
        }
    } while (depth > 0);
}

void jscan_enter(jscan_t *j)
{
    (void)jscan_ws(j);
    j->at++; /* '{' or '[' */
}

/* Past the comma before the next member or item; false, past \p close, at the end. */
static bool next(jscan_t *j, int close)
{
    int c = jscan_ws(j);

    if (c == ',') {
        j->at++;
        c = jscan_ws(j);
    }
    if (c == close) {
        j->at++;
        return false;
    }
    return true;
}

bool jscan_key(jscan_t *j)
{
    return next(j, '}');
}

void jscan_colon(jscan_t *j)
{
    (void)jscan_ws(j);
    j->at++; /* ':' */
    (void)jscan_ws(j);
}

bool jscan_member(jscan_t *j, char *key, size_t cap, size_t *ret_len)
{
    if (!jscan_key(j))
        return false;
    *ret_len = jscan_string(j, key, cap);
    jscan_colon(j);
    return true;
}

bool jscan_item(jscan_t *j)
{
    return next(j, ']');
}
