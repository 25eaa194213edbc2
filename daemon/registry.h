/*
 * registry.h - models by name and their lifecycle: loading (a preload runs on the thread pool)
 * -> ready (served) -> draining (no new opens; freed with the last lease) -> gone.
 *
 * Everything here runs on the loop thread only (STYLE M7); the preload work callback touches
 * nothing but its own work item.
 */
#ifndef WSD_REGISTRY_H
#define WSD_REGISTRY_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/stat.h>
#include <uv.h>

#include "fmt.h"
#include "policy.h"
#include "gpu.h"
#include "host.h"
#include "info.h"

typedef enum model_state {
    MODEL_LOADING,
    MODEL_READY,
    MODEL_DRAINING,
    MODEL_STALE, /* file share mode: the file changed in place; no new opens */
    _MODEL_STATE_MAX,
    _MODEL_STATE_INVALID = -22
} model_state_t;

const char *model_state_name(model_state_t s);

typedef struct model model_t;
typedef struct registry registry_t;

/* Someone waiting for a loading model (an open with WSD_OPEN_WAIT). status is 0 when the model
 * became ready, else the preload's error code with its message. The waiter is unlinked before
 * the call and owned by the callee afterwards. */
typedef struct model_waiter {
    struct model_waiter *next;
    void (*cb)(struct model_waiter *w, model_t *m, int status, const char *msg);
} model_waiter_t;

struct model {
    model_t *next;            /* registry list, most recently used first */
    registry_t *reg;
    char *name;
    char *source;             /* path as given to preload */
    char *key;                /* --key subtree it was preloaded with, or NULL */
    model_state_t state;
    bool listed;              /* in the registry's list (false once evicted) */
    unsigned refs;            /* 1 while listed + 1 per lease + 1 per running preload */
    unsigned leases;          /* live leases on this model */
    manifest_t *mf;           /* NULL until ready; then its format, metadata and warnings
                               * only: tensors and storages live on in manifest_pb */
    size_t ntensors;          /* tensors served, once ready */
    host_arena_t arena;       /* sealed memfd; fd -1 until ready or after eviction */
    uint8_t *manifest_pb;     /* packed weightsd.v1.Manifest, built once at preload */
    size_t manifest_pb_len;
    info_seek_t info_seek;    /* where info's last page of manifest_pb ended */
    uint64_t bytes;           /* tensor-storage bytes (sum over storages) */
    uint64_t load_ms;         /* preload duration */
    uint64_t opens;           /* opens served */
    int dtype;                /* --dtype target, or -1 */
    uint64_t last_used_ms;    /* uv_now() of the last open, release or preload (for LRU) */
    char hash[33];            /* content hash (host_arena_t.hash), "" until ready */
    bool share_file;          /* arena.fd is the checkpoint file (read-only), not a memfd */
    struct stat file_st;      /* the file at preload, to notice in-place changes */
    bool acl;                 /* only acl_users/acl_groups (and root, the daemon) may open it */
    policy_ids_t acl_users, acl_groups;
    model_waiter_t *waiters;  /* opens waiting while loading */
    struct preload_work *loading; /* the running preload, NULL once it ended; on a ready
                                   * model, an upload to more devices (registry_preload()) */
    gpu_export_t *gpu;        /* ngpu device copies (GPU tier), owned; freed with the model, so
                                 never while a lease exists (legacy IPC memory dies with it) */
    size_t ngpu;
    unsigned gpu_leases[GPU_DEVICES_MAX]; /* of leases, those on the copy on each ordinal */
    uint32_t gpu_gen[GPU_DEVICES_MAX]; /* which copy on that ordinal leases count for: bumped
                                        * when one is forced off with leases left */
    uint64_t gpu_removing;    /* bit d: the copy on cuda:d takes no new opens and is freed
                               * with its last lease there (registry_evict_device()) */
    bool allow_gpu_write;     /* opens may map the device copies writable */
    source_cache_t page_cache; /* --page-cache asked for at preload */
};

