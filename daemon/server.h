/*
 * server.h - listeners, connections and dispatch. A connection is a uv_poll_t on a socket we read
 * and write ourselves (fd passing, STYLE M5); its requests go to session.c (client socket) or
 * admin.c (admin socket).
 */
#ifndef WSD_SERVER_H
#define WSD_SERVER_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>
#include <uv.h>

#include "policy.h"
#include "registry.h"
#include "wire.h"

typedef struct server server_t;
typedef struct conn conn_t;

typedef struct server_opts {
    const char *socket_path;       /* client socket */
    const char *admin_path;        /* admin socket */
    int socket_fd;                 /* already listening (socket activation), or -1 */
    int admin_fd;                  /* likewise */
    unsigned max_connections;      /* total, both sockets */
    unsigned max_leases_per_conn;
    size_t max_outq_bytes;         /* queued reply bytes per connection before it is dropped */
    const policy_t *policy;        /* who may connect (policy.h); NULL admits every peer */
} server_opts_t;

typedef struct lease {
    uint64_t id;
    model_t *model;                /* holds a lease reference */
} lease_t;

/* One queued outgoing frame; its fds go with its first byte and are closed once sent. */
typedef struct outbuf {
    struct outbuf *next;
    uint8_t *buf;
    size_t len, off;
    int fds[WSD_FDS_PER_FRAME_MAX];
    size_t nfds;
} outbuf_t;

struct conn {
    uv_poll_t poll;                /* data = this conn */
    server_t *srv;
    conn_t *prev, *next;           /* server's list */
    int fd;
    bool admin;                    /* accepted on the admin socket */
    bool hello_done;               /* HELLO exchanged */
    bool closing;                  /* conn_close() ran; no more I/O */
    bool close_when_flushed;       /* drop once the output queue is empty (after a fatal Error) */
    unsigned refs;                 /* 1 for the handle + 1 per pending async operation */
    uint64_t id;                   /* for logs */
    struct ucred cred;             /* SO_PEERCRED at accept */
    wire_reader_t reader;
    outbuf_t *outq, **outq_tail;
    size_t outq_bytes;
    lease_t *leases;
    size_t nleases, leases_cap;
    int poll_events;               /* events currently requested */
};

typedef struct server_stats {
    uint64_t connections_total;
    uint64_t connections_rejected;
    uint64_t connections_denied;   /* refused by the access policy */
    uint64_t protocol_violations;
    uint64_t opens_total;
    uint64_t open_errors;
    uint64_t releases_total;
    uint64_t leases_released_on_close;
} server_stats_t;

struct server {
    uv_loop_t *loop;
    registry_t *reg;
    server_opts_t opts;
    uv_poll_t listen_poll[2];      /* [0] client, [1] admin */
    int listen_fd[2];
    char *listen_path[2];          /* unlinked at stop when we created them */
    bool listening[2];
    conn_t *conns;
    unsigned nconns;
    uint64_t next_conn_id;
    uint64_t next_lease_id;
    uint64_t started_ms;
    bool stopping;
    server_stats_t stats;
};

/* Binds (or adopts) both sockets and starts serving on \p loop. */
int server_start(server_t *s, uv_loop_t *loop, registry_t *reg, const server_opts_t *opts);
/* Stops listening and closes every connection; the loop then drains and returns. */
void server_stop(server_t *s);

/* Takes ownership of \p buf and \p fds; queues and starts sending. Drops the connection if its
 * queue would pass the cap. */
void conn_send(conn_t *c, uint8_t *buf, size_t len, const int *fds, size_t nfds);
/* Sends a protobuf frame. */
void conn_send_msg(conn_t *c, const wire_msg_t *msg);
/* Sends Error{code, message} for request \p id. */
void conn_send_error(conn_t *c, uint64_t id, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* Schedules teardown: leases released now, memory freed from the close callback. */
void conn_close(conn_t *c, const char *why);
conn_t *conn_ref(conn_t *c);
void conn_unref(conn_t *c);

/* session.c: client-socket verbs. \retval 0, or < 0 to drop the connection. */
int session_dispatch(conn_t *c, wire_frame_t *f);
/* Releases every lease of \p c. */
void session_release_all(conn_t *c);

/* admin.c: admin-socket verbs. */
int admin_dispatch(conn_t *c, wire_frame_t *f);

#endif /* WSD_SERVER_H */
