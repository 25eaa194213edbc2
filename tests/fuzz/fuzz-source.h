/*
 * fuzz-source.h - shared by the file-format fuzz targets: the input bytes as a real source_t
 * (a memfd reopened through /proc, so readers see an ordinary file).
 */
#ifndef WSD_FUZZ_SOURCE_H
#define WSD_FUZZ_SOURCE_H

#include <stdio.h>
#include <sys/mman.h>
#include <unistd.h>

#include "fmt.h"

/* \retval 0 with *ret open (source_close it), or < 0 when the input could not be staged. */
static inline int fuzz_source(const char *label, const uint8_t *data, size_t size, source_t *ret)
{
    fmt_err_t err = {0};
    char path[64];
    size_t done = 0;
    int fd = memfd_create(label, MFD_CLOEXEC), r;

    if (fd < 0)
        return -1;
    while (done < size) {
        ssize_t w = write(fd, data + done, size - done);

        if (w <= 0) {
            close(fd);
            return -1;
        }
        done += (size_t)w;
    }
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    r = source_open(path, ret, &err);
    close(fd);
    return r;
}

#endif /* WSD_FUZZ_SOURCE_H */
