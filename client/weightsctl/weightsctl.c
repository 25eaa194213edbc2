/*
 * weightsctl - the operator's command line for weightsd's admin socket. Uses only the public
 * libweightsd API; every structured answer comes from the daemon as JSON, printed as it is with
 * --json or rendered as a table otherwise. Failures print one line on stderr and exit 1.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <limits.h>
#include <unistd.h>

#include <jansson.h>

#include "weightsd.h"

static const char usage_text[] =
    "Usage: weightsctl [OPTIONS] COMMAND [ARGS]\n"
    "\n"
    "Drive a running weightsd through its admin socket.\n"
    "\n"
    "Commands:\n"
    "  preload NAME FILE    load a checkpoint (safetensors, torch.save zip, or an HF\n"
    "                       *.index.json) and serve it as NAME\n"
    "      --dtype bf16|f16|f32   convert floating tensors once at preload\n"
    "      --share memfd|file     sealed copy (default) or the file itself\n"
    "      --key KEY              serve only this subtree of a nested torch checkpoint\n"
    "      --no-verify            skip CRC-32 checks of zip records\n"
    "      --hugepages auto|never|always  back the copy with 2 MiB pages (hugetlb pool, or\n"
    "                             shmem transparent huge pages); auto falls back to 4 KiB\n"
    "      --page-cache auto|keep|drop  what happens to the file's page-cache pages once\n"
    "                             copied: auto (default) drops those this preload brought\n"
    "                             in, drop drops them all, keep leaves them (--share file\n"
    "                             always keeps)\n"
    "      --device cpu|cuda:N    also upload one copy to GPU N for every worker\n"
    "                             (repeatable; the host copy is always kept). Given for a\n"
    "                             NAME already served from the same FILE, --key, --dtype\n"
    "                             and --share, it uploads that copy to the devices it is\n"
    "                             not on yet, reading no checkpoint\n"
    "      --allow-gpu-write      let workers map GPU copies writable\n"
    "      --cancel-on-exit       cancel the preload if weightsctl dies or is interrupted\n"
    "                             (by default the daemon finishes it regardless)\n"
    "                       progress (bytes, rate, ETA) is shown on a terminal, as plain\n"
    "                       lines otherwise, and not at all with --json\n"
    "  cancel NAME          stop a preload that is still running\n"
    "  evict NAME           free a model (refused while workers hold leases)\n"
    "      --drain                refuse new opens, free when the last lease goes\n"
    "      --force                free now; mapped workers keep their pages\n"
    "      --device cuda:N        free only the copy on GPU N; the model stays served\n"
    "                             on the host tier and its other devices (the lease\n"
    "                             rules above count the leases on GPU N; --force on a\n"
    "                             legacy IPC copy drains it instead)\n"
    "  list                 models with state, bytes, lease count and where each is\n"
    "                       served (cpu, then its GPUs)\n"
    "  info NAME            one model: source, tensors, metadata (read in pages of up to\n"
    "                       16384 tensors, so any model can be listed)\n"
    "      --no-tensors           the summary alone, without the tensor list\n"
    "  stats                daemon counters\n"
    "      --prometheus           in the Prometheus text format\n"
    "      --metrics-file PATH    write that format to PATH atomically (a node_exporter\n"
    "                             textfile), once or, with --interval SECS, every SECS\n"
    "                             seconds until SIGTERM\n"
    "  config-check FILE    check a weightsd config file and report every error as\n"
    "                       FILE:LINE: ... (runs weightsd --check-config FILE)\n"
    "\n"
    "The options under a command apply to it only; given to another, they are an error.\n"
    "\n"
    "Options:\n"
    "  -s, --admin-socket PATH  admin socket (default: $WEIGHTSD_ADMIN_SOCKET, else\n"
    "                           /run/weightsd/admin.sock for root or\n"
    "                           $XDG_RUNTIME_DIR/weightsd/admin.sock)\n"
    "  -j, --json               print the daemon's JSON answer (list, info, stats, preload,\n"
    "                           evict, cancel; info's pages as one document)\n"
    "  -t, --timeout MS         request timeout in milliseconds (default 600000; 0 = none)\n"
    "  -h, --help               show this help\n"
    "  -V, --version            show the version\n";

enum {
    OPT_DTYPE = 256,
    OPT_SHARE,
    OPT_KEY,
    OPT_NO_VERIFY,
    OPT_DRAIN,
    OPT_FORCE,
    OPT_PROMETHEUS,
    OPT_CANCEL_ON_EXIT,
    OPT_HUGEPAGES,
    OPT_DEVICE,
    OPT_ALLOW_GPU_WRITE,
    OPT_METRICS_FILE,
    OPT_INTERVAL,
    OPT_PAGE_CACHE,
    OPT_NO_TENSORS,
};

/* --device may be given once per GPU (and for cpu); more than this is surely a mistake. */
#define DEVICES_MAX 65

static const char *prog = "weightsctl";

