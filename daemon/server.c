/*
 * server.c - sockets and connections.
 *
 * Divided into: listening (bind or adopt, accept), the per-connection read path (reassemble
 * frames, enforce HELLO first, hand requests to session.c or admin.c), the write path (a capped
 * queue of frames with attached fds), and teardown (leases go at once; memory only from the
 * uv_close callback, STYLE M3).
 *
 * Any protocol violation closes that one connection: every fd it sent is closed with it and no
 * other client notices.
 */
#include "server.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "fdpass.h"
#include "log.h"

/* Reads per readable event before yielding to other connections. */
#define READS_PER_EVENT 32
#define LISTEN_BACKLOG  512
#define ACCEPTS_PER_EVENT 64

static void conn_poll_cb(uv_poll_t *h, int status, int events);

conn_t *conn_ref(conn_t *c)
{
    c->refs++;
    return c;
}

static void outq_free(conn_t *c)
{
    outbuf_t *o = c->outq;

    while (o) {
        outbuf_t *next = o->next;

        fdpass_close_all(o->fds, o->nfds);
        free(o->buf);
        free(o);
        o = next;
    }
    c->outq = NULL;
    c->outq_tail = &c->outq;
    c->outq_bytes = 0;
}

void conn_unref(conn_t *c)
{
    if (--c->refs > 0)
        return;
    wire_reader_done(&c->reader);
    outq_free(c);
    if (c->fd >= 0)
        (void)close(c->fd);
    free(c->leases);
    free(c);
}

static void conn_close_cb(uv_handle_t *h)
{
    conn_unref(h->data);
}

void conn_close(conn_t *c, const char *why)
{
    server_t *s = c->srv;

    if (c->closing)
        return;
    c->closing = true;
    if (why)
        log_debug("connection %llu (pid %d uid %u) closed: %s", (unsigned long long)c->id,
                  (int)c->cred.pid, (unsigned)c->cred.uid, why);
    session_release_all(c);
    if (c->prev)
        c->prev->next = c->next;
    else
        s->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    s->nconns--;
    (void)uv_poll_stop(&c->poll);
    uv_close((uv_handle_t *)&c->poll, conn_close_cb);
}

static void conn_update_events(conn_t *c)
{
    int want = UV_READABLE | UV_DISCONNECT;

    if (c->closing)
        return;
    if (c->outq)
        want |= UV_WRITABLE;
    /* A peer that does not read its replies stops being read from, so it cannot make us queue
     * without bound; the queue cap then decides. */
    if (c->outq_bytes > c->srv->opts.max_outq_bytes / 2)
        want &= ~UV_READABLE;
    if (want != c->poll_events) {
        c->poll_events = want;
        (void)uv_poll_start(&c->poll, want, conn_poll_cb);
    }
}

static void conn_flush(conn_t *c)
{
    while (c->outq && !c->closing) {
        outbuf_t *o = c->outq;
        ssize_t n = fdpass_send(c->fd, o->buf + o->off, o->len - o->off,
                                o->off == 0 ? o->fds : NULL, o->off == 0 ? o->nfds : 0);

        if (n == -EAGAIN)
            break;
        if (n < 0) {
            conn_close(c, strerror((int)-n));
            return;
        }
        if (o->off == 0) /* the fds went with the first byte */
            fdpass_close_all(o->fds, o->nfds);
        o->off += (size_t)n;
        c->outq_bytes -= (size_t)n;
        if (o->off < o->len)
            break;
        c->outq = o->next;
        if (!c->outq)
            c->outq_tail = &c->outq;
        free(o->buf);
        free(o);
    }
    if (!c->outq && c->close_when_flushed) {
        conn_close(c, "fatal error sent");
        return;
    }
    conn_update_events(c);
}

