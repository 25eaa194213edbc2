/*
 * service.c - start, reload and stop as the service manager sees them (shared/STYLE.md "SYSTEMD
 * UNIT" U1): READY=1 only once the sockets serve and every configured preload has finished,
 * EXTEND_TIMEOUT_USEC while they run, RELOADING=1 ... READY=1 around a SIGHUP reload, and
 * STOPPING=1 on the way out. STATUS= says what the daemon is doing at each step.
 *
 * A reload is all or nothing: a config with any error changes nothing (the errors are logged
 * with file:line). A good one replaces the policy and limits at once, preloads models it adds
 * or changes, and evicts, with drain, those it no longer lists.
 */
#include "service.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "weightsd.h"

typedef struct preload_ctx {
    service_t *svc;
    uint64_t generation;
} preload_ctx_t;

static void extend_cb(uv_timer_t *t)
{
    service_t *svc = t->data;

    notify_extend_timeout(&svc->notify, SERVICE_EXTEND_USEC);
}

static void report_ready(service_t *svc)
{
    char status[256];

    (void)uv_timer_stop(&svc->extend);
    if (svc->stopping)
        return;
    if (svc->failed)
        snprintf(status, sizeof(status), "serving %zu model%s; %u configured preload%s failed "
                 "(see the log)", svc->reg->nmodels, svc->reg->nmodels == 1 ? "" : "s",
                 svc->failed, svc->failed == 1 ? "" : "s");
    else
        snprintf(status, sizeof(status), "serving %zu model%s", svc->reg->nmodels,
                 svc->reg->nmodels == 1 ? "" : "s");
    log_notice("%s: %s", svc->reloading ? "reloaded" : "ready", status);
    notify_ready(&svc->notify, status);
    svc->reloading = false;
}

static void preload_done(void *data, model_t *m, int status, const char *msg)
{
    preload_ctx_t *ctx = data;
    service_t *svc = ctx->svc;

    /* The registry logged the outcome. A callback from before the latest reload only matters
     * to the generation that started it. */
    if (ctx->generation == svc->generation) {
        if (status < 0)
            svc->failed++;
        if (svc->pending && --svc->pending == 0)
            report_ready(svc);
    }
    free(ctx);
}

static void preload_one(service_t *svc, const cfg_model_t *cm);

/* A configured model whose own preload, or an upload of it, was running when its entry asked
 * for more: it is asked again once that ends. */
typedef struct config_waiter {
    model_waiter_t w;
    service_t *svc;
    uint64_t generation;
    char name[WSD_MODEL_NAME_MAX + 1];
} config_waiter_t;

static void config_waiter_cb(model_waiter_t *mw, model_t *m, int status, const char *msg)
{
    config_waiter_t *cw = (config_waiter_t *)mw;
    service_t *svc = cw->svc;

    (void)m;
    (void)status;
    (void)msg;
    if (cw->generation == svc->generation && !svc->stopping) {
        const cfg_model_t *cm = config_find_model(svc->cfg, cw->name);

        if (cm)
            preload_one(svc, cm); /* what is still missing, from what is served now */
        if (svc->pending && --svc->pending == 0)
            report_ready(svc);
    }
    free(cw);
}

/* Waits for \p m's running preload or upload before asking for \p cm; counts as pending. */
static void wait_then_preload(service_t *svc, model_t *m, const cfg_model_t *cm)
{
    config_waiter_t *cw = calloc(1, sizeof(*cw));

    if (!cw) {
        log_error("preload '%s': out of memory", cm->name);
        svc->failed++;
        return;
    }
    cw->w.cb = config_waiter_cb;
    cw->svc = svc;
    cw->generation = svc->generation;
    snprintf(cw->name, sizeof(cw->name), "%s", cm->name);
    cw->w.next = m->waiters;
    m->waiters = &cw->w;
    svc->pending++;
    log_info("configured model '%s' is being %s; its configured devices follow once that ends",
             cm->name, m->state == MODEL_LOADING ? "preloaded" : "uploaded to a device");
}

