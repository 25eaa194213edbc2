/*
 * host.c - building a model's sealed memfd arena.
 *
 * Order matters (RELIABILITY I4): the arena is filled through a writable shared mapping, which
 * must be gone before F_SEAL_WRITE can be added; only then does the fd leave this file. Bytes come
 * from the checkpoint with pread() straight into the mapping (one copy, no bounce buffer), so a
 * checkpoint truncated under us is a read error, never SIGBUS in the daemon. Small storages that
 * lie close together in the file are the exception: one pread() into a bounce buffer serves a
 * run of them (a checkpoint of 10^6 tiny tensors would otherwise be 10^6 system calls).
 */
#include "host.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <xxhash.h>
#include <zlib.h>

#include "checked.h"
#include "convert.h"
#include "fault.h"

#ifndef MFD_HUGE_2MB
#    define MFD_HUGE_2MB (21U << 26) /* log2(2 MiB) << MFD_HUGE_SHIFT, as <linux/memfd.h> */
#endif
#ifndef MFD_NOEXEC_SEAL
#    define MFD_NOEXEC_SEAL 0x0008U
#endif

#define HOST_SEALS   (F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE)
#define COPY_CHUNK   (8u << 20) /* a multiple of every itemsize */
#define RUN_SMALL    (16u << 10) /* a storage this small or smaller may share a read */
#define RUN_SPAN     (1u << 20)  /* the most source bytes one batched read covers */
#define RUN_GAP      4096u      /* the most unused bytes it reads between two storages */

int host_layout(manifest_t *m, uint64_t *ret_size, fmt_err_t *err)
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

static int memfd_new(const char *label, unsigned extra)
{
    char name[249];
    int fd;

    /* The name shows in /proc/PID/fd and maps; it is informational only. */
    snprintf(name, sizeof(name), "weightsd:%s", label);
    if (FAULT("host.memfd"))
        return -ENOMEM;
    fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_NOEXEC_SEAL | extra);
    if (fd < 0 && errno == EINVAL) /* kernels before 6.3 do not know MFD_NOEXEC_SEAL */
        fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING | extra);
    return fd < 0 ? -errno : fd;
}

/* Sizes and allocates every page of a memfd up front, which turns "no memory" (tmpfs limits,
 * cgroup, an empty hugetlb pool) into a clean error here rather than SIGBUS mid-copy. */
static int memfd_fill(int fd, uint64_t size)
{
    if (FAULT("host.ftruncate"))
        return -ENOSPC;
    if (ftruncate(fd, (off_t)size) < 0)
        return -errno;
    if (size > 0 && fallocate(fd, 0, 0, (off_t)size) < 0)
        return -errno;
    return 0;
}

/* Whether shmem hands out transparent huge pages without being asked per mapping. */
static bool shmem_thp_always(void)
{
    char buf[128] = "";
    int fd = open("/sys/kernel/mm/transparent_hugepage/shmem_enabled", O_RDONLY | O_CLOEXEC);
    ssize_t n;

    if (fd < 0)
        return false;
    n = read(fd, buf, sizeof(buf) - 1);
    (void)close(fd);
    if (n <= 0)
        return false;
    buf[n] = '\0';
    return strstr(buf, "[always]") || strstr(buf, "[within_size]") || strstr(buf, "[force]");
}

/*
 * The arena's memory: 2 MiB pages from the hugetlb pool when asked and available (size rounded
 * up to whole huge pages), else ordinary shmem, which may itself be transparent huge pages when
 * the host enables them for shmem. \p kind says which ("hugetlb-2M", "thp", "4k").
 */
static int arena_alloc(const char *label, uint64_t size, int mode, int *ret_fd,
                       uint64_t *ret_size, char *kind, size_t kindlen, fmt_err_t *err)
{
    uint64_t hsize;
    int fd, r;

    if (mode != HOST_HUGEPAGES_NEVER && size > 0 && ck_align_u64(size, 2u << 20, &hsize)) {
        fd = memfd_new(label, MFD_HUGETLB | MFD_HUGE_2MB);
        if (fd >= 0) {
            r = memfd_fill(fd, hsize);
            if (r == 0) {
                snprintf(kind, kindlen, "hugetlb-2M");
                *ret_fd = fd;
                *ret_size = hsize;
                return 0;
            }
            (void)close(fd);
        } else
            r = fd;
        if (mode == HOST_HUGEPAGES_ALWAYS && !shmem_thp_always())
            return fmt_fail(err, WSD_ENOMEM, "E_HUGEPAGES",
                            "--hugepages always: %llu bytes of 2 MiB pages not available (hugetlb "
                            "pool: %s; shmem transparent huge pages are off)",
                            (unsigned long long)hsize, strerror(-r));
    }
    fd = memfd_new(label, 0);
    if (fd < 0)
        return fmt_fail(err, WSD_ENOMEM, "E_MEMFD", "memfd_create: %s", strerror(-fd));
    r = memfd_fill(fd, size);
    if (r < 0) {
        (void)close(fd);
        return fmt_fail(err, WSD_ENOMEM, "E_MEMFD", "cannot allocate %llu bytes for the arena: %s",
                        (unsigned long long)size, strerror(-r));
    }
    snprintf(kind, kindlen, "%s", mode != HOST_HUGEPAGES_NEVER && shmem_thp_always() ? "thp" : "4k");
    *ret_fd = fd;
    *ret_size = size;
    return 0;
}

