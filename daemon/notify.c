/*
 * notify.c - the sd_notify(3) and sd_listen_fds(3) protocols, implemented from their manual
 * pages rather than linked from libsystemd (STYLE B3): a weightsd outside systemd, in a
 * container or under another supervisor, must not need the library, and the protocol is small
 * and documented as stable (systemd.io/PORTABILITY_AND_STABILITY).
 *
 * Messages are single datagrams sent without blocking: a service manager that stops reading
 * must not stall the loop that serves workers. A lost WATCHDOG=1 is retried at the next tick.
 */
#include "notify.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "log.h"

static int parse_u64(const char *s, uint64_t *ret)
{
    char *end;
    unsigned long long v;

    if (!s || !*s)
        return -EINVAL;
    errno = 0;
    v = strtoull(s, &end, 10);
    if (errno || *end || end == s || s[0] == '-')
        return -EINVAL;
    *ret = v;
    return 0;
}

static void watchdog_cb(uv_timer_t *t)
{
    notify_t *n = t->data;

    (void)notify_send(n, "WATCHDOG=1");
}

/* NOTIFY_SOCKET is a filesystem path ("/...") or an abstract name ("@..."); other schemes
 * (vsock:, since systemd 253) are for VMs and not ours to handle. */
static int notify_address(notify_t *n, const char *e)
{
    size_t len = strlen(e);

    if ((e[0] != '/' && e[0] != '@') || len < 2 || len >= sizeof(n->addr.sun_path))
        return -EAFNOSUPPORT;
    memset(&n->addr, 0, sizeof(n->addr));
    n->addr.sun_family = AF_UNIX;
    memcpy(n->addr.sun_path, e, len);
    if (e[0] == '@') {
        /* Abstract names are exactly as long as given: no terminating NUL in the length. */
        n->addr.sun_path[0] = '\0';
        n->addrlen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len);
    } else
        n->addrlen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len + 1);
    return 0;
}

int notify_init(notify_t *n, uv_loop_t *loop)
{
    const char *e = getenv("NOTIFY_SOCKET");
    const char *wpid = getenv("WATCHDOG_PID");
    uint64_t usec = 0, pid;

    memset(n, 0, sizeof(*n));
    n->fd = -1;
    if (e && *e) {
        if (notify_address(n, e) < 0)
            log_warning("NOTIFY_SOCKET='%s' is not a socket path or abstract name; not "
                        "notifying the service manager", e);
        else {
            n->fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
            if (n->fd < 0)
                log_warning("cannot create the notification socket: %s", strerror(errno));
        }
    }
    /* The watchdog is ours only when WATCHDOG_PID, if set, names this process: a wrapper may
     * have passed the variables on to us without being the watched process. */
    if (getenv("WATCHDOG_USEC") && parse_u64(getenv("WATCHDOG_USEC"), &usec) < 0)
        log_warning("ignoring WATCHDOG_USEC='%s': not a number", getenv("WATCHDOG_USEC"));
    if (usec && wpid && (parse_u64(wpid, &pid) < 0 || pid != (uint64_t)getpid()))
        usec = 0;
    if (usec && n->fd >= 0) {
        uint64_t ms = usec / 2000;

        n->watchdog_usec = usec;
        (void)uv_timer_init(loop, &n->watchdog);
        n->watchdog.data = n;
        /* The first ping at once: the manager's timer has been running since it started us. */
        (void)uv_timer_start(&n->watchdog, watchdog_cb, 0, ms ? ms : 1);
        /* The watchdog alone must not keep a stopping daemon's loop alive. */
        uv_unref((uv_handle_t *)&n->watchdog);
        n->watchdog_running = true;
        log_debug("watchdog: %llu us, pinging every %llu ms", (unsigned long long)usec,
                  (unsigned long long)(ms ? ms : 1));
    }
    (void)unsetenv("NOTIFY_SOCKET");
    (void)unsetenv("WATCHDOG_USEC");
    (void)unsetenv("WATCHDOG_PID");
    return 0;
}

void notify_close(notify_t *n)
{
    if (n->watchdog_running) {
        (void)uv_timer_stop(&n->watchdog);
        uv_close((uv_handle_t *)&n->watchdog, NULL);
        n->watchdog_running = false;
    }
    if (n->fd >= 0)
        (void)close(n->fd);
    n->fd = -1;
}

