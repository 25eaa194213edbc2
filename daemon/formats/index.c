/*
 * index.c - Hugging Face sharded checkpoints (FORMATS.md §5): model.safetensors.index.json and
 * pytorch_model.bin.index.json. The index is trusted no more than the shards: its weight_map
 * decides which tensors the model has and which file holds each, so every shard name is checked
 * for path safety and extension before anything is opened, and every listed tensor must be found
 * in its shard.
 *
 * Divided into: reading and parsing the index (size cap, strict JSON, schema); shard name
 * checks; reading each shard with its single-file reader into a scratch manifest; and merging
 * the listed tensors of each shard, with their storages, into the model's manifest.
 *
 * Policy for tensors a shard holds but weight_map does not list (W_UNLISTED_TENSOR): they are
 * dropped. The index is the model's table of contents; such tensors are tied-weight aliases or
 * leftovers (§5.3), serving them would cost memory for bytes nobody asked for, and keeping
 * them could collide with a listed name from another shard.
 */
#include "index.h"

#include <errno.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "checked.h"
#include "fmt.h"
#include "jscan.h"
#include "strhash.h"

_Static_assert(MANIFEST_TENSORS_MAX == 1u << 20 && MANIFEST_STORAGES_MAX == 1u << 20,
               "the E_LIMIT messages below say 2^20");

#define INDEX_FILE_MAX   (64u << 20) /* bytes of index JSON; real ones are well under 1 MiB */
#define INDEX_SHARDS_MAX 4096u       /* distinct shard files; real models use a few hundred */

typedef enum index_kind {
    INDEX_SAFETENSORS,
    INDEX_TORCH,
} index_kind_t;

/* One weight_map member. */
typedef struct idx_entry {
    const char *name;  /* tensor name; in the index_doc_t's string arena */
    const char *shard; /* shard file name as written; in the same arena */
    uint32_t shard_ix; /* position in the sorted shard list */
} idx_entry_t;

/* Shortened, control-character-free rendering of a name for messages (see safetensors.c). */
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

static bool ends_with(const char *s, const char *suffix)
{
    size_t a = strlen(s), b = strlen(suffix);

    return a >= b && strcmp(s + a - b, suffix) == 0;
}

/*
 * The index type comes from its file name (§5.1), variants included:
 * model.safetensors.index.json, model.safetensors.index.fp16.json, diffusion_pytorch_model...
 */
static int index_kind_of(const char *path, index_kind_t *ret, fmt_err_t *err)
{
    const char *base = strrchr(path, '/');

    base = base ? base + 1 : path;
    if (strstr(base, ".safetensors.index."))
        *ret = INDEX_SAFETENSORS;
    else if (strstr(base, ".bin.index."))
        *ret = INDEX_TORCH;
    else
        return fmt_fail(err, WSD_EBADCKPT, "E_IDX_EXT_MISMATCH",
                        "'%s': an index must be named *.safetensors.index*.json or "
                        "*.bin.index*.json to say what its shards are",
                        path);
    return 0;
}

/*
 * §5.3 path safety: no root, no drive, no ".." component, with both '/' and '\\' taken as
 * separators so a name means the same thing to every tool that reads the index. The check is
 * lexical on purpose: the Hugging Face cache makes every shard a symlink into ../../blobs, so
 * where a link points is not ours to judge. Control characters are refused so a name cannot
 * forge log lines.
 */
