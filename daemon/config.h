/*
 * config.h - weightsd.conf: an INI file (parsed with inih) holding what the command line holds
 * plus the access policy and the models to preload at start. The format is documented in
 * systemd/weightsd.conf, the installed example.
 *
 * Loading checks every line and reports every problem with file:line, so
 * `weightsd --check-config` (and `weightsctl config-check`, which runs it) can list them all at
 * once; a config with any error is never applied.
 */
#ifndef WSD_CONFIG_H
#define WSD_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "policy.h"

typedef struct cfg_model {
    char *name;
    char *path;               /* absolute: relative paths are taken from the config's directory */
    char *key;                /* NULL or subtree */
    int dtype;                /* wsd_dtype_t to convert to, or -1 to keep */
    bool share_file;          /* share = file: serve the checkpoint file itself */
    bool no_verify;
    int devices[16];          /* CUDA ordinals from devices = (host/cpu entries add none) */
    size_t ndevices;
    bool allow_gpu_write;     /* allow-gpu-write = yes */
    int page_cache;           /* page-cache = auto|keep|drop (SOURCE_CACHE_*; default auto) */
    bool acl;                 /* allow-users/allow-groups given: only they may open it */
    policy_ids_t acl_users, acl_groups;
    unsigned line;            /* the [model NAME] header, for messages */
} cfg_model_t;

typedef struct config {
    char *file;
    char *socket_path;        /* NULL: not set */
    char *admin_path;
    int log_level;            /* LOG_LVL_*, or -1: not set */
    unsigned max_connections; /* 0: not set */
    unsigned max_leases;
    unsigned max_conns_per_uid; /* 0: not set (likewise below unless a _set flag says) */
    unsigned max_frame;
    bool max_fds_set;
    unsigned max_fds;
    uint64_t max_outq;
    unsigned handshake_timeout_ms;
    bool idle_timeout_set;
    unsigned idle_timeout_ms;   /* 0 = never */
    bool client_preload;      /* allow-client-preload = yes */
    char *client_preload_dirs; /* client-preload-dirs: absolute directories, space separated */
    bool budget_set;
    uint64_t memory_budget;   /* 0 = unlimited */
    policy_t policy;          /* defaults unless [access] says otherwise */
    cfg_model_t *models;
    size_t nmodels;
    unsigned nerrors;
} config_t;

/*
 * Settings the command line gave (CONFIG_CLI_*). They win over the file's, at start and at every
 * reload alike: config_drop_given() forgets the file's values for them before it is applied.
 * These are all the [daemon] keys that have an option of the same name.
 */
enum {
    CONFIG_CLI_SOCKET            = 1 << 0,
    CONFIG_CLI_ADMIN_SOCKET      = 1 << 1,
    CONFIG_CLI_LOG_LEVEL         = 1 << 2,
    CONFIG_CLI_MAX_CONNECTIONS   = 1 << 3,
    CONFIG_CLI_MAX_LEASES        = 1 << 4,
    CONFIG_CLI_MAX_CONNS_PER_UID = 1 << 5,
    CONFIG_CLI_MAX_FRAME         = 1 << 6,
    CONFIG_CLI_MAX_FDS           = 1 << 7,
    CONFIG_CLI_MAX_OUTPUT_QUEUE  = 1 << 8,
    CONFIG_CLI_HANDSHAKE_TIMEOUT = 1 << 9,
    CONFIG_CLI_IDLE_TIMEOUT      = 1 << 10,
    CONFIG_CLI_MEMORY_BUDGET     = 1 << 11,
};

/* What --memory-budget and memory-budget = accept, for both their error messages. */
#define CONFIG_MEMORY_BUDGET_SYNTAX                                                                \
    "bytes with an optional K, M, G or T suffix (powers of 1024), N% of RAM, or 'none'"

/* Receives one complete "FILE:LINE: message" (no newline). */
typedef void (*config_report_fn)(void *data, const char *msg);

/*
 * Parses \p path. Every problem goes to \p report as it is found.
 * \retval 0 with *ret set; -EINVAL when there were errors (*ret NULL, every one reported);
 *         -errno when the file cannot be read (reported too).
 */
int config_load(const char *path, config_t **ret, config_report_fn report, void *data);
void config_free(config_t *c);

/* Marks the settings named by \p given (CONFIG_CLI_* flags) as not set in \p c. */
void config_drop_given(config_t *c, unsigned given);

/*
 * Parses a memory budget, for the command line and the file alike: what registry_parse_size()
 * takes (bytes with K/M/G/T, or "N%" of physical RAM, computed now), or "none" / "0" for no
 * budget (*ret = 0). \retval 0 or -EINVAL (*ret untouched).
 */
int config_parse_memory_budget(const char *s, uint64_t *ret);

/* The model named \p name, or NULL. */
const cfg_model_t *config_find_model(const config_t *c, const char *name);
/* Whether two entries would load the same thing (a reload keeps such a model as it is). */
bool cfg_model_same(const cfg_model_t *a, const cfg_model_t *b);
/* Whether \p now is \p was with other devices and nothing else changed (a reload uploads the
 * served model to the added ones and drains it from the dropped ones, instead of draining
 * the whole model and preloading it again). */
bool cfg_model_devices_change(const cfg_model_t *was, const cfg_model_t *now);
/* Whether \p m lists CUDA ordinal \p device. */
bool cfg_model_has_device(const cfg_model_t *m, int device);

#endif /* WSD_CONFIG_H */
