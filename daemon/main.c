/*
 * main.c - weightsd's entry point: command line, default socket paths, signals, then the loop.
 * Nothing else lives here (STYLE LAYOUT), so tests link the same core the daemon runs.
 */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include "config.h"
#include "fault.h"
#include "fdstore.h"
#include "log.h"
#include "notify.h"
#include "server.h"
#include "service.h"

static const char usage_text[] =
    "Usage: weightsd [OPTIONS]\n"
    "\n"
    "Load model checkpoints once and share them with every worker on this host through\n"
    "sealed shared memory. Runs in the foreground and logs to stderr. SIGTERM or SIGINT\n"
    "stops it cleanly: connections close and running preloads are cancelled (a copy stops\n"
    "within one 8 MiB chunk; one still parsing headers first finishes that), then it exits\n"
    "0. A second SIGTERM or SIGINT while it stops exits at once (the daemon then dies by\n"
    "that signal). SIGHUP reloads the config.\n"
    "Under systemd it speaks the notify protocol (Type=notify, WatchdogSec=) and takes its\n"
    "sockets from socket units named 'client' and 'admin' (FileDescriptorName=).\n"
    "\n"
    "Options:\n"
    "  -c, --config FILE          read settings, access policy and models to preload from\n"
    "                             FILE (see /etc/weightsd/weightsd.conf); options given on\n"
    "                             the command line win over the file, also at reload\n"
    "      --check-config FILE    report every error in FILE (file:line) and exit: 0 when\n"
    "                             it is valid, 1 when not\n"
    "  -s, --socket PATH          client (worker) socket\n"
    "                             default: /run/weightsd/weightsd.sock for root,\n"
    "                             else $XDG_RUNTIME_DIR/weightsd/weightsd.sock\n"
    "  -a, --admin-socket PATH    admin (operator) socket; default admin.sock beside it\n"
    "      --max-connections N    connections on both sockets together, 1..1048576\n"
    "                             (default 4096)\n"
    "      --max-leases N         leases one connection may hold, 1..1048576 (default 1024)\n"
    "      --max-connections-per-uid N\n"
    "                             connections one uid may hold, 1..1048576 (default:\n"
    "                             --max-connections)\n"
    "      --max-frame BYTES      largest request frame accepted, 512..65536 (default 65536)\n"
    "      --max-fds N            fds one message may carry before the peer is dropped for fd\n"
    "                             abuse, 0..4 (default 4; no request carries fds yet)\n"
    "      --max-output-queue SIZE\n"
    "                             reply bytes queued for a peer that does not read them\n"
    "                             before it is dropped: 4K or more, K/M/G/T suffixes\n"
    "                             (default 256M)\n"
    "      --handshake-timeout MS HELLO must arrive within MS of connecting; a started request\n"
    "                             and unread replies may not stall longer (default 5000)\n"
    "      --idle-timeout MS      close connections holding no lease and sending nothing for\n"
    "                             MS; 0 = never (default 0)\n"
    "      --memory-budget SIZE   host-tier memory for models: bytes with K/M/G/T, N% of\n"
    "                             RAM, or none; idle models are evicted (least recently used\n"
    "                             first) to make room, else the preload is refused\n"
    "                             (default: none)\n"
    "  -l, --log-level LEVEL      error (or err), warning, notice, info (default) or debug\n"
    "  -h, --help                 show this help\n"
    "  -V, --version              show the version\n";

/* Large (one slot per stored fd), so not on main()'s stack. */
static fdstore_t fdstore;

static const char *signal_name(int signum)
{
    return signum == SIGTERM ? "SIGTERM" : signum == SIGINT ? "SIGINT" : strsignal(signum);
}

/*
 * The first SIGTERM/SIGINT stops the daemon cleanly: connections close and running preloads
 * are cancelled at once, and the loop then runs until their pool work has returned (one copy
 * chunk; longer only for a parse or a read stuck in the kernel). A second one means the
 * operator will not wait (Ctrl-C twice, or kill after systemctl stop): exit now. Nothing is left to clean up by then, since the first one unlinked
 * the sockets and sent STOPPING=1; the abandoned copies are memfds that die with the process,
 * and models already in systemd's fd store stay there, as after a crash. Dying by the signal
 * itself tells the service manager and the shell what happened, and systemd counts a SIGTERM
 * death as a clean stop.
 */
