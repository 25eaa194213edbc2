/*
 * test-wire.c - framing and fd passing (proto/wire.c, proto/fdpass.c) on real socketpairs,
 * plus the hand-assembled OpenReply checked against protobuf-c's own packing.
 */
#include "test.h"

#include <errno.h>
#include <stdalign.h>
#include <stddef.h>
#include <fcntl.h>
#include <stdbool.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "fault.h"
#include "fdpass.h"
#include "manifest_pb.h"
#include "wire.h"

static void pair(int sv[2])
{
    ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv), 0);
}

static int open_fds(void)
{
    int n = 0;

    for (int fd = 0; fd < 1024; fd++)
        n += fcntl(fd, F_GETFD) >= 0;
    return n;
}

static void encode_hello(uint64_t id, uint8_t **buf, size_t *len)
{
    Weightsd__V1__Frame f = WEIGHTSD__V1__FRAME__INIT;
    Weightsd__V1__Hello h = WEIGHTSD__V1__HELLO__INIT;

    h.protocol = 1;
    h.client = wire_str("test");
    f.id = id;
    f.body_case = WEIGHTSD__V1__FRAME__BODY_HELLO;
    f.hello = &h;
    ASSERT_EQ(wire_encode(&f, 0, buf, len), 0);
}

TEST(frame_roundtrip_byte_by_byte)
{
    int sv[2];
    uint8_t *buf;
    size_t len;
    wire_reader_t r;
    wire_frame_t f;
    int got = 0;

    pair(sv);
    encode_hello(42, &buf, &len);
    wire_reader_init(&r, WSD_REQUEST_MAX);
    /* Every split point: the reader must reassemble one byte at a time. */
    for (size_t i = 0; i < len; i++) {
        ASSERT_EQ(write(sv[0], buf + i, 1), 1);
        ASSERT_EQ(wire_reader_fill(&r, sv[1]), 1);
        int k = wire_reader_next(&r, &f);

        ASSERT(k >= 0);
        if (k == 1) {
            ASSERT_EQ(i, len - 1);
            ASSERT_UINT_EQ(f.msg->id, 42);
            ASSERT_EQ(f.msg->body_case, WEIGHTSD__V1__FRAME__BODY_HELLO);
            ASSERT_STR_EQ(f.msg->hello->client, "test");
            wire_frame_done(&f);
            got = 1;
        }
    }
    ASSERT_EQ(got, 1);
    free(buf);
    wire_reader_done(&r);
    close(sv[0]);
    close(sv[1]);
}

TEST(two_frames_in_one_write)
{
    int sv[2];
    uint8_t *a, *b, both[256];
    size_t la, lb;
    wire_reader_t r;
    wire_frame_t f;

    pair(sv);
    encode_hello(1, &a, &la);
    encode_hello(2, &b, &lb);
    memcpy(both, a, la);
    memcpy(both + la, b, lb);
    ASSERT_EQ(write(sv[0], both, la + lb), (ssize_t)(la + lb));
    wire_reader_init(&r, WSD_REQUEST_MAX);
    for (uint64_t want = 1; want <= 2; want++) {
        ASSERT_EQ(wire_recv_frame(&r, sv[1], 1000, &f), 1);
        ASSERT_UINT_EQ(f.msg->id, want);
        wire_frame_done(&f);
    }
    ASSERT_EQ(wire_recv_frame(&r, sv[1], 50, &f), -ETIMEDOUT);
    free(a);
    free(b);
    wire_reader_done(&r);
    close(sv[0]);
    close(sv[1]);
}

TEST(oversized_and_bad_headers_rejected)
{
    static const struct {
        uint8_t hdr[8];
        int expect;
    } cases[] = {
        {{0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0}, -EMSGSIZE}, /* 2 GiB payload */
        {{0x01, 0x00, 0x01, 0x00, 0, 0, 0, 0}, -EMSGSIZE}, /* just over 64 KiB */
        {{0x02, 0, 0, 0, 0, 0, 1, 0}, -EBADMSG},           /* reserved bits */
        {{0x02, 0, 0, 0, 99, 0, 0, 0}, -EBADMSG},          /* fd count over the limit */
        {{0x00, 0, 0, 0, 0, 0, 0, 0}, -EBADMSG},           /* empty payload */
    };

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        wire_reader_t r;
        wire_frame_t f;
        int sv[2];
        int k;

        pair(sv);
        wire_reader_init(&r, WSD_REQUEST_MAX);
        ASSERT_EQ(write(sv[0], cases[i].hdr, 8), 8);
        ASSERT_EQ(write(sv[0], "\x08\x01", 2), 2);
        k = wire_reader_fill(&r, sv[1]);
        if (k > 0)
            k = wire_reader_next(&r, &f);
        ASSERT_EQ(k, cases[i].expect);
        wire_reader_done(&r);
        close(sv[0]);
        close(sv[1]);
    }
}

