/*
 * test-gpu-stage.c - the upload plan and staging reads (daemon/tiers/gpu-stage.h), in every
 * build: the part of a GPU upload that decides what each host-to-device copy carries.
 *
 * Each test plays the upload on the CPU: a real arena file, the real plan, every chunk read
 * into a buffer of stale bytes and copied into a "device" image at its offset, exactly what
 * gpu-cuda.c hands to cudaMemcpyAsync. The image must hold every storage's arena bytes at its
 * gpu_layout() offset and zeros in the padding, whatever the arena's order and gaps.
 */
#include "test.h"

#include <errno.h>
#include <sys/mman.h>
#include <unistd.h>

#include "fault.h"
#include "gpu-stage.h"
#include "gpu.h"
#include "host.h"

#define STALE 0xA5

/* A memfd of \p size pseudo-random bytes (deterministic). */
static int arena_fd(uint64_t size)
{
    int fd = memfd_create("test-gpu-stage", MFD_CLOEXEC);
    uint8_t *p = malloc(size ? size : 1);
    uint32_t x = 2463534242u;

    ASSERT(fd >= 0 && p);
    for (uint64_t i = 0; i < size; i++) {
        x ^= x << 13, x ^= x >> 17, x ^= x << 5;
        p[i] = (uint8_t)x;
    }
    ASSERT_EQ(write(fd, p, size), (ssize_t)size);
    free(p);
    return fd;
}

typedef struct played {
    uint8_t *dev; /* the device image, layout bytes */
    uint64_t layout;
    uint64_t *off; /* gpu_layout() */
    size_t nchunks;
    size_t nslices; /* chunks that are one slice of a large storage */
    size_t maxpack; /* most storages in one chunk */
} played_t;

/*
 * Plans \p m for a \p stage-byte buffer and plays every chunk; checks the plan's own promises
 * (chunk sizes, storage order, each storage byte copied once) and the image.
 */
static void play(const manifest_t *m, int fd, uint64_t host_size, uint64_t stage, played_t *p)
{
    fmt_err_t err = {0};
    gpu_chunk_t *c = NULL;
    uint8_t *buf = malloc(stage), *host = malloc(host_size ? host_size : 1);
    uint8_t *seen;
    uint64_t payload = 0, want = 0, pos = 0;

    memset(p, 0, sizeof(*p));
    ASSERT_EQ(gpu_layout(m, &p->off, &p->layout, &err), 0);
    p->dev = malloc(p->layout ? p->layout : 1);
    seen = calloc(p->layout ? p->layout : 1, 1);
    ASSERT(buf && host && p->dev && seen);
    memset(p->dev, STALE, p->layout);
    ASSERT_EQ(pread(fd, host, host_size, 0), (ssize_t)host_size);
    ASSERT_EQ(gpu_stage_plan(m, p->off, stage, &c, &p->nchunks, &err), 0);
    for (size_t i = 0; i < p->nchunks; i++) {
        ASSERT(c[i].len > 0 && c[i].len <= stage);
        ASSERT(c[i].dev_off >= pos); /* in order, never overlapping */
        ASSERT(c[i].dev_off + c[i].len <= p->layout);
        memset(buf, STALE, stage);
        if (gpu_stage_read(m, p->off, &c[i], fd, host_size, buf, &err) != 0)
            TEST_FAIL("chunk %zu: %s", i, err.msg);
        memcpy(p->dev + c[i].dev_off, buf, c[i].len);
        memset(seen + c[i].dev_off, 1, c[i].len);
        payload += c[i].payload;
        pos = c[i].dev_off + c[i].len;
        if (c[i].count == 0)
            p->nslices++;
        else if (c[i].count > p->maxpack)
            p->maxpack = c[i].count;
    }
    for (size_t i = 0; i < m->nstorages; i++) {
        const mf_storage_t *s = &m->storages[i];
        uint64_t end = i + 1 < m->nstorages ? p->off[i + 1] : p->layout;

        want += s->nbytes;
        for (uint64_t b = 0; b < s->nbytes; b++)
            if (!seen[p->off[i] + b] || p->dev[p->off[i] + b] != host[s->arena_offset + b])
                TEST_FAIL("storage %zu ('%s') byte %llu: %s", i, s->key, (unsigned long long)b,
                          seen[p->off[i] + b] ? "differs from the arena" : "never copied");
        /* Padding a copy carried is zeros, never a staging buffer's stale bytes. */
        for (uint64_t b = p->off[i] + s->nbytes; b < end; b++)
            if (seen[b] && p->dev[b] != 0)
                TEST_FAIL("padding at %llu after storage %zu is %#x", (unsigned long long)b, i,
                          p->dev[b]);
    }
    ASSERT_UINT_EQ(payload, want);
    free(c);
    free(seen);
    free(host);
    free(buf);
}

