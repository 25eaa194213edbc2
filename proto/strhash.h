/*
 * strhash.h - the one hash function for names and keys read from checkpoints (tensor names,
 * zip entry names, storage keys, pickle dict keys, JSON object keys).
 *
 * Every table that holds such keys is open-addressed and indexed by the low bits of the hash.
 * With an unkeyed hash (FNV-1a, as before) those bits are a function the file's author can
 * invert: FNV-1a's low k bits depend only on the low k bits of its state, so two 3-byte blocks
 * that collide can be chained into 2^20 names that fall into one slot, and each insert walks
 * every earlier one (131072 such names took a safetensors check 58 s; RELIABILITY M19). A
 * keyed SipHash-1-3, with a key drawn from getrandom() when the process starts, leaves the
 * author nothing to aim at.
 */
#ifndef WSD_STRHASH_H
#define WSD_STRHASH_H

#include <stddef.h>
#include <stdint.h>

/* SipHash-1-3 of \p n bytes at \p p under this process's key. */
uint64_t strhash(const void *p, size_t n);

/* SipHash-c-d under an explicit key (k0, k1), for the published test vectors. */
uint64_t strhash_sip(uint64_t k0, uint64_t k1, const void *p, size_t n, unsigned c, unsigned d);

#endif
