/*
 * test-info.c - info's tensor list written as JSON text from a packed manifest (daemon/info.c,
 * manifest_pb_next_tensor): string escapes, pages that add up to the whole list, the byte
 * budget, and malformed or short-of-memory input leaving the text as it was.
 */
#include "test.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "fault.h"
#include "info.h"
#include "manifest_pb.h"
#include "weightsd.h"
#include "weightsd.pb-c.h"
#include "wire.h"

static char *put_string(const char *s, size_t n)
{
    info_text_t t = {0};

    ASSERT_EQ(info_text_put_string(&t, s, n), 0);
    ASSERT_EQ(strlen(t.p), t.len);
    return t.p;
}

TEST(strings_escape_what_json_needs_and_replace_bad_utf8)
{
    static const char in[] = "a\"b\\c\n\t\x01\x1f\x7f"
                             "\xc3\xa9"         /* U+00E9 */
                             "\xf0\x9f\x98\x80" /* U+1F600 */
                             "\xff"             /* never valid */
                             "\xc0\x80"         /* overlong NUL */
                             "\xed\xa0\x80"     /* a surrogate */
                             "\xe2\x82";        /* cut short */
    char *out = put_string(in, sizeof(in) - 1);
    json_error_t jerr;
    json_t *v;

    ASSERT_STR_EQ(out, "\"a\\\"b\\\\c\\n\\t\\u0001\\u001f\x7f\xc3\xa9\xf0\x9f\x98\x80"
                       "\\ufffd\\ufffd\\ufffd\\ufffd\\ufffd\\ufffd\\ufffd\\ufffd\"");
    v = json_loads(out, JSON_DECODE_ANY, &jerr);
    ASSERT(v && json_is_string(v));
    ASSERT_EQ(memcmp(json_string_value(v), in, 16), 0); /* the valid part, as it was */
    json_decref(v);
    free(out);

    /* A name with a NUL in the middle keeps it (the length, not strlen, bounds it). */
    out = put_string("x\0y", 3);
    ASSERT_STR_EQ(out, "\"x\\u0000y\"");
    free(out);
    out = put_string("", 0);
    ASSERT_STR_EQ(out, "\"\"");
    free(out);
}

/* A manifest of \p n tensors: names of varying length (some needing escapes), shapes of
 * 0..3 dims, every second one a view on the storage before it. */
static uint8_t *make_pb(size_t n, size_t *ret_len)
{
    manifest_t *m = manifest_new();
    uint8_t *pb;
    char name[64];

    ASSERT(m);
    for (size_t i = 0; i < n; i++) {
        mf_tensor_t t = {.dtype = i % 3 ? WSD_DTYPE_F32 : WSD_DTYPE_BF16,
                         .ndim = (uint32_t)(i % 4)};

        snprintf(name, sizeof(name), "layer.%zu.%s\"w", i, i % 5 ? "q" : "\xc3\xa9\tlong-name");
        for (uint32_t d = 0; d < t.ndim; d++) {
            t.shape[d] = (int64_t)(d + 2);
            t.stride[d] = (int64_t)(1u << (t.ndim - 1 - d));
        }
        t.name = name;
        t.storage = (uint32_t)(i / 2);
        t.storage_offset = i % 2;
        if (i % 2 == 0)
            ASSERT_EQ(manifest_add_storage(m, name, 0, 64ull * i, 64, t.dtype, NULL), 0);
        ASSERT_EQ(manifest_add_tensor(m, &t), 0);
    }
    ASSERT_EQ(manifest_pb_encode(m, 64ull * n, "", &pb, ret_len), 0);
    manifest_free(m);
    return pb;
}

/* Checks entry \p i of the list against what make_pb() put there. */
static void check_entry(json_t *e, size_t i)
{
    char name[64];
    json_t *shape = json_object_get(e, "shape"), *stride = json_object_get(e, "stride");
    size_t ndim = i % 4;

    snprintf(name, sizeof(name), "layer.%zu.%s\"w", i, i % 5 ? "q" : "\xc3\xa9\tlong-name");
    ASSERT_STR_EQ(json_string_value(json_object_get(e, "name")), name);
    ASSERT_STR_EQ(json_string_value(json_object_get(e, "dtype")), i % 3 ? "F32" : "BF16");
    ASSERT_EQ(json_array_size(shape), ndim);
    ASSERT_EQ(json_array_size(stride), ndim);
    for (size_t d = 0; d < ndim; d++) {
        ASSERT_EQ(json_integer_value(json_array_get(shape, d)), (json_int_t)(d + 2));
        ASSERT_EQ(json_integer_value(json_array_get(stride, d)),
                  (json_int_t)(1u << (ndim - 1 - d)));
    }
    ASSERT_EQ(json_integer_value(json_object_get(e, "storage")), (json_int_t)(i / 2));
    ASSERT_EQ(json_integer_value(json_object_get(e, "storage_offset")), (json_int_t)(i % 2));
    ASSERT(json_is_integer(json_object_get(e, "nbytes")));
}

