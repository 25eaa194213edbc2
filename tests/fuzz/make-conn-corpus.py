#!/usr/bin/env python3
"""Seeds corpus/conn/ and corpus/admin/ from real traffic: the real wsd-attach and weightsctl
talk to a real weightsd through a recording proxy, which keeps what each client sent. Every
recorded stream is saved behind a few control bytes (conn-harness.h: piece sizes, fds, whether
replies are read). Names are derived from the scenario, so reruns rewrite the same files.

    WSD_BUILD_DIR=build tests/fuzz/make-conn-corpus.py
"""
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "harness"))
import wsdtest  # noqa: E402

MODEL = "/tmp/wsd-fuzz/m.safetensors"  # HARNESS_MODEL
CONTROLS = [0x00, 0x2A, 0x40, 0x93]


def write_harness_model():
    """The same bytes harness_write_model() writes."""
    header = (b'{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},'
              b'"b":{"dtype":"I64","shape":[1],"data_offsets":[16,24]}}')
    header += b" " * (-len(header) % 8)
    if os.path.exists(MODEL):
        return
    os.makedirs(os.path.dirname(MODEL), exist_ok=True)
    tmp = f"{MODEL}.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + bytes((i * 37 + 1) & 0xFF
                                                                for i in range(24)))
    os.rename(tmp, MODEL)


class Recorder:
    """Listens on `path`, forwards each connection to `target`, records client->daemon bytes."""

    def __init__(self, path, target):
        self.path, self.target = path, target
        self.streams = []
        self.lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.lsock.bind(path)
        self.lsock.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            d = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            d.connect(self.target)
            rec = bytearray()
            self.streams.append(rec)
            threading.Thread(target=self._up, args=(c, d, rec), daemon=True).start()
            threading.Thread(target=self._down, args=(d, c), daemon=True).start()

    @staticmethod
    def _up(c, d, rec):
        while True:
            data = c.recv(65536)
            if not data:
                d.shutdown(socket.SHUT_WR)
                return
            rec += data
            d.sendall(data)

    @staticmethod
    def _down(d, c):
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(d, 1 << 20, 8)
            except OSError:
                return
            if not data:
                c.close()
                return
            try:
                socket.send_fds(c, [data], fds) if fds else c.sendall(data)
            except OSError:
                return
            finally:
                for fd in fds:
                    os.close(fd)


def record(daemon, proxy, argv):
    before = len(proxy.streams)
    subprocess.run(argv, capture_output=True, timeout=60)
    return [bytes(s) for s in proxy.streams[before:]]


def drop_first_frame(data):
    return data[8 + struct.unpack("<I", data[:4])[0]:]


def save(dirname, name, streams):
    os.makedirs(dirname, exist_ok=True)
    for i, data in enumerate(s for s in streams if s):
        for ctl in CONTROLS:
            with open(os.path.join(dirname, f"{name}-{i}-{ctl:02x}"), "wb") as f:
                f.write(bytes([ctl]) + data)


def main():
    write_harness_model()
    with tempfile.TemporaryDirectory() as tmp:
        d = wsdtest.Daemon(tmp)
        try:
            d.preload("m", MODEL)
            cproxy = Recorder(os.path.join(tmp, "pc.sock"), d.sock)
            aproxy = Recorder(os.path.join(tmp, "pa.sock"), d.admin)
            attach = [os.path.join(wsdtest.BIN, "wsd-attach"), "--socket", cproxy.path]
            ctl = [os.path.join(wsdtest.BIN, "weightsctl"), "--admin-socket", aproxy.path]
            conn = {
                "attach": attach + ["m"],
                "attach-tensors": attach + ["--tensors", "m"],
                "attach-repeat": attach + ["--repeat", "3", "m"],
                "attach-missing": attach + ["nosuchmodel"],
                "attach-wait": attach + ["--wait", "m"],
            }
            admin = {
                "list": ctl + ["list", "--json"],
                "stats": ctl + ["stats", "--json"],
                "info": ctl + ["info", "m", "--json"],
                "info-summary": ctl + ["info", "m", "--no-tensors"],
                "preload": ctl + ["preload", "x", MODEL, "--json"],
                "preload-bf16": ctl + ["preload", "y", MODEL, "--dtype", "bf16"],
                "evict": ctl + ["evict", "x"],
                "evict-force": ctl + ["evict", "--force", "y"],
                "evict-missing": ctl + ["evict", "nosuchmodel"],
                "evict-device": ctl + ["evict", "m", "--device", "cuda:0", "--drain"],
                "evict-device-cpu": ctl + ["evict", "m", "--device", "cpu"],
                "preload-missing-file": ctl + ["preload", "z", "/nonexistent.safetensors"],
            }
            for name, argv in conn.items():
                save(os.path.join(HERE, "corpus", "conn"), name, record(d, cproxy, argv))
            for name, argv in admin.items():
                save(os.path.join(HERE, "corpus", "admin"), name, record(d, aproxy, argv))
            # One connection doing several things: later streams without their HELLO.
            seq = [record(d, aproxy, ctl + [v, *a])[0] for v, *a in
                   (("preload", "x", MODEL), ("info", "x"), ("evict", "--force", "x"),
                    ("list",), ("stats",))]
            save(os.path.join(HERE, "corpus", "admin"), "sequence",
                 [seq[0] + b"".join(drop_first_frame(s) for s in seq[1:])])
            seq = record(d, cproxy, attach + ["m"]) + record(d, cproxy, attach + ["m"])
            save(os.path.join(HERE, "corpus", "conn"), "sequence",
                 [seq[0] + drop_first_frame(seq[1])])
            # Admin verbs on the client socket, worker verbs on the admin socket: both refused.
            save(os.path.join(HERE, "corpus", "conn"), "admin-verbs",
                 record(d, cproxy, [os.path.join(wsdtest.BIN, "weightsctl"), "--admin-socket",
                                    cproxy.path, "list"]))
            save(os.path.join(HERE, "corpus", "admin"), "worker-verbs",
                 record(d, aproxy, [os.path.join(wsdtest.BIN, "wsd-attach"), "--socket",
                                    aproxy.path, "m"]))
        finally:
            d.stop()


if __name__ == "__main__":
    main()
