/*
 * fdstore.c - restart without reloading: every ready host-tier model is handed to the service
 * manager's fd store as two sealed memfds, and re-adopted from LISTEN_FDS at the next start.
 *
 *   FDNAME "wsd-a.<name>"  the model's arena (the very memfd workers map)
 *   FDNAME "wsd-m.<name>"  its record: u32 LE length, JSON {name, source, key, hash, dtype,
 *                          arena_size, format, devices, allow_gpu_write}, then the packed
 *                          weightsd.v1.Manifest
 *   FDNAME "wsd-gN.<hash>.<name>"  the CUDA VMM export fd of its copy on cuda:N, for each
 *                          such copy; the content hash ties it to the record it goes with
 *
 * Names are encoded with notify_fdname(). An evicted model's fds are removed from the store
 * (FDSTOREREMOVE=1); a clean stop or a crash leaves it there, which is the point. Models served
 * with --share file are not stored (the file itself is their copy). The record names the CUDA
 * ordinals the model is on ("devices", rewritten when one is added or evicted). A VMM copy's
 * export fd is stored beside it, which keeps the device memory allocated while the daemon is
 * down (a legacy IPC copy dies with the daemon: it has no fd). At the next start a re-adopted
 * model's kept copies are checked and taken back (gpu_adopt()), and the devices without one,
 * or whose copy fails the check, get an upload of the re-adopted arena; all of it on the pool,
 * with the host tier serving meanwhile (and for good, with a logged error, if it fails).
 */
#include "fdstore.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <jansson.h>

#include "log.h"
#include "wire.h"

#define PREFIX_ARENA  "wsd-a."
#define PREFIX_RECORD "wsd-m."
#define PREFIX_GPU    "wsd-g" /* "wsd-g<ordinal>.<content hash>.<name>" */
#define RECORD_MAX    (WSD_FRAME_MAX + (1u << 20)) /* a manifest plus its JSON header */

void fdstore_init(fdstore_t *fs, notify_t *n)
{
    memset(fs, 0, sizeof(*fs));
    fs->notify = n;
}

void fdstore_done(fdstore_t *fs)
{
    for (size_t i = 0; i < fs->npending; i++)
        if (fs->pending[i].fd >= 0)
            (void)close(fs->pending[i].fd);
    fs->npending = 0;
}

int fdstore_collect_cb(void *data, const char *name, int fd)
{
    fdstore_t *fs = data;

    if (fs->npending >= FDSTORE_PENDING_MAX ||
        (strncmp(name, PREFIX_ARENA, strlen(PREFIX_ARENA)) != 0 &&
         strncmp(name, PREFIX_RECORD, strlen(PREFIX_RECORD)) != 0 &&
         strncmp(name, PREFIX_GPU, strlen(PREFIX_GPU)) != 0))
        return -1; /* not ours: closed by the caller */
    (void)fcntl(fd, F_SETFD, FD_CLOEXEC); /* inherited fds come without it */
    snprintf(fs->pending[fs->npending].name, sizeof(fs->pending[fs->npending].name), "%s", name);
    fs->pending[fs->npending].fd = fd;
    fs->npending++;
    return 0;
}

/* A sealed memfd holding \p len bytes of \p data. */
static int sealed_blob(const char *label, const void *a, size_t alen, const void *b, size_t blen)
{
    int fd = memfd_create(label, MFD_CLOEXEC | MFD_ALLOW_SEALING);

    if (fd < 0)
        return -errno;
    if (write(fd, a, alen) != (ssize_t)alen || (blen && write(fd, b, blen) != (ssize_t)blen) ||
        fcntl(fd, F_ADD_SEALS, F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE) < 0) {
        int e = errno ? -errno : -EIO;

        (void)close(fd);
        return e;
    }
    return fd;
}

