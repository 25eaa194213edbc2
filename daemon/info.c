/*
 * info.c - the tensor list of `info`, as JSON text written straight from the packed manifest.
 * Building it as a jansson tree cost about 5 us and several allocations a tensor on the event
 * loop (7 s for 2^20 tensors, and the answer could not be sent past about 5 * 10^5); here a
 * page unpacks only its own TensorInfo messages and prints them.
 */
#include "info.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jscan.h"
#include "manifest_pb.h"
#include "weightsd.h"
#include "weightsd.pb-c.h"

int info_text_put(info_text_t *t, const char *s, size_t n)
{
    /* One byte more than the text, for its terminating NUL. */
    if (n >= t->cap - t->len) {
        size_t cap = t->cap ? t->cap : 4096;
        char *p;

        while (cap - t->len <= n) {
            if (cap > SIZE_MAX / 2)
                return -ENOMEM;
            cap *= 2;
        }
        p = realloc(t->p, cap);
        if (!p)
            return -ENOMEM;
        t->p = p;
        t->cap = cap;
    }
    memcpy(t->p + t->len, s, n);
    t->len += n;
    t->p[t->len] = '\0';
    return 0;
}

void info_text_cut(info_text_t *t, size_t len)
{
    if (t->p && len < t->len) {
        t->len = len;
        t->p[len] = '\0';
    }
}

int info_text_put_string(info_text_t *t, const char *s, size_t n)
{
    const uint8_t *u = (const uint8_t *)s;
    size_t start = t->len, i = 0, run = 0;
    int r = info_text_put(t, "\"", 1);

    while (r == 0 && i < n) {
        uint8_t c = u[i];
        char esc[8];
        size_t elen = 2, skip = 1;

        if (c >= 0x20 && c != '"' && c != '\\' && c < 0x80) {
            i++;
            run++;
            continue;
        }
        if (c >= 0x80) {
            /* A valid UTF-8 sequence passes as it is; anything else is one byte of U+FFFD. */
            size_t want = c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : 2;

            if (want <= n - i && jscan_utf8(u + i, want) == want) {
                i += want;
                run += want;
                continue;
            }
        }
        r = info_text_put(t, s + i - run, run);
        run = 0;
        if (r < 0)
            break;
        esc[0] = '\\';
        switch (c) {
        case '"':
        case '\\':
            esc[1] = (char)c;
            break;
        case '\b':
            esc[1] = 'b';
            break;
        case '\f':
            esc[1] = 'f';
            break;
        case '\n':
            esc[1] = 'n';
            break;
        case '\r':
            esc[1] = 'r';
            break;
        case '\t':
            esc[1] = 't';
            break;
        default:
            (void)snprintf(esc, sizeof(esc), "\\u%04x", c < 0x80 ? c : 0xfffdu);
            elen = 6;
        }
        r = info_text_put(t, esc, elen);
        i += skip;
    }
    if (r == 0)
        r = info_text_put(t, s + i - run, run);
    if (r == 0)
        r = info_text_put(t, "\"", 1);
    if (r < 0)
        info_text_cut(t, start);
    return r;
}

/* Writes the decimal digits of \p v to end before \p end; returns where they begin (at most
 * 20 bytes back). snprintf cost about a third of a page, so integers are written by hand. */
