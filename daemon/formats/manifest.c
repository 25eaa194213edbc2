/*
 * manifest.c - growable arrays of storages, tensors and metadata, and the one geometry check
 * every format goes through before anything is copied or served.
 */
#include "manifest.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "checked.h"
#include "fmt.h"
#include "strhash.h"

manifest_t *manifest_new(void)
{
    return calloc(1, sizeof(manifest_t));
}

void manifest_drop_tables(manifest_t *m)
{
    for (size_t i = 0; i < m->nstorages; i++)
        free(m->storages[i].key);
    for (size_t i = 0; i < m->ntensors; i++)
        free(m->tensors[i].name);
    free(m->storages);
    free(m->tensors);
    m->storages = NULL;
    m->tensors = NULL;
    m->nstorages = m->storages_cap = 0;
    m->ntensors = m->tensors_cap = 0;
}

manifest_t *manifest_free(manifest_t *m)
{
    if (!m)
        return NULL;
    manifest_drop_tables(m);
    for (size_t i = 0; i < m->nmeta; i++) {
        free(m->meta[i].key);
        free(m->meta[i].value);
    }
    for (size_t i = 0; i < m->nwarnings; i++)
        free(m->warnings[i]);
    free(m->meta);
    free(m);
    return NULL;
}

/* Grows an array of \p elem-byte items so one more fits, up to \p max items. */
static int grow(void **arr, size_t *cap, size_t n, size_t elem, size_t max)
{
    size_t ncap;
    void *p;

    if (n < *cap)
        return 0;
    if (n >= max)
        return WSD_ELIMIT;
    ncap = *cap ? *cap * 2 : 16;
    if (ncap > max)
        ncap = max;
    p = realloc(*arr, ncap * elem);
    if (!p)
        return -ENOMEM;
    *arr = p;
    *cap = ncap;
    return 0;
}

int manifest_add_storage(manifest_t *m, const char *key, uint32_t source, uint64_t src_offset,
                         uint64_t nbytes, int dtype, uint32_t *ret_index)
{
    mf_storage_t *s;
    int r;

    r = grow((void **)&m->storages, &m->storages_cap, m->nstorages, sizeof(*s),
             MANIFEST_STORAGES_MAX);
    if (r < 0)
        return r;
    s = &m->storages[m->nstorages];
    memset(s, 0, sizeof(*s));
    s->key = strdup(key ? key : "");
    if (!s->key)
        return -ENOMEM;
    s->source = source;
    s->src_offset = src_offset;
    s->nbytes = nbytes;
    s->dtype = dtype;
    s->src_dtype = dtype;
    s->src_nbytes = nbytes;
    if (ret_index)
        *ret_index = (uint32_t)m->nstorages;
    m->nstorages++;
    return 0;
}

unsigned manifest_itemsize(int dtype)
{
    unsigned bits = wsd_dtype_bits(dtype);

    return bits % 8 ? 0 : bits / 8;
}

/* numel * bits / 8 when that is a whole number of bytes; false on overflow. */
static bool tensor_bytes(const mf_tensor_t *t, uint64_t *ret_numel, uint64_t *ret_bytes,
                         bool *ret_whole)
{
    uint64_t numel = 1, nbits;

    for (uint32_t i = 0; i < t->ndim; i++)
        if (t->shape[i] == 0)
            numel = 0;
    for (uint32_t i = 0; numel && i < t->ndim; i++)
        if (!ck_mul_u64(numel, (uint64_t)t->shape[i], &numel))
            return false;
    if (!ck_mul_u64(numel, wsd_dtype_bits(t->dtype), &nbits))
        return false;
    *ret_numel = numel;
    *ret_bytes = nbits / 8;
    *ret_whole = nbits % 8 == 0;
    return true;
}

int manifest_add_tensor(manifest_t *m, const mf_tensor_t *t)
{
    mf_tensor_t *d;
    uint64_t numel = 0, nbytes = 0;
    bool whole = true;
    int r;

    r = grow((void **)&m->tensors, &m->tensors_cap, m->ntensors, sizeof(*d), MANIFEST_TENSORS_MAX);
    if (r < 0)
        return r;
    d = &m->tensors[m->ntensors];
    *d = *t;
    /* An overflowing size is caught again, with the tensor's name, by manifest_validate(). */
    if (t->ndim <= WSD_MAX_NDIM && tensor_bytes(t, &numel, &nbytes, &whole))
        d->nbytes = nbytes;
    else
        d->nbytes = 0;
    d->name = strdup(t->name ? t->name : "");
    if (!d->name)
        return -ENOMEM;
    m->ntensors++;
    return 0;
}

int manifest_add_meta(manifest_t *m, const char *key, const char *value)
{
    mf_meta_t *e;
    int r;

    r = grow((void **)&m->meta, &m->meta_cap, m->nmeta, sizeof(*e), MANIFEST_META_MAX);
    if (r < 0)
        return r;
    e = &m->meta[m->nmeta];
    e->key = strdup(key);
    e->value = strdup(value);
    if (!e->key || !e->value) {
        free(e->key);
        free(e->value);
        return -ENOMEM;
    }
    m->nmeta++;
    return 0;
}

ssize_t manifest_find(const manifest_t *m, const char *name)
{
    for (size_t i = 0; i < m->ntensors; i++)
        if (strcmp(m->tensors[i].name, name) == 0)
            return (ssize_t)i;
    return -1;
}

/* Duplicate tensor names, in O(n) with an open-addressing table of indices. Each slot keeps
 * the name's hash beside its index, so a probe reads another name only when the hashes match
 * (with 10^6 names those reads are cache misses). */
