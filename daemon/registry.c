/*
 * registry.c - the model table and the preload pipeline.
 *
 * A preload lists its model at once (state loading, so a second preload of the name fails fast
 * and opens can wait), then runs parse + copy + seal + manifest encoding in one uv_work item.
 * Only after_work, on the loop thread, publishes the result. Models are reference counted so
 * that an evicted model lives on while leases still point at it.
 */
#include "registry.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <malloc.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "checked.h"
#include "convert.h"
#include "fault.h"
#include "log.h"
#include "manifest_pb.h"
#include "wsd_limits.h"

const char *model_state_name(model_state_t s)
{
    switch (s) {
    case MODEL_LOADING:
        return "loading";
    case MODEL_READY:
        return "ready";
    case MODEL_DRAINING:
        return "draining";
    case MODEL_STALE:
        return "stale";
    default:
        return "invalid";
    }
}

registry_t *registry_new(uv_loop_t *loop)
{
    registry_t *r = calloc(1, sizeof(*r));

    if (r)
        r->loop = loop;
    return r;
}

/* Bytes of host memory the model's arena holds: none in file share mode (the page cache). */
static uint64_t model_resident(const model_t *m)
{
    return m->arena.fd >= 0 && !m->share_file ? m->arena.size : 0;
}

static void gpu_exports_free(gpu_export_t *g, size_t n)
{
    for (size_t i = 0; g && i < n; i++)
        gpu_release(&g[i]);
    free(g);
}

static void model_free(model_t *m)
{
    gpu_exports_free(m->gpu, m->ngpu);
    if (m->reg)
        m->reg->resident_bytes -= model_resident(m);
    host_arena_close(&m->arena);
    manifest_free(m->mf);
    free(m->manifest_pb);
    free(m->name);
    free(m->source);
    free(m->key);
    free(m);
}

static model_t *model_unref(model_t *m)
{
    if (m && --m->refs == 0)
        model_free(m);
    return NULL;
}

static void registry_unlist(registry_t *r, model_t *m)
{
    for (model_t **p = &r->models; *p; p = &(*p)->next)
        if (*p == m) {
            *p = m->next;
            m->next = NULL;
            m->listed = false;
            r->nmodels--;
            if (r->on_gone)
                r->on_gone(r->hook_data, m);
            model_unref(m);
            return;
        }
}

static void client_dirs_free(registry_t *r)
{
    for (size_t i = 0; i < r->n_client_preload_dirs; i++)
        free(r->client_preload_dirs[i]);
    free(r->client_preload_dirs);
    r->client_preload_dirs = NULL;
    r->n_client_preload_dirs = 0;
}

void registry_set_client_preload(registry_t *r, bool on, const char *dirs)
{
    char buf[4096], *save = NULL;

    client_dirs_free(r);
    if (!on || !dirs)
        return;
    snprintf(buf, sizeof(buf), "%s", dirs);
    for (char *t = strtok_r(buf, " ,", &save); t; t = strtok_r(NULL, " ,", &save)) {
        char real[PATH_MAX], **p;

        if (!realpath(t, real)) {
            log_warning("client-preload-dirs: '%s': %s, ignoring", t, strerror(errno));
            continue;
        }
        p = realloc(r->client_preload_dirs, (r->n_client_preload_dirs + 1) * sizeof(*p));
        if (!p)
            break;
        r->client_preload_dirs = p;
        /* With a trailing '/', "/data" does not admit "/database". */
        if (asprintf(&p[r->n_client_preload_dirs], "%s%s", real,
                     strcmp(real, "/") == 0 ? "" : "/") < 0)
            break;
        r->n_client_preload_dirs++;
    }
}

int registry_client_path(const registry_t *r, const char *path, char *resolved, char *msg,
                         size_t msglen)
{
    if (r->n_client_preload_dirs == 0) {
        snprintf(msg, msglen, "opening a checkpoint by path is not allowed here "
                              "(allow-client-preload is off)");
        return WSD_EDENIED;
    }
    if (!path || path[0] != '/' || !realpath(path, resolved)) {
        snprintf(msg, msglen, "checkpoint path '%s' must be absolute and exist", path ? path : "");
        return WSD_EDENIED;
    }
    for (size_t i = 0; i < r->n_client_preload_dirs; i++)
        if (strncmp(resolved, r->client_preload_dirs[i], strlen(r->client_preload_dirs[i])) == 0)
            return 0;
    snprintf(msg, msglen, "'%s' is outside the client-preload directories", resolved);
    return WSD_EDENIED;
}

registry_t *registry_free(registry_t *r)
{
    if (!r)
        return NULL;
    client_dirs_free(r);
    /* Shutting down is not evicting: what the fd store holds must stay there for the next
     * start to re-adopt. */
    r->on_gone = NULL;
    while (r->models)
        registry_unlist(r, r->models);
    free(r);
    return NULL;
}

/* The leading decimal count of a size (no minus sign). \retval 0 or -EINVAL. */
static int parse_count(const char *s, unsigned long long *ret_v, char **ret_end)
{
    if (!s || !*s || *s == '-')
        return -EINVAL;
    errno = 0;
    *ret_v = strtoull(s, ret_end, 10);
    return errno || *ret_end == s ? -EINVAL : 0;
}

int registry_parse_size(const char *s, uint64_t *ret)
{
    char *end;
    unsigned long long v;

    if (parse_count(s, &v, &end) < 0)
        return -EINVAL;
    if (*end == '%' && end[1] == '\0') {
        long pages = sysconf(_SC_PHYS_PAGES), psize = sysconf(_SC_PAGESIZE);

        if (v == 0 || v > 100 || pages <= 0 || psize <= 0)
            return -EINVAL;
        *ret = (uint64_t)pages * (uint64_t)psize / 100 * v;
        return 0;
    }
    return registry_parse_bytes(s, ret);
}

int registry_parse_bytes(const char *s, uint64_t *ret)
{
    char *end;
    unsigned long long v;
    uint64_t mult = 1;

    if (parse_count(s, &v, &end) < 0)
        return -EINVAL;
    switch (*end) {
    case '\0':
        break;
    case 'K': case 'k':
        mult = 1ull << 10;
        break;
    case 'M': case 'm':
        mult = 1ull << 20;
        break;
    case 'G': case 'g':
        mult = 1ull << 30;
        break;
    case 'T': case 't':
        mult = 1ull << 40;
        break;
    default:
        return -EINVAL;
    }
    if (*end && end[1] != '\0' && !(end[1] == 'i' && end[2] == 'B' && end[3] == '\0') &&
        !(end[1] == 'B' && end[2] == '\0'))
        return -EINVAL;
    if (!ck_mul_u64(v, mult, ret) || *ret == 0)
        return -EINVAL;
    return 0;
}

model_t *registry_find(registry_t *r, const char *name)
{
    for (model_t *m = r->models; m; m = m->next)
        if (strcmp(m->name, name) == 0)
            return m;
    return NULL;
}