static json_t *parse_array(const info_text_t *t, size_t from)
{
    json_error_t jerr;
    json_t *a = json_loadb(t->p + from, t->len - from, 0, &jerr);

    if (!a || !json_is_array(a))
        TEST_FAIL("not a JSON array at %zu: %s", from, a ? "" : jerr.text);
    return a;
}

TEST(pages_add_up_to_the_whole_list)
{
    const size_t n = 1000;
    size_t len, seen = 0;
    uint8_t *pb = make_pb(n, &len);
    info_text_t all = {0}, t = {0};
    uint64_t count;
    json_t *a;

    ASSERT_EQ(info_tensors_json(pb, len, 0, 0, SIZE_MAX, &all, &count, NULL), 0);
    ASSERT_UINT_EQ(count, n);
    a = parse_array(&all, 0);
    ASSERT_EQ(json_array_size(a), n);
    for (size_t i = 0; i < n; i++)
        check_entry(json_array_get(a, i), i);
    json_decref(a);

    /* Pages of 7, each appended after some text of its own, as the daemon appends them. */
    for (uint64_t off = 0; off < n; off += count) {
        size_t at;

        info_text_cut(&t, 0);
        ASSERT_EQ(info_text_put(&t, "prefix", 6), 0);
        at = t.len;
        ASSERT_EQ(info_tensors_json(pb, len, off, 7, SIZE_MAX, &t, &count, NULL), 0);
        ASSERT_UINT_EQ(count, off + 7 <= n ? 7 : n - off);
        a = parse_array(&t, at);
        for (size_t i = 0; i < count; i++)
            check_entry(json_array_get(a, i), (size_t)off + i);
        seen += count;
        json_decref(a);
    }
    ASSERT_EQ(seen, n);

    /* With a seek kept between pages, the same text; one ahead of the offset is not used. */
    {
        info_seek_t seek = {0};
        info_text_t a1 = {0}, a2 = {0};
        static const uint64_t offs[] = {0, 7, 14, 500, 3, 999, 1000, 0};

        for (size_t k = 0; k < sizeof(offs) / sizeof(offs[0]); k++) {
            uint64_t c1, c2;

            info_text_cut(&a1, 0);
            info_text_cut(&a2, 0);
            ASSERT_EQ(info_tensors_json(pb, len, offs[k], 7, SIZE_MAX, &a1, &c1, &seek), 0);
            ASSERT_EQ(info_tensors_json(pb, len, offs[k], 7, SIZE_MAX, &a2, &c2, NULL), 0);
            ASSERT_UINT_EQ(c1, c2);
            ASSERT_STR_EQ(a1.p, a2.p);
            ASSERT_UINT_EQ(seek.index, offs[k] + c1);
        }
        ASSERT_EQ(info_tensors_json(pb, len, n + 1, 7, SIZE_MAX, &a1, &count, &seek), WSD_EINVAL);
        free(a1.p);
        free(a2.p);
    }

    /* At the end: an empty page; past it: EINVAL and nothing written. */
    info_text_cut(&t, 0);
    ASSERT_EQ(info_tensors_json(pb, len, n, 7, SIZE_MAX, &t, &count, NULL), 0);
    ASSERT_STR_EQ(t.p, "[]");
    ASSERT_UINT_EQ(count, 0);
    ASSERT_EQ(info_tensors_json(pb, len, n + 1, 7, SIZE_MAX, &t, &count, NULL), WSD_EINVAL);
    ASSERT_STR_EQ(t.p, "[]");
    free(all.p);
    free(t.p);
    free(pb);
}

TEST(the_budget_shortens_a_page_but_never_empties_it)
{
    size_t len, one, three;
    uint8_t *pb = make_pb(10, &len);
    info_text_t t = {0};
    uint64_t count;

    ASSERT_EQ(info_tensors_json(pb, len, 0, 1, SIZE_MAX, &t, &count, NULL), 0);
    one = t.len;
    info_text_cut(&t, 0);
    ASSERT_EQ(info_tensors_json(pb, len, 0, 3, SIZE_MAX, &t, &count, NULL), 0);
    three = t.len;
    info_text_cut(&t, 0);

    /* A budget under one entry still gives one. */
    ASSERT_EQ(info_tensors_json(pb, len, 0, 5, 4, &t, &count, NULL), 0);
    ASSERT_UINT_EQ(count, 1);
    ASSERT_EQ(t.len, one);
    info_text_cut(&t, 0);
    /* Exactly three entries and their brackets fit; one byte less gives two. */
    ASSERT_EQ(info_tensors_json(pb, len, 0, 5, three, &t, &count, NULL), 0);
    ASSERT_UINT_EQ(count, 3);
    ASSERT_EQ(t.len, three);
    info_text_cut(&t, 0);
    ASSERT_EQ(info_tensors_json(pb, len, 0, 5, three - 1, &t, &count, NULL), 0);
    ASSERT_UINT_EQ(count, 2);
    info_text_cut(&t, 0);

    /* Without a limit the whole list must fit, or nothing is written. */
    ASSERT_EQ(info_text_put(&t, "keep", 4), 0);
    ASSERT_EQ(info_tensors_json(pb, len, 0, 0, three, &t, &count, NULL), WSD_ELIMIT);
    ASSERT_STR_EQ(t.p, "keep");
    free(t.p);
    free(pb);
}

