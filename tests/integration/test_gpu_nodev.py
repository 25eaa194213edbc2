"""GPU tier on a machine without a usable GPU (or a build without CUDA): `preload --device
cuda:N` fails with a clear message naming the cause, nothing is left listed, the CPU tier keeps
serving, and an open on cuda:N of a host-only model is WSD_ENODEV naming where it is served.

Skipped where the CUDA runtime does see a device (tests/gpu/run.sh covers that case).
"""
import os
import shutil
import struct
import subprocess
import time

import pytest

from wsdtest import BIN, Daemon, attach, write_safetensors

WSD_ENODEV = -1007


def _has_gpu():
    return shutil.which("nvidia-smi") is not None and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True).returncode == 0


pytestmark = pytest.mark.skipif(_has_gpu(), reason="a GPU is present: see tests/gpu/run.sh")

NO_DEVICE = ("no CUDA device", "built without CUDA support")


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path)
    yield d
    assert d.stop() == 0


@pytest.fixture
def model(tmp_path):
    return write_safetensors(tmp_path / "m.safetensors", [
        ("w", "F32", [4], struct.pack("<4f", 1, 2, 3, 4)),
        ("b", "F32", [2], struct.pack("<2f", 5, 6))])


def test_preload_cuda_fails_clearly(daemon, model):
    p = daemon.ctl("preload", "g", str(model), "--device", "cuda:0", check=False)
    assert p.returncode != 0
    assert "cuda:0" in p.stderr and any(s in p.stderr for s in NO_DEVICE), p.stderr
    # The failed preload left nothing behind: the name is free and not listed.
    assert daemon.ctl_json("list") == []
    assert daemon.alive()


def test_cpu_tier_keeps_serving(daemon, model):
    daemon.preload("cpu1", model)
    for _ in range(3):
        assert daemon.ctl("preload", "g", str(model), "--device", "cpu", "--device", "cuda:0",
                          check=False).returncode != 0
    out = attach(daemon, "cpu1", "--tensors")
    assert [t["name"] for t in out if "name" in t][:2] == ["w", "b"]
    info = daemon.ctl_json("info", "cpu1")
    assert info["devices"] == [{"device": "cpu", "bytes": info["map_bytes"]}]
    # --device cpu alone is the host tier as before.
    daemon.preload("cpu2", model, "--device", "cpu")
    assert daemon.ctl_json("info", "cpu2")["devices"][0]["device"] == "cpu"


def test_stats_gpu_section(daemon, model):
    """stats never starts the CUDA probe itself; after a cuda preload it shows what the probe
    found (no device, and why), and a build without CUDA says so."""
    before = daemon.ctl_json("stats")["gpu"]
    assert before["probed"] is False
    p = daemon.ctl("preload", "g", str(model), "--device", "cuda:0", check=False)
    assert p.returncode != 0
    after = daemon.ctl_json("stats")["gpu"]
    if "built without CUDA support" in p.stderr:
        assert after == {"cuda_build": False, "probed": False}
        return
    assert before["cuda_build"] is True and after["cuda_build"] is True
    assert after["probed"] is True and after["devices"] == []
    assert after["error"] and after["error"] in p.stderr, (after, p.stderr)
    # The human form flattens it; nothing claims a device.
    out = daemon.ctl("stats").stdout
    assert "gpu.probed: true" in out and "gpu.devices: []" in out, out


def test_bad_device_names(daemon, model):
    for bad in ("gpu:0", "cuda:", "cuda:-1", "cuda:01", "cuda:64", "cuda:0x1"):
        p = daemon.ctl("preload", "x", str(model), "--device", bad, check=False)
        assert p.returncode != 0 and "expected cpu or cuda:N" in p.stderr, (bad, p.stderr)
    p = daemon.ctl("preload", "x", str(model), "--device", "cuda:1", "--device", "cuda:1",
                   check=False)
    assert p.returncode != 0 and "given twice" in p.stderr


