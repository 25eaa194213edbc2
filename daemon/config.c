/*
 * config.c - reading weightsd.conf. inih does the INI syntax; this file owns what the keys
 * mean, the checks on their values, and line numbers: inih (as Debian builds it) does not pass
 * them to the handler, so lines are fed to it through a reader that counts them and rejects
 * malformed ones itself, which lets every error be reported rather than only the first.
 */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <grp.h>
#include <limits.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include <ini.h>

#include "convert.h"
#include "gpu.h"
#include "log.h"
#include "registry.h"
#include "weightsd.h"
#include "wsd_limits.h"

/* inih's line buffer as Debian builds it (INI_MAX_LINE): longer lines are errors here. */
#define LINE_MAX_CHARS 199

typedef struct parse_state {
    config_t *cfg;
    FILE *f;
    char *dir;                /* directory of the file, for relative model paths */
    unsigned line;
    bool line_bad;            /* this line was rejected by the reader (already reported) */
    unsigned admin_line;      /* where admin-socket was set */
    char *buf;
    size_t bufsize;
    char section[128];
    unsigned section_line;     /* 0 before the first header */
    bool section_bad;         /* unknown or malformed: its keys are skipped */
    cfg_model_t *model;       /* current [model NAME] section, or NULL */
    /* keys seen in the current section, to catch duplicates */
    char seen[32][48];
    unsigned nseen;
    config_report_fn report;
    void *data;
} parse_state_t;

