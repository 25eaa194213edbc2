/*
 * dlpack.c - DLPack export of an open model's tensors and storages (libweightsd).
 *
 * Divided into: the dtype mapping (wsd_dtype_t -> DLDataType, limited to what the installed
 * dlpack.h can name) and the two exported calls; the bounds of every tensor were checked when
 * its model was opened (client/extent.c). A DLManagedTensor made here owns nothing of the
 * model: its deleter runs the caller's release callback, which is where the caller drops
 * whatever keeps the mapping alive (the Python layer unpins its model object there), and then
 * frees the struct itself.
 */
#include "weightsd.h"

#include <dlpack/dlpack.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>

/* One allocation per exported tensor; managed.manager_ctx points back at it. */
typedef struct dlpack_holder {
    DLManagedTensor managed;       /* what the consumer receives; must stay the first member */
    int64_t shape[WSD_MAX_NDIM];   /* managed.dl_tensor.shape points here */
    int64_t strides[WSD_MAX_NDIM]; /* managed.dl_tensor.strides points here, in elements */
    wsd_dlpack_release_fn release; /* caller's callback, run once by the deleter; may be NULL */
    void *ctx;                     /* argument for release */
} dlpack_holder_t;

/* kDLBool arrived in DLPack 0.8; 1.x headers define DLPACK_MAJOR_VERSION instead. */
#if defined(DLPACK_MAJOR_VERSION) || (defined(DLPACK_VERSION) && DLPACK_VERSION >= 80)
#    define DLPACK_HAS_BOOL 1
#else
#    define DLPACK_HAS_BOOL 0
#endif

static int dtype_to_dl(int dtype, DLDataType *ret)
{
    DLDataType dt = {.lanes = 1};

    switch (dtype) {
    case WSD_DTYPE_U8:
    case WSD_DTYPE_U16:
    case WSD_DTYPE_U32:
    case WSD_DTYPE_U64:
        dt.code = kDLUInt;
        break;
    case WSD_DTYPE_I8:
    case WSD_DTYPE_I16:
    case WSD_DTYPE_I32:
    case WSD_DTYPE_I64:
        dt.code = kDLInt;
        break;
    case WSD_DTYPE_F16:
    case WSD_DTYPE_F32:
    case WSD_DTYPE_F64:
        dt.code = kDLFloat;
        break;
    case WSD_DTYPE_BF16:
        dt.code = kDLBfloat;
        break;
    case WSD_DTYPE_C64:
    case WSD_DTYPE_C128:
        dt.code = kDLComplex;
        break;
#if DLPACK_HAS_BOOL
    case WSD_DTYPE_BOOL:
        dt.code = kDLBool;
        break;
#endif
    default:
        /* BOOL before DLPack 0.8, the 8-bit floats and the sub-byte types have no code here. */
        return -EOPNOTSUPP;
    }
    dt.bits = (uint8_t)wsd_dtype_bits(dtype);
    *ret = dt;
    return 0;
}

static void holder_deleter(DLManagedTensor *self)
{
    dlpack_holder_t *h = self->manager_ctx;

    if (h->release)
        h->release(h->ctx);
    free(h);
}

static dlpack_holder_t *holder_new(void *data, int device, int ndim, DLDataType dt,
                                   wsd_dlpack_release_fn release, void *ctx)
{
    dlpack_holder_t *h = calloc(1, sizeof(*h));

    if (!h)
        return NULL;
    h->release = release;
    h->ctx = ctx;
    h->managed.dl_tensor.data = data;
    /* A model opened on "cuda:N" hands out device addresses of its shared import. */
    h->managed.dl_tensor.device = device < 0 ? (DLDevice){.device_type = kDLCPU, .device_id = 0}
                                             : (DLDevice){.device_type = kDLCUDA,
                                                          .device_id = device};
    h->managed.dl_tensor.ndim = ndim;
    h->managed.dl_tensor.dtype = dt;
    h->managed.dl_tensor.shape = h->shape;
    h->managed.dl_tensor.strides = h->strides;
    h->managed.dl_tensor.byte_offset = 0;
    h->managed.manager_ctx = h;
    h->managed.deleter = holder_deleter;
    return h;
}

WSD_EXTERN int wsd_tensor_dlpack(const wsd_model_t *m, size_t i, wsd_dlpack_release_fn release,
                                 void *ctx, struct DLManagedTensor **ret_managed)
{
    const wsd_tensor_t *t = wsd_model_tensor(m, i);
    dlpack_holder_t *h;
    DLDataType dt;
    unsigned ndim;
    int r;

    if (!t || !ret_managed)
        return -EINVAL;
    r = dtype_to_dl(wsd_tensor_dtype(t), &dt);
    if (r < 0)
        return r;
    /* No bounds check here: wsd_open() refused any manifest with a tensor outside its storage
     * (client/extent.c), so every tensor of an open model fits. */
    ndim = wsd_tensor_ndim(t);
    /* Data points at element 0 with byte_offset 0: not every consumer honours byte_offset. */
    h = holder_new(wsd_tensor_data(t), wsd_model_device(m), (int)ndim, dt, release, ctx);
    if (!h)
        return -ENOMEM;
    for (unsigned d = 0; d < ndim; d++) {
        h->shape[d] = wsd_tensor_shape(t)[d];
        h->strides[d] = wsd_tensor_strides(t)[d];
    }
    *ret_managed = &h->managed;
    return 0;
}

WSD_EXTERN int wsd_storage_dlpack(const wsd_model_t *m, size_t i, wsd_dlpack_release_fn release,
                                  void *ctx, struct DLManagedTensor **ret_managed)
{
    const DLDataType u8 = {.code = kDLUInt, .bits = 8, .lanes = 1};
    dlpack_holder_t *h;
    void *data = NULL;
    uint64_t nbytes = 0;

    if (!ret_managed || wsd_model_storage(m, i, &data, &nbytes) < 0 || nbytes > INT64_MAX)
        return -EINVAL;
    h = holder_new(data, wsd_model_device(m), 1, u8, release, ctx);
    if (!h)
        return -ENOMEM;
    h->shape[0] = (int64_t)nbytes;
    h->strides[0] = 1;
    *ret_managed = &h->managed;
    return 0;
}

WSD_EXTERN void wsd_dlpack_free(struct DLManagedTensor *managed)
{
    if (managed && managed->deleter)
        managed->deleter(managed);
}
