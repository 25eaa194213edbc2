/*
 * wsd-threads - drives libweightsd from several threads at once, the way weightsd.h's thread
 * contract allows, against a real daemon (tests/integration/test_client_threads.py).
 *
 * Phase "shared": one client, --threads threads. Each round a thread opens MODEL and releases
 * its lease under the one mutex that serialises the client's connection calls, then, outside
 * it, checks every storage's bytes and exports every tensor through DLPack, keeps up to --hold
 * models and frees the oldest: frees (reference drops) race with other threads' opens
 * (reference takes) and with each other.
 *
 * Phase "close": one client opens --threads * --hold models and releases every other one;
 * the threads free their released models while the main thread calls wsd_close() on the
 * client, then, once the close has returned, free the rest (still leased, so the close released
 * them). Whichever thread drops the last reference frees the client.
 *
 * Output: one JSON object with the counts; "released_on_close" is what the daemon's
 * leases_released_on_close must have grown by. Exit 0 when every thread saw the right bytes.
 */
#include <dlpack/dlpack.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "weightsd.h"

#define HOLD_MAX 16

static const char usage_text[] =
    "Usage: wsd-threads [OPTIONS] MODEL\n"
    "\n"
    "  -s, --socket PATH   client socket (default: $WEIGHTSD_SOCKET or the daemon default)\n"
    "      --threads N     threads (default 8)\n"
    "      --rounds N      opens per thread in the shared phase (default 50)\n"
    "      --hold N        models each thread keeps open at once, 1..16 (default 3)\n";

static const char *model_name;
static unsigned nthreads = 8, rounds = 50, hold = 3;
static uint64_t want_sum; /* checksum of the model, from the main thread's open */
/* Serialises the connection calls on the phase "shared" client. */
static pthread_mutex_t conn_lock = PTHREAD_MUTEX_INITIALIZER;
static wsd_client_t *shared;          /* phase "shared" client */
static atomic_uint failures;          /* problems any thread saw */
static atomic_uint exports;           /* DLPack tensors made and freed */
static pthread_barrier_t close_start; /* phase "close": threads and main start together */
static pthread_barrier_t close_done;  /* ... and the threads wait for wsd_close() to return */

static void fail(const char *what, int r)
{
    fprintf(stderr, "wsd-threads: %s: %s\n", what, wsd_strerror(r));
    atomic_fetch_add(&failures, 1);
}

static uint64_t model_sum(const wsd_model_t *m)
{
    uint64_t h = 1469598103934665603ull;

    for (size_t i = 0; i < wsd_model_storage_count(m); i++) {
        void *data;
        uint64_t n;

        if (wsd_model_storage(m, i, &data, &n) < 0)
            return 0;
        for (uint64_t k = 0; k < n; k++)
            h = (h ^ ((const uint8_t *)data)[k]) * 1099511628211ull;
    }
    return h;
}

/* Reads a model as a worker would, with no lock: the accessors are read-only. */
static void use_model(const wsd_model_t *m)
{
    if (model_sum(m) != want_sum)
        fail("checksum", WSD_EPROTO);
    for (size_t i = 0; i < wsd_model_tensor_count(m); i++) {
        const wsd_tensor_t *t = wsd_model_tensor(m, i);
        struct DLManagedTensor *dl = NULL;
        int r;

        if (wsd_model_find(m, wsd_tensor_name(t)) != t)
            fail("find", WSD_ENOTFOUND);
        r = wsd_tensor_dlpack(m, i, NULL, NULL, &dl);
        if (r == -EOPNOTSUPP)
            continue;
        if (r < 0) {
            fail("dlpack", r);
            continue;
        }
        if (dl->dl_tensor.data != wsd_tensor_data(t))
            fail("dlpack data", WSD_EPROTO);
        wsd_dlpack_free(dl);
        atomic_fetch_add(&exports, 1);
    }
}

static void *shared_thread(void *arg)
{
    wsd_model_t *held[HOLD_MAX] = {0};
    unsigned next = 0;

    (void)arg;
    for (unsigned i = 0; i < rounds; i++) {
        wsd_model_t *m = NULL;
        int r;

        /* Open and release are requests on the shared connection: one thread at a time. */
        pthread_mutex_lock(&conn_lock);
        r = wsd_open(shared, model_name, NULL, 0, &m);
        if (r == 0)
            r = wsd_model_release(m);
        pthread_mutex_unlock(&conn_lock);
        if (r < 0) {
            fail("open/release", r);
            wsd_model_free(m); /* leaseless even on failure: the release cleared it first */
            continue;
        }
        use_model(m);
        /* Leaseless, so freeing only drops a reference on the client: no lock. */
        wsd_model_free(held[next]);
        held[next] = m;
        next = (next + 1) % hold;
    }
    for (unsigned k = 0; k < hold; k++)
        wsd_model_free(held[k]);
    return NULL;
}