/*
 * The copy is split into chunks of at most COPY_CHUNK source bytes (a whole number of elements)
 * that any of a few threads may take, so one huge tensor is copied as fast as many small ones.
 * Per-chunk CRC-32s are joined with crc32_combine() and per-chunk hashes hashed in order, so
 * the results do not depend on which thread did what. Threads take runs of chunks: one chunk, or
 * several whole small storages of one source that one read of at most RUN_SPAN bytes covers
 * (chunks and hashes stay the same either way, so the content hash does not depend on it).
 * Only storages of up to RUN_SMALL bytes, where the system call costs more than the copy out of
 * the bounce buffer: a preload of 256 KiB tensors was about 10% slower with them batched too.
 */
typedef struct chunk {
    uint32_t storage;
    uint64_t off;      /* source byte offset within the storage */
    uint64_t len;      /* source bytes */
    uint32_t crc;      /* CRC-32 of the source bytes */
    uint64_t hash;     /* XXH3-64 of the served bytes */
} chunk_t;

typedef struct run {
    size_t first, n;   /* chunks [first, first + n) */
    uint64_t off, len; /* the source bytes one read covers (n > 1) */
} run_t;

typedef struct copy_job {
    manifest_t *m;
    const source_t *sources;
    uint8_t *map;
    bool verify_crc;
    chunk_t *chunks;
    size_t nchunks;
    run_t *runs;
    size_t nruns;
    atomic_size_t next;     /* next run to take */
    atomic_bool failed;     /* stop taking chunks */
    _Atomic uint64_t released; /* source bytes dropped from the page cache after their copy */
    pthread_mutex_t lock;   /* guards err */
    fmt_err_t *err;
    host_progress_t *progress; /* may be NULL */
} copy_job_t;

static void job_fail(copy_job_t *job, const fmt_err_t *err)
{
    pthread_mutex_lock(&job->lock);
    (void)fmt_fail(job->err, err->code, NULL, "%s", err->msg);
    pthread_mutex_unlock(&job->lock);
}

/* The work on one chunk's source bytes, read into \p raw: CRC, conversion, hash. \p raw is the
 * destination itself where nothing is converted and the bytes were read in place. */
static void finish_chunk(copy_job_t *job, chunk_t *c, const uint8_t *raw)
{
    const mf_storage_t *s = &job->m->storages[c->storage];
    bool convert = s->dtype != s->src_dtype;
    unsigned in = wsd_dtype_bits(s->src_dtype) / 8, out = wsd_dtype_bits(s->dtype) / 8;
    uint64_t dst_off = convert ? c->off / in * out : c->off;
    uint64_t out_len = convert ? c->len / in * out : c->len;
    /* Without a map (file share mode, which never converts) bytes are only checked and hashed. */
    uint8_t *dst = job->map ? job->map + s->arena_offset + dst_off : NULL;

    if (job->verify_crc && s->has_crc)
        c->crc = (uint32_t)crc32(0L, raw, (uInt)c->len);
    if (convert)
        convert_run(s->src_dtype, s->dtype, raw, dst, (size_t)(c->len / in));
    else if (dst && dst != raw)
        memcpy(dst, raw, (size_t)c->len);
    c->hash = XXH3_64bits(dst ? dst : raw, (size_t)out_len);
}

static int copy_chunk(copy_job_t *job, chunk_t *c, uint8_t *bounce)
{
    const mf_storage_t *s = &job->m->storages[c->storage];
    const source_t *src = &job->sources[s->source];
    fmt_err_t err = {0};
    bool convert = s->dtype != s->src_dtype;
    uint8_t *raw = convert || !job->map ? bounce : job->map + s->arena_offset + c->off;
    int r;

    r = source_pread(src, raw, (size_t)c->len, s->src_offset + c->off, &err);
    if (r < 0) {
        job_fail(job, &err);
        return r;
    }
    /* The bytes are ours now; the file's cached pages would be a second copy of them. */
    atomic_fetch_add(&job->released, source_release(src, s->src_offset + c->off, c->len));
    finish_chunk(job, c, raw);
    return 0;
}