void conn_send(conn_t *c, uint8_t *buf, size_t len, const int *fds, size_t nfds)
{
    outbuf_t *o;

    if (c->closing || c->outq_bytes + len > c->srv->opts.max_outq_bytes) {
        for (size_t i = 0; i < nfds; i++)
            (void)close(fds[i]);
        free(buf);
        if (!c->closing) {
            log_warning("connection %llu (pid %d): output queue over %zu bytes, dropping it",
                        (unsigned long long)c->id, (int)c->cred.pid, c->srv->opts.max_outq_bytes);
            conn_close(c, "output queue full");
        }
        return;
    }
    o = calloc(1, sizeof(*o));
    if (!o) {
        for (size_t i = 0; i < nfds; i++)
            (void)close(fds[i]);
        free(buf);
        conn_close(c, "out of memory");
        return;
    }
    o->buf = buf;
    o->len = len;
    if (nfds)
        memcpy(o->fds, fds, nfds * sizeof(int));
    o->nfds = nfds;
    *c->outq_tail = o;
    c->outq_tail = &o->next;
    c->outq_bytes += len;
    conn_flush(c);
}

void conn_send_msg(conn_t *c, const wire_msg_t *msg)
{
    uint8_t *buf;
    size_t len;
    int r = wire_encode(msg, 0, &buf, &len);

    if (r < 0) {
        log_error("cannot encode reply: %s", strerror(-r));
        conn_close(c, "encode failure");
        return;
    }
    conn_send(c, buf, len, NULL, 0);
}

void conn_send_error(conn_t *c, uint64_t id, int code, const char *fmt, ...)
{
    Weightsd__V1__Frame f = WEIGHTSD__V1__FRAME__INIT;
    Weightsd__V1__Error e = WEIGHTSD__V1__ERROR__INIT;
    char msg[1024];
    va_list ap;

    va_start(ap, fmt);
    (void)vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    e.code = code;
    e.message = msg;
    f.id = id;
    f.body_case = WEIGHTSD__V1__FRAME__BODY_ERROR;
    f.error = &e;
    conn_send_msg(c, &f);
}

/* A violation: counted, logged once, and the peer dropped after its Error (if any) is out. */
static void conn_violation(conn_t *c, const char *what)
{
    c->srv->stats.protocol_violations++;
    log_warning("connection %llu (pid %d uid %u): protocol violation: %s; disconnecting",
                (unsigned long long)c->id, (int)c->cred.pid, (unsigned)c->cred.uid, what);
    conn_close(c, what);
}

static int handle_hello(conn_t *c, wire_frame_t *f)
{
    Weightsd__V1__Frame out = WEIGHTSD__V1__FRAME__INIT;
    Weightsd__V1__HelloReply hr = WEIGHTSD__V1__HELLO_REPLY__INIT;
    static char server_name[] = "weightsd/0.1.0";

    if (f->msg->body_case != WEIGHTSD__V1__FRAME__BODY_HELLO) {
        c->close_when_flushed = true; /* before sending: the send may complete at once */
        conn_send_error(c, f->msg->id, WSD_EPROTO, "the first frame must be HELLO");
        return 0;
    }
    if (f->msg->hello->protocol != WSD_PROTOCOL_VERSION) {
        c->close_when_flushed = true;
        conn_send_error(c, f->msg->id, WSD_EVERSION,
                        "protocol version %u not supported; this daemon speaks %u",
                        f->msg->hello->protocol, WSD_PROTOCOL_VERSION);
        return 0;
    }
    c->hello_done = true;
    hr.protocol = WSD_PROTOCOL_VERSION;
    hr.features = 0;
    hr.server = server_name;
    hr.max_frame = WSD_REQUEST_MAX;
    hr.admin = c->admin;
    out.id = f->msg->id;
    out.body_case = WEIGHTSD__V1__FRAME__BODY_HELLO_REPLY;
    out.hello_reply = &hr;
    conn_send_msg(c, &out);
    return 0;
}

