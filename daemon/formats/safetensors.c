/*
 * safetensors.c - the safetensors reader (FORMATS.md §4). It checks a file exactly as the
 * reference parser does (§4.4 steps 1-7), under the stricter daemon policy of §4.6, and appends
 * one storage and one dense row-major tensor per header entry to the manifest.
 *
 * The file is divided, in the order a header is checked, into:
 *   - the length prefix and header bytes (steps 1-3), read with source_pread, never mmap;
 *   - UTF-8 and lexical checks jansson does not make the way the reference does (step 4);
 *   - the JSON walk that turns each header member into an st_entry_t (step 5);
 *   - the coverage and size pass over the entries sorted by offset (steps 6-7);
 *   - filling the manifest from the sorted entries, with the alignment warning of §4.6.
 *
 * Every rejection names its FORMATS.md §7 rule and the tensor or header byte it concerns.
 */
#include "fmt.h"

#include <errno.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "checked.h"

_Static_assert(MANIFEST_TENSORS_MAX == 1u << 20 && MANIFEST_STORAGES_MAX == 1u << 20,
               "the E_LIMIT messages below say 2^20");

/* §4.4 step 2: the reference's cap on the header length; exactly this much is allowed. */
#define ST_HEADER_MAX 100000000ull

/* One header member other than __metadata__, as parsed in step 5. */
typedef struct st_entry {
    const char *name;            /* the member's key; owned by the parsed json_t */
    int dtype;                   /* wsd_dtype_t, never C128 */
    uint32_t ndim;               /* <= WSD_MAX_NDIM */
    int64_t shape[WSD_MAX_NDIM]; /* each >= 0 (jansson caps integers at 2^63 - 1) */
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
 * Step 4. The reference decodes the header with Rust's str::from_utf8 before any JSON is seen,
 * so overlong forms, UTF-16 surrogates and code points past U+10FFFF are rejected even where
 * jansson would only look at them inside strings. Returns the offset of the first bad byte, or
 * len when all is well.
 */
static size_t utf8_check(const uint8_t *p, size_t len)
{
    size_t i = 0;

    while (i < len) {
        uint8_t c = p[i];
        size_t n;
        uint8_t lo = 0x80, hi = 0xbf;

        if (c < 0x80) {
            i++;
            continue;
        }
        if (c >= 0xc2 && c <= 0xdf)
            n = 1;
        else if (c >= 0xe0 && c <= 0xef) {
            n = 2;
            if (c == 0xe0)
                lo = 0xa0; /* overlong */
            if (c == 0xed)
                hi = 0x9f; /* surrogates */
        } else if (c >= 0xf0 && c <= 0xf4) {
            n = 3;
            if (c == 0xf0)
                lo = 0x90; /* overlong */
            if (c == 0xf4)
                hi = 0x8f; /* past U+10FFFF */
        } else
            return i;
        if (len - i <= n)
            return i;
        if (p[i + 1] < lo || p[i + 1] > hi)
            return i;
        for (size_t k = 2; k <= n; k++)
            if (p[i + k] < 0x80 || p[i + k] > 0xbf)
                return i;
        i += n + 1;
    }
    return len;
}

/*
 * jansson reads "-0" as the integer 0, where serde_json makes it the float -0.0, which the
 * reference then rejects as a shape or offset. Finding it in the text (outside strings) keeps
 * us from accepting a file the reference refuses (RELIABILITY P10: identical or stricter). It
 * is also refused inside ignored extra fields, which the reference would tolerate: stricter, and
 * no writer produces it. Returns the offset, or len if none.
 */
static size_t find_negative_zero(const uint8_t *p, size_t len)
{
    bool in_string = false;

    for (size_t i = 0; i < len; i++) {
        if (in_string) {
            if (p[i] == '\\')
                i++;
            else if (p[i] == '"')
                in_string = false;
            continue;
        }
        if (p[i] == '"')
            in_string = true;
        else if (p[i] == '-' && i + 1 < len && p[i + 1] == '0' &&
                 (i + 2 == len || !strchr("0123456789.eE", p[i + 2])))
            return i;
    }
    return len;
}

static const char *json_kind(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        return "an object";
    case JSON_ARRAY:
        return "an array";
    case JSON_STRING:
        return "a string";
    case JSON_INTEGER:
        return "an integer";
    case JSON_REAL:
        return "a real number";
    case JSON_TRUE:
    case JSON_FALSE:
        return "a boolean";
    case JSON_NULL:
        return "null";
    }
    return "something else";
}

