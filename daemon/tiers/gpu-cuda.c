/*
 * gpu-cuda.c - the GPU tier over CUDA (gpu.h): probe, upload, export, release.
 *
 * Divided into: driver entry points (resolved once through the runtime, so only cudart is
 * linked and no libcuda is needed at build time), the probe (cached for the process), the
 * staged host-to-device fill, the two ways to allocate and export (VMM with a POSIX fd handle;
 * legacy cudaMalloc + cudaIpcGetMemHandle where VMM or fd export is missing), and release.
 *
 * Every CUDA failure becomes WSD_EGPU with the call, the device and CUDA's own words in the
 * error; nothing here exits (STYLE E5). Without a device or driver the probe records why and
 * every upload fails with WSD_ENODEV; the host tier never notices.
 */
#include "gpu.h"
#include "gpu-stage.h"

#include <cuda.h>
#include <cuda_runtime_api.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>
#include <unistd.h>

#include "fault.h"
#include "log.h"

/* Streams (one filling thread each) and their staging buffers: two pinned buffers per stream,
 * so one is being read into while the other is in flight. */
#define UPLOAD_STREAMS_MIN 2u
#define UPLOAD_STREAMS_MAX 8u
#define STAGE_BYTES    (8u << 20)

/* The ABI of the driver entry points we ask for: every call used here exists, unchanged, in
 * CUDA 12.0, and asking for a fixed version keeps a newer driver from handing us a _v3. */
#define DRIVER_ABI_VERSION 12000

/* Driver entry points. __typeof__ takes the prototypes from cuda.h without linking libcuda. */
static struct {
    __typeof__(cuDeviceGet) *DeviceGet;
    __typeof__(cuDeviceGetAttribute) *DeviceGetAttribute;
    __typeof__(cuMemCreate) *MemCreate;
    __typeof__(cuMemRelease) *MemRelease;
    __typeof__(cuMemAddressReserve) *MemAddressReserve;
    __typeof__(cuMemAddressFree) *MemAddressFree;
    __typeof__(cuMemMap) *MemMap;
    __typeof__(cuMemUnmap) *MemUnmap;
    __typeof__(cuMemSetAccess) *MemSetAccess;
    __typeof__(cuMemGetAllocationGranularity) *MemGetAllocationGranularity;
    __typeof__(cuMemExportToShareableHandle) *MemExportToShareableHandle;
    __typeof__(cuMemImportFromShareableHandle) *MemImportFromShareableHandle;
    __typeof__(cuMemGetAllocationPropertiesFromHandle) *MemGetAllocationPropertiesFromHandle;
    __typeof__(cuGetErrorString) *GetErrorString;
} drv;

static pthread_once_t probe_once = PTHREAD_ONCE_INIT;
static gpu_probe_t probe_result;
static atomic_bool probe_done; /* probe_result is complete and immutable */
static bool drv_ok;       /* every entry point above was found */
static bool force_legacy; /* WEIGHTSD_GPU_LEGACY=1: test the fallback on VMM hardware */

/* gpu_error_is_sticky() uses plain numbers; these are the header's names for them. */
_Static_assert(cudaErrorECCUncorrectable == 214 && cudaErrorIllegalAddress == 700 &&
                   cudaErrorLaunchTimeout == 702 && cudaErrorAssert == 710 &&
                   cudaErrorHardwareStackError == 714 && cudaErrorIllegalInstruction == 715 &&
                   cudaErrorMisalignedAddress == 716 && cudaErrorInvalidAddressSpace == 717 &&
                   cudaErrorInvalidPc == 718 && cudaErrorLaunchFailure == 719 &&
                   cudaErrorMpsClientTerminated == 810 && CUDA_ERROR_ILLEGAL_ADDRESS == 700 &&
                   CUDA_ERROR_LAUNCH_FAILED == 719 && CUDA_ERROR_ECC_UNCORRECTABLE == 214,
               "CUDA's sticky error codes moved");

/* Per-device health (G6): set once, by the first sticky error the daemon's context sees. */
static struct {
    atomic_bool degraded;
    pthread_mutex_t lock; /* guards reason */
    char reason[200];
} health[GPU_DEVICES_MAX];
static pthread_once_t health_once = PTHREAD_ONCE_INIT;

static void health_init(void)
{
    for (int i = 0; i < GPU_DEVICES_MAX; i++)
        pthread_mutex_init(&health[i].lock, NULL);
}

