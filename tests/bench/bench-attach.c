/*
 * bench-attach - attach cost and memory sharing of the C client, against the naive alternative
 * measured in the same run.
 *
 *   bench-attach SOCKET MODEL FILE [ATTACHES] [WORKERS]
 *
 * 1. ATTACHES times: connect + open + map (+ release + close), median and p99.
 * 2. The same file read into private memory with pread(), median of 5 (the page cache is warm
 *    after the preload, so this is the cheapest possible private copy).
 * 3. WORKERS processes attach and touch every page; their total Pss (smaps_rollup, everything
 *    the process is charged for) against the file size.
 * Prints one line per figure and the ratios; exits 0 unless something failed.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "weightsd.h"

static double now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;

    return (x > y) - (x < y);
}

static int attach_once(const char *sock, const char *model, wsd_model_t **ret_m,
                       wsd_client_t **ret_c)
{
    wsd_client_t *c;
    int r = wsd_connect(sock, &c);

    if (r < 0)
        return r;
    r = wsd_open(c, model, "cpu", 0, ret_m);
    if (r < 0) {
        fprintf(stderr, "open: %s\n", wsd_last_error(c));
        wsd_close(c);
        return r;
    }
    *ret_c = c;
    return 0;
}

static long pss_kb(pid_t pid)
{
    char path[64], line[256];
    long v = -1;
    FILE *f;

    snprintf(path, sizeof(path), "/proc/%d/smaps_rollup", (int)pid);
    f = fopen(path, "r");
    if (!f)
        return -1;
    while (fgets(line, sizeof(line), f))
        if (strncmp(line, "Pss:", 4) == 0)
            v = strtol(line + 4, NULL, 10);
    fclose(f);
    return v;
}

/* A worker: attach, read one byte per page of every storage, report, wait for the parent. */
static void worker(const char *sock, const char *model, int ready_fd, int go_fd)
{
    volatile uint8_t sink = 0;
    wsd_model_t *m;
    wsd_client_t *c;
    char b = 0;

    if (attach_once(sock, model, &m, &c) < 0)
        _exit(1);
    for (size_t i = 0; i < wsd_model_storage_count(m); i++) {
        void *data;
        uint64_t n;

        (void)wsd_model_storage(m, i, &data, &n);
        for (uint64_t off = 0; off < n; off += 4096)
            sink ^= ((const uint8_t *)data)[off];
    }
    (void)sink;
    if (write(ready_fd, "r", 1) != 1 || read(go_fd, &b, 1) < 0)
        _exit(1);
    wsd_model_free(m);
    wsd_close(c);
    _exit(0);
}

int main(int argc, char **argv)
{
    const char *sock, *model, *file;
    int attaches, workers, fd;
    double *t, pread_ms[5];
    struct stat st;
    uint8_t *buf;
    int ready[2], go[2];
    pid_t *pids;
    long total_pss = 0;

    if (argc < 4) {
        fprintf(stderr, "usage: bench-attach SOCKET MODEL FILE [ATTACHES] [WORKERS]\n");
        return 2;
    }
    sock = argv[1];
    model = argv[2];
    file = argv[3];
    attaches = argc > 4 ? atoi(argv[4]) : 200;
    workers = argc > 5 ? atoi(argv[5]) : 8;
    if (attaches < 1 || workers < 1)
        return 2;

    t = calloc((size_t)attaches, sizeof(double));
    for (int i = 0; i < attaches; i++) {
        wsd_model_t *m;
        wsd_client_t *c;
        double a = now_ms();

        if (attach_once(sock, model, &m, &c) < 0)
            return 1;
        t[i] = now_ms() - a;
        wsd_model_free(m);
        wsd_close(c);
    }
    qsort(t, (size_t)attaches, sizeof(double), cmp_double);

    fd = open(file, O_RDONLY | O_CLOEXEC);
    if (fd < 0 || fstat(fd, &st) < 0) {
        perror(file);
        return 1;
    }
    buf = malloc((size_t)st.st_size);
    for (int k = 0; k < 5; k++) {
        double a = now_ms();
        size_t done = 0;

        /* Fresh pages each time, as a new worker process would have. */
        free(buf);
        buf = malloc((size_t)st.st_size);
        while (done < (size_t)st.st_size) {
            ssize_t n = pread(fd, buf + done, (size_t)st.st_size - done, (off_t)done);

            if (n <= 0) {
                perror("pread");
                return 1;
            }
            done += (size_t)n;
        }
        pread_ms[k] = now_ms() - a;
    }
    free(buf);
    close(fd);
    qsort(pread_ms, 5, sizeof(double), cmp_double);

    if (pipe(ready) < 0 || pipe(go) < 0)
        return 1;
    pids = calloc((size_t)workers, sizeof(pid_t));
    for (int i = 0; i < workers; i++) {
        pids[i] = fork();
        if (pids[i] == 0) {
            close(ready[0]);
            close(go[1]);
            worker(sock, model, ready[1], go[0]);
        }
    }
    close(ready[1]);
    close(go[0]);
    for (int i = 0; i < workers; i++) {
        char b;

        if (read(ready[0], &b, 1) != 1) {
            fprintf(stderr, "a worker failed\n");
            return 1;
        }
    }
    for (int i = 0; i < workers; i++)
        total_pss += pss_kb(pids[i]);
    close(go[1]);
    for (int i = 0; i < workers; i++)
        waitpid(pids[i], NULL, 0);

    printf("file: %s, %.1f MiB\n", file, (double)st.st_size / (1 << 20));
    printf("attach (connect+open+map), %d runs: median %.3f ms, p99 %.3f ms\n", attaches,
           t[attaches / 2], t[(int)(attaches * 0.99)]);
    printf("pread of the file into private memory (warm page cache), median of 5: %.1f ms\n",
           pread_ms[2]);
    printf("ratio pread / attach: %.0fx\n", pread_ms[2] / t[attaches / 2]);
    printf("%d workers touching every page: total Pss %.1f MiB = %.3f x file size\n", workers,
           (double)total_pss / 1024, (double)total_pss * 1024 / (double)st.st_size);
    printf("(without weightsd, %d private copies would be %.3f x file size)\n", workers,
           (double)workers);
    free(t);
    free(pids);
    return 0;
}