int notify_send(notify_t *n, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    int len;

    if (n->fd < 0)
        return 0;
    va_start(ap, fmt);
    len = vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (len < 0)
        return -EINVAL;
    if ((size_t)len >= sizeof(msg))
        len = (int)sizeof(msg) - 1; /* a long STATUS= is cut, never the keys before it */
    if (sendto(n->fd, msg, (size_t)len, MSG_NOSIGNAL | MSG_DONTWAIT,
               (const struct sockaddr *)&n->addr, n->addrlen) < 0) {
        int r = -errno;

        log_warning("cannot notify the service manager (%.*s): %s",
                    (int)strcspn(msg, "\n"), msg, strerror(-r));
        return r;
    }
    return 0;
}

/* STATUS= is one line: a newline would start another key. */
static void one_line(char *dst, size_t size, const char *src)
{
    snprintf(dst, size, "%s", src ? src : "");
    for (char *p = dst; *p; p++)
        if (*p == '\n')
            *p = ' ';
}

void notify_ready(notify_t *n, const char *status)
{
    char st[512];

    one_line(st, sizeof(st), status);
    (void)notify_send(n, "READY=1\nSTATUS=%s", st);
}

void notify_reloading(notify_t *n, const char *status)
{
    struct timespec ts;
    char st[512];

    one_line(st, sizeof(st), status);
    clock_gettime(CLOCK_MONOTONIC, &ts);
    (void)notify_send(n, "RELOADING=1\nMONOTONIC_USEC=%llu\nSTATUS=%s",
                      (unsigned long long)ts.tv_sec * 1000000ull +
                          (unsigned long long)ts.tv_nsec / 1000ull,
                      st);
}

void notify_stopping(notify_t *n, const char *status)
{
    char st[512];

    one_line(st, sizeof(st), status);
    (void)notify_send(n, "STOPPING=1\nSTATUS=%s", st);
    if (n->watchdog_running)
        (void)uv_timer_stop(&n->watchdog);
}

void notify_status(notify_t *n, const char *status)
{
    char st[512];

    one_line(st, sizeof(st), status);
    (void)notify_send(n, "STATUS=%s", st);
}

void notify_extend_timeout(notify_t *n, uint64_t usec)
{
    (void)notify_send(n, "EXTEND_TIMEOUT_USEC=%llu", (unsigned long long)usec);
}

static bool fdname_valid(const char *name)
{
    size_t len = strlen(name);

    if (len == 0 || len > 255)
        return false;
    for (const char *p = name; *p; p++)
        if (*p < 0x20 || *p > 0x7e || *p == ':')
            return false;
    return true;
}

int notify_fdstore(notify_t *n, const char *name, int fd)
{
    char msg[300];
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof(int))];
    } ctl;
    struct iovec iov;
    struct msghdr mh = {0};
    struct cmsghdr *cm;
    int len;

    if (!fdname_valid(name))
        return -EINVAL;
    if (n->fd < 0)
        return 0;
    len = snprintf(msg, sizeof(msg), "FDSTORE=1\nFDNAME=%s", name);
    iov.iov_base = msg;
    iov.iov_len = (size_t)len;
    memset(&ctl, 0, sizeof(ctl));
    mh.msg_name = &n->addr;
    mh.msg_namelen = n->addrlen;
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = ctl.buf;
    mh.msg_controllen = sizeof(ctl.buf);
    cm = CMSG_FIRSTHDR(&mh);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cm), &fd, sizeof(int));
    if (sendmsg(n->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT) < 0) {
        int r = -errno;

        log_warning("cannot store fd '%s' with the service manager: %s", name, strerror(-r));
        return r;
    }
    return 0;
}

int notify_fdstore_remove(notify_t *n, const char *name)
{
    if (!fdname_valid(name))
        return -EINVAL;
    return notify_send(n, "FDSTOREREMOVE=1\nFDNAME=%s", name);
}

int notify_fdname(char *dst, size_t size, const char *prefix, const char *s)
{
    size_t o = (size_t)snprintf(dst, size, "%s", prefix);

    for (; *s && o < size; s++) {
        unsigned char ch = (unsigned char)*s;

        if (ch < 0x20 || ch > 0x7e || ch == ':' || ch == '%')
            o += (size_t)snprintf(dst + o, size - o, "%%%02X", ch);
        else
            dst[o++] = (char)ch;
    }
    if (o >= size || o > 255)
        return -ENAMETOOLONG;
    dst[o] = '\0';
    return 0;
}