static void preload_one(service_t *svc, const cfg_model_t *cm)
{
    preload_args_t a = {
        .name = cm->name,
        .path = cm->path,
        .key = cm->key,
        .dtype = cm->dtype,
        .no_verify = cm->no_verify,
        .share_file = cm->share_file,
        .hugepages = HOST_HUGEPAGES_AUTO,
        .page_cache = (source_cache_t)cm->page_cache,
        .devices = cm->devices,
        .ndevices = cm->ndevices,
        .allow_gpu_write = cm->allow_gpu_write,
        .acl_users = cm->acl ? &cm->acl_users : NULL,
        .acl_groups = cm->acl ? &cm->acl_groups : NULL,
    };
    preload_ctx_t *ctx = calloc(1, sizeof(*ctx));
    model_t *m;
    char msg[512];
    int r;

    if (!ctx) {
        log_error("preload '%s': out of memory", cm->name);
        svc->failed++;
        return;
    }
    /* Re-adopted from the fd store before we got here, or a reload that only adds devices:
     * its bytes are already served. Devices it is not on (nor being uploaded to) are asked
     * of registry_preload(), which uploads the host copy to them. */
    m = registry_find(svc->reg, cm->name);
    if (m && m->source && strcmp(m->source, cm->path) == 0) {
        size_t missing = 0;

        for (size_t i = 0; i < cm->ndevices; i++)
            missing += !model_gpu(m, cm->devices[i]) && !model_uploading_to(m, cm->devices[i]);
        if (!missing) {
            log_info("configured model '%s' is already resident, not reading it again",
                     cm->name);
            free(ctx);
            return;
        }
        if (m->loading) { /* one upload (or preload) at a time per model */
            wait_then_preload(svc, m, cm);
            free(ctx);
            return;
        }
        log_info("configured model '%s' is resident; uploading it to its configured "
                 "devices", cm->name);
    }
    ctx->svc = svc;
    ctx->generation = svc->generation;
    r = registry_preload(svc->reg, &a, preload_done, ctx, msg, sizeof(msg));
    if (r < 0) {
        log_error("configured preload '%s' (%s:%u) refused: %s", cm->name, svc->config_path,
                  cm->line, msg);
        svc->failed++;
        free(ctx);
        return;
    }
    svc->pending++;
}

/* A reload took devices from a served model: its copies there drain (freed with the last
 * lease on each; the model stays served everywhere else). */
static void drop_devices(service_t *svc, const cfg_model_t *was, const cfg_model_t *now)
{
    for (size_t i = 0; i < was->ndevices; i++) {
        int d = was->devices[i];
        char msg[512];
        int r;

        if (cfg_model_has_device(now, d))
            continue;
        r = registry_evict_device(svc->reg, was->name, d, WSD_EVICT_DRAIN, msg, sizeof(msg));
        if (r == WSD_ENODEV)
            log_info("reload: model '%s' is no longer configured on cuda:%d, where it was not "
                     "served", was->name, d);
        else if (r < 0)
            log_warning("reload: cannot evict '%s' from cuda:%d: %s", was->name, d, msg);
        else
            log_info("reload: model '%s' no longer configured on cuda:%d: %s", was->name, d,
                     msg);
    }
}

/* Starts the preloads of \p cfg not already served as configured by \p old; READY=1 comes from
 * the last one to finish (or at once when there are none). */
static void preload_config(service_t *svc, const config_t *old, const config_t *cfg)
{
    char status[256];

    svc->generation++;
    svc->pending = 0;
    svc->failed = 0;
    for (size_t i = 0; cfg && i < cfg->nmodels; i++) {
        const cfg_model_t *cm = &cfg->models[i];
        const cfg_model_t *was = config_find_model(old, cm->name);
        const model_t *m = registry_find(svc->reg, cm->name);

        if (m && was && cfg_model_same(was, cm))
            continue; /* unchanged and still served */
        if (m && was && cfg_model_devices_change(was, cm) && m->state == MODEL_READY) {
            drop_devices(svc, was, cm);
            preload_one(svc, cm); /* uploads the host copy to the new devices, if any */
            continue;
        }
        if (m && m->state == MODEL_DRAINING) {
            log_warning("model '%s' (%s:%u) is still draining its old definition; it is "
                        "preloaded at the next reload after its last lease goes",
                        cm->name, svc->config_path, cm->line);
            continue;
        }
        if (m && !was) {
            log_notice("model '%s' (%s:%u) is already served (preloaded by an operator); "
                       "keeping it", cm->name, svc->config_path, cm->line);
            continue;
        }
        preload_one(svc, cm);
    }
    if (!svc->pending) {
        report_ready(svc);
        return;
    }
    snprintf(status, sizeof(status), "preloading %u model%s", svc->pending,
             svc->pending == 1 ? "" : "s");
    log_info("%s", status);
    notify_status(&svc->notify, status);
    notify_extend_timeout(&svc->notify, SERVICE_EXTEND_USEC);
    (void)uv_timer_start(&svc->extend, extend_cb, SERVICE_EXTEND_PERIOD_MS,
                         SERVICE_EXTEND_PERIOD_MS);
}

