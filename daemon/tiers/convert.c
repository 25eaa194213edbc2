/*
 * convert.c - dtype conversion kernels. Each loop handles one (from, to) pair with no branches
 * on the element type inside, so gcc vectorises the integer bf16 paths and the float
 * arithmetic of the f16 path. The rounding rules follow c10 (torch's CPU casts):
 *  - f32 -> bf16: add 0x7fff plus the lowest kept bit and truncate (round to nearest, ties to
 *    even); every NaN becomes 0xffff, which is what torch's vectorised CPU kernel writes for a
 *    tensor of any length (c10's scalar BFloat16 constructor would write 0x7fc0; tensor.to()
 *    does not use it on AVX2 or AVX-512 machines).
 *  - f32 -> f16: the IEEE conversion of the FP16 library torch uses, computed with two float
 *    multiplications that let the FPU do the rounding; every NaN becomes 0x7e00 with its sign.
 *  - f16 -> f32 and bf16 -> f32 are exact.
 *  - f64 goes through float first, as c10::BFloat16(float) and c10::Half(float) do.
 */
#include "convert.h"

#include <errno.h>
#include <string.h>
#include <strings.h>

#include "weightsd.h"

static inline uint32_t f2u(float f)
{
    uint32_t u;

    memcpy(&u, &f, sizeof(u));
    return u;
}

static inline float u2f(uint32_t u)
{
    float f;

    memcpy(&f, &u, sizeof(f));
    return f;
}

uint16_t convert_f32_to_bf16(float f)
{
    uint32_t u = f2u(f);

    if (f != f)
        return 0xffff;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

float convert_bf16_to_f32(uint16_t b)
{
    return u2f((uint32_t)b << 16);
}

uint16_t convert_f32_to_f16(float f)
{
    const float scale_to_inf = 0x1.0p+112f;
    const float scale_to_zero = 0x1.0p-110f;
    uint32_t w = f2u(f), shl1_w = w + w, sign = w & 0x80000000u, bias, bits, nonsign;
    float base = (__builtin_fabsf(f) * scale_to_inf) * scale_to_zero;

    bias = shl1_w & 0xff000000u;
    if (bias < 0x71000000u)
        bias = 0x71000000u;
    base = u2f((bias >> 1) + 0x07800000u) + base;
    bits = f2u(base);
    nonsign = ((bits >> 13) & 0x00007c00u) + (bits & 0x00000fffu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xff000000u ? 0x7e00u : nonsign));
}

float convert_f16_to_f32(uint16_t h)
{
    const uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    const float exp_scale = 0x1.0p-112f;
    const uint32_t magic_mask = 126u << 23;
    const float magic_bias = 0.5f;
    const uint32_t denorm_cutoff = 1u << 27;
    float normalized = u2f((two_w >> 4) + (0xe0u << 23)) * exp_scale;
    float denormalized = u2f((two_w >> 17) | magic_mask) - magic_bias;
    uint32_t result = sign | (two_w < denorm_cutoff ? f2u(denormalized) : f2u(normalized));

    return u2f(result);
}

int convert_parse_target(const char *name, int *ret)
{
    static const struct {
        const char *name;
        int dtype;
    } names[] = {
        {"none", -1},          {"bf16", WSD_DTYPE_BF16}, {"bfloat16", WSD_DTYPE_BF16},
        {"f16", WSD_DTYPE_F16}, {"float16", WSD_DTYPE_F16}, {"half", WSD_DTYPE_F16},
        {"f32", WSD_DTYPE_F32}, {"float32", WSD_DTYPE_F32}, {"float", WSD_DTYPE_F32},
    };

    for (size_t i = 0; name && i < sizeof(names) / sizeof(names[0]); i++)
        if (strcasecmp(name, names[i].name) == 0) {
            *ret = names[i].dtype;
            return 0;
        }
    return -EINVAL;
}

bool convert_is_float(int dtype)
{
    return dtype == WSD_DTYPE_F16 || dtype == WSD_DTYPE_BF16 || dtype == WSD_DTYPE_F32 ||
           dtype == WSD_DTYPE_F64;
}

bool convert_supported(int from, int to)
{
    return convert_is_float(from) && (to == WSD_DTYPE_F16 || to == WSD_DTYPE_BF16 ||
                                      to == WSD_DTYPE_F32);
}

