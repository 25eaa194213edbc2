/*
 * gpu.c - libweightsd's GPU import: the CUDA driver loaded at run time, and the per-process
 * table of imports.
 *
 * Divided into: the driver (dlopen("libcuda.so.1") once, entry points through cuGetProcAddress
 * at a fixed ABI version, so this library builds and runs where no CUDA exists and only a
 * device open needs it), the import itself (VMM: import fd, reserve, map, set access; legacy:
 * cuIpcOpenMemHandle), and the shared table (one import per model, device and access mode in a
 * process, however many wsd_open()s use it).
 *
 * No CUDA header is included (STYLE B2: only the daemon's gpu-cuda.c does): the few driver
 * types used here are restated below with the layouts of cuda.h, which are ABI.
 */
#include "gpu.h"

#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "weightsd.h"

/* cuda.h types and constants (ABI-stable since CUDA 10.2). */
typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext;
typedef unsigned long long CUdeviceptr;
typedef unsigned long long CUmemGenericAllocationHandle;
typedef struct {
    int type; /* CUmemLocationType */
    int id;
} CUmemLocation;
typedef struct {
    CUmemLocation location;
    int flags; /* CUmemAccess_flags */
} CUmemAccessDesc;
typedef struct {
    char reserved[64];
} CUipcMemHandle;
typedef struct {
    char bytes[16];
} CUuuid;

#define CUDA_SUCCESS                          0
#define CU_MEM_LOCATION_TYPE_DEVICE           1
#define CU_MEM_ACCESS_FLAGS_PROT_READ         1
#define CU_MEM_ACCESS_FLAGS_PROT_READWRITE    3
#define CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR 1
#define CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS    1
#define DRIVER_ABI_VERSION                    12000

static struct {
    CUresult (*GetProcAddress)(const char *, void **, int, unsigned long long, int *);
    CUresult (*Init)(unsigned);
    CUresult (*GetErrorString)(CUresult, const char **);
    CUresult (*DeviceGet)(CUdevice *, int);
    CUresult (*DeviceGetCount)(int *);
    CUresult (*DeviceGetUuid)(CUuuid *, CUdevice);
    CUresult (*DevicePrimaryCtxRetain)(CUcontext *, CUdevice);
    CUresult (*DevicePrimaryCtxRelease)(CUdevice);
    CUresult (*CtxPushCurrent)(CUcontext);
    CUresult (*CtxPopCurrent)(CUcontext *);
    CUresult (*CtxSynchronize)(void);
    CUresult (*MemImportFromShareableHandle)(CUmemGenericAllocationHandle *, void *, int);
    CUresult (*MemAddressReserve)(CUdeviceptr *, size_t, size_t, CUdeviceptr, unsigned long long);
    CUresult (*MemAddressFree)(CUdeviceptr, size_t);
    CUresult (*MemMap)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle,
                       unsigned long long);
    CUresult (*MemUnmap)(CUdeviceptr, size_t);
    CUresult (*MemSetAccess)(CUdeviceptr, size_t, const CUmemAccessDesc *, size_t);
    CUresult (*MemRelease)(CUmemGenericAllocationHandle);
    CUresult (*IpcOpenMemHandle)(CUdeviceptr *, CUipcMemHandle, unsigned);
    CUresult (*IpcCloseMemHandle)(CUdeviceptr);
} cu;

