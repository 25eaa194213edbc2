/*
 * client.c - libweightsd: one blocking connection to a weightsd socket.
 *
 * Divided into: connection lifetime and the request/reply exchange (wsd_connect, rpc), models
 * (wsd_open maps the received fd and builds the tensor table once, so every later lookup is
 * local), and the admin verbs, which return the daemon's JSON document untouched.
 *
 * Lifetimes: a wsd_client_t is reference counted; the caller's reference goes with wsd_close()
 * and each open model holds one more, so a model stays readable after its connection closed.
 * The count is atomic, so models whose leases are gone may be freed on any thread (the
 * contract is in weightsd.h); nothing else here locks.
 */
#include "weightsd.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "client.h"
#include "extent.h"
#include "fdpass.h"
#include "gpu.h"
#include "strhash.h"
#include "wsd_limits.h"
#include "wire.h"

#define CLIENT_TIMEOUT_DEFAULT_MS 30000
/* --device entries one preload may carry: the daemon serves at most 64 GPUs plus the host. */
#define PRELOAD_DEVICES_MAX 65

/* Seals every host-tier memfd must carry; extra ones (F_SEAL_EXEC) are fine (RELIABILITY I5). */
#define REQUIRED_SEALS (F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE)

struct wsd_client {
    atomic_uint refs;        /* caller's reference (until wsd_close) + one per open model */
    int fd;                  /* connected socket, -1 once closed */
    bool admin;              /* HELLO said this is the admin socket */
    wire_reader_t reader;    /* reassembles replies */
    uint64_t next_id;        /* id of the next request */
    int timeout_ms;          /* per request; 0 = forever */
    char last_error[512];    /* message of the last Error frame */
    /* Progress frames of the request in flight go here (set only during that request). */
    void (*progress)(void *data, const char *phase, uint64_t done, uint64_t total);
    void *progress_data;
};

struct wsd_tensor {
    const wsd_model_t *model;
    char *name;
    int dtype;
    unsigned ndim;
    int64_t shape[WSD_MAX_NDIM];
    int64_t strides[WSD_MAX_NDIM];
    size_t storage;
    uint64_t storage_offset; /* elements */
    uint64_t nbytes;
    void *data;              /* element 0 */
};

struct wsd_storage {
    void *data;
    uint64_t nbytes;
};

struct wsd_model {
    wsd_client_t *client;     /* reference held until wsd_model_free */
    char *name;
    uint64_t lease;           /* 0 once released */
    void *base;               /* MAP_PRIVATE mapping of the whole fd, NULL if map_size == 0 */
    uint64_t map_size;
    wsd_tensor_t *tensors;
    size_t ntensors;
    char *names;              /* every tensor's name, NUL-terminated, one after another */
    struct wsd_storage *storages;
    size_t nstorages;
    uint32_t *index;          /* open-addressing table of tensor indices by name, size index_cap */
    size_t index_cap;
    char hash[72];            /* content hash, hex */
    int device;               /* -1: base is a host mapping; N: base is a cuda:N address */
    wsd__gpu_t *gpu;          /* the process's shared import (device >= 0), one reference */
};

/* TSan does not model atomic_thread_fence(); under it the acquire is an acquire load instead,
 * which orders the same way here (every earlier decrement is in the release sequence it reads). */
#if defined(__SANITIZE_THREAD__)
#    define CLIENT_TSAN 1
#elif defined(__has_feature)
#    if __has_feature(thread_sanitizer)
#        define CLIENT_TSAN 1
#    endif
#endif

wsd_client_t *wsd__client_new(void)
{
    wsd_client_t *c = calloc(1, sizeof(*c));

    if (!c)
        return NULL;
    atomic_init(&c->refs, 1);
    c->fd = -1;
    c->timeout_ms = CLIENT_TIMEOUT_DEFAULT_MS;
    wire_reader_init(&c->reader, WSD_REPLY_MAX);
    return c;
}

wsd_client_t *wsd__client_ref(wsd_client_t *c)
{
    /* Relaxed: a new reference is made from one the caller holds, so c cannot go away under
     * us and there is nothing to publish. */
    atomic_fetch_add_explicit(&c->refs, 1, memory_order_relaxed);
    return c;
}

static void client_close_fd(wsd_client_t *c)
{
    if (c->fd >= 0)
        (void)close(c->fd);
    c->fd = -1;
    wire_reader_done(&c->reader);
}

