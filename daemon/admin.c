/*
 * admin.c - the admin socket's verbs: preload, evict, list, info, stats. Answers are JSON
 * documents (their shape is documented in README.md, and scripts rely on it); errors are typed
 * Error frames like everywhere else.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "convert.h"
#include "info.h"
#include "log.h"
#include "server.h"

/* Progress frames go out at most this often. */
#define PROGRESS_INTERVAL_MS 250

typedef struct preload_ctx {
    conn_t *conn;            /* reference until the preload ends */
    uint64_t id;
    model_t *model;          /* the loading model; valid until preload_done_cb */
    bool progress;           /* the client asked for Progress frames */
    bool cancel_on_disconnect;
    bool timer_on;           /* timer initialised; ctx is freed from its close callback */
    uv_timer_t timer;        /* ticks progress and watches for the client going away */
} preload_ctx_t;

static void ctx_free_cb(uv_handle_t *h)
{
    free(h->data);
}

static void preload_tick_cb(uv_timer_t *t)
{
    preload_ctx_t *ctx = t->data;
    conn_t *c = ctx->conn;
    const char *phase;
    uint64_t done, total;
    char msg[128];

    if (c->closing) {
        if (ctx->cancel_on_disconnect && ctx->model->loading) {
            log_info("admin client of preload '%s' went away: cancelling", ctx->model->name);
            (void)registry_cancel(c->srv->reg, ctx->model->name, msg, sizeof(msg));
            ctx->cancel_on_disconnect = false;
        }
        return;
    }
    if (ctx->progress && model_progress(ctx->model, &phase, &done, &total)) {
        Weightsd__V1__Frame out = WEIGHTSD__V1__FRAME__INIT;
        Weightsd__V1__Progress p = WEIGHTSD__V1__PROGRESS__INIT;

        p.phase = wire_str(phase);
        p.done = done;
        p.total = total;
        out.id = ctx->id;
        out.body_case = WEIGHTSD__V1__FRAME__BODY_PROGRESS;
        out.progress = &p;
        conn_send_msg(c, &out);
    }
}

/* Sends the JSON \p text (the caller's still) as an AdminReply. */
static void send_text(conn_t *c, uint64_t id, char *text)
{
    Weightsd__V1__Frame out = WEIGHTSD__V1__FRAME__INIT;
    Weightsd__V1__AdminReply ar = WEIGHTSD__V1__ADMIN_REPLY__INIT;

    ar.json = text;
    out.id = id;
    out.body_case = WEIGHTSD__V1__FRAME__BODY_ADMIN_REPLY;
    out.admin_reply = &ar;
    conn_send_msg(c, &out);
}

/* Sends \p doc (stolen), dumped, as an AdminReply. */
static void send_json(conn_t *c, uint64_t id, json_t *doc)
{
    char *text = doc ? json_dumps(doc, JSON_COMPACT | JSON_ENCODE_ANY) : NULL;

    json_decref(doc);
    if (!text) {
        conn_send_error(c, id, -ENOMEM, "out of memory building the reply");
        return;
    }
    send_text(c, id, text);
    free(text);
}

static json_t *warnings_json(const model_t *m)
{
    json_t *a = json_array();

    for (size_t i = 0; m->mf && i < m->mf->nwarnings; i++)
        json_array_append_new(a, json_string(m->mf->warnings[i]));
    return a;
}

static json_t *summary_json(const model_t *m)
{
    json_t *doc = json_pack("{s:s, s:s, s:I, s:I}", "name", m->name, "state",
                            model_state_name(m->state), "bytes", (json_int_t)m->bytes, "leases",
                            (json_int_t)m->leases);
    json_t *up = NULL;

    /* A ready model being uploaded to more devices says to which (only then). */
    for (int d = 0; doc && d < GPU_DEVICES_MAX; d++) {
        char name[32];

        if (!model_uploading_to(m, d))
            continue;
        if (!up && !(up = json_array()))
            break;
        snprintf(name, sizeof(name), "cuda:%d", d);
        json_array_append_new(up, json_string(name));
    }
    if (up)
        json_object_set_new(doc, "uploading", up);
    /* The GPUs it is served on (only when there are some; the host tier always is). */
    for (size_t i = 0; doc && i < m->ngpu; i++) {
        json_t *g = json_object_get(doc, "devices");
        char name[32];

        if (model_gpu_removing(m, m->gpu[i].device))
            continue;
        if (!g && json_object_set_new(doc, "devices", g = json_array()) < 0)
            break;
        snprintf(name, sizeof(name), "cuda:%d", m->gpu[i].device);
        json_array_append_new(g, json_string(name));
    }
    return doc;
}