/* Marks \p dev degraded if \p code is sticky; the first reason is kept and logged once. */
static void note_error(int dev, const char *call, int code, const char *name, const char *what)
{
    bool was = true;

    if (dev < 0 || dev >= GPU_DEVICES_MAX || !gpu_error_is_sticky(code))
        return;
    (void)pthread_once(&health_once, health_init);
    pthread_mutex_lock(&health[dev].lock);
    if (!atomic_load(&health[dev].degraded)) {
        snprintf(health[dev].reason, sizeof(health[dev].reason), "%s failed: %s (%s %d)", call,
                 what, name, code);
        atomic_store(&health[dev].degraded, true);
        was = false;
    }
    pthread_mutex_unlock(&health[dev].lock);
    if (!was)
        log_error("cuda:%d: degraded: %s failed: %s (%s %d); no new preload or GPU lease on it "
                  "until weightsd restarts, the host tier keeps serving",
                  dev, call, what, name, code);
}

bool gpu_device_degraded(int index, char *reason, size_t len)
{
    if (index < 0 || index >= GPU_DEVICES_MAX || !atomic_load(&health[index].degraded))
        return false;
    if (reason && len) {
        pthread_mutex_lock(&health[index].lock);
        snprintf(reason, len, "%s", health[index].reason);
        pthread_mutex_unlock(&health[index].lock);
    }
    return true;
}

/* Live allocation state behind gpu_export_t.priv. */
typedef struct gpu_alloc {
    CUmemGenericAllocationHandle handle; /* VMM: our reference on the allocation */
    void *dptr;                          /* legacy: the cudaMalloc pointer */
} gpu_alloc_t;

static const char *cu_str(CUresult r)
{
    const char *s = NULL;

    if (drv.GetErrorString && drv.GetErrorString(r, &s) == CUDA_SUCCESS && s)
        return s;
    return "unknown driver error";
}

static int cu_fail(fmt_err_t *err, int dev, const char *call, CUresult r)
{
    note_error(dev, call, (int)r, "CUresult", cu_str(r));
    return fmt_fail(err, WSD_EGPU, "E_GPU", "cuda:%d: %s failed: %s (CUresult %d)", dev, call,
                    cu_str(r), (int)r);
}

static int rt_fail(fmt_err_t *err, int dev, const char *call, cudaError_t e)
{
    note_error(dev, call, (int)e, cudaGetErrorName(e), cudaGetErrorString(e));
    /* Clear a non-sticky error so the next call on this thread starts clean. */
    (void)cudaGetLastError();
    return fmt_fail(err, WSD_EGPU, "E_GPU", "cuda:%d: %s failed: %s (%s)", dev, call,
                    cudaGetErrorString(e), cudaGetErrorName(e));
}

static bool entry(const char *sym, void **ret)
{
    enum cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
    cudaError_t e;

    *ret = NULL;
#if CUDART_VERSION >= 12050
    e = cudaGetDriverEntryPointByVersion(sym, ret, DRIVER_ABI_VERSION, cudaEnableDefault, &q);
#else
    e = cudaGetDriverEntryPoint(sym, ret, cudaEnableDefault, &q);
#endif
    if (e != cudaSuccess || q != cudaDriverEntryPointSuccess || !*ret) {
        (void)cudaGetLastError();
        *ret = NULL;
        return false;
    }
    return true;
}

static bool resolve_driver(void)
{
    bool ok = true;

#define ENTRY(field, name) ok &= entry(name, (void **)&drv.field)
    ENTRY(GetErrorString, "cuGetErrorString");
    ENTRY(DeviceGet, "cuDeviceGet");
    ENTRY(DeviceGetAttribute, "cuDeviceGetAttribute");
    ENTRY(MemCreate, "cuMemCreate");
    ENTRY(MemRelease, "cuMemRelease");
    ENTRY(MemAddressReserve, "cuMemAddressReserve");
    ENTRY(MemAddressFree, "cuMemAddressFree");
    ENTRY(MemMap, "cuMemMap");
    ENTRY(MemUnmap, "cuMemUnmap");
    ENTRY(MemSetAccess, "cuMemSetAccess");
    ENTRY(MemGetAllocationGranularity, "cuMemGetAllocationGranularity");
    ENTRY(MemExportToShareableHandle, "cuMemExportToShareableHandle");
    ENTRY(MemImportFromShareableHandle, "cuMemImportFromShareableHandle");
    ENTRY(MemGetAllocationPropertiesFromHandle, "cuMemGetAllocationPropertiesFromHandle");
#undef ENTRY
    return ok;
}