static double now_s(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

struct progress_state {
    int tty;       /* stderr is a terminal: redraw one line */
    double t0;     /* start of the current phase: each counts its bytes from zero */
    double last;   /* last plain line printed */
    int shown;     /* anything printed */
    char phase[16]; /* the current phase's name */
};

static void human_bytes(uint64_t n, char *buf, size_t len);

/* Progress of a preload: a redrawn bar on a terminal, a plain line a second otherwise. */
static void show_progress(void *data, const char *phase, uint64_t done, uint64_t total)
{
    struct progress_state *ps = data;
    double t = now_s(), el, rate;
    char d[32], tot[32], rt[32];
    int pct = total ? (int)(done * 100 / total) : 0;

    if (strncmp(ps->phase, phase, sizeof(ps->phase) - 1) != 0) {
        /* A new phase ("copy" then "upload"): its rate and ETA start now, on a new line. */
        if (ps->tty && ps->shown)
            fputc('\n', stderr);
        snprintf(ps->phase, sizeof(ps->phase), "%s", phase);
        ps->t0 = t;
        ps->last = 0;
    }
    el = t - ps->t0;
    rate = el > 0 ? (double)done / el : 0;

    human_bytes(done, d, sizeof(d));
    human_bytes(total, tot, sizeof(tot));
    human_bytes((uint64_t)rate, rt, sizeof(rt));
    if (ps->tty) {
        char bar[31];
        int fill = pct * 30 / 100;

        memset(bar, '#', (size_t)fill);
        memset(bar + fill, '.', (size_t)(30 - fill));
        bar[30] = '\0';
        fprintf(stderr, "\r%-5s [%s] %3d%% %s / %s  %s/s  ETA %.0fs   ", phase, bar, pct, d, tot,
                rt, rate > 0 && total > done ? (double)(total - done) / rate : 0.0);
    } else {
        if (t - ps->last < 1.0)
            return;
        ps->last = t;
        /* A phase's first frame has no rate yet, and parsing counts no bytes. */
        if (total == 0)
            fprintf(stderr, "%s: %.1f s\n", phase, el);
        else if (el < 0.1)
            fprintf(stderr, "%s: %s of %s (%d%%)\n", phase, d, tot, pct);
        else
            fprintf(stderr, "%s: %s of %s (%d%%), %s/s\n", phase, d, tot, pct, rt);
    }
    ps->shown = 1;
}

static int fail(const char *cmd, int r, wsd_client_t *c)
{
    const char *msg = c ? wsd_last_error(c) : "";

    if (msg && *msg && strcmp(msg, wsd_strerror(r)) != 0)
        fprintf(stderr, "%s: %s: %s (%s)\n", prog, cmd, msg, wsd_strerror(r));
    else if (msg && *msg)
        fprintf(stderr, "%s: %s: %s\n", prog, cmd, msg);
    else
        fprintf(stderr, "%s: %s: %s\n", prog, cmd, wsd_strerror(r));
    return 1;
}

static void human_bytes(uint64_t n, char *buf, size_t len)
{
    static const char *units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    double v = (double)n;
    unsigned u = 0;

    while (v >= 1024 && u < 4) {
        v /= 1024;
        u++;
    }
    if (u == 0)
        snprintf(buf, len, "%" PRIu64 " B", n);
    else
        snprintf(buf, len, "%.1f %s", v, units[u]);
}

static uint64_t jint(json_t *o, const char *key)
{
    json_t *v = json_object_get(o, key);

    return json_is_integer(v) ? (uint64_t)json_integer_value(v) : 0;
}

static const char *jstr(json_t *o, const char *key)
{
    const char *s = json_string_value(json_object_get(o, key));

    return s ? s : "-";
}

static void print_list(json_t *doc)
{
    size_t i;
    json_t *m;

    printf("%-24s %-10s %12s %7s  %s\n", "NAME", "STATE", "BYTES", "LEASES", "SERVED ON");
    json_array_foreach(doc, i, m)
    {
        char b[32];
        size_t k;
        json_t *d;

        human_bytes(jint(m, "bytes"), b, sizeof(b));
        printf("%-24s %-10s %12s %7" PRIu64 "  %s", jstr(m, "name"), jstr(m, "state"), b,
               jint(m, "leases"), strcmp(jstr(m, "state"), "loading") == 0 ? "-" : "cpu");
        json_array_foreach(json_object_get(m, "devices"), k, d)
        {
            printf(" %s", json_string_value(d) ? json_string_value(d) : "?");
        }
        json_array_foreach(json_object_get(m, "uploading"), k, d)
        {
            printf(" (uploading to %s)", json_string_value(d) ? json_string_value(d) : "?");
        }
        putchar('\n');
    }
}

static void print_shape(json_t *arr)
{
    size_t i;
    json_t *v;

    putchar('(');
    json_array_foreach(arr, i, v)
    {
        printf("%s%" JSON_INTEGER_FORMAT, i ? ", " : "", json_integer_value(v));
    }
    if (json_array_size(arr) == 1)
        putchar(',');
    putchar(')');
}

/* Everything of info but the tensor lines, which come page by page (run_info). */
static void print_info_head(json_t *doc)
{
    json_t *meta = json_object_get(doc, "metadata");
    json_t *warnings = json_object_get(doc, "warnings");
    const char *key;
    size_t i;
    json_t *v;
    char b[32];

    human_bytes(jint(doc, "bytes"), b, sizeof(b));
    printf("name:     %s\n", jstr(doc, "name"));
    printf("source:   %s\n", jstr(doc, "source"));
    printf("format:   %s\n", jstr(doc, "format"));
    printf("state:    %s\n", jstr(doc, "state"));
    if (json_array_size(json_object_get(doc, "uploading"))) {
        printf("uploading: to");
        json_array_foreach(json_object_get(doc, "uploading"), i, v)
        {
            printf(" %s", json_string_value(v) ? json_string_value(v) : "?");
        }
        printf(" (a preload for more devices is running)\n");
    }
    printf("bytes:    %s (%" PRIu64 ")\n", b, jint(doc, "bytes"));
    printf("leases:   %" PRIu64 "\n", jint(doc, "leases"));
    json_array_foreach(json_object_get(doc, "holders"), i, v)
    {
        printf("  pid %" PRIu64 " uid %" PRIu64 ": %" PRIu64 " lease(s)\n", jint(v, "pid"),
               jint(v, "uid"), jint(v, "leases"));
    }
    if (json_is_string(json_object_get(doc, "hash")))
        printf("hash:     %s\n", jstr(doc, "hash"));
    if (json_is_string(json_object_get(doc, "dtype")))
        printf("dtype:    converted to %s at preload\n", jstr(doc, "dtype"));
    if (strcmp(jstr(doc, "share"), "file") == 0)
        printf("memory:   the checkpoint file itself, through the page cache (%" PRIu64
               " ms to load)\n", jint(doc, "load_ms"));
    else if (json_is_string(json_object_get(doc, "share"))) {
        human_bytes(jint(doc, "page_cache_released"), b, sizeof(b));
        printf("memory:   sealed memfd, %s pages (%" PRIu64 " ms to load)\n", jstr(doc, "pages"),
               jint(doc, "load_ms"));
        printf("cache:    %s of the file dropped after the copy (--page-cache %s)\n", b,
               jstr(doc, "page_cache"));
    }
    json_array_foreach(json_object_get(doc, "devices"), i, v)
    {
        if (strcmp(jstr(v, "device"), "cpu") == 0)
            continue; /* the memory line above */
        printf("device:   %s, %s handle, %s, uploaded in %.1f ms (the copy %.1f ms), %" PRIu64
               " lease%s%s%s\n",
               jstr(v, "device"), jstr(v, "handle"),
               json_is_true(json_object_get(v, "writable")) ? "writable" : "read-only",
               (double)jint(v, "upload_us") / 1e3, (double)jint(v, "fill_us") / 1e3,
               jint(v, "leases"), jint(v, "leases") == 1 ? "" : "s",
               json_is_true(json_object_get(v, "draining"))
                   ? ", draining (evicted from this device; freed with its last lease)"
                   : "",
               json_is_string(json_object_get(v, "state")) && strcmp(jstr(v, "state"), "ok")
                   ? ", device degraded"
                   : "");
    }
    json_array_foreach(warnings, i, v)
    {
        printf("warning:  %s\n", json_string_value(v));
    }
    if (json_object_size(meta) > 0) {
        printf("metadata:\n");
        json_object_foreach(meta, key, v)
        {
            char *s = json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT);

            printf("  %s = %s\n", key, s ? s : "?");
            free(s);
        }
    }
    printf("tensors:  %" PRIu64 "\n", jint(doc, "ntensors"));
}