void wsd__client_unref(wsd_client_t *c)
{
    if (!c)
        return;
    /* Release: whatever this thread did with c happens before the free, on whichever thread
     * drops the last reference. */
    if (atomic_fetch_sub_explicit(&c->refs, 1, memory_order_release) != 1)
        return;
    /* Acquire: the thread that frees sees every other thread's last use of c. */
#ifdef CLIENT_TSAN
    (void)atomic_load_explicit(&c->refs, memory_order_acquire);
#else
    atomic_thread_fence(memory_order_acquire);
#endif
    client_close_fd(c);
    free(c);
}

void wsd__client_adopt_fd(wsd_client_t *c, int fd)
{
    c->fd = fd;
}

unsigned wsd__client_refs(const wsd_client_t *c)
{
    return atomic_load_explicit(&c->refs, memory_order_relaxed);
}

static void set_error(wsd_client_t *c, const char *msg)
{
    snprintf(c->last_error, sizeof(c->last_error), "%s", msg);
}

/*
 * Sends \p req (its id is assigned here) with no fds and waits for the reply with the same id.
 * An Error frame becomes its code (and last_error). The caller owns *ret on success.
 */
static int rpc(wsd_client_t *c, wire_msg_t *req, wire_frame_t *ret)
{
    uint8_t *buf = NULL;
    size_t len = 0;
    wire_frame_t f;
    int r;

    if (c->fd < 0)
        return WSD_ECLOSED;
    c->last_error[0] = '\0';
    req->id = ++c->next_id;
    r = wire_encode(req, 0, &buf, &len);
    if (r < 0)
        return r;
    r = wire_send_all(c->fd, buf, len, NULL, 0);
    free(buf);
    if (r < 0)
        goto broken;
    for (;;) {
        r = wire_recv_frame(&c->reader, c->fd, c->timeout_ms, &f);
        if (r < 0)
            goto broken;
        if (f.msg->id != req->id || f.msg->body_case != WEIGHTSD__V1__FRAME__BODY_PROGRESS)
            break;
        /* Progress of a long request: report it, and keep waiting for the reply proper. */
        if (c->progress)
            c->progress(c->progress_data, f.msg->progress->phase ? f.msg->progress->phase : "",
                        f.msg->progress->done, f.msg->progress->total);
        wire_frame_done(&f);
    }
    if (f.msg->id == 0 && f.msg->body_case == WEIGHTSD__V1__FRAME__BODY_ERROR) {
        /* The daemon's last word on this connection (a limit, a violation, no memory), sent
         * with id 0 before it disconnects: say what it said. */
        r = f.msg->error->code < 0 ? f.msg->error->code : WSD_EPROTO;
        snprintf(c->last_error, sizeof(c->last_error), "daemon: %s",
                 f.msg->error->message && *f.msg->error->message ? f.msg->error->message
                                                                 : wsd_strerror(r));
        wire_frame_done(&f);
        goto broken;
    }
    if (f.msg->id != req->id) {
        wire_frame_done(&f);
        set_error(c, "reply does not match the request");
        r = WSD_EPROTO;
        goto broken;
    }
    if (f.msg->body_case == WEIGHTSD__V1__FRAME__BODY_ERROR) {
        r = f.msg->error->code;
        set_error(c, f.msg->error->message ? f.msg->error->message : "");
        wire_frame_done(&f);
        return r < 0 ? r : WSD_EPROTO;
    }
    *ret = f;
    return 0;

broken:
    /* A transport failure or a desynchronised stream leaves no way to match later replies. */
    if (r == -ECONNRESET || r == -EPIPE)
        r = WSD_ECLOSED;
    if (r == -EBADMSG || r == -EMSGSIZE)
        r = WSD_EPROTO;
    if (!c->last_error[0])
        set_error(c, wsd_strerror(r));
    client_close_fd(c);
    return r;
}

/* wsd_default_socket() into \p path (PATH_MAX bytes): the environment's string, or \p path. */
static const char *default_socket(int admin, char *path)
{
    const char *env = getenv(admin ? "WEIGHTSD_ADMIN_SOCKET" : "WEIGHTSD_SOCKET");
    const char *dir;
    const char *file = admin ? "admin.sock" : "weightsd.sock";

    if (env && *env)
        return env;
    if (geteuid() == 0)
        dir = "/run/weightsd";
    else {
        const char *xdg = getenv("XDG_RUNTIME_DIR");

        if (!xdg || !*xdg)
            return NULL;
        snprintf(path, PATH_MAX, "%s/weightsd/%s", xdg, file);
        return path;
    }
    snprintf(path, PATH_MAX, "%s/%s", dir, file);
    return path;
}

WSD_EXTERN const char *wsd_default_socket(int admin)
{
    static char path[PATH_MAX];

    return default_socket(admin, path);
}

