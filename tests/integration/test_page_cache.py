"""preload --page-cache: once a checkpoint's bytes are copied into the sealed arena, its page-cache
pages are a second copy of the model. The default (auto) drops the pages the preload itself
brought in and leaves the ones somebody else had cached; drop drops them all, keep none of them, and file
mode (where the page cache is what workers map) always keeps. Measured with cachestat(2), the
call the daemon uses, on files written by real torch.save."""
import json
import os
import subprocess

import pytest

import wsdtest
from wsdtest import Daemon, attach, write_safetensors

torch = pytest.importorskip("torch")


def cached(path, off=0, length=0):
    try:
        return wsdtest.page_cache_bytes(path, off, length)
    except OSError as e:
        if wsdtest.no_cachestat(e):
            pytest.skip("kernel has no cachestat() (Linux 6.5); --page-cache auto keeps there")
        raise


def make_cold(path):
    try:
        left = wsdtest.drop_page_cache(path)
    except OSError as e:
        if wsdtest.no_cachestat(e):
            pytest.skip("kernel has no cachestat() (Linux 6.5); --page-cache auto keeps there")
        raise
    if left:
        pytest.skip("this filesystem keeps file pages (tmpfs?): nothing to drop")


def warm(path):
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass


def full(path):
    page = wsdtest.PAGE
    return (os.path.getsize(path) + page - 1) // page * page


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path)
    yield d
    assert d.stop() == 0


@pytest.fixture
def ckpt(tmp_path):
    """A real torch.save file of 24 MiB in 12 tensors, written to disk and out of the cache."""
    g = torch.Generator().manual_seed(3)
    path = tmp_path / "model.pth"
    torch.save({f"layer{i}.weight": torch.randn(512, 1024, generator=g) for i in range(12)},
               path)
    make_cold(path)
    return path


def test_auto_drops_what_the_preload_read_and_serves_the_bytes(daemon, ckpt):
    out = daemon.preload("m", ckpt)
    info = daemon.ctl_json("info", "m")
    assert info["page_cache"] == "auto"
    # Every tensor byte was cold at open, so every one was dropped once copied; so were the
    # zip headers and the pickle, read while parsing.
    assert info["page_cache_released"] == out["bytes"] == 12 * 512 * 1024 * 4
    assert cached(ckpt) == 0
    # What workers map is the arena, not the dropped pages: the same bytes as a model read
    # from a warm file and kept (content hash and a C worker's checksum of every storage).
    warm(ckpt)
    daemon.preload("ref", ckpt, "--page-cache", "keep")
    assert daemon.ctl_json("info", "ref")["hash"] == info["hash"]
    got, ref = attach(daemon, "m")[-1], attach(daemon, "ref")[-1]
    assert (got["tensors"], got["checksum"]) == (12, ref["checksum"])
    stats = daemon.ctl_json("stats")
    assert stats["page_cache_released_bytes"] == out["bytes"] and stats["page_cache_auto"]
    assert "no cachestat" not in daemon.log()
    prom = daemon.ctl("stats", "--prometheus").stdout
    assert f"weightsd_page_cache_released_bytes_total {out['bytes']}" in prom


def test_auto_leaves_a_file_somebody_else_cached(daemon, ckpt):
    warm(ckpt)
    assert cached(ckpt) == full(ckpt)
    daemon.preload("m", ckpt)
    assert daemon.ctl_json("info", "m")["page_cache_released"] == 0
    assert cached(ckpt) == full(ckpt)


def test_drop_and_keep(daemon, ckpt):
    daemon.preload("k", ckpt, "--page-cache", "keep")
    info = daemon.ctl_json("info", "k")
    assert (info["page_cache"], info["page_cache_released"]) == ("keep", 0)
    assert cached(ckpt) == full(ckpt)
    # drop: the file is all cached now (by the preload above), and still it goes.
    daemon.preload("d", ckpt, "--page-cache", "drop")
    assert daemon.ctl_json("info", "d")["page_cache_released"] == info["bytes"]
    assert cached(ckpt) == 0


