/*
 * test-config.c - config.c on files written here: memory-budget takes what --memory-budget
 * takes (a percentage of RAM included) with the same error wording, log-level the names the
 * command line takes, and config_drop_given() unsets exactly what the command line gave, so a
 * reload cannot override it.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "log.h"
#include "test.h"

static char reported[4096];

static void report(void *data, const char *msg)
{
    size_t n = strlen(reported);

    snprintf(reported + n, sizeof(reported) - n, "%s\n", msg);
}

/* Loads \p text as a config file; *ret is NULL when it has errors (in `reported`). */
static int load(const char *text, config_t **ret)
{
    char path[] = "/tmp/wsd-test-config-XXXXXX";
    int fd = mkstemp(path), r;
    FILE *f;

    ASSERT(fd >= 0);
    f = fdopen(fd, "w");
    ASSERT(f);
    fputs(text, f);
    ASSERT_EQ(fclose(f), 0);
    reported[0] = '\0';
    r = config_load(path, ret, report, NULL);
    (void)unlink(path);
    return r;
}

static uint64_t ram_percent(unsigned pct)
{
    return (uint64_t)sysconf(_SC_PHYS_PAGES) * (uint64_t)sysconf(_SC_PAGESIZE) / 100 * pct;
}

TEST(memory_budget_takes_a_percentage_of_ram)
{
    config_t *c;

    ASSERT_EQ(load("[daemon]\nmemory-budget = 50%\n", &c), 0);
    ASSERT(c->budget_set);
    ASSERT_UINT_EQ(c->memory_budget, ram_percent(50));
    ASSERT_GT(c->memory_budget, 0);
    config_free(c);
}

TEST(memory_budget_sizes_and_none)
{
    static const struct {
        const char *v;
        uint64_t want;
    } ok[] = {
        {"none", 0}, {"0", 0}, {"4096", 4096}, {"64K", 64ull << 10}, {"2G", 2ull << 30},
        {"3GiB", 3ull << 30}, {"1T", 1ull << 40},
    };
    char text[128];
    config_t *c;

    for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
        snprintf(text, sizeof(text), "[daemon]\nmemory-budget = %s\n", ok[i].v);
        ASSERT_EQ(load(text, &c), 0);
        ASSERT(c->budget_set);
        ASSERT_UINT_EQ(c->memory_budget, ok[i].want);
        config_free(c);
    }
}

TEST(memory_budget_errors_read_as_the_command_line_s)
{
    static const char *const bad[] = {"101%", "0%", "-1G", "10x", "5%%", "1Q", "G"};
    char text[128], want[256];
    config_t *c = NULL;

    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        snprintf(text, sizeof(text), "[daemon]\nmemory-budget = %s\n", bad[i]);
        ASSERT_EQ(load(text, &c), -EINVAL);
        ASSERT(c == NULL);
        /* The wording weightsd --memory-budget uses, after the file:line. */
        snprintf(want, sizeof(want), ":2: memory-budget: wants %s, got '%s'\n",
                 CONFIG_MEMORY_BUDGET_SYNTAX, bad[i]);
        ASSERT_STR_CONTAINS(reported, want);
    }
}

TEST(one_parser_for_both)
{
    uint64_t v = 7;

    ASSERT_EQ(config_parse_memory_budget("25%", &v), 0);
    ASSERT_UINT_EQ(v, ram_percent(25));
    ASSERT_EQ(config_parse_memory_budget("none", &v), 0);
    ASSERT_UINT_EQ(v, 0);
    v = 7;
    ASSERT_EQ(config_parse_memory_budget("200%", &v), -EINVAL);
    ASSERT_EQ(config_parse_memory_budget("", &v), -EINVAL);
    ASSERT_UINT_EQ(v, 7);
}

/* max-output-queue is a byte count (as --max-output-queue): suffixes yes, a share of RAM no. */
TEST(max_output_queue_is_bytes)
{
    static const struct {
        const char *v;
        uint64_t want;
    } ok[] = {{"4096", 4096}, {"64K", 64 << 10}, {"1MiB", 1 << 20}, {"2MB", 2 << 20}};
    static const char *bad[] = {"50%", "1K", "0", "-4K", "4X", "4Kb"};
    char text[128];
    config_t *c;

    for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
        snprintf(text, sizeof(text), "[daemon]\nmax-output-queue = %s\n", ok[i].v);
        ASSERT_EQ(load(text, &c), 0);
        ASSERT_UINT_EQ(c->max_outq, ok[i].want);
        config_free(c);
    }
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        snprintf(text, sizeof(text), "[daemon]\nmax-output-queue = %s\n", bad[i]);
        c = NULL;
        if (load(text, &c) == 0 || c)
            TEST_FAIL("max-output-queue = '%s' accepted", bad[i]);
        ASSERT(strstr(reported, "max-output-queue: wants 4K or more"));
    }
}

TEST(log_level_names_match_the_command_line)
{
    static const char *const names[] = {"err", "error", "warning", "notice", "info", "debug"};
    char text[128];
    config_t *c;

    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        snprintf(text, sizeof(text), "[daemon]\nlog-level = %s\n", names[i]);
        ASSERT_EQ(load(text, &c), 0);
        ASSERT_EQ(c->log_level, log_level_from_name(names[i]));
        config_free(c);
    }
    ASSERT_EQ(load("[daemon]\nlog-level = loud\n", &c), -EINVAL);
    ASSERT_STR_CONTAINS(reported, "log-level: 'loud' is not error (or err), warning, notice, info or debug");
}

