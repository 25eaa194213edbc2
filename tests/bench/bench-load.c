/*
 * bench-load - many clients at once against one daemon (RELIABILITY C4, C5), driven by
 * bench_load.py.
 *
 *   bench-load SOCKET MODEL DAEMON_PID [CONNS] [SECONDS] [HOSTILE]
 *
 * One thread runs CONNS client connections in an epoll loop (a load generator, not CONNS
 * threads: on a small machine a thousand client threads would starve the daemon's one thread
 * and the figures would measure the scheduler). Each connection speaks the wire protocol with
 * the project's own framing (proto/wire.c), one request in flight:
 *   1. all connect and HELLO; the daemon's RSS per idle connection is taken here;
 *   2. all OPEN the same model at once (burst latency);
 *   3. for SECONDS each loops RELEASE + OPEN: opens/s, p50/p99 OPEN latency, failures;
 *   4. with HOSTILE > 0, step 3 again while HOSTILE more connections, on a second thread, send
 *      oversized frames, spam fds, stall half-way through a frame, and flood opens they never
 *      read, reconnecting whenever the daemon drops them.
 * Prints one JSON object per phase. Exits 1 if a good client failed.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "fdpass.h"
#include "weightsd.h"
#include "wire.h"

typedef enum { C_HELLO, C_IDLE, C_OPEN, C_RELEASE, C_DEAD } cstate_t;

typedef struct bconn {
    int fd;
    cstate_t state;
    uint64_t lease;
    uint64_t next_id;
    double sent_ms;
    wire_reader_t rd;
} bconn_t;

typedef struct samples {
    double *v;
    size_t n, cap;
} samples_t;

static const char *sock_path, *model_name;
static atomic_bool hostile_stop;
static atomic_ulong hostile_drops;

static double now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static void sample_add(samples_t *s, double v)
{
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 4096;
        s->v = realloc(s->v, s->cap * sizeof(double));
        if (!s->v)
            abort();
    }
    s->v[s->n++] = v;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;

    return (x > y) - (x < y);
}

static double pct(samples_t *s, double p)
{
    if (!s->n)
        return 0;
    qsort(s->v, s->n, sizeof(double), cmp_double);
    return s->v[(size_t)(p * (double)(s->n - 1))];
}

static long rss_kb(int pid)
{
    char path[64], line[256];
    long kb = -1;
    FILE *f;

    snprintf(path, sizeof(path), "/proc/%d/status", pid);
    f = fopen(path, "r");
    if (!f)
        return -1;
    while (fgets(line, sizeof(line), f))
        if (sscanf(line, "VmRSS: %ld", &kb) == 1)
            break;
    fclose(f);
    return kb;
}

static int connect_unix(bool nonblock)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | (nonblock ? SOCK_NONBLOCK : 0), 0);

    if (fd < 0)
        return -errno;
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", sock_path);
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        int r = -errno;

        (void)close(fd);
        return r;
    }
    return fd;
}

static int send_msg(int fd, const wire_msg_t *m)
{
    uint8_t *buf;
    size_t len;
    int r = wire_encode(m, 0, &buf, &len);

    if (r < 0)
        return r;
    r = wire_send_all(fd, buf, len, NULL, 0);
    free(buf);
    return r;
}

static int send_hello(int fd, uint64_t id)
{
    Weightsd__V1__Frame f = WEIGHTSD__V1__FRAME__INIT;
    Weightsd__V1__Hello h = WEIGHTSD__V1__HELLO__INIT;

    h.protocol = WSD_PROTOCOL_VERSION;
    h.client = wire_str("bench-load");
    f.id = id;
    f.body_case = WEIGHTSD__V1__FRAME__BODY_HELLO;
    f.hello = &h;
    return send_msg(fd, &f);
}

static int send_open(int fd, uint64_t id)
{
    Weightsd__V1__Frame f = WEIGHTSD__V1__FRAME__INIT;
    Weightsd__V1__OpenRequest o = WEIGHTSD__V1__OPEN_REQUEST__INIT;

    o.model = wire_str(model_name);
    o.device = wire_str("cpu");
    f.id = id;
    f.body_case = WEIGHTSD__V1__FRAME__BODY_OPEN;
    f.open = &o;
    return send_msg(fd, &f);
}

static int send_release(int fd, uint64_t id, uint64_t lease)
{
    Weightsd__V1__Frame f = WEIGHTSD__V1__FRAME__INIT;
    Weightsd__V1__ReleaseRequest r = WEIGHTSD__V1__RELEASE_REQUEST__INIT;

    r.lease = lease;
    f.id = id;
    f.body_case = WEIGHTSD__V1__FRAME__BODY_RELEASE;
    f.release = &r;
    return send_msg(fd, &f);
}

typedef struct run {
    bconn_t *c;
    size_t n;
    int ep;
    bool loop;          /* after an OpenReply, release and open again */
    samples_t lat;      /* OPEN round trips, ms */
    unsigned long opens, failures;
    size_t waiting;     /* connections with a request in flight */
} run_t;