/* Models \p old configured that \p cfg drops or changes: evicted, with drain, so workers that
 * hold them finish undisturbed. A changed model is preloaded anew once it is gone. */
static void evict_dropped(service_t *svc, const config_t *old, const config_t *cfg)
{
    for (size_t i = 0; old && i < old->nmodels; i++) {
        const cfg_model_t *was = &old->models[i];
        const cfg_model_t *now = config_find_model(cfg, was->name);
        char msg[512];
        int r;

        if (now && (cfg_model_same(was, now) || cfg_model_devices_change(was, now)))
            continue; /* kept: its devices change on their own (preload_config()) */
        if (!registry_find(svc->reg, was->name))
            continue;
        r = registry_evict(svc->reg, was->name, WSD_EVICT_DRAIN, msg, sizeof(msg));
        if (r < 0)
            log_warning("reload: cannot evict '%s': %s", was->name, msg);
        else
            log_info("reload: model '%s' %s: %s", was->name,
                     now ? "changed in the config" : "no longer configured", msg);
    }
}

void service_overlay_config(const config_t *cfg, server_opts_t *opts, uint64_t *budget,
                            int *log_level)
{
    if (cfg->log_level >= 0)
        *log_level = cfg->log_level;
    if (cfg->max_connections)
        opts->max_connections = cfg->max_connections;
    if (cfg->max_leases)
        opts->max_leases_per_conn = cfg->max_leases;
    if (cfg->max_conns_per_uid)
        opts->max_conns_per_uid = cfg->max_conns_per_uid;
    if (cfg->max_frame)
        opts->max_frame = cfg->max_frame;
    if (cfg->max_fds_set)
        opts->max_fds_per_msg = cfg->max_fds;
    if (cfg->max_outq)
        opts->max_outq_bytes = (size_t)cfg->max_outq;
    if (cfg->handshake_timeout_ms)
        opts->handshake_timeout_ms = cfg->handshake_timeout_ms;
    if (cfg->idle_timeout_set)
        opts->idle_timeout_ms = cfg->idle_timeout_ms;
    if (cfg->budget_set)
        *budget = cfg->memory_budget;
}

/* A reload's run-time settings: the base, then the new file over it. Connection totals and
 * lease limits count from now on; frame size and fds apply to connections accepted from now
 * on; timeouts at the next sweep (at most one sweep period late). */
static void apply_reload(service_t *svc, const config_t *cfg)
{
    server_opts_t o = svc->base.opts;
    uint64_t budget = svc->base.budget;
    int level = svc->base.log_level;

    service_overlay_config(cfg, &o, &budget, &level);
    log_set_level(level);
    if (svc->srv) {
        server_opts_t *s = &svc->srv->opts;

        s->max_connections = o.max_connections;
        s->max_leases_per_conn = o.max_leases_per_conn;
        s->max_conns_per_uid = o.max_conns_per_uid;
        s->max_frame = o.max_frame;
        s->max_fds_per_msg = o.max_fds_per_msg;
        s->max_outq_bytes = o.max_outq_bytes;
        s->handshake_timeout_ms = o.handshake_timeout_ms;
        s->idle_timeout_ms = o.idle_timeout_ms;
    }
    svc->reg->budget_bytes = budget;
    registry_set_client_preload(svc->reg, cfg->client_preload, cfg->client_preload_dirs);
}

