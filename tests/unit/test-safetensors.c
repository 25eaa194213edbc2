/*
 * test-safetensors.c - the safetensors reader against FORMATS.md: every row of the §4.5
 * accept/reject matrix (with the stricter §4.6 verdict where it differs), the reference test
 * vectors of §4.8 byte for byte, the §6.3 extras (a reference-writer file, a > 4 GiB sparse
 * file), truncation at every byte offset and single-byte corruption (RELIABILITY P2/M1), and
 * the fmt_load() path with format detection.
 *
 * Inputs are built here into a private temporary directory; nothing binary is checked in.
 */
#ifndef _GNU_SOURCE
#    define _GNU_SOURCE /* nftw in st_fixtures.h, when the build does not set it */
#endif
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../fixtures/st_fixtures.h"
#include "fmt.h"
#include "manifest.h"
#include "test.h"
#include "alloc-sweep.h"
#include "weightsd.h"

/* What one reader run left behind. */
typedef struct run {
    int r;
    fmt_err_t err;
    manifest_t *m;
} run_t;

/* Reads \p path with safetensors_read and, if that succeeds, manifest_validate. */
static run_t read_path(const char *path)
{
    run_t res = {0};
    source_t s;

    res.m = manifest_new();
    ASSERT(res.m);
    res.r = source_open(path, &s, &res.err);
    if (res.r < 0)
        return res;
    res.r = safetensors_read(&s, 7, res.m, &res.err);
    if (res.r == 0)
        res.r = manifest_validate(res.m, &res.err);
    source_close(&s);
    return res;
}

static run_t read_bytes(const void *data, size_t len)
{
    return read_path(st_put("t.safetensors", data, len));
}

static run_t read_hdr(const char *hdr, size_t hlen, size_t pad, size_t datalen)
{
    st_buf_t b = st_file(hdr, hlen, pad, datalen);
    run_t r = read_bytes(b.p, b.n);

    free(b.p);
    return r;
}

static void run_free(run_t *r)
{
    r->m = manifest_free(r->m);
}

/* The message must begin with "RULE:" so operators and tests can match the rule. */
static void expect_rule(const char *what, const run_t *r, int code, const char *rule)
{
    size_t n = strlen(rule);

    if (r->r >= 0)
        TEST_FAIL("%s: accepted, expected %s", what, rule);
    if (r->r != code || r->err.code != code)
        TEST_FAIL("%s: code %d/%d, expected %d (%s)", what, r->r, r->err.code, code, r->err.msg);
    if (strncmp(r->err.msg, rule, n) != 0 || r->err.msg[n] != ':')
        TEST_FAIL("%s: \"%s\", expected rule %s", what, r->err.msg, rule);
}

static void expect_ok(const char *what, const run_t *r)
{
    if (r->r != 0)
        TEST_FAIL("%s: rejected: %d %s", what, r->r, r->err.msg);
}

static bool has_warning(const manifest_t *m, const char *rule)
{
    for (size_t i = 0; i < m->nwarnings; i++)
        if (strncmp(m->warnings[i], rule, strlen(rule)) == 0)
            return true;
    return false;
}

static const mf_tensor_t *tensor(const manifest_t *m, const char *name)
{
    ssize_t i = manifest_find(m, name);

    if (i < 0)
        TEST_FAIL("no tensor '%s'", name);
    return &m->tensors[i];
}

static const char *meta(const manifest_t *m, const char *key)
{
    for (size_t i = 0; i < m->nmeta; i++)
        if (strcmp(m->meta[i].key, key) == 0)
            return m->meta[i].value;
    return NULL;
}

/*
 * §4.5, one row per line. hdr is the exact header; pad > 0 pads it with spaces to a multiple of
 * pad; data is the number of buffer bytes after it. rule NULL means accept with ntensors tensors.
 * Where §4.6 is stricter than the reference, the row says so.
 */
#define HDR(s) s, sizeof(s) - 1
#define T(name, dtype, shape, offs)                                                                \
    "\"" name "\":{\"dtype\":\"" dtype "\",\"shape\":" shape ",\"data_offsets\":" offs "}"

/* Several empty tensors at one offset, before and after a 2-byte one. */
/* clang-format off */
#define MULTI_EMPTY                                                                                \
    "{" T("e1", "F32", "[0]", "[0,0]") "," T("e2", "I64", "[0,3]", "[0,0]") ","                    \
        T("x", "U8", "[2]", "[0,2]") "," T("e3", "F16", "[0]", "[2,2]") ","                        \
        T("e4", "BF16", "[5,0]", "[2,2]") "}"
/* clang-format on */

