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
 * File descriptor store (FileDescriptorStoreMax=): FDSTORE=1 hands the manager a duplicate of
 * \p fd under \p name, which comes back in LISTEN_FDS/LISTEN_FDNAMES when the service starts
 * again, so a restart can keep what the fd holds (a model's sealed memfd). \p name must be a
 * valid FDNAME: 1-255 printable ASCII characters other than ':' (notify_fdname() makes one).
 * \retval 0, 0 without a manager, -EINVAL for a bad name, or -errno.
 */
int notify_fdstore(notify_t *n, const char *name, int fd);
/* FDSTOREREMOVE=1: the manager closes every stored fd named \p name. */
int notify_fdstore_remove(notify_t *n, const char *name);
/* Encodes \p prefix + \p s as an FDNAME ('%' and ':' as %25 and %3A, other bytes outside
 * printable ASCII as %XX). \retval 0, or -ENAMETOOLONG when it exceeds 255 characters. */
int notify_fdname(char *dst, size_t size, const char *prefix, const char *s);
/* The reverse of notify_fdname() for the part after \p prefix. \retval 0 or -EINVAL. */
int notify_fdname_decode(char *dst, size_t size, const char *prefix, const char *fdname);

/* Called by notify_listen_fds() for each inherited descriptor that is neither socket: returns
 * 0 when it took the fd over, anything else to have it closed. */
typedef int (*notify_stored_fn)(void *data, const char *name, int fd);

/*
 * Socket activation: picks the client and admin listening sockets out of LISTEN_FDS when
 * LISTEN_PID is this process. Names from LISTEN_FDNAMES ("client", "admin", as set by
 * FileDescriptorName=) decide which is which; unnamed ("unknown" or missing) descriptors are
 * taken in order, client first. Each adopted socket is checked to be a listening AF_UNIX
 * stream socket and made non-blocking and close-on-exec. Descriptors with other names (from
 * the fd store) go to \p stored when given, else are closed. The LISTEN_* variables are
 * removed from the environment.
 *
 * \retval 0 with *client_fd / *admin_fd set (either may stay -1: bind that one yourself), or
 *         -EINVAL with \p err filled when the inherited set cannot be used.
 */
int notify_listen_fds(int *client_fd, int *admin_fd, notify_stored_fn stored, void *data,
                      char *err, size_t errlen);

#endif /* WSD_NOTIFY_H */
