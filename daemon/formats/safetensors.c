/*
 * safetensors.c - the safetensors reader (FORMATS.md §4). It checks a file exactly as the
 * reference parser does (§4.4 steps 1-7), under the stricter daemon policy of §4.6, and appends
 * one storage and one dense row-major tensor per header entry to the manifest.
 *
 * The header's JSON is never built into a tree: jscan.c checks its syntax in one pass (no key
 * repeated anywhere) and the walks here read members where they lie, so a 100 MB header of a
 * million tensors costs about 1 s and the names, not 10 s and 1.6 GB as under jansson.
 *
 * The file is divided, in the order a header is checked, into:
 *   - the tensor member walk (step 5 for one member) and the __metadata__ walks;
 *   - the coverage and size pass over the entries sorted by offset (steps 6-7);
 *   - filling the manifest from the sorted entries, with the alignment warning of §4.6;
 *   - safetensors_read itself: steps 1-4 (the length prefix and header bytes, read with
 *     source_pread, never mmap; UTF-8), pass 1, then the walks, steps 6-7 and the manifest.
 *
 * Every rejection names its FORMATS.md §7 rule and the tensor or header byte it concerns.
 */
#include "fmt.h"

#include <errno.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "checked.h"
#include "jscan.h"

_Static_assert(MANIFEST_TENSORS_MAX == 1u << 20 && MANIFEST_STORAGES_MAX == 1u << 20,
               "the E_LIMIT messages below say 2^20");

/* §4.4 step 2: the reference's cap on the header length; exactly this much is allowed. */
#define ST_HEADER_MAX 100000000ull

/* One header member other than __metadata__, as parsed in step 5. */
typedef struct st_entry {
    const char *name;            /* the member's key, decoded; in safetensors_read's names */
    int dtype;                   /* wsd_dtype_t, never C128 */
    uint32_t ndim;               /* <= WSD_MAX_NDIM */
    int64_t shape[WSD_MAX_NDIM]; /* each >= 0 (jscan caps integers at 2^63 - 1) */
    uint64_t begin, end;         /* data_offsets, relative to the byte buffer at 8 + N */
} st_entry_t;

/*
 * Renders a name for an error message: at most ~100 bytes, control characters as '?', so that a
 * hostile name can neither push the rule out of the 512-byte message nor forge log lines.
 */
static const char *shown(const char *name, char *buf, size_t size)
{
    size_t i = 0, o = 0;

    for (; name[i] && o + 4 < size && i < 100; i++)
        buf[o++] = (unsigned char)name[i] < 0x20 || name[i] == 0x7f ? '?' : name[i];
    if (name[i])
        buf[o++] = '.', buf[o++] = '.', buf[o++] = '.';
    buf[o] = '\0';
    return buf;
}

#define SHOWN(name) shown((name), (char[128]){0}, 128)

/*
 * Step 5 for one tensor member, the cursor at its value: exactly the reference's required
 * fields, extra ones ignored. Pass 1 (jscan_check) proved the syntax and that no field repeats.
 */
