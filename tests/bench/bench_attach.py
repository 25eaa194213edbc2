#!/usr/bin/env python3
"""Issue-2 benchmark driver: writes a safetensors checkpoint of ~SIZE_MIB (default 1024) with
~300 tensors, starts weightsd, preloads it through weightsctl, and runs bench-attach, which
prints the attach time against a pread() of the same file, and 8 workers' total Pss against the
file size. Not part of ctest: run `make build && /usr/bin/python3 tests/bench/bench_attach.py`.
"""
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "harness"))
import wsdtest  # noqa: E402


def main():
    size_mib = int(os.environ.get("SIZE_MIB", sys.argv[1] if len(sys.argv) > 1 else 1024))
    ntensors = 300
    with tempfile.TemporaryDirectory(prefix="wsd-bench-") as tmp:
        path = os.path.join(tmp, "model.safetensors")
        per = size_mib * (1 << 20) // ntensors // 4 * 4
        chunk = os.urandom(per)
        wsdtest.write_safetensors(path, [(f"layers.{i}.weight", "F32", [per // 4], chunk)
                                         for i in range(ntensors)])
        d = wsdtest.Daemon(tmp)
        try:
            t0 = time.perf_counter()
            out = d.preload("bench", path)
            preload_ms = (time.perf_counter() - t0) * 1000
            print(f"preload: {out['ntensors']} tensors, {out['bytes'] / (1 << 20):.1f} MiB in "
                  f"{preload_ms:.0f} ms (daemon: {out['load_ms']} ms)")
            subprocess.run([os.path.join(wsdtest.BIN, "bench-attach"), d.sock, "bench", path,
                            "200", "8"], check=True)
        finally:
            d.stop()


if __name__ == "__main__":
    main()