static int check_shard_name(const char *shard, index_kind_t kind, fmt_err_t *err)
{
    const char *p = shard;

    if (!shard[0])
        return fmt_fail(err, WSD_EBADCKPT, "E_IDX_UNSAFE_PATH", "empty shard name in weight_map");
    if (shard[0] == '/' || shard[0] == '\\')
        return fmt_fail(err, WSD_EBADCKPT, "E_IDX_UNSAFE_PATH",
                        "shard '%s' is an absolute path; shards must lie beside the index",
                        SHOWN(shard));
    if (((shard[0] >= 'A' && shard[0] <= 'Z') || (shard[0] >= 'a' && shard[0] <= 'z')) &&
        shard[1] == ':')
        return fmt_fail(err, WSD_EBADCKPT, "E_IDX_UNSAFE_PATH",
                        "shard '%s' names a drive; shards must lie beside the index", SHOWN(shard));
    for (const char *c = shard; *c; c++)
        if ((unsigned char)*c < 0x20 || *c == 0x7f)
            return fmt_fail(err, WSD_EBADCKPT, "E_IDX_UNSAFE_PATH",
                            "shard '%s' contains a control character", SHOWN(shard));
    while (*p) {
        size_t n = strcspn(p, "/\\");

        if (n == 2 && p[0] == '.' && p[1] == '.')
            return fmt_fail(err, WSD_EBADCKPT, "E_IDX_UNSAFE_PATH",
                            "shard '%s' has a '..' component; shards must lie beside the index",
                            SHOWN(shard));
        p += n;
        if (*p)
            p++;
    }
    if (!ends_with(shard, kind == INDEX_SAFETENSORS ? ".safetensors" : ".bin"))
        return fmt_fail(err, WSD_EBADCKPT, "E_IDX_EXT_MISMATCH",
                        "shard '%s' in a %s index must end in %s", SHOWN(shard),
                        kind == INDEX_SAFETENSORS ? "safetensors" : "pytorch_model.bin",
                        kind == INDEX_SAFETENSORS ? ".safetensors" : ".bin");
    return 0;
}

/*
 * The index file, checked by jscan (the safetensors header's scanner, FORMATS.md §5.3: strict
 * JSON, no key repeated at any level), with cursors on the two members it is read for. No
 * document tree: a 64 MiB weight_map costs the file and one arena of its decoded names.
 */
typedef struct index_doc {
    uint8_t *text;
    size_t len;
    jscan_t map;  /* at weight_map's value; .p NULL when absent */
    jscan_t meta; /* at metadata's value; .p NULL when absent */
} index_doc_t;

static void doc_free(index_doc_t *d)
{
    free(d->text);
    *d = (index_doc_t){0};
}

static int json_fail(fmt_err_t *err, const char *path, const jscan_err_t *je)
{
    switch (je->kind) {
    case JSCAN_DUP:
        return fmt_fail(err, WSD_EBADCKPT, "E_IDX_JSON", "'%s' repeats a key (%s), at byte %zu",
                        path, je->msg, je->at);
    case JSCAN_LIMIT:
        return fmt_fail(err, WSD_ELIMIT, "E_IDX_JSON", "'%s' has %s, at byte %zu", path, je->msg,
                        je->at);
    case JSCAN_NOMEM:
        return fmt_fail(err, -ENOMEM, NULL, "out of memory checking '%s'", path);
    default:
        return fmt_fail(err, WSD_EBADCKPT, "E_IDX_JSON", "'%s' is not valid JSON: %s, at byte %zu",
                        path, je->msg, je->at);
    }
}