WSD_EXTERN int wsd_connect(const char *path, wsd_client_t **ret_client)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    Weightsd__V1__Frame req = WEIGHTSD__V1__FRAME__INIT;
    Weightsd__V1__Hello hello = WEIGHTSD__V1__HELLO__INIT;
    static char client_name[] = "libweightsd/0.1.0";
    char default_path[PATH_MAX];
    wsd_client_t *c;
    wire_frame_t f;
    int r;

    if (!ret_client)
        return -EINVAL;
    /* Not wsd_default_socket(): its static buffer would make concurrent connects race. */
    if (!path)
        path = default_socket(0, default_path);
    if (!path)
        return -ENOENT;
    if (strlen(path) >= sizeof(sa.sun_path))
        return -ENAMETOOLONG;
    memcpy(sa.sun_path, path, strlen(path) + 1);

    c = wsd__client_new();
    if (!c)
        return -ENOMEM;
    c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        r = -errno;
        goto fail;
    }
    if (connect(c->fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        r = -errno;
        goto fail;
    }

    hello.protocol = WSD_PROTOCOL_VERSION;
    hello.client = client_name;
    req.body_case = WEIGHTSD__V1__FRAME__BODY_HELLO;
    req.hello = &hello;
    r = rpc(c, &req, &f);
    if (r < 0)
        goto fail;
    if (f.msg->body_case != WEIGHTSD__V1__FRAME__BODY_HELLO_REPLY) {
        wire_frame_done(&f);
        r = WSD_EPROTO;
        goto fail;
    }
    if (f.msg->hello_reply->protocol != WSD_PROTOCOL_VERSION) {
        wire_frame_done(&f);
        r = WSD_EVERSION;
        goto fail;
    }
    c->admin = f.msg->hello_reply->admin;
    wire_frame_done(&f);
    *ret_client = c;
    return 0;

fail:
    wsd__client_unref(c);
    return r;
}

WSD_EXTERN int wsd_set_timeout(wsd_client_t *c, int timeout_ms)
{
    if (!c || timeout_ms < 0)
        return -EINVAL;
    c->timeout_ms = timeout_ms;
    return 0;
}

WSD_EXTERN void wsd_close(wsd_client_t *c)
{
    if (!c)
        return;
    client_close_fd(c);
    wsd__client_unref(c);
}

WSD_EXTERN const char *wsd_last_error(const wsd_client_t *c)
{
    return c ? c->last_error : "";
}

/* The daemon is trusted less than nothing here: a bad manifest must not make us read outside
 * the mapping, so every range is checked before any pointer is formed. The daemon checked the
 * same rules before serving the manifest; checking again is defence in depth against a buggy
 * or compromised daemon. On WSD_EPROTO \p msg says which storage or tensor broke which rule. */