static int parse_tensor(const char *name, size_t name_len, jscan_t *j, st_entry_t *e,
                        fmt_err_t *err)
{
    size_t at_dtype = 0, at_shape = 0, at_offs = 0; /* 1 + the field's offset; 0 if absent */
    const char *missing;
    char key[16], dname[64];
    jscan_t v = *j;
    size_t n, count;
    uint64_t offs[2] = {0, 0};
    bool offs_ok = true;
    int bad = -1;

    if (name_len > MANIFEST_NAME_MAX)
        return fmt_fail(err, WSD_EBADCKPT, "E_ST_SCHEMA",
                        "tensor '%s': name of %zu bytes, at most %u are supported", SHOWN(name),
                        name_len, MANIFEST_NAME_MAX);
    if (jscan_ws(j) != '{')
        return fmt_fail(err, WSD_EBADCKPT, "E_ST_SCHEMA", "tensor '%s' is %s, expected an object",
                        SHOWN(name), jscan_kind(j));
    jscan_enter(j);
    while (jscan_member(j, key, sizeof(key), &n)) { /* longer keys are none of the three */
        if (n == 5 && memcmp(key, "dtype", 5) == 0)
            at_dtype = j->at + 1;
        else if (n == 5 && memcmp(key, "shape", 5) == 0)
            at_shape = j->at + 1;
        else if (n == 12 && memcmp(key, "data_offsets", 12) == 0)
            at_offs = j->at + 1;
        jscan_skip(j);
    }
    missing = !at_dtype ? "dtype" : !at_shape ? "shape" : "data_offsets";
    if (!at_dtype || !at_shape || !at_offs)
        return fmt_fail(err, WSD_EBADCKPT, "E_ST_SCHEMA", "tensor '%s' has no \"%s\" field",
                        SHOWN(name), missing);

    v.at = at_dtype - 1;
    if (v.p[v.at] != '"')
        return fmt_fail(err, WSD_EBADCKPT, "E_ST_SCHEMA",
                        "tensor '%s': dtype is %s, expected a string", SHOWN(name),
                        jscan_kind(&v));
    n = jscan_string(&v, dname, sizeof(dname));
    e->dtype = n < sizeof(dname) ? wsd_dtype_from_name(dname) : -1;
    /* C128 is a weightsd dtype for torch's complex128; safetensors has no such name. */
    if (e->dtype < 0 || e->dtype == WSD_DTYPE_C128)
        return fmt_fail(err, WSD_EBADCKPT, "E_ST_DTYPE", "tensor '%s': unknown dtype \"%s\"",
                        SHOWN(name), SHOWN(dname));

    v.at = at_shape - 1;
    if (v.p[v.at] != '[')
        return fmt_fail(err, WSD_EBADCKPT, "E_ST_SCHEMA",
                        "tensor '%s': shape is %s, expected an array", SHOWN(name),
                        jscan_kind(&v));
    jscan_enter(&v);
    for (count = 0; jscan_item(&v); count++) {
        uint64_t d;

        if (count >= WSD_MAX_NDIM)
            jscan_skip(&v); /* only counted: the rank error comes first */
        else if (jscan_uint(&v, &d))
            e->shape[count] = (int64_t)d;
        else if (bad < 0)
            bad = (int)count;
    }
    if (count > WSD_MAX_NDIM)
        return fmt_fail(err, WSD_EBADCKPT, "E_TENSOR_GEOMETRY",
                        "tensor '%s' has %zu dimensions, at most %u are supported", SHOWN(name),
                        count, WSD_MAX_NDIM);
    if (bad >= 0)
        return fmt_fail(err, WSD_EBADCKPT, "E_ST_SCHEMA",
                        "tensor '%s': shape[%d] is not a non-negative integer", SHOWN(name), bad);
    e->ndim = (uint32_t)count;

    v.at = at_offs - 1;
    count = 0;
    if (v.p[v.at] == '[') {
        for (jscan_enter(&v); jscan_item(&v); count++) {
            if (count >= 2)
                jscan_skip(&v);
            else if (!jscan_uint(&v, &offs[count]))
                offs_ok = false;
        }
    }
    if (count != 2 || !offs_ok)
        return fmt_fail(err, WSD_EBADCKPT, "E_ST_SCHEMA",
                        "tensor '%s': data_offsets is not an array of two non-negative integers",
                        SHOWN(name));
    e->begin = offs[0];
    e->end = offs[1];
    e->name = name;
    return 0;
}

/* Step 6 order: (BEGIN, END); the name only makes ties (empty tensors) deterministic. */
static int entry_cmp(const void *a, const void *b)
{
    const st_entry_t *x = a, *y = b;

    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end)
        return x->end < y->end ? -1 : 1;
    return strcmp(x->name, y->name);
}