static CUmemAllocationProp vmm_prop(int dev)
{
    CUmemAllocationProp prop;

    memset(&prop, 0, sizeof(prop));
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = dev;
    prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
    return prop;
}

static void probe_device(int i, gpu_device_info_t *d)
{
    struct cudaDeviceProp p;
    CUdevice cd;
    int v = 0;

    if (cudaGetDeviceProperties(&p, i) == cudaSuccess) {
        snprintf(d->name, sizeof(d->name), "%.95s", p.name);
        d->total_bytes = p.totalGlobalMem;
        _Static_assert(sizeof(p.uuid) == GPU_UUID_SIZE, "cudaUUID_t is 16 bytes");
        memcpy(d->uuid, &p.uuid, GPU_UUID_SIZE);
        d->has_uuid = true;
    } else
        (void)cudaGetLastError();
    if (!drv_ok || drv.DeviceGet(&cd, i) != CUDA_SUCCESS)
        return;
    if (drv.DeviceGetAttribute(&v, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, cd) ==
        CUDA_SUCCESS)
        d->vmm = v != 0;
    v = 0;
    if (drv.DeviceGetAttribute(&v, CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED,
                               cd) == CUDA_SUCCESS)
        d->posix_fd = v != 0;
    if (d->vmm && d->posix_fd) {
        CUmemAllocationProp prop = vmm_prop(i);
        size_t g = 0;

        if (drv.MemGetAllocationGranularity(&g, &prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED) ==
                CUDA_SUCCESS &&
            g > 0)
            d->granularity = g;
        else
            d->vmm = false;
    }
}

static void probe_run(void)
{
    gpu_probe_t *p = &probe_result;
    const char *env = getenv("WEIGHTSD_GPU_LEGACY");
    cudaError_t e;
    int n = 0;

    force_legacy = env && strcmp(env, "1") == 0;
    (void)cudaRuntimeGetVersion(&p->runtime_version);
    (void)cudaDriverGetVersion(&p->driver_version);
    e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        snprintf(p->error, sizeof(p->error), "%s (%s)", cudaGetErrorString(e),
                 cudaGetErrorName(e));
        log_info("GPU tier: no CUDA device: %s", p->error);
        return;
    }
    if (n <= 0) {
        snprintf(p->error, sizeof(p->error), "the CUDA runtime reports 0 devices");
        log_info("GPU tier: no CUDA device: %s", p->error);
        return;
    }
    if (n > GPU_DEVICES_MAX) {
        log_warning("GPU tier: %d CUDA devices, serving the first %d", n, GPU_DEVICES_MAX);
        n = GPU_DEVICES_MAX;
    }
    drv_ok = resolve_driver();
    if (!drv_ok)
        log_warning("GPU tier: the driver lacks VMM entry points; using legacy CUDA IPC only");
    for (int i = 0; i < n; i++) {
        gpu_device_info_t *d = &p->dev[i];

        probe_device(i, d);
        log_info("GPU tier: cuda:%d %s, %llu MiB, %s", i, d->name,
                 (unsigned long long)(d->total_bytes >> 20),
                 d->vmm && d->posix_fd && !force_legacy ? "VMM + POSIX fd export"
                                                        : "legacy CUDA IPC fallback");
    }
    p->ndevices = n;
}

static void probe_once_cb(void)
{
    probe_run();
    atomic_store(&probe_done, true);
}

int gpu_probe(const gpu_probe_t **ret)
{
    (void)pthread_once(&probe_once, probe_once_cb);
    *ret = &probe_result;
    return 0;
}

bool gpu_build_has_cuda(void)
{
    return true;
}

const gpu_probe_t *gpu_probe_peek(void)
{
    return atomic_load(&probe_done) ? &probe_result : NULL;
}