TEST(garbage_payload_rejected)
{
    uint8_t frame[8 + 6] = {6, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    wire_reader_t r;
    wire_frame_t f;
    int sv[2];

    pair(sv);
    wire_reader_init(&r, WSD_REQUEST_MAX);
    ASSERT_EQ(write(sv[0], frame, sizeof(frame)), (ssize_t)sizeof(frame));
    ASSERT_EQ(wire_recv_frame(&r, sv[1], 1000, &f), -EBADMSG);
    wire_reader_done(&r);
    close(sv[0]);
    close(sv[1]);
}

TEST(fd_travels_with_its_frame)
{
    int sv[2], p[2];
    uint8_t *buf;
    size_t len;
    wire_reader_t r;
    wire_frame_t f;
    Weightsd__V1__Frame m = WEIGHTSD__V1__FRAME__INIT;
    char c = 0;

    pair(sv);
    ASSERT_EQ(pipe2(p, O_CLOEXEC), 0);
    m.id = 9;
    ASSERT_EQ(wire_encode(&m, 1, &buf, &len), 0);
    ASSERT_EQ(wire_send_all(sv[0], buf, len, &p[0], 1), 0);
    wire_reader_init(&r, WSD_REPLY_MAX);
    ASSERT_EQ(wire_recv_frame(&r, sv[1], 1000, &f), 1);
    ASSERT_EQ(f.nfds, 1);
    ASSERT_NE(f.fds[0], p[0]);
    ASSERT(fcntl(f.fds[0], F_GETFD) & FD_CLOEXEC);
    ASSERT_EQ(write(p[1], "x", 1), 1);
    ASSERT_EQ(read(f.fds[0], &c, 1), 1);
    ASSERT_EQ(c, 'x');
    wire_frame_done(&f);
    free(buf);
    wire_reader_done(&r);
    close(p[0]);
    close(p[1]);
    close(sv[0]);
    close(sv[1]);
}

TEST(header_lying_about_fds_rejected)
{
    int sv[2];
    uint8_t *buf;
    size_t len;
    wire_reader_t r;
    wire_frame_t f;
    Weightsd__V1__Frame m = WEIGHTSD__V1__FRAME__INIT;

    pair(sv);
    m.id = 3;
    ASSERT_EQ(wire_encode(&m, 2, &buf, &len), 0); /* announces 2, sends none */
    ASSERT_EQ(wire_send_all(sv[0], buf, len, NULL, 0), 0);
    wire_reader_init(&r, WSD_REPLY_MAX);
    ASSERT_EQ(wire_recv_frame(&r, sv[1], 1000, &f), -EBADMSG);
    free(buf);
    wire_reader_done(&r);
    close(sv[0]);
    close(sv[1]);
}

TEST(too_many_fds_all_closed)
{
    int sv[2], fds[12], got[16];
    size_t n = 99;
    char byte = 'a', rbuf[4];
    int before;

    pair(sv);
    for (int i = 0; i < 12; i++)
        fds[i] = open("/dev/null", O_RDONLY | O_CLOEXEC);
    ASSERT_EQ(fdpass_send(sv[0], &byte, 1, fds, 12), 1);
    before = open_fds();
    ASSERT_EQ(fdpass_recv(sv[1], rbuf, sizeof(rbuf), got, 4, &n), -EBADMSG);
    ASSERT_EQ(n, 0);
    /* Nothing the peer sent stays open in our process. */
    ASSERT_EQ(open_fds(), before);
    for (int i = 0; i < 12; i++)
        close(fds[i]);
    close(sv[0]);
    close(sv[1]);
}

TEST(unpack_memory_is_capped)
{
    Weightsd__V1__Frame f = WEIGHTSD__V1__FRAME__INIT;
    Weightsd__V1__OpenRequest o = WEIGHTSD__V1__OPEN_REQUEST__INIT;
    char name[4000];
    uint8_t *buf;
    size_t len;
    wire_msg_t *msg;

    memset(name, 'a', sizeof(name) - 1);
    name[sizeof(name) - 1] = '\0';
    o.model = name;
    f.body_case = WEIGHTSD__V1__FRAME__BODY_OPEN;
    f.open = &o;
    ASSERT_EQ(wire_encode(&f, 0, &buf, &len), 0);
    ASSERT_EQ(wire_decode(buf + 8, len - 8, 1024, &msg), -EBADMSG);
    ASSERT_EQ(wire_decode(buf + 8, len - 8, 64 * 1024, &msg), 0);
    ASSERT_STR_EQ(msg->open->model, name);
    wire_msg_free(msg);
    free(buf);
}

/* The open path skips protobuf-c; its bytes must be exactly what protobuf-c would write. */
TEST(open_reply_matches_protobuf_c)
{
    static const uint64_t ids[] = {0, 1, 127, 128, 1ull << 40};
    static const uint64_t leases[] = {0, 5, 300, 1ull << 33};
    manifest_t *m = manifest_new();
    mf_tensor_t t = {.name = wire_str("w"), .dtype = WSD_DTYPE_F32, .ndim = 2,
                     .shape = {2, 3}, .stride = {3, 1}};
    uint8_t *mpb;
    size_t mlen;

    ASSERT_EQ(manifest_add_storage(m, "w", 0, 8, 24, WSD_DTYPE_F32, NULL), 0);
    ASSERT_EQ(manifest_add_tensor(m, &t), 0);
    ASSERT_EQ(manifest_pb_encode(m, 64, "abc", &mpb, &mlen), 0);
    for (size_t i = 0; i < sizeof(ids) / sizeof(ids[0]); i++)
        for (size_t j = 0; j < sizeof(leases) / sizeof(leases[0]); j++) {
            Weightsd__V1__Frame f = WEIGHTSD__V1__FRAME__INIT;
            Weightsd__V1__OpenReply o = WEIGHTSD__V1__OPEN_REPLY__INIT;
            Weightsd__V1__Manifest *pm = weightsd__v1__manifest__unpack(NULL, mlen, mpb);
            uint8_t *a, *b;
            size_t la, lb;

            ASSERT(pm);
            o.lease = leases[j];
            o.manifest = pm;
            f.id = ids[i];
            f.body_case = WEIGHTSD__V1__FRAME__BODY_OPEN_REPLY;
            f.open_reply = &o;
            ASSERT_EQ(wire_encode(&f, 1, &a, &la), 0);
            ASSERT_EQ(manifest_pb_open_reply(ids[i], leases[j], mpb, mlen, 1, &b, &lb), 0);
            ASSERT_EQ(la, lb);
            ASSERT(memcmp(a, b, la) == 0);
            free(a);
            free(b);
            weightsd__v1__manifest__free_unpacked(pm, NULL);
        }
    free(mpb);
    manifest_free(m);
}

/* manifest_pb_size() is what the preload checks before copying: it must agree with the encoder,
 * and its widest map_size must bound every real one. */
TEST(manifest_size_matches_encode)
{
    static const uint64_t sizes[] = {0, 64, 1ull << 31, 1ull << 45};
    manifest_t *m = manifest_new();
    char name[MANIFEST_NAME_MAX + 1];
    size_t len, bound;

    ASSERT(m);
    memset(name, 'n', sizeof(name) - 1);
    name[sizeof(name) - 1] = '\0';
    for (unsigned i = 0; i < 40; i++) {
        mf_tensor_t t = {.dtype = WSD_DTYPE_F32, .ndim = 1, .shape = {i}, .stride = {1}};

        snprintf(name, 16, "%08u", i); /* a long name, unique in its first bytes */
        name[8] = 'n';
        t.name = wire_str(name);
        t.storage = i;
        ASSERT_EQ(manifest_add_storage(m, name, 0, 4096ull * i, 4ull * i, WSD_DTYPE_F32, NULL), 0);
        m->storages[i].arena_offset = 4096ull * i;
        ASSERT_EQ(manifest_add_tensor(m, &t), 0);
    }
    ASSERT_EQ(manifest_add_meta(m, "format", "pt"), 0);
    ASSERT_EQ(manifest_pb_size(m, UINT64_MAX, 32, &bound), 0);
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        uint8_t *pb;
        size_t plen;

        ASSERT_EQ(manifest_pb_size(m, sizes[i], 32, &len), 0);
        ASSERT_EQ(manifest_pb_encode(m, sizes[i], "0123456789abcdef0123456789abcdef", &pb, &plen), 0);
        ASSERT_EQ(len, plen);
        ASSERT(plen <= bound && bound - plen <= 11); /* a tag and ten varint bytes */
        free(pb);
    }
    ASSERT_EQ(manifest_pb_size(m, 0, MANIFEST_PB_HASH_MAX + 1, &len), -EINVAL);
    manifest_free(m);
}

