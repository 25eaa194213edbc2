/*
 * zip.c - the strict zip directory reader behind torch_read() (FORMATS.md §2.3, §2.7).
 *
 * It owns nothing but the zip_t it fills. In file order:
 *   - little-endian field access and printable names for error messages;
 *   - the end records: EOCD (bounded backward search), ZIP64 locator and record, and their
 *     consistency with each other;
 *   - central entries: names, flags, method, the ZIP64 extra field;
 *   - local headers, which must agree with their central entries, and the data offsets they give;
 *   - the overlap check over every record's [local header, data end) range;
 *   - the name index and zip_read().
 *
 * Compression policy: records may be stored (0) or deflated (8); zip_read() inflates a deflated
 * record into owned memory (only small records such as data.pkl are ever read that way; torch.c
 * refuses deflated storages with E_ZIP_COMPRESSED_STORAGE because they cannot be served from the
 * file). Every other method is rejected here, as miniz (torch's reader) would.
 */
#include "zip.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "checked.h"
#include "strhash.h"

#define SIG_LOCAL    0x04034b50u
#define SIG_CENTRAL  0x02014b50u
#define SIG_EOCD     0x06054b50u
#define SIG_Z64_LOC  0x07064b50u
#define SIG_Z64_EOCD 0x06064b50u

#define EOCD_LEN     22u
#define Z64_LOC_LEN  20u
#define Z64_EOCD_LEN 56u
#define CENTRAL_LEN  46u
#define LOCAL_LEN    30u
#define COMMENT_MAX  65535u

#define SAT16 0xffffu
#define SAT32 0xffffffffu

/* Flag bits: 0 = encrypted, 6 = strong encryption, 13 = central directory encrypted. */
#define FLAG_ENCRYPTED  (1u << 0 | 1u << 6 | 1u << 13)
#define FLAG_DESCRIPTOR (1u << 3)

static uint16_t le16(const uint8_t *p)
{
    return (uint16_t)(p[0] | p[1] << 8);
}

static uint32_t le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t le64(const uint8_t *p)
{
    return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32;
}

/* Copies a record name for an error message, replacing bytes that would garble a log line. */
static const char *printable(char *dst, size_t cap, const uint8_t *src, size_t len)
{
    size_t n = len < cap - 1 ? len : cap - 1;

    for (size_t i = 0; i < n; i++)
        dst[i] = src[i] >= 0x20 && src[i] < 0x7f ? (char)src[i] : '?';
    dst[n] = '\0';
    return dst;
}

/* What the end records say, after ZIP64 values replaced saturated ones. */
struct end_info {
    uint64_t nentries;
    uint64_t cd_offset;
    uint64_t cd_size;
    uint64_t end_start; /* where the end records begin: the central directory must end here */
    bool zip64;
};

/*
 * Finds the EOCD: the last "PK\5\6" in the final 22 + 65535 bytes whose comment length makes it
 * end exactly at the end of the file. Requiring that exact fit rejects trailing bytes after the
 * archive (M8) and signatures that merely occur inside a comment.
 */
static int find_eocd(const source_t *s, uint8_t eocd[EOCD_LEN], uint64_t *ret_pos,
                     fmt_err_t *err)
{
    uint64_t tail = s->size < EOCD_LEN + COMMENT_MAX ? s->size : EOCD_LEN + COMMENT_MAX;
    uint8_t *buf;
    int r;

    if (s->size < EOCD_LEN)
        return fmt_fail(err, WSD_EBADCKPT, "E_ZIP_NO_EOCD",
                        "'%s': no end of central directory (%llu bytes is too short; truncated "
                        "download?)",
                        s->path, (unsigned long long)s->size);
    buf = malloc((size_t)tail);
    if (!buf)
        return fmt_fail(err, -ENOMEM, NULL, "out of memory");
    r = source_pread(s, buf, (size_t)tail, s->size - tail, err);
    if (r < 0) {
        free(buf);
        return r;
    }
    for (size_t i = (size_t)(tail - EOCD_LEN);; i--) {
        if (le32(buf + i) == SIG_EOCD && i + EOCD_LEN + le16(buf + i + 20) == tail) {
            memcpy(eocd, buf + i, EOCD_LEN);
            *ret_pos = s->size - tail + i;
            free(buf);
            return 0;
        }
        if (i == 0)
            break;
    }
    free(buf);
    return fmt_fail(err, WSD_EBADCKPT, "E_ZIP_NO_EOCD",
                    "'%s': no end of central directory record at the end of the file (truncated "
                    "download, or bytes appended after the archive)",
                    s->path);
}

