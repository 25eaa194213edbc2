"""The weightsd wire protocol by hand (PROTOCOL.md), for tests that must send what no client
library would: raw frames, wrong limits, stray fds. Only the few messages the limit and chaos
tests need are encoded; replies are decoded into {field number: value} dicts.
"""
import json
import os
import socket
import struct

WSD_EPROTO = -1000
WSD_ELIMIT = -1008
WSD_EINVAL = -1016

# Frame body field numbers (proto/weightsd.proto).
HELLO, HELLO_REPLY, ERROR = 10, 11, 12
OPEN, OPEN_REPLY, RELEASE, RELEASE_REPLY = 20, 21, 22, 23
PRELOAD, EVICT, LIST, INFO, STATS, ADMIN_REPLY = 40, 41, 42, 43, 44, 45


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field_varint(num, v):
    return varint(num << 3) + varint(v)


def field_bytes(num, data):
    if isinstance(data, str):
        data = data.encode()
    return varint(num << 3 | 2) + varint(len(data)) + data


def frame(msg_id, body_num, body=b"", nfds=0):
    payload = field_varint(1, msg_id) + field_bytes(body_num, body)
    return struct.pack("<IHH", len(payload), nfds, 0) + payload


def hello(msg_id=1):
    return frame(msg_id, HELLO, field_varint(1, 1) + field_bytes(3, "rawproto"))


def open_req(msg_id, model, flags=0):
    body = field_bytes(1, model) + field_bytes(2, "cpu")
    if flags:
        body += field_varint(3, flags)
    return frame(msg_id, OPEN, body)


def release_req(msg_id, lease):
    return frame(msg_id, RELEASE, field_varint(1, lease))


def info_req(msg_id, name, offset=0, limit=0, no_tensors=False):
    body = field_bytes(1, name)
    if offset:
        body += field_varint(2, offset)
    if limit:
        body += field_varint(3, limit)
    if no_tensors:
        body += field_varint(4, 1)
    return frame(msg_id, INFO, body)


def decode(data):
    """Protobuf message bytes -> {field: value or [values]} (varints as ints, others bytes)."""
    out, i = {}, 0
    while i < len(data):
        key, i = _read_varint(data, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _read_varint(data, i)
        elif wt == 2:
            n, i = _read_varint(data, i)
            v, i = data[i:i + n], i + n
        elif wt == 1:
            v, i = data[i:i + 8], i + 8
        elif wt == 5:
            v, i = data[i:i + 4], i + 4
        else:
            raise ValueError(f"wire type {wt}")
        if num in out:
            out[num] = out[num] + [v] if isinstance(out[num], list) else [out[num], v]
        else:
            out[num] = v
    return out


def _read_varint(data, i):
    n = shift = 0
    while True:
        b = data[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def zigzag(n):
    return (n >> 1) ^ -(n & 1)


class Conn:
    """One raw connection; recv_frame() returns (id, body field, body dict, fds)."""

    def __init__(self, path, timeout=5):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(timeout)
        self.s.connect(path)
        self.buf = b""
        self.fds = []

    def send(self, data, fds=()):
        if fds:
            socket.send_fds(self.s, [data], list(fds))
        else:
            self.s.sendall(data)

    def _fill(self):
        data, fds, _, _ = socket.recv_fds(self.s, 1 << 20, 16)
        self.fds += fds
        if not data:
            raise EOFError
        self.buf += data

    def recv_frame(self):
        while len(self.buf) < 8:
            self._fill()
        plen, nfds, _ = struct.unpack("<IHH", self.buf[:8])
        while len(self.buf) < 8 + plen:
            self._fill()
        msg = decode(self.buf[8:8 + plen])
        self.buf = self.buf[8 + plen:]
        fds, self.fds = self.fds[:nfds], self.fds[nfds:]
        body_num = next(k for k in msg if k != 1)
        body = decode(msg[body_num]) if isinstance(msg[body_num], bytes) else {}
        return msg.get(1, 0), body_num, body, fds

    def handshake(self):
        self.send(hello(1))
        mid, body, fields, _ = self.recv_frame()
        assert body == HELLO_REPLY, (body, fields)
        return fields

    def error(self):
        """Next frame, which must be an Error: (id, code, message)."""
        mid, body, fields, fds = self.recv_frame()
        for fd in fds:
            os.close(fd)
        assert body == ERROR, (body, fields)
        return mid, zigzag(fields.get(1, 0)), fields.get(2, b"").decode()

    def admin_json(self):
        """Next frame, which must be an AdminReply: (id, its document)."""
        mid, body, fields, _ = self.recv_frame()
        assert body == ADMIN_REPLY, (body, fields)
        return mid, json.loads(fields.get(1, b"null"))

    def closed_by_peer(self):
        """Reads (and drops) everything until EOF; True when the daemon closed the stream."""
        try:
            while True:
                data, fds, _, _ = socket.recv_fds(self.s, 1 << 20, 16)
                for fd in fds:
                    os.close(fd)
                if not data:
                    return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def close(self):
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self.s.close()
