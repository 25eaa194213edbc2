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

#include "fuzz-source.h"
#include "fmt.h"
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

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fmt_err_t err = {0};
    manifest_t *m;
    fmt_kind_t kind;
    source_t s;
    int r;

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
