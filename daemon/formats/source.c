/*
 * source.c - the checkpoint file as the readers see it: opened once, read only with pread() (so a
 * file truncated under us is an error, never SIGBUS), checked for changes after the copy, and
 * what of it the preload leaves in the page cache (preload --page-cache).
 */
#include "fmt.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "fault.h"

int source_open(const char *path, source_t *ret, fmt_err_t *err)
{
    source_t s = {.fd = -1};

    /* O_NONBLOCK: opening a FIFO must not hang a pool thread; it is refused below as not a
     * regular file, and for regular files the flag changes nothing. */
    if (FAULT("source.open")) {
        errno = EMFILE;
        s.fd = -1;
    } else
        s.fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (s.fd < 0) {
        int e = errno;

        return fmt_fail(err, WSD_EIO, "E_OPEN", "cannot open '%s': %s",
                        path, strerror(e));
    }
    if (fstat(s.fd, &s.st) < 0) {
        int e = errno;

        (void)close(s.fd);
        return fmt_fail(err, WSD_EIO, "E_OPEN", "cannot stat '%s': %s", path, strerror(e));
    }
    if (!S_ISREG(s.st.st_mode)) {
        (void)close(s.fd);
        return fmt_fail(err, WSD_EBADCKPT, "E_NOT_REGULAR", "'%s' is %s, not a regular file", path,
                        S_ISDIR(s.st.st_mode) ? "a directory" : "a special file");
    }
    s.size = (uint64_t)s.st.st_size;
    s.path = strdup(path);
    if (!s.path) {
        (void)close(s.fd);
        return fmt_fail(err, -ENOMEM, NULL, "out of memory");
    }
    *ret = s;
    return 0;
}

void source_close(source_t *s)
{
    if (s->fd >= 0)
        (void)close(s->fd);
    s->fd = -1;
    free(s->path);
    s->path = NULL;
    free(s->cold);
    s->cold = NULL;
    s->cache = SOURCE_CACHE_KEEP;
}

int source_pread(const source_t *s, void *buf, size_t len, uint64_t off, fmt_err_t *err)
{
    size_t done = 0;

    if (off > s->size || len > s->size - off)
        return fmt_fail(err, WSD_EBADCKPT, "E_TRUNCATED",
                        "'%s': %zu bytes at offset %llu lie past the end of the file (%llu bytes)",
                        s->path, len, (unsigned long long)off, (unsigned long long)s->size);
    while (done < len) {
        /* source.pread.short: the kernel may return any prefix (half, here) of a read. */
        size_t ask = FAULT("source.pread.short") && len - done > 1 ? (len - done) / 2 : len - done;
        ssize_t n = FAULT("source.pread")    ? (errno = EIO, -1)
                    : FAULT("syscall.eintr") ? (errno = EINTR, -1)
                                             : pread(s->fd, (char *)buf + done, ask,
                                                     (off_t)(off + done));

        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return fmt_fail(err, WSD_EIO, "E_READ", "'%s': read at offset %llu failed: %s", s->path,
                            (unsigned long long)(off + done), strerror(errno));
        if (n == 0)
            return fmt_fail(err, WSD_ESTALE, "E_CHANGED",
                            "'%s': file shrank while reading (offset %llu)", s->path,
                            (unsigned long long)(off + done));
        done += (size_t)n;
    }
    return 0;
}

int source_check_unchanged(const source_t *s, fmt_err_t *err)
{
    struct stat st;

    if (fstat(s->fd, &st) < 0)
        return fmt_fail(err, WSD_EIO, "E_READ", "cannot stat '%s': %s", s->path, strerror(errno));
    if (st.st_size != s->st.st_size || st.st_ino != s->st.st_ino ||
        st.st_mtim.tv_sec != s->st.st_mtim.tv_sec || st.st_mtim.tv_nsec != s->st.st_mtim.tv_nsec)
        return fmt_fail(err, WSD_ESTALE, "E_CHANGED", "'%s' changed while it was being loaded",
                        s->path);
    return 0;
}

/*
 * The page cache. cachestat(2) (Linux 6.5) counts the cached pages of a file range for anyone
 * holding a readable fd; mincore(2) would need a mapping and, for files the caller may not
 * write, reports only the pages it maps itself, so it cannot tell here.
 */
#ifndef __NR_cachestat
#    if defined(__x86_64__) || defined(__aarch64__) || defined(__riscv) || defined(__i386__)
#        define __NR_cachestat 451
#    endif
#endif

struct wsd_cachestat_range {
    uint64_t off;
    uint64_t len;
};

struct wsd_cachestat {
    uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted;
};

/* Cached pages of [off, off + len). \retval 0, or -1 with errno (ENOSYS: no cachestat). */
static int cached_pages(int fd, uint64_t off, uint64_t len, uint64_t *ret)
{
#ifdef __NR_cachestat
    struct wsd_cachestat_range range = {.off = off, .len = len};
    struct wsd_cachestat cs;

    if (syscall(__NR_cachestat, fd, &range, &cs, 0) < 0)
        return -1;
    *ret = cs.nr_cache;
    return 0;
#else
    (void)fd, (void)off, (void)len, (void)ret;
    errno = ENOSYS;
    return -1;
#endif
}

