#!/usr/bin/env bash
# tests/gpu/run.sh [BUILD_DIR] - the GPU tier's hardware checks (issue 6 item 6), one JSON
# summary on stdout. Builds nothing: BUILD_DIR (default $WSD_BUILD_DIR, else ./build) must hold
# bin/weightsd, bin/weightsctl, lib/libweightsd.so and tests/test-gpu from a CUDA build. To carry
# one to a machine without the Debian packages, build it where they are:
#   cmake -S . -B build-carry -DWSD_STATIC_DEPS=ON -DWSD_WITH_CUDA=ON -DCMAKE_BUILD_TYPE=Release \
#         -DWSD_FAULT_INJECTION=ON
#   cmake --build build-carry -j
# (every library but libc and the host's CUDA driver is linked in; the tree is relocatable; the
# fault hooks stay inert unless a check sets WEIGHTSD_FAULT), carry
# build-carry, and run `tests/gpu/run.sh build-carry` there. Needs python3 with torch 2.x (CUDA)
# and safetensors. Exits 77 (skip) without a GPU, 0 when every check passed, 1 otherwise, 2 when
# the build cannot run here. Bounded to 8 minutes in total.
set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
build=$(cd "${1:-${WSD_BUILD_DIR:-$root/build}}" 2>/dev/null && pwd) || {
    echo "tests/gpu/run.sh: build directory '${1:-${WSD_BUILD_DIR:-$root/build}}' not found" >&2
    exit 2
}
skip() {
    echo "tests/gpu/run.sh: SKIP: $*" >&2
    exit 77
}
command -v nvidia-smi >/dev/null 2>&1 || skip "no nvidia-smi: this machine has no NVIDIA GPU"
nvidia-smi -L >/dev/null 2>&1 || skip "nvidia-smi -L lists no GPU (no device or no driver)"
py=${WSD_PYTHON:-python3}
"$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null ||
    skip "torch cannot use CUDA here"
for f in bin/weightsd bin/weightsctl bin/wsd-attach lib/libweightsd.so tests/test-gpu; do
    [ -e "$build/$f" ] || { echo "tests/gpu/run.sh: $build/$f missing" >&2; exit 2; }
    # A library the loader cannot find here would fail every check the same way: say it once.
    if command -v ldd >/dev/null 2>&1 && missing=$(ldd "$build/$f" 2>&1 | grep 'not found'); then
        echo "tests/gpu/run.sh: $build/$f cannot run here (build with -DWSD_STATIC_DEPS=ON):" >&2
        echo "$missing" >&2
        exit 2
    fi
done
# Unbuffered: what was printed survives a kill.
export PYTHONUNBUFFERED=1
export WSD_BUILD_DIR="$build" WEIGHTSD_LIBRARY="$build/lib/libweightsd.so"
export PYTHONPATH="$root/client/python:$root/tests/harness${PYTHONPATH:+:$PYTHONPATH}"
# 440 s and a 5 s grace, with the preflight above: within the 8 minutes of one call. The checks
# stop starting new work at WSD_GPU_BUDGET_S (400 s) and print the summary on SIGTERM.
exec timeout -k 5 "${WSD_GPU_TIMEOUT_S:-440}" "$py" "$here/gpu_check.py"
