/*
 * weightsd.h - the public interface of libweightsd.
 *
 * libweightsd talks to a running weightsd daemon over its Unix sockets. Workers use the client
 * socket: wsd_connect(), wsd_open() a model, read its tensors through opaque wsd_tensor_t
 * handles, wsd_model_free() when done. Operators (and weightsctl) use the admin socket through
 * wsd_admin_*(), whose replies are JSON documents.
 *
 * Conventions (shared by every function here):
 *  - Fallible functions return int: >= 0 on success, < 0 on failure, either -errno or one of the
 *    WSD_E* codes below (all <= -1000). wsd_strerror() names any of them.
 *  - ret_* out-parameters are written only on success.
 *  - Handles are opaque; *_free() accepts NULL.
 *
 * Threads. The library's only shared state is the process's table of GPU imports (locked) and
 * wsd_default_socket()'s buffer; distinct clients, with their models, are independent. Within
 * one client:
 *  - A wsd_client_t is one blocking connection with no lock of its own. Its connection calls
 *    must not overlap: wsd_open(), wsd_open_with(), wsd_admin_*(), wsd_set_timeout(),
 *    wsd_last_error() and wsd_close() on it, and wsd_model_release() or wsd_model_free() of a
 *    model opened through it that still holds its lease (both send the release on that
 *    connection). So two threads may not have requests in flight on one client at once:
 *    serialise them (one mutex per client, as the Python layer does) or use a client each.
 *  - An open model is read-only: its accessors (every wsd_model_*() call but
 *    wsd_model_release() and wsd_model_free(), and every wsd_tensor_*() call, DLPack export
 *    included) may run on any number of threads at once, also while its client is busy on
 *    another thread. wsd_model_release(m) and wsd_model_free(m) must not overlap any other
 *    call on m. A DLManagedTensor's deleter may run on any thread.
 *  - wsd_model_free() of a model that holds no lease any more (wsd_model_release() on it, or
 *    wsd_close() on its client, has returned and is ordered before the free, as any handover
 *    of a handle between threads is) touches the client only through its atomic reference
 *    count. It may run on any thread, at the same time as connection calls on that client,
 *    wsd_close() included, and as frees of the client's other models; whichever drops the
 *    last reference frees the client.
 *  - wsd_default_socket() returns a static buffer: one thread at a time. wsd_version() and
 *    the wsd_dtype_*() functions may be called from any thread; so may wsd_strerror(), as far
 *    as the C library's strerror() may, which it calls for -errno values (glibc's may).
 */
#ifndef WEIGHTSD_H
#define WEIGHTSD_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(WSD_BUILDING_LIBRARY)
#    define WSD_EXTERN __attribute__((visibility("default")))
#else
#    define WSD_EXTERN
#endif
#define WSD_MUST_CHECK __attribute__((warn_unused_result))

#define WSD_VERSION_MAJOR 0
#define WSD_VERSION_MINOR 1
#define WSD_VERSION_PATCH 0
#define WSD_VERSION_HEX   ((WSD_VERSION_MAJOR << 16) | (WSD_VERSION_MINOR << 8) | WSD_VERSION_PATCH)

/* Wire protocol version carried by HELLO; versioned apart from the library ABI. */
#define WSD_PROTOCOL_VERSION 1