static void played_free(played_t *p)
{
    free(p->dev);
    free(p->off);
}

/* Storages of \p n sizes from \p sizes (cycled), laid out by the host tier itself. */
static manifest_t *model(size_t n, const uint64_t *sizes, size_t nsizes, uint64_t *ret_host)
{
    manifest_t *m = manifest_new();
    fmt_err_t err = {0};
    char key[32];

    ASSERT(m);
    for (size_t i = 0; i < n; i++) {
        snprintf(key, sizeof(key), "s%zu", i);
        ASSERT_EQ(manifest_add_storage(m, key, 0, 0, sizes[i % nsizes], WSD_DTYPE_U8, NULL), 0);
    }
    ASSERT_EQ(host_layout(m, ret_host, &err), 0);
    return m;
}

/* 1000 small storages: one copy with an 8 MiB buffer, many with a 4 KiB one; same image. */
TEST(small_storages_are_packed)
{
    static const uint64_t sizes[] = {1, 4, 300, 17, 64, 256, 255, 2, 1000};
    uint64_t host;
    manifest_t *m = model(1000, sizes, 9, &host);
    int fd = arena_fd(host);
    played_t big, small;

    play(m, fd, host, 8u << 20, &big);
    ASSERT_UINT_EQ(big.nchunks, 1);
    ASSERT_UINT_EQ(big.maxpack, 1000);
    play(m, fd, host, 4096, &small);
    ASSERT_GT(small.nchunks, 1);
    ASSERT_LT(small.nchunks, 1000 / 4);
    ASSERT_UINT_EQ(small.nslices, 0);
    for (size_t i = 0; i < m->nstorages; i++) /* padding between copies is nobody's */
        ASSERT_EQ(memcmp(big.dev + big.off[i], small.dev + small.off[i], m->storages[i].nbytes), 0);
    played_free(&big);
    played_free(&small);
    close(fd);
    manifest_free(m);
}

/* 2^16 storages of 16 bytes take 2 copies of 8 MiB (device span 2^16 x 256), not 2^16. */
TEST(many_tiny_storages_take_few_copies)
{
    static const uint64_t sizes[] = {16};
    uint64_t host;
    manifest_t *m = model(1u << 16, sizes, 1, &host);
    int fd = arena_fd(host);
    played_t p;

    play(m, fd, host, 8u << 20, &p);
    ASSERT_UINT_EQ(p.layout, (1u << 24) - 256 + 16);
    ASSERT_UINT_EQ(p.nchunks, 2);
    played_free(&p);
    close(fd);
    manifest_free(m);
}

/* A storage larger than the buffer is cut into slices between packed neighbours. */
TEST(large_storage_is_sliced)
{
    static const uint64_t sizes[] = {10, 3 * 4096 + 17, 20, 4096, 4097, 30};
    uint64_t host;
    manifest_t *m = model(6, sizes, 6, &host);
    int fd = arena_fd(host);
    played_t p;

    play(m, fd, host, 4096, &p);
    /* s0 | s1: 4 slices | s2 | s3 (exactly a buffer) | s4: 2 slices | s5 */
    ASSERT_UINT_EQ(p.nslices, 6);
    ASSERT_UINT_EQ(p.nchunks, 10);
    played_free(&p);
    close(fd);
    manifest_free(m);
}