/* Past MANIFEST_PB_MAX both refuse, and the size says by how much. */
TEST(manifest_too_large_to_send)
{
    manifest_t *m = manifest_new();
    char name[MANIFEST_NAME_MAX + 1];
    size_t len = 0, n = 0;
    uint8_t *pb = NULL;

    ASSERT(m);
    memset(name, 'w', sizeof(name) - 1);
    name[sizeof(name) - 1] = '\0';
    /* Each tensor costs its name twice (tensor and storage key): 8 KiB and a little. */
    for (; n < MANIFEST_PB_MAX / (2 * MANIFEST_NAME_MAX) + 1; n++) {
        mf_tensor_t t = {.dtype = WSD_DTYPE_U8, .ndim = 1, .shape = {1}, .stride = {1}};

        snprintf(name, 16, "%08zu", n);
        name[8] = 'w';
        t.name = wire_str(name);
        t.storage = (uint32_t)n;
        ASSERT_EQ(manifest_add_storage(m, name, 0, n, 1, WSD_DTYPE_U8, NULL), 0);
        ASSERT_EQ(manifest_add_tensor(m, &t), 0);
    }
    ASSERT_EQ(manifest_pb_size(m, 1 << 20, 32, &len), WSD_ELIMIT);
    ASSERT(len > MANIFEST_PB_MAX && len < MANIFEST_PB_MAX + (1u << 20));
    ASSERT_EQ(manifest_pb_encode(m, 1 << 20, "h", &pb, &len), WSD_ELIMIT);
    ASSERT(pb == NULL);
    manifest_free(m);
}