struct registry {
    uv_loop_t *loop;
    model_t *models;          /* listed models */
    size_t nmodels;
    uint64_t resident_bytes;  /* arena bytes the daemon holds (ready models, incl. evicted ones
                                 still leased until force-evicted) */
    uint64_t reserved_bytes;  /* arena bytes promised to preloads now copying */
    uint64_t budget_bytes;    /* host-tier memory budget; 0 = unlimited */
    uint64_t budget_evictions; /* idle models evicted to make room */
    uint64_t cgroup_limit;    /* memory limit of our cgroup (0 = none); caps the budget */
    /* Told when a model becomes ready and when it leaves the list (eviction; not at shutdown,
     * where registry_free() clears them first). For the fd store. */
    void (*on_ready)(void *data, model_t *m);
    void (*on_gone)(void *data, model_t *m);
    void (*on_devices)(void *data, model_t *m); /* a ready model gained or lost device copies */
    void *hook_data;
    /* allow-client-preload: opens may name a checkpoint under one of these directories
     * (realpath'ed, each ending in '/'), loaded on first use. Off when ndirs is 0. */
    char **client_preload_dirs;
    size_t n_client_preload_dirs;
    uint64_t preloads_ok;
    uint64_t preloads_failed;
    uint64_t cache_released;  /* checkpoint bytes preloads dropped from the page cache */
};

registry_t *registry_new(uv_loop_t *loop);
/* Frees every model; call after all connections are gone and the loop has drained. */
registry_t *registry_free(registry_t *r);

model_t *registry_find(registry_t *r, const char *name);

/*
 * Parses a byte count: digits with an optional K, M, G or T suffix (powers of 1024; "KiB" and
 * "KB" read the same). Zero and overflow are refused. \retval 0 or -EINVAL.
 */
int registry_parse_bytes(const char *s, uint64_t *ret);

/* A budget: a byte count as registry_parse_bytes(), or a percentage of physical RAM ("50%").
 * \retval 0 or -EINVAL. */
int registry_parse_size(const char *s, uint64_t *ret);

/* A preload request as the admin socket passes it on. Strings are copied. */
typedef struct preload_args {
    const char *name;
    const char *path;
    const char *key;   /* NULL or subtree */
    int dtype;         /* convert floating tensors to this wsd_dtype_t, or -1 to keep */
    bool no_verify;
    bool share_file;   /* serve the checkpoint file itself instead of a sealed copy */
    int hugepages;     /* HOST_HUGEPAGES_* (0 = never; the admin and config default is auto) */
    source_cache_t page_cache; /* SOURCE_CACHE_* (0 = keep; the admin and config default is
                                  auto); file mode always keeps */
    const int *devices; /* CUDA ordinals to upload to after the host arena (copied), or NULL */
    size_t ndevices;
    int *adopt_fds;     /* registry_upload_again() only: per device, the VMM fd of a copy kept
                         * from before a restart, to take back instead of uploading, or -1 */
    bool allow_gpu_write; /* let opens map the device copies writable */
    const policy_ids_t *acl_users; /* per-model allowlist (config), or NULL: whoever may */
    const policy_ids_t *acl_groups; /* use the client socket may open it */
} preload_args_t;

/* Called on the loop thread when a preload ends: \p m is the ready model, or NULL with a code
 * and one-line message. */
typedef void (*registry_preload_cb)(void *data, model_t *m, int status, const char *msg);

/*
 * Lists a new model in state loading and queues its load on the thread pool.
 *
 * A ready model of the same name, from the same path with the same --key, --dtype and --share,
 * asked for on devices it is not on yet, is uploaded to those from its own host copy instead
 * (no checkpoint is read; it stays ready and served meanwhile, and cannot be evicted until the
 * upload ends). Anything else under an existing name is WSD_EEXIST.
 * \retval 0 (the callback will run), or WSD_EEXIST / WSD_EINVAL / -ENOMEM with \p msg filled
 *         (the callback will not run).
 */
int registry_preload(registry_t *r, const preload_args_t *a, registry_preload_cb cb, void *data,
                     char *msg, size_t msglen);

/*
 * Evicts a model: refused with WSD_EBUSY while leases exist unless WSD_EVICT_DRAIN (stop new
 * opens, free with the last lease) or WSD_EVICT_FORCE (unlist now; memory goes when the last
 * lease and every client mapping go). WSD_ELOADING while loading or uploading to a device.
 */
int registry_evict(registry_t *r, const char *name, unsigned flags, char *msg, size_t msglen);

/*
 * Drops the copy of ready model \p name on CUDA device \p device; the model stays served on
 * the host tier and its other devices. The lease rules of registry_evict() apply to the
 * leases on that device: WSD_EBUSY while some exist, unless WSD_EVICT_DRAIN (no new opens on
 * it; freed with its last lease there) or WSD_EVICT_FORCE (a VMM copy: the daemon's handle
 * goes now and workers' mappings keep the memory; a legacy IPC copy cannot be freed under an
 * importer, so it drains instead). \p msg gets "evicted", "draining" or "forced" on success.
 * \retval 0, WSD_ENOTFOUND, WSD_ENODEV (not on that device), WSD_ELOADING, WSD_EBUSY.
 */
