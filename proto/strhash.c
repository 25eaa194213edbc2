/*
 * strhash.c - SipHash (Aumasson and Bernstein, "SipHash: a fast short-input PRF", 2012) with a
 * per-process key; see strhash.h for why the tables need it.
 */
#include "strhash.h"

#include <sys/random.h>
#include <time.h>
#include <unistd.h>

static uint64_t key0, key1;

static inline uint64_t rotl(uint64_t x, unsigned b)
{
    return x << b | x >> (64 - b);
}

static inline uint64_t load_le64(const uint8_t *p)
{
    uint64_t v = 0;

    for (unsigned i = 0; i < 8; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

#define SIPROUND                                                                                   \
    do {                                                                                           \
        v0 += v1, v1 = rotl(v1, 13), v1 ^= v0, v0 = rotl(v0, 32);                                  \
        v2 += v3, v3 = rotl(v3, 16), v3 ^= v2;                                                     \
        v0 += v3, v3 = rotl(v3, 21), v3 ^= v0;                                                     \
        v2 += v1, v1 = rotl(v1, 17), v1 ^= v2, v2 = rotl(v2, 32);                                  \
    } while (0)

uint64_t strhash_sip(uint64_t k0, uint64_t k1, const void *p, size_t n, unsigned c, unsigned d)
{
    const uint8_t *in = p;
    uint64_t v0 = k0 ^ 0x736f6d6570736575ull, v1 = k1 ^ 0x646f72616e646f6dull;
    uint64_t v2 = k0 ^ 0x6c7967656e657261ull, v3 = k1 ^ 0x7465646279746573ull;
    uint64_t m;
    size_t left = n;

    for (; left >= 8; in += 8, left -= 8) {
        m = load_le64(in);
        v3 ^= m;
        for (unsigned i = 0; i < c; i++)
            SIPROUND;
        v0 ^= m;
    }
    /* The last block: what is left of the input, and the length's low byte on top. */
    m = (uint64_t)(n & 0xff) << 56;
    for (size_t i = 0; i < left; i++)
        m |= (uint64_t)in[i] << (8 * i);
    v3 ^= m;
    for (unsigned i = 0; i < c; i++)
        SIPROUND;
    v0 ^= m;
    v2 ^= 0xff;
    for (unsigned i = 0; i < d; i++)
        SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

uint64_t strhash(const void *p, size_t n)
{
    return strhash_sip(key0, key1, p, n, 1, 3);
}

/*
 * The key, drawn before main() runs: the parsers may later run where no syscall but reads is
 * allowed (test-torch's seccomp filter), and a lazy draw would race between pool threads. If
 * getrandom() is unavailable, the clock, the pid and ASLR still make the key unpredictable
 * enough for a table's layout, which is all it decides.
 */
__attribute__((constructor)) static void strhash_init(void)
{
    uint64_t k[2] = {0, 0};
    struct timespec ts;

    if (getrandom(k, sizeof(k), GRND_NONBLOCK) == (ssize_t)sizeof(k)) {
        key0 = k[0];
        key1 = k[1];
        return;
    }
    clock_gettime(CLOCK_MONOTONIC, &ts);
    key0 = (uint64_t)ts.tv_nsec * 0x9e3779b97f4a7c15ull ^ (uint64_t)(uintptr_t)&ts;
    key1 = ((uint64_t)ts.tv_sec << 32 | (uint64_t)getpid()) * 0xbf58476d1ce4e5b9ull ^
           (uint64_t)(uintptr_t)&strhash_init;
}
