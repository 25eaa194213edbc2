/*
 * jscan.h - a strict JSON scanner for checkpoint headers, without a document tree.
 *
 * A safetensors header may be 100 MB of JSON with a million tensors. Parsed into jansson's
 * tree it took 1.6 GB and 10 s (FORMATS.md §4.6 warns of exactly this). jscan reads the text
 * where it lies instead, in two passes:
 *
 *   1. jscan_check() proves the whole text is one JSON object or array, of the dialect the
 *      daemon accepts (below), with no key repeated in any object. It allocates only the key
 *      list of the objects still open and a hash table at each object's end.
 *   2. The caller then walks the text with a jscan_t cursor, trusting its syntax: jscan_ws(),
 *      jscan_kind(), jscan_string(), jscan_uint(), jscan_skip().
 *
 * The dialect is what jansson accepted before (so no file changes verdict), and never more
 * than serde_json, the reference's parser, accepts: RFC 8259 JSON; the top level an object or
 * array; whitespace space, tab, LF, CR; strings without raw control characters, with every
 * escape well formed, surrogates only in pairs, and no \u0000 (jansson refuses it unless asked);
 * integers within int64; "-0" refused (serde reads it as the float -0.0, which the reference
 * then rejects as a shape or offset); reals that overflow a double refused; nesting at most 128
 * deep (serde's limit). Limits of our own: a number token of at most 4096 bytes, at most
 * JSCAN_MAX_KEYS keys in the objects open at one time. The text must already be valid UTF-8.
 */
#ifndef WSD_JSCAN_H
#define WSD_JSCAN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define JSCAN_MAX_DEPTH  128
#define JSCAN_MAX_NUMBER 4096
#define JSCAN_MAX_KEYS   (1u << 21) /* 2^20 tensors, their fields, metadata: with room */

typedef enum jscan_fail {
    JSCAN_SYNTAX = 1, /* not JSON, or not the dialect above */
    JSCAN_DUP,        /* a key repeated in one object */
    JSCAN_LIMIT,      /* JSCAN_MAX_KEYS */
    JSCAN_NOMEM,
} jscan_fail_t;

typedef struct jscan_err {
    jscan_fail_t kind;
    size_t at;     /* byte offset in the text */
    char msg[160]; /* what, without the offset */
} jscan_err_t;

/* The offset of the first byte that is not valid UTF-8 (see jscan.c), or len. */
size_t jscan_utf8(const uint8_t *p, size_t len);

/*
 * Pass 1. \retval 0 and *ret_members, the member count of the top-level object (0 for an
 * array), or -1 with \p err filled.
 */
int jscan_check(const uint8_t *p, size_t len, size_t *ret_members, jscan_err_t *err);

/* Pass 2: a cursor over text that jscan_check() accepted. */
typedef struct jscan {
    const uint8_t *p;
    size_t len, at;
} jscan_t;

/* Skips whitespace; returns the next byte, or 0 at the end. */
int jscan_ws(jscan_t *j);

/* "an object", "an array", "a string", "an integer", "a real number", "a boolean", "null". */
const char *jscan_kind(const jscan_t *j);

/*
 * The string at the cursor, decoded, into out[0..cap), always NUL-terminated (cut short when
 * its length is cap or more); returns its full decoded length, which is never more than its
 * encoded length minus 2. Moves past it.
 */
size_t jscan_string(jscan_t *j, char *out, size_t cap);

/* The string at the cursor, decoded into a new allocation (NULL: no memory); moves past it. */
char *jscan_strdup(jscan_t *j);

/* True if the value at the cursor is an integer >= 0 (*ret its value); moves past it. */
bool jscan_uint(jscan_t *j, uint64_t *ret);

/* Moves past the value at the cursor, whatever it is. */
void jscan_skip(jscan_t *j);

/* Steps into the object or array at the cursor, for jscan_member() or jscan_item(). */
void jscan_enter(jscan_t *j);

/*
 * Inside an object: true with the cursor at the next member's key, a string for
 * jscan_string(), after which jscan_colon() moves to its value; false, past the '}', at the end.
 */
bool jscan_key(jscan_t *j);
void jscan_colon(jscan_t *j);

/*
 * Both at once: true with the next member's key decoded into key[0..cap) (as
 * jscan_string() does; *ret_len its full length) and the cursor at its value, which the caller
 * must consume before the next call; false, the cursor past the '}', when there is none.
 */
bool jscan_member(jscan_t *j, char *key, size_t cap, size_t *ret_len);

/* Inside an array: true with the cursor at the next item (consume it), false past the ']'. */
bool jscan_item(jscan_t *j);

#endif
