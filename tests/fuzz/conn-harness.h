/*
 * conn-harness.h - the shared part of fuzz-conn.c and fuzz-admin.c: one real server (server.c,
 * session.c, admin.c, the registry) on a real uv loop, fed a connection per input through
 * server_adopt_conn(), in the style of systemd's fuzz-varlink. The input is written in small
 * pieces from the other end of a socketpair, with SCM_RIGHTS fds when the input asks for them;
 * then the peer hangs up, the loop runs until idle, and the harness aborts if anything is left
 * behind: an fd, a connection, a lease.
 *
 * Input layout: byte 0 steers the run (bits 0-5 seed the piece sizes and fd choices, bit 6: never
 * read replies, bit 7: attach fds to some pieces); the rest is the byte stream. Corpus files are
 * one control byte followed by real traffic (make-conn-corpus.py).
 */
#ifndef WSD_CONN_HARNESS_H
#define WSD_CONN_HARNESS_H

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "log.h"
#include "registry.h"
#include "server.h"

/* systemd's fuzz-varlink writes at most this much per call. */
#define HARNESS_PIECE_MAX 143
/* More than the daemon's receive side makes room for (12), to reach its refusal path. */
#define HARNESS_FDS_MAX 16
/* Where the model the inputs may open or preload lives; corpus files name this path. */
#define HARNESS_DIR "/tmp/wsd-fuzz"
#define HARNESS_MODEL HARNESS_DIR "/m.safetensors"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

typedef struct harness {
    uv_loop_t loop;
    registry_t *reg;
    server_t srv;
    int base_fds;
    bool done;          /* preload callback ran */
    int status;
} harness_t;

static harness_t *harness;

/* Sockets, memfds and /dev/null: what connections, models and the fds inputs send are. Pipes
 * are left out: libFuzzer and the sanitizers start llvm-symbolizer on pipes whenever they like. */
static int harness_count_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    struct dirent *e;
    int n = 0;

    if (!d)
        abort();
    while ((e = readdir(d))) {
        char path[300], target[256];
        ssize_t k;

        if (e->d_name[0] == '.')
            continue;
        snprintf(path, sizeof(path), "/proc/self/fd/%s", e->d_name);
        k = readlink(path, target, sizeof(target) - 1);
        if (k <= 0)
            continue;
        target[k] = '\0';
        n += strncmp(target, "socket:", 7) == 0 || strncmp(target, "/memfd:", 7) == 0 ||
             strcmp(target, "/dev/null") == 0;
    }
    closedir(d);
    return n;
}

/* A two-tensor safetensors file, written once (atomically: parallel fuzzers share it). */
static void harness_write_model(void)
{
    static const char header[] =
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]},"
        "\"b\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[16,24]}}";
    char tmp[sizeof(HARNESS_MODEL) + 32];
    uint8_t body[24];
    uint64_t hlen = sizeof(header) - 1;
    uint64_t pad = (8 - hlen % 8) % 8;
    struct stat st;
    FILE *f;

    if (stat(HARNESS_MODEL, &st) == 0)
        return;
    (void)mkdir(HARNESS_DIR, 0755);
    snprintf(tmp, sizeof(tmp), "%s.%d", HARNESS_MODEL, (int)getpid());
    f = fopen(tmp, "wb");
    if (!f)
        abort();
    hlen += pad;
    for (size_t i = 0; i < sizeof(body); i++)
        body[i] = (uint8_t)(i * 37 + 1);
    fwrite(&hlen, 8, 1, f);
    fwrite(header, 1, sizeof(header) - 1, f);
    fwrite("        ", 1, pad, f);
    fwrite(body, 1, sizeof(body), f);
    if (fclose(f) != 0 || rename(tmp, HARNESS_MODEL) < 0)
        abort();
}

static void harness_preload_cb(void *data, model_t *m, int status, const char *msg)
{
    harness->done = true;
    harness->status = status;
}

/* Preloads \p name from the harness model and runs the loop until it is ready. */
static void harness_preload(const char *name)
{
    preload_args_t a = {.name = name, .path = HARNESS_MODEL, .dtype = -1};
    char msg[256];

    harness->done = false;
    if (registry_preload(harness->reg, &a, harness_preload_cb, NULL, msg, sizeof(msg)) < 0) {
        fprintf(stderr, "harness preload: %s\n", msg);
        abort();
    }
    while (!harness->done)
        (void)uv_run(&harness->loop, UV_RUN_ONCE);
    if (harness->status != 0)
        abort();
}

