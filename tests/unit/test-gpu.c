/*
 * test-gpu.c - the GPU tier's interface (daemon/tiers/gpu.h) in whichever build this is.
 *
 * Everywhere: device names, the 256-byte layout, and the GpuExport wire form (hand-assembled
 * OpenReply must equal protobuf-c's). Without CUDA: every call says the build has no CUDA
 * support. With CUDA but no device (or no driver): the probe reports 0 devices with CUDA's
 * reason and uploads fail with WSD_ENODEV, without crashing. With a device: one small real
 * upload (SKIP elsewhere; tests/gpu/run.sh does the rest on hardware).
 */
#include "test.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "gpu.h"
#include "manifest_pb.h"
#include "wire.h"

TEST(parse_device_names)
{
    static const char *bad[] = {"gpu", "cuda", "cuda:", "cuda:-1", "cuda:01", "cuda:0x1",
                                "cuda:64", "cuda:1 ", "CUDA:0", "cuda:99999999999999999999"};
    int d = 7;

    ASSERT_EQ(gpu_parse_device(NULL, &d), 0);
    ASSERT_EQ(d, -1);
    ASSERT_EQ(gpu_parse_device("", &d), 0);
    ASSERT_EQ(d, -1);
    ASSERT_EQ(gpu_parse_device("cpu", &d), 0);
    ASSERT_EQ(d, -1);
    ASSERT_EQ(gpu_parse_device("cuda:0", &d), 0);
    ASSERT_EQ(d, 0);
    ASSERT_EQ(gpu_parse_device("cuda:63", &d), 0);
    ASSERT_EQ(d, 63);
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        d = 5;
        if (gpu_parse_device(bad[i], &d) != -EINVAL)
            TEST_FAIL("'%s' accepted as %d", bad[i], d);
    }
}

static manifest_t *three_storages(void)
{
    manifest_t *m = manifest_new();

    ASSERT(m);
    ASSERT_EQ(manifest_add_storage(m, "a", 0, 0, 100, WSD_DTYPE_U8, NULL), 0);
    ASSERT_EQ(manifest_add_storage(m, "b", 0, 100, 1, WSD_DTYPE_U8, NULL), 0);
    ASSERT_EQ(manifest_add_storage(m, "c", 0, 101, 4096 * 3 + 17, WSD_DTYPE_U8, NULL), 0);
    return m;
}

TEST(layout_is_256_aligned)
{
    manifest_t *m = three_storages();
    fmt_err_t err = {0};
    uint64_t *off = NULL, size = 0;

    ASSERT_EQ(gpu_layout(m, &off, &size, &err), 0);
    ASSERT_UINT_EQ(off[0], 0);
    ASSERT_UINT_EQ(off[1], 256);
    ASSERT_UINT_EQ(off[2], 512);
    ASSERT_UINT_EQ(size, 512 + 4096 * 3 + 17);
    free(off);
    manifest_free(m);
}

TEST(release_of_empty_export_is_harmless)
{
    gpu_export_t e;
    int fd = dup(0);

    memset(&e, 0, sizeof(e));
    gpu_release(&e); /* kind 0: must not close fd 0 */
    gpu_release(NULL);
    ASSERT(fcntl(0, F_GETFD) >= 0);
    ASSERT_EQ(e.fd, -1);
    close(fd);
}

