/*
 * wsd-attach - a worker in a few lines of libweightsd: connect, open a model, read every byte of
 * it, and report what it saw. Used by `make demo` and the integration tests; also a template
 * for a C worker.
 *
 * Output (stdout): one JSON object per tensor with --tensors, then a summary object holding the
 * model's checksum (FNV-1a 64 over each storage in order) and this process's resident and
 * proportional memory for the mapping (from /proc/self/smaps).
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "weightsd.h"

static const char usage_text[] =
    "Usage: wsd-attach [OPTIONS] MODEL\n"
    "\n"
    "Open MODEL from a running weightsd, touch every page, print a checksum and memory use.\n"
    "\n"
    "  -s, --socket PATH   client socket (default: $WEIGHTSD_SOCKET or the daemon default)\n"
    "      --tensors       print one JSON line per tensor (name, dtype, shape, strides, ...)\n"
    "      --write         write into the first tensor's bytes (private copy-on-write)\n"
    "      --hold SECS     keep the model open this long after reading, then report memory\n"
    "                      again (0 = until SIGTERM)\n"
    "      --wait          wait for a model that is still loading\n"
    "      --repeat N      open and release N times, then report the median open time\n"
    "      --expect HASH   refuse the model unless its content hash is HASH\n"
    "      --touch         only fault in every page (one read per 4 KiB) and report the time\n"
    "      --path FILE     load FILE as MODEL if it is not resident (allow-client-preload)\n"
    "      --device DEV    cpu (default) or cuda:N; a GPU copy is imported, not read\n"
    "  -h, --help          show this help\n";

static volatile sig_atomic_t stop;

static void on_term(int sig)
{
    (void)sig;
    stop = 1;
}

static uint64_t fnv1a(uint64_t h, const uint8_t *p, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

/* Rss and Pss (kB) of the mapping that starts at \p base, from /proc/self/smaps. */
static void mapping_memory(const void *base, long *ret_rss, long *ret_pss)
{
    char line[512], want[32];
    FILE *f = fopen("/proc/self/smaps", "r");
    int in = 0;

    *ret_rss = *ret_pss = -1;
    if (!f)
        return;
    snprintf(want, sizeof(want), "%lx-", (unsigned long)(uintptr_t)base);
    while (fgets(line, sizeof(line), f)) {
        if (strchr(line, '-') && strchr(line, ' ') && strchr(line, '-') < strchr(line, ' ')) {
            in = strncmp(line, want, strlen(want)) == 0;
            continue;
        }
        if (!in)
            continue;
        if (strncmp(line, "Rss:", 4) == 0)
            *ret_rss = strtol(line + 4, NULL, 10);
        else if (strncmp(line, "Pss:", 4) == 0)
            *ret_pss = strtol(line + 4, NULL, 10);
    }
    fclose(f);
}

static double now_us(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec / 1e3;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;

    return (x > y) - (x < y);
}

/* A whole number in min..max, or -1: atoi() would read a typo as 0. */
static long parse_number(const char *s, long min, long max)
{
    char *end;
    long v;

    errno = 0;
    v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < min || v > max)
        return -1;
    return v;
}

static void open_failed(wsd_client_t *c, const char *name, int r)
{
    if (strcmp(wsd_last_error(c), wsd_strerror(r)) != 0)
        fprintf(stderr, "wsd-attach: open '%s': %s (%s)\n", name, wsd_last_error(c),
                wsd_strerror(r));
    else
        fprintf(stderr, "wsd-attach: open '%s': %s\n", name, wsd_strerror(r));
}