/*
 * A JSON integer that is not negative. jansson's json_int_t is a signed 64-bit integer, so values
 * from 2^63 up are already refused by json_loadb ("too big integer"), where the reference allows
 * up to 2^64 - 1: stricter, and no real file needs offsets or sizes past 2^63.
 */
static bool json_u64(const json_t *v, uint64_t *ret)
{
    json_int_t i;

    if (!json_is_integer(v))
        return false;
    i = json_integer_value(v);
    if (i < 0)
        return false;
    *ret = (uint64_t)i;
    return true;
}

static int parse_metadata(json_t *meta, fmt_err_t *err)
{
    const char *key;
    json_t *v;

    if (json_is_null(meta))
        return 0;
    if (!json_is_object(meta))
        return fmt_fail(err, WSD_EBADCKPT, "E_ST_SCHEMA",
                        "__metadata__ is %s, expected an object of strings or null",
                        json_kind(meta));
    if (json_object_size(meta) > MANIFEST_META_MAX)
        return fmt_fail(err, WSD_ELIMIT, "E_ST_SCHEMA",
                        "__metadata__ has %zu entries, at most %u are supported",
                        json_object_size(meta), MANIFEST_META_MAX);
    json_object_foreach (meta, key, v) {
        if (!json_is_string(v))
            return fmt_fail(err, WSD_EBADCKPT, "E_ST_SCHEMA",
                            "__metadata__ entry '%s' is %s, expected a string", SHOWN(key),
                            json_kind(v));
    }
    return 0;
}

