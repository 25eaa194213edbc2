/*
 * log.c - stderr logging. Under systemd (JOURNAL_STREAM set) lines carry "<N>" priorities and
 * no timestamp, since the journal adds its own; on a terminal they carry a wall-clock time.
 */
#include "log.h"

#include <errno.h>
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
    for (int i = LOG_LVL_ERR; i <= LOG_LVL_DEBUG; i++)
        if (strcmp(name, level_names[i]) == 0)
            return i;
    return -EINVAL;
}

void log_at(int level, const char *fmt, ...)
{
    static int journal = -1;
    char line[2048];
    va_list ap;

    if (level > max_level)
        return;
    if (journal < 0)
        journal = getenv("JOURNAL_STREAM") != NULL;
    va_start(ap, fmt);
    (void)vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
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