static void print_tensor(json_t *v)
{
    printf("  %-40s %-8s ", jstr(v, "name"), jstr(v, "dtype"));
    print_shape(json_object_get(v, "shape"));
    printf(" stride ");
    print_shape(json_object_get(v, "stride"));
    printf(" %" PRIu64 " B\n", jint(v, "nbytes"));
}

/* Tensors asked for per info request; the daemon cuts a page of long names shorter. */
#define INFO_PAGE_TENSORS 16384u

/*
 * info reads the tensor list in pages (wsd_admin_info_page), so a model of any size can be
 * listed and no one request holds the daemon long. Each page is printed as it comes, so memory
 * stays that of one page; with --json the pages make one document, as the daemon would send
 * for a model small enough, less the page's "tensor_offset". The model is the same one
 * throughout, or the listing fails: each page must show the first page's hash and count.
 */
static int run_info(wsd_client_t *c, const char *name, int as_json, int no_tensors)
{
    json_t *first_hash = NULL;
    uint64_t offset = 0, total = 0;
    int rc = 0;

    for (;;) {
        char *json = NULL, *head;
        json_error_t jerr;
        json_t *doc, *tensors, *v;
        size_t n, i;
        int r = wsd_admin_info_page(c, name, offset, INFO_PAGE_TENSORS,
                                    no_tensors ? WSD_INFO_NO_TENSORS : 0, &json);

        if (r < 0) {
            /* Evicted between pages, say: what was printed is only part of the list. */
            if (offset)
                fprintf(stderr, "%s: info: the listing stopped after %" PRIu64 " of %" PRIu64
                        " tensors\n", prog, offset, total);
            rc = fail("info", r, c);
            break;
        }
        if (offset == 0 && as_json && no_tensors) {
            printf("%s\n", json);
            free(json);
            break;
        }
        doc = json_loads(json, 0, &jerr);
        free(json);
        tensors = doc ? json_object_get(doc, "tensors") : NULL;
        if (!doc || (!no_tensors && !json_is_array(tensors))) {
            fprintf(stderr, "%s: info: daemon sent an invalid document: %s\n", prog,
                    doc ? "no tensor list" : jerr.text);
            json_decref(doc);
            rc = 1;
            break;
        }
        if (offset == 0) {
            total = jint(doc, "ntensors");
            first_hash = json_incref(json_object_get(doc, "hash"));
            json_incref(tensors);
            json_object_del(doc, "tensors");
            json_object_del(doc, "tensor_offset");
            if (!as_json)
                print_info_head(doc);
            else {
                /* The summary's closing brace gives way to the tensor list. */
                head = json_dumps(doc, JSON_COMPACT);
                if (!head) {
                    fprintf(stderr, "%s: info: out of memory\n", prog);
                    json_decref(tensors);
                    json_decref(doc);
                    rc = 1;
                    break;
                }
                head[strlen(head) - 1] = '\0';
                printf("%s,\"tensors\":[", head);
                free(head);
            }
            json_decref(doc);
            doc = tensors; /* this page's, released with it below */
        } else if (jint(doc, "ntensors") != total ||
                   !json_equal(json_object_get(doc, "hash"), first_hash)) {
            /* The JSON printed so far is left unterminated: nothing should parse it. */
            fflush(stdout);
            fprintf(stderr,
                    "%s: info: '%s' changed while it was being listed (preloaded again "
                    "under that name); run info again\n",
                    prog, name);
            json_decref(doc);
            rc = 1;
            break;
        }
        n = json_array_size(tensors);
        json_array_foreach(tensors, i, v)
        {
            if (!as_json) {
                print_tensor(v);
                continue;
            }
            head = json_dumps(v, JSON_COMPACT);
            printf("%s%s", (offset + i) ? "," : "", head ? head : "null");
            free(head);
        }
        json_decref(doc);
        offset += n;
        if (n == 0 || offset >= total || no_tensors) {
            if (as_json)
                printf("]}\n");
            break;
        }
    }
    json_decref(first_hash);
    return rc;
}

