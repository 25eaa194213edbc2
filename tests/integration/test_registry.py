"""Registry behaviour operators rely on: --dtype conversion bit-identical to torch, content
hashes, and eviction with live leases (refuse, --drain, --force), all through the real daemon."""
import os
import struct
import subprocess
import time

import pytest

import wsdtest
from wsdtest import Daemon, attach, fnv1a, write_safetensors

torch = pytest.importorskip("torch")


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path)
    yield d
    assert d.stop() == 0


def special_f32():
    """Random bit patterns plus every edge a rounding rule can get wrong."""
    g = torch.Generator().manual_seed(5)
    rand = torch.randint(-2**31, 2**31 - 1, (20000,), generator=g, dtype=torch.int64)
    edges = [0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000,
             0x7F800001, 0x7FBFFFFF, 0xFFFFFFFF, 0x00000001, 0x807FFFFF, 0x00800000,
             0x3F808000, 0x3F818000, 0x3F808001, 0x3F80FFFF, 0x7F7FFFFF, 0xFF7FFFFF,
             0x477FE000, 0x477FF000, 0x477FEFFF, 0x38800000, 0x33800000, 0x33000000,
             0x33000001, 0x387FC000, 0x3F800FFF, 0x3F801000, 0x3F803000]
    bits = [b & 0xFFFFFFFF for b in rand.tolist()] + edges
    raw = struct.pack(f"<{len(bits)}I", *bits)
    return raw, torch.frombuffer(bytearray(raw), dtype=torch.float32)


def model_checksum(d, name):
    return attach(d, name)[-1]["checksum"]


@pytest.mark.parametrize("target,tdtype", [("bf16", torch.bfloat16), ("f16", torch.float16)])
def test_f32_conversion_bit_identical_to_torch(daemon, tmp_path, target, tdtype):
    raw, t = special_f32()
    path = write_safetensors(tmp_path / "f32.safetensors",
                             [("x", "F32", [t.numel()], raw)])
    out = daemon.preload("m", path, "--dtype", target)
    assert out["bytes"] == t.numel() * 2
    expect = t.to(tdtype).view(torch.int16).numpy().tobytes()
    assert model_checksum(daemon, "m") == f"{fnv1a(expect):016x}"
    info = daemon.ctl_json("info", "m")
    assert info["tensors"][0]["dtype"] == {"bf16": "BF16", "f16": "F16"}[target]
    assert info["dtype"] == {"bf16": "BF16", "f16": "F16"}[target]


@pytest.mark.parametrize("src,sdtype,target,tdtype", [
    ("F16", torch.float16, "f32", torch.float32),
    ("BF16", torch.bfloat16, "f32", torch.float32),
    ("F16", torch.float16, "bf16", torch.bfloat16),
    ("BF16", torch.bfloat16, "f16", torch.float16),
    ("F64", torch.float64, "bf16", torch.bfloat16),
    ("F64", torch.float64, "f16", torch.float16),
    ("F64", torch.float64, "f32", torch.float32),
])
def test_other_conversions_match_torch(daemon, tmp_path, src, sdtype, target, tdtype):
    g = torch.Generator().manual_seed(7)
    if sdtype == torch.float64:
        x = torch.randn(5000, generator=g, dtype=torch.float64) * 1e3
        x = torch.cat([x, torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40,
                                        65520.0, 65519.99, 3.4e38, 1e300, -1e-320])])
    else:
        # Every 16-bit pattern but NaNs (whose payloads torch's own kernels treat differently
        # depending on the CPU's vector unit).
        x = torch.arange(0, 65536, dtype=torch.int32).to(torch.int16).view(sdtype)
        x = x[~torch.isnan(x)]
    raw = x.contiguous().numpy().tobytes() if sdtype != torch.bfloat16 else \
        x.view(torch.int16).numpy().tobytes()
    path = write_safetensors(tmp_path / "s.safetensors", [("x", src, [x.numel()], raw)])
    daemon.preload("m", path, "--dtype", target)
    y = x.to(tdtype)
    expect = (y.view(torch.int16) if y.element_size() == 2 else y).numpy().tobytes()
    assert model_checksum(daemon, "m") == f"{fnv1a(expect):016x}"