/* The record memfd of \p m (sealed), or -errno. */
static int record_new(const model_t *m)
{
    json_t *doc, *devs = json_array();
    char *text;
    uint8_t hdr[4];
    size_t tlen;
    uint8_t *rec;
    int fd;

    for (size_t i = 0; devs && i < m->ngpu; i++)
        if (!model_gpu_removing(m, m->gpu[i].device) &&
            json_array_append_new(devs, json_integer(m->gpu[i].device)) < 0) {
            json_decref(devs);
            return -ENOMEM;
        }
    doc = json_pack("{s:s, s:s, s:s?, s:s, s:i, s:I, s:s, s:o?, s:b}", "name", m->name,
                    "source", m->source, "key", m->key, "hash", m->hash, "dtype", m->dtype,
                    "arena_size", (json_int_t)m->arena.size, "format",
                    m->mf ? m->mf->format : "", "devices", devs, "allow_gpu_write",
                    (int)m->allow_gpu_write);
    text = doc ? json_dumps(doc, JSON_COMPACT) : NULL;
    json_decref(doc);
    if (!text)
        return -ENOMEM;
    tlen = strlen(text);
    hdr[0] = (uint8_t)tlen;
    hdr[1] = (uint8_t)(tlen >> 8);
    hdr[2] = (uint8_t)(tlen >> 16);
    hdr[3] = (uint8_t)(tlen >> 24);
    rec = malloc(4 + tlen);
    if (!rec) {
        free(text);
        return -ENOMEM;
    }
    memcpy(rec, hdr, 4);
    memcpy(rec + 4, text, tlen);
    free(text);
    fd = sealed_blob("weightsd:record", rec, 4 + tlen, m->manifest_pb, m->manifest_pb_len);
    free(rec);
    return fd;
}

/* FDNAME of the export fd of the copy on cuda:\p device of model \p name with content \p hash
 * (a copy is only ever taken back for a record of the same content). */
static int gpu_fdname(char *dst, size_t size, int device, const char *hash, const char *name)
{
    char prefix[64];

    if (strlen(hash) != 32 || strspn(hash, "0123456789abcdef") != 32)
        return -EINVAL;
    snprintf(prefix, sizeof(prefix), PREFIX_GPU "%d.%s.", device, hash);
    return notify_fdname(dst, size, prefix, name);
}

/* Ordinals a copy can be on: the probed devices (none before a probe, nor without CUDA). */
static int gpu_ordinals(void)
{
    const gpu_probe_t *p = gpu_probe_peek();

    return p ? p->ndevices : 0;
}

/*
 * The store keeps the export fd of each VMM copy \p m is served from, and no other, so that
 * the allocation outlives a daemon crash or restart even with no worker mapping it (cuda.h,
 * cuMemRelease: memory goes with the last handle, shareable ones included) and the next start
 * takes it back instead of uploading again. Each name is removed before it is stored, since
 * FDSTORE=1 adds under a name and never replaces. Legacy IPC copies have no fd to keep.
 */
static void store_gpu(fdstore_t *fs, const model_t *m)
{
    for (int d = 0; d < gpu_ordinals(); d++) {
        const gpu_export_t *g = model_gpu(m, d);
        char gn[256];

        if (gpu_fdname(gn, sizeof(gn), d, m->hash, m->name) < 0)
            continue;
        (void)notify_fdstore_remove(fs->notify, gn);
        if (g && g->kind == GPU_HANDLE_POSIX_FD && g->fd >= 0 &&
            notify_fdstore(fs->notify, gn, g->fd) < 0)
            log_warning("fd store: cannot keep the cuda:%d copy of '%s'; a restart uploads it "
                        "again", d, m->name);
    }
}

static void on_ready(void *data, model_t *m)
{
    fdstore_t *fs = data;
    char an[256], mn[256];
    int fd;

    if (m->share_file || m->arena.fd < 0 || !fs->notify || fs->notify->fd < 0)
        return;
    if (notify_fdname(an, sizeof(an), PREFIX_ARENA, m->name) < 0 ||
        notify_fdname(mn, sizeof(mn), PREFIX_RECORD, m->name) < 0)
        return;
    fd = record_new(m);
    if (fd < 0) {
        log_warning("fd store: cannot record model '%s': %s, ignoring", m->name, strerror(-fd));
        return;
    }
    /* Record first: an arena without its record would be dropped at the next start anyway. */
    if (notify_fdstore(fs->notify, mn, fd) < 0 || notify_fdstore(fs->notify, an, m->arena.fd) < 0)
        log_warning("fd store: cannot store model '%s', ignoring", m->name);
    else
        log_debug("fd store: stored model '%s'", m->name);
    (void)close(fd);
    store_gpu(fs, m);
}