static int model_build(wsd_model_t *m, const Weightsd__V1__Manifest *mf, const uint64_t *offsets,
                       char *msg, size_t msglen)
{
    size_t names_len = 0;
    char *next;

    /* The names fit in the frame they came in (at most WSD_FRAME_MAX bytes): no overflow. */
    for (size_t i = 0; i < mf->n_tensors; i++)
        names_len += strlen(mf->tensors[i]->name) + 1;
    m->names = next = malloc(names_len ? names_len : 1);
    m->nstorages = mf->n_storages;
    m->storages = calloc(mf->n_storages ? mf->n_storages : 1, sizeof(*m->storages));
    m->ntensors = mf->n_tensors;
    m->tensors = calloc(mf->n_tensors ? mf->n_tensors : 1, sizeof(*m->tensors));
    m->index_cap = 16;
    while (m->index_cap < mf->n_tensors * 2)
        m->index_cap *= 2;
    m->index = malloc(m->index_cap * sizeof(*m->index));
    if (!m->names || !m->storages || !m->tensors || !m->index)
        return -ENOMEM;
    memset(m->index, 0xff, m->index_cap * sizeof(*m->index));

    for (size_t i = 0; i < mf->n_storages; i++) {
        const Weightsd__V1__StorageInfo *s = mf->storages[i];

        /* A device copy has its own layout: offsets[] replaces the host arena's offsets. */
        uint64_t off = offsets ? offsets[i] : s->offset;

        if (off > m->map_size || s->nbytes > m->map_size - off) {
            snprintf(msg, msglen, "storage %zu: %llu bytes at %llu exceed the %llu-byte mapping", i,
                     (unsigned long long)s->nbytes, (unsigned long long)off,
                     (unsigned long long)m->map_size);
            return WSD_EPROTO;
        }
        /* An empty model has no mapping: its storages are all empty, at NULL (no arithmetic
         * on a null pointer, which C leaves undefined even for + 0). */
        m->storages[i].data = m->base ? (char *)m->base + off : NULL;
        m->storages[i].nbytes = s->nbytes;
    }
    for (size_t i = 0; i < mf->n_tensors; i++) {
        const Weightsd__V1__TensorInfo *ti = mf->tensors[i];
        wsd_tensor_t *t = &m->tensors[i];
        unsigned bits = wsd_dtype_bits((int)ti->dtype);
        size_t len = strlen(ti->name), slot;
        int r;

        if (ti->storage >= m->nstorages) {
            snprintf(msg, msglen, "tensor '%s': storage %u does not exist",
                     ti->name ? ti->name : "", ti->storage);
            return WSD_EPROTO;
        }
        /* Every element of the view inside its storage, before data, shape or strides can
         * reach an accessor or a DLPack export. */
        r = wsd__tensor_extent_check(ti, m->storages[ti->storage].nbytes, msg, msglen);
        if (r < 0)
            return r;
        t->model = m;
        t->name = memcpy(next, ti->name, len + 1);
        next += len + 1;
        t->dtype = (int)ti->dtype;
        t->ndim = (unsigned)ti->n_shape;
        if (t->ndim) { /* a 0-dim tensor arrives with NULL arrays */
            memcpy(t->shape, ti->shape, ti->n_shape * sizeof(int64_t));
            memcpy(t->strides, ti->stride, ti->n_stride * sizeof(int64_t));
        }
        t->storage = ti->storage;
        t->storage_offset = ti->storage_offset;
        t->nbytes = ti->nbytes;
        t->data = !m->storages[ti->storage].data
                      ? NULL
                      : (char *)m->storages[ti->storage].data +
                            (bits % 8 ? 0 : ti->storage_offset * (bits / 8));

        /* Keyed: the names come from a checkpoint, and names chosen to share a slot would
         * make this loop, and every later lookup, walk all the earlier ones (strhash.h). */
        slot = (size_t)strhash(t->name, len) & (m->index_cap - 1);
        while (m->index[slot] != UINT32_MAX)
            slot = (slot + 1) & (m->index_cap - 1);
        m->index[slot] = (uint32_t)i;
    }
    snprintf(m->hash, sizeof(m->hash), "%s", mf->content_hash ? mf->content_hash : "");
    return 0;
}

/* The fd must be unchangeable under us: a fully sealed memfd, or a file opened read-only (the
 * daemon's file share mode). fstat guards against mapping past the end (SIGBUS). */
static int check_fd(int fd, uint64_t map_size)
{
    struct stat st;
    int seals, fl;

    if (fstat(fd, &st) < 0)
        return -errno;
    if (!S_ISREG(st.st_mode) || (uint64_t)st.st_size < map_size)
        return WSD_EPROTO;
    seals = fcntl(fd, F_GET_SEALS);
    if (seals >= 0)
        return (seals & REQUIRED_SEALS) == REQUIRED_SEALS ? 0 : WSD_EPROTO;
    fl = fcntl(fd, F_GETFL);
    if (fl < 0 || (fl & O_ACCMODE) != O_RDONLY)
        return WSD_EPROTO;
    return 0;
}

/* Sets last_error for a model_build() failure: its own message for a bad manifest. */
static void manifest_error(wsd_client_t *c, int r, const char *msg)
{
    char buf[sizeof(c->last_error)];

    if (r != WSD_EPROTO) {
        set_error(c, wsd_strerror(r));
        return;
    }
    snprintf(buf, sizeof(buf), "daemon sent an inconsistent manifest: %s", msg);
    set_error(c, buf);
}

WSD_EXTERN int wsd_open(wsd_client_t *c, const char *name, const char *device, unsigned flags,
                        wsd_model_t **ret_model)
{
    wsd_open_opts_t o = {.size = sizeof(o), .device = device, .flags = flags};

    return wsd_open_with(c, name, &o, ret_model);
}

