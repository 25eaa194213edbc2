#!/usr/bin/python3
"""Regenerates tests/fuzz/corpus/safetensors/: seeds for fuzz-safetensors.

usage: make-safetensors-corpus.py [OUTDIR]

Each seed is a small (< 4 KiB) file covering one shape of input from FORMATS.md §4.5/§4.8:
valid layouts the fuzzer should mutate from, and near misses for each rejection rule. Files
are written deterministically so re-running changes nothing; commit the output.
"""
import json
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "corpus", "safetensors")

# bits per element, as in FORMATS.md §4.3
BITS = {"BOOL": 8, "U8": 8, "I8": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32,
        "U32": 32, "F32": 32, "F64": 64, "I64": 64, "U64": 64, "F8_E5M2": 8, "F8_E4M3": 8,
        "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
        "C64": 64}


def raw(header: bytes, data: bytes = b"", n=None) -> bytes:
    """Length prefix (N = len(header) unless given), header bytes, buffer bytes."""
    return struct.pack("<Q", len(header) if n is None else n) + header + data


def reference(tensors, metadata=None) -> bytes:
    """A file laid out like the reference writer's (§4.7): sorted by element size descending,
    then name; compact JSON, __metadata__ first; header space-padded to a multiple of 8."""
    order = sorted(tensors, key=lambda t: (-(BITS[t[1]] // 8), t[0]))
    head, data, off = {}, b"", 0
    if metadata is not None:
        head["__metadata__"] = metadata
    for i, (name, dtype, shape) in enumerate(order):
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * BITS[dtype] // 8
        head[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + nbytes]}
        data += bytes((17 * i + k) & 0xFF for k in range(nbytes))
        off += nbytes
    text = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return raw(text, data)


def t(name, dtype, shape, offs):
    return {name: {"dtype": dtype, "shape": shape, "data_offsets": offs}}


def hdr(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


SEEDS = {
    # valid
    "ok_vector1_attn": raw(b'{"attn.0":{"dtype":"F32","shape":[1,2,3],"data_offsets":[0,24]}}',
                           struct.pack("<6f", 0, 1, 2, 3, 4, 5)),
    "ok_empty": raw(b"{}      "),
    "ok_metadata_only": raw(b'{"__metadata__":{"framework":"pt"}}     '),
    "ok_whitespace": raw(b"\t\n{}\r "),
    "ok_reference_layout": reference(
        [("model.embed", "BF16", [3, 5]), ("bias", "F32", [3]), ("counts", "I64", [3]),
         ("mask", "BOOL", [2, 3]), ("empty", "F32", [0, 4]), ("packed", "F4", [6]),
         ("fp6", "F6_E3M2", [4]), ("z", "C64", [1])],
        {"format": "pt", "lm_head.weight": "model.embed"}),
    "ok_all_dtypes": reference([("t_" + d, d, [2 if BITS[d] == 4 else 4 if BITS[d] == 6 else 1])
                                for d in BITS]),
    "ok_zero_size": raw(hdr({**t("e", "F32", [2, 0], [0, 0]), **t("b", "U8", [1], [0, 1])}),
                        b"\x01"),
    "ok_misaligned": raw(hdr({**t("a", "U8", [1], [0, 1]), **t("w", "F32", [1], [1, 5])}) + b"  ",
                         bytes(5)),
    "ok_unicode_escapes": raw(b'{"w\\u00e9\\ud83d\\ude00\\n":{"dtype":"U8","shape":[1],'
                              b'"data_offsets":[0,1]},"__metadata__":null}', b"\x07"),
    # rejections, one per rule
    "bad_too_small": b"\x08\x00\x00\x00",
    "bad_header_too_large": struct.pack("<Q", 100000001) + b"{}",
    "bad_header_len_past_eof": raw(b"{}", n=64),
    "bad_non_utf8": raw(b'{"\xff":{}}'),
    "bad_json_trailing": raw(b"{} x"),
    "bad_dup_key": raw(hdr(t("w", "U8", [1], [0, 1]))[:-1] + b"," + hdr(t("w", "U8", [1], [0, 1]))[1:],
                       b"\x00"),
    "bad_schema_metadata": raw(b'{"__metadata__":{"a":1}}'),
    "bad_dtype": raw(hdr(t("w", "f32", [1], [0, 4])), bytes(4)),
    "bad_offsets_gap": raw(hdr({**t("a", "F32", [1], [0, 4]), **t("b", "F32", [1], [8, 12])}),
                           bytes(12)),
    "bad_size_mismatch": raw(hdr(t("w", "F32", [2], [0, 4])), bytes(4)),
    "bad_overflow": raw(hdr(t("w", "F32", [2, 9223372036854775807], [0, 0]))),
    "bad_subbyte": raw(hdr(t("w", "F4", [3], [0, 2])), bytes(2)),
    "bad_incomplete": raw(hdr(t("w", "I32", [2, 2], [0, 16])), bytes(16) + b"polyglot"),
    "bad_json_attack": raw(hdr({"w%d" % i: {"dtype": "F32", "shape": [2, 2],
                                            "data_offsets": [0, 16]} for i in range(10)}),
                           bytes(16)),
    "bad_too_deep": raw(hdr(t("w", "U8", [1] * 9, [0, 1])), b"\x00"),
}


def main():
    os.makedirs(OUT, exist_ok=True)
    for name, blob in sorted(SEEDS.items()):
        assert len(blob) < 4096, name
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(blob)
    print("wrote %d seeds to %s" % (len(SEEDS), OUT))


if __name__ == "__main__":
    main()
