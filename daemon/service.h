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

/* What the daemon runs with where the config file says nothing: the command line's values over
 * the built-in defaults. Every reload starts again from this, so a key removed from the file
 * goes back to it instead of keeping the last file's value. */
typedef struct service_base {
    server_opts_t opts; /* only the run-time limits are used (not sockets or policy) */
    uint64_t budget;    /* host-tier bytes, 0 = none */
    int log_level;
} service_base_t;

typedef struct service {
    uv_loop_t *loop;
    server_t *srv;
    registry_t *reg;
    notify_t notify;
    const char *config_path;  /* NULL: no config file */
    unsigned cli_given;       /* CONFIG_CLI_* set on the command line: reloads leave them be */
    service_base_t base;      /* what a reload starts from */
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
 * the loaded config with \p cli_given (CONFIG_CLI_*) already dropped from it; \p base is
 * copied. */
int service_init(service_t *svc, uv_loop_t *loop, registry_t *reg, const char *config_path,
                 config_t *cfg, unsigned cli_given, const service_base_t *base);
/* After server_start: preloads the configured models; READY=1 once they all have finished. */
void service_start(service_t *svc, server_t *srv);
/* SIGTERM/SIGINT: STOPPING=1, then the server stops. */
void service_stop(service_t *svc);
/* Closes the service's handles (the loop must run once more), frees the config. */
void service_close(service_t *svc);

/*
 * Overlays the [daemon] values \p cfg sets that can change at run time (limits, timeouts,
 * memory budget, log level) on \p opts, \p budget and \p log_level, which the caller starts
 * from a service_base_t. Keys the file leaves out keep what the outputs held.
 */
void service_overlay_config(const config_t *cfg, server_opts_t *opts, uint64_t *budget,
                            int *log_level);

#endif /* WSD_SERVICE_H */