/* The room a preload for a device leaves beside its manifest bounds the real GpuExport field,
 * at its widest (every optional field, offsets that take ten varint bytes, the last device),
 * and is not far off it. */
TEST(gpu_field_max_bounds_the_export)
{
    static const size_t counts[] = {0, 1, 127, 128, 5000};

    for (size_t k = 0; k < sizeof(counts) / sizeof(counts[0]); k++) {
        size_t n = counts[k], len, field;
        uint64_t *off = calloc(n ? n : 1, sizeof(*off));
        gpu_export_t e = {.device = GPU_DEVICES_MAX - 1, .kind = GPU_HANDLE_LEGACY_IPC,
                          .size = UINT64_MAX, .has_uuid = true, .offsets = off, .noffsets = n};
        uint8_t *pb;

        ASSERT(off);
        for (size_t i = 0; i < n; i++)
            off[i] = UINT64_MAX - i;
        memset(e.ipc, 0xab, sizeof(e.ipc));
        ASSERT_EQ(manifest_pb_gpu_export(&e, &pb, &len), 0);
        field = 2 + (len < 128 ? 1 : len < 16384 ? 2 : 3) + len; /* tag 20, length, body */
        ASSERT_LE(field, manifest_pb_gpu_field_max(n));
        ASSERT_LE(manifest_pb_gpu_field_max(n) - field, 32 + n); /* packed: 10 bytes, not 11 */
        free(pb);
        free(off);
    }
}

/* wire_decode()'s arena: a reply of 20000 tensors spans many blocks (the first is 4 KiB, each
 * next twice the last), every field comes back intact, the cap still counts every byte handed
 * out, and wire_msg_free() gives it all back (ASan and valgrind check that part). */
