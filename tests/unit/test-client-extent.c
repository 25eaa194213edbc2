/*
 * test-client-extent.c - libweightsd's own bounds check of the daemon's manifest
 * (client/extent.c): a tensor whose furthest element lies outside its storage is refused, in
 * checked arithmetic, with a message naming it; then the same through wsd_open() against a fake
 * daemon that sends such a manifest, which must fail before any model is handed out.
 */
#include "test.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "extent.h"
#include "weightsd.h"
#include "wire.h"

#define NDIM(a) (sizeof(a) / sizeof((a)[0]))

/* A TensorInfo over caller-owned arrays (they must outlive it). */
static Weightsd__V1__TensorInfo tinfo(const char *name, int dtype, size_t ndim,
                                      const int64_t *shape, const int64_t *stride, uint64_t offset,
                                      uint64_t nbytes)
{
    Weightsd__V1__TensorInfo ti = WEIGHTSD__V1__TENSOR_INFO__INIT;

    ti.name = wire_str(name);
    ti.dtype = (uint32_t)dtype;
    ti.n_shape = ti.n_stride = ndim;
    ti.shape = (int64_t *)(uintptr_t)shape;
    ti.stride = (int64_t *)(uintptr_t)stride;
    ti.storage_offset = offset;
    ti.nbytes = nbytes;
    return ti;
}

static char msg[256];

static int check(const Weightsd__V1__TensorInfo *ti, uint64_t storage_nbytes)
{
    memset(msg, 'x', sizeof(msg));
    return wsd__tensor_extent_check(ti, storage_nbytes, msg, sizeof(msg));
}

TEST(exact_fit_accepted)
{
    static const int64_t shape[] = {2, 3}, stride[] = {3, 1}, tshape[] = {3, 2}, tstride[] = {1, 3};
    Weightsd__V1__TensorInfo ti = tinfo("w", WSD_DTYPE_F32, 2, shape, stride, 0, 24);

    ASSERT_EQ(check(&ti, 24), 0);
    ASSERT_STR_EQ(msg, "");
    /* The same bytes after an offset: the last element is storage element 2 + 5. */
    ti.storage_offset = 2;
    ASSERT_EQ(check(&ti, 32), 0);
    /* A transposed view reaches the same last element. */
    ti = tinfo("wt", WSD_DTYPE_F32, 2, tshape, tstride, 0, 24);
    ASSERT_EQ(check(&ti, 24), 0);
}

TEST(one_element_over_rejected)
{
    static const int64_t shape[] = {2, 3}, stride[] = {3, 1}, tstride[] = {1, 2};
    Weightsd__V1__TensorInfo ti = tinfo("layers.3.w", WSD_DTYPE_F32, 2, shape, stride, 0, 24);

    ASSERT_EQ(check(&ti, 23), WSD_EPROTO);
    ASSERT_EQ(check(&ti, 20), WSD_EPROTO);
    ASSERT_STR_EQ(msg, "tensor 'layers.3.w': view reaches byte 24 of its 20-byte storage");
    /* The offset pushes the last element one past the end. */
    ti.storage_offset = 1;
    ASSERT_EQ(check(&ti, 24), WSD_EPROTO);
    ASSERT_STR_CONTAINS(msg, "tensor 'layers.3.w'");
    /* Strides that skip: last element (2-1)*1 + (3-1)*2 = 5, so 6 elements are needed. */
    ti = tinfo("skip", WSD_DTYPE_U8, 2, shape, tstride, 0, 6);
    ASSERT_EQ(check(&ti, 6), 0);
    ASSERT_EQ(check(&ti, 5), WSD_EPROTO);
}