/* Error codes. Values are part of the wire protocol (Error.code) and of the ABI. */
enum {
    WSD_EPROTO = -1000,     /* peer broke the protocol (bad frame, bad message, unexpected fds) */
    WSD_EVERSION = -1001,   /* protocol version not supported by the peer */
    WSD_ENOTFOUND = -1002,  /* no model by that name */
    WSD_EEXIST = -1003,     /* a model by that name exists already */
    WSD_EBADCKPT = -1004,   /* the checkpoint file is malformed or unsupported */
    WSD_EBUSY = -1005,      /* model has leases (evict) or is in a state that forbids this */
    WSD_ELOADING = -1006,   /* model is still loading */
    WSD_ENODEV = -1007,     /* requested device does not exist or is unavailable */
    WSD_ELIMIT = -1008,     /* a configured limit was hit (frame size, leases, connections) */
    WSD_EDENIED = -1009,    /* access policy refused the request */
    WSD_ENOLEASE = -1010,   /* lease id unknown to this connection */
    WSD_EIO = -1011,        /* reading the checkpoint failed */
    WSD_ENOMEM = -1012,     /* memory budget or allocation failure */
    WSD_EGPU = -1013,       /* CUDA failure */
    WSD_ESTALE = -1014,     /* model's source changed under it */
    WSD_ECLOSED = -1015,    /* connection is closed */
    WSD_EINVAL = -1016,     /* request carries an invalid argument */
    WSD_EINTERNAL = -1017,  /* bug in weightsd */
    WSD_EMISMATCH = -1018,  /* content hash differs from the expected one */
    WSD_ECANCELED = -1019,  /* the preload was cancelled */
};

/*
 * Element types. Names (wsd_dtype_name) are the safetensors spellings, whatever the source
 * format. Numeric values are stable: they travel on the wire.
 */
typedef enum wsd_dtype {
    WSD_DTYPE_BOOL = 0,
    WSD_DTYPE_U8 = 1,
    WSD_DTYPE_I8 = 2,
    WSD_DTYPE_I16 = 3,
    WSD_DTYPE_U16 = 4,
    WSD_DTYPE_F16 = 5,
    WSD_DTYPE_BF16 = 6,
    WSD_DTYPE_I32 = 7,
    WSD_DTYPE_U32 = 8,
    WSD_DTYPE_F32 = 9,
    WSD_DTYPE_F64 = 10,
    WSD_DTYPE_I64 = 11,
    WSD_DTYPE_U64 = 12,
    WSD_DTYPE_F8_E5M2 = 13,
    WSD_DTYPE_F8_E4M3 = 14,
    WSD_DTYPE_F8_E8M0 = 15,
    WSD_DTYPE_F8_E4M3FNUZ = 16,
    WSD_DTYPE_F8_E5M2FNUZ = 17,
    WSD_DTYPE_F4 = 18,
    WSD_DTYPE_F6_E2M3 = 19,
    WSD_DTYPE_F6_E3M2 = 20,
    WSD_DTYPE_C64 = 21,
    WSD_DTYPE_C128 = 22, /* torch complex128; not a safetensors dtype */
    _WSD_DTYPE_MAX,
    _WSD_DTYPE_INVALID = -22 /* -EINVAL */
} wsd_dtype_t;

/* Most dimensions a tensor may have; deeper tensors are rejected at preload. */
#define WSD_MAX_NDIM 8

typedef struct wsd_client wsd_client_t;
typedef struct wsd_model wsd_model_t;
typedef struct wsd_tensor wsd_tensor_t;

/** \retval WSD_VERSION_HEX of the library actually loaded. */
WSD_EXTERN unsigned wsd_version(void);

/** \retval a static, human string for any return code of this library (never NULL). */
WSD_EXTERN const char *wsd_strerror(int err);

/** \retval safetensors name of \p dtype ("F32", ...), or NULL for an unknown value. */
WSD_EXTERN const char *wsd_dtype_name(int dtype);

/** \retval bits per element of \p dtype (4 for F4, 6 for F6_*), 0 for an unknown value. */
WSD_EXTERN unsigned wsd_dtype_bits(int dtype);

/** Parses a safetensors dtype name. \retval the wsd_dtype_t value, or -EINVAL. */
WSD_EXTERN int wsd_dtype_from_name(const char *name);

/**
 * Default client socket path: $WEIGHTSD_SOCKET, else /run/weightsd/weightsd.sock for root,
 * else $XDG_RUNTIME_DIR/weightsd/weightsd.sock. Admin: $WEIGHTSD_ADMIN_SOCKET, else admin.sock
 * in the same directory.
 * \param[in] admin  non-zero for the admin socket.
 * \retval pointer to a static buffer (overwritten by the next call), or NULL if no directory is
 *         known (non-root without $XDG_RUNTIME_DIR).
 */
WSD_EXTERN const char *wsd_default_socket(int admin);

