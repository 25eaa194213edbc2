/*
 * torch.c - torch_read(): a torch.save zip archive (FORMATS.md §2, §3) into manifest entries,
 * reading it as torch.load would, without executing anything.
 *
 * It owns only its struct ctx. In file order:
 *   - classification of the archive: the <archive>/ prefix, TorchScript and torch.package
 *     refusals, version, byteorder, .storage_alignment;
 *   - the storage table: every persistent id in data.pkl is checked against its record (present,
 *     stored, exactly numel x itemsize bytes) and against every other id naming the same key;
 *   - --key resolution;
 *   - the walk that turns the unpickled tree into names: dict keys joined with '.', int keys in
 *     decimal, list/tuple positions only where tensors sit below them;
 *   - emission into the manifest and the two aggregate warnings (alignment, CRC 0).
 *
 * Naming rules (documented for users in FORMATS.md terms):
 *   - a bare tensor saved at the top (torch.save(t)) is named "tensor"; a bare storage
 *     "storage" (a 1-D tensor of the storage's dtype over all of it, P12); a storage inside a
 *     dict is the same 1-D tensor under its key;
 *   - lists/tuples/sets that hold no tensors become one metadata entry, rendered as JSON
 *     (optimizer param_groups); those that do are walked with their positions as components;
 *   - every other non-tensor leaf is a metadata entry (path -> JSON); an empty dict is "{}";
 *   - keys are not escaped: two paths that join to the same name are E_DUP_NAME.
 *   - --key K serves the subtree at K (dotted, longest key match first) as if it were the whole
 *     file, so its names lose the "K." prefix and a tensor at K is named "tensor".
 */
#include "fmt.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "checked.h"
#include "pickle.h"
#include "strhash.h"
#include "zip.h"

#define TORCH_PKL_MAX      (256ull << 20) /* bytes of data.pkl we agree to read */
#define TORCH_SMALL_MAX    64u            /* version, byteorder, .storage_alignment */
#define TORCH_VERSION_MAX  10u            /* kMaxSupportedFileFormatVersion (versions.h) */
#define TORCH_META_MAX     (64u << 20)    /* JSON bytes of all metadata together */
#define TORCH_ALIGN_DEFAULT 64u

/* One distinct storage key. */
struct slot {
    const pk_storage_t *first; /* first persistent id naming it (dtype, numel, class) */
    const zip_entry_t *entry;  /* its <archive>/data/<key> record */
    int view_dtype;            /* untyped storages: dtype of the v3 tensors on it, -1 = none */
    int64_t mindex;            /* manifest storage index, -1 until a served tensor uses it */
};

struct walk_frame {
    uint32_t node;    /* container being walked */
    uint32_t next;    /* next child position */
    size_t name_len;  /* length of this container's path in ctx.name */
};

struct ctx {
    const source_t *s;
    uint32_t source_index;
    manifest_t *m;
    fmt_err_t *err;
    zip_t zip;
    char prefix[ZIP_NAME_MAX + 1]; /* "<archive>/" */
    size_t prefix_len;
    uint8_t *pkl;
    pk_doc_t *doc;
    struct slot *slots;
    uint32_t nslots;
    uint32_t *slot_of;      /* doc storage record -> slot */
    uint32_t *slot_index;   /* open-addressing key -> slot, UINT32_MAX empty */
    size_t slot_index_cap;
    const char **names;     /* open-addressing set of emitted names (manifest-owned strings) */
    size_t names_cap, nnames;
    uint64_t meta_bytes;
    uint64_t budget;        /* child visits left for the walk (shared containers, M19) */
    uint32_t alignment;
    char name[MANIFEST_NAME_MAX + 1];
    size_t name_len;
};

static int fail_nomem(struct ctx *c)
{
    return fmt_fail(c->err, -ENOMEM, NULL, "out of memory reading '%s'", c->s->path);
}

/* <archive>/<rel> looked up in the zip directory. */
static const zip_entry_t *find_rel(const struct ctx *c, const char *rel, size_t rel_len)
{
    char name[ZIP_NAME_MAX + 1];

    if (c->prefix_len + rel_len > ZIP_NAME_MAX)
        return NULL;
    memcpy(name, c->prefix, c->prefix_len);
    memcpy(name + c->prefix_len, rel, rel_len);
    name[c->prefix_len + rel_len] = '\0';
    return zip_find(&c->zip, name);
}

static const zip_entry_t *find(const struct ctx *c, const char *rel)
{
    return find_rel(c, rel, strlen(rel));
}

/* ---- classification ----------------------------------------------------------------------- */