/* Imports (or shares this process's import of) a device copy; sets m->base and m->map_size. */
static int open_gpu(wsd_client_t *c, wsd_model_t *m, const char *name,
                    const Weightsd__V1__Manifest *mf, const Weightsd__V1__GpuExport *gpu, int fd,
                    unsigned flags)
{
    bool writable = (flags & WSD_OPEN_GPU_WRITE) != 0;
    char key[WSD__GPU_KEY_MAX], msg[512];
    const char *hash = mf->content_hash ? mf->content_hash : "";
    uint64_t base = 0;
    int device = atoi(gpu->device + 5), r;

    if (wsd__gpu_key(key, sizeof(key), name, hash, gpu->device, writable, gpu->handle,
                     gpu->ipc_handle.data, gpu->ipc_handle.len) < 0)
        hash = ""; /* cannot happen with the wire's limits; then simply not shared */
    r = wsd__gpu_import(*hash ? key : NULL, device, gpu->device_uuid.data, gpu->device_uuid.len,
                        gpu->handle, fd, gpu->ipc_handle.data, gpu->ipc_handle.len, gpu->size,
                        writable, &m->gpu, &device, &base, msg, sizeof(msg));
    if (r < 0) {
        set_error(c, r == -ENOMEM ? "out of memory" : msg);
        return r;
    }
    m->device = device;
    m->base = (void *)(uintptr_t)base;
    m->map_size = gpu->size;
    return 0;
}

WSD_EXTERN int wsd_open_with(wsd_client_t *c, const char *name, const wsd_open_opts_t *opts,
                             wsd_model_t **ret_model)
{
    Weightsd__V1__Frame req = WEIGHTSD__V1__FRAME__INIT;
    Weightsd__V1__OpenRequest open = WEIGHTSD__V1__OPEN_REQUEST__INIT;
    const Weightsd__V1__Manifest *mf;
    const Weightsd__V1__GpuExport *gpu;
    wsd_model_t *m = NULL;
    wire_frame_t f = {0};
    char msg[384] = "";
    int r;

    const char *device = NULL, *expect = NULL;
    unsigned flags = 0;

    if (!c || !name || !ret_model || !opts || opts->size < sizeof(size_t))
        return -EINVAL;
    /* Read only the fields the caller's struct is large enough to hold (A2). */
#define HAS(field) (opts->size >= offsetof(wsd_open_opts_t, field) + sizeof(opts->field))
    if (HAS(device))
        device = opts->device;
    if (HAS(flags))
        flags = opts->flags;
    if (HAS(expect_hash))
        expect = opts->expect_hash;
    if (HAS(path) && opts->path)
        open.path = wire_str(opts->path);
#undef HAS
    open.model = wire_str(name);
    open.device = wire_str(device ? device : "cpu");
    open.flags = flags;
    open.expect_hash = wire_str(expect ? expect : "");
    req.body_case = WEIGHTSD__V1__FRAME__BODY_OPEN;
    req.open = &open;
    r = rpc(c, &req, &f);
    if (r < 0)
        return r;
    if (f.msg->body_case != WEIGHTSD__V1__FRAME__BODY_OPEN_REPLY || !f.msg->open_reply->manifest) {
        r = WSD_EPROTO;
        set_error(c, "malformed open reply");
        goto out;
    }
    mf = f.msg->open_reply->manifest;
    gpu = f.msg->open_reply->gpu;
    if (gpu ? !gpu->device || strcmp(gpu->device, device ? device : "") != 0 ||
                  gpu->n_offsets != mf->n_storages ||
                  f.nfds != (gpu->handle == WSD__GPU_HANDLE_POSIX_FD ? 1u : 0u)
            : f.nfds != 1) {
        r = WSD_EPROTO;
        set_error(c, "malformed open reply");
        goto out;
    }

    m = calloc(1, sizeof(*m));
    if (!m) {
        r = -ENOMEM;
        goto out;
    }
    m->lease = f.msg->open_reply->lease;
    m->client = wsd__client_ref(c);
    m->name = strdup(name);
    m->map_size = mf->map_size;
    m->device = -1;
    if (!m->name) {
        r = -ENOMEM;
        goto out;
    }
    if (gpu) {
        r = open_gpu(c, m, name, mf, gpu, f.nfds ? f.fds[0] : -1, flags);
        if (r < 0)
            goto out;
        r = model_build(m, mf, gpu->offsets, msg, sizeof(msg));
        if (r < 0) {
            manifest_error(c, r, msg);
            goto out;
        }
        *ret_model = m;
        m = NULL;
        goto out;
    }
    r = check_fd(f.fds[0], m->map_size);
    if (r < 0) {
        set_error(c, "daemon sent an fd that is not sealed or not read-only");
        goto out;
    }
    if (m->map_size > 0) {
        /* MAP_NORESERVE: a private mapping of a hugetlb arena would otherwise reserve a whole
         * private copy from the huge page pool up front, for writes that never come. */
        void *p = mmap(NULL, m->map_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE,
                       f.fds[0], 0);

        if (p == MAP_FAILED) {
            r = -errno;
            goto out;
        }
        m->base = p;
    }
    r = model_build(m, mf, NULL, msg, sizeof(msg));
    if (r < 0) {
        manifest_error(c, r, msg);
        goto out;
    }
    *ret_model = m;
    m = NULL;

out:
    wire_frame_done(&f); /* closes the fd: the mapping keeps the memory */
    if (m) {
        /* Freeing releases the lease with a request of its own, which would clear the message
         * saying why this open failed. */
        char why[sizeof(c->last_error)];

        memcpy(why, c->last_error, sizeof(why));
        wsd_model_free(m);
        memcpy(c->last_error, why, sizeof(why));
    }
    return r;
}

