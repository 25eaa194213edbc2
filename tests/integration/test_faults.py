"""RELIABILITY C9: every injection point of proto/fault.h, once each, against a real daemon.

With a build configured -DWSD_FAULT_INJECTION=ON (CI's ASan build), WEIGHTSD_FAULT=POINT:1-2
makes the first two calls at POINT fail as the kernel would (two: an arena's memfd may be tried
as hugetlb first and then as plain shmem, and that fallback must not hide the fault). Each time the failing request gets a
clear error naming the cause, the daemon keeps serving (the next preload and attach succeed
with the right bytes), and it exits 0 on SIGTERM, which under ASan also means "no leak" on that
error path. Skipped in builds without the hooks.
"""
import os
import struct

import pytest

from wsdtest import Daemon, attach, fnv1a, write_safetensors

# point -> (what the first failing preload must say, or None when the point fails a request's
# transport instead and the first admin call is what breaks)
POINTS = {
    "host.memfd": "Cannot allocate memory",
    "host.ftruncate": "No space left on device",
    "host.mmap": "cannot map arena",
    "source.open": "Too many open files",
    "source.pread": "Input/output error",
    "fdpass.sendmsg": None,
    "wire.alloc": None,
}


@pytest.fixture
def model(tmp_path):
    data = bytes((i * 29 + 3) & 0xFF for i in range(1 << 16))
    path = write_safetensors(tmp_path / "m.safetensors", [
        ("w", "U8", [len(data)], data), ("b", "F32", [2], struct.pack("<2f", 1, 2))])
    return path, f"{fnv1a(data + struct.pack('<2f', 1, 2)):016x}"


def armed_daemon(tmp_path, spec):
    d = Daemon(tmp_path, env={"WEIGHTSD_FAULT": spec})
    if "fault injection armed" not in d.log():
        assert d.stop() == 0
        pytest.skip("weightsd built without -DWSD_FAULT_INJECTION=ON")
    return d


@pytest.mark.parametrize("point", sorted(POINTS))
def test_injected_failure_is_clean(tmp_path, model, point):
    path, checksum = model
    d = armed_daemon(tmp_path, f"{point}:1-2")
    try:
        want = POINTS[point]
        first = d.ctl("preload", "m", str(path), check=False)
        if want is not None:
            assert first.returncode != 0 and want in first.stderr, (point, first.stderr)
            assert "preload of 'm'" in d.log()
            assert d.ctl_json("list") == []
        else:
            # The first frame the daemon sends (sendmsg) or decodes (alloc) is this preload's
            # connection's: that connection is lost, the request may or may not have run.
            assert first.returncode != 0, (point, first.stdout, first.stderr)
        # Two faults at most: within two more tries everything works, on the same daemon.
        for _ in range(3):
            again = d.ctl("preload", "m2", str(path), check=False)
            if again.returncode == 0:
                break
        assert again.returncode == 0, (point, again.stderr, d.log()[-2000:])
        out = attach(d, "m2")
        assert out[-1]["checksum"] == checksum, out
        assert d.alive()
    finally:
        rc = d.stop()
    assert rc == 0, d.log()[-3000:]


# Points that do not fail anything but make the kernel's semantics bite: one-byte sends and
# receives on every call, spurious EAGAINs after the poll said readable, every other socket or
# checkpoint read and write interrupted (EINTR), checkpoint reads returning half.
DEGRADED = ["fdpass.send.short:*", "fdpass.recv.short:*", "fdpass.recv.eagain:1-500",
            "fdpass.send.short:*,fdpass.recv.short:*", "syscall.eintr:%2",
            "source.pread.short:*"]


@pytest.mark.parametrize("spec", DEGRADED)
def test_stream_pieces_are_reassembled(tmp_path, model, spec):
    """Every frame crosses the socket a byte at a time (or after spurious wakeups): the daemon
    must reassemble requests, resume partial replies with their fds, and never call that a
    protocol violation."""
    path, checksum = model
    d = armed_daemon(tmp_path, spec)
    try:
        d.preload("m", path)
        for _ in range(3):
            assert attach(d, "m", "--tensors")[-1]["checksum"] == checksum
        assert d.ctl_json("info", "m")["ntensors"] == 2
        st = d.ctl_json("stats")
        assert st["protocol_violations"] == 0 and st["opens_total"] == 3, st
        for point in (p.split(":")[0] for p in spec.split(",")):
            assert f"WEIGHTSD_FAULT: injected at {point}," in d.log(), point  # it did bite
        assert st["connections"]["outq_dropped"] == 0, st
    finally:
        rc = d.stop()
    assert rc == 0, d.log()[-3000:]