static void on_gone(void *data, model_t *m)
{
    fdstore_t *fs = data;
    char an[256], mn[256];

    if (m->share_file || !fs->notify || fs->notify->fd < 0)
        return;
    if (notify_fdname(an, sizeof(an), PREFIX_ARENA, m->name) == 0)
        (void)notify_fdstore_remove(fs->notify, an);
    if (notify_fdname(mn, sizeof(mn), PREFIX_RECORD, m->name) == 0)
        (void)notify_fdstore_remove(fs->notify, mn);
    for (int d = 0; d < gpu_ordinals(); d++)
        if (gpu_fdname(mn, sizeof(mn), d, m->hash, m->name) == 0)
            (void)notify_fdstore_remove(fs->notify, mn);
}

/*
 * A stored model gained or lost devices (one being evicted from counts as lost): its record
 * is replaced (removed, then stored anew, since the store keeps every fd under a name), and so
 * are its kept GPU fds. A crash between the two leaves the arena without a record, which the
 * next start drops: that model is then preloaded from its checkpoint again.
 */
static void on_devices(void *data, model_t *m)
{
    fdstore_t *fs = data;
    char mn[256];
    int fd;

    if (m->share_file || m->arena.fd < 0 || !fs->notify || fs->notify->fd < 0 ||
        notify_fdname(mn, sizeof(mn), PREFIX_RECORD, m->name) < 0)
        return;
    fd = record_new(m);
    if (fd < 0) {
        log_warning("fd store: cannot record the devices of '%s': %s, ignoring", m->name,
                    strerror(-fd));
        return;
    }
    if (notify_fdstore_remove(fs->notify, mn) < 0 || notify_fdstore(fs->notify, mn, fd) < 0)
        log_warning("fd store: cannot record the devices of '%s', ignoring", m->name);
    (void)close(fd);
    store_gpu(fs, m);
}

void fdstore_attach(fdstore_t *fs, registry_t *r)
{
    r->on_ready = on_ready;
    r->on_gone = on_gone;
    r->on_devices = on_devices;
    r->hook_data = fs;
}

/* The record's "devices": distinct CUDA ordinals below GPU_DEVICES_MAX, else none (with a
 * warning: the upload is a convenience, the model itself is fine). \retval the count. */
static size_t record_devices(const json_t *doc, const char *name, int *devs)
{
    const json_t *a = json_object_get(doc, "devices");
    size_t n = 0;

    if (!a)
        return 0;
    for (size_t i = 0; json_is_array(a) && i < json_array_size(a); i++) {
        const json_t *v = json_array_get(a, i);
        json_int_t d = json_is_integer(v) ? json_integer_value(v) : -1;
        bool dup = false;

        for (size_t k = 0; k < n; k++)
            dup = dup || devs[k] == d;
        if (d < 0 || d >= GPU_DEVICES_MAX || dup || n >= GPU_DEVICES_MAX) {
            log_warning("fd store: record of '%s' has bad devices, not uploading it again",
                        name);
            return 0;
        }
        devs[n++] = (int)d;
    }
    if (!json_is_array(a))
        log_warning("fd store: record of '%s' has bad devices, not uploading it again", name);
    return json_is_array(a) ? n : 0;
}

/* manifest_add_*()'s failure as manifest_from_pb() reports it. */
static int pb_fail(manifest_t *m, int r)
{
    manifest_free(m);
    return r == -ENOMEM ? -ENOMEM : -EINVAL;
}

/* Rebuilds a manifest from its wire form (arena offsets included) into *ret. A storage's dtype
 * is that of the first tensor on it (U8 for one no tensor uses), found in one pass over the
 * tensors. \retval 0, -ENOMEM, or -EINVAL (the record does not describe a model). */