static void cfg_error(parse_state_t *ps, unsigned line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void cfg_error(parse_state_t *ps, unsigned line, const char *fmt, ...)
{
    char msg[768], full[1024 + PATH_MAX];
    va_list ap;

    va_start(ap, fmt);
    (void)vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (line)
        snprintf(full, sizeof(full), "%s:%u: %s", ps->cfg->file, line, msg);
    else
        snprintf(full, sizeof(full), "%s: %s", ps->cfg->file, msg);
    ps->cfg->nerrors++;
    if (ps->report)
        ps->report(ps->data, full);
}

static void begin_section(parse_state_t *ps, const char *section);

static bool blank_or_comment(const char *s)
{
    while (isspace((unsigned char)*s))
        s++;
    return !*s || *s == ';' || *s == '#';
}

/* inih reader: one physical line per call, counted; lines inih would misparse are reported
 * here and replaced by a comment so that inih skips them. */
static char *reader(char *str, int num, void *stream)
{
    parse_state_t *ps = stream;
    ssize_t n = getline(&ps->buf, &ps->bufsize, ps->f);
    const char *s;

    if (n < 0)
        return NULL;
    ps->line++;
    ps->line_bad = false;
    s = ps->buf;
    if (ps->line == 1 && (unsigned char)s[0] == 0xEF && (unsigned char)s[1] == 0xBB &&
        (unsigned char)s[2] == 0xBF)
        s += 3;
    if (n > 0 && ps->buf[n - 1] == '\n')
        ps->buf[--n] = '\0';
    if (n > LINE_MAX_CHARS) {
        cfg_error(ps, ps->line, "line longer than %d characters", LINE_MAX_CHARS);
        ps->line_bad = true;
    } else if (!blank_or_comment(s)) {
        if (isspace((unsigned char)s[0])) {
            /* inih would glue an indented line onto the previous value. */
            cfg_error(ps, ps->line, "indented line: continuation lines are not supported");
            ps->line_bad = true;
        } else if (s[0] == '[') {
            const char *close = strchr(s, ']');
            char name[128];

            if (!close || !blank_or_comment(close + 1)) {
                cfg_error(ps, ps->line, close ? "text after the section header"
                                              : "section header without ']'");
                ps->line_bad = true;
            } else {
                snprintf(name, sizeof(name), "%.*s", (int)(close - s - 1), s + 1);
                begin_section(ps, name);
            }
        } else if (s[0] != '[' && !strchr(s, '=')) {
            cfg_error(ps, ps->line, "expected 'key = value' or '[section]', got '%s'", s);
            ps->line_bad = true;
        } else if (s[0] != '[' && strchr(s, ':') && strchr(s, ':') < strchr(s, '=')) {
            /* inih also splits at ':', which would cut paths and names in two. */
            cfg_error(ps, ps->line, "use '=' between key and value (':' comes first here)");
            ps->line_bad = true;
        }
    }
    snprintf(str, (size_t)num, "%s\n", ps->line_bad ? ";" : s);
    return str;
}

static bool parse_bool(const char *v, bool *ret)
{
    static const char *const yes[] = {"1", "yes", "true", "on"}, *const no[] = {"0", "no",
                                                                                "false", "off"};

    for (size_t i = 0; i < 4; i++) {
        if (strcasecmp(v, yes[i]) == 0) {
            *ret = true;
            return true;
        }
        if (strcasecmp(v, no[i]) == 0) {
            *ret = false;
            return true;
        }
    }
    return false;
}

static bool parse_count(const char *v, unsigned max, unsigned *ret)
{
    char *end;
    unsigned long n;

    errno = 0;
    n = strtoul(v, &end, 10);
    if (errno || *end || end == v || v[0] == '-' || n == 0 || n > max)
        return false;
    *ret = (unsigned)n;
    return true;
}

/* parse_count() for limits where 0 means something (or whose floor is not 1). */
static bool parse_range(const char *v, unsigned min, unsigned max, unsigned *ret)
{
    char *end;
    unsigned long n;

    errno = 0;
    n = strtoul(v, &end, 10);
    if (errno || *end || end == v || v[0] == '-' || n < min || n > max)
        return false;
    *ret = (unsigned)n;
    return true;
}

int config_parse_memory_budget(const char *s, uint64_t *ret)
{
    if (strcasecmp(s, "none") == 0 || strcmp(s, "0") == 0) {
        *ret = 0;
        return 0;
    }
    return registry_parse_size(s, ret);
}

/* Space- or comma-separated names or numbers, resolved through the user or group database. */
static void parse_ids(parse_state_t *ps, const char *key, const char *v, bool groups,
                      policy_ids_t *ids)
{
    char *copy = strdup(v), *save = NULL;

    if (!copy) {
        cfg_error(ps, ps->line, "out of memory");
        return;
    }
    ids->n = 0;
    for (char *t = strtok_r(copy, " ,\t", &save); t; t = strtok_r(NULL, " ,\t", &save)) {
        char *end;
        unsigned long n;
        long id = -1;

        errno = 0;
        n = strtoul(t, &end, 10);
        if (!errno && !*end && end != t && n < UINT32_MAX)
            id = (long)n;
        else if (groups) {
            struct group *g = getgrnam(t);

            if (g)
                id = (long)g->gr_gid;
        } else {
            struct passwd *pw = getpwnam(t);

            if (pw)
                id = (long)pw->pw_uid;
        }
        if (id < 0)
            cfg_error(ps, ps->line, "%s: no %s named '%s' on this host", key,
                      groups ? "group" : "user", t);
        else if (policy_ids_add(ids, (unsigned)id) < 0)
            cfg_error(ps, ps->line, "%s: more than %d entries", key, POLICY_IDS_MAX);
    }
    free(copy);
}

static char *absolute_path(parse_state_t *ps, const char *v)
{
    char *p;

    if (v[0] == '/' || !ps->dir)
        return strdup(v);
    if (asprintf(&p, "%s/%s", ps->dir, v) < 0)
        return NULL;
    return p;
}

static void set_string(parse_state_t *ps, char **dst, const char *v)
{
    free(*dst);
    *dst = strdup(v);
    if (!*dst)
        cfg_error(ps, ps->line, "out of memory");
}

static void daemon_key(parse_state_t *ps, const char *name, const char *v)
{
    config_t *c = ps->cfg;

    if (strcmp(name, "socket") == 0 || strcmp(name, "admin-socket") == 0) {
        if (v[0] != '/')
            cfg_error(ps, ps->line, "%s: '%s' is not an absolute path", name, v);
        else if (strlen(v) >= 108)
            cfg_error(ps, ps->line, "%s: path longer than a socket address allows (107)", name);
        else
            set_string(ps, name[0] == 's' ? &c->socket_path : &c->admin_path, v);
        if (name[0] == 'a')
            ps->admin_line = ps->line;
    } else if (strcmp(name, "log-level") == 0) {
        c->log_level = log_level_from_name(v);
        if (c->log_level < 0) {
            c->log_level = -1;
            cfg_error(ps, ps->line,
                      "log-level: '%s' is not error (or err), warning, notice, info or debug", v);
        }
    } else if (strcmp(name, "max-connections") == 0) {
        if (!parse_count(v, 1u << 20, &c->max_connections))
            cfg_error(ps, ps->line, "max-connections: wants 1..1048576, got '%s'", v);
    } else if (strcmp(name, "max-leases") == 0) {
        if (!parse_count(v, 1u << 20, &c->max_leases))
            cfg_error(ps, ps->line, "max-leases: wants 1..1048576, got '%s'", v);
    } else if (strcmp(name, "max-connections-per-uid") == 0) {
        if (!parse_count(v, 1u << 20, &c->max_conns_per_uid))
            cfg_error(ps, ps->line, "max-connections-per-uid: wants 1..1048576, got '%s'", v);
    } else if (strcmp(name, "max-frame") == 0) {
        if (!parse_range(v, WSD_REQUEST_MIN, WSD_REQUEST_MAX, &c->max_frame))
            cfg_error(ps, ps->line, "max-frame: wants %u..%u, got '%s'", WSD_REQUEST_MIN,
                      WSD_REQUEST_MAX, v);
    } else if (strcmp(name, "max-fds") == 0) {
        c->max_fds_set = parse_range(v, 0, WSD_FDS_PER_FRAME_MAX, &c->max_fds);
        if (!c->max_fds_set)
            cfg_error(ps, ps->line, "max-fds: wants 0..%u, got '%s'", WSD_FDS_PER_FRAME_MAX, v);
    } else if (strcmp(name, "max-output-queue") == 0) {
        if (registry_parse_bytes(v, &c->max_outq) < 0 || c->max_outq < 4096 ||
            c->max_outq > SIZE_MAX / 2)
            cfg_error(ps, ps->line,
                      "max-output-queue: wants 4K or more (K, M, G or T suffix), got '%s'", v);
    } else if (strcmp(name, "handshake-timeout") == 0) {
        if (!parse_range(v, 1, 3600000, &c->handshake_timeout_ms))
            cfg_error(ps, ps->line, "handshake-timeout: wants 1..3600000 (ms), got '%s'", v);
    } else if (strcmp(name, "idle-timeout") == 0) {
        c->idle_timeout_set = parse_range(v, 0, 86400000, &c->idle_timeout_ms);
        if (!c->idle_timeout_set)
            cfg_error(ps, ps->line, "idle-timeout: wants 0..86400000 (ms; 0 = never), got '%s'",
                      v);
    } else if (strcmp(name, "allow-client-preload") == 0) {
        if (!parse_bool(v, &c->client_preload))
            cfg_error(ps, ps->line, "allow-client-preload: wants yes or no, got '%s'", v);
    } else if (strcmp(name, "client-preload-dirs") == 0) {
        char buf[4096], *save = NULL;
        bool ok = true;

        snprintf(buf, sizeof(buf), "%s", v);
        for (char *t = strtok_r(buf, " ,", &save); t; t = strtok_r(NULL, " ,", &save))
            if (t[0] != '/') {
                cfg_error(ps, ps->line, "client-preload-dirs: '%s' is not an absolute path", t);
                ok = false;
            }
        if (ok)
            set_string(ps, &c->client_preload_dirs, v);
    } else if (strcmp(name, "memory-budget") == 0) {
        if (config_parse_memory_budget(v, &c->memory_budget) < 0)
            cfg_error(ps, ps->line, "memory-budget: wants %s, got '%s'",
                      CONFIG_MEMORY_BUDGET_SYNTAX, v);
        else
            c->budget_set = true;
    } else
        cfg_error(ps, ps->line, "unknown key '%s' in [daemon]", name);
}

static void access_key(parse_state_t *ps, const char *name, const char *v)
{
    policy_t *p = &ps->cfg->policy;

    /* Naming who may use the client socket replaces the default group. */
    if (strcmp(name, "client-users") == 0 || strcmp(name, "client-groups") == 0)
        p->client_default_group = false;
    if (strcmp(name, "client-users") == 0)
        parse_ids(ps, name, v, false, &p->client_users);
    else if (strcmp(name, "client-groups") == 0)
        parse_ids(ps, name, v, true, &p->client_groups);
    else if (strcmp(name, "admin-users") == 0)
        parse_ids(ps, name, v, false, &p->admin_users);
    else if (strcmp(name, "admin-groups") == 0)
        parse_ids(ps, name, v, true, &p->admin_groups);
    else
        cfg_error(ps, ps->line, "unknown key '%s' in [access]", name);
}

static void model_key(parse_state_t *ps, const char *name, const char *v)
{
    cfg_model_t *m = ps->model;

    if (strcmp(name, "path") == 0) {
        free(m->path);
        m->path = absolute_path(ps, v);
    } else if (strcmp(name, "key") == 0)
        set_string(ps, &m->key, v);
    else if (strcmp(name, "no-verify") == 0) {
        if (!parse_bool(v, &m->no_verify))
            cfg_error(ps, ps->line, "no-verify: wants yes or no, got '%s'", v);
    } else if (strcmp(name, "dtype") == 0) {
        if (convert_parse_target(v, &m->dtype) < 0)
            cfg_error(ps, ps->line, "dtype: '%s' is not none, bf16, f16 or f32", v);
    } else if (strcmp(name, "share") == 0) {
        if (strcmp(v, "memfd") != 0 && strcmp(v, "file") != 0)
            cfg_error(ps, ps->line, "share: wants memfd or file, got '%s'", v);
        else
            m->share_file = strcmp(v, "file") == 0;
    } else if (strcmp(name, "devices") == 0) {
        /* "host cuda:0 cuda:1": the host copy always exists; each cuda:N adds a GPU copy. */
        char buf[512], *save = NULL;

        snprintf(buf, sizeof(buf), "%s", v);
        m->ndevices = 0;
        for (char *t = strtok_r(buf, " ,", &save); t; t = strtok_r(NULL, " ,", &save)) {
            int ix;

            if (strcmp(t, "host") == 0 || strcmp(t, "cpu") == 0)
                continue;
            if (gpu_parse_device(t, &ix) < 0 || ix < 0)
                cfg_error(ps, ps->line, "devices: wants host, cpu or cuda:N, got '%s'", t);
            else if (cfg_model_has_device(m, ix))
                cfg_error(ps, ps->line, "devices: '%s' given twice", t);
            else if (m->ndevices == sizeof(m->devices) / sizeof(m->devices[0]))
                cfg_error(ps, ps->line, "devices: too many devices");
            else
                m->devices[m->ndevices++] = ix;
        }
    } else if (strcmp(name, "allow-users") == 0) {
        m->acl = true;
        parse_ids(ps, name, v, false, &m->acl_users);
    } else if (strcmp(name, "allow-groups") == 0) {
        m->acl = true;
        parse_ids(ps, name, v, true, &m->acl_groups);
    } else if (strcmp(name, "allow-gpu-write") == 0) {
        if (!parse_bool(v, &m->allow_gpu_write))
            cfg_error(ps, ps->line, "allow-gpu-write: wants yes or no, got '%s'", v);
    } else if (strcmp(name, "page-cache") == 0) {
        source_cache_t pc;

        if (source_cache_parse(v, &pc) < 0)
            cfg_error(ps, ps->line, "page-cache: wants auto, keep or drop, got '%s'", v);
        else
            m->page_cache = (int)pc;
    } else
        cfg_error(ps, ps->line, "unknown key '%s' in [model %s]", name, m->name);
}

/* The registry's rule for names, checked here too so config-check catches a bad one. */
static bool valid_model_name(const char *s)
{
    if (!*s || strlen(s) > 128)
        return false;
    for (; *s; s++)
        if (!isalnum((unsigned char)*s) && !strchr("._:@/+-", *s))
            return false;
    return true;
}

static void finish_model(parse_state_t *ps)
{
    if (ps->model && !ps->model->path)
        cfg_error(ps, ps->model->line, "[model %s] has no path =", ps->model->name);
    ps->model = NULL;
}

static void begin_section(parse_state_t *ps, const char *section)
{
    config_t *c = ps->cfg;

    finish_model(ps);
    snprintf(ps->section, sizeof(ps->section), "%s", section);
    ps->section_line = ps->line;
    ps->nseen = 0;
    ps->section_bad = true;
    if (strncmp(section, "model", 5) == 0 && (section[5] == ' ' || section[5] == '\t')) {
        const char *name = section + 6;
        cfg_model_t *grown;

        while (*name == ' ' || *name == '\t')
            name++;
        if (!valid_model_name(name)) {
            cfg_error(ps, ps->line, "[model %s]: a model name is 1 to 128 of [A-Za-z0-9._:@/+-]",
                      name);
            return;
        }
        if (config_find_model(c, name)) {
            cfg_error(ps, ps->line, "[model %s] appears twice (first on line %u)", name,
                      config_find_model(c, name)->line);
            return;
        }
        grown = realloc(c->models, (c->nmodels + 1) * sizeof(*grown));
        if (!grown) {
            cfg_error(ps, ps->line, "out of memory");
            return;
        }
        c->models = grown;
        ps->model = &c->models[c->nmodels++];
        memset(ps->model, 0, sizeof(*ps->model));
        ps->model->name = strdup(name);
        ps->model->dtype = -1;
        ps->model->page_cache = SOURCE_CACHE_AUTO;
        ps->model->line = ps->line;
        ps->section_bad = false;
    } else if (strcmp(section, "daemon") == 0 || strcmp(section, "access") == 0)
        ps->section_bad = false;
    else
        cfg_error(ps, ps->line, "unknown section [%s] (expected [daemon], [access] or "
                                "[model NAME])", section);
}

static int handler(void *user, const char *section, const char *name, const char *value)
{
    parse_state_t *ps = user;

    /* The section comes from the reader, which saw the header line itself. */
    (void)section;
    if (ps->line_bad)
        return 1;
    if (!ps->section_line) {
        cfg_error(ps, ps->line, "'%s' outside any section", name);
        return 1;
    }
    if (ps->section_bad) /* its keys were reported with the header */
        return 1;
    for (unsigned i = 0; i < ps->nseen; i++)
        if (strcmp(ps->seen[i], name) == 0) {
            cfg_error(ps, ps->line, "'%s' set twice in [%s]", name, ps->section);
            return 1;
        }
    if (ps->nseen < sizeof(ps->seen) / sizeof(ps->seen[0]))
        snprintf(ps->seen[ps->nseen++], sizeof(ps->seen[0]), "%s", name);
    if (!*value)
        cfg_error(ps, ps->line, "'%s' has an empty value", name);
    else if (strcmp(ps->section, "daemon") == 0)
        daemon_key(ps, name, value);
    else if (strcmp(ps->section, "access") == 0)
        access_key(ps, name, value);
    else if (ps->model)
        model_key(ps, name, value);
    return 1;
}

int config_load(const char *path, config_t **ret, config_report_fn report, void *data)
{
    parse_state_t ps = {.report = report, .data = data};
    config_t *c = calloc(1, sizeof(*c));
    char *slash;
    int r;

    *ret = NULL;
    if (!c)
        return -ENOMEM;
    c->file = strdup(path);
    c->log_level = -1;
    policy_default(&c->policy);
    ps.cfg = c;
    ps.dir = strdup(path);
    slash = ps.dir ? strrchr(ps.dir, '/') : NULL;
    if (slash && slash != ps.dir)
        *slash = '\0';
    else if (slash)
        slash[1] = '\0';
    else {
        free(ps.dir);
        ps.dir = getcwd(NULL, 0);
    }
    ps.f = fopen(path, "re");
    if (!ps.f) {
        r = -errno;
        cfg_error(&ps, 0, "cannot read: %s", strerror(-r));
        goto fail;
    }
    r = ini_parse_stream(reader, &ps, handler, &ps);
    finish_model(&ps);
    if (r == -2)
        cfg_error(&ps, ps.line, "out of memory");
    (void)fclose(ps.f);
    if (c->socket_path && c->admin_path && strcmp(c->socket_path, c->admin_path) == 0)
        cfg_error(&ps, ps.admin_line, "admin-socket: must not be the client socket's file");
    r = c->nerrors ? -EINVAL : 0;
    if (r < 0)
        goto fail;
    free(ps.buf);
    free(ps.dir);
    *ret = c;
    return 0;

fail:
    free(ps.buf);
    free(ps.dir);
    config_free(c);
    return r;
}

void config_free(config_t *c)
{
    if (!c)
        return;
    for (size_t i = 0; i < c->nmodels; i++) {
        free(c->models[i].name);
        free(c->models[i].path);
        free(c->models[i].key);
    }
    free(c->models);
    free(c->client_preload_dirs);
    free(c->socket_path);
    free(c->admin_path);
    free(c->file);
    free(c);
}

void config_drop_given(config_t *c, unsigned given)
{
    if (given & CONFIG_CLI_SOCKET) {
        free(c->socket_path);
        c->socket_path = NULL;
    }
    if (given & CONFIG_CLI_ADMIN_SOCKET) {
        free(c->admin_path);
        c->admin_path = NULL;
    }
    if (given & CONFIG_CLI_LOG_LEVEL)
        c->log_level = -1;
    if (given & CONFIG_CLI_MAX_CONNECTIONS)
        c->max_connections = 0;
    if (given & CONFIG_CLI_MAX_LEASES)
        c->max_leases = 0;
    if (given & CONFIG_CLI_MAX_CONNS_PER_UID)
        c->max_conns_per_uid = 0;
    if (given & CONFIG_CLI_MAX_FRAME)
        c->max_frame = 0;
    if (given & CONFIG_CLI_MAX_FDS)
        c->max_fds_set = false;
    if (given & CONFIG_CLI_MAX_OUTPUT_QUEUE)
        c->max_outq = 0;
    if (given & CONFIG_CLI_HANDSHAKE_TIMEOUT)
        c->handshake_timeout_ms = 0;
    if (given & CONFIG_CLI_IDLE_TIMEOUT)
        c->idle_timeout_set = false;
    if (given & CONFIG_CLI_MEMORY_BUDGET)
        c->budget_set = false;
}

const cfg_model_t *config_find_model(const config_t *c, const char *name)
{
    for (size_t i = 0; c && i < c->nmodels; i++)
        if (c->models[i].name && strcmp(c->models[i].name, name) == 0)
            return &c->models[i];
    return NULL;
}

static bool str_eq(const char *a, const char *b)
{
    return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

bool cfg_model_has_device(const cfg_model_t *m, int device)
{
    for (size_t i = 0; i < m->ndevices; i++)
        if (m->devices[i] == device)
            return true;
    return false;
}

/* The same CUDA ordinals, in any order (a list holds each once). */
static bool same_devices(const cfg_model_t *a, const cfg_model_t *b)
{
    if (a->ndevices != b->ndevices)
        return false;
    for (size_t i = 0; i < a->ndevices; i++)
        if (!cfg_model_has_device(b, a->devices[i]))
            return false;
    return true;
}

/* What is served, not how it is read: page-cache alone changing reloads nothing. */
bool cfg_model_same(const cfg_model_t *a, const cfg_model_t *b)
{
    return str_eq(a->path, b->path) && str_eq(a->key, b->key) && a->dtype == b->dtype &&
           a->share_file == b->share_file && same_devices(a, b) &&
           a->allow_gpu_write == b->allow_gpu_write && a->acl == b->acl &&
           memcmp(&a->acl_users, &b->acl_users, sizeof(a->acl_users)) == 0 &&
           memcmp(&a->acl_groups, &b->acl_groups, sizeof(a->acl_groups)) == 0 &&
           a->no_verify == b->no_verify;
}

bool cfg_model_devices_change(const cfg_model_t *was, const cfg_model_t *now)
{
    cfg_model_t same = *now;

    if (same_devices(was, now))
        return false; /* cfg_model_same() decides */
    /* Everything else as before: compare with the devices taken from the old entry. */
    same.ndevices = was->ndevices;
    memcpy(same.devices, was->devices, was->ndevices * sizeof(was->devices[0]));
    return cfg_model_same(was, &same);
}