/* Step 6 for one entry, already known to start at the expected offset. */
static int check_size(const st_entry_t *e, fmt_err_t *err)
{
    unsigned bits = wsd_dtype_bits(e->dtype);
    uint64_t numel = 1, nbits;

    /* Left to right like the reference's try_fold, so [4, 2^62, 0] overflows there and here. */
    for (uint32_t i = 0; i < e->ndim; i++)
        if (!ck_mul_u64(numel, (uint64_t)e->shape[i], &numel))
            return fmt_fail(err, WSD_EBADCKPT, "E_ST_OVERFLOW",
                            "tensor '%s': the product of its shape overflows 64 bits",
                            SHOWN(e->name));
    if (!ck_mul_u64(numel, bits, &nbits))
        return fmt_fail(err, WSD_EBADCKPT, "E_ST_OVERFLOW",
                        "tensor '%s': %llu elements of %u bits overflow 64 bits", SHOWN(e->name),
                        (unsigned long long)numel, bits);
    if (nbits % 8 != 0)
        return fmt_fail(err, WSD_EBADCKPT, "E_ST_SUBBYTE",
                        "tensor '%s': %llu elements of %s (%u bits each) do not fill whole bytes",
                        SHOWN(e->name), (unsigned long long)numel, wsd_dtype_name(e->dtype), bits);
    if (e->end - e->begin != nbits / 8)
        return fmt_fail(err, WSD_EBADCKPT, "E_ST_SIZE_MISMATCH",
                        "tensor '%s': %llu elements of %s take %llu bytes, but data_offsets "
                        "[%llu, %llu] span %llu",
                        SHOWN(e->name), (unsigned long long)numel, wsd_dtype_name(e->dtype),
                        (unsigned long long)(nbits / 8), (unsigned long long)e->begin,
                        (unsigned long long)e->end, (unsigned long long)(e->end - e->begin));
    return 0;
}

/*
 * Contiguous row-major strides, the way torch computes them: each dimension's stride is the
 * product of the later sizes, a size of 0 counting as 1. For a tensor with elements that product
 * is at most numel and cannot overflow. An empty tensor may pair a 0 with huge sizes (the
 * reference accepts [0, 2^64 - 1]); if its strides would overflow they are all 1, which is as
 * valid as any stride for a tensor without elements.
 */
static void contiguous_strides(const st_entry_t *e, mf_tensor_t *t)
{
    uint64_t acc = 1;

    for (uint32_t i = e->ndim; i-- > 0;) {
        uint64_t size = e->shape[i] > 0 ? (uint64_t)e->shape[i] : 1;

        t->stride[i] = (int64_t)acc;
        if (!ck_mul_u64(acc, size, &acc) || acc > INT64_MAX) {
            for (uint32_t k = 0; k < e->ndim; k++)
                t->stride[k] = 1;
            return;
        }
    }
}

/* The jscan_check() failure as the §7 rule it breaks; offsets count from the file's start. */
static int json_failure(const jscan_err_t *je, uint64_t hlen, fmt_err_t *err)
{
    unsigned long long at = (unsigned long long)je->at + 8;

    switch (je->kind) {
    case JSCAN_DUP:
        return fmt_fail(err, WSD_EBADCKPT, "E_ST_DUP_KEY", "header repeats a key (%s), at file "
                        "offset %llu", je->msg, at);
    case JSCAN_LIMIT:
        return fmt_fail(err, WSD_ELIMIT, "E_ST_HEADER_TOO_LARGE", "header has %s, at file "
                        "offset %llu", je->msg, at);
    case JSCAN_NOMEM:
        return fmt_fail(err, -ENOMEM, NULL, "out of memory checking a %llu-byte header",
                        (unsigned long long)hlen);
    default:
        return fmt_fail(err, WSD_EBADCKPT, "E_ST_JSON", "header (%llu bytes) is not valid JSON: "
                        "%s, at file offset %llu", (unsigned long long)hlen, je->msg, at);
    }
}

/*
 * __metadata__, its value at the cursor: null, or at most MANIFEST_META_MAX entries (checked
 * first, as the count was known before the types under jansson), each a string.
 */
