/*
 * fdpass.h - sendmsg()/recvmsg() with SCM_RIGHTS on Unix stream sockets, done once for the
 * daemon and the client (STYLE M4, M5). libuv cannot send arbitrary fds, so both sides call
 * these directly on their sockets.
 */
#ifndef WSD_FDPASS_H
#define WSD_FDPASS_H

#include <stddef.h>
#include <sys/types.h>

/*
 * Sends up to \p len bytes of \p buf with \p nfds descriptors attached (nfds may be 0).
 * MSG_NOSIGNAL: a dead peer gives -EPIPE, never SIGPIPE. The descriptors stay owned by the
 * caller. When some bytes were sent the descriptors went with them.
 * \retval bytes sent (> 0), -EAGAIN, or -errno.
 */
ssize_t fdpass_send(int sock, const void *buf, size_t len, const int *fds, size_t nfds);

/*
 * Receives up to \p len bytes. Descriptors that arrive are stored in \p fds (received with
 * MSG_CMSG_CLOEXEC) and counted in *ret_nfds; the caller owns them. If more than \p maxfds
 * arrive, the control data was truncated, or a control message is not SCM_RIGHTS, every received
 * descriptor is closed and -EBADMSG is returned: the peer broke the protocol.
 * \retval bytes received, 0 at end of stream, -EAGAIN, -EBADMSG or -errno.
 */
ssize_t fdpass_recv(int sock, void *buf, size_t len, int *fds, size_t maxfds, size_t *ret_nfds);

/* Closes \p n descriptors of \p fds (skipping negative ones) and sets them to -1. */
void fdpass_close_all(int *fds, size_t n);

#endif /* WSD_FDPASS_H */