/* Reads element i of a floating buffer as float (f64 narrowed, as c10 does before rounding). */
static inline float load_f(int from, const uint8_t *src, size_t i)
{
    switch (from) {
    case WSD_DTYPE_F32: {
        float f;

        memcpy(&f, src + 4 * i, 4);
        return f;
    }
    case WSD_DTYPE_F64: {
        double d;

        memcpy(&d, src + 8 * i, 8);
        return (float)d;
    }
    case WSD_DTYPE_F16: {
        uint16_t h;

        memcpy(&h, src + 2 * i, 2);
        return convert_f16_to_f32(h);
    }
    default: {
        uint16_t b;

        memcpy(&b, src + 2 * i, 2);
        return convert_bf16_to_f32(b);
    }
    }
}

/* The loops are written once per destination with the source type fixed by the caller's
 * switch, so the compiler sees a branch-free body to vectorise. */
#define CONVERT_LOOP(FROM, STORE)                                                                  \
    for (size_t i = 0; i < n; i++) {                                                               \
        float f = load_f(FROM, s, i);                                                              \
        STORE;                                                                                     \
    }

/* The hot case of --dtype bf16, in integer arithmetic only so it vectorises: the same rule as
 * convert_f32_to_bf16(), with the NaN test done on the bits. */
/* Each kernel is built twice, for AVX2 and for the baseline, and picked at load time (ifunc). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#    define CONVERT_CLONES __attribute__((target_clones("avx2", "default")))
#else
#    define CONVERT_CLONES
#endif

CONVERT_CLONES static void f32_to_bf16(const uint8_t *restrict s, uint8_t *restrict d, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        uint16_t v;

        memcpy(&u, s + 4 * i, 4);
        v = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
        v = (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)0xffff : v;
        memcpy(d + 2 * i, &v, 2);
    }
}

/* convert_f32_to_f16() with every branch written as a select, so the loop vectorises. */
static inline uint16_t f32_to_f16_sel(float f)
{
    uint32_t w = f2u(f), shl1_w = w + w, sign = w & 0x80000000u, bias, bits, nonsign;
    float base = (u2f(w & 0x7fffffffu) * 0x1.0p+112f) * 0x1.0p-110f;

    bias = shl1_w & 0xff000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    base = u2f((bias >> 1) + 0x07800000u) + base;
    bits = f2u(base);
    nonsign = ((bits >> 13) & 0x00007c00u) + (bits & 0x00000fffu);
    nonsign = shl1_w > 0xff000000u ? 0x7e00u : nonsign;
    return (uint16_t)((sign >> 16) | nonsign);
}

CONVERT_CLONES static void f32_to_f16(const uint8_t *restrict s, uint8_t *restrict d, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        float f;
        uint16_t v;

        memcpy(&f, s + 4 * i, 4);
        v = f32_to_f16_sel(f);
        memcpy(d + 2 * i, &v, 2);
    }
}

/* convert_f16_to_f32() with its one branch as a select. */
static inline float f16_to_f32_sel(uint16_t h)
{
    const uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    float normalized = u2f((two_w >> 4) + (0xe0u << 23)) * 0x1.0p-112f;
    float denormalized = u2f((two_w >> 17) | (126u << 23)) - 0.5f;
    uint32_t nb = f2u(normalized), db = f2u(denormalized);

    return u2f(sign | (two_w < (1u << 27) ? db : nb));
}

CONVERT_CLONES static void f16_to_f32(const uint8_t *restrict s, uint8_t *restrict d, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        uint16_t h;
        float f;

        memcpy(&h, s + 2 * i, 2);
        f = f16_to_f32_sel(h);
        memcpy(d + 4 * i, &f, 4);
    }
}

