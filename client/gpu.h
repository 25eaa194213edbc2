/*
 * gpu.h - libweightsd's side of the GPU tier (client/gpu.c): importing a model's device copy
 * that the daemon exported, once per process. Internal to the library (wsd__ prefix, STYLE N1).
 */
#ifndef WSD_CLIENT_GPU_H
#define WSD_CLIENT_GPU_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* GpuExport.handle values (daemon/tiers/gpu.h gpu_handle_kind_t). */
#define WSD__GPU_HANDLE_POSIX_FD   1
#define WSD__GPU_HANDLE_LEGACY_IPC 2

typedef struct wsd__gpu wsd__gpu_t;

/*
 * Imports the allocation an open reply describes (made on the daemon's device \p device, whose
 * 16-byte UUID is \p uuid when \p uuid_len is 16: the device is then found here by UUID, as its
 * ordinal in this process may differ under CUDA_VISIBLE_DEVICES), or takes another reference on this
 * process's import of it: imports are shared by every open whose \p key (wsd__gpu_key())
 * matches; a NULL key (no content hash) is never shared.
 * VMM: imports \p fd, reserves address space, maps, and sets read-only access unless
 * \p writable. Legacy: opens the 64-byte \p ipc handle. \p fd stays the caller's.
 * \param[out] ret       the import; drop it with wsd__gpu_unref().
 * \param[out] ret_device  this process's ordinal of that device.
 * \param[out] ret_base  device address of the allocation's first byte.
 * \retval 0, WSD_EGPU (no libcuda.so.1, driver too old, a CUDA call failed: \p msg says which),
 *         WSD_EPROTO (unknown handle kind, bad ipc length), -ENOMEM.
 */
int wsd__gpu_import(const char *key, int device, const uint8_t *uuid, size_t uuid_len,
                    unsigned handle, int fd, const uint8_t *ipc, size_t ipc_len, uint64_t size,
                    bool writable, wsd__gpu_t **ret, int *ret_device, uint64_t *ret_base,
                    char *msg, size_t msglen);

/* Room for any key wsd__gpu_key() makes from what the wire allows. */
#define WSD__GPU_KEY_MAX 512

/*
 * The key under which opens share an import: model \p name, content \p hash, \p device and
 * access, and for a legacy IPC copy (\p handle) its \p ipc handle too. A VMM import holds its
 * own reference to the memory, so a later copy with the same content may share it; a legacy
 * copy lives only as long as the daemon's lease on it, so a re-preloaded model must not share
 * the mapping of memory the daemon frees when the old model's last lease goes.
 * \retval the key's length, or -ENOSPC where it does not fit \p len bytes.
 */
int wsd__gpu_key(char *buf, size_t len, const char *name, const char *hash, const char *device,
                 bool writable, unsigned handle, const uint8_t *ipc, size_t ipc_len);

/* Drops one reference; the last one unmaps (the memory goes when no process maps it). */
void wsd__gpu_unref(wsd__gpu_t *g);

#endif /* WSD_CLIENT_GPU_H */
