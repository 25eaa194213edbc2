#!/usr/bin/python3
"""Seeds corpus/open/ with the daemon's real OpenReply payloads: a real weightsd serves a few
models (safetensors with several dtypes, a scalar and an empty tensor; a torch.save file with
tied weights, a transposed view and a slice), a raw client opens each, and the payload of the
reply is saved with its request id rewritten to 1 (fuzz-open.c's open). Names come from the
model, so reruns rewrite the same files. Needs /usr/bin/python3 with torch.

    WSD_BUILD_DIR=build tests/fuzz/make-open-corpus.py
"""
import os
import struct
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "harness"), os.path.join(HERE, "..", "integration")]
import rawproto  # noqa: E402
import wsdtest  # noqa: E402

OUT = os.path.join(HERE, "corpus", "open")


def models(tmp):
    import torch
    st = wsdtest.write_safetensors(os.path.join(tmp, "st.safetensors"), [
        ("w", "F32", [2, 3], struct.pack("<6f", *range(6))),
        ("b", "F16", [3], b"\x00\x3c" * 3),
        ("scalar", "I64", [], struct.pack("<q", 7)),
        ("empty", "U8", [0, 4], b""),
    ])
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    pt = os.path.join(tmp, "views.pt")
    torch.save({"w": base, "t": base.t(), "slice": base[1:3, 2:], "tied": base,
                "b": torch.ones(5, dtype=torch.bfloat16)}, pt)
    return {"safetensors": st, "torch-views": pt}


def reply_payload(sock, name):
    c = rawproto.Conn(sock)
    c.handshake()
    c.send(rawproto.open_req(2, name))
    while len(c.buf) < 8:
        c._fill()
    plen, _, _ = struct.unpack("<IHH", c.buf[:8])
    while len(c.buf) < 8 + plen:
        c._fill()
    payload = c.buf[8:8 + plen]
    c.close()  # closes the received fds too
    # Frame.id is field 1, varint, first: 08 02 -> 08 01.
    assert payload[:2] == b"\x08\x02", payload[:8]
    return b"\x08\x01" + payload[2:]


def main():
    os.makedirs(OUT, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        d = wsdtest.Daemon(tmp)
        try:
            for name, path in models(tmp).items():
                d.preload(name, path)
                data = reply_payload(d.sock, name)
                with open(os.path.join(OUT, f"reply-{name}"), "wb") as f:
                    f.write(data)
                print(f"corpus/open/reply-{name}: {len(data)} bytes")
        finally:
            d.stop()


if __name__ == "__main__":
    main()