TEST(overflow_rejected)
{
    static const int64_t one[] = {4}, huge[] = {INT64_MAX}, two[] = {3, 3},
                         huge2[] = {INT64_MAX, INT64_MAX}, pair[] = {2}, big[] = {INT64_C(1) << 62},
                         wide[] = {INT64_C(1) << 32, INT64_C(1) << 32, 2}, ones[] = {1, 1, 1},
                         many[] = {INT64_C(1) << 62};
    Weightsd__V1__TensorInfo ti;

    /* (size - 1) * stride: 3 * (2^63 - 1) does not fit 64 bits. */
    ti = tinfo("mul", WSD_DTYPE_U8, 1, one, huge, 0, 4);
    ASSERT_EQ(check(&ti, UINT64_MAX), WSD_EPROTO);
    ASSERT_STR_EQ(msg, "tensor 'mul': offset + strides overflow 64 bits");
    /* Each term fits (2^64 - 2), their sum does not. */
    ti = tinfo("sum", WSD_DTYPE_U8, 2, two, huge2, 0, 9);
    ASSERT_EQ(check(&ti, UINT64_MAX), WSD_EPROTO);
    ASSERT_STR_CONTAINS(msg, "tensor 'sum': offset + strides overflow");
    /* The element index fits, its byte offset does not: (2^62 + 1) * 8. */
    ti = tinfo("bytes", WSD_DTYPE_F64, 1, pair, big, 0, 16);
    ASSERT_EQ(check(&ti, UINT64_MAX), WSD_EPROTO);
    ASSERT_STR_EQ(msg, "tensor 'bytes': byte extent overflows 64 bits");
    /* numel = 2^65. */
    ti = tinfo("numel", WSD_DTYPE_U8, 3, wide, ones, 0, 0);
    ASSERT_EQ(check(&ti, UINT64_MAX), WSD_EPROTO);
    ASSERT_STR_EQ(msg, "tensor 'numel': element count overflows 64 bits");
    /* numel fits, numel * 4 bytes does not. */
    ti = tinfo("nbytes", WSD_DTYPE_F32, 1, many, ones, 0, 0);
    ASSERT_EQ(check(&ti, UINT64_MAX), WSD_EPROTO);
    ASSERT_STR_EQ(msg, "tensor 'nbytes': byte count overflows 64 bits");
    /* An offset whose byte position overflows is past any storage. */
    ti = tinfo("off", WSD_DTYPE_F32, 1, pair, ones, UINT64_MAX / 2, 8);
    ASSERT_EQ(check(&ti, UINT64_MAX), WSD_EPROTO);
    ASSERT_STR_CONTAINS(msg, "tensor 'off': storage_offset");
}

TEST(zero_size_accepted)
{
    static const int64_t shape[] = {0, 7}, stride[] = {7, 1}, huge[] = {INT64_MAX, INT64_MAX},
                         tail[] = {5, 0}, tstride[] = {INT64_MAX, 1};
    Weightsd__V1__TensorInfo ti = tinfo("empty", WSD_DTYPE_BF16, 2, shape, stride, 0, 0);

    ASSERT_EQ(check(&ti, 0), 0);
    ASSERT_EQ(check(&ti, 100), 0);
    /* Strides of an empty tensor reach nothing, however large. */
    ti = tinfo("empty", WSD_DTYPE_BF16, 2, shape, huge, 0, 0);
    ASSERT_EQ(check(&ti, 0), 0);
    ti = tinfo("tail", WSD_DTYPE_F32, 2, tail, tstride, 0, 0);
    ASSERT_EQ(check(&ti, 0), 0);
}

TEST(empty_at_storage_end)
{
    static const int64_t shape[] = {0}, stride[] = {1};
    Weightsd__V1__TensorInfo ti = tinfo("rest", WSD_DTYPE_F32, 1, shape, stride, 10, 0);

    /* x[10:] of a 10-element storage: data points one past the end, and reads nothing. */
    ASSERT_EQ(check(&ti, 40), 0);
    ti.storage_offset = 11;
    ASSERT_EQ(check(&ti, 40), WSD_EPROTO);
    ASSERT_STR_EQ(msg, "tensor 'rest': storage_offset 11 lies past the end of its 40-byte storage");
    /* A storage that does not hold a whole number of elements: 10 fit in 43 bytes, 11 do not. */
    ti.storage_offset = 10;
    ASSERT_EQ(check(&ti, 43), 0);
    ti.storage_offset = 11;
    ASSERT_EQ(check(&ti, 43), WSD_EPROTO);
}