static void print_flat(json_t *doc, const char *prefix)
{
    const char *key;
    json_t *v;

    json_object_foreach(doc, key, v)
    {
        if (json_is_object(v)) {
            char p[256];

            snprintf(p, sizeof(p), "%s%s.", prefix, key);
            print_flat(v, p);
        } else {
            char *s = json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT);

            printf("%s%s: %s\n", prefix, key, s ? s : "?");
            free(s);
        }
    }
}

/* Prints the daemon's document: verbatim with --json, else through \p render. */
static int emit(const char *json, int as_json, void (*render)(json_t *))
{
    json_error_t jerr;
    json_t *doc;

    if (as_json) {
        printf("%s\n", json);
        return 0;
    }
    doc = json_loads(json, JSON_DECODE_ANY, &jerr);
    if (!doc) {
        fprintf(stderr, "%s: daemon sent invalid JSON: %s\n", prog, jerr.text);
        return 1;
    }
    render(doc);
    json_decref(doc);
    return 0;
}

static void render_stats(json_t *doc)
{
    print_flat(doc, "");
}

/* Stats that count events since the daemon started: Prometheus counters, named *_total. */
static int is_counter(const char *flat)
{
    static const char *const counters[] = {
        "connections_total",
        "connections_rejected",
        "connections_denied",
        "opens_total",
        "open_errors",
        "releases_total",
        "leases_released_on_close",
        "preloads_ok",
        "preloads_failed",
        "protocol_violations",
        "budget_evictions",
        "page_cache_released_bytes",
        "connections_rejected_uid",
        "connections_emfile",
        "connections_timed_out",
        "connections_outq_dropped",
    };

    for (size_t i = 0; i < sizeof(counters) / sizeof(counters[0]); i++)
        if (strcmp(flat, counters[i]) == 0)
            return 1;
    return 0;
}