def test_client_reassembles_pieces_too(tmp_path, model, monkeypatch):
    """libweightsd's own reader and writer under the same one-byte stream (the daemon is
    armed with nothing that fires, only to learn that this build has the hooks)."""
    path, checksum = model
    d = armed_daemon(tmp_path, "wire.alloc:1000000000")
    try:
        d.preload("m", path)
        monkeypatch.setenv("WEIGHTSD_FAULT", "fdpass.send.short:*,fdpass.recv.short:*")
        for _ in range(2):
            assert attach(d, "m", "--tensors")[-1]["checksum"] == checksum
        monkeypatch.delenv("WEIGHTSD_FAULT")
        assert d.ctl_json("stats")["protocol_violations"] == 0
    finally:
        rc = d.stop()
    assert rc == 0, d.log()[-3000:]


def test_unknown_point_arms_nothing(tmp_path, model):
    path, _ = model
    d = Daemon(tmp_path, env={"WEIGHTSD_FAULT": "host.nosuchpoint"})
    try:
        log = d.log()
        if "unknown point" not in log:
            pytest.skip("weightsd built without -DWSD_FAULT_INJECTION=ON")
        assert "fault injection armed" not in log
        d.preload("m", path)
    finally:
        assert d.stop() == 0


def test_every_call_fails_with_star(tmp_path, model):
    path, _ = model
    d = armed_daemon(tmp_path, "source.open:*")
    try:
        for _ in range(3):
            r = d.ctl("preload", "m", str(path), check=False)
            assert r.returncode != 0 and "Too many open files" in r.stderr
        assert d.alive()
    finally:
        assert d.stop() == 0


# ---- malloc:N, for every allocation a day's work makes --------------------------------------

def _sweep_files(tmp_path):
    """A safetensors model (also named by the config), a torch.save file, a two-shard index."""
    torch = pytest.importorskip("torch")
    data = bytes((i * 7 + 1) & 0xFF for i in range(4096))
    st = write_safetensors(tmp_path / "st.safetensors",
                           [("w", "U8", [len(data)], data), ("b", "F32", [2], bytes(8))])
    g = torch.Generator().manual_seed(1)
    pt = tmp_path / "model.pth"
    torch.save({"enc.weight": torch.randn(16, 8, generator=g), "enc.bias": torch.zeros(16),
                "tied": {"a": torch.arange(6.0)}}, pt)
    shards = [write_safetensors(tmp_path / f"model-0000{i}-of-00002.safetensors",
                                [(f"s{i}", "F32", [4], bytes(16))]) for i in (1, 2)]
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"metadata": {}, "weight_map": {"s1": "%s", "s2": "%s"}}'
                     % (shards[0].name, shards[1].name))
    cfg = tmp_path / "weightsd.conf"
    cfg.write_text(f"[model cfg]\npath = {st}\n")
    return st, pt, index, cfg


def _sweep_once(tmp_path, files, n):
    """One daemon with its nth allocation failing, through a day's work. Returns (reached,
    problems): whether the nth allocation happened, and what went wrong if anything did."""
    import signal
    import subprocess
    import time
    from wsdtest import BIN

    st, pt, index, cfg = files
    sock, admin = str(tmp_path / "c.sock"), str(tmp_path / "a.sock")
    for p in (sock, admin):
        if os.path.exists(p):
            os.unlink(p)
    log_path = tmp_path / "sweep.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [os.path.join(BIN, "weightsd"), "--socket", sock, "--admin-socket", admin,
             "--config", str(cfg), "--log-level", "debug"],
            stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "WEIGHTSD_FAULT": f"malloc:{n}"})

    def run(*args):
        return subprocess.run(args, capture_output=True, text=True, timeout=60)

    def ctl(*args):
        return run(os.path.join(BIN, "weightsctl"), "--admin-socket", admin, *args)

    def attach(*args):
        return run(os.path.join(BIN, "wsd-attach"), "--socket", sock, *args)

    problems = []
    deadline = time.time() + 20
    while not (os.path.exists(sock) and os.path.exists(admin)) and proc.poll() is None:
        if time.time() > deadline:
            problems.append("never came up")
            break
        time.sleep(0.005)
    if proc.poll() is None and not problems:
        # A day's work; any step may fail, and none may take the daemon down.
        ctl("preload", "st", str(st))
        ctl("preload", "pt", str(pt), "--dtype", "bf16")
        ctl("preload", "idx", str(index))
        ctl("preload", "file", str(st), "--share", "file")
        attach("--tensors", "pt")
        attach("idx")
        attach("file")
        holder = subprocess.Popen([os.path.join(BIN, "wsd-attach"), "--socket", sock,
                                   "--hold", "0", "st"], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True)
        holder.stdout.readline()
        ctl("evict", "st", "--drain")
        ctl("list")
        ctl("info", "pt")
        ctl("stats", "--prometheus")
        holder.terminate()
        holder.wait()
        ctl("evict", "pt", "--force")
        # Only the nth allocation fails: within two tries everything works again.
        for _ in range(2):
            pre, got = ctl("preload", "ok", str(st)), attach("ok")
            if pre.returncode == 0 and got.returncode == 0:
                break
            ctl("evict", "ok")
        else:
            problems.append(f"not serving afterwards: {pre.stderr.strip()} / "
                            f"{got.stderr.strip()}")
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
        problems.append("did not stop on SIGTERM")
    out = log_path.read_text(errors="replace")
    reached = f"injected at malloc, call {n}" in out
    started = "serving (pid" in out
    if rc != (0 if started else 1):
        problems.append(f"exit status {rc} ({'after' if started else 'before'} start)")
    if not started and "error" not in out:
        problems.append("failed to start without saying why")
    if "Sanitizer" in out or "runtime error" in out:
        problems.append("sanitizer report")
    return reached, [f"malloc:{n}: {p}\n{out[-1500:]}" for p in problems]