/* Who holds leases on \p m: one entry per (pid, uid), from SO_PEERCRED. */
static json_t *holders_json(const server_t *s, const model_t *m)
{
    json_t *a = json_array();

    for (const conn_t *c = s->conns; c; c = c->next) {
        json_int_t n = 0;

        for (size_t i = 0; i < c->nleases; i++)
            n += c->leases[i].model == m;
        if (n)
            json_array_append_new(a, json_pack("{s:i, s:i, s:I}", "pid", (int)c->cred.pid, "uid",
                                               (int)c->cred.uid, "leases", n));
    }
    return a;
}

/* "state": "ok" or "degraded", with the first sticky CUDA error that caused it (G6). */
static void gpu_state_set(json_t *d, int device)
{
    char why[200];

    if (gpu_device_degraded(device, why, sizeof(why))) {
        json_object_set_new(d, "state", json_string("degraded"));
        json_object_set_new(d, "degraded_reason", json_string(why));
    } else
        json_object_set_new(d, "state", json_string("ok"));
}

/*
 * The GPU tier for stats: whether the build has CUDA, and once a preload has probed the
 * devices (stats never starts the probe: it can block the loop for seconds), each device
 * with the copies of listed models on it (draining ones included: they still hold memory).
 */
static json_t *gpu_json(const registry_t *r)
{
    const gpu_probe_t *p = gpu_probe_peek();
    json_t *doc = json_pack("{s:b, s:b}", "cuda_build", gpu_build_has_cuda(), "probed", p != NULL);
    json_t *devs;

    if (!p)
        return doc;
    devs = json_array();
    json_object_set_new(doc, "driver_version", json_integer(p->driver_version));
    json_object_set_new(doc, "runtime_version", json_integer(p->runtime_version));
    if (p->error[0])
        json_object_set_new(doc, "error", json_string(p->error));
    for (int i = 0; i < p->ndevices; i++) {
        char name[32];
        json_t *d;

        snprintf(name, sizeof(name), "cuda:%d", i);
        d = json_pack("{s:s, s:s, s:I, s:b, s:b}", "device", name, "name", p->dev[i].name,
                      "total_bytes", (json_int_t)p->dev[i].total_bytes, "vmm", p->dev[i].vmm,
                      "posix_fd", p->dev[i].posix_fd);
        gpu_state_set(d, i);
        {
            json_int_t copies = 0, bytes = 0;

            for (const model_t *m = r->models; m; m = m->next)
                for (size_t k = 0; k < m->ngpu; k++)
                    if (m->gpu[k].device == i) {
                        copies++;
                        bytes += (json_int_t)m->gpu[k].size;
                    }
            json_object_set_new(d, "copies", json_integer(copies));
            json_object_set_new(d, "copy_bytes", json_integer(bytes));
        }
        json_array_append_new(devs, d);
    }
    json_object_set_new(doc, "devices", devs);
    return doc;
}

/*
 * Where the model is served: the host tier always, then each device copy with its handle kind.
 * Legacy IPC copies say what they cannot promise (RELIABILITY G3, G5).
 */
static json_t *devices_json(const model_t *m)
{
    json_t *a = json_array();

    json_array_append_new(a, json_pack("{s:s, s:I}", "device", "cpu", "bytes",
                                       (json_int_t)m->arena.size));
    for (size_t i = 0; i < m->ngpu; i++) {
        const gpu_export_t *g = &m->gpu[i];
        char name[32];
        json_t *d;

        snprintf(name, sizeof(name), "cuda:%d", g->device);
        d = json_pack("{s:s, s:s, s:I, s:I, s:b}", "device", name, "handle",
                      gpu_handle_kind_name(g->kind), "bytes", (json_int_t)g->size, "upload_ms",
                      (json_int_t)(g->upload_ns / 1000000), "writable", m->allow_gpu_write);
        /* The whole upload and the copy alone, in microseconds: tests/gpu compares the copy's
         * rate with a plain pinned cudaMemcpy. */
        json_object_set_new(d, "upload_us", json_integer((json_int_t)(g->upload_ns / 1000)));
        json_object_set_new(d, "fill_us", json_integer((json_int_t)(g->fill_ns / 1000)));
        json_object_set_new(d, "leases", json_integer((json_int_t)m->gpu_leases[g->device]));
        /* evict --device --drain: no new opens here, freed with the last of those leases */
        json_object_set_new(d, "draining", json_boolean(model_gpu_removing(m, g->device)));
        gpu_state_set(d, g->device);
        if (g->kind == GPU_HANDLE_LEGACY_IPC)
            json_object_set_new(d, "limits",
                                json_string("legacy CUDA IPC: the daemon must outlive importers, "
                                            "importers need its PID namespace, mappings "
                                            "cannot be made read-only, and the copy is freed "
                                            "with the model's last lease, so a worker must "
                                            "keep its connection open while it uses the "
                                            "tensors"));
        json_array_append_new(a, d);
    }
    return a;
}

