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
 *
 * Limits (wsd_limits.h, configurable through server_opts_t): connections in total and per uid,
 * frame size, fds per message, output queue bytes and fds, and timeouts. A peer over a limit gets
 * a typed Error when one can be sent, then is closed. The timeouts are enforced by one sweeping
 * timer over the connection list rather than a uv_timer_t per connection: it costs no memory per
 * idle connection and no timer-heap update per frame, and walking a few thousand connections a
 * few times a second is noise; the price is that a timeout fires up to one sweep period late.
 * Out of fds at accept (EMFILE) is survived with a reserved spare fd, as libuv and Redis do.
 */
#include "server.h"

#include <errno.h>
#include <fcntl.h>
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
static void listen_start(server_t *s);

/* Connections per uid: a short array, since a host runs workers under few uids. */
static uid_count_t *uid_find(server_t *s, uid_t uid)
{
    for (size_t i = 0; i < s->nuids; i++)
        if (s->uids[i].uid == uid)
            return &s->uids[i];
    return NULL;
}

static unsigned uid_conns(server_t *s, uid_t uid)
{
    uid_count_t *u = uid_find(s, uid);

    return u ? u->n : 0;
}

static int uid_inc(server_t *s, uid_t uid)
{
    uid_count_t *u = uid_find(s, uid);

    if (!u) {
        if (s->nuids == s->uids_cap) {
            size_t cap = s->uids_cap ? s->uids_cap * 2 : 8;
            uid_count_t *p = realloc(s->uids, cap * sizeof(*p));

            if (!p)
                return -ENOMEM;
            s->uids = p;
            s->uids_cap = cap;
        }
        u = &s->uids[s->nuids++];
        u->uid = uid;
        u->n = 0;
    }
    u->n++;
    return 0;
}

static void uid_dec(server_t *s, uid_t uid)
{
    uid_count_t *u = uid_find(s, uid);

    if (u && --u->n == 0)
        *u = s->uids[--s->nuids];
}

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
    c->outq_fds = 0;
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
    if (c->uid_counted)
        uid_dec(s, c->cred.uid);
    c->uid_counted = false;
    if (c->refuse_code)
        s->nrefusing--;
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
     * without bound; the queue caps then decide. */
    if (c->outq_bytes > c->srv->opts.max_outq_bytes / 2 || c->outq_fds > WSD_OUTQ_FDS_MAX / 2)
        want &= ~UV_READABLE;
    /* After a fatal Error nothing more is read: readable (or hang-up) events would then spin the
     * loop on bytes we never take. A peer that went away shows as a failed send. */
    if (c->close_when_flushed)
        want = UV_WRITABLE;
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
        if (o->off == 0) { /* the fds went with the first byte */
            fdpass_close_all(o->fds, o->nfds);
            c->outq_fds -= o->nfds;
            o->nfds = 0;
        }
        c->active_ms = uv_now(c->srv->loop);
        c->stall_since_ms = 0;
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
    if (c->outq && !c->stall_since_ms)
        c->stall_since_ms = uv_now(c->srv->loop);
    conn_update_events(c);
}

