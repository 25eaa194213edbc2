/*
 * bench-convert - the --dtype kernels against memcpy of the same source bytes, same run.
 * Prints GB/s (of source bytes) for memcpy and each conversion and the ratio to memcpy.
 *   bench-convert [MIB]   (default 512)
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "convert.h"
#include "weightsd.h"

static const char usage_text[] =
    "Usage: bench-convert [MIB]\n"
    "\n"
    "Time the --dtype conversion kernels against memcpy of the same source bytes: GB/s of\n"
    "source bytes and the ratio to memcpy. MIB (1..65536, default 512) is the buffer size;\n"
    "two buffers of it are allocated.\n";

static double now_s(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double best_of(int from, int to, const void *src, void *dst, size_t n, int reps)
{
    double best = 1e9;

    for (int i = 0; i < reps; i++) {
        double t = now_s();

        if (from < 0)
            memcpy(dst, src, n);
        else
            convert_run(from, to, src, dst, n / (wsd_dtype_bits(from) / 8));
        t = now_s() - t;
        if (t < best)
            best = t;
    }
    return best;
}

int main(int argc, char **argv)
{
    size_t mib = 512, n;
    uint8_t *src, *dst;
    static const struct {
        int from, to;
        const char *name;
    } cases[] = {
        {WSD_DTYPE_F32, WSD_DTYPE_BF16, "f32 -> bf16"},
        {WSD_DTYPE_F32, WSD_DTYPE_F16, "f32 -> f16"},
        {WSD_DTYPE_BF16, WSD_DTYPE_F32, "bf16 -> f32"},
        {WSD_DTYPE_F16, WSD_DTYPE_F32, "f16 -> f32"},
        {WSD_DTYPE_F64, WSD_DTYPE_BF16, "f64 -> bf16"},
    };
    double base;

    if (argc > 1 && (strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0)) {
        fputs(usage_text, stdout);
        return 0;
    }
    if (argc > 2) {
        fputs(usage_text, stderr);
        return 2;
    }
    if (argc == 2) {
        char *end;
        unsigned long v;

        errno = 0;
        v = strtoul(argv[1], &end, 10);
        if (errno || end == argv[1] || *end || argv[1][0] == '-' || v < 1 || v > 65536) {
            fprintf(stderr, "bench-convert: MIB wants 1..65536, got '%s'; see --help\n", argv[1]);
            return 2;
        }
        mib = v;
    }
    n = mib << 20;
    src = malloc(n);
    dst = malloc(n);
    if (!src || !dst) {
        fprintf(stderr, "bench-convert: cannot allocate 2 x %zu MiB\n", mib);
        free(src);
        free(dst);
        return 1;
    }
    for (size_t i = 0; i < n; i++)
        src[i] = (uint8_t)(i * 2654435761u >> 13);
    memset(dst, 1, n); /* fault the destination in before timing */
    base = best_of(-1, -1, src, dst, n, 5);
    printf("memcpy of %zu MiB: %.2f GB/s\n", mib, (double)n / base / 1e9);
    for (size_t k = 0; k < sizeof(cases) / sizeof(cases[0]); k++) {
        size_t in = n, out = n / (wsd_dtype_bits(cases[k].from) / 8) *
                             (wsd_dtype_bits(cases[k].to) / 8);
        double t;

        if (out > n)
            in = n / 2; /* widening: halve the source so the output fits */
        t = best_of(cases[k].from, cases[k].to, src, dst, in, 5);
        printf("%-12s %.2f GB/s of source = %.2f x memcpy\n", cases[k].name, (double)in / t / 1e9,
               ((double)in / t) / ((double)n / base));
    }
    free(src);
    free(dst);
    return 0;
}