TEST(scalar)
{
    Weightsd__V1__TensorInfo ti = tinfo("step", WSD_DTYPE_I64, 0, NULL, NULL, 0, 8);

    ASSERT_EQ(check(&ti, 8), 0);
    ASSERT_EQ(check(&ti, 7), WSD_EPROTO);
    ti.storage_offset = 1;
    ASSERT_EQ(check(&ti, 16), 0);
    ASSERT_EQ(check(&ti, 15), WSD_EPROTO);
    ASSERT_STR_CONTAINS(msg, "tensor 'step'");
}

TEST(broadcast_stride_zero)
{
    static const int64_t shape[] = {1000, 4}, stride[] = {0, 1};
    Weightsd__V1__TensorInfo ti = tinfo("bias", WSD_DTYPE_F16, 2, shape, stride, 0, 8000);

    /* 4000 elements, all in the first 4: nbytes is numel * itemsize, the extent is 8 bytes. */
    ASSERT_EQ(check(&ti, 8), 0);
    ASSERT_EQ(check(&ti, 7), WSD_EPROTO);
}

TEST(negative_sizes_and_strides_rejected)
{
    static const int64_t shape[] = {2, 2}, neg_stride[] = {-2, 1}, neg_shape[] = {-1, 2},
                         stride[] = {2, 1};
    Weightsd__V1__TensorInfo ti = tinfo("flip", WSD_DTYPE_F32, 2, shape, neg_stride, 2, 16);

    /* Element 0 at offset 2 reading backwards would stay inside 16 bytes, but the protocol
     * has no negative strides: wsd_tensor_data() is the lowest address of the view. */
    ASSERT_EQ(check(&ti, 64), WSD_EPROTO);
    ASSERT_STR_EQ(msg, "tensor 'flip': negative size or stride in dimension 0");
    ti = tinfo("neg", WSD_DTYPE_F32, 2, neg_shape, stride, 0, 0);
    ASSERT_EQ(check(&ti, 64), WSD_EPROTO);
    ASSERT_STR_CONTAINS(msg, "tensor 'neg': negative size");
}

TEST(nbytes_must_match)
{
    static const int64_t shape[] = {4}, stride[] = {1};
    Weightsd__V1__TensorInfo ti = tinfo("w", WSD_DTYPE_F32, 1, shape, stride, 0, 1u << 20);

    /* A consumer copying wsd_tensor_nbytes() bytes from the data pointer must stay inside. */
    ASSERT_EQ(check(&ti, 16), WSD_EPROTO);
    ASSERT_STR_EQ(msg, "tensor 'w': nbytes is 1048576 but 4 elements of F32 take 16");
    ti.nbytes = 16;
    ASSERT_EQ(check(&ti, 16), 0);
}

TEST(sub_byte_dtypes)
{
    static const int64_t shape[] = {2, 4}, stride[] = {4, 1}, odd[] = {3}, one[] = {1}, six[] = {4};
    Weightsd__V1__TensorInfo ti = tinfo("f4", WSD_DTYPE_F4, 2, shape, stride, 0, 4);

    /* 8 F4 elements are 4 bytes. */
    ASSERT_EQ(check(&ti, 4), 0);
    ASSERT_EQ(check(&ti, 3), WSD_EPROTO);
    ASSERT_STR_EQ(msg, "tensor 'f4': view reaches byte 4 of its 3-byte storage");
    /* The data pointer cannot address half a byte. */
    ti.storage_offset = 2;
    ASSERT_EQ(check(&ti, 8), WSD_EPROTO);
    ASSERT_STR_CONTAINS(msg, "sub-byte dtype F4 with storage_offset 2");
    /* 3 F4 elements are 12 bits: not a whole number of bytes. */
    ti = tinfo("f4odd", WSD_DTYPE_F4, 1, odd, one, 0, 1);
    ASSERT_EQ(check(&ti, 8), WSD_EPROTO);
    ASSERT_STR_CONTAINS(msg, "do not fill whole bytes");
    /* 4 F6 elements are 24 bits. */
    ti = tinfo("f6", WSD_DTYPE_F6_E2M3, 1, six, one, 0, 3);
    ASSERT_EQ(check(&ti, 3), 0);
    ASSERT_EQ(check(&ti, 2), WSD_EPROTO);
}

