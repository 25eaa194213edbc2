/*
 * common.c - the vocabulary both sides of the wire share: error strings and dtype names. Lives in
 * the proto library so the daemon and libweightsd agree by construction; exported from
 * libweightsd as part of its public API.
 */
#include <errno.h>
#include <string.h>

#include "weightsd.h"

struct dtype_desc {
    const char *name;
    unsigned bits;
};

static const struct dtype_desc dtypes[_WSD_DTYPE_MAX] = {
    [WSD_DTYPE_BOOL] = {"BOOL", 8},
    [WSD_DTYPE_U8] = {"U8", 8},
    [WSD_DTYPE_I8] = {"I8", 8},
    [WSD_DTYPE_I16] = {"I16", 16},
    [WSD_DTYPE_U16] = {"U16", 16},
    [WSD_DTYPE_F16] = {"F16", 16},
    [WSD_DTYPE_BF16] = {"BF16", 16},
    [WSD_DTYPE_I32] = {"I32", 32},
    [WSD_DTYPE_U32] = {"U32", 32},
    [WSD_DTYPE_F32] = {"F32", 32},
    [WSD_DTYPE_F64] = {"F64", 64},
    [WSD_DTYPE_I64] = {"I64", 64},
    [WSD_DTYPE_U64] = {"U64", 64},
    [WSD_DTYPE_F8_E5M2] = {"F8_E5M2", 8},
    [WSD_DTYPE_F8_E4M3] = {"F8_E4M3", 8},
    [WSD_DTYPE_F8_E8M0] = {"F8_E8M0", 8},
    [WSD_DTYPE_F8_E4M3FNUZ] = {"F8_E4M3FNUZ", 8},
    [WSD_DTYPE_F8_E5M2FNUZ] = {"F8_E5M2FNUZ", 8},
    [WSD_DTYPE_F4] = {"F4", 4},
    [WSD_DTYPE_F6_E2M3] = {"F6_E2M3", 6},
    [WSD_DTYPE_F6_E3M2] = {"F6_E3M2", 6},
    [WSD_DTYPE_C64] = {"C64", 64},
    [WSD_DTYPE_C128] = {"C128", 128},
};

WSD_EXTERN unsigned wsd_version(void)
{
    return WSD_VERSION_HEX;
}

WSD_EXTERN const char *wsd_dtype_name(int dtype)
{
    if (dtype < 0 || dtype >= _WSD_DTYPE_MAX)
        return NULL;
    return dtypes[dtype].name;
}

WSD_EXTERN unsigned wsd_dtype_bits(int dtype)
{
    if (dtype < 0 || dtype >= _WSD_DTYPE_MAX)
        return 0;
    return dtypes[dtype].bits;
}

WSD_EXTERN int wsd_dtype_from_name(const char *name)
{
    if (!name)
        return -EINVAL;
    for (int i = 0; i < _WSD_DTYPE_MAX; i++)
        if (strcmp(dtypes[i].name, name) == 0)
            return i;
    return -EINVAL;
}

WSD_EXTERN const char *wsd_strerror(int err)
{
    switch (err) {
    case 0:
        return "success";
    case WSD_EPROTO:
        return "protocol violation";
    case WSD_EVERSION:
        return "unsupported protocol version";
    case WSD_ENOTFOUND:
        return "no such model";
    case WSD_EEXIST:
        return "model exists already";
    case WSD_EBADCKPT:
        return "bad checkpoint";
    case WSD_EBUSY:
        return "model is busy";
    case WSD_ELOADING:
        return "model is still loading";
    case WSD_ENODEV:
        return "device unavailable";
    case WSD_ELIMIT:
        return "limit exceeded";
    case WSD_EDENIED:
        return "access denied";
    case WSD_ENOLEASE:
        return "no such lease";
    case WSD_EIO:
        return "I/O error reading the checkpoint";
    case WSD_ENOMEM:
        return "out of memory or over the memory budget";
    case WSD_EGPU:
        return "CUDA error";
    case WSD_ESTALE:
        return "model source changed";
    case WSD_ECLOSED:
        return "connection closed";
    case WSD_EINVAL:
        return "invalid argument";
    case WSD_EINTERNAL:
        return "internal error";
    case WSD_ECANCELED:
        return "cancelled";
    case WSD_EMISMATCH:
        return "content hash mismatch";
    default:
        break;
    }
    if (err < 0 && err > -4096)
        return strerror(-err);
    return "unknown error";
}
