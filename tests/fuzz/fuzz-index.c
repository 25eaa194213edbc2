/*
 * fuzz-index.c - libFuzzer target for the Hugging Face index reader (STYLE T5): the input is a
 * whole model.safetensors.index.json, written beside three real shards in a directory made on
 * the first call, then loaded with index_load() as fmt_load() would. Any verdict is fine except
 * a crash, a leak, a sanitizer report or a rejection that names no rule; an accepted index must
 * also give a manifest made only of the shards' tensors, each from the shard it was listed in.
 */
#ifndef _GNU_SOURCE
#    define _GNU_SOURCE /* mkdtemp */
#endif
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fmt.h"
#include "index.h"
#include "manifest.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* The shards, their tensors, and the one that holds each: the seeds in corpus/index/ use them. */
static const struct {
    const char *file, *header;
} shards[] = {
    {"model-00001-of-00002.safetensors",
     "{\"embed.weight\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
     "\"tied\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]},"
     "\"__metadata__\":{\"format\":\"pt\"}}"},
    {"model-00002-of-00002.safetensors",
     "{\"norm.weight\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
     "\"lm_head.bias\":{\"dtype\":\"BF16\",\"shape\":[2],\"data_offsets\":[8,12]}}"},
    {"sub/extra.safetensors",
     "{\"extra\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]}}"},
};
#define NSHARDS (sizeof(shards) / sizeof(shards[0]))

static char dir[64];

static void remove_dir(void)
{
    char path[128];

    for (size_t i = 0; i < NSHARDS; i++) {
        snprintf(path, sizeof(path), "%s/%s", dir, shards[i].file);
        (void)unlink(path);
    }
    snprintf(path, sizeof(path), "%s/model.safetensors.index.json", dir);
    (void)unlink(path);
    snprintf(path, sizeof(path), "%s/sub", dir);
    (void)rmdir(path);
    (void)rmdir(dir);
}

static int write_file(const char *path, const void *a, size_t alen, const void *b, size_t blen)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    int ok;

    if (fd < 0)
        return -1;
    ok = write(fd, a, alen) == (ssize_t)alen && (!blen || write(fd, b, blen) == (ssize_t)blen);
    return close(fd) == 0 && ok ? 0 : -1;
}

/* Each shard: an 8-byte header length, the header padded to 8, then its tensors' bytes. */
static int setup(void)
{
    static const uint8_t bytes[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
    char path[128], sub[128];

    snprintf(dir, sizeof(dir), "/tmp/wsd-fuzz-index-XXXXXX");
    if (!mkdtemp(dir))
        return -1;
    atexit(remove_dir);
    snprintf(sub, sizeof(sub), "%s/sub", dir);
    if (mkdir(sub, 0700) < 0)
        return -1;
    for (size_t i = 0; i < NSHARDS; i++) {
        size_t h = strlen(shards[i].header), padded = (h + 7) & ~(size_t)7;
        uint8_t buf[512] = {0};
        uint64_t end = 0;

        if (padded + 8 > sizeof(buf))
            return -1;
        for (int b = 0; b < 8; b++)
            buf[b] = (uint8_t)((uint64_t)padded >> (8 * b));
        memcpy(buf + 8, shards[i].header, h);
        memset(buf + 8 + h, ' ', padded - h);
        end = strstr(shards[i].header, "[8,12]") ? 12 : strstr(shards[i].header, "[0,8]") ? 8 : 4;
        snprintf(path, sizeof(path), "%s/%s", dir, shards[i].file);
        if (write_file(path, buf, 8 + padded, bytes, (size_t)end) < 0)
            return -1;
    }
    return 0;
}

/* The shard holding tensor \p name, or -1 for a name no shard has. */
static int shard_of(const char *name)
{
    for (size_t i = 0; i < NSHARDS; i++) {
        char quoted[80];

        snprintf(quoted, sizeof(quoted), "\"%s\":{\"dtype\"", name);
        if (strlen(name) < 64 && strstr(shards[i].header, quoted))
            return (int)i;
    }
    return -1;
}

static void check_accepted(const manifest_t *m, const source_t *src, size_t nsrc)
{
    if (m->ntensors == 0 || m->ntensors > 5 || nsrc == 0 || nsrc > NSHARDS)
        abort();
    for (size_t i = 0; i < m->ntensors; i++) {
        const mf_tensor_t *t = &m->tensors[i];
        int want = shard_of(t->name);
        const char *path;

        if (want < 0 || t->storage >= m->nstorages)
            abort(); /* a tensor no shard holds */
        path = src[m->storages[t->storage].source].path;
        if (!strstr(path, strrchr(shards[want].file, '/') ? strrchr(shards[want].file, '/') + 1
                                                          : shards[want].file))
            abort(); /* served from another shard than its own */
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int ready;
    fmt_err_t err = {0};
    manifest_t *m = NULL;
    source_t *src = NULL;
    size_t nsrc = 0;
    char path[128];
    int r;

    if (!ready) {
        if (setup() < 0) {
            perror("fuzz-index: cannot set up the shard directory");
            abort();
        }
        ready = 1;
    }
    snprintf(path, sizeof(path), "%s/model.safetensors.index.json", dir);
    if (write_file(path, data, size, NULL, 0) < 0)
        abort();
    r = index_load(path, NULL, &m, &src, &nsrc, &err);
    if (getenv("WSD_FUZZ_VERBOSE")) /* to see what the seeds reach */
        fprintf(stderr, "%s\n", r == 0 ? "accepted" : err.msg);
    if (r == 0) {
        check_accepted(m, src, nsrc);
        for (size_t i = 0; i < nsrc; i++)
            source_close(&src[i]);
        free(src);
        manifest_free(m);
    } else if (err.code == 0 || (err.code != -ENOMEM && strncmp(err.msg, "E_", 2) != 0)) {
        fprintf(stderr, "rejection without a rule: %s\n", err.msg);
        abort();
    }
    return 0;
}