static void fail(run_t *r, bconn_t *c, const char *why)
{
    if (c->state == C_DEAD)
        return;
    if (r->failures < 5)
        fprintf(stderr, "bench-load: good client failed: %s\n", why);
    r->failures++;
    if (c->state != C_IDLE)
        r->waiting--;
    c->state = C_DEAD;
}

static void on_frame(run_t *r, bconn_t *c, wire_frame_t *f)
{
    double t = now_ms();

    switch (f->msg->body_case) {
    case WEIGHTSD__V1__FRAME__BODY_HELLO_REPLY:
        c->state = C_IDLE;
        r->waiting--;
        return;
    case WEIGHTSD__V1__FRAME__BODY_OPEN_REPLY:
        sample_add(&r->lat, t - c->sent_ms);
        r->opens++;
        c->lease = f->msg->open_reply->lease;
        if (f->nfds != 1)
            fail(r, c, "OpenReply without its fd");
        else if (r->loop) {
            c->state = C_RELEASE;
            if (send_release(c->fd, ++c->next_id, c->lease) < 0)
                fail(r, c, "send");
        } else {
            c->state = C_IDLE;
            r->waiting--;
        }
        return;
    case WEIGHTSD__V1__FRAME__BODY_RELEASE_REPLY:
        c->state = C_OPEN;
        c->sent_ms = t;
        if (send_open(c->fd, ++c->next_id) < 0)
            fail(r, c, "send");
        return;
    case WEIGHTSD__V1__FRAME__BODY_ERROR:
        fail(r, c, f->msg->error->message ? f->msg->error->message : "error");
        return;
    default:
        fail(r, c, "unexpected reply");
        return;
    }
}

/* Runs the epoll loop until nothing is in flight (r->loop false) or until \p until_ms. */
static void pump(run_t *r, double until_ms)
{
    struct epoll_event ev[256];

    while (r->waiting > 0 && (until_ms == 0 || now_ms() < until_ms)) {
        int n = epoll_wait(r->ep, ev, 256, 10);

        for (int i = 0; i < n; i++) {
            bconn_t *c = ev[i].data.ptr;
            wire_frame_t f;
            int k;

            if (c->state == C_DEAD)
                continue;
            k = wire_reader_fill(&c->rd, c->fd);
            if (k == -EAGAIN)
                continue;
            if (k <= 0) {
                fail(r, c, k == 0 ? "daemon closed the connection" : strerror(-k));
                continue;
            }
            while (c->state != C_DEAD && (k = wire_reader_next(&c->rd, &f)) == 1) {
                on_frame(r, c, &f);
                wire_frame_done(&f);
            }
            if (k < 0)
                fail(r, c, "bad frame");
            wire_reader_compact(&c->rd);
        }
    }
}