WSD_EXTERN int wsd_model_release(wsd_model_t *m)
{
    Weightsd__V1__Frame req = WEIGHTSD__V1__FRAME__INIT;
    Weightsd__V1__ReleaseRequest rel = WEIGHTSD__V1__RELEASE_REQUEST__INIT;
    wire_frame_t f;
    int r;

    if (!m)
        return -EINVAL;
    if (!m->lease)
        return 0;
    rel.lease = m->lease;
    m->lease = 0;
    /* A closed connection released every lease already. */
    if (m->client->fd < 0)
        return 0;
    req.body_case = WEIGHTSD__V1__FRAME__BODY_RELEASE;
    req.release = &rel;
    r = rpc(m->client, &req, &f);
    if (r < 0)
        return r;
    wire_frame_done(&f);
    return 0;
}

WSD_EXTERN void wsd_model_free(wsd_model_t *m)
{
    if (!m)
        return;
    /* Unmap first, release the lease second: a legacy IPC copy is cudaFree'd by the daemon
     * when its last lease goes, and freeing it before the importer closes it is undefined
     * behaviour (cuda.h, cuIpcOpenMemHandle). */
    if (m->gpu)
        wsd__gpu_unref(m->gpu);
    else if (m->base)
        (void)munmap(m->base, m->map_size);
    if (m->client)
        (void)wsd_model_release(m);
    free(m->names);
    free(m->tensors);
    free(m->storages);
    free(m->index);
    free(m->name);
    wsd__client_unref(m->client);
    free(m);
}

WSD_EXTERN const char *wsd_model_name(const wsd_model_t *m)
{
    return m ? m->name : NULL;
}

WSD_EXTERN size_t wsd_model_tensor_count(const wsd_model_t *m)
{
    return m ? m->ntensors : 0;
}

WSD_EXTERN const void *wsd_model_base(const wsd_model_t *m, uint64_t *ret_size)
{
    if (!m)
        return NULL;
    if (ret_size)
        *ret_size = m->map_size;
    return m->base;
}

WSD_EXTERN uint64_t wsd_model_lease(const wsd_model_t *m)
{
    return m ? m->lease : 0;
}

WSD_EXTERN const char *wsd_model_hash(const wsd_model_t *m)
{
    return m ? m->hash : "";
}

WSD_EXTERN int wsd_model_device(const wsd_model_t *m)
{
    return m && m->gpu ? m->device : -1;
}

WSD_EXTERN const wsd_tensor_t *wsd_model_tensor(const wsd_model_t *m, size_t i)
{
    if (!m || i >= m->ntensors)
        return NULL;
    return &m->tensors[i];
}

WSD_EXTERN const wsd_tensor_t *wsd_model_find(const wsd_model_t *m, const char *name)
{
    size_t slot;

    if (!m || !name)
        return NULL;
    slot = (size_t)strhash(name, strlen(name)) & (m->index_cap - 1);
    while (m->index[slot] != UINT32_MAX) {
        const wsd_tensor_t *t = &m->tensors[m->index[slot]];

        if (strcmp(t->name, name) == 0)
            return t;
        slot = (slot + 1) & (m->index_cap - 1);
    }
    return NULL;
}

WSD_EXTERN size_t wsd_model_storage_count(const wsd_model_t *m)
{
    return m ? m->nstorages : 0;
}

WSD_EXTERN int wsd_model_storage(const wsd_model_t *m, size_t i, void **ret_data,
                                 uint64_t *ret_nbytes)
{
    if (!m || i >= m->nstorages)
        return -EINVAL;
    if (ret_data)
        *ret_data = m->storages[i].data;
    if (ret_nbytes)
        *ret_nbytes = m->storages[i].nbytes;
    return 0;
}

WSD_EXTERN const char *wsd_tensor_name(const wsd_tensor_t *t)
{
    return t ? t->name : NULL;
}