int gpu_check_device(int index, fmt_err_t *err)
{
    const gpu_probe_t *p;
    char why[200];

    (void)gpu_probe(&p);
    if (p->ndevices == 0)
        return fmt_fail(err, WSD_ENODEV, "E_NO_DEVICE", "cuda:%d: no CUDA device: %s", index,
                        p->error);
    if (index < 0 || index >= p->ndevices)
        return fmt_fail(err, WSD_ENODEV, "E_NO_DEVICE",
                        "cuda:%d: no such CUDA device; this host has %d (cuda:0 to cuda:%d)",
                        index, p->ndevices, p->ndevices - 1);
    if (gpu_device_degraded(index, why, sizeof(why)))
        return fmt_fail(err, WSD_EGPU, "E_DEVICE_DEGRADED",
                        "cuda:%d is degraded since %s; it takes no new preload or GPU lease "
                        "until weightsd restarts (the host tier keeps serving)",
                        index, why);
    return 0;
}

typedef struct up_job {
    const manifest_t *m;
    const uint64_t *offsets; /* device layout */
    int host_fd;
    uint64_t host_size;
    int dev;
    char *dbase;             /* device address of the allocation */
    gpu_chunk_t *chunks;     /* gpu-stage.h's plan */
    size_t nchunks;
    atomic_size_t next;      /* next chunk to take */
    atomic_bool failed;      /* stop taking chunks */
    host_progress_t *progress; /* may be NULL */
    unsigned nstreams;       /* filler threads, each with a stream and two staging buffers */
    _Atomic uint64_t first_copy_ns; /* when the first thread to have its buffers began; or 0 */
    pthread_mutex_t lock;    /* guards err */
    fmt_err_t *err;
} up_job_t;

static uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void job_fail(up_job_t *job, const fmt_err_t *e)
{
    pthread_mutex_lock(&job->lock);
    (void)fmt_fail(job->err, e->code, NULL, "%s", e->msg);
    pthread_mutex_unlock(&job->lock);
    atomic_store(&job->failed, true);
}

/* Progress counts bytes whose copy has completed, not merely been queued. */
static void done_add(up_job_t *job, uint64_t n)
{
    if (job->progress)
        atomic_fetch_add(&job->progress->done, n);
}

/*
 * One stream's filler: reads a chunk into a free pinned buffer (waiting for that buffer's last
 * copy to finish), queues its copy, and moves on, so reading and DMA overlap within a stream
 * and across streams.
 */
static void *up_thread(void *arg)
{
    up_job_t *job = arg;
    cudaStream_t st = NULL;
    cudaEvent_t ev[2] = {NULL, NULL};
    void *buf[2] = {NULL, NULL};
    bool pending[2] = {false, false};
    uint64_t plen[2] = {0, 0}; /* bytes of the copy in flight from each buffer */
    fmt_err_t e = {0};
    cudaError_t ce;
    unsigned k = 0;

    ce = cudaSetDevice(job->dev);
    if (ce == cudaSuccess)
        ce = cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking);
    for (unsigned i = 0; i < 2 && ce == cudaSuccess; i++)
        ce = cudaEventCreateWithFlags(&ev[i], cudaEventDisableTiming);
    if (ce != cudaSuccess) {
        (void)rt_fail(&e, job->dev, "setting up a staging stream", ce);
        job_fail(job, &e);
        goto out;
    }
    for (unsigned i = 0; i < 2; i++) {
        ce = FAULT("gpu.hostalloc") ? cudaErrorMemoryAllocation
                                    : cudaHostAlloc(&buf[i], STAGE_BYTES, cudaHostAllocDefault);
        if (ce != cudaSuccess) {
            buf[i] = NULL;
            note_error(job->dev, "cudaHostAlloc", (int)ce, cudaGetErrorName(ce),
                       cudaGetErrorString(ce));
            (void)cudaGetLastError();
            (void)fmt_fail(&e, WSD_EGPU, "E_PIN_FAILED",
                           "cuda:%d: cannot pin a %u MiB staging buffer: %s (%s); the upload "
                           "needs %u MiB of pinned host memory",
                           job->dev, STAGE_BYTES >> 20, cudaGetErrorString(ce),
                           cudaGetErrorName(ce), (job->nstreams * 2 * STAGE_BYTES) >> 20);
            job_fail(job, &e);
            goto out;
        }
    }
    {
        uint64_t zero = 0; /* the fill starts when the first thread has its buffers */

        (void)atomic_compare_exchange_strong(&job->first_copy_ns, &zero, now_ns());
    }
    for (;; k ^= 1) {
        size_t i = atomic_fetch_add(&job->next, 1);
        const gpu_chunk_t *c;

        if (i >= job->nchunks || atomic_load(&job->failed))
            break;
        if (job->progress && atomic_load(&job->progress->cancel)) {
            (void)fmt_fail(&e, WSD_ECANCELED, "E_CANCELED", "preload cancelled");
            job_fail(job, &e);
            break;
        }
        c = &job->chunks[i];
        if (pending[k]) {
            ce = cudaEventSynchronize(ev[k]);
            if (ce != cudaSuccess) {
                (void)rt_fail(&e, job->dev, "cudaMemcpyAsync (host to device)", ce);
                job_fail(job, &e);
                break;
            }
            pending[k] = false;
            done_add(job, plen[k]);
        }
        if (gpu_stage_read(job->m, job->offsets, c, job->host_fd, job->host_size, buf[k],
                           &e) < 0) {
            job_fail(job, &e);
            break;
        }
        /* gpu.sticky: as if the copy had hit a sticky error (G6's daemon side, on hardware). */
        ce = FAULT("gpu.sticky")
                 ? cudaErrorIllegalAddress
                 : cudaMemcpyAsync(job->dbase + c->dev_off, buf[k], (size_t)c->len,
                                   cudaMemcpyHostToDevice, st);
        if (ce == cudaSuccess)
            ce = cudaEventRecord(ev[k], st);
        if (ce != cudaSuccess) {
            (void)rt_fail(&e, job->dev, "cudaMemcpyAsync (host to device)", ce);
            job_fail(job, &e);
            break;
        }
        pending[k] = true;
        plen[k] = c->payload;
    }
    if (st) {
        /* Always drain: a staging buffer must not be freed under a copy in flight. */
        ce = cudaStreamSynchronize(st);
        if (ce != cudaSuccess && !atomic_load(&job->failed)) {
            (void)rt_fail(&e, job->dev, "cudaStreamSynchronize", ce);
            job_fail(job, &e);
        }
        for (unsigned i = 0; ce == cudaSuccess && i < 2; i++)
            if (pending[i])
                done_add(job, plen[i]);
    }
