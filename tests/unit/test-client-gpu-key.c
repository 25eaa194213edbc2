/*
 * test-client-gpu-key.c - which opens in one process share a GPU import (client/gpu.c,
 * wsd__gpu_key): the same model, content, device and access do; a legacy IPC copy only with
 * the very handle it was opened from, since the daemon frees that memory with the last lease
 * on it, while a VMM import keeps its memory alive itself. Runs without a GPU: only the key.
 */
#include "test.h"

#include <errno.h>

#include "gpu.h"

static uint8_t ipc_a[64], ipc_b[64];

static void key(char *buf, const char *hash, const char *dev, bool rw, unsigned handle,
                const uint8_t *ipc)
{
    ASSERT_GT(wsd__gpu_key(buf, WSD__GPU_KEY_MAX, "llama", hash, dev, rw, handle, ipc, 64), 0);
}

TEST(vmm_copies_of_the_same_content_share)
{
    char a[WSD__GPU_KEY_MAX], b[WSD__GPU_KEY_MAX];

    ipc_b[7] = 1;
    key(a, "h1", "cuda:0", false, WSD__GPU_HANDLE_POSIX_FD, ipc_a);
    key(b, "h1", "cuda:0", false, WSD__GPU_HANDLE_POSIX_FD, ipc_b); /* no ipc bytes for VMM */
    ASSERT_STR_EQ(a, b);
    key(b, "h2", "cuda:0", false, WSD__GPU_HANDLE_POSIX_FD, ipc_a);
    ASSERT(strcmp(a, b) != 0);
    key(b, "h1", "cuda:1", false, WSD__GPU_HANDLE_POSIX_FD, ipc_a);
    ASSERT(strcmp(a, b) != 0);
    key(b, "h1", "cuda:0", true, WSD__GPU_HANDLE_POSIX_FD, ipc_a);
    ASSERT(strcmp(a, b) != 0);
}

TEST(legacy_copies_share_only_their_own_handle)
{
    char a[WSD__GPU_KEY_MAX], b[WSD__GPU_KEY_MAX], c[WSD__GPU_KEY_MAX];

    ipc_b[63] = 0xff;
    key(a, "h1", "cuda:0", false, WSD__GPU_HANDLE_LEGACY_IPC, ipc_a);
    key(b, "h1", "cuda:0", false, WSD__GPU_HANDLE_LEGACY_IPC, ipc_b);
    key(c, "h1", "cuda:0", false, WSD__GPU_HANDLE_LEGACY_IPC, ipc_a);
    ASSERT(strcmp(a, b) != 0); /* a re-preloaded copy: same content, another allocation */
    ASSERT_STR_EQ(a, c);
    ASSERT_STR_CONTAINS(b, "ff");
    ASSERT_EQ(strlen(a), strlen("llama\nh1\ncuda:0\nro\n") + 128);
}

TEST(a_key_that_does_not_fit_is_refused)
{
    char small[24];

    ASSERT_EQ(wsd__gpu_key(small, sizeof(small), "llama", "h1", "cuda:0", false,
                           WSD__GPU_HANDLE_LEGACY_IPC, ipc_a, 64), -ENOSPC);
    ASSERT_EQ(wsd__gpu_key(small, 8, "llama", "h1", "cuda:0", false, WSD__GPU_HANDLE_POSIX_FD,
                           ipc_a, 64), -ENOSPC);
}

int main(int argc, char **argv)
{
    return test_main(argc, argv);
}
