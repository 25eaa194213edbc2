/*
 * fuzz-open.c - libweightsd's wsd_open() under an arbitrary daemon reply. The input is the
 * payload of the frame that answers the open (request id 1), sent on a real socketpair with a
 * real sealed memfd as its fd, followed by a well-formed ReleaseReply (id 2) so the release a
 * model free sends is answered. Whatever the reply says, the client must either refuse it or
 * hand out a model whose every tensor lies inside the mapping: each one's first and furthest
 * byte is read, and each is exported through DLPack and freed. Defence in depth: the daemon
 * validates what it sends (fuzz-conn covers that side), the client must not trust it.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "../../client/client.h"
#include "dlpack/dlpack.h"
#include "fdpass.h"
#include "weightsd.h"
#include "wire.h"

/* The memfd's size: the manifest's map_size when it is small, else this (a mismatch the
 * client must catch). */
#define MEMFD_MAX (1u << 20)

static void check(int ok, const char *what)
{
    if (!ok) {
        fprintf(stderr, "fuzz-open: %s\n", what);
        abort();
    }
}

/* A sealed memfd of \p size bytes with a pattern, as the daemon sends. */
static int sealed_memfd(size_t size)
{
    int fd = memfd_create("fuzz-open", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    uint8_t buf[4096];

    check(fd >= 0, "memfd_create");
    for (size_t i = 0; i < sizeof(buf); i++)
        buf[i] = (uint8_t)(i * 31 + 7);
    check(ftruncate(fd, (off_t)size) == 0, "ftruncate");
    for (size_t off = 0; off < size; off += sizeof(buf))
        check(pwrite(fd, buf, size - off < sizeof(buf) ? size - off : sizeof(buf),
                     (off_t)off) >= 0,
              "pwrite");
    check(fcntl(fd, F_ADD_SEALS, F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE) == 0,
          "seals");
    return fd;
}

/* map_size of the reply's manifest, if the input decodes as an OpenReply; else 4096. */
static size_t memfd_size(const uint8_t *data, size_t size)
{
    wire_msg_t *msg = NULL;
    size_t n = 4096;

    if (wire_decode(data, size, WSD_REPLY_MAX, &msg) == 0) {
        if (msg->body_case == WEIGHTSD__V1__FRAME__BODY_OPEN_REPLY && msg->open_reply->manifest &&
            msg->open_reply->manifest->map_size > 0)
            n = msg->open_reply->manifest->map_size < MEMFD_MAX
                    ? (size_t)msg->open_reply->manifest->map_size
                    : MEMFD_MAX;
        wire_msg_free(msg);
    }
    return n;
}

/* The byte furthest from element 0 of a non-empty view, relative to its data pointer. */
static uint64_t furthest_byte(const wsd_tensor_t *t)
{
    unsigned bits = wsd_dtype_bits(wsd_tensor_dtype(t));
    unsigned __int128 last = 0;

    for (unsigned d = 0; d < wsd_tensor_ndim(t); d++) {
        if (wsd_tensor_shape(t)[d] == 0)
            return UINT64_MAX; /* empty: nothing to read */
        last += (unsigned __int128)(wsd_tensor_shape(t)[d] - 1) *
                (unsigned __int128)wsd_tensor_strides(t)[d];
    }
    last = (last + 1) * bits;
    last = last / 8 + (last % 8 != 0) - 1;
    check(last < UINT64_MAX, "extent beyond 64 bits accepted");
    return (uint64_t)last;
}

static void touch(const wsd_model_t *m)
{
    volatile uint8_t sink = 0;

    for (size_t i = 0; i < wsd_model_tensor_count(m); i++) {
        const wsd_tensor_t *t = wsd_model_tensor(m, i);
        const uint8_t *p = wsd_tensor_data(t);
        uint64_t last = furthest_byte(t);
        DLManagedTensor *dl = NULL;

        check(t != NULL && wsd_model_find(m, wsd_tensor_name(t)) != NULL, "tensor lookup");
        if (last != UINT64_MAX) {
            sink ^= p[0];
            sink ^= p[last]; /* outside the mapping: SIGSEGV, which the fuzzer reports */
        }
        if (wsd_tensor_dlpack(m, i, NULL, NULL, &dl) == 0) {
            check(dl != NULL && dl->deleter != NULL, "DLPack export without a deleter");
            wsd_dlpack_free(dl);
        }
    }
    /* Each storage as its bytes: exactly the storage, readable at both ends. */
    for (size_t i = 0; i <= wsd_model_storage_count(m); i++) {
        DLManagedTensor *dl = NULL;
        void *data = NULL;
        uint64_t nbytes = 0;
        int r = wsd_storage_dlpack(m, i, NULL, NULL, &dl);

        if (i == wsd_model_storage_count(m)) {
            check(r == -EINVAL && dl == NULL, "DLPack export of a storage that does not exist");
            break;
        }
        if (r == -ENOMEM)
            continue;
        check(r == 0 && dl != NULL && wsd_model_storage(m, i, &data, &nbytes) == 0,
              "DLPack export of a storage failed");
        check(dl->dl_tensor.data == data && dl->dl_tensor.ndim == 1 &&
                  dl->dl_tensor.shape[0] == (int64_t)nbytes && dl->dl_tensor.strides[0] == 1 &&
                  dl->dl_tensor.dtype.code == kDLUInt && dl->dl_tensor.dtype.bits == 8,
              "storage DLPack tensor is not the storage's bytes");
        if (nbytes) {
            sink ^= ((const uint8_t *)data)[0];
            sink ^= ((const uint8_t *)data)[nbytes - 1];
        }
        wsd_dlpack_free(dl);
    }
    (void)sink;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    Weightsd__V1__Frame rel = WEIGHTSD__V1__FRAME__INIT;
    Weightsd__V1__ReleaseReply rr = WEIGHTSD__V1__RELEASE_REPLY__INIT;
    uint8_t hdr[WSD_FRAME_HEADER_SIZE], *relbuf = NULL, *frame;
    size_t rellen = 0;
    wsd_client_t *c;
    wsd_model_t *m = NULL;
    int sv[2], fd, r;
    uint32_t len = (uint32_t)size;
    uint16_t one = 1, zero = 0;

    if (size > (1u << 16)) /* the socket buffer holds the whole reply: no reader thread */
        return 0;
    check(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0, "socketpair");
    fd = sealed_memfd(memfd_size(data, size));
    memcpy(hdr, &len, 4);
    memcpy(hdr + 4, &one, 2);
    memcpy(hdr + 6, &zero, 2);
    frame = malloc(sizeof(hdr) + size + 1);
    check(frame != NULL, "malloc");
    memcpy(frame, hdr, sizeof(hdr));
    memcpy(frame + sizeof(hdr), data, size);
    check(wire_send_all(sv[1], frame, sizeof(hdr) + size, &fd, 1) == 0, "send reply");
    free(frame);
    close(fd);
    rel.id = 2;
    rel.body_case = WEIGHTSD__V1__FRAME__BODY_RELEASE_REPLY;
    rel.release_reply = &rr;
    check(wire_encode(&rel, 0, &relbuf, &rellen) == 0, "encode release reply");
    check(wire_send_all(sv[1], relbuf, rellen, NULL, 0) == 0, "send release reply");
    free(relbuf);

    c = wsd__client_new();
    check(c != NULL, "client");
    wsd__client_adopt_fd(c, sv[0]);
    (void)wsd_set_timeout(c, 1000);
    r = wsd_open(c, "m", NULL, 0, &m);
    if (r == 0) {
        check(m != NULL, "success without a model");
        touch(m);
        wsd_model_free(m);
    } else
        check(m == NULL && wsd_last_error(c) != NULL, "failure with a model");
    wsd_close(c);
    close(sv[1]);
    return 0;
}