uint32_t model_lease_get(model_t *m, int device)
{
    m->last_used_ms = uv_now(m->reg->loop);
    m->refs++;
    m->leases++;
    m->opens++;
    if (device < 0 || device >= GPU_DEVICES_MAX)
        return 0;
    m->gpu_leases[device]++;
    return m->gpu_gen[device];
}

/* Frees the copy at m->gpu[i] and closes the gap (opens look copies up by device and keep no
 * pointer into the array past the call). */
static void gpu_remove_at(model_t *m, size_t i)
{
    int d = m->gpu[i].device;

    gpu_release(&m->gpu[i]);
    memmove(&m->gpu[i], &m->gpu[i + 1], (m->ngpu - i - 1) * sizeof(*m->gpu));
    m->ngpu--;
    if (d >= 0 && d < GPU_DEVICES_MAX)
        m->gpu_removing &= ~(UINT64_C(1) << d);
}

static ssize_t gpu_index(const model_t *m, int device)
{
    for (size_t i = 0; i < m->ngpu; i++)
        if (m->gpu[i].device == device)
            return (ssize_t)i;
    return -1;
}

void model_lease_put(model_t *m, int device, uint32_t gen)
{
    m->last_used_ms = uv_now(m->reg->loop);
    m->leases--;
    if (device >= 0 && device < GPU_DEVICES_MAX && gen == m->gpu_gen[device] &&
        m->gpu_leases[device] && --m->gpu_leases[device] == 0 &&
        model_gpu_removing(m, device)) {
        ssize_t i = gpu_index(m, device);

        log_info("model '%s' drained from cuda:%d, freeing its copy there", m->name, device);
        if (i >= 0)
            gpu_remove_at(m, (size_t)i);
    }
    if (m->leases == 0 && m->state == MODEL_DRAINING && m->listed) {
        log_info("model '%s' drained, freeing %llu bytes", m->name,
                 (unsigned long long)m->arena.size);
        registry_unlist(m->reg, m);
    }
    model_unref(m);
}

/* Tensor count from which a finished preload returns the freed heap to the system. */
#define TRIM_TENSORS 65536u

/* A preload's phases as Progress frames name them. */
enum { PHASE_PARSE, PHASE_COPY, PHASE_UPLOAD };

typedef struct preload_work {
    uv_work_t req;
    model_t *model;          /* reference held until after_work */
    char *key;               /* subtree, or NULL */
    int dtype;               /* conversion target or -1 */
    bool no_verify;
    bool share_file;         /* serve the file itself */
    int hugepages;           /* HOST_HUGEPAGES_* */
    source_cache_t page_cache; /* policy for the sources (KEEP in file mode) */
    registry_preload_cb cb;
    void *data;
    uint64_t t0;             /* uv_hrtime() at queueing */
    /* Results, written by the pool threads. */
    source_t *sources;       /* open checkpoint files, between the two phases */
    size_t nsources;
    uint64_t need;           /* arena bytes (page-rounded), known after parsing */
    bool reserved;           /* need is counted in registry.reserved_bytes */
    host_progress_t progress; /* bytes copied, and the cancel request, shared with the pool */
    _Atomic int phase;       /* PHASE_*: what progress.done counts now */
    int status;
    fmt_err_t err;
    manifest_t *mf;
    host_arena_t arena;
    uint8_t *pb;
    size_t pb_len;
    int *devices;            /* CUDA ordinals to upload to, owned */
    size_t ndevices;
    gpu_export_t *gpu;       /* ndevices uploads, filled by the copy phase */
    int *kept_fds;           /* upload_only, or NULL: per device, a kept copy's fd to take back
                              * (gpu_adopt()), -1 for none, KEPT_TAKEN once taken (owned) */
    bool upload_only;        /* a ready model to more devices: arena is a dup of its fd */
    bool allow_gpu_write;    /* upload_only: the request's --allow-gpu-write */
    uint64_t bytes;          /* sum over storages, and ntensors: taken by the copy phase */
    size_t ntensors;         /* before it drops the parsed tables */
} preload_work_t;

#define KEPT_TAKEN (-2)

/* The kept copies' fds that were not taken back, closed (their memory goes with the last
 * mapping of it, if any), and the array. */
static void close_kept(preload_work_t *w)
{
    for (size_t i = 0; w->kept_fds && i < w->ndevices; i++)
        if (w->kept_fds[i] >= 0)
            (void)close(w->kept_fds[i]);
    free(w->kept_fds);
    w->kept_fds = NULL;
}

static void close_sources(preload_work_t *w)
{
    for (size_t i = 0; i < w->nsources; i++)
        source_close(&w->sources[i]);
    free(w->sources);
    w->sources = NULL;
    w->nsources = 0;
}

/*
 * A manifest too large for any reply is refused here, before the budget is reserved and a byte
 * is copied, not by manifest_pb_encode() after the copy. map_size is taken at its widest (the
 * arena may grow to whole huge pages), so the bound is exact to within eleven bytes.
 */
static int check_manifest_size(preload_work_t *w)
{
    size_t len = 0, room = MANIFEST_PB_MAX;
    int r = manifest_pb_size(w->mf, UINT64_MAX, sizeof(w->arena.hash) - 1, &len);

    /* An open on a device carries the GPU export beside the manifest. */
    if (w->ndevices) {
        size_t gpu = manifest_pb_gpu_field_max(w->mf->nstorages);

        room = gpu < room ? room - gpu : 0;
    }
    if (r == -ENOMEM)
        return fmt_fail(&w->err, WSD_ENOMEM, NULL, "out of memory sizing the manifest of %zu "
                        "tensors", w->mf->ntensors);
    if (r < 0 || len > room)
        return fmt_fail(&w->err, WSD_ELIMIT, "E_LIMIT",
                        "the manifest of %zu tensors and %zu metadata entries packs to %zu bytes; "
                        "a reply carries at most %zu%s (names are most of it)",
                        w->mf->ntensors, w->mf->nmeta, len, room,
                        w->ndevices ? " beside the GPU export of its storage offsets" : "");
    return 0;
}

/* Phase 1, on the thread pool: parse, retype, lay out. Touches only the work item (and the
 * model's path, immutable). */
static void preload_parse_cb(uv_work_t *req)
{
    preload_work_t *w = req->data;
    fmt_opts_t opts = {.key = w->key, .no_verify = w->no_verify, .page_cache = w->page_cache};
    uint64_t size = 0;
    int r;

    w->arena.fd = -1;
    /* A device that cannot take the model fails the preload before any file is read. */
    r = 0;
    for (size_t i = 0; r == 0 && i < w->ndevices; i++)
        r = gpu_check_device(w->devices[i], &w->err);
    if (r < 0) {
        w->status = r;
        return;
    }
    r = fmt_load(w->model->source, &opts, &w->mf, &w->sources, &w->nsources, &w->err);
    if (r == 0 && w->share_file && w->nsources != 1)
        r = fmt_fail(&w->err, WSD_EINVAL, "E_SHARE",
                     "--share file serves one file; '%s' names %zu shards (use memfd)",
                     w->model->source, w->nsources);
    if (r == 0 && w->dtype >= 0)
        r = convert_manifest(w->mf, w->dtype, &w->err);
    if (r == 0)
        r = w->share_file ? host_share_layout(w->mf, &w->sources[0], &w->err)
                          : host_layout(w->mf, &size, &w->err);
    if (r == 0)
        r = check_manifest_size(w);
    if (r == 0 && !ck_align_u64(size, 4096, &w->need))
        r = fmt_fail(&w->err, WSD_ENOMEM, "E_BUDGET", "model size overflows");
    if (w->share_file)
        w->need = 0; /* the page cache holds it, not the budget */
    if (r < 0 && !w->err.code)
        (void)fmt_fail(&w->err, r, NULL, "%s", wsd_strerror(r));
    w->status = r;
}