/* Zero-byte storages are copied by nobody; a model of only those has an empty plan. */
TEST(empty_storages)
{
    static const uint64_t zeros[] = {0};
    static const uint64_t mixed[] = {0, 5, 0, 0, 7, 0};
    fmt_err_t err = {0};
    uint64_t host, *off = NULL, layout;
    manifest_t *m = model(5, zeros, 1, &host);
    gpu_chunk_t sentinel, *c = &sentinel; /* must become NULL */
    size_t n = 99;
    played_t p;
    int fd;

    ASSERT_EQ(gpu_layout(m, &off, &layout, &err), 0);
    ASSERT_EQ(gpu_stage_plan(m, off, 4096, &c, &n, &err), 0);
    ASSERT_UINT_EQ(n, 0);
    ASSERT(c == NULL);
    free(off);
    manifest_free(m);

    m = model(6, mixed, 6, &host);
    fd = arena_fd(host);
    play(m, fd, host, 4096, &p);
    ASSERT_UINT_EQ(p.nchunks, 1);
    played_free(&p);
    close(fd);
    manifest_free(m);
}

/*
 * File-share arenas (arena_offset = the file's own offset): storages out of order, or with
 * gaps wider than the device's padding, are read one by one into place.
 */
TEST(arena_out_of_order_or_sparse)
{
    static const uint64_t sizes[] = {100, 1, 700, 33};
    uint64_t host, size = 0;
    manifest_t *m = model(200, sizes, 4, &host);
    played_t p;
    int fd;

    /* Reversed order, then a stretch with 1000-byte gaps, then dense again. */
    for (size_t i = 0; i < 200; i++) {
        mf_storage_t *s = &m->storages[i];

        if (i < 80) {
            s->arena_offset = 200000 - (i + 1) * 1024;
        } else if (i < 140) {
            s->arena_offset = 200000 + (i - 80) * 1700;
        } else {
            s->arena_offset =
                (i == 140 ? 200000 + 60 * 1700
                          : m->storages[i - 1].arena_offset + m->storages[i - 1].nbytes);
        }
        if (s->arena_offset + s->nbytes > size)
            size = s->arena_offset + s->nbytes;
    }
    fd = arena_fd(size);
    play(m, fd, size, 8u << 20, &p);
    ASSERT_UINT_EQ(p.nchunks, 1);
    played_free(&p);
    play(m, fd, size, 2048, &p);
    ASSERT_GT(p.nchunks, 20);
    played_free(&p);
    close(fd);
    manifest_free(m);
}

/* An arena shorter than its storages, or one that cannot be read, names the storage. */
TEST(short_or_unreadable_arena)
{
    static const uint64_t sizes[] = {100, 200, 300};
    fmt_err_t err = {0};
    uint64_t host, *off = NULL, layout;
    manifest_t *m = model(3, sizes, 3, &host);
    int fd = arena_fd(host);
    gpu_chunk_t *c;
    size_t n;
    uint8_t buf[4096];

    ASSERT_EQ(gpu_layout(m, &off, &layout, &err), 0);
    ASSERT_EQ(gpu_stage_plan(m, off, sizeof(buf), &c, &n, &err), 0);
    ASSERT_UINT_EQ(n, 1);
    ASSERT_EQ(gpu_stage_read(m, off, &c[0], fd, host - 1, buf, &err), WSD_EIO);
    ASSERT(strstr(err.msg, "E_GPU_UPLOAD") && strstr(err.msg, "storage 's2'") &&
           strstr(err.msg, "short read"));
    ASSERT(strstr(err.msg, "at 384")); /* s2's arena offset: 100 -> 128, 328 -> 384 */
    ASSERT_EQ(ftruncate(fd, 200), 0);  /* the file shrank under us */
    err = (fmt_err_t){0};              /* fmt_fail keeps the first error */
    ASSERT_EQ(gpu_stage_read(m, off, &c[0], fd, host, buf, &err), WSD_EIO);
    ASSERT(strstr(err.msg, "storage 's0'") && strstr(err.msg, "short read"));
    close(fd);
    err = (fmt_err_t){0};
    ASSERT_EQ(gpu_stage_read(m, off, &c[0], fd, host, buf, &err), WSD_EIO);
    if (!strstr(err.msg, "Bad file descriptor"))
        TEST_FAIL("%s", err.msg);

    /* Slices check their own range. */
    free(c);
    manifest_free(m);
    free(off);
    {
        static const uint64_t one[] = {10000};

        m = model(1, one, 1, &host);
        fd = arena_fd(host);
        ASSERT_EQ(gpu_layout(m, &off, &layout, &err), 0);
        ASSERT_EQ(gpu_stage_plan(m, off, sizeof(buf), &c, &n, &err), 0);
        ASSERT_UINT_EQ(n, 3);
        ASSERT_EQ(gpu_stage_read(m, off, &c[1], fd, host, buf, &err), 0);
        err = (fmt_err_t){0};
        ASSERT_EQ(gpu_stage_read(m, off, &c[2], fd, 9000, buf, &err), WSD_EIO);
        ASSERT(strstr(err.msg, "storage 's0'") && strstr(err.msg, "at 8192"));
        free(c);
        free(off);
        close(fd);
        manifest_free(m);
    }
}

