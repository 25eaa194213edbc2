/*
 * test-strhash.c - the keyed hash behind every table of names read from a checkpoint: the
 * published SipHash-2-4 vectors, and the flooding input it exists to defeat. FNV-1a, used
 * before, put every name of a chained multicollision into one slot of an open-addressed table,
 * so the duplicate-name check walked all earlier names for each one: quadratic, and hours for
 * 2^20 tensor names in one safetensors header.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fmt.h"
#include "manifest.h"
#include "strhash.h"
#include "test.h"
#include "weightsd.h"

TEST(siphash24_reference_vectors)
{
    /* Key 00 01 .. 0f, message 00 01 .. n-1 (the paper's Appendix A and its vectors table). */
    static const struct {
        size_t n;
        uint64_t want;
    } v[] = {{0, 0x726fdb47dd0e0e31ull},
             {1, 0x74f839c593dc67fdull},
             {8, 0x93f5f5799a932462ull},
             {15, 0xa129ca6149be45e5ull},
             {16, 0x3f2acc7f57c29bdbull}};
    uint8_t msg[16];

    for (unsigned i = 0; i < sizeof(msg); i++)
        msg[i] = (uint8_t)i;
    for (size_t i = 0; i < sizeof(v) / sizeof(v[0]); i++)
        ASSERT_UINT_EQ(strhash_sip(0x0706050403020100ull, 0x0f0e0d0c0b0a0908ull, msg, v[i].n, 2, 4),
                       v[i].want);
}

TEST(strhash_is_stable_within_a_process)
{
    ASSERT_UINT_EQ(strhash("model.layers.0.weight", 21), strhash("model.layers.0.weight", 21));
    ASSERT_NE(strhash("a", 1), strhash("b", 1));
    ASSERT_NE(strhash("", 0), strhash("\0", 1)); /* the length is hashed too */
}

#define K     19 /* low bits that collide: a table of 2^18 names has 2^19 slots */
#define STEPS 18 /* 2^18 names */
#define FNV_P 1099511628211ull

static uint64_t fnv_step(uint64_t h, const uint8_t *b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * FNV_P;
    return h;
}

/*
 * 2^STEPS distinct names whose FNV-1a hashes agree in the low K bits: at each step, two 3-byte
 * blocks that take the (low K bits of the) state to the same value; any choice of one block per
 * step then ends in the same state. Returns an array of n names, each len bytes plus NUL.
 */
static char *fnv_multicollision(size_t *ret_n, size_t *ret_len)
{
    const uint64_t mask = (1ull << K) - 1;
    uint8_t blocks[STEPS][2][3];
    uint64_t h = fnv_step(1469598103934665603ull, (const uint8_t *)"w.", 2) & mask;
    uint32_t *seen = malloc(sizeof(uint32_t) << K);
    size_t n = (size_t)1 << STEPS, len = 2 + 3 * STEPS;
    char *names;

    ASSERT(seen);
    for (int s = 0; s < STEPS; s++) {
        bool found = false;

        memset(seen, 0xff, sizeof(uint32_t) << K);
        for (uint32_t x = 0; x < 94 * 94 * 94 && !found; x++) {
            uint8_t b[3] = {(uint8_t)('!' + x % 94), (uint8_t)('!' + x / 94 % 94),
                            (uint8_t)('!' + x / (94 * 94))};
            uint64_t v = fnv_step(h, b, 3) & mask;

            if (seen[v] != UINT32_MAX) {
                uint32_t y = seen[v];

                blocks[s][0][0] = (uint8_t)('!' + y % 94);
                blocks[s][0][1] = (uint8_t)('!' + y / 94 % 94);
                blocks[s][0][2] = (uint8_t)('!' + y / (94 * 94));
                memcpy(blocks[s][1], b, 3);
                h = v;
                found = true;
            }
            seen[v] = x;
        }
        ASSERT(found);
    }
    free(seen);
    names = malloc(n * (len + 1));
    ASSERT(names);
    for (size_t i = 0; i < n; i++) {
        char *p = names + i * (len + 1);

        memcpy(p, "w.", 2);
        for (int s = 0; s < STEPS; s++)
            memcpy(p + 2 + 3 * s, blocks[s][i >> s & 1], 3);
        p[len] = '\0';
    }
    *ret_n = n;
    *ret_len = len;
    return names;
}

TEST(fnv_multicollision_is_spread)
{
    const uint64_t mask = (1ull << K) - 1;
    size_t n, len, distinct = 0;
    char *names = fnv_multicollision(&n, &len);
    uint8_t *used = calloc((size_t)1 << K, 1);
    uint64_t fnv0 = fnv_step(1469598103934665603ull, (const uint8_t *)names, len) & mask;

    ASSERT(used);
    for (size_t i = 0; i < n; i++) {
        const char *p = names + i * (len + 1);
        uint64_t slot = strhash(p, len) & mask;

        /* The attack works on FNV-1a: every name in one slot... */
        ASSERT_UINT_EQ(fnv_step(1469598103934665603ull, (const uint8_t *)p, len) & mask, fnv0);
        if (!used[slot]++)
            distinct++;
    }
    /* ...and not on the keyed hash: n random names in 2n slots fill about 39 % of them
     * (2n(1 - e^-1/2)); one slot, or a few hundred, would mean the key is not mixed in. */
    fprintf(stderr, "# %zu names, %zu distinct slots of %zu\n", n, distinct, (size_t)1 << K);
    ASSERT_GT(distinct, n / 2);
    free(used);
    free(names);
}

/* The table the attack aimed at: manifest_validate's duplicate-name check over those names.
 * With FNV-1a this took about 4 minutes here (2^35 string compares), past the 60 s timeout. */
TEST(manifest_check_survives_fnv_multicollision)
{
    size_t n, len;
    char *names = fnv_multicollision(&n, &len);
    manifest_t *m = manifest_new();
    fmt_err_t err = {0};

    ASSERT(m);
    for (size_t i = 0; i < n; i++) {
        mf_tensor_t t = {.name = names + i * (len + 1), .dtype = WSD_DTYPE_U8, .ndim = 1,
                         .shape = {1}, .stride = {1}};

        ASSERT_EQ(manifest_add_storage(m, t.name, 0, i, 1, WSD_DTYPE_U8, &t.storage), 0);
        ASSERT_EQ(manifest_add_tensor(m, &t), 0);
    }
    ASSERT_EQ(manifest_validate(m, &err), 0);
    /* And a repeat among them is still found. */
    {
        mf_tensor_t t = {.name = names + (n / 2) * (len + 1), .dtype = WSD_DTYPE_U8, .ndim = 1,
                         .shape = {1}, .stride = {1}};

        ASSERT_EQ(manifest_add_storage(m, "again", 0, n, 1, WSD_DTYPE_U8, &t.storage), 0);
        ASSERT_EQ(manifest_add_tensor(m, &t), 0);
    }
    ASSERT_EQ(manifest_validate(m, &err), WSD_EBADCKPT);
    ASSERT_STR_CONTAINS(err.msg, "E_DUP_NAME");
    manifest_free(m);
    free(names);
}

int main(int argc, char **argv)
{
    return test_main(argc, argv);
}
