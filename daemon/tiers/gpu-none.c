/*
 * gpu-none.c - the GPU tier of a build without CUDA (WSD_WITH_CUDA=OFF, or AUTO without a
 * toolkit). Same interface as gpu-cuda.c (gpu.h); every request for a device fails with
 * -EOPNOTSUPP and a message that names the build, so an operator knows a rebuild is the fix,
 * not a driver or a device.
 */
#include "gpu.h"

#include <errno.h>
#include <unistd.h>

#define NO_CUDA_MSG                                                                                \
    "weightsd was built without CUDA support (WSD_WITH_CUDA=OFF or no CUDA toolkit at build "     \
    "time); only device \"cpu\" is served"

int gpu_probe(const gpu_probe_t **ret)
{
    (void)ret;
    return -EOPNOTSUPP;
}

int gpu_check_device(int index, fmt_err_t *err)
{
    return fmt_fail(err, -EOPNOTSUPP, "E_NO_CUDA", "cuda:%d: " NO_CUDA_MSG, index);
}

bool gpu_build_has_cuda(void)
{
    return false;
}

const gpu_probe_t *gpu_probe_peek(void)
{
    return NULL;
}

bool gpu_device_degraded(int index, char *reason, size_t len)
{
    (void)index;
    (void)reason;
    (void)len;
    return false;
}

int gpu_upload(const manifest_t *m, int host_fd, uint64_t host_size, int index,
               host_progress_t *progress, gpu_export_t *ret, fmt_err_t *err)
{
    (void)m;
    (void)progress;
    (void)host_fd;
    (void)host_size;
    (void)ret;
    return gpu_check_device(index, err);
}

int gpu_adopt(const manifest_t *m, int fd, int index, gpu_export_t *ret, fmt_err_t *err)
{
    (void)m;
    (void)fd;
    (void)ret;
    return gpu_check_device(index, err);
}

void gpu_release(gpu_export_t *e)
{
    /* Nothing can have been uploaded; still honour the contract for an empty export. */
    if (!e)
        return;
    if (e->kind == GPU_HANDLE_POSIX_FD && e->fd >= 0)
        (void)close(e->fd);
    free(e->offsets);
    free(e->pb);
    memset(e, 0, sizeof(*e));
    e->fd = -1;
}