/* Reads the whole index file, capped, checks it and finds weight_map and metadata. */
static int load_doc(const char *path, index_doc_t *d, fmt_err_t *err)
{
    source_t s = {.fd = -1};
    jscan_err_t je;
    jscan_t top;
    char key[16];
    size_t n, bad;
    int r;

    *d = (index_doc_t){0};
    r = source_open(path, &s, err);
    if (r < 0)
        return r;
    if (s.size > INDEX_FILE_MAX) {
        r = fmt_fail(err, WSD_ELIMIT, "E_IDX_JSON", "'%s' is %llu bytes, at most %u are accepted",
                     path, (unsigned long long)s.size, INDEX_FILE_MAX);
        goto out;
    }
    d->len = (size_t)s.size;
    d->text = malloc(d->len ? d->len : 1);
    if (!d->text) {
        r = fmt_fail(err, -ENOMEM, NULL, "out of memory");
        goto out;
    }
    r = source_pread(&s, d->text, d->len, 0, err);
    if (r < 0)
        goto out;
    bad = jscan_utf8(d->text, d->len);
    if (bad < d->len) {
        r = fmt_fail(err, WSD_EBADCKPT, "E_IDX_JSON", "'%s' is not valid UTF-8, at byte %zu",
                     path, bad);
        goto out;
    }
    /* Duplicate keys are refused at every level, weight_map included (§5.3). */
    r = jscan_check(d->text, d->len, &n, &je);
    if (r < 0) {
        r = json_fail(err, path, &je);
        goto out;
    }
    top = (jscan_t){.p = d->text, .len = d->len};
    if (jscan_ws(&top) != '{') {
        r = fmt_fail(err, WSD_EBADCKPT, "E_IDX_SCHEMA", "'%s': the index is %s, not a JSON object",
                     path, jscan_kind(&top));
        goto out;
    }
    for (jscan_enter(&top); jscan_member(&top, key, sizeof(key), &n); jscan_skip(&top)) {
        if (n == 10 && memcmp(key, "weight_map", 10) == 0)
            d->map = top;
        else if (n == 8 && memcmp(key, "metadata", 8) == 0)
            d->meta = top;
    }
    if (!d->map.p || jscan_ws(&d->map) != '{') {
        r = fmt_fail(err, WSD_EBADCKPT, "E_IDX_SCHEMA", "'%s': %s", path,
                     d->map.p ? "weight_map is not an object" : "no weight_map");
        goto out;
    }
    if (d->meta.p && jscan_ws(&d->meta) != '{') {
        r = fmt_fail(err, WSD_EBADCKPT, "E_IDX_SCHEMA", "'%s': metadata is not an object", path);
        goto out;
    }
    r = 0;
out:
    if (r < 0)
        doc_free(d);
    source_close(&s);
    return r;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static int cmp_entry_shard(const void *a, const void *b)
{
    const idx_entry_t *x = a, *y = b;

    if (x->shard_ix != y->shard_ix)
        return x->shard_ix < y->shard_ix ? -1 : 1;
    return strcmp(x->name, y->name);
}

/*
 * weight_map -> entries, plus the sorted distinct shard names (transformers' order, §5.2).
 * Every name is decoded into *ret_strings, one arena as long as the file (a decoded string is
 * at least a byte shorter than its encoding, quotes included), which the rest point into.
 */
static int parse_weight_map(const index_doc_t *d, index_kind_t kind, idx_entry_t **ret_ents,
                            size_t *ret_n, const char ***ret_shards, size_t *ret_nshards,
                            char **ret_strings, fmt_err_t *err)
{
    size_t n = 0, nshards = 0, i = 0, used = 0;
    idx_entry_t *ents = NULL;
    const char **shards = NULL;
    char *arena = NULL;
    jscan_t j = d->map;
    int r = 0;

    for (jscan_enter(&j); jscan_key(&j); jscan_skip(&j)) {
        jscan_skip(&j);
        jscan_colon(&j);
        n++;
    }
    if (n == 0)
        return fmt_fail(err, WSD_EBADCKPT, "E_IDX_SCHEMA", "weight_map names no tensors");
    if (n > MANIFEST_TENSORS_MAX)
        return fmt_fail(err, WSD_ELIMIT, "E_IDX_SCHEMA",
                        "weight_map names %zu tensors, at most %u are supported", n,
                        MANIFEST_TENSORS_MAX);
    ents = calloc(n, sizeof(*ents));
    shards = calloc(n, sizeof(*shards));
    arena = malloc(d->len + 1);
    if (!ents || !shards || !arena) {
        r = fmt_fail(err, -ENOMEM, NULL, "out of memory for %zu weight_map entries", n);
        goto fail;
    }
    j = d->map;
    for (jscan_enter(&j); jscan_key(&j); i++) {
        char *name = arena + used;

        used += jscan_string(&j, name, d->len + 1 - used) + 1;
        jscan_colon(&j);
        if (jscan_ws(&j) != '"') {
            r = fmt_fail(err, WSD_EBADCKPT, "E_IDX_SCHEMA",
                         "weight_map entry '%s' is %s, not a string naming a shard", SHOWN(name),
                         jscan_kind(&j));
            goto fail;
        }
        ents[i].name = name;
        ents[i].shard = arena + used;
        used += jscan_string(&j, arena + used, d->len + 1 - used) + 1;
        r = check_shard_name(ents[i].shard, kind, err);
        if (r < 0)
            goto fail;
        shards[i] = ents[i].shard;
    }
    qsort(shards, n, sizeof(*shards), cmp_str);
    for (i = 0; i < n; i++)
        if (nshards == 0 || strcmp(shards[nshards - 1], shards[i]) != 0)
            shards[nshards++] = shards[i];
    if (nshards > INDEX_SHARDS_MAX) {
        r = fmt_fail(err, WSD_ELIMIT, "E_IDX_SCHEMA",
                     "weight_map names %zu shard files, at most %u are supported", nshards,
                     INDEX_SHARDS_MAX);
        goto fail;
    }
    for (i = 0; i < n; i++) {
        const char **hit = bsearch(&ents[i].shard, shards, nshards, sizeof(*shards), cmp_str);

        ents[i].shard_ix = (uint32_t)(hit - shards);
    }
    qsort(ents, n, sizeof(*ents), cmp_entry_shard);
    *ret_ents = ents;
    *ret_n = n;
    *ret_shards = shards;
    *ret_nshards = nshards;
    *ret_strings = arena;
    return 0;

fail:
    free(ents);
    free(shards);
    free(arena);
    return r;
}

/* Open-addressing table from tensor name to index in a scratch manifest. */
typedef struct name_table {
    uint32_t *slot; /* tensor index, or UINT32_MAX for an empty slot */
    size_t mask;    /* capacity - 1, capacity a power of two >= 2 * entries */
} name_table_t;

static int table_build(name_table_t *t, const manifest_t *m)
{
    size_t cap = 16;

    while (cap < m->ntensors * 2)
        cap *= 2;
    t->slot = malloc(cap * sizeof(*t->slot));
    if (!t->slot)
        return -ENOMEM;
    memset(t->slot, 0xff, cap * sizeof(*t->slot));
    t->mask = cap - 1;
    for (size_t i = 0; i < m->ntensors; i++) {
        size_t h = (size_t)strhash(m->tensors[i].name, strlen(m->tensors[i].name)) & t->mask;

        while (t->slot[h] != UINT32_MAX)
            h = (h + 1) & t->mask;
        t->slot[h] = (uint32_t)i;
    }
    return 0;
}

static ssize_t table_find(const name_table_t *t, const manifest_t *m, const char *name)
{
    size_t h = (size_t)strhash(name, strlen(name)) & t->mask;

    for (; t->slot[h] != UINT32_MAX; h = (h + 1) & t->mask)
        if (strcmp(m->tensors[t->slot[h]].name, name) == 0)
            return t->slot[h];
    return -1;
}

/* Shard warnings keep their rule first and gain the shard's name: "W_X: shard 'a': ...". */
static void copy_warnings(manifest_t *m, const manifest_t *part, const char *shard)
{
    m->warnings_lost |= part->warnings_lost;
    for (size_t i = 0; i < part->nwarnings && m->nwarnings < MANIFEST_WARNINGS_MAX; i++) {
        const char *w = part->warnings[i];
        const char *colon = strstr(w, ": ");
        char rule[64];

        if (!colon || (size_t)(colon - w) >= sizeof(rule)) {
            fmt_warn(m, "W_SHARD", "shard '%s': %s", SHOWN(shard), w);
            continue;
        }
        memcpy(rule, w, (size_t)(colon - w));
        rule[colon - w] = '\0';
        fmt_warn(m, rule, "shard '%s': %s", SHOWN(shard), colon + 2);
    }
}

/*
 * Moves the tensors of \p part marked in \p keep into \p m, in shard order, each storage once
 * however many kept tensors view it (tied weights in .bin shards). Adds the bytes of the moved
 * storages to *total. Shard metadata is kept per shard ("<shard>/<key>"), never merged (§5.3).
 */
static int merge_shard(manifest_t *m, const manifest_t *part, const bool *keep, const char *shard,
                       uint64_t *total, fmt_err_t *err)
{
    uint32_t *remap = NULL;
    int r = 0;

    if (part->nstorages) {
        remap = malloc(part->nstorages * sizeof(*remap));
        if (!remap)
            return fmt_fail(err, -ENOMEM, NULL, "out of memory");
        memset(remap, 0xff, part->nstorages * sizeof(*remap));
    }
    for (size_t i = 0; i < part->ntensors; i++) {
        mf_tensor_t t = part->tensors[i];
        const mf_storage_t *s;

        if (!keep[i])
            continue;
        if (t.storage >= part->nstorages) {
            r = fmt_fail(err, WSD_EBADCKPT, "E_STORAGE_MISSING",
                         "shard '%s': tensor '%s' has no storage", SHOWN(shard), SHOWN(t.name));
            goto out;
        }
        s = &part->storages[t.storage];
        if (remap[t.storage] == UINT32_MAX) {
            uint32_t ix;

            r = manifest_add_storage(m, s->key, s->source, s->src_offset, s->nbytes, s->dtype, &ix);
            if (r < 0) {
                r = fmt_fail(err, r == WSD_ELIMIT ? WSD_ELIMIT : -ENOMEM,
                             r == WSD_ELIMIT ? "E_LIMIT" : NULL,
                             "cannot record storages of shard '%s': %s", SHOWN(shard),
                             r == WSD_ELIMIT ? "more than 2^20 in the model" : "out of memory");
                goto out;
            }
            m->storages[ix].has_crc = s->has_crc;
            m->storages[ix].crc32 = s->crc32;
            remap[t.storage] = ix;
            if (!ck_add_u64(*total, s->nbytes, total))
                *total = UINT64_MAX;
        }
        t.storage = remap[t.storage];
        r = manifest_add_tensor(m, &t);
        if (r < 0) {
            r = fmt_fail(err, r == WSD_ELIMIT ? WSD_ELIMIT : -ENOMEM,
                         r == WSD_ELIMIT ? "E_LIMIT" : NULL,
                         "cannot record tensors of shard '%s': %s", SHOWN(shard),
                         r == WSD_ELIMIT ? "more than 2^20 in the model" : "out of memory");
            goto out;
        }
    }
    for (size_t i = 0; i < part->nmeta; i++) {
        size_t n = strlen(shard) + strlen(part->meta[i].key) + 2;
        char *key = malloc(n);

        if (!key) {
            r = fmt_fail(err, -ENOMEM, NULL, "out of memory");
            goto out;
        }
        snprintf(key, n, "%s/%s", shard, part->meta[i].key);
        r = manifest_add_meta(m, key, part->meta[i].value);
        free(key);
        if (r < 0) {
            r = fmt_fail(err, r == WSD_ELIMIT ? WSD_ELIMIT : -ENOMEM,
                         r == WSD_ELIMIT ? "E_LIMIT" : NULL, "cannot record metadata of shard '%s': %s",
                         SHOWN(shard),
                         r == WSD_ELIMIT ? "more than 2^16 metadata entries" : "out of memory");
            goto out;
        }
    }
    copy_warnings(m, part, shard);
out:
    free(remap);
    return r;
}

/* Opens one shard; a missing file is the index's fault (E_IDX_MISSING_SHARD), not an I/O error. */
static int open_shard(const char *dir, const char *shard, source_t *ret, fmt_err_t *err)
{
    size_t n = strlen(dir) + strlen(shard) + 2;
    char *path = malloc(n);
    fmt_err_t oerr = {0};
    struct stat st;
    int r;

    if (!path)
        return fmt_fail(err, -ENOMEM, NULL, "out of memory");
    snprintf(path, n, "%s%s", dir, shard);
    r = source_open(path, ret, &oerr);
    if (r < 0) {
        if (stat(path, &st) < 0 && (errno == ENOENT || errno == ENOTDIR))
            r = fmt_fail(err, WSD_EBADCKPT, "E_IDX_MISSING_SHARD",
                         "shard '%s' named by the index does not exist (%s)", SHOWN(shard), path);
        else
            r = fmt_fail(err, oerr.code, NULL, "%s", oerr.msg);
    }
    free(path);
    return r;
}

/* Reads shard \p ix into \p part with the reader its content calls for. */
static int read_shard(const source_t *s, uint32_t ix, const char *shard, index_kind_t kind,
                      manifest_t *part, fmt_err_t *err)
{
    fmt_kind_t fk;
    int r;

    r = fmt_detect(s, &fk, err);
    if (r < 0)
        return r;
    /* The extension matched; the content must too, or a safetensors index could smuggle a
     * pickle in under a .safetensors name (§5.3). */
    if ((kind == INDEX_SAFETENSORS) != (fk == FMT_SAFETENSORS))
        return fmt_fail(err, WSD_EBADCKPT, "E_IDX_EXT_MISMATCH",
                        "shard '%s' is a %s file in a %s index", SHOWN(shard),
                        fk == FMT_SAFETENSORS ? "safetensors" : "torch zip",
                        kind == INDEX_SAFETENSORS ? "safetensors" : "pytorch_model.bin");
    if (fk == FMT_SAFETENSORS)
        return safetensors_read(s, ix, part, err);
    return torch_read(s, ix, NULL, part, err);
}

/*
 * A shard reader's error, with the shard named after the rule when the reader did not already
 * name the file: "E_ST_OFFSETS: shard 'model-00002-of-00002.safetensors': tensor 'w' ...".
 */
static int shard_fail(fmt_err_t *err, const fmt_err_t *serr, const char *shard, const char *path)
{
    const char *colon = strstr(serr->msg, ": ");
    char rule[64];

    if (strstr(serr->msg, path) || !colon || (size_t)(colon - serr->msg) >= sizeof(rule) ||
        strncmp(serr->msg, "E_", 2) != 0)
        return fmt_fail(err, serr->code, NULL, "%s", serr->msg);
    memcpy(rule, serr->msg, (size_t)(colon - serr->msg));
    rule[colon - serr->msg] = '\0';
    return fmt_fail(err, serr->code, rule, "shard '%s': %s", SHOWN(shard), colon + 2);
}

/* Checks metadata.total_size against the bytes actually served; warnings only (§5.3). */
static void check_total_size(manifest_t *m, jscan_t meta, uint64_t total, const char *path)
{
    char key[16];
    uint64_t ts;
    size_t n;

    if (!meta.p) {
        fmt_warn(m, "W_METADATA_FORMAT", "'%s' has no \"metadata\"; total_size not checked", path);
        return;
    }
    for (jscan_enter(&meta); jscan_member(&meta, key, sizeof(key), &n); jscan_skip(&meta)) {
        if (n != 10 || memcmp(key, "total_size", 10) != 0)
            continue;
        if (!jscan_uint(&meta, &ts))
            fmt_warn(m, "W_METADATA_FORMAT",
                     "'%s': metadata.total_size is not a non-negative integer", path);
        else if (ts != total)
            fmt_warn(m, "W_TOTAL_SIZE",
                     "'%s': metadata.total_size is %llu but the listed tensors hold %llu bytes",
                     path, (unsigned long long)ts, (unsigned long long)total);
        return;
    }
    fmt_warn(m, "W_METADATA_FORMAT", "'%s': metadata has no total_size", path);
}

/*
 * The index's own metadata, kept as compact JSON renderings under "metadata.<key>". Each value
 * alone goes through jansson, which renders it; it is a slice jscan_check() already accepted.
 */
static int add_index_meta(manifest_t *m, jscan_t meta, fmt_err_t *err)
{
    for (jscan_enter(&meta); jscan_key(&meta);) {
        char *key = jscan_strdup(&meta), *val = NULL, *k = NULL;
        json_error_t je;
        json_t *v;
        size_t at;
        int r = -ENOMEM;

        if (!key)
            return fmt_fail(err, -ENOMEM, NULL, "out of memory");
        jscan_colon(&meta);
        at = meta.at;
        jscan_skip(&meta);
        v = json_loadb((const char *)meta.p + at, meta.at - at, JSON_DECODE_ANY, &je);
        /* jansson says nothing when an allocation fails before it has begun to parse */
        if (!v && (json_error_code(&je) == json_error_out_of_memory || !je.text[0]))
            r = fmt_fail(err, -ENOMEM, NULL, "out of memory reading index metadata '%s'",
                         SHOWN(key));
        else if (!v) /* jscan's dialect is within jansson's; this is a safety net */
            r = fmt_fail(err, WSD_EBADCKPT, "E_IDX_JSON", "index metadata '%s' at byte %zu: %s",
                         SHOWN(key), at, je.text);
        if (!v) {
            free(key);
            return r;
        }
        val = json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT);
        k = malloc(strlen(key) + sizeof("metadata."));
        if (val && k) {
            snprintf(k, strlen(key) + sizeof("metadata."), "metadata.%s", key);
            r = manifest_add_meta(m, k, val);
        }
        if (r < 0)
            r = fmt_fail(err, r == WSD_ELIMIT ? WSD_ELIMIT : -ENOMEM,
                         r == WSD_ELIMIT ? "E_LIMIT" : NULL, "cannot record index metadata '%s': %s",
                         SHOWN(key),
                         r == WSD_ELIMIT ? "more than 2^16 metadata entries" : "out of memory");
        json_decref(v);
        free(val);
        free(k);
        free(key);
        if (r < 0)
            return r;
    }
    return 0;
}

