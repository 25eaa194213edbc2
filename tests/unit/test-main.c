/*
 * test-main.c - runner for test.h: forks each registered test, kills it after
 * WSD_TEST_TIMEOUT seconds (default 60), prints TAP. "binary NAME" runs only the named test
 * in-process (for gdb).
 */
#include "test.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#define SKIP_CODE 77

static struct test_case *tests;

void test_register(struct test_case *tc)
{
    /* Constructors run in file order but prepend; append instead to keep source order. */
    struct test_case **p = &tests;

    while (*p)
        p = &(*p)->next;
    *p = tc;
}

void test_skip(const char *why)
{
    fprintf(stderr, "# skip: %s\n", why);
    exit(SKIP_CODE);
}

static int run_one(struct test_case *tc, unsigned timeout)
{
    pid_t pid;
    int status;

    fflush(stdout);
    fflush(stderr);
    pid = fork();
    if (pid < 0) {
        perror("fork");
        return 1;
    }
    if (pid == 0) {
        alarm(timeout);
        tc->fn();
        exit(0);
    }
    while (waitpid(pid, &status, 0) < 0)
        ;
    if (WIFEXITED(status))
        return WEXITSTATUS(status);
    fprintf(stderr, "# %s: killed by signal %d%s\n", tc->name, WTERMSIG(status),
            WTERMSIG(status) == SIGALRM ? " (timeout)" : "");
    return 1;
}

int test_main(int argc, char **argv)
{
    const char *t = getenv("WSD_TEST_TIMEOUT");
    unsigned timeout = t ? (unsigned)atoi(t) : 60;
    int n = 0, failed = 0, skipped = 0, i = 0;

    signal(SIGPIPE, SIG_IGN);
    if (argc > 1) {
        for (struct test_case *tc = tests; tc; tc = tc->next)
            if (strcmp(tc->name, argv[1]) == 0) {
                tc->fn();
                return 0;
            }
        fprintf(stderr, "no test named %s\n", argv[1]);
        return 2;
    }
    for (struct test_case *tc = tests; tc; tc = tc->next)
        n++;
    printf("1..%d\n", n);
    for (struct test_case *tc = tests; tc; tc = tc->next) {
        int r = run_one(tc, timeout);

        i++;
        if (r == 0)
            printf("ok %d - %s\n", i, tc->name);
        else if (r == SKIP_CODE) {
            printf("ok %d - %s # SKIP\n", i, tc->name);
            skipped++;
        } else {
            printf("not ok %d - %s\n", i, tc->name);
            failed++;
        }
    }
    if (failed)
        return 1;
    return n > 0 && skipped == n ? SKIP_CODE : 0;
}