/* The open path appends a packed GpuExport as OpenReply field 20 by hand. */
TEST(gpu_open_reply_decodes)
{
    manifest_t *m = three_storages();
    uint64_t offsets[3] = {0, 256, 512};
    gpu_export_t e = {.device = 3, .kind = GPU_HANDLE_LEGACY_IPC, .fd = -1, .size = 2u << 20,
                      .offsets = offsets, .noffsets = 3};
    uint8_t *mpb, *gpb, *frame;
    size_t mlen, glen, flen;
    wire_msg_t *msg;

    for (size_t i = 0; i < sizeof(e.ipc); i++)
        e.ipc[i] = (uint8_t)(i * 7 + 1);
    e.has_uuid = true;
    for (size_t i = 0; i < sizeof(e.uuid); i++)
        e.uuid[i] = (uint8_t)(0xF0 ^ i);
    ASSERT_EQ(manifest_pb_encode(m, 4096 * 4, "abcd", &mpb, &mlen), 0);
    ASSERT_EQ(manifest_pb_gpu_export(&e, &gpb, &glen), 0);
    ASSERT_EQ(manifest_pb_open_reply_gpu(300, 9, mpb, mlen, gpb, glen, 0, &frame, &flen), 0);
    ASSERT_EQ(wire_decode(frame + WSD_FRAME_HEADER_SIZE, flen - WSD_FRAME_HEADER_SIZE,
                          1u << 20, &msg), 0);
    ASSERT_EQ(msg->body_case, WEIGHTSD__V1__FRAME__BODY_OPEN_REPLY);
    ASSERT_UINT_EQ(msg->id, 300);
    ASSERT_UINT_EQ(msg->open_reply->lease, 9);
    ASSERT_EQ(msg->open_reply->manifest->n_storages, 3);
    ASSERT(msg->open_reply->gpu);
    ASSERT_STR_EQ(msg->open_reply->gpu->device, "cuda:3");
    ASSERT_EQ(msg->open_reply->gpu->handle, GPU_HANDLE_LEGACY_IPC);
    ASSERT_UINT_EQ(msg->open_reply->gpu->size, 2u << 20);
    ASSERT_EQ(msg->open_reply->gpu->n_offsets, 3);
    ASSERT_UINT_EQ(msg->open_reply->gpu->offsets[2], 512);
    ASSERT_EQ(msg->open_reply->gpu->ipc_handle.len, GPU_IPC_HANDLE_SIZE);
    ASSERT_EQ(memcmp(msg->open_reply->gpu->ipc_handle.data, e.ipc, sizeof(e.ipc)), 0);
    ASSERT_EQ(msg->open_reply->gpu->device_uuid.len, GPU_UUID_SIZE);
    ASSERT_EQ(memcmp(msg->open_reply->gpu->device_uuid.data, e.uuid, sizeof(e.uuid)), 0);
    wire_msg_free(msg);
    free(frame);
    /* Without a GpuExport the bytes are the host-tier reply's, unchanged. */
    ASSERT_EQ(manifest_pb_open_reply_gpu(300, 9, mpb, mlen, NULL, 0, 1, &frame, &flen), 0);
    {
        uint8_t *plain;
        size_t plen;

        ASSERT_EQ(manifest_pb_open_reply(300, 9, mpb, mlen, 1, &plain, &plen), 0);
        ASSERT_EQ(plen, flen);
        ASSERT_EQ(memcmp(plain, frame, plen), 0);
        free(plain);
    }
    free(frame);
    free(gpb);
    free(mpb);
    manifest_free(m);
}

#ifndef WSD_HAVE_CUDA

TEST(no_cuda_build_says_so)
{
    const gpu_probe_t *p = NULL;
    manifest_t *m = three_storages();
    fmt_err_t err = {0};
    gpu_export_t e;

    ASSERT_EQ(gpu_probe(&p), -EOPNOTSUPP);
    ASSERT(p == NULL);
    ASSERT_EQ(gpu_check_device(0, &err), -EOPNOTSUPP);
    ASSERT(strstr(err.msg, "built without CUDA support"));
    ASSERT(strstr(err.msg, "cuda:0"));
    memset(&err, 0, sizeof(err));
    ASSERT_EQ(gpu_upload(m, -1, 0, 1, NULL, &e, &err), -EOPNOTSUPP);
    ASSERT(strstr(err.msg, "cuda:1: weightsd was built without CUDA support"));
    memset(&err, 0, sizeof(err));
    ASSERT_EQ(gpu_adopt(m, 0, 2, &e, &err), -EOPNOTSUPP);
    ASSERT(strstr(err.msg, "cuda:2: weightsd was built without CUDA support"));
    ASSERT(gpu_probe_peek() == NULL);
    ASSERT(!gpu_device_degraded(0, NULL, 0));
    manifest_free(m);
}

#else