int index_load(const char *path, const fmt_opts_t *opts, manifest_t **ret_m, source_t **ret_sources,
               size_t *ret_nsources, fmt_err_t *err)
{
    index_kind_t kind = INDEX_SAFETENSORS; /* set by the name check; gcc cannot see it */
    index_doc_t doc = {0};
    char *strings = NULL;
    idx_entry_t *ents = NULL;
    const char **shards = NULL;
    size_t nents = 0, nshards = 0, nopen = 0, next = 0;
    source_t *src = NULL;
    manifest_t *m = NULL, *part = NULL;
    bool *keep = NULL;
    name_table_t tab = {0};
    fmt_err_t serr = {0};
    uint64_t total = 0;
    char *dir = NULL;
    const char *slash;
    int r;

    if (opts && opts->key)
        return fmt_fail(err, WSD_EINVAL, "E_KEY",
                        "--key does not apply to sharded checkpoints ('%s')", path);
    r = index_kind_of(path, &kind, err);
    if (r < 0)
        return r;
    r = load_doc(path, &doc, err);
    if (r < 0)
        return r;
    r = parse_weight_map(&doc, kind, &ents, &nents, &shards, &nshards, &strings, err);
    if (r < 0)
        goto out;

    /* Shard names are relative to the directory holding the index. */
    slash = strrchr(path, '/');
    dir = strndup(path, slash ? (size_t)(slash - path) + 1 : 0);
    m = manifest_new();
    src = calloc(nshards, sizeof(*src));
    if (!dir || !m || !src) {
        r = fmt_fail(err, -ENOMEM, NULL, "out of memory");
        goto out;
    }
    snprintf(m->format, sizeof(m->format), "%s",
             kind == INDEX_SAFETENSORS ? "safetensors-index" : "torch-index");

    for (size_t i = 0; i < nshards; i++) {
        size_t unlisted = 0;
        const char *first_unlisted = NULL;

        r = open_shard(dir, shards[i], &src[i], err);
        if (r < 0)
            goto out;
        nopen++;
        (void)source_cache_policy(&src[i], opts ? opts->page_cache : SOURCE_CACHE_KEEP);
        part = manifest_new();
        if (!part) {
            r = fmt_fail(err, -ENOMEM, NULL, "out of memory");
            goto out;
        }
        r = read_shard(&src[i], (uint32_t)i, shards[i], kind, part, &serr);
        if (r < 0) {
            r = shard_fail(err, &serr, shards[i], src[i].path);
            goto out;
        }
        keep = calloc(part->ntensors ? part->ntensors : 1, sizeof(*keep));
        if (!keep || table_build(&tab, part) < 0) {
            r = fmt_fail(err, -ENOMEM, NULL, "out of memory");
            goto out;
        }
        for (; next < nents && ents[next].shard_ix == i; next++) {
            ssize_t t = table_find(&tab, part, ents[next].name);

            if (t < 0) {
                r = fmt_fail(err, WSD_EBADCKPT, "E_IDX_MISSING_TENSOR",
                             "tensor '%s' is listed in weight_map but not in shard '%s'",
                             SHOWN(ents[next].name), SHOWN(shards[i]));
                goto out;
            }
            keep[t] = true;
        }
        for (size_t t = 0; t < part->ntensors; t++)
            if (!keep[t] && unlisted++ == 0)
                first_unlisted = part->tensors[t].name;
        if (unlisted)
            fmt_warn(m, "W_UNLISTED_TENSOR",
                     "shard '%s' holds %zu tensor%s weight_map does not list, dropped (first: "
                     "'%s')",
                     SHOWN(shards[i]), unlisted, unlisted == 1 ? "" : "s", SHOWN(first_unlisted));
        r = merge_shard(m, part, keep, shards[i], &total, err);
        if (r < 0)
            goto out;
        free(tab.slot);
        tab.slot = NULL;
        free(keep);
        keep = NULL;
        part = manifest_free(part);
    }

    check_total_size(m, doc.meta, total, path);
    if (doc.meta.p) {
        r = add_index_meta(m, doc.meta, err);
        if (r < 0)
            goto out;
    }
    r = manifest_validate(m, err);
    if (r < 0)
        goto out;
    *ret_m = m;
    *ret_sources = src;
    *ret_nsources = nshards;
    m = NULL;
    src = NULL;
    nopen = 0;

out:
    for (size_t i = 0; i < nopen; i++)
        source_close(&src[i]);
    free(src);
    manifest_free(m);
    manifest_free(part);
    free(tab.slot);
    free(keep);
    free(dir);
    free(ents);
    free(shards);
    free(strings);
    doc_free(&doc);
    return r;
}