/* Everything `info` says but the tensor list. */
static json_t *info_json(const server_t *s, const model_t *m)
{
    json_t *doc = summary_json(m);
    json_t *meta = json_object();

    json_object_set_new(doc, "source", json_string(m->source));
    json_object_set_new(doc, "format", json_string(m->mf ? m->mf->format : ""));
    json_object_set_new(doc, "map_bytes", json_integer((json_int_t)m->arena.size));
    json_object_set_new(doc, "opens", json_integer((json_int_t)m->opens));
    json_object_set_new(doc, "load_ms", json_integer((json_int_t)m->load_ms));
    json_object_set_new(doc, "hash", json_string(m->hash));
    json_object_set_new(doc, "share", json_string(m->share_file ? "file" : "memfd"));
    json_object_set_new(doc, "pages", json_string(m->arena.pages));
    json_object_set_new(doc, "page_cache", json_string(source_cache_name(m->page_cache)));
    json_object_set_new(doc, "page_cache_released",
                        json_integer((json_int_t)m->arena.cache_released));
    json_object_set_new(doc, "restricted", json_boolean(m->acl));
    json_object_set_new(doc, "devices", devices_json(m));
    if (m->share_file)
        json_object_set_new(doc, "file_replaced", json_boolean(model_source_replaced(m)));
    json_object_set_new(doc, "dtype", m->dtype >= 0 ? json_string(wsd_dtype_name(m->dtype))
                                                   : json_null());
    json_object_set_new(doc, "holders", holders_json(s, m));
    json_object_set_new(doc, "warnings", warnings_json(m));
    for (size_t i = 0; m->mf && i < m->mf->nmeta; i++) {
        json_t *v = json_loads(m->mf->meta[i].value, JSON_DECODE_ANY, NULL);

        json_object_set_new(meta, m->mf->meta[i].key, v ? v : json_string(m->mf->meta[i].value));
    }
    json_object_set_new(doc, "ntensors", json_integer((json_int_t)m->ntensors));
    json_object_set_new(doc, "metadata", meta);
    return doc;
}

/*
 * The info document with "tensor_offset" and "tensors" (a page of the list, see InfoRequest)
 * appended as text: \p text holds the rest of the document, dumped, and is extended in place.
 * Sends the error itself and returns -1 when the page cannot be given.
 */
static int info_append_tensors(conn_t *c, uint64_t id, model_t *m,
                               const Weightsd__V1__InfoRequest *req, info_text_t *text)
{
    static const uint8_t none[1]; /* a loading model: no manifest yet, no tensors */
    /* What the list may take of one frame: the rest of the document, its closing brace and
     * the frame's own fields (id, tags, lengths: under 64 bytes) come first. */
    const size_t reserved = 64u + 1u;
    uint64_t count = 0;
    size_t room, budget;
    char head[64];
    int r, k;

    /* The dumped object's closing brace gives way to the two members. */
    info_text_cut(text, text->len - 1);
    k = snprintf(head, sizeof(head), ",\"tensor_offset\":%" PRIu64 ",\"tensors\":",
                 req->tensor_offset);
    r = info_text_put(text, head, (size_t)k);
    room = text->len + reserved < WSD_FRAME_MAX ? WSD_FRAME_MAX - reserved - text->len : 0;
    budget = req->tensor_limit && room > WSD_INFO_PAGE_BYTES ? WSD_INFO_PAGE_BYTES : room;
    if (r == 0 && budget > 2) /* "[]" */
        r = info_tensors_json(m->manifest_pb ? m->manifest_pb : none,
                              m->manifest_pb ? m->manifest_pb_len : 0, req->tensor_offset,
                              req->tensor_limit, budget, text, &count,
                              m->manifest_pb ? &m->info_seek : NULL);
    else if (r == 0)
        r = WSD_ELIMIT;
    if (r == 0)
        r = info_text_put(text, "}", 1);
    switch (r) {
    case 0:
        return 0;
    case WSD_EINVAL:
        conn_send_error(c, id, r, "tensor offset %" PRIu64 " is past the %zu tensors of '%s'",
                        req->tensor_offset, m->ntensors, m->name);
        return -1;
    case WSD_ELIMIT:
        if (req->tensor_limit) {
            conn_send_error(c, id, r,
                            "E_LIMIT: the info of '%s' without its tensors is %zu bytes, too "
                            "much to send a page of them beside it in one reply (%u bytes)",
                            m->name, text->len, WSD_FRAME_MAX);
            return -1;
        }
        conn_send_error(c, id, r,
                        "E_LIMIT: the %zu tensors of '%s' from %" PRIu64 " on are more than "
                        "one reply carries (%u bytes); ask for pages (InfoRequest.tensor_limit, "
                        "as weightsctl info does)",
                        m->ntensors, m->name, req->tensor_offset, WSD_FRAME_MAX);
        return -1;
    case -ENOMEM:
        conn_send_error(c, id, r, "out of memory building the reply");
        return -1;
    default:
        log_error("model '%s': its packed manifest does not decode (%s)", m->name,
                  strerror(-r));
        conn_send_error(c, id, WSD_EINTERNAL, "the manifest of '%s' does not decode", m->name);
        return -1;
    }
}