WSD_EXTERN int wsd_tensor_dtype(const wsd_tensor_t *t)
{
    return t ? t->dtype : -EINVAL;
}

WSD_EXTERN unsigned wsd_tensor_ndim(const wsd_tensor_t *t)
{
    return t ? t->ndim : 0;
}

WSD_EXTERN const int64_t *wsd_tensor_shape(const wsd_tensor_t *t)
{
    return t ? t->shape : NULL;
}

WSD_EXTERN const int64_t *wsd_tensor_strides(const wsd_tensor_t *t)
{
    return t ? t->strides : NULL;
}

WSD_EXTERN size_t wsd_tensor_storage(const wsd_tensor_t *t)
{
    return t ? t->storage : 0;
}

WSD_EXTERN uint64_t wsd_tensor_storage_offset(const wsd_tensor_t *t)
{
    return t ? t->storage_offset : 0;
}

WSD_EXTERN int wsd_model_tensor_info(const wsd_model_t *m, size_t first, size_t n,
                                     wsd_tensor_info_t *out, size_t stride)
{
    size_t k;

    if (!m || (n && !out) || stride < offsetof(wsd_tensor_info_t, dtype) ||
        n > INT_MAX)
        return -EINVAL;
    if (first >= m->ntensors)
        return 0;
    if (n > m->ntensors - first)
        n = m->ntensors - first;
    for (k = 0; k < n; k++) {
        const wsd_tensor_t *t = &m->tensors[first + k];
        const struct wsd_storage *s = &m->storages[t->storage];
        wsd_tensor_info_t full = {
            .name = t->name,
            .dtype = t->dtype,
            .ndim = t->ndim,
            .shape = t->shape,
            .strides = t->strides,
            .storage = t->storage,
            .storage_offset = t->storage_offset,
            .nbytes = t->nbytes,
            .storage_data = s->data,
            .storage_nbytes = s->nbytes,
        };

        memcpy((char *)out + k * stride, &full, stride < sizeof(full) ? stride : sizeof(full));
    }
    return (int)n;
}

WSD_EXTERN uint64_t wsd_tensor_nbytes(const wsd_tensor_t *t)
{
    return t ? t->nbytes : 0;
}

WSD_EXTERN void *wsd_tensor_data(const wsd_tensor_t *t)
{
    return t ? t->data : NULL;
}

/* Sends one admin request and hands back the JSON document of its AdminReply. */
static int admin_call(wsd_client_t *c, wire_msg_t *req, char **ret_json)
{
    wire_frame_t f;
    char *json;
    int r;

    if (!c || !ret_json)
        return -EINVAL;
    r = rpc(c, req, &f);
    if (r < 0)
        return r;
    if (f.msg->body_case != WEIGHTSD__V1__FRAME__BODY_ADMIN_REPLY) {
        wire_frame_done(&f);
        set_error(c, "unexpected reply to an admin request");
        return WSD_EPROTO;
    }
    json = strdup(f.msg->admin_reply->json ? f.msg->admin_reply->json : "null");
    wire_frame_done(&f);
    if (!json)
        return -ENOMEM;
    *ret_json = json;
    return 0;
}

WSD_EXTERN int wsd_admin_preload(wsd_client_t *c, const char *name, const char *path,
                                 const wsd_preload_opts_t *opts, char **ret_json)
{
    Weightsd__V1__Frame req = WEIGHTSD__V1__FRAME__INIT;
    Weightsd__V1__PreloadRequest p = WEIGHTSD__V1__PRELOAD_REQUEST__INIT;
    int r;

    if (!c || !name || !path)
        return -EINVAL;
    if (opts && opts->size < sizeof(size_t))
        return -EINVAL;
    p.name = wire_str(name);
    p.path = wire_str(path);
    if (opts) {
        /* Read only the fields the caller's struct is large enough to hold (A2). */
#define HAS(field) (opts->size >= offsetof(wsd_preload_opts_t, field) + sizeof(opts->field))
        if (HAS(progress_data) && opts->progress) {
            c->progress = opts->progress;
            c->progress_data = opts->progress_data;
            p.progress = true;
        }
        if (HAS(cancel_on_disconnect))
            p.cancel_on_disconnect = opts->cancel_on_disconnect != 0;
        if (HAS(hugepages) && opts->hugepages)
            p.hugepages = wire_str(opts->hugepages);
        if (HAS(page_cache) && opts->page_cache)
            p.page_cache = wire_str(opts->page_cache);
        if (HAS(dtype) && opts->dtype)
            p.dtype = wire_str(opts->dtype);
        if (HAS(share) && opts->share)
            p.share = wire_str(opts->share);
        if (HAS(key) && opts->key)
            p.key = wire_str(opts->key);
        if (HAS(no_verify))
            p.no_verify = opts->no_verify != 0;
        if (HAS(ndevices) && opts->devices && opts->ndevices) {
            if (opts->ndevices > PRELOAD_DEVICES_MAX)
                return -EINVAL;
            p.devices = (char **)(uintptr_t)opts->devices;
            p.n_devices = opts->ndevices;
        }
        if (HAS(allow_gpu_write))
            p.allow_gpu_write = opts->allow_gpu_write != 0;
#undef HAS
    }
    req.body_case = WEIGHTSD__V1__FRAME__BODY_PRELOAD;
    req.preload = &p;
    r = admin_call(c, &req, ret_json);
    c->progress = NULL;
    c->progress_data = NULL;
    return r;
}

