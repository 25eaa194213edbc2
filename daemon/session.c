/*
 * session.c - the client socket's verbs: OPEN (lease a model, get its manifest and fd) and
 * RELEASE. Leases belong to the connection: closing it releases them all, which is how a crashed
 * worker gives its models back.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"
#include "manifest_pb.h"
#include "server.h"

/* An open that waits for a loading model. */
typedef struct open_waiter {
    model_waiter_t w;
    conn_t *conn;       /* reference */
    uint64_t id;        /* request id */
    char expect[72];    /* required content hash, or "" */
    int device;         /* CUDA ordinal, or -1 for the host tier */
    unsigned flags;     /* WSD_OPEN_* of the request */
} open_waiter_t;

static int lease_add(conn_t *c, model_t *m, int device, uint64_t *ret_id)
{
    if (c->nleases == c->leases_cap) {
        size_t cap = c->leases_cap ? c->leases_cap * 2 : 8;
        lease_t *p = realloc(c->leases, cap * sizeof(*p));

        if (!p)
            return -ENOMEM;
        c->leases = p;
        c->leases_cap = cap;
    }
    c->leases[c->nleases].id = ++c->srv->next_lease_id;
    c->leases[c->nleases].model = m;
    c->leases[c->nleases].device = device;
    c->leases[c->nleases].gen = model_lease_get(m, device);
    c->nleases++;
    *ret_id = c->srv->next_lease_id;
    return 0;
}

/* The device copy an open asks for, or NULL after sending the error that says why not. */
static const gpu_export_t *open_gpu(conn_t *c, uint64_t id, model_t *m, int device,
                                    unsigned flags)
{
    const gpu_export_t *g = model_gpu(m, device);
    char where[256], why[200];

    if (!g && model_uploading_to(m, device)) {
        c->srv->stats.open_errors++;
        conn_send_error(c, id, WSD_ELOADING,
                        "model '%s' is being uploaded to cuda:%d; open it there when its "
                        "preload has returned", m->name, device);
        return NULL;
    }
    if (!g && model_gpu_removing(m, device)) {
        c->srv->stats.open_errors++;
        conn_send_error(c, id, WSD_ENODEV,
                        "device 'cuda:%d' unavailable: model '%s' is being evicted from it "
                        "(it goes with the %u lease%s left there)", device, m->name,
                        m->gpu_leases[device], m->gpu_leases[device] == 1 ? "" : "s");
        return NULL;
    }
    if (!g) {
        model_served_on(m, where, sizeof(where));
        c->srv->stats.open_errors++;
        conn_send_error(c, id, WSD_ENODEV,
                        "device 'cuda:%d' unavailable: model '%s' is served on %s only "
                        "(preload it with --device cuda:%d)", device, m->name, where, device);
        return NULL;
    }
    if (gpu_device_degraded(device, why, sizeof(why))) {
        c->srv->stats.open_errors++;
        conn_send_error(c, id, WSD_EGPU,
                        "device 'cuda:%d' is degraded (%s): no new GPU lease on it until "
                        "weightsd restarts; model '%s' is still served on the host tier (cpu)",
                        device, why, m->name);
        return NULL;
    }
    if ((flags & WSD_OPEN_GPU_WRITE) && !m->allow_gpu_write) {
        c->srv->stats.open_errors++;
        conn_send_error(c, id, WSD_EDENIED,
                        "model '%s': a writable GPU mapping needs a preload with "
                        "--allow-gpu-write (other workers share these bytes)", m->name);
        return NULL;
    }
    return g;
}

/* Grants a lease on a ready model and sends OpenReply with the sealed fd, or for a device the
 * CUDA export (an fd with VMM, none with legacy IPC) and where each storage lives in it. */
static void open_grant(conn_t *c, uint64_t id, model_t *m, int device, unsigned flags)
{
    const gpu_export_t *g = NULL;
    uint8_t *buf = NULL;
    size_t len = 0, nfds = 1;
    uint64_t lease;
    int fd = -1, r;

    if (c->nleases >= c->srv->opts.max_leases_per_conn) {
        conn_send_error(c, id, WSD_ELIMIT, "connection holds %zu leases (limit %u)", c->nleases,
                        c->srv->opts.max_leases_per_conn);
        return;
    }
    if (device >= 0) {
        g = open_gpu(c, id, m, device, flags);
        if (!g)
            return;
        nfds = g->kind == GPU_HANDLE_POSIX_FD ? 1 : 0;
    }
    /* The queued frame owns a duplicate, so eviction can close the model's fd meanwhile. */
    if (nfds)
        fd = fcntl(g ? g->fd : m->arena.fd, F_DUPFD_CLOEXEC, 3);
    if (nfds && fd < 0) {
        conn_send_error(c, id, -errno, "cannot duplicate the model's fd: %s", strerror(errno));
        return;
    }
    r = lease_add(c, m, g ? device : -1, &lease);
    if (r == 0)
        r = manifest_pb_open_reply_gpu(id, lease, m->manifest_pb, m->manifest_pb_len,
                                       g ? g->pb : NULL, g ? g->pb_len : 0, nfds, &buf, &len);
    if (r < 0) {
        if (fd >= 0)
            (void)close(fd);
        conn_send_error(c, id, r, "cannot build the reply: %s", wsd_strerror(r));
        return;
    }
    c->srv->stats.opens_total++;
    conn_send(c, buf, len, &fd, nfds);
}