static int parse_metadata(jscan_t j, fmt_err_t *err)
{
    char key[128], bad_key[128] = "";
    const char *bad_kind = NULL;
    size_t count = 0, n;

    if (jscan_ws(&j) == 'n')
        return 0;
    if (j.p[j.at] != '{')
        return fmt_fail(err, WSD_EBADCKPT, "E_ST_SCHEMA",
                        "__metadata__ is %s, expected an object of strings or null",
                        jscan_kind(&j));
    for (jscan_enter(&j); jscan_member(&j, key, sizeof(key), &n); count++) {
        if (!bad_kind && j.p[j.at] != '"') {
            bad_kind = jscan_kind(&j);
            memcpy(bad_key, key, sizeof(key));
        }
        jscan_skip(&j);
    }
    if (count > MANIFEST_META_MAX)
        return fmt_fail(err, WSD_ELIMIT, "E_ST_SCHEMA",
                        "__metadata__ has %zu entries, at most %u are supported", count,
                        MANIFEST_META_MAX);
    if (bad_kind)
        return fmt_fail(err, WSD_EBADCKPT, "E_ST_SCHEMA",
                        "__metadata__ entry '%s' is %s, expected a string", SHOWN(bad_key),
                        bad_kind);
    return 0;
}

/* Each entry as the manifest keeps it: the key, and the value as a JSON string literal. */
static int add_metadata(manifest_t *m, jscan_t j, fmt_err_t *err)
{
    int r = 0;

    if (jscan_ws(&j) != '{')
        return 0; /* null */
    jscan_enter(&j);
    while (r == 0 && jscan_key(&j)) {
        char *key = jscan_strdup(&j), *value, *quoted = NULL;
        json_t *str = NULL;

        jscan_colon(&j);
        value = jscan_strdup(&j);
        if (value)
            str = json_string(value);
        if (str)
            quoted = json_dumps(str, JSON_ENCODE_ANY);
        r = key && quoted ? manifest_add_meta(m, key, quoted) : -ENOMEM;
        if (r < 0)
            r = fmt_fail(err, r == WSD_ELIMIT ? WSD_ELIMIT : -ENOMEM,
                         r == WSD_ELIMIT ? "E_LIMIT" : NULL,
                         "cannot record __metadata__ entry '%s': %s", key ? SHOWN(key) : "?",
                         r == WSD_ELIMIT ? "more than 2^16 metadata entries" : "out of memory");
        json_decref(str);
        free(quoted);
        free(value);
        free(key);
    }
    return r;
}

/* Appends the validated, sorted entries; data_start = 8 + N. */
static int fill_manifest(const source_t *s, uint32_t source_index, manifest_t *m,
                         const st_entry_t *ents, size_t n, uint64_t data_start, fmt_err_t *err)
{
    size_t unaligned = 0;
    const st_entry_t *first_unaligned = NULL;
    uint64_t first_addr = 0;

    for (size_t i = 0; i < n; i++) {
        const st_entry_t *e = &ents[i];
        /* manifest_add_tensor copies the name and never writes through it. */
        mf_tensor_t t = {.name = (char *)(uintptr_t)e->name, .dtype = e->dtype, .ndim = e->ndim};
        unsigned itemsize = manifest_itemsize(e->dtype);
        uint64_t addr;
        int r;

        /* Cannot overflow: step 7 proved data_start + the last END equals the file size. */
        if (!ck_add_u64(data_start, e->begin, &addr))
            return fmt_fail(err, WSD_EINTERNAL, "E_ST_OVERFLOW", "offset overflow after step 7");
        if (itemsize > 1 && e->end > e->begin && addr % itemsize != 0) {
            if (unaligned++ == 0) {
                first_unaligned = e;
                first_addr = addr;
            }
        }
        r = manifest_add_storage(m, e->name, source_index, addr, e->end - e->begin, e->dtype,
                                 &t.storage);
        if (r < 0)
            return fmt_fail(err, r == WSD_ELIMIT ? WSD_ELIMIT : -ENOMEM,
                            r == WSD_ELIMIT ? "E_LIMIT" : NULL, "cannot record storage of tensor "
                            "'%s': %s", SHOWN(e->name), r == WSD_ELIMIT ? "more than 2^20 storages"
                                                                        : "out of memory");
        memcpy(t.shape, e->shape, sizeof(t.shape));
        contiguous_strides(e, &t);
        t.storage_offset = 0;
        r = manifest_add_tensor(m, &t);
        if (r < 0)
            return fmt_fail(err, r == WSD_ELIMIT ? WSD_ELIMIT : -ENOMEM,
                            r == WSD_ELIMIT ? "E_LIMIT" : NULL, "cannot record tensor '%s': %s",
                            SHOWN(e->name), r == WSD_ELIMIT ? "more than 2^20 tensors"
                                                            : "out of memory");
    }
    /* One line for the whole file: the host tier copies into aligned memory either way, and
     * a hand-written file can misalign thousands of tensors. */
    if (unaligned)
        fmt_warn(m, "W_UNALIGNED",
                 "'%s': tensor '%s' (%s) starts at file offset %llu, not a multiple of its %u-byte "
                 "element; %zu tensor%s unaligned",
                 s->path, SHOWN(first_unaligned->name), wsd_dtype_name(first_unaligned->dtype),
                 (unsigned long long)first_addr, manifest_itemsize(first_unaligned->dtype),
                 unaligned, unaligned == 1 ? "" : "s in all");
    return 0;
}

