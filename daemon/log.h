/*
 * log.h - the daemon's only way to speak (STYLE E6): one line per event on stderr, with a
 * syslog-level prefix ("<3>") when stderr is the journal, so journald files it at that level.
 *
 * Lines a peer can provoke at will (denials, protocol violations, limit hits) go through
 * log_ratelimit_*() instead, so that a hostile client cannot flood the journal.
 */
#ifndef WSD_LOG_H
#define WSD_LOG_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

enum { LOG_LVL_ERR = 3, LOG_LVL_WARNING = 4, LOG_LVL_NOTICE = 5, LOG_LVL_INFO = 6, LOG_LVL_DEBUG = 7 };

/* Messages above \p level are dropped. Default LOG_LVL_INFO. */
void log_set_level(int level);
int log_get_level(void);
/* Parses "err" (or "error"), "warning", "notice", "info", "debug": the command line and the
 * config file both use this. \retval level or -EINVAL. */
int log_level_from_name(const char *name);

void log_at(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define log_error(...)  log_at(LOG_LVL_ERR, __VA_ARGS__)
#define log_warning(...) log_at(LOG_LVL_WARNING, __VA_ARGS__)
#define log_notice(...) log_at(LOG_LVL_NOTICE, __VA_ARGS__)
#define log_info(...)   log_at(LOG_LVL_INFO, __VA_ARGS__)
#define log_debug(...)  log_at(LOG_LVL_DEBUG, __VA_ARGS__)

/*
 * Rate limiting, after systemd's log_ratelimit_*(): each call site logs at most
 * LOG_RATELIMIT_BURST lines per LOG_RATELIMIT_INTERVAL_USEC window of the monotonic clock and
 * counts the rest. When the window has passed, one line says how many were suppressed and
 * quotes the latest of them; log_ratelimit_flush() (from the server's sweep timer) writes that
 * line even if the site stays quiet, so a flood that stops is still accounted for. At
 * LOG_LVL_DEBUG nothing is suppressed: whoever asked for debug output wants every line.
 *
 * The state is a static per call site and is not locked: use these only on the loop thread
 * (STYLE M7). Debug builds assert it.
 */
#define LOG_RATELIMIT_INTERVAL_USEC (5 * 1000000ull)
#define LOG_RATELIMIT_BURST         10u
/* How much of the latest suppressed line the summary quotes (bytes with the NUL). */
#define LOG_RATELIMIT_QUOTE_MAX 256

typedef struct log_ratelimit {
    uint64_t interval_usec;     /* window length, monotonic microseconds */
    unsigned burst;             /* lines logged per window; later ones are only counted */
    int level;                  /* LOG_LVL_* of the site, for its summary line */
    bool open;                  /* a window is open: a line came less than interval ago */
    uint64_t begin_usec;        /* start of the open window */
    unsigned logged;            /* lines logged in the open window, <= burst */
    unsigned suppressed;        /* lines dropped in the open window */
    char last[LOG_RATELIMIT_QUOTE_MAX]; /* the latest dropped line (valid while suppressed) */
    bool registered;            /* on the list log_ratelimit_flush() walks */
    struct log_ratelimit *next; /* that list (loop thread only) */
    pthread_t owner;            /* the thread that first used it, for the debug assertion */
} log_ratelimit_t;

/* log_at() through \p rl: logs, or counts the line as suppressed. */
void log_ratelimited(log_ratelimit_t *rl, int level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/*
 * Writes the summary of every site whose window has passed with lines suppressed, and closes
 * those windows. \p all: every site with suppressed lines, window passed or not (at exit).
 */
void log_ratelimit_flush(bool all);

/* The clock the limiter reads, in microseconds; NULL restores CLOCK_MONOTONIC. For tests. */
void log_ratelimit_set_clock(uint64_t (*now_usec)(void));

#define log_ratelimit_at(lvl, ...)                                                                 \
    do {                                                                                           \
        static log_ratelimit_t log_rl_ = {                                                         \
            .interval_usec = LOG_RATELIMIT_INTERVAL_USEC,                                          \
            .burst = LOG_RATELIMIT_BURST,                                                          \
        };                                                                                         \
        log_ratelimited(&log_rl_, (lvl), __VA_ARGS__);                                             \
    } while (0)

#define log_ratelimit_error(...)   log_ratelimit_at(LOG_LVL_ERR, __VA_ARGS__)
#define log_ratelimit_warning(...) log_ratelimit_at(LOG_LVL_WARNING, __VA_ARGS__)
#define log_ratelimit_notice(...)  log_ratelimit_at(LOG_LVL_NOTICE, __VA_ARGS__)
#define log_ratelimit_info(...)    log_ratelimit_at(LOG_LVL_INFO, __VA_ARGS__)

#endif /* WSD_LOG_H */