/* A 16/32-bit EOCD field saturated to its maximum defers to the ZIP64 value; otherwise the two
 * must agree, so a reader that ignores ZIP64 cannot see a different archive (M21). */
static bool z64_agrees(uint64_t eocd_val, uint64_t sat, uint64_t z64_val)
{
    return eocd_val == sat || eocd_val == z64_val;
}

static int read_end(const source_t *s, struct end_info *ret, fmt_err_t *err)
{
    uint8_t e[EOCD_LEN] = {0}, loc[Z64_LOC_LEN] = {0}, z[Z64_EOCD_LEN] = {0};
    uint64_t pos = 0, disk, cd_disk, n_disk, n_total, cd_size, cd_off;
    int r;

    r = find_eocd(s, e, &pos, err);
    if (r < 0)
        return r;
    disk = le16(e + 4);
    cd_disk = le16(e + 6);
    n_disk = le16(e + 8);
    n_total = le16(e + 10);
    cd_size = le32(e + 12);
    cd_off = le32(e + 16);
    memset(ret, 0, sizeof(*ret));
    ret->end_start = pos;

    if (pos >= Z64_LOC_LEN) {
        r = source_pread(s, loc, sizeof(loc), pos - Z64_LOC_LEN, err);
        if (r < 0)
            return r;
    }
    if (pos >= Z64_LOC_LEN && le32(loc) == SIG_Z64_LOC) {
        uint64_t z64_off = le64(loc + 8), rem, z_end;
        uint64_t loc_pos = pos - Z64_LOC_LEN;

        if (le32(loc + 4) != 0 || le32(loc + 16) > 1)
            return fmt_fail(err, WSD_EBADCKPT, "E_ZIP_MULTIDISK",
                            "'%s': ZIP64 locator names disk %u of %u; multi-disk archives are "
                            "not supported",
                            s->path, le32(loc + 4), le32(loc + 16));
        if (z64_off > loc_pos || loc_pos - z64_off < Z64_EOCD_LEN)
            return fmt_fail(err, WSD_EBADCKPT, "E_ZIP_BAD_ZIP64",
                            "'%s': ZIP64 end record offset %llu does not leave room for the "
                            "record before the locator at %llu",
                            s->path, (unsigned long long)z64_off, (unsigned long long)loc_pos);
        r = source_pread(s, z, sizeof(z), z64_off, err);
        if (r < 0)
            return r;
        rem = le64(z + 4);
        if (le32(z) != SIG_Z64_EOCD || rem < Z64_EOCD_LEN - 12 ||
            !ck_add_u64(z64_off, 12, &z_end) || !ck_add_u64(z_end, rem, &z_end) ||
            z_end != loc_pos)
            return fmt_fail(err, WSD_EBADCKPT, "E_ZIP_BAD_ZIP64",
                            "'%s': no valid ZIP64 end record at offset %llu (signature %08x, "
                            "size %llu, locator at %llu)",
                            s->path, (unsigned long long)z64_off, le32(z),
                            (unsigned long long)rem, (unsigned long long)loc_pos);
        if (!z64_agrees(disk, SAT16, le32(z + 16)) || !z64_agrees(cd_disk, SAT16, le32(z + 20)) ||
            !z64_agrees(n_disk, SAT16, le64(z + 24)) || !z64_agrees(n_total, SAT16, le64(z + 32)) ||
            !z64_agrees(cd_size, SAT32, le64(z + 40)) || !z64_agrees(cd_off, SAT32, le64(z + 48)))
            return fmt_fail(err, WSD_EBADCKPT, "E_ZIP_BAD_ZIP64",
                            "'%s': end of central directory and ZIP64 end record disagree on "
                            "entry counts, directory size or offset",
                            s->path);
        disk = le32(z + 16);
        cd_disk = le32(z + 20);
        n_disk = le64(z + 24);
        n_total = le64(z + 32);
        cd_size = le64(z + 40);
        cd_off = le64(z + 48);
        ret->zip64 = true;
        ret->end_start = z64_off;
    } else if (n_total == SAT16 || n_disk == SAT16 || cd_size == SAT32 || cd_off == SAT32) {
        return fmt_fail(err, WSD_EBADCKPT, "E_ZIP_BAD_ZIP64",
                        "'%s': end of central directory defers to ZIP64 values but there is no "
                        "ZIP64 locator before it",
                        s->path);
    }
    if (disk != 0 || cd_disk != 0 || n_disk != n_total)
        return fmt_fail(err, WSD_EBADCKPT, "E_ZIP_MULTIDISK",
                        "'%s': archive spans disks (disk %llu, directory on disk %llu, %llu of "
                        "%llu entries here); multi-disk archives are not supported",
                        s->path, (unsigned long long)disk, (unsigned long long)cd_disk,
                        (unsigned long long)n_disk, (unsigned long long)n_total);
    ret->nentries = n_total;
    ret->cd_offset = cd_off;
    ret->cd_size = cd_size;
    return 0;
}