TEST(probe_without_device_reports_why)
{
    const gpu_probe_t *p = NULL;
    fmt_err_t err = {0};

    ASSERT_EQ(gpu_probe(&p), 0);
    ASSERT(p);
    printf("# CUDA runtime %d, driver %d, %d device(s)%s%s\n", p->runtime_version,
           p->driver_version, p->ndevices, p->ndevices ? "" : ": ", p->error);
    if (p->ndevices > 0) {
        ASSERT_EQ(gpu_check_device(p->ndevices, &err), WSD_ENODEV);
        ASSERT(strstr(err.msg, "no such CUDA device"));
        test_skip("a CUDA device is present (checked only the out-of-range ordinal)");
    }
    ASSERT(p->error[0] != '\0');
    ASSERT_EQ(gpu_check_device(0, &err), WSD_ENODEV);
    ASSERT(strstr(err.msg, "cuda:0: no CUDA device"));
    /* A second probe is the cached answer. */
    {
        const gpu_probe_t *q = NULL;

        ASSERT_EQ(gpu_probe(&q), 0);
        ASSERT(q == p);
    }
}

TEST(upload_without_device_fails_cleanly)
{
    const gpu_probe_t *p = NULL;
    manifest_t *m = three_storages();
    fmt_err_t err = {0};
    gpu_export_t e;

    ASSERT_EQ(gpu_probe(&p), 0);
    if (p->ndevices > 0)
        test_skip("a CUDA device is present");
    memset(&e, 0xa5, sizeof(e));
    ASSERT_EQ(gpu_upload(m, -1, 0, 0, NULL, &e, &err), WSD_ENODEV);
    ASSERT(strstr(err.msg, "no CUDA device"));
    ASSERT_EQ(e.device, (int)0xa5a5a5a5); /* ret is written on success only */
    manifest_free(m);
}

/* A copy kept from before a restart cannot be taken back without a device, and the fd stays
 * the caller's (the registry closes it and uploads afresh, or serves the host tier). */
TEST(adopt_without_device_fails_and_keeps_the_fd)
{
    const gpu_probe_t *p = NULL;
    manifest_t *m = three_storages();
    fmt_err_t err = {0};
    gpu_export_t e;
    int fd = memfd_create("kept", MFD_CLOEXEC);

    ASSERT(fd >= 0);
    ASSERT_EQ(gpu_probe(&p), 0);
    if (p->ndevices > 0)
        test_skip("a CUDA device is present");
    memset(&e, 0xa5, sizeof(e));
    ASSERT_EQ(gpu_adopt(m, fd, 0, &e, &err), WSD_ENODEV);
    ASSERT(strstr(err.msg, "cuda:0: no CUDA device"));
    ASSERT_EQ(e.device, (int)0xa5a5a5a5);
    ASSERT(fcntl(fd, F_GETFD) >= 0);
    close(fd);
    manifest_free(m);
}

/* What gpu_upload() allocates for \p m on cuda:0 with VMM: its layout, rounded up. */
static uint64_t size_vmm_of(const gpu_probe_t *p, const manifest_t *m)
{
    uint64_t *off = NULL, layout = 0, size = 0;
    fmt_err_t err = {0};

    ASSERT_EQ(gpu_layout(m, &off, &layout, &err), 0);
    free(off);
    ASSERT(ck_align_u64(layout, p->dev[0].granularity, &size));
    return size;
}

