/*
 * test-index.c - the Hugging Face sharded-index reader against FORMATS.md §5 and the §6.4
 * table: good indexes (safetensors and torch shards, with and without metadata, with warnings),
 * and every rejection (missing shard or tensor, unsafe paths, extension and content mismatch,
 * schema, duplicate keys, limits). Also the fmt_load() entry point for *.index.json.
 *
 * Shards are written here (st_fixtures.h; torch shards by tests/fixtures/idx_bin_shards.py when
 * /usr/bin/python3 has torch). Torch-shard tests skip while torch_read is still a placeholder.
 */
#ifndef _GNU_SOURCE
#    define _GNU_SOURCE /* nftw in st_fixtures.h, when the build does not set it */
#endif
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../fixtures/st_fixtures.h"
#include "fmt.h"
#include "index.h"
#include "manifest.h"
#include "test.h"
#include "alloc-sweep.h"
#include "weightsd.h"

#define SHARD1 "model-00001-of-00002.safetensors"
#define SHARD2 "model-00002-of-00002.safetensors"
#define INDEX  "model.safetensors.index.json"

/* What one index_load() left behind. */
typedef struct ld {
    int r;
    fmt_err_t err;
    manifest_t *m;
    source_t *src;
    size_t nsrc;
} ld_t;

static ld_t load_opts(const char *path, const fmt_opts_t *opts)
{
    ld_t l = {0};

    l.r = index_load(path, opts, &l.m, &l.src, &l.nsrc, &l.err);
    if (l.r < 0)
        ASSERT(!l.m && !l.src);
    return l;
}

static ld_t load(const char *path)
{
    return load_opts(path, NULL);
}

static void ld_free(ld_t *l)
{
    for (size_t i = 0; i < l->nsrc; i++)
        source_close(&l->src[i]);
    free(l->src);
    l->m = manifest_free(l->m);
    l->src = NULL;
    l->nsrc = 0;
}

static void expect_rule(const char *what, const ld_t *l, int code, const char *rule)
{
    size_t n = strlen(rule);

    if (l->r >= 0)
        TEST_FAIL("%s: accepted, expected %s", what, rule);
    if (l->r != code || l->err.code != code)
        TEST_FAIL("%s: code %d/%d, expected %d (%s)", what, l->r, l->err.code, code, l->err.msg);
    if (strncmp(l->err.msg, rule, n) != 0 || l->err.msg[n] != ':')
        TEST_FAIL("%s: \"%s\", expected rule %s", what, l->err.msg, rule);
}

static void expect_ok(const char *what, const ld_t *l)
{
    if (l->r != 0)
        TEST_FAIL("%s: rejected: %d %s", what, l->r, l->err.msg);
}

static size_t count_warnings(const manifest_t *m, const char *rule)
{
    size_t n = 0;

    for (size_t i = 0; i < m->nwarnings; i++)
        if (strncmp(m->warnings[i], rule, strlen(rule)) == 0)
            n++;
    return n;
}

static const char *warning(const manifest_t *m, const char *rule)
{
    for (size_t i = 0; i < m->nwarnings; i++)
        if (strncmp(m->warnings[i], rule, strlen(rule)) == 0)
            return m->warnings[i];
    return NULL;
}

static const char *meta(const manifest_t *m, const char *key)
{
    for (size_t i = 0; i < m->nmeta; i++)
        if (strcmp(m->meta[i].key, key) == 0)
            return m->meta[i].value;
    return NULL;
}

static const mf_tensor_t *tensor(const manifest_t *m, const char *name)
{
    ssize_t i = manifest_find(m, name);

    if (i < 0)
        TEST_FAIL("no tensor '%s'", name);
    return &m->tensors[i];
}

/* §5.2's example: 3 tensors, 28 bytes, across two safetensors shards. */
static void write_sharded(void)
{
    static const st_spec_t s1[] = {{"embed.weight", "F32", 2, {2, 2}}};
    static const st_spec_t s2[] = {{"lm_head.bias", "F32", 1, {1}}, {"norm.weight", "F32", 1, {2}}};

    st_write_ref(SHARD1, s1, 1, "{\"format\":\"pt\"}", NULL);
    st_write_ref(SHARD2, s2, 2, "{\"format\":\"pt\"}", NULL);
}

#define WEIGHT_MAP                                                                                 \
    "\"weight_map\": {\n"                                                                          \
    "    \"embed.weight\": \"" SHARD1 "\",\n"                                                      \
    "    \"lm_head.bias\": \"" SHARD2 "\",\n"                                                      \
    "    \"norm.weight\": \"" SHARD2 "\"\n"                                                        \
    "  }"