def test_integers_untouched_and_same_file_two_dtypes(daemon, tmp_path):
    ints = struct.pack("<4q", 1, -2, 3, 1 << 40)
    flt = struct.pack("<4f", 1.0, 2.5, -3.0, 0.1)
    path = write_safetensors(tmp_path / "m.safetensors",
                             [("ids", "I64", [4], ints), ("w", "F32", [4], flt),
                              ("mask", "BOOL", [2], b"\x01\x00")])
    daemon.preload("full", path)
    daemon.preload("half", path, "--dtype", "bf16")
    by = {t["name"]: t for t in daemon.ctl_json("info", "half")["tensors"]}
    assert by["ids"]["dtype"] == "I64" and by["mask"]["dtype"] == "BOOL"
    assert by["w"]["dtype"] == "BF16" and by["w"]["nbytes"] == 8
    w16 = torch.frombuffer(bytearray(flt), dtype=torch.float32).to(torch.bfloat16)
    expect = fnv1a(b"\x01\x00", fnv1a(w16.view(torch.int16).numpy().tobytes(), fnv1a(ints)))
    assert model_checksum(daemon, "half") == f"{expect:016x}"
    assert model_checksum(daemon, "full") != model_checksum(daemon, "half")
    bad = daemon.ctl("preload", "x", str(path), "--dtype", "int8", check=False)
    assert bad.returncode != 0 and "bf16, f16 or f32" in bad.stderr


def test_content_hash_identity(tmp_path):
    data = os.urandom(1 << 20)
    path = write_safetensors(tmp_path / "a.safetensors", [("w", "U8", [len(data)], data)])
    hashes = []
    for _ in range(2):  # same bytes, two daemon lifetimes
        d = Daemon(tmp_path)
        hashes.append(d.preload("m", path)["hash"])
        seen = attach(d, "m")[-1]["hash"]
        assert seen == hashes[-1]
        assert attach(d, "m", "--expect", hashes[-1])[-1]["hash"] == hashes[-1]
        r = subprocess.run([os.path.join(wsdtest.BIN, "wsd-attach"), "--socket", d.sock,
                            "--expect", "0" * 32, "m"], capture_output=True, text=True)
        assert r.returncode != 0 and "content hash" in r.stderr
        # --repeat opens the same way: the hash is checked on every round.
        assert attach(d, "m", "--repeat", "2", "--expect", hashes[-1])[-1]["repeat"] == 2
        r = subprocess.run([os.path.join(wsdtest.BIN, "wsd-attach"), "--socket", d.sock,
                            "--repeat", "2", "--expect", "0" * 32, "m"], capture_output=True,
                           text=True)
        assert r.returncode == 1 and "content hash" in r.stderr, r.stderr
        assert d.stop() == 0
    assert hashes[0] == hashes[1] and len(hashes[0]) == 32
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 1
    path2 = write_safetensors(tmp_path / "b.safetensors", [("w", "U8", [len(data)], flipped)])
    renamed = write_safetensors(tmp_path / "c.safetensors", [("v", "U8", [len(data)], data)])
    d = Daemon(tmp_path)
    try:
        assert d.preload("m2", path2)["hash"] != hashes[0]
        assert d.preload("m3", renamed)["hash"] != hashes[0]   # the manifest counts too
        assert d.preload("m4", path, "--dtype", "f32")["hash"] == hashes[0]  # U8: untouched
    finally:
        assert d.stop() == 0


def holder(d, model):
    p = subprocess.Popen([os.path.join(wsdtest.BIN, "wsd-attach"), "--socket", d.sock,
                          "--hold", "0", model], stdout=subprocess.PIPE, text=True)
    p.stdout.readline()
    return p


def wait_for(pred, timeout=2.0):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