/* Phase 2b, on the thread pool: one upload per requested device from the finished arena (so
 * --dtype is applied already), each with its GpuExport packed once for every later open. */
static int preload_gpu(preload_work_t *w)
{
    uint64_t bytes = 0, total;
    int r = 0;

    w->gpu = calloc(w->ndevices, sizeof(*w->gpu));
    if (!w->gpu)
        return fmt_fail(&w->err, -ENOMEM, NULL, "out of memory");
    for (size_t i = 0; i < w->mf->nstorages; i++)
        bytes += w->mf->storages[i].nbytes; /* fits: the arena holds them all */
    if (!ck_mul_u64(bytes, w->ndevices, &total))
        total = UINT64_MAX;
    /* The upload phase counts device bytes from zero; readers may see the switch torn, which
     * costs one odd Progress frame at most. */
    atomic_store(&w->progress.total, total);
    atomic_store(&w->progress.done, 0);
    atomic_store(&w->phase, PHASE_UPLOAD);
    for (size_t i = 0; r == 0 && i < w->ndevices; i++) {
        bool taken = false;

        if (w->kept_fds && w->kept_fds[i] >= 0) {
            fmt_err_t kerr = {0};

            taken = gpu_adopt(w->mf, w->kept_fds[i], w->devices[i], &w->gpu[i], &kerr) == 0;
            if (!taken) {
                log_warning("'%s': the copy on cuda:%d kept from before the restart cannot be "
                            "taken back (%s); uploading it again", w->model->name,
                            w->devices[i], kerr.msg);
                (void)close(w->kept_fds[i]);
            }
            w->kept_fds[i] = taken ? KEPT_TAKEN : -1;
        }
        if (!taken)
            r = gpu_upload(w->mf, w->arena.fd, w->arena.size, w->devices[i], &w->progress,
                           &w->gpu[i], &w->err);
        if (r == 0)
            r = manifest_pb_gpu_export(&w->gpu[i], &w->gpu[i].pb, &w->gpu[i].pb_len);
        if (r < 0 && !w->err.code)
            (void)fmt_fail(&w->err, r, NULL, "cuda:%d: %s", w->devices[i], wsd_strerror(r));
    }
    if (r < 0) {
        gpu_exports_free(w->gpu, w->ndevices);
        w->gpu = NULL;
    }
    return r;
}

/* Phase 2, on the thread pool: copy into the sealed arena and encode the manifest. */
static void preload_copy_cb(uv_work_t *req)
{
    preload_work_t *w = req->data;
    int r;

    if (w->share_file)
        r = host_share_file(w->mf, &w->sources[0], !w->no_verify, &w->progress, &w->arena,
                            &w->err);
    else
        r = host_build(w->model->name, w->mf, w->sources, w->nsources, !w->no_verify,
                       w->hugepages, &w->progress, &w->arena, &w->err);
    if (r == 0 && w->share_file)
        w->model->file_st = w->sources[0].st; /* the model is not visible to the loop yet */
    if (r == 0) {
        r = manifest_pb_encode(w->mf, w->arena.size, w->arena.hash, &w->pb, &w->pb_len);
        if (r == -ENOMEM)
            r = fmt_fail(&w->err, WSD_ENOMEM, NULL, "out of memory encoding the manifest of %zu "
                         "tensors", w->mf->ntensors);
        else if (r < 0)
            r = fmt_fail(&w->err, r, "E_LIMIT", "manifest of %zu tensors too large to send",
                         w->mf->ntensors);
    }
    if (r == 0 && w->ndevices)
        r = preload_gpu(w);
    if (r == 0) {
        /* From here the packed manifest is the model's tensor table (opens send it, info
         * reads it); the parsed one would hold some 300 bytes per tensor more. Freed here,
         * on the pool: for 2^20 tensors that took 58 ms of the event loop. */
        w->bytes = 0;
        for (size_t i = 0; i < w->mf->nstorages; i++)
            w->bytes += w->mf->storages[i].nbytes; /* fits: the arena holds them all */
        w->ntensors = w->mf->ntensors;
        manifest_drop_tables(w->mf);
    }
    close_sources(w);
    if (r < 0 && !w->err.code)
        (void)fmt_fail(&w->err, r, NULL, "%s", wsd_strerror(r));
    w->status = r;
}

static void notify_waiters(model_t *m, int status, const char *msg)
{
    model_waiter_t *w = m->waiters;

    m->waiters = NULL;
    while (w) {
        model_waiter_t *next = w->next;

        w->next = NULL;
        w->cb(w, status == 0 ? m : NULL, status, msg);
        w = next;
    }
}

static void trim_work_cb(uv_work_t *req)
{
    (void)req;
    (void)malloc_trim(0);
}

static void trim_done_cb(uv_work_t *req, int status)
{
    (void)status;
    free(req);
}

/* malloc_trim() on the pool (26 ms of the loop after 2^20 tensors). It touches nothing of
 * ours, so it may still run while the daemon shuts down; without memory it is skipped. */
static void trim_heap_later(uv_loop_t *loop)
{
    uv_work_t *req = malloc(sizeof(*req));

    if (req && uv_queue_work(loop, req, trim_work_cb, trim_done_cb) < 0)
        free(req);
}

