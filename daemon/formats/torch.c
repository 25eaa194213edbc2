/* torch.c - placeholder until the torch zip reader lands (owned by the torch-format work). */
#include "fmt.h"

int torch_read(const source_t *s, uint32_t source_index, const char *key, manifest_t *m,
               fmt_err_t *err)
{
    return fmt_fail(err, WSD_EBADCKPT, "E_UNSUPPORTED", "'%s': torch zip reader not built yet",
                    s->path);
}