void convert_run(int from, int to, const void *src, void *dst, size_t n)
{
    const uint8_t *s = src;
    uint8_t *d = dst;

    if (from == WSD_DTYPE_F32 && to == WSD_DTYPE_BF16) {
        f32_to_bf16(s, d, n);
        return;
    }
    if (from == WSD_DTYPE_F32 && to == WSD_DTYPE_F16) {
        f32_to_f16(s, d, n);
        return;
    }
    if (from == WSD_DTYPE_F16 && to == WSD_DTYPE_F32) {
        f16_to_f32(s, d, n);
        return;
    }

    if (from == to) {
        memcpy(dst, src, n * (wsd_dtype_bits(from) / 8));
        return;
    }
    switch (to) {
    case WSD_DTYPE_BF16:
        switch (from) {
        case WSD_DTYPE_F32:
            CONVERT_LOOP(WSD_DTYPE_F32, {
                uint16_t v = convert_f32_to_bf16(f);
                memcpy(d + 2 * i, &v, 2);
            });
            return;
        case WSD_DTYPE_F64:
            CONVERT_LOOP(WSD_DTYPE_F64, {
                uint16_t v = convert_f32_to_bf16(f);
                memcpy(d + 2 * i, &v, 2);
            });
            return;
        default:
            CONVERT_LOOP(WSD_DTYPE_F16, {
                uint16_t v = convert_f32_to_bf16(f);
                memcpy(d + 2 * i, &v, 2);
            });
            return;
        }
    case WSD_DTYPE_F16:
        switch (from) {
        case WSD_DTYPE_F32:
            CONVERT_LOOP(WSD_DTYPE_F32, {
                uint16_t v = convert_f32_to_f16(f);
                memcpy(d + 2 * i, &v, 2);
            });
            return;
        case WSD_DTYPE_F64:
            CONVERT_LOOP(WSD_DTYPE_F64, {
                uint16_t v = convert_f32_to_f16(f);
                memcpy(d + 2 * i, &v, 2);
            });
            return;
        default:
            CONVERT_LOOP(WSD_DTYPE_BF16, {
                uint16_t v = convert_f32_to_f16(f);
                memcpy(d + 2 * i, &v, 2);
            });
            return;
        }
    default: /* F32 */
        switch (from) {
        case WSD_DTYPE_F64:
            CONVERT_LOOP(WSD_DTYPE_F64, memcpy(d + 4 * i, &f, 4));
            return;
        case WSD_DTYPE_F16:
            CONVERT_LOOP(WSD_DTYPE_F16, memcpy(d + 4 * i, &f, 4));
            return;
        default:
            CONVERT_LOOP(WSD_DTYPE_BF16, memcpy(d + 4 * i, &f, 4));
            return;
        }
    }
}

int convert_manifest(manifest_t *m, int to, fmt_err_t *err)
{
    unsigned out = wsd_dtype_bits(to) / 8;

    if (!convert_supported(WSD_DTYPE_F32, to))
        return fmt_fail(err, WSD_EINVAL, "E_DTYPE", "cannot convert to %s: use bf16, f16 or f32",
                        wsd_dtype_name(to) ? wsd_dtype_name(to) : "?");
    for (size_t i = 0; i < m->nstorages; i++) {
        mf_storage_t *s = &m->storages[i];
        unsigned in = wsd_dtype_bits(s->dtype) / 8;
        uint64_t numel;

        if (!convert_is_float(s->dtype) || s->dtype == to)
            continue;
        numel = s->nbytes / in;
        s->src_dtype = s->dtype;
        s->src_nbytes = s->nbytes;
        s->dtype = to;
        s->nbytes = numel * out; /* out <= 4 and numel <= nbytes: no overflow */
    }
    for (size_t i = 0; i < m->ntensors; i++) {
        mf_tensor_t *t = &m->tensors[i];
        const mf_storage_t *s = &m->storages[t->storage];

        if (t->storage >= m->nstorages || s->dtype == s->src_dtype)
            continue;
        /* Readers give a storage the dtype of the tensors on it; one that disagrees would be
         * reinterpreted, which conversion cannot honour. */
        if (t->dtype != s->src_dtype)
            return fmt_fail(err, WSD_EBADCKPT, "E_STORAGE_CONFLICT",
                            "tensor '%s' is %s but its storage '%s' holds %s: cannot convert",
                            t->name, wsd_dtype_name(t->dtype), s->key,
                            wsd_dtype_name(s->src_dtype));
        t->dtype = to;
        t->nbytes = t->nbytes / (wsd_dtype_bits(s->src_dtype) / 8) * out;
    }
    return 0;
}
