/*
 * fuzz-zip.c - libFuzzer target for the torch.save reader as a whole (STYLE T5): the input is a
 * whole file, put in a memfd and opened through /proc/self/fd the way the daemon opens a path,
 * then read by torch_read() (zip directory, data.pkl, pickle VM, storage table, walk) and
 * validated, once whole and once through --key. Any result is fine except a crash, a leak or a
 * sanitizer report; an accepted file must also satisfy the invariants checked below.
 */
#ifndef _GNU_SOURCE
#    define _GNU_SOURCE /* memfd_create */
#endif
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "fuzz-source.h"
#include "fmt.h"
#include "manifest.h"
#include "zip.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Properties every accepted manifest has; a violation aborts so the fuzzer records it. */
static void check_accepted(const source_t *s, const manifest_t *m)
{
    for (size_t i = 0; i < m->nstorages; i++) {
        const mf_storage_t *st = &m->storages[i];

        /* Storage bytes lie inside the file, and only stored records are served. */
        if (st->src_offset > s->size || st->nbytes > s->size - st->src_offset)
            abort();
        if (strncmp(st->key, "data/", 5) != 0)
            abort();
    }
    for (size_t i = 0; i < m->ntensors; i++)
        if (m->tensors[i].storage >= m->nstorages || !m->tensors[i].name[0])
            abort();
}

static void run(const source_t *s, const char *key)
{
    fmt_err_t err = {0};
    manifest_t *m = manifest_new();
    int r;

    if (!m)
        return;
    r = torch_read(s, 0, key, m, &err);
    if (r == 0)
        r = manifest_validate(m, &err);
    if (r == 0)
        check_accepted(s, m);
    else if (!err.msg[0])
        abort(); /* every rejection names its rule */
    manifest_free(m);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fmt_err_t err = {0};
    source_t s;
    zip_t z;

    if (fuzz_source("fuzz-zip", data, size, &s) < 0)
        return 0;
    /* The directory reader alone: every entry it accepts lies inside the file. */
    if (zip_open(&s, &z, &err) == 0) {
        for (size_t i = 0; i < z.nentries; i++)
            if (z.entries[i].data_offset > s.size ||
                z.entries[i].csize > s.size - z.entries[i].data_offset ||
                zip_find(&z, z.entries[i].name) != &z.entries[i])
                abort();
        zip_close(&z);
    }
    run(&s, NULL);
    run(&s, "model");
    source_close(&s);
    return 0;
}
