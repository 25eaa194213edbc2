/*
 * gpu.h - the GPU tier: one copy of a model per CUDA device, shared by every worker through a
 * CUDA exportable handle (DESIGN.md "GPU tier").
 *
 * This is the one internal interface to CUDA (STYLE B2). Two implementations sit beside it and
 * CMake links exactly one: gpu-cuda.c (the CUDA runtime, driver entry points through
 * cudaGetDriverEntryPoint*, so only cudart is linked) and gpu-none.c (builds without CUDA: every
 * call fails with -EOPNOTSUPP and says so). Nothing outside gpu-cuda.c includes a CUDA header.
 *
 * Threading: gpu_probe() and gpu_upload() block (driver initialisation, copies) and belong on
 * the thread pool (STYLE M7); both are thread-safe. gpu_release() may run on any thread; it is
 * cheap for a VMM export, but for a legacy IPC copy cudaFree() waits for the device to be idle,
 * so it may stall its thread behind work in flight there (another model's upload).
 */
#ifndef WSD_GPU_H
#define WSD_GPU_H

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "checked.h"
#include "fmt.h"
#include "host.h"

/* Devices a daemon can serve; a larger ordinal is refused at preload. */
#define GPU_DEVICES_MAX 64

/* Alignment of every storage inside a device allocation: what cudaMalloc guarantees, and what
 * vectorised kernels in the workers expect of a tensor's base address. */
#define GPU_ALIGN 256u

/* Bytes of a legacy cudaIpcMemHandle_t. */
#define GPU_IPC_HANDLE_SIZE 64u
#define GPU_UUID_SIZE 16u /* cudaUUID_t / CUuuid */

/* How a device copy is handed to workers. Values travel on the wire (GpuExport.handle). */
typedef enum gpu_handle_kind {
    GPU_HANDLE_POSIX_FD = 1,   /* cuMemCreate + cuMemExportToShareableHandle: an fd */
    GPU_HANDLE_LEGACY_IPC = 2, /* cudaMalloc + cudaIpcGetMemHandle: 64 opaque bytes, no fd */
    _GPU_HANDLE_MAX,
    _GPU_HANDLE_INVALID = -22
} gpu_handle_kind_t;

/* What the probe learnt about one device. */
typedef struct gpu_device_info {
    char name[96];        /* cudaDeviceProp.name */
    uint64_t total_bytes; /* device memory */
    uint64_t granularity; /* recommended VMM allocation granularity in bytes, 0 without VMM */
    bool vmm;             /* CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED */
    bool posix_fd;        /* CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED */
    bool has_uuid;        /* uuid is known */
    uint8_t uuid[GPU_UUID_SIZE]; /* cudaDeviceProp.uuid: names the device in every process */
} gpu_device_info_t;

typedef struct gpu_probe {
    int ndevices;                          /* usable devices, 0..GPU_DEVICES_MAX */
    int driver_version;                    /* cudaDriverGetVersion, 0 if none */
    int runtime_version;                   /* cudaRuntimeGetVersion */
    gpu_device_info_t dev[GPU_DEVICES_MAX];
    char error[256];                       /* why ndevices is 0 (CUDA's words), else "" */
} gpu_probe_t;

/*
 * Probes the CUDA devices once per process and caches the answer (later calls are free).
 * \param[out] ret  points at the cached, immutable result (written on success only).
 * \retval 0 (ret->ndevices may be 0, with ret->error saying why), or -EOPNOTSUPP in a build
 *         without CUDA.
 */
int gpu_probe(const gpu_probe_t **ret);

/*
 * Checks that device \p index can take an upload. \retval 0, WSD_ENODEV ("no CUDA device ..."
 * with the driver's reason, or "cuda:N does not exist; this host has K"), or -EOPNOTSUPP
 * ("weightsd was built without CUDA support") with \p err filled.
 */
int gpu_check_device(int index, fmt_err_t *err);

/*
 * The probe's result if it has run to completion, else NULL; never starts it (the loop thread
 * asks this for stats, and a first probe can block for seconds). NULL in a build without CUDA.
 */
