#!/usr/bin/env python3
"""Load benchmark driver: starts its own weightsd (tests/harness/wsdtest.py) with room for the
connections, preloads a model, runs bench-load, and checks the figures against the targets of
issue 8: zero failures among good clients, p99 <= 50 ms, hostile peers raise p99 by < 2x,
<= 16 KiB of daemon memory per idle connection.

    WSD_BUILD_DIR=build tests/bench/bench_load.py [--conns 1000] [--seconds 10] [--hostile 100]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "harness"))
import wsdtest  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--hostile", type=int, default=100)
    ap.add_argument("--tensors", type=int, default=64)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tensors = [(f"layer.{i}.weight", "F32", [256, 64], os.urandom(256 * 64 * 4))
                   for i in range(args.tensors)]
        path = wsdtest.write_safetensors(os.path.join(tmp, "m.safetensors"), tensors)
        n = args.conns + args.hostile
        d = wsdtest.Daemon(tmp, extra_args=("--max-connections", str(n + 64), "--log-level",
                                            "notice"),
                           wrapper=("prlimit", f"--nofile={4 * n + 1024}"))
        try:
            d.preload("m", path)
            p = subprocess.run([os.path.join(wsdtest.BIN, "bench-load"), d.sock, "m",
                                str(d.pid), str(args.conns), str(args.seconds),
                                str(args.hostile)], capture_output=True, text=True,
                               timeout=args.seconds * 4 + 120)
            sys.stderr.write(p.stderr)
            phases = {}
            for line in p.stdout.splitlines():
                print(line)
                rec = json.loads(line)
                phases[rec["phase"]] = rec
            stats = d.ctl_json("stats")
        finally:
            rc = d.stop()
    conn, steady = phases["connect"], phases["steady"]
    hostile = phases.get("steady+hostile")
    print(f"\n{args.conns} connections, model of {args.tensors} tensors "
          f"({sum(len(t[3]) for t in tensors) >> 20} MiB)")
    print(f"  connect+HELLO burst: {conn['ms']:.0f} ms; daemon memory per idle connection: "
          f"{conn['bytes_per_idle_conn'] / 1024:.1f} KiB")
    print(f"  open burst: p50 {phases['burst']['p50_ms']:.1f} ms, "
          f"p99 {phases['burst']['p99_ms']:.1f} ms")
    print(f"  steady open/release: {steady['opens_per_s']:.0f} opens/s, p50 "
          f"{steady['p50_ms']:.2f} ms, p99 {steady['p99_ms']:.2f} ms, "
          f"failures {steady['failures']}")
    if hostile:
        print(f"  with {args.hostile} hostile peers: {hostile['opens_per_s']:.0f} opens/s, p50 "
              f"{hostile['p50_ms']:.2f} ms, p99 {hostile['p99_ms']:.2f} ms "
              f"({hostile['p99_ms'] / max(steady['p99_ms'], 1e-9):.2f}x), failures "
              f"{hostile['failures']}; daemon dropped hostile peers "
              f"{phases['hostile']['dropped_by_daemon']} times "
              f"(violations {stats['protocol_violations']}, timeouts "
              f"{stats['connections']['timed_out']}, queue drops "
              f"{stats['connections']['outq_dropped']})")
    ok = (p.returncode == 0 and rc == 0 and steady["failures"] == 0 and
          steady["p99_ms"] <= 50 and conn["bytes_per_idle_conn"] <= 16384 and
          (not hostile or (hostile["failures"] == 0 and
                           hostile["p99_ms"] < 2 * max(steady["p99_ms"], 1.0))))
    print("targets met" if ok else "TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
