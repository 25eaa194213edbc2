/*
 * index.h - Hugging Face sharded checkpoints (FORMATS.md §5): model.safetensors.index.json and
 * pytorch_model.bin.index.json naming the shard holding each tensor.
 */
#ifndef WSD_INDEX_H
#define WSD_INDEX_H

#include "fmt.h"

/* Loads every shard named by the index at \p path into one manifest; arguments as fmt_load(). */
int index_load(const char *path, const fmt_opts_t *opts, manifest_t **ret_m, source_t **ret_sources,
               size_t *ret_nsources, fmt_err_t *err);

#endif /* WSD_INDEX_H */
