#!/usr/bin/python3
"""How preload and attach scale with the tensor count (RELIABILITY P7; PEERS.md asks for attach
latency against model shape). Mixture-of-experts checkpoints carry 10^5 tensors.

    /usr/bin/python3 tests/bench/bench_scale.py [N ...]     (default: 1000 10000 100000)
    env: WSD_BUILD_DIR (default build/), ATTACHES (default 20)

For each N, a safetensors file of N one-element F32 tensors with MoE-style names. Printed
against anchors measured in the same run:
  - preload (weightsctl, so parse + validate + copy + hash + seal) against Python's json.loads
    of the same header alone (the C-accelerated json module: parsing the text, nothing else);
  - the C attach (bench-attach: connect + open + map) and the Python Client.state_dict() against
    torch.load() of a torch.save() file of the same tensors (written only for N <= 100000).
Then 2^20 tensors (short names, to stay under the 100 MB header cap), the most a model may
have: the time to the daemon's answer, against json.loads of that header; then weightsctl info
--json of all of them (read page by page) with another admin client's `list` round trips timed
meanwhile, against the same round trips with the daemon idle. Not run by ctest.
"""
import ctypes
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "harness"))
sys.path.insert(0, os.path.join(HERE, "..", "..", "client", "python"))
import wsdtest  # noqa: E402


def name(i):
    layer, expert = divmod(i, 384)
    return f"model.layers.{layer}.mlp.experts.{expert}.w{i % 3}.weight"


def write(path, n, name=name):
    hdr = {name(i): {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
           for i in range(n)}
    h = json.dumps(hdr, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        f.write(b"\0" * (4 * n))
    return h


def ms(t):
    return t * 1000


def best(f, repeat=3):
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        out.append(time.perf_counter() - t0)
    return min(out)


def list_probes(d, stop):
    """Round trips of `list` on one admin connection (libweightsd through ctypes, which lets
    go of the GIL) until stop is set: their latencies in seconds."""
    lib = ctypes.CDLL(os.path.join(wsdtest.BUILD_DIR, "lib", "libweightsd.so"))
    lib.wsd_admin_list.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
    libc = ctypes.CDLL("libc.so.6")
    libc.free.argtypes = [ctypes.c_void_p]
    c, out, lat = ctypes.c_void_p(), ctypes.c_void_p(), []
    assert lib.wsd_connect(d.admin.encode(), ctypes.byref(c)) == 0
    while not stop.is_set():
        t0 = time.perf_counter()
        assert lib.wsd_admin_list(c, ctypes.byref(out)) == 0
        lat.append(time.perf_counter() - t0)
        libc.free(out)
        time.sleep(0.001)
    lib.wsd_close(c)
    return lat


def probe_during(d, work):
    """Runs work() with list round trips beside it: (its time, their latencies)."""
    stop, res = threading.Event(), []
    th = threading.Thread(target=lambda: res.extend(list_probes(d, stop)))
    th.start()
    time.sleep(0.05)
    t0 = time.perf_counter()
    work()
    t = time.perf_counter() - t0
    time.sleep(0.3)  # the end of a preload (tables freed, heap trimmed) comes after its answer
    stop.set()
    th.join()
    return t, res


def info_beside_probes(d, model, n):
    """weightsctl info --json of every tensor (page by page), and how long the daemon kept
    another admin client waiting meanwhile, against the same probes with the daemon idle."""
    _, idle = probe_during(d, lambda: time.sleep(2))
    out = []
    t_info, busy = probe_during(d, lambda: out.append(d.ctl("info", model, "--json").stdout))
    listed = json.loads(out[0])
    assert len(listed["tensors"]) == n, len(listed["tensors"])
    print(f"  info --json of all {n} tensors: {ms(t_info):.0f} ms, {len(out[0]) / 1e6:.0f} MB;"
          f" a list beside it waited at most {ms(max(busy)):.1f} ms (median"
          f" {ms(statistics.median(busy)):.2f} ms, {len(busy)} probes) against at most"
          f" {ms(max(idle)):.1f} ms idle = {max(busy) / max(idle):.1f} x")


def main():
    sizes = [int(a) for a in sys.argv[1:]] or [1000, 10000, 100000]
    attaches = os.environ.get("ATTACHES", "20")
    import torch
    import weightsd
    with tempfile.TemporaryDirectory(prefix="wsd-scale-") as tmp:
        d = wsdtest.Daemon(tmp)
        try:
            for n in sizes:
                path = os.path.join(tmp, f"m{n}.safetensors")
                hdr = write(path, n)
                t_json = best(lambda: json.loads(hdr))
                t_pre = []
                for k in range(3):
                    t0 = time.perf_counter()
                    d.ctl("preload", f"m{n}", path)
                    t_pre.append(time.perf_counter() - t0)
                    if k < 2:
                        d.ctl("evict", f"m{n}")
                t_pre = min(t_pre)
                print(f"{n} tensors, header {len(hdr) / 1e6:.1f} MB:")
                print(f"  preload {ms(t_pre):8.1f} ms   json.loads of the header {ms(t_json):8.1f} ms"
                      f"   = {t_json / t_pre:.2f} x")
                r = subprocess.run([os.path.join(wsdtest.BIN, "bench-attach"), d.sock, f"m{n}",
                                    path, attaches, "1"], capture_output=True, text=True,
                                   check=True)
                line = [x for x in r.stdout.splitlines() if x.startswith("attach")][0]
                c_ms = float(line.split("median ")[1].split(" ms")[0])
                client = weightsd.connect(d.sock)
                sds = []
                t_sd = best(lambda: sds.append(client.state_dict(f"m{n}")) or sds.clear())
                client.close()
                pth = os.path.join(tmp, f"m{n}.pth")
                torch.save({name(i): torch.zeros(1) for i in range(n)}, pth)
                t_tl = best(lambda: torch.load(pth))
                os.unlink(pth)
                print(f"  C attach median {c_ms:8.2f} ms   Python state_dict {ms(t_sd):8.1f} ms"
                      f"   torch.load {ms(t_tl):8.1f} ms   = {t_tl / t_sd:.1f} x state_dict,"
                      f" {ms(t_tl) / c_ms:.0f} x C attach")
                d.ctl("evict", f"m{n}")
                os.unlink(path)
            n = 1 << 20
            path = os.path.join(tmp, "m1M.safetensors")
            hdr = write(path, n, lambda i: f"t{i}")  # short names: under the 100 MB cap
            t_json = best(lambda: json.loads(hdr), 1)
            _, idle = probe_during(d, lambda: time.sleep(1))
            box = []
            t_pre, busy = probe_during(d, lambda: box.append(d.ctl("preload", "big", path,
                                                                    check=False)))
            p = box[0]
            why = p.stderr.strip().splitlines()[-1] if p.returncode else "accepted"
            print(f"{n} tensors, header {len(hdr) / 1e6:.1f} MB: answer in {ms(t_pre):.0f} ms"
                  f" ({why}); json.loads {ms(t_json):.0f} ms = {t_json / t_pre:.2f} x")
            print(f"  a list beside the preload waited at most {ms(max(busy)):.1f} ms against at"
                  f" most {ms(max(idle)):.1f} ms idle = {max(busy) / max(idle):.1f} x")
            print(f"  daemon peak RSS: {[l.split()[1] for l in open(f'/proc/{d.pid}/status') if l.startswith('VmHWM')][0]} KiB")
            if not p.returncode:
                info_beside_probes(d, "big", n)
        finally:
            d.stop()


if __name__ == "__main__":
    main()