/*
 * A policy that drops pages turns readahead off for the file: a reader's async readahead can
 * land after the pages it fetched again were dropped, leaving them cached for good. The copy
 * reads 8 MiB at a time with several threads, which needs no readahead to keep the disk busy.
 */
static source_cache_t set_policy(source_t *s, source_cache_t c)
{
    s->cache = c;
    (void)posix_fadvise(s->fd, 0, 0, c == SOURCE_CACHE_KEEP ? POSIX_FADV_NORMAL
                                                            : POSIX_FADV_RANDOM);
    return c;
}

source_cache_t source_cache_policy(source_t *s, source_cache_t want)
{
    uint64_t ngran = (s->size + SOURCE_GRANULE - 1) / SOURCE_GRANULE, cached;
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    size_t nwords = (size_t)((ngran + 63) / 64);

    free(s->cold);
    s->cold = NULL;
    if (want != SOURCE_CACHE_AUTO || ngran == 0)
        return set_policy(s, want == SOURCE_CACHE_AUTO ? SOURCE_CACHE_KEEP : want);
    /* One call answers the usual cases: a file wholly warm (nothing is ours to drop), or
     * wholly cold (everything is, which is what DROP does); only a file that is partly cached
     * is looked at granule by granule. */
    if (cached_pages(s->fd, 0, s->size, &cached) < 0 || cached >= (s->size + page - 1) / page)
        return set_policy(s, SOURCE_CACHE_KEEP);
    if (cached == 0)
        return set_policy(s, SOURCE_CACHE_DROP);
    s->cold = calloc(nwords, sizeof(*s->cold));
    if (!s->cold)
        return set_policy(s, SOURCE_CACHE_KEEP);
    for (uint64_t g = 0; g < ngran; g++) {
        uint64_t n = 0;

        if (cached_pages(s->fd, g * SOURCE_GRANULE, SOURCE_GRANULE, &n) < 0)
            n = 1; /* cannot tell: keep it */
        if (n == 0)
            s->cold[g / 64] |= UINT64_C(1) << (g % 64);
    }
    return set_policy(s, SOURCE_CACHE_AUTO);
}

static bool granule_cold(const source_t *s, uint64_t g)
{
    return (s->cold[g / 64] >> (g % 64)) & 1;
}

uint64_t source_release(const source_t *s, uint64_t off, uint64_t len)
{
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE), end, start, stop, dropped = 0;

    if (s->cache == SOURCE_CACHE_KEEP || len == 0 || off >= s->size)
        return 0;
    end = len > s->size - off ? s->size : off + len;
    start = off / page * page;
    stop = (end + page - 1) / page * page;
    if (s->cache == SOURCE_CACHE_DROP)
        return posix_fadvise(s->fd, (off_t)start, (off_t)(stop - start), POSIX_FADV_DONTNEED) == 0
                   ? end - off
                   : 0;
    /* AUTO: runs of cold granules, each advised once. */
    for (uint64_t g = start / SOURCE_GRANULE; g * SOURCE_GRANULE < stop;) {
        uint64_t a, b;

        if (!granule_cold(s, g)) {
            g++;
            continue;
        }
        a = g * SOURCE_GRANULE;
        while ((g + 1) * SOURCE_GRANULE < stop && granule_cold(s, g + 1))
            g++;
        b = ++g * SOURCE_GRANULE;
        a = a > start ? a : start;
        b = b < stop ? b : stop;
        if (posix_fadvise(s->fd, (off_t)a, (off_t)(b - a), POSIX_FADV_DONTNEED) == 0) {
            /* Count the requested bytes the run covers, not its page rounding. */
            uint64_t lo = a > off ? a : off, hi = b < end ? b : end;

            dropped += hi > lo ? hi - lo : 0;
        }
    }
    return dropped;
}

bool source_cache_auto_works(void)
{
    static int works = -1; /* probed once; a racing second probe finds the same answer */
    uint64_t n;
    int fd;

    if (works < 0) {
        fd = memfd_create("weightsd-cachestat-probe", MFD_CLOEXEC);
        works = fd >= 0 && cached_pages(fd, 0, 0, &n) == 0;
        if (fd >= 0)
            (void)close(fd);
    }
    return works > 0;
}

int source_cache_parse(const char *s, source_cache_t *ret)
{
    if (strcmp(s, "auto") == 0)
        *ret = SOURCE_CACHE_AUTO;
    else if (strcmp(s, "keep") == 0)
        *ret = SOURCE_CACHE_KEEP;
    else if (strcmp(s, "drop") == 0)
        *ret = SOURCE_CACHE_DROP;
    else
        return -EINVAL;
    return 0;
}

const char *source_cache_name(source_cache_t c)
{
    return c == SOURCE_CACHE_AUTO ? "auto" : c == SOURCE_CACHE_DROP ? "drop" : "keep";
}