/* Rejects names that are empty, too long, hold NUL, are absolute, or climb with "..". */
static int check_name(const source_t *s, const uint8_t *name, size_t len, fmt_err_t *err)
{
    char shown[128];
    size_t start = 0;

    if (len == 0)
        return fmt_fail(err, WSD_EBADCKPT, "E_ZIP_BAD_NAME", "'%s': record with an empty name",
                        s->path);
    if (len > ZIP_NAME_MAX)
        return fmt_fail(err, WSD_EBADCKPT, "E_ZIP_LIMIT",
                        "'%s': record name of %zu bytes (at most %u)", s->path, len, ZIP_NAME_MAX);
    printable(shown, sizeof(shown), name, len);
    if (memchr(name, '\0', len))
        return fmt_fail(err, WSD_EBADCKPT, "E_ZIP_BAD_NAME",
                        "'%s': record name '%s' contains a NUL byte", s->path, shown);
    if (name[0] == '/' || name[0] == '\\')
        return fmt_fail(err, WSD_EBADCKPT, "E_ZIP_BAD_NAME",
                        "'%s': record name '%s' is absolute", s->path, shown);
    for (size_t i = 0; i <= len; i++) {
        if (i < len && name[i] != '/' && name[i] != '\\')
            continue;
        if (i - start == 2 && name[start] == '.' && name[start + 1] == '.')
            return fmt_fail(err, WSD_EBADCKPT, "E_ZIP_BAD_NAME",
                            "'%s': record name '%s' has a '..' component", s->path, shown);
        start = i + 1;
    }
    return 0;
}

/*
 * Resolves the ZIP64 extended-information field of one central entry: it holds, in order, only
 * the fields whose 32-bit value is saturated (a saturated 16-bit disk number, the last of them,
 * never gets here: see parse_central). Other extra fields are skipped, but every field header
 * must lie inside the extra area.
 */
