/*
 * wire.c - frame header, reassembly with descriptor bookkeeping, protobuf pack/unpack under a
 * memory cap, and the blocking send/receive loops the client uses. The daemon drives the same
 * reader from its poll callbacks.
 */
#include "wire.h"

#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "fault.h"
#include "fdpass.h"

static void put_le32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static void put_le16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static uint32_t get_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint16_t get_le16(const uint8_t *p)
{
    return (uint16_t)(p[0] | p[1] << 8);
}

void wire_reader_init(wire_reader_t *r, size_t max_frame)
{
    memset(r, 0, sizeof(*r));
    r->max_frame = max_frame < WSD_FRAME_MAX ? max_frame : WSD_FRAME_MAX;
}

void wire_reader_done(wire_reader_t *r)
{
    free(r->buf);
    r->buf = NULL;
    r->len = r->cap = 0;
    fdpass_close_all(r->fds, r->nfds);
    r->nfds = 0;
}

/* Makes room for \p want bytes in total; the buffer grows only up to one maximal frame. */
static int reader_reserve(wire_reader_t *r, size_t want)
{
    size_t cap;
    uint8_t *p;

    if (want <= r->cap)
        return 0;
    cap = r->cap ? r->cap : 4096;
    while (cap < want)
        cap *= 2;
    if (cap > r->max_frame + WSD_FRAME_HEADER_SIZE)
        cap = r->max_frame + WSD_FRAME_HEADER_SIZE;
    if (cap < want)
        return -EMSGSIZE;
    p = realloc(r->buf, cap);
    if (!p)
        return -ENOMEM;
    r->buf = p;
    r->cap = cap;
    return 0;
}

int wire_reader_fill(wire_reader_t *r, int sock)
{
    size_t want = WSD_FRAME_HEADER_SIZE;
    size_t nfds = 0;
    int fds[WSD_FDS_PENDING_MAX];
    ssize_t n;
    int k;

    /* Read at most up to the end of the current frame when its length is known, so a frame's
     * descriptors are never confused with the next frame's. */
    if (r->len >= WSD_FRAME_HEADER_SIZE) {
        uint32_t plen = get_le32(r->buf);

        if (plen > r->max_frame)
            return -EMSGSIZE;
        want = WSD_FRAME_HEADER_SIZE + plen;
    }
    if (want <= r->len)
        return -EINVAL; /* caller must drain frames with wire_reader_next() first */
    /* One read takes up to 64 KiB when the limit allows, so small frames need few calls. */
    k = reader_reserve(r, want > 65536 ? want : r->max_frame + WSD_FRAME_HEADER_SIZE < 65536
                                                  ? r->max_frame + WSD_FRAME_HEADER_SIZE
                                                  : 65536);
    if (k < 0 && k != -EMSGSIZE)
        return k;
    if (r->cap < want)
        return -EMSGSIZE;
    n = fdpass_recv(sock, r->buf + r->len, want - r->len, fds, WSD_FDS_PENDING_MAX - r->nfds,
                    &nfds);
    if (n < 0)
        return (int)n;
    memcpy(r->fds + r->nfds, fds, nfds * sizeof(int));
    r->nfds += nfds;
    r->len += (size_t)n;
    return (int)n;
}

int wire_reader_next(wire_reader_t *r, wire_frame_t *ret)
{
    uint32_t plen;
    uint16_t nfds, reserved;
    size_t total;
    int k;

    if (r->len < WSD_FRAME_HEADER_SIZE)
        return 0;
    plen = get_le32(r->buf);
    nfds = get_le16(r->buf + 4);
    reserved = get_le16(r->buf + 6);
    if (plen > r->max_frame)
        return -EMSGSIZE;
    if (reserved != 0 || nfds > WSD_FDS_PER_FRAME_MAX || plen == 0)
        return -EBADMSG;
    total = WSD_FRAME_HEADER_SIZE + (size_t)plen;
    if (r->len < total)
        return 0;
    /* All of a frame's descriptors were attached to its first byte, so by its last byte they
     * are here. Fewer means the peer lied in the header. */
    if (r->nfds < nfds)
        return -EBADMSG;
    memset(ret, 0, sizeof(*ret));
    k = wire_decode(r->buf + WSD_FRAME_HEADER_SIZE, plen,
                    (size_t)plen * WSD_UNPACK_MEM_PER_BYTE + WSD_UNPACK_MEM_MIN, &ret->msg);
    if (k < 0)
        return k;
    memcpy(ret->fds, r->fds, nfds * sizeof(int));
    ret->nfds = nfds;
    memmove(r->fds, r->fds + nfds, (r->nfds - nfds) * sizeof(int));
    r->nfds -= nfds;
    memmove(r->buf, r->buf + total, r->len - total);
    r->len -= total;
    return 1;
}

void wire_reader_compact(wire_reader_t *r)
{
    if (r->len == 0 && r->buf) {
        free(r->buf);
        r->buf = NULL;
        r->cap = 0;
    }
}

