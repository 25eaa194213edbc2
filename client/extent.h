/*
 * extent.h - libweightsd's check that a tensor of the daemon's manifest stays inside its storage
 * (client/extent.c). Internal to the library (wsd__ prefix, STYLE N1); tests/unit/test-client-*
 * reach it through the static library.
 */
#ifndef WSD_CLIENT_EXTENT_H
#define WSD_CLIENT_EXTENT_H

#include <stddef.h>
#include <stdint.h>

#include "weightsd.h"
#include "weightsd.pb-c.h"

/*
 * Checks one TensorInfo of an OpenReply against the storage it views, \p storage_nbytes long,
 * before any pointer into that storage is formed. Overflow counts as out of range. The rules
 * are the daemon's own (daemon/formats/manifest.h manifest_validate):
 *  - a name, a known dtype, as many strides as sizes, at most WSD_MAX_NDIM of each;
 *  - sizes and strides >= 0 (negative strides are not part of the protocol);
 *  - nbytes == numel * bits / 8, a whole number of bytes;
 *  - storage_offset at most the storage's end, for every tensor, empty or not;
 *  - for numel > 0: (storage_offset + sum((size_i - 1) * stride_i) + 1) elements fit in
 *    the storage; a sub-byte dtype (F4, F6) must also have storage_offset 0, because its data
 *    pointer cannot address a fraction of a byte.
 * \param[out] msg  on failure, one line naming the tensor and the rule ("" on success).
 * \retval 0, or WSD_EPROTO.
 */
WSD_MUST_CHECK int wsd__tensor_extent_check(const Weightsd__V1__TensorInfo *ti,
                                            uint64_t storage_nbytes, char *msg, size_t msglen);

#endif /* WSD_CLIENT_EXTENT_H */