static void on_signal(uv_signal_t *h, int signum)
{
    service_t *svc = h->data;
    unsigned loading = 0;

    if (!svc->stopping) {
        log_info("received %s, stopping", signal_name(signum));
        service_stop(svc);
        return;
    }
    for (const model_t *m = svc->reg->models; m; m = m->next)
        loading += m->loading != NULL;
    log_warning("received %s again while stopping: exiting now, abandoning %u running preload%s",
                signal_name(signum), loading, loading == 1 ? "" : "s");
    (void)signal(signum, SIG_DFL);
    (void)raise(signum);
    _exit(128 + signum);
}

static void report_stderr(void *data, const char *msg)
{
    unsigned *n = data;

    fprintf(stderr, "%s\n", msg);
    (*n)++;
}

/* --check-config: every error on stderr, a one-line verdict on stdout. */
static int check_config(const char *path)
{
    config_t *cfg = NULL;
    unsigned n = 0;
    int r = config_load(path, &cfg, report_stderr, &n);

    if (r < 0) {
        printf("%s: %u error%s\n", path, n ? n : 1, n == 1 ? "" : "s");
        return 1;
    }
    printf("%s: OK (%zu model%s to preload)\n", path, cfg->nmodels, cfg->nmodels == 1 ? "" : "s");
    config_free(cfg);
    return 0;
}

static void report_log(void *data, const char *msg)
{
    log_error("%s", msg);
}

/* Makes the directory holding a socket (one level: its parent must exist). */
static int ensure_dir(const char *sock_path)
{
    char dir[PATH_MAX];
    char *slash;

    snprintf(dir, sizeof(dir), "%s", sock_path);
    slash = strrchr(dir, '/');
    if (!slash || slash == dir)
        return 0;
    *slash = '\0';
    if (mkdir(dir, 0755) < 0 && errno != EEXIST)
        return -errno;
    return 0;
}

/* Like parse_uint() with a lower bound, for limits where 0 means something. */
static int parse_range(const char *s, unsigned min, unsigned max, unsigned *ret)
{
    char *end;
    unsigned long v;

    errno = 0;
    v = strtoul(s, &end, 10);
    if (errno || *end || end == s || s[0] == '-' || v < min || v > max)
        return -EINVAL;
    *ret = (unsigned)v;
    return 0;
}

