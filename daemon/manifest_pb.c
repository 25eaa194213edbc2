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

int manifest_pb_encode(const manifest_t *m, uint64_t map_size, const char *hash, uint8_t **ret,
                       size_t *ret_len)
{
    Weightsd__V1__Manifest pb = WEIGHTSD__V1__MANIFEST__INIT;
    Weightsd__V1__StorageInfo *st = NULL, **stp = NULL;
    Weightsd__V1__TensorInfo *ti = NULL, **tip = NULL;
    Weightsd__V1__MetaEntry *me = NULL, **mep = NULL;
    uint8_t *buf = NULL;
    size_t len;
    int r = -ENOMEM;

    st = calloc(m->nstorages + 1, sizeof(*st));
    stp = calloc(m->nstorages + 1, sizeof(*stp));
    ti = calloc(m->ntensors + 1, sizeof(*ti));
    tip = calloc(m->ntensors + 1, sizeof(*tip));
    me = calloc(m->nmeta + 1, sizeof(*me));
    mep = calloc(m->nmeta + 1, sizeof(*mep));
    if (!st || !stp || !ti || !tip || !me || !mep)
        goto out;
    for (size_t i = 0; i < m->nstorages; i++) {
        weightsd__v1__storage_info__init(&st[i]);
        st[i].offset = m->storages[i].arena_offset;
        st[i].nbytes = m->storages[i].nbytes;
        st[i].key = m->storages[i].key;
        stp[i] = &st[i];
    }
    for (size_t i = 0; i < m->ntensors; i++) {
        const mf_tensor_t *t = &m->tensors[i];

        weightsd__v1__tensor_info__init(&ti[i]);
        ti[i].name = t->name;
        ti[i].dtype = (uint32_t)t->dtype;
        ti[i].n_shape = t->ndim;
        ti[i].shape = (int64_t *)(uintptr_t)t->shape;
        ti[i].n_stride = t->ndim;
        ti[i].stride = (int64_t *)(uintptr_t)t->stride;
        ti[i].storage = t->storage;
        ti[i].storage_offset = t->storage_offset;
        ti[i].nbytes = t->nbytes;
        tip[i] = &ti[i];
    }
    for (size_t i = 0; i < m->nmeta; i++) {
        weightsd__v1__meta_entry__init(&me[i]);
        me[i].key = m->meta[i].key;
        me[i].value = m->meta[i].value;
        mep[i] = &me[i];
    }
    pb.n_storages = m->nstorages;
    pb.storages = stp;
    pb.n_tensors = m->ntensors;
    pb.tensors = tip;
    pb.n_meta = m->nmeta;
    pb.meta = mep;
    pb.map_size = map_size;
    pb.content_hash = (char *)(uintptr_t)(hash ? hash : "");

    len = weightsd__v1__manifest__get_packed_size(&pb);
    /* Leave room for the frame around it; a larger manifest could never be sent. */
    if (len > WSD_FRAME_MAX - 64) {
        r = WSD_ELIMIT;
        goto out;
    }
    buf = malloc(len ? len : 1);
    if (!buf)
        goto out;
    (void)weightsd__v1__manifest__pack(&pb, buf);
    *ret = buf;
    *ret_len = len;
    r = 0;
out:
    free(st);
    free(stp);
    free(ti);
    free(tip);
    free(me);
    free(mep);
    return r;
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