int safetensors_read(const source_t *s, uint32_t source_index, manifest_t *m, fmt_err_t *err)
{
    uint8_t lenbuf[8];
    uint64_t hlen = 0, data_start, expected = 0, file_end = 0;
    uint8_t *hdr = NULL;
    char *names = NULL, key[16];
    jscan_err_t je;
    jscan_t j, top, meta = {0}; /* meta.p set: __metadata__'s value */
    st_entry_t *ents = NULL;
    size_t nents = 0, bad, cap, members = 0, used = 0, n;
    int r;

    /* Step 1. */
    if (s->size < 8)
        return fmt_fail(err, WSD_EBADCKPT, "E_ST_HEADER_TOO_SMALL",
                        "'%s' is %llu bytes, smaller than the 8-byte header length", s->path,
                        (unsigned long long)s->size);
    r = source_pread(s, lenbuf, sizeof(lenbuf), 0, err);
    if (r < 0)
        return r;
    for (int i = 7; i >= 0; i--)
        hlen = hlen << 8 | lenbuf[i];

    /* Steps 2 and 3. */
    if (hlen > ST_HEADER_MAX)
        return fmt_fail(err, WSD_EBADCKPT, "E_ST_HEADER_TOO_LARGE",
                        "'%s': header length %llu exceeds %llu bytes", s->path,
                        (unsigned long long)hlen, ST_HEADER_MAX);
    if (!ck_add_u64(8, hlen, &data_start) || data_start > s->size)
        return fmt_fail(err, WSD_EBADCKPT, "E_ST_HEADER_LENGTH",
                        "'%s': header of %llu bytes at offset 8 runs past the end of the file "
                        "(%llu bytes)",
                        s->path, (unsigned long long)hlen, (unsigned long long)s->size);

    hdr = malloc(hlen ? (size_t)hlen : 1);
    if (!hdr)
        return fmt_fail(err, -ENOMEM, NULL, "out of memory for a %llu-byte header",
                        (unsigned long long)hlen);
    r = source_pread(s, hdr, (size_t)hlen, 8, err);
    if (r < 0)
        goto out;

    /* Step 4: the reference decodes the whole header as UTF-8 before it sees any JSON. */
    bad = jscan_utf8(hdr, (size_t)hlen);
    if (bad != hlen) {
        r = fmt_fail(err, WSD_EBADCKPT, "E_ST_UTF8",
                     "'%s': header is not valid UTF-8 (byte 0x%02x at file offset %llu)", s->path,
                     hdr[bad], (unsigned long long)bad + 8);
        goto out;
    }

    /* Step 5. Pass 1 checks the syntax and refuses every repeated key (§4.6), at every level,
     * __metadata__ included; the walks below then trust it. */
    r = jscan_check(hdr, (size_t)hlen, &members, &je);
    if (r < 0) {
        r = json_failure(&je, hlen, err);
        goto out;
    }
    j = (jscan_t){.p = hdr, .len = (size_t)hlen};
    if (jscan_ws(&j) != '{') {
        r = fmt_fail(err, WSD_EBADCKPT, "E_ST_SCHEMA", "'%s': header is %s, expected an object",
                     s->path, jscan_kind(&j));
        goto out;
    }
    /* __metadata__ first: its errors come before any tensor's, as under jansson. */
    top = j;
    for (jscan_enter(&top); jscan_member(&top, key, sizeof(key), &n); jscan_skip(&top))
        if (n == 12 && memcmp(key, "__metadata__", 12) == 0)
            meta = top;
    if (meta.p) {
        r = parse_metadata(meta, err);
        if (r < 0)
            goto out;
    }
    cap = members - (meta.p ? 1 : 0);
    if (cap > MANIFEST_TENSORS_MAX) {
        r = fmt_fail(err, WSD_ELIMIT, "E_ST_HEADER_TOO_LARGE",
                     "'%s': header declares %zu tensors, at most %u are supported", s->path, cap,
                     MANIFEST_TENSORS_MAX);
        goto out;
    }
    ents = calloc(cap ? cap : 1, sizeof(*ents));
    names = malloc((size_t)hlen + 1); /* every decoded name + NUL fits in its quoted form */
    if (!ents || !names) {
        r = fmt_fail(err, -ENOMEM, NULL, "out of memory for %zu tensors", cap);
        goto out;
    }
    for (jscan_enter(&j); jscan_member(&j, names + used, (size_t)hlen + 1 - used, &n);) {
        if (n == 12 && memcmp(names + used, "__metadata__", 12) == 0) {
            jscan_skip(&j);
            continue;
        }
        r = parse_tensor(names + used, n, &j, &ents[nents], err);
        if (r < 0)
            goto out;
        nents++;
        used += n + 1;
    }

    /* Step 6: full coverage of the byte buffer, no gaps, overlaps or aliases. */
    qsort(ents, nents, sizeof(*ents), entry_cmp);
    for (size_t i = 0; i < nents; i++) {
        const st_entry_t *e = &ents[i];

        if (e->begin != expected) {
            r = fmt_fail(err, WSD_EBADCKPT, "E_ST_OFFSETS",
                         "tensor '%s' begins at %llu, expected %llu", SHOWN(e->name),
                         (unsigned long long)e->begin, (unsigned long long)expected);
            goto out;
        }
        if (e->end < e->begin) {
            r = fmt_fail(err, WSD_EBADCKPT, "E_ST_OFFSETS",
                         "tensor '%s' ends at %llu, before it begins at %llu", SHOWN(e->name),
                         (unsigned long long)e->end, (unsigned long long)e->begin);
            goto out;
        }
        r = check_size(e, err);
        if (r < 0)
            goto out;
        expected = e->end;
    }

    /* Step 7: the buffer is exactly as long as the header says; no trailing polyglot bytes. */
    if (!ck_add_u64(data_start, expected, &file_end) || file_end != s->size) {
        bool longer = file_end < s->size && file_end >= data_start;

        r = fmt_fail(err, WSD_EBADCKPT, "E_ST_INCOMPLETE_BUFFER",
                     "'%s': header describes %llu data bytes after offset %llu, but the file is "
                     "%llu bytes (%s)",
                     s->path, (unsigned long long)expected, (unsigned long long)data_start,
                     (unsigned long long)s->size, longer ? "trailing bytes" : "truncated");
        goto out;
    }

    r = fill_manifest(s, source_index, m, ents, nents, data_start, err);
    if (r < 0)
        goto out;
    if (meta.p)
        r = add_metadata(m, meta, err);

out:
    free(ents);
    free(names);
    free(hdr);
    return r;
}
