/* safetensors.c - placeholder until the safetensors reader lands. */
#include "fmt.h"

int safetensors_read(const source_t *s, uint32_t source_index, manifest_t *m, fmt_err_t *err)
{
    return fmt_fail(err, WSD_EBADCKPT, "E_UNSUPPORTED", "'%s': safetensors reader not built yet",
                    s->path);
}
