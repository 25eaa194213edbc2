/*
 * test-client-refs.c - the client's reference count (client/client.c) under threads: every
 * open model holds a reference, and models whose leases are gone may be freed on any thread
 * (weightsd.h, "Threads"), so takes and drops race. A count that is not atomic loses updates
 * here; one that is ends where it started. tests/integration/test_client_threads.py drives
 * the same through real opens and frees against the daemon.
 */
#include "test.h"

#include <pthread.h>

#include "client.h"
#include "weightsd.h"

#define THREADS 4
#define ROUNDS  200000
#define BATCH   8

static wsd_client_t *client;
static pthread_barrier_t start;

/* Takes and drops references in small batches, so the count moves both ways at once. */
static void *churn(void *arg)
{
    (void)arg;
    pthread_barrier_wait(&start);
    for (int i = 0; i < ROUNDS; i++) {
        for (int k = 0; k < BATCH; k++)
            ASSERT(wsd__client_ref(client) == client);
        for (int k = 0; k < BATCH; k++)
            wsd__client_unref(client);
    }
    return NULL;
}

TEST(new_client_has_one_reference)
{
    wsd_client_t *c = wsd__client_new();

    ASSERT(c);
    ASSERT_EQ(wsd__client_refs(c), 1);
    ASSERT(wsd__client_ref(c) == c);
    ASSERT_EQ(wsd__client_refs(c), 2);
    wsd__client_unref(c);
    ASSERT_EQ(wsd__client_refs(c), 1);
    /* Not connected: closing only drops the caller's reference, the last, which frees. */
    wsd_close(c);
    wsd__client_unref(NULL);
}

TEST(concurrent_refs_and_unrefs_balance)
{
    pthread_t th[THREADS];

    client = wsd__client_new();
    ASSERT(client);
    ASSERT_EQ(pthread_barrier_init(&start, NULL, THREADS), 0);
    for (int i = 0; i < THREADS; i++)
        ASSERT_EQ(pthread_create(&th[i], NULL, churn, NULL), 0);
    for (int i = 0; i < THREADS; i++)
        ASSERT_EQ(pthread_join(th[i], NULL), 0);
    /* Only the caller's reference is left, and the client was never freed along the way. */
    ASSERT_EQ(wsd__client_refs(client), 1);
    wsd_close(client);
    pthread_barrier_destroy(&start);
}

static void *drop_one(void *arg)
{
    (void)arg;
    pthread_barrier_wait(&start);
    wsd__client_unref(client);
    return NULL;
}

TEST(last_reference_dropped_on_any_thread_frees)
{
    pthread_t th[THREADS];

    /* As when wsd_close() races with the frees of released models: one of these threads, or
     * the closing one, drops the last reference and frees (ASan/valgrind see a double free or
     * a leak). */
    client = wsd__client_new();
    ASSERT(client);
    for (int i = 0; i < THREADS; i++)
        wsd__client_ref(client);
    ASSERT_EQ(wsd__client_refs(client), THREADS + 1);
    ASSERT_EQ(pthread_barrier_init(&start, NULL, THREADS + 1), 0);
    for (int i = 0; i < THREADS; i++)
        ASSERT_EQ(pthread_create(&th[i], NULL, drop_one, NULL), 0);
    pthread_barrier_wait(&start);
    wsd_close(client);
    for (int i = 0; i < THREADS; i++)
        ASSERT_EQ(pthread_join(th[i], NULL), 0);
    pthread_barrier_destroy(&start);
}

int main(int argc, char **argv)
{
    return test_main(argc, argv);
}