static void harness_init(void)
{
    server_opts_t opts = {
        .socket_fd = -1,
        .admin_fd = -1,
        .max_connections = 64,
        .max_leases_per_conn = 16,
        /* Small, so inputs that never read reach the queue caps quickly. */
        .max_outq_bytes = 64 * 1024,
        .max_fds_per_msg = WSD_FDS_PER_FRAME_MAX,
        .handshake_timeout_ms = WSD_HANDSHAKE_TIMEOUT_MS,
    };

    if (harness)
        return;
    harness = calloc(1, sizeof(*harness));
    if (!harness)
        abort();
    (void)signal(SIGPIPE, SIG_IGN);
    log_set_level(getenv("WSD_FUZZ_DEBUG") ? LOG_LVL_DEBUG : 2);
    harness_write_model();
    if (uv_loop_init(&harness->loop) < 0)
        abort();
    harness->reg = registry_new(&harness->loop);
    if (!harness->reg || server_start(&harness->srv, &harness->loop, harness->reg, &opts) < 0)
        abort();
    harness->base_fds = -1;
}

static uint32_t harness_rand(uint32_t *x)
{
    /* xorshift32: the input decides everything, so every crash replays exactly. */
    *x ^= *x << 13;
    *x ^= *x >> 17;
    *x ^= *x << 5;
    return *x;
}

/* Reads and drops whatever the server sent, closing any fds that came with it. */
static void harness_drain(int fd)
{
    for (;;) {
        union {
            struct cmsghdr align;
            char buf[CMSG_SPACE(sizeof(int) * HARNESS_FDS_MAX)];
        } control;
        char buf[16384];
        struct iovec iov = {.iov_base = buf, .iov_len = sizeof(buf)};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                             .msg_controllen = sizeof(control.buf)};
        ssize_t n = recvmsg(fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);

        if (n <= 0)
            return;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
                size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);

                for (size_t i = 0; i < k; i++) {
                    int rfd;

                    memcpy(&rfd, CMSG_DATA(c) + i * sizeof(int), sizeof(rfd));
                    (void)close(rfd);
                }
            }
    }
}

/* One piece, with \p nfds fresh descriptors attached. \retval bytes sent, or -errno. */
static ssize_t harness_send(int fd, const uint8_t *p, size_t n, unsigned nfds)
{
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int) * HARNESS_FDS_MAX)];
    } control;
    struct iovec iov = {.iov_base = (void *)(uintptr_t)p, .iov_len = n};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    int fds[HARNESS_FDS_MAX];
    ssize_t r;

    for (unsigned i = 0; i < nfds; i++) {
        fds[i] = open("/dev/null", O_RDONLY | O_CLOEXEC);
        if (fds[i] < 0)
            abort();
    }
    if (nfds) {
        struct cmsghdr *c;

        memset(&control, 0, sizeof(control));
        msg.msg_control = control.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
        c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
    }
    r = sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (r < 0)
        r = -errno;
    for (unsigned i = 0; i < nfds; i++)
        (void)close(fds[i]);
    return r;
}

static void harness_check(bool ok, const char *what)
{
    if (!ok) {
        fprintf(stderr, "harness: left behind after the input: %s\n", what);
        abort();
    }
}

/* Runs one input as one connection on the admin or client socket; see the top of the file. */
static void harness_run(const uint8_t *data, size_t size, bool admin)
{
    uint32_t x;
    bool no_read, with_fds;
    size_t off = 0;
    int sv[2];

    if (size < 1)
        return;
    x = 0x9E3779B9u ^ ((uint32_t)(data[0] & 0x3F) * 0x01000193u);
    no_read = data[0] & 0x40;
    with_fds = data[0] & 0x80;
    data++;
    size--;
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0)
        abort();
    (void)server_adopt_conn(&harness->srv, sv[0], admin);
    while (off < size) {
        size_t n = 1 + harness_rand(&x) % HARNESS_PIECE_MAX;
        unsigned nfds = 0;
        ssize_t k;
        int tries = 0;

        if (n > size - off)
            n = size - off;
        if (with_fds && harness_rand(&x) % 8 == 0)
            nfds = 1 + harness_rand(&x) % HARNESS_FDS_MAX;
        while ((k = harness_send(sv[1], data + off, n, nfds)) == -EAGAIN && tries++ < 4) {
            (void)uv_run(&harness->loop, UV_RUN_NOWAIT);
            if (!no_read)
                harness_drain(sv[1]);
        }
        if (k < 0) /* the server hung up, or stopped reading a peer that does not read */
            break;
        off += (size_t)k;
        (void)uv_run(&harness->loop, UV_RUN_NOWAIT);
        if (!no_read)
            harness_drain(sv[1]);
    }
    (void)uv_run(&harness->loop, UV_RUN_NOWAIT);
    if (!no_read)
        harness_drain(sv[1]);
    (void)close(sv[1]);
    /* Until the connection is gone and every preload or waiter it started has ended. */
    (void)uv_run(&harness->loop, UV_RUN_DEFAULT);
    harness_check(harness->srv.nconns == 0, "a connection");
    harness_check(harness->srv.nuids == 0, "a per-uid slot");
}

#endif /* WSD_CONN_HARNESS_H */