out:
    for (unsigned i = 0; i < 2; i++) {
        if (ev[i])
            (void)cudaEventDestroy(ev[i]);
        if (buf[i])
            (void)cudaFreeHost(buf[i]);
    }
    if (st)
        (void)cudaStreamDestroy(st);
    return NULL;
}

/*
 * Filler threads for one upload. Each thread's pread() into pinned memory is a CPU copy of
 * roughly 10 GB/s, while one PCIe 5 x16 link takes about 55 GB/s host to device, so the link
 * wants several readers: one per online CPU, between 2 and 8 (a preload's host copy is over by
 * the time the upload starts, so they do not compete with it).
 */
static unsigned upload_streams(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);

    if (n < (long)UPLOAD_STREAMS_MIN)
        return UPLOAD_STREAMS_MIN;
    return n > (long)UPLOAD_STREAMS_MAX ? UPLOAD_STREAMS_MAX : (unsigned)n;
}

/* Fills [dbase, dbase + layout) from the host arena. */
static int fill(const manifest_t *m, const uint64_t *offsets, int host_fd, uint64_t host_size,
                int dev, char *dbase, host_progress_t *progress, uint64_t *ret_fill_ns,
                fmt_err_t *err)
{
    up_job_t job = {.m = m, .offsets = offsets, .host_fd = host_fd, .host_size = host_size,
                    .dev = dev, .dbase = dbase, .progress = progress, .err = err};
    pthread_t th[UPLOAD_STREAMS_MAX];
    unsigned nth = 0, want;
    int r;

    r = gpu_stage_plan(m, offsets, STAGE_BYTES, &job.chunks, &job.nchunks, err);
    if (r < 0 || job.nchunks == 0)
        return r;
    job.nstreams = upload_streams();
    atomic_init(&job.next, 0);
    atomic_init(&job.failed, false);
    atomic_init(&job.first_copy_ns, 0);
    pthread_mutex_init(&job.lock, NULL);
    want = job.nchunks < job.nstreams ? (unsigned)job.nchunks : job.nstreams;
    for (; nth < want; nth++)
        if (pthread_create(&th[nth], NULL, up_thread, &job) != 0)
            break;
    if (nth == 0)
        (void)up_thread(&job); /* no thread to spare: fill from this one */
    for (unsigned i = 0; i < nth; i++)
        pthread_join(th[i], NULL);
    if (atomic_load(&job.first_copy_ns))
        *ret_fill_ns = now_ns() - atomic_load(&job.first_copy_ns);
    if (atomic_load(&job.failed))
        r = err->code ? err->code : WSD_EGPU;
    pthread_mutex_destroy(&job.lock);
    free(job.chunks);
    return r;
}