static void preload_done_cb(void *data, model_t *m, int status, const char *msg)
{
    preload_ctx_t *ctx = data;
    conn_t *c = ctx->conn;

    if (!c->closing) {
        if (status == 0) {
            json_t *doc = summary_json(m);

            json_object_set_new(doc, "source", json_string(m->source));
            json_object_set_new(doc, "format", json_string(m->mf->format));
            json_object_set_new(doc, "ntensors", json_integer((json_int_t)m->ntensors));
            json_object_set_new(doc, "load_ms", json_integer((json_int_t)m->load_ms));
            json_object_set_new(doc, "hash", json_string(m->hash));
            json_object_set_new(doc, "warnings", warnings_json(m));
            send_json(c, ctx->id, doc);
        } else
            conn_send_error(c, ctx->id, status, "%s", msg);
    }
    conn_unref(c);
    if (ctx->timer_on) {
        uv_timer_stop(&ctx->timer);
        uv_close((uv_handle_t *)&ctx->timer, ctx_free_cb);
    } else
        free(ctx);
}

/* --device cpu|cuda:N, repeatable. The host tier is always built (it is the upload's source),
 * so "cpu" only documents intent; each CUDA ordinal may appear once. Sends the error itself. */
static int parse_devices(conn_t *c, uint64_t id, const Weightsd__V1__PreloadRequest *req,
                         preload_args_t *a)
{
    static int ords[GPU_DEVICES_MAX];
    size_t n = 0;

    for (size_t i = 0; i < req->n_devices; i++) {
        int d;

        if (gpu_parse_device(req->devices[i], &d) < 0) {
            conn_send_error(c, id, WSD_EINVAL, "--device %s: expected cpu or cuda:N (N < %d)",
                            req->devices[i], GPU_DEVICES_MAX);
            return -1;
        }
        if (d < 0)
            continue;
        for (size_t j = 0; j < n; j++)
            if (ords[j] == d) {
                conn_send_error(c, id, WSD_EINVAL, "--device cuda:%d given twice", d);
                return -1;
            }
        ords[n++] = d;
    }
    /* registry_preload() copies the list before this buffer is reused (loop thread only). */
    a->devices = n ? ords : NULL;
    a->ndevices = n;
    a->allow_gpu_write = req->allow_gpu_write;
    return 0;
}