/* A run of whole small storages: one read into \p bounce, then each from there. */
static int copy_run(copy_job_t *job, const run_t *run, uint8_t *bounce)
{
    const source_t *src;
    fmt_err_t err = {0};
    int r;

    if (run->n == 1)
        return copy_chunk(job, &job->chunks[run->first], bounce);
    src = &job->sources[job->m->storages[job->chunks[run->first].storage].source];
    r = source_pread(src, bounce, (size_t)run->len, run->off, &err);
    if (r < 0) {
        job_fail(job, &err);
        return r;
    }
    atomic_fetch_add(&job->released, source_release(src, run->off, run->len));
    for (size_t k = run->first; k < run->first + run->n; k++) {
        chunk_t *c = &job->chunks[k];

        finish_chunk(job, c, bounce + (job->m->storages[c->storage].src_offset - run->off));
    }
    return 0;
}

static bool run_needs_bounce(const copy_job_t *job, const run_t *run)
{
    const mf_storage_t *s = &job->m->storages[job->chunks[run->first].storage];

    return run->n > 1 || !job->map || s->dtype != s->src_dtype;
}

static void *copy_thread(void *arg)
{
    copy_job_t *job = arg;
    uint8_t *bounce = NULL;

    for (;;) {
        size_t i = atomic_fetch_add(&job->next, 1);
        const run_t *run;
        uint64_t len = 0;

        if (i >= job->nruns || atomic_load(&job->failed))
            break;
        if (job->progress && atomic_load(&job->progress->cancel)) {
            pthread_mutex_lock(&job->lock);
            (void)fmt_fail(job->err, WSD_ECANCELED, "E_CANCELED", "preload cancelled");
            pthread_mutex_unlock(&job->lock);
            atomic_store(&job->failed, true);
            break;
        }
        run = &job->runs[i];
        if (run_needs_bounce(job, run) && !bounce) {
            bounce = malloc(COPY_CHUNK);
            if (!bounce) {
                pthread_mutex_lock(&job->lock);
                (void)fmt_fail(job->err, WSD_ENOMEM, NULL, "out of memory for copy buffers");
                pthread_mutex_unlock(&job->lock);
                atomic_store(&job->failed, true);
                break;
            }
        }
        if (copy_run(job, run, bounce) < 0) {
            atomic_store(&job->failed, true);
            continue;
        }
        for (size_t k = run->first; k < run->first + run->n; k++)
            len += job->chunks[k].len;
        if (job->progress)
            atomic_fetch_add(&job->progress->done, len);
    }
    free(bounce);
    return NULL;
}

static int make_chunks(const manifest_t *m, chunk_t **ret, size_t *ret_n, fmt_err_t *err)
{
    size_t n = 0, k = 0;
    chunk_t *c;

    for (size_t i = 0; i < m->nstorages; i++)
        n += (size_t)((m->storages[i].src_nbytes + COPY_CHUNK - 1) / COPY_CHUNK);
    c = calloc(n ? n : 1, sizeof(*c));
    if (!c)
        return fmt_fail(err, WSD_ENOMEM, NULL, "out of memory planning the copy");
    for (size_t i = 0; i < m->nstorages; i++)
        for (uint64_t off = 0; off < m->storages[i].src_nbytes; off += COPY_CHUNK) {
            uint64_t left = m->storages[i].src_nbytes - off;

            c[k].storage = (uint32_t)i;
            c[k].off = off;
            c[k].len = left < COPY_CHUNK ? left : COPY_CHUNK;
            k++;
        }
    *ret = c;
    *ret_n = n;
    return 0;
}

/* Groups the chunks into runs: a chunk that is a whole storage of at most RUN_SMALL bytes joins
 * the run before it when that run is of such chunks too, its bytes come from the same source
 * after the run's, at most RUN_GAP bytes on, and the run then spans at most RUN_SPAN bytes. */