/* VMM: create, map for the fill, unmap, export. On success only the handle and fd remain. */
/*
 * Zeroes a new allocation before the fill (RELIABILITY G4): the fill writes the storages and
 * the padding between storages it packs into one copy, but not the alignment gaps between
 * copies nor the tail past the layout up to the allocation granularity, and device memory
 * comes back from the driver as it was left (cuMemCreate and cudaMalloc promise nothing), here
 * possibly another model's bytes that a worker of this one may not open. Every worker maps the
 * whole allocation, so all of it is written. Synchronised before the fill starts (its streams
 * do not wait on other streams).
 */
static int zero_device(int dev, void *ptr, uint64_t size, fmt_err_t *err)
{
    cudaError_t ce = cudaMemsetAsync(ptr, 0, (size_t)size, cudaStreamPerThread);

    if (ce == cudaSuccess)
        ce = cudaStreamSynchronize(cudaStreamPerThread);
    return ce == cudaSuccess ? 0 : rt_fail(err, dev, "cudaMemsetAsync (zeroing)", ce);
}

static int upload_vmm(const manifest_t *m, const uint64_t *offsets, int host_fd,
                      uint64_t host_size, int dev, uint64_t size, host_progress_t *progress,
                      gpu_alloc_t *a, int *ret_fd, uint64_t *ret_fill_ns, fmt_err_t *err)
{
    CUmemAllocationProp prop = vmm_prop(dev);
    CUmemAccessDesc acc;
    CUdeviceptr ptr = 0;
    bool have = false, mapped = false;
    int fd = -1, r = 0;
    CUresult cr;

    memset(&acc, 0, sizeof(acc));
    acc.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    acc.location.id = dev;
    acc.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    cr = drv.MemCreate(&a->handle, size, &prop, 0);
    if (cr != CUDA_SUCCESS) {
        r = cu_fail(err, dev, "cuMemCreate", cr);
        goto out;
    }
    have = true;
    cr = drv.MemAddressReserve(&ptr, size, 0, 0, 0);
    if (cr != CUDA_SUCCESS) {
        ptr = 0;
        r = cu_fail(err, dev, "cuMemAddressReserve", cr);
        goto out;
    }
    cr = drv.MemMap(ptr, size, 0, a->handle, 0);
    if (cr != CUDA_SUCCESS) {
        r = cu_fail(err, dev, "cuMemMap", cr);
        goto out;
    }
    mapped = true;
    cr = drv.MemSetAccess(ptr, size, &acc, 1);
    if (cr != CUDA_SUCCESS) {
        r = cu_fail(err, dev, "cuMemSetAccess", cr);
        goto out;
    }
    r = zero_device(dev, (void *)(uintptr_t)ptr, size, err);
    if (r < 0)
        goto out;
    r = fill(m, offsets, host_fd, host_size, dev, (char *)(uintptr_t)ptr, progress, ret_fill_ns,
             err);
    if (r < 0)
        goto out;
    cr = drv.MemExportToShareableHandle(&fd, a->handle, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                                        0);
    if (cr != CUDA_SUCCESS) {
        fd = -1;
        r = cu_fail(err, dev, "cuMemExportToShareableHandle", cr);
        goto out;
    }
    /* The driver's fd is not promised to be CLOEXEC or above 2 (STYLE M4). */
    *ret_fd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
    if (*ret_fd < 0)
        r = fmt_fail(err, -errno, NULL, "cuda:%d: cannot duplicate the export fd: %s", dev,
                     strerror(errno));
    (void)close(fd);

out:
    /* The daemon keeps no mapping: workers map the allocation through the fd. */
    if (mapped)
        (void)drv.MemUnmap(ptr, size);
    if (ptr)
        (void)drv.MemAddressFree(ptr, size);
    if (r < 0 && have)
        (void)drv.MemRelease(a->handle);
    return r;
}

/* Legacy fallback: one cudaMalloc, filled, with an IPC handle. The pointer is kept: freeing it
 * would free the memory under importers, so it goes only with the model's last lease. */