static int find_prefix(struct ctx *c)
{
    const zip_entry_t *first = &c->zip.entries[0];
    const char *slash = strchr(first->name, '/');

    /* torch takes the archive name from the first central entry (inline_container.cc init). */
    if (!slash || slash == first->name)
        return fmt_fail(c->err, WSD_EBADCKPT, "E_ZIP_NO_PREFIX",
                        "'%s': record '%s' is not in a subdirectory; torch.save archives keep "
                        "every record under one <archive>/ directory",
                        c->s->path, first->name);
    c->prefix_len = (size_t)(slash - first->name) + 1;
    memcpy(c->prefix, first->name, c->prefix_len);
    c->prefix[c->prefix_len] = '\0';
    for (size_t i = 0; i < c->zip.nentries; i++)
        if (strncmp(c->zip.entries[i].name, c->prefix, c->prefix_len) != 0)
            return fmt_fail(c->err, WSD_EBADCKPT, "E_ZIP_NO_PREFIX",
                            "'%s': record '%s' lies outside the archive directory '%s'",
                            c->s->path, c->zip.entries[i].name, c->prefix);
    return 0;
}

static int classify(struct ctx *c)
{
    for (size_t i = 0; i < c->zip.nentries; i++)
        if (strncmp(c->zip.entries[i].name + c->prefix_len, "code/", 5) == 0)
            return fmt_fail(c->err, WSD_EBADCKPT, "E_TORCHSCRIPT",
                            "'%s' is a TorchScript archive (torch.jit.save; it has '%s'); "
                            "weightsd never runs TorchScript. Load it with torch.jit.load and "
                            "save model.state_dict() with torch.save instead",
                            c->s->path, c->zip.entries[i].name);
    if (find(c, "constants.pkl") || find(c, "bytecode.pkl"))
        return fmt_fail(c->err, WSD_EBADCKPT, "E_TORCHSCRIPT",
                        "'%s' is a TorchScript archive (it has constants.pkl); weightsd never "
                        "runs TorchScript. Load it with torch.jit.load and save "
                        "model.state_dict() with torch.save instead",
                        c->s->path);
    if (find(c, ".data/extern_modules"))
        return fmt_fail(c->err, WSD_EBADCKPT, "E_NOT_TORCH_SAVE_ZIP",
                        "'%s' is a torch.package archive, not a torch.save checkpoint",
                        c->s->path);
    if (!find(c, "data.pkl"))
        return fmt_fail(c->err, WSD_EBADCKPT, "E_TORCH_NO_DATA_PKL",
                        "'%s': zip archive is not a torch.save checkpoint: no '%sdata.pkl'",
                        c->s->path, c->prefix);
    return 0;
}

/* Reads a small text record (at most TORCH_SMALL_MAX bytes) into \p out, NUL-terminated. */
static int read_small(struct ctx *c, const zip_entry_t *e, char out[TORCH_SMALL_MAX + 1],
                      const char *rule, fmt_err_t *err)
{
    uint8_t *buf;
    int r;

    if (e->usize > TORCH_SMALL_MAX)
        return fmt_fail(err, WSD_EBADCKPT, rule, "'%s': record '%s' is %llu bytes long",
                        c->s->path, e->name, (unsigned long long)e->usize);
    r = zip_read(c->s, e, TORCH_SMALL_MAX, &buf, err);
    if (r < 0)
        return r;
    memcpy(out, buf, (size_t)e->usize + 1);
    free(buf);
    if (memchr(out, '\0', (size_t)e->usize))
        return fmt_fail(err, WSD_EBADCKPT, rule, "'%s': record '%s' holds a NUL byte",
                        c->s->path, e->name);
    return 0;
}

static int check_version(struct ctx *c)
{
    const zip_entry_t *e = find(c, ".data/version");
    char v[TORCH_SMALL_MAX + 1];
    unsigned long val = 0;
    size_t n = 0;
    int r;

    /* torch reads .data/version first, then version (inline_container.cc init). */
    if (!e)
        e = find(c, "version");
    if (!e)
        return fmt_fail(c->err, WSD_EBADCKPT, "E_TORCH_BAD_VERSION",
                        "'%s': no '%sversion' record; torch refuses such archives too",
                        c->s->path, c->prefix);
    r = read_small(c, e, v, "E_TORCH_BAD_VERSION", c->err);
    if (r < 0)
        return r;
    while (v[n] >= '0' && v[n] <= '9' && n < 8)
        val = val * 10 + (unsigned long)(v[n++] - '0');
    if (n == 0 || (v[n] != '\0' && !(v[n] == '\n' && v[n + 1] == '\0')) || val < 1 ||
        val > TORCH_VERSION_MAX)
        return fmt_fail(c->err, WSD_EBADCKPT, "E_TORCH_BAD_VERSION",
                        "'%s': record '%s' must be a number from 1 to %u", c->s->path, e->name,
                        TORCH_VERSION_MAX);
    return 0;
}

