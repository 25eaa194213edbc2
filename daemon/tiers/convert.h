/*
 * convert.h - element-type conversion done once at preload (--dtype), bit-identical to what
 * torch's tensor.to(dtype) produces on the CPU: round to nearest even, NaN and infinity handled
 * exactly as c10::BFloat16 and c10::Half do, and F64 narrowed through float first as c10 does.
 */
#ifndef WSD_CONVERT_H
#define WSD_CONVERT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "fmt.h"

/* True for the floating dtypes --dtype converts (F16, BF16, F32, F64). */
bool convert_is_float(int dtype);

/* True when convert_run() can turn \p from into \p to. */
bool convert_supported(int from, int to);

/* Converts \p n elements from \p src (dtype \p from) to \p dst (dtype \p to). Buffers must not
 * overlap; neither needs alignment. */
void convert_run(int from, int to, const void *src, void *dst, size_t n);

/*
 * Retypes every floating storage of \p m (and the tensors on it) to \p to, keeping the file's
 * dtype and size in src_dtype/src_nbytes for the copy. Integer, bool, complex and fp8 storages
 * are untouched. \retval 0, WSD_EINVAL (unsupported target), WSD_EBADCKPT (mixed-type storage).
 */
int convert_manifest(manifest_t *m, int to, fmt_err_t *err);

/*
 * Parses a --dtype / dtype= target: bf16|bfloat16, f16|float16|half, f32|float32|float (any
 * case), or "none" for no conversion (*ret = -1). \retval 0 or -EINVAL.
 */
int convert_parse_target(const char *name, int *ret);

/* Single values, exposed for the tests. */
uint16_t convert_f32_to_bf16(float f);
uint16_t convert_f32_to_f16(float f);
float convert_f16_to_f32(uint16_t h);
float convert_bf16_to_f32(uint16_t b);

#endif /* WSD_CONVERT_H */