/* Steady phase: every live connection loops RELEASE + OPEN until \p seconds have passed. */
static void steady(run_t *r, double seconds, const char *label, int pid)
{
    double t0, t1;
    unsigned long opens0 = r->opens, fails0 = r->failures;

    r->lat.n = 0;
    r->loop = true;
    t0 = now_ms();
    for (size_t i = 0; i < r->n; i++) {
        bconn_t *c = &r->c[i];

        if (c->state != C_IDLE)
            continue;
        c->state = C_RELEASE;
        r->waiting++;
        if (send_release(c->fd, ++c->next_id, c->lease) < 0)
            fail(r, c, "send");
    }
    pump(r, t0 + seconds * 1e3);
    r->loop = false;
    t1 = now_ms();
    pump(r, t1 + 5000); /* let the last round finish */
    printf("{\"phase\":\"%s\",\"conns\":%zu,\"seconds\":%.1f,\"opens\":%lu,\"opens_per_s\":%.0f,"
           "\"p50_ms\":%.3f,\"p99_ms\":%.3f,\"max_ms\":%.3f,\"failures\":%lu,"
           "\"daemon_rss_kb\":%ld}\n",
           label, r->n, (t1 - t0) / 1e3, r->opens - opens0,
           (double)(r->opens - opens0) / ((t1 - t0) / 1e3), pct(&r->lat, 0.5),
           pct(&r->lat, 0.99), pct(&r->lat, 1.0), r->failures - fails0, rss_kb(pid));
    fflush(stdout);
}

/* One hostile peer's life: connect, misbehave one of four ways, get dropped, again. */
static void *hostile_main(void *arg)
{
    unsigned n = (unsigned)(uintptr_t)arg;
    int *fds = calloc(n, sizeof(int));
    unsigned long k = 0;
    int junk = open("/dev/null", O_RDONLY | O_CLOEXEC);

    for (unsigned i = 0; i < n; i++)
        fds[i] = -1;
    while (!atomic_load(&hostile_stop)) {
        for (unsigned i = 0; i < n && !atomic_load(&hostile_stop); i++, k++) {
            uint8_t hdr[8] = {0};

            if (fds[i] >= 0) {
                /* Still connected? Hang-up says the daemon dropped it; what it sent before
                 * stays unread (some of these peers must never read). */
                struct pollfd p = {.fd = fds[i], .events = POLLRDHUP};

                if (poll(&p, 1, 0) == 0 || !(p.revents & (POLLHUP | POLLRDHUP | POLLERR)))
                    continue;
                (void)close(fds[i]);
                fds[i] = -1;
                atomic_fetch_add(&hostile_drops, 1);
            }
            fds[i] = connect_unix(false);
            if (fds[i] < 0)
                continue;
            switch (k % 4) {
            case 0: /* a 1 GiB frame header */
                hdr[3] = 0x40;
                (void)send(fds[i], hdr, sizeof(hdr), MSG_NOSIGNAL);
                break;
            case 1: { /* fd spam */
                int spam[4] = {junk, junk, junk, junk};

                (void)send_hello(fds[i], 1);
                (void)fdpass_send(fds[i], "\0\0\0\0", 4, spam, 4);
                break;
            }
            case 2: /* half a frame, then silence */
                hdr[0] = 100;
                (void)send(fds[i], hdr, 5, MSG_NOSIGNAL);
                break;
            default: /* opens it never reads */
                (void)send_hello(fds[i], 1);
                for (int j = 0; j < 64; j++)
                    if (send_open(fds[i], (uint64_t)j + 2) < 0)
                        break;
                break;
            }
        }
        usleep(2000);
    }
    for (unsigned i = 0; i < n; i++)
        if (fds[i] >= 0)
            (void)close(fds[i]);
    (void)close(junk);
    free(fds);
    return NULL;
}