int registry_evict_device(registry_t *r, const char *name, int device, unsigned flags,
                          char *msg, size_t msglen);

/*
 * File share mode: true if the model's file was modified or truncated in place since preload
 * (size or mtime of the inode we serve). Marks the model stale and logs once.
 */
bool model_check_stale(model_t *m);

/* File share mode: true if the path now names another file (replaced by rename). */
bool model_source_replaced(const model_t *m);

/*
 * Lists a model that already exists as a sealed arena (re-adopted from the service manager's
 * fd store after a restart): \p mf (taken over) describes it, \p arena_fd (taken over on
 * success) holds it. The arena is checked to be a sealed memfd of \p arena_size bytes.
 * \retval 0, WSD_EEXIST, WSD_EBADCKPT (fd not sealed / wrong size) with \p msg filled.
 */
int registry_adopt(registry_t *r, const char *name, const char *source, const char *key,
                   const char *hash, int dtype, manifest_t *mf, int arena_fd, uint64_t arena_size,
                   char *msg, size_t msglen);

/*
 * A re-adopted model's upload to the CUDA devices its fd store record names, as a preload of
 * it for those devices would (registry_preload(): the model stays ready on the host tier
 * meanwhile, and the outcome is logged). Where \p kept_fds[i] is not -1 it is the export fd of
 * the copy an earlier daemon made on devices[i] (kept in the fd store): it is checked and
 * taken back (gpu_adopt()), and only if that fails is the device uploaded to afresh.
 * \p kept_fds (may be NULL) is taken over whatever the outcome: every entry is closed or kept.
 * \retval 0 (queued), or < 0 with \p msg filled.
 */
int registry_upload_again(registry_t *r, const char *name, const int *devices, size_t ndevices,
                          int *kept_fds, bool allow_gpu_write, char *msg, size_t msglen);

/* What the daemon keeps for itself below a cgroup memory limit (code, buffers, page cache). */
#define REGISTRY_CGROUP_RESERVE (32ull << 20)

/* Reads the cgroup memory limit into r->cgroup_limit (call once at start). */
void registry_detect_cgroup_limit(registry_t *r);

/* The budget preloads are held to: --memory-budget, capped by the cgroup limit less
 * REGISTRY_CGROUP_RESERVE; 0 = unlimited. */
uint64_t registry_effective_budget(const registry_t *r);

/* Sets (or, with \p on false, clears) the client-preload policy from a space/comma separated
 * list of directories. Directories that do not resolve are skipped with a warning. */
void registry_set_client_preload(registry_t *r, bool on, const char *dirs);

/*
 * Whether \p path may be preloaded on a client's behalf: resolves it (realpath) and checks it
 * lies under an allowed directory. \retval 0 with the resolved path in \p resolved, or
 * WSD_EDENIED with \p msg filled.
 */
int registry_client_path(const registry_t *r, const char *path, char *resolved, char *msg,
                         size_t msglen);

/* Asks a loading model's preload to stop; it then fails with WSD_ECANCELED. */
int registry_cancel(registry_t *r, const char *name, char *msg, size_t msglen);

/* Asks every running preload to stop (as registry_cancel() each, quietly): they end with
 * WSD_ECANCELED at their next check, within one copy chunk. \retval how many were asked. */
unsigned registry_cancel_all(registry_t *r);

/* While \p m loads (or uploads to more devices): its phase ("parse", "copy", "upload") and
 * bytes done of total. \retval false once the preload has ended. */
bool model_progress(const model_t *m, const char **ret_phase, uint64_t *ret_done,
                    uint64_t *ret_total);

/* The model's copy on CUDA device \p index that takes opens, or NULL (none, or one being
 * removed: see model_gpu_removing()). */
const gpu_export_t *model_gpu(const model_t *m, int index);

/* "the host tier (cpu), cuda:0, cuda:3": where \p m takes opens, for errors naming them. */
void model_served_on(const model_t *m, char *buf, size_t len);

/* Whether the copy on CUDA device \p index is draining away (evicted from that device). */
bool model_gpu_removing(const model_t *m, int index);

/* Whether a running upload of ready model \p m is for CUDA device \p index. */
bool model_uploading_to(const model_t *m, int index);

/* Lease bookkeeping for sessions; \p device is the CUDA ordinal the lease maps, or -1 for
 * the host tier. Get returns the copy's generation, which put is given back: a lease on a
 * copy forced off its device no longer counts for the one there now. */
uint32_t model_lease_get(model_t *m, int device);
void model_lease_put(model_t *m, int device, uint32_t gen);

#endif /* WSD_REGISTRY_H */
