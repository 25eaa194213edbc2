/*
 * gpu-stage.h - how an upload cuts a model into staging chunks, and how one chunk is read from
 * the host arena into a staging buffer in the device's own layout (gpu_layout()).
 *
 * A chunk is one host-to-device copy. Storages smaller than a staging buffer are packed whole,
 * many to a chunk, with their device padding between them, so a model of 10^5 small tensors
 * costs 10^5 / (stage / mean size) copies rather than 10^5. A storage larger than the buffer
 * is cut into buffer-sized slices, one chunk each.
 *
 * Plain C with no CUDA: gpu-cuda.c queues the copies; this part is built and tested in every
 * build (tests/unit/test-gpu-stage.c). Thread-safe: chunks are independent and read with pread.
 */
#ifndef WSD_GPU_STAGE_H
#define WSD_GPU_STAGE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "fmt.h"
#include "manifest.h"

/* One host-to-device copy: [dev_off, dev_off + len) of the allocation. */
typedef struct gpu_chunk {
    uint64_t dev_off; /* where the copy lands: offsets[first] + slice (or 0) */
    uint64_t len;     /* bytes copied, device padding between packed storages included */
    uint64_t payload; /* of which storage bytes (what progress counts) */
    uint64_t slice;   /* count == 0: byte offset of the slice within storage 'first' */
    uint32_t first;   /* first storage */
    uint32_t count;   /* storages packed whole, >= 1; 0: one slice of storage 'first' */
} gpu_chunk_t;

/*
 * Cuts the storages of \p m, laid out at \p offsets (gpu_layout(): ascending, each at least
 * the previous end), into chunks of at most \p stage bytes in storage order. Storages of zero
 * bytes are copied by nobody; a plan may be empty.
 * \param[out] ret_chunks  malloc'ed (NULL when empty), \p ret_n entries; written on success only.
 * \retval 0, -ENOMEM, or -EINVAL (stage is 0, or offsets are not a layout of m).
 */
int gpu_stage_plan(const manifest_t *m, const uint64_t *offsets, uint64_t stage,
                   gpu_chunk_t **ret_chunks, size_t *ret_n, fmt_err_t *err);

/*
 * Reads chunk \p c into \p buf (at least c->len bytes) exactly as the device holds it: each
 * storage at its offset relative to c->dev_off, zeros between them. Storage i is read at
 * m->storages[i].arena_offset of \p host_fd (host_size bytes long). Storages that lie in order
 * in the arena, with gaps no wider than the device's, take one pread for the whole chunk and
 * are moved into place; others take one pread each.
 * \retval 0, or WSD_EIO ("E_GPU_UPLOAD", naming the storage and the arena offset) when the
 *         arena is shorter than the storage or the read fails.
 */
int gpu_stage_read(const manifest_t *m, const uint64_t *offsets, const gpu_chunk_t *c, int host_fd,
                   uint64_t host_size, void *buf, fmt_err_t *err);

/*
 * Compares chunk \p c as read back from the device (\p got) with what the upload wrote there
 * (\p want: gpu_stage_read() of the same chunk), for a verify (RELIABILITY G5). Storage bytes
 * and the padding between packed storages are compared; a differing storage j sets bit j of
 * \p seen (m->nstorages bits, may be NULL; set atomically, so threads comparing chunks of one
 * sliced storage may share it).
 * \param[out] ret_first, ret_offset  the first differing storage and the byte within it where
 *             they first differ; written only when some storage differs.
 * \param[out] ret_padding  set to true when padding bytes differ (may be NULL).
 * \retval how many storages of the chunk differ (0: it matches).
 */
uint32_t gpu_stage_diff(const manifest_t *m, const uint64_t *offsets, const gpu_chunk_t *c,
                        const void *want, const void *got, uint8_t *seen, uint32_t *ret_first,
                        uint64_t *ret_offset, bool *ret_padding);

#endif /* WSD_GPU_STAGE_H */
