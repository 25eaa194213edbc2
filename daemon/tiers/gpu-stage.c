/*
 * gpu-stage.c - the upload plan and the staging reads (gpu-stage.h).
 */
#include "gpu-stage.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "checked.h"

/*
 * One pass over the storages: counts the chunks, and writes them when \p out is set. Runs
 * twice with the same answer, so the plan is allocated once at its exact size.
 */
static int plan_pass(const manifest_t *m, const uint64_t *offsets, uint64_t stage, gpu_chunk_t *out,
                     size_t *ret_n)
{
    size_t n = 0, i = 0;
    uint64_t prev_end = 0;

    while (i < m->nstorages) {
        uint64_t nb = m->storages[i].nbytes, start = offsets[i], end, payload = 0;
        size_t j;

        if (start < prev_end || !ck_add_u64(start, nb, &end))
            return -EINVAL;
        if (nb == 0) {
            i++;
            continue;
        }
        if (nb > stage) { /* cut into slices, one chunk each */
            for (uint64_t off = 0; off < nb; off += stage) {
                uint64_t len = nb - off < stage ? nb - off : stage;

                if (out)
                    out[n] = (gpu_chunk_t){.dev_off = start + off, .len = len, .payload = len,
                                           .slice = off, .first = (uint32_t)i, .count = 0};
                n++;
            }
            prev_end = end;
            i++;
            continue;
        }
        /* Pack storages whole while the device span from 'start' fits the buffer. */
        for (j = i; j < m->nstorages; j++) {
            uint64_t o = offsets[j], b = m->storages[j].nbytes, e;

            if (o < prev_end || !ck_add_u64(o, b, &e))
                return -EINVAL;
            if (b == 0)
                continue;
            if (b > stage || e - start > stage)
                break;
            payload += b;
            prev_end = e;
        }
        if (out)
            out[n] = (gpu_chunk_t){.dev_off = start, .len = prev_end - start, .payload = payload,
                                   .first = (uint32_t)i, .count = (uint32_t)(j - i)};
        n++;
        i = j;
    }
    *ret_n = n;
    return 0;
}

int gpu_stage_plan(const manifest_t *m, const uint64_t *offsets, uint64_t stage,
                   gpu_chunk_t **ret_chunks, size_t *ret_n, fmt_err_t *err)
{
    gpu_chunk_t *c = NULL;
    size_t n = 0, n2 = 0;
    int r;

    if (stage == 0 || m->nstorages > UINT32_MAX)
        return fmt_fail(err, -EINVAL, NULL, "bad upload plan request");
    r = plan_pass(m, offsets, stage, NULL, &n);
    if (r < 0)
        return fmt_fail(err, r, NULL, "the GPU layout does not fit the model's storages");
    if (n > 0) {
        c = calloc(n, sizeof(*c));
        if (!c)
            return fmt_fail(err, -ENOMEM, NULL, "out of memory for the upload plan");
        (void)plan_pass(m, offsets, stage, c, &n2);
    }
    *ret_chunks = c;
    *ret_n = n;
    return 0;
}

static int pread_full(int fd, void *buf, size_t len, uint64_t off)
{
    size_t done = 0;

    while (done < len) {
        ssize_t k = pread(fd, (char *)buf + done, len - done, (off_t)(off + done));

        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0)
            return -errno;
        if (k == 0)
            return -ENODATA;
        done += (size_t)k;
    }
    return 0;
}

static int read_fail(fmt_err_t *err, const mf_storage_t *s, uint64_t at, int r)
{
    return fmt_fail(err, WSD_EIO, "E_GPU_UPLOAD",
                    "storage '%s': reading the host arena at %llu failed: %s", s->key,
                    (unsigned long long)at, r == -ENODATA ? "short read" : strerror(-r));
}

/* Whether [off, off + len) of storage s lies inside an arena of host_size bytes. */
static bool in_arena(const mf_storage_t *s, uint64_t off, uint64_t len, uint64_t host_size)
{
    return s->arena_offset <= host_size && off <= host_size - s->arena_offset &&
           len <= host_size - s->arena_offset - off;
}

