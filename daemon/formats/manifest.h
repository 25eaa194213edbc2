/*
 * manifest.h - the format-independent description of a model that every reader produces and the
 * host tier, the registry and the wire layer consume: storages (byte ranges in source files) and
 * tensors (dtype, shape, strides, storage offset) viewing them, plus non-tensor metadata.
 * Views and tied weights are several tensors on one storage, exactly as in the source.
 */
#ifndef WSD_MANIFEST_H
#define WSD_MANIFEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "weightsd.h"

/* Hard caps on what one model may hold (M2). */
#define MANIFEST_TENSORS_MAX  (1u << 20)
#define MANIFEST_STORAGES_MAX (1u << 20)
#define MANIFEST_META_MAX     (1u << 16)
#define MANIFEST_NAME_MAX     4096u
#define MANIFEST_WARNINGS_MAX 64u

typedef struct mf_storage {
    char *key;             /* torch record key ("archive/data/0"), or the tensor name (safetensors) */
    uint32_t source;       /* index of the source file (shards) */
    uint64_t src_offset;   /* byte offset of the data in that file */
    uint64_t nbytes;       /* length in bytes */
    int dtype;             /* element type served (wsd_dtype_t) */
    int src_dtype;         /* element type in the file; differs from dtype after --dtype */
    uint64_t src_nbytes;   /* bytes in the file (nbytes above is what is served) */
    bool has_crc;          /* crc32 below is the zip record's CRC-32 and must be checked */
    uint32_t crc32;        /* expected CRC-32 of the bytes (zip) */
    uint64_t arena_offset; /* where the host tier put it in the model's arena (set by the tier) */
} mf_storage_t;

typedef struct mf_tensor {
    char *name;                     /* full dotted name, unique in the manifest */
    int dtype;                      /* wsd_dtype_t */
    uint32_t ndim;                  /* <= WSD_MAX_NDIM */
    int64_t shape[WSD_MAX_NDIM];    /* sizes, each >= 0 */
    int64_t stride[WSD_MAX_NDIM];   /* in elements, each >= 0 */
    uint32_t storage;               /* index into storages */
    uint64_t storage_offset;        /* in elements */
    uint64_t nbytes;                /* numel * itemsize (0 for empty) */
} mf_tensor_t;

typedef struct mf_meta {
    char *key;   /* dotted path or __metadata__ key */
    char *value; /* JSON rendering: "3", "0.5", "\"adam\"", "null" */
} mf_meta_t;

typedef struct manifest {
    mf_storage_t *storages;
    size_t nstorages, storages_cap;
    mf_tensor_t *tensors;
    size_t ntensors, tensors_cap;
    mf_meta_t *meta;
    size_t nmeta, meta_cap;
    char *warnings[MANIFEST_WARNINGS_MAX]; /* "W_RULE: ..." lines, owned */
    size_t nwarnings;
    bool warnings_lost; /* a warning could not be recorded (no memory): the load must fail */
    char format[32];                       /* "safetensors", "torch", "safetensors-index", ... */
} manifest_t;

manifest_t *manifest_new(void);
manifest_t *manifest_free(manifest_t *m);

/*
 * Appends a storage; \p key is copied. \retval 0 with *ret_index, -ENOMEM, or WSD_ELIMIT past
 * MANIFEST_STORAGES_MAX.
 */
int manifest_add_storage(manifest_t *m, const char *key, uint32_t source, uint64_t src_offset,
                         uint64_t nbytes, int dtype, uint32_t *ret_index);

/*
 * Appends a tensor; \p t->name is copied (the caller keeps its string). nbytes is computed here.
 * \retval 0, -ENOMEM, WSD_ELIMIT. Geometry is checked by manifest_validate().
 */
int manifest_add_tensor(manifest_t *m, const mf_tensor_t *t);

/*
 * Frees the tensor and storage tables (names and keys too), leaving an empty manifest with its
 * format, metadata and warnings: what a served model keeps, its packed form holding the rest
 * (for 2^20 tensors the tables are some 300 MB, the packed form under 50).
 */
void manifest_drop_tables(manifest_t *m);

/* Appends a metadata entry; both strings are copied. */
int manifest_add_meta(manifest_t *m, const char *key, const char *value);

/* \retval bytes per element for whole-byte dtypes, 0 for sub-byte (F4, F6) or unknown ones. */
unsigned manifest_itemsize(int dtype);

/*
 * Checks every tensor against its storage, in checked arithmetic:
 *   ndim <= WSD_MAX_NDIM, sizes/strides >= 0, numel*bits overflow-free and a whole number of
 *   bytes, and for numel > 0: (storage_offset + sum((size_i - 1) * stride_i) + 1) * itemsize
 *   <= storage nbytes; names unique and non-empty.
 * Sub-byte dtypes must be dense (one tensor = whole storage).
 * On failure fills \p err with "E_TENSOR_GEOMETRY"/"E_TENSOR_OOB"/"E_TENSOR_OVERFLOW"/
 * "E_DUP_NAME" naming the tensor.
 */
struct fmt_err;
int manifest_validate(const manifest_t *m, struct fmt_err *err);

/* Index of the tensor named \p name, or -1 (linear; for tests and tools). */
ssize_t manifest_find(const manifest_t *m, const char *name);

#endif /* WSD_MANIFEST_H */