TEST(malformed_manifests_are_refused_and_unknown_fields_skipped)
{
    size_t len;
    uint8_t *pb = make_pb(3, &len), buf[64];
    info_text_t t = {0};
    uint64_t count;

    ASSERT_EQ(info_text_put(&t, "keep", 4), 0);
    /* Every cut of a real manifest that ends inside a field. */
    for (size_t cut = 1; cut < len; cut++) {
        manifest_pb_cursor_t c = {.p = pb, .end = pb + cut};
        const uint8_t *e;
        size_t elen;
        int r, last;

        while ((r = manifest_pb_next_tensor(&c, &e, &elen)) == 1)
            ASSERT(e >= pb && e + elen <= pb + cut);
        last = info_tensors_json(pb, cut, 0, 0, SIZE_MAX, &t, &count, NULL);
        ASSERT(r == 0 || r == -EBADMSG);
        ASSERT(last == 0 || last == -EBADMSG);
        ASSERT(last == 0 || strcmp(t.p, "keep") == 0);
        info_text_cut(&t, 4);
    }

    /* A group (wire type 3), an 11-byte varint, a length past the end. */
    buf[0] = 0x1b;
    ASSERT_EQ(info_tensors_json(buf, 1, 0, 0, SIZE_MAX, &t, &count, NULL), -EBADMSG);
    buf[0] = 0x08;
    memset(buf + 1, 0xff, 10);
    buf[11] = 0x01;
    ASSERT_EQ(info_tensors_json(buf, 12, 0, 0, SIZE_MAX, &t, &count, NULL), -EBADMSG);
    buf[0] = 0x12;
    buf[1] = 0x05;
    ASSERT_EQ(info_tensors_json(buf, 4, 0, 0, SIZE_MAX, &t, &count, NULL), -EBADMSG);
    /* Bytes that are a length-delimited tensors field but no TensorInfo. */
    buf[0] = 0x12;
    buf[1] = 0x01;
    buf[2] = 0xff;
    ASSERT_EQ(info_tensors_json(buf, 3, 0, 0, SIZE_MAX, &t, &count, NULL), -EBADMSG);
    ASSERT_STR_EQ(t.p, "keep");

    /* fixed32 and fixed64 fields of a later schema are stepped over. */
    buf[0] = 0x4d; /* field 9, fixed32 */
    memset(buf + 1, 0x12, 4);
    buf[5] = 0x51; /* field 10, fixed64 */
    memset(buf + 6, 0x12, 8);
    buf[14] = 0x12; /* field 2: an empty TensorInfo */
    buf[15] = 0x00;
    ASSERT_EQ(info_tensors_json(buf, 16, 0, 0, SIZE_MAX, &t, &count, NULL), 0);
    ASSERT_UINT_EQ(count, 1);
    ASSERT_STR_CONTAINS(t.p, "[{\"name\":\"\",");
    free(t.p);
    free(pb);
}

/* Integers at their extremes are printed exactly (a manifest holds none of these: the writer
 * does not rely on that). */
TEST(integers_at_their_extremes)
{
    Weightsd__V1__Manifest mf = WEIGHTSD__V1__MANIFEST__INIT;
    Weightsd__V1__TensorInfo ti = WEIGHTSD__V1__TENSOR_INFO__INIT, *tip = &ti;
    int64_t shape[] = {0, -5, INT64_MIN, INT64_MAX}, stride[] = {-1};
    info_text_t t = {0};
    uint8_t buf[256];
    uint64_t count;
    size_t len;

    ti.name = wire_str("x");
    ti.dtype = 9999; /* no such dtype */
    ti.shape = shape;
    ti.n_shape = 4;
    ti.stride = stride;
    ti.n_stride = 1;
    ti.storage = UINT32_MAX;
    ti.storage_offset = 10;
    ti.nbytes = UINT64_MAX;
    mf.tensors = &tip;
    mf.n_tensors = 1;
    ASSERT_LE(weightsd__v1__manifest__get_packed_size(&mf), sizeof(buf));
    len = weightsd__v1__manifest__pack(&mf, buf);
    ASSERT_EQ(info_tensors_json(buf, len, 0, 0, SIZE_MAX, &t, &count, NULL), 0);
    ASSERT_UINT_EQ(count, 1);
    ASSERT_STR_EQ(t.p, "[{\"name\":\"x\",\"dtype\":\"?\",\"shape\":[0,-5,-9223372036854775808,"
                       "9223372036854775807],\"stride\":[-1],\"nbytes\":18446744073709551615,"
                       "\"storage\":4294967295,\"storage_offset\":10}]");
    free(t.p);
}