static int parse_extra(const source_t *s, const char *shown, const uint8_t *x, size_t xlen,
                       uint64_t *usize, uint64_t *csize, uint64_t *lho, fmt_err_t *err)
{
    bool need_u = *usize == SAT32, need_c = *csize == SAT32, need_l = *lho == SAT32;
    bool seen = false;
    size_t off = 0;

    while (off < xlen) {
        uint16_t id, sz;
        size_t p = 0;

        if (xlen - off < 4)
            return fmt_fail(err, WSD_EBADCKPT, "E_ZIP_ENTRY_OOB",
                            "'%s': record '%s': %zu stray bytes at the end of its extra field",
                            s->path, shown, xlen - off);
        id = le16(x + off);
        sz = le16(x + off + 2);
        off += 4;
        if (sz > xlen - off)
            return fmt_fail(err, WSD_EBADCKPT, "E_ZIP_ENTRY_OOB",
                            "'%s': record '%s': extra block 0x%04x of %u bytes runs past the "
                            "end of its extra field (%zu bytes left)",
                            s->path, shown, id, sz, xlen - off);
        if (id == 0x0001) {
            size_t want = (need_u ? 8 : 0) + (need_c ? 8 : 0) + (need_l ? 8 : 0);

            if (seen)
                return fmt_fail(err, WSD_EBADCKPT, "E_ZIP_BAD_ZIP64",
                                "'%s': record '%s': a second ZIP64 extra field", s->path, shown);
            if (sz < want)
                return fmt_fail(err, WSD_EBADCKPT, "E_ZIP_BAD_ZIP64",
                                "'%s': record '%s': short ZIP64 extra field (%u bytes, %zu needed)",
                                s->path, shown, sz, want);
            seen = true;
            if (need_u) {
                *usize = le64(x + off + p);
                p += 8;
            }
            if (need_c) {
                *csize = le64(x + off + p);
                p += 8;
            }
            if (need_l)
                *lho = le64(x + off + p);
        }
        off += sz;
    }
    if (!seen && (need_u || need_c || need_l))
        return fmt_fail(err, WSD_EBADCKPT, "E_ZIP_BAD_ZIP64",
                        "'%s': record '%s' has saturated sizes or offset but no ZIP64 extra field",
                        s->path, shown);
    return 0;
}

/* Parses the central entry at cd[*pos], appending its name to names at *names_used. */
static int parse_central(const source_t *s, const uint8_t *cd, uint64_t cd_size, uint64_t *pos,
                         zip_entry_t *e, char *names, size_t *names_used, fmt_err_t *err)
{
    const uint8_t *h = cd + *pos;
    uint64_t usize, csize, lho, disk, left = cd_size - *pos;
    uint16_t nlen, xlen, clen;
    char shown[128];
    int r;

    if (left < CENTRAL_LEN || le32(h) != SIG_CENTRAL)
        return fmt_fail(err, WSD_EBADCKPT, "E_ZIP_ENTRY_OOB",
                        "'%s': central directory entry at offset %llu is %s", s->path,
                        (unsigned long long)(*pos), left < CENTRAL_LEN ? "cut short"
                                                                       : "missing its signature");
    nlen = le16(h + 28);
    xlen = le16(h + 30);
    clen = le16(h + 32);
    if ((uint64_t)CENTRAL_LEN + nlen + xlen + clen > left)
        return fmt_fail(err, WSD_EBADCKPT, "E_ZIP_ENTRY_OOB",
                        "'%s': central directory entry at offset %llu: name, extra and comment "
                        "(%u+%u+%u bytes) run past the directory",
                        s->path, (unsigned long long)(*pos), nlen, xlen, clen);
    r = check_name(s, h + CENTRAL_LEN, nlen, err);
    if (r < 0)
        return r;
    printable(shown, sizeof(shown), h + CENTRAL_LEN, nlen);
    e->flags = le16(h + 8);
    e->method = le16(h + 10);
    e->crc32 = le32(h + 16);
    csize = le32(h + 20);
    usize = le32(h + 24);
    disk = le16(h + 34);
    lho = le32(h + 42);
    if (e->flags & FLAG_ENCRYPTED)
        return fmt_fail(err, WSD_EBADCKPT, "E_ZIP_ENCRYPTED",
                        "'%s': record '%s' is encrypted (flags 0x%04x)", s->path, shown, e->flags);
    if (e->method != ZIP_METHOD_STORED && e->method != ZIP_METHOD_DEFLATE)
        return fmt_fail(err, WSD_EBADCKPT, "E_ZIP_METHOD",
                        "'%s': record '%s' uses compression method %u; only stored (0) and "
                        "deflate (8) are understood",
                        s->path, shown, e->method);
    /* 0xFFFF would defer to a ZIP64 disk number, but torch's reader (miniz) refuses it as
     * multi-disk whatever that says, so it is refused here too. */
    if (disk != 0)
        return fmt_fail(err, WSD_EBADCKPT, "E_ZIP_MULTIDISK",
                        "'%s': record '%s' starts on disk %llu%s", s->path, shown,
                        (unsigned long long)disk, disk == SAT16 ? " (0xFFFF: refused by torch "
                                                                  "as multi-disk too)" : "");
    r = parse_extra(s, shown, h + CENTRAL_LEN + nlen, xlen, &usize, &csize, &lho, err);
    if (r < 0)
        return r;
    if (e->method == ZIP_METHOD_STORED && csize != usize)
        return fmt_fail(err, WSD_EBADCKPT, "E_ZIP_ENTRY_SIZE",
                        "'%s': stored record '%s' has compressed size %llu but size %llu",
                        s->path, shown, (unsigned long long)csize, (unsigned long long)usize);
    memcpy(names + *names_used, h + CENTRAL_LEN, nlen);
    names[*names_used + nlen] = '\0';
    e->name = names + *names_used;
    e->name_len = nlen;
    e->csize = csize;
    e->usize = usize;
    e->lho = lho;
    *names_used += (size_t)nlen + 1;
    *pos += (uint64_t)CENTRAL_LEN + nlen + xlen + clen;
    return 0;
}