static int check_byteorder(struct ctx *c)
{
    const zip_entry_t *e = find(c, "byteorder");
    char v[TORCH_SMALL_MAX + 1];
    int r;

    /* Absent means little-endian, as torch >= 2.1 assumes (§2.7 step 9). */
    if (!e)
        return 0;
    r = read_small(c, e, v, "E_TORCH_BAD_BYTEORDER", c->err);
    if (r < 0)
        return r;
    if (strcmp(v, "little") == 0)
        return 0;
    if (strcmp(v, "big") == 0)
        return fmt_fail(c->err, WSD_EBADCKPT, "E_TORCH_BIG_ENDIAN",
                        "'%s' was saved on a big-endian machine (byteorder 'big'); weightsd "
                        "serves little-endian bytes as they are and does not byte-swap. Load it "
                        "with torch and save it again on a little-endian host",
                        c->s->path);
    return fmt_fail(c->err, WSD_EBADCKPT, "E_TORCH_BAD_BYTEORDER",
                    "'%s': byteorder record must be 'little' or 'big'", c->s->path);
}

/* .storage_alignment (2.7+) only sets what the alignment warning measures against. */
static int read_alignment(struct ctx *c)
{
    const zip_entry_t *e = find(c, ".storage_alignment");
    char v[TORCH_SMALL_MAX + 1];
    fmt_err_t ignored = {0};
    unsigned long a;
    char *end;
    int r;

    c->alignment = TORCH_ALIGN_DEFAULT;
    if (!e)
        return 0;
    /* A malformed value is ignored (torch ignores the record when loading), so its error goes
     * to a scratch report, not the caller's; failing to read it at all (memory, I/O) is not a
     * property of the file and fails the load rather than change its warnings. */
    r = read_small(c, e, v, "W_ALIGNMENT", &ignored);
    if (r == WSD_EBADCKPT)
        return 0;
    if (r < 0) {
        *c->err = ignored;
        return r;
    }
    a = strtoul(v, &end, 10);
    if (end != v && *end == '\0' && a >= 1 && a <= (1ul << 20) && (a & (a - 1)) == 0)
        c->alignment = (uint32_t)a;
    return 0;
}

/* ---- storages ----------------------------------------------------------------------------- */

static int key_slot(struct ctx *c, const pk_storage_t *st, uint32_t *ret)
{
    size_t h = (size_t)strhash(st->key, st->key_len) & (c->slot_index_cap - 1);

    while (c->slot_index[h] != UINT32_MAX) {
        const pk_storage_t *f = c->slots[c->slot_index[h]].first;

        if (f->key_len == st->key_len && memcmp(f->key, st->key, st->key_len) == 0) {
            *ret = c->slot_index[h];
            return 1;
        }
        h = (h + 1) & (c->slot_index_cap - 1);
    }
    c->slot_index[h] = c->nslots;
    *ret = c->nslots;
    return 0;
}

static const char *storage_class(uint16_t cls, char *buf, size_t cap)
{
    return pickle_global_name(cls, buf, cap);
}

/*
 * Resolves every persistent id: one slot per distinct key, each bound to its record. torch 1.13
 * neither checks the record size (an oversized numel reads heap memory past the record) nor
 * conflicting references (it silently reuses the first dtype), so both are refused here.
 */