static void conn_on_readable(conn_t *c)
{
    for (int i = 0; i < READS_PER_EVENT && !c->closing && !c->close_when_flushed; i++) {
        wire_frame_t f;
        int k = wire_reader_fill(&c->reader, c->fd);

        if (k == -EAGAIN)
            return;
        if (k == 0) {
            conn_close(c, "peer closed");
            return;
        }
        if (k == -EBADMSG) {
            conn_violation(c, "bad file descriptor message");
            return;
        }
        if (k == -EMSGSIZE) {
            conn_violation(c, "oversized frame");
            return;
        }
        if (k < 0) {
            conn_close(c, strerror(-k));
            return;
        }
        /* No request carries descriptors: any that arrive are unsolicited. */
        if (c->reader.nfds > 0) {
            conn_violation(c, "unsolicited file descriptors");
            return;
        }
        while (!c->closing && !c->close_when_flushed) {
            k = wire_reader_next(&c->reader, &f);
            if (k == 0)
                break;
            if (k < 0) {
                conn_violation(c, k == -EMSGSIZE ? "oversized frame" : "malformed frame");
                return;
            }
            if (!c->hello_done)
                k = handle_hello(c, &f);
            else if (f.msg->body_case == WEIGHTSD__V1__FRAME__BODY_HELLO)
                k = -1;
            else
                k = c->admin ? admin_dispatch(c, &f) : session_dispatch(c, &f);
            wire_frame_done(&f);
            if (k < 0) {
                conn_violation(c, "unexpected message");
                return;
            }
        }
    }
}

static void conn_poll_cb(uv_poll_t *h, int status, int events)
{
    conn_t *c = h->data;

    if (c->closing)
        return;
    if (status < 0) {
        conn_close(c, uv_strerror(status));
        return;
    }
    conn_ref(c);
    if (events & UV_WRITABLE)
        conn_flush(c);
    if ((events & (UV_READABLE | UV_DISCONNECT)) && !c->closing)
        conn_on_readable(c);
    if (!c->closing)
        conn_update_events(c);
    conn_unref(c);
}

static void accept_one(server_t *s, int which, int fd)
{
    socklen_t len = sizeof(struct ucred);
    conn_t *c;
    int r;

    if (s->nconns >= s->opts.max_connections) {
        s->stats.connections_rejected++;
        log_warning("refusing connection: %u connections open (limit %u)", s->nconns,
                    s->opts.max_connections);
        (void)close(fd);
        return;
    }
    c = calloc(1, sizeof(*c));
    if (!c) {
        (void)close(fd);
        return;
    }
    c->srv = s;
    c->fd = fd;
    c->admin = which == 1;
    c->refs = 1;
    c->id = ++s->next_conn_id;
    c->outq_tail = &c->outq;
    wire_reader_init(&c->reader, WSD_REQUEST_MAX);
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &c->cred, &len) < 0) {
        log_warning("SO_PEERCRED failed: %s", strerror(errno));
        c->cred.uid = (uid_t)-1; /* no identity: the policy refuses it */
    }
    if (s->opts.policy && policy_check(s->opts.policy, fd, &c->cred, c->admin) < 0) {
        s->stats.connections_denied++;
        wire_reader_done(&c->reader);
        (void)close(fd);
        free(c);
        return;
    }
    r = uv_poll_init(s->loop, &c->poll, fd);
    if (r < 0) {
        log_error("uv_poll_init: %s", uv_strerror(r));
        wire_reader_done(&c->reader);
        (void)close(fd);
        free(c);
        return;
    }
    c->poll.data = c;
    c->next = s->conns;
    if (s->conns)
        s->conns->prev = c;
    s->conns = c;
    s->nconns++;
    s->stats.connections_total++;
    log_debug("connection %llu on %s socket from pid %d uid %u", (unsigned long long)c->id,
              c->admin ? "admin" : "client", (int)c->cred.pid, (unsigned)c->cred.uid);
    conn_update_events(c);
}

