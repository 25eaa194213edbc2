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

/* An open checkpoint file. */
typedef struct source {
    int fd;          /* O_RDONLY|O_CLOEXEC, owned */
    uint64_t size;   /* st_size at open */
    struct stat st;  /* fstat at open, to detect changes after the copy */
    char *path;      /* as given, owned */
} source_t;

/* Opens a regular file for reading. Errors name the path: missing, directory, permission. */
int source_open(const char *path, source_t *ret, fmt_err_t *err);
void source_close(source_t *s);
/* Reads exactly \p len bytes at \p off; a short read is "E_TRUNCATED" with the offset. */
int source_pread(const source_t *s, void *buf, size_t len, uint64_t off, fmt_err_t *err);
/* Fails with WSD_ESTALE if size, mtime or inode changed since source_open(). */
int source_check_unchanged(const source_t *s, fmt_err_t *err);

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
} fmt_opts_t;

/*
 * Loads a model's manifest from \p path: a checkpoint file, or an HF *.index.json naming shards.
 * On success *ret_m is a validated manifest and ret_sources/ret_nsources the open files its
 * storages point into (the caller closes them with source_close and frees the array).
 */
int fmt_load(const char *path, const fmt_opts_t *opts, manifest_t **ret_m, source_t **ret_sources,
             size_t *ret_nsources, fmt_err_t *err);

#endif /* WSD_FMT_H */