static void preload_copied_cb(uv_work_t *req, int uvstatus)
{
    preload_work_t *w = req->data;
    model_t *m = w->model;
    registry_t *r = m->reg;
    uint64_t ms = (uv_hrtime() - w->t0) / 1000000;

    if (uvstatus < 0 && w->status == 0)
        w->status = fmt_fail(&w->err, WSD_EINTERNAL, NULL, "preload cancelled");
    if (w->reserved)
        r->reserved_bytes -= w->need;
    w->reserved = false;
    m->loading = NULL;
    close_sources(w);
    if (w->status == 0) {
        m->mf = w->mf;
        m->arena = w->arena;
        m->manifest_pb = w->pb;
        m->manifest_pb_len = w->pb_len;
        m->gpu = w->gpu;
        m->ngpu = w->gpu ? w->ndevices : 0;
        w->gpu = NULL;
        m->bytes = w->bytes;
        m->ntensors = w->ntensors;
        m->load_ms = ms;
        m->last_used_ms = uv_now(r->loop);
        snprintf(m->hash, sizeof(m->hash), "%s", w->arena.hash);
        m->state = MODEL_READY;
        r->resident_bytes += model_resident(m);
        r->cache_released += w->arena.cache_released;
        r->preloads_ok++;
        log_info("preloaded '%s' from '%s': %zu tensors, %llu bytes, %s%s%s, %llu ms, hash %s",
                 m->name, m->source, m->ntensors, (unsigned long long)m->bytes,
                 m->mf->format, m->dtype >= 0 ? " as " : "",
                 m->dtype >= 0 ? wsd_dtype_name(m->dtype) : "", (unsigned long long)ms, m->hash);
        for (size_t i = 0; i < m->mf->nwarnings; i++)
            log_warning("model '%s': %s", m->name, m->mf->warnings[i]);
        for (size_t i = 0; i < m->ngpu; i++)
            log_info("model '%s' on cuda:%d: %llu bytes, %s, uploaded in %llu ms (copy %llu ms)",
                     m->name, m->gpu[i].device, (unsigned long long)m->gpu[i].size,
                     gpu_handle_kind_name(m->gpu[i].kind),
                     (unsigned long long)(m->gpu[i].upload_ns / 1000000),
                     (unsigned long long)(m->gpu[i].fill_ns / 1000000));
        notify_waiters(m, 0, NULL);
        if (r->on_ready)
            r->on_ready(r->hook_data, m);
        w->cb(w->data, m, 0, NULL);
        /* A large model's parse left hundreds of MB free in the pool threads' heaps: give
         * them back (2^20 tensors: 147 MB resident after the preload without this, 48 MB
         * with it), after the answer so it does not wait for this. */
        if (m->ntensors >= TRIM_TENSORS)
            trim_heap_later(r->loop);
    } else {
        r->preloads_failed++;
        log_error("preload of '%s' from '%s' failed: %s", m->name, m->source, w->err.msg);
        manifest_free(w->mf);
        host_arena_close(&w->arena);
        free(w->pb);
        if (m->listed)
            registry_unlist(r, m);
        notify_waiters(m, w->status, w->err.msg);
        w->cb(w->data, NULL, w->status, w->err.msg);
    }
    model_unref(m);
    gpu_exports_free(w->gpu, w->ndevices);
    free(w->devices);
    free(w->key);
    free(w);
}

/* Evicts idle models, least recently used first, until \p need more bytes fit the budget. Does
 * nothing (and fails) if even evicting every idle model would not be enough. */
uint64_t registry_effective_budget(const registry_t *r)
{
    uint64_t cg = r->cgroup_limit > REGISTRY_CGROUP_RESERVE ? r->cgroup_limit -
                                                                   REGISTRY_CGROUP_RESERVE
                                                             : (r->cgroup_limit ? 1 : 0);

    if (!r->budget_bytes)
        return cg;
    return cg && cg < r->budget_bytes ? cg : r->budget_bytes;
}

/* The memory limit of the cgroup we run in (v2 memory.max, v1 memory.limit_in_bytes), 0 if
 * none: memfd pages are charged to it, so exceeding it means the OOM killer, not an error. */
static uint64_t cgroup_memory_limit(void)
{
    char line[512], path[1024];
    uint64_t limit = 0;
    FILE *f = fopen("/proc/self/cgroup", "re");

    if (!f)
        return 0;
    while (fgets(line, sizeof(line), f)) {
        const char *rel = NULL, *file = NULL;
        FILE *lf;
        unsigned long long v;

        line[strcspn(line, "\n")] = '\0';
        if (strncmp(line, "0::", 3) == 0) {
            rel = line + 3;
            file = "memory.max";
            snprintf(path, sizeof(path), "/sys/fs/cgroup%s/%s", rel, file);
        } else if (strstr(line, ":memory:")) {
            rel = strstr(line, ":memory:") + strlen(":memory:");
            file = "memory.limit_in_bytes";
            snprintf(path, sizeof(path), "/sys/fs/cgroup/memory%s/%s", rel, file);
        } else
            continue;
        lf = fopen(path, "re");
        if (!lf)
            continue;
        /* "max" (v2) or a huge page-rounded number (v1) both mean unlimited. */
        if (fscanf(lf, "%llu", &v) == 1 && v < (1ull << 60) && (!limit || v < limit))
            limit = v;
        fclose(lf);
    }
    fclose(f);
    return limit;
}

void registry_detect_cgroup_limit(registry_t *r)
{
    r->cgroup_limit = cgroup_memory_limit();
    if (r->cgroup_limit)
        log_info("cgroup memory limit %llu bytes: models may use at most %llu of it",
                 (unsigned long long)r->cgroup_limit,
                 (unsigned long long)registry_effective_budget(r));
}

static int make_room(registry_t *r, model_t *self, uint64_t need, fmt_err_t *err)
{
    uint64_t used = r->resident_bytes + r->reserved_bytes, idle = 0;
    uint64_t budget = registry_effective_budget(r);

    if (!budget || (need <= budget && used <= budget - need))
        return 0;
    for (model_t *m = r->models; m; m = m->next)
        if (m != self && m->state == MODEL_READY && m->leases == 0 && !m->loading)
            idle += model_resident(m);
    if (need > budget || used - idle > budget - need)
        return fmt_fail(err, WSD_ENOMEM, "E_BUDGET",
                        "needs %llu bytes; the memory budget is %llu with %llu in use by leased "
                        "or loading models (%llu more held by idle models)",
                        (unsigned long long)need, (unsigned long long)budget,
                        (unsigned long long)(used - idle), (unsigned long long)idle);
    while (used > budget - need) {
        model_t *lru = NULL;
        char msg[128];

        for (model_t *m = r->models; m; m = m->next)
            if (m != self && m->state == MODEL_READY && m->leases == 0 && !m->loading &&
                (!lru || m->last_used_ms < lru->last_used_ms))
                lru = m;
        if (!lru)
            break; /* cannot happen: idle covered the gap */
        log_info("memory budget: evicting idle model '%s' (%llu bytes) to make room", lru->name,
                 (unsigned long long)lru->arena.size);
        r->budget_evictions++;
        (void)registry_evict(r, lru->name, 0, msg, sizeof(msg));
        used = r->resident_bytes + r->reserved_bytes;
    }
    return 0;
}

/* Between the phases, on the loop: the model's size is known, so the budget decides before a
 * byte is allocated. */
static void preload_parsed_cb(uv_work_t *req, int uvstatus)
{
    preload_work_t *w = req->data;
    registry_t *r = w->model->reg;
    int k;

    if (uvstatus < 0 && w->status == 0)
        w->status = fmt_fail(&w->err, WSD_EINTERNAL, NULL, "preload cancelled");
    if (w->status == 0 && atomic_load(&w->progress.cancel))
        w->status = fmt_fail(&w->err, WSD_ECANCELED, "E_CANCELED", "preload cancelled");
    if (w->status == 0)
        w->status = make_room(r, w->model, w->need, &w->err);
    if (w->status == 0) {
        r->reserved_bytes += w->need;
        w->reserved = true;
        atomic_store(&w->phase, PHASE_COPY);
        k = uv_queue_work(r->loop, &w->req, preload_copy_cb, preload_copied_cb);
        if (k == 0)
            return;
        w->status = fmt_fail(&w->err, WSD_EINTERNAL, NULL, "cannot queue the copy: %s",
                             uv_strerror(k));
    }
    preload_copied_cb(req, 0);
}