static int check_unique(const manifest_t *m, fmt_err_t *err)
{
    struct slot {
        uint32_t index; /* UINT32_MAX: empty */
        uint32_t hash;
    } *slot;
    size_t cap = 16;
    int r = 0;

    while (cap < m->ntensors * 2)
        cap *= 2;
    slot = malloc(cap * sizeof(*slot));
    if (!slot)
        return fmt_fail(err, -ENOMEM, NULL, "out of memory checking tensor names");
    memset(slot, 0xff, cap * sizeof(*slot));
    for (size_t i = 0; i < m->ntensors && r == 0; i++) {
        const char *name = m->tensors[i].name;
        uint64_t full = strhash(name, strlen(name));
        uint32_t hash = (uint32_t)(full >> 32);
        size_t h = (size_t)full & (cap - 1);

        while (slot[h].index != UINT32_MAX) {
            if (slot[h].hash == hash && strcmp(m->tensors[slot[h].index].name, name) == 0) {
                r = fmt_fail(err, WSD_EBADCKPT, "E_DUP_NAME", "tensor name '%s' appears twice",
                             name);
                break;
            }
            h = (h + 1) & (cap - 1);
        }
        slot[h] = (struct slot){(uint32_t)i, hash};
    }
    free(slot);
    return r;
}

static int check_tensor(const manifest_t *m, const mf_tensor_t *t, fmt_err_t *err)
{
    const mf_storage_t *s;
    uint64_t numel, nbytes, last, end, itemsize;
    bool whole;

    if (!t->name[0])
        return fmt_fail(err, WSD_EBADCKPT, "E_TENSOR_NAME", "tensor with an empty name");
    if (t->dtype < 0 || t->dtype >= _WSD_DTYPE_MAX)
        return fmt_fail(err, WSD_EBADCKPT, "E_TENSOR_DTYPE", "tensor '%s': unknown dtype %d",
                        t->name, t->dtype);
    if (t->ndim > WSD_MAX_NDIM)
        return fmt_fail(err, WSD_EBADCKPT, "E_TENSOR_GEOMETRY",
                        "tensor '%s': %u dimensions, at most %u supported", t->name, t->ndim,
                        WSD_MAX_NDIM);
    if (t->storage >= m->nstorages)
        return fmt_fail(err, WSD_EBADCKPT, "E_STORAGE_MISSING",
                        "tensor '%s': storage %u does not exist", t->name, t->storage);
    s = &m->storages[t->storage];
    for (uint32_t i = 0; i < t->ndim; i++)
        if (t->shape[i] < 0 || t->stride[i] < 0)
            return fmt_fail(err, WSD_EBADCKPT, "E_TENSOR_GEOMETRY",
                            "tensor '%s': negative size or stride in dimension %u", t->name, i);
    if (!tensor_bytes(t, &numel, &nbytes, &whole))
        return fmt_fail(err, WSD_EBADCKPT, "E_TENSOR_OVERFLOW",
                        "tensor '%s': element count overflows 64 bits", t->name);
    if (!whole)
        return fmt_fail(err, WSD_EBADCKPT, "E_ST_SUBBYTE",
                        "tensor '%s': %llu elements of %s do not fill whole bytes", t->name,
                        (unsigned long long)numel, wsd_dtype_name(t->dtype));
    if (numel == 0)
        return 0;
    itemsize = manifest_itemsize(t->dtype);
    if (itemsize == 0) {
        /* Sub-byte elements have no addressable stride: only a dense tensor over the whole
         * storage can be served. */
        if (t->storage_offset != 0 || nbytes != s->nbytes)
            return fmt_fail(err, WSD_EBADCKPT, "E_TENSOR_GEOMETRY",
                            "tensor '%s': sub-byte dtype %s must cover its storage exactly",
                            t->name, wsd_dtype_name(t->dtype));
        return 0;
    }
    /* Highest element index reached: offset + sum((size_i - 1) * stride_i). */
    last = t->storage_offset;
    for (uint32_t i = 0; i < t->ndim; i++) {
        uint64_t span;

        if (!ck_mul_u64((uint64_t)t->shape[i] - 1, (uint64_t)t->stride[i], &span) ||
            !ck_add_u64(last, span, &last))
            return fmt_fail(err, WSD_EBADCKPT, "E_TENSOR_OVERFLOW",
                            "tensor '%s': offset + strides overflow 64 bits", t->name);
    }
    if (!ck_add_u64(last, 1, &end) || !ck_mul_u64(end, itemsize, &end))
        return fmt_fail(err, WSD_EBADCKPT, "E_TENSOR_OVERFLOW",
                        "tensor '%s': byte extent overflows 64 bits", t->name);
    if (end > s->nbytes)
        return fmt_fail(err, WSD_EBADCKPT, "E_TENSOR_OOB",
                        "tensor '%s': view reaches byte %llu of storage '%s' holding %llu bytes",
                        t->name, (unsigned long long)end, s->key, (unsigned long long)s->nbytes);
    return 0;
}

int manifest_validate(const manifest_t *m, fmt_err_t *err)
{
    int r;

    /* A model whose warnings went missing would be served as if the file were clean. */
    if (m->warnings_lost)
        return fmt_fail(err, -ENOMEM, NULL, "out of memory recording a warning");

    for (size_t i = 0; i < m->ntensors; i++) {
        r = check_tensor(m, &m->tensors[i], err);
        if (r < 0)
            return r;
    }
    return check_unique(m, err);
}
