/*
 * test-host.c - the host tier (daemon/tiers/host.c): layout, copy, CRC verification, change
 * detection, that the fd it hands out cannot be modified by anyone (RELIABILITY I3), and what
 * the copy leaves of the checkpoint in the page cache (--page-cache).
 */
#include "test.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <zlib.h>

#include "convert.h"
#include "host.h"

static char tmpl[] = "/tmp/wsd-test-host-XXXXXX";

/* A 3-storage "model" straight from a file of known bytes. */
static manifest_t *make_model(const char *path, source_t *src, size_t n)
{
    manifest_t *m = manifest_new();
    uint8_t *data = malloc(n);
    fmt_err_t err = {0};
    int fd;

    for (size_t i = 0; i < n; i++)
        data[i] = (uint8_t)(i * 31 + 7);
    fd = open(path, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0644);
    ASSERT(fd >= 0);
    ASSERT_EQ(write(fd, data, n), (ssize_t)n);
    close(fd);
    free(data);
    ASSERT_EQ(source_open(path, src, &err), 0);
    ASSERT_EQ(manifest_add_storage(m, "a", 0, 0, 100, WSD_DTYPE_U8, NULL), 0);
    ASSERT_EQ(manifest_add_storage(m, "b", 0, 100, 1, WSD_DTYPE_U8, NULL), 0);
    ASSERT_EQ(manifest_add_storage(m, "c", 0, 101, n - 101, WSD_DTYPE_U8, NULL), 0);
    return m;
}

static char *tmpfile_path(void)
{
    static char path[64];
    char *dir = mkdtemp(tmpl);

    ASSERT(dir);
    snprintf(path, sizeof(path), "%s/ckpt", dir);
    return path;
}

TEST(arena_layout_copy_and_seals)
{
    source_t src;
    fmt_err_t err = {0};
    host_arena_t a;
    size_t n = 3 * 4096 + 17;
    char *path = tmpfile_path();
    manifest_t *m = make_model(path, &src, n);
    uint8_t *map, *expect = malloc(n);
    int seals;

    ASSERT_EQ(host_build("t", m, &src, 1, true, HOST_HUGEPAGES_NEVER, NULL, &a, &err), 0);
    ASSERT_EQ(m->storages[0].arena_offset, 0);
    ASSERT_EQ(m->storages[1].arena_offset, 128); /* 100 rounded up to HOST_ALIGN */
    ASSERT_EQ(m->storages[2].arena_offset, 192);
    ASSERT_EQ(a.size, 192 + n - 101);
    seals = fcntl(a.fd, F_GET_SEALS);
    ASSERT_EQ(seals & (F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE),
              F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE);

    map = mmap(NULL, a.size, PROT_READ, MAP_PRIVATE, a.fd, 0);
    ASSERT(map != MAP_FAILED);
    ASSERT_EQ(pread(src.fd, expect, n, 0), (ssize_t)n);
    ASSERT(memcmp(map, expect, 100) == 0);
    ASSERT_EQ(map[128], expect[100]);
    ASSERT(memcmp(map + 192, expect + 101, n - 101) == 0);
    munmap(map, a.size);
    free(expect);
    host_arena_close(&a);
    source_close(&src);
    manifest_free(m);
}

