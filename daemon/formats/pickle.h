/*
 * pickle.h - a zero-exec pickle VM for torch.save's data.pkl (FORMATS.md §3).
 *
 * pickle_parse() runs the protocol 2 opcodes torch.save emits, plus protocol 4 framing, over a
 * byte buffer and builds a tree of inert nodes: Python values, containers, references to
 * allowlisted globals (§3.2), storage references from persistent ids (§3.3), and dense tensor
 * descriptors from the rebuild calls of §3.4. Nothing is imported, called or instantiated: a
 * REDUCE of an allowlisted global is interpreted here by a fixed rule; any other global is a
 * hard error (E_PKL_GLOBAL) that names it and its byte offset.
 *
 * Quantized, sparse, meta, nested and other tensors whose bytes cannot be served become
 * PK_UNSUPPORTED nodes, so a caller refuses them only if it reaches them (--key may skip them).
 *
 * Every resource is bounded (limits below), and no function here recurses deeper than
 * PK_DEPTH_MAX, so hostile input cannot exhaust the C stack even under `ulimit -s 256`.
 */
#ifndef WSD_PICKLE_H
#define WSD_PICKLE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "fmt.h"

/* Hard limits (M2, M15, M19). Legitimate torch pickles stay far below each. */
#define PK_NODES_MAX       (1u << 24) /* values built, all kinds together */
#define PK_STACK_MAX       (1u << 20) /* values on the VM stack at once */
#define PK_MARKS_MAX       4096u      /* open MARKs (nesting of tuple/list/dict literals) */
#define PK_MEMO_MAX        (1u << 24) /* highest memo index + 1 */
#define PK_STR_MAX         (64u << 20) /* bytes of one string or bytes value */
#define PK_BIGINT_MAX      64u        /* bytes of one LONG1/LONG4 integer */
#define PK_GLOBAL_LINE_MAX 256u       /* bytes of a GLOBAL module or name */
#define PK_DEPTH_MAX       64u        /* container nesting the renderer and walkers follow */
#define PK_JSON_MAX        (16u << 20) /* bytes of one rendered JSON value */

typedef enum pk_type {
    PK_NONE,
    PK_BOOL,        /* u.i = 0 or 1 */
    PK_INT,         /* u.i */
    PK_BIGINT,      /* u.s, n bytes of two's complement little-endian (does not fit int64) */
    PK_FLOAT,       /* u.f */
    PK_STR,         /* u.s, n bytes of UTF-8 (surrogates allowed, as torch's decoder allows) */
    PK_BYTES,       /* u.s, n bytes; PK_F_LATIN1: u.s is UTF-8 text whose latin-1 encoding
                     * the bytes are (the protocol-2 _codecs.encode form) */
    PK_COMPLEX,     /* u.pair = float/int node handles (real, imag) */
    PK_TUPLE,       /* u.items[n] */
    PK_LIST,        /* u.items[n] */
    PK_DICT,        /* u.items[2n]: key, value, key, value ... in insertion order */
    PK_SET,         /* u.items[n] (set or frozenset) */
    PK_GLOBAL,      /* aux = index into the allowlist (pickle_global_name) */
    PK_DEVICE,      /* torch.device: u.pair = (type string node, index or UINT32_MAX) */
    PK_STORAGE,     /* u.ref = index into pk_doc_t.storages */
    PK_TENSOR,      /* u.ref = index into pk_doc_t.tensors */
    PK_UNSUPPORTED, /* aux = pk_kind_t, u.ref = global that produced it */
    _PK_TYPE_MAX
} pk_type_t;

/* Tensors weightsd recognises but cannot serve as byte ranges of the file. */
typedef enum pk_kind {
    PK_KIND_QUANTIZED,
    PK_KIND_SPARSE,
    PK_KIND_META,
    PK_KIND_NESTED,
    PK_KIND_WRAPPER,
    PK_KIND_DEVICE,
    PK_KIND_CONJ_NEG,
    PK_KIND_DTYPE,
    _PK_KIND_MAX
} pk_kind_t;

#define PK_F_HAS_TENSOR (1u << 0) /* container holds (transitively) a tensor, storage or
                                   * unsupported tensor: walk it by path, don't render it */
#define PK_F_LATIN1     (1u << 1) /* PK_BYTES: see above */
#define PK_F_SEEN       (1u << 2) /* scratch for the HAS_TENSOR pass */
#define PK_F_DONE       (1u << 3) /* scratch for the HAS_TENSOR pass */
#define PK_F_UNHASHABLE (1u << 4) /* PK_TUPLE holding (transitively) something unhashable */
#define PK_F_INSTANCE   (1u << 5) /* PK_DICT built by a class (OrderedDict(), Counter(), NEWOBJ):
                                   * it has a __dict__ that BUILD may fill; a plain dict has not */
#define PK_F_BYTEARRAY  (1u << 6) /* PK_BYTES from bytearray(): mutable, so unhashable */

