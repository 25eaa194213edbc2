/*
 * limits.h - every hard limit of the wire protocol and the daemon's resources, in one place
 * (STYLE M2). Defaults here; the daemon may lower (never raise past the _MAX values) some of
 * them from its command line.
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

/* Names and paths the daemon accepts in requests. */
#define WSD_MODEL_NAME_MAX 128u
#define WSD_PATH_MAX       4096u

#endif /* WSD_LIMITS_H */