/* Metric names allow [a-zA-Z0-9_:]; the daemon's keys are already close. */
static void metric_name(char *dst, size_t size, const char *flat)
{
    size_t n;

    if (strcmp(flat, "uptime_s") == 0)
        flat = "uptime_seconds";
    else if (strcmp(flat, "memory_budget") == 0)
        flat = "memory_budget_bytes";
    n = (size_t)snprintf(dst, size, "weightsd_%s", flat);
    for (char *p = dst; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9')))
            *p = '_';
    if (is_counter(flat) && (n < 6 || strcmp(dst + n - 6, "_total") != 0))
        snprintf(dst + n, size - n, "_total");
}

/* Where the Prometheus text goes: stdout, or the temporary file of --metrics-file. */
static FILE *prom_out;

/* Every numeric stat, nested objects flattened with '_': new daemon keys appear unasked. */
static void prom_flat(json_t *doc, const char *prefix)
{
    const char *key;
    json_t *v;

    json_object_foreach(doc, key, v)
    {
        char flat[256], name[300];

        snprintf(flat, sizeof(flat), "%s%s", prefix, key);
        if (json_is_object(v)) {
            char p[260];

            snprintf(p, sizeof(p), "%s_", flat);
            prom_flat(v, p);
            continue;
        }
        if (!json_is_number(v))
            continue;
        metric_name(name, sizeof(name), flat);
        fprintf(prom_out, "# TYPE %s %s\n", name, is_counter(flat) ? "counter" : "gauge");
        if (json_is_integer(v))
            fprintf(prom_out, "%s %" JSON_INTEGER_FORMAT "\n", name, json_integer_value(v));
        else
            fprintf(prom_out, "%s %.17g\n", name, json_real_value(v));
    }
}

/* A label value: backslash, double quote and newline escaped (exposition format). */
static void prom_label(const char *s)
{
    for (; *s; s++) {
        if (*s == '\\' || *s == '"')
            fputc('\\', prom_out);
        if (*s == '\n') {
            fputs("\\n", prom_out);
            continue;
        }
        fputc(*s, prom_out);
    }
}

static int render_prometheus(const char *stats, const char *models)
{
    json_t *st = json_loads(stats, 0, NULL), *ms = json_loads(models, 0, NULL), *m;
    size_t i;

    if (!json_is_object(st) || !json_is_array(ms)) {
        fprintf(stderr, "%s: daemon sent invalid JSON\n", prog);
        json_decref(st);
        json_decref(ms);
        return 1;
    }
    prom_flat(st, "");
    fprintf(prom_out, "# HELP weightsd_model_bytes Tensor bytes of each model the daemon lists.\n"
           "# TYPE weightsd_model_bytes gauge\n");
    json_array_foreach(ms, i, m)
    {
        fprintf(prom_out, "weightsd_model_bytes{model=\"");
        prom_label(jstr(m, "name"));
        fprintf(prom_out, "\",state=\"");
        prom_label(jstr(m, "state"));
        fprintf(prom_out, "\"} %" PRIu64 "\n", jint(m, "bytes"));
    }
    fprintf(prom_out, "# HELP weightsd_model_leases Leases workers hold on each model.\n"
           "# TYPE weightsd_model_leases gauge\n");
    json_array_foreach(ms, i, m)
    {
        fprintf(prom_out, "weightsd_model_leases{model=\"");
        prom_label(jstr(m, "name"));
        fprintf(prom_out, "\"} %" PRIu64 "\n", jint(m, "leases"));
    }
    /* One row per probed CUDA device: 1 once a sticky CUDA error took it out of service. */
    m = json_object_get(json_object_get(st, "gpu"), "devices");
    if (json_array_size(m) > 0) {
        json_t *d;

        fprintf(prom_out, "# HELP weightsd_gpu_degraded 1 if the device takes no new GPU lease "
                          "after a sticky CUDA error.\n"
                          "# TYPE weightsd_gpu_degraded gauge\n");
        json_array_foreach(m, i, d)
        {
            fprintf(prom_out, "weightsd_gpu_degraded{device=\"");
            prom_label(jstr(d, "device"));
            fprintf(prom_out, "\"} %d\n", strcmp(jstr(d, "state"), "degraded") == 0);
        }
        fprintf(prom_out, "# HELP weightsd_gpu_copy_bytes Device memory the listed models' "
                          "copies hold on the device.\n"
                          "# TYPE weightsd_gpu_copy_bytes gauge\n");
        json_array_foreach(m, i, d)
        {
            fprintf(prom_out, "weightsd_gpu_copy_bytes{device=\"");
            prom_label(jstr(d, "device"));
            fprintf(prom_out, "\"} %" PRIu64 "\n", jint(d, "copy_bytes"));
        }
    }
    json_decref(st);
    json_decref(ms);
    return 0;
}

static volatile sig_atomic_t metrics_stop;

static void metrics_stop_cb(int sig)
{
    (void)sig;
    metrics_stop = 1;
}

/*
 * --metrics-file: a node_exporter textfile, rewritten atomically (temporary file in the same
 * directory, fsync, rename) once, or every \p interval seconds until SIGTERM/SIGINT. Each round
 * connects afresh, so a daemon restart costs one missed round, not the exporter. A round that
 * cannot reach the daemon leaves the previous file in place and says so on stderr.
 */
static int write_metrics_file(const char *socket_path, int timeout_ms, const char *path,
                              int interval)
{
    char tmp[PATH_MAX];
    int rc = 0;

    if (snprintf(tmp, sizeof(tmp), "%s.tmp.%d", path, (int)getpid()) >= (int)sizeof(tmp)) {
        fprintf(stderr, "%s: --metrics-file: path too long\n", prog);
        return 2;
    }
    signal(SIGTERM, metrics_stop_cb);
    signal(SIGINT, metrics_stop_cb);
    do {
        char *stats = NULL, *models = NULL;
        wsd_client_t *c = NULL;
        int r = wsd_connect(socket_path, &c);

        if (r == 0) {
            (void)wsd_set_timeout(c, timeout_ms);
            r = wsd_admin_stats(c, &stats);
            if (r == 0)
                r = wsd_admin_list(c, &models);
        }
        if (r < 0) {
            fprintf(stderr, "%s: metrics: %s\n", prog,
                    c && *wsd_last_error(c) ? wsd_last_error(c) : wsd_strerror(r));
            rc = 1;
        } else {
            prom_out = fopen(tmp, "w");
            if (!prom_out || render_prometheus(stats, models) != 0 || fflush(prom_out) != 0 ||
                fsync(fileno(prom_out)) != 0 || fclose(prom_out) != 0 || rename(tmp, path) != 0) {
                fprintf(stderr, "%s: metrics: cannot write %s: %s\n", prog, path,
                        strerror(errno));
                (void)unlink(tmp);
                rc = 1;
            } else
                rc = 0;
            prom_out = NULL;
        }
        free(stats);
        free(models);
        wsd_close(c);
        for (int i = 0; i < interval * 10 && !metrics_stop; i++)
            usleep(100000);
    } while (interval > 0 && !metrics_stop);
    return rc;
}

/* What evict did, as the daemon's "result" says: a drain frees nothing yet. */
static void render_evict(json_t *doc)
{
    const char *name = jstr(doc, "name"), *result = jstr(doc, "result");
    const char *dev = json_string_value(json_object_get(doc, "device"));

    if (dev && strcmp(result, "draining") == 0)
        printf("draining %s from %s: its copy there is freed when the last lease on it goes\n",
               name, dev);
    else if (dev && strcmp(result, "forced") == 0)
        printf("forced %s off %s: the daemon let go of its copy; workers that map it keep "
               "it\n", name, dev);
    else if (dev && strcmp(result, "evicted") == 0)
        printf("evicted %s from %s\n", name, dev);
    else if (strcmp(result, "draining") == 0)
        printf("draining %s: freed when its last lease goes\n", name);
    else if (strcmp(result, "forced") == 0)
        printf("forced %s: freed now; workers that map it keep their pages\n", name);
    else if (strcmp(result, "evicted") == 0)
        printf("evicted %s\n", name);
    else
        printf("%s: %s\n", name, result);
}

/* Whether long-only option \p opt applies to \p cmd (the others go with any command). */
static bool option_applies(int opt, const char *cmd)
{
    switch (opt) {
    case OPT_DRAIN:
    case OPT_FORCE:
        return strcmp(cmd, "evict") == 0;
    case OPT_PROMETHEUS:
    case OPT_METRICS_FILE:
    case OPT_INTERVAL:
        return strcmp(cmd, "stats") == 0;
    case OPT_NO_TENSORS:
        return strcmp(cmd, "info") == 0;
    case OPT_DEVICE:
        return strcmp(cmd, "preload") == 0 || strcmp(cmd, "evict") == 0;
    default:
        return strcmp(cmd, "preload") == 0;
    }
}

static void render_preload(json_t *doc)
{
    json_t *warnings = json_object_get(doc, "warnings");
    size_t i;
    json_t *v;
    char b[32];

    human_bytes(jint(doc, "bytes"), b, sizeof(b));
    printf("preloaded %s: %" PRIu64 " tensors, %s, %s, in %" PRIu64 " ms\n", jstr(doc, "name"),
           jint(doc, "ntensors"), b, jstr(doc, "format"), jint(doc, "load_ms"));
    json_array_foreach(warnings, i, v)
    {
        printf("warning: %s\n", json_string_value(v));
    }
}

/*
 * config-check runs the daemon's parser rather than a copy of it, so what it accepts is exactly
 * what weightsd would start with (and weightsctl stays on the public library API). The binary
 * is looked for where an install or a build tree puts it relative to this one.
 */
static int config_check(const char *file)
{
    const char *env = getenv("WEIGHTSD_BIN");
    char self[PATH_MAX], cand[PATH_MAX + 32];
    ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
    char *slash;

    if (env && *env) {
        execl(env, env, "--check-config", file, (char *)NULL);
        fprintf(stderr, "%s: config-check: cannot run %s: %s\n", prog, env, strerror(errno));
        return 1;
    }
    if (n > 0) {
        self[n] = '\0';
        slash = strrchr(self, '/');
        if (slash) {
            *slash = '\0';
            snprintf(cand, sizeof(cand), "%s/weightsd", self);
            if (access(cand, X_OK) == 0)
                execl(cand, cand, "--check-config", file, (char *)NULL);
            snprintf(cand, sizeof(cand), "%s/../sbin/weightsd", self);
            if (access(cand, X_OK) == 0)
                execl(cand, cand, "--check-config", file, (char *)NULL);
        }
    }
    execlp("weightsd", "weightsd", "--check-config", file, (char *)NULL);
    fprintf(stderr, "%s: config-check: cannot find weightsd (set WEIGHTSD_BIN): %s\n", prog,
            strerror(errno));
    return 1;
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"admin-socket", required_argument, NULL, 's'},
        {"json", no_argument, NULL, 'j'},
        {"timeout", required_argument, NULL, 't'},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        {"dtype", required_argument, NULL, OPT_DTYPE},
        {"share", required_argument, NULL, OPT_SHARE},
        {"key", required_argument, NULL, OPT_KEY},
        {"no-verify", no_argument, NULL, OPT_NO_VERIFY},
        {"drain", no_argument, NULL, OPT_DRAIN},
        {"force", no_argument, NULL, OPT_FORCE},
        {"cancel-on-exit", no_argument, NULL, OPT_CANCEL_ON_EXIT},
        {"hugepages", required_argument, NULL, OPT_HUGEPAGES},
        {"page-cache", required_argument, NULL, OPT_PAGE_CACHE},
        {"metrics-file", required_argument, NULL, OPT_METRICS_FILE},
        {"interval", required_argument, NULL, OPT_INTERVAL},
        {"device", required_argument, NULL, OPT_DEVICE},
        {"allow-gpu-write", no_argument, NULL, OPT_ALLOW_GPU_WRITE},
        {"prometheus", no_argument, NULL, OPT_PROMETHEUS},
        {"no-tensors", no_argument, NULL, OPT_NO_TENSORS},
        {NULL, 0, NULL, 0},
    };
    _Static_assert(sizeof(longopts) / sizeof(longopts[0]) <= 64, "one bit of given per option");
    /* The long-only options given, one bit per longopts index. */
    uint64_t given = 0;
    int longidx = 0;
    wsd_preload_opts_t popts = {.size = sizeof(popts)};
    const char *devices[DEVICES_MAX];
    const char *socket_path = NULL, *cmd;
    unsigned evict_flags = 0;
    int as_json = 0, prometheus = 0, no_tensors = 0, timeout_ms = 600000, opt, r, rc = 0, interval = 0;
    const char *metrics_file = NULL;
    wsd_client_t *c = NULL;
    char *json = NULL;

    /* Options may follow the command ("weightsctl list --json"), as getopt permutes argv. */
    while ((opt = getopt_long(argc, argv, "s:jt:hV", longopts, &longidx)) != -1) {
        /* longidx is set for long options only; every long-only one is >= OPT_DTYPE. */
        if (opt >= OPT_DTYPE)
            given |= UINT64_C(1) << longidx;
        switch (opt) {
        case 's':
            socket_path = optarg;
            break;
        case 'j':
            as_json = 1;
            break;
        case 't': {
            char *end;
            long v = strtol(optarg, &end, 10);

            if (*end || v < 0 || v > 86400000) {
                fprintf(stderr, "%s: --timeout wants milliseconds, got '%s'\n", prog, optarg);
                return 2;
            }
            timeout_ms = (int)v;
            break;
        }
        case 'h':
            fputs(usage_text, stdout);
            return 0;
        case 'V':
            printf("weightsctl %d.%d.%d\n", WSD_VERSION_MAJOR, WSD_VERSION_MINOR,
                   WSD_VERSION_PATCH);
            return 0;
        case OPT_DTYPE:
            popts.dtype = optarg;
            break;
        case OPT_SHARE:
            popts.share = optarg;
            break;
        case OPT_KEY:
            popts.key = optarg;
            break;
        case OPT_NO_VERIFY:
            popts.no_verify = 1;
            break;
        case OPT_DRAIN:
            evict_flags |= WSD_EVICT_DRAIN;
            break;
        case OPT_FORCE:
            evict_flags |= WSD_EVICT_FORCE;
            break;
        case OPT_CANCEL_ON_EXIT:
            popts.cancel_on_disconnect = 1;
            break;
        case OPT_HUGEPAGES:
            popts.hugepages = optarg;
            break;
        case OPT_PAGE_CACHE:
            popts.page_cache = optarg;
            break;
        case OPT_METRICS_FILE:
            metrics_file = optarg;
            prometheus = 1;
            break;
        case OPT_INTERVAL: {
            char *end;
            long v = strtol(optarg, &end, 10);

            if (*end || v < 1 || v > 86400) {
                fprintf(stderr, "%s: --interval wants seconds (1..86400), got '%s'\n", prog,
                        optarg);
                return 2;
            }
            interval = (int)v;
            break;
        }
        case OPT_DEVICE:
            if (popts.ndevices == DEVICES_MAX) {
                fprintf(stderr, "%s: too many --device options (at most %d)\n", prog,
                        DEVICES_MAX);
                return 2;
            }
            devices[popts.ndevices++] = optarg;
            popts.devices = devices;
            break;
        case OPT_ALLOW_GPU_WRITE:
            popts.allow_gpu_write = 1;
            break;
        case OPT_PROMETHEUS:
            prometheus = 1;
            break;
        case OPT_NO_TENSORS:
            no_tensors = 1;
            break;
        default:
            fprintf(stderr, "Try '%s --help'.\n", prog);
            return 2;
        }
    }
    if (optind >= argc) {
        fputs(usage_text, stderr);
        return 2;
    }
    cmd = argv[optind++];