/* A local value is fine if it equals the central one, defers to a ZIP64 extra (0xFFFFFFFF), or
 * is 0 because a data descriptor follows (what torch writes: its local CRC and sizes are 0). */
static bool local_agrees(uint32_t local, uint64_t central, bool descriptor)
{
    return local == central || local == SAT32 || (descriptor && local == 0);
}

/*
 * The local headers are read through a window of the file: torch.save puts each small record's
 * header a few dozen bytes after the previous one's, so one read serves many (a checkpoint of
 * 10^5 tensors made 10^5 reads of 30-odd bytes). The window never reaches past the central
 * directory, which the caller checked the header ends before.
 */
#define WINDOW_LEN (16u << 10) /* >= LOCAL_LEN + ZIP_NAME_MAX */

typedef struct window {
    uint8_t *buf; /* WINDOW_LEN bytes */
    uint64_t off;
    size_t len;
} window_t;

static int window_get(const source_t *s, const zip_t *z, window_t *w, uint64_t off, size_t n,
                      const uint8_t **ret, fmt_err_t *err)
{
    uint64_t left = z->cd_offset - off; /* off + n <= cd_offset */
    size_t len = left < WINDOW_LEN ? (size_t)left : WINDOW_LEN;
    int r;

    if (off < w->off || off - w->off > w->len || n > w->len - (off - w->off)) {
        r = source_pread(s, w->buf, len, off, err);
        if (r < 0)
            return r;
        w->off = off;
        w->len = len;
    }
    *ret = w->buf + (off - w->off);
    return 0;
}

/*
 * Reads the local header of \p e and checks it against the central entry: signature, name,
 * method, encryption, and (unless a data descriptor follows) CRC and sizes. Sets data_offset and
 * checks the data lies before the central directory.
 */