static int build_storages(struct ctx *c)
{
    const pk_doc_t *d = c->doc;
    size_t cap = 16;

    while (cap < (size_t)d->nstorages * 2)
        cap *= 2;
    c->slot_index_cap = cap;
    c->slot_index = malloc(cap * sizeof(*c->slot_index));
    c->slots = calloc(d->nstorages ? d->nstorages : 1, sizeof(*c->slots));
    c->slot_of = calloc(d->nstorages ? d->nstorages : 1, sizeof(*c->slot_of));
    if (!c->slot_index || !c->slots || !c->slot_of)
        return fail_nomem(c);
    memset(c->slot_index, 0xff, cap * sizeof(*c->slot_index));
    for (uint32_t i = 0; i < d->nstorages; i++) {
        const pk_storage_t *st = &d->storages[i];
        char rel[300], cls1[96], cls2[96];
        uint64_t nbytes;
        uint32_t k;

        if (key_slot(c, st, &k)) {
            const pk_storage_t *f = c->slots[k].first;

            if (f->cls != st->cls || f->numel != st->numel)
                return fmt_fail(c->err, WSD_EBADCKPT, "E_STORAGE_CONFLICT",
                                "'%s': storage key '%.*s' is referenced as %llu x %s (data.pkl "
                                "offset %u) and as %llu x %s (offset %u); one key must name one "
                                "storage",
                                c->s->path, (int)st->key_len, (const char *)st->key,
                                (unsigned long long)f->numel,
                                storage_class(f->cls, cls1, sizeof(cls1)), f->off,
                                (unsigned long long)st->numel,
                                storage_class(st->cls, cls2, sizeof(cls2)), st->off);
            c->slot_of[i] = k;
            continue;
        }
        snprintf(rel, sizeof(rel), "data/%.*s", (int)st->key_len, (const char *)st->key);
        c->slots[k].first = st;
        c->slots[k].entry = find(c, rel);
        c->slots[k].view_dtype = -1;
        c->slots[k].mindex = -1;
        c->slot_of[i] = k;
        c->nslots++;
        if (!c->slots[k].entry)
            return fmt_fail(c->err, WSD_EBADCKPT, "E_STORAGE_MISSING",
                            "'%s': storage '%.*s' (data.pkl offset %u) has no record '%s%s'",
                            c->s->path, (int)st->key_len, (const char *)st->key, st->off,
                            c->prefix, rel);
        if (c->slots[k].entry->method != ZIP_METHOD_STORED)
            return fmt_fail(c->err, WSD_EBADCKPT, "E_ZIP_COMPRESSED_STORAGE",
                            "'%s': storage record '%s' is compressed (method %u); cannot serve "
                            "it from the file. Re-save it with torch.save, which stores records",
                            c->s->path, c->slots[k].entry->name, c->slots[k].entry->method);
        if (!ck_mul_u64(st->numel, st->itemsize, &nbytes) ||
            nbytes != c->slots[k].entry->usize)
            return fmt_fail(c->err, WSD_EBADCKPT, "E_STORAGE_SIZE",
                            "'%s': storage '%.*s' declares %llu elements of %u bytes but record "
                            "'%s' holds %llu bytes",
                            c->s->path, (int)st->key_len, (const char *)st->key,
                            (unsigned long long)st->numel, st->itemsize,
                            c->slots[k].entry->name,
                            (unsigned long long)c->slots[k].entry->usize);
    }
    /* torch's writer refuses to save one storage viewed as two dtypes (§3.3): so do we. */
    for (uint32_t i = 0; i < d->ntensors; i++) {
        const pk_tensor_t *t = &d->tensors[i];
        struct slot *sl = &c->slots[c->slot_of[d->nodes[t->storage].u.ref]];

        if (!sl->first->untyped)
            continue;
        if (sl->view_dtype < 0)
            sl->view_dtype = t->dtype;
        else if (sl->view_dtype != t->dtype)
            return fmt_fail(c->err, WSD_EBADCKPT, "E_STORAGE_CONFLICT",
                            "'%s': untyped storage '%.*s' is viewed as %s and as %s (data.pkl "
                            "offset %u)",
                            c->s->path, (int)sl->first->key_len, (const char *)sl->first->key,
                            wsd_dtype_name(sl->view_dtype), wsd_dtype_name(t->dtype), t->off);
    }
    return 0;
}

/* The manifest storage of slot \p k, added the first time a served tensor needs it. */
static int use_slot(struct ctx *c, uint32_t k, uint32_t *ret)
{
    struct slot *sl = &c->slots[k];
    mf_storage_t *ms;
    char key[300];
    uint32_t idx = 0;
    int dtype, r;

    if (sl->mindex >= 0) {
        *ret = (uint32_t)sl->mindex;
        return 0;
    }
    dtype = sl->first->untyped ? (sl->view_dtype >= 0 ? sl->view_dtype : WSD_DTYPE_U8)
                               : sl->first->dtype;
    snprintf(key, sizeof(key), "data/%.*s", (int)sl->first->key_len,
             (const char *)sl->first->key);
    r = manifest_add_storage(c->m, key, c->source_index, sl->entry->data_offset,
                             sl->entry->usize, dtype, &idx);
    if (r == -ENOMEM)
        return fail_nomem(c);
    if (r < 0)
        return fmt_fail(c->err, r, "E_LIMIT", "'%s': more than %u storages", c->s->path,
                        MANIFEST_STORAGES_MAX);
    ms = &c->m->storages[idx];
    /* A CRC of 0 over non-empty bytes is torch's "CRC disabled" mark, not a checksum. */
    ms->has_crc = sl->entry->crc32 != 0 || sl->entry->usize == 0;
    ms->crc32 = sl->entry->crc32;
    sl->mindex = idx;
    *ret = idx;
    return 0;
}

/* ---- emission ----------------------------------------------------------------------------- */

static bool name_taken(const struct ctx *c, const char *name)
{
    size_t h;

    if (!c->names_cap)
        return false;
    h = (size_t)strhash(name, strlen(name)) & (c->names_cap - 1);
    for (; c->names[h]; h = (h + 1) & (c->names_cap - 1))
        if (strcmp(c->names[h], name) == 0)
            return true;
    return false;
}