static void listen_poll_cb(uv_poll_t *h, int status, int events)
{
    server_t *s = h->loop->data;
    int which = h == &s->listen_poll[1];

    if (status < 0) {
        log_error("listening socket: %s", uv_strerror(status));
        return;
    }
    for (int i = 0; i < ACCEPTS_PER_EVENT && !s->stopping; i++) {
        int fd = accept4(s->listen_fd[which], NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);

        if (fd < 0) {
            if (errno == EAGAIN || errno == EINTR || errno == ECONNABORTED)
                return;
            s->stats.connections_rejected++;
            log_warning("accept: %s", strerror(errno));
            return;
        }
        accept_one(s, which, fd);
    }
}

/* Binds \p path, replacing a stale socket file but never a live daemon's. */
static int listen_unix(const char *path, mode_t mode, int *ret_fd)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    struct stat st;
    int fd, r;

    if (strlen(path) >= sizeof(sa.sun_path))
        return -ENAMETOOLONG;
    memcpy(sa.sun_path, path, strlen(path) + 1);
    if (lstat(path, &st) == 0) {
        int probe;

        if (!S_ISSOCK(st.st_mode))
            return -EEXIST;
        probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (probe >= 0 && connect(probe, (struct sockaddr *)&sa, sizeof(sa)) == 0) {
            (void)close(probe);
            return -EADDRINUSE;
        }
        if (probe >= 0)
            (void)close(probe);
        (void)unlink(path);
    }
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || chmod(path, mode) < 0 ||
        listen(fd, LISTEN_BACKLOG) < 0) {
        r = -errno;
        (void)close(fd);
        return r;
    }
    *ret_fd = fd;
    return 0;
}

int server_start(server_t *s, uv_loop_t *loop, registry_t *reg, const server_opts_t *opts)
{
    const char *paths[2] = {opts->socket_path, opts->admin_path};
    int adopted[2] = {opts->socket_fd, opts->admin_fd};
    /* Workers (client socket) may be another user in the daemon's group; operators only the
     * owner. Access policy proper is per-peer (SO_PEERCRED), these modes are the first fence. */
    mode_t modes[2] = {0660, 0600};
    int r;

    memset(s, 0, sizeof(*s));
    s->loop = loop;
    s->reg = reg;
    s->opts = *opts;
    s->listen_fd[0] = s->listen_fd[1] = -1;
    s->started_ms = uv_now(loop);
    loop->data = s;
    for (int i = 0; i < 2; i++) {
        if (adopted[i] >= 0)
            s->listen_fd[i] = adopted[i];
        else {
            r = listen_unix(paths[i], modes[i], &s->listen_fd[i]);
            if (r < 0) {
                log_error("cannot listen on %s: %s%s", paths[i], strerror(-r),
                          r == -EADDRINUSE ? " (another weightsd is running there)" : "");
                goto fail;
            }
            s->listen_path[i] = strdup(paths[i]);
        }
        r = uv_poll_init(loop, &s->listen_poll[i], s->listen_fd[i]);
        if (r < 0)
            goto fail;
        s->listening[i] = true;
        r = uv_poll_start(&s->listen_poll[i], UV_READABLE, listen_poll_cb);
        if (r < 0)
            goto fail;
        log_info("serving %s socket on %s", i ? "admin" : "client",
                 paths[i] ? paths[i] : "(inherited fd)");
    }
    return 0;

fail:
    server_stop(s);
    return r < 0 ? r : -EINVAL;
}

void server_stop(server_t *s)
{
    if (s->stopping)
        return;
    s->stopping = true;
    for (int i = 0; i < 2; i++) {
        if (s->listening[i]) {
            (void)uv_poll_stop(&s->listen_poll[i]);
            uv_close((uv_handle_t *)&s->listen_poll[i], NULL);
            s->listening[i] = false;
        }
        if (s->listen_fd[i] >= 0)
            (void)close(s->listen_fd[i]);
        s->listen_fd[i] = -1;
        if (s->listen_path[i]) {
            (void)unlink(s->listen_path[i]);
            free(s->listen_path[i]);
            s->listen_path[i] = NULL;
        }
    }
    while (s->conns)
        conn_close(s->conns, "daemon stopping");
}