int notify_fdname_decode(char *dst, size_t size, const char *prefix, const char *fdname)
{
    size_t plen = strlen(prefix), o = 0;
    const char *s = fdname + plen;

    if (strncmp(fdname, prefix, plen) != 0)
        return -EINVAL;
    for (; *s; s++) {
        unsigned v;

        if (o + 1 >= size)
            return -EINVAL;
        if (*s == '%') {
            char hex[3] = {s[1], s[1] ? s[2] : '\0', '\0'};

            if (!isxdigit((unsigned char)hex[0]) || !isxdigit((unsigned char)hex[1]))
                return -EINVAL;
            v = (unsigned)strtoul(hex, NULL, 16);
            dst[o++] = (char)v;
            s += 2;
        } else
            dst[o++] = *s;
    }
    if (o == 0)
        return -EINVAL;
    dst[o] = '\0';
    return 0;
}

/* An inherited descriptor must be what a .socket unit with ListenStream= hands over. */
static int check_listener(int fd, char *err, size_t errlen)
{
    struct sockaddr_un sa = {0}; /* a short answer leaves sun_family 0, not garbage */
    socklen_t len = sizeof(sa);
    int type = 0, acc = 0, flags;
    socklen_t ilen = sizeof(int);

    if (getsockname(fd, (struct sockaddr *)&sa, &len) < 0 || sa.sun_family != AF_UNIX ||
        getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &ilen) < 0 || type != SOCK_STREAM ||
        getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &acc, &ilen) < 0 || !acc) {
        snprintf(err, errlen, "inherited fd %d is not a listening AF_UNIX stream socket "
                              "(ListenStream= with a path)", fd);
        return -EINVAL;
    }
    /* accept4() runs in a loop until EAGAIN: a blocking listener would stall it. */
    flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0 ||
        fcntl(fd, F_SETFD, FD_CLOEXEC) < 0) {
        snprintf(err, errlen, "inherited fd %d: %s", fd, strerror(errno));
        return -EINVAL;
    }
    return 0;
}

int notify_listen_fds(int *client_fd, int *admin_fd, notify_stored_fn stored, void *data,
                      char *err, size_t errlen)
{
    const char *e_pid = getenv("LISTEN_PID"), *e_fds = getenv("LISTEN_FDS");
    const char *e_names = getenv("LISTEN_FDNAMES");
    uint64_t pid, nfds;
    char *names = NULL, *rest, *name;
    int r = 0;

    *client_fd = *admin_fd = -1;
    if (!e_pid || !e_fds)
        goto out;
    /* The variables may have been inherited by accident from a parent that was activated. */
    if (parse_u64(e_pid, &pid) < 0 || pid != (uint64_t)getpid())
        goto out;
    if (parse_u64(e_fds, &nfds) < 0 || nfds > 64) {
        snprintf(err, errlen, "LISTEN_FDS='%s' is not a descriptor count", e_fds);
        r = -EINVAL;
        goto out;
    }
    names = e_names ? strdup(e_names) : NULL;
    rest = names;
    for (int i = 0; i < (int)nfds; i++) {
        int fd = NOTIFY_LISTEN_FDS_START + i;
        int *slot = NULL;

        /* Names are positional: strsep keeps an empty one in its place. */
        name = rest ? strsep(&rest, ":") : NULL;
        if (name && !*name)
            name = NULL;

        if (name && strcmp(name, "client") == 0)
            slot = client_fd;
        else if (name && strcmp(name, "admin") == 0)
            slot = admin_fd;
        else if (!name || strcmp(name, "unknown") == 0)
            slot = *client_fd < 0 ? client_fd : *admin_fd < 0 ? admin_fd : NULL;
        else if (stored && stored(data, name, fd) == 0) {
            (void)fcntl(fd, F_SETFD, FD_CLOEXEC);
            continue;
        }
        if (!slot || *slot >= 0) {
            log_warning("closing inherited fd %d ('%s'): not a socket weightsd uses", fd,
                        name ? name : "unnamed");
            (void)close(fd);
            continue;
        }
        if (r == 0)
            r = check_listener(fd, err, errlen);
        if (r < 0) {
            (void)close(fd);
            continue;
        }
        *slot = fd;
        log_info("socket activation: fd %d ('%s') is the %s socket", fd,
                 name ? name : "unnamed", slot == client_fd ? "client" : "admin");
    }
    if (r < 0) {
        if (*client_fd >= 0)
            (void)close(*client_fd);
        if (*admin_fd >= 0)
            (void)close(*admin_fd);
        *client_fd = *admin_fd = -1;
    }
out:
    free(names);
    (void)unsetenv("LISTEN_PID");
    (void)unsetenv("LISTEN_FDS");
    (void)unsetenv("LISTEN_FDNAMES");
    return r;
}