int gpu_stage_read(const manifest_t *m, const uint64_t *offsets, const gpu_chunk_t *c, int host_fd,
                   uint64_t host_size, void *buf, fmt_err_t *err)
{
    const mf_storage_t *s = &m->storages[c->first];
    uint8_t *b = buf;
    uint64_t base = s->arena_offset, hend = base, pos = 0;
    uint32_t last = c->first + c->count;
    bool dense = true;
    int r;

    if (c->count == 0) {
        if (!in_arena(s, c->slice, c->len, host_size))
            return read_fail(err, s, s->arena_offset + c->slice, -ENODATA);
        r = pread_full(host_fd, b, (size_t)c->len, s->arena_offset + c->slice);
        return r < 0 ? read_fail(err, s, s->arena_offset + c->slice, r) : 0;
    }
    /* Dense: in arena order, and each storage no further from the chunk's start in the arena
     * than on the device, so one read puts every storage at or before its place. */
    for (uint32_t j = c->first; j < last; j++) {
        const mf_storage_t *t = &m->storages[j];

        if (t->nbytes == 0)
            continue;
        if (!in_arena(t, 0, t->nbytes, host_size))
            return read_fail(err, t, t->arena_offset, -ENODATA);
        if (t->arena_offset < hend || t->arena_offset - base > offsets[j] - c->dev_off)
            dense = false;
        hend = t->arena_offset + t->nbytes;
    }
    if (dense) {
        r = pread_full(host_fd, b, (size_t)(hend - base), base);
        if (r < 0)
            return read_fail(err, s, base, r);
        /* Back to front: a storage's destination lies past every earlier storage's source. */
        for (uint32_t j = last; j-- > c->first;) {
            const mf_storage_t *t = &m->storages[j];
            uint64_t h = t->arena_offset - base, d = offsets[j] - c->dev_off;

            if (t->nbytes && h != d)
                memmove(b + d, b + h, (size_t)t->nbytes);
        }
    }
    for (uint32_t j = c->first; j < last; j++) {
        const mf_storage_t *t = &m->storages[j];
        uint64_t d = offsets[j] - c->dev_off;

        if (t->nbytes == 0)
            continue;
        memset(b + pos, 0, (size_t)(d - pos)); /* device padding, never stale bytes */
        if (!dense) {
            r = pread_full(host_fd, b + d, (size_t)t->nbytes, t->arena_offset);
            if (r < 0)
                return read_fail(err, t, t->arena_offset, r);
        }
        pos = d + t->nbytes;
    }
    return 0;
}

/* The first index where \p a and \p b differ; they do somewhere below \p len. */
static uint64_t first_diff(const uint8_t *a, const uint8_t *b, uint64_t len)
{
    uint64_t lo = 0;

    /* Halve with memcmp (fast) down to a page, then bytes. */
    while (len - lo > 4096) {
        uint64_t half = (len - lo) / 2;

        if (memcmp(a + lo, b + lo, (size_t)half) != 0)
            len = lo + half;
        else
            lo += half;
    }
    while (a[lo] == b[lo])
        lo++;
    return lo;
}

uint32_t gpu_stage_diff(const manifest_t *m, const uint64_t *offsets, const gpu_chunk_t *c,
                        const void *want, const void *got, uint8_t *seen, uint32_t *ret_first,
                        uint64_t *ret_offset, bool *ret_padding)
{
    const uint8_t *w = want, *g = got;
    uint32_t n = 0, last = c->first + (c->count ? c->count : 1);
    uint64_t pos = 0;

    for (uint32_t j = c->first; j < last; j++) {
        uint64_t d = c->count ? offsets[j] - c->dev_off : 0;
        uint64_t len = c->count ? m->storages[j].nbytes : c->len;

        if (len == 0)
            continue;
        if (d > pos && ret_padding && memcmp(w + pos, g + pos, (size_t)(d - pos)) != 0)
            *ret_padding = true;
        pos = d + len;
        if (memcmp(w + d, g + d, (size_t)len) == 0)
            continue;
        if (n++ == 0) {
            *ret_first = j;
            *ret_offset = (c->count ? 0 : c->slice) + first_diff(w + d, g + d, len);
        }
        if (seen)
            (void)__atomic_fetch_or(&seen[j / 8], (uint8_t)(1u << (j % 8)), __ATOMIC_RELAXED);
    }
    return n;
}