static int upload_legacy(const manifest_t *m, const uint64_t *offsets, int host_fd,
                         uint64_t host_size, int dev, uint64_t size, host_progress_t *progress,
                         gpu_alloc_t *a, uint8_t ipc[GPU_IPC_HANDLE_SIZE], uint64_t *ret_fill_ns,
                         fmt_err_t *err)
{
    cudaIpcMemHandle_t h;
    cudaError_t ce;
    int r;

    _Static_assert(sizeof(h) == GPU_IPC_HANDLE_SIZE, "cudaIpcMemHandle_t is 64 bytes");
    ce = cudaMalloc(&a->dptr, size);
    if (ce != cudaSuccess) {
        a->dptr = NULL;
        return rt_fail(err, dev, "cudaMalloc", ce);
    }
    r = zero_device(dev, a->dptr, size, err);
    if (r == 0)
        r = fill(m, offsets, host_fd, host_size, dev, a->dptr, progress, ret_fill_ns, err);
    if (r == 0) {
        ce = cudaIpcGetMemHandle(&h, a->dptr);
        if (ce != cudaSuccess)
            r = rt_fail(err, dev, "cudaIpcGetMemHandle", ce);
        else
            memcpy(ipc, &h, sizeof(h));
    }
    if (r < 0) {
        (void)cudaFree(a->dptr);
        a->dptr = NULL;
    }
    return r;
}

/*
 * What gpu_upload() and gpu_adopt() share: the device checked, \p e's layout (offsets, size
 * rounded to the allocation granularity), UUID and handle kind (VMM only where \p vmm_only),
 * and the device's primary context current on this pool thread before any driver call.
 * \retval 0, or < 0 with \p err filled and nothing left allocated.
 */
static int export_prepare(const manifest_t *m, int index, bool vmm_only, gpu_export_t *e,
                          fmt_err_t *err)
{
    const gpu_probe_t *p;
    const gpu_device_info_t *d;
    uint64_t layout = 0, gran;
    cudaError_t ce;
    bool vmm;
    int r;

    r = gpu_check_device(index, err);
    if (r < 0)
        return r;
    (void)gpu_probe(&p);
    d = &p->dev[index];
    vmm = drv_ok && d->vmm && d->posix_fd && !force_legacy;
    if (vmm_only && !vmm)
        return fmt_fail(err, WSD_EGPU, "E_GPU_ADOPT", "cuda:%d: no VMM with POSIX fd handles "
                        "here, so a kept copy cannot be taken back", index);
    r = gpu_layout(m, &e->offsets, &layout, err);
    if (r < 0)
        return r;
    e->noffsets = m->nstorages;
    e->has_uuid = d->has_uuid;
    memcpy(e->uuid, d->uuid, GPU_UUID_SIZE);
    e->kind = vmm ? GPU_HANDLE_POSIX_FD : GPU_HANDLE_LEGACY_IPC;
    gran = vmm ? d->granularity : GPU_ALIGN;
    if (!ck_align_u64(layout ? layout : 1, gran, &e->size)) {
        r = fmt_fail(err, WSD_EBADCKPT, "E_TENSOR_OVERFLOW", "GPU allocation size overflows");
        goto fail;
    }
    ce = cudaSetDevice(index);
    if (ce == cudaSuccess)
        ce = cudaFree(NULL);
    if (ce != cudaSuccess) {
        r = rt_fail(err, index, "initialising the device", ce);
        goto fail;
    }
    return 0;

fail:
    free(e->offsets);
    e->offsets = NULL;
    return r;
}

int gpu_upload(const manifest_t *m, int host_fd, uint64_t host_size, int index,
               host_progress_t *progress, gpu_export_t *ret, fmt_err_t *err)
{
    gpu_export_t e = {.device = index, .fd = -1};
    gpu_alloc_t *a;
    uint64_t t0;
    int r;

    r = export_prepare(m, index, false, &e, err);
    if (r < 0)
        return r;
    a = calloc(1, sizeof(*a));
    if (!a) {
        free(e.offsets);
        return fmt_fail(err, -ENOMEM, NULL, "out of memory");
    }
    t0 = now_ns();
    if (e.kind == GPU_HANDLE_POSIX_FD)
        r = upload_vmm(m, e.offsets, host_fd, host_size, index, e.size, progress, a, &e.fd,
                       &e.fill_ns, err);
    else
        r = upload_legacy(m, e.offsets, host_fd, host_size, index, e.size, progress, a, e.ipc,
                          &e.fill_ns, err);
    if (r < 0) {
        free(a);
        free(e.offsets);
        return r;
    }
    e.upload_ns = now_ns() - t0;
    e.priv = a;
    *ret = e;
    return 0;
}