static const struct st_case {
    const char *name;
    const char *hdr;
    size_t hlen;
    size_t pad;
    size_t data;
    const char *rule;
    size_t ntensors;
} cases[] = {
    {"ok_basic", HDR("{\"__metadata__\":{\"format\":\"pt\"}," T("w", "F32", "[2,2]", "[0,16]") "}"),
     8, 16, NULL, 1},
    {"ok_no_padding", HDR("{" T("w", "F32", "[2,2]", "[0,16]") "}"), 0, 16, NULL, 1},
    {"ok_scalar", HDR("{" T("s", "F32", "[]", "[0,4]") "}"), 8, 4, NULL, 1},
    {"ok_zero_size", HDR("{" T("e", "F32", "[2,0]", "[0,0]") "," T("b", "U8", "[1]", "[0,1]") "}"),
     8, 1, NULL, 2},
    {"ok_multi_empty_same_offset", HDR(MULTI_EMPTY), 8, 2, NULL, 5},
    /* The reference's [0, 2^64 - 1]: jansson refuses integers from 2^63 (§4.6, stricter). */
    {"ok_shape_leading_zero_dims (stricter)",
     HDR("{" T("z", "F32", "[0,18446744073709551615]", "[0,0]") "}"), 8, 0, "E_ST_JSON", 0},
    {"ok_shape_leading_zero_dims within 2^63",
     HDR("{" T("z", "F32", "[0,9223372036854775807]", "[0,0]") "}"), 8, 0, NULL, 1},
    {"ok_empty", HDR("{}"), 8, 0, NULL, 0},
    {"ok_metadata_only", HDR("{\"__metadata__\":{\"a\":\"b\"}}"), 8, 0, NULL, 0},
    {"ok_empty_metadata", HDR("{\"__metadata__\":{}}"), 8, 0, NULL, 0},
    {"ok_null_metadata", HDR("{\"__metadata__\":null}"), 8, 0, NULL, 0},
    {"ok_unsorted_keys",
     HDR("{" T("b", "F32", "[1]", "[4,8]") "," T("a", "F32", "[1]", "[0,4]") "}"), 8, 8, NULL, 2},
    {"ok_unknown_field",
     HDR("{\"w\":{\"dtype\":\"U8\",\"foo\":[1,{\"x\":null},-2.5e3],\"shape\":[2],"
         "\"data_offsets\":[0,2],\"bar\":\"baz\"}}"),
     8, 2, NULL, 1},
    {"ok_unicode_name", HDR("{" T("w\xc3\xa9ight_\xe5\x90\x8d", "U8", "[1]", "[0,1]") "}"), 8, 1,
     NULL, 1},
    {"ok_escaped_name", HDR("{" T("w\\u00e9\\\"\\\\\\n\\/", "U8", "[1]", "[0,1]") "}"), 8, 1, NULL,
     1},
    {"ok_surrogate_pair", HDR("{" T("\\ud83d\\ude00", "U8", "[1]", "[0,1]") "}"), 8, 1, NULL, 1},
    {"ok_leading_ws", HDR(" \t\r\n{" T("w", "U8", "[1]", "[0,1]") "}"), 0, 1, NULL, 1},
    {"ok_trailing_crlf_tab", HDR("{" T("w", "U8", "[1]", "[0,1]") "}\r\n\t  "), 0, 1, NULL, 1},
    {"ok_misaligned_offset",
     HDR("{" T("a", "U8", "[1]", "[0,1]") "," T("w", "F32", "[1]", "[1,5]") "}"), 8, 5, NULL, 2},
    /* §4.6: every duplicate key is refused, where the reference keeps the last. */
    {"dup_tensor_same (stricter)",
     HDR("{" T("w", "U8", "[1]", "[0,1]") "," T("w", "U8", "[1]", "[0,1]") "}"), 8, 1,
     "E_ST_DUP_KEY", 0},
    {"dup_tensor_diff", HDR("{" T("w", "U8", "[1]", "[0,1]") "," T("w", "U8", "[1]", "[1,2]") "}"),
     8, 2, "E_ST_DUP_KEY", 0},
    {"dup_metadata", HDR("{\"__metadata__\":{\"a\":\"b\"},\"__metadata__\":{\"a\":\"b\"}}"), 8, 0,
     "E_ST_DUP_KEY", 0},
    {"dup_metadata_inner (stricter)", HDR("{\"__metadata__\":{\"a\":\"b\",\"a\":\"c\"}}"), 8, 0,
     "E_ST_DUP_KEY", 0},
    {"dup_field_in_info",
     HDR("{\"w\":{\"dtype\":\"U8\",\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}"), 8, 1,
     "E_ST_DUP_KEY", 0},
    {"bad_n_zero", HDR(""), 0, 0, "E_ST_JSON", 0},
    {"bad_not_json", HDR("not json"), 0, 0, "E_ST_JSON", 0},
    {"bad_json_array", HDR("[]"), 8, 0, "E_ST_SCHEMA", 0},
    {"bad_top_level_string", HDR("\"{}\""), 8, 0, "E_ST_JSON", 0},
    {"bad_top_level_number", HDR("7"), 8, 0, "E_ST_JSON", 0},
    {"bad_bom", HDR("\xef\xbb\xbf{}"), 8, 0, "E_ST_JSON", 0},
    {"bad_nul_padding", HDR("{}\0\0\0\0\0\0"), 0, 0, "E_ST_JSON", 0},
    {"bad_trailing_garbage", HDR("{} x"), 8, 0, "E_ST_JSON", 0},
    {"bad_two_objects", HDR("{}{}"), 8, 0, "E_ST_JSON", 0},
    {"bad_non_utf8", HDR("{\"\xff\":1}"), 8, 0, "E_ST_UTF8", 0},
    {"bad_utf8_overlong", HDR("{\"\xc0\xaf\":1}"), 8, 0, "E_ST_UTF8", 0},
    {"bad_utf8_surrogate", HDR("{\"\xed\xa0\x80\":1}"), 8, 0, "E_ST_UTF8", 0},
    {"bad_utf8_past_10ffff", HDR("{\"\xf4\x90\x80\x80\":1}"), 8, 0, "E_ST_UTF8", 0},
    {"bad_utf8_cut", HDR("{}\xe5\x90"), 0, 0, "E_ST_UTF8", 0},
    {"bad_metadata_nonstring", HDR("{\"__metadata__\":{\"a\":1}}"), 8, 0, "E_ST_SCHEMA", 0},
    {"bad_metadata_nested", HDR("{\"__metadata__\":{\"a\":{\"b\":\"c\"}}}"), 8, 0, "E_ST_SCHEMA",
     0},
    {"bad_metadata_array", HDR("{\"__metadata__\":[\"a\"]}"), 8, 0, "E_ST_SCHEMA", 0},
    {"bad_reserved_name", HDR("{" T("__metadata__", "F32", "[1]", "[0,4]") "}"), 8, 4,
     "E_ST_SCHEMA", 0},
    {"bad_dtype_unknown", HDR("{" T("w", "F31", "[1]", "[0,4]") "}"), 8, 4, "E_ST_DTYPE", 0},
    {"bad_dtype_lowercase", HDR("{" T("w", "f32", "[1]", "[0,4]") "}"), 8, 4, "E_ST_DTYPE", 0},
    {"bad_dtype_c128", HDR("{" T("w", "C128", "[1]", "[0,16]") "}"), 8, 16, "E_ST_DTYPE", 0},
    {"bad_dtype_not_string", HDR("{\"w\":{\"dtype\":5,\"shape\":[1],\"data_offsets\":[0,4]}}"), 8,
     4, "E_ST_SCHEMA", 0},
    {"bad_shape_negative", HDR("{" T("w", "F32", "[-1]", "[0,4]") "}"), 8, 4, "E_ST_SCHEMA", 0},
    {"bad_shape_negative_zero", HDR("{" T("w", "F32", "[-0]", "[0,0]") "}"), 8, 0, "E_ST_JSON", 0},
    {"bad_shape_float", HDR("{" T("w", "F32", "[1.0]", "[0,4]") "}"), 8, 4, "E_ST_SCHEMA", 0},
    {"bad_exponent_number", HDR("{" T("w", "F32", "[1e0]", "[0,4]") "}"), 8, 4, "E_ST_SCHEMA", 0},
    {"bad_number_leading_zero", HDR("{" T("w", "F32", "[01]", "[0,4]") "}"), 8, 4, "E_ST_JSON", 0},
    {"bad_shape_not_array", HDR("{" T("w", "F32", "1", "[0,4]") "}"), 8, 4, "E_ST_SCHEMA", 0},
    {"bad_shape_too_deep", HDR("{" T("w", "U8", "[1,1,1,1,1,1,1,1,1]", "[0,1]") "}"), 8, 1,
     "E_TENSOR_GEOMETRY", 0},
    {"ok_shape_max_depth", HDR("{" T("w", "U8", "[1,1,1,1,1,1,1,2]", "[0,2]") "}"), 8, 2, NULL, 1},
    {"bad_offsets_three", HDR("{" T("w", "F32", "[1]", "[0,4,8]") "}"), 8, 4, "E_ST_SCHEMA", 0},
    {"bad_offsets_one", HDR("{" T("w", "F32", "[1]", "[0]") "}"), 8, 4, "E_ST_SCHEMA", 0},
    {"bad_offsets_strings", HDR("{" T("w", "F32", "[1]", "[\"0\",\"4\"]") "}"), 8, 4, "E_ST_SCHEMA",
     0},
    {"bad_offsets_negative", HDR("{" T("w", "F32", "[1]", "[-4,0]") "}"), 8, 4, "E_ST_SCHEMA", 0},
    {"bad_offset_u64_overflow", HDR("{" T("w", "F32", "[1]", "[0,18446744073709551616]") "}"), 8, 4,
     "E_ST_JSON", 0},
    {"bad_missing_dtype", HDR("{\"w\":{\"shape\":[1],\"data_offsets\":[0,4]}}"), 8, 4,
     "E_ST_SCHEMA", 0},
    {"bad_missing_shape", HDR("{\"w\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}"), 8, 4,
     "E_ST_SCHEMA", 0},
    {"bad_missing_offsets", HDR("{\"w\":{\"dtype\":\"F32\",\"shape\":[1]}}"), 8, 4, "E_ST_SCHEMA",
     0},
    {"bad_tensor_not_object", HDR("{\"w\":5}"), 8, 0, "E_ST_SCHEMA", 0},
    {"bad_lone_surrogate", HDR("{" T("\\ud800", "U8", "[1]", "[0,1]") "}"), 8, 1, "E_ST_JSON", 0},
    {"bad_raw_control_char", HDR("{" T("a\tb", "U8", "[1]", "[0,1]") "}"), 8, 1, "E_ST_JSON", 0},
    /* §4.6 / jansson: an escaped NUL in a name is refused (the reference accepts it). */
    {"bad_nul_in_name (stricter)", HDR("{" T("a\\u0000b", "U8", "[1]", "[0,1]") "}"), 8, 1,
     "E_ST_JSON", 0},
    {"bad_end_before_begin",
     HDR("{" T("a", "U8", "[4]", "[0,4]") "," T("b", "F32", "[1]", "[4,0]") "}"), 8, 4,
     "E_ST_OFFSETS", 0},
    {"bad_not_starting_at_zero", HDR("{" T("w", "F32", "[1]", "[4,8]") "}"), 8, 8, "E_ST_OFFSETS",
     0},
    {"bad_gap", HDR("{" T("a", "F32", "[1]", "[0,4]") "," T("b", "F32", "[1]", "[8,12]") "}"), 8,
     12, "E_ST_OFFSETS", 0},
    {"bad_overlap", HDR("{" T("a", "F32", "[2]", "[0,8]") "," T("b", "F32", "[2]", "[4,12]") "}"),
     8, 12, "E_ST_OFFSETS", 0},
    {"bad_aliased", HDR("{" T("a", "F32", "[1]", "[0,4]") "," T("b", "F32", "[1]", "[0,4]") "}"), 8,
     4, "E_ST_OFFSETS", 0},
    {"bad_size_mismatch", HDR("{" T("w", "F32", "[2]", "[0,4]") "}"), 8, 4, "E_ST_SIZE_MISMATCH",
     0},
    {"bad_size_mismatch_empty", HDR("{" T("w", "F32", "[0]", "[0,4]") "}"), 8, 4,
     "E_ST_SIZE_MISMATCH", 0},
    {"bad_trailing_bytes", HDR("{" T("w", "F32", "[2,2]", "[0,16]") "}"), 8, 17,
     "E_ST_INCOMPLETE_BUFFER", 0},
    {"bad_truncated_data", HDR("{" T("w", "F32", "[2,2]", "[0,16]") "}"), 8, 15,
     "E_ST_INCOMPLETE_BUFFER", 0},
    {"bad_offsets_past_eof",
     HDR("{" T("w", "U8", "[1152921504606846976]", "[0,1152921504606846976]") "}"), 8, 4,
     "E_ST_INCOMPLETE_BUFFER", 0},
    /* The reference's [2, 2^64 - 2] is refused by jansson; the overflow itself within 2^63: */
    {"bad_shape_overflow (u64 literal)",
     HDR("{" T("w", "U8", "[2,18446744073709551614]", "[0,0]") "}"), 8, 0, "E_ST_JSON", 0},
    {"bad_shape_overflow", HDR("{" T("w", "U8", "[4,4611686018427387904]", "[0,0]") "}"), 8, 0,
     "E_ST_OVERFLOW", 0},
    {"bad_shape_overflow_before_zero",
     HDR("{" T("w", "U8", "[4,4611686018427387904,0]", "[0,0]") "}"), 8, 0, "E_ST_OVERFLOW", 0},
    {"bad_bits_overflow", HDR("{" T("w", "F32", "[2,9223372036854775807]", "[0,0]") "}"), 8, 0,
     "E_ST_OVERFLOW", 0},
    {"bad_f4_odd", HDR("{" T("w", "F4", "[3]", "[0,2]") "}"), 8, 2, "E_ST_SUBBYTE", 0},
    {"bad_f6_odd", HDR("{" T("w", "F6_E2M3", "[3]", "[0,3]") "}"), 8, 3, "E_ST_SUBBYTE", 0},
    {"ok_f4_even", HDR("{" T("w", "F4", "[2,3]", "[0,3]") "}"), 8, 3, NULL, 1},
    {"ok_zero_dims_huge_strides",
     HDR("{" T("z", "U8", "[0,9223372036854775807,9223372036854775807]", "[0,0]") "}"), 8, 0, NULL,
     1},
};