/**
 * Connects to a daemon socket and performs the HELLO exchange.
 * \param[in]  path        socket path; NULL means wsd_default_socket(0).
 * \param[out] ret_client  new handle; free with wsd_close().
 * \retval 0, -errno from connect(), WSD_EVERSION, WSD_EPROTO; or, refused at HELLO,
 *         WSD_EDENIED (the daemon's access policy does not admit this peer's uid/groups) or
 *         WSD_ELIMIT (over the daemon's total or per-uid connection limit; try again later).
 */
WSD_EXTERN WSD_MUST_CHECK int wsd_connect(const char *path, wsd_client_t **ret_client);

/**
 * Sets the timeout for every later request on \p c, in milliseconds (default 30000; 0 = wait
 * forever). \retval 0 or -EINVAL.
 */
WSD_EXTERN int wsd_set_timeout(wsd_client_t *c, int timeout_ms);

/**
 * Closes the connection. The daemon releases every lease this connection held. Models opened
 * through \p c stay mapped and readable until each is passed to wsd_model_free(). NULL is fine.
 */
WSD_EXTERN void wsd_close(wsd_client_t *c);

/** \retval message of the last error the daemon sent on \p c ("" if none). Valid until the next call. */
WSD_EXTERN const char *wsd_last_error(const wsd_client_t *c);

/* Flags for wsd_open(). */
#define WSD_OPEN_WAIT (1u << 0) /* if the model is still loading, wait instead of WSD_ELOADING */
#define WSD_OPEN_GPU_WRITE (1u << 1) /* map a GPU copy writable (needs --allow-gpu-write) */

/**
 * Opens (leases) a model and maps its memory: MAP_PRIVATE, PROT_READ|PROT_WRITE, so writes stay
 * private to this process (copy-on-write) and other workers never see them.
 * \param[in]  c          connected client.
 * \param[in]  name       model name.
 * \param[in]  device     "cpu" or NULL (host tier), or "cuda:N": the daemon's copy on its GPU N
 *                        (N counts the daemon's devices; the worker finds that GPU by UUID),
 *                        imported (CUDA VMM fd, or legacy IPC handle), mapped read-only unless
 *                        WSD_OPEN_GPU_WRITE; tensor data pointers are then device addresses.
 *                        Every open of one model on one device in a process shares one import.
 *                        libcuda.so.1 is loaded at run time, so this library never needs CUDA.
 * \param[in]  flags      WSD_OPEN_* flags.
 * \param[out] ret_model  new handle; free with wsd_model_free(). Holds its own reference on the
 *                        connection's state, so it may outlive wsd_close(c).
 * \retval 0, WSD_ENOTFOUND, WSD_ELOADING, WSD_ENODEV, WSD_EPROTO, WSD_ECLOSED, WSD_EGPU (CUDA
 *         import failed, or no libcuda.so.1), WSD_EDENIED (writable GPU map not allowed), -errno.
 *         WSD_EPROTO also when the manifest has a tensor whose elements (offset, sizes and
 *         strides) or nbytes reach outside its storage: the library checks every tensor itself
 *         before handing out the model, and wsd_last_error() names the tensor.
 */
WSD_EXTERN WSD_MUST_CHECK int wsd_open(wsd_client_t *c, const char *name, const char *device,
                                       unsigned flags, wsd_model_t **ret_model);

/* Options for wsd_open_with(); zero-initialise, set size, then what you need. */
typedef struct wsd_open_opts {
    size_t size;             /* sizeof(wsd_open_opts_t), for growth (A2) */
    const char *device;      /* as wsd_open(); NULL = "cpu" */
    unsigned flags;          /* WSD_OPEN_* */
    const char *expect_hash; /* refuse (WSD_EMISMATCH) unless the model's content hash is this */
    /* Where the daemon allows it (allow-client-preload), a checkpoint to load as the model if
     * it is not resident yet; the open then waits for the load. */
    const char *path;
} wsd_open_opts_t;

/** wsd_open() with options; \retval as wsd_open(), plus WSD_EMISMATCH. */
WSD_EXTERN WSD_MUST_CHECK int wsd_open_with(wsd_client_t *c, const char *name,
                                            const wsd_open_opts_t *opts, wsd_model_t **ret_model);