/* A ready model: refuse it if the worker pinned another content hash, else lease it. */
static void open_ready(conn_t *c, uint64_t id, model_t *m, const char *expect, int device,
                       unsigned flags)
{
    if (expect && *expect && strcmp(expect, m->hash) != 0) {
        c->srv->stats.open_errors++;
        conn_send_error(c, id, WSD_EMISMATCH, "model '%s' has content hash %s, the worker expects %s",
                        m->name, m->hash, expect);
        return;
    }
    open_grant(c, id, m, device, flags);
}

static void open_waiter_cb(model_waiter_t *w, model_t *m, int status, const char *msg)
{
    open_waiter_t *ow = (open_waiter_t *)w;
    conn_t *c = ow->conn;

    if (!c->closing) {
        if (status == 0)
            open_ready(c, ow->id, m, ow->expect, ow->device, ow->flags);
        else
            conn_send_error(c, ow->id, status, "%s", msg ? msg : wsd_strerror(status));
    }
    conn_unref(c);
    free(ow);
}

/* Holds the open until the model's preload (or its upload to \p device) ends. */
static void open_wait(conn_t *c, uint64_t id, model_t *m, const Weightsd__V1__OpenRequest *req,
                      int device)
{
    open_waiter_t *ow = calloc(1, sizeof(*ow));

    if (!ow) {
        conn_send_error(c, id, -ENOMEM, "out of memory");
        return;
    }
    ow->w.cb = open_waiter_cb;
    ow->conn = conn_ref(c);
    ow->id = id;
    ow->device = device;
    ow->flags = req->flags;
    snprintf(ow->expect, sizeof(ow->expect), "%s", req->expect_hash ? req->expect_hash : "");
    ow->w.next = m->waiters;
    m->waiters = &ow->w;
}

static void client_preload_done_cb(void *data, model_t *m, int status, const char *msg)
{
    /* Nothing to do: the opening client waits as a model waiter and hears the outcome there. */
}

/* allow-client-preload: an open naming a file loads it as the model on first use. */
static model_t *client_preload(conn_t *c, uint64_t id, const Weightsd__V1__OpenRequest *req)
{
    preload_args_t a = {.name = req->model, .dtype = -1, .hugepages = HOST_HUGEPAGES_AUTO,
                        .page_cache = SOURCE_CACHE_AUTO};
    char real[PATH_MAX], msg[512];
    int r = registry_client_path(c->srv->reg, req->path, real, msg, sizeof(msg));

    if (r == 0) {
        a.path = real;
        r = registry_preload(c->srv->reg, &a, client_preload_done_cb, NULL, msg, sizeof(msg));
    }
    if (r < 0) {
        c->srv->stats.open_errors++;
        log_ratelimit_warning("pid %d uid %u: client preload of '%s' refused: %s",
                              (int)c->cred.pid, (unsigned)c->cred.uid,
                              req->model ? req->model : "", msg);
        conn_send_error(c, id, r, "%s", msg);
        return NULL;
    }
    log_info("pid %d uid %u: preloading '%s' from '%s' on first use", (int)c->cred.pid,
             (unsigned)c->cred.uid, req->model, real);
    return registry_find(c->srv->reg, req->model);
}