int main(int argc, char **argv)
{
    struct rlimit rl;
    run_t r = {0};
    unsigned hostile;
    double seconds, t0;
    long rss0, rss1;
    int pid;

    if (argc < 4) {
        fprintf(stderr, "usage: bench-load SOCKET MODEL DAEMON_PID [CONNS] [SECONDS] "
                        "[HOSTILE]\n");
        return 2;
    }
    sock_path = argv[1];
    model_name = argv[2];
    pid = atoi(argv[3]);
    r.n = argc > 4 ? (size_t)atol(argv[4]) : 1000;
    seconds = argc > 5 ? atof(argv[5]) : 10;
    hostile = argc > 6 ? (unsigned)atoi(argv[6]) : 100;
    /* Every connection plus the memfd each OpenReply carries. */
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        (void)setrlimit(RLIMIT_NOFILE, &rl);
    }
    r.c = calloc(r.n, sizeof(*r.c));
    r.ep = epoll_create1(EPOLL_CLOEXEC);
    if (!r.c || r.ep < 0)
        return 1;

    /* 1. Connect and HELLO, all of them. */
    rss0 = rss_kb(pid);
    t0 = now_ms();
    for (size_t i = 0; i < r.n; i++) {
        bconn_t *c = &r.c[i];
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};

        wire_reader_init(&c->rd, WSD_REPLY_MAX);
        c->fd = connect_unix(false);
        if (c->fd < 0 || send_hello(c->fd, ++c->next_id) < 0) {
            fprintf(stderr, "bench-load: connection %zu: %s\n", i, strerror(-c->fd));
            c->state = C_DEAD;
            r.failures++;
            continue;
        }
        (void)fcntl(c->fd, F_SETFL, O_NONBLOCK);
        (void)epoll_ctl(r.ep, EPOLL_CTL_ADD, c->fd, &ev);
        c->state = C_HELLO;
        r.waiting++;
    }
    pump(&r, now_ms() + 30000);
    usleep(200000);
    rss1 = rss_kb(pid);
    printf("{\"phase\":\"connect\",\"conns\":%zu,\"ms\":%.1f,\"failures\":%lu,"
           "\"daemon_rss_kb_before\":%ld,\"daemon_rss_kb_idle\":%ld,"
           "\"bytes_per_idle_conn\":%.0f}\n",
           r.n, now_ms() - t0, r.failures, rss0, rss1,
           (double)(rss1 - rss0) * 1024.0 / (double)r.n);
    fflush(stdout);

    /* 2. All open the same model at once. */
    t0 = now_ms();
    for (size_t i = 0; i < r.n; i++) {
        bconn_t *c = &r.c[i];

        if (c->state != C_IDLE)
            continue;
        c->state = C_OPEN;
        c->sent_ms = t0;
        r.waiting++;
        if (send_open(c->fd, ++c->next_id) < 0)
            fail(&r, c, "send");
    }
    pump(&r, now_ms() + 30000);
    printf("{\"phase\":\"burst\",\"conns\":%zu,\"ms\":%.1f,\"p50_ms\":%.3f,\"p99_ms\":%.3f,"
           "\"failures\":%lu}\n",
           r.n, now_ms() - t0, pct(&r.lat, 0.5), pct(&r.lat, 0.99), r.failures);
    fflush(stdout);

    /* 3. Steady open/release. */
    steady(&r, seconds, "steady", pid);

    /* 4. The same beside hostile peers. */
    if (hostile) {
        pthread_t th;

        atomic_store(&hostile_stop, false);
        if (pthread_create(&th, NULL, hostile_main, (void *)(uintptr_t)hostile) != 0)
            return 1;
        usleep(500000); /* let them arrive */
        steady(&r, seconds, "steady+hostile", pid);
        atomic_store(&hostile_stop, true);
        pthread_join(th, NULL);
        printf("{\"phase\":\"hostile\",\"peers\":%u,\"dropped_by_daemon\":%lu}\n", hostile,
               atomic_load(&hostile_drops));
    }
    for (size_t i = 0; i < r.n; i++) {
        if (r.c[i].fd >= 0)
            (void)close(r.c[i].fd);
        wire_reader_done(&r.c[i].rd);
    }
    free(r.c);
    free(r.lat.v);
    (void)close(r.ep);
    return r.failures ? 1 : 0;
}