/*
 * The JSON scanner (jscan.c) beyond §4.5: escapes that decode to the field and dtype names,
 * extra fields of every shape that must be skipped whole, and the limits it has where jansson
 * had others or none. X(extra) is one tensor with an ignored field "x": extra.
 */
#define X(extra)                                                                                   \
    "{\"w\":{\"x\":" extra ",\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}"
#define A10 "[[[[[[[[[["
#define Z10 "]]]]]]]]]]"

static const struct st_case jscan_cases[] = {
    {"ok_escaped_field_names",
     HDR("{\"w\":{\"\\u0064type\":\"F\\u0033\\u0032\",\"sh\\u0061pe\":[1],"
         "\"data\\u005foffsets\":[0,4]}}"), 8, 4, NULL, 1},
    {"ok_extra_nested", HDR(X("{\"a\":[\"}\",\"\\\"]\",{\"b\":[]},-1.5e3,true,null],\"c\":{}}")), 8,
     1, NULL, 1},
    {"ok_extra_scalars", HDR("{\"w\":{\"x\":false,\"y\":-9223372036854775808,\"z\":1e-999,"
                             "\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}"), 8, 1, NULL, 1},
    /* 128 levels (serde's limit): the top object, the tensor, then 126 arrays. */
    {"ok_depth_128", HDR(X(A10 A10 A10 A10 A10 A10 A10 A10 A10 A10 A10 A10 "[[[[[["
                           Z10 Z10 Z10 Z10 Z10 Z10 Z10 Z10 Z10 Z10 Z10 Z10 "]]]]]]")), 8, 1,
     NULL, 1},
    {"bad_depth_129 (stricter than jansson)",
     HDR(X(A10 A10 A10 A10 A10 A10 A10 A10 A10 A10 A10 A10 "[[[[[[["
           Z10 Z10 Z10 Z10 Z10 Z10 Z10 Z10 Z10 Z10 Z10 Z10 "]]]]]]]")), 8, 1, "E_ST_JSON", 0},
    {"bad_real_overflow", HDR(X("1e999")), 8, 1, "E_ST_JSON", 0},
    {"bad_integer_overflow", HDR(X("9223372036854775808")), 8, 1, "E_ST_JSON", 0},
    {"bad_negative_overflow", HDR(X("-9223372036854775809")), 8, 1, "E_ST_JSON", 0},
    {"bad_negative_zero_extra", HDR(X("-0")), 8, 1, "E_ST_JSON", 0},
    {"ok_negative_zero_real_extra", HDR(X("-0.0")), 8, 1, NULL, 1},
    /* jansson skipped a NUL byte after a number; JSON and the reference do not. */
    {"bad_nul_after_number (stricter than jansson)",
     HDR("{\"w\":{\"dtype\":\"U8\",\"shape\":[1\0],\"data_offsets\":[0,1]}}"), 8, 1, "E_ST_JSON", 0},
    {"bad_nul_in_value", HDR(X("\"a\\u0000\"")), 8, 1, "E_ST_JSON", 0},
    {"bad_escape", HDR(X("\"\\x\"")), 8, 1, "E_ST_JSON", 0},
    {"bad_short_unicode_escape", HDR(X("\"\\u12\"")), 8, 1, "E_ST_JSON", 0},
    {"bad_lone_low_surrogate", HDR(X("\"\\udc00\"")), 8, 1, "E_ST_JSON", 0},
    {"bad_high_surrogate_then_bmp", HDR(X("\"\\ud800\\u0041\"")), 8, 1, "E_ST_JSON", 0},
    {"bad_unterminated_string", HDR("{\"w"), 8, 0, "E_ST_JSON", 0},
    {"bad_trailing_comma", HDR(X("[1,]")), 8, 1, "E_ST_JSON", 0},
    {"bad_missing_colon", HDR("{\"w\" {}}"), 8, 0, "E_ST_JSON", 0},
    {"bad_literal", HDR(X("nul")), 8, 1, "E_ST_JSON", 0},
    {"bad_fraction_without_digit", HDR(X("1.")), 8, 1, "E_ST_JSON", 0},
    {"bad_exponent_without_digit", HDR(X("1e+")), 8, 1, "E_ST_JSON", 0},
    /* Repeats found through escapes, inside ignored fields, and in objects past 16 keys. */
    {"dup_escaped_name", HDR("{" T("w", "U8", "[1]", "[0,1]") "," T("\\u0077", "U8", "[1]", "[1,2]") "}"),
     8, 2, "E_ST_DUP_KEY", 0},
    {"dup_in_extra", HDR(X("{\"a\":1,\"b\":{\"c\":1,\"c\":2}}")), 8, 1, "E_ST_DUP_KEY", 0},
    {"dup_after_16_keys",
     HDR(X("{\"a\":1,\"b\":1,\"c\":1,\"d\":1,\"e\":1,\"f\":1,\"g\":1,\"h\":1,\"i\":1,\"j\":1,\"k\":1,"
           "\"l\":1,\"m\":1,\"n\":1,\"o\":1,\"p\":1,\"q\":1,\"r\":1,\"\\u0064\":1}")), 8, 1,
     "E_ST_DUP_KEY", 0},
    {"ok_17_keys", HDR(X("{\"a\":1,\"b\":1,\"c\":1,\"d\":1,\"e\":1,\"f\":1,\"g\":1,\"h\":1,\"i\":1,"
                         "\"j\":1,\"k\":1,\"l\":1,\"m\":1,\"n\":1,\"o\":1,\"p\":1,\"q\":1}")), 8, 1,
     NULL, 1},
    {"bad_dtype_with_escaped_nul_tail", HDR("{" T("w", "F32\\u0000", "[1]", "[0,4]") "}"), 8, 4,
     "E_ST_JSON", 0},
    {"bad_dtype_too_long", HDR("{" T("w", "F32F32F32F32F32F32F32F32F32F32F32F32F32F32F32F32F32F32F32F32F32F32",
                                     "[1]", "[0,4]") "}"), 8, 4, "E_ST_DTYPE", 0},
    {"bad_shape_element_object", HDR("{" T("w", "U8", "[{}]", "[0,1]") "}"), 8, 1, "E_ST_SCHEMA", 0},
    {"bad_offsets_not_array", HDR("{" T("w", "U8", "[1]", "{}") "}"), 8, 1, "E_ST_SCHEMA", 0},
    {"bad_offsets_real", HDR("{" T("w", "U8", "[1]", "[0,1.0]") "}"), 8, 1, "E_ST_SCHEMA", 0},
};

/* Each row read as a file: refused with its rule, or accepted with its tensor count. */
static void run_cases(const struct st_case *rows, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        const struct st_case *c = &rows[i];
        run_t r = read_hdr(c->hdr, c->hlen, c->pad, c->data);

        if (c->rule) {
            expect_rule(c->name, &r, WSD_EBADCKPT, c->rule);
        } else {
            expect_ok(c->name, &r);
            if (r.m->ntensors != c->ntensors)
                TEST_FAIL("%s: %zu tensors, expected %zu", c->name, r.m->ntensors, c->ntensors);
            ASSERT_EQ(r.m->nstorages, c->ntensors);
        }
        run_free(&r);
    }
}

TEST(matrix_4_5)
{
    run_cases(cases, sizeof(cases) / sizeof(cases[0]));
}

TEST(jscan_matrix)
{
    run_cases(jscan_cases, sizeof(jscan_cases) / sizeof(jscan_cases[0]));
}

/* A number token of 4097 bytes is refused (jscan's bound for its strtod copy); 4096 is fine. */
TEST(jscan_number_length)
{
    for (size_t len = 4096; len <= 4097; len++) {
        size_t n = 0;
        char *h = malloc(len + 128);
        run_t r;

        ASSERT(h);
        n += (size_t)sprintf(h, "{\"w\":{\"x\":1.");
        memset(h + n, '5', len - 2);
        n += len - 2;
        n += (size_t)sprintf(h + n, ",\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}");
        r = read_hdr(h, n, 8, 1);
        if (len == 4096)
            expect_ok("4096-byte number", &r);
        else
            expect_rule("4097-byte number", &r, WSD_EBADCKPT, "E_ST_JSON");
        run_free(&r);
        free(h);
    }
}

