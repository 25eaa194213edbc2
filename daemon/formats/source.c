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
}

int source_pread(const source_t *s, void *buf, size_t len, uint64_t off, fmt_err_t *err)
{
    size_t done = 0;

    if (off > s->size || len > s->size - off)
        return fmt_fail(err, WSD_EBADCKPT, "E_TRUNCATED",
                        "'%s': %zu bytes at offset %llu lie past the end of the file (%llu bytes)",
                        s->path, len, (unsigned long long)off, (unsigned long long)s->size);
    while (done < len) {
        ssize_t n = FAULT("source.pread") ? (errno = EIO, -1)
                                          : pread(s->fd, (char *)buf + done, len - done,
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
