/*
 * fuzz-pickle.c - libFuzzer target for the zero-exec pickle VM (STYLE T5): the input is a
 * data.pkl stream, run by pickle_parse() directly; an accepted stream is rendered as JSON and
 * its keys as path components, which is all torch_read() ever does with a tree besides naming
 * tensors. Any result is fine except a crash, a leak, a sanitizer report or a rejection without
 * a rule.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fmt.h"
#include "pickle.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fmt_err_t err = {0};
    pk_doc_t *d = NULL;
    int r;

    r = pickle_parse(data, size, &d, &err);
    if (r < 0) {
        if (!err.msg[0] || d)
            abort();
        return 0;
    }
    if (d->root >= d->nnodes)
        abort();
    for (uint32_t i = 0; i < d->ntensors; i++)
        if (d->tensors[i].ndim > WSD_MAX_NDIM)
            abort();
    {
        const pk_node_t *root = &d->nodes[d->root];
        pk_buf_t b = {.max = 1u << 20};
        fmt_err_t e2 = {0};

        /* Tensors cannot be rendered; everything else either renders or hits a limit. */
        if (!(root->flags & PK_F_HAS_TENSOR))
            (void)pickle_render_json(d, d->root, &b, &e2);
        pk_buf_free(&b);
        if (root->type == PK_DICT)
            for (uint32_t i = 0; i < root->n && i < 64; i++) {
                pk_buf_t k = {.max = 4096};
                fmt_err_t e3 = {0};

                (void)pickle_render_key(d, root->u.items[2 * i], &k, &e3);
                pk_buf_free(&k);
            }
    }
    pickle_free(d);
    return 0;
}