static int make_runs(copy_job_t *job, fmt_err_t *err)
{
    const manifest_t *m = job->m;
    run_t *r = calloc(job->nchunks ? job->nchunks : 1, sizeof(*r));
    size_t n = 0;
    bool open = false; /* runs[n - 1] may take more */

    if (!r)
        return fmt_fail(err, WSD_ENOMEM, NULL, "out of memory planning the copy");
    for (size_t i = 0; i < job->nchunks; i++) {
        const chunk_t *c = &job->chunks[i];
        const mf_storage_t *s = &m->storages[c->storage];
        uint64_t start = s->src_offset + c->off;
        bool small = c->off == 0 && c->len == s->src_nbytes && c->len <= RUN_SMALL;

        if (open && small) {
            run_t *last = &r[n - 1];
            const mf_storage_t *ls = &m->storages[job->chunks[last->first].storage];
            uint64_t end = last->off + last->len;

            if (ls->source == s->source && start >= end && start - end <= RUN_GAP &&
                start + c->len - last->off <= RUN_SPAN) {
                last->n++;
                last->len = start + c->len - last->off;
                continue;
            }
        }
        r[n] = (run_t){.first = i, .n = 1, .off = start, .len = c->len};
        n++;
        open = small;
    }
    job->runs = r;
    job->nruns = n;
    return 0;
}

static unsigned copy_threads(size_t nruns)
{
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    unsigned n = cpus > 0 ? (unsigned)cpus : 1;

    if (n > HOST_COPY_THREADS_MAX)
        n = HOST_COPY_THREADS_MAX;
    if (n > nruns)
        n = nruns ? (unsigned)nruns : 1;
    return n;
}

/* Copies every chunk with a few threads, then checks CRCs and derives the content hash:
 * XXH3-128 over the manifest's geometry and each storage's chunk hashes. */
static int copy_all(copy_job_t *job, char *ret_hash, size_t hashlen)
{
    const manifest_t *m = job->m;
    unsigned nthreads = copy_threads(job->nruns);
    pthread_t tids[HOST_COPY_THREADS_MAX];
    unsigned started = 0;
    XXH3_state_t *st;
    XXH128_hash_t h;
    size_t k = 0;
    int r = 0;

    for (unsigned i = 1; i < nthreads; i++)
        if (pthread_create(&tids[started], NULL, copy_thread, job) == 0)
            started++;
    (void)copy_thread(job);
    for (unsigned i = 0; i < started; i++)
        pthread_join(tids[i], NULL);
    if (atomic_load(&job->failed))
        return job->err->code ? job->err->code : WSD_EIO;

    st = XXH3_createState();
    if (!st)
        return fmt_fail(job->err, WSD_ENOMEM, NULL, "out of memory hashing");
    XXH3_128bits_reset(st);
    for (size_t i = 0; i < m->ntensors && r == 0; i++) {
        const mf_tensor_t *t = &m->tensors[i];
        int64_t geo[4 + 2 * WSD_MAX_NDIM] = {t->dtype, t->ndim, t->storage,
                                             (int64_t)t->storage_offset};

        memcpy(geo + 4, t->shape, sizeof(t->shape));
        memcpy(geo + 4 + WSD_MAX_NDIM, t->stride, sizeof(t->stride));
        XXH3_128bits_update(st, t->name, strlen(t->name) + 1);
        XXH3_128bits_update(st, geo, sizeof(geo));
    }
    for (size_t i = 0; i < m->nstorages; i++) {
        const mf_storage_t *s = &m->storages[i];
        uint32_t crc = (uint32_t)crc32(0L, Z_NULL, 0);

        bool check = job->verify_crc && s->has_crc;

        XXH3_128bits_update(st, &s->nbytes, sizeof(s->nbytes));
        for (; k < job->nchunks && job->chunks[k].storage == i; k++) {
            if (check)
                crc = (uint32_t)crc32_combine(crc, job->chunks[k].crc,
                                              (z_off_t)job->chunks[k].len);
            XXH3_128bits_update(st, &job->chunks[k].hash, sizeof(job->chunks[k].hash));
        }
        if (r == 0 && check && crc != s->crc32)
            r = fmt_fail(job->err, WSD_EBADCKPT, "E_ZIP_CRC",
                         "record '%s' at offset %llu: CRC-32 %08x, central directory says %08x",
                         s->key, (unsigned long long)s->src_offset, crc, s->crc32);
    }
    h = XXH3_128bits_digest(st);
    XXH3_freeState(st);
    snprintf(ret_hash, hashlen, "%016llx%016llx", (unsigned long long)h.high64,
             (unsigned long long)h.low64);
    return r;
}