def test_file_mode_keeps_the_pages_workers_map(daemon, ckpt):
    daemon.preload("f", ckpt, "--share", "file", "--page-cache", "drop")
    info = daemon.ctl_json("info", "f")
    assert (info["share"], info["page_cache"], info["page_cache_released"]) == ("file", "keep", 0)
    assert cached(ckpt) == full(ckpt)


def test_sharded_index_drops_every_shard(daemon, tmp_path):
    shards = []
    for i in range(2):
        raw = bytes((j * 7 + i) & 0xFF for j in range(256)) * (16 * 1024)  # 4 MiB
        shards.append(write_safetensors(tmp_path / f"model-0000{i + 1}-of-00002.safetensors",
                                        [(f"w{i}", "U8", [len(raw)], raw)]))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {
        "w0": shards[0].name, "w1": shards[1].name}}))
    for s in shards:
        make_cold(s)
    daemon.preload("sharded", index)
    assert daemon.ctl_json("info", "sharded")["page_cache_released"] == 8 << 20
    assert [cached(s) for s in shards] == [0, 0]


def proc_io(pid):
    try:
        with open(f"/proc/{pid}/io") as f:
            return {k: int(v) for k, v in (line.split(":") for line in f)}
    except OSError as e:
        pytest.skip(f"no /proc/PID/io here ({e.strerror}): no I/O accounting to read")


def test_many_small_tensors_from_a_cold_file_come_from_disk_once(daemon, tmp_path):
    """auto drops each read's pages as the copy goes. With one read per storage, a page of many
    tiny ones was dropped after the first and read from disk again for each next one (timed by
    hand: 2^20 one-element tensors, 81 s instead of 2 s). Storages lying close together are
    read in runs, so the file comes from disk about once, and still nothing stays cached. The
    zip local headers are read through a window too (one read of 30-odd bytes per record
    before)."""
    g = torch.Generator().manual_seed(5)
    path = tmp_path / "many.pth"
    torch.save({f"t{i}": torch.randn(3, generator=g) for i in range(5000)}, path)
    make_cold(path)
    before = proc_io(daemon.pid)
    daemon.preload("m", path)
    after = proc_io(daemon.pid)
    # Local headers through a window, tensor bytes in runs: about 100 read calls, not 10^4.
    assert after["syscr"] - before["syscr"] < 500
    from_disk = after["read_bytes"] - before["read_bytes"]
    if from_disk == 0:
        pytest.skip("this filesystem's reads are not counted as block I/O")
    assert from_disk <= 2 * os.path.getsize(path), (from_disk, os.path.getsize(path))
    assert cached(path) == 0
    warm(path)
    daemon.preload("ref", path, "--page-cache", "keep")
    assert daemon.ctl_json("info", "ref")["hash"] == daemon.ctl_json("info", "m")["hash"]
    got, ref = attach(daemon, "m")[-1], attach(daemon, "ref")[-1]
    assert (got["tensors"], got["checksum"]) == (5000, ref["checksum"])


def test_bad_value_is_refused_by_name(daemon, ckpt):
    r = daemon.ctl("preload", "x", str(ckpt), "--page-cache", "sometimes", check=False)
    assert r.returncode == 1
    assert "--page-cache sometimes: expected auto, keep or drop" in r.stderr
    assert daemon.ctl_json("list") == []


def test_config_key(tmp_path, ckpt):
    cfg = tmp_path / "weightsd.conf"
    cfg.write_text(f"[model m]\npath = {ckpt}\npage-cache = keep\n")
    bad = tmp_path / "bad.conf"
    bad.write_text(f"[model m]\npath = {ckpt}\npage-cache = never\n")
    chk = subprocess.run([os.path.join(wsdtest.BIN, "weightsctl"), "config-check", str(bad)],
                         capture_output=True, text=True)
    assert chk.returncode != 0 and f"{bad}:3: page-cache: wants auto, keep or drop" in chk.stderr
    d = Daemon(tmp_path, extra_args=("--config", str(cfg)))
    try:
        for _ in range(500):
            if [m["state"] for m in d.ctl_json("list")] == ["ready"]:
                break
            import time
            time.sleep(0.02)
        assert d.ctl_json("info", "m")["page_cache"] == "keep"
        assert cached(ckpt) == full(ckpt)
    finally:
        assert d.stop() == 0