/* Refuses a second tensor or metadata entry of the same name. Python dicts keep the last of
 * repeated keys; refusing is the strict choice (M14). */
static int check_name(struct ctx *c, const char *name)
{
    if (name_taken(c, name))
        return fmt_fail(c->err, WSD_EBADCKPT, "E_DUP_NAME",
                        "'%s': name '%s' appears twice (a repeated dict key, or keys that join "
                        "to the same dotted path)",
                        c->s->path, name);
    return 0;
}

/* Records \p name, a manifest-owned string, in the set of emitted names. */
static int claim_name(struct ctx *c, const char *name)
{
    size_t h;

    if (c->nnames * 2 >= c->names_cap) {
        size_t ncap = c->names_cap ? c->names_cap * 2 : 64;
        const char **n = calloc(ncap, sizeof(*n));

        if (!n)
            return fail_nomem(c);
        for (size_t i = 0; i < c->names_cap; i++) {
            if (!c->names[i])
                continue;
            h = (size_t)strhash(c->names[i], strlen(c->names[i])) & (ncap - 1);
            while (n[h])
                h = (h + 1) & (ncap - 1);
            n[h] = c->names[i];
        }
        free(c->names);
        c->names = n;
        c->names_cap = ncap;
    }
    h = (size_t)strhash(name, strlen(name)) & (c->names_cap - 1);
    while (c->names[h])
        h = (h + 1) & (c->names_cap - 1);
    c->names[h] = name;
    c->nnames++;
    return 0;
}

static int add_result(struct ctx *c, int r, const char *what, unsigned max)
{
    if (r == -ENOMEM)
        return fail_nomem(c);
    if (r < 0)
        return fmt_fail(c->err, r, "E_LIMIT", "'%s': more than %u %s", c->s->path, max, what);
    return 0;
}

static int emit_tensor(struct ctx *c, const pk_tensor_t *t)
{
    mf_tensor_t mt = {0};
    uint32_t sidx = 0;
    int r;

    r = check_name(c, c->name);
    if (r < 0)
        return r;
    r = use_slot(c, c->slot_of[c->doc->nodes[t->storage].u.ref], &sidx);
    if (r < 0)
        return r;
    mt.name = c->name;
    mt.dtype = t->dtype;
    mt.ndim = t->ndim;
    memcpy(mt.shape, t->shape, sizeof(mt.shape));
    memcpy(mt.stride, t->stride, sizeof(mt.stride));
    mt.storage = sidx;
    mt.storage_offset = t->offset;
    r = add_result(c, manifest_add_tensor(c->m, &mt), "tensors", MANIFEST_TENSORS_MAX);
    if (r < 0)
        return r;
    return claim_name(c, c->m->tensors[c->m->ntensors - 1].name);
}

/* A storage saved as a value (P12): a 1-D tensor of its class's dtype over all of it. */
static int emit_storage(struct ctx *c, uint32_t node)
{
    const pk_storage_t *st = &c->doc->storages[c->doc->nodes[node].u.ref];
    pk_tensor_t t = {0};

    if (st->dtype < 0)
        return fmt_fail(c->err, WSD_EBADCKPT, "E_TENSOR_UNSUPPORTED_KIND",
                        "'%s': '%s' is a quantized storage; %s", c->s->path, c->name,
                        pickle_kind_advice(PK_KIND_QUANTIZED));
    t.storage = node;
    t.dtype = st->dtype;
    t.ndim = 1;
    t.shape[0] = (int64_t)st->numel;
    t.stride[0] = 1;
    return emit_tensor(c, &t);
}

static int emit_meta(struct ctx *c, uint32_t node)
{
    pk_buf_t b = {0};
    int r;

    r = check_name(c, c->name);
    if (r < 0)
        return r;
    r = pickle_render_json(c->doc, node, &b, c->err);
    c->meta_bytes += b.len;
    if (r == 0 && c->meta_bytes > TORCH_META_MAX)
        r = fmt_fail(c->err, WSD_EBADCKPT, "E_PKL_LIMIT",
                     "'%s': non-tensor values render to more than %u bytes of JSON", c->s->path,
                     TORCH_META_MAX);
    if (r == 0)
        r = add_result(c, manifest_add_meta(c->m, c->name, b.p ? b.p : "null"),
                       "metadata entries", MANIFEST_META_MAX);
    if (r == 0)
        r = claim_name(c, c->m->meta[c->m->nmeta - 1].key);
    pk_buf_free(&b);
    return r;
}