static void *close_thread(void *arg)
{
    wsd_model_t **mine = arg;

    pthread_barrier_wait(&close_start);
    /* Released ones now, while the main thread closes the client. */
    for (unsigned k = 0; k < hold; k += 2) {
        use_model(mine[k]);
        wsd_model_free(mine[k]);
    }
    pthread_barrier_wait(&close_done);
    /* Still leased: their free looks at the client's connection, so only after the close. */
    for (unsigned k = 1; k < hold; k += 2) {
        use_model(mine[k]);
        wsd_model_free(mine[k]);
    }
    return NULL;
}

static unsigned parse_count(const char *s, unsigned max)
{
    char *end;
    unsigned long v = strtoul(s, &end, 10);

    if (*s == '\0' || *end != '\0' || v == 0 || v > max) {
        fprintf(stderr, "wsd-threads: bad count '%s' (1..%u)\n", s, max);
        exit(2);
    }
    return (unsigned)v;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"socket", required_argument, NULL, 's'}, {"threads", required_argument, NULL, 't'},
        {"rounds", required_argument, NULL, 'r'}, {"hold", required_argument, NULL, 'k'},
        {"help", no_argument, NULL, 'h'},         {0},
    };
    const char *sock = NULL;
    pthread_t *th;
    wsd_model_t **models, *m = NULL;
    wsd_client_t *c;
    unsigned leased = 0;
    int opt, r;

    while ((opt = getopt_long(argc, argv, "s:h", opts, NULL)) != -1) {
        switch (opt) {
        case 's':
            sock = optarg;
            break;
        case 't':
            nthreads = parse_count(optarg, 256);
            break;
        case 'r':
            rounds = parse_count(optarg, 1000000);
            break;
        case 'k':
            hold = parse_count(optarg, HOLD_MAX);
            break;
        case 'h':
            fputs(usage_text, stdout);
            return 0;
        default:
            fputs(usage_text, stderr);
            return 2;
        }
    }
    if (optind != argc - 1) {
        fputs(usage_text, stderr);
        return 2;
    }
    model_name = argv[optind];
    th = calloc(nthreads, sizeof(*th));
    models = calloc((size_t)nthreads * hold, sizeof(*models));
    if (!th || !models)
        return 1;

    /* Phase "shared". */
    r = wsd_connect(sock, &shared);
    if (r < 0) {
        fail("connect", r);
        return 1;
    }
    r = wsd_open(shared, model_name, NULL, 0, &m);
    if (r < 0) {
        fprintf(stderr, "wsd-threads: open %s: %s\n", model_name, wsd_last_error(shared));
        return 1;
    }
    want_sum = model_sum(m);
    wsd_model_free(m);
    for (unsigned i = 0; i < nthreads; i++)
        if (pthread_create(&th[i], NULL, shared_thread, NULL) != 0)
            return 1;
    for (unsigned i = 0; i < nthreads; i++)
        pthread_join(th[i], NULL);
    wsd_close(shared);

    /* Phase "close". */
    r = wsd_connect(sock, &c);
    if (r < 0) {
        fail("connect", r);
        return 1;
    }
    for (unsigned i = 0; i < nthreads * hold; i++) {
        r = wsd_open(c, model_name, NULL, 0, &models[i]);
        if (r == 0 && i % hold % 2 == 0)
            r = wsd_model_release(models[i]);
        else if (r == 0)
            leased++;
        if (r < 0) {
            fprintf(stderr, "wsd-threads: open %u: %s\n", i, wsd_last_error(c));
            return 1;
        }
    }
    if (pthread_barrier_init(&close_start, NULL, nthreads + 1) != 0 ||
        pthread_barrier_init(&close_done, NULL, nthreads + 1) != 0)
        return 1;
    for (unsigned i = 0; i < nthreads; i++)
        if (pthread_create(&th[i], NULL, close_thread, &models[(size_t)i * hold]) != 0)
            return 1;
    pthread_barrier_wait(&close_start);
    wsd_close(c);
    pthread_barrier_wait(&close_done);
    for (unsigned i = 0; i < nthreads; i++)
        pthread_join(th[i], NULL);
    pthread_barrier_destroy(&close_start);
    pthread_barrier_destroy(&close_done);

    printf("{\"threads\":%u,\"rounds\":%u,\"hold\":%u,\"opens\":%u,\"exports\":%u,"
           "\"released_on_close\":%u,\"checksum\":\"%016" PRIx64 "\",\"failures\":%u}\n",
           nthreads, rounds, hold, 1 + nthreads * rounds + nthreads * hold, atomic_load(&exports),
           leased, want_sum, atomic_load(&failures));
    free(models);
    free(th);
    return atomic_load(&failures) ? 1 : 0;
}
