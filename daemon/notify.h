/*
 * notify.h - talking to the service manager without libsystemd (STYLE B3): the sd_notify
 * datagram protocol (READY, STATUS, RELOADING, STOPPING, WATCHDOG, EXTEND_TIMEOUT_USEC) and
 * socket activation (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES).
 *
 * Without NOTIFY_SOCKET every notify call is a no-op, so the daemon runs the same in a terminal.
 */
#ifndef WSD_NOTIFY_H
#define WSD_NOTIFY_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <uv.h>

/* The first inherited descriptor (sd_listen_fds(3)). */
#define NOTIFY_LISTEN_FDS_START 3

typedef struct notify {
    int fd;                        /* datagram socket, -1 when there is no service manager */
    struct sockaddr_un addr;
    socklen_t addrlen;
    uint64_t watchdog_usec;        /* WatchdogSec= as passed in WATCHDOG_USEC, 0 = none */
    uv_timer_t watchdog;
    bool watchdog_running;
} notify_t;

/*
 * Reads NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID and starts the watchdog timer (pinging
 * at half the interval) on \p loop; the variables are then removed from the environment so
 * nothing the daemon might start inherits them. An unusable NOTIFY_SOCKET is logged and
 * ignored: the daemon serves regardless. \retval 0 always.
 */
int notify_init(notify_t *n, uv_loop_t *loop);
/* Stops and closes the watchdog timer and the socket (the loop must run once more). */
void notify_close(notify_t *n);

/* Sends one datagram of "KEY=VALUE" lines. \retval 0, 0 without a manager, or -errno. */
int notify_send(notify_t *n, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* READY=1 with a STATUS= line. */
void notify_ready(notify_t *n, const char *status);
/* RELOADING=1 with MONOTONIC_USEC= (as Type=notify-reload wants it) and a STATUS= line. */
void notify_reloading(notify_t *n, const char *status);
/* STOPPING=1 with a STATUS= line; the watchdog stops too. */
void notify_stopping(notify_t *n, const char *status);
/* STATUS= alone. */
void notify_status(notify_t *n, const char *status);
/* EXTEND_TIMEOUT_USEC=: the manager allows \p usec more from now for the start or reload. */
void notify_extend_timeout(notify_t *n, uint64_t usec);

/*
 * Socket activation: picks the client and admin listening sockets out of LISTEN_FDS when
 * LISTEN_PID is this process. Names from LISTEN_FDNAMES ("client", "admin", as set by
 * FileDescriptorName=) decide which is which; unnamed ("unknown" or missing) descriptors are
 * taken in order, client first. Each adopted descriptor is checked to be a listening AF_UNIX
 * stream socket and made non-blocking and close-on-exec; descriptors we do not use are closed.
 * The LISTEN_* variables are removed from the environment.
 *
 * \retval 0 with *client_fd / *admin_fd set (either may stay -1: bind that one yourself), or
 *         -EINVAL with \p err filled when the inherited set cannot be used.
 */
int notify_listen_fds(int *client_fd, int *admin_fd, char *err, size_t errlen);

#endif /* WSD_NOTIFY_H */