/* Metadata values come out as JSON string literals, escapes decoded and re-encoded. */
TEST(metadata_escapes)
{
    static const char hdr[] = "{\"__metadata__\":{\"k\\u00e9\":\"a\\u00e9\\n\\ud83d\\ude00\\/\"},"
                              T("w", "U8", "[1]", "[0,1]") "}";
    run_t r = read_hdr(hdr, sizeof(hdr) - 1, 8, 1);

    expect_ok("metadata escapes", &r);
    ASSERT_EQ(r.m->nmeta, 1);
    ASSERT_STR_EQ(r.m->meta[0].key, "k\xc3\xa9");
    ASSERT_STR_EQ(r.m->meta[0].value, "\"a\xc3\xa9\\n\xf0\x9f\x98\x80/\"");
    run_free(&r);
}

TEST(ok_basic_contents)
{
    /* clang-format off */
    static const char hdr[] =
        "{\"__metadata__\":{\"format\":\"pt\",\"q\":\"a\\\"b\"},"
        T("w", "F32", "[2,2]", "[0,16]") "}";
    /* clang-format on */
    run_t r = read_hdr(hdr, sizeof(hdr) - 1, 8, 16);
    uint64_t hlen = (sizeof(hdr) - 1 + 7) / 8 * 8;
    const mf_tensor_t *t;
    const mf_storage_t *s;

    expect_ok("ok_basic", &r);
    t = tensor(r.m, "w");
    ASSERT_EQ(t->dtype, WSD_DTYPE_F32);
    ASSERT_EQ(t->ndim, 2);
    ASSERT_EQ(t->shape[0], 2);
    ASSERT_EQ(t->shape[1], 2);
    ASSERT_EQ(t->stride[0], 2);
    ASSERT_EQ(t->stride[1], 1);
    ASSERT_EQ(t->storage_offset, 0);
    ASSERT_EQ(t->nbytes, 16);
    s = &r.m->storages[t->storage];
    ASSERT_STR_EQ(s->key, "w");
    ASSERT_EQ(s->source, 7);
    ASSERT_UINT_EQ(s->src_offset, 8 + hlen);
    ASSERT_EQ(s->nbytes, 16);
    ASSERT_EQ(s->dtype, WSD_DTYPE_F32);
    ASSERT(!s->has_crc);
    ASSERT_EQ(r.m->nmeta, 2);
    ASSERT_STR_EQ(meta(r.m, "format"), "\"pt\"");
    ASSERT_STR_EQ(meta(r.m, "q"), "\"a\\\"b\"");
    ASSERT_EQ(r.m->nwarnings, 0);
    run_free(&r);
}

TEST(offset_order_and_names)
{
    /* clang-format off */
    static const char hdr[] =
        "{" T("b", "F32", "[1]", "[4,8]") "," T("a", "F32", "[1]", "[0,4]") ","
        T("w\\u00e9\\\"\\\\\\n\\/", "U8", "[0]", "[8,8]") ","
        T("\\ud83d\\ude00", "U8", "[0]", "[8,8]") "}";
    /* clang-format on */
    run_t r = read_hdr(hdr, sizeof(hdr) - 1, 8, 8);

    expect_ok("unsorted", &r);
    ASSERT_EQ(r.m->ntensors, 4);
    /* Manifest order is offset order (the reference's offset_keys), ties by name. */
    ASSERT_STR_EQ(r.m->tensors[0].name, "a");
    ASSERT_STR_EQ(r.m->tensors[1].name, "b");
    ASSERT_STR_EQ(r.m->tensors[2].name, "w\xc3\xa9\"\\\n/");
    ASSERT_STR_EQ(r.m->tensors[3].name, "\xf0\x9f\x98\x80");
    ASSERT_EQ(r.m->storages[r.m->tensors[1].storage].src_offset -
                  r.m->storages[r.m->tensors[0].storage].src_offset,
              4);
    run_free(&r);
}

TEST(empty_tensors_strides)
{
    /* clang-format off */
    static const char hdr[] =
        "{" T("e", "F32", "[2,0,3]", "[0,0]") ","
        T("z", "U8", "[0,9223372036854775807,9223372036854775807]", "[0,0]") ","
        T("s", "F64", "[]", "[0,8]") "}";
    /* clang-format on */
    run_t r = read_hdr(hdr, sizeof(hdr) - 1, 8, 8);
    const mf_tensor_t *t;

    expect_ok("empty", &r);
    /* torch's rule: a size of 0 counts as 1 when computing strides. */
    t = tensor(r.m, "e");
    ASSERT_EQ(t->stride[0], 3);
    ASSERT_EQ(t->stride[1], 3);
    ASSERT_EQ(t->stride[2], 1);
    ASSERT_EQ(t->nbytes, 0);
    /* Would overflow: all ones, still a valid description of no elements. */
    t = tensor(r.m, "z");
    for (unsigned i = 0; i < 3; i++)
        ASSERT_EQ(t->stride[i], 1);
    ASSERT_EQ(t->shape[1], INT64_MAX);
    t = tensor(r.m, "s");
    ASSERT_EQ(t->ndim, 0);
    ASSERT_EQ(t->nbytes, 8);
    run_free(&r);
}

TEST(misaligned_warns)
{
    /* clang-format off */
    static const char hdr[] =
        "{" T("a", "U8", "[1]", "[0,1]") "," T("w", "F32", "[1]", "[1,5]") ","
        T("x", "U8", "[0]", "[5,5]") "}";
    /* clang-format on */
    run_t r = read_hdr(hdr, sizeof(hdr) - 1, 8, 5);

    expect_ok("misaligned", &r);
    ASSERT(has_warning(r.m, "W_UNALIGNED"));
    ASSERT_EQ(r.m->nwarnings, 1);
    ASSERT_STR_CONTAINS(r.m->warnings[0], "tensor 'w'");
    ASSERT_STR_CONTAINS(r.m->warnings[0], "1 tensor unaligned");
    run_free(&r);
}

TEST(all_dtypes)
{
    /* Every safetensors dtype (§4.3): F4 [2] is 1 byte and F6 [4] is 3 bytes. */
    static const char *names[] = {
        "BOOL",        "U8",          "I8",  "I16",     "U16",     "F16",     "BF16",    "I32",
        "U32",         "F32",         "F64", "I64",     "U64",     "F8_E5M2", "F8_E4M3", "F8_E8M0",
        "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F4",  "F6_E2M3", "F6_E3M2", "C64"};
    size_t n = sizeof(names) / sizeof(names[0]);
    st_buf_t h = {0};
    uint64_t off = 0;
    char tmp[256];
    run_t r;

    ASSERT_EQ(n, 22);
    st_buf_add(&h, "{", 1);
    for (size_t i = 0; i < n; i++) {
        int d = wsd_dtype_from_name(names[i]);
        unsigned bits = wsd_dtype_bits(d);
        unsigned elems = bits == 4 ? 2 : bits == 6 ? 4 : 1;
        uint64_t len = elems * bits / 8;
        int k = snprintf(tmp, sizeof(tmp),
                         "%s\"t_%s\":{\"dtype\":\"%s\",\"shape\":[%u],"
                         "\"data_offsets\":[%llu,%llu]}",
                         i ? "," : "", names[i], names[i], elems, (unsigned long long)off,
                         (unsigned long long)(off + len));

        ASSERT(d >= 0);
        st_buf_add(&h, tmp, (size_t)k);
        off += len;
    }
    st_buf_add(&h, "}", 1);
    r = read_hdr((const char *)h.p, h.n, 8, off);
    expect_ok("all dtypes", &r);
    ASSERT_EQ(r.m->ntensors, 22);
    for (size_t i = 0; i < n; i++) {
        char name[32];
        const mf_tensor_t *t;

        snprintf(name, sizeof(name), "t_%s", names[i]);
        t = tensor(r.m, name);
        ASSERT_STR_EQ(wsd_dtype_name(t->dtype), names[i]);
        ASSERT_EQ(r.m->storages[t->storage].dtype, t->dtype);
    }
    ASSERT_EQ(tensor(r.m, "t_F4")->nbytes, 1);
    ASSERT_EQ(tensor(r.m, "t_F6_E3M2")->nbytes, 3);
    ASSERT_EQ(tensor(r.m, "t_C64")->nbytes, 8);
    free(h.p);
    run_free(&r);
}