/**
 * Releases the lease (if the connection is still open) and unmaps. Every pointer obtained from
 * the model (tensor handles, data pointers) is invalid afterwards. NULL is fine.
 */
WSD_EXTERN void wsd_model_free(wsd_model_t *m);

/** Releases the lease now but keeps the mapping (data stays valid until wsd_model_free()). */
WSD_EXTERN int wsd_model_release(wsd_model_t *m);

WSD_EXTERN const char *wsd_model_name(const wsd_model_t *m);
WSD_EXTERN size_t wsd_model_tensor_count(const wsd_model_t *m);
/** \retval base address of the whole mapping, and in \p ret_size its length (may be NULL). */
WSD_EXTERN const void *wsd_model_base(const wsd_model_t *m, uint64_t *ret_size);
/** \retval lease id the daemon granted. */
WSD_EXTERN uint64_t wsd_model_lease(const wsd_model_t *m);
/** \retval content hash as lowercase hex ("" when the daemon sent none). */
WSD_EXTERN const char *wsd_model_hash(const wsd_model_t *m);
/**
 * \retval -1 when the model's memory is host memory, else the CUDA ordinal, in this process, of
 *         the device holding it (data pointers are device addresses then; read them from
 *         kernels, not from the CPU). The device is matched by UUID, so under
 *         CUDA_VISIBLE_DEVICES this may differ from the N of the "cuda:N" that was opened.
 */
WSD_EXTERN int wsd_model_device(const wsd_model_t *m);

/** \retval tensor \p i in manifest order, or NULL when \p i is out of range. */
WSD_EXTERN const wsd_tensor_t *wsd_model_tensor(const wsd_model_t *m, size_t i);
/** \retval the tensor named \p name, or NULL. */
WSD_EXTERN const wsd_tensor_t *wsd_model_find(const wsd_model_t *m, const char *name);

/** Number of storages (byte ranges tensors point into; tied weights share one). */
WSD_EXTERN size_t wsd_model_storage_count(const wsd_model_t *m);
/** Storage \p i: its data pointer and length in bytes. \retval 0 or -EINVAL. */
WSD_EXTERN int wsd_model_storage(const wsd_model_t *m, size_t i, void **ret_data,
                                 uint64_t *ret_nbytes);

WSD_EXTERN const char *wsd_tensor_name(const wsd_tensor_t *t);
WSD_EXTERN int wsd_tensor_dtype(const wsd_tensor_t *t);
WSD_EXTERN unsigned wsd_tensor_ndim(const wsd_tensor_t *t);
/** \retval array of wsd_tensor_ndim() sizes. */
WSD_EXTERN const int64_t *wsd_tensor_shape(const wsd_tensor_t *t);
/** \retval array of wsd_tensor_ndim() strides, in elements. */
WSD_EXTERN const int64_t *wsd_tensor_strides(const wsd_tensor_t *t);
/** \retval index of the storage this tensor views. */
WSD_EXTERN size_t wsd_tensor_storage(const wsd_tensor_t *t);
/** \retval offset into its storage, in elements. */
WSD_EXTERN uint64_t wsd_tensor_storage_offset(const wsd_tensor_t *t);
/** \retval bytes spanned by the tensor's elements (numel * itemsize; 0 for empty tensors). */
WSD_EXTERN uint64_t wsd_tensor_nbytes(const wsd_tensor_t *t);
/** \retval address of element 0 (storage data + storage_offset * itemsize). Writable, private. */
WSD_EXTERN void *wsd_tensor_data(const wsd_tensor_t *t);

/*
 * Everything about a tensor in one call, for bindings: a foreign-function call per model
 * rather than one per field (Python spends ~1 us on each). Pointers stay valid while the
 * model is.
 */