/*
 * On the thread pool: a ready model's upload to more devices. Its storages come back from its
 * packed manifest (the parsed tables were dropped at preload); the model's fields read here
 * are immutable while it is referenced, and the arena is the work's own duplicate of its fd.
 */
static void upload_work_cb(uv_work_t *req)
{
    preload_work_t *w = req->data;
    const model_t *m = w->model;
    bool stall = FAULT("gpu.upload.stall");
    int r = 0;

    /* Fault builds: hold the upload open a while, so a test sees it running on any machine. */
    for (unsigned t = 0; stall && t < 200; t++) {
        if (atomic_load(&w->progress.cancel)) {
            r = fmt_fail(&w->err, WSD_ECANCELED, "E_CANCELED", "upload cancelled");
            break;
        }
        (void)usleep(10000);
    }
    for (size_t i = 0; r == 0 && i < w->ndevices; i++)
        r = gpu_check_device(w->devices[i], &w->err);
    if (r == 0) {
        r = manifest_pb_storages(m->manifest_pb, m->manifest_pb_len, &w->mf);
        if (r < 0)
            r = fmt_fail(&w->err, r == -ENOMEM ? WSD_ENOMEM : WSD_EINTERNAL, NULL,
                         "cannot read back the storages of '%s': %s", m->name, wsd_strerror(r));
    }
    if (r == 0 && m->manifest_pb_len + manifest_pb_gpu_field_max(w->mf->nstorages) >
                      (size_t)MANIFEST_PB_MAX)
        r = fmt_fail(&w->err, WSD_ELIMIT, "E_LIMIT",
                     "the manifest of '%s' packs to %zu bytes, too large to send beside the GPU "
                     "export of its %zu storage offsets (a reply carries at most %zu)",
                     m->name, m->manifest_pb_len, w->mf->nstorages, (size_t)MANIFEST_PB_MAX);
    if (r == 0)
        r = preload_gpu(w);
    if (r < 0 && !w->err.code)
        (void)fmt_fail(&w->err, r, NULL, "%s", wsd_strerror(r));
    w->status = r;
}

static void upload_done_cb(uv_work_t *req, int uvstatus)
{
    preload_work_t *w = req->data;
    model_t *m = w->model;
    registry_t *r = m->reg;
    gpu_export_t *grown = NULL;

    m->loading = NULL;
    if (uvstatus < 0 && w->status == 0)
        w->status = fmt_fail(&w->err, WSD_EINTERNAL, NULL, "upload cancelled");
    if (w->status == 0 && !m->listed) /* evict refuses; shutdown drains the pool first */
        w->status = fmt_fail(&w->err, WSD_ENOTFOUND, NULL, "model '%s' went away during the "
                             "upload", m->name);
    if (w->status == 0) {
        grown = realloc(m->gpu, (m->ngpu + w->ndevices) * sizeof(*m->gpu));
        if (!grown)
            w->status = fmt_fail(&w->err, WSD_ENOMEM, NULL, "out of memory");
    }
    if (w->status == 0) {
        /* Opens look copies up by device and keep no pointer into the array past the call. */
        m->gpu = grown;
        memcpy(m->gpu + m->ngpu, w->gpu, w->ndevices * sizeof(*m->gpu));
        if (m->ngpu == 0)
            m->allow_gpu_write = w->allow_gpu_write;
        m->ngpu += w->ndevices;
        free(w->gpu);
        w->gpu = NULL;
        m->last_used_ms = uv_now(r->loop);
        r->preloads_ok++;
        if (r->on_devices)
            r->on_devices(r->hook_data, m);
        for (size_t i = m->ngpu - w->ndevices, k = 0; i < m->ngpu; i++, k++)
            if (w->kept_fds && w->kept_fds[k] == KEPT_TAKEN)
                log_info("model '%s' on cuda:%d again: took back its copy kept from before the "
                         "restart (%llu bytes, checked in %llu ms, nothing uploaded)", m->name,
                         m->gpu[i].device, (unsigned long long)m->gpu[i].size,
                         (unsigned long long)(m->gpu[i].upload_ns / 1000000));
            else
                log_info("model '%s' on cuda:%d (from its host copy): %llu bytes, %s, uploaded "
                         "in %llu ms (copy %llu ms)", m->name, m->gpu[i].device,
                         (unsigned long long)m->gpu[i].size,
                         gpu_handle_kind_name(m->gpu[i].kind),
                         (unsigned long long)(m->gpu[i].upload_ns / 1000000),
                         (unsigned long long)(m->gpu[i].fill_ns / 1000000));
        notify_waiters(m, 0, NULL); /* opens waiting for a new device (WSD_OPEN_WAIT) */
        w->cb(w->data, m, 0, NULL);
    } else {
        r->preloads_failed++;
        log_error("upload of '%s' to more devices failed: %s; it is still served as before",
                  m->name, w->err.msg);
        notify_waiters(m, w->status, w->err.msg);
        w->cb(w->data, NULL, w->status, w->err.msg);
    }
    gpu_exports_free(w->gpu, w->ndevices);
    manifest_free(w->mf);
    host_arena_close(&w->arena);
    close_kept(w);
    free(w->devices);
    free(w);
    model_unref(m);
}

/*
 * A preload that names an existing model: the same checkpoint and options on devices the
 * model is not on yet become an upload from its host copy; anything else is WSD_EEXIST.
 */
