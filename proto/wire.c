/*
 * wire.c - frame header, reassembly with descriptor bookkeeping, protobuf pack/unpack under a
 * memory cap, and the blocking send/receive loops the client uses. The daemon drives the same
 * reader from its poll callbacks.
 */
#include "wire.h"

#include <errno.h>
#include <stdalign.h>
#include <stddef.h>
#include <stdint.h>
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

/*
 * Unpacking is arena allocation: a manifest of 10^5 tensors is some 4 * 10^5 small objects, and
 * malloc and free for each were a quarter of a C attach (perf). Every object of one message
 * comes from a chain of blocks, each twice the last; protobuf-c's frees are ignored (it frees
 * only its scan slabs, and everything on a failed unpack); wire_msg_free() drops the chain.
 *
 * The cap (STYLE M6) counts every byte handed out, freed or not, so it is a little stricter
 * than a malloc count: the scan slabs, 32 bytes per field, stay counted. A real manifest packs
 * to about 3 bytes of objects per byte against WSD_UNPACK_MEM_PER_BYTE's 16.
 *
 * wire_msg_free() gets only the message, so the arena's header sits just before the first
 * object of the first block, and the first object protobuf-c asks for is the Frame itself
 * (protobuf_c_message_unpack allocates the message before anything in it). wire_decode()
 * checks that it was, and refuses the frame if a protobuf-c ever does otherwise.
 */
#define ARENA_ALIGN       alignof(max_align_t)
#define ARENA_FIRST_BLOCK 4096u

typedef struct arena_block {
    struct arena_block *next;
    size_t size, used; /* bytes of data after the (aligned) header */
} arena_block_t;

typedef struct unpack_arena {
    arena_block_t *blocks; /* newest first; the last one holds this header */
    void *first;           /* the first object handed out */
    size_t used, cap;      /* bytes handed out, against the cap */
    size_t next_size;      /* data size of the next block */
    bool oom;              /* malloc failed: the frame may be fine, the host is out of memory */
} unpack_arena_t;

#define ALIGN_UP(n, a)     (((n) + (a) - 1) & ~((size_t)(a) - 1))
#define BLOCK_HEAD         ALIGN_UP(sizeof(arena_block_t), ARENA_ALIGN)
#define ARENA_HEAD         ALIGN_UP(sizeof(unpack_arena_t), ARENA_ALIGN)
#define BLOCK_DATA(b)      ((uint8_t *)(b) + BLOCK_HEAD)

static void arena_free(unpack_arena_t *a)
{
    arena_block_t *b = a->blocks;

    /* The header lives in the last block: read it all before freeing that one. */
    while (b) {
        arena_block_t *next = b->next;

        free(b);
        b = next;
    }
}

static void *arena_alloc_cb(void *data, size_t size)
{
    unpack_arena_t *a = data;
    arena_block_t *b = a->blocks;
    size_t need = ALIGN_UP(size ? size : 1, ARENA_ALIGN);
    void *p;

    if (size > a->cap || a->used > a->cap - size || need < size || FAULT("wire.alloc"))
        return NULL;
    if (!b || b->size - b->used < need) {
        size_t dsize = a->next_size > need ? a->next_size : need;

        if (dsize > SIZE_MAX - BLOCK_HEAD || !(b = malloc(BLOCK_HEAD + dsize))) {
            a->oom = true;
            return NULL;
        }
        b->size = dsize;
        b->used = 0;
        b->next = a->blocks;
        a->blocks = b;
        if (a->next_size <= SIZE_MAX / 2)
            a->next_size *= 2;
    }
    p = BLOCK_DATA(b) + b->used;
    b->used += need;
    a->used += size;
    if (!a->first)
        a->first = p;
    return p;
}

static void arena_free_cb(void *data, void *ptr)
{
    (void)data;
    (void)ptr; /* everything goes with the arena */
}

int wire_decode(const uint8_t *payload, size_t len, size_t mem_cap, wire_msg_t **ret)
{
    unpack_arena_t a = {.cap = mem_cap, .next_size = ARENA_FIRST_BLOCK};
    ProtobufCAllocator alloc = {
        .alloc = arena_alloc_cb, .free = arena_free_cb, .allocator_data = &a};
    arena_block_t *first;
    wire_msg_t *msg;

    /* The first block carries the arena's header, ahead of the Frame (see above). */
    first = malloc(BLOCK_HEAD + ARENA_HEAD + ARENA_FIRST_BLOCK);
    if (!first)
        return -ENOMEM;
    *first = (arena_block_t){.size = ARENA_HEAD + ARENA_FIRST_BLOCK, .used = ARENA_HEAD};
    a.blocks = first;
    msg = weightsd__v1__frame__unpack(&alloc, len, payload);
    if (!msg || (void *)msg != BLOCK_DATA(first) + ARENA_HEAD || a.first != msg) {
        bool oom = a.oom;

        arena_free(&a);
        return msg || !oom ? -EBADMSG : -ENOMEM;
    }
    memcpy(BLOCK_DATA(first), &a, sizeof(a));
    *ret = msg;
    return 0;
}

void wire_msg_free(wire_msg_t *msg)
{
    unpack_arena_t a;

    if (!msg)
        return;
    memcpy(&a, (uint8_t *)msg - ARENA_HEAD, sizeof(a));
    arena_free(&a);
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