TEST(malformed_entries_rejected)
{
    static const int64_t shape[WSD_MAX_NDIM + 1] = {1, 1, 1, 1, 1, 1, 1, 1, 1},
                                              stride[WSD_MAX_NDIM + 1] = {1, 1, 1, 1, 1,
                                                                          1, 1, 1, 1};
    Weightsd__V1__TensorInfo ti = tinfo(NULL, WSD_DTYPE_F32, 1, shape, stride, 0, 4);

    ASSERT_EQ(check(&ti, 4), WSD_EPROTO);
    ASSERT_STR_EQ(msg, "tensor without a name");
    ti = tinfo("d", 99, 1, shape, stride, 0, 4);
    ASSERT_EQ(check(&ti, 4), WSD_EPROTO);
    ASSERT_STR_EQ(msg, "tensor 'd': unknown dtype 99");
    ti = tinfo("s", WSD_DTYPE_F32, 2, shape, stride, 0, 4);
    ti.n_stride = 1;
    ASSERT_EQ(check(&ti, 4), WSD_EPROTO);
    ASSERT_STR_EQ(msg, "tensor 's': 2 sizes but 1 strides");
    ti = tinfo("deep", WSD_DTYPE_F32, NDIM(shape), shape, stride, 0, 4);
    ASSERT_EQ(check(&ti, 4), WSD_EPROTO);
    ASSERT_STR_EQ(msg, "tensor 'deep': 9 dimensions, at most 8");
    ti = tinfo("full", WSD_DTYPE_F32, WSD_MAX_NDIM, shape, stride, 0, 4);
    ASSERT_EQ(check(&ti, 4), 0);
    /* No message buffer at all is fine. */
    ti.nbytes = 5;
    ASSERT_EQ(wsd__tensor_extent_check(&ti, 4, NULL, 0), WSD_EPROTO);
}

/*
 * A fake daemon for one connection: answers HELLO, answers the OPEN with \p tensor over one
 * 64-byte storage of a sealed memfd, then acknowledges releases until the client hangs up.
 */
typedef struct fake_daemon {
    int listen_fd;                    /* bound and listening */
    Weightsd__V1__TensorInfo *tensor; /* the manifest's only tensor */
} fake_daemon_t;

static void fake_send(int s, Weightsd__V1__Frame *f, const int *fds, size_t nfds)
{
    uint8_t *buf = NULL;
    size_t len = 0;

    ASSERT_EQ(wire_encode(f, nfds, &buf, &len), 0);
    ASSERT_EQ(wire_send_all(s, buf, len, fds, nfds), 0);
    free(buf);
}