static int upload_more(model_t *m, const preload_args_t *a, registry_preload_cb cb, void *data,
                       char *msg, size_t msglen)
{
    registry_t *r = m->reg;
    preload_work_t *w;
    size_t n = 0, kept = 0;
    int k;

    /* --share file: a file changed in place is not uploaded (opens refuse it too). */
    if (a->ndevices && m->state == MODEL_READY)
        (void)model_check_stale(m);
    if (a->ndevices == 0 || m->state != MODEL_READY) {
        snprintf(msg, msglen, "a model named '%s' exists already%s%s%s", m->name,
                 m->state == MODEL_READY ? "" : " (", m->state == MODEL_READY ? "" :
                 model_state_name(m->state), m->state == MODEL_READY ? "" : ")");
        return WSD_EEXIST;
    }
    if (m->loading) {
        snprintf(msg, msglen, "model '%s' is being uploaded to a device already; wait for it",
                 m->name);
        return WSD_EEXIST;
    }
    if (strcmp(m->source, a->path) != 0 || m->dtype != a->dtype ||
        m->share_file != a->share_file || (m->key ? !a->key || strcmp(m->key, a->key) != 0
                                                  : a->key != NULL)) {
        snprintf(msg, msglen,
                 "a model named '%s' exists already, from '%s'%s%s%s%s%s: a preload adds devices "
                 "only to the same checkpoint with the same --key, --dtype and --share (evict it "
                 "to change them)", m->name, m->source, m->key ? " --key " : "",
                 m->key ? m->key : "", m->dtype >= 0 ? " --dtype " : "",
                 m->dtype >= 0 ? wsd_dtype_name(m->dtype) : "",
                 m->share_file ? " --share file" : "");
        return WSD_EEXIST;
    }
    if (m->ngpu && a->allow_gpu_write != m->allow_gpu_write) {
        snprintf(msg, msglen, "model '%s' is on the GPU %s --allow-gpu-write, which holds for "
                              "every device copy", m->name,
                 m->allow_gpu_write ? "with" : "without");
        return WSD_EINVAL;
    }
    w = calloc(1, sizeof(*w));
    if (!w || !(w->devices = calloc(a->ndevices, sizeof(*w->devices)))) {
        free(w);
        snprintf(msg, msglen, "out of memory");
        return -ENOMEM;
    }
    for (size_t i = 0; i < a->ndevices; i++) {
        int d = a->devices[i];

        if (model_gpu_removing(m, d)) {
            snprintf(msg, msglen, "model '%s' is being removed from cuda:%d (%u lease%s there); "
                     "preload it there again once they end", m->name, d, m->gpu_leases[d],
                     m->gpu_leases[d] == 1 ? "" : "s");
            free(w->devices);
            free(w);
            return WSD_EBUSY;
        }
        if (!model_gpu(m, d))
            w->devices[n++] = d;
    }
    if (n && a->adopt_fds && !(w->kept_fds = malloc(n * sizeof(*w->kept_fds)))) {
        free(w->devices);
        free(w);
        snprintf(msg, msglen, "out of memory");
        return -ENOMEM;
    }
    for (size_t i = 0, j = 0; w->kept_fds && i < a->ndevices; i++)
        if (j < n && w->devices[j] == a->devices[i])
            w->kept_fds[j++] = a->adopt_fds[i];
    if (n == 0) {
        snprintf(msg, msglen, "model '%s' exists already on %s", m->name,
                 a->ndevices == 1 ? "that device" : "those devices");
        free(w->devices);
        free(w);
        return WSD_EEXIST;
    }
    w->ndevices = n;
    w->upload_only = true;
    w->allow_gpu_write = a->allow_gpu_write;
    w->dtype = -1;
    w->arena.fd = fcntl(m->arena.fd, F_DUPFD_CLOEXEC, 3); /* evict cannot close it under us */
    w->arena.size = m->arena.size;
    if (w->arena.fd < 0) {
        k = -errno;
        snprintf(msg, msglen, "cannot duplicate the model's fd: %s", strerror(-k));
        free(w->kept_fds); /* still the caller's */
        free(w->devices);
        free(w);
        return k;
    }
    w->model = m;
    w->cb = cb;
    w->data = data;
    w->t0 = uv_hrtime();
    w->req.data = w;
    atomic_init(&w->phase, PHASE_UPLOAD);
    k = uv_queue_work(r->loop, &w->req, upload_work_cb, upload_done_cb);
    if (k < 0) {
        snprintf(msg, msglen, "cannot queue the upload: %s", uv_strerror(k));
        host_arena_close(&w->arena);
        free(w->kept_fds); /* still the caller's */
        free(w->devices);
        free(w);
        return WSD_EINTERNAL;
    }
    /* The work owns the kept fds it took; the caller closes any other (a device the model is
     * on already). */
    for (size_t i = 0, j = 0; w->kept_fds && i < a->ndevices; i++)
        if (j < n && w->devices[j] == a->devices[i]) {
            kept += a->adopt_fds[i] >= 0;
            a->adopt_fds[i] = -1;
            j++;
        }
    m->refs++;
    m->loading = w;
    log_info("uploading '%s' to %zu more device%s from its host copy%s", m->name, n,
             n == 1 ? "" : "s", kept ? ", unless the copy kept there from before the restart "
                                       "can be taken back" : "");
    return 0;
}

/* Nobody waits on an upload after a restart: upload_done_cb has logged its outcome. */
static void upload_again_cb(void *data, model_t *m, int status, const char *msg)
{
    (void)data;
    (void)m;
    (void)status;
    (void)msg;
}

int registry_upload_again(registry_t *r, const char *name, const int *devices, size_t ndevices,
                          int *kept_fds, bool allow_gpu_write, char *msg, size_t msglen)
{
    model_t *m = registry_find(r, name);
    preload_args_t a = {.name = name, .devices = devices, .ndevices = ndevices,
                        .adopt_fds = kept_fds, .allow_gpu_write = allow_gpu_write};
    int k;

    if (!m) {
        snprintf(msg, msglen, "no model named '%s'", name);
        k = WSD_ENOTFOUND;
    } else {
        a.path = m->source;
        a.key = m->key;
        a.dtype = m->dtype;
        a.share_file = m->share_file;
        k = upload_more(m, &a, upload_again_cb, NULL, msg, msglen);
    }
    for (size_t i = 0; kept_fds && i < ndevices; i++)
        if (kept_fds[i] >= 0) /* not taken by the upload */
            (void)close(kept_fds[i]);
    return k;
}

static bool name_ok(const char *s)
{
    size_t n = strlen(s);

    if (n == 0 || n > WSD_MODEL_NAME_MAX)
        return false;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') ||
              strchr("._:@/+-", *s)))
            return false;
    return true;
}