static int refuse_kind(struct ctx *c, uint32_t node)
{
    const pk_node_t *n = &c->doc->nodes[node];
    char g[96];

    pickle_global_name((uint16_t)n->u.ref, g, sizeof(g));
    return fmt_fail(c->err, WSD_EBADCKPT, "E_TENSOR_UNSUPPORTED_KIND",
                    "'%s': '%s' is a %s (%s, data.pkl offset %u); weightsd serves dense tensors "
                    "only: %s",
                    c->s->path, c->name, pickle_kind_name((pk_kind_t)n->aux), g, n->off,
                    pickle_kind_advice((pk_kind_t)n->aux));
}

/* ---- the walk ----------------------------------------------------------------------------- */

static bool walkable(const pk_node_t *n)
{
    if (n->type == PK_DICT)
        return n->n > 0;
    return (n->type == PK_LIST || n->type == PK_TUPLE || n->type == PK_SET) &&
           (n->flags & PK_F_HAS_TENSOR);
}

/* Appends one path component (the key of child \p i of \p node) to c->name. */
static int append_component(struct ctx *c, const pk_node_t *n, uint32_t i, size_t base)
{
    pk_buf_t b = {.max = MANIFEST_NAME_MAX + 1};
    char num[24];
    const char *comp;
    size_t len;
    int r = 0;

    if (n->type == PK_DICT) {
        r = pickle_render_key(c->doc, n->u.items[2 * i], &b, c->err);
        if (r < 0) {
            pk_buf_free(&b);
            return r;
        }
        comp = b.p ? b.p : "";
        len = b.len;
    } else {
        snprintf(num, sizeof(num), "%u", i);
        comp = num;
        len = strlen(num);
    }
    c->name[base] = '\0';
    if (memchr(comp, '\0', len))
        r = fmt_fail(c->err, WSD_EBADCKPT, "E_TENSOR_NAME",
                     "'%s': a key below '%s' contains a NUL byte", c->s->path, c->name);
    else if (base + (base ? 1 : 0) + len > MANIFEST_NAME_MAX)
        r = fmt_fail(c->err, WSD_EBADCKPT, "E_TENSOR_NAME",
                     "'%s': a name below '%.64s' is longer than %u bytes", c->s->path, c->name,
                     MANIFEST_NAME_MAX);
    if (r == 0) {
        if (base)
            c->name[base++] = '.';
        memcpy(c->name + base, comp, len);
        c->name_len = base + len;
        c->name[c->name_len] = '\0';
    }
    pk_buf_free(&b);
    return r;
}

/* Emits what a leaf value at c->name stands for. */
static int visit_leaf(struct ctx *c, uint32_t h)
{
    const pk_node_t *n = &c->doc->nodes[h];

    switch (n->type) {
    case PK_TENSOR:
        return emit_tensor(c, &c->doc->tensors[n->u.ref]);
    case PK_STORAGE:
        return emit_storage(c, h);
    case PK_UNSUPPORTED:
        return refuse_kind(c, h);
    case PK_DICT:
        if (n->n == 0)
            break;
        return 0;
    default:
        break;
    }
    return emit_meta(c, h);
}

/*
 * Iterative depth-first walk from \p root. The frame stack is bounded by PK_DEPTH_MAX and a
 * container already on it is a cycle; the total number of child visits is bounded by c->budget,
 * so containers shared many times over cannot blow up the work either.
 */
static int walk(struct ctx *c, uint32_t root)
{
    struct walk_frame st[PK_DEPTH_MAX];
    size_t sp = 0;
    int r;

    c->name_len = 0;
    c->name[0] = '\0';
    if (!walkable(&c->doc->nodes[root])) {
        const pk_node_t *n = &c->doc->nodes[root];

        snprintf(c->name, sizeof(c->name), "%s",
                 n->type == PK_TENSOR || n->type == PK_UNSUPPORTED ? "tensor"
                 : n->type == PK_STORAGE                          ? "storage"
                                                                  : "value");
        if (n->type == PK_DICT)
            return 0; /* an empty checkpoint: nothing to serve, nothing to refuse */
        return visit_leaf(c, root);
    }
    st[sp++] = (struct walk_frame){root, 0, 0};
    while (sp) {
        struct walk_frame *f = &st[sp - 1];
        const pk_node_t *n = &c->doc->nodes[f->node];
        uint32_t child;

        if (f->next >= n->n) {
            sp--;
            continue;
        }
        if (c->budget-- == 0)
            return fmt_fail(c->err, WSD_EBADCKPT, "E_PKL_LIMIT",
                            "'%s': data.pkl shares containers so often that naming its values "
                            "takes too long",
                            c->s->path);
        child = n->type == PK_DICT ? n->u.items[2 * f->next + 1] : n->u.items[f->next];
        r = append_component(c, n, f->next, f->name_len);
        if (r < 0)
            return r;
        f->next++;
        if (!walkable(&c->doc->nodes[child])) {
            r = visit_leaf(c, child);
            if (r < 0)
                return r;
            continue;
        }
        for (size_t i = 0; i < sp; i++)
            if (st[i].node == child)
                return fmt_fail(c->err, WSD_EBADCKPT, "E_PKL_LIMIT",
                                "'%s': '%s' contains itself", c->s->path, c->name);
        if (sp == PK_DEPTH_MAX)
            return fmt_fail(c->err, WSD_EBADCKPT, "E_PKL_LIMIT",
                            "'%s': '%.64s...' is nested deeper than %u levels", c->s->path,
                            c->name, PK_DEPTH_MAX);
        st[sp++] = (struct walk_frame){child, 0, c->name_len};
    }
    return 0;
}

