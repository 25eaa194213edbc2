#!/usr/bin/env python3
"""Preload throughput against the anchors measured in the same run (issue 5):

- preload of a warm ~SIZE_MIB (default 1024) f32 safetensors file into a sealed memfd
  (copy + XXH3 content hash) against `cp FILE /dev/shm/` (target >= 0.9x);
- the same preload with --dtype bf16;
- from a cold file (its pages dropped before each run): `cp` against preload with the page
  cache kept and with the default --page-cache auto, and how much RAM holds the model after
  each (arena + what is left of the file in the page cache);
- a worker's time to fault in every page of the model, 4 KiB pages against 2 MiB pages
  (hugetlb; needs root to grow the pool for the run, else reported as skipped).

Run after `make build`: /usr/bin/python3 tests/bench/bench_preload.py [SIZE_MIB]
"""
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "harness"))
import wsdtest  # noqa: E402


def timed(cmd):
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t


def cold(d, path, size):
    """Cold-file rows: every run starts with the file out of the page cache."""
    mib = 1 << 20
    try:
        if wsdtest.drop_page_cache(path):
            print("cold file: skipped (this filesystem keeps file pages)")
            return
    except OSError as e:
        if not wsdtest.no_cachestat(e):
            raise
        print("cold file: skipped (kernel has no cachestat(), Linux 6.5)")
        return
    rows = []
    for rep in range(3):
        shm = f"/dev/shm/wsd-bench-{os.getpid()}"
        wsdtest.drop_page_cache(path)
        cp_s = timed(["cp", path, shm])
        os.unlink(shm)
        cp_left = wsdtest.page_cache_bytes(path)
        wsdtest.drop_page_cache(path)
        keep = d.preload(f"k{rep}", path, "--page-cache", "keep")
        keep_left = wsdtest.page_cache_bytes(path)
        d.ctl("evict", f"k{rep}")
        wsdtest.drop_page_cache(path)
        auto = d.preload(f"a{rep}", path)
        auto_left = wsdtest.page_cache_bytes(path)
        d.ctl("evict", f"a{rep}")
        rows.append((cp_s, cp_left, keep["load_ms"] / 1000, keep_left, auto["load_ms"] / 1000,
                     auto_left, auto["bytes"]))
    cp_s, cp_left, keep_s, keep_left, auto_s, auto_left, arena = sorted(
        rows, key=lambda r: r[4])[1]
    gib = size / (1 << 30)
    print("cold file (dropped from the page cache before each run; median of 3):")
    print(f"cp FILE /dev/shm:        {cp_s * 1000:7.0f} ms  {gib / cp_s:5.2f} GiB/s"
          f"  file left in page cache: {cp_left / mib:6.0f} MiB")
    print(f"preload --page-cache keep: {keep_s * 1000:5.0f} ms  {gib / keep_s:5.2f} GiB/s"
          f"  = {cp_s / keep_s:.2f} x cp, left: {keep_left / mib:6.0f} MiB")
    print(f"preload (auto, default): {auto_s * 1000:7.0f} ms  {gib / auto_s:5.2f} GiB/s"
          f"  = {cp_s / auto_s:.2f} x cp, left: {auto_left / mib:6.0f} MiB")
    print(f"RAM holding the model after a cold preload: keep {(arena + keep_left) / size:.2f} x"
          f" file size, auto {(arena + auto_left) / size:.2f} x")


def main():
    mib = int(os.environ.get("SIZE_MIB", sys.argv[1] if len(sys.argv) > 1 else 1024))
    with tempfile.TemporaryDirectory(prefix="wsd-bench-") as tmp:
        path = os.path.join(tmp, "model.safetensors")
        size = wsdtest.write_bench_model(path, mib)
        subprocess.run(["cat", path], stdout=subprocess.DEVNULL, check=True)  # warm the cache
        d = wsdtest.Daemon(tmp)
        try:
            rows = []
            for rep in range(3):
                shm = f"/dev/shm/wsd-bench-{os.getpid()}"
                cp_s = timed(["cp", path, shm])
                os.unlink(shm)
                out = d.preload(f"m{rep}", path)
                d.ctl("evict", f"m{rep}")
                bf = d.preload(f"b{rep}", path, "--dtype", "bf16")
                d.ctl("evict", f"b{rep}")
                rows.append((cp_s, out["load_ms"] / 1000, bf["load_ms"] / 1000))
            cp_s, pre_s, bf_s = sorted(rows, key=lambda r: r[1])[1]
            gib = size / (1 << 30)
            print(f"file: {size / (1 << 20):.0f} MiB, 300 f32 tensors (median of 3 rounds)")
            print(f"cp FILE /dev/shm:        {cp_s * 1000:7.0f} ms  {gib / cp_s:5.2f} GiB/s")
            print(f"preload (copy + hash):   {pre_s * 1000:7.0f} ms  {gib / pre_s:5.2f} GiB/s"
                  f"  = {cp_s / pre_s:.2f} x cp")
            print(f"preload --dtype bf16:    {bf_s * 1000:7.0f} ms  {gib / bf_s:5.2f} GiB/s"
                  f" of source = {cp_s / bf_s:.2f} x cp")

            cold(d, path, size)

            d.preload("small", path, "--hugepages", "never")
            t4k = wsdtest.attach(d, "small", "--touch")[0]
            print(f"worker faults in every page, 4 KiB pages: {t4k['touch_ms']:.1f} ms "
                  f"({t4k['pages_4k']} pages)")
            pool = "/proc/sys/vm/nr_hugepages"
            need = size // (2 << 20) + 2
            try:
                before = int(open(pool).read())
                open(pool, "w").write(str(before + need))
                grown = int(open(pool).read()) - before >= need
            except OSError:
                grown = False
            try:
                if grown:
                    d.preload("huge", path, "--hugepages", "always")
                    t2m = wsdtest.attach(d, "huge", "--touch")[0]
                    print(f"worker faults in every page, 2 MiB pages: {t2m['touch_ms']:.1f} ms "
                          f"= {t4k['touch_ms'] / t2m['touch_ms']:.0f}x faster")
                    d.ctl("evict", "huge")
                else:
                    print("2 MiB pages: skipped (cannot grow the hugetlb pool; run as root)")
            finally:
                if grown:
                    open(pool, "w").write(str(before))
        finally:
            d.stop()


if __name__ == "__main__":
    main()