static void print_tensor(const wsd_tensor_t *t)
{
    unsigned nd = wsd_tensor_ndim(t);
    const int64_t *shape = wsd_tensor_shape(t), *st = wsd_tensor_strides(t);

    printf("{\"name\":\"%s\",\"dtype\":\"%s\",\"shape\":[", wsd_tensor_name(t),
           wsd_dtype_name(wsd_tensor_dtype(t)));
    for (unsigned i = 0; i < nd; i++)
        printf("%s%" PRId64, i ? "," : "", shape[i]);
    printf("],\"stride\":[");
    for (unsigned i = 0; i < nd; i++)
        printf("%s%" PRId64, i ? "," : "", st[i]);
    printf("],\"storage\":%zu,\"storage_offset\":%" PRIu64 ",\"nbytes\":%" PRIu64 "}\n",
           wsd_tensor_storage(t), wsd_tensor_storage_offset(t), wsd_tensor_nbytes(t));
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"socket", required_argument, NULL, 's'}, {"tensors", no_argument, NULL, 'T'},
        {"write", no_argument, NULL, 'W'},        {"hold", required_argument, NULL, 'H'},
        {"wait", no_argument, NULL, 'w'},         {"repeat", required_argument, NULL, 'R'},
        {"expect", required_argument, NULL, 'E'}, {"touch", no_argument, NULL, 'P'},
        {"path", required_argument, NULL, 'F'},
        {"help", no_argument, NULL, 'h'},         {"device", required_argument, NULL, 'D'},
        {NULL, 0, NULL, 0},
    };
    const char *socket_path = NULL, *name, *expect = NULL, *device = "cpu", *path = NULL;
    int tensors = 0, do_write = 0, hold = -1, repeat = 0, touch = 0, opt, r;
    wsd_open_opts_t o = {.size = sizeof(o)};
    unsigned flags = 0;
    uint64_t sum = 1469598103934665603ull, size = 0;
    wsd_client_t *c;
    wsd_model_t *m;
    long rss, pss;
    double t0, open_us;

    while ((opt = getopt_long(argc, argv, "s:h", longopts, NULL)) != -1) {
        switch (opt) {
        case 's':
            socket_path = optarg;
            break;
        case 'T':
            tensors = 1;
            break;
        case 'W':
            do_write = 1;
            break;
        case 'H':
            /* hold * 10 tenths of a second must fit an int. */
            hold = (int)parse_number(optarg, 0, INT_MAX / 10);
            if (hold < 0) {
                fprintf(stderr, "wsd-attach: --hold wants seconds (0 = until SIGTERM), got '%s'\n",
                        optarg);
                return 2;
            }
            break;
        case 'w':
            flags |= WSD_OPEN_WAIT;
            break;
        case 'R':
            repeat = (int)parse_number(optarg, 1, 10000000);
            if (repeat < 0) {
                fprintf(stderr, "wsd-attach: --repeat wants a count (1..10000000), got '%s'\n",
                        optarg);
                return 2;
            }
            break;
        case 'D':
            device = optarg;
            break;
        case 'E':
            expect = optarg;
            break;
        case 'P':
            touch = 1;
            break;
        case 'F':
            path = optarg;
            break;
        case 'h':
            fputs(usage_text, stdout);
            return 0;
        default:
            fputs(usage_text, stderr);
            return 2;
        }
    }
    if (optind + 1 != argc) {
        fputs(usage_text, stderr);
        return 2;
    }
    name = argv[optind];
    o.device = device;
    o.flags = flags;
    o.expect_hash = expect;
    o.path = path;
    signal(SIGTERM, on_term);
    signal(SIGINT, on_term);

    t0 = now_us();
    r = wsd_connect(socket_path, &c);
    if (r < 0) {
        fprintf(stderr, "wsd-attach: connect: %s\n", wsd_strerror(r));
        return 1;
    }
    if (repeat > 0) {
        double *samples = calloc((size_t)repeat, sizeof(double));

        for (int i = 0; samples && i < repeat; i++) {
            double a = now_us();

            r = wsd_open_with(c, name, &o, &m);
            if (r < 0)
                break;
            samples[i] = now_us() - a;
            wsd_model_free(m);
        }
        if (r < 0 || !samples) {
            if (samples)
                open_failed(c, name, r);
            else
                fprintf(stderr, "wsd-attach: out of memory\n");
            free(samples);
            wsd_close(c);
            return 1;
        }
        qsort(samples, (size_t)repeat, sizeof(double), cmp_double);
        printf("{\"repeat\":%d,\"open_median_us\":%.1f,\"open_p99_us\":%.1f}\n", repeat,
               samples[repeat / 2], samples[(size_t)((double)repeat * 0.99)]);
        free(samples);
        wsd_close(c);
        return 0;
    }
    r = wsd_open_with(c, name, &o, &m);
    open_us = now_us() - t0;
    if (r < 0) {
        open_failed(c, name, r);
        wsd_close(c);
        return 1;
    }
    (void)wsd_model_base(m, &size);
    /* Device memory is not readable from here: a GPU open reports the import, not a checksum. */
    if (wsd_model_device(m) >= 0)
        do_write = touch = 0;
    if (do_write && wsd_model_tensor_count(m) > 0) {
        const wsd_tensor_t *t = wsd_model_tensor(m, 0);
        uint8_t *p = wsd_tensor_data(t);

        for (uint64_t i = 0; i < wsd_tensor_nbytes(t); i++)
            p[i] = (uint8_t)~p[i];
    }
    if (touch) {
        const volatile uint8_t *base = wsd_model_base(m, NULL);
        double a = now_us();
        uint8_t x = 0;

        for (uint64_t off = 0; off < size; off += 4096)
            x ^= base[off];
        printf("{\"pid\":%d,\"touch_ms\":%.3f,\"pages_4k\":%" PRIu64 ",\"x\":%u}\n",
               (int)getpid(), (now_us() - a) / 1000, size / 4096, x);
    } else
        for (size_t i = 0; wsd_model_device(m) < 0 && i < wsd_model_storage_count(m); i++) {
            void *data;
            uint64_t n;

            (void)wsd_model_storage(m, i, &data, &n);
            sum = fnv1a(sum, data, n);
        }
    if (tensors)
        for (size_t i = 0; i < wsd_model_tensor_count(m); i++)
            print_tensor(wsd_model_tensor(m, i));
    mapping_memory(wsd_model_base(m, NULL), &rss, &pss);
    printf("{\"pid\":%d,\"model\":\"%s\",\"tensors\":%zu,\"bytes\":%" PRIu64
           ",\"checksum\":\"%016" PRIx64 "\",\"hash\":\"%s\",\"lease\":%" PRIu64
           ",\"attach_us\":%.1f,\"rss_kb\":%ld,\"pss_kb\":%ld}\n",
           (int)getpid(), name, wsd_model_tensor_count(m), size, sum, wsd_model_hash(m),
           wsd_model_lease(m), open_us,
           rss, pss);
    fflush(stdout);
    if (hold == 0)
        while (!stop)
            pause();
    else if (hold > 0) {
        for (int i = 0; i < hold * 10 && !stop; i++)
            usleep(100000);
        /* Measured again once every worker of a demo or benchmark has attached. */
        mapping_memory(wsd_model_base(m, NULL), &rss, &pss);
        printf("{\"pid\":%d,\"phase\":\"held\",\"rss_kb\":%ld,\"pss_kb\":%ld}\n", (int)getpid(),
               rss, pss);
        fflush(stdout);
        /* Stay mapped a little longer so that workers started together all measure while the
         * others still share the pages. */
        usleep(500000);
    }
    wsd_model_free(m);
    wsd_close(c);
    return 0;
}