static int check_local(const source_t *s, const zip_t *z, zip_entry_t *e, window_t *w,
                       fmt_err_t *err)
{
    const uint8_t *buf;
    uint64_t end, data_end;
    uint16_t lflags, lnlen, lxlen;
    bool dd;
    int r;

    if (!ck_add_u64(e->lho, LOCAL_LEN + e->name_len, &end) || end > z->cd_offset)
        return fmt_fail(err, WSD_EBADCKPT, "E_ZIP_ENTRY_OOB",
                        "'%s': record '%s': local header at %llu lies past the central "
                        "directory (%llu)",
                        s->path, e->name, (unsigned long long)e->lho,
                        (unsigned long long)z->cd_offset);
    r = window_get(s, z, w, e->lho, LOCAL_LEN + e->name_len, &buf, err);
    if (r < 0)
        return r;
    if (le32(buf) != SIG_LOCAL)
        return fmt_fail(err, WSD_EBADCKPT, "E_ZIP_LOCAL_MISMATCH",
                        "'%s': record '%s': no local header signature at offset %llu", s->path,
                        e->name, (unsigned long long)e->lho);
    lflags = le16(buf + 6);
    lnlen = le16(buf + 26);
    lxlen = le16(buf + 28);
    dd = (lflags & FLAG_DESCRIPTOR) != 0;
    if (lnlen != e->name_len || memcmp(buf + LOCAL_LEN, e->name, e->name_len) != 0)
        return fmt_fail(err, WSD_EBADCKPT, "E_ZIP_LOCAL_MISMATCH",
                        "'%s': record '%s': local header at %llu carries a different name",
                        s->path, e->name, (unsigned long long)e->lho);
    if (lflags & FLAG_ENCRYPTED)
        return fmt_fail(err, WSD_EBADCKPT, "E_ZIP_ENCRYPTED",
                        "'%s': record '%s': local header says encrypted (flags 0x%04x)", s->path,
                        e->name, lflags);
    if (le16(buf + 8) != e->method)
        return fmt_fail(err, WSD_EBADCKPT, "E_ZIP_LOCAL_MISMATCH",
                        "'%s': record '%s': local header method %u, central directory %u",
                        s->path, e->name, le16(buf + 8), e->method);
    if (!local_agrees(le32(buf + 14), e->crc32, dd) ||
        !local_agrees(le32(buf + 18), e->csize, dd) || !local_agrees(le32(buf + 22), e->usize, dd))
        return fmt_fail(err, WSD_EBADCKPT, "E_ZIP_LOCAL_MISMATCH",
                        "'%s': record '%s': local header CRC or sizes (%08x, %u, %u) disagree "
                        "with the central directory (%08x, %llu, %llu)",
                        s->path, e->name, le32(buf + 14), le32(buf + 18), le32(buf + 22),
                        e->crc32, (unsigned long long)e->csize, (unsigned long long)e->usize);
    e->data_offset = e->lho + LOCAL_LEN + lnlen + lxlen; /* <= cd_offset + 65535: no overflow */
    if (!ck_add_u64(e->data_offset, e->csize, &data_end) || data_end > z->cd_offset)
        return fmt_fail(err, WSD_EBADCKPT, "E_ZIP_ENTRY_OOB",
                        "'%s': record '%s': %llu bytes at offset %llu run past the central "
                        "directory (%llu)",
                        s->path, e->name, (unsigned long long)e->csize,
                        (unsigned long long)e->data_offset, (unsigned long long)z->cd_offset);
    return 0;
}

struct range {
    uint64_t start, end; /* [local header, data end) */
    uint32_t idx;
};

static int range_cmp(const void *a, const void *b)
{
    const struct range *x = a, *y = b;

    if (x->start != y->start)
        return x->start < y->start ? -1 : 1;
    return 0;
}

/* No two records may share bytes (the overlapping-entry "zip bomb", M7); O(n log n). */
static int check_overlaps(const source_t *s, const zip_t *z, fmt_err_t *err)
{
    struct range *rg = malloc(z->nentries * sizeof(*rg));
    int r = 0;

    if (!rg)
        return fmt_fail(err, -ENOMEM, NULL, "out of memory");
    for (size_t i = 0; i < z->nentries; i++) {
        rg[i].start = z->entries[i].lho;
        rg[i].end = z->entries[i].data_offset + z->entries[i].csize;
        rg[i].idx = (uint32_t)i;
    }
    qsort(rg, z->nentries, sizeof(*rg), range_cmp);
    for (size_t i = 1; i < z->nentries; i++) {
        if (rg[i].start < rg[i - 1].end) {
            r = fmt_fail(err, WSD_EBADCKPT, "E_ZIP_OVERLAP",
                         "'%s': records '%s' (bytes %llu..%llu) and '%s' (from %llu) overlap",
                         s->path, z->entries[rg[i - 1].idx].name,
                         (unsigned long long)rg[i - 1].start, (unsigned long long)rg[i - 1].end,
                         z->entries[rg[i].idx].name, (unsigned long long)rg[i].start);
            break;
        }
    }
    free(rg);
    return r;
}

