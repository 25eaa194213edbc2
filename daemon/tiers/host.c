/*
 * host.c - building a model's sealed memfd arena.
 *
 * Order matters (RELIABILITY I4): the arena is filled through a writable shared mapping, which
 * must be gone before F_SEAL_WRITE can be added; only then does the fd leave this file. Bytes come
 * from the checkpoint with pread() straight into the mapping (one copy, no bounce buffer), so a
 * checkpoint truncated under us is a read error, never SIGBUS in the daemon.
 */
#include "host.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <zlib.h>

#include "checked.h"

#ifndef MFD_NOEXEC_SEAL
#    define MFD_NOEXEC_SEAL 0x0008U
#endif

#define HOST_SEALS   (F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE)
#define COPY_CHUNK   (8u << 20)

static int arena_layout(manifest_t *m, uint64_t *ret_size, fmt_err_t *err)
{
    uint64_t off = 0;

    for (size_t i = 0; i < m->nstorages; i++) {
        mf_storage_t *s = &m->storages[i];

        uint64_t end;

        if (!ck_align_u64(off, HOST_ALIGN, &off) || !ck_add_u64(off, s->nbytes, &end))
            return fmt_fail(err, WSD_EBADCKPT, "E_TENSOR_OVERFLOW",
                            "storage '%s': model size overflows 64 bits", s->key);
        s->arena_offset = off;
        off = end;
    }
    *ret_size = off;
    return 0;
}

static int memfd_new(const char *label)
{
    char name[249];
    int fd;

    /* The name shows in /proc/PID/fd and maps; it is informational only. */
    snprintf(name, sizeof(name), "weightsd:%s", label);
    fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_NOEXEC_SEAL);
    if (fd < 0 && errno == EINVAL) /* kernels before 6.3 do not know MFD_NOEXEC_SEAL */
        fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
    return fd < 0 ? -errno : fd;
}

static int copy_storage(uint8_t *dst, const mf_storage_t *s, const source_t *src, bool verify_crc,
                        fmt_err_t *err)
{
    uLong crc = crc32(0L, Z_NULL, 0);
    uint64_t done = 0;
    int r;

    while (done < s->nbytes) {
        size_t n = s->nbytes - done > COPY_CHUNK ? COPY_CHUNK : (size_t)(s->nbytes - done);

        r = source_pread(src, dst + done, n, s->src_offset + done, err);
        if (r < 0)
            return r;
        if (verify_crc && s->has_crc)
            crc = crc32(crc, dst + done, (uInt)n);
        done += n;
    }
    if (verify_crc && s->has_crc && (uint32_t)crc != s->crc32)
        return fmt_fail(err, WSD_EBADCKPT, "E_ZIP_CRC",
                        "record '%s' at offset %llu: CRC-32 %08x, central directory says %08x",
                        s->key, (unsigned long long)s->src_offset, (unsigned)crc, s->crc32);
    return 0;
}

int host_build(const char *label, manifest_t *m, const source_t *sources, size_t nsources,
               bool verify_crc, host_arena_t *ret, fmt_err_t *err)
{
    uint64_t size = 0;
    uint8_t *map = NULL;
    int fd = -1, r;

    r = arena_layout(m, &size, err);
    if (r < 0)
        return r;
    fd = memfd_new(label);
    if (fd < 0)
        return fmt_fail(err, WSD_ENOMEM, "E_MEMFD", "memfd_create: %s", strerror(-fd));
    if (ftruncate(fd, (off_t)size) < 0) {
        r = fmt_fail(err, WSD_ENOMEM, "E_MEMFD", "cannot size arena to %llu bytes: %s",
                     (unsigned long long)size, strerror(errno));
        goto fail;
    }
    if (size > 0) {
        /* Allocating every page up front turns "no memory" (tmpfs limits, cgroup) into a
         * clean error here rather than SIGBUS halfway through the copy. */
        if (fallocate(fd, 0, 0, (off_t)size) < 0) {
            r = fmt_fail(err, WSD_ENOMEM, "E_MEMFD", "cannot allocate %llu bytes for the arena: %s",
                         (unsigned long long)size, strerror(errno));
            goto fail;
        }
        map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (map == MAP_FAILED) {
            map = NULL;
            r = fmt_fail(err, WSD_ENOMEM, "E_MEMFD", "cannot map arena of %llu bytes: %s",
                         (unsigned long long)size, strerror(errno));
            goto fail;
        }
    }
    for (size_t i = 0; i < m->nstorages; i++) {
        const mf_storage_t *s = &m->storages[i];

        if (s->source >= nsources) {
            r = fmt_fail(err, WSD_EINTERNAL, NULL, "storage '%s' names source %u of %zu", s->key,
                         s->source, nsources);
            goto fail;
        }
        r = copy_storage(map + s->arena_offset, s, &sources[s->source], verify_crc, err);
        if (r < 0)
            goto fail;
    }
    for (size_t i = 0; i < nsources; i++) {
        r = source_check_unchanged(&sources[i], err);
        if (r < 0)
            goto fail;
    }
    if (map && munmap(map, size) < 0) {
        r = fmt_fail(err, WSD_EINTERNAL, "E_MEMFD", "munmap: %s", strerror(errno));
        map = NULL;
        goto fail;
    }
    map = NULL;
    if (fcntl(fd, F_ADD_SEALS, HOST_SEALS) < 0) {
        r = fmt_fail(err, WSD_EINTERNAL, "E_SEAL", "cannot seal arena: %s", strerror(errno));
        goto fail;
    }
    ret->fd = fd;
    ret->size = size;
    return 0;

fail:
    if (map)
        (void)munmap(map, size);
    (void)close(fd);
    return r;
}

void host_arena_close(host_arena_t *a)
{
    if (a->fd >= 0)
        (void)close(a->fd);
    a->fd = -1;
}
