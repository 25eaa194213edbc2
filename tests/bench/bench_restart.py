#!/usr/bin/env python3
"""Daemon crash to serving again (PEERS.md (d) item 4), against the anchor of the same run:
restarting without the fd store and preloading the checkpoint again.

weightsd runs under an emulation of systemd's fd store (tests/harness FdStore, the documented
protocol), holding a ~SIZE_MIB (default 1024) safetensors model of 300 tensors. Each round
kills it with SIGKILL, starts a new one with the stored fds, and times from the kill to the
first worker (wsd-attach, a real process) that attached: connect, open with the content hash
it expects, map. After each timed round a worker reads every byte, and its checksum must equal
the one before the crash. The anchor is what a daemon without the store
would do: start and preload from disk, with the file cold (the default --page-cache auto
left none of it cached) and warm.

Run after `make build`: /usr/bin/python3 tests/bench/bench_restart.py [SIZE_MIB]
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "harness"))
import wsdtest  # noqa: E402

ROUNDS = 5


def ctl(tmp, *args):
    p = subprocess.run([os.path.join(wsdtest.BIN, "weightsctl"), "--admin-socket",
                        os.path.join(tmp, "a.sock"), *args, "--json"],
                       capture_output=True, text=True, check=True)
    return json.loads(p.stdout)


def attach(tmp, name, *args):
    p = subprocess.run([os.path.join(wsdtest.BIN, "wsd-attach"), "--socket",
                        os.path.join(tmp, "c.sock"), *args, name], capture_output=True, text=True)
    return json.loads(p.stdout.splitlines()[-1]) if p.returncode == 0 else None


def serve_time(tmp, t0, name, ident, timeout=30):
    """Seconds from t0 until a worker has attached to `name`, content hash and checksum as
    `ident` (the checksum read after the clock stopped)."""
    sock = os.path.join(tmp, "c.sock")
    while time.perf_counter() - t0 < timeout:
        if wsdtest.accepts(sock) and attach(tmp, name, "--repeat", "1", "--expect", ident[0]):
            took = time.perf_counter() - t0
            assert attach(tmp, name)["checksum"] == ident[1], "served other bytes after restart"
            return took
        time.sleep(0.0005)
    raise RuntimeError(f"{name} not served {timeout} s after the restart")


def kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def median(xs):
    return sorted(xs)[len(xs) // 2]


def main():
    mib = int(os.environ.get("SIZE_MIB", sys.argv[1] if len(sys.argv) > 1 else 1024))
    with tempfile.TemporaryDirectory(prefix="wsd-bench-") as tmp:
        path = os.path.join(tmp, "model.safetensors")
        size = wsdtest.write_bench_model(path, mib)
        store = wsdtest.FdStore(os.path.join(tmp, "notify.sock"))
        proc = store.start(tmp)
        try:
            wsdtest.wait_ready(store, proc)
            ctl(tmp, "preload", "m", path)
            store.pump(0.3)
            first = attach(tmp, "m")
            ident = (first["hash"], first["checksum"])

            # With the store: kill, restart, first worker served.
            readopt = []
            for _ in range(ROUNDS):
                t0 = time.perf_counter()
                kill(proc)
                store.messages.clear()
                proc = store.start(tmp)
                readopt.append(serve_time(tmp, t0, "m", ident))
                wsdtest.wait_ready(store, proc)
            spawn = []
            for _ in range(ROUNDS):
                t0 = time.perf_counter()
                assert attach(tmp, "m", "--repeat", "1", "--expect", ident[0])
                spawn.append(time.perf_counter() - t0)
            kill(proc)

            # Without it: an empty store, a fresh daemon, the checkpoint read again.
            reload = {}
            for kind in ("cold", "warm"):
                times = []
                for _ in range(3):
                    if kind == "cold":
                        wsdtest.drop_page_cache(path)
                    else:
                        subprocess.run(["cat", path], stdout=subprocess.DEVNULL, check=True)
                    empty = wsdtest.FdStore(os.path.join(tmp, f"empty-{kind}-{len(times)}.sock"))
                    t0 = time.perf_counter()
                    proc = empty.start(tmp)
                    wsdtest.wait_ready(empty, proc)
                    ctl(tmp, "preload", "m", path, "--page-cache", "keep")
                    times.append(serve_time(tmp, t0, "m", ident))
                    kill(proc)
                reload[kind] = median(times)
            proc = None
        finally:
            if proc is not None and proc.poll() is None:
                kill(proc)

        r = median(readopt)
        print(f"model: {size / (1 << 20):.0f} MiB, 300 f32 tensors; SIGKILL of weightsd, then a "
              f"new one, until the first worker process has attached")
        print(f"re-adopted from the fd store: median {r * 1000:.1f} ms, max "
              f"{max(readopt) * 1000:.1f} ms ({ROUNDS} rounds; of which starting the worker "
              f"process and its attach: {median(spawn) * 1000:.1f} ms)")
        print(f"restart + preload from a cold file: {reload['cold'] * 1000:.0f} ms = "
              f"{reload['cold'] / r:.0f}x the re-adoption")
        print(f"restart + preload from a warm file: {reload['warm'] * 1000:.0f} ms = "
              f"{reload['warm'] / r:.0f}x the re-adoption")


if __name__ == "__main__":
    main()
