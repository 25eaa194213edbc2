/*
 * fmt.h - what every checkpoint reader shares: the error report, the pread-based view of a
 * source file, and the entry points of each format.
 *
 * Readers never mmap the checkpoint: every byte comes through source_pread(), so a file that is
 * truncated while we parse gives an error, never SIGBUS (RELIABILITY C7). Readers run on the
 * libuv thread pool and touch nothing but their arguments.
 */
#ifndef WSD_FMT_H
#define WSD_FMT_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/stat.h>

#include "manifest.h"

/* A rejection: a WSD_E* class plus one line "RULE: what, where" (FORMATS.md §7 vocabulary). */
typedef struct fmt_err {
    int code;       /* WSD_EBADCKPT, WSD_EIO, WSD_ENOMEM, ... (0 = no error) */
    char msg[512];  /* e.g. "E_ST_OFFSETS: tensor 'w' begins at 8, expected 0" */
} fmt_err_t;

/*
 * Records an error (first one wins) and returns \p code, so readers can write
 *   return fmt_fail(err, WSD_EBADCKPT, "E_ST_OFFSETS", "tensor '%s' ...", name);
 * \p rule may be NULL.
 */
int fmt_fail(fmt_err_t *err, int code, const char *rule, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Non-fatal finding ("W_UNALIGNED: ..."): appended to the manifest's warnings. */
void fmt_warn(manifest_t *m, const char *rule, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/*
 * What a preload leaves of a checkpoint in the page cache once its bytes are copied into the
 * arena (preload --page-cache). The copy makes the cached pages a second copy of the model.
 */
typedef enum source_cache {
    SOURCE_CACHE_KEEP,  /* leave the page cache as the reads leave it */
    SOURCE_CACHE_AUTO,  /* drop what this preload brought in: the parts of the file that had
                         * no page cached when it was opened (needs cachestat(), Linux 6.5;
                         * without it AUTO keeps) */
    SOURCE_CACHE_DROP,  /* drop every page read, whoever else was using it */
} source_cache_t;

#define SOURCE_GRANULE (2u << 20) /* AUTO remembers coldness per 2 MiB of file */

/* An open checkpoint file. */
typedef struct source {
    int fd;          /* O_RDONLY|O_CLOEXEC, owned */
    uint64_t size;   /* st_size at open */
    struct stat st;  /* fstat at open, to detect changes after the copy */
    char *path;      /* as given, owned */
    source_cache_t cache; /* what source_release() does; KEEP unless source_cache_policy() */
    uint64_t *cold;  /* AUTO: one bit per SOURCE_GRANULE that had no page cached at open */
} source_t;

/* Opens a regular file for reading. Errors name the path: missing, directory, permission. */
int source_open(const char *path, source_t *ret, fmt_err_t *err);
void source_close(source_t *s);
/* Reads exactly \p len bytes at \p off; a short read is "E_TRUNCATED" with the offset. */
int source_pread(const source_t *s, void *buf, size_t len, uint64_t off, fmt_err_t *err);
/* Fails with WSD_ESTALE if size, mtime or inode changed since source_open(). */
int source_check_unchanged(const source_t *s, fmt_err_t *err);
/*
 * Sets what source_release() will do. For SOURCE_CACHE_AUTO this looks at the page cache now,
 * so call it before the file is read. Best effort: where the kernel cannot tell (no cachestat)
 * or memory is short, the policy falls back to KEEP. \retval the policy in force (AUTO on a
 * wholly cold file is DROP, on a wholly warm one KEEP).
 */
source_cache_t source_cache_policy(source_t *s, source_cache_t want);
/*
 * Drops the page-cache pages of [off, off + len) as the policy says, whole pages rounded
 * outwards (a neighbour that still needs a boundary page reads it again). Pages that processes
 * map, and dirty pages, stay: the kernel keeps them. \retval how many of the range's bytes
 * were dropped (0 under KEEP).
 */
uint64_t source_release(const source_t *s, uint64_t off, uint64_t len);
/* Parses "auto", "keep" or "drop". \retval 0 or -EINVAL. */
int source_cache_parse(const char *s, source_cache_t *ret);
/* Whether this kernel can tell what is cached (cachestat), i.e. whether AUTO can drop. */
bool source_cache_auto_works(void);
const char *source_cache_name(source_cache_t c);

/* File kinds by content sniffing (FORMATS.md §1). */
typedef enum fmt_kind {
    FMT_SAFETENSORS,
    FMT_TORCH_ZIP,
    _FMT_KIND_MAX,
    _FMT_KIND_INVALID = -22
} fmt_kind_t;

/* Sniffs \p s; rejects legacy, preview, tar, unknown and look-alike formats with their message. */
int fmt_detect(const source_t *s, fmt_kind_t *ret_kind, fmt_err_t *err);

/*
 * Readers. Each appends what \p s holds to \p m, tagging storages with \p source_index (the
 * position of \p s among the model's files), and validates everything it appends. On error \p m
 * may hold partial entries; the caller frees it.
 */
int safetensors_read(const source_t *s, uint32_t source_index, manifest_t *m, fmt_err_t *err);
/* \p key: serve only this subtree of a nested checkpoint (NULL = everything). */
int torch_read(const source_t *s, uint32_t source_index, const char *key, manifest_t *m,
               fmt_err_t *err);

/* Options of a whole-model load. */
typedef struct fmt_opts {
    const char *key;  /* subtree of a nested torch checkpoint, or NULL */
    bool no_verify;   /* skip CRC-32 of zip records */
    source_cache_t page_cache; /* set on every source opened (KEEP when zeroed) */
} fmt_opts_t;

/*
 * Loads a model's manifest from \p path: a checkpoint file, or an HF *.index.json naming shards.
 * On success *ret_m is a validated manifest and ret_sources/ret_nsources the open files its
 * storages point into (the caller closes them with source_close and frees the array).
 */
int fmt_load(const char *path, const fmt_opts_t *opts, manifest_t **ret_m, source_t **ret_sources,
             size_t *ret_nsources, fmt_err_t *err);

#endif /* WSD_FMT_H */
