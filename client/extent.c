/*
 * extent.c - the client's own check that every tensor of an OpenReply manifest lies inside its
 * storage (libweightsd).
 *
 * The daemon validates each manifest before it serves it (daemon/formats/manifest.c
 * check_tensor), so a well-behaved daemon never sends a tensor this refuses. This is defence
 * in depth against a buggy or compromised daemon: the client hands tensor data pointers,
 * shapes and strides to code that will read through them (wsd_tensor_data(), DLPack export,
 * torch's set_()), so it must not trust geometry it cannot check. Divided into: byte counts of
 * element runs for whole-byte and sub-byte dtypes, and the one exported check.
 */
#include "extent.h"

#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>

static int fail(char *msg, size_t msglen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int fail(char *msg, size_t msglen, const char *fmt, ...)
{
    va_list ap;

    if (msglen) {
        va_start(ap, fmt);
        vsnprintf(msg, msglen, fmt, ap);
        va_end(ap);
    }
    return WSD_EPROTO;
}

/*
 * Bytes that \p n elements of \p bits bits each occupy, the last partial byte included, and in
 * *ret_whole whether they end on a byte boundary. False on overflow. Whole-byte dtypes are
 * counted in bytes, so their range is not cut by a factor of eight.
 */
static bool run_bytes(uint64_t n, unsigned bits, uint64_t *ret_bytes, bool *ret_whole)
{
    uint64_t b;

    if (bits % 8 == 0) {
        if (__builtin_mul_overflow(n, (uint64_t)(bits / 8), &b))
            return false;
        *ret_bytes = b;
        *ret_whole = true;
        return true;
    }
    if (__builtin_mul_overflow(n, (uint64_t)bits, &b))
        return false;
    *ret_bytes = b / 8 + (b % 8 != 0);
    *ret_whole = b % 8 == 0;
    return true;
}

int wsd__tensor_extent_check(const Weightsd__V1__TensorInfo *ti, uint64_t storage_nbytes, char *msg,
                             size_t msglen)
{
    const char *name = ti->name;
    unsigned bits = wsd_dtype_bits((int)ti->dtype);
    uint64_t numel = 1, bytes, last;
    bool whole;

    if (msglen)
        msg[0] = '\0';
    if (!name)
        return fail(msg, msglen, "tensor without a name");
    if (!bits)
        return fail(msg, msglen, "tensor '%s': unknown dtype %u", name, ti->dtype);
    if (ti->n_shape != ti->n_stride)
        return fail(msg, msglen, "tensor '%s': %zu sizes but %zu strides", name, ti->n_shape,
                    ti->n_stride);
    if (ti->n_shape > WSD_MAX_NDIM)
        return fail(msg, msglen, "tensor '%s': %zu dimensions, at most %d", name, ti->n_shape,
                    WSD_MAX_NDIM);
    for (size_t d = 0; d < ti->n_shape; d++) {
        /* The protocol has no negative strides (the daemon refuses them, torch cannot view
         * them), and element 0 being the lowest address is what wsd_tensor_data() promises. */
        if (ti->shape[d] < 0 || ti->stride[d] < 0)
            return fail(msg, msglen, "tensor '%s': negative size or stride in dimension %zu", name,
                        d);
        if (ti->shape[d] == 0)
            numel = 0;
    }
    for (size_t d = 0; numel && d < ti->n_shape; d++)
        if (__builtin_mul_overflow(numel, (uint64_t)ti->shape[d], &numel))
            return fail(msg, msglen, "tensor '%s': element count overflows 64 bits", name);
    if (!run_bytes(numel, bits, &bytes, &whole))
        return fail(msg, msglen, "tensor '%s': byte count overflows 64 bits", name);
    if (!whole)
        return fail(msg, msglen, "tensor '%s': %llu elements of %s do not fill whole bytes", name,
                    (unsigned long long)numel, wsd_dtype_name((int)ti->dtype));
    if (ti->nbytes != bytes)
        return fail(msg, msglen, "tensor '%s': nbytes is %llu but %llu elements of %s take %llu",
                    name, (unsigned long long)ti->nbytes, (unsigned long long)numel,
                    wsd_dtype_name((int)ti->dtype), (unsigned long long)bytes);

    /* Even an empty tensor's data pointer is storage + offset: keep it inside, or one past
     * the end, of the storage. */
    if (!run_bytes(ti->storage_offset, bits, &bytes, &whole) || bytes > storage_nbytes)
        return fail(msg, msglen,
                    "tensor '%s': storage_offset %llu lies past the end of its %llu-byte storage",
                    name, (unsigned long long)ti->storage_offset,
                    (unsigned long long)storage_nbytes);
    if (numel == 0)
        return 0;
    if (bits % 8 && ti->storage_offset)
        return fail(msg, msglen, "tensor '%s': sub-byte dtype %s with storage_offset %llu", name,
                    wsd_dtype_name((int)ti->dtype), (unsigned long long)ti->storage_offset);

    /* The element furthest from element 0: offset + sum((size_i - 1) * stride_i). Strides may
     * be 0 (expanded dimensions) and need not be dense; only the far end matters. */
    last = ti->storage_offset;
    for (size_t d = 0; d < ti->n_shape; d++) {
        uint64_t span;

        if (__builtin_mul_overflow((uint64_t)ti->shape[d] - 1, (uint64_t)ti->stride[d], &span) ||
            __builtin_add_overflow(last, span, &last))
            return fail(msg, msglen, "tensor '%s': offset + strides overflow 64 bits", name);
    }
    if (__builtin_add_overflow(last, 1, &last) || !run_bytes(last, bits, &bytes, &whole))
        return fail(msg, msglen, "tensor '%s': byte extent overflows 64 bits", name);
    if (bytes > storage_nbytes)
        return fail(msg, msglen, "tensor '%s': view reaches byte %llu of its %llu-byte storage",
                    name, (unsigned long long)bytes, (unsigned long long)storage_nbytes);
    return 0;
}