def test_open_on_cuda_is_enodev(daemon, model):
    daemon.preload("m", model)
    p = subprocess.run([os.path.join(BIN, "wsd-attach"), "--socket", daemon.sock, "--device",
                        "cuda:0", "m"], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert "cuda:0" in p.stderr and "served on the host tier (cpu) only" in p.stderr, p.stderr
    # The daemon still serves the model on the host tier, and counted the refusal.
    attach(daemon, "m")
    assert daemon.ctl_json("stats")["open_errors"] >= 1


def test_config_devices_reach_the_gpu_tier(tmp_path, model):
    """devices = host cuda:0 in weightsd.conf: valid for config-check, and at start the
    preload fails with the same clear message while the daemon serves everything else."""
    other = write_safetensors(tmp_path / "o.safetensors", [("x", "U8", [3], b"abc")])
    cfg = tmp_path / "weightsd.conf"
    cfg.write_text(f"[model g]\npath = {model}\ndevices = host cuda:0\n\n"
                   f"[model h]\npath = {other}\n")
    chk = subprocess.run([os.path.join(BIN, "weightsctl"), "config-check", str(cfg)],
                         capture_output=True, text=True)
    assert chk.returncode == 0, chk.stderr
    bad = tmp_path / "bad.conf"
    bad.write_text(f"[model g]\npath = {model}\ndevices = tpu:0\n")
    chk = subprocess.run([os.path.join(BIN, "weightsctl"), "config-check", str(bad)],
                         capture_output=True, text=True)
    assert chk.returncode != 0 and f"{bad}:3:" in chk.stderr
    d = Daemon(tmp_path, extra_args=("--config", str(cfg)))
    try:
        for _ in range(200):
            names = [m["name"] for m in d.ctl_json("list") if m["state"] == "ready"]
            if "h" in names and any(s in d.log() for s in NO_DEVICE):
                break
            import time
            time.sleep(0.02)
        assert names == ["h"]
        assert any(s in d.log() for s in NO_DEVICE), d.log()
        assert attach(d, "h")[-1]["tensors"] == 1
    finally:
        assert d.stop() == 0


def test_preload_again_for_a_device_uploads_from_the_host_copy(daemon, model, tmp_path):
    """A ready model preloaded again from the same file, for a device it is not on, is an
    upload from its own host copy (after a restart, the fd store gives the host copy back but
    not the GPU one). Here that upload fails with the same clear cause, and the model is left
    exactly as it was: listed, ready, served, evictable, no fd kept."""
    first = daemon.preload("m", model)
    fds = daemon.fd_count()
    failed = daemon.ctl_json("stats")["preloads_failed"]
    p = daemon.ctl("preload", "m", str(model), "--device", "cpu", "--device", "cuda:0",
                   check=False)
    assert p.returncode != 0
    assert "cuda:0" in p.stderr and any(s in p.stderr for s in NO_DEVICE), p.stderr
    assert "exists already" not in p.stderr, p.stderr
    assert "uploading 'm' to 1 more device from its host copy" in daemon.log()
    assert "upload of 'm' to more devices failed" in daemon.log()
    assert daemon.ctl_json("stats")["preloads_failed"] == failed + 1
    assert [(x["name"], x["state"]) for x in daemon.ctl_json("list")] == [("m", "ready")]
    info = daemon.ctl_json("info", "m")
    assert info["hash"] == first["hash"] and info["devices"][0]["device"] == "cpu"
    assert len(info["devices"]) == 1
    assert attach(daemon, "m")[-1]["hash"] == first["hash"]
    assert daemon.fd_count() == fds  # the upload's duplicate of the arena fd is closed
    # Anything but the same checkpoint and options on a new device: exists already, as before.
    other = write_safetensors(tmp_path / "o.safetensors", [("x", "U8", [1], b"x")])
    for args in ((other, "--device", "cuda:0"), (model,), (model, "--device", "cpu"),
                 (model, "--dtype", "bf16", "--device", "cuda:0"),
                 (model, "--key", "sub", "--device", "cuda:0"),
                 (model, "--share", "file", "--device", "cuda:0")):
        p = daemon.ctl("preload", "m", str(args[0]), *args[1:], check=False)
        assert p.returncode != 0 and "exists already" in p.stderr, (args, p.stderr)
    p = daemon.ctl("preload", "m", str(other), "--device", "cuda:0", check=False)
    assert f"from '{model}'" in p.stderr and "--key, --dtype and --share" in p.stderr, p.stderr
    daemon.ctl("evict", "m")  # not left busy uploading
    assert daemon.ctl_json("list") == []
    assert daemon.alive()


def test_reload_that_adds_a_device_uploads_instead_of_draining(tmp_path, model):
    """SIGHUP with a configured model's devices extended and nothing else changed: the served
    model is kept (no drain, even with a worker holding a lease) and only uploaded to the new
    device from its host copy; here that fails with the no-device cause and it stays served."""
    import signal
    import time
    cfg = tmp_path / "weightsd.conf"
    cfg.write_text(f"[model g]\npath = {model}\n")
    d = Daemon(tmp_path, extra_args=("--config", str(cfg)))
    holder = None
    try:
        for _ in range(250):
            if [m["state"] for m in d.ctl_json("list")] == ["ready"]:
                break
            time.sleep(0.02)
        first = d.ctl_json("info", "g", "--no-tensors")
        holder = subprocess.Popen([os.path.join(BIN, "wsd-attach"), "--socket", d.sock,
                                   "--hold", "0", "g"], stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline()  # mapped: one lease held
        cfg.write_text(f"[model g]\npath = {model}\ndevices = host cuda:0\n")
        d.proc.send_signal(signal.SIGHUP)
        for _ in range(250):
            if "reloaded: serving" in d.log():
                break
            time.sleep(0.02)
        log = d.log()
        assert "reloaded: serving" in log, log
        assert "configured model 'g' is resident; uploading it to its configured devices" in log
        assert "uploading 'g' to 1 more device from its host copy" in log, log
        assert any(s in log for s in NO_DEVICE), log
        assert "changed in the config" not in log, log  # not evicted with drain
        lst = d.ctl_json("list")
        assert [(m["name"], m["state"], m["leases"]) for m in lst] == [("g", "ready", 1)], lst
        assert d.ctl_json("info", "g", "--no-tensors")["hash"] == first["hash"]
        # Taking the device away again is no change of what is served either: the model stays,
        # lease and all, and the device it never reached is only logged.
        cfg.write_text(f"[model g]\npath = {model}\ndevices = host\n")
        d.proc.send_signal(signal.SIGHUP)
        assert _wait_log(d, "no longer configured on cuda:0"), d.log()
        assert "model 'g' is no longer configured on cuda:0, where it was not served" in d.log()
        assert "changed in the config" not in d.log(), d.log()
        lst = d.ctl_json("list")
        assert [(m["name"], m["state"], m["leases"]) for m in lst] == [("g", "ready", 1)], lst
        cfg.write_text(f"[model g]\npath = {model}\ndevices = host cuda:0\n")
        d.proc.send_signal(signal.SIGHUP)
        for _ in range(500):  # the second upload to cuda:0 has failed too
            if d.log().count("upload of 'g' to more devices failed") == 2:
                break
            time.sleep(0.02)
        assert d.log().count("upload of 'g' to more devices failed") == 2, d.log()
        # A change beyond devices still drains the old definition, as before.
        cfg.write_text(f"[model g]\npath = {model}\ndevices = host cuda:0\ndtype = bf16\n")
        d.proc.send_signal(signal.SIGHUP)
        for _ in range(250):
            if "changed in the config" in d.log():
                break
            time.sleep(0.02)
        assert "model 'g' changed in the config: draining" in d.log(), d.log()
    finally:
        if holder:
            holder.terminate()
            holder.wait()
        assert d.stop() == 0


def _wait_log(d, text, timeout=10):
    import time
    end = time.time() + timeout
    while time.time() < end:
        if text in d.log():
            return True
        time.sleep(0.01)
    return False


def test_evict_from_a_device_it_is_not_on(daemon, model):
    """evict NAME --device cuda:N frees one device copy and leaves the model served; here no
    model has one, so every form is refused, saying why, and the model is untouched."""
    first = daemon.preload("m", model)
    for dev, text in (("cuda:0", "model 'm' is not on cuda:0; it is served on the host tier "
                                 "(cpu)"),
                      ("cuda:7", "is not on cuda:7"),
                      ("cpu", "the host copy (cpu) goes with the model itself: evict 'm' "
                              "without a device"),
                      ("gpu:1", "device 'gpu:1' unknown: expected \"cuda:N\""),
                      ("cuda:64", "unknown")):
        for flags in ((), ("--drain",), ("--force",)):
            p = daemon.ctl("evict", "m", "--device", dev, *flags, check=False)
            assert p.returncode == 1 and text in p.stderr, (dev, flags, p.stderr)
    p = daemon.ctl("evict", "nope", "--device", "cuda:0", check=False)
    assert p.returncode == 1 and "no model named 'nope'" in p.stderr, p.stderr
    p = daemon.ctl("evict", "m", "--device", "cuda:0", "--device", "cuda:1", check=False)
    assert p.returncode == 2 and "one --device at a time" in p.stderr, p.stderr
    p = daemon.ctl("evict", "m", "--device", "", check=False)
    assert p.returncode == 2 and "wants cuda:N" in p.stderr, p.stderr
    p = daemon.ctl("list", "--device", "cuda:0", check=False)
    assert p.returncode == 2 and "--device does not apply to list" in p.stderr, p.stderr
    p = daemon.ctl("--json", "evict", "m", "--device", "cuda:0", check=False)
    assert p.returncode == 1 and "is not on cuda:0" in p.stderr, p.stderr
    assert [(x["name"], x["state"]) for x in daemon.ctl_json("list")] == [("m", "ready")]
    assert attach(daemon, "m")[-1]["hash"] == first["hash"]
    # A model draining as a whole has no device copy left to take away on its own.
    holder = subprocess.Popen([os.path.join(BIN, "wsd-attach"), "--socket", daemon.sock,
                               "--hold", "0", "m"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline()
        assert daemon.ctl("evict", "m", "--drain").stdout.startswith("draining m")
        p = daemon.ctl("evict", "m", "--device", "cuda:0", check=False)
        assert p.returncode == 1 and "model 'm' is draining: it goes as a whole" in p.stderr, \
            p.stderr
    finally:
        holder.terminate()
        holder.wait()
    for _ in range(250):
        if daemon.ctl_json("list") == []:
            break
        time.sleep(0.02)
    assert daemon.ctl_json("list") == []


def test_while_a_device_upload_runs(tmp_path, model):
    """The window while a ready model is uploaded to another device, held open by the fault
    build's gpu.upload.stall (2 s, then the upload fails here for want of a device): the model
    stays ready and served on the cpu, evict and a second upload are refused, an open on the
    device is WSD_ELOADING, one with --wait is held and then gets the upload's error, and
    cancel stops it. Skipped in builds without fault injection (CI's ASan build has it)."""
    d = Daemon(tmp_path, env={"WEIGHTSD_FAULT": "gpu.upload.stall:*"})
    try:
        if "fault injection armed" not in d.log():
            pytest.skip("weightsd built without -DWSD_FAULT_INJECTION=ON")
        first = d.preload("m", model)

        def ctl_bg(*args):
            return subprocess.Popen([os.path.join(BIN, "weightsctl"), "--admin-socket",
                                     d.admin, *args], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)

        def attach_bg(*args):
            return subprocess.Popen([os.path.join(BIN, "wsd-attach"), "--socket", d.sock,
                                     "--device", "cuda:0", *args, "m"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        up = ctl_bg("preload", "m", str(model), "--device", "cuda:0")
        assert _wait_log(d, "uploading 'm' to 1 more device"), d.log()
        waiter = attach_bg("--wait")
        p = d.ctl("evict", "m", check=False)
        assert p.returncode != 0 and "being uploaded to a device" in p.stderr, p.stderr
        p = d.ctl("preload", "m", str(model), "--device", "cuda:0", check=False)
        assert p.returncode != 0 and "being uploaded to a device already" in p.stderr, p.stderr
        p = d.ctl("evict", "m", "--device", "cuda:0", check=False)
        assert p.returncode != 0 and "being uploaded to cuda:0; cancel that" in p.stderr, \
            p.stderr
        nowait = attach_bg()
        out, err = nowait.communicate(timeout=30)
        assert nowait.returncode != 0 and "being uploaded to cuda:0" in err, err
        assert [(x["name"], x["state"], x.get("uploading")) for x in d.ctl_json("list")] == \
            [("m", "ready", ["cuda:0"])]
        assert "uploading: to cuda:0 (a preload for more devices is running)" in \
            d.ctl("info", "m", "--no-tensors").stdout
        assert attach(d, "m")[-1]["hash"] == first["hash"]  # the cpu copy serves meanwhile
        assert waiter.poll() is None  # held for the upload
        out, err = up.communicate(timeout=30)
        assert up.returncode != 0 and any(s in err for s in NO_DEVICE), err
        out, err = waiter.communicate(timeout=30)
        assert waiter.returncode != 0 and any(s in err for s in NO_DEVICE), err
        # cancel stops a running upload, and the model is as it was.
        up = ctl_bg("preload", "m", str(model), "--device", "cuda:1")
        assert _wait_log(d, "uploading 'm' to 1 more device", timeout=10)
        import time
        for _ in range(100):
            c = d.ctl("cancel", "m", check=False)
            if c.returncode == 0:
                break
            time.sleep(0.01)
        assert c.returncode == 0, c.stderr
        out, err = up.communicate(timeout=30)
        assert up.returncode != 0 and "cancelled" in err, err
        assert "upload of 'm' cancelled" in d.log()
        assert "uploading" not in d.ctl_json("list")[0]
        d.ctl("evict", "m")
        assert d.ctl_json("list") == []
    finally:
        assert d.stop() == 0, d.log()


def test_reload_during_an_upload_waits_for_it(tmp_path, model):
    """A reload that gives a configured model another device while an upload of it runs
    (held open 2 s by the fault build's gpu.upload.stall) is not refused as "being uploaded
    already": it waits for that upload, then asks for what is still missing, and the reload
    reports ready only after that. Here both uploads fail for want of a device."""
    import signal
    cfg = tmp_path / "weightsd.conf"
    cfg.write_text(f"[model g]\npath = {model}\n")
    d = Daemon(tmp_path, extra_args=("--config", str(cfg)),
               env={"WEIGHTSD_FAULT": "gpu.upload.stall:*"})
    up = None
    try:
        if "fault injection armed" not in d.log():
            pytest.skip("weightsd built without -DWSD_FAULT_INJECTION=ON")
        assert _wait_log(d, "ready: serving 1 model"), d.log()
        up = subprocess.Popen([os.path.join(BIN, "weightsctl"), "--admin-socket", d.admin,
                               "preload", "g", str(model), "--device", "cuda:0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert _wait_log(d, "uploading 'g' to 1 more device"), d.log()
        cfg.write_text(f"[model g]\npath = {model}\ndevices = host cuda:1\n")
        d.proc.send_signal(signal.SIGHUP)
        assert _wait_log(d, "configured model 'g' is being uploaded to a device; its "
                            "configured devices follow once that ends"), d.log()
        assert "reloaded: serving" not in d.log()  # the reload waits for it
        assert _wait_log(d, "reloaded: serving", timeout=30), d.log()
        log = d.log()
        tail = log[log.index("its configured devices follow once that ends"):]
        assert "upload of 'g' to more devices failed" in tail  # the admin's upload, cuda:0
        assert "configured model 'g' is resident; uploading it to its configured" in tail, tail
        assert tail.count("uploading 'g' to 1 more device") == 1, tail  # then cuda:1
        assert "refused" not in log, log
        out, err = up.communicate(timeout=30)
        assert up.returncode != 0 and "cuda:0" in err, err
        assert [(x["name"], x["state"]) for x in d.ctl_json("list")] == [("g", "ready")]
    finally:
        if up and up.poll() is None:
            up.kill()
        assert d.stop() == 0, d.log()


def test_a_stale_shared_file_is_not_uploaded(daemon, tmp_path):
    """--share file serves the checkpoint's own pages: once the file is changed in place, the
    model is stale and a preload for another device is refused rather than uploading bytes
    that are no longer the model's."""
    path = write_safetensors(tmp_path / "s.safetensors", [("w", "U8", [8], bytes(range(8)))])
    daemon.preload("s", path, "--share", "file")
    with open(path, "ab") as f:
        f.write(b"\0")  # modified in place: size and mtime change
    p = daemon.ctl("preload", "s", str(path), "--share", "file", "--device", "cuda:0",
                   check=False)
    assert p.returncode != 0 and "exists already (stale)" in p.stderr, p.stderr
    assert "uploading 's'" not in daemon.log()
    assert [(m["name"], m["state"]) for m in daemon.ctl_json("list")] == [("s", "stale")]