/*
 * A verify of image \p p against the arena, as gpu-cuda.c runs one: every chunk read again
 * from the arena and compared with the image's bytes there. \retval storages that differ
 * (each counted once), with the lowest one's first differing byte.
 */
static size_t verify_play(const manifest_t *m, int fd, uint64_t host_size, uint64_t stage,
                          const played_t *p, uint32_t *first, uint64_t *at, bool *padding)
{
    fmt_err_t err = {0};
    gpu_chunk_t *c = NULL;
    size_t n = 0, nc = 0;
    uint8_t *want = malloc(stage), *seen = calloc(m->nstorages / 8 + 1, 1);

    ASSERT(want && seen);
    *first = UINT32_MAX;
    *padding = false;
    ASSERT_EQ(gpu_stage_plan(m, p->off, stage, &c, &nc, &err), 0);
    for (size_t i = 0; i < nc; i++) {
        uint32_t f = 0;
        uint64_t o = 0;

        if (gpu_stage_read(m, p->off, &c[i], fd, host_size, want, &err) != 0)
            TEST_FAIL("chunk %zu: %s", i, err.msg);
        if (gpu_stage_diff(m, p->off, &c[i], want, p->dev + c[i].dev_off, seen, &f, &o,
                           padding) && f < *first) {
            *first = f;
            *at = o;
        }
    }
    for (size_t j = 0; j < m->nstorages; j++)
        n += (seen[j / 8] >> (j % 8)) & 1;
    free(c);
    free(seen);
    free(want);
    return n;
}

/* A verify finds every storage a worker wrote, once each, naming the first byte it changed;
 * padding that is no longer zero is told apart; an untouched copy matches. */
TEST(verify_finds_what_was_written)
{
    static const uint64_t sizes[] = {10, 3 * 4096 + 17, 20, 4096, 4097, 30};
    uint64_t host, at = 0;
    manifest_t *m = model(6, sizes, 6, &host);
    int fd = arena_fd(host);
    uint32_t first;
    bool pad;
    played_t p;

    play(m, fd, host, 4096, &p);
    ASSERT_UINT_EQ(verify_play(m, fd, host, 4096, &p, &first, &at, &pad), 0);
    ASSERT(!pad);
    ASSERT_UINT_EQ(verify_play(m, fd, host, 1u << 20, &p, &first, &at, &pad), 0);
    /* s1 is sliced at 4096: bytes in its second and fourth slices; s4 once; s5's last byte. */
    p.dev[p.off[1] + 4096 + 100] ^= 1;
    p.dev[p.off[1] + 3 * 4096 + 3] ^= 0x80;
    p.dev[p.off[4] + 4096] ^= 0xff;
    p.dev[p.off[5] + 29] ^= 2;
    ASSERT_UINT_EQ(verify_play(m, fd, host, 4096, &p, &first, &at, &pad), 3);
    ASSERT_UINT_EQ(first, 1);
    ASSERT_UINT_EQ(at, 4096 + 100);
    ASSERT(!pad);
    /* Packed whole in one 1 MiB chunk, the same storages and the same first byte. */
    ASSERT_UINT_EQ(verify_play(m, fd, host, 1u << 20, &p, &first, &at, &pad), 3);
    ASSERT_UINT_EQ(first, 1);
    ASSERT_UINT_EQ(at, 4096 + 100);
    /* Padding between s2 and s3, written: packed chunks carry it, so they notice. */
    p.dev[p.off[2] + 20 + 7] = 0x5a;
    ASSERT_UINT_EQ(verify_play(m, fd, host, 1u << 20, &p, &first, &at, &pad), 3);
    ASSERT(pad);
    played_free(&p);
    close(fd);
    manifest_free(m);
}