/* ---- --key -------------------------------------------------------------------------------- */

static const char *type_word(const pk_node_t *n)
{
    static const char *const w[_PK_TYPE_MAX] = {
        [PK_NONE] = "None",     [PK_BOOL] = "bool",        [PK_INT] = "int",
        [PK_BIGINT] = "int",    [PK_FLOAT] = "float",      [PK_STR] = "string",
        [PK_BYTES] = "bytes",   [PK_COMPLEX] = "complex",  [PK_TUPLE] = "tuple",
        [PK_LIST] = "list",     [PK_DICT] = "dict",        [PK_SET] = "set",
        [PK_GLOBAL] = "torch object", [PK_DEVICE] = "device", [PK_STORAGE] = "storage",
        [PK_TENSOR] = "tensor", [PK_UNSUPPORTED] = "tensor",
    };

    return n->type < _PK_TYPE_MAX ? w[n->type] : "value";
}

/* The keys of \p n, for the "no such key" message. */
static void list_keys(struct ctx *c, const pk_node_t *n, char *out, size_t cap)
{
    size_t len = 0;

    out[0] = '\0';
    for (uint32_t i = 0; i < n->n && i < 8 && n->type == PK_DICT; i++) {
        pk_buf_t b = {.max = 64};
        fmt_err_t ignored = {0};
        int w;

        if (pickle_render_key(c->doc, n->u.items[2 * i], &b, &ignored) < 0) {
            pk_buf_free(&b);
            continue;
        }
        w = snprintf(out + len, cap - len, "%s'%s'", len ? ", " : "", b.p ? b.p : "");
        pk_buf_free(&b);
        if (w < 0 || (size_t)w >= cap - len)
            break;
        len += (size_t)w;
    }
    if (n->type == PK_DICT && n->n > 8 && len + 6 < cap)
        snprintf(out + len, cap - len, ", ...");
}

/*
 * Finds the subtree named by \p key: components separated by '.', each matched against the keys
 * of the dict (or positions of the list) it descends into; when keys themselves contain dots the
 * longest match wins.
 */
static int resolve_key(struct ctx *c, const char *key, uint32_t *ret)
{
    uint32_t cur = c->doc->root;
    const char *rest = key;
    const pk_node_t *n;

    if (!*key)
        return fmt_fail(c->err, WSD_EINVAL, "E_KEY", "--key must not be empty");
    while (*rest) {
        uint32_t best = UINT32_MAX;
        size_t best_len = 0;

        n = &c->doc->nodes[cur];
        if (n->type != PK_DICT && n->type != PK_LIST && n->type != PK_TUPLE)
            return fmt_fail(c->err, WSD_EINVAL, "E_KEY",
                            "--key '%s': %s%.*s%s is a %s, which has no keys", key,
                            rest == key ? "the checkpoint" : "'",
                            (int)(rest != key ? rest - key - 1 : 0), key, rest == key ? "" : "'",
                            type_word(n));
        for (uint32_t i = 0; i < n->n; i++) {
            pk_buf_t b = {.max = MANIFEST_NAME_MAX + 1};
            char num[24];
            const char *comp = num;
            size_t len;
            fmt_err_t ignored = {0};

            if (n->type == PK_DICT) {
                if (pickle_render_key(c->doc, n->u.items[2 * i], &b, &ignored) < 0) {
                    pk_buf_free(&b);
                    continue;
                }
                comp = b.p ? b.p : "";
                len = b.len;
            } else {
                snprintf(num, sizeof(num), "%u", i);
                len = strlen(num);
            }
            if (len > best_len && strncmp(rest, comp, len) == 0 &&
                (rest[len] == '\0' || rest[len] == '.')) {
                best = i;
                best_len = len;
            }
            pk_buf_free(&b);
        }
        if (best == UINT32_MAX) {
            char keys[256];

            list_keys(c, n, keys, sizeof(keys));
            return fmt_fail(c->err, WSD_EINVAL, "E_KEY",
                            "--key '%s': no key '%s' in '%s'%s%s%s", key, rest, c->s->path,
                            keys[0] ? " (it has " : "", keys, keys[0] ? ")" : "");
        }
        cur = n->type == PK_DICT ? n->u.items[2 * best + 1] : n->u.items[best];
        rest += best_len;
        if (*rest == '.')
            rest++;
    }
    n = &c->doc->nodes[cur];
    if (n->type != PK_DICT && n->type != PK_TENSOR && n->type != PK_STORAGE &&
        n->type != PK_UNSUPPORTED && !walkable(n))
        return fmt_fail(c->err, WSD_EINVAL, "E_KEY",
                        "--key '%s' names a %s, not a dict or tensor", key, type_word(n));
    *ret = cur;
    return 0;
}