TEST(ok_sharded)
{
    char *path;
    ld_t l;
    const mf_tensor_t *t;

    write_sharded();
    path = st_put_str(INDEX, "{\n  \"metadata\": {\"total_parameters\": 7, \"total_size\": 28},\n"
                             "  " WEIGHT_MAP "\n}\n");
    l = load(path);
    expect_ok("ok_sharded", &l);
    ASSERT_STR_EQ(l.m->format, "safetensors-index");
    ASSERT_EQ(l.m->nwarnings, 0);
    ASSERT_EQ(l.nsrc, 2);
    ASSERT_STR_EQ(l.src[0].path, st_path(SHARD1));
    ASSERT_STR_EQ(l.src[1].path, st_path(SHARD2));
    ASSERT_EQ(l.m->ntensors, 3);
    ASSERT_EQ(l.m->nstorages, 3);
    /* Shard order (sorted names), then each shard's own order. */
    ASSERT_STR_EQ(l.m->tensors[0].name, "embed.weight");
    ASSERT_STR_EQ(l.m->tensors[1].name, "lm_head.bias");
    ASSERT_STR_EQ(l.m->tensors[2].name, "norm.weight");
    t = tensor(l.m, "embed.weight");
    ASSERT_EQ(l.m->storages[t->storage].source, 0);
    ASSERT_EQ(t->shape[0], 2);
    ASSERT_EQ(t->stride[0], 2);
    t = tensor(l.m, "norm.weight");
    ASSERT_EQ(l.m->storages[t->storage].source, 1);
    ASSERT_EQ(l.m->storages[t->storage].nbytes, 8);
    ASSERT_STR_EQ(l.m->storages[t->storage].key, "norm.weight");
    /* Shard metadata stays per shard; the index's own is under "metadata.". */
    ASSERT_STR_EQ(meta(l.m, SHARD1 "/format"), "\"pt\"");
    ASSERT_STR_EQ(meta(l.m, SHARD2 "/format"), "\"pt\"");
    ASSERT_STR_EQ(meta(l.m, "metadata.total_size"), "28");
    ASSERT_STR_EQ(meta(l.m, "metadata.total_parameters"), "7");
    ld_free(&l);
}

/* C9: every allocation reading a sharded checkpoint (the index and both shards) can fail
 * cleanly (alloc-sweep.h); the .bin index variant too, where torch is there to write it. */
TEST(every_allocation_can_fail)
{
    unsigned long n;

    write_sharded();
    n = alloc_sweep(st_put_str(INDEX, "{\"metadata\": {\"total_size\": 28},\n  " WEIGHT_MAP "\n}\n"),
                    NULL);
    fprintf(stderr, "# safetensors index: %lu allocations, each failed once\n", n);
    ASSERT_GT(n, 10);
}

TEST(ok_no_metadata)
{
    ld_t l;

    write_sharded();
    l = load(st_put_str(INDEX, "{" WEIGHT_MAP "}"));
    expect_ok("ok_no_metadata", &l);
    ASSERT_EQ(l.m->ntensors, 3);
    ASSERT_EQ(count_warnings(l.m, "W_METADATA_FORMAT"), 1);
    ASSERT_EQ(l.m->nwarnings, 1);
    ld_free(&l);

    /* Metadata without total_size, or with a non-integer one: same warning, still accepted. */
    l = load(st_put_str(INDEX, "{\"metadata\":{}," WEIGHT_MAP "}"));
    expect_ok("no total_size", &l);
    ASSERT_EQ(count_warnings(l.m, "W_METADATA_FORMAT"), 1);
    ld_free(&l);
    l = load(st_put_str(INDEX, "{\"metadata\":{\"total_size\":\"28\"}," WEIGHT_MAP "}"));
    expect_ok("string total_size", &l);
    ASSERT_EQ(count_warnings(l.m, "W_METADATA_FORMAT"), 1);
    ASSERT_STR_EQ(meta(l.m, "metadata.total_size"), "\"28\"");
    ld_free(&l);
}

TEST(warn_total_size_mismatch)
{
    ld_t l;

    write_sharded();
    l = load(st_put_str(INDEX, "{\"metadata\":{\"total_size\":100}," WEIGHT_MAP "}"));
    expect_ok("total size", &l);
    ASSERT_EQ(l.m->nwarnings, 1);
    ASSERT_STR_CONTAINS(warning(l.m, "W_TOTAL_SIZE"), "is 100 but the listed tensors hold 28");
    ld_free(&l);
}