static int manifest_from_pb(const Weightsd__V1__Manifest *pb, manifest_t **ret)
{
    manifest_t *m = manifest_new();
    int *dtype = calloc(pb->n_storages ? pb->n_storages : 1, sizeof(*dtype));
    int e;

    if (!m || !dtype) {
        free(dtype);
        return pb_fail(m, -ENOMEM);
    }
    for (size_t i = 0; i < pb->n_storages; i++)
        dtype[i] = -1;
    for (size_t k = 0; k < pb->n_tensors; k++) {
        uint32_t si = pb->tensors[k]->storage;

        if (si < pb->n_storages && dtype[si] < 0)
            dtype[si] = (int)pb->tensors[k]->dtype;
    }
    for (size_t i = 0; i < pb->n_storages; i++) {
        const Weightsd__V1__StorageInfo *s = pb->storages[i];

        e = manifest_add_storage(m, s->key, 0, s->offset, s->nbytes,
                                 dtype[i] < 0 ? WSD_DTYPE_U8 : dtype[i], NULL);
        if (e < 0) {
            free(dtype);
            return pb_fail(m, e);
        }
        m->storages[i].arena_offset = s->offset;
    }
    free(dtype);
    for (size_t i = 0; i < pb->n_tensors; i++) {
        const Weightsd__V1__TensorInfo *t = pb->tensors[i];
        mf_tensor_t mt = {.name = t->name, .dtype = (int)t->dtype, .ndim = (uint32_t)t->n_shape,
                          .storage = t->storage, .storage_offset = t->storage_offset};

        if (t->n_shape > WSD_MAX_NDIM || t->n_stride != t->n_shape)
            return pb_fail(m, -EINVAL);
        if (t->n_shape) {
            memcpy(mt.shape, t->shape, t->n_shape * sizeof(int64_t));
            memcpy(mt.stride, t->stride, t->n_stride * sizeof(int64_t));
        }
        e = manifest_add_tensor(m, &mt);
        if (e < 0)
            return pb_fail(m, e);
    }
    for (size_t i = 0; i < pb->n_meta; i++) {
        e = manifest_add_meta(m, pb->meta[i]->key, pb->meta[i]->value);
        if (e < 0)
            return pb_fail(m, e);
    }
    *ret = m;
    return 0;
}

/*
 * The export fds kept for \p name's copies on \p devs (-1 where none was), taken out of the
 * pending set. fdstore_purge() then takes every GPU name out of the store: once a copy is
 * taken back, on_devices stores its fd again, and one that cannot be is closed rather than
 * left there holding device memory.
 */
static void take_kept(fdstore_t *fs, const char *name, const char *hash, const int *devs,
                      size_t n, int *kept)
{
    for (size_t i = 0; i < n; i++) {
        char gn[256];

        kept[i] = -1;
        if (!hash || gpu_fdname(gn, sizeof(gn), devs[i], hash, name) < 0)
            continue;
        for (size_t k = 0; k < fs->npending; k++)
            if (fs->pending[k].fd >= 0 && strcmp(fs->pending[k].name, gn) == 0) {
                if (kept[i] < 0) {
                    kept[i] = fs->pending[k].fd;
                } else {
                    (void)close(fs->pending[k].fd); /* a second one under the name */
                }
                fs->pending[k].fd = -1;
            }
    }
}