void conn_send(conn_t *c, uint8_t *buf, size_t len, const int *fds, size_t nfds)
{
    outbuf_t *o;

    /* One frame always fits an empty queue, or a manifest over the cap could never be sent. */
    if (c->closing || (c->outq && c->outq_bytes + len > c->srv->opts.max_outq_bytes) ||
        c->outq_fds + nfds > WSD_OUTQ_FDS_MAX) {
        for (size_t i = 0; i < nfds; i++)
            (void)close(fds[i]);
        free(buf);
        if (!c->closing) {
            log_ratelimit_warning("connection %llu (pid %d): output queue over %zu bytes or %u "
                                  "fds, dropping it (the peer does not read its replies)",
                                  (unsigned long long)c->id, (int)c->cred.pid,
                                  c->srv->opts.max_outq_bytes, WSD_OUTQ_FDS_MAX);
            c->srv->stats.connections_outq_dropped++;
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
    c->outq_fds += nfds;
    conn_flush(c);
}

void conn_send_msg(conn_t *c, const wire_msg_t *msg)
{
    uint8_t *buf;
    size_t len;
    int r = wire_encode(msg, 0, &buf, &len);

    /* A reply too large for one frame (info of a model with 10^6 tensors) is the request's
     * error, told to the peer, not a reason to drop its connection. */
    if (r == -EMSGSIZE && msg->body_case != WEIGHTSD__V1__FRAME__BODY_ERROR) {
        size_t size = weightsd__v1__frame__get_packed_size(msg);

        log_warning("connection %llu: a reply of %zu bytes is over the %u-byte frame limit",
                    (unsigned long long)c->id, size, WSD_FRAME_MAX);
        conn_send_error(c, msg->id, WSD_ELIMIT,
                        "E_LIMIT: the reply would be %zu bytes, more than one frame carries "
                        "(%u)", size, WSD_FRAME_MAX);
        return;
    }
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

/* Sends Error{code} (request id 0: it concerns the connection, not a request) as far as the
 * socket takes it now, then closes: a peer that does not read gets no chance to make us wait. */
static void conn_fatal(conn_t *c, int code, const char *what)
{
    if (c->closing)
        return;
    conn_send_error(c, 0, code, "%s; disconnecting", what);
    conn_close(c, what);
}

/* A violation: counted, logged once (rate-limited: a peer can provoke these at will), and the
 * peer dropped after a best-effort Error. */
static void conn_violation(conn_t *c, int code, const char *what)
{
    c->srv->stats.protocol_violations++;
    log_ratelimit_warning("connection %llu (pid %d uid %u): protocol violation: %s; "
                          "disconnecting", (unsigned long long)c->id, (int)c->cred.pid,
                          (unsigned)c->cred.uid, what);
    conn_fatal(c, code, what);
}

static int handle_hello(conn_t *c, wire_frame_t *f)
{
    Weightsd__V1__Frame out = WEIGHTSD__V1__FRAME__INIT;
    Weightsd__V1__HelloReply hr = WEIGHTSD__V1__HELLO_REPLY__INIT;
    static char server_name[] = "weightsd/0.1.0";

    if (c->refuse_code) {
        c->close_when_flushed = true;
        conn_send_error(c, f->msg->id, c->refuse_code, "%s",
                        c->refuse_code == WSD_EDENIED ? "access denied"
                                                      : "too many connections: over the daemon's "
                                                        "connection limit; try again later");
        return 0;
    }
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
    hr.max_frame = (uint32_t)c->srv->opts.max_frame;
    hr.admin = c->admin;
    out.id = f->msg->id;
    out.body_case = WEIGHTSD__V1__FRAME__BODY_HELLO_REPLY;
    out.hello_reply = &hr;
    conn_send_msg(c, &out);
    return 0;
}

/* The declared payload length of the frame at the head of the reader (header complete). */
static uint32_t reader_frame_len(const wire_reader_t *r)
{
    const uint8_t *p = r->buf;

    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void conn_oversized(conn_t *c)
{
    char what[128];

    snprintf(what, sizeof(what), "frame of %u bytes is over the limit of %zu",
             c->reader.len >= WSD_FRAME_HEADER_SIZE ? reader_frame_len(&c->reader) : 0,
             c->srv->opts.max_frame);
    conn_violation(c, WSD_ELIMIT, what);
}

static void conn_on_readable(conn_t *c)
{
    for (int i = 0; i < READS_PER_EVENT && !c->closing && !c->close_when_flushed; i++) {
        wire_frame_t f;
        size_t had_fds = c->reader.nfds;
        int k = wire_reader_fill(&c->reader, c->fd);

        if (k == -EAGAIN)
            break;
        if (k == 0) {
            conn_close(c, "peer closed");
            return;
        }
        if (k == -EBADMSG) {
            conn_violation(c, WSD_EPROTO, "bad file descriptor message (too many fds, "
                                          "truncated or foreign control data)");
            return;
        }
        if (k == -EMSGSIZE) {
            conn_oversized(c);
            return;
        }
        if (k < 0) {
            conn_close(c, strerror(-k));
            return;
        }
        if (c->reader.nfds - had_fds > c->srv->opts.max_fds_per_msg) {
            char what[96];

            snprintf(what, sizeof(what), "%zu file descriptors in one message (limit %u)",
                     c->reader.nfds - had_fds, c->srv->opts.max_fds_per_msg);
            conn_violation(c, WSD_ELIMIT, what);
            return;
        }
        /* No request carries descriptors: any that arrive are unsolicited. */
        if (c->reader.nfds > 0) {
            conn_violation(c, WSD_EPROTO, "unsolicited file descriptors");
            return;
        }
        if (!c->frame_start_ms)
            c->frame_start_ms = uv_now(c->srv->loop);
        while (!c->closing && !c->close_when_flushed) {
            k = wire_reader_next(&c->reader, &f);
            if (k == 0)
                break;
            if (k == -EMSGSIZE) {
                conn_oversized(c);
                return;
            }
            if (k == -ENOMEM) {
                /* Not the peer's fault, so no violation; but the frame is lost either way. */
                log_ratelimit_error("connection %llu (pid %d): out of memory decoding a request; "
                                    "disconnecting", (unsigned long long)c->id,
                                    (int)c->cred.pid);
                conn_fatal(c, WSD_ENOMEM, "out of memory decoding the request");
                return;
            }
            if (k < 0) {
                conn_violation(c, WSD_EPROTO, "malformed frame");
                return;
            }
            c->active_ms = uv_now(c->srv->loop);
            /* The next frame's clock starts with its first byte, which may be here already. */
            c->frame_start_ms = c->reader.len ? c->active_ms : 0;
            if (!c->hello_done)
                k = handle_hello(c, &f);
            else if (f.msg->body_case == WEIGHTSD__V1__FRAME__BODY_HELLO)
                k = -1;
            else
                k = c->admin ? admin_dispatch(c, &f) : session_dispatch(c, &f);
            wire_frame_done(&f);
            if (k < 0) {
                conn_violation(c, WSD_EPROTO, "unexpected message");
                return;
            }
        }
    }
    /* An idle connection keeps no read buffer: memory per idle peer stays a few hundred bytes
     * rather than one maximal frame. */
    if (!c->closing && c->reader.len == 0)
        wire_reader_compact(&c->reader);
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

/* Which limit a new connection from \p uid would pass: 0, or the reason it is refused. */
static const char *conn_over_limit(server_t *s, bool admin, uid_t uid, bool *ret_uid)
{
    unsigned serving = s->nconns - s->nrefusing;
    unsigned reserve = admin ? WSD_ADMIN_RESERVE_CONNS : 0;
    /* Unset follows the total, also when a reload changes the total. */
    unsigned per_uid = s->opts.max_conns_per_uid ? s->opts.max_conns_per_uid
                                                 : s->opts.max_connections;

    *ret_uid = false;
    if (serving >= s->opts.max_connections + reserve)
        return "total";
    if (uid_conns(s, uid) >= per_uid + reserve) {
        *ret_uid = true;
        return "per-uid";
    }
    return NULL;
}

int server_adopt_conn(server_t *s, int fd, bool admin)
{
    socklen_t len = sizeof(struct ucred);
    const char *over;
    bool by_uid;
    conn_t *c;
    int r;

    c = calloc(1, sizeof(*c));
    if (!c) {
        (void)close(fd);
        return -ENOMEM;
    }
    c->srv = s;
    c->fd = fd;
    c->admin = admin;
    c->refs = 1;
    c->id = ++s->next_conn_id;
    c->outq_tail = &c->outq;
    c->accepted_ms = c->active_ms = uv_now(s->loop);
    wire_reader_init(&c->reader, s->opts.max_frame);
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &c->cred, &len) < 0) {
        log_warning("SO_PEERCRED failed: %s", strerror(errno));
        c->cred.uid = (uid_t)-1; /* no identity: the policy refuses it */
    }
    if (s->opts.policy && policy_check(s->opts.policy, fd, &c->cred, c->admin) < 0) {
        s->stats.connections_denied++;
        r = -EACCES;
        goto fail;
    }
    over = conn_over_limit(s, admin, c->cred.uid, &by_uid);
    if (over) {
        if (by_uid)
            s->stats.connections_rejected_uid++;
        else
            s->stats.connections_rejected++;
        log_ratelimit_warning("refusing connection from pid %d uid %u: %s connection limit (%u "
                              "open, %u for this uid; limits %u and %u)", (int)c->cred.pid,
                              (unsigned)c->cred.uid, over, s->nconns - s->nrefusing,
                              uid_conns(s, c->cred.uid), s->opts.max_connections,
                              s->opts.max_conns_per_uid ? s->opts.max_conns_per_uid
                                                        : s->opts.max_connections);
        /* Kept only to tell the peer why (a typed Error in reply to its HELLO), and only a
         * bounded number at once. */
        if (s->nrefusing >= WSD_REFUSING_CONNS_MAX) {
            r = -EUSERS;
            goto fail;
        }
        c->refuse_code = WSD_ELIMIT;
    } else if (uid_inc(s, c->cred.uid) < 0) {
        r = -ENOMEM;
        goto fail;
    } else
        c->uid_counted = true;
    r = uv_poll_init(s->loop, &c->poll, fd);
    if (r < 0) {
        log_error("uv_poll_init: %s", uv_strerror(r));
        if (c->uid_counted)
            uid_dec(s, c->cred.uid);
        goto fail;
    }
    c->poll.data = c;
    c->next = s->conns;
    if (s->conns)
        s->conns->prev = c;
    s->conns = c;
    s->nconns++;
    if (c->refuse_code)
        s->nrefusing++;
    else
        s->stats.connections_total++;
    log_debug("connection %llu on %s socket from pid %d uid %u", (unsigned long long)c->id,
              c->admin ? "admin" : "client", (int)c->cred.pid, (unsigned)c->cred.uid);
    conn_update_events(c);
    return c->refuse_code ? -EUSERS : 0;

fail:
    wire_reader_done(&c->reader);
    (void)close(fd);
    free(c);
    return r;
}

static void spare_open(server_t *s)
{
    if (s->spare_fd < 0)
        s->spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
}

/*
 * accept() failed with EMFILE/ENFILE: the pending connections stay queued and the listening
 * socket stays readable, so the loop would spin. Free the spare fd, accept and close whatever is
 * queued (the peers see the connection end instead of hanging in the backlog), take the spare
 * back. Without a spare (someone took the fd meanwhile) listening pauses until the next sweep.
 */
static void accept_emfile(server_t *s, int which, int err)
{
    unsigned dropped = 0;

    if (s->spare_fd >= 0) {
        (void)close(s->spare_fd);
        s->spare_fd = -1;
        for (int i = 0; i < ACCEPTS_PER_EVENT; i++) {
            int fd = accept4(s->listen_fd[which], NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);

            if (fd < 0)
                break;
            (void)close(fd);
            dropped++;
        }
        spare_open(s);
    }
    s->stats.connections_emfile += dropped;
    log_ratelimit_warning("accept: %s: closed %u pending connection%s%s", strerror(err), dropped,
                          dropped == 1 ? "" : "s", s->spare_fd < 0 ? "; pausing accept" : "");
    if (s->spare_fd < 0 || dropped == 0) {
        s->accept_paused = true;
        for (int i = 0; i < 2; i++)
            if (s->listening[i])
                (void)uv_poll_stop(&s->listen_poll[i]);
    }
}

static void listen_poll_cb(uv_poll_t *h, int status, int events)
{
    server_t *s = h->loop->data;
    int which = h == &s->listen_poll[1];

    if (status < 0) {
        log_error("listening socket: %s", uv_strerror(status));
        return;
    }
    for (int i = 0; i < ACCEPTS_PER_EVENT && !s->stopping && !s->accept_paused; i++) {
        int fd = accept4(s->listen_fd[which], NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);

        if (fd < 0) {
            if (errno == EAGAIN || errno == EINTR || errno == ECONNABORTED)
                return;
            if (errno == EMFILE || errno == ENFILE) {
                accept_emfile(s, which, errno);
                return;
            }
            s->stats.connections_rejected++;
            /* The socket stays readable, so this can repeat on every loop iteration. */
            log_ratelimit_warning("accept: %s", strerror(errno));
            return;
        }
        (void)server_adopt_conn(s, fd, which == 1);
    }
}

static void listen_start(server_t *s)
{
    s->accept_paused = false;
    for (int i = 0; i < 2; i++)
        if (s->listening[i])
            (void)uv_poll_start(&s->listen_poll[i], UV_READABLE, listen_poll_cb);
}

static bool older(uint64_t now, uint64_t since, unsigned ms)
{
    return since && ms && now - since >= ms;
}

static void conn_timeout(conn_t *c, const char *what)
{
    c->srv->stats.connections_timed_out++;
    log_ratelimit_warning("connection %llu (pid %d uid %u): %s; disconnecting",
                          (unsigned long long)c->id, (int)c->cred.pid, (unsigned)c->cred.uid,
                          what);
    conn_fatal(c, WSD_ELIMIT, what);
}

/* One pass over every connection; see the top of the file for why one timer. */
static void sweep_cb(uv_timer_t *t)
{
    server_t *s = t->data;
    uint64_t now = uv_now(s->loop);
    unsigned hs = s->opts.handshake_timeout_ms, idle = s->opts.idle_timeout_ms;
    conn_t *next;

    /* The rate-limited log lines of a flood that has stopped get their summary here. */
    log_ratelimit_flush(/* all= */ false);
    if (s->accept_paused && !s->stopping) {
        spare_open(s);
        if (s->spare_fd >= 0)
            listen_start(s);
    }
    for (conn_t *c = s->conns; c; c = next) {
        next = c->next; /* conn_close unlinks c */
        if (c->closing)
            continue;
        if (!c->hello_done && older(now, c->accepted_ms, hs))
            conn_timeout(c, "no HELLO within the handshake timeout");
        else if (c->close_when_flushed && older(now, c->stall_since_ms, hs))
            conn_close(c, "fatal error not read within the handshake timeout");
        else if (c->reader.len && older(now, c->frame_start_ms, hs))
            conn_timeout(c, "a started frame did not arrive whole within the handshake timeout");
        else if (c->outq && older(now, c->stall_since_ms, hs))
            conn_timeout(c, "replies not read within the handshake timeout");
        else if (idle && c->hello_done && !c->nleases && c->refs == 1 && !c->outq &&
                 older(now, c->active_ms, idle))
            conn_timeout(c, "idle (no leases, no requests) past the idle timeout");
    }
}

static unsigned sweep_period(const server_opts_t *o)
{
    unsigned t = o->handshake_timeout_ms ? o->handshake_timeout_ms : WSD_SWEEP_MAX_MS;

    if (o->idle_timeout_ms && o->idle_timeout_ms < t)
        t = o->idle_timeout_ms;
    t /= 4;
    return t < WSD_SWEEP_MIN_MS ? WSD_SWEEP_MIN_MS : t > WSD_SWEEP_MAX_MS ? WSD_SWEEP_MAX_MS : t;
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
    s->spare_fd = -1;
    s->started_ms = uv_now(loop);
    loop->data = s;
    /* Zero means "not set" to callers that fill only some fields. */
    if (!s->opts.max_frame || s->opts.max_frame > WSD_REQUEST_MAX)
        s->opts.max_frame = WSD_REQUEST_MAX;
    if (s->opts.max_frame < WSD_REQUEST_MIN)
        s->opts.max_frame = WSD_REQUEST_MIN;
    if (s->opts.max_fds_per_msg > WSD_FDS_PER_FRAME_MAX)
        s->opts.max_fds_per_msg = WSD_FDS_PER_FRAME_MAX;
    spare_open(s);
    r = uv_timer_init(loop, &s->sweep);
    if (r < 0)
        goto fail;
    s->sweep.data = s;
    s->sweep_on = true;
    (void)uv_timer_start(&s->sweep, sweep_cb, sweep_period(&s->opts), sweep_period(&s->opts));
    /* The sweep alone must not keep the loop alive once everything else has stopped. */
    uv_unref((uv_handle_t *)&s->sweep);
    for (int i = 0; i < 2; i++) {
        if (adopted[i] < 0 && !paths[i])
            continue;
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
    if (s->sweep_on) {
        (void)uv_timer_stop(&s->sweep);
        uv_close((uv_handle_t *)&s->sweep, NULL);
        s->sweep_on = false;
    }
    if (s->spare_fd >= 0)
        (void)close(s->spare_fd);
    s->spare_fd = -1;
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
    free(s->uids);
    s->uids = NULL;
    s->nuids = s->uids_cap = 0;
}