static void handle_preload(conn_t *c, uint64_t id, const Weightsd__V1__PreloadRequest *req)
{
    preload_args_t a = {
        .name = req->name,
        .path = req->path,
        .key = req->key && *req->key ? req->key : NULL,
        .dtype = -1,
        .no_verify = req->no_verify,
        .hugepages = HOST_HUGEPAGES_AUTO,
        .page_cache = SOURCE_CACHE_AUTO,
    };
    preload_ctx_t *ctx;
    char msg[512];
    int r;

    if (req->dtype && *req->dtype) {
        if (convert_parse_target(req->dtype, &a.dtype) < 0) {
            conn_send_error(c, id, WSD_EINVAL, "--dtype %s: expected bf16, f16 or f32",
                            req->dtype);
            return;
        }
    }
    if (req->hugepages && *req->hugepages) {
        if (strcmp(req->hugepages, "never") == 0)
            a.hugepages = HOST_HUGEPAGES_NEVER;
        else if (strcmp(req->hugepages, "always") == 0)
            a.hugepages = HOST_HUGEPAGES_ALWAYS;
        else if (strcmp(req->hugepages, "auto") != 0) {
            conn_send_error(c, id, WSD_EINVAL, "--hugepages %s: expected auto, never or always",
                            req->hugepages);
            return;
        }
    }
    if (req->page_cache && *req->page_cache &&
        source_cache_parse(req->page_cache, &a.page_cache) < 0) {
        conn_send_error(c, id, WSD_EINVAL, "--page-cache %s: expected auto, keep or drop",
                        req->page_cache);
        return;
    }
    if (parse_devices(c, id, req, &a) < 0)
        return;
    if (req->share && *req->share) {
        if (strcmp(req->share, "file") == 0)
            a.share_file = true;
        else if (strcmp(req->share, "memfd") != 0) {
            conn_send_error(c, id, WSD_EINVAL, "--share %s: expected memfd or file", req->share);
            return;
        }
    }
    ctx = calloc(1, sizeof(*ctx));
    if (!ctx) {
        conn_send_error(c, id, -ENOMEM, "out of memory");
        return;
    }
    ctx->conn = conn_ref(c);
    ctx->id = id;
    ctx->progress = req->progress;
    ctx->cancel_on_disconnect = req->cancel_on_disconnect;
    r = registry_preload(c->srv->reg, &a, preload_done_cb, ctx, msg, sizeof(msg));
    if (r < 0) {
        log_ratelimit_warning("preload '%s' refused: %s", a.name ? a.name : "", msg);
        conn_unref(c);
        free(ctx);
        conn_send_error(c, id, r, "%s", msg);
        return;
    }
    ctx->model = registry_find(c->srv->reg, a.name);
    if ((ctx->progress || ctx->cancel_on_disconnect) &&
        uv_timer_init(c->srv->loop, &ctx->timer) == 0) {
        ctx->timer.data = ctx;
        ctx->timer_on = true;
        (void)uv_timer_start(&ctx->timer, preload_tick_cb, PROGRESS_INTERVAL_MS,
                             PROGRESS_INTERVAL_MS);
    }
}

static void handle_cancel(conn_t *c, uint64_t id, const Weightsd__V1__CancelRequest *req)
{
    const char *name = req->name ? req->name : "";
    char msg[512];
    int r = registry_cancel(c->srv->reg, name, msg, sizeof(msg));

    if (r < 0) {
        conn_send_error(c, id, r, "%s", msg);
        return;
    }
    send_json(c, id, json_pack("{s:s, s:s}", "name", name, "result", msg));
}

static void handle_evict(conn_t *c, uint64_t id, const Weightsd__V1__EvictRequest *req)
{
    const char *name = req->name ? req->name : "";
    const char *dev = req->device && req->device[0] ? req->device : NULL;
    char msg[512];
    int device = -1, r;

    if (dev && gpu_parse_device(dev, &device) < 0) {
        conn_send_error(c, id, WSD_ENODEV, "device '%s' unknown: expected \"cuda:N\"", dev);
        return;
    }
    if (dev && device < 0) {
        conn_send_error(c, id, WSD_EINVAL, "the host copy (cpu) goes with the model itself: "
                        "evict '%s' without a device", name);
        return;
    }
    r = dev ? registry_evict_device(c->srv->reg, name, device, req->flags, msg, sizeof(msg))
            : registry_evict(c->srv->reg, name, req->flags, msg, sizeof(msg));
    if (r < 0) {
        conn_send_error(c, id, r, "%s", msg);
        return;
    }
    if (dev)
        send_json(c, id, json_pack("{s:s, s:s, s:s}", "name", name, "device", dev, "result",
                                   msg));
    else
        send_json(c, id, json_pack("{s:s, s:s}", "name", name, "result", msg));
}

static void handle_list(conn_t *c, uint64_t id)
{
    json_t *a = json_array();

    for (model_t *m = c->srv->reg->models; m; m = m->next) {
        (void)model_check_stale(m);
        json_array_append_new(a, summary_json(m));
    }
    send_json(c, id, a);
}

