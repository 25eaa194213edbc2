/*
 * fmt.c - shared pieces of the checkpoint readers: error reports, content sniffing (FORMATS.md
 * §1) and fmt_load(), which picks the reader for a path. The source file itself is source.c.
 */
#include "fmt.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "index.h"

int fmt_fail(fmt_err_t *err, int code, const char *rule, const char *fmt, ...)
{
    va_list ap;
    int n = 0;

    if (!err || err->code != 0)
        return code;
    err->code = code;
    if (rule)
        n = snprintf(err->msg, sizeof(err->msg), "%s: ", rule);
    if (n < 0 || (size_t)n >= sizeof(err->msg))
        n = 0;
    va_start(ap, fmt);
    (void)vsnprintf(err->msg + n, sizeof(err->msg) - (size_t)n, fmt, ap);
    va_end(ap);
    return code;
}

void fmt_warn(manifest_t *m, const char *rule, const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    int n;

    if (m->nwarnings >= MANIFEST_WARNINGS_MAX)
        return;
    n = snprintf(buf, sizeof(buf), "%s: ", rule);
    if (n < 0 || (size_t)n >= sizeof(buf))
        n = 0;
    va_start(ap, fmt);
    (void)vsnprintf(buf + n, sizeof(buf) - (size_t)n, fmt, ap);
    va_end(ap);
    m->warnings[m->nwarnings] = strdup(buf);
    if (m->warnings[m->nwarnings])
        m->nwarnings++;
    else
        m->warnings_lost = true;
}

int fmt_detect(const source_t *s, fmt_kind_t *ret_kind, fmt_err_t *err)
{
    uint8_t head[264];
    size_t n = s->size < sizeof(head) ? (size_t)s->size : sizeof(head);
    uint64_t hlen = 0;
    int r;

    if (s->size < 8)
        return fmt_fail(err, WSD_EBADCKPT, "E_TOO_SMALL",
                        "'%s': %llu bytes is too small to be a checkpoint", s->path,
                        (unsigned long long)s->size);
    r = source_pread(s, head, n, 0, err);
    if (r < 0)
        return r;
    if (memcmp(head, "PK\x03\x04", 4) == 0) {
        *ret_kind = FMT_TORCH_ZIP;
        return 0;
    }
    if (memcmp(head, "PYTORCH1", 8) == 0)
        return fmt_fail(err, WSD_EBADCKPT, "E_TORCH_PREVIEW",
                        "'%s': unsupported archive format from the PyTorch 1.0 preview release; "
                        "re-save it with torch >= 1.6",
                        s->path);
    /*
     * Safetensors (FORMATS.md §1 rule 6) is tested before the legacy pickle's 0x80 (rule 4),
     * not after: a header length whose low byte is 0x80 (128, 384, 640, ... bytes; about one
     * safetensors file in 32, as writers pad headers to 8) starts the file with 0x80 too. The
     * other way round cannot collide: a legacy stream's first eight bytes as a length are far
     * above the 100 MB cap (protocol 2's magic reads as 0x469cfc6c0a8a0280), and byte 8 is
     * never '{' there.
     */
    for (int i = 7; i >= 0; i--)
        hlen = hlen << 8 | head[i];
    if (hlen >= 2 && hlen <= 100000000ull && hlen + 8 <= s->size) {
        size_t i = 8;

        while (i < n && (head[i] == ' ' || head[i] == '\t' || head[i] == '\n' || head[i] == '\r'))
            i++;
        if (i < n && head[i] == '{') {
            *ret_kind = FMT_SAFETENSORS;
            return 0;
        }
    }
    if (head[0] == 0x80)
        return fmt_fail(err, WSD_EBADCKPT, "E_LEGACY_TORCH",
                        "'%s': legacy PyTorch format (pre-1.6 or _use_new_zipfile_serialization="
                        "False); re-save with torch>=1.6 or convert to safetensors",
                        s->path);
    if (n >= 262 && memcmp(head + 257, "ustar", 5) == 0)
        return fmt_fail(err, WSD_EBADCKPT, "E_LEGACY_TORCH",
                        "'%s': tar container of PyTorch < 0.1.10; re-save with torch>=1.6",
                        s->path);
    if (memcmp(head, "GGUF", 4) == 0)
        return fmt_fail(err, WSD_EBADCKPT, "E_UNKNOWN_FORMAT", "'%s' is a GGUF file, not supported",
                        s->path);
    if (memcmp(head, "\x93NUMPY", 6) == 0)
        return fmt_fail(err, WSD_EBADCKPT, "E_UNKNOWN_FORMAT", "'%s' is a NumPy .npy file",
                        s->path);
    if (memcmp(head, "\x89HDF\r\n\x1a\n", 8) == 0)
        return fmt_fail(err, WSD_EBADCKPT, "E_UNKNOWN_FORMAT", "'%s' is an HDF5 file", s->path);
    return fmt_fail(err, WSD_EBADCKPT, "E_UNKNOWN_FORMAT",
                    "'%s' is neither a safetensors file nor a torch.save zip archive", s->path);
}

static bool ends_with(const char *s, const char *suffix)
{
    size_t a = strlen(s), b = strlen(suffix);

    return a >= b && strcmp(s + a - b, suffix) == 0;
}

int fmt_load(const char *path, const fmt_opts_t *opts, manifest_t **ret_m, source_t **ret_sources,
             size_t *ret_nsources, fmt_err_t *err)
{
    manifest_t *m = NULL;
    source_t *src = NULL;
    fmt_kind_t kind;
    int r;

    /* HF index files: model.safetensors.index.json, pytorch_model.bin.index.json and variants
     * such as model.safetensors.index.fp16.json. */
    const char *base = strrchr(path, '/');

    base = base ? base + 1 : path;
    if (ends_with(base, ".json") && strstr(base, ".index."))
        return index_load(path, opts, ret_m, ret_sources, ret_nsources, err);

    m = manifest_new();
    src = calloc(1, sizeof(*src));
    if (!m || !src) {
        r = fmt_fail(err, -ENOMEM, NULL, "out of memory");
        goto fail;
    }
    src->fd = -1;
    r = source_open(path, src, err);
    if (r < 0)
        goto fail;
    (void)source_cache_policy(src, opts ? opts->page_cache : SOURCE_CACHE_KEEP);
    r = fmt_detect(src, &kind, err);
    if (r < 0)
        goto fail;
    if (kind == FMT_SAFETENSORS) {
        if (opts && opts->key) {
            r = fmt_fail(err, WSD_EINVAL, "E_KEY", "--key applies to torch checkpoints only; "
                                                   "'%s' is safetensors", path);
            goto fail;
        }
        snprintf(m->format, sizeof(m->format), "safetensors");
        r = safetensors_read(src, 0, m, err);
    } else {
        snprintf(m->format, sizeof(m->format), "torch");
        r = torch_read(src, 0, opts ? opts->key : NULL, m, err);
    }
    if (r < 0)
        goto fail;
    r = manifest_validate(m, err);
    if (r < 0)
        goto fail;
    *ret_m = m;
    *ret_sources = src;
    *ret_nsources = 1;
    return 0;

fail:
    if (src)
        source_close(src);
    free(src);
    manifest_free(m);
    return r;
}