typedef struct wsd_tensor_info {
    const char *name;
    int dtype;                /* wsd_dtype_t */
    unsigned ndim;
    const int64_t *shape;     /* ndim entries */
    const int64_t *strides;   /* ndim entries, in elements */
    size_t storage;           /* index */
    uint64_t storage_offset;  /* elements */
    uint64_t nbytes;          /* as wsd_tensor_nbytes() */
    void *storage_data;       /* the storage's first byte (a device address on cuda:N) */
    uint64_t storage_nbytes;
} wsd_tensor_info_t;

/**
 * Describes tensors \p first .. \p first + \p n - 1 into \p out, whose elements are \p
 * stride bytes apart: pass sizeof(wsd_tensor_info_t). Fields that do not fit in \p stride are
 * not written, so a caller built against an older, shorter struct keeps working (A2).
 * \retval tensors described (n, or fewer at the end of the model), or -EINVAL.
 */
WSD_EXTERN int wsd_model_tensor_info(const wsd_model_t *m, size_t first, size_t n,
                                     wsd_tensor_info_t *out, size_t stride);

/*
 * Admin interface (admin socket). Each call sends one request and returns the daemon's answer
 * as a JSON document in *ret_json (malloc'ed; the caller frees it). On failure the daemon's
 * message is available through wsd_last_error().
 */

/* Options for wsd_admin_preload(); zero-initialise and set what you need. */
typedef struct wsd_preload_opts {
    size_t size;       /* sizeof(wsd_preload_opts_t), for growth (A2) */
    const char *dtype; /* "bf16", "f16", "f32" or NULL: convert floating tensors */
    const char *share; /* "memfd" (default) or "file" */
    const char *key;   /* serve only this subtree of a nested checkpoint */
    int no_verify;     /* skip CRC-32 checks of zip records */
    /* Called while the preload runs (phase "parse", "copy" into the host tier, then "upload"
     * to the devices with bytes counted afresh; bytes done of total); NULL for none. Runs
     * inside wsd_admin_preload() on the caller's thread. */
    void (*progress)(void *data, const char *phase, uint64_t done, uint64_t total);
    void *progress_data;
    int cancel_on_disconnect; /* the daemon cancels the preload if this connection closes */
    const char *hugepages;    /* "auto" (default), "never" or "always": 2 MiB pages */
    const char *const *devices; /* ndevices of "cpu" / "cuda:N": also upload to these GPUs */
    size_t ndevices;
    int allow_gpu_write; /* let workers map the GPU copies writable (WSD_OPEN_GPU_WRITE) */
    /* "auto" (default): drop the checkpoint pages this preload brought into the page cache
     * once they are copied; "drop": all of them; "keep": none. File mode always keeps. */
    const char *page_cache;
} wsd_preload_opts_t;

/** Preloads \p path as \p name. \retval 0, WSD_EEXIST, WSD_EBADCKPT, WSD_EIO, ... */
WSD_EXTERN WSD_MUST_CHECK int wsd_admin_preload(wsd_client_t *c, const char *name,
                                                const char *path, const wsd_preload_opts_t *opts,
                                                char **ret_json);
/* Flags for wsd_admin_evict(). */
#define WSD_EVICT_DRAIN (1u << 0) /* refuse new opens; free when the last lease goes */
#define WSD_EVICT_FORCE (1u << 1) /* free now even with leases (mapped workers keep their pages) */
WSD_EXTERN WSD_MUST_CHECK int wsd_admin_evict(wsd_client_t *c, const char *name, unsigned flags,
                                              char **ret_json);
/** Frees only the copy of \p name on \p device ("cuda:N"); the model stays served on the host
 * tier and its other devices. \p flags as wsd_admin_evict(), counting the leases on that
 * device. \retval 0, WSD_ENOTFOUND, WSD_ENODEV (not on that device), WSD_EBUSY, ... */
WSD_EXTERN WSD_MUST_CHECK int wsd_admin_evict_device(wsd_client_t *c, const char *name,
                                                     const char *device, unsigned flags,
                                                     char **ret_json);