static void report_to_log(void *data, const char *msg)
{
    log_error("%s", msg);
}

static void str_changed(const char *what, const char *a, const char *b)
{
    if ((a || b) && !(a && b && strcmp(a, b) == 0))
        log_warning("reload: %s changed; the running daemon keeps its socket until restarted",
                    what);
}

static void reload(service_t *svc)
{
    config_t *cfg = NULL, *old = svc->cfg;
    char status[PATH_MAX + 128];
    int r;

    snprintf(status, sizeof(status), "reloading %s", svc->config_path ? svc->config_path : "");
    svc->reloading = true;
    notify_reloading(&svc->notify, status);
    if (!svc->config_path) {
        log_info("SIGHUP: no --config file; nothing to reload");
        report_ready(svc);
        return;
    }
    log_info("SIGHUP: %s", status);
    r = config_load(svc->config_path, &cfg, report_to_log, NULL);
    if (r < 0) {
        snprintf(status, sizeof(status), "reload of %s failed (%s); running configuration kept",
                 svc->config_path, r == -EINVAL ? "errors logged" : strerror(-r));
        log_error("%s", status);
        svc->reloading = false;
        /* The manager waits for READY=1 after RELOADING=1 whatever the outcome. */
        notify_ready(&svc->notify, status);
        return;
    }
    /* As at start, what the command line set stays as it set it. */
    config_drop_given(cfg, svc->cli_given);
    str_changed("socket", old ? old->socket_path : NULL, cfg->socket_path);
    str_changed("admin-socket", old ? old->admin_path : NULL, cfg->admin_path);
    apply_reload(svc, cfg);
    svc->policy = cfg->policy;
    evict_dropped(svc, old, cfg);
    svc->cfg = cfg;
    preload_config(svc, old, cfg);
    config_free(old);
}

static void sighup_cb(uv_signal_t *h, int signum)
{
    service_t *svc = h->data;

    if (!svc->stopping)
        reload(svc);
}

int service_init(service_t *svc, uv_loop_t *loop, registry_t *reg, const char *config_path,
                 config_t *cfg, unsigned cli_given, const service_base_t *base)
{
    memset(svc, 0, sizeof(*svc));
    svc->base = *base;
    svc->loop = loop;
    svc->reg = reg;
    svc->config_path = config_path;
    svc->cli_given = cli_given;
    svc->cfg = cfg;
    if (cfg)
        svc->policy = cfg->policy;
    else
        policy_default(&svc->policy);
    (void)notify_init(&svc->notify, loop);
    (void)uv_timer_init(loop, &svc->extend);
    svc->extend.data = svc;
    uv_unref((uv_handle_t *)&svc->extend);
    (void)uv_signal_init(loop, &svc->sighup);
    svc->sighup.data = svc;
    (void)uv_signal_start(&svc->sighup, sighup_cb, SIGHUP);
    uv_unref((uv_handle_t *)&svc->sighup);
    return 0;
}

void service_start(service_t *svc, server_t *srv)
{
    svc->srv = srv;
    preload_config(svc, NULL, svc->cfg);
}

void service_stop(service_t *svc)
{
    if (svc->stopping)
        return;
    svc->stopping = true;
    notify_stopping(&svc->notify, "stopping: closing connections");
    /* A preload would hold the stop for as long as its copy takes (minutes for a large
     * checkpoint, past systemd's TimeoutStopSec): stop it instead; it can be run again. */
    if (svc->reg) {
        unsigned n = registry_cancel_all(svc->reg);

        if (n)
            log_info("stopping: cancelling %u running preload%s", n, n == 1 ? "" : "s");
    }
    (void)uv_timer_stop(&svc->extend);
    (void)uv_signal_stop(&svc->sighup);
    if (svc->srv)
        server_stop(svc->srv);
}

void service_close(service_t *svc)
{
    notify_close(&svc->notify);
    if (!uv_is_closing((uv_handle_t *)&svc->extend))
        uv_close((uv_handle_t *)&svc->extend, NULL);
    if (!uv_is_closing((uv_handle_t *)&svc->sighup))
        uv_close((uv_handle_t *)&svc->sighup, NULL);
    config_free(svc->cfg);
    svc->cfg = NULL;
}