/* Rows of §4.5 that need hand-made length prefixes. */
TEST(length_prefix)
{
    static const uint8_t seven[7] = {0};
    uint8_t b[32];
    run_t r;

    r = read_bytes(seven, sizeof(seven));
    expect_rule("bad_too_small", &r, WSD_EBADCKPT, "E_ST_HEADER_TOO_SMALL");
    run_free(&r);
    r = read_bytes(seven, 0);
    expect_rule("empty file", &r, WSD_EBADCKPT, "E_ST_HEADER_TOO_SMALL");
    run_free(&r);

    /* N = 100 000 001: one past the reference's cap. */
    memset(b, ' ', sizeof(b));
    memcpy(b, "\x01\xe1\xf5\x05\0\0\0\0", 8);
    r = read_bytes(b, sizeof(b));
    expect_rule("bad_header_too_large", &r, WSD_EBADCKPT, "E_ST_HEADER_TOO_LARGE");
    run_free(&r);
    /* Exactly 100 000 000 passes step 2 and fails step 3 on this small file. */
    memcpy(b, "\x00\xe1\xf5\x05\0\0\0\0", 8);
    r = read_bytes(b, sizeof(b));
    expect_rule("N at the cap", &r, WSD_EBADCKPT, "E_ST_HEADER_LENGTH");
    run_free(&r);
    memset(b, 0xff, 8);
    r = read_bytes(b, sizeof(b));
    expect_rule("N = 2^64 - 1", &r, WSD_EBADCKPT, "E_ST_HEADER_TOO_LARGE");
    run_free(&r);
    /* N = 25 over a 24-byte header: one byte past EOF. */
    memcpy(b, "\x19\0\0\0\0\0\0\0{}", 10);
    r = read_bytes(b, sizeof(b));
    expect_rule("bad_header_len_past_eof", &r, WSD_EBADCKPT, "E_ST_HEADER_LENGTH");
    ASSERT_STR_CONTAINS(r.err.msg, "header of 25 bytes");
    run_free(&r);
}

TEST(error_messages_name_things)
{
    run_t r;

    r = read_hdr(HDR("{" T("w", "F32", "[1]", "[8,12]") "}"), 8, 12);
    ASSERT_STR_EQ(r.err.msg, "E_ST_OFFSETS: tensor 'w' begins at 8, expected 0");
    run_free(&r);
    r = read_hdr(HDR("{" T("a", "U8", "[4]", "[0,4]") "," T("b", "F32", "[1]", "[4,0]") "}"), 8, 4);
    ASSERT_STR_EQ(r.err.msg, "E_ST_OFFSETS: tensor 'b' ends at 0, before it begins at 4");
    run_free(&r);
    r = read_hdr(HDR("{" T("w", "F32", "[2]", "[0,4]") "}"), 8, 4);
    ASSERT_STR_CONTAINS(r.err.msg, "tensor 'w'");
    ASSERT_STR_CONTAINS(r.err.msg, "take 8 bytes");
    run_free(&r);
    r = read_hdr(HDR("{\"a\":1,\"a\":1}"), 8, 0);
    ASSERT_STR_CONTAINS(r.err.msg, "file offset");
    run_free(&r);
    r = read_hdr(HDR("{\"\xff\":1}"), 8, 0);
    ASSERT_STR_CONTAINS(r.err.msg, "byte 0xff at file offset 10");
    run_free(&r);
    r = read_hdr(HDR("{" T("w", "bogus\\n", "[1]", "[0,4]") "}"), 8, 4);
    ASSERT_STR_CONTAINS(r.err.msg, "unknown dtype \"bogus?\"");
    run_free(&r);
    r = read_hdr(HDR("{" T("w", "F32", "[2,2]", "[0,16]") "}"), 8, 17);
    ASSERT_STR_CONTAINS(r.err.msg, "trailing bytes");
    run_free(&r);
    r = read_hdr(HDR("{" T("w", "F32", "[2,2]", "[0,16]") "}"), 8, 15);
    ASSERT_STR_CONTAINS(r.err.msg, "truncated");
    run_free(&r);
}

TEST(long_and_hostile_names)
{
    size_t n = MANIFEST_NAME_MAX + 1;
    char *name = malloc(n + 1);
    st_buf_t h = {0};
    run_t r;

    ASSERT(name);
    memset(name, 'x', n);
    name[n] = '\0';
    st_buf_add(&h, "{\"", 2);
    st_buf_add(&h, name, n);
    st_buf_str(&h, "\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[8,9]}}");
    r = read_hdr((const char *)h.p, h.n, 8, 9);
    expect_rule("long name", &r, WSD_EBADCKPT, "E_ST_SCHEMA");
    run_free(&r);
    /* One byte shorter is a legal name; the error message stays bounded and keeps its rule. */
    h.n = 0;
    st_buf_add(&h, "{\"", 2);
    st_buf_add(&h, name, n - 1);
    st_buf_str(&h, "\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[8,9]}}");
    r = read_hdr((const char *)h.p, h.n, 8, 9);
    expect_rule("long name offsets", &r, WSD_EBADCKPT, "E_ST_OFFSETS");
    ASSERT_STR_CONTAINS(r.err.msg, "...' begins at 8, expected 0");
    run_free(&r);
    /* Control characters never reach the message. */
    r = read_hdr(HDR("{" T("a\\nE_FAKE: b", "U8", "[1]", "[1,2]") "}"), 8, 2);
    ASSERT_STR_CONTAINS(r.err.msg, "tensor 'a?E_FAKE: b'");
    ASSERT(!strchr(r.err.msg, '\n'));
    run_free(&r);
    free(name);
    free(h.p);
}

TEST(empty_name_caught_by_validate)
{
    run_t r = read_hdr(HDR("{" T("", "U8", "[1]", "[0,1]") "}"), 8, 1);

    expect_rule("empty name", &r, WSD_EBADCKPT, "E_TENSOR_NAME");
    run_free(&r);
}

TEST(json_depth_bomb)
{
    /* Nesting far past jansson's depth limit inside an ignored field: an error, not a crash. */
    size_t depth = 100000;
    st_buf_t h = {0};
    run_t r;

    st_buf_str(&h, "{\"w\":{\"x\":");
    st_buf_fill(&h, '[', depth);
    st_buf_fill(&h, ']', depth);
    st_buf_str(&h, ",\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]}}");
    r = read_hdr((const char *)h.p, h.n, 8, 0);
    expect_rule("depth", &r, WSD_EBADCKPT, "E_ST_JSON");
    run_free(&r);
    free(h.p);
}

TEST(negative_zero_only_outside_strings)
{
    /* clang-format off */
    static const char hdr[] =
        "{\"__metadata__\":{\"-0\":\"-0\",\"a\\\"-0\":\"\\\\\"},"
        T("w-0", "U8", "[1]", "[0,1]") "}";
    /* clang-format on */
    run_t r = read_hdr(hdr, sizeof(hdr) - 1, 8, 1);

    expect_ok("-0 in strings", &r);
    ASSERT_STR_EQ(meta(r.m, "-0"), "\"-0\"");
    run_free(&r);
    r = read_hdr(HDR("{" T("w", "U8", "[1]", "[-0,1]") "}"), 8, 1);
    expect_rule("-0 offset", &r, WSD_EBADCKPT, "E_ST_JSON");
    run_free(&r);
    /* -0.5 and -01 are other tokens: a real (schema error) and a syntax error. */
    r = read_hdr(HDR("{\"w\":{\"x\":-0.5,\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}"),
                 8, 1);
    expect_ok("-0.5 in an ignored field", &r);
    run_free(&r);
}

/* §4.8: the reference test-suite's vectors, byte for byte. */
TEST(vector_1_attn)
{
    static const char hdr[] =
        "{\"attn.0\":{\"dtype\":\"F32\",\"shape\":[1,2,3],\"data_offsets\":[0,24]}}";
    static const float vals[6] = {0, 1, 2, 3, 4, 5};
    static const uint8_t data[24] = {0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x80, 0x3f,
                                     0x00, 0x00, 0x00, 0x40, 0x00, 0x00, 0x40, 0x40,
                                     0x00, 0x00, 0x80, 0x40, 0x00, 0x00, 0xa0, 0x40};
    st_buf_t f = {0};
    const mf_tensor_t *t;
    const mf_storage_t *s;
    uint8_t got[24];
    run_t r;
    int fd;

    ASSERT_EQ(sizeof(hdr) - 1, 64);
    ASSERT_EQ(memcmp(vals, data, sizeof(data)), 0); /* little-endian host, as weightsd requires */
    st_buf_add(&f, "\x40\0\0\0\0\0\0\0", 8);
    st_buf_add(&f, hdr, 64);
    st_buf_add(&f, data, sizeof(data));
    ASSERT_EQ(f.n, 96);
    r = read_bytes(f.p, f.n);
    expect_ok("vector 1", &r);
    ASSERT_EQ(r.m->ntensors, 1);
    t = tensor(r.m, "attn.0");
    ASSERT_EQ(t->dtype, WSD_DTYPE_F32);
    ASSERT_EQ(t->ndim, 3);
    ASSERT_EQ(t->shape[0], 1);
    ASSERT_EQ(t->shape[1], 2);
    ASSERT_EQ(t->shape[2], 3);
    ASSERT_EQ(t->stride[0], 6);
    ASSERT_EQ(t->stride[1], 3);
    ASSERT_EQ(t->stride[2], 1);
    s = &r.m->storages[t->storage];
    ASSERT_EQ(s->src_offset, 72);
    ASSERT_EQ(s->nbytes, 24);
    fd = open(st_path("t.safetensors"), O_RDONLY | O_CLOEXEC);
    ASSERT(fd >= 0);
    ASSERT_EQ(pread(fd, got, sizeof(got), (off_t)s->src_offset), 24);
    ASSERT_EQ(memcmp(got, data, sizeof(got)), 0);
    close(fd);
    ASSERT_EQ(r.m->nwarnings, 0);
    run_free(&r);
    free(f.p);
}