/* ---- warnings and entry point ------------------------------------------------------------- */

/* The VM knows only the pickle; put the file's path after the rule of its message. */
static void add_path(fmt_err_t *err, const char *path)
{
    char rest[sizeof(err->msg)];
    char *colon = strstr(err->msg, ": ");

    if (!err->code || !colon || strstr(err->msg, path))
        return;
    snprintf(rest, sizeof(rest), "%s", colon + 2);
    snprintf(colon + 2, sizeof(err->msg) - (size_t)(colon + 2 - err->msg), "'%s': %s", path,
             rest);
}

static void warn_storages(struct ctx *c)
{
    size_t unaligned = 0, nocrc = 0, first_u = SIZE_MAX, first_c = SIZE_MAX;

    for (size_t i = 0; i < c->m->nstorages; i++) {
        const mf_storage_t *s = &c->m->storages[i];

        if (s->nbytes && s->src_offset % c->alignment) {
            if (!unaligned++)
                first_u = i;
        }
        if (!s->has_crc) {
            if (!nocrc++)
                first_c = i;
        }
    }
    if (unaligned)
        fmt_warn(c->m, "W_UNALIGNED",
                 "%zu of %zu storage records in '%s' are not %u-byte aligned (first: '%s' at "
                 "offset %llu); they are served by copy",
                 unaligned, c->m->nstorages, c->s->path, c->alignment,
                 c->m->storages[first_u].key,
                 (unsigned long long)c->m->storages[first_u].src_offset);
    if (nocrc)
        fmt_warn(c->m, "W_CRC_ZERO",
                 "%zu of %zu storage records in '%s' carry CRC-32 0 (saved with CRC disabled, "
                 "first: '%s'); their bytes cannot be verified",
                 nocrc, c->m->nstorages, c->s->path, c->m->storages[first_c].key);
}

int torch_read(const source_t *s, uint32_t source_index, const char *key, manifest_t *m,
               fmt_err_t *err)
{
    struct ctx *c = calloc(1, sizeof(*c));
    const zip_entry_t *pe;
    uint32_t root;
    int r;

    if (!c)
        return fmt_fail(err, -ENOMEM, NULL, "out of memory");
    c->s = s;
    c->source_index = source_index;
    c->m = m;
    c->err = err;
    r = zip_open(s, &c->zip, err);
    if (r < 0)
        goto out;
    r = find_prefix(c);
    if (r == 0)
        r = classify(c);
    if (r == 0)
        r = check_version(c);
    if (r == 0)
        r = check_byteorder(c);
    if (r == 0)
        r = read_alignment(c);
    if (r < 0)
        goto out;
    pe = find(c, "data.pkl");
    if (pe->usize > TORCH_PKL_MAX) {
        r = fmt_fail(err, WSD_EBADCKPT, "E_PKL_LIMIT",
                     "'%s': data.pkl is %llu bytes (at most %llu accepted)", s->path,
                     (unsigned long long)pe->usize, (unsigned long long)TORCH_PKL_MAX);
        goto out;
    }
    r = zip_read(s, pe, TORCH_PKL_MAX, &c->pkl, err);
    if (r < 0)
        goto out;
    r = pickle_parse(c->pkl, (size_t)pe->usize, &c->doc, err);
    if (r < 0) {
        add_path(err, s->path);
        goto out;
    }
    r = build_storages(c);
    if (r < 0)
        goto out;
    root = c->doc->root;
    if (key) {
        r = resolve_key(c, key, &root);
        if (r < 0)
            goto out;
    }
    c->budget = 4 * ((uint64_t)c->doc->nnodes + c->doc->nitems) + 4096;
    r = walk(c, root);
    if (r < 0)
        goto out;
    warn_storages(c);
out:
    pickle_free(c->doc);
    free(c->pkl);
    free(c->slots);
    free(c->slot_of);
    free(c->slot_index);
    free(c->names);
    zip_close(&c->zip);
    free(c);
    return r;
}
