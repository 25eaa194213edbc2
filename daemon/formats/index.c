/* index.c - placeholder until the HF index reader lands. */
#include "index.h"

int index_load(const char *path, const fmt_opts_t *opts, manifest_t **ret_m, source_t **ret_sources,
               size_t *ret_nsources, fmt_err_t *err)
{
    return fmt_fail(err, WSD_EBADCKPT, "E_UNSUPPORTED", "'%s': index files not supported yet", path);
}