TEST(warn_unlisted_tensor)
{
    static const st_spec_t s2[] = {{"lm_head.bias", "F32", 1, {1}},
                                   {"norm.weight", "F32", 1, {2}},
                                   {"lm_head.weight", "F32", 2, {2, 2}},
                                   {"embed.weight", "F32", 1, {3}}};
    static const st_spec_t s1[] = {{"embed.weight", "F32", 2, {2, 2}}};
    ld_t l;

    st_write_ref(SHARD1, s1, 1, NULL, NULL);
    st_write_ref(SHARD2, s2, 4, NULL, NULL);
    l = load(st_put_str(INDEX, "{\"metadata\":{\"total_size\":28}," WEIGHT_MAP "}"));
    expect_ok("unlisted", &l);
    /* Dropped: the index is the table of contents. The second shard's own embed.weight would
     * otherwise collide with the listed one of the first. */
    ASSERT_EQ(l.m->ntensors, 3);
    ASSERT_EQ(l.m->nstorages, 3);
    ASSERT(manifest_find(l.m, "lm_head.weight") < 0);
    ASSERT_EQ(l.m->storages[tensor(l.m, "embed.weight")->storage].source, 0);
    ASSERT_EQ(tensor(l.m, "embed.weight")->ndim, 2);
    ASSERT_EQ(l.m->nwarnings, 1);
    ASSERT_STR_CONTAINS(warning(l.m, "W_UNLISTED_TENSOR"), "holds 2 tensors");
    ASSERT_STR_CONTAINS(warning(l.m, "W_UNLISTED_TENSOR"), SHARD2);
    ld_free(&l);
}

TEST(bad_missing_shard)
{
    static const st_spec_t s1[] = {{"embed.weight", "F32", 2, {2, 2}}};
    ld_t l;

    st_write_ref(SHARD1, s1, 1, NULL, NULL);
    l = load(st_put_str(INDEX, "{" WEIGHT_MAP "}"));
    expect_rule("missing shard", &l, WSD_EBADCKPT, "E_IDX_MISSING_SHARD");
    ASSERT_STR_CONTAINS(l.err.msg, SHARD2);
    ld_free(&l);
}

TEST(bad_tensor_not_in_shard)
{
    static const st_spec_t s1[] = {{"embed.weight", "F32", 2, {2, 2}}};
    static const st_spec_t s2[] = {{"lm_head.bias", "F32", 1, {1}}};
    ld_t l;

    st_write_ref(SHARD1, s1, 1, NULL, NULL);
    st_write_ref(SHARD2, s2, 1, NULL, NULL);
    l = load(st_put_str(INDEX, "{" WEIGHT_MAP "}"));
    expect_rule("missing tensor", &l, WSD_EBADCKPT, "E_IDX_MISSING_TENSOR");
    ASSERT_STR_CONTAINS(l.err.msg, "tensor 'norm.weight'");
    ASSERT_STR_CONTAINS(l.err.msg, SHARD2);
    ld_free(&l);
}

/* weight_map values that must never be opened, each with the rule it breaks. */
static const struct shard_case {
    const char *shard; /* JSON string body */
    const char *rule;
} bad_shards[] = {
    {"../" SHARD1, "E_IDX_UNSAFE_PATH"},
    {"sub/../../" SHARD1, "E_IDX_UNSAFE_PATH"},
    {"sub/..", "E_IDX_UNSAFE_PATH"},
    {"..\\\\" SHARD1, "E_IDX_UNSAFE_PATH"},
    {"a\\\\..\\\\..\\\\" SHARD1, "E_IDX_UNSAFE_PATH"},
    {"/etc/" SHARD1, "E_IDX_UNSAFE_PATH"},
    {"\\\\server\\\\" SHARD1, "E_IDX_UNSAFE_PATH"},
    {"C:" SHARD1, "E_IDX_UNSAFE_PATH"},
    {"c:\\\\" SHARD1, "E_IDX_UNSAFE_PATH"},
    {"", "E_IDX_UNSAFE_PATH"},
    {"a\\n" SHARD1, "E_IDX_UNSAFE_PATH"},
    {"pytorch_model-00001-of-00002.bin", "E_IDX_EXT_MISMATCH"},
    {"model.safetensors.bak", "E_IDX_EXT_MISMATCH"},
    {"model.SAFETENSORS", "E_IDX_EXT_MISMATCH"},
};

TEST(bad_shard_paths)
{
    write_sharded();
    for (size_t i = 0; i < sizeof(bad_shards) / sizeof(bad_shards[0]); i++) {
        char json[512];
        ld_t l;

        snprintf(json, sizeof(json),
                 "{\"weight_map\":{\"embed.weight\":\"" SHARD1 "\",\"x\":\"%s\"}}",
                 bad_shards[i].shard);
        l = load(st_put_str(INDEX, json));
        expect_rule(bad_shards[i].shard, &l, WSD_EBADCKPT, bad_shards[i].rule);
        ld_free(&l);
    }
}