void wire_frame_done(wire_frame_t *f)
{
    fdpass_close_all(f->fds, f->nfds);
    f->nfds = 0;
    wire_msg_free(f->msg);
    f->msg = NULL;
}

int wire_encode(const wire_msg_t *msg, size_t nfds, uint8_t **ret_buf, size_t *ret_len)
{
    size_t plen = weightsd__v1__frame__get_packed_size(msg);
    uint8_t *buf;

    if (plen == 0 || plen > WSD_FRAME_MAX || nfds > WSD_FDS_PER_FRAME_MAX)
        return -EMSGSIZE;
    buf = malloc(WSD_FRAME_HEADER_SIZE + plen);
    if (!buf)
        return -ENOMEM;
    put_le32(buf, (uint32_t)plen);
    put_le16(buf + 4, (uint16_t)nfds);
    put_le16(buf + 6, 0);
    (void)weightsd__v1__frame__pack(msg, buf + WSD_FRAME_HEADER_SIZE);
    *ret_buf = buf;
    *ret_len = WSD_FRAME_HEADER_SIZE + plen;
    return 0;
}

/* Counting allocator: each block is prefixed with its size so free() can give it back. */
typedef struct count_alloc {
    size_t used;
    size_t cap;
    bool oom;    /* malloc failed: the frame may be fine, the host is out of memory */
} count_alloc_t;

typedef union block_head {
    size_t size;
    max_align_t align;
} block_head_t;

static void *count_alloc_cb(void *data, size_t size)
{
    count_alloc_t *ca = data;
    block_head_t *h;

    if (size > ca->cap || ca->used > ca->cap - size || FAULT("wire.alloc"))
        return NULL;
    h = malloc(sizeof(*h) + size);
    if (!h) {
        ca->oom = true;
        return NULL;
    }
    h->size = size;
    ca->used += size;
    return h + 1;
}

static void count_free_cb(void *data, void *ptr)
{
    count_alloc_t *ca = data;
    block_head_t *h;

    if (!ptr)
        return;
    h = (block_head_t *)ptr - 1;
    ca->used -= h->size;
    free(h);
}

/* Freeing needs no counter (the cap only matters while unpacking), so messages are freed later
 * through a static allocator that knows the block prefix. */
static void plain_free_cb(void *data, void *ptr)
{
    if (ptr)
        free((block_head_t *)ptr - 1);
}

static void *plain_alloc_cb(void *data, size_t size)
{
    block_head_t *h = malloc(sizeof(*h) + size);

    if (!h)
        return NULL;
    h->size = size;
    return h + 1;
}

static ProtobufCAllocator wire_free_allocator = {
    .alloc = plain_alloc_cb, .free = plain_free_cb, .allocator_data = NULL};

int wire_decode(const uint8_t *payload, size_t len, size_t mem_cap, wire_msg_t **ret)
{
    count_alloc_t ca = {.used = 0, .cap = mem_cap};
    ProtobufCAllocator alloc = {
        .alloc = count_alloc_cb, .free = count_free_cb, .allocator_data = &ca};
    wire_msg_t *msg;

    msg = weightsd__v1__frame__unpack(&alloc, len, payload);
    if (!msg)
        return ca.oom ? -ENOMEM : -EBADMSG;
    *ret = msg;
    return 0;
}

void wire_msg_free(wire_msg_t *msg)
{
    if (msg)
        weightsd__v1__frame__free_unpacked(msg, &wire_free_allocator);
}

int wire_send_all(int sock, const uint8_t *buf, size_t len, const int *fds, size_t nfds)
{
    size_t off = 0;

    while (off < len) {
        ssize_t n = fdpass_send(sock, buf + off, len - off, off == 0 ? fds : NULL,
                                off == 0 ? nfds : 0);

        if (n == -EAGAIN) {
            struct pollfd p = {.fd = sock, .events = POLLOUT};

            (void)poll(&p, 1, 1000);
            continue;
        }
        if (n < 0)
            return (int)n;
        off += (size_t)n;
    }
    return 0;
}

static int64_t now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int wire_recv_frame(wire_reader_t *r, int sock, int timeout_ms, wire_frame_t *ret)
{
    int64_t deadline = timeout_ms > 0 ? now_ms() + timeout_ms : 0;

    for (;;) {
        struct pollfd p = {.fd = sock, .events = POLLIN};
        int k = wire_reader_next(r, ret);
        int wait;

        if (k != 0)
            return k;
        wait = -1;
        if (deadline) {
            int64_t left = deadline - now_ms();

            if (left <= 0)
                return -ETIMEDOUT;
            wait = (int)left;
        }
        k = poll(&p, 1, wait);
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0)
            return -errno;
        if (k == 0)
            return -ETIMEDOUT;
        k = wire_reader_fill(r, sock);
        if (k == 0)
            return -ECONNRESET;
        if (k == -EAGAIN)
            continue;
        if (k < 0)
            return k;
    }
}
