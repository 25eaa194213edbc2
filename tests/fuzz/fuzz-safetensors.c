/*
 * fuzz-safetensors.c - libFuzzer target for the safetensors reader (STYLE T5): the input is a
 * whole file, put in a memfd and opened through /proc/self/fd the way the daemon opens a path,
 * then sniffed, read and validated. Any result is fine except a crash, a leak or a sanitizer
 * report; an accepted file must also satisfy the reader's own invariants, checked below.
 */
#ifndef _GNU_SOURCE
#    define _GNU_SOURCE /* memfd_create */
#endif
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <jansson.h>

#include "fuzz-source.h"
#include "fmt.h"
#include "jscan.h"
#include "manifest.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Properties every accepted manifest has; a violation aborts so the fuzzer records it. */
static void check_accepted(const source_t *s, const manifest_t *m)
{
    uint64_t end = 0;

    if (m->ntensors != m->nstorages)
        abort();
    for (size_t i = 0; i < m->nstorages; i++) {
        const mf_storage_t *st = &m->storages[i];

        /* Inside the file, contiguous, in offset order: full coverage of the byte buffer. */
        if (st->src_offset > s->size || st->nbytes > s->size - st->src_offset)
            abort();
        if (i && st->src_offset != end)
            abort();
        end = st->src_offset + st->nbytes;
    }
    if (m->nstorages && end != s->size)
        abort();
}

/*
 * jscan against jansson, the tree parser the reader used before it: on every header that is
 * valid UTF-8 (the reader's step 4), the same verdict and member count, except where jscan is
 * stricter by design (jscan.h: "-0", 128 levels, 4096-byte numbers, its key limit), and where
 * jansson took a NUL byte that JSON does not allow.
 */
static void check_against_jansson(const uint8_t *data, size_t size)
{
    uint64_t hlen = 0;
    const uint8_t *h = data + 8;
    size_t members = 0;
    jscan_err_t je;
    json_error_t e;
    json_t *root;
    int mine;

    if (size < 8)
        return;
    for (int i = 7; i >= 0; i--)
        hlen = hlen << 8 | data[i];
    if (hlen > size - 8)
        hlen = size - 8; /* the rest, as a header, is as good an input */
    if (jscan_utf8(h, (size_t)hlen) != hlen)
        return;
    mine = jscan_check(h, (size_t)hlen, &members, &je);
    root = json_loadb((const char *)h, (size_t)hlen, JSON_REJECT_DUPLICATES, &e);
    if (root && mine == 0) {
        if (members != (json_is_object(root) ? json_object_size(root) : 0))
            abort();
    } else if (root) {
        if (je.kind != JSCAN_LIMIT && je.kind != JSCAN_NOMEM && !strstr(je.msg, "\"-0\"") &&
            !strstr(je.msg, "nested deeper") && !strstr(je.msg, "number of") &&
            !memchr(h, '\0', (size_t)hlen)) /* jansson skips a NUL after a number: "[1\0,2]" */
            abort(); /* jscan refused what jansson took, for no documented reason */
    } else if (mine == 0) {
        abort(); /* jscan took what jansson refused */
    }
    json_decref(root);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fmt_err_t err = {0};
    manifest_t *m;
    fmt_kind_t kind;
    source_t s;
    int r;

    check_against_jansson(data, size);
    if (fuzz_source("fuzz-safetensors", data, size, &s) < 0)
        return 0;

    /* Detection runs on everything; the reader runs on every input, as fmt_load would only on
     * what detection accepts, so that the reader's own step-1..3 checks are exercised too. */
    (void)fmt_detect(&s, &kind, &err);
    memset(&err, 0, sizeof(err));
    m = manifest_new();
    if (m) {
        r = safetensors_read(&s, 0, m, &err);
        if (r == 0)
            r = manifest_validate(m, &err);
        if (r == 0)
            check_accepted(&s, m);
        else if (err.code == 0 || (err.code != -ENOMEM && strncmp(err.msg, "E_", 2) != 0))
            abort(); /* every rejection names its rule */
        manifest_free(m);
    }
    source_close(&s);
    return 0;
}