TEST(ok_subdirectory_and_symlinked_shards)
{
    static const st_spec_t s1[] = {{"embed.weight", "F32", 2, {2, 2}}};
    static const st_spec_t s2[] = {{"lm_head.bias", "F32", 1, {1}}, {"norm.weight", "F32", 1, {2}}};
    ld_t l;

    /* The Hugging Face cache: snapshots/<rev>/<file> is a symlink to ../../blobs/<hash>. */
    ASSERT_EQ(mkdir(st_path("blobs"), 0755), 0);
    ASSERT_EQ(mkdir(st_path("snap"), 0755), 0);
    ASSERT_EQ(mkdir(st_path("snap/rev"), 0755), 0);
    ASSERT_EQ(mkdir(st_path("snap/rev/sub"), 0755), 0);
    st_write_ref("blobs/0123abcd", s1, 1, NULL, NULL);
    ASSERT_EQ(symlink("../../blobs/0123abcd", st_path("snap/rev/" SHARD1)), 0);
    st_write_ref("snap/rev/sub/" SHARD2, s2, 2, NULL, NULL);
    l = load(st_put_str("snap/rev/" INDEX,
                        "{\"metadata\":{\"total_size\":28},\"weight_map\":{"
                        "\"embed.weight\":\"" SHARD1 "\",\"lm_head.bias\":\"sub/" SHARD2 "\","
                        "\"norm.weight\":\"./sub//" SHARD2 "\"}}"));
    /* "sub/x" and "./sub//x" are two spellings of one file: two sources, each tensor once. */
    expect_ok("subdir", &l);
    ASSERT_EQ(l.m->ntensors, 3);
    ASSERT_EQ(l.nsrc, 3);
    ASSERT_EQ(l.m->nwarnings, 2);
    ASSERT_EQ(count_warnings(l.m, "W_UNLISTED_TENSOR"), 2);
    ld_free(&l);
}

TEST(bad_extension_mismatch)
{
    static const st_spec_t s[] = {{"embed.weight", "F32", 2, {2, 2}}};
    static const uint8_t zip[64] = "PK\x03\x04";
    ld_t l;

    /* A .bin shard named by a safetensors index is refused before it is opened... */
    l = load(st_put_str(INDEX, "{\"weight_map\":{\"embed.weight\":\"pytorch_model.bin\"}}"));
    expect_rule(".bin in safetensors index", &l, WSD_EBADCKPT, "E_IDX_EXT_MISMATCH");
    ld_free(&l);
    /* ...and vice versa. */
    l = load(st_put_str("pytorch_model.bin.index.json",
                        "{\"weight_map\":{\"embed.weight\":\"" SHARD1 "\"}}"));
    expect_rule(".safetensors in bin index", &l, WSD_EBADCKPT, "E_IDX_EXT_MISMATCH");
    ld_free(&l);
    /* Content counts too: a zip under a .safetensors name (pickle smuggling)... */
    st_put(SHARD1, zip, sizeof(zip));
    l = load(st_put_str(INDEX, "{\"weight_map\":{\"embed.weight\":\"" SHARD1 "\"}}"));
    expect_rule("zip named .safetensors", &l, WSD_EBADCKPT, "E_IDX_EXT_MISMATCH");
    ASSERT_STR_CONTAINS(l.err.msg, "torch zip file in a safetensors index");
    ld_free(&l);
    /* ...and safetensors bytes under a .bin name in a torch index. */
    st_write_ref("pytorch_model.bin", s, 1, NULL, NULL);
    l = load(st_put_str("pytorch_model.bin.index.json",
                        "{\"weight_map\":{\"embed.weight\":\"pytorch_model.bin\"}}"));
    expect_rule("safetensors named .bin", &l, WSD_EBADCKPT, "E_IDX_EXT_MISMATCH");
    ld_free(&l);
    /* An index whose name says neither. */
    l = load(
        st_put_str("weights.index.json", "{\"weight_map\":{\"embed.weight\":\"" SHARD1 "\"}}"));
    expect_rule("unknown index name", &l, WSD_EBADCKPT, "E_IDX_EXT_MISMATCH");
    ld_free(&l);
}