/* Copies (or with \p map NULL, only reads and checks) every storage, filling \p hash. */
static int run_copy(manifest_t *m, const source_t *sources, uint8_t *map, bool verify_crc,
                    host_progress_t *progress, char *hash, size_t hashlen, uint64_t *released,
                    fmt_err_t *err)
{
    copy_job_t job = {.m = m, .sources = sources, .map = map, .verify_crc = verify_crc,
                      .err = err, .progress = progress};
    int r;

    atomic_init(&job.next, 0);
    atomic_init(&job.failed, false);
    atomic_init(&job.released, 0);
    pthread_mutex_init(&job.lock, NULL);
    r = make_chunks(m, &job.chunks, &job.nchunks, err);
    if (r == 0)
        r = make_runs(&job, err);
    if (r == 0 && progress) {
        uint64_t total = 0;

        for (size_t i = 0; i < m->nstorages; i++)
            total += m->storages[i].src_nbytes;
        atomic_store(&progress->total, total);
    }
    if (r == 0)
        r = copy_all(&job, hash, hashlen);
    *released = atomic_load(&job.released);
    free(job.runs);
    free(job.chunks);
    pthread_mutex_destroy(&job.lock);
    return r;
}

int host_build(const char *label, manifest_t *m, const source_t *sources, size_t nsources,
               bool verify_crc, int hugepages, host_progress_t *progress, host_arena_t *ret,
               fmt_err_t *err)
{
    uint64_t size = 0;
    uint8_t *map = NULL;
    int fd = -1, r;

    r = host_layout(m, &size, err);
    if (r < 0)
        return r;
    r = arena_alloc(label, size, hugepages, &fd, &size, ret->pages, sizeof(ret->pages), err);
    if (r < 0)
        return r;
    if (size > 0) {
        if (FAULT("host.mmap")) {
            errno = ENOMEM;
            map = MAP_FAILED;
        } else
            map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (map == MAP_FAILED) {
            map = NULL;
            r = fmt_fail(err, WSD_ENOMEM, "E_MEMFD", "cannot map arena of %llu bytes: %s",
                         (unsigned long long)size, strerror(errno));
            goto fail;
        }
    }
    for (size_t i = 0; i < m->nstorages; i++)
        if (m->storages[i].source >= nsources) {
            r = fmt_fail(err, WSD_EINTERNAL, NULL, "storage '%s' names source %u of %zu",
                         m->storages[i].key, m->storages[i].source, nsources);
            goto fail;
        }
    r = run_copy(m, sources, map, verify_crc, progress, ret->hash, sizeof(ret->hash),
                 &ret->cache_released, err);
    /* Whatever else the parse and the copy read (headers, a zip's directory, readahead past
     * a chunk) goes too, by the same policy, whether or not the copy succeeded. */
    for (size_t i = 0; i < nsources; i++)
        (void)source_release(&sources[i], 0, sources[i].size);
    if (r < 0)
        goto fail;
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

int host_share_layout(manifest_t *m, const source_t *src, fmt_err_t *err)
{
    for (size_t i = 0; i < m->nstorages; i++) {
        const mf_storage_t *s = &m->storages[i];

        if (s->source != 0 || s->dtype != s->src_dtype)
            return fmt_fail(err, WSD_EINTERNAL, NULL, "file sharing of a converted or sharded "
                                                      "model");
        if (s->src_offset > src->size || s->nbytes > src->size - s->src_offset)
            return fmt_fail(err, WSD_EINTERNAL, NULL, "storage '%s' lies past the end of '%s'",
                            s->key, src->path);
        m->storages[i].arena_offset = s->src_offset;
    }
    return 0;
}

int host_share_file(manifest_t *m, const source_t *src, bool verify_crc,
                    host_progress_t *progress, host_arena_t *ret, fmt_err_t *err)
{
    int fd, r;

    r = host_share_layout(m, src, err);
    if (r < 0)
        return r;
    /* The page cache is this mode's tier: src's policy is KEEP (the registry sees to it). */
    r = run_copy(m, src, NULL, verify_crc, progress, ret->hash, sizeof(ret->hash),
                 &ret->cache_released, err);
    if (r == 0)
        r = source_check_unchanged(src, err);
    if (r < 0)
        return r;
    /* The source was opened O_RDONLY: clients get a descriptor they cannot write through. */
    fd = fcntl(src->fd, F_DUPFD_CLOEXEC, 3);
    if (fd < 0)
        return fmt_fail(err, WSD_EIO, NULL, "cannot duplicate '%s': %s", src->path,
                        strerror(errno));
    ret->fd = fd;
    ret->size = src->size;
    snprintf(ret->pages, sizeof(ret->pages), "page cache");
    return 0;
}

void host_arena_close(host_arena_t *a)
{
    if (a->fd >= 0)
        (void)close(a->fd);
    a->fd = -1;
}