TEST(arena_decodes_a_large_manifest)
{
    enum { N = 20000 };
    manifest_t *m = manifest_new();
    uint8_t *mpb, *frame;
    size_t mlen, flen, need = 0;
    wire_msg_t *msg = NULL;
    char name[64];

    ASSERT(m);
    for (unsigned i = 0; i < N; i++) {
        mf_tensor_t t = {.dtype = WSD_DTYPE_F32, .ndim = 2, .shape = {i % 7 + 1, 3},
                         .stride = {3, 1}, .storage = i};

        snprintf(name, sizeof(name), "model.layers.%u.mlp.weight", i);
        t.name = name;
        ASSERT_EQ(manifest_add_storage(m, name, 0, 64ull * i, 12ull * (i % 7 + 1), WSD_DTYPE_F32,
                                       NULL), 0);
        m->storages[i].arena_offset = 64ull * i;
        ASSERT_EQ(manifest_add_tensor(m, &t), 0);
    }
    ASSERT_EQ(manifest_pb_encode(m, 64ull * N, "feedface", &mpb, &mlen), 0);
    ASSERT_EQ(manifest_pb_open_reply(7, 9, mpb, mlen, 0, &frame, &flen), 0);
    ASSERT_EQ(wire_decode(frame + 8, flen - 8, (flen - 8) * WSD_UNPACK_MEM_PER_BYTE, &msg), 0);
    ASSERT(msg && msg->body_case == WEIGHTSD__V1__FRAME__BODY_OPEN_REPLY);
    ASSERT_EQ(msg->id, 7);
    ASSERT_EQ(msg->open_reply->lease, 9);
    {
        const Weightsd__V1__Manifest *pm = msg->open_reply->manifest;

        ASSERT_EQ(pm->n_tensors, N);
        ASSERT_EQ(pm->n_storages, N);
        ASSERT_STR_EQ(pm->content_hash, "feedface");
        for (unsigned i = 0; i < N; i++) {
            const Weightsd__V1__TensorInfo *ti = pm->tensors[i];

            snprintf(name, sizeof(name), "model.layers.%u.mlp.weight", i);
            ASSERT_STR_EQ(ti->name, name);
            ASSERT_STR_EQ(pm->storages[i]->key, name);
            ASSERT_EQ(ti->n_shape, 2);
            ASSERT_EQ(ti->shape[0], i % 7 + 1);
            ASSERT_EQ(ti->stride[0], 3);
            ASSERT_EQ(ti->storage, i);
            ASSERT_EQ(pm->storages[i]->offset, 64ull * i);
            /* Every object lies at the arena's alignment. */
            ASSERT_EQ((uintptr_t)ti % alignof(max_align_t), 0);
            ASSERT_EQ((uintptr_t)ti->shape % alignof(max_align_t), 0);
        }
    }
    wire_msg_free(msg);
    /* The smallest cap that decodes: found by bisection, it must be well above the payload
     * (the objects) and the next byte down must refuse, with nothing leaked. */
    {
        size_t lo = 1, hi = (flen - 8) * WSD_UNPACK_MEM_PER_BYTE;

        while (lo < hi) {
            size_t mid = lo + (hi - lo) / 2;

            msg = NULL;
            if (wire_decode(frame + 8, flen - 8, mid, &msg) == 0) {
                wire_msg_free(msg);
                hi = mid;
            } else {
                ASSERT(msg == NULL);
                lo = mid + 1;
            }
        }
        need = lo;
    }
    ASSERT(need > flen && need < (flen - 8) * 8);
    ASSERT_EQ(wire_decode(frame + 8, flen - 8, need - 1, &msg), -EBADMSG);
    free(frame);
    free(mpb);
    manifest_free(m);
}

int main(int argc, char **argv)
{
    return test_main(argc, argv);
}

/*
 * The edges of sending and receiving: a second fill over a header already past the limit, a
 * frame the reader cannot hold, too many fds to encode, a receive that times out, and a send
 * into a full socket that waits for the peer to read.
 */
