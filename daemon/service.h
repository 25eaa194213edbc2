/*
 * service.h - the daemon's life as a service: the configured preloads at start, readiness and
 * status for the service manager, SIGHUP reloads of the config file, and the shutdown notice.
 * main.c parses the command line and hands over; the server and registry stay unaware of any
 * of this.
 */
#ifndef WSD_SERVICE_H
#define WSD_SERVICE_H

#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include "config.h"
#include "notify.h"
#include "policy.h"
#include "server.h"

/* While configured preloads run, the start (or reload) timeout is pushed out by this much,
 * every EXTEND_PERIOD_MS, so a large checkpoint does not trip TimeoutStartSec=. */
#define SERVICE_EXTEND_USEC     30000000ull
#define SERVICE_EXTEND_PERIOD_MS 10000

typedef struct service {
    uv_loop_t *loop;
    server_t *srv;
    registry_t *reg;
    notify_t notify;
    const char *config_path;  /* NULL: no config file */
    unsigned cli_given;       /* CONFIG_CLI_* set on the command line: reloads leave them be */
    config_t *cfg;            /* the applied config, or NULL */
    policy_t policy;          /* the server checks this one; a reload rewrites it in place */
    uint64_t generation;      /* bumped per start/reload: stale preload callbacks are ignored */
    unsigned pending;         /* configured preloads of this generation still running */
    unsigned failed;          /* ... and those that failed */
    bool reloading;
    bool stopping;
    uv_timer_t extend;
    uv_signal_t sighup;
} service_t;

/* Before server_start: reads the notify environment and sets the default policy. \p cfg is
 * the loaded config with \p cli_given (CONFIG_CLI_*) already dropped from it. */
int service_init(service_t *svc, uv_loop_t *loop, registry_t *reg, const char *config_path,
                 config_t *cfg, unsigned cli_given);
/* After server_start: preloads the configured models; READY=1 once they all have finished. */
void service_start(service_t *svc, server_t *srv);
/* SIGTERM/SIGINT: STOPPING=1, then the server stops. */
void service_stop(service_t *svc);
/* Closes the service's handles (the loop must run once more), frees the config. */
void service_close(service_t *svc);

/* Applies the [daemon] values of \p cfg that can change at run time to \p s and \p reg. */
void service_apply_limits(const config_t *cfg, server_t *s, registry_t *reg);

#endif /* WSD_SERVICE_H */
