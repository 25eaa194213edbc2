/*
 * wsd_limits.h - every hard limit of the wire protocol and the daemon's resources, in one place
 * (STYLE M2): the defaults and the fixed ceilings. The daemon's command line and config file
 * (daemon/main.c, daemon/config.c) may only lower the request frame size (--max-frame,
 * WSD_REQUEST_MIN..WSD_REQUEST_MAX) and the fds one message may carry (--max-fds,
 * 0..WSD_FDS_PER_FRAME_MAX). The connection, per-uid connection and per-connection lease
 * limits (1..1048576 each), the output queue (4 KiB or more) and the handshake and idle
 * timeouts may be set above or below their _DEFAULT values. Everything else here is fixed.
 */
#ifndef WSD_LIMITS_H
#define WSD_LIMITS_H

/* Frame header: u32 payload length, u16 fd count, u16 reserved (zero). Little-endian. */
#define WSD_FRAME_HEADER_SIZE 8

/* Largest payload a daemon accepts from a peer (requests are small). */
#define WSD_REQUEST_MAX (64u * 1024u)
/* Largest payload a client accepts from the daemon (manifests of big models). */
#define WSD_REPLY_MAX (64u * 1024u * 1024u)
/* Absolute ceiling for any frame, whatever is configured. */
#define WSD_FRAME_MAX (64u * 1024u * 1024u)

/* File descriptors one frame may carry, and that may wait unclaimed on one connection. */
#define WSD_FDS_PER_FRAME_MAX 4u
#define WSD_FDS_PENDING_MAX   8u

/* Memory protobuf-c may allocate while unpacking one frame (STYLE M6). */
#define WSD_UNPACK_MEM_PER_BYTE 16u
#define WSD_UNPACK_MEM_MIN      (64u * 1024u)

/* Daemon defaults. */
#define WSD_CONNECTIONS_MAX_DEFAULT     4096u
#define WSD_LEASES_PER_CONN_DEFAULT     1024u
#define WSD_OUTQ_BYTES_MAX_DEFAULT      (256u * 1024u * 1024u)
#define WSD_HANDSHAKE_TIMEOUT_MS        5000u
/* Connections one uid may hold on both sockets together; the default is no tighter than the
 * total, so only a configured value makes it bite. */
#define WSD_CONNECTIONS_PER_UID_DEFAULT WSD_CONNECTIONS_MAX_DEFAULT
/* Admin connections accepted beyond the total limit, so an operator can still look at a daemon
 * that workers have filled up. */
#define WSD_ADMIN_RESERVE_CONNS         16u
/* Connections over a limit kept just long enough to answer their HELLO with Error{WSD_ELIMIT};
 * beyond this many at once they are closed unanswered. */
#define WSD_REFUSING_CONNS_MAX          64u
/* Smallest --max-frame: a HELLO and an OPEN with a full model name must still fit. */
#define WSD_REQUEST_MIN                 512u
/* Descriptors queued for sending on one connection (each queued OpenReply holds a duplicate of
 * a model fd). Reading stops at half of it; past it the peer is dropped like an over-full queue,
 * so one peer that never reads cannot take the daemon's RLIMIT_NOFILE. */
#define WSD_OUTQ_FDS_MAX                256u
/* Idle timeout default: off (0). A worker holding leases is never idle-closed anyway. */
#define WSD_IDLE_TIMEOUT_MS_DEFAULT     0u
/* Bounds of the sweep that enforces the timeouts (one timer for all connections). */
#define WSD_SWEEP_MIN_MS                50u
#define WSD_SWEEP_MAX_MS                1000u

/* The most JSON text one page of info's tensor list may take (InfoRequest.tensor_limit > 0): a
 * page of short names is tensor_limit long, one of 4096-byte names stops earlier, and no page
 * holds the event loop for more than a few tens of milliseconds. */
#define WSD_INFO_PAGE_BYTES (8u * 1024u * 1024u)

/* Names and paths the daemon accepts in requests. */
#define WSD_MODEL_NAME_MAX 128u
#define WSD_PATH_MAX       4096u

#endif /* WSD_LIMITS_H */