TEST(sealed_fd_resists_every_modification)
{
    source_t src;
    fmt_err_t err = {0};
    host_arena_t a;
    char *path = tmpfile_path();
    manifest_t *m = make_model(path, &src, 8192);
    char proc[64];
    uint8_t *p1, *p2, before;
    int rw;

    ASSERT_EQ(host_build("t", m, &src, 1, true, HOST_HUGEPAGES_NEVER, NULL, &a, &err), 0);
    ASSERT_EQ(write(a.fd, "x", 1), -1);
    ASSERT_EQ(errno, EPERM);
    ASSERT_EQ(pwrite(a.fd, "x", 1, 0), -1);
    ASSERT_EQ(ftruncate(a.fd, 10), -1);
    ASSERT_EQ(ftruncate(a.fd, (off_t)a.size * 2), -1);
    ASSERT_EQ(fallocate(a.fd, 0, 0, (off_t)a.size * 2), -1);
    ASSERT(mmap(NULL, a.size, PROT_READ | PROT_WRITE, MAP_SHARED, a.fd, 0) == MAP_FAILED);
    ASSERT_EQ(errno, EPERM);
    ASSERT_EQ(fcntl(a.fd, F_ADD_SEALS, F_SEAL_FUTURE_WRITE), -1);
    /* A read-only shared map cannot be upgraded with mprotect either. */
    p1 = mmap(NULL, a.size, PROT_READ, MAP_SHARED, a.fd, 0);
    if (p1 != MAP_FAILED) {
        ASSERT_EQ(mprotect(p1, a.size, PROT_READ | PROT_WRITE), -1);
        munmap(p1, a.size);
    }
    /* Reopening through /proc gives a new file description: still sealed. */
    snprintf(proc, sizeof(proc), "/proc/self/fd/%d", a.fd);
    rw = open(proc, O_RDWR | O_CLOEXEC);
    if (rw >= 0) {
        ASSERT_EQ(write(rw, "x", 1), -1);
        close(rw);
    }
    /* Private mappings may be written: copy-on-write, invisible to any other mapping. */
    p1 = mmap(NULL, a.size, PROT_READ | PROT_WRITE, MAP_PRIVATE, a.fd, 0);
    p2 = mmap(NULL, a.size, PROT_READ, MAP_PRIVATE, a.fd, 0);
    ASSERT(p1 != MAP_FAILED && p2 != MAP_FAILED);
    before = p2[5];
    p1[5] = (uint8_t)~p1[5];
    ASSERT_EQ(p2[5], before);
    ASSERT_NE(p1[5], before);
    munmap(p1, a.size);
    munmap(p2, a.size);
    host_arena_close(&a);
    source_close(&src);
    manifest_free(m);
}

TEST(crc_mismatch_named)
{
    source_t src;
    fmt_err_t err = {0};
    host_arena_t a = {.fd = -1};
    char *path = tmpfile_path();
    manifest_t *m = make_model(path, &src, 4096);
    uint8_t buf[100];

    ASSERT_EQ(pread(src.fd, buf, 100, 0), 100);
    m->storages[0].has_crc = true;
    m->storages[0].crc32 = (uint32_t)crc32(0, buf, 100);
    ASSERT_EQ(host_build("t", m, &src, 1, true, HOST_HUGEPAGES_NEVER, NULL, &a, &err), 0);
    host_arena_close(&a);

    m->storages[0].crc32 ^= 1;
    ASSERT_EQ(host_build("t", m, &src, 1, true, HOST_HUGEPAGES_NEVER, NULL, &a, &err), WSD_EBADCKPT);
    ASSERT_STR_CONTAINS(err.msg, "E_ZIP_CRC");
    ASSERT_STR_CONTAINS(err.msg, "'a'");
    ASSERT_EQ(a.fd, -1);
    /* --no-verify skips the check. */
    memset(&err, 0, sizeof(err));
    ASSERT_EQ(host_build("t", m, &src, 1, false, HOST_HUGEPAGES_NEVER, NULL, &a, &err), 0);
    host_arena_close(&a);
    source_close(&src);
    manifest_free(m);
}

TEST(source_changed_during_load)
{
    source_t src;
    fmt_err_t err = {0};
    host_arena_t a = {.fd = -1};
    char *path = tmpfile_path();
    manifest_t *m = make_model(path, &src, 4096);

    /* Truncated under us: the copy meets the end of the file, never SIGBUS. */
    ASSERT_EQ(truncate(path, 50), 0);
    ASSERT_LT(host_build("t", m, &src, 1, true, HOST_HUGEPAGES_NEVER, NULL, &a, &err), 0);
    ASSERT_STR_CONTAINS(err.msg, "E_CHANGED");
    ASSERT_EQ(a.fd, -1);
    source_close(&src);
    manifest_free(m);

    m = make_model(path, &src, 4096);
    /* Rewritten in place with the same size: caught by the mtime check after the copy. */
    {
        struct timespec ts[2] = {{0, UTIME_OMIT}, {12345, 0}};

        ASSERT_EQ(utimensat(AT_FDCWD, path, ts, 0), 0);
    }
    memset(&err, 0, sizeof(err));
    ASSERT_EQ(host_build("t", m, &src, 1, true, HOST_HUGEPAGES_NEVER, NULL, &a, &err), WSD_ESTALE);
    ASSERT_STR_CONTAINS(err.msg, "changed while it was being loaded");
    source_close(&src);
    manifest_free(m);
}

