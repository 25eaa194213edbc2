/*
 * log.h - the daemon's only way to speak (STYLE E6): one line per event on stderr, with a
 * syslog-level prefix ("<3>") when stderr is the journal, so journald files it at that level.
 */
#ifndef WSD_LOG_H
#define WSD_LOG_H

enum { LOG_LVL_ERR = 3, LOG_LVL_WARNING = 4, LOG_LVL_NOTICE = 5, LOG_LVL_INFO = 6, LOG_LVL_DEBUG = 7 };

/* Messages above \p level are dropped. Default LOG_LVL_INFO. */
void log_set_level(int level);
int log_get_level(void);
/* Parses "err", "warning", "notice", "info", "debug". \retval level or -EINVAL. */
int log_level_from_name(const char *name);

void log_at(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define log_error(...)  log_at(LOG_LVL_ERR, __VA_ARGS__)
#define log_warning(...) log_at(LOG_LVL_WARNING, __VA_ARGS__)
#define log_notice(...) log_at(LOG_LVL_NOTICE, __VA_ARGS__)
#define log_info(...)   log_at(LOG_LVL_INFO, __VA_ARGS__)
#define log_debug(...)  log_at(LOG_LVL_DEBUG, __VA_ARGS__)

#endif /* WSD_LOG_H */
