/*
 * fdpass.c - SCM_RIGHTS send and receive. The receive side follows systemd's recvmsg_safe():
 * truncated control data, foreign control messages, or too many fds close everything received,
 * so a hostile peer can never leave descriptors behind in our process.
 */
#include "fdpass.h"

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "fault.h"
#include "wsd_limits.h"

/* Room for the most descriptors one recvmsg() may legally carry, plus slack so that a peer that
 * sends a few more is detected (and refused) rather than silently truncated. */
#define FDPASS_CMSG_FDS (WSD_FDS_PER_FRAME_MAX + 8u)

void fdpass_close_all(int *fds, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (fds[i] >= 0)
            (void)close(fds[i]);
        fds[i] = -1;
    }
}

ssize_t fdpass_send(int sock, const void *buf, size_t len, const int *fds, size_t nfds)
{
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int) * FDPASS_CMSG_FDS)];
    } control;
    struct iovec iov = {.iov_base = (void *)(uintptr_t)buf, .iov_len = len};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    ssize_t n;

    if (nfds > FDPASS_CMSG_FDS || len == 0)
        return -EINVAL;
    if (nfds > 0) {
        struct cmsghdr *cmsg;

        memset(&control, 0, sizeof(control));
        msg.msg_control = control.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
        cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(cmsg), fds, sizeof(int) * nfds);
    }
    if (FAULT("fdpass.send.short") && iov.iov_len > 1)
        iov.iov_len = 1; /* the kernel may take less than asked; the fds go with byte one */
    do
        n = FAULT("fdpass.sendmsg")   ? (errno = ETOOMANYREFS, -1)
            : FAULT("syscall.eintr") ? (errno = EINTR, -1)
                                     : sendmsg(sock, &msg, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return errno == EWOULDBLOCK ? -EAGAIN : -errno;
    return n;
}

ssize_t fdpass_recv(int sock, void *buf, size_t len, int *fds, size_t maxfds, size_t *ret_nfds)
{
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int) * FDPASS_CMSG_FDS)];
    } control;
    struct iovec iov = {.iov_base = buf, .iov_len = len};
    struct msghdr msg = {.msg_iov = &iov,
                         .msg_iovlen = 1,
                         .msg_control = control.buf,
                         .msg_controllen = sizeof(control.buf)};
    size_t got = 0;
    int bad = 0;
    ssize_t n;

    *ret_nfds = 0;
    if (FAULT("fdpass.recv.eagain"))
        return -EAGAIN; /* a spurious wakeup: readable said the poll, nothing said the socket */
    if (FAULT("fdpass.recv.short") && iov.iov_len > 1)
        iov.iov_len = 1; /* a stream hands out any prefix of what was sent */
    do
        n = FAULT("syscall.eintr") ? (errno = EINTR, -1) : recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return errno == EWOULDBLOCK ? -EAGAIN : -errno;

    /* Walk every control message even after a problem, so that all descriptors are closed. */
    for (struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg); cmsg; cmsg = CMSG_NXTHDR(&msg, cmsg)) {
        if (cmsg->cmsg_level == SOL_SOCKET && cmsg->cmsg_type == SCM_RIGHTS) {
            size_t k = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            int *p = (int *)(void *)CMSG_DATA(cmsg);

            for (size_t i = 0; i < k; i++) {
                int fd;

                memcpy(&fd, p + i, sizeof(fd));
                if (got < maxfds && !bad)
                    fds[got++] = fd;
                else {
                    bad = 1;
                    (void)close(fd);
                }
            }
        } else
            bad = 1; /* SCM_CREDENTIALS or anything else: not part of our protocol */
    }
    if (msg.msg_flags & MSG_CTRUNC)
        bad = 1;
    if (bad) {
        fdpass_close_all(fds, got);
        return -EBADMSG;
    }
    *ret_nfds = got;
    return n;
}