static const char every_cli_key[] = "[daemon]\n"
                                    "socket = /tmp/x/c.sock\n"
                                    "admin-socket = /tmp/x/a.sock\n"
                                    "log-level = err\n"
                                    "max-connections = 10\n"
                                    "max-leases = 11\n"
                                    "max-connections-per-uid = 12\n"
                                    "max-frame = 1024\n"
                                    "max-fds = 0\n"
                                    "max-output-queue = 1M\n"
                                    "handshake-timeout = 400\n"
                                    "idle-timeout = 0\n"
                                    "memory-budget = 1G\n"
                                    "allow-client-preload = yes\n";

TEST(drop_given_unsets_each_command_line_setting)
{
    config_t *c;

    ASSERT_EQ(load(every_cli_key, &c), 0);
    config_drop_given(c, 0);
    ASSERT_STR_EQ(c->socket_path, "/tmp/x/c.sock");
    ASSERT_STR_EQ(c->admin_path, "/tmp/x/a.sock");
    ASSERT_EQ(c->log_level, LOG_LVL_ERR);
    ASSERT_EQ(c->max_connections, 10);
    ASSERT_EQ(c->max_leases, 11);
    ASSERT_EQ(c->max_conns_per_uid, 12);
    ASSERT_EQ(c->max_frame, 1024);
    ASSERT(c->max_fds_set);
    ASSERT_UINT_EQ(c->max_outq, 1 << 20);
    ASSERT_EQ(c->handshake_timeout_ms, 400);
    ASSERT(c->idle_timeout_set);
    ASSERT(c->budget_set);

    /* One flag at a time touches only its own setting. */
    config_drop_given(c, CONFIG_CLI_LOG_LEVEL);
    ASSERT_EQ(c->log_level, -1);
    ASSERT_EQ(c->max_connections, 10);
    config_drop_given(c, CONFIG_CLI_MAX_FRAME);
    ASSERT_EQ(c->max_frame, 0);
    ASSERT_EQ(c->handshake_timeout_ms, 400);

    config_drop_given(c, CONFIG_CLI_SOCKET | CONFIG_CLI_ADMIN_SOCKET | CONFIG_CLI_MAX_CONNECTIONS |
                             CONFIG_CLI_MAX_LEASES | CONFIG_CLI_MAX_CONNS_PER_UID |
                             CONFIG_CLI_MAX_FDS | CONFIG_CLI_MAX_OUTPUT_QUEUE |
                             CONFIG_CLI_HANDSHAKE_TIMEOUT | CONFIG_CLI_IDLE_TIMEOUT |
                             CONFIG_CLI_MEMORY_BUDGET);
    ASSERT(c->socket_path == NULL);
    ASSERT(c->admin_path == NULL);
    ASSERT_EQ(c->max_connections, 0);
    ASSERT_EQ(c->max_leases, 0);
    ASSERT_EQ(c->max_conns_per_uid, 0);
    ASSERT(!c->max_fds_set);
    ASSERT_UINT_EQ(c->max_outq, 0);
    ASSERT_EQ(c->handshake_timeout_ms, 0);
    ASSERT(!c->idle_timeout_set);
    ASSERT(!c->budget_set);
    /* Keys without an option are the file's alone. */
    ASSERT(c->client_preload);
    config_free(c);
}

/* Two configs of one model "g" from /m.safetensors with \p a and \p b as its devices line and
 * \p extra_b added to the second; both must load. */
static void pair(const char *a, const char *b, const char *extra_b, config_t **ca, config_t **cb)
{
    char text[512];

    snprintf(text, sizeof(text), "[model g]\npath = /m.safetensors\ndevices = %s\n", a);
    ASSERT_EQ(load(text, ca), 0);
    snprintf(text, sizeof(text), "[model g]\npath = /m.safetensors\ndevices = %s\n%s", b,
             extra_b);
    ASSERT_EQ(load(text, cb), 0);
    ASSERT_EQ((*ca)->nmodels, 1);
    ASSERT_EQ((*cb)->nmodels, 1);
}

TEST(device_changes_alone_are_told_apart)
{
    static const struct {
        const char *was, *now, *extra;
        bool same, devices_change;
    } cases[] = {
        {"host cuda:0 cuda:1", "cuda:1 host cuda:0", "", true, false}, /* order is no change */
        {"host", "host cuda:0", "", false, true},                      /* added */
        {"host cuda:0 cuda:1", "host cuda:1", "", false, true},        /* dropped */
        {"cuda:0", "cuda:2", "", false, true},                         /* swapped */
        {"cuda:0 cuda:1", "host", "", false, true},                    /* all dropped */
        {"host", "host cuda:0", "dtype = bf16\n", false, false},       /* and more changed */
        {"cuda:0", "cuda:1", "allow-gpu-write = yes\n", false, false},
        {"host cuda:3", "host cuda:3", "", true, false},
    };

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        config_t *a, *b;

        pair(cases[i].was, cases[i].now, cases[i].extra, &a, &b);
        if (cfg_model_same(&a->models[0], &b->models[0]) != cases[i].same ||
            cfg_model_devices_change(&a->models[0], &b->models[0]) != cases[i].devices_change)
            TEST_FAIL("case %zu ('%s' -> '%s' %s): same %d, devices_change %d", i, cases[i].was,
                      cases[i].now, cases[i].extra,
                      cfg_model_same(&a->models[0], &b->models[0]),
                      cfg_model_devices_change(&a->models[0], &b->models[0]));
        config_free(a);
        config_free(b);
    }
}

TEST(a_device_listed_twice_is_an_error)
{
    config_t *c = NULL;

    ASSERT_EQ(load("[model g]\npath = /m.safetensors\ndevices = host cuda:1 cuda:1\n", &c),
              -EINVAL);
    ASSERT(c == NULL);
    ASSERT_STR_CONTAINS(reported, ":3: devices: 'cuda:1' given twice");
}

int main(int argc, char **argv)
{
    return test_main(argc, argv);
}
