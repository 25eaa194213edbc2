/*
 * info.h - the tensor list of `info` as JSON text, written straight from a ready model's packed
 * manifest (the only form a ready model keeps). It is listed a page at a time, so a model of
 * 10^6 tensors can be read whole and no one request holds the event loop for long.
 */
#ifndef WSD_INFO_H
#define WSD_INFO_H

#include <stddef.h>
#include <stdint.h>

/* A growing text buffer, NUL-terminated once anything is put (cap > len then); zero-initialise,
 * free(p) when done. */
typedef struct info_text {
    char *p;
    size_t len, cap;
} info_text_t;

/* Appends \p n bytes. \retval 0 or -ENOMEM (the text is left as it was). */
int info_text_put(info_text_t *t, const char *s, size_t n);

/* Shortens the text to \p len bytes (no-op if it is not longer). */
void info_text_cut(info_text_t *t, size_t len);

/* Appends \p s (valid UTF-8 expected; other bytes become U+FFFD) as a JSON string. */
int info_text_put_string(info_text_t *t, const char *s, size_t n);

/* Where the last page ended: a reader asks for the next one, and the walk to it starts here
 * instead of at the first tensor. Zero-initialised it means the start. Valid only for the
 * packed manifest it was made on. */
typedef struct info_seek {
    uint64_t index; /* tensors before pos */
    size_t pos;     /* byte offset in the packed manifest */
} info_seek_t;

/*
 * Appends the JSON array of the packed Manifest \p pb's tensors from \p offset on, each
 * {"name", "dtype", "shape", "stride", "nbytes", "storage", "storage_offset"}: all of them
 * when \p limit is 0, else at most \p limit, and no more than keep the array within \p budget
 * bytes (the first one always goes in). *ret_count: how many were written. \p seek (NULL
 * or the one kept for \p pb) starts the walk nearer \p offset and is moved to the page's end.
 * \retval 0,
 *         WSD_EINVAL (\p offset past the last tensor),
 *         WSD_ELIMIT (\p limit 0 and the whole list is over \p budget),
 *         -EBADMSG (\p pb is not a well-formed Manifest), -ENOMEM.
 *         On failure \p out is left as it was.
 */
int info_tensors_json(const uint8_t *pb, size_t len, uint64_t offset, uint64_t limit, size_t budget,
                      info_text_t *out, uint64_t *ret_count, info_seek_t *seek);

#endif /* WSD_INFO_H */