static int parse_uint(const char *s, unsigned max, unsigned *ret)
{
    char *end;
    unsigned long v;

    errno = 0;
    v = strtoul(s, &end, 10);
    if (errno || *end || end == s || v == 0 || v > max)
        return -EINVAL;
    *ret = (unsigned)v;
    return 0;
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"config", required_argument, NULL, 'c'},
        {"check-config", required_argument, NULL, 'K'},
        {"socket", required_argument, NULL, 's'},
        {"admin-socket", required_argument, NULL, 'a'},
        {"max-connections", required_argument, NULL, 'C'},
        {"max-leases", required_argument, NULL, 'L'},
        {"max-connections-per-uid", required_argument, NULL, 'U'},
        {"max-frame", required_argument, NULL, 'F'},
        {"max-fds", required_argument, NULL, 'D'},
        {"max-output-queue", required_argument, NULL, 'Q'},
        {"handshake-timeout", required_argument, NULL, 'H'},
        {"idle-timeout", required_argument, NULL, 'I'},
        {"memory-budget", required_argument, NULL, 'B'},
        {"log-level", required_argument, NULL, 'l'},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        {NULL, 0, NULL, 0},
    };
    server_opts_t opts = {
        .socket_fd = -1,
        .admin_fd = -1,
        .max_connections = WSD_CONNECTIONS_MAX_DEFAULT,
        .max_leases_per_conn = WSD_LEASES_PER_CONN_DEFAULT,
        .max_outq_bytes = WSD_OUTQ_BYTES_MAX_DEFAULT,
        .max_frame = WSD_REQUEST_MAX,
        .max_fds_per_msg = WSD_FDS_PER_FRAME_MAX,
        .handshake_timeout_ms = WSD_HANDSHAKE_TIMEOUT_MS,
        .idle_timeout_ms = WSD_IDLE_TIMEOUT_MS_DEFAULT,
    };
    /* CONFIG_CLI_* for what the command line set: it wins over the config file, at start and
     * at every reload. */
    unsigned given = 0;
    uint64_t outq;
    unsigned frame;
    char sock_default[PATH_MAX], admin_default[PATH_MAX];
    uv_signal_t sigterm, sigint;
    uv_loop_t loop;
    registry_t *reg;
    server_t srv;
    service_t svc;
    config_t *cfg = NULL;
    const char *config_path = NULL;
    char err[256];
    uint64_t budget = 0;
    service_base_t base;
    int level;
    int opt, r;

    while ((opt = getopt_long(argc, argv, "c:s:a:l:hV", longopts, NULL)) != -1) {
        switch (opt) {
        case 'c':
            config_path = optarg;
            break;
        case 'K':
            return check_config(optarg);
        case 's':
            given |= CONFIG_CLI_SOCKET;
            opts.socket_path = optarg;
            break;
        case 'a':
            given |= CONFIG_CLI_ADMIN_SOCKET;
            opts.admin_path = optarg;
            break;
        case 'C':
            given |= CONFIG_CLI_MAX_CONNECTIONS;
            if (parse_uint(optarg, 1u << 20, &opts.max_connections) < 0) {
                fprintf(stderr, "weightsd: --max-connections wants 1..1048576, got '%s'\n",
                        optarg);
                return 2;
            }
            break;
        case 'L':
            given |= CONFIG_CLI_MAX_LEASES;
            if (parse_uint(optarg, 1u << 20, &opts.max_leases_per_conn) < 0) {
                fprintf(stderr, "weightsd: --max-leases wants 1..1048576, got '%s'\n", optarg);
                return 2;
            }
            break;
        case 'U':
            given |= CONFIG_CLI_MAX_CONNS_PER_UID;
            if (parse_uint(optarg, 1u << 20, &opts.max_conns_per_uid) < 0) {
                fprintf(stderr, "weightsd: --max-connections-per-uid wants 1..1048576, got "
                                "'%s'\n", optarg);
                return 2;
            }
            break;
        case 'F':
            given |= CONFIG_CLI_MAX_FRAME;
            if (parse_range(optarg, WSD_REQUEST_MIN, WSD_REQUEST_MAX, &frame) < 0) {
                fprintf(stderr, "weightsd: --max-frame wants %u..%u, got '%s'\n",
                        WSD_REQUEST_MIN, WSD_REQUEST_MAX, optarg);
                return 2;
            }
            opts.max_frame = frame;
            break;
        case 'D':
            given |= CONFIG_CLI_MAX_FDS;
            if (parse_range(optarg, 0, WSD_FDS_PER_FRAME_MAX, &opts.max_fds_per_msg) < 0) {
                fprintf(stderr, "weightsd: --max-fds wants 0..%u, got '%s'\n",
                        WSD_FDS_PER_FRAME_MAX, optarg);
                return 2;
            }
            break;
        case 'Q':
            given |= CONFIG_CLI_MAX_OUTPUT_QUEUE;
            if (registry_parse_bytes(optarg, &outq) < 0 || outq < 4096 || outq > SIZE_MAX / 2) {
                fprintf(stderr,
                        "weightsd: --max-output-queue wants 4K or more (K/M/G/T "
                        "suffixes), got '%s'\n",
                        optarg);
                return 2;
            }
            opts.max_outq_bytes = (size_t)outq;
            break;
        case 'H':
            given |= CONFIG_CLI_HANDSHAKE_TIMEOUT;
            if (parse_range(optarg, 1, 3600000, &opts.handshake_timeout_ms) < 0) {
                fprintf(stderr, "weightsd: --handshake-timeout wants 1..3600000 ms, got '%s'\n",
                        optarg);
                return 2;
            }
            break;
        case 'I':
            given |= CONFIG_CLI_IDLE_TIMEOUT;
            if (parse_range(optarg, 0, 86400000, &opts.idle_timeout_ms) < 0) {
                fprintf(stderr, "weightsd: --idle-timeout wants 0..86400000 ms, got '%s'\n",
                        optarg);
                return 2;
            }
            break;
        case 'B':
            given |= CONFIG_CLI_MEMORY_BUDGET;
            if (config_parse_memory_budget(optarg, &budget) < 0) {
                fprintf(stderr, "weightsd: --memory-budget wants %s, got '%s'\n",
                        CONFIG_MEMORY_BUDGET_SYNTAX, optarg);
                return 2;
            }
            break;
        case 'l':
            r = log_level_from_name(optarg);
            if (r < 0) {
                fprintf(stderr, "weightsd: unknown log level '%s'\n", optarg);
                return 2;
            }
            log_set_level(r);
            given |= CONFIG_CLI_LOG_LEVEL;
            break;
        case 'h':
            fputs(usage_text, stdout);
            return 0;
        case 'V':
            printf("weightsd %d.%d.%d (protocol %d)\n", WSD_VERSION_MAJOR, WSD_VERSION_MINOR,
                   WSD_VERSION_PATCH, WSD_PROTOCOL_VERSION);
            return 0;
        default:
            fprintf(stderr, "Try 'weightsd --help'.\n");
            return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "weightsd: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }

    /* What a reload starts from: the command line over the defaults (service_base_t). */
    base.opts = opts;
    base.budget = budget;
    base.log_level = level = log_get_level();
    if (config_path) {
        r = config_load(config_path, &cfg, report_log, NULL);
        if (r < 0) {
            log_error("%s: not starting with a broken config (%s)", config_path,
                      r == -EINVAL ? "every error is listed above" : strerror(-r));
            return 1;
        }
        /* The command line wins: drop what it set from the file's values (service.c does the
         * same at each reload). */
        config_drop_given(cfg, given);
        /* Copied: a reload frees the config these strings live in. */
        if (cfg->socket_path) {
            snprintf(sock_default, sizeof(sock_default), "%s", cfg->socket_path);
            opts.socket_path = sock_default;
        }
        if (cfg->admin_path) {
            snprintf(admin_default, sizeof(admin_default), "%s", cfg->admin_path);
            opts.admin_path = admin_default;
        }
        service_overlay_config(cfg, &opts, &budget, &level);
        log_set_level(level);
    }
    /* Stored model fds are kept aside until the registry exists to re-adopt them. */
    fdstore_init(&fdstore, NULL);
    if (notify_listen_fds(&opts.socket_fd, &opts.admin_fd, fdstore_collect_cb, &fdstore, err,
                          sizeof(err)) < 0) {
        log_error("socket activation: %s", err);
        config_free(cfg);
        return 1;
    }

    if (!opts.socket_path) {
        const char *xdg = getenv("XDG_RUNTIME_DIR");

        if (geteuid() == 0)
            snprintf(sock_default, sizeof(sock_default), "/run/weightsd/weightsd.sock");
        else if (xdg && *xdg)
            snprintf(sock_default, sizeof(sock_default), "%s/weightsd/weightsd.sock", xdg);
        else {
            fprintf(stderr, "weightsd: XDG_RUNTIME_DIR is unset; pass --socket PATH\n");
            config_free(cfg);
            return 2;
        }
        opts.socket_path = sock_default;
    }
    if (!opts.admin_path) {
        char *slash;

        snprintf(admin_default, sizeof(admin_default), "%s", opts.socket_path);
        slash = strrchr(admin_default, '/');
        snprintf(slash ? slash + 1 : admin_default,
                 sizeof(admin_default) - (size_t)(slash ? slash + 1 - admin_default : 0),
                 "admin.sock");
        opts.admin_path = admin_default;
    }
    if (strcmp(opts.socket_path, opts.admin_path) == 0) {
        fprintf(stderr, "weightsd: the client and admin sockets must be different files\n");
        config_free(cfg);
        return 2;
    }
    if ((opts.socket_fd < 0 && ensure_dir(opts.socket_path) < 0) ||
        (opts.admin_fd < 0 && ensure_dir(opts.admin_path) < 0)) {
        fprintf(stderr, "weightsd: cannot create the socket directory: %s\n", strerror(errno));
        config_free(cfg);
        return 1;
    }

    signal(SIGPIPE, SIG_IGN);
    /* A memfd past RLIMIT_FSIZE must fail that one preload (EFBIG), not kill the daemon. */
    signal(SIGXFSZ, SIG_IGN);
    r = uv_loop_init(&loop);
    if (r < 0) {
        log_error("uv_loop_init: %s", uv_strerror(r));
        fdstore_done(&fdstore);
        config_free(cfg);
        return 1;
    }
    reg = registry_new(&loop);
    if (!reg) {
        log_error("out of memory");
        (void)uv_loop_close(&loop);
        fdstore_done(&fdstore);
        config_free(cfg); /* service_init() has not taken it yet */
        return 1;
    }
    reg->budget_bytes = budget;
    registry_detect_cgroup_limit(reg);
    if (cfg)
        registry_set_client_preload(reg, cfg->client_preload, cfg->client_preload_dirs);
    if (fdstore.npending)
        log_info("fd store: %u model(s) re-adopted without reading any checkpoint",
                 fdstore_adopt_all(&fdstore, reg));
    /* Service first: the watchdog runs from the start, and the policy exists before any peer. */
    (void)service_init(&svc, &loop, reg, config_path, cfg, given, &base);
    opts.policy = &svc.policy;
    fdstore.notify = &svc.notify;
    fdstore_purge(&fdstore, reg);
    fdstore_attach(&fdstore, reg);
    r = server_start(&srv, &loop, reg, &opts);
    if (r < 0) {
        service_close(&svc);
        (void)uv_run(&loop, UV_RUN_DEFAULT);
        registry_free(reg);
        (void)uv_loop_close(&loop);
        return 1;
    }
    /* Without these handlers SIGTERM would kill us mid-flight instead of stopping cleanly,
     * so failing to install them (EMFILE for libuv's signal pipe) fails the start. */
    r = uv_signal_init(&loop, &sigterm);
    if (r == 0) {
        r = uv_signal_init(&loop, &sigint);
        if (r < 0)
            uv_close((uv_handle_t *)&sigterm, NULL);
    }
    if (r == 0) {
        sigterm.data = sigint.data = &svc;
        /* Not one-shot: a second signal while stopping is handled too (on_signal). */
        r = uv_signal_start(&sigterm, on_signal, SIGTERM);
        if (r == 0)
            r = uv_signal_start(&sigint, on_signal, SIGINT);
        if (r < 0) {
            uv_close((uv_handle_t *)&sigterm, NULL);
            uv_close((uv_handle_t *)&sigint, NULL);
        }
    }
    if (r < 0) {
        log_error("cannot handle SIGTERM/SIGINT: %s", uv_strerror(r));
        server_stop(&srv);
        service_close(&svc);
        (void)uv_run(&loop, UV_RUN_DEFAULT);
        registry_free(reg);
        (void)uv_loop_close(&loop);
        return 1;
    }
    /* Signal handles alone must not keep the loop running once the server has stopped. */
    uv_unref((uv_handle_t *)&sigterm);
    uv_unref((uv_handle_t *)&sigint);
    log_info("weightsd %d.%d.%d serving (pid %d)", WSD_VERSION_MAJOR, WSD_VERSION_MINOR,
             WSD_VERSION_PATCH, (int)getpid());
    if (fault_armed())
        log_warning("fault injection armed: WEIGHTSD_FAULT=%s (a test build)", fault_armed());
    if (!source_cache_auto_works())
        log_notice("this kernel has no cachestat() (Linux 6.5): --page-cache auto keeps the "
                   "checkpoints' page cache; drop frees it");
    service_start(&svc, &srv);

    (void)uv_run(&loop, UV_RUN_DEFAULT);

    service_close(&svc);
    /* Both signal handles must be closed for the loop to be closable. */
    if (!uv_is_closing((uv_handle_t *)&sigterm))
        uv_close((uv_handle_t *)&sigterm, NULL);
    if (!uv_is_closing((uv_handle_t *)&sigint))
        uv_close((uv_handle_t *)&sigint, NULL);
    (void)uv_run(&loop, UV_RUN_DEFAULT);
    registry_free(reg);
    r = uv_loop_close(&loop);
    if (r < 0)
        log_warning("loop closed with handles open: %s", uv_strerror(r));
    /* Suppressed lines still counted are reported, not lost with the process. */
    log_ratelimit_flush(/* all= */ true);
    log_info("stopped");
    return 0;
}
