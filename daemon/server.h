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
    unsigned max_connections;      /* total, both sockets (admin gets WSD_ADMIN_RESERVE_CONNS
                                      more) */
    unsigned max_conns_per_uid;    /* likewise, per peer uid; 0 = as max_connections */
    unsigned max_leases_per_conn;
    size_t max_outq_bytes;         /* queued reply bytes per connection before it is dropped */
    size_t max_frame;              /* largest request payload, WSD_REQUEST_MIN..WSD_REQUEST_MAX */
    unsigned max_fds_per_msg;      /* fds one recvmsg() may carry before it is fd abuse (no
                                      request carries any yet, so any fd is still refused) */
    unsigned handshake_timeout_ms; /* HELLO within this of accept; also bounds a started frame
                                      and an output queue that makes no progress */
    unsigned idle_timeout_ms;      /* close a connection without leases or pending work after
                                      this long without traffic; 0 = never */
    const policy_t *policy;        /* who may connect (policy.h); NULL admits every peer */
} server_opts_t;

typedef struct lease {
    uint64_t id;
    model_t *model;                /* holds a lease reference */
    int device;                    /* the CUDA ordinal it maps, or -1 for the host tier */
    uint32_t gen;                  /* which copy there (model_lease_get()) */
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
    bool uid_counted;              /* holds a slot in the server's per-uid table */
    int refuse_code;               /* over a limit: answer HELLO with Error{this} and close */
    unsigned refs;                 /* 1 for the handle + 1 per pending async operation */
    uint64_t id;                   /* for logs */
    struct ucred cred;             /* SO_PEERCRED at accept */
    wire_reader_t reader;
    outbuf_t *outq, **outq_tail;
    size_t outq_bytes;
    lease_t *leases;
    size_t nleases, leases_cap;
    size_t outq_fds;               /* descriptors in outq */
    int poll_events;               /* events currently requested */
    /* Timestamps (uv_now) for the sweep timer's timeouts. */
    uint64_t accepted_ms;
    uint64_t active_ms;            /* last complete frame in or byte out */
    uint64_t frame_start_ms;       /* first byte of the partial frame in reader, 0 = none */
    uint64_t stall_since_ms;       /* output queued and none of it sent since, 0 = not stalled */
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
    uint64_t connections_rejected_uid; /* over the per-uid limit */
    uint64_t connections_emfile;   /* accepted and closed at once: out of fds (spare-fd trick) */
    uint64_t connections_timed_out; /* handshake, stalled frame or output, idle */
    uint64_t connections_outq_dropped; /* output queue over its byte or fd cap */
} server_stats_t;

typedef struct uid_count {
    uid_t uid;
    unsigned n;
} uid_count_t;

struct server {
    uv_loop_t *loop;
    registry_t *reg;
    server_opts_t opts;
    uv_poll_t listen_poll[2];      /* [0] client, [1] admin */
    int listen_fd[2];
    char *listen_path[2];          /* unlinked at stop when we created them */
    bool listening[2];
    conn_t *conns;
    unsigned nconns;               /* every connection in conns, refusing ones included */
    unsigned nrefusing;            /* of those, over a limit (refuse_code set) */
    uid_count_t *uids;             /* connections per uid (refusing ones not counted) */
    size_t nuids, uids_cap;
    uv_timer_t sweep;              /* enforces every timeout; unref'd */
    bool sweep_on;
    int spare_fd;                  /* reserved for accepting (and closing) at EMFILE, or -1 */
    bool accept_paused;            /* out of fds and no spare: the sweep re-arms listening */
    uint64_t next_conn_id;
    uint64_t next_lease_id;
    uint64_t started_ms;
    bool stopping;
    server_stats_t stats;
};

/* Binds (or adopts) both sockets and starts serving on \p loop. A socket with neither a path nor
 * an fd is not served (tests and fuzzers hand connections in with server_adopt_conn()). */
int server_start(server_t *s, uv_loop_t *loop, registry_t *reg, const server_opts_t *opts);
/* Stops listening and closes every connection; the loop then drains and returns. */
void server_stop(server_t *s);
/* Serves the connected stream socket \p fd (taken over: closed on failure) as if accepted on the
 * client or admin socket: access policy, connection limits and everything after.
 * \retval 0; -EUSERS: over a connection limit, kept only to answer its HELLO with
 *         Error{WSD_ELIMIT}; other < 0: refused (policy) or could not be set up, fd closed. */
int server_adopt_conn(server_t *s, int fd, bool admin);

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