/* Reads a record memfd (sealed, so its size cannot change under us). */
static int adopt_one(fdstore_t *fs, registry_t *r, int rec_fd, int arena_fd, const char *want)
{
    Weightsd__V1__Manifest *pb = NULL;
    json_t *doc = NULL;
    json_error_t je;
    manifest_t *mf = NULL;
    uint8_t *buf = NULL;
    off_t size = lseek(rec_fd, 0, SEEK_END);
    uint32_t tlen;
    char msg[512];
    int r2 = WSD_EBADCKPT, k;

    if (size < 4 || size > (off_t)RECORD_MAX)
        goto out;
    buf = malloc((size_t)size);
    if (!buf) {
        r2 = -ENOMEM;
        goto out;
    }
    if (pread(rec_fd, buf, (size_t)size, 0) != size)
        goto out;
    tlen = (uint32_t)buf[0] | (uint32_t)buf[1] << 8 | (uint32_t)buf[2] << 16 |
           (uint32_t)buf[3] << 24;
    if (tlen > (uint64_t)size - 4)
        goto out;
    doc = json_loadb((const char *)buf + 4, tlen, 0, &je);
    /* jansson says nothing when an allocation fails before it has begun to parse */
    if (!doc && (json_error_code(&je) == json_error_out_of_memory || !je.text[0])) {
        r2 = -ENOMEM;
        goto out;
    }
    pb = weightsd__v1__manifest__unpack(NULL, (size_t)size - 4 - tlen, buf + 4 + tlen);
    if (!doc || !pb || !json_is_string(json_object_get(doc, "name")) ||
        strcmp(json_string_value(json_object_get(doc, "name")), want) != 0)
        goto out;
    k = manifest_from_pb(pb, &mf);
    if (k < 0) {
        r2 = k == -ENOMEM ? -ENOMEM : WSD_EBADCKPT;
        goto out;
    }
    snprintf(mf->format, sizeof(mf->format), "%s",
             json_string_value(json_object_get(doc, "format")) ?: "");
    r2 = registry_adopt(r, want, json_string_value(json_object_get(doc, "source")),
                        json_string_value(json_object_get(doc, "key")), /* NULL if none */
                        json_string_value(json_object_get(doc, "hash")),
                        (int)json_integer_value(json_object_get(doc, "dtype")), mf, arena_fd,
                        (uint64_t)json_integer_value(json_object_get(doc, "arena_size")), msg,
                        sizeof(msg));
    mf = NULL; /* taken over, or freed, by registry_adopt */
    if (r2 < 0)
        log_warning("fd store: not re-adopting '%s': %s", want, msg);
    if (r2 == 0) {
        int devs[GPU_DEVICES_MAX], kept[GPU_DEVICES_MAX];
        size_t n = record_devices(doc, want, devs);

        take_kept(fs, want, json_string_value(json_object_get(doc, "hash")), devs, n, kept);
        if (n && registry_upload_again(r, want, devs, n, kept,
                                       json_is_true(json_object_get(doc, "allow_gpu_write")),
                                       msg, sizeof(msg)) < 0)
            log_error("fd store: cannot upload '%s' to its devices again: %s; it is served on "
                      "the host tier", want, msg);
    }
out:
    if (r2 == -ENOMEM)
        log_warning("fd store: out of memory re-adopting '%s'; it stays in the store for the "
                    "next start", want);
    else if (r2 == WSD_EBADCKPT && !doc)
        log_warning("fd store: unreadable record for '%s', dropping it", want);
    manifest_free(mf);
    if (pb)
        weightsd__v1__manifest__free_unpacked(pb, NULL);
    json_decref(doc);
    free(buf);
    return r2;
}

unsigned fdstore_adopt_all(fdstore_t *fs, registry_t *r)
{
    unsigned adopted = 0;

    for (size_t i = 0; i < fs->npending; i++) {
        char name[256];
        int rec = -1, res;

        if (fs->pending[i].fd < 0 || strncmp(fs->pending[i].name, PREFIX_ARENA,
                                             strlen(PREFIX_ARENA)) != 0)
            continue;
        if (notify_fdname_decode(name, sizeof(name), PREFIX_ARENA, fs->pending[i].name) < 0)
            continue;
        for (size_t k = 0; k < fs->npending; k++)
            if (fs->pending[k].fd >= 0 &&
                strncmp(fs->pending[k].name, PREFIX_RECORD, strlen(PREFIX_RECORD)) == 0 &&
                strcmp(fs->pending[k].name + strlen(PREFIX_RECORD),
                       fs->pending[i].name + strlen(PREFIX_ARENA)) == 0)
                rec = (int)k;
        if (rec < 0)
            continue;
        res = adopt_one(fs, r, fs->pending[rec].fd, fs->pending[i].fd, name);
        if (res == 0) {
            fs->pending[i].fd = -1; /* the registry owns the arena now */
            adopted++;
        } else if (res == -ENOMEM) { /* not the model's fault: kept for the next start */
            fs->pending[i].keep = true;
            fs->pending[rec].keep = true;
        }
    }
    return adopted;
}

void fdstore_purge(fdstore_t *fs, registry_t *r)
{
    /* Whatever could not be adopted is useless in the store: ask for its removal. */
    for (size_t i = 0; i < fs->npending; i++) {
        if (strncmp(fs->pending[i].name, PREFIX_GPU, strlen(PREFIX_GPU)) == 0) {
            (void)notify_fdstore_remove(fs->notify, fs->pending[i].name); /* see take_kept() */
            continue;
        }
        if (fs->pending[i].fd >= 0 && !fs->pending[i].keep) {
            bool record = strncmp(fs->pending[i].name, PREFIX_RECORD, strlen(PREFIX_RECORD)) == 0;
            char name[256];

            /* An arena left here belongs to nothing adopted; so does a record without its
             * model. */
            if (!record || (notify_fdname_decode(name, sizeof(name), PREFIX_RECORD,
                                                 fs->pending[i].name) == 0 &&
                            !registry_find(r, name)))
                (void)notify_fdstore_remove(fs->notify, fs->pending[i].name);
        }
    }
    fdstore_done(fs);
}