/* Step 5 for one tensor member: exactly the reference's required fields; extra ones ignored. */
static int parse_tensor(const char *name, const json_t *info, st_entry_t *e, fmt_err_t *err)
{
    const json_t *dtype, *shape, *offs;
    const char *dname, *missing;

    if (strlen(name) > MANIFEST_NAME_MAX)
        return fmt_fail(err, WSD_EBADCKPT, "E_ST_SCHEMA",
                        "tensor '%s': name of %zu bytes, at most %u are supported", SHOWN(name),
                        strlen(name), MANIFEST_NAME_MAX);
    if (!json_is_object(info))
        return fmt_fail(err, WSD_EBADCKPT, "E_ST_SCHEMA", "tensor '%s' is %s, expected an object",
                        SHOWN(name), json_kind(info));
    dtype = json_object_get(info, "dtype");
    shape = json_object_get(info, "shape");
    offs = json_object_get(info, "data_offsets");
    missing = !dtype ? "dtype" : !shape ? "shape" : "data_offsets";
    if (!dtype || !shape || !offs)
        return fmt_fail(err, WSD_EBADCKPT, "E_ST_SCHEMA", "tensor '%s' has no \"%s\" field",
                        SHOWN(name), missing);

    if (!json_is_string(dtype))
        return fmt_fail(err, WSD_EBADCKPT, "E_ST_SCHEMA",
                        "tensor '%s': dtype is %s, expected a string", SHOWN(name),
                        json_kind(dtype));
    dname = json_string_value(dtype);
    e->dtype = wsd_dtype_from_name(dname);
    /* C128 is a weightsd dtype for torch's complex128; safetensors has no such name. */
    if (e->dtype < 0 || e->dtype == WSD_DTYPE_C128)
        return fmt_fail(err, WSD_EBADCKPT, "E_ST_DTYPE", "tensor '%s': unknown dtype \"%s\"",
                        SHOWN(name), SHOWN(dname));

    if (!json_is_array(shape))
        return fmt_fail(err, WSD_EBADCKPT, "E_ST_SCHEMA",
                        "tensor '%s': shape is %s, expected an array", SHOWN(name),
                        json_kind(shape));
    if (json_array_size(shape) > WSD_MAX_NDIM)
        return fmt_fail(err, WSD_EBADCKPT, "E_TENSOR_GEOMETRY",
                        "tensor '%s' has %zu dimensions, at most %u are supported", SHOWN(name),
                        json_array_size(shape), WSD_MAX_NDIM);
    e->ndim = (uint32_t)json_array_size(shape);
    for (uint32_t i = 0; i < e->ndim; i++) {
        uint64_t d;

        if (!json_u64(json_array_get(shape, i), &d))
            return fmt_fail(err, WSD_EBADCKPT, "E_ST_SCHEMA",
                            "tensor '%s': shape[%u] is not a non-negative integer", SHOWN(name), i);
        e->shape[i] = (int64_t)d;
    }

    if (!json_is_array(offs) || json_array_size(offs) != 2 ||
        !json_u64(json_array_get(offs, 0), &e->begin) ||
        !json_u64(json_array_get(offs, 1), &e->end))
        return fmt_fail(err, WSD_EBADCKPT, "E_ST_SCHEMA",
                        "tensor '%s': data_offsets is not an array of two non-negative integers",
                        SHOWN(name));
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

static int parse_json_error(const json_error_t *je, uint64_t hlen, fmt_err_t *err)
{
    /* json_error_t.position counts bytes from the start of the header, which is file offset 8. */
    unsigned long long at = (unsigned long long)je->position + 8;

    if (json_error_code(je) == json_error_duplicate_key || strstr(je->text, "duplicate"))
        return fmt_fail(err, WSD_EBADCKPT, "E_ST_DUP_KEY",
                        "header repeats a key (%s), at file offset %llu", je->text, at);
    return fmt_fail(err, WSD_EBADCKPT, "E_ST_JSON",
                    "header (%llu bytes) is not valid JSON: %s, at file offset %llu",
                    (unsigned long long)hlen, je->text, at);
}

static int add_metadata(manifest_t *m, json_t *meta, fmt_err_t *err)
{
    const char *key;
    json_t *v;

    if (!meta || json_is_null(meta))
        return 0;
    json_object_foreach (meta, key, v) {
        char *quoted = json_dumps(v, JSON_ENCODE_ANY);
        int r;

        if (!quoted)
            return fmt_fail(err, -ENOMEM, NULL, "out of memory");
        r = manifest_add_meta(m, key, quoted);
        free(quoted);
        if (r < 0)
            return fmt_fail(err, r == WSD_ELIMIT ? WSD_ELIMIT : -ENOMEM,
                            r == WSD_ELIMIT ? "E_LIMIT" : NULL,
                            "cannot record __metadata__ entry '%s': %s", SHOWN(key),
                            r == WSD_ELIMIT ? "more than 2^16 metadata entries" : "out of memory");
    }
    return 0;
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
    json_t *root = NULL, *meta = NULL, *v;
    json_error_t je;
    st_entry_t *ents = NULL;
    size_t nents = 0, bad, cap;
    const char *key;
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

    /* Step 4. */
    bad = utf8_check(hdr, (size_t)hlen);
    if (bad != hlen) {
        r = fmt_fail(err, WSD_EBADCKPT, "E_ST_UTF8",
                     "'%s': header is not valid UTF-8 (byte 0x%02x at file offset %llu)", s->path,
                     hdr[bad], (unsigned long long)bad + 8);
        goto out;
    }

    /* Step 5. Duplicates are refused at every level (§4.6), __metadata__ included. */
    root = json_loadb((const char *)hdr, (size_t)hlen, JSON_REJECT_DUPLICATES, &je);
    if (!root) {
        r = parse_json_error(&je, hlen, err);
        goto out;
    }
    bad = find_negative_zero(hdr, (size_t)hlen);
    if (bad != hlen) {
        r = fmt_fail(err, WSD_EBADCKPT, "E_ST_JSON",
                     "'%s': \"-0\" at file offset %llu is not a non-negative integer", s->path,
                     (unsigned long long)bad + 8);
        goto out;
    }
    if (!json_is_object(root)) {
        r = fmt_fail(err, WSD_EBADCKPT, "E_ST_SCHEMA", "'%s': header is %s, expected an object",
                     s->path, json_kind(root));
        goto out;
    }
    meta = json_object_get(root, "__metadata__");
    if (meta) {
        r = parse_metadata(meta, err);
        if (r < 0)
            goto out;
    }
    cap = json_object_size(root) - (meta ? 1 : 0);
    if (cap > MANIFEST_TENSORS_MAX) {
        r = fmt_fail(err, WSD_ELIMIT, "E_ST_HEADER_TOO_LARGE",
                     "'%s': header declares %zu tensors, at most %u are supported", s->path, cap,
                     MANIFEST_TENSORS_MAX);
        goto out;
    }
    ents = calloc(cap ? cap : 1, sizeof(*ents));
    if (!ents) {
        r = fmt_fail(err, -ENOMEM, NULL, "out of memory for %zu tensors", cap);
        goto out;
    }
    json_object_foreach (root, key, v) {
        if (strcmp(key, "__metadata__") == 0)
            continue;
        r = parse_tensor(key, v, &ents[nents], err);
        if (r < 0)
            goto out;
        nents++;
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
    r = add_metadata(m, meta, err);

out:
    free(ents);
    json_decref(root);
    free(hdr);
    return r;
}