int registry_preload(registry_t *r, const preload_args_t *a, registry_preload_cb cb, void *data,
                     char *msg, size_t msglen)
{
    preload_work_t *w;
    model_t *m;
    int k;

    if (!a->name || !name_ok(a->name)) {
        snprintf(msg, msglen, "model name '%s' is invalid: 1 to %u characters of [A-Za-z0-9._:@/+-]",
                 a->name ? a->name : "", WSD_MODEL_NAME_MAX);
        return WSD_EINVAL;
    }
    if (!a->path || a->path[0] != '/' || strlen(a->path) >= WSD_PATH_MAX) {
        snprintf(msg, msglen, "checkpoint path '%s' must be absolute (the daemon's working "
                              "directory is not yours)", a->path ? a->path : "");
        return WSD_EINVAL;
    }
    if (a->share_file && a->dtype >= 0) {
        snprintf(msg, msglen, "--share file serves the file's own bytes: it cannot be combined "
                              "with --dtype");
        return WSD_EINVAL;
    }
    m = registry_find(r, a->name);
    if (m)
        return upload_more(m, a, cb, data, msg, msglen);
    m = calloc(1, sizeof(*m));
    w = calloc(1, sizeof(*w));
    if (!m || !w)
        goto nomem;
    m->arena.fd = -1;
    m->reg = r;
    m->name = strdup(a->name);
    m->source = strdup(a->path);
    if (!m->name || !m->source)
        goto nomem;
    if (a->key) {
        w->key = strdup(a->key);
        m->key = strdup(a->key);
        if (!w->key || !m->key)
            goto nomem;
    }
    if (a->ndevices) {
        w->devices = calloc(a->ndevices, sizeof(*w->devices));
        if (!w->devices)
            goto nomem;
        memcpy(w->devices, a->devices, a->ndevices * sizeof(*w->devices));
        w->ndevices = a->ndevices;
    }
    m->allow_gpu_write = a->allow_gpu_write;
    w->no_verify = a->no_verify;
    w->share_file = a->share_file;
    w->hugepages = a->hugepages;
    /* In file mode the page cache is what workers map: never drop it. */
    w->page_cache = a->share_file ? SOURCE_CACHE_KEEP : a->page_cache;
    m->page_cache = w->page_cache;
    m->share_file = a->share_file;
    if (a->acl_users || a->acl_groups) {
        m->acl = true;
        if (a->acl_users)
            m->acl_users = *a->acl_users;
        if (a->acl_groups)
            m->acl_groups = *a->acl_groups;
    }
    w->dtype = a->dtype;
    m->dtype = a->dtype;
    w->model = m;
    w->cb = cb;
    w->data = data;
    w->t0 = uv_hrtime();
    w->req.data = w;
    m->state = MODEL_LOADING;
    m->loading = w;
    k = uv_queue_work(r->loop, &w->req, preload_parse_cb, preload_parsed_cb);
    if (k < 0) {
        snprintf(msg, msglen, "cannot queue preload: %s", uv_strerror(k));
        free(w->devices);
        free(w->key);
        free(w);
        model_free(m);
        return WSD_EINTERNAL;
    }
    /* One reference for the list, one for the running work. */
    m->refs = 2;
    m->listed = true;
    m->next = r->models;
    r->models = m;
    r->nmodels++;
    return 0;

nomem:
    if (w) {
        free(w->devices);
        free(w->key);
    }
    free(w);
    if (m)
        model_free(m);
    snprintf(msg, msglen, "out of memory");
    return -ENOMEM;
}

const gpu_export_t *model_gpu(const model_t *m, int index)
{
    ssize_t i = model_gpu_removing(m, index) ? -1 : gpu_index(m, index);

    return i >= 0 ? &m->gpu[i] : NULL;
}

void model_served_on(const model_t *m, char *buf, size_t len)
{
    size_t n = (size_t)snprintf(buf, len, "the host tier (cpu)");

    for (size_t i = 0; i < m->ngpu && n < len; i++)
        if (!model_gpu_removing(m, m->gpu[i].device))
            n += (size_t)snprintf(buf + n, len - n, ", cuda:%d", m->gpu[i].device);
}

bool model_gpu_removing(const model_t *m, int index)
{
    return index >= 0 && index < GPU_DEVICES_MAX && (m->gpu_removing >> index) & 1;
}

bool model_uploading_to(const model_t *m, int index)
{
    const preload_work_t *w = m->loading;

    for (size_t i = 0; w && w->upload_only && i < w->ndevices; i++)
        if (w->devices[i] == index)
            return true;
    return false;
}

bool model_check_stale(model_t *m)
{
    struct stat st;

    if (!m->share_file || m->arena.fd < 0)
        return false;
    if (m->state == MODEL_STALE)
        return true;
    if (fstat(m->arena.fd, &st) == 0 && st.st_size == m->file_st.st_size &&
        st.st_mtim.tv_sec == m->file_st.st_mtim.tv_sec &&
        st.st_mtim.tv_nsec == m->file_st.st_mtim.tv_nsec)
        return false; /* not ctime: unlinking the file by a rename over it changes that */
    log_warning("model '%s': '%s' was modified in place since preload; refusing new opens "
                "(preload it again)", m->name, m->source);
    if (m->state == MODEL_READY)
        m->state = MODEL_STALE;
    return true;
}

bool model_source_replaced(const model_t *m)
{
    struct stat st;

    if (!m->share_file)
        return false;
    return stat(m->source, &st) < 0 || st.st_ino != m->file_st.st_ino ||
           st.st_dev != m->file_st.st_dev;
}

int registry_adopt(registry_t *r, const char *name, const char *source, const char *key,
                   const char *hash, int dtype, manifest_t *mf, int arena_fd, uint64_t arena_size,
                   char *msg, size_t msglen)
{
    const int need = F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE;
    fmt_err_t err = {0};
    struct stat st;
    model_t *m;
    int seals = fcntl(arena_fd, F_GET_SEALS), k;

    if (registry_find(r, name) || !name_ok(name)) {
        snprintf(msg, msglen, "model '%s' exists already or has an invalid name", name);
        manifest_free(mf);
        return WSD_EEXIST;
    }
    if (seals < 0 || (seals & need) != need || fstat(arena_fd, &st) < 0 ||
        (uint64_t)st.st_size != arena_size) {
        snprintf(msg, msglen, "stored arena of '%s' is not a sealed memfd of %llu bytes", name,
                 (unsigned long long)arena_size);
        manifest_free(mf);
        return WSD_EBADCKPT;
    }
    k = manifest_validate(mf, &err);
    if (k < 0) {
        snprintf(msg, msglen, "stored manifest of '%s': %s", name, err.msg);
        manifest_free(mf);
        return k == -ENOMEM ? -ENOMEM : WSD_EBADCKPT;
    }
    for (size_t i = 0; i < mf->nstorages; i++)
        if (mf->storages[i].arena_offset > arena_size ||
            mf->storages[i].nbytes > arena_size - mf->storages[i].arena_offset) {
            snprintf(msg, msglen, "stored manifest of '%s' points outside its arena", name);
            manifest_free(mf);
            return WSD_EBADCKPT;
        }
    m = calloc(1, sizeof(*m));
    if (!m || !(m->name = strdup(name)) || !(m->source = strdup(source ? source : "")) ||
        (key && !(m->key = strdup(key)))) {
        if (m) {
            free(m->name);
            free(m->source);
            free(m);
        }
        manifest_free(mf);
        snprintf(msg, msglen, "out of memory");
        return -ENOMEM;
    }
    k = manifest_pb_encode(mf, arena_size, hash, &m->manifest_pb, &m->manifest_pb_len);
    if (k < 0) {
        free(m->name);
        free(m->source);
        free(m->key);
        free(m);
        manifest_free(mf);
        snprintf(msg, msglen, "cannot encode the manifest of '%s': %s", name,
                 k == -ENOMEM ? "out of memory" : "too large for a reply");
        return k == -ENOMEM ? -ENOMEM : WSD_ELIMIT;
    }
    m->reg = r;
    m->mf = mf;
    m->arena.fd = arena_fd;
    m->arena.size = arena_size;
    snprintf(m->arena.pages, sizeof(m->arena.pages), "adopted");
    snprintf(m->hash, sizeof(m->hash), "%s", hash ? hash : "");
    m->dtype = dtype;
    for (size_t i = 0; i < mf->nstorages; i++)
        m->bytes += mf->storages[i].nbytes;
    m->ntensors = mf->ntensors;
    m->state = MODEL_READY;
    m->last_used_ms = uv_now(r->loop);
    m->refs = 1;
    m->listed = true;
    m->next = r->models;
    r->models = m;
    r->nmodels++;
    r->resident_bytes += model_resident(m);
    log_info("re-adopted '%s' from the fd store: %zu tensors, %llu bytes, hash %s", name,
             mf->ntensors, (unsigned long long)m->bytes, m->hash);
    manifest_drop_tables(mf);
    return 0;
}