TEST(progress_counts_and_cancel_stops)
{
    source_t src;
    fmt_err_t err = {0};
    host_arena_t a = {.fd = -1};
    char *path = tmpfile_path();
    manifest_t *m = make_model(path, &src, 20u << 20); /* several copy chunks */
    host_progress_t p = {0};

    ASSERT_EQ(host_build("t", m, &src, 1, true, HOST_HUGEPAGES_NEVER, &p, &a, &err), 0);
    ASSERT_UINT_EQ(atomic_load(&p.done), 20u << 20);
    ASSERT_UINT_EQ(atomic_load(&p.total), 20u << 20);
    host_arena_close(&a);

    atomic_store(&p.cancel, true);
    ASSERT_EQ(host_build("t", m, &src, 1, true, HOST_HUGEPAGES_NEVER, &p, &a, &err), WSD_ECANCELED);
    ASSERT_STR_CONTAINS(err.msg, "E_CANCELED");
    ASSERT_EQ(a.fd, -1);
    source_close(&src);
    manifest_free(m);
}

/*
 * Small storages close together in a file are read in runs (one pread for many); the arena and
 * the content hash must not depend on it. The same 40 storages, from two files each, are built
 * once packed (storage after storage: runs form, broken where the file order goes backwards,
 * at a storage over 16 KiB and where the second file starts) and once spread (4 KiB + 1 of filler after each: no runs), as stored
 * and converted to BF16, and must come out byte for byte and hash for hash the same.
 */
#define RUN_STORAGES 40

static uint64_t run_size(size_t i)
{
    static const uint64_t sizes[] = {4, 64, 8, 300, 4096, 20, 1u << 16, 124};

    return i == 13 ? (2u << 20) + 8 : sizes[i % 8]; /* 64 KiB ones and one over 1 MiB */
}

static uint8_t run_byte(size_t i, uint64_t k)
{
    return (uint8_t)(i * 37 + k * 11 + (k >> 8) + 5);
}

/* Storages 0..19 come from source 0, 20..39 from source 1; the file order of 6 and 7 is
 * swapped. Source 1 starts with as many bytes of filler as source 0 holds, so a run that
 * crossed from one source to the other would find its bytes at the offsets it expects. */
static manifest_t *run_model(const char *dir, const char *tag, uint64_t gap, source_t src[2])
{
    manifest_t *m = manifest_new();
    uint64_t off[RUN_STORAGES], end[2] = {0, 0};
    fmt_err_t err = {0};

    for (size_t f = 0; f < 2; f++) {
        char path[128];
        int fd;

        snprintf(path, sizeof(path), "%s/%s%zu", dir, tag, f);
        fd = open(path, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0644);
        ASSERT(fd >= 0);
        if (f == 1) {
            uint8_t *fill = calloc(1, end[0]);

            ASSERT_EQ(write(fd, fill, end[0]), (ssize_t)end[0]);
            free(fill);
            end[1] = end[0];
        }
        for (size_t j = f * 20; j < f * 20 + 20; j++) {
            size_t i = j == 6 ? 7 : j == 7 ? 6 : j; /* the storage j-th in the file */
            uint64_t n = run_size(i);
            uint8_t *b = malloc(n + gap);

            for (uint64_t k = 0; k < n; k++)
                b[k] = run_byte(i, k);
            memset(b + n, 0xee, gap);
            off[i] = end[f];
            ASSERT_EQ(pwrite(fd, b, n + gap, (off_t)end[f]), (ssize_t)(n + gap));
            end[f] += n + gap;
            free(b);
        }
        close(fd);
        ASSERT_EQ(source_open(path, &src[f], &err), 0);
    }
    for (size_t i = 0; i < RUN_STORAGES; i++) {
        char key[16];
        mf_tensor_t t = {.dtype = WSD_DTYPE_F32, .ndim = 1, .shape = {(int64_t)run_size(i) / 4},
                         .stride = {1}, .storage = (uint32_t)i};

        snprintf(key, sizeof(key), "s%zu", i);
        ASSERT_EQ(manifest_add_storage(m, key, i < 20 ? 0 : 1, off[i], run_size(i), WSD_DTYPE_F32,
                                       NULL), 0);
        t.name = key;
        ASSERT_EQ(manifest_add_tensor(m, &t), 0);
    }
    return m;
}