static void handle_info(conn_t *c, uint64_t id, const Weightsd__V1__InfoRequest *req)
{
    model_t *m = registry_find(c->srv->reg, req->name ? req->name : "");
    info_text_t text = {0};
    json_t *doc;

    if (!m) {
        conn_send_error(c, id, WSD_ENOTFOUND, "no model named '%s'", req->name ? req->name : "");
        return;
    }
    (void)model_check_stale(m);
    doc = info_json(c->srv, m);
    text.p = doc ? json_dumps(doc, JSON_COMPACT) : NULL;
    json_decref(doc);
    if (!text.p) {
        conn_send_error(c, id, -ENOMEM, "out of memory building the reply");
        return;
    }
    text.len = strlen(text.p);
    text.cap = text.len + 1;
    if (req->no_tensors || info_append_tensors(c, id, m, req, &text) == 0)
        send_text(c, id, text.p);
    free(text.p);
}

static void handle_stats(conn_t *c, uint64_t id)
{
    const server_t *s = c->srv;
    const registry_t *r = s->reg;
    json_int_t leases = 0, client_conns = 0;
    json_t *doc;

    for (const conn_t *k = s->conns; k; k = k->next) {
        leases += (json_int_t)k->nleases;
        client_conns += !k->admin;
    }
    doc = json_pack("{s:I, s:I, s:I, s:{s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I}, "
                        "s:I, s:I, s:I, s:I, s:I, "
                        "s:I, s:I, s:I, s:I, s:I, s:I, s:I}",
                        "uptime_s", (json_int_t)((uv_now(s->loop) - s->started_ms) / 1000),
                        "models", (json_int_t)r->nmodels, "resident_bytes",
                        (json_int_t)r->resident_bytes, "connections", "current",
                        (json_int_t)s->nconns, "clients", client_conns, "total",
                        (json_int_t)s->stats.connections_total, "rejected",
                        (json_int_t)s->stats.connections_rejected, "denied",
                        (json_int_t)s->stats.connections_denied, "rejected_uid",
                        (json_int_t)s->stats.connections_rejected_uid, "emfile",
                        (json_int_t)s->stats.connections_emfile, "timed_out",
                        (json_int_t)s->stats.connections_timed_out, "outq_dropped",
                        (json_int_t)s->stats.connections_outq_dropped,
                        "leases", leases, "opens_total",
                        (json_int_t)s->stats.opens_total, "open_errors",
                        (json_int_t)s->stats.open_errors, "releases_total",
                        (json_int_t)s->stats.releases_total, "leases_released_on_close",
                        (json_int_t)s->stats.leases_released_on_close, "preloads_ok",
                        (json_int_t)r->preloads_ok, "preloads_failed",
                        (json_int_t)r->preloads_failed, "protocol_violations",
                        (json_int_t)s->stats.protocol_violations, "memory_budget",
                        (json_int_t)registry_effective_budget(r), "reserved_bytes",
                        (json_int_t)r->reserved_bytes, "budget_evictions",
                        (json_int_t)r->budget_evictions, "page_cache_released_bytes",
                        (json_int_t)r->cache_released);
    if (doc) {
        /* Whether --page-cache auto can drop anything on this kernel (cachestat). */
        json_object_set_new(doc, "page_cache_auto", json_boolean(source_cache_auto_works()));
        json_object_set_new(doc, "gpu", gpu_json(r));
    }
    send_json(c, id, doc);
}

int admin_dispatch(conn_t *c, wire_frame_t *f)
{
    const wire_msg_t *m = f->msg;

    switch (m->body_case) {
    case WEIGHTSD__V1__FRAME__BODY_PRELOAD:
        handle_preload(c, m->id, m->preload);
        return 0;
    case WEIGHTSD__V1__FRAME__BODY_EVICT:
        handle_evict(c, m->id, m->evict);
        return 0;
    case WEIGHTSD__V1__FRAME__BODY_CANCEL:
        handle_cancel(c, m->id, m->cancel);
        return 0;
    case WEIGHTSD__V1__FRAME__BODY_LIST:
        handle_list(c, m->id);
        return 0;
    case WEIGHTSD__V1__FRAME__BODY_INFO:
        handle_info(c, m->id, m->info);
        return 0;
    case WEIGHTSD__V1__FRAME__BODY_STATS:
        handle_stats(c, m->id);
        return 0;
    case WEIGHTSD__V1__FRAME__BODY_OPEN:
    case WEIGHTSD__V1__FRAME__BODY_RELEASE:
        conn_send_error(c, m->id, WSD_EINVAL, "workers open models on the client socket");
        return 0;
    default:
        return -1;
    }
}