static int build_index(const source_t *s, zip_t *z, fmt_err_t *err)
{
    size_t cap = 16;

    while (cap < z->nentries * 2)
        cap *= 2;
    z->slots = malloc(cap * sizeof(*z->slots));
    if (!z->slots)
        return fmt_fail(err, -ENOMEM, NULL, "out of memory");
    memset(z->slots, 0xff, cap * sizeof(*z->slots));
    z->nslots = cap;
    for (size_t i = 0; i < z->nentries; i++) {
        const zip_entry_t *e = &z->entries[i];
        size_t h = (size_t)strhash(e->name, e->name_len) & (cap - 1);

        while (z->slots[h] != UINT32_MAX) {
            const zip_entry_t *o = &z->entries[z->slots[h]];

            /* torch 1.13 reads the first duplicate and Python's zipfile the last (§2.7). */
            if (o->name_len == e->name_len && memcmp(o->name, e->name, e->name_len) == 0)
                return fmt_fail(err, WSD_EBADCKPT, "E_ZIP_DUP_NAME",
                                "'%s': record '%s' appears twice (entries %u and %zu); readers "
                                "disagree on which one counts",
                                s->path, e->name, z->slots[h], i);
            h = (h + 1) & (cap - 1);
        }
        z->slots[h] = (uint32_t)i;
    }
    return 0;
}

const zip_entry_t *zip_find(const zip_t *z, const char *name)
{
    size_t n = strlen(name), h;

    if (!z->nslots)
        return NULL;
    h = (size_t)strhash(name, n) & (z->nslots - 1);
    while (z->slots[h] != UINT32_MAX) {
        const zip_entry_t *e = &z->entries[z->slots[h]];

        if (e->name_len == n && memcmp(e->name, name, n) == 0)
            return e;
        h = (h + 1) & (z->nslots - 1);
    }
    return NULL;
}

void zip_close(zip_t *z)
{
    if (!z)
        return;
    free(z->entries);
    free(z->names);
    free(z->slots);
    memset(z, 0, sizeof(*z));
}

int zip_open(const source_t *s, zip_t *ret, fmt_err_t *err)
{
    zip_t z = {0};
    struct end_info end;
    uint8_t *cd = NULL;
    window_t win = {0};
    uint64_t pos = 0, cd_end;
    size_t names_used = 0;
    int r;

    r = read_end(s, &end, err);
    if (r < 0)
        return r;
    if (end.nentries == 0)
        return fmt_fail(err, WSD_EBADCKPT, "E_ZIP_EMPTY",
                        "'%s': archive does not contain any files", s->path);
    if (end.nentries > ZIP_ENTRIES_MAX || end.cd_size > ZIP_CD_MAX)
        return fmt_fail(err, WSD_EBADCKPT, "E_ZIP_LIMIT",
                        "'%s': %llu records in a %llu-byte central directory (limits: %u records, "
                        "%llu bytes)",
                        s->path, (unsigned long long)end.nentries,
                        (unsigned long long)end.cd_size, ZIP_ENTRIES_MAX,
                        (unsigned long long)ZIP_CD_MAX);
    if (!ck_add_u64(end.cd_offset, end.cd_size, &cd_end) || cd_end != end.end_start)
        return fmt_fail(err, WSD_EBADCKPT, "E_ZIP_ENTRY_OOB",
                        "'%s': central directory at %llu (%llu bytes) does not end where the end "
                        "records begin (%llu)",
                        s->path, (unsigned long long)end.cd_offset,
                        (unsigned long long)end.cd_size, (unsigned long long)end.end_start);
    /* Every entry takes at least 46 bytes: refuse counts the directory cannot hold before
     * allocating for them. */
    if (end.nentries > end.cd_size / CENTRAL_LEN)
        return fmt_fail(err, WSD_EBADCKPT, "E_ZIP_ENTRY_OOB",
                        "'%s': %llu records cannot fit in a %llu-byte central directory", s->path,
                        (unsigned long long)end.nentries, (unsigned long long)end.cd_size);
    z.cd_offset = end.cd_offset;
    z.cd_size = end.cd_size;
    z.zip64 = end.zip64;
    z.nentries = (size_t)end.nentries;
    cd = malloc((size_t)end.cd_size);
    z.names = malloc((size_t)end.cd_size); /* name + NUL <= 46 + name: always fits */
    z.entries = calloc(z.nentries, sizeof(*z.entries));
    win.buf = malloc(WINDOW_LEN);
    if (!cd || !z.names || !z.entries || !win.buf) {
        r = fmt_fail(err, -ENOMEM, NULL, "out of memory reading the zip directory");
        goto out;
    }
    r = source_pread(s, cd, (size_t)end.cd_size, end.cd_offset, err);
    if (r < 0)
        goto out;
    for (size_t i = 0; i < z.nentries; i++) {
        r = parse_central(s, cd, end.cd_size, &pos, &z.entries[i], z.names, &names_used, err);
        if (r < 0)
            goto out;
    }
    if (pos != end.cd_size) {
        r = fmt_fail(err, WSD_EBADCKPT, "E_ZIP_ENTRY_OOB",
                     "'%s': %llu bytes left in the central directory after its %zu entries",
                     s->path, (unsigned long long)(end.cd_size - pos), z.nentries);
        goto out;
    }
    r = build_index(s, &z, err);
    if (r < 0)
        goto out;
    for (size_t i = 0; i < z.nentries; i++) {
        r = check_local(s, &z, &z.entries[i], &win, err);
        if (r < 0)
            goto out;
    }
    r = check_overlaps(s, &z, err);
    if (r < 0)
        goto out;
    *ret = z;
    memset(&z, 0, sizeof(z));
out:
    free(cd);
    free(win.buf);
    zip_close(&z);
    return r;
}