/* The first differing byte of a large storage is found exactly, wherever it lies. */
TEST(verify_offset_is_exact)
{
    static const uint64_t sizes[] = {1u << 20};
    static const uint64_t where[] = {0, 1, 4095, 4096, 65537, (1u << 19) + 3, (1u << 20) - 1};
    uint64_t host, at = 0;
    manifest_t *m = model(1, sizes, 1, &host);
    int fd = arena_fd(host);
    uint32_t first;
    bool pad;
    played_t p;

    play(m, fd, host, 1u << 20, &p);
    for (size_t i = 0; i < sizeof(where) / sizeof(where[0]); i++) {
        p.dev[where[i]] ^= 0x10;
        ASSERT_UINT_EQ(verify_play(m, fd, host, 1u << 20, &p, &first, &at, &pad), 1);
        ASSERT_UINT_EQ(at, where[i]);
        p.dev[where[i]] ^= 0x10;
    }
    ASSERT_UINT_EQ(verify_play(m, fd, host, 1u << 20, &p, &first, &at, &pad), 0);
    played_free(&p);
    close(fd);
    manifest_free(m);
}

/* Offsets that are not a layout of the model are refused, not copied over each other. */
TEST(bad_layout_is_refused)
{
    static const uint64_t sizes[] = {300, 300};
    fmt_err_t err = {0};
    uint64_t host, off[2] = {0, 256}, over[2] = {0, UINT64_MAX - 10};
    manifest_t *m = model(2, sizes, 2, &host);
    gpu_chunk_t *c = NULL;
    size_t n = 0;

    ASSERT_EQ(gpu_stage_plan(m, off, 4096, &c, &n, &err), -EINVAL);
    ASSERT_EQ(gpu_stage_plan(m, over, 4096, &c, &n, &err), -EINVAL);
    off[1] = 512;
    ASSERT_EQ(gpu_stage_plan(m, off, 0, &c, &n, &err), -EINVAL);
    ASSERT(c == NULL);
    manifest_free(m);
}

TEST(plan_allocation_can_fail)
{
#ifdef WSD_FAULT_INJECTION
    static const uint64_t sizes[] = {8};
    fmt_err_t err = {0};
    uint64_t host, *off = NULL, layout;
    manifest_t *m = model(10, sizes, 1, &host);
    gpu_chunk_t *c = NULL;
    size_t n = 0;

    ASSERT_EQ(gpu_layout(m, &off, &layout, &err), 0);
    fault_arm("malloc:1");
    ASSERT_EQ(gpu_stage_plan(m, off, 4096, &c, &n, &err), -ENOMEM);
    ASSERT_EQ(fault_calls("malloc"), 1);
    fault_arm(NULL);
    ASSERT(strstr(err.msg, "upload plan"));
    ASSERT(c == NULL);
    free(off);
    manifest_free(m);
#else
    test_skip("needs -DWSD_FAULT_INJECTION=ON (the malloc wrappers)");
#endif
}

int main(int argc, char **argv)
{
    return test_main(argc, argv);
}