/* Index documents that are not what §5.2 describes. */
static const struct doc_case {
    const char *name;
    const char *json;
    int code;
    const char *rule;
} bad_docs[] = {
    {"bad_index_not_object", "[\"" SHARD1 "\"]", WSD_EBADCKPT, "E_IDX_SCHEMA"},
    {"index is a string", "\"x\"", WSD_EBADCKPT, "E_IDX_JSON"},
    {"bad_weight_map_value_type", "{\"weight_map\":{\"embed.weight\":1}}", WSD_EBADCKPT,
     "E_IDX_SCHEMA"},
    {"weight_map value null", "{\"weight_map\":{\"embed.weight\":null}}", WSD_EBADCKPT,
     "E_IDX_SCHEMA"},
    {"weight_map value list", "{\"weight_map\":{\"embed.weight\":[\"" SHARD1 "\"]}}", WSD_EBADCKPT,
     "E_IDX_SCHEMA"},
    {"no weight_map", "{\"metadata\":{}}", WSD_EBADCKPT, "E_IDX_SCHEMA"},
    {"weight_map is a list", "{\"weight_map\":[]}", WSD_EBADCKPT, "E_IDX_SCHEMA"},
    {"empty weight_map", "{\"weight_map\":{}}", WSD_EBADCKPT, "E_IDX_SCHEMA"},
    {"metadata is a list", "{\"metadata\":[]," WEIGHT_MAP "}", WSD_EBADCKPT, "E_IDX_SCHEMA"},
    {"bad_dup_key",
     "{\"weight_map\":{\"embed.weight\":\"" SHARD1 "\",\"embed.weight\":\"" SHARD2 "\"}}",
     WSD_EBADCKPT, "E_IDX_JSON"},
    {"dup weight_map", "{" WEIGHT_MAP "," WEIGHT_MAP "}", WSD_EBADCKPT, "E_IDX_JSON"},
    {"dup in metadata", "{\"metadata\":{\"total_size\":1,\"total_size\":2}," WEIGHT_MAP "}",
     WSD_EBADCKPT, "E_IDX_JSON"},
    {"not json", "weight_map: {}", WSD_EBADCKPT, "E_IDX_JSON"},
    {"trailing garbage", "{" WEIGHT_MAP "} x", WSD_EBADCKPT, "E_IDX_JSON"},
    {"truncated", "{\"weight_map\":{\"embed.weight\":\"" SHARD1, WSD_EBADCKPT, "E_IDX_JSON"},
    {"non-utf8", "{\"weight_map\":{\"\xff\":\"" SHARD1 "\"}}", WSD_EBADCKPT, "E_IDX_JSON"},
    {"empty file", "", WSD_EBADCKPT, "E_IDX_JSON"},
    /* The safetensors header's dialect (jscan.h), the same for the index. */
    {"escaped NUL in a name", "{\"weight_map\":{\"embed\\u0000x\":\"" SHARD1 "\"}}", WSD_EBADCKPT,
     "E_IDX_JSON"},
    {"lone surrogate", "{\"weight_map\":{\"\\ud800\":\"" SHARD1 "\"}}", WSD_EBADCKPT, "E_IDX_JSON"},
    {"minus zero", "{\"metadata\":{\"total_size\":-0}," WEIGHT_MAP "}", WSD_EBADCKPT, "E_IDX_JSON"},
    {"int64 overflow", "{\"metadata\":{\"total_size\":9223372036854775808}," WEIGHT_MAP "}",
     WSD_EBADCKPT, "E_IDX_JSON"},
    {"raw control character", "{\"weight_map\":{\"a\tb\":\"" SHARD1 "\"}}", WSD_EBADCKPT,
     "E_IDX_JSON"},
    {"weight_map an array", "{\"weight_map\":[\"" SHARD1 "\"]}", WSD_EBADCKPT, "E_IDX_SCHEMA"},
    {"metadata a string", "{\"metadata\":\"x\"," WEIGHT_MAP "}", WSD_EBADCKPT, "E_IDX_SCHEMA"},
    {"no weight_map", "{\"metadata\":{}}", WSD_EBADCKPT, "E_IDX_SCHEMA"},
    {"weight_map empty", "{\"weight_map\":{}}", WSD_EBADCKPT, "E_IDX_SCHEMA"},
};

/* Nesting past 128 levels (serde's limit, jscan's) is refused wherever it is, metadata too. */
TEST(deep_metadata)
{
    char doc[1024], *p = doc;
    ld_t l;

    write_sharded();
    for (int depth = 128; depth <= 129; depth++) {
        p = doc + sprintf(doc, "{\"metadata\":{\"deep\":");
        for (int i = 0; i < depth - 2; i++)
            *p++ = '[';
        for (int i = 0; i < depth - 2; i++)
            *p++ = ']';
        sprintf(p, "}," WEIGHT_MAP "}");
        l = load(st_put_str(INDEX, doc));
        if (depth == 128) {
            expect_ok("128 deep", &l);
            ASSERT_EQ(strlen(meta(l.m, "metadata.deep")), 2 * 126);
        } else {
            expect_rule("129 deep", &l, WSD_EBADCKPT, "E_IDX_JSON");
            ASSERT_STR_CONTAINS(l.err.msg, "128");
        }
        ld_free(&l);
    }
}