def test_every_allocation_can_fail(tmp_path):
    """RELIABILITY C9, ENOMEM in malloc: WEIGHTSD_FAULT=malloc:N fails the daemon's Nth
    allocation (its own code's, through -Wl,--wrap; fault_alloc.c) during a start with a
    config, preloads of all three formats with --dtype and --share file, attaches, a drained
    and a forced evict with a lease held, list/info/stats. For every N: a start that fails says
    why and exits 1; otherwise the daemon never crashes, serves again right after, and exits 0
    on SIGTERM (under ASan: no leak on that path). N runs from 1 to the last allocation the
    work makes; CI samples about 150 of them, WSD_FAULT_SWEEP=all tries every one."""
    files = _sweep_files(tmp_path)
    if not _armed_build(tmp_path):
        pytest.skip("weightsd built without -DWSD_FAULT_INJECTION=ON")
    # How many allocations the work makes: the first N whose call never comes.
    total = 1
    while _sweep_once(tmp_path, files, total)[0]:
        total *= 2
    lo = total // 2
    while lo + 1 < total:
        mid = (lo + total) // 2
        if _sweep_once(tmp_path, files, mid)[0]:
            lo = mid
        else:
            total = mid
    every = os.environ.get("WSD_FAULT_SWEEP") == "all"
    step = 1 if every else max(1, total // 150)
    failures = []
    for n in sorted(set(range(1, 41)) | set(range(1, total, step))):
        reached, problems = _sweep_once(tmp_path, files, n)
        failures += problems
    assert total > 100, total
    assert not failures, "\n\n".join(failures[:5])


def _armed_build(tmp_path):
    d = Daemon(tmp_path, env={"WEIGHTSD_FAULT": "malloc:1000000000"})
    armed = "fault injection armed" in d.log()
    assert d.stop() == 0
    return armed


def test_every_client_allocation_can_fail(tmp_path, model):
    """The same for libweightsd, in a worker: WEIGHTSD_FAULT=malloc:N in wsd-attach's
    environment fails the library's Nth allocation (connect, HELLO, open, the manifest, the
    model, release). The worker must fail with a message and exit 1, or attach and read the
    right bytes; never crash (under ASan: never leak), and the daemon must not care."""
    import subprocess
    from wsdtest import BIN

    path, checksum = model
    d = armed_daemon(tmp_path, "malloc:1000000000")
    failures = []
    try:
        d.preload("m", path)
        n = 0
        while True:
            n += 1
            p = subprocess.run([os.path.join(BIN, "wsd-attach"), "--socket", d.sock, "m"],
                               capture_output=True, text=True, timeout=60,
                               env={**os.environ, "WEIGHTSD_FAULT": f"malloc:{n}"})
            reached = f"injected at malloc, call {n}" in p.stderr
            if p.returncode == 0:
                if '"checksum":"%s"' % checksum not in p.stdout:
                    failures.append(f"malloc:{n}: wrong bytes: {p.stdout}")
            elif p.returncode != 1 or "wsd-attach: " not in p.stderr:
                failures.append(f"malloc:{n}: exit {p.returncode}: {p.stderr[-1500:]}")
            if not reached:
                break
        assert n > 10, n  # the library allocates; a build without the wrappers would stop at 1
        assert not failures, "\n\n".join(failures[:5])
        # No lease was left behind by any of them.
        assert d.ctl_json("list")[0]["leases"] == 0
        assert attach(d, "m")[-1]["checksum"] == checksum
    finally:
        rc = d.stop()
    assert rc == 0, d.log()[-3000:]