TEST(vector_2_3_empty_and_metadata_only)
{
    static const uint8_t empty[16] = "\x08\0\0\0\0\0\0\0{}      ";
    st_buf_t f = {0};
    run_t r = read_bytes(empty, sizeof(empty));

    expect_ok("vector 2", &r);
    ASSERT_EQ(r.m->ntensors, 0);
    ASSERT_EQ(r.m->nmeta, 0);
    run_free(&r);

    st_buf_add(&f, "\x28\0\0\0\0\0\0\0{\"__metadata__\":{\"framework\":\"pt\"}}     ", 48);
    r = read_bytes(f.p, f.n);
    expect_ok("vector 3", &r);
    ASSERT_EQ(r.m->ntensors, 0);
    ASSERT_EQ(r.m->nmeta, 1);
    ASSERT_STR_EQ(r.m->meta[0].key, "framework");
    ASSERT_STR_EQ(r.m->meta[0].value, "\"pt\"");
    run_free(&r);
    free(f.p);
}

TEST(vector_4_polyglot_and_truncation)
{
    static const char hdr[] =
        "{\"test\":{\"dtype\":\"I32\",\"shape\":[2,2],\"data_offsets\":[0,16]}}";
    st_buf_t f = st_file(hdr, sizeof(hdr) - 1, 0, 0);
    size_t base;
    run_t r;

    st_buf_fill(&f, 0, 16);
    base = f.n;
    r = read_bytes(f.p, f.n);
    expect_ok("vector 4", &r);
    ASSERT_EQ(tensor(r.m, "test")->dtype, WSD_DTYPE_I32);
    run_free(&r);

    st_buf_add(&f, "extra_bogus_data_for_polyglot_file", 34);
    r = read_bytes(f.p, f.n);
    expect_rule("polyglot", &r, WSD_EBADCKPT, "E_ST_INCOMPLETE_BUFFER");
    run_free(&r);

    r = read_bytes(f.p, base - 2);
    expect_rule("dropped 2 bytes", &r, WSD_EBADCKPT, "E_ST_INCOMPLETE_BUFFER");
    run_free(&r);

    f.p[6] = 0xff;
    f.p[7] = 0xff;
    r = read_bytes(f.p, base);
    expect_rule("top bytes ff", &r, WSD_EBADCKPT, "E_ST_HEADER_TOO_LARGE");
    run_free(&r);
    free(f.p);
}

TEST(vector_5_whitespace)
{
    static const uint8_t a[14] = "\x06\0\0\0\0\0\0\0{}\r \t\n";
    static const uint8_t b[14] = "\x06\0\0\0\0\0\0\0\t\n{}\r ";
    run_t r = read_bytes(a, sizeof(a));

    expect_ok("vector 5a", &r);
    ASSERT_EQ(r.m->ntensors, 0);
    run_free(&r);
    r = read_bytes(b, sizeof(b));
    expect_ok("vector 5b", &r);
    ASSERT_EQ(r.m->ntensors, 0);
    run_free(&r);
}

TEST(vector_6_empty_shape)
{
    static const char hdr[] =
        "{\"test\":{\"dtype\":\"I32\",\"shape\":[2,0],\"data_offsets\":[0,0]}}";
    run_t r = read_hdr(hdr, sizeof(hdr) - 1, 0, 0);

    expect_ok("vector 6", &r);
    ASSERT_EQ(tensor(r.m, "test")->nbytes, 0);
    ASSERT_EQ(r.m->storages[0].nbytes, 0);
    run_free(&r);
}

TEST(vector_7_json_attack)
{
    st_buf_t h = {0};
    run_t r;

    st_buf_add(&h, "{", 1);
    for (int i = 0; i < 10; i++) {
        char tmp[128];
        int k = snprintf(tmp, sizeof(tmp),
                         "%s\"weight_%d\":{\"dtype\":\"F32\",\"shape\":[2,2],"
                         "\"data_offsets\":[0,16]}",
                         i ? "," : "", i);

        st_buf_add(&h, tmp, (size_t)k);
    }
    st_buf_add(&h, "}", 1);
    r = read_hdr((const char *)h.p, h.n, 0, 16);
    expect_rule("json attack", &r, WSD_EBADCKPT, "E_ST_OFFSETS");
    ASSERT_STR_CONTAINS(r.err.msg, "begins at 0, expected 16");
    run_free(&r);
    free(h.p);
}

/* §6.3: a file laid out like the reference writer's output (§4.7) is fully aligned. */
TEST(reference_writer_layout)
{
    static const st_spec_t specs[] = {
        {"model.embed", "BF16", 2, {3, 5}}, {"bias", "F32", 1, {3}},
        {"counts", "I64", 1, {3}},          {"mask", "BOOL", 2, {2, 3}},
        {"scales", "F8_E4M3", 1, {7}},      {"zz.w", "F64", 2, {2, 2}},
        {"empty", "F32", 2, {0, 4}},        {"packed", "F4", 1, {6}},
    };
    uint64_t size;
    char *path = st_write_ref("ref.safetensors", specs, 8, "{\"format\":\"pt\"}", &size);
    run_t r = read_path(path);
    uint64_t prev_end = 0;

    expect_ok("reference layout", &r);
    ASSERT_EQ(r.m->ntensors, 8);
    ASSERT_EQ(r.m->nwarnings, 0);
    ASSERT_STR_EQ(meta(r.m, "format"), "\"pt\"");
    /* 8-byte types first, then 4, 2, 1, sub-byte; names ascending within a size. */
    ASSERT_STR_EQ(r.m->tensors[0].name, "counts");
    ASSERT_STR_EQ(r.m->tensors[1].name, "zz.w");
    for (size_t i = 0; i < r.m->ntensors; i++) {
        const mf_tensor_t *t = &r.m->tensors[i];
        const mf_storage_t *s = &r.m->storages[t->storage];
        unsigned item = manifest_itemsize(t->dtype);

        if (item)
            ASSERT_EQ(s->src_offset % item, 0);
        if (i)
            ASSERT_UINT_EQ(s->src_offset, prev_end);
        prev_end = s->src_offset + s->nbytes;
    }
    ASSERT_UINT_EQ(prev_end, size);
    run_free(&r);
}

/*
 * §6.3: a file written by the real safetensors package, when /usr/bin/python3 has it (Debian
 * does not package it; the layout test above covers its conventions meanwhile).
 */
