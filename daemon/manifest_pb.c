/*
 * manifest_pb.c - manifest to protobuf, and the hand-assembled OpenReply frame around a cached
 * Manifest. The hand assembly is a few tags and varints (proto3: field 1 id varint; field 21
 * open_reply length-delimited holding field 1 lease and field 2 manifest); test-wire checks it
 * against protobuf-c's own packing.
 */
#include "manifest_pb.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wsd_limits.h"
#include "wire.h"

/* A manifest as protobuf-c structs that point into it (nothing is copied). */
typedef struct pb_view {
    Weightsd__V1__Manifest pb;
    Weightsd__V1__StorageInfo *st, **stp;
    Weightsd__V1__TensorInfo *ti, **tip;
    Weightsd__V1__MetaEntry *me, **mep;
} pb_view_t;

static void view_free(pb_view_t *v)
{
    free(v->st);
    free(v->stp);
    free(v->ti);
    free(v->tip);
    free(v->me);
    free(v->mep);
}

static int view_build(pb_view_t *v, const manifest_t *m, uint64_t map_size, const char *hash)
{
    *v = (pb_view_t){.pb = WEIGHTSD__V1__MANIFEST__INIT};
    v->st = calloc(m->nstorages + 1, sizeof(*v->st));
    v->stp = calloc(m->nstorages + 1, sizeof(*v->stp));
    v->ti = calloc(m->ntensors + 1, sizeof(*v->ti));
    v->tip = calloc(m->ntensors + 1, sizeof(*v->tip));
    v->me = calloc(m->nmeta + 1, sizeof(*v->me));
    v->mep = calloc(m->nmeta + 1, sizeof(*v->mep));
    if (!v->st || !v->stp || !v->ti || !v->tip || !v->me || !v->mep) {
        view_free(v);
        return -ENOMEM;
    }
    for (size_t i = 0; i < m->nstorages; i++) {
        weightsd__v1__storage_info__init(&v->st[i]);
        v->st[i].offset = m->storages[i].arena_offset;
        v->st[i].nbytes = m->storages[i].nbytes;
        v->st[i].key = m->storages[i].key;
        v->stp[i] = &v->st[i];
    }
    for (size_t i = 0; i < m->ntensors; i++) {
        const mf_tensor_t *t = &m->tensors[i];
        Weightsd__V1__TensorInfo *ti = &v->ti[i];

        weightsd__v1__tensor_info__init(ti);
        ti->name = t->name;
        ti->dtype = (uint32_t)t->dtype;
        ti->n_shape = t->ndim;
        ti->shape = (int64_t *)(uintptr_t)t->shape;
        ti->n_stride = t->ndim;
        ti->stride = (int64_t *)(uintptr_t)t->stride;
        ti->storage = t->storage;
        ti->storage_offset = t->storage_offset;
        ti->nbytes = t->nbytes;
        v->tip[i] = ti;
    }
    for (size_t i = 0; i < m->nmeta; i++) {
        weightsd__v1__meta_entry__init(&v->me[i]);
        v->me[i].key = m->meta[i].key;
        v->me[i].value = m->meta[i].value;
        v->mep[i] = &v->me[i];
    }
    v->pb.n_storages = m->nstorages;
    v->pb.storages = v->stp;
    v->pb.n_tensors = m->ntensors;
    v->pb.tensors = v->tip;
    v->pb.n_meta = m->nmeta;
    v->pb.meta = v->mep;
    v->pb.map_size = map_size;
    v->pb.content_hash = (char *)(uintptr_t)(hash ? hash : "");
    return 0;
}

int manifest_pb_size(const manifest_t *m, uint64_t map_size, size_t hash_len, size_t *ret_len)
{
    char hash[MANIFEST_PB_HASH_MAX + 1];
    pb_view_t v;
    size_t len;

    if (hash_len > MANIFEST_PB_HASH_MAX)
        return -EINVAL;
    memset(hash, 'x', hash_len);
    hash[hash_len] = '\0';
    if (view_build(&v, m, map_size, hash) < 0)
        return -ENOMEM;
    len = weightsd__v1__manifest__get_packed_size(&v.pb);
    view_free(&v);
    *ret_len = len;
    return len > MANIFEST_PB_MAX ? WSD_ELIMIT : 0;
}