static void handle_open(conn_t *c, uint64_t id, const Weightsd__V1__OpenRequest *req)
{
    model_t *m = registry_find(c->srv->reg, req->model ? req->model : "");
    Weightsd__V1__OpenRequest waiting;
    int device;

    if (!m && req->path && *req->path) {
        m = client_preload(c, id, req);
        if (!m)
            return;
        /* The first open waits for the load it caused, whatever its flags said. */
        waiting = *req;
        waiting.flags |= WSD_OPEN_WAIT;
        req = &waiting;
    }
    if (!m) {
        c->srv->stats.open_errors++;
        conn_send_error(c, id, WSD_ENOTFOUND, "no model named '%s'", req->model ? req->model : "");
        return;
    }
    if (gpu_parse_device(req->device, &device) < 0) {
        c->srv->stats.open_errors++;
        conn_send_error(c, id, WSD_ENODEV, "device '%s' unknown: expected \"cpu\" or \"cuda:N\"",
                        req->device);
        return;
    }
    if (m->acl && !policy_allows(&m->acl_users, &m->acl_groups, c->fd, &c->cred)) {
        c->srv->stats.open_errors++;
        c->srv->stats.connections_denied++;
        log_ratelimit_warning("pid %d uid %u may not open model '%s' (its allow-users/"
                              "allow-groups)", (int)c->cred.pid, (unsigned)c->cred.uid, m->name);
        conn_send_error(c, id, WSD_EDENIED, "model '%s' is not open to uid %u", m->name,
                        (unsigned)c->cred.uid);
        return;
    }
    if (model_check_stale(m)) {
        c->srv->stats.open_errors++;
        conn_send_error(c, id, WSD_ESTALE,
                        "model '%s' is stale: '%s' was modified in place since preload; "
                        "preload it again", m->name, m->source);
        return;
    }
    switch (m->state) {
    case MODEL_READY:
        /* WSD_OPEN_WAIT on a device the model is being uploaded to waits for that upload. */
        if ((req->flags & WSD_OPEN_WAIT) && device >= 0 && !model_gpu(m, device) &&
            model_uploading_to(m, device)) {
            open_wait(c, id, m, req, device);
            return;
        }
        open_ready(c, id, m, req->expect_hash, device, req->flags);
        return;
    case MODEL_LOADING:
        if (req->flags & WSD_OPEN_WAIT) {
            open_wait(c, id, m, req, device);
            return;
        }
        c->srv->stats.open_errors++;
        conn_send_error(c, id, WSD_ELOADING, "model '%s' is still loading", m->name);
        return;
    default:
        c->srv->stats.open_errors++;
        conn_send_error(c, id, WSD_EBUSY, "model '%s' is %s: no new opens", m->name,
                        model_state_name(m->state));
        return;
    }
}

static void handle_release(conn_t *c, uint64_t id, const Weightsd__V1__ReleaseRequest *req)
{
    Weightsd__V1__Frame out = WEIGHTSD__V1__FRAME__INIT;
    Weightsd__V1__ReleaseReply rr = WEIGHTSD__V1__RELEASE_REPLY__INIT;

    for (size_t i = 0; i < c->nleases; i++) {
        if (c->leases[i].id != req->lease)
            continue;
        model_lease_put(c->leases[i].model, c->leases[i].device, c->leases[i].gen);
        c->leases[i] = c->leases[--c->nleases];
        c->srv->stats.releases_total++;
        out.id = id;
        out.body_case = WEIGHTSD__V1__FRAME__BODY_RELEASE_REPLY;
        out.release_reply = &rr;
        conn_send_msg(c, &out);
        return;
    }
    conn_send_error(c, id, WSD_ENOLEASE, "lease %llu is not held by this connection",
                    (unsigned long long)req->lease);
}

void session_release_all(conn_t *c)
{
    if (c->nleases)
        log_debug("connection %llu (pid %d) gone: releasing %zu leases", (unsigned long long)c->id,
                  (int)c->cred.pid, c->nleases);
    c->srv->stats.leases_released_on_close += c->nleases;
    while (c->nleases > 0) {
        c->nleases--;
        model_lease_put(c->leases[c->nleases].model, c->leases[c->nleases].device,
                        c->leases[c->nleases].gen);
    }
}

int session_dispatch(conn_t *c, wire_frame_t *f)
{
    const wire_msg_t *m = f->msg;

    switch (m->body_case) {
    case WEIGHTSD__V1__FRAME__BODY_OPEN:
        handle_open(c, m->id, m->open);
        return 0;
    case WEIGHTSD__V1__FRAME__BODY_RELEASE:
        handle_release(c, m->id, m->release);
        return 0;
    case WEIGHTSD__V1__FRAME__BODY_PRELOAD:
    case WEIGHTSD__V1__FRAME__BODY_EVICT:
    case WEIGHTSD__V1__FRAME__BODY_LIST:
    case WEIGHTSD__V1__FRAME__BODY_INFO:
    case WEIGHTSD__V1__FRAME__BODY_STATS:
    case WEIGHTSD__V1__FRAME__BODY_CANCEL:
        /* Whatever the file modes say, operators' verbs need the admin socket. */
        log_ratelimit_warning("pid %d uid %u sent an admin request on the client socket, refused",
                              (int)c->cred.pid, (unsigned)c->cred.uid);
        conn_send_error(c, m->id, WSD_EDENIED, "admin requests are served on the admin socket only");
        return 0;
    default:
        return -1;
    }
}
