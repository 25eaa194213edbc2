/*
 * wsd-pickle-json - weightsd's pickle VM (daemon/formats/pickle.c) on files, for differential
 * tests against CPython's unpickler (RELIABILITY P10; tests/python/test_pickle_differential.py).
 *
 *     wsd-pickle-json FILE...
 *
 * Prints one JSON object per file and line: {"file", "ok": true, "tensors": N, "storages": N,
 * "json": TEXT} where TEXT is pickle_render_json() of the root (null when it cannot be
 * rendered, with "render_error"), or {"file", "ok": false, "error": MESSAGE}. Exits 0 unless a
 * file cannot be read. A test tool: nothing here is installed.
 */
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fmt.h"
#include "pickle.h"

static uint8_t *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    uint8_t *buf = NULL;
    size_t cap = 0, n = 0, k;

    if (!f)
        return NULL;
    do {
        if (n == cap) {
            uint8_t *p = realloc(buf, cap = cap ? cap * 2 : 4096);

            if (!p) {
                free(buf);
                fclose(f);
                return NULL;
            }
            buf = p;
        }
        k = fread(buf + n, 1, cap - n, f);
        n += k;
    } while (k > 0);
    fclose(f);
    *len = n;
    return buf ? buf : malloc(1);
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        json_t *o = json_object();
        fmt_err_t err = {0};
        pk_doc_t *d = NULL;
        size_t len = 0;
        uint8_t *buf = slurp(argv[i], &len);
        char *line;

        if (!buf || !o) {
            fprintf(stderr, "wsd-pickle-json: %s: %s\n", argv[i], strerror(errno ? errno : ENOMEM));
            return 1;
        }
        json_object_set_new(o, "file", json_string(argv[i]));
        if (pickle_parse(buf, len, &d, &err) < 0) {
            json_object_set_new(o, "ok", json_false());
            json_object_set_new(o, "error", json_string(err.msg));
        } else {
            pk_buf_t b = {0};

            json_object_set_new(o, "ok", json_true());
            json_object_set_new(o, "tensors", json_integer((json_int_t)d->ntensors));
            json_object_set_new(o, "storages", json_integer((json_int_t)d->nstorages));
            if (pickle_render_json(d, d->root, &b, &err) == 0) {
                json_object_set_new(o, "json", json_stringn(b.p ? b.p : "", b.len));
            } else {
                json_object_set_new(o, "json", json_null());
                json_object_set_new(o, "render_error", json_string(err.msg));
            }
            pk_buf_free(&b);
            pickle_free(d);
        }
        line = json_dumps(o, JSON_COMPACT | JSON_ENSURE_ASCII);
        if (!line || puts(line) < 0)
            return 1;
        free(line);
        json_decref(o);
        free(buf);
    }
    return fflush(stdout) == 0 ? 0 : 1;
}
