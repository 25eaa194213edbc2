/*
 * fuzz-conn.c - the client socket under arbitrary bytes: a real session (server.c, session.c,
 * the registry with one ready model) on a socketpair, fed in pieces of at most 143 bytes with
 * and without SCM_RIGHTS fds (conn-harness.h). After each input every fd the daemon side
 * received or sent is closed, no connection or lease remains, and the model is untouched.
 */
#include "conn-harness.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    model_t *m;

    if (!harness) {
        harness_init();
        harness_preload("m");
        harness->base_fds = harness_count_fds();
    }
    harness_run(data, size, false);
    m = registry_find(harness->reg, "m");
    harness_check(m && m->state == MODEL_READY, "the model is gone or not ready");
    harness_check(m->leases == 0, "a lease");
    harness_check(harness->reg->nmodels == 1, "a model");
    harness_check(harness_count_fds() == harness->base_fds, "a file descriptor");
    return 0;
}