WSD_EXTERN int wsd_admin_cancel(wsd_client_t *c, const char *name, char **ret_json)
{
    Weightsd__V1__Frame req = WEIGHTSD__V1__FRAME__INIT;
    Weightsd__V1__CancelRequest x = WEIGHTSD__V1__CANCEL_REQUEST__INIT;

    if (!name)
        return -EINVAL;
    x.name = wire_str(name);
    req.body_case = WEIGHTSD__V1__FRAME__BODY_CANCEL;
    req.cancel = &x;
    return admin_call(c, &req, ret_json);
}

static int admin_evict(wsd_client_t *c, const char *name, const char *device, unsigned flags,
                       char **ret_json)
{
    Weightsd__V1__Frame req = WEIGHTSD__V1__FRAME__INIT;
    Weightsd__V1__EvictRequest e = WEIGHTSD__V1__EVICT_REQUEST__INIT;

    if (!name)
        return -EINVAL;
    e.name = wire_str(name);
    e.flags = flags;
    if (device)
        e.device = wire_str(device);
    req.body_case = WEIGHTSD__V1__FRAME__BODY_EVICT;
    req.evict = &e;
    return admin_call(c, &req, ret_json);
}

WSD_EXTERN int wsd_admin_evict(wsd_client_t *c, const char *name, unsigned flags, char **ret_json)
{
    return admin_evict(c, name, NULL, flags, ret_json);
}

WSD_EXTERN int wsd_admin_evict_device(wsd_client_t *c, const char *name, const char *device,
                                      unsigned flags, char **ret_json)
{
    if (!device || !*device)
        return -EINVAL; /* not a quiet whole-model evict */
    return admin_evict(c, name, device, flags, ret_json);
}

WSD_EXTERN int wsd_admin_list(wsd_client_t *c, char **ret_json)
{
    Weightsd__V1__Frame req = WEIGHTSD__V1__FRAME__INIT;
    Weightsd__V1__ListRequest l = WEIGHTSD__V1__LIST_REQUEST__INIT;

    req.body_case = WEIGHTSD__V1__FRAME__BODY_LIST;
    req.list = &l;
    return admin_call(c, &req, ret_json);
}

WSD_EXTERN int wsd_admin_info_page(wsd_client_t *c, const char *name, uint64_t offset,
                                   uint64_t limit, unsigned flags, char **ret_json)
{
    Weightsd__V1__Frame req = WEIGHTSD__V1__FRAME__INIT;
    Weightsd__V1__InfoRequest i = WEIGHTSD__V1__INFO_REQUEST__INIT;

    if (!name || (flags & ~WSD_INFO_NO_TENSORS))
        return -EINVAL;
    i.name = wire_str(name);
    i.tensor_offset = offset;
    i.tensor_limit = limit;
    i.no_tensors = (flags & WSD_INFO_NO_TENSORS) != 0;
    req.body_case = WEIGHTSD__V1__FRAME__BODY_INFO;
    req.info = &i;
    return admin_call(c, &req, ret_json);
}

WSD_EXTERN int wsd_admin_info(wsd_client_t *c, const char *name, char **ret_json)
{
    return wsd_admin_info_page(c, name, 0, 0, 0, ret_json);
}

WSD_EXTERN int wsd_admin_stats(wsd_client_t *c, char **ret_json)
{
    Weightsd__V1__Frame req = WEIGHTSD__V1__FRAME__INIT;
    Weightsd__V1__StatsRequest s = WEIGHTSD__V1__STATS_REQUEST__INIT;

    req.body_case = WEIGHTSD__V1__FRAME__BODY_STATS;
    req.stats = &s;
    return admin_call(c, &req, ret_json);
}