/* Every allocation of a page can fail: -ENOMEM, and the text is as it was. */
TEST(every_allocation_can_fail)
{
#ifdef WSD_FAULT_INJECTION
    size_t len;
    uint8_t *pb = make_pb(40, &len);
    char spec[32];

    for (unsigned long n = 1;; n++) {
        info_text_t t = {0};
        uint64_t count;
        unsigned long calls;
        int r;

        ASSERT_EQ(info_text_put(&t, "keep", 4), 0);
        snprintf(spec, sizeof(spec), "malloc:%lu", n);
        fault_arm(spec);
        r = info_tensors_json(pb, len, 3, 0, SIZE_MAX, &t, &count, NULL);
        calls = fault_calls("malloc");
        fault_arm(NULL);
        if (calls < n) {
            ASSERT_EQ(r, 0);
            ASSERT_UINT_EQ(count, 37);
            ASSERT_GT(n, 37ul); /* at least one unpack per tensor was failed */
            free(t.p);
            break;
        }
        ASSERT_EQ(r, -ENOMEM);
        ASSERT_STR_EQ(t.p, "keep");
        free(t.p);
    }
    free(pb);
#else
    test_skip("needs -DWSD_FAULT_INJECTION=ON (the malloc wrappers)");
#endif
}

/* A GPU upload after the preload (registry.c upload_more) reads the storages back from the
 * packed manifest: keys, sizes and arena offsets as they went in, tensors skipped. */
TEST(storages_come_back_from_the_packed_manifest)
{
    manifest_t *m = manifest_new(), *back = NULL;
    uint8_t *pb;
    size_t len;
    char key[32];

    ASSERT(m);
    for (size_t i = 0; i < 300; i++) {
        mf_tensor_t t = {.name = key, .dtype = WSD_DTYPE_U8, .ndim = 1, .shape = {1},
                         .stride = {1}, .storage = (uint32_t)i};

        snprintf(key, sizeof(key), "data/%zu", i);
        ASSERT_EQ(manifest_add_storage(m, key, 0, 7, i * 3 + 1, WSD_DTYPE_U8, NULL), 0);
        m->storages[i].arena_offset = 64ull * i * i + (i == 299 ? (1ull << 40) : 0);
        ASSERT_EQ(manifest_add_tensor(m, &t), 0);
    }
    ASSERT_EQ(manifest_pb_encode(m, (1ull << 41), "abc", &pb, &len), 0);
    ASSERT_EQ(manifest_pb_storages(pb, len, &back), 0);
    ASSERT_UINT_EQ(back->nstorages, 300);
    ASSERT_UINT_EQ(back->ntensors, 0);
    for (size_t i = 0; i < 300; i++) {
        ASSERT_STR_EQ(back->storages[i].key, m->storages[i].key);
        ASSERT_UINT_EQ(back->storages[i].nbytes, m->storages[i].nbytes);
        ASSERT_UINT_EQ(back->storages[i].arena_offset, m->storages[i].arena_offset);
    }
    manifest_free(back);
    back = NULL;
    /* Cut anywhere inside, a manifest is malformed or shorter, never read past its end. */
    for (size_t cut = 1; cut < len; cut += 97) {
        int r = manifest_pb_storages(pb, len - cut, &back);

        ASSERT(r == -EBADMSG || r == 0);
        if (r == 0) {
            ASSERT_LE(back->nstorages, 300);
            back = manifest_free(back);
        }
    }
#ifdef WSD_FAULT_INJECTION
    for (unsigned long n = 1;; n++) {
        char spec[32];
        unsigned long calls;
        int r;

        snprintf(spec, sizeof(spec), "malloc:%lu", n);
        fault_arm(spec);
        r = manifest_pb_storages(pb, len, &back);
        calls = fault_calls("malloc");
        fault_arm(NULL);
        if (calls < n) {
            ASSERT_EQ(r, 0);
            back = manifest_free(back);
            break;
        }
        /* protobuf-c's own allocations are not ours to count; a failed one reads as
         * malformed, since protobuf-c does not say which. */
        ASSERT(r == -ENOMEM || r == -EBADMSG);
    }
#endif
    free(pb);
    manifest_free(m);
}

int main(int argc, char **argv)
{
    return test_main(argc, argv);
}