static char *fmt_u64(char *end, uint64_t v)
{
    char *p = end;

    do {
        *--p = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    return p;
}

static int put_u64(info_text_t *t, uint64_t v)
{
    char buf[24], *end = buf + sizeof(buf), *p = fmt_u64(end, v);

    return info_text_put(t, p, (size_t)(end - p));
}

static int put_ints(info_text_t *t, const int64_t *v, size_t n)
{
    int r = info_text_put(t, "[", 1);

    for (size_t i = 0; r == 0 && i < n; i++) {
        /* 20 digits, a sign and a comma. */
        char buf[24], *end = buf + sizeof(buf);
        char *p = fmt_u64(end, v[i] < 0 ? 0 - (uint64_t)v[i] : (uint64_t)v[i]);

        if (v[i] < 0)
            *--p = '-';
        if (i)
            *--p = ',';
        r = info_text_put(t, p, (size_t)(end - p));
    }
    return r ? r : info_text_put(t, "]", 1);
}

static int put_tensor(info_text_t *t, const Weightsd__V1__TensorInfo *ti)
{
    const char *name = ti->name ? ti->name : "";
    const char *dt = wsd_dtype_name((int)ti->dtype); /* NULL for none (never in a manifest) */
    int r;

    r = info_text_put(t, "{\"name\":", 8);
    if (r == 0)
        r = info_text_put_string(t, name, strlen(name));
    if (r == 0)
        r = info_text_put(t, ",\"dtype\":", 9);
    if (r == 0)
        r = dt ? info_text_put_string(t, dt, strlen(dt)) : info_text_put(t, "\"?\"", 3);
    if (r == 0)
        r = info_text_put(t, ",\"shape\":", 9);
    if (r == 0)
        r = put_ints(t, ti->shape, ti->n_shape);
    if (r == 0)
        r = info_text_put(t, ",\"stride\":", 10);
    if (r == 0)
        r = put_ints(t, ti->stride, ti->n_stride);
    if (r == 0)
        r = info_text_put(t, ",\"nbytes\":", 10);
    if (r == 0)
        r = put_u64(t, ti->nbytes);
    if (r == 0)
        r = info_text_put(t, ",\"storage\":", 11);
    if (r == 0)
        r = put_u64(t, ti->storage);
    if (r == 0)
        r = info_text_put(t, ",\"storage_offset\":", 18);
    if (r == 0)
        r = put_u64(t, ti->storage_offset);
    return r ? r : info_text_put(t, "}", 1);
}

/* protobuf-c's unpack answers NULL for bad bytes and for no memory alike: this tells them
 * apart (and puts its allocations where the fault build can fail them). */
typedef struct unpack_alloc {
    ProtobufCAllocator a;
    bool oom;
} unpack_alloc_t;

static void *unpack_malloc(void *data, size_t n)
{
    void *p = malloc(n);

    if (!p)
        ((unpack_alloc_t *)data)->oom = true;
    return p;
}

static void unpack_free(void *data, void *p)
{
    (void)data;
    free(p);
}

int info_tensors_json(const uint8_t *pb, size_t len, uint64_t offset, uint64_t limit, size_t budget,
                      info_text_t *out, uint64_t *ret_count, info_seek_t *seek)
{
    manifest_pb_cursor_t cur = {.p = pb, .end = pb + len};
    unpack_alloc_t ua = {.a = {.alloc = unpack_malloc, .free = unpack_free}};
    const size_t start = out->len;
    const uint8_t *tb, *kept;
    uint64_t n = 0, i = 0;
    size_t tlen;
    int r;

    if (seek && seek->index <= offset && seek->pos <= len) {
        cur.p = pb + seek->pos;
        i = seek->index;
    }
    for (; i < offset; i++) {
        r = manifest_pb_next_tensor(&cur, &tb, &tlen);
        if (r <= 0)
            return r < 0 ? r : WSD_EINVAL;
    }
    kept = cur.p; /* the end of the last tensor listed */
    ua.a.allocator_data = &ua;
    r = info_text_put(out, "[", 1);
    while (r == 0 && (limit == 0 || n < limit)) {
        Weightsd__V1__TensorInfo *ti;
        size_t before = out->len;

        r = manifest_pb_next_tensor(&cur, &tb, &tlen);
        if (r <= 0)
            break;
        ti = weightsd__v1__tensor_info__unpack(&ua.a, tlen, tb);
        if (!ti) {
            r = ua.oom ? -ENOMEM : -EBADMSG;
            break;
        }
        r = n ? info_text_put(out, ",", 1) : 0;
        if (r == 0)
            r = put_tensor(out, ti);
        weightsd__v1__tensor_info__free_unpacked(ti, &ua.a);
        /* Room for the closing bracket is kept. */
        if (r == 0 && out->len - start >= budget) {
            if (limit == 0) {
                r = WSD_ELIMIT;
                break;
            }
            if (n) {
                info_text_cut(out, before);
                break;
            }
        }
        n++;
        kept = cur.p;
    }
    if (r == 0)
        r = info_text_put(out, "]", 1);
    if (r < 0) {
        info_text_cut(out, start);
        return r;
    }
    *ret_count = n;
    if (seek) {
        seek->index = offset + n;
        seek->pos = (size_t)(kept - pb);
    }
    return 0;
}
