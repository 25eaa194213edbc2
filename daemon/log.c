/*
 * log.c - stderr logging. Under systemd (JOURNAL_STREAM set) lines carry "<N>" priorities and
 * no timestamp, since the journal adds its own; on a terminal they carry a wall-clock time.
 *
 * The second half is the per-call-site rate limiter (log.h): windows on the monotonic clock, a
 * burst per window, and one summary line for what a window suppressed.
 */
#include "log.h"

#include <assert.h>
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int max_level = LOG_LVL_INFO;

static const char *const level_names[] = {
    [LOG_LVL_ERR] = "error",   [LOG_LVL_WARNING] = "warning", [LOG_LVL_NOTICE] = "notice",
    [LOG_LVL_INFO] = "info",   [LOG_LVL_DEBUG] = "debug",
};

void log_set_level(int level)
{
    max_level = level;
}

int log_get_level(void)
{
    return max_level;
}

int log_level_from_name(const char *name)
{
    /* "err" is syslog's and systemd's spelling, "error" the one our lines print. */
    if (strcmp(name, "err") == 0)
        return LOG_LVL_ERR;
    for (int i = LOG_LVL_ERR; i <= LOG_LVL_DEBUG; i++)
        if (strcmp(name, level_names[i]) == 0)
            return i;
    return -EINVAL;
}

/* One finished line to stderr; the caller has checked the level. */
static void log_emit(int level, const char *line)
{
    static int journal = -1;

    if (journal < 0)
        journal = getenv("JOURNAL_STREAM") != NULL;
    if (journal)
        fprintf(stderr, "<%d>%s\n", level, line);
    else {
        struct timespec ts;
        struct tm tm;
        char when[32];

        clock_gettime(CLOCK_REALTIME, &ts);
        localtime_r(&ts.tv_sec, &tm);
        strftime(when, sizeof(when), "%H:%M:%S", &tm);
        fprintf(stderr, "%s.%03ld weightsd %s: %s\n", when, ts.tv_nsec / 1000000,
                level_names[level], line);
    }
}

void log_at(int level, const char *fmt, ...)
{
    char line[2048];
    va_list ap;

    if (level > max_level)
        return;
    va_start(ap, fmt);
    (void)vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    log_emit(level, line);
}

static uint64_t monotonic_usec(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static uint64_t (*ratelimit_clock)(void) = monotonic_usec;
/* Every site used so far, for log_ratelimit_flush(). */
static log_ratelimit_t *ratelimits;

void log_ratelimit_set_clock(uint64_t (*now_usec)(void))
{
    ratelimit_clock = now_usec ? now_usec : monotonic_usec;
}

/* Ends the open window of \p rl, first saying what it suppressed. */
static void ratelimit_close(log_ratelimit_t *rl, uint64_t now)
{
    if (rl->suppressed && rl->level <= max_level) {
        /* Whole seconds, rounded up: "in the last 0 s" would read as nothing. */
        unsigned long long secs = (now - rl->begin_usec + 999999u) / 1000000u;
        char line[2048];

        snprintf(line, sizeof(line),
                 "%u similar message%s suppressed in the last %llu s; the latest: %s",
                 rl->suppressed, rl->suppressed == 1 ? "" : "s", secs ? secs : 1, rl->last);
        log_emit(rl->level, line);
    }
    rl->open = false;
    rl->logged = rl->suppressed = 0;
}

void log_ratelimited(log_ratelimit_t *rl, int level, const char *fmt, ...)
{
    char line[2048];
    uint64_t now;
    size_t len;
    va_list ap;

    if (level > max_level)
        return;
    va_start(ap, fmt);
    (void)vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    if (max_level >= LOG_LVL_DEBUG) {
        log_emit(level, line);
        return;
    }
    if (!rl->registered) {
        rl->registered = true;
        rl->owner = pthread_self();
        rl->next = ratelimits;
        ratelimits = rl;
    }
    /* Unlocked state: one thread only (log.h). */
    assert(pthread_equal(rl->owner, pthread_self()));
    rl->level = level;
    now = ratelimit_clock();
    if (rl->open && now - rl->begin_usec >= rl->interval_usec)
        ratelimit_close(rl, now);
    if (!rl->open) {
        rl->open = true;
        rl->begin_usec = now;
    }
    if (rl->logged < rl->burst) {
        rl->logged++;
        log_emit(level, line);
        return;
    }
    if (rl->suppressed < UINT_MAX)
        rl->suppressed++;
    /* Cut to the quote's size on purpose (snprintf would be warned about truncating). */
    len = strnlen(line, sizeof(rl->last) - 1);
    memcpy(rl->last, line, len);
    rl->last[len] = '\0';
}

void log_ratelimit_flush(bool all)
{
    uint64_t now = ratelimit_clock();

    for (log_ratelimit_t *rl = ratelimits; rl; rl = rl->next)
        if (rl->open && rl->suppressed && (all || now - rl->begin_usec >= rl->interval_usec))
            ratelimit_close(rl, now);
}
