/*
 * fuzz-admin.c - the admin socket under arbitrary bytes, as fuzz-conn.c does the client socket:
 * each input finds one ready model "m" (from the harness's file, which corpus preloads name too)
 * and may preload, evict, cancel, list, inspect. Afterwards every model is force-evicted and the
 * registry must be empty: no model, no resident or reserved bytes, no fd left open.
 */
#include "conn-harness.h"

static void evict_all(void)
{
    char msg[256];

    while (harness->reg->models) {
        model_t *m = harness->reg->models;

        if (registry_evict(harness->reg, m->name, WSD_EVICT_FORCE, msg, sizeof(msg)) < 0) {
            fprintf(stderr, "harness: cannot evict '%s': %s\n", m->name, msg);
            abort();
        }
    }
    (void)uv_run(&harness->loop, UV_RUN_DEFAULT);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!harness) {
        harness_init();
        harness->base_fds = harness_count_fds();
    }
    harness_preload("m");
    harness_run(data, size, true);
    evict_all();
    harness_check(harness->reg->nmodels == 0, "a model");
    harness_check(harness->reg->resident_bytes == 0, "resident bytes");
    harness_check(harness->reg->reserved_bytes == 0, "reserved bytes");
    harness_check(harness_count_fds() == harness->base_fds, "a file descriptor");
    return 0;
}
