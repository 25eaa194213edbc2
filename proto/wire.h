/*
 * wire.h - framing of weightsd messages on a Unix stream socket, shared by daemon and client.
 *
 * A frame is an 8-byte header (u32 payload length, u16 number of attached fds, u16 zero; all
 * little-endian) followed by a protobuf-encoded weightsd.v1.Frame. The fds a frame carries are
 * attached (SCM_RIGHTS) to the sendmsg() that sends the frame's first byte, so they arrive no
 * later than the frame's last byte. See PROTOCOL.md.
 */
#ifndef WSD_WIRE_H
#define WSD_WIRE_H

#include <stddef.h>
#include <stdint.h>

#include "wsd_limits.h"
#include "weightsd.pb-c.h"

typedef Weightsd__V1__Frame wire_msg_t;

/* protobuf-c declares string fields char * even when only read while packing; this is the one
 * place that drops const for it. */
static inline char *wire_str(const char *s)
{
    return (char *)(uintptr_t)s;
}

/* Incoming byte stream of one connection: buffered bytes plus descriptors not yet claimed. */
typedef struct wire_reader {
    uint8_t *buf;     /* buffered bytes, [0, len) valid */
    size_t len;       /* bytes in buf */
    size_t cap;       /* allocated size of buf, never above max_frame + header */
    size_t max_frame; /* largest payload accepted from this peer */
    int fds[WSD_FDS_PENDING_MAX]; /* received, unclaimed descriptors (owned) */
    size_t nfds;                  /* valid entries of fds */
} wire_reader_t;

/* One decoded frame; the caller owns msg (wire_msg_free) and fds (close them). */
typedef struct wire_frame {
    wire_msg_t *msg;
    int fds[WSD_FDS_PER_FRAME_MAX];
    size_t nfds;
} wire_frame_t;

void wire_reader_init(wire_reader_t *r, size_t max_frame);
/* Frees the buffer and closes unclaimed descriptors. */
void wire_reader_done(wire_reader_t *r);

/*
 * One recvmsg() from \p sock into the reader.
 * \retval bytes read (> 0), 0 at end of stream, -EAGAIN, -EBADMSG (fd abuse: the peer must be
 *         dropped), or -errno.
 */
int wire_reader_fill(wire_reader_t *r, int sock);

/*
 * Extracts the next complete frame.
 * \retval 1 and *ret filled, 0 when more bytes are needed, or < 0 when the peer broke the
 *         protocol (-EMSGSIZE oversized, -EBADMSG bad header/fd count/undecodable payload),
 *         or -ENOMEM when decoding ran out of memory (no fault of the peer's).
 *         After an error the reader is unusable; drop the peer.
 */
int wire_reader_next(wire_reader_t *r, wire_frame_t *ret);

/* Frees the buffer if it holds no bytes (an idle connection then costs no buffer memory). */
void wire_reader_compact(wire_reader_t *r);

/* Closes the frame's fds and frees its message. */
void wire_frame_done(wire_frame_t *f);

/*
 * Encodes \p msg with its header into a malloc'ed buffer (*ret_buf, *ret_len).
 * \retval 0, -EMSGSIZE (payload above WSD_FRAME_MAX), -ENOMEM.
 */
int wire_encode(const wire_msg_t *msg, size_t nfds, uint8_t **ret_buf, size_t *ret_len);

/*
 * Decodes a payload into one arena capped at \p mem_cap bytes (STYLE M6); wire_msg_free()
 * frees it whole, so parts of a message cannot outlive it.
 * \retval 0 and *ret, -EBADMSG (malformed, or over the cap), or -ENOMEM (malloc failed).
 */
int wire_decode(const uint8_t *payload, size_t len, size_t mem_cap, wire_msg_t **ret);
void wire_msg_free(wire_msg_t *msg);

/*
 * Blocking helpers for the client library: send a whole buffer (fds with the first byte), and
 * wait up to \p timeout_ms (0 = forever) for the next frame.
 * \retval 0 / 1 (frame) or < 0: -ETIMEDOUT, -ECONNRESET (EOF), -EBADMSG, -errno.
 */
int wire_send_all(int sock, const uint8_t *buf, size_t len, const int *fds, size_t nfds);
int wire_recv_frame(wire_reader_t *r, int sock, int timeout_ms, wire_frame_t *ret);

#endif /* WSD_WIRE_H */