TEST(python_safetensors_file)
{
    char cmd[2048];
    char *path = st_path("py.safetensors");
    run_t r;
    int st;

    snprintf(cmd, sizeof(cmd),
             "%s -c 'import safetensors' >/dev/null 2>&1 || exit 77; "
             "%s - '%s' <<'EOF'\n"
             "import sys, struct\n"
             "from safetensors.numpy import save_file\n"
             "import numpy as np\n"
             "save_file({'w': np.arange(6, dtype=np.float32).reshape(2, 3),\n"
             "           'b': np.ones(3, dtype=np.float16), 'i': np.arange(2, dtype=np.int64)},\n"
             "          sys.argv[1], metadata={'format': 'np'})\n"
             "EOF\n",
             WSD_PYTHON, WSD_PYTHON, path);
    st = system(cmd);
    if (WIFEXITED(st) && WEXITSTATUS(st) == 77)
        SKIP("the Python safetensors package is not installed");
    ASSERT(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    r = read_path(path);
    expect_ok("python file", &r);
    ASSERT_EQ(r.m->ntensors, 3);
    ASSERT_EQ(r.m->nwarnings, 0);
    ASSERT_EQ(tensor(r.m, "w")->stride[0], 3);
    ASSERT_STR_EQ(meta(r.m, "format"), "\"np\"");
    run_free(&r);
}

/* §6.3: 64-bit offsets, in a sparse file so the test costs no disk. */
TEST(over_4gib_sparse)
{
    const uint64_t big = (1ull << 32) + 4096;
    char hdr[256];
    int k = snprintf(hdr, sizeof(hdr),
                     "{\"big\":{\"dtype\":\"U8\",\"shape\":[%llu],\"data_offsets\":[0,%llu]},"
                     "\"small\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[%llu,%llu]}}",
                     (unsigned long long)big, (unsigned long long)big, (unsigned long long)big,
                     (unsigned long long)big + 8);
    st_buf_t f = st_file(hdr, (size_t)k, 8, 0);
    uint64_t total = f.n + big + 8;
    char *path = st_put("big.safetensors", f.p, f.n);
    const mf_storage_t *s;
    run_t r;
    int fd = open(path, O_WRONLY | O_CLOEXEC);

    ASSERT(fd >= 0);
    if (ftruncate(fd, (off_t)total) < 0) {
        close(fd);
        SKIP("filesystem cannot hold a sparse file past 4 GiB");
    }
    close(fd);
    r = read_path(path);
    expect_ok("sparse", &r);
    s = &r.m->storages[tensor(r.m, "small")->storage];
    ASSERT_UINT_EQ(s->src_offset, f.n + big);
    ASSERT(s->src_offset > (1ull << 32));
    ASSERT_EQ(s->nbytes, 8);
    ASSERT_UINT_EQ(r.m->storages[tensor(r.m, "big")->storage].nbytes, big);
    run_free(&r);
    free(f.p);
}

/* RELIABILITY P2/M1: every prefix of a valid file is refused with the rule of its step. */
TEST(truncation_every_offset)
{
    static const st_spec_t specs[] = {
        {"a", "F32", 2, {2, 2}}, {"b", "U8", 1, {3}}, {"c", "F16", 1, {0}}};
    uint64_t size;
    char *path = st_write_ref("full.safetensors", specs, 3, "{\"format\":\"pt\"}", &size);
    uint8_t *full = malloc(size);
    uint64_t hlen = 0;
    run_t r;
    int fd = open(path, O_RDONLY | O_CLOEXEC);

    ASSERT(full && fd >= 0);
    ASSERT_EQ(read(fd, full, size), (ssize_t)size);
    close(fd);
    for (int i = 7; i >= 0; i--)
        hlen = hlen << 8 | full[i];
    r = read_bytes(full, size);
    expect_ok("full", &r);
    run_free(&r);
    for (uint64_t len = 0; len < size; len++) {
        char what[64];

        snprintf(what, sizeof(what), "prefix of %llu bytes", (unsigned long long)len);
        r = read_bytes(full, len);
        expect_rule(what, &r, WSD_EBADCKPT,
                    len < 8          ? "E_ST_HEADER_TOO_SMALL"
                    : len < 8 + hlen ? "E_ST_HEADER_LENGTH"
                                     : "E_ST_INCOMPLETE_BUFFER");
        run_free(&r);
    }
    free(full);
}

/* Every byte of a small file replaced by a few hostile values: each result is clean. */
TEST(single_byte_corruption)
{
    static const st_spec_t specs[] = {{"a", "F32", 2, {2, 2}}, {"b", "F4", 1, {2}}};
    static const uint8_t repl[] = {0x00, 0x22, 0x2d, 0x30, 0x5b, 0x7d, 0xff};
    uint64_t size;
    char *path = st_write_ref("c.safetensors", specs, 2, "{\"k\":\"v\"}", &size);
    uint8_t *buf = malloc(size);
    int fd = open(path, O_RDONLY | O_CLOEXEC);

    ASSERT(buf && fd >= 0);
    ASSERT_EQ(read(fd, buf, size), (ssize_t)size);
    close(fd);
    for (uint64_t i = 0; i < size; i++) {
        uint8_t orig = buf[i];

        for (size_t k = 0; k < sizeof(repl); k++) {
            run_t r;

            buf[i] = repl[k];
            r = read_bytes(buf, size);
            if (r.r < 0) {
                ASSERT(r.err.code == WSD_EBADCKPT);
                ASSERT(strncmp(r.err.msg, "E_", 2) == 0);
            }
            run_free(&r);
        }
        buf[i] = orig;
    }
    free(buf);
}

TEST(many_tensors)
{
    size_t n = 100000;
    st_buf_t h = {0};
    run_t r;

    st_buf_add(&h, "{", 1);
    for (size_t i = 0; i < n; i++) {
        char tmp[128];
        /* Header order is the reverse of offset order, so the sort has work to do. */
        size_t at = n - 1 - i;
        int k = snprintf(tmp, sizeof(tmp),
                         "%s\"t%zu\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[%zu,%zu]}",
                         i ? "," : "", at, at, at + 1);

        st_buf_add(&h, tmp, (size_t)k);
    }
    st_buf_add(&h, "}", 1);
    r = read_hdr((const char *)h.p, h.n, 8, n);
    expect_ok("many", &r);
    ASSERT_EQ(r.m->ntensors, n);
    ASSERT_STR_EQ(r.m->tensors[0].name, "t0");
    ASSERT_STR_EQ(r.m->tensors[n - 1].name, "t99999");
    run_free(&r);
    free(h.p);
}

/* The whole-model path: content sniffing picks this reader regardless of the file name. */
TEST(fmt_load_detects_safetensors)
{
    static const st_spec_t specs[] = {{"w", "F32", 2, {2, 3}}, {"b", "F32", 1, {2}}};
    char *path = st_write_ref("model.bin", specs, 2, NULL, NULL);
    manifest_t *m = NULL;
    source_t *src = NULL;
    size_t nsrc = 0;
    fmt_err_t err = {0};

    ASSERT_EQ(fmt_load(path, NULL, &m, &src, &nsrc, &err), 0);
    ASSERT_STR_EQ(m->format, "safetensors");
    ASSERT_EQ(nsrc, 1);
    ASSERT_STR_EQ(src[0].path, path);
    ASSERT_EQ(m->ntensors, 2);
    ASSERT_EQ(m->storages[0].source, 0);
    ASSERT_EQ(tensor(m, "w")->stride[0], 3);
    source_close(&src[0]);
    free(src);
    manifest_free(m);
}

/* C9: every allocation reading a safetensors file can fail cleanly (alloc-sweep.h). */
TEST(every_allocation_can_fail)
{
    static const st_spec_t specs[] = {
        {"w", "F32", 2, {2, 3}}, {"b", "BF16", 1, {2}}, {"e", "I64", 0, {0}}, {"z", "U8", 2, {0, 4}}};
    char *path = st_write_ref("sweep.safetensors", specs, 4, "{\"format\":\"pt\",\"k\":\"v\"}",
                              NULL);
    unsigned long n = alloc_sweep(path, NULL);

    fprintf(stderr, "# %lu allocations, each failed once\n", n);
    ASSERT_GT(n, 5);
}

TEST(fmt_load_errors)
{
    static const st_spec_t specs[] = {{"w", "F32", 1, {2}}};
    char *path = st_write_ref("k.safetensors", specs, 1, NULL, NULL);
    fmt_opts_t opts = {.key = "model"};
    manifest_t *m = NULL;
    source_t *src = NULL;
    size_t nsrc = 0;
    fmt_err_t err = {0};
    st_buf_t f;

    ASSERT_EQ(fmt_load(path, &opts, &m, &src, &nsrc, &err), WSD_EINVAL);
    ASSERT_STR_CONTAINS(err.msg, "E_KEY");
    ASSERT(!m && !src);

    /* Sniffed as safetensors (§1 rule 6), then refused by the reader with its own rule. */
    f = st_file(HDR("{" T("w", "F32", "[2]", "[0,4]") "}"), 8, 4);
    path = st_put("bad.safetensors", f.p, f.n);
    memset(&err, 0, sizeof(err));
    ASSERT_EQ(fmt_load(path, NULL, &m, &src, &nsrc, &err), WSD_EBADCKPT);
    ASSERT_STR_CONTAINS(err.msg, "E_ST_SIZE_MISMATCH");
    free(f.p);

    /* A header that does not start with '{' is not safetensors at all. */
    f = st_file(HDR("[]"), 8, 0);
    path = st_put("array.safetensors", f.p, f.n);
    memset(&err, 0, sizeof(err));
    ASSERT_EQ(fmt_load(path, NULL, &m, &src, &nsrc, &err), WSD_EBADCKPT);
    ASSERT_STR_CONTAINS(err.msg, "E_UNKNOWN_FORMAT");
    free(f.p);

    memset(&err, 0, sizeof(err));
    ASSERT(fmt_load(st_path("missing.safetensors"), NULL, &m, &src, &nsrc, &err) < 0);
    ASSERT_STR_CONTAINS(err.msg, "E_OPEN");
}

/* The reader reads through the source: a file that shrinks after open is an error, not SIGBUS. */
TEST(file_shrinks_after_open)
{
    static const st_spec_t specs[] = {{"w", "F32", 1, {1024}}};
    char *path = st_write_ref("shrink.safetensors", specs, 1, NULL, NULL);
    manifest_t *m = manifest_new();
    fmt_err_t err = {0};
    source_t s;

    ASSERT_EQ(source_open(path, &s, &err), 0);
    ASSERT_EQ(truncate(path, 20), 0);
    ASSERT(safetensors_read(&s, 0, m, &err) < 0);
    ASSERT(err.code == WSD_ESTALE || err.code == WSD_EBADCKPT);
    source_close(&s);
    manifest_free(m);
}

int main(int argc, char **argv)
{
    return test_main(argc, argv);
}

/*
 * manifest_validate() is the last gate for every reader (§7): geometry a reader let through
 * is refused here, each rule naming the tensor. Manifests are built by hand, as a reader with
 * a bug would build them.
 */
TEST(manifest_validate_rules)
{
    static const struct {
        const char *what;
        mf_tensor_t t;
        uint64_t storage_bytes;
        const char *rule, *contains;
    } rules[] = {
        {"unknown dtype", {.dtype = 99, .ndim = 1, .shape = {1}, .stride = {1}}, 4,
         "E_TENSOR_DTYPE", "unknown dtype 99"},
        {"negative dtype", {.dtype = -3, .ndim = 1, .shape = {1}, .stride = {1}}, 4,
         "E_TENSOR_DTYPE", "dtype -3"},
        {"9 dimensions", {.dtype = WSD_DTYPE_U8, .ndim = 9}, 4, "E_TENSOR_GEOMETRY",
         "9 dimensions, at most 8"},
        {"no such storage", {.dtype = WSD_DTYPE_U8, .ndim = 1, .shape = {1}, .stride = {1},
                             .storage = 5}, 4, "E_STORAGE_MISSING", "storage 5 does not exist"},
        {"negative size", {.dtype = WSD_DTYPE_U8, .ndim = 2, .shape = {2, -1}, .stride = {1, 1}},
         4, "E_TENSOR_GEOMETRY", "dimension 1"},
        {"negative stride", {.dtype = WSD_DTYPE_U8, .ndim = 1, .shape = {2}, .stride = {-1}}, 4,
         "E_TENSOR_GEOMETRY", "negative size or stride in dimension 0"},
        {"numel overflow", {.dtype = WSD_DTYPE_U8, .ndim = 2, .shape = {INT64_MAX, 4},
                            .stride = {4, 1}}, 4, "E_TENSOR_OVERFLOW", "element count"},
        {"odd count of f4", {.dtype = WSD_DTYPE_F4, .ndim = 1, .shape = {3}, .stride = {1}}, 2,
         "E_ST_SUBBYTE", "3 elements of F4"},
        {"f4 short of its storage", {.dtype = WSD_DTYPE_F4, .ndim = 1, .shape = {2},
                                     .stride = {1}}, 2, "E_TENSOR_GEOMETRY", "cover its storage"},
        {"f4 at an offset", {.dtype = WSD_DTYPE_F4, .ndim = 1, .shape = {4}, .stride = {1},
                             .storage_offset = 1}, 2, "E_TENSOR_GEOMETRY", "sub-byte dtype F4"},
        {"stride span overflow", {.dtype = WSD_DTYPE_F32, .ndim = 1, .shape = {5},
                                  .stride = {INT64_MAX}}, 4, "E_TENSOR_OVERFLOW",
         "offset + strides"},
        {"byte extent overflow", {.dtype = WSD_DTYPE_F32, .ndim = 1, .shape = {1}, .stride = {1},
                                  .storage_offset = INT64_MAX}, 4, "E_TENSOR_OVERFLOW",
         "byte extent"},
        {"view past storage", {.dtype = WSD_DTYPE_F32, .ndim = 1, .shape = {2}, .stride = {1}},
         4, "E_TENSOR_OOB", "reaches byte 8 of storage 's' holding 4"},
    };

    for (size_t i = 0; i < sizeof(rules) / sizeof(rules[0]); i++) {
        manifest_t *m = manifest_new();
        mf_tensor_t t = rules[i].t;
        fmt_err_t err = {0};
        uint32_t ix;

        ASSERT(m);
        ASSERT_EQ(manifest_add_storage(m, "s", 0, 0, rules[i].storage_bytes, WSD_DTYPE_U8, &ix), 0);
        t.name = (char *)(uintptr_t)"t";
        ASSERT_EQ(manifest_add_tensor(m, &t), 0);
        if (manifest_validate(m, &err) != WSD_EBADCKPT ||
            strncmp(err.msg, rules[i].rule, strlen(rules[i].rule)) != 0 ||
            !strstr(err.msg, rules[i].contains) || !strstr(err.msg, "tensor 't'"))
            TEST_FAIL("%s: \"%s\", expected %s \"...%s...\"", rules[i].what, err.msg,
                      rules[i].rule, rules[i].contains);
        manifest_free(m);
    }
}

/* Two tensors of one name are refused; the limit on storages is an error, not a crash. */
TEST(manifest_names_and_limits)
{
    manifest_t *m = manifest_new();
    mf_tensor_t t = {.name = (char *)(uintptr_t)"dup", .dtype = WSD_DTYPE_U8, .ndim = 1,
                     .shape = {1}, .stride = {1}};
    fmt_err_t err = {0};
    uint32_t ix = 0;
    int r = 0;

    ASSERT(m);
    ASSERT_EQ(manifest_add_storage(m, "s", 0, 0, 1, WSD_DTYPE_U8, &ix), 0);
    ASSERT_EQ(manifest_add_tensor(m, &t), 0);
    ASSERT_EQ(manifest_add_tensor(m, &t), 0);
    ASSERT_EQ(manifest_validate(m, &err), WSD_EBADCKPT);
    ASSERT_STR_CONTAINS(err.msg, "E_DUP_NAME: tensor name 'dup' appears twice");
    for (uint32_t i = 1; i < MANIFEST_STORAGES_MAX && r == 0; i++)
        r = manifest_add_storage(m, "s", 0, 0, 1, WSD_DTYPE_U8, &ix);
    ASSERT_EQ(r, 0);
    ASSERT_EQ(m->nstorages, MANIFEST_STORAGES_MAX);
    ASSERT_EQ(manifest_add_storage(m, "s", 0, 0, 1, WSD_DTYPE_U8, &ix), WSD_ELIMIT);
    manifest_free(m);
}

/* Files that are something else entirely are named for what they are (§1 rule 6). */
TEST(fmt_detect_names_other_formats)
{
    static const struct {
        const char *what, *rule, *contains;
        char magic[16];
        size_t len;
        size_t at; /* where the magic goes (tar's "ustar" sits at 257) */
    } rules[] = {
        {"GGUF", "E_UNKNOWN_FORMAT", "is a GGUF file", "GGUF\x03\x00\x00\x00", 8, 0},
        {"npy", "E_UNKNOWN_FORMAT", "NumPy .npy", "\x93NUMPY\x01\x00", 8, 0},
        {"HDF5", "E_UNKNOWN_FORMAT", "HDF5", "\x89HDF\r\n\x1a\n", 8, 0},
        {"tar", "E_LEGACY_TORCH", "tar container", "ustar", 5, 257},
        {"pickle", "E_LEGACY_TORCH", "legacy PyTorch format", "\x80\x02\x8a\x0a", 4, 0},
    };

    for (size_t i = 0; i < sizeof(rules) / sizeof(rules[0]); i++) {
        uint8_t buf[600] = {0};
        manifest_t *m = NULL;
        source_t *src = NULL;
        size_t nsrc = 0;
        fmt_err_t err = {0};
        int r;

        memcpy(buf + rules[i].at, rules[i].magic, rules[i].len);
        r = fmt_load(st_put("other.bin", buf, sizeof(buf)), NULL, &m, &src, &nsrc, &err);
        if (r != WSD_EBADCKPT || strncmp(err.msg, rules[i].rule, strlen(rules[i].rule)) != 0 ||
            !strstr(err.msg, rules[i].contains))
            TEST_FAIL("%s: %d \"%s\", expected %s \"...%s...\"", rules[i].what, r, err.msg,
                      rules[i].rule, rules[i].contains);
    }
}

/* Reading through source.c: a read past the end, failed and interrupted reads, short reads. */
TEST(source_reads)
{
    static const st_spec_t specs[] = {{"w", "F32", 2, {64, 64}}, {"b", "BF16", 1, {7}}};
    char *path = st_write_ref("reads.safetensors", specs, 2, "{\"k\":\"v\"}", NULL);
    fmt_err_t err = {0};
    uint8_t b[16];
    source_t s;

    ASSERT_EQ(source_open(path, &s, &err), 0);
    ASSERT_EQ(source_pread(&s, b, sizeof(b), s.size - 8, &err), WSD_EBADCKPT);
    ASSERT_STR_CONTAINS(err.msg, "E_TRUNCATED: ");
    ASSERT_STR_CONTAINS(err.msg, "16 bytes at offset");
    ASSERT_EQ(source_pread(&s, b, 1, UINT64_MAX, &err), WSD_EBADCKPT);
    source_close(&s);
#ifdef WSD_FAULT_INJECTION
    static const struct {
        const char *spec;
        int want;
        const char *contains;
    } faults[] = {
        {"source.open", WSD_EIO, "E_OPEN: cannot open"},
        {"source.pread", WSD_EIO, "E_READ: "},
        {"source.pread:3", WSD_EIO, "E_READ: "},
        {"syscall.eintr:%2", 0, NULL},      /* every other read interrupted: retried */
        {"source.pread.short:*", 0, NULL},  /* every read returns half: continued */
    };

    size_t n = 0;

    for (size_t i = 0; i < sizeof(faults) / sizeof(faults[0]); i++) {
        char point[32];
        int r;

        snprintf(point, sizeof(point), "%.*s", (int)strcspn(faults[i].spec, ":"), faults[i].spec);
        memset(&err, 0, sizeof(err));
        fault_arm(faults[i].spec);
        r = alloc_sweep_load(path, NULL, &n, &err);
        ASSERT_GT(fault_calls(point), 0);
        fault_arm(NULL);
        if (r != faults[i].want || (faults[i].contains && !strstr(err.msg, faults[i].contains)))
            TEST_FAIL("%s: %d \"%s\", expected %d %s", faults[i].spec, r, err.msg,
                      faults[i].want, faults[i].contains ? faults[i].contains : "");
        if (r == 0)
            ASSERT_EQ(n, 2);
    }
#endif
}