/* The kept allocation behind \p fd: on device \p dev, and mappable for \p size bytes (cuMemMap
 * refuses a range past the allocation's end). Nothing stays imported or mapped. */
static int check_kept(int fd, int dev, uint64_t size, fmt_err_t *err)
{
    CUmemGenericAllocationHandle h;
    CUmemAllocationProp prop;
    CUdeviceptr ptr = 0;
    CUresult cr;
    int r = 0;

    cr = drv.MemImportFromShareableHandle(&h, (void *)(intptr_t)fd,
                                          CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR);
    if (cr != CUDA_SUCCESS)
        return cu_fail(err, dev, "cuMemImportFromShareableHandle", cr);
    memset(&prop, 0, sizeof(prop));
    cr = drv.MemGetAllocationPropertiesFromHandle(&prop, h);
    if (cr != CUDA_SUCCESS)
        r = cu_fail(err, dev, "cuMemGetAllocationPropertiesFromHandle", cr);
    else if (prop.location.type != CU_MEM_LOCATION_TYPE_DEVICE || prop.location.id != dev)
        r = fmt_fail(err, WSD_EGPU, "E_GPU_ADOPT", "cuda:%d: the kept copy is an allocation on "
                     "device %d, not this one", dev, prop.location.id);
    if (r == 0) {
        cr = drv.MemAddressReserve(&ptr, size, 0, 0, 0);
        if (cr != CUDA_SUCCESS) {
            ptr = 0;
            r = cu_fail(err, dev, "cuMemAddressReserve", cr);
        }
    }
    if (r == 0) {
        cr = drv.MemMap(ptr, size, 0, h, 0);
        if (cr != CUDA_SUCCESS)
            r = fmt_fail(err, WSD_EGPU, "E_GPU_ADOPT", "cuda:%d: the kept copy does not hold "
                         "the model's %llu bytes (cuMemMap: %s)", dev, (unsigned long long)size,
                         cu_str(cr));
        else
            (void)drv.MemUnmap(ptr, size);
    }
    if (ptr)
        (void)drv.MemAddressFree(ptr, size);
    (void)drv.MemRelease(h);
    return r;
}

int gpu_adopt(const manifest_t *m, int fd, int index, gpu_export_t *ret, fmt_err_t *err)
{
    gpu_export_t e = {.device = index, .fd = -1};
    uint64_t t0;
    int r;

    r = export_prepare(m, index, true, &e, err);
    if (r < 0)
        return r;
    t0 = now_ns();
    r = check_kept(fd, index, e.size, err);
    if (r < 0) {
        free(e.offsets);
        return r;
    }
    e.fd = fd;
    e.upload_ns = now_ns() - t0;
    *ret = e;
    return 0;
}

void gpu_release(gpu_export_t *e)
{
    gpu_alloc_t *a;

    if (!e)
        return;
    a = e->priv;
    if (e->kind == GPU_HANDLE_POSIX_FD && e->fd >= 0)
        (void)close(e->fd);
    if (a && e->kind == GPU_HANDLE_POSIX_FD) {
        /* Importers' mappings hold their own references: memory goes with the last unmap.
         * This runs on the loop thread (evict, model free), which the upload never made the
         * device's current one; cuda.h does not say cuMemRelease needs a context, but code
         * that called the VMM release calls without one has seen them fail, so make it so. */
        CUresult cr;

        if (cudaSetDevice(e->device) != cudaSuccess)
            (void)cudaGetLastError();
        cr = drv.MemRelease(a->handle);
        if (cr != CUDA_SUCCESS)
            log_warning("cuda:%d: cuMemRelease failed: %s, ignoring", e->device, cu_str(cr));
    } else if (a && e->kind == GPU_HANDLE_LEGACY_IPC && a->dptr) {
        cudaError_t ce = cudaSetDevice(e->device);

        if (ce == cudaSuccess)
            ce = cudaFree(a->dptr);
        if (ce != cudaSuccess) {
            (void)cudaGetLastError();
            log_warning("cuda:%d: cudaFree failed: %s, ignoring", e->device,
                        cudaGetErrorString(ce));
        }
    }
    free(a);
    free(e->offsets);
    free(e->pb);
    memset(e, 0, sizeof(*e));
    e->fd = -1;
}
