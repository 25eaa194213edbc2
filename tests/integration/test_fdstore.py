"""Restart without reloading (issue 7 item 5), against an emulation of systemd's fd store that
follows the documented protocol: the daemon sends FDSTORE=1/FDNAME=... datagrams with the fd
attached to $NOTIFY_SOCKET; the next start receives those fds from 3 on with LISTEN_FDS,
LISTEN_FDNAMES and LISTEN_PID set to its own pid. FDSTOREREMOVE=1 drops a name."""
import array
import os
import signal
import socket
import subprocess
import time

import pytest

import wsdtest
from wsdtest import BIN, attach, fnv1a, write_safetensors


class FdStore:
    """The service manager's side: a datagram socket collecting stored fds by name."""

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setblocking(False)
        self.fds = {}        # FDNAME -> list of fds
        self.messages = []

    def pump(self, timeout=0.5):
        end = time.time() + timeout
        while time.time() < end:
            try:
                msg, fds, _, _ = socket.recv_fds(self.sock, 4096, 8)
            except BlockingIOError:
                time.sleep(0.01)
                continue
            fields = dict(l.split("=", 1) for l in msg.decode().split("\n") if "=" in l)
            self.messages.append(fields)
            if fields.get("FDSTORE") == "1":
                self.fds.setdefault(fields["FDNAME"], []).extend(fds)
            elif fields.get("FDSTOREREMOVE") == "1":
                for fd in self.fds.pop(fields["FDNAME"], []):
                    os.close(fd)
            else:
                for fd in fds:
                    os.close(fd)

    def start(self, tmp, extra=()):
        """Starts weightsd with the stored fds as systemd would pass them."""
        names, fds = [], []
        for name, lst in sorted(self.fds.items()):
            for fd in lst:
                names.append(name)
                fds.append(fd)
        high = [os.dup2(fd, 200 + i) for i, fd in enumerate(fds)]

        # subprocess closes fds after preexec_fn runs, so it must not close any (close_fds
        # False) and place() leaves the child exactly fds 0-2 and 3.. as systemd would.
        def place():
            for i, h in enumerate(high):
                os.dup2(h, 3 + i)
            os.closerange(3 + len(high), 4096)

        log = open(os.path.join(tmp, "weightsd.log"), "ab")
        env = {**os.environ, "NOTIFY_SOCKET": self.path, "LISTEN_FDS": str(len(fds)),
               "LISTEN_FDNAMES": ":".join(names)}
        proc = subprocess.Popen(
            ["/bin/sh", "-c", 'LISTEN_PID=$$ exec "$0" "$@"', os.path.join(BIN, "weightsd"),
             "--socket", os.path.join(tmp, "c.sock"), "--admin-socket",
             os.path.join(tmp, "a.sock"), "--log-level", "debug", *extra],
            env=env, stdout=log, stderr=subprocess.STDOUT, close_fds=False, preexec_fn=place)
        for h in high:
            os.close(h)
        return proc


def wait_ready(store, proc, timeout=10):
    end = time.time() + timeout
    while time.time() < end:
        store.pump(0.05)
        if any(m.get("READY") == "1" for m in store.messages):
            return
        assert proc.poll() is None, "weightsd died"
    raise AssertionError("no READY=1")


def ctl_json(tmp, *args):
    import json
    p = subprocess.run([os.path.join(BIN, "weightsctl"), "--admin-socket",
                        os.path.join(tmp, "a.sock"), *args, "--json"],
                       capture_output=True, text=True, check=True)
    return json.loads(p.stdout)


class Sockets:
    def __init__(self, tmp):
        self.sock = os.path.join(tmp, "c.sock")


def test_kill9_restart_readopts_without_reading_checkpoint(tmp_path):
    tmp = str(tmp_path)
    store = FdStore(os.path.join(tmp, "notify.sock"))
    data = os.urandom(3 << 20)
    path = write_safetensors(tmp_path / "m.safetensors", [("w", "U8", [len(data)], data),
                                                          ("b", "F32", [2], bytes(8))])
    expect_sum = attach_expect = None
    proc = store.start(tmp)
    try:
        wait_ready(store, proc)
        out = ctl_json(tmp, "preload", "m", str(path))
        gone = write_safetensors(tmp_path / "gone.safetensors", [("x", "U8", [2], b"xy")])
        ctl_json(tmp, "preload", "gone", str(gone))
        ctl_json(tmp, "evict", "gone")     # evicted: must leave the store
        store.pump(0.5)
        assert any(n.startswith("wsd-a.m") for n in store.fds), store.fds.keys()
        assert not any("gone" in n for n in store.fds), store.fds.keys()
        worker = subprocess.Popen([os.path.join(BIN, "wsd-attach"), "--socket",
                                   os.path.join(tmp, "c.sock"), "--hold", "0", "m"],
                                  stdout=subprocess.PIPE, text=True)
        first = worker.stdout.readline()
        expect_sum = __import__("json").loads(first)["checksum"]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    except BaseException:
        proc.kill()
        raise

    # The checkpoint is gone: whatever is served next can only come from the stored fds.
    os.unlink(path)
    store.messages.clear()
    proc = store.start(tmp)
    try:
        wait_ready(store, proc)
        lst = ctl_json(tmp, "list")
        assert [(m["name"], m["state"]) for m in lst] == [("m", "ready")]
        info = ctl_json(tmp, "info", "m")
        assert info["hash"] == out["hash"] and info["ntensors"] == 2
        d = Sockets(tmp)
        again = attach(d, "m")[-1]
        assert again["checksum"] == expect_sum and again["hash"] == out["hash"]
        # The worker that mapped it through the crash still holds valid pages.
        assert worker.poll() is None
        worker.terminate()
        assert worker.wait() == 0
        # Evicting now removes it from the store for good.
        ctl_json(tmp, "evict", "m")
        store.pump(0.5)
        assert not any(n.startswith("wsd-a.m") for n in store.fds)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        for lst in store.fds.values():
            for fd in lst:
                os.close(fd)