int registry_cancel(registry_t *r, const char *name, char *msg, size_t msglen)
{
    model_t *m = registry_find(r, name);

    if (!m) {
        snprintf(msg, msglen, "no model named '%s'", name);
        return WSD_ENOTFOUND;
    }
    if (!m->loading) {
        snprintf(msg, msglen, "model '%s' is %s, not loading: nothing to cancel", name,
                 model_state_name(m->state));
        return WSD_EBUSY;
    }
    atomic_store(&m->loading->progress.cancel, true);
    log_info("%s of '%s' cancelled", m->loading->upload_only ? "upload" : "preload", name);
    snprintf(msg, msglen, "cancelling");
    return 0;
}

unsigned registry_cancel_all(registry_t *r)
{
    unsigned n = 0;

    for (model_t *m = r->models; m; m = m->next)
        if (m->loading) {
            atomic_store(&m->loading->progress.cancel, true);
            n++;
        }
    return n;
}

bool model_progress(const model_t *m, const char **ret_phase, uint64_t *ret_done,
                    uint64_t *ret_total)
{
    const preload_work_t *w = m->loading;

    if (!w)
        return false;
    switch (atomic_load(&w->phase)) {
    case PHASE_COPY:
        *ret_phase = "copy";
        break;
    case PHASE_UPLOAD:
        *ret_phase = "upload";
        break;
    default:
        *ret_phase = "parse";
        break;
    }
    *ret_done = atomic_load(&w->progress.done);
    *ret_total = atomic_load(&w->progress.total);
    return true;
}

/* The model an evict names, once its preload is over. \retval 0, WSD_ENOTFOUND, WSD_ELOADING. */
static int evict_target(registry_t *r, const char *name, model_t **ret, char *msg, size_t msglen)
{
    model_t *m = registry_find(r, name);

    if (!m) {
        snprintf(msg, msglen, "no model named '%s'", name);
        return WSD_ENOTFOUND;
    }
    if (m->state == MODEL_LOADING) {
        snprintf(msg, msglen, "model '%s' is still loading", name);
        return WSD_ELOADING;
    }
    *ret = m;
    return 0;
}

int registry_evict(registry_t *r, const char *name, unsigned flags, char *msg, size_t msglen)
{
    model_t *m = NULL;
    int k = evict_target(r, name, &m, msg, msglen);

    if (k < 0)
        return k;
    if (m->loading) {
        snprintf(msg, msglen, "model '%s' is being uploaded to a device; wait for it or cancel "
                              "it (weightsctl cancel %s)", name, name);
        return WSD_ELOADING;
    }
    if (m->leases > 0 && !(flags & (WSD_EVICT_FORCE | WSD_EVICT_DRAIN))) {
        snprintf(msg, msglen,
                 "model '%s' has %u lease%s; use --drain to free it when they end or --force",
                 name, m->leases, m->leases == 1 ? "" : "s");
        return WSD_EBUSY;
    }
    if (m->leases > 0 && !(flags & WSD_EVICT_FORCE)) {
        m->state = MODEL_DRAINING;
        log_info("model '%s' draining: %u leases left", name, m->leases);
        snprintf(msg, msglen, "draining");
        return 0;
    }
    log_info("evicted model '%s'%s", name, m->leases ? " (forced, leases remain)" : "");
    snprintf(msg, msglen, m->leases ? "forced" : "evicted");
    /* The daemon lets go of its memory now; workers that mapped it keep their pages, and
     * their leases keep the model record until they release. */
    r->resident_bytes -= model_resident(m);
    host_arena_close(&m->arena);
    /* A VMM copy lives on in the workers' mappings, which hold their own references, so the
     * daemon's can go now. A legacy IPC copy must stay until the last lease: freeing it under
     * an importer is undefined behaviour (cuda.h, cuIpcOpenMemHandle). */
    for (size_t i = m->ngpu; i-- > 0;)
        if (m->gpu[i].kind == GPU_HANDLE_POSIX_FD)
            gpu_remove_at(m, i);
    registry_unlist(r, m);
    return 0;
}

int registry_evict_device(registry_t *r, const char *name, int device, unsigned flags,
                          char *msg, size_t msglen)
{
    model_t *m = NULL;
    int k = evict_target(r, name, &m, msg, msglen);
    ssize_t i;
    unsigned n;

    if (k < 0)
        return k;
    if (m->state == MODEL_DRAINING) {
        snprintf(msg, msglen, "model '%s' is draining: it goes as a whole with its last lease",
                 name);
        return WSD_EBUSY;
    }
    i = device >= 0 && device < GPU_DEVICES_MAX ? gpu_index(m, device) : -1;
    if (i < 0 && model_uploading_to(m, device)) {
        snprintf(msg, msglen, "model '%s' is being uploaded to cuda:%d; cancel that (weightsctl "
                              "cancel %s) or evict it there once it is done", name, device, name);
        return WSD_ELOADING;
    }
    if (i < 0) {
        char where[256];

        model_served_on(m, where, sizeof(where));
        snprintf(msg, msglen, "model '%s' is not on cuda:%d; it is served on %s", name, device,
                 where);
        return WSD_ENODEV;
    }
    n = m->gpu_leases[device];
    if (n > 0 && !(flags & (WSD_EVICT_FORCE | WSD_EVICT_DRAIN))) {
        snprintf(msg, msglen, "model '%s' has %u lease%s on cuda:%d; use --drain to free that "
                 "copy when they end or --force", name, n, n == 1 ? "" : "s", device);
        return WSD_EBUSY;
    }
    /* Freeing a legacy IPC allocation under an importer is undefined behaviour (cuda.h,
     * cuIpcOpenMemHandle): --force drains it as --drain would. */
    if (n > 0 && (!(flags & WSD_EVICT_FORCE) || m->gpu[i].kind != GPU_HANDLE_POSIX_FD)) {
        if (!model_gpu_removing(m, device)) {
            m->gpu_removing |= UINT64_C(1) << device;
            if (r->on_devices)
                r->on_devices(r->hook_data, m);
        }
        log_info("model '%s' draining from cuda:%d: %u lease%s left there%s", name, device, n,
                 n == 1 ? "" : "s", flags & WSD_EVICT_FORCE ? " (legacy IPC: not forced)" : "");
        snprintf(msg, msglen, "draining");
        return 0;
    }
    log_info("model '%s' evicted from cuda:%d%s", name, device,
             n ? " (forced: mapped workers keep the memory)" : "");
    snprintf(msg, msglen, n ? "forced" : "evicted");
    gpu_remove_at(m, (size_t)i);
    /* Leases left on the copy forced off hold nothing of the daemon's: a copy uploaded there
     * later starts with none. */
    m->gpu_leases[device] = 0;
    m->gpu_gen[device]++;
    if (r->on_devices)
        r->on_devices(r->hook_data, m);
    return 0;
}