const gpu_probe_t *gpu_probe_peek(void);

/* Whether this build has the CUDA implementation (false: gpu-none.c). */
bool gpu_build_has_cuda(void);

/*
 * Whether device \p index is degraded: the daemon's own CUDA context on it hit a sticky error
 * (gpu_error_is_sticky) or an uncorrectable ECC error, after which every CUDA call in this
 * process fails the same way (RELIABILITY G6). A degraded device takes no new preload and no
 * new GPU lease until the daemon restarts; leases already granted keep their mappings, which
 * live in the workers' contexts, and the host tier keeps serving. \p reason (may be NULL)
 * gets the first error's words. Thread-safe; cheap.
 */
bool gpu_device_degraded(int index, char *reason, size_t len);

/*
 * CUDA errors that leave the calling process's context unusable: the CUDA headers document
 * each as "the process must be terminated and relaunched" (the same values in cudaError_t and
 * CUresult), plus an uncorrectable ECC error (214), after which results cannot be trusted.
 * Plain numbers, so this builds and is tested without a CUDA toolkit.
 */
static inline bool gpu_error_is_sticky(int code)
{
    switch (code) {
    case 214: /* ECCUncorrectable */
    case 226: /* Contained */
    case 700: /* IllegalAddress */
    case 702: /* LaunchTimeout */
    case 710: /* Assert */
    case 714: /* HardwareStackError */
    case 715: /* IllegalInstruction */
    case 716: /* MisalignedAddress */
    case 717: /* InvalidAddressSpace */
    case 718: /* InvalidPc */
    case 719: /* LaunchFailure */
    case 721: /* TensorMemoryLeak */
    case 810: /* MpsClientTerminated */
    case 911: /* ExternalDevice */
        return true;
    default:
        return false;
    }
}

/* One model's copy on one device. Owned by the model; gpu_release() frees it. An empty export
 * (all zero, or what gpu_release() leaves) has kind 0 and owns nothing. */
typedef struct gpu_export {
    int device;               /* CUDA ordinal */
    gpu_handle_kind_t kind;
    int fd;                   /* POSIX_FD: the exported fd (owned, CLOEXEC); else -1 */
    uint8_t ipc[GPU_IPC_HANDLE_SIZE]; /* LEGACY_IPC: the cudaIpcMemHandle_t bytes */
    uint64_t size;            /* allocation bytes: the layout rounded up to the granularity */
    bool has_uuid;            /* the device's UUID is known (sent to workers) */
    uint8_t uuid[GPU_UUID_SIZE];
    uint64_t *offsets;        /* owned, nstorages entries: storage i's byte offset */
    size_t noffsets;
    uint64_t upload_ns;       /* wall time of the whole upload: allocation, fill, export */
    uint64_t fill_ns;         /* of which the copy itself: from the first staged chunk to
                               * the last copy's completion (staging buffers already pinned) */
    uint8_t *pb;              /* owned: packed weightsd.v1.GpuExport, built once for opens */
    size_t pb_len;
    void *priv;               /* implementation state (allocation handle or device pointer) */
} gpu_export_t;

/*
 * Lays out every storage of \p m at GPU_ALIGN boundaries and gives the unrounded size.
 * \param[out] ret_offsets  malloc'ed, m->nstorages entries (written on success only).
 * \retval 0, -ENOMEM, WSD_EBADCKPT (size overflows).
 */
static inline int gpu_layout(const manifest_t *m, uint64_t **ret_offsets, uint64_t *ret_size,
                             fmt_err_t *err)
{
    uint64_t *off = calloc(m->nstorages ? m->nstorages : 1, sizeof(*off));
    uint64_t end = 0;

    if (!off)
        return fmt_fail(err, -ENOMEM, NULL, "out of memory for the GPU layout");
    for (size_t i = 0; i < m->nstorages; i++) {
        if (!ck_align_u64(end, GPU_ALIGN, &off[i]) ||
            !ck_add_u64(off[i], m->storages[i].nbytes, &end)) {
            free(off);
            return fmt_fail(err, WSD_EBADCKPT, "E_TENSOR_OVERFLOW",
                            "storage '%s': GPU layout overflows 64 bits", m->storages[i].key);
        }
    }
    *ret_offsets = off;
    *ret_size = end;
    return 0;
}