TEST(small_storages_read_in_runs_same_bytes_and_hash)
{
    char *dir = mkdtemp(tmpl);

    ASSERT(dir);
    for (int to = 0; to < 2; to++) { /* as stored, then --dtype bf16 */
        source_t src[2][2];
        manifest_t *m[2];
        host_arena_t a[2];
        uint8_t *map[2];
        fmt_err_t err = {0};

        for (int spread = 0; spread < 2; spread++) {
            m[spread] = run_model(dir, spread ? "spread" : "packed", spread ? 4097 : 0,
                                  src[spread]);
            if (to)
                ASSERT_EQ(convert_manifest(m[spread], WSD_DTYPE_BF16, &err), 0);
            ASSERT_EQ(host_build("t", m[spread], src[spread], 2, true, HOST_HUGEPAGES_NEVER,
                                 NULL, &a[spread], &err), 0);
            map[spread] = mmap(NULL, a[spread].size, PROT_READ, MAP_PRIVATE, a[spread].fd, 0);
            ASSERT(map[spread] != MAP_FAILED);
        }
        ASSERT_STR_EQ(a[0].hash, a[1].hash);
        ASSERT_UINT_EQ(a[0].size, a[1].size);
        for (size_t i = 0; i < RUN_STORAGES; i++) {
            const mf_storage_t *s = &m[0]->storages[i];
            const uint8_t *got = map[0] + s->arena_offset;

            ASSERT_UINT_EQ(s->arena_offset, m[1]->storages[i].arena_offset);
            ASSERT(memcmp(got, map[1] + s->arena_offset, s->nbytes) == 0);
            for (uint64_t k = 0; k < s->nbytes; k++) {
                /* BF16: the converter's rounding of the F32 the file's 4 bytes make. */
                uint8_t want = run_byte(i, k);

                if (to) {
                    uint64_t e = k / 2;
                    uint32_t bits = 0;
                    float f;
                    uint16_t h;

                    for (int b = 0; b < 4; b++)
                        bits |= (uint32_t)run_byte(i, e * 4 + (uint64_t)b) << (8 * b);
                    memcpy(&f, &bits, sizeof(f));
                    h = convert_f32_to_bf16(f);
                    want = (uint8_t)(k % 2 ? h >> 8 : h);
                }
                if (got[k] != want)
                    TEST_FAIL("storage %zu byte %llu: %02x, want %02x", i, (unsigned long long)k,
                              got[k], want);
            }
        }
        for (int spread = 0; spread < 2; spread++) {
            munmap(map[spread], a[spread].size);
            host_arena_close(&a[spread]);
            source_close(&src[spread][0]);
            source_close(&src[spread][1]);
            manifest_free(m[spread]);
        }
    }
}

TEST(empty_model)
{
    manifest_t *m = manifest_new();
    fmt_err_t err = {0};
    host_arena_t a;

    ASSERT_EQ(host_build("empty", m, NULL, 0, true, HOST_HUGEPAGES_NEVER, NULL, &a, &err), 0);
    ASSERT_EQ(a.size, 0);
    ASSERT(fcntl(a.fd, F_GET_SEALS) & F_SEAL_WRITE);
    host_arena_close(&a);
    manifest_free(m);
}

/* Page-cache bytes of [off, off + len) of \p path, by cachestat(2) as the daemon asks. */
static uint64_t cached_bytes(const char *path, uint64_t off, uint64_t len)
{
    struct {
        uint64_t off, len;
    } range = {off, len};
    uint64_t cs[5] = {0};
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    long r;

    ASSERT(fd >= 0);
    r = syscall(451 /* cachestat */, fd, &range, cs, 0);
    close(fd);
    if (r < 0 && errno == ENOSYS)
        SKIP("kernel has no cachestat() (Linux 6.5); --page-cache auto keeps there");
    ASSERT_EQ(r, 0);
    return cs[0] * (uint64_t)sysconf(_SC_PAGESIZE);
}

/* Writes the model's file and pushes it out of the page cache, or skips where it cannot. */
static manifest_t *cold_model(const char *path, source_t *src, size_t n)
{
    manifest_t *m = make_model(path, src, n);

    ASSERT_EQ(fsync(src->fd), 0);
    ASSERT_EQ(posix_fadvise(src->fd, 0, 0, POSIX_FADV_DONTNEED), 0);
    if (cached_bytes(path, 0, n) != 0)
        SKIP("this filesystem keeps file pages (tmpfs?): nothing to drop");
    return m;
}

/* Another reader caches exactly [off, off + len): no readahead past it, which would make
 * the neighbouring pages that reader's too. */
static void warm(const source_t *src, uint64_t off, size_t len)
{
    uint8_t *buf = malloc(len);
    int fd = open(src->path, O_RDONLY | O_CLOEXEC);

    ASSERT(buf && fd >= 0);
    ASSERT_EQ(posix_fadvise(fd, 0, 0, POSIX_FADV_RANDOM), 0);
    ASSERT_EQ(pread(fd, buf, len, (off_t)off), (ssize_t)len);
    close(fd);
    free(buf);
}