/* Hardware only: a real upload of a small arena, exported as documented. */
TEST(upload_small_model)
{
    const gpu_probe_t *p = NULL;
    manifest_t *m = three_storages();
    fmt_err_t err = {0};
    gpu_export_t e;
    uint64_t size = 512 + 4096 * 3 + 17;
    host_progress_t prog;
    int fd;

    ASSERT_EQ(gpu_probe(&p), 0);
    if (p->ndevices == 0)
        test_skip("no CUDA device");
    fd = memfd_create("test-gpu", MFD_CLOEXEC);
    ASSERT(fd >= 0);
    ASSERT_EQ(ftruncate(fd, (off_t)size), 0);
    m->storages[0].arena_offset = 0;
    m->storages[1].arena_offset = 128;
    m->storages[2].arena_offset = 192;
    atomic_init(&prog.done, 0);
    atomic_init(&prog.total, 0);
    atomic_init(&prog.cancel, false);
    ASSERT_EQ(gpu_upload(m, fd, size, 0, &prog, &e, &err), 0);
    /* Progress counts completed copies: every storage byte exactly once. */
    ASSERT_UINT_EQ(atomic_load(&prog.done), 100 + 1 + 4096 * 3 + 17);
    ASSERT(!gpu_device_degraded(0, NULL, 0));
    printf("# cuda:0 %s, %llu bytes\n", gpu_handle_kind_name(e.kind),
           (unsigned long long)e.size);
    ASSERT_EQ(e.noffsets, 3);
    ASSERT_UINT_EQ(e.offsets[2], 512);
    if (e.kind == GPU_HANDLE_POSIX_FD) {
        ASSERT(e.fd > 2);
        ASSERT(fcntl(e.fd, F_GETFD) & FD_CLOEXEC);
        ASSERT_EQ(e.size % p->dev[0].granularity, 0);
    }
    if (e.kind == GPU_HANDLE_POSIX_FD) {
        /* As after a restart: the export fd alone, taken back, holds the copy once the
         * exporter's handle is gone; a bigger layout, or an fd that is no CUDA export, is
         * refused and the fd left to the caller. */
        gpu_export_t k, bad;
        manifest_t *big = three_storages();
        int kept = fcntl(e.fd, F_DUPFD_CLOEXEC, 3), other = memfd_create("no", MFD_CLOEXEC);

        ASSERT(kept > 2 && other >= 0);
        big->storages[2].nbytes = e.size; /* past the allocation */
        memset(&err, 0, sizeof(err));
        ASSERT_EQ(gpu_adopt(big, kept, 0, &bad, &err), WSD_EGPU);
        ASSERT(strstr(err.msg, "does not hold"));
        memset(&err, 0, sizeof(err));
        ASSERT_EQ(gpu_adopt(m, other, 0, &bad, &err), WSD_EGPU);
        ASSERT(strstr(err.msg, "cuMemImportFromShareableHandle"));
        ASSERT(fcntl(other, F_GETFD) >= 0);
        close(other);
        gpu_release(&e);
        memset(&err, 0, sizeof(err));
        ASSERT_EQ(gpu_adopt(m, kept, 0, &k, &err), 0);
        ASSERT_EQ(k.fd, kept);
        ASSERT_UINT_EQ(k.size, size_vmm_of(p, m));
        ASSERT_EQ(k.noffsets, 3);
        ASSERT_UINT_EQ(k.offsets[2], 512);
        ASSERT(k.priv == NULL); /* the fd alone: no CUDA state kept */
        gpu_release(&k);
        manifest_free(big);
    } else {
        gpu_release(&e);
    }
    ASSERT_EQ(e.kind, 0);
    /* A cancel set before the fill stops it, and nothing is handed back. */
    atomic_store(&prog.cancel, true);
    memset(&err, 0, sizeof(err));
    ASSERT_EQ(gpu_upload(m, fd, size, 0, &prog, &e, &err), WSD_ECANCELED);
    ASSERT(strstr(err.msg, "E_CANCELED"));
    close(fd);
    manifest_free(m);
}

/* The probe's cached answer is visible to peek only once the probe has finished, and nothing
 * starts degraded. */
TEST(probe_peek_and_health)
{
    const gpu_probe_t *p = NULL;

    ASSERT(gpu_probe_peek() == NULL); /* each test runs in a fresh process */
    ASSERT_EQ(gpu_probe(&p), 0);
    ASSERT(gpu_probe_peek() == p);
    for (int i = 0; i < GPU_DEVICES_MAX; i++)
        ASSERT(!gpu_device_degraded(i, NULL, 0));
    ASSERT(!gpu_device_degraded(-1, NULL, 0));
    ASSERT(!gpu_device_degraded(GPU_DEVICES_MAX, NULL, 0));
}

#endif

/* The errors after which the daemon's context on a device is unusable (G6), by CUDA's own
 * wording in driver_types.h / cuda.h; transient ones (out of memory, busy, invalid value) are
 * not, or one failed allocation would take a device out of service. */
TEST(sticky_errors)
{
    static const int sticky[] = {214, 226, 700, 702, 710, 714, 715, 716, 717, 718, 719, 721,
                                 810, 911};
    static const int transient[] = {0, 1, 2, 3, 46, 100, 101, 201, 400, 600, 701, 709, 720,
                                    801, 999};

    for (size_t i = 0; i < sizeof(sticky) / sizeof(sticky[0]); i++)
        if (!gpu_error_is_sticky(sticky[i]))
            TEST_FAIL("%d not sticky", sticky[i]);
    for (size_t i = 0; i < sizeof(transient) / sizeof(transient[0]); i++)
        if (gpu_error_is_sticky(transient[i]))
            TEST_FAIL("%d sticky", transient[i]);
}

int main(int argc, char **argv)
{
    return test_main(argc, argv);
}
