/*
 * checked.h - overflow-checked u64/i64 arithmetic for everything computed from untrusted sizes
 * (checkpoint headers, shapes, strides, offsets). Each returns true on success and writes *r;
 * on overflow it returns false and leaves *r alone.
 */
#ifndef WSD_CHECKED_H
#define WSD_CHECKED_H

#include <stdbool.h>
#include <stdint.h>

static inline bool ck_add_u64(uint64_t a, uint64_t b, uint64_t *r)
{
    uint64_t t;

    if (__builtin_add_overflow(a, b, &t))
        return false;
    *r = t;
    return true;
}

static inline bool ck_mul_u64(uint64_t a, uint64_t b, uint64_t *r)
{
    uint64_t t;

    if (__builtin_mul_overflow(a, b, &t))
        return false;
    *r = t;
    return true;
}

static inline bool ck_sub_u64(uint64_t a, uint64_t b, uint64_t *r)
{
    if (b > a)
        return false;
    *r = a - b;
    return true;
}

/* Rounds a up to a multiple of the power of two align. */
static inline bool ck_align_u64(uint64_t a, uint64_t align, uint64_t *r)
{
    uint64_t t;

    if (!ck_add_u64(a, align - 1, &t))
        return false;
    *r = t & ~(align - 1);
    return true;
}

#endif /* WSD_CHECKED_H */