def test_evict_drain_and_force_with_live_holders(daemon, tmp_path):
    data = os.urandom(64 * 1024)
    path = write_safetensors(tmp_path / "m.safetensors", [("w", "U8", [len(data)], data)])
    expect = f"{fnv1a(data):016x}"
    daemon.preload("m", path)
    a, b = holder(daemon, "m"), holder(daemon, "m")
    refused = daemon.ctl("evict", "m", check=False)
    assert refused.returncode != 0 and "2 leases" in refused.stderr

    # The printed line says what happened: nothing is freed yet.
    assert daemon.ctl("evict", "m", "--drain").stdout == \
        "draining m: freed when its last lease goes\n"
    assert daemon.ctl_json("evict", "m", "--drain")["result"] == "draining"
    assert daemon.ctl_json("list")[0]["state"] == "draining"
    r = subprocess.run([os.path.join(wsdtest.BIN, "wsd-attach"), "--socket", daemon.sock, "m"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "draining" in r.stderr
    a.kill()        # a crashed holder releases its lease ...
    a.wait()
    assert wait_for(lambda: daemon.ctl_json("list")[0]["leases"] == 1, 1.0)
    b.terminate()   # ... and when the last one goes, the drain completes
    b.wait()
    assert wait_for(lambda: daemon.ctl_json("list") == [])
    assert daemon.ctl_json("stats")["resident_bytes"] == 0

    daemon.preload("m", path)
    c = holder(daemon, "m")
    assert daemon.ctl_json("evict", "m", "--force")["result"] == "forced"
    assert daemon.ctl_json("list") == []
    assert daemon.ctl_json("stats")["resident_bytes"] == 0
    # The forced-out worker still reads valid bytes from its mapping.
    fnv = subprocess.run(["/usr/bin/python3", "-c", f"""
import re
maps = open('/proc/{c.pid}/maps').read()
assert 'memfd:weightsd:m' in maps, maps
"""], capture_output=True, text=True)
    assert fnv.returncode == 0, fnv.stderr
    c.terminate()
    assert c.wait() == 0
    daemon.preload("m", path)   # the name is free again
    assert model_checksum(daemon, "m") == expect
    c = holder(daemon, "m")
    assert daemon.ctl("evict", "m", "--force").stdout == \
        "forced m: freed now; workers that map it keep their pages\n"
    c.terminate()
    assert c.wait() == 0
    daemon.preload("m", path)
    assert daemon.ctl("evict", "m", "--force").stdout == "evicted m\n"  # no lease: nothing forced


def daemon_rss_kb(d):
    with open(f"/proc/{d.pid}/status") as f:
        for line in f:
            if line.startswith("RssShmem:"):
                return int(line.split()[1])
    return 0


def test_memory_budget_lru_and_refusal(tmp_path):
    mib = 1 << 20
    files = {}
    for name in ("a", "b", "c"):
        data = os.urandom(3 * mib)
        files[name] = write_safetensors(tmp_path / f"{name}.safetensors",
                                        [("w", "U8", [len(data)], data)])
    d = Daemon(tmp_path, extra_args=("--memory-budget", "7M"))
    try:
        base_fds = d.fd_count()
        assert d.ctl_json("stats")["memory_budget"] == 7 * mib
        d.preload("a", files["a"])
        d.preload("b", files["b"])
        attach(d, "a")                  # a is now more recently used than b
        d.preload("c", files["c"])      # does not fit: the idle LRU model (b) goes
        assert sorted(m["name"] for m in d.ctl_json("list")) == ["a", "c"]
        stats = d.ctl_json("stats")
        assert stats["budget_evictions"] == 1 and stats["resident_bytes"] <= 7 * mib

        ha, hc = holder(d, "a"), holder(d, "c")   # everything leased: nothing may go
        r = d.ctl("preload", "b", str(files["b"]), check=False)
        assert r.returncode != 0 and "E_BUDGET" in r.stderr and "memory budget" in r.stderr
        assert sorted(m["name"] for m in d.ctl_json("list")) == ["a", "c"]
        big = write_safetensors(tmp_path / "big.safetensors",
                                [("w", "U8", [8 * mib], bytes(8 * mib))])
        r = d.ctl("preload", "big", str(big), check=False)
        assert r.returncode != 0 and "E_BUDGET" in r.stderr
        ha.terminate(), hc.terminate()
        ha.wait(), hc.wait()

        for name in ("a", "c"):
            assert wait_for(lambda: d.ctl("evict", name, check=False).returncode == 0)
        assert d.ctl_json("stats")["resident_bytes"] == 0
        assert d.ctl_json("stats")["reserved_bytes"] == 0
        assert d.wait_fd_count(base_fds) <= base_fds
        assert daemon_rss_kb(d) < 1024   # no shared memory left behind
    finally:
        assert d.stop() == 0
    bad = subprocess.run([os.path.join(wsdtest.BIN, "weightsd"), "--memory-budget", "12X"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--memory-budget" in bad.stderr


def test_share_file_mode(daemon, tmp_path):
    data = os.urandom(256 * 1024)
    path = write_safetensors(tmp_path / "m.safetensors", [("w", "U8", [len(data)], data)])
    expect = f"{fnv1a(data):016x}"
    memfd_hash = daemon.preload("copy", path)["hash"]
    out = daemon.preload("f", path, "--share", "file")
    assert out["hash"] == memfd_hash            # identity does not depend on the tier
    assert daemon.ctl_json("stats")["resident_bytes"] < 2 * len(data)  # only the copy counts
    info = daemon.ctl_json("info", "f")
    assert info["share"] == "file" and info["file_replaced"] is False
    w = attach(daemon, "f")[-1]
    assert w["checksum"] == expect
    assert w["bytes"] == os.path.getsize(path)   # the whole file is what workers map

    bad = daemon.ctl("preload", "x", str(path), "--share", "file", "--dtype", "bf16",
                     check=False)
    assert bad.returncode != 0 and "cannot be combined with --dtype" in bad.stderr

    # Replaced by rename: the daemon keeps serving the inode it verified, and says so.
    h = holder(daemon, "f")
    new = write_safetensors(tmp_path / "new.safetensors", [("w", "U8", [4], b"abcd")])
    os.rename(new, path)
    info = daemon.ctl_json("info", "f")
    assert info["file_replaced"] is True and info["state"] == "ready"
    assert attach(daemon, "f")[-1]["checksum"] == expect
    h.terminate()
    h.wait()

    # Modified in place: stale, new opens refused with a clear error.
    data2 = os.urandom(4096)
    p2 = write_safetensors(tmp_path / "g.safetensors", [("w", "U8", [len(data2)], data2)])
    daemon.preload("g", p2, "--share", "file")
    with open(p2, "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\0")
    r = subprocess.run([os.path.join(wsdtest.BIN, "wsd-attach"), "--socket", daemon.sock, "g"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "modified in place" in r.stderr
    assert {m["name"]: m["state"] for m in daemon.ctl_json("list")}["g"] == "stale"

    # Truncated in place: stale too, and the daemon itself (which never maps the file) lives.
    p3 = write_safetensors(tmp_path / "t.safetensors", [("w", "U8", [8192], os.urandom(8192))])
    daemon.preload("t", p3, "--share", "file")
    os.truncate(p3, 100)
    r = subprocess.run([os.path.join(wsdtest.BIN, "wsd-attach"), "--socket", daemon.sock, "t"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "stale" in r.stderr
    assert daemon.alive()
    daemon.ctl("evict", "t")
    daemon.preload("t", write_safetensors(tmp_path / "t2.safetensors",
                                          [("w", "U8", [2], b"ok")]), "--share", "file")


def test_progress_cancel_and_cancel_on_exit(daemon, tmp_path):
    big = wsdtest.write_sparse_safetensors(tmp_path / "big.safetensors", 1 << 30)
    ctl = [os.path.join(wsdtest.BIN, "weightsctl"), "--admin-socket", daemon.admin]

    # Progress goes to stderr as plain lines when stderr is not a terminal.
    p = subprocess.run(ctl + ["preload", "a", str(big)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "preloaded a" in p.stdout
    assert "copy:" in p.stderr or "parse:" in p.stderr, p.stderr
    # --json: only the final document.
    j = subprocess.run(ctl + ["preload", "b", str(big), "--json"], capture_output=True, text=True)
    assert j.returncode == 0 and j.stderr == "" and '"name":"b"' in j.stdout
    daemon.ctl("evict", "a")
    daemon.ctl("evict", "b")

    # weightsctl cancel NAME stops a running preload; its requester gets the error.
    bg = subprocess.Popen(ctl + ["preload", "c", str(big)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: any(m["name"] == "c" for m in daemon.ctl_json("list")), 5)
    r = daemon.ctl("cancel", "c", check=False)
    out, err = bg.communicate(timeout=60)
    if r.returncode == 0:   # still loading when asked
        assert bg.returncode != 0 and "cancelled" in err
        assert wait_for(lambda: daemon.ctl_json("list") == [])
    else:                   # the preload won the race: nothing to cancel
        assert "not loading" in r.stderr
        daemon.ctl("evict", "c")
    nothing = daemon.ctl("cancel", "nope", check=False)
    assert nothing.returncode != 0 and "no model named" in nothing.stderr

    # Killing weightsctl does not cancel the preload by default ...
    bg = subprocess.Popen(ctl + ["preload", "d", str(big)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
    assert wait_for(lambda: any(m["name"] == "d" for m in daemon.ctl_json("list")), 5)
    bg.kill()
    bg.wait()
    assert wait_for(lambda: [m["state"] for m in daemon.ctl_json("list")] == ["ready"], 60)
    daemon.ctl("evict", "d")
    # ... unless --cancel-on-exit says so.
    bg = subprocess.Popen(ctl + ["preload", "e", str(big), "--cancel-on-exit"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for(lambda: any(m["name"] == "e" for m in daemon.ctl_json("list")), 5)
    bg.kill()
    bg.wait()
    assert wait_for(lambda: daemon.ctl_json("list") == [], 60) or \
        daemon.ctl_json("list")[0]["state"] == "ready"   # finished before the cancel landed
    log = daemon.log()
    assert "preload of 'e'" in log or "preloaded 'e'" in log
    assert daemon.ctl_json("stats")["reserved_bytes"] == 0


def test_hugepages_auto_never_always(daemon, tmp_path):
    data = os.urandom(3 << 20)
    path = write_safetensors(tmp_path / "m.safetensors", [("w", "U8", [len(data)], data)])
    expect = f"{fnv1a(data):016x}"
    daemon.preload("never", path, "--hugepages", "never")
    assert daemon.ctl_json("info", "never")["pages"] == "4k"
    bad = daemon.ctl("preload", "x", str(path), "--hugepages", "sometimes", check=False)
    assert bad.returncode != 0 and "auto, never or always" in bad.stderr

    pool = "/proc/sys/vm/nr_hugepages"
    try:
        with open(pool) as f:
            before = int(f.read())
        with open(pool, "w") as f:     # root only; give the pool what this test needs
            f.write(str(before + 4))
        with open(pool) as f:
            got = int(f.read()) - before
    except OSError:
        got = 0
    try:
        if got >= 2:
            daemon.preload("huge", path, "--hugepages", "always")
            info = daemon.ctl_json("info", "huge")
            assert info["pages"] == "hugetlb-2M" and info["map_bytes"] == 4 << 20
            assert info["hash"] == daemon.ctl_json("info", "never")["hash"]
            assert attach(daemon, "huge")[-1]["checksum"] == expect
            daemon.ctl("evict", "huge")
        auto = daemon.preload("auto", path)
        assert daemon.ctl_json("info", "auto")["pages"] in ("hugetlb-2M", "thp", "4k")
        assert attach(daemon, "auto")[-1]["checksum"] == expect
        daemon.ctl("evict", "auto")
    finally:
        if got:
            with open(pool, "w") as f:
                f.write(str(before))
    # With no pool left, "always" is refused with the reason (unless shmem THP is on).
    r = daemon.ctl("preload", "huge2", str(path), "--hugepages", "always", check=False)
    if r.returncode != 0:
        assert "E_HUGEPAGES" in r.stderr
    assert attach(daemon, "never")[-1]["checksum"] == expect


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def test_a_ready_model_keeps_its_packed_manifest_not_the_parsed_one(daemon, tmp_path):
    """Once ready, a model's tensor table is its packed manifest (what opens send; info
    decodes it); the parsed tables are freed and, for a model this large, the heap given back.
    They held about 350 bytes per tensor: 2^17 tiny tensors left the daemon some 45 MB larger
    for as long as the model stayed. info must still list every tensor as before."""
    if wsdtest.sanitized(daemon.pid):
        pytest.skip("a sanitizer's allocator keeps freed memory resident")
    n = 1 << 17
    kinds = [("F32", 4, "F32"), ("I64", 8, "I64"), ("F16", 2, "F16")]
    path = write_safetensors(tmp_path / "moe.safetensors",
                             [(f"model.layers.{i // 384}.experts.{i % 384}.w", kinds[i % 3][0],
                               [1], bytes(kinds[i % 3][1])) for i in range(n)])
    before = rss_kib(daemon.pid)
    daemon.preload("moe", path)
    time.sleep(0.5)  # the heap is trimmed just after the answer
    grown = rss_kib(daemon.pid) - before
    assert grown * 1024 < 150 * n, f"{grown} KiB more resident for {n} tensors"
    info = daemon.ctl_json("info", "moe")
    assert info["ntensors"] == len(info["tensors"]) == n
    t = info["tensors"][n - 1]
    assert (t["name"], t["dtype"], t["shape"], t["stride"], t["nbytes"]) == (
        f"model.layers.{(n - 1) // 384}.experts.{(n - 1) % 384}.w", kinds[(n - 1) % 3][2], [1],
        [1], kinds[(n - 1) % 3][1])
    assert attach(daemon, "moe")[-1]["tensors"] == n