TEST(reader_and_sender_edges)
{
    static const uint8_t big[8] = {0x00, 0x00, 0x10, 0x00, 0, 0, 0, 0}; /* 1 MiB payload */
    wire_reader_t r;
    wire_frame_t f;
    uint8_t *buf, *blob;
    size_t len, sent = 0;
    int sv[2];

    /* Header of a 1 MiB frame read first, payload next: the second fill refuses at once. */
    pair(sv);
    wire_reader_init(&r, WSD_REQUEST_MAX);
    ASSERT_EQ(write(sv[0], big, 4), 4);
    ASSERT_EQ(wire_reader_fill(&r, sv[1]), 4);
    ASSERT_EQ(write(sv[0], big + 4, 4), 4);
    ASSERT_EQ(wire_reader_fill(&r, sv[1]), 4);
    ASSERT_EQ(wire_reader_fill(&r, sv[1]), -EMSGSIZE);
    wire_reader_done(&r);
    close(sv[0]);
    close(sv[1]);

    encode_hello(1, &buf, &len);
    free(buf);
    {
        Weightsd__V1__Frame fr = WEIGHTSD__V1__FRAME__INIT;
        Weightsd__V1__Hello h = WEIGHTSD__V1__HELLO__INIT;

        fr.body_case = WEIGHTSD__V1__FRAME__BODY_HELLO;
        fr.hello = &h;
        ASSERT_EQ(wire_encode(&fr, WSD_FDS_PER_FRAME_MAX + 1, &buf, &len), -EMSGSIZE);
    }

    /* Nothing arrives: the receive gives up at its deadline. */
    pair(sv);
    wire_reader_init(&r, WSD_REQUEST_MAX);
    ASSERT_EQ(wire_recv_frame(&r, sv[1], 30, &f), -ETIMEDOUT);
    /* The peer closes: a reset, not a hang. */
    close(sv[0]);
    ASSERT_EQ(wire_recv_frame(&r, sv[1], 1000, &f), -ECONNRESET);
    wire_reader_done(&r);
    close(sv[1]);

    /* 4 MiB into a non-blocking socket whose buffer is far smaller: wire_send_all() polls for
     * room while a child drains the other end, and every byte arrives. */
    pair(sv);
    len = 4u << 20;
    blob = malloc(len);
    ASSERT(blob);
    for (size_t i = 0; i < len; i++)
        blob[i] = (uint8_t)(i * 7);
    {
        pid_t pid = fork();

        ASSERT(pid >= 0);
        if (pid == 0) {
            uint8_t chunk[65536];
            size_t got = 0;
            bool same = true;

            close(sv[0]);
            free(blob); /* the child only reads; valgrind's leak check covers it too */
            fcntl(sv[1], F_SETFL, 0);
            while (got < len) {
                ssize_t n = read(sv[1], chunk, sizeof(chunk));

                if (n <= 0)
                    _exit(2);
                for (ssize_t i = 0; i < n; i++)
                    same = same && chunk[i] == (uint8_t)((got + (size_t)i) * 7);
                got += (size_t)n;
                usleep(200); /* slower than the sender: it must wait */
            }
            _exit(same ? 0 : 1);
        }
        close(sv[1]);
        ASSERT_EQ(wire_send_all(sv[0], blob, len, NULL, 0), 0);
        sent = len;
        close(sv[0]);
        {
            int st = 0;

            ASSERT_EQ(waitpid(pid, &st, 0), pid);
            ASSERT(WIFEXITED(st) && WEXITSTATUS(st) == 0);
        }
    }
    ASSERT_EQ(sent, len);
    free(blob);
}

/* C9: each allocation of encoding, reading and decoding a frame can fail, cleanly (-ENOMEM, and
 * under ASan nothing leaked); in fault builds only. */
TEST(every_allocation_can_fail)
{
#ifdef WSD_FAULT_INJECTION
    unsigned long n;

    for (n = 1;; n++) {
        char spec[32];
        uint8_t *buf = NULL;
        size_t len = 0;
        wire_reader_t r;
        wire_frame_t f = {0};
        int sv[2], k, steps = 0;

        pair(sv);
        wire_reader_init(&r, WSD_REQUEST_MAX);
        snprintf(spec, sizeof(spec), "malloc:%lu", n);
        fault_arm(spec);
        {
            Weightsd__V1__Frame fr = WEIGHTSD__V1__FRAME__INIT;
            Weightsd__V1__Hello h = WEIGHTSD__V1__HELLO__INIT;

            h.protocol = 1;
            h.client = wire_str("sweep");
            fr.id = 9;
            fr.body_case = WEIGHTSD__V1__FRAME__BODY_HELLO;
            fr.hello = &h;
            k = wire_encode(&fr, 0, &buf, &len);
        }
        if (k == 0) {
            ASSERT_EQ(write(sv[0], buf, len), (ssize_t)len);
            /* A fill reads the header, the next one the rest of the frame. */
            do {
                steps++;
                k = wire_reader_fill(&r, sv[1]);
                if (k > 0)
                    k = wire_reader_next(&r, &f);
            } while (k == 0 && steps < 8);
        }
        fault_arm(NULL);
        free(buf);
        close(sv[0]);
        close(sv[1]);
        if (k > 0) { /* the whole round ran */
            ASSERT_EQ(f.msg->id, 9);
            ASSERT_STR_EQ(f.msg->hello->client, "sweep");
            wire_frame_done(&f);
            wire_reader_done(&r);
            break;
        }
        if (k != -ENOMEM)
            TEST_FAIL("allocation %lu failed (after %d steps): %d, expected -ENOMEM", n, steps, k);
        wire_reader_done(&r);
    }
    fprintf(stderr, "# %lu allocations, each failed once\n", n - 1);
    ASSERT_GE(n, 3);
#else
    SKIP("needs -DWSD_FAULT_INJECTION=ON (the malloc wrappers)");
#endif
}