struct wsd__gpu {
    wsd__gpu_t *next;   /* process-wide list, under lock */
    unsigned refs;      /* one per wsd_model_t using it */
    char *key;          /* model \n hash \n device \n access */
    int device;         /* CUDA ordinal */
    unsigned handle;    /* WSD__GPU_HANDLE_* */
    CUcontext ctx;      /* retained primary context of device */
    CUdeviceptr base;   /* mapping (VMM) or opened IPC pointer (legacy) */
    uint64_t size;      /* mapped bytes (VMM) */
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static wsd__gpu_t *imports;       /* live imports */
static int cu_state;              /* 0 not tried, 1 ready, < 0 failed */
static char cu_why[256];          /* why the driver is unusable */

static const char *cu_str(CUresult r)
{
    const char *s = NULL;

    if (cu.GetErrorString && cu.GetErrorString(r, &s) == CUDA_SUCCESS && s)
        return s;
    return "unknown CUDA driver error";
}

/* Loads the driver once; under lock. */
static int cu_load(void)
{
    void *h;
    bool ok = true;
    CUresult r;

    if (cu_state)
        return cu_state > 0 ? 0 : WSD_EGPU;
    cu_state = -1;
    h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        snprintf(cu_why, sizeof(cu_why), "cannot load the CUDA driver (libcuda.so.1): %s",
                 dlerror());
        return WSD_EGPU;
    }
    /* cuGetProcAddress_v2 (CUDA 12.0 drivers and later) takes the status out-parameter. */
    *(void **)&cu.GetProcAddress = dlsym(h, "cuGetProcAddress_v2");
    if (!cu.GetProcAddress) {
        snprintf(cu_why, sizeof(cu_why), "the CUDA driver is older than 12.0 "
                                         "(no cuGetProcAddress_v2)");
        return WSD_EGPU;
    }
#define ENTRY(field, name)                                                                         \
    do {                                                                                           \
        int st_ = 0;                                                                               \
        if (cu.GetProcAddress(name, (void **)&cu.field, DRIVER_ABI_VERSION, 0, &st_) !=            \
                CUDA_SUCCESS ||                                                                    \
            !cu.field)                                                                             \
            ok = false;                                                                            \
    } while (0)
    ENTRY(Init, "cuInit");
    ENTRY(GetErrorString, "cuGetErrorString");
    ENTRY(DeviceGet, "cuDeviceGet");
    ENTRY(DeviceGetCount, "cuDeviceGetCount");
    ENTRY(DeviceGetUuid, "cuDeviceGetUuid");
    ENTRY(DevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain");
    ENTRY(DevicePrimaryCtxRelease, "cuDevicePrimaryCtxRelease");
    ENTRY(CtxPushCurrent, "cuCtxPushCurrent");
    ENTRY(CtxPopCurrent, "cuCtxPopCurrent");
    ENTRY(CtxSynchronize, "cuCtxSynchronize");
    ENTRY(MemImportFromShareableHandle, "cuMemImportFromShareableHandle");
    ENTRY(MemAddressReserve, "cuMemAddressReserve");
    ENTRY(MemAddressFree, "cuMemAddressFree");
    ENTRY(MemMap, "cuMemMap");
    ENTRY(MemUnmap, "cuMemUnmap");
    ENTRY(MemSetAccess, "cuMemSetAccess");
    ENTRY(MemRelease, "cuMemRelease");
    ENTRY(IpcOpenMemHandle, "cuIpcOpenMemHandle");
    ENTRY(IpcCloseMemHandle, "cuIpcCloseMemHandle");
#undef ENTRY
    if (!ok) {
        snprintf(cu_why, sizeof(cu_why), "the CUDA driver lacks an entry point weightsd needs");
        return WSD_EGPU;
    }
    r = cu.Init(0);
    if (r != CUDA_SUCCESS) {
        snprintf(cu_why, sizeof(cu_why), "cuInit failed: %s (CUresult %d)", cu_str(r), r);
        return WSD_EGPU;
    }
    /* The handle stays open for the life of the process: imports may outlive any caller. */
    cu_state = 1;
    return 0;
}

static int fail(char *msg, size_t len, int device, const char *call, CUresult r)
{
    snprintf(msg, len, "cuda:%d: %s failed: %s (CUresult %d)", device, call, cu_str(r), r);
    return WSD_EGPU;
}

/* VMM import; on failure nothing stays mapped or reserved. Context is current. */
static int import_vmm(wsd__gpu_t *g, int fd, bool writable, char *msg, size_t len)
{
    CUmemGenericAllocationHandle h;
    CUmemAccessDesc acc = {.location = {.type = CU_MEM_LOCATION_TYPE_DEVICE, .id = g->device},
                           .flags = writable ? CU_MEM_ACCESS_FLAGS_PROT_READWRITE
                                             : CU_MEM_ACCESS_FLAGS_PROT_READ};
    CUdeviceptr p = 0;
    CUresult r;
    int ret = 0;
    bool mapped = false;

    r = cu.MemImportFromShareableHandle(&h, (void *)(intptr_t)fd,
                                        CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR);
    if (r != CUDA_SUCCESS)
        return fail(msg, len, g->device, "cuMemImportFromShareableHandle", r);
    r = cu.MemAddressReserve(&p, g->size, 0, 0, 0);
    if (r != CUDA_SUCCESS) {
        p = 0;
        ret = fail(msg, len, g->device, "cuMemAddressReserve", r);
        goto out;
    }
    r = cu.MemMap(p, g->size, 0, h, 0);
    if (r != CUDA_SUCCESS) {
        ret = fail(msg, len, g->device, "cuMemMap", r);
        goto out;
    }
    mapped = true;
    r = cu.MemSetAccess(p, g->size, &acc, 1);
    if (r != CUDA_SUCCESS && writable) {
        ret = fail(msg, len, g->device, "cuMemSetAccess (read-write)", r);
        goto out;
    }
    if (r != CUDA_SUCCESS) {
        /* Never widened to read-write behind the caller's back: read-only is the default. */
        snprintf(msg, len, "cuda:%d: this driver cannot map the model's device memory "
                           "read-only (cuMemSetAccess PROT_READ: %s, CUresult %d); to share it "
                           "writable, preload it with --allow-gpu-write and open it with "
                           "WSD_OPEN_GPU_WRITE (Python: writable=True)", g->device, cu_str(r), r);
        ret = WSD_EGPU;
        goto out;
    }
    g->base = p;

out:
    if (ret < 0 && mapped)
        (void)cu.MemUnmap(p, g->size);
    if (ret < 0 && p)
        (void)cu.MemAddressFree(p, g->size);
    /* The mapping holds the allocation from here on; the handle is not needed. */
    (void)cu.MemRelease(h);
    return ret;
}

static void import_drop(wsd__gpu_t *g)
{
    CUcontext prev;

    if (g->base && cu.CtxPushCurrent(g->ctx) == CUDA_SUCCESS) {
        /* Unmapping does not wait for kernels still reading the weights (torch's own VMM code
         * synchronises before cuMemUnmap for the same reason): let the context's work finish. */
        (void)cu.CtxSynchronize();
        if (g->handle == WSD__GPU_HANDLE_POSIX_FD) {
            (void)cu.MemUnmap(g->base, g->size);
            (void)cu.MemAddressFree(g->base, g->size);
        } else
            (void)cu.IpcCloseMemHandle(g->base);
        (void)cu.CtxPopCurrent(&prev);
    }
    if (g->ctx)
        (void)cu.DevicePrimaryCtxRelease(g->device);
    free(g->key);
    free(g);
}

/* This process's ordinal of the device with \p uuid (the daemon's cuda:\p device). */
static int local_ordinal(int device, const uint8_t *uuid, int *ret, char *msg, size_t len)
{
    int n = 0;
    CUresult r = cu.DeviceGetCount(&n);

    if (r != CUDA_SUCCESS)
        return fail(msg, len, device, "cuDeviceGetCount", r);
    for (int i = 0; i < n; i++) {
        CUdevice d;
        CUuuid u;

        if (cu.DeviceGet(&d, i) == CUDA_SUCCESS && cu.DeviceGetUuid(&u, d) == CUDA_SUCCESS &&
            memcmp(u.bytes, uuid, sizeof(u.bytes)) == 0) {
            *ret = i;
            return 0;
        }
    }
    snprintf(msg, len, "the daemon's cuda:%d (GPU-%02x%02x%02x%02x-...) is not among the %d "
                       "CUDA device(s) this process sees (CUDA_VISIBLE_DEVICES=%s)",
             device, uuid[0], uuid[1], uuid[2], uuid[3], n,
             getenv("CUDA_VISIBLE_DEVICES") ? getenv("CUDA_VISIBLE_DEVICES") : "unset");
    return WSD_EGPU;
}

int wsd__gpu_key(char *buf, size_t len, const char *name, const char *hash, const char *device,
                 bool writable, unsigned handle, const uint8_t *ipc, size_t ipc_len)
{
    int n = snprintf(buf, len, "%s\n%s\n%s\n%s", name, hash, device, writable ? "rw" : "ro");

    if (n < 0 || (size_t)n >= len)
        return -ENOSPC;
    for (size_t i = 0; handle == WSD__GPU_HANDLE_LEGACY_IPC && i < ipc_len; i++) {
        int k = snprintf(buf + n, len - (size_t)n, "%s%02x", i ? "" : "\n", ipc[i]);

        if (k < 0 || (size_t)k >= len - (size_t)n)
            return -ENOSPC;
        n += k;
    }
    return n;
}

int wsd__gpu_import(const char *key, int device, const uint8_t *uuid, size_t uuid_len,
                    unsigned handle, int fd, const uint8_t *ipc, size_t ipc_len, uint64_t size,
                    bool writable, wsd__gpu_t **ret, int *ret_device, uint64_t *ret_base,
                    char *msg, size_t msglen)
{
    wsd__gpu_t *g = NULL;
    CUdevice dev;
    CUcontext prev;
    CUresult cr;
    int r;

    if (handle != WSD__GPU_HANDLE_POSIX_FD && handle != WSD__GPU_HANDLE_LEGACY_IPC) {
        snprintf(msg, msglen, "unknown GPU handle kind %u", handle);
        return WSD_EPROTO;
    }
    if ((handle == WSD__GPU_HANDLE_LEGACY_IPC && ipc_len != sizeof(CUipcMemHandle)) ||
        (handle == WSD__GPU_HANDLE_POSIX_FD && (fd < 0 || size == 0)) ||
        (uuid_len != 0 && uuid_len != 16)) {
        snprintf(msg, msglen, "malformed GPU export");
        return WSD_EPROTO;
    }
    pthread_mutex_lock(&lock);
    for (wsd__gpu_t *i = imports; key && i; i = i->next)
        if (strcmp(i->key, key) == 0 && i->size == size) {
            i->refs++;
            *ret = i;
            *ret_device = i->device;
            *ret_base = i->base;
            pthread_mutex_unlock(&lock);
            return 0;
        }
    r = cu_load();
    if (r < 0) {
        snprintf(msg, msglen, "cuda:%d: %s", device, cu_why);
        goto out;
    }
    if (uuid_len == 16) {
        r = local_ordinal(device, uuid, &device, msg, msglen);
        if (r < 0)
            goto out;
    }
    g = calloc(1, sizeof(*g));
    if (!g || !(g->key = strdup(key ? key : ""))) {
        r = -ENOMEM;
        goto out;
    }
    g->device = device;
    g->handle = handle;
    g->size = size;
    cr = cu.DeviceGet(&dev, device);
    if (cr == CUDA_SUCCESS)
        cr = cu.DevicePrimaryCtxRetain(&g->ctx, dev);
    if (cr != CUDA_SUCCESS) {
        g->ctx = NULL;
        r = fail(msg, msglen, device, "cuDevicePrimaryCtxRetain", cr);
        goto out;
    }
    cr = cu.CtxPushCurrent(g->ctx);
    if (cr != CUDA_SUCCESS) {
        r = fail(msg, msglen, device, "cuCtxPushCurrent", cr);
        goto out;
    }
    if (handle == WSD__GPU_HANDLE_POSIX_FD)
        r = import_vmm(g, fd, writable, msg, msglen);
    else {
        CUipcMemHandle ih;

        /* Legacy handles cannot be mapped read-only (RELIABILITY G5); the daemon says so. */
        memcpy(ih.reserved, ipc, sizeof(ih.reserved));
        cr = cu.IpcOpenMemHandle(&g->base, ih, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS);
        r = cr == CUDA_SUCCESS ? 0 : fail(msg, msglen, device, "cuIpcOpenMemHandle", cr);
        if (r < 0)
            g->base = 0;
    }
    (void)cu.CtxPopCurrent(&prev);
    if (r < 0)
        goto out;
    g->refs = 1;
    /* An empty key (no content hash) is never matched: see the lookup above. */
    if (key) {
        g->next = imports;
        imports = g;
    }
    *ret = g;
    *ret_device = g->device;
    *ret_base = g->base;
    g = NULL;

out:
    if (g)
        import_drop(g);
    pthread_mutex_unlock(&lock);
    return r;
}

void wsd__gpu_unref(wsd__gpu_t *g)
{
    if (!g)
        return;
    pthread_mutex_lock(&lock);
    if (--g->refs == 0) {
        for (wsd__gpu_t **p = &imports; *p; p = &(*p)->next)
            if (*p == g) {
                *p = g->next;
                break;
            }
        import_drop(g);
    }
    pthread_mutex_unlock(&lock);
}
