#!/usr/bin/python3
"""Line coverage of a WSD_COVERAGE=ON build, per source file, from gcov's JSON.

    report.py BUILD_DIR [--min PCT] [--gate FILE ...] [--uncovered FILE]

Reads every .gcda under BUILD_DIR (left by whatever tests ran there), merges the counts per
source line across objects (a file compiled into the daemon and a test counts once), and prints
one row per project source file. With --gate, each named file (path relative to the source
tree) must reach --min percent of lines, or the script exits 1 naming it (RELIABILITY P1:
parser files at 90 % or more). --uncovered FILE prints that file's unexecuted lines.
"""
import argparse
import json
import os
import subprocess
import sys

SRC = os.path.realpath(os.path.join(os.path.dirname(__file__), "..", ".."))


def gcda_files(build):
    for root, _, names in os.walk(build):
        for n in names:
            if n.endswith(".gcda"):
                yield os.path.join(root, n)


def collect(build):
    """{source path: {line: count}} over every object, counts summed."""
    lines = {}
    build = os.path.realpath(build)
    for gcda in sorted(gcda_files(build)):
        out = subprocess.run(
            ["gcov", "--json-format", "--stdout", "-o", os.path.dirname(gcda), gcda],
            cwd=build, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.exit(f"report.py: gcov failed on {gcda}: {out.stderr.strip()}")
        for doc in out.stdout.splitlines():
            if not doc.strip():
                continue
            for f in json.loads(doc)["files"]:
                path = os.path.realpath(os.path.join(build, f["file"]))
                if not path.startswith(SRC + os.sep) or "/build" in path[len(SRC):]:
                    continue  # system headers, generated code
                per = lines.setdefault(os.path.relpath(path, SRC), {})
                for ln in f["lines"]:
                    per[ln["line_number"]] = per.get(ln["line_number"], 0) + ln["count"]
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("build")
    ap.add_argument("--min", type=float, default=90.0)
    ap.add_argument("--gate", nargs="*", default=[])
    ap.add_argument("--uncovered", action="append", default=[])
    ap.add_argument("--only", help="print only files under this prefix")
    a = ap.parse_args()

    cov = collect(a.build)
    if not cov:
        sys.exit(f"report.py: no coverage data under {a.build} (built with WSD_COVERAGE=ON, "
                 "and did tests run?)")
    print(f"{'file':44} {'lines':>6} {'run':>6} {'cover':>7}")
    for path in sorted(cov):
        if a.only and not path.startswith(a.only):
            continue
        n = len(cov[path])
        hit = sum(1 for c in cov[path].values() if c > 0)
        print(f"{path:44} {n:6} {hit:6} {100.0 * hit / n if n else 100.0:6.1f}%")
    for path in a.uncovered:
        miss = sorted(ln for ln, c in cov.get(path, {}).items() if c == 0)
        print(f"\n{path}: {len(miss)} lines not run")
        with open(os.path.join(SRC, path), encoding="utf-8") as fh:
            text = fh.read().splitlines()
        for ln in miss:
            print(f"  {ln:5}: {text[ln - 1]}")
    failed = []
    for path in a.gate:
        if path not in cov:
            failed.append(f"{path}: no coverage data")
            continue
        n = len(cov[path])
        pct = 100.0 * sum(1 for c in cov[path].values() if c > 0) / n
        if pct < a.min:
            failed.append(f"{path}: {pct:.1f}% < {a.min:.0f}%")
    if failed:
        print("\ncoverage below the gate:\n  " + "\n  ".join(failed))
        return 1
    if a.gate:
        print(f"\ncoverage gate ({a.min:.0f}% of lines): {len(a.gate)} files pass")
    return 0


if __name__ == "__main__":
    sys.exit(main())