/* Names are matched decoded: an escaped weight_map key finds its tensor; metadata values are
 * kept as compact JSON whatever their spacing; messages name what is wrong and where. */
TEST(decoded_names_and_messages)
{
    ld_t l;

    write_sharded();
    l = load(st_put_str(INDEX, "{ \"metadata\" : { \"total_size\" : 28 , \"list\" : [ 1 , "
                               "{ \"k\" : \"v\\u00e9\" } ] } , \"weight_map\" : {"
                               "\"embed\\u002eweight\":\"" SHARD1 "\",\"lm_head.bias\":"
                               "\"model-00002-of-00002\\u002esafetensors\",\"norm.weight\":\"" SHARD2
                               "\"}}"));
    expect_ok("escaped names", &l);
    ASSERT_EQ(l.m->ntensors, 3);
    ASSERT_EQ(l.nsrc, 2);
    ASSERT_STR_EQ(l.m->tensors[0].name, "embed.weight");
    ASSERT_EQ(l.m->nwarnings, 0);
    ASSERT_STR_EQ(meta(l.m, "metadata.list"), "[1,{\"k\":\"v\xc3\xa9\"}]");
    ld_free(&l);

    l = load(st_put_str(INDEX, "{\"weight_map\":{\"embed.weight\":\"" SHARD1 "\",\"x\":7}}"));
    expect_rule("number shard", &l, WSD_EBADCKPT, "E_IDX_SCHEMA");
    ASSERT_STR_CONTAINS(l.err.msg, "'x' is an integer, not a string");
    ld_free(&l);

    l = load(st_put_str(INDEX, "{\"weight_map\":{\"a\xc3\":\"" SHARD1 "\"}}"));
    expect_rule("bad utf-8", &l, WSD_EBADCKPT, "E_IDX_JSON");
    ASSERT_STR_CONTAINS(l.err.msg, "not valid UTF-8, at byte 17");
    ld_free(&l);

    l = load(st_put_str(INDEX, "{\"weight_map\":{\"a\":\"" SHARD1 "\"},}"));
    expect_rule("trailing comma", &l, WSD_EBADCKPT, "E_IDX_JSON");
    ASSERT_STR_CONTAINS(l.err.msg, "is not valid JSON");
    ASSERT_STR_CONTAINS(l.err.msg, "string key expected, at byte 55");
    ld_free(&l);

    l = load(st_put_str(INDEX, "[1]"));
    expect_rule("array", &l, WSD_EBADCKPT, "E_IDX_SCHEMA");
    ASSERT_STR_CONTAINS(l.err.msg, "the index is an array, not a JSON object");
    ld_free(&l);
}

TEST(bad_index_documents)
{
    write_sharded();
    for (size_t i = 0; i < sizeof(bad_docs) / sizeof(bad_docs[0]); i++) {
        ld_t l = load(st_put_str(INDEX, bad_docs[i].json));

        expect_rule(bad_docs[i].name, &l, bad_docs[i].code, bad_docs[i].rule);
        ld_free(&l);
    }
}

TEST(dup_key_message)
{
    ld_t l;

    write_sharded();
    l = load(st_put_str(INDEX, "{\"weight_map\":{\"a\":\"" SHARD1 "\",\"a\":\"" SHARD2 "\"}}"));
    expect_rule("dup", &l, WSD_EBADCKPT, "E_IDX_JSON");
    ASSERT_STR_CONTAINS(l.err.msg, "repeats a key");
    ld_free(&l);
}

TEST(shard_errors_propagate)
{
    static const char bad[] = "{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,4]}}";
    st_buf_t f = st_file(bad, sizeof(bad) - 1, 8, 4);
    ld_t l;

    /* A shard the safetensors reader refuses keeps that reader's rule. */
    st_put(SHARD1, f.p, f.n);
    free(f.p);
    l = load(st_put_str(INDEX, "{\"weight_map\":{\"w\":\"" SHARD1 "\"}}"));
    expect_rule("bad shard", &l, WSD_EBADCKPT, "E_ST_SIZE_MISMATCH");
    ASSERT_STR_CONTAINS(l.err.msg, "E_ST_SIZE_MISMATCH: shard '" SHARD1 "': tensor 'w'");
    ld_free(&l);
    /* A directory where a shard should be. */
    ASSERT_EQ(mkdir(st_path("dir.safetensors"), 0755), 0);
    l = load(st_put_str(INDEX, "{\"weight_map\":{\"w\":\"dir.safetensors\"}}"));
    expect_rule("directory shard", &l, WSD_EBADCKPT, "E_NOT_REGULAR");
    ld_free(&l);
    /* A tiny shard fails format detection. */
    st_put("tiny.safetensors", "abc", 3);
    l = load(st_put_str(INDEX, "{\"weight_map\":{\"w\":\"tiny.safetensors\"}}"));
    expect_rule("tiny shard", &l, WSD_EBADCKPT, "E_TOO_SMALL");
    ld_free(&l);
}