/** Cancels the preload of \p name (state loading). \retval 0, WSD_ENOTFOUND, WSD_EBUSY. */
WSD_EXTERN WSD_MUST_CHECK int wsd_admin_cancel(wsd_client_t *c, const char *name, char **ret_json);
WSD_EXTERN WSD_MUST_CHECK int wsd_admin_list(wsd_client_t *c, char **ret_json);
/** One model, with every tensor in one reply: WSD_ELIMIT when the list passes the 64 MiB one
 * reply carries (about 5 * 10^5 tensors); wsd_admin_info_page() reads any model. */
WSD_EXTERN WSD_MUST_CHECK int wsd_admin_info(wsd_client_t *c, const char *name, char **ret_json);
/* Flags for wsd_admin_info_page(). */
#define WSD_INFO_NO_TENSORS (1u << 0) /* the summary alone: no "tensors" in the document */
/**
 * One model, with a page of its tensors: the document's "tensors" holds those from \p offset
 * on (its "tensor_offset"), at most \p limit of them (0: all, as wsd_admin_info()) and fewer
 * where the page would pass 8 MiB of JSON, but never none while any remain. Read a model
 * whole by asking again at offset + the page's length until "ntensors".
 * \retval 0, WSD_ENOTFOUND, WSD_EINVAL (\p offset past the last tensor), WSD_ELIMIT, ...
 */
WSD_EXTERN WSD_MUST_CHECK int wsd_admin_info_page(wsd_client_t *c, const char *name,
                                                  uint64_t offset, uint64_t limit,
                                                  unsigned flags, char **ret_json);
WSD_EXTERN WSD_MUST_CHECK int wsd_admin_stats(wsd_client_t *c, char **ret_json);

/*
 * DLPack export (client/dlpack.c). The structs come from <dlpack/dlpack.h>; this header only
 * names them, so including weightsd.h does not require the DLPack header.
 */
struct DLManagedTensor;

/** Run once by the deleter of a DLManagedTensor made below, with the \p ctx given there. */
typedef void (*wsd_dlpack_release_fn)(void *ctx);

/**
 * Describes tensor \p i of \p m as a DLPack tensor: kDLCPU (kDLCUDA with device_id N for a
 * model opened on "cuda:N"), its dtype, shape and strides, data
 * at element 0 with byte_offset 0. The memory is the model's mapping: the caller keeps \p m
 * alive (not wsd_model_free()'d) until \p release has run.
 * \param[in]  m            open model.
 * \param[in]  i            tensor index, as for wsd_model_tensor().
 * \param[in]  release      called once from the deleter before it frees the struct; may be NULL.
 * \param[in]  ctx          passed to \p release.
 * \param[out] ret_managed  new DLManagedTensor; its consumer calls ->deleter (or, if it was
 *                          never consumed, the producer calls wsd_dlpack_free()).
 * \retval 0, -EINVAL, -EOPNOTSUPP (a dtype the installed DLPack cannot name: BOOL before
 *         DLPack 0.8, F8_*, F6_*, F4), -ENOMEM. (A tensor outside its storage never gets this
 *         far: wsd_open() refuses its manifest.)
 */
WSD_EXTERN WSD_MUST_CHECK int wsd_tensor_dlpack(const wsd_model_t *m, size_t i,
                                                wsd_dlpack_release_fn release, void *ctx,
                                                struct DLManagedTensor **ret_managed);

/**
 * Describes storage \p i of \p m (see wsd_model_storage()) as a one-dimensional DLPack tensor
 * of its bytes (kDLUInt, 8 bits), on the model's device, with the lifetime rules of
 * wsd_tensor_dlpack(). Any dtype can be viewed over it (torch: Tensor.set_() on its storage),
 * including those DLPack cannot name, and tensors of one storage then share one consumer
 * storage. \retval 0, -EINVAL (no such storage), -ENOMEM.
 */
WSD_EXTERN WSD_MUST_CHECK int wsd_storage_dlpack(const wsd_model_t *m, size_t i,
                                                 wsd_dlpack_release_fn release, void *ctx,
                                                 struct DLManagedTensor **ret_managed);

/** Runs \p managed's deleter (a tensor nobody consumed). NULL is fine. */
WSD_EXTERN void wsd_dlpack_free(struct DLManagedTensor *managed);

#ifdef __cplusplus
}
#endif
#endif /* WEIGHTSD_H */