static void *fake_daemon_run(void *arg)
{
    fake_daemon_t *d = arg;
    Weightsd__V1__StorageInfo st = WEIGHTSD__V1__STORAGE_INFO__INIT, *stp[1] = {&st};
    Weightsd__V1__TensorInfo *tip[1] = {d->tensor};
    Weightsd__V1__Manifest mf = WEIGHTSD__V1__MANIFEST__INIT;
    wire_reader_t r;
    wire_frame_t f;
    int s, mfd;

    s = accept4(d->listen_fd, NULL, NULL, SOCK_CLOEXEC);
    ASSERT_GE(s, 0);
    mfd = memfd_create("fake", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    ASSERT_GE(mfd, 0);
    ASSERT_EQ(ftruncate(mfd, 64), 0);
    ASSERT_EQ(fcntl(mfd, F_ADD_SEALS, F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE), 0);
    st.nbytes = 64;
    st.key = wire_str("data/0");
    mf.n_storages = 1;
    mf.storages = stp;
    mf.n_tensors = 1;
    mf.tensors = tip;
    mf.map_size = 64;
    mf.content_hash = wire_str("");
    wire_reader_init(&r, WSD_REQUEST_MAX);
    while (wire_recv_frame(&r, s, 5000, &f) > 0) {
        Weightsd__V1__Frame out = WEIGHTSD__V1__FRAME__INIT;
        Weightsd__V1__HelloReply hr = WEIGHTSD__V1__HELLO_REPLY__INIT;
        Weightsd__V1__OpenReply orep = WEIGHTSD__V1__OPEN_REPLY__INIT;
        Weightsd__V1__ReleaseReply rr = WEIGHTSD__V1__RELEASE_REPLY__INIT;

        out.id = f.msg->id;
        switch (f.msg->body_case) {
        case WEIGHTSD__V1__FRAME__BODY_HELLO:
            hr.protocol = WSD_PROTOCOL_VERSION;
            out.body_case = WEIGHTSD__V1__FRAME__BODY_HELLO_REPLY;
            out.hello_reply = &hr;
            fake_send(s, &out, NULL, 0);
            break;
        case WEIGHTSD__V1__FRAME__BODY_OPEN:
            orep.lease = 7;
            orep.manifest = &mf;
            out.body_case = WEIGHTSD__V1__FRAME__BODY_OPEN_REPLY;
            out.open_reply = &orep;
            fake_send(s, &out, &mfd, 1);
            break;
        case WEIGHTSD__V1__FRAME__BODY_RELEASE:
            out.body_case = WEIGHTSD__V1__FRAME__BODY_RELEASE_REPLY;
            out.release_reply = &rr;
            fake_send(s, &out, NULL, 0);
            break;
        default:
            TEST_FAIL("fake daemon: unexpected frame %d", (int)f.msg->body_case);
        }
        wire_frame_done(&f);
    }
    wire_reader_done(&r);
    close(mfd);
    close(s);
    return NULL;
}

/* Opens model "m" from a fake daemon serving \p tensor; \retval wsd_open's result. */
static int open_from_fake(Weightsd__V1__TensorInfo *tensor, wsd_model_t **ret_model,
                          char *ret_error, size_t errlen)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    char dir[] = "/tmp/wsd-extent-XXXXXX";
    fake_daemon_t d = {.tensor = tensor};
    wsd_client_t *c = NULL;
    pthread_t th;
    int r;

    ASSERT(mkdtemp(dir));
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s/c.sock", dir);
    d.listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    ASSERT_GE(d.listen_fd, 0);
    ASSERT_EQ(bind(d.listen_fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    ASSERT_EQ(listen(d.listen_fd, 1), 0);
    ASSERT_EQ(pthread_create(&th, NULL, fake_daemon_run, &d), 0);
    ASSERT_EQ(wsd_connect(sa.sun_path, &c), 0);
    r = wsd_open(c, "m", NULL, 0, ret_model);
    snprintf(ret_error, errlen, "%s", wsd_last_error(c));
    if (r == 0)
        ASSERT_EQ(wsd_model_release(*ret_model), 0);
    wsd_close(c);
    ASSERT_EQ(pthread_join(th, NULL), 0);
    close(d.listen_fd);
    unlink(sa.sun_path);
    rmdir(dir);
    return r;
}

TEST(open_refuses_a_tensor_outside_its_storage)
{
    static const int64_t shape[] = {4, 4}, stride[] = {4, 1};
    Weightsd__V1__TensorInfo ti = tinfo("blocks.0.attn", WSD_DTYPE_F32, 2, shape, stride, 0, 64);
    wsd_model_t *m = NULL;
    char err[512];

    /* 16 F32 fill the 64-byte storage exactly. */
    ASSERT_EQ(open_from_fake(&ti, &m, err, sizeof(err)), 0);
    ASSERT(m);
    ASSERT_EQ(wsd_model_tensor_count(m), 1);
    ASSERT_UINT_EQ(wsd_tensor_nbytes(wsd_model_tensor(m, 0)), 64);
    wsd_model_free(m);

    /* One element further: the open fails and hands out nothing. */
    m = NULL;
    ti.storage_offset = 1;
    ASSERT_EQ(open_from_fake(&ti, &m, err, sizeof(err)), WSD_EPROTO);
    ASSERT(!m);
    ASSERT_STR_EQ(err, "daemon sent an inconsistent manifest: tensor 'blocks.0.attn': view "
                       "reaches byte 68 of its 64-byte storage");
}

int main(int argc, char **argv)
{
    return test_main(argc, argv);
}