/*
 * Uploads a model to device \p index: one allocation (VMM with a POSIX fd handle where the
 * device supports it, else one cudaMalloc with a legacy IPC handle), filled from the host
 * arena \p host_fd (read with pread, so a file-share arena truncated under us is an error, not
 * SIGBUS) through pinned staging buffers on several streams, synchronised, then exported. The
 * daemon keeps no mapping of a VMM allocation afterwards: only the handle and the fd.
 * Storage i is read at m->storages[i].arena_offset of \p host_fd.
 * \p progress (may be NULL): done grows by every byte copied to the device (the caller sets
 * total), and a set cancel stops the upload with WSD_ECANCELED.
 * \param[out] ret  filled on success only; free with gpu_release().
 * \retval 0, or WSD_EGPU / WSD_ENODEV / -EOPNOTSUPP / WSD_EIO / WSD_ECANCELED / -ENOMEM
 *         with \p err filled ("E_PIN_FAILED" when pinned staging memory cannot be had).
 *         Nothing is left allocated on failure.
 */
int gpu_upload(const manifest_t *m, int host_fd, uint64_t host_size, int index,
               host_progress_t *progress, gpu_export_t *ret, fmt_err_t *err);

/*
 * Takes back a device copy an earlier weightsd exported (its VMM fd, kept for it by the
 * service manager's fd store) as \p m's copy on device \p index, instead of uploading it
 * again. The fd is imported to check that it is a VMM allocation on that device holding the
 * size gpu_upload() would allocate for \p m's layout, and the import is released again: the
 * fd alone keeps the memory (cuda.h, cuMemRelease: freed once every mapping and every handle,
 * shareable ones included, is gone). The bytes are not read: they are what the earlier
 * daemon uploaded, and workers may be mapping them still. Blocks (driver calls): the pool.
 * \param fd  taken over on success (ret->fd); still the caller's on failure.
 * \param[out] ret  filled on success only (upload_ns: the check; fill_ns 0).
 * \retval 0, or WSD_ENODEV / -EOPNOTSUPP / WSD_EGPU ("E_GPU_ADOPT": not such an allocation)
 *         / -ENOMEM with \p err filled.
 */
int gpu_adopt(const manifest_t *m, int fd, int index, gpu_export_t *ret, fmt_err_t *err);

/*
 * Frees the daemon's hold on the copy: closes the fd and releases the allocation handle. With
 * VMM the memory stays until the last importer unmaps it; with legacy IPC it is freed now, so
 * callers do this only once no lease is left. Resets \p e to empty; an empty export is fine.
 */
void gpu_release(gpu_export_t *e);

/* "posix_fd" / "legacy_ipc" (info JSON). */
static inline const char *gpu_handle_kind_name(gpu_handle_kind_t k)
{
    return k == GPU_HANDLE_POSIX_FD ? "posix_fd" : k == GPU_HANDLE_LEGACY_IPC ? "legacy_ipc" : "?";
}

/*
 * Parses a device name: "cpu" (or "") gives -1, "cuda:N" gives N (plain decimal, below
 * GPU_DEVICES_MAX). \retval 0 or -EINVAL. Shared by both implementations and the daemon.
 */
static inline int gpu_parse_device(const char *s, int *ret_index)
{
    char *end;
    long v;

    if (!s || !*s || strcmp(s, "cpu") == 0) {
        *ret_index = -1;
        return 0;
    }
    if (strncmp(s, "cuda:", 5) != 0 || s[5] < '0' || s[5] > '9' || (s[5] == '0' && s[6]))
        return -EINVAL;
    v = strtol(s + 5, &end, 10);
    if (*end || v < 0 || v >= GPU_DEVICES_MAX)
        return -EINVAL;
    *ret_index = (int)v;
    return 0;
}

#endif /* WSD_GPU_H */
