/*
 * client.h - the connection object's lifetime inside libweightsd (client/client.c). Internal to
 * the library (wsd__ prefix, STYLE N1); tests/unit/test-client-* reach it through the static
 * library.
 */
#ifndef WSD_CLIENT_CLIENT_H
#define WSD_CLIENT_CLIENT_H

#include "weightsd.h"

/*
 * A client with no connection yet (fd -1) and one reference, the caller's; wsd_connect()
 * connects it, wsd_close() drops that reference. \retval the client, or NULL (no memory).
 */
wsd_client_t *wsd__client_new(void);

/*
 * Takes one more reference on \p c (each open model holds one). The count is atomic, so a
 * reference may be taken and dropped on any thread (weightsd.h, "Threads").
 * \retval \p c.
 */
wsd_client_t *wsd__client_ref(wsd_client_t *c);

/* Drops one reference; the last one closes the socket and frees \p c. NULL is fine. */
void wsd__client_unref(wsd_client_t *c);

/*
 * Makes \p fd (a connected stream socket, owned from now on) the client's connection without
 * a HELLO exchange, as if wsd_connect() had done one: for tests/fuzz/fuzz-open.c, which plays
 * the daemon on the other end. \p c must be fresh from wsd__client_new() (no connection yet).
 */
void wsd__client_adopt_fd(wsd_client_t *c, int fd);

/* \retval the current reference count, for tests (stale as soon as another thread moves it). */
unsigned wsd__client_refs(const wsd_client_t *c);

#endif /* WSD_CLIENT_CLIENT_H */