TEST(page_cache_auto_drops_only_what_the_copy_brought_in)
{
    const size_t n = (24u << 20) + 4096 * 3 + 5, g = SOURCE_GRANULE;
    char *path = tmpfile_path();
    fmt_err_t err = {0};
    source_t src;
    manifest_t *m = cold_model(path, &src, n);
    host_arena_t a;

    /* Someone else reads the sixth 2 MiB of the file: it is theirs and must stay cached. */
    warm(&src, 5 * g, g);
    ASSERT_UINT_EQ(cached_bytes(path, 5 * g, g), g);
    ASSERT_EQ(source_cache_policy(&src, SOURCE_CACHE_AUTO), SOURCE_CACHE_AUTO);
    ASSERT_EQ(host_build("t", m, &src, 1, true, HOST_HUGEPAGES_NEVER, NULL, &a, &err), 0);
    ASSERT_UINT_EQ(a.cache_released, n - g);
    ASSERT_UINT_EQ(cached_bytes(path, 5 * g, g), g);
    ASSERT_UINT_EQ(cached_bytes(path, 0, 5 * g), 0);
    ASSERT_UINT_EQ(cached_bytes(path, 6 * g, 0), 0);
    host_arena_close(&a);
    source_close(&src);
    manifest_free(m);
    unlink(path);
}

TEST(page_cache_keep_and_drop)
{
    const size_t n = (8u << 20) + 123;
    char *path = tmpfile_path();
    fmt_err_t err = {0};
    source_t src;
    manifest_t *m = cold_model(path, &src, n);
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    host_arena_t a;

    /* keep: what the copy read stays, as before --page-cache existed. */
    ASSERT_EQ(source_cache_policy(&src, SOURCE_CACHE_KEEP), SOURCE_CACHE_KEEP);
    ASSERT_EQ(host_build("t", m, &src, 1, true, HOST_HUGEPAGES_NEVER, NULL, &a, &err), 0);
    ASSERT_UINT_EQ(a.cache_released, 0);
    ASSERT_UINT_EQ(cached_bytes(path, 0, 0), (n + page - 1) / page * page);
    host_arena_close(&a);

    /* drop: everything goes, though the file was all cached (by the copy above). */
    ASSERT_EQ(source_cache_policy(&src, SOURCE_CACHE_DROP), SOURCE_CACHE_DROP);
    ASSERT_EQ(host_build("t", m, &src, 1, true, HOST_HUGEPAGES_NEVER, NULL, &a, &err), 0);
    ASSERT_UINT_EQ(a.cache_released, n);
    ASSERT_UINT_EQ(cached_bytes(path, 0, 0), 0);
    host_arena_close(&a);

    /* auto on a file someone has wholly cached: nothing is ours to drop. */
    warm(&src, 0, n);
    ASSERT_EQ(source_cache_policy(&src, SOURCE_CACHE_AUTO), SOURCE_CACHE_KEEP);
    ASSERT_EQ(host_build("t", m, &src, 1, true, HOST_HUGEPAGES_NEVER, NULL, &a, &err), 0);
    ASSERT_UINT_EQ(a.cache_released, 0);
    ASSERT_UINT_EQ(cached_bytes(path, 0, 0), (n + page - 1) / page * page);
    host_arena_close(&a);
    source_close(&src);
    manifest_free(m);
    unlink(path);
}

TEST(page_cache_policy_names)
{
    source_cache_t c;

    ASSERT_EQ(source_cache_parse("auto", &c), 0);
    ASSERT_EQ(c, SOURCE_CACHE_AUTO);
    ASSERT_EQ(source_cache_parse("keep", &c), 0);
    ASSERT_EQ(c, SOURCE_CACHE_KEEP);
    ASSERT_EQ(source_cache_parse("drop", &c), 0);
    ASSERT_EQ(c, SOURCE_CACHE_DROP);
    ASSERT_EQ(source_cache_parse("Drop", &c), -EINVAL);
    ASSERT_EQ(source_cache_parse("", &c), -EINVAL);
    ASSERT_STR_EQ(source_cache_name(SOURCE_CACHE_AUTO), "auto");
    ASSERT_STR_EQ(source_cache_name(SOURCE_CACHE_DROP), "drop");
    ASSERT_STR_EQ(source_cache_name(SOURCE_CACHE_KEEP), "keep");
}

int main(int argc, char **argv)
{
    return test_main(argc, argv);
}
