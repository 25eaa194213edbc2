#!/usr/bin/python3
"""Regenerates the seed corpora of fuzz-zip and fuzz-pickle from the torch fixtures.

Usage: make-torch-corpus.py   (run from anywhere, with Debian's /usr/bin/python3 and torch)

Runs tests/fixtures/make_torch_fixtures.py into a temporary directory, then copies
  - every fixture archive under 64 KiB into tests/fuzz/corpus/zip/ (valid and reject rows alike:
    the rejects are the interesting seeds), and
  - the data.pkl of every archive Python's zipfile can open into tests/fuzz/corpus/pickle/.
The outputs are committed; rerun this when the fixtures change.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "..", "fixtures", "make_torch_fixtures.py")
LIMIT = 64 * 1024


def main():
    zdir = os.path.join(HERE, "corpus", "zip")
    pdir = os.path.join(HERE, "corpus", "pickle")
    for d in (zdir, pdir):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    # A fixed directory keeps the marker path the malicious seeds embed the same from run to
    # run, so regenerating does not churn them.
    tmp = os.path.join(tempfile.gettempdir(), "wsd-torch-corpus")
    shutil.rmtree(tmp, ignore_errors=True)
    os.mkdir(tmp)
    try:
        subprocess.run([sys.executable, SCRIPT, tmp], check=True, stdout=subprocess.DEVNULL)
        for name in sorted(os.listdir(tmp)):
            path = os.path.join(tmp, name)
            if name.endswith(".json") or not os.path.isfile(path):
                continue
            if os.path.getsize(path) <= LIMIT:
                shutil.copy(path, os.path.join(zdir, name))
            try:
                with zipfile.ZipFile(path) as z:
                    pkl = [n for n in z.namelist() if n.endswith("data.pkl")]
                    if pkl:
                        data = z.read(pkl[0])
                        if len(data) <= LIMIT:
                            base = os.path.splitext(name)[0]
                            with open(os.path.join(pdir, base + ".pkl"), "wb") as f:
                                f.write(data)
            except (zipfile.BadZipFile, NotImplementedError, KeyError, OSError, ValueError):
                pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{len(os.listdir(zdir))} zip seeds, {len(os.listdir(pdir))} pickle seeds")


if __name__ == "__main__":
    main()