TEST(shard_warnings_name_the_shard)
{
    static const char hdr[] = "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                              "\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[1,5]}}";
    st_buf_t f = st_file(hdr, sizeof(hdr) - 1, 8, 5);
    const char *w;
    ld_t l;

    st_put(SHARD1, f.p, f.n);
    free(f.p);
    l = load(st_put_str(INDEX, "{\"metadata\":{\"total_size\":5},\"weight_map\":{"
                               "\"a\":\"" SHARD1 "\",\"w\":\"" SHARD1 "\"}}"));
    expect_ok("unaligned shard", &l);
    w = warning(l.m, "W_UNALIGNED");
    ASSERT_STR_CONTAINS(w, "W_UNALIGNED: shard '" SHARD1 "': ");
    ASSERT_STR_CONTAINS(w, "tensor 'w'");
    ASSERT_EQ(l.m->nwarnings, 1);
    ld_free(&l);
}

TEST(geometry_validated_after_merge)
{
    /* An empty tensor name is legal JSON; manifest_validate() still refuses it. */
    static const st_spec_t s1[] = {{"", "U8", 1, {1}}};
    ld_t l;

    st_write_ref(SHARD1, s1, 1, NULL, NULL);
    l = load(st_put_str(INDEX, "{\"weight_map\":{\"\":\"" SHARD1 "\"}}"));
    expect_rule("empty name", &l, WSD_EBADCKPT, "E_TENSOR_NAME");
    ld_free(&l);
}

TEST(limits)
{
    st_buf_t b = {0};
    char *path;
    ld_t l;
    int fd;

    /* More shard files than INDEX_SHARDS_MAX: refused before any is opened. */
    st_buf_str(&b, "{\"weight_map\":{");
    for (int i = 0; i < 4097; i++) {
        char tmp[96];
        int k =
            snprintf(tmp, sizeof(tmp), "%s\"t%d\":\"model-%05d.safetensors\"", i ? "," : "", i, i);

        st_buf_add(&b, tmp, (size_t)k);
    }
    st_buf_str(&b, "}}");
    l = load(st_put(INDEX, b.p, b.n));
    expect_rule("4097 shards", &l, WSD_ELIMIT, "E_IDX_SCHEMA");
    ld_free(&l);
    free(b.p);

    /* An index file past 64 MiB is not even read (sparse, so cheap). */
    path = st_put_str(INDEX, "{");
    fd = open(path, O_WRONLY | O_CLOEXEC);
    ASSERT(fd >= 0);
    ASSERT_EQ(ftruncate(fd, (64 << 20) + 1), 0);
    close(fd);
    l = load(path);
    expect_rule("65 MiB index", &l, WSD_ELIMIT, "E_IDX_JSON");
    ld_free(&l);
}

TEST(variant_names_and_fmt_load)
{
    fmt_opts_t opts = {.key = "model"};
    manifest_t *m = NULL;
    source_t *src = NULL;
    size_t nsrc = 0;
    fmt_err_t err = {0};
    char *path;
    ld_t l;

    write_sharded();
    /* transformers' variant spelling (§5.1) is recognised by index_load itself. */
    l = load(st_put_str("model.safetensors.index.fp16.json", "{" WEIGHT_MAP "}"));
    expect_ok("variant", &l);
    ASSERT_STR_EQ(l.m->format, "safetensors-index");
    ld_free(&l);

    path = st_put_str(INDEX, "{\"metadata\":{\"total_size\":28}," WEIGHT_MAP "}");
    ASSERT_EQ(fmt_load(path, NULL, &m, &src, &nsrc, &err), 0);
    ASSERT_STR_EQ(m->format, "safetensors-index");
    ASSERT_EQ(nsrc, 2);
    ASSERT_EQ(m->ntensors, 3);
    ASSERT_EQ(m->nwarnings, 0);
    for (size_t i = 0; i < nsrc; i++)
        source_close(&src[i]);
    free(src);
    manifest_free(m);

    l = load_opts(path, &opts);
    expect_rule("--key", &l, WSD_EINVAL, "E_KEY");
    ld_free(&l);
    l = load(st_path("absent.safetensors.index.json"));
    ASSERT(l.r < 0);
    ASSERT_STR_CONTAINS(l.err.msg, "E_OPEN");
    ld_free(&l);
}