int manifest_pb_encode(const manifest_t *m, uint64_t map_size, const char *hash, uint8_t **ret,
                       size_t *ret_len)
{
    pb_view_t v;
    uint8_t *buf;
    size_t len;

    if (view_build(&v, m, map_size, hash) < 0)
        return -ENOMEM;
    len = weightsd__v1__manifest__get_packed_size(&v.pb);
    if (len > MANIFEST_PB_MAX) {
        view_free(&v);
        return WSD_ELIMIT;
    }
    buf = malloc(len ? len : 1);
    if (!buf) {
        view_free(&v);
        return -ENOMEM;
    }
    (void)weightsd__v1__manifest__pack(&v.pb, buf);
    view_free(&v);
    *ret = buf;
    *ret_len = len;
    return 0;
}

static size_t put_varint(uint8_t *p, uint64_t v)
{
    size_t n = 0;

    do {
        uint8_t b = v & 0x7f;

        v >>= 7;
        p[n++] = (uint8_t)(b | (v ? 0x80 : 0));
    } while (v);
    return n;
}

static size_t varint_len(uint64_t v)
{
    size_t n = 1;

    while (v >>= 7)
        n++;
    return n;
}

size_t manifest_pb_gpu_field_max(size_t nstorages)
{
    /* device "cuda:63" (2 + 7), handle (2 + 5), ipc_handle (2 + 64), size (1 + 10), uuid
     * (2 + 16), offsets as a packed run (1 + 10 + 10 each) or one tag each (11 each). */
    size_t body = 9 + 7 + 66 + 11 + 18 + 11 + 11 * nstorages;

    return 2 + varint_len(body) + body;
}

int manifest_pb_gpu_export(const gpu_export_t *e, uint8_t **ret, size_t *ret_len)
{
    Weightsd__V1__GpuExport pb = WEIGHTSD__V1__GPU_EXPORT__INIT;
    char device[32];
    uint8_t *buf;
    size_t len;

    snprintf(device, sizeof(device), "cuda:%d", e->device);
    pb.device = device;
    pb.handle = (uint32_t)e->kind;
    if (e->kind == GPU_HANDLE_LEGACY_IPC) {
        pb.ipc_handle.data = (uint8_t *)(uintptr_t)e->ipc; /* pack only reads it */
        pb.ipc_handle.len = sizeof(e->ipc);
    }
    if (e->has_uuid) {
        pb.device_uuid.data = (uint8_t *)(uintptr_t)e->uuid; /* pack only reads it */
        pb.device_uuid.len = sizeof(e->uuid);
    }
    pb.size = e->size;
    pb.n_offsets = e->noffsets;
    pb.offsets = e->offsets;
    len = weightsd__v1__gpu_export__get_packed_size(&pb);
    buf = malloc(len ? len : 1);
    if (!buf)
        return -ENOMEM;
    (void)weightsd__v1__gpu_export__pack(&pb, buf);
    *ret = buf;
    *ret_len = len;
    return 0;
}

int manifest_pb_open_reply(uint64_t id, uint64_t lease, const uint8_t *manifest, size_t len,
                           size_t nfds, uint8_t **ret, size_t *ret_len)
{
    return manifest_pb_open_reply_gpu(id, lease, manifest, len, NULL, 0, nfds, ret, ret_len);
}

