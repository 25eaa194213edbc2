/*
 * manifest_pb.h - the wire form of a manifest. Built once per model at preload (on the thread
 * pool) and reused byte for byte by every open, so attaching costs no encoding.
 */
#ifndef WSD_MANIFEST_PB_H
#define WSD_MANIFEST_PB_H

#include <stddef.h>
#include <stdint.h>

#include "gpu.h"
#include "manifest.h"
#include "wsd_limits.h"

/* The largest packed Manifest: room is left for the frame around it, so a larger one could
 * never be sent. */
#define MANIFEST_PB_MAX (WSD_FRAME_MAX - 64u)
#define MANIFEST_PB_HASH_MAX 64u /* bytes of content hash manifest_pb_size() can stand in for */

/*
 * The packed size of \p m (arena offsets set) with a content hash of \p hash_len bytes, in
 * *ret_len, so a manifest too large to send is refused before the copy rather than after it.
 * \retval 0, WSD_ELIMIT (over MANIFEST_PB_MAX; *ret_len still set), -ENOMEM, -EINVAL.
 */
int manifest_pb_size(const manifest_t *m, uint64_t map_size, size_t hash_len, size_t *ret_len);

/*
 * Packs \p m (with arena offsets set) as a weightsd.v1.Manifest into a malloc'ed buffer.
 * \retval 0, WSD_ELIMIT (over MANIFEST_PB_MAX), -ENOMEM.
 */
int manifest_pb_encode(const manifest_t *m, uint64_t map_size, const char *hash, uint8_t **ret,
                       size_t *ret_len);

/*
 * Encodes a whole Frame{id, open_reply{lease, manifest}} around an already packed Manifest,
 * with its frame header announcing \p nfds descriptors. Same bytes protobuf-c would produce.
 */
int manifest_pb_open_reply(uint64_t id, uint64_t lease, const uint8_t *manifest, size_t len,
                           size_t nfds, uint8_t **ret, size_t *ret_len);

/*
 * The most bytes OpenReply.gpu (its tag, length and a GpuExport of \p nstorages offsets on any
 * device, with every optional field) can add to an open's reply: a preload for a device must
 * leave that much room beside its manifest, or every open on the device would be too large.
 */
size_t manifest_pb_gpu_field_max(size_t nstorages);

/* Packs \p e as a weightsd.v1.GpuExport into a malloc'ed buffer. \retval 0 or -ENOMEM. */
int manifest_pb_gpu_export(const gpu_export_t *e, uint8_t **ret, size_t *ret_len);

/*
 * As manifest_pb_open_reply(), with OpenReply.gpu set to the packed GpuExport \p gpu (NULL for
 * a host-tier open).
 */
int manifest_pb_open_reply_gpu(uint64_t id, uint64_t lease, const uint8_t *manifest, size_t len,
                               const uint8_t *gpu, size_t gpu_len, size_t nfds, uint8_t **ret,
                               size_t *ret_len);

/* A walk over the packed TensorInfo messages of a packed Manifest, without unpacking the rest
 * (info lists a page of a model's 10^6 tensors). Start with {.p = pb, .end = pb + len}. */
typedef struct manifest_pb_cursor {
    const uint8_t *p, *end;
} manifest_pb_cursor_t;

/*
 * The next Manifest.tensors entry at or after the cursor: its packed bytes in *ret and
 * *ret_len (inside the Manifest's buffer), the cursor moved past it.
 * \retval 1 (one found), 0 (no more), -EBADMSG (not a well-formed message; the cursor is then
 *         left anywhere).
 */
int manifest_pb_next_tensor(manifest_pb_cursor_t *c, const uint8_t **ret, size_t *ret_len);

/*
 * The storages of a packed Manifest as a manifest_t without tensors: key, nbytes, and the
 * offset as both src_offset and arena_offset (what a GPU upload from the model's fd needs).
 * \param[out] ret  written on success only; free with manifest_free().
 * \retval 0, -ENOMEM, WSD_ELIMIT (past MANIFEST_STORAGES_MAX), -EBADMSG (malformed).
 */
int manifest_pb_storages(const uint8_t *pb, size_t len, manifest_t **ret);

#endif /* WSD_MANIFEST_PB_H */
