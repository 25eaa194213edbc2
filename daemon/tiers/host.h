/*
 * host.h - the host tier: one sealed memfd arena per model holding every storage, laid out at
 * HOST_ALIGN-byte boundaries. Built on the thread pool; afterwards the fd is immutable (sealed
 * against write, shrink and grow) and is what clients map.
 */
#ifndef WSD_HOST_H
#define WSD_HOST_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "fmt.h"

/* Storage alignment inside the arena: enough for any dtype and for vector loads. */
#define HOST_ALIGN 64u

/* Copy threads per preload (bounded also by the CPU count). */
#define HOST_COPY_THREADS_MAX 8u

/* --hugepages: 2 MiB pages for the arena. */
enum { HOST_HUGEPAGES_NEVER, HOST_HUGEPAGES_AUTO, HOST_HUGEPAGES_ALWAYS };

/* Shared with the loop while a preload runs: bytes done, and a request to stop. */
typedef struct host_progress {
    _Atomic uint64_t done;  /* source bytes copied (or read) so far */
    _Atomic uint64_t total; /* source bytes to copy (or read) */
    _Atomic bool cancel;    /* set by the loop; the copy stops with WSD_ECANCELED */
} host_progress_t;

typedef struct host_arena {
    int fd;        /* sealed memfd, owned; -1 when empty */
    uint64_t size; /* bytes in the arena */
    char hash[33]; /* content identity: XXH3-128 of geometry and served bytes, hex */
    char pages[16]; /* what backs it: "hugetlb-2M", "thp", "4k" or "page cache" (file mode) */
    uint64_t cache_released; /* source bytes dropped from the page cache after the copy */
} host_arena_t;

/* Sets every storage's arena_offset and gives the arena size; allocates nothing. */
int host_layout(manifest_t *m, uint64_t *ret_size, fmt_err_t *err);

/*
 * Sets every storage's arena_offset, then creates the memfd named after \p label, copies each
 * storage from its source with pread() (small neighbouring ones in one read; verifying zip
 * CRC-32s when \p verify_crc, converting where a storage's dtype differs from its src_dtype),
 * hashes what it wrote, checks that no source changed meanwhile, and seals. \p hugepages
 * (HOST_HUGEPAGES_*) picks the page size; the arena may then be larger than the layout (whole
 * 2 MiB pages). Each source's page-cache pages are released as its source_cache_policy() says,
 * read by read as they are copied, so a preload never holds the model twice
 * (ret->cache_released counts them). On failure nothing is left behind.
 * \retval 0 or a WSD_E* code with \p err filled.
 */
int host_build(const char *label, manifest_t *m, const source_t *sources, size_t nsources,
               bool verify_crc, int hugepages, host_progress_t *progress, host_arena_t *ret,
               fmt_err_t *err);

/* File share mode's layout: each storage's arena_offset is its offset in \p src. */
int host_share_layout(manifest_t *m, const source_t *src, fmt_err_t *err);

/*
 * File share mode: serves the checkpoint file itself. Storages keep their file offsets as
 * arena offsets, every byte is read once to verify CRC-32s and compute the content hash (nothing
 * is copied), and ret->fd is a read-only duplicate of \p src's fd, ret->size the file size.
 * Only for single-file models without conversion.
 */
int host_share_file(manifest_t *m, const source_t *src, bool verify_crc,
                    host_progress_t *progress, host_arena_t *ret, fmt_err_t *err);

/* Closes the arena's fd. Memory stays alive while clients map it. */
void host_arena_close(host_arena_t *a);

#endif /* WSD_HOST_H */