int manifest_pb_open_reply_gpu(uint64_t id, uint64_t lease, const uint8_t *manifest, size_t len,
                               const uint8_t *gpu, size_t gpu_len, size_t nfds, uint8_t **ret,
                               size_t *ret_len)
{
    /* OpenReply body: [lease] [manifest] [gpu]; proto3 omits zero scalars, protobuf-c does too.
     * Field 20 (gpu) is a two-byte tag, as protobuf-c writes fields in number order. */
    size_t body = (lease ? 1 + varint_len(lease) : 0) + 1 + varint_len(len) + len +
                  (gpu ? 2 + varint_len(gpu_len) + gpu_len : 0);
    size_t payload = (id ? 1 + varint_len(id) : 0) + 2 + varint_len(body) + body;
    uint8_t *buf, *p;

    if (payload > WSD_FRAME_MAX)
        return -EMSGSIZE;
    buf = malloc(WSD_FRAME_HEADER_SIZE + payload);
    if (!buf)
        return -ENOMEM;
    p = buf;
    *p++ = (uint8_t)payload;
    *p++ = (uint8_t)(payload >> 8);
    *p++ = (uint8_t)(payload >> 16);
    *p++ = (uint8_t)(payload >> 24);
    *p++ = (uint8_t)nfds;
    *p++ = (uint8_t)(nfds >> 8);
    *p++ = 0;
    *p++ = 0;
    if (id) {
        *p++ = 0x08; /* field 1, varint */
        p += put_varint(p, id);
    }
    *p++ = 0xaa; /* field 21, length-delimited: (21 << 3 | 2) as a two-byte varint */
    *p++ = 0x01;
    p += put_varint(p, body);
    if (lease) {
        *p++ = 0x08;
        p += put_varint(p, lease);
    }
    *p++ = 0x12; /* field 2, length-delimited */
    p += put_varint(p, len);
    memcpy(p, manifest, len);
    p += len;
    if (gpu) {
        *p++ = 0xa2; /* field 20, length-delimited: (20 << 3 | 2) as a two-byte varint */
        *p++ = 0x01;
        p += put_varint(p, gpu_len);
        memcpy(p, gpu, gpu_len);
        p += gpu_len;
    }
    *ret = buf;
    *ret_len = (size_t)(p - buf);
    return 0;
}

/* One varint at *p (at most 10 bytes, before end); advances *p. -EBADMSG if cut or too long. */
static int get_varint(const uint8_t **p, const uint8_t *end, uint64_t *ret)
{
    uint64_t v = 0;

    for (unsigned shift = 0; shift < 64 && *p < end; shift += 7) {
        uint8_t b = *(*p)++;

        v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *ret = v;
            return 0;
        }
    }
    return -EBADMSG;
}

/* The next length-delimited Manifest field number \p field at or after the cursor. */
static int next_field(manifest_pb_cursor_t *c, uint64_t field, const uint8_t **ret,
                      size_t *ret_len)
{
    while (c->p < c->end) {
        uint64_t key, n;

        if (get_varint(&c->p, c->end, &key) < 0)
            return -EBADMSG;
        switch (key & 7) {
        case 0: /* varint */
            if (get_varint(&c->p, c->end, &n) < 0)
                return -EBADMSG;
            break;
        case 1: /* fixed64 */
        case 5: /* fixed32 */
            n = (key & 7) == 1 ? 8 : 4;
            if ((uint64_t)(c->end - c->p) < n)
                return -EBADMSG;
            c->p += n;
            break;
        case 2: /* length-delimited */
            if (get_varint(&c->p, c->end, &n) < 0 || n > (uint64_t)(c->end - c->p))
                return -EBADMSG;
            c->p += n;
            if (key >> 3 == field) {
                *ret = c->p - n;
                *ret_len = (size_t)n;
                return 1;
            }
            break;
        default: /* groups: never written by a proto3 encoder */
            return -EBADMSG;
        }
    }
    return 0;
}

int manifest_pb_next_tensor(manifest_pb_cursor_t *c, const uint8_t **ret, size_t *ret_len)
{
    return next_field(c, 2, ret, ret_len); /* Manifest.tensors */
}

int manifest_pb_storages(const uint8_t *pb, size_t len, manifest_t **ret)
{
    manifest_pb_cursor_t c = {.p = pb, .end = pb + len};
    manifest_t *m = manifest_new();
    const uint8_t *sp;
    size_t slen;
    int r;

    if (!m)
        return -ENOMEM;
    while ((r = next_field(&c, 1, &sp, &slen)) == 1) { /* Manifest.storages */
        Weightsd__V1__StorageInfo *s = weightsd__v1__storage_info__unpack(NULL, slen, sp);
        uint32_t i;

        if (!s) {
            r = -EBADMSG; /* or no memory: protobuf-c does not say which */
            break;
        }
        r = manifest_add_storage(m, s->key ? s->key : "", 0, s->offset, s->nbytes, WSD_DTYPE_U8,
                                 &i);
        if (r == 0)
            m->storages[i].arena_offset = s->offset;
        weightsd__v1__storage_info__free_unpacked(s, NULL);
        if (r < 0)
            break;
    }
    if (r < 0) {
        manifest_free(m);
        return r;
    }
    *ret = m;
    return 0;
}