/* Every prefix of a valid index is refused cleanly, never accepted halfway (RELIABILITY M1). */
TEST(index_truncation_every_offset)
{
    static const char doc[] = "{\"metadata\":{\"total_size\":28}," WEIGHT_MAP "}";

    write_sharded();
    for (size_t len = 0; len < sizeof(doc) - 1; len++) {
        ld_t l = load(st_put(INDEX, doc, len));

        if (l.r == 0)
            TEST_FAIL("prefix of %zu bytes accepted", len);
        ld_free(&l);
    }
}

/* Torch shards: written by torch 1.13 when available. */
static void write_bin_shards(void)
{
    char cmd[1024];
    int st;

    snprintf(cmd, sizeof(cmd), "%s %s/tests/fixtures/idx_bin_shards.py '%s'", WSD_PYTHON,
             WSD_SOURCE_DIR, st_tmpdir());
    st = system(cmd);
    if (WIFEXITED(st) && WEXITSTATUS(st) == 77)
        SKIP("torch is not importable by " WSD_PYTHON);
    ASSERT(WIFEXITED(st) && WEXITSTATUS(st) == 0);
}

#define BIN1 "pytorch_model-00001-of-00002.bin"
#define BIN2 "pytorch_model-00002-of-00002.bin"

TEST(ok_sharded_bin)
{
    const mf_tensor_t *a, *b;
    ld_t l;

    write_bin_shards();
    l = load(st_put_str("pytorch_model.bin.index.json",
                        "{\"metadata\":{\"total_size\":52},\"weight_map\":{"
                        "\"embed.weight\":\"" BIN1 "\",\"lm_head.bias\":\"" BIN2 "\","
                        "\"norm.weight\":\"" BIN2 "\",\"tied.a\":\"" BIN2 "\","
                        "\"tied.b\":\"" BIN2 "\"}}"));
    expect_ok("ok_sharded_bin", &l);
    ASSERT_STR_EQ(l.m->format, "torch-index");
    ASSERT_EQ(l.nsrc, 2);
    ASSERT_EQ(l.m->ntensors, 5);
    ASSERT_EQ(tensor(l.m, "embed.weight")->dtype, WSD_DTYPE_F32);
    ASSERT_EQ(tensor(l.m, "embed.weight")->shape[1], 2);
    ASSERT_EQ(l.m->storages[tensor(l.m, "embed.weight")->storage].source, 0);
    ASSERT_EQ(l.m->storages[tensor(l.m, "norm.weight")->storage].source, 1);
    /* Tied names keep sharing one storage, counted once in total_size (16 + 4 + 8 + 24). */
    a = tensor(l.m, "tied.a");
    b = tensor(l.m, "tied.b");
    ASSERT_EQ(a->storage, b->storage);
    ASSERT_EQ(l.m->nstorages, 4);
    ASSERT(manifest_find(l.m, "extra") < 0);
    ASSERT_EQ(count_warnings(l.m, "W_UNLISTED_TENSOR"), 1);
    ASSERT_EQ(count_warnings(l.m, "W_TOTAL_SIZE"), 0);
    ld_free(&l);

    /* One tied name unlisted: the other keeps the storage. */
    l = load(st_put_str("pytorch_model.bin.index.json",
                        "{\"metadata\":{\"total_size\":52},\"weight_map\":{"
                        "\"embed.weight\":\"" BIN1 "\",\"lm_head.bias\":\"" BIN2 "\","
                        "\"norm.weight\":\"" BIN2 "\",\"tied.b\":\"" BIN2 "\"}}"));
    expect_ok("one tied name", &l);
    ASSERT_EQ(l.m->ntensors, 4);
    ASSERT_EQ(l.m->nstorages, 4);
    ASSERT_EQ(count_warnings(l.m, "W_TOTAL_SIZE"), 0);
    ld_free(&l);

    /* A .bin index naming a tensor its shard lacks. */
    l = load(st_put_str("pytorch_model.bin.index.json",
                        "{\"weight_map\":{\"embed.weight\":\"" BIN1 "\",\"nope\":\"" BIN1 "\"}}"));
    expect_rule("bin missing tensor", &l, WSD_EBADCKPT, "E_IDX_MISSING_TENSOR");
    ld_free(&l);
}

int main(int argc, char **argv)
{
    return test_main(argc, argv);
}