static int inflate_record(const source_t *s, const zip_entry_t *e, uint8_t *out, fmt_err_t *err)
{
    z_stream zs;
    uint8_t *in;
    int r, zr;

    /* Deflate expands incompressible data by a few bytes per 16 KiB block; anything larger is
     * not a deflate stream of this record and would only make us allocate more. */
    if (e->csize > e->usize + e->usize / 16 + 1024)
        return fmt_fail(err, WSD_EBADCKPT, "E_ZIP_ENTRY_SIZE",
                        "'%s': deflated record '%s' is %llu bytes for %llu bytes of content",
                        s->path, e->name, (unsigned long long)e->csize,
                        (unsigned long long)e->usize);
    in = malloc(e->csize ? (size_t)e->csize : 1);
    if (!in)
        return fmt_fail(err, -ENOMEM, NULL, "out of memory");
    r = source_pread(s, in, (size_t)e->csize, e->data_offset, err);
    if (r < 0) {
        free(in);
        return r;
    }
    memset(&zs, 0, sizeof(zs));
    if (inflateInit2(&zs, -MAX_WBITS) != Z_OK) {
        free(in);
        return fmt_fail(err, -ENOMEM, NULL, "out of memory (zlib)");
    }
    zs.next_in = in;
    zs.avail_in = (uInt)e->csize;
    zs.next_out = out;
    zs.avail_out = (uInt)e->usize;
    zr = inflate(&zs, Z_FINISH);
    if (zr != Z_STREAM_END || zs.total_out != e->usize)
        r = fmt_fail(err, WSD_EBADCKPT, "E_ZIP_INFLATE",
                     "'%s': deflated record '%s' is corrupt or does not inflate to its declared "
                     "%llu bytes (zlib: %s)",
                     s->path, e->name, (unsigned long long)e->usize, zs.msg ? zs.msg : "size");
    inflateEnd(&zs);
    free(in);
    return r;
}

int zip_read(const source_t *s, const zip_entry_t *e, uint64_t max, uint8_t **ret_buf,
             fmt_err_t *err)
{
    uint8_t *buf;
    int r;

    if (e->usize > max)
        return fmt_fail(err, WSD_EBADCKPT, "E_ZIP_LIMIT",
                        "'%s': record '%s' holds %llu bytes, more than the %llu accepted", s->path,
                        e->name, (unsigned long long)e->usize, (unsigned long long)max);
    buf = malloc((size_t)e->usize + 1);
    if (!buf)
        return fmt_fail(err, -ENOMEM, NULL, "out of memory");
    if (e->method == ZIP_METHOD_STORED)
        r = source_pread(s, buf, (size_t)e->usize, e->data_offset, err);
    else
        r = inflate_record(s, e, buf, err);
    if (r == 0 && e->crc32 != 0 && crc32_z(0, buf, (size_t)e->usize) != e->crc32)
        r = fmt_fail(err, WSD_EBADCKPT, "E_ZIP_CRC",
                     "'%s': record '%s' does not match its CRC-32 %08x", s->path, e->name,
                     e->crc32);
    if (r < 0) {
        free(buf);
        return r;
    }
    buf[e->usize] = '\0';
    *ret_buf = buf;
    return 0;
}
