/*
 * alloc-sweep.h - "every allocation can fail" for the checkpoint readers (RELIABILITY C9, the
 * sqlite/libuv idiom), in process: fmt_load() runs once with its 1st allocation failing, once
 * with its 2nd, and so on until a run makes fewer allocations than the one that was to fail.
 * Each failing run must return -ENOMEM with a message that says so, never another error, a
 * crash or (under ASan) a leak; the last run must load what a run without faults loads.
 *
 * Needs a fault build (-DWSD_FAULT_INJECTION=ON: unit tests are linked with fault_alloc.c's
 * malloc wrappers); skips otherwise. Only the code linked into the test counts: jansson and
 * zlib are shared libraries and allocate on their own (zip.c's inflate buffers are ours).
 */
#ifndef WSD_ALLOC_SWEEP_H
#define WSD_ALLOC_SWEEP_H

#include <errno.h>

#include "fault.h"
#include "fmt.h"
#include "manifest.h"
#include "test.h"

/* Loads \p path under fault \p spec; returns fmt_load()'s result and frees what it made. */
static inline int alloc_sweep_load(const char *path, const fmt_opts_t *opts, size_t *ntensors,
                                   fmt_err_t *err)
{
    manifest_t *m = NULL;
    source_t *src = NULL;
    size_t nsrc = 0;
    int r = fmt_load(path, opts, &m, &src, &nsrc, err);

    if (r == 0) {
        *ntensors = m->ntensors;
        for (size_t i = 0; i < nsrc; i++)
            source_close(&src[i]);
        free(src);
        manifest_free(m);
    }
    return r;
}

/* The sweep over one file; returns how many allocations a whole load makes. */
static inline unsigned long alloc_sweep(const char *path, const fmt_opts_t *opts)
{
#ifdef WSD_FAULT_INJECTION
    fmt_err_t err = {0};
    size_t want = 0, got = 0;
    unsigned long n, calls;
    char spec[32];

    ASSERT_EQ(alloc_sweep_load(path, opts, &want, &err), 0);
    for (n = 1;; n++) {
        int r;

        memset(&err, 0, sizeof(err));
        snprintf(spec, sizeof(spec), "malloc:%lu", n);
        fault_arm(spec);
        r = alloc_sweep_load(path, opts, &got, &err);
        calls = fault_calls("malloc");
        fault_arm(NULL);
        if (calls < n) { /* nothing failed: the whole load ran */
            if (r != 0)
                TEST_FAIL("%s: no allocation failed, yet: %d %s", path, r, err.msg);
            ASSERT_EQ(got, want);
            return calls;
        }
        if (r != -ENOMEM || !strstr(err.msg, "out of memory"))
            TEST_FAIL("%s: allocation %lu failed: got %d \"%s\", expected -ENOMEM \"out of "
                      "memory ...\"", path, n, r, err.msg);
    }
#else
    (void)path;
    (void)opts;
    test_skip("needs -DWSD_FAULT_INJECTION=ON (the malloc wrappers)");
#endif
}

#endif /* WSD_ALLOC_SWEEP_H */
