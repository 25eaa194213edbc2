/*
 * zip.h - a strict, read-only view of a zip archive's directory (FORMATS.md §2.3, §2.7), as
 * torch.save writes it: stored records, ZIP64 end records, data descriptors and "FB" padding.
 *
 * Everything comes through source_pread(); nothing is mapped. zip_open() checks the whole
 * directory before it returns (end records, every central entry, every local header, overlaps,
 * duplicate and unsafe names), so callers only look records up and read them.
 */
#ifndef WSD_ZIP_H
#define WSD_ZIP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "fmt.h"

/* Limits on what one archive may declare (M2, M19). */
#define ZIP_ENTRIES_MAX ((1u << 20) + 1024u) /* records: storages plus a few metadata records */
#define ZIP_NAME_MAX    4096u                /* bytes in one record name */
#define ZIP_CD_MAX      (256ull << 20)       /* bytes of central directory read into memory */

#define ZIP_METHOD_STORED  0
#define ZIP_METHOD_DEFLATE 8

typedef struct zip_entry {
    const char *name;     /* NUL-terminated, validated (no NUL, no leading '/', no ".."); owned
                           * by the zip_t */
    uint32_t name_len;    /* strlen(name) */
    uint16_t method;      /* ZIP_METHOD_STORED or ZIP_METHOD_DEFLATE (others are rejected) */
    uint16_t flags;       /* general-purpose flags from the central directory */
    uint32_t crc32;       /* CRC-32 from the central directory (0: not computed, or empty) */
    uint64_t csize;       /* bytes stored in the file (== usize for stored records) */
    uint64_t usize;       /* bytes after decompression */
    uint64_t lho;         /* offset of the local header */
    uint64_t data_offset; /* offset of the record's first data byte: lho + 30 + n' + m' */
} zip_entry_t;

typedef struct zip {
    zip_entry_t *entries; /* in central-directory order */
    size_t nentries;
    uint64_t cd_offset;   /* central directory: [cd_offset, cd_offset + cd_size) */
    uint64_t cd_size;
    bool zip64;           /* ZIP64 end records were present (torch always writes them) */
    char *names;          /* one allocation holding every entry's name */
    uint32_t *slots;      /* open-addressing name -> entry index table, UINT32_MAX = empty */
    size_t nslots;        /* power of two, >= 2 * nentries */
} zip_t;

/*
 * Reads and checks the directory of \p s. On success *ret holds the entries (free with
 * zip_close()); on failure nothing is allocated and \p err names the rule:
 * E_ZIP_NO_EOCD, E_ZIP_BAD_ZIP64, E_ZIP_MULTIDISK, E_ZIP_ENTRY_OOB, E_ZIP_OVERLAP,
 * E_ZIP_DUP_NAME, E_ZIP_BAD_NAME, E_ZIP_ENCRYPTED, E_ZIP_METHOD, E_ZIP_ENTRY_SIZE,
 * E_ZIP_LOCAL_MISMATCH, E_ZIP_EMPTY, E_ZIP_LIMIT.
 */
int zip_open(const source_t *s, zip_t *ret, fmt_err_t *err);
void zip_close(zip_t *z);

/* \retval the entry named exactly \p name, or NULL. O(1). */
const zip_entry_t *zip_find(const zip_t *z, const char *name);

/*
 * Reads a whole record into a new buffer of e->usize bytes (plus a NUL after it, not counted),
 * inflating a deflated one, and checks its CRC-32 unless the stored CRC is 0. Refuses records
 * whose usize exceeds \p max (rule E_ZIP_LIMIT). The caller frees *ret_buf.
 */
int zip_read(const source_t *s, const zip_entry_t *e, uint64_t max, uint8_t **ret_buf,
             fmt_err_t *err);

#endif /* WSD_ZIP_H */