typedef struct pk_node {
    uint8_t type;   /* pk_type_t */
    uint8_t flags;  /* PK_F_* */
    uint16_t aux;   /* see pk_type_t */
    uint32_t n;     /* items, bytes of a string, pairs of a dict */
    uint32_t cap;   /* allocated items (containers) */
    uint32_t off;   /* byte offset in the pickle of the opcode that built it */
    union {
        int64_t i;
        double f;
        const uint8_t *s;  /* borrowed from the pickle buffer */
        uint32_t *items;   /* owned */
        uint32_t ref;
        uint32_t pair[2];
    } u;
} pk_node_t;

/* One persistent id ('storage', StorageType, key, location, numel). */
typedef struct pk_storage {
    const uint8_t *key;   /* record suffix: the bytes live in <archive>/data/<key> */
    uint32_t key_len;
    uint16_t cls;         /* allowlist index of the storage class */
    int dtype;            /* wsd_dtype_t of the class (U8 for untyped), -1 for quantized */
    unsigned itemsize;    /* bytes per element of the class (1 for untyped: numel is bytes) */
    bool untyped;         /* torch.storage.UntypedStorage: dtype comes from the tensor (v3) */
    uint64_t numel;       /* elements of the class */
    uint32_t off;         /* pickle offset of the BINPERSID */
} pk_storage_t;

/* One dense tensor descriptor, in the units the manifest wants. */
typedef struct pk_tensor {
    uint32_t storage;               /* node handle of the PK_STORAGE */
    int dtype;                      /* wsd_dtype_t */
    uint32_t ndim;                  /* <= WSD_MAX_NDIM */
    uint64_t offset;                /* storage offset in elements */
    int64_t shape[WSD_MAX_NDIM];    /* >= 0 */
    int64_t stride[WSD_MAX_NDIM];   /* >= 0, in elements */
    uint32_t off;                   /* pickle offset of the REDUCE that built it */
} pk_tensor_t;

typedef struct pk_doc {
    const uint8_t *buf;       /* the pickle; borrowed, must outlive the doc (strings point in) */
    size_t len;
    pk_node_t *nodes;         /* handles are indices into this array */
    uint32_t nnodes, nodes_cap;
    pk_storage_t *storages;
    uint32_t nstorages, storages_cap;
    pk_tensor_t *tensors;
    uint32_t ntensors, tensors_cap;
    uint64_t nitems;          /* items held by all containers (bounds the walkers' work) */
    uint32_t root;            /* handle of the object STOP returned */
    int protocol;             /* from PROTO, 0 if absent */
} pk_doc_t;

/*
 * Runs the VM over \p buf (which must stay alive as long as the result) and returns the tree in
 * *ret (free with pickle_free()). Errors: E_PKL_OPCODE, E_PKL_TRUNCATED, E_PKL_FRAME (a read
 * crossing the end of a FRAME), E_PKL_STACK,
 * E_PKL_MEMO, E_PKL_LIMIT, E_PKL_GLOBAL, E_PKL_BAD_CALL, E_PKL_PERSID, E_PKL_UTF8,
 * E_PKL_TRAILING, E_TENSOR_GEOMETRY, E_TENSOR_OVERFLOW, E_STORAGE_CONFLICT, E_STORAGE_SIZE,
 * each naming the byte offset in the pickle.
 */
int pickle_parse(const uint8_t *buf, size_t len, pk_doc_t **ret, fmt_err_t *err);
pk_doc_t *pickle_free(pk_doc_t *d);

/* "module.name" of allowlist entry \p idx, written to \p buf (NUL-terminated, truncated). */
const char *pickle_global_name(uint16_t idx, char *buf, size_t cap);
/* A human phrase for \p kind plus what the user can do about it. */
const char *pickle_kind_advice(pk_kind_t kind);
const char *pickle_kind_name(pk_kind_t kind);

/* A growable, capped text buffer for renderers. */
typedef struct pk_buf {
    char *p;      /* NUL-terminated when len > 0 */
    size_t len;
    size_t cap;
    size_t max;   /* refuse to grow past this many bytes (0 = PK_JSON_MAX) */
} pk_buf_t;

/*
 * Appends the JSON rendering of node \p h to \p out (None -> null, bool, int, big int in
 * decimal, float in shortest round-trip form with non-finite values as the strings "NaN",
 * "Infinity", "-Infinity", str, bytes as latin-1 text, tuple/list/set -> array, dict -> object
 * with keys converted as Python's json.dumps does, globals as "module.name", devices as
 * "cuda:0"). Tensors cannot be rendered (E_PKL_BAD_CALL); deeper nesting than PK_DEPTH_MAX,
 * which includes any cycle, is E_PKL_LIMIT.
 */
int pickle_render_json(const pk_doc_t *d, uint32_t h, pk_buf_t *out, fmt_err_t *err);
/* Appends the path component for dict key \p h: a str verbatim, an int in decimal, anything
 * else as json.dumps would convert the key. */
int pickle_render_key(const pk_doc_t *d, uint32_t h, pk_buf_t *out, fmt_err_t *err);
void pk_buf_free(pk_buf_t *b);

#endif /* WSD_PICKLE_H */