#define NEED_ARGS(n)                                                                               \
    do {                                                                                           \
        if (argc - optind != (n)) {                                                                \
            fprintf(stderr, "%s: %s takes %d argument%s; see --help\n", prog, cmd, (n),            \
                    (n) == 1 ? "" : "s");                                                          \
            return 2;                                                                              \
        }                                                                                          \
    } while (0)

    if (strcmp(cmd, "preload") == 0)
        NEED_ARGS(2);
    else if (strcmp(cmd, "evict") == 0 || strcmp(cmd, "info") == 0 || strcmp(cmd, "cancel") == 0 ||
             strcmp(cmd, "config-check") == 0)
        NEED_ARGS(1);
    else if (strcmp(cmd, "list") == 0 || strcmp(cmd, "stats") == 0)
        NEED_ARGS(0);
    else {
        fprintf(stderr, "%s: unknown command '%s'; see --help\n", prog, cmd);
        return 2;
    }
    /* An option the command would ignore is a mistake worth hearing about (a misspelt
     * command, or an option on the wrong line of a script), not something to drop. */
    for (size_t i = 0; longopts[i].name; i++)
        if ((given >> i & 1) && !option_applies(longopts[i].val, cmd)) {
            fprintf(stderr, "%s: --%s does not apply to %s; see --help\n", prog, longopts[i].name,
                    cmd);
            return 2;
        }
    if (interval && !metrics_file) {
        fprintf(stderr, "%s: --interval does not apply to %s without --metrics-file; see --help\n",
                prog, cmd);
        return 2;
    }
    if (strcmp(cmd, "evict") == 0 && popts.ndevices > 1) {
        fprintf(stderr, "%s: evict takes one --device at a time; see --help\n", prog);
        return 2;
    }
    if (strcmp(cmd, "evict") == 0 && popts.ndevices && !devices[0][0]) {
        fprintf(stderr, "%s: evict --device wants cuda:N; see --help\n", prog);
        return 2;
    }
    if (strcmp(cmd, "config-check") == 0)
        return config_check(argv[optind]);

    if (!socket_path)
        socket_path = wsd_default_socket(1);
    if (!socket_path) {
        fprintf(stderr, "%s: no admin socket: pass --admin-socket or set XDG_RUNTIME_DIR\n",
                prog);
        return 1;
    }
    r = wsd_connect(socket_path, &c);
    if (r < 0) {
        fprintf(stderr, "%s: cannot connect to %s: %s\n", prog, socket_path, wsd_strerror(r));
        return 1;
    }
    (void)wsd_set_timeout(c, timeout_ms);

    if (strcmp(cmd, "preload") == 0) {
        /* The daemon resolves nothing against its own working directory: send an absolute
         * path. A file that does not exist is left as given for the daemon to report. */
        char *abs = realpath(argv[optind + 1], NULL);

        struct progress_state ps = {.tty = isatty(STDERR_FILENO), .t0 = now_s()};

        if (!as_json) {
            popts.progress = show_progress;
            popts.progress_data = &ps;
        }
        r = wsd_admin_preload(c, argv[optind], abs ? abs : argv[optind + 1], &popts, &json);
        if (ps.shown && ps.tty)
            fputc('\n', stderr);
        free(abs);
        rc = r < 0 ? fail(cmd, r, c) : emit(json, as_json, render_preload);
    } else if (strcmp(cmd, "evict") == 0) {
        r = popts.ndevices ? wsd_admin_evict_device(c, argv[optind], devices[0], evict_flags,
                                                    &json)
                           : wsd_admin_evict(c, argv[optind], evict_flags, &json);
        rc = r < 0 ? fail(cmd, r, c) : emit(json, as_json, render_evict);
    } else if (strcmp(cmd, "cancel") == 0) {
        r = wsd_admin_cancel(c, argv[optind], &json);
        if (r < 0)
            rc = fail(cmd, r, c);
        else if (as_json)
            printf("%s\n", json);
        else
            printf("cancelling the preload of %s\n", argv[optind]);
    } else if (strcmp(cmd, "list") == 0) {
        r = wsd_admin_list(c, &json);
        rc = r < 0 ? fail(cmd, r, c) : emit(json, as_json, print_list);
    } else if (strcmp(cmd, "info") == 0) {
        rc = run_info(c, argv[optind], as_json, no_tensors);
    } else if (prometheus && metrics_file) {
        wsd_close(c);
        return write_metrics_file(socket_path, timeout_ms, metrics_file, interval);
    } else if (prometheus) {
        char *models = NULL;

        prom_out = stdout;
        r = wsd_admin_stats(c, &json);
        if (r == 0)
            r = wsd_admin_list(c, &models);
        rc = r < 0 ? fail(cmd, r, c) : render_prometheus(json, models);
        free(models);
    } else {
        r = wsd_admin_stats(c, &json);
        rc = r < 0 ? fail(cmd, r, c) : emit(json, as_json, render_stats);
    }
    free(json);
    wsd_close(c);
    return rc;
}
