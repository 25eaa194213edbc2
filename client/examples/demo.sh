#!/usr/bin/env bash
# The main job in one screen: start weightsd on private sockets, write a checkpoint, preload it
# once, attach two worker processes, show that they read the same bytes from the same pages,
# stop everything. Run through `make demo` (which builds first).
set -euo pipefail

BUILD=${WSD_BUILD_DIR:-$(dirname "$0")/../../build}
BIN=$BUILD/bin
PY=/usr/bin/python3
work=$(mktemp -d /tmp/weightsd-demo.XXXXXX)
daemon_pid=
cleanup() {
    [ -n "$daemon_pid" ] && kill "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

echo "== starting weightsd on $work"
"$BIN/weightsd" --socket "$work/weightsd.sock" --admin-socket "$work/admin.sock" \
    2>"$work/weightsd.log" &
daemon_pid=$!
for _ in $(seq 100); do [ -S "$work/admin.sock" ] && break; sleep 0.05; done
ctl() { "$BIN/weightsctl" --admin-socket "$work/admin.sock" "$@"; }

echo "== writing a 64 MiB safetensors checkpoint (4 tensors)"
PYTHONPATH=$(dirname "$0")/../../tests/harness "$PY" - "$work/model.safetensors" <<'PYEOF'
import os, sys, wsdtest
mib = 1 << 20
wsdtest.write_safetensors(sys.argv[1], [
    ("embed.weight", "F32", [4096, 2048], os.urandom(32 * mib)),
    ("layers.0.weight", "F16", [2048, 4096], os.urandom(16 * mib)),
    ("layers.1.weight", "BF16", [2048, 4096], os.urandom(16 * mib)),
    ("layers.1.bias", "F32", [2048], os.urandom(8 * 1024)),
], {"format": "pt"})
PYEOF

echo "== weightsctl preload demo $work/model.safetensors"
ctl preload demo "$work/model.safetensors"
ctl list

echo "== two workers attach, read every byte, and stay attached for 2 s"
"$BIN/wsd-attach" --socket "$work/weightsd.sock" --hold 2 demo >"$work/w1.json" &
w1=$!
"$BIN/wsd-attach" --socket "$work/weightsd.sock" --hold 2 demo >"$work/w2.json" &
w2=$!
sleep 0.5
ctl list
wait $w1 $w2

"$PY" - "$work/w1.json" "$work/w2.json" "$work/model.safetensors" <<'PYEOF'
import json, os, sys
runs = []
for path in sys.argv[1:3]:
    lines = [json.loads(l) for l in open(path)]
    runs.append((lines[0], [l for l in lines if l.get("phase") == "held"][0]))
size = os.path.getsize(sys.argv[3])
for i, (a, h) in enumerate(runs, 1):
    print(f"worker {i} (pid {a['pid']}): {a['tensors']} tensors, checksum {a['checksum']}, "
          f"attach {a['attach_us'] / 1000:.2f} ms, mapping Rss {h['rss_kb'] // 1024} MiB, "
          f"Pss {h['pss_kb'] // 1024} MiB")
same = runs[0][0]["checksum"] == runs[1][0]["checksum"]
pss = sum(h["pss_kb"] for _, h in runs) * 1024
print(f"same bytes in both workers: {'yes' if same else 'NO'}")
print(f"both workers together are charged {pss / (1 << 20):.1f} MiB (Pss) for a "
      f"{size / (1 << 20):.1f} MiB checkpoint: the pages are shared, not copied")
sys.exit(0 if same else 1)
PYEOF

echo "== the seed recipe through weightsd: torch.save a SomeModule(1000), preload it once,"
echo "   two Python workers build it on 'meta' and load_into() the shared tensors"
pydir=$(cd "$(dirname "$0")/../python" && pwd)
seed="$pydir/examples/seed_worker.py"
PYTHONPATH=$pydir WEIGHTSD_LIBRARY=$BUILD/lib/libweightsd.so "$PY" "$seed" \
    --write-checkpoint "$work/seed.pth"
ctl preload seed "$work/seed.pth"
pids=
for i in 1 2; do
    PYTHONPATH=$pydir WEIGHTSD_LIBRARY=$BUILD/lib/libweightsd.so \
        "$PY" "$seed" "$work/weightsd.sock" seed --hold 2 >"$work/py$i.txt" &
    pids="$pids $!"
done
wait $pids
cat "$work/py1.txt" "$work/py2.txt"

echo "== stopping weightsd"
kill "$daemon_pid"
wait "$daemon_pid"
daemon_pid=
echo "weightsd exited cleanly; demo done"
