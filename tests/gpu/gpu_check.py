"""GPU tier hardware checks (run through tests/gpu/run.sh, which sets the environment).

One JSON document on stdout: {"ok": bool, "checks": {name: {"ok": bool, ...figures}}}. Each
check is independent and records its own failure, so one broken check does not hide the others.
Worker processes are real processes (this file re-run with --worker), talking to the real daemon.

Covers issue 6 item 6 / RELIABILITY G1, G2, G6 (worker half): import + read-only map +
comparison against the file; a worker's sticky fault leaves the daemon's device healthy, and an
injected sticky error in the daemon's own upload marks the device degraded; G8's pin-failure
rollback (both through WEIGHTSD_FAULT, so the carried build has -DWSD_FAULT_INJECTION=ON); lifetime (importer killed, evict --force with importers, daemon SIGKILL with importers);
4 workers -> one copy (nvidia-smi / cudaMemGetInfo); H2D upload rate against a plain pinned
copy of the same bytes in the same run; attach time per worker; load_into(SomeModule) on cuda:0
against torch.load(...).to("cuda"); 20000 small tensors packed many to a staging copy, read
back whole; a device added to a ready model from its host copy, and one evicted alone (drain
and force under a live mapping); a restart (fd store emulation) bringing the GPU copy back by
itself; the legacy IPC fallback (WEIGHTSD_GPU_LEGACY=1), whose evict --device --force drains.
"""
import json
import os
import platform
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

NT = 300                      # tensors in the big model (attach-time target is for ~300)
# float32 elements per tensor: ~3.6 GiB in all, or WSD_GPU_MODEL_MIB in all (smaller runs
# faster where I/O is slow; it must stay well above a CUDA context, ~0.5 GiB, for the
# one-copy and lifetime checks to tell a copy from noise).
PER = (int(os.environ["WSD_GPU_MODEL_MIB"]) << 20) // (4 * NT) if os.environ.get(
    "WSD_GPU_MODEL_MIB") else (3 << 20) + 12345
# Every check starts only if this many seconds remain of the budget (run.sh kills at 470 s).
BUDGET_S = float(os.environ.get("WSD_GPU_BUDGET_S", "400"))


def log(*a):
    print("#", *a, file=sys.stderr, flush=True)


def smi_used_mib():
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                          "-i", "0"], capture_output=True, text=True, timeout=30).stdout
    return int(out.split()[0])


# ----------------------------------------------------------------------------------------------
# Worker side: one process, driven line by line over stdin/stdout (JSON per line).

def worker(sock, name, ref_path):
    import ctypes
    import torch
    import weightsd
    from safetensors.torch import load_file
    from weightsd import _torch

    def say(**kw):
        print(json.dumps(kw), flush=True)

    torch.zeros(1, device="cuda")  # context first: attach time must not include cuInit
    free0, _ = torch.cuda.mem_get_info()
    say(phase="cuda_ready", free=free0)
    sd = client = None
    for line in sys.stdin:
        cmd = line.strip()
        if cmd in ("attach", "attach_wait"):
            client = weightsd.connect(sock)
            t0 = time.perf_counter()
            model = client.open(name, device="cuda:0", wait=cmd == "attach_wait")
            t1 = time.perf_counter()
            sd = _torch.state_dict(model)
            t2 = time.perf_counter()
            again = client.open(name, device="cuda:0")  # shares this process's import
            t3 = time.perf_counter()
            # One import per process and model: both opens see storage 0 at one address.
            p1, p2 = ctypes.c_void_p(), ctypes.c_void_p()
            same = (weightsd._lib.wsd_model_storage(model.ptr, 0, ctypes.byref(p1), None) == 0
                    and weightsd._lib.wsd_model_storage(again.ptr, 0, ctypes.byref(p2), None) == 0
                    and p1.value is not None and p1.value == p2.value)
            del again
            free1, _ = torch.cuda.mem_get_info()
            say(phase="attached", open_ms=(t1 - t0) * 1e3, state_dict_ms=(t2 - t1) * 1e3,
                second_open_ms=(t3 - t2) * 1e3, free=free1, ntensors=len(sd), shared=same)
        elif cmd.startswith("gaps "):
            # G4: every byte of the allocation outside the storages reads zero (alignment gaps,
            # the tail up to the granularity). The whole mapping is copied out with the driver
            # API; storages are found through the library, the size is the daemon's.
            size = int(cmd.split()[1])
            lib = weightsd._lib
            n = lib.wsd_model_storage_count(model.ptr)
            spans = []
            for i in range(n):
                p, nb = ctypes.c_void_p(), ctypes.c_uint64()
                if lib.wsd_model_storage(model.ptr, i, ctypes.byref(p), ctypes.byref(nb)) == 0:
                    spans.append((p.value or 0, nb.value))
            base = min(a for a, _ in spans)
            buf = (ctypes.c_ubyte * size)()
            cu = ctypes.CDLL("libcuda.so.1")
            rc = cu.cuMemcpyDtoH_v2(buf, ctypes.c_uint64(base), ctypes.c_size_t(size))
            raw = bytearray(buf)
            for a, nb in spans:
                raw[a - base:a - base + nb] = bytes(nb)
            nonzero = len(raw) - raw.count(0) if rc == 0 else None
            say(phase="gaps", rc=rc, size=size, storages=n, nonzero_outside_storages=nonzero)
        elif cmd == "verify":
            ref = load_file(ref_path, device="cuda")
            bad = [k for k, v in ref.items() if not torch.equal(sd[k], v)]
            s = sum(float(v.double().sum()) for v in sd.values())
            say(phase="verified", mismatches=len(bad), first_bad=bad[:3], checksum=s,
                on_cuda=all(v.is_cuda for v in sd.values()))
            del ref
        elif cmd == "write":
            t = next(iter(sd.values()))
            try:
                t.add_(1)
                torch.cuda.synchronize()
                say(phase="wrote", refused=False)
            except RuntimeError as e:  # the context is now unusable; report and leave
                say(phase="wrote", refused=True, error=str(e).splitlines()[0])
                os._exit(3)
        elif cmd == "writable":
            # The opt-in: refused (PermissionDenied) unless preloaded with --allow-gpu-write;
            # where allowed, a write lands in the one shared copy.
            c = weightsd.connect(sock)
            try:
                rw = c.state_dict(name, device="cuda:0", writable=True)
            except weightsd.Error as e:
                say(phase="writable", refused=isinstance(e, weightsd.PermissionDenied),
                    error=str(e))
            else:
                t = next(iter(rw.values()))
                t.add_(1)
                torch.cuda.synchronize()
                say(phase="writable", refused=False, wrote=True)
                del rw, t
        elif cmd == "fault":
            # A device-side assert (cudaErrorAssert, sticky): this worker's context is dead.
            try:
                x = torch.zeros(4, device="cuda")
                x[torch.tensor([1 << 20], device="cuda")] += 1
                torch.cuda.synchronize()
                say(phase="faulted", error=None)
            except RuntimeError as e:
                say(phase="faulted", error=str(e).splitlines()[0])
                os._exit(4)
        elif cmd == "exit":
            break
    say(phase="bye")


LIVE = []  # every Worker and Daemon started, so that any exit path can kill what is left


class Worker:
    def __init__(self, sock, name, ref_path, env=None):
        self.p = subprocess.Popen([sys.executable, __file__, "--worker", sock, name, ref_path],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  bufsize=1, env=None if env is None else {**os.environ, **env})
        LIVE.append(self)
        self.ready = self.read()

    def read(self, timeout=90):
        """The worker's next JSON line; a worker silent for `timeout` s is killed (a hung CUDA
        call must cost one check, not the whole run)."""
        if not select.select([self.p.stdout], [], [], timeout)[0]:
            self.p.kill()
            raise RuntimeError(f"worker {self.p.pid} said nothing for {timeout} s: killed")
        line = self.p.stdout.readline()
        if not line:
            try:
                rc = self.p.wait(10)
            except subprocess.TimeoutExpired:
                rc = "still running"
            raise RuntimeError(f"worker {self.p.pid} exited ({rc})")
        return json.loads(line)

    def ask(self, cmd, timeout=90):
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        return self.read(timeout)

    def close(self):
        if self.p.poll() is None:
            try:
                self.ask("exit")
            except Exception:
                pass
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                self.p.kill()

    def kill(self):
        self.p.kill()
        self.p.wait(30)


def kill_everything():
    for x in LIVE:
        try:
            (x.p if isinstance(x, Worker) else x if isinstance(x, subprocess.Popen)
             else x.proc).kill()
        except Exception:
            pass


# ----------------------------------------------------------------------------------------------
# Driver side.

def make_files(tmp):
    import torch
    from safetensors.torch import save_file
    g = torch.Generator(device="cuda").manual_seed(6)
    big = {f"layer{i:03d}.w": torch.randn(PER, generator=g, device="cuda").cpu()
           for i in range(NT)}
    big_path = os.path.join(tmp, "big.safetensors")
    save_file(big, big_path)
    nbytes = sum(t.numel() * 4 for t in big.values())
    del big
    return big_path, nbytes


def check_unit(res, build):
    p = subprocess.run([os.path.join(build, "tests", "test-gpu")], capture_output=True, text=True,
                       timeout=120)
    res["ok"] = p.returncode == 0 and "not ok" not in p.stdout
    res["tap"] = p.stdout.strip().splitlines()


def check_upload(res, d, path, nbytes):
    import torch
    t0 = time.perf_counter()
    d.preload("big", path, "--device", "cuda:0")
    res["preload_s"] = time.perf_counter() - t0
    info = d.ctl_json("info", "big")
    dev = [x for x in info["devices"] if x["device"] == "cuda:0"][0]
    res["handle"] = dev["handle"]
    res["gpu_bytes"] = dev["bytes"]
    # The whole upload (VMM allocation, pinning the staging buffers, export) and the copy
    # alone; the target is judged on the copy, and both are reported.
    res["upload_us"], res["fill_us"] = dev["upload_us"], dev["fill_us"]
    res["upload_gbps"] = nbytes / max(dev["upload_us"], 1) / 1e3
    res["fill_gbps"] = nbytes / max(dev["fill_us"], 1) / 1e3
    # Anchor: the same bytes, one plain pinned cudaMemcpy, in this run.
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    best = None
    for _ in range(3):
        t = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best or 1e9, time.perf_counter() - t)
    res["pinned_memcpy_gbps"] = nbytes / best / 1e9
    res["ratio_whole_upload"] = res["upload_gbps"] / res["pinned_memcpy_gbps"]
    res["ratio"] = res["fill_gbps"] / res["pinned_memcpy_gbps"]
    res["target_ratio"] = 0.8
    res["ok"] = res["handle"] == "posix_fd" and res["ratio"] >= 0.8
    del src, dst
    torch.cuda.empty_cache()


def check_g1(res, d, path):
    w = Worker(d.sock, "big", path)
    try:
        a = w.ask("attach")
        v = w.ask("verify")
        res.update(attach=a, verify=v)
        wr = w.ask("write")
        res["write_refused"] = wr.get("refused")
        res["write_error"] = wr.get("error")
    except RuntimeError as e:
        res["write_refused"] = res.get("write_refused", True)
        res["worker_exit"] = str(e)
    finally:
        w.kill() if w.p.poll() is None else None
    # The bytes every other worker sees are unchanged by that attempt.
    w2 = Worker(d.sock, "big", path)
    try:
        w2.ask("attach")
        res["after_write_attempt"] = w2.ask("verify")
    finally:
        w2.close()
    res["forged_fd_refused"] = forged_fd_refused()
    if res["write_refused"] is not True:
        # The write landed: serve fresh bytes so the later checks test their own property.
        d.ctl("evict", "big", "--force")
        d.preload("big", path, "--device", "cuda:0")
    res["ok"] = (res.get("verify", {}).get("mismatches") == 0 and res["write_refused"] is True
                 and res["after_write_attempt"]["mismatches"] == 0 and res["forged_fd_refused"])


def check_g6(res, d, path):
    """RELIABILITY G6, the worker half: a worker whose own context dies (device-side assert)
    leaves the daemon's context alone: the device is not marked degraded and the next worker
    attaches and reads correct bytes."""
    w = Worker(d.sock, "big", path)
    try:
        w.ask("attach")
        f = w.ask("fault")
        res["worker_error"] = f.get("error")
        res["worker_exit"] = w.p.wait(30)
    finally:
        if w.p.poll() is None:
            w.kill()
    w2 = Worker(d.sock, "big", path)
    try:
        w2.ask("attach")
        res["next_worker"] = w2.ask("verify")
    finally:
        w2.close()
    gpu = d.ctl_json("stats")["gpu"]
    res["daemon_gpu"] = gpu
    state = [x for x in gpu.get("devices", []) if x["device"] == "cuda:0"]
    res["ok"] = (res["worker_error"] is not None and d.alive() and state
                 and state[0]["state"] == "ok" and res["next_worker"]["mismatches"] == 0)


def forged_fd_refused():
    """cuMemImportFromShareableHandle on an fd that is not a CUDA export must fail."""
    import ctypes
    cu = ctypes.CDLL("libcuda.so.1")
    cu.cuInit(0)
    h = ctypes.c_ulonglong()
    with open("/dev/zero", "rb") as f:
        r = cu.cuMemImportFromShareableHandle(ctypes.byref(h), ctypes.c_void_p(f.fileno()), 1)
    return r != 0


def check_one_copy(res, d, path, nbytes):
    ws = [Worker(d.sock, "big", path) for _ in range(4)]
    try:
        time.sleep(1)
        base = smi_used_mib()
        att = [w.ask("attach") for w in ws]
        time.sleep(1)
        after = smi_used_mib()
        res["smi_used_mib_cuda_ready"] = base
        res["smi_used_mib_4_attached"] = after
        res["delta_mib"] = after - base
        res["model_mib"] = nbytes >> 20
        res["worker_free_delta_mib"] = [(w.ready["free"] - a["free"]) >> 20
                                        for w, a in zip(ws, att)]
        res["attach_open_ms"] = [a["open_ms"] for a in att]
        res["attach_state_dict_ms"] = [a["state_dict_ms"] for a in att]
        res["second_open_ms"] = [a["second_open_ms"] for a in att]
        res["second_open_shared"] = [a["shared"] for a in att]
        res["attach_open_ms_median"] = statistics.median(res["attach_open_ms"])
        res["attach_target_ms"] = 5
        # Four more copies would add 4 x model; one shared copy adds (about) nothing.
        res["ok"] = res["delta_mib"] < res["model_mib"] // 4 and all(res["second_open_shared"])
        res["attach_ok"] = res["attach_open_ms_median"] < 5
    finally:
        for w in ws:
            w.close()


def check_g2(res, d, path, nbytes, Daemon, tmp):
    import torch
    mib = nbytes >> 20
    # (a) an importer killed without releasing: its lease goes with its socket.
    w = Worker(d.sock, "big", path)
    w.ask("attach")
    leases = d.ctl_json("info", "big")["leases"]
    w.kill()
    time.sleep(0.5)
    res["killed_importer"] = {"leases_before": leases,
                              "leases_after": d.ctl_json("info", "big")["leases"]}
    # (b) evict --force while a worker maps: its data stays valid; memory goes with its unmap.
    w = Worker(d.sock, "big", path)
    w.ask("attach")
    before = smi_used_mib()
    d.ctl("evict", "big", "--force")
    time.sleep(0.5)
    at_evict = smi_used_mib()
    v = w.ask("verify")
    w.close()
    time.sleep(1)
    after_exit = smi_used_mib()
    res["evict_force"] = {"used_mib_before": before, "used_mib_after_evict": at_evict,
                          "used_mib_after_importer_exit": after_exit,
                          "mismatches_after_evict": v["mismatches"]}
    # (c) the daemon SIGKILLed while two importers map: both keep correct data; memory is freed
    # when the last importer exits.
    d2 = Daemon(os.path.join(tmp, "d2"))
    ws = []
    try:
        d2.preload("big", path, "--device", "cuda:0")
        ws = [Worker(d2.sock, "big", path) for _ in range(2)]
        for x in ws:
            x.ask("attach")
        with_daemon = smi_used_mib()
        d2.proc.send_signal(signal.SIGKILL)
        d2.proc.wait(30)
        time.sleep(1)
        after_kill = smi_used_mib()
        vs = [x.ask("verify")["mismatches"] for x in ws]
        for x in ws:
            x.close()
        time.sleep(1)
        final = smi_used_mib()
    finally:
        for x in ws:
            if x.p.poll() is None:
                x.kill()
        d2.kill()
    res["daemon_sigkill"] = {"used_mib_with_daemon": with_daemon,
                             "used_mib_after_kill": after_kill, "mismatches_after_kill": vs,
                             "used_mib_after_importers_exit": final}
    torch.cuda.synchronize()
    res["ok"] = (res["killed_importer"]["leases_after"] == 0
                 and v["mismatches"] == 0 and before - at_evict < mib // 2
                 and before - after_exit > mib // 2
                 and vs == [0, 0] and with_daemon - after_kill < mib // 2
                 and with_daemon - final > mib // 2)


def check_load_into(res, d, tmp):
    import torch
    import torch.nn as nn
    import weightsd

    class SomeModule(nn.Module):  # the seed's (client/python/examples/seed_worker.py)
        def __init__(self, n):
            super().__init__()
            self.layers = nn.Sequential(nn.Linear(n, n), nn.ReLU(), nn.Linear(n, n), nn.ReLU(),
                                        nn.Linear(n, 10))
            self.register_buffer("scale", torch.ones(n))

        def forward(self, x):
            return self.layers(x * self.scale)

    torch.manual_seed(0)
    path = os.path.join(tmp, "seed.pth")
    torch.save(SomeModule(1000).state_dict(), path)
    d.preload("seed", path, "--device", "cuda:0")
    client = weightsd.connect(d.sock)
    with weightsd.meta_device():
        m = SomeModule(1000)
    weightsd.load_into(m, "seed", client=client, device="cuda:0")
    ref = SomeModule(1000)
    ref.load_state_dict(torch.load(path))
    ref = ref.to("cuda")
    x = torch.randn(4, 1000, device="cuda")
    with torch.no_grad():
        y, yr = m(x), ref(x)
    res["max_abs_diff"] = float((y - yr).abs().max())
    res["on_cuda"] = all(p.is_cuda for p in m.parameters())
    res["ok"] = res["on_cuda"] and torch.equal(y, yr)


def check_many_small(res, d, tmp):
    """20000 small tensors of four dtypes: the upload packs many storages into each staging
    copy (daemon/tiers/gpu-stage.c), padding between them, so every tensor read back through
    a worker's read-only import must equal the file; and (G4) every byte of the allocation
    outside the storages must read zero, the tail past the layout included."""
    import torch
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(9)
    dtypes = [torch.float32, torch.float16, torch.int8, torch.bool]
    sd = {}
    for i in range(20000):
        n = int(torch.randint(1, 3000, (1,), generator=g))
        dt = dtypes[i % 4]
        t = torch.randn(n, generator=g) * 100
        sd[f"t{i:05d}"] = t > 0 if dt is torch.bool else t.clamp(-127, 127).to(dt)
    path = os.path.join(tmp, "many.safetensors")
    save_file(sd, path)
    res["ntensors"] = len(sd)
    res["bytes"] = sum(t.numel() * t.element_size() for t in sd.values())
    del sd
    d.preload("many", path, "--device", "cuda:0")
    dev = [x for x in d.ctl_json("info", "many", "--no-tensors")["devices"]
           if x["device"] == "cuda:0"][0]
    res["upload_us"], res["fill_us"] = dev["upload_us"], dev["fill_us"]
    w = Worker(d.sock, "many", path)
    try:
        res["attach"] = w.ask("attach", timeout=180)
        res["verify"] = w.ask("verify", timeout=180)
        res["gaps"] = w.ask(f"gaps {dev['bytes']}", timeout=180)
    finally:
        w.kill() if w.p.poll() is None else None
    d.ctl("evict", "many")
    res["ok"] = (res["verify"]["mismatches"] == 0 and res["verify"]["on_cuda"]
                 and res["attach"]["ntensors"] == res["ntensors"]
                 and res["gaps"]["rc"] == 0 and res["gaps"]["nonzero_outside_storages"] == 0)


def check_device_added(res, d, tmp):
    """A model preloaded for the host only, then preloaded again from the same file with
    --device cuda:0: the upload comes from its own host copy (registry.c upload_more; what
    brings a GPU copy back after a restart), and a worker's import must equal the file."""
    import torch
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(11)
    path = os.path.join(tmp, "late.safetensors")
    save_file({f"l{i:02d}": torch.randn(1 << 18, generator=g) for i in range(48)}, path)
    first = d.preload("late", path)
    up = d.preload("late", path, "--device", "cuda:0")
    res["same_hash"] = up["hash"] == first["hash"]
    again = d.ctl("preload", "late", path, "--device", "cuda:0", check=False)
    res["second_refused"] = again.returncode != 0 and "exists already" in again.stderr
    w = Worker(d.sock, "late", path)
    try:
        res["attach"] = w.ask("attach")
        res["verify"] = w.ask("verify")
    finally:
        w.kill() if w.p.poll() is None else None
    d.ctl("evict", "late")
    res["ok"] = (res["same_hash"] and res["second_refused"] and res["verify"]["mismatches"] == 0
                 and res["verify"]["on_cuda"] and res["attach"]["ntensors"] == 48)


def check_device_evicted(res, d, tmp):
    """evict NAME --device cuda:0 (registry_evict_device): refused while a worker holds a
    cuda:0 lease; --drain takes no new cuda:0 opens, keeps the host tier serving and the
    holder's data valid, and frees the copy with that lease; --force on a VMM copy lets go at
    once while the worker's mapping keeps the memory. The model stays listed throughout."""
    import torch
    from safetensors.torch import save_file
    from wsdtest import BIN
    g = torch.Generator().manual_seed(12)
    path = os.path.join(tmp, "evd.safetensors")
    save_file({f"e{i:02d}": torch.randn(1 << 18, generator=g) for i in range(64)}, path)
    used_start = smi_used_mib()  # no worker alive: the daemon's context and its other models
    d.preload("evd", path, "--device", "cpu", "--device", "cuda:0")
    res["copy_mib"] = smi_used_mib() - used_start

    def devices():
        return {x["device"]: x for x in d.ctl_json("info", "evd", "--no-tensors")["devices"]}

    def attach_bin(*args):
        return subprocess.run([os.path.join(BIN, "wsd-attach"), "--socket", d.sock, *args,
                               "evd"], capture_output=True, text=True, timeout=120)

    def listed_devices():
        return [x.get("devices") for x in d.ctl_json("list") if x["name"] == "evd"]

    def stats_copy_bytes():
        devs = d.ctl_json("stats")["gpu"]["devices"]
        return [x["copy_bytes"] for x in devs if x["device"] == "cuda:0"][0]

    res["listed_before"] = listed_devices()
    res["copy_bytes_of_evd"] = devices()["cuda:0"]["bytes"]
    res["stats_copy_bytes_before"] = stats_copy_bytes()
    w = Worker(d.sock, "evd", path)
    try:
        w.ask("attach")
        res["leases_on_cuda0"] = devices()["cuda:0"]["leases"]
        p = d.ctl("evict", "evd", "--device", "cuda:0", check=False)
        res["refused_with_lease"] = p.returncode != 0 and "on cuda:0" in p.stderr
        res["drain"] = d.ctl("evict", "evd", "--device", "cuda:0", "--drain").stdout.strip()
        res["draining_flag"] = devices()["cuda:0"]["draining"]
        res["info_text_says_draining"] = "draining (evicted from this device" in d.ctl(
            "info", "evd", "--no-tensors").stdout
        p = attach_bin("--device", "cuda:0")
        res["new_cuda_open_refused"] = p.returncode != 0 and "being evicted" in p.stderr
        res["host_open_rc"] = attach_bin().returncode
        res["verify_while_draining"] = w.ask("verify")["mismatches"]
    finally:
        w.close()
    time.sleep(1)
    res["devices_after_drain"] = sorted(devices())
    res["listed_after_drain"] = listed_devices()
    res["stats_copy_bytes_after_drain"] = stats_copy_bytes()
    # The worker (and its context) is gone; so must the 64 MiB copy be.
    res["mib_above_start_after_drain"] = smi_used_mib() - used_start
    # Back on cuda:0 from the host copy, then forced off under a live mapping.
    d.preload("evd", path, "--device", "cuda:0")
    w = Worker(d.sock, "evd", path)
    try:
        w.ask("attach")
        res["force"] = d.ctl("evict", "evd", "--device", "cuda:0", "--force").stdout.strip()
        res["devices_after_force"] = sorted(devices())
        res["verify_after_force"] = w.ask("verify")["mismatches"]
        # A new copy there while the forced-off one is still leased: those leases are not
        # the new copy's, so a plain evict of it goes through.
        d.preload("evd", path, "--device", "cuda:0")
        res["leases_on_new_copy"] = devices()["cuda:0"]["leases"]
        p = d.ctl("evict", "evd", "--device", "cuda:0", check=False)
        res["new_copy_evicted_plain"] = (p.returncode == 0
                                         and p.stdout.startswith("evicted evd from cuda:0"))
    finally:
        w.close()
    res["listed"] = [x["name"] for x in d.ctl_json("list")].count("evd") == 1
    d.ctl("evict", "evd")
    res["ok"] = (res["listed_before"] == [["cuda:0"]] and res["listed_after_drain"] == [None]
                 and res["stats_copy_bytes_before"] - res["stats_copy_bytes_after_drain"]
                 == res["copy_bytes_of_evd"]
                 and res["leases_on_cuda0"] >= 1 and res["refused_with_lease"]
                 and res["drain"].startswith("draining evd from cuda:0")
                 and res["draining_flag"] is True and res["info_text_says_draining"]
                 and res["new_cuda_open_refused"]
                 and res["host_open_rc"] == 0 and res["verify_while_draining"] == 0
                 and res["devices_after_drain"] == ["cpu"] and res["copy_mib"] >= 48
                 and res["mib_above_start_after_drain"] < 32
                 and res["force"].startswith("forced evd off cuda:0")
                 and res["devices_after_force"] == ["cpu"] and res["verify_after_force"] == 0
                 and res["leases_on_new_copy"] == 0 and res["new_copy_evicted_plain"]
                 and res["listed"])


def check_restart_reupload(res, tmp):
    """Restart without reloading, GPU tier: a model preloaded for cuda:0 under an emulation of
    systemd's fd store, the daemon SIGKILLed and started again. The copy's export fd, kept in
    the store ("wsd-g0.<hash>.r"), must hold the device memory while nothing else does, and the new
    daemon must take it back (gpu_adopt(): no upload, fill_us 0) and store it again, reading
    no checkpoint (the file is deleted first); a worker opening with wait=True as soon as the
    daemon is READY must get the GPU copy, equal to what the file held. Times the start to that attach (for scale only: Dynamo GMS reports ~1.04 s for its failover)."""
    import torch
    from safetensors.torch import save_file
    from wsdtest import BIN, FdStore, wait_ready
    sub = os.path.join(tmp, "restart")
    os.makedirs(sub, exist_ok=True)
    g = torch.Generator().manual_seed(12)
    path = os.path.join(sub, "r.safetensors")
    ref = os.path.join(sub, "ref.safetensors")
    save_file({f"r{i:02d}": torch.randn(1 << 20, generator=g) for i in range(64)}, path)
    shutil.copy(path, ref)
    store = FdStore(os.path.join(sub, "notify.sock"))

    def ctl(*args):
        p = subprocess.run([os.path.join(BIN, "weightsctl"), "--admin-socket",
                            os.path.join(sub, "a.sock"), *args, "--json"],
                           capture_output=True, text=True, timeout=120)
        if p.returncode != 0:
            raise RuntimeError(f"weightsctl {' '.join(args)}: {p.stderr.strip()}")
        return json.loads(p.stdout)

    used0 = smi_used_mib()
    proc = store.start(sub)
    LIVE.append(proc)
    wait_ready(store, proc, timeout=60)
    # Host tier first, then the device added: the record the restart reads is the one
    # rewritten when the device was added (fdstore.c on_devices), not the preload's.
    first = ctl("preload", "r", path)
    ctl("preload", "r", path, "--device", "cuda:0")
    store.pump(0.5)
    res["records_stored"] = len(store.fds.get("wsd-m.r", []))
    kept_name = f"wsd-g0.{first['hash']}.r"
    res["gpu_fds_stored"] = len(store.fds.get(kept_name, []))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(1)
    # Nobody maps the copy and its daemon is dead: only the stored export fd holds it.
    res["kept_mib_while_down"] = smi_used_mib() - used0
    os.unlink(path)
    store.messages.clear()
    # The worker's CUDA context is made before the daemon starts, as a worker already running
    # would have it; its open (WSD_OPEN_WAIT) then waits for the re-upload, not failing.
    w = Worker(os.path.join(sub, "c.sock"), "r", ref)
    try:
        t0 = time.perf_counter()
        proc = store.start(sub)
        LIVE.append(proc)
        wait_ready(store, proc, timeout=60)
        res["ready_s"] = time.perf_counter() - t0
        res["attach"] = w.ask("attach_wait", timeout=120)
        res["gpu_attached_s"] = time.perf_counter() - t0
        info = ctl("info", "r", "--no-tensors")
        on_gpu = any(x["device"] == "cuda:0" for x in info["devices"])
        res["on_gpu"] = on_gpu
        res["fill_us_after_restart"] = [x.get("fill_us") for x in info["devices"]
                                        if x["device"] == "cuda:0"]
        with open(os.path.join(sub, "weightsd.log"), errors="replace") as f:
            res["taken_back"] = "took back its copy kept from before the restart" in f.read()
        store.pump(0.3)
        res["gpu_fds_stored_again"] = len(store.fds.get(kept_name, []))
        res["same_hash"] = info["hash"] == first["hash"]
        res["verify"] = w.ask("verify")
    finally:
        w.kill() if w.p.poll() is None else None
        proc.kill()
        proc.wait()
        for lst in store.fds.values():
            for fd in lst:
                os.close(fd)
    res["ok"] = (on_gpu and res["same_hash"] and res["records_stored"] == 1
                 and res["gpu_fds_stored"] == 1 and res["kept_mib_while_down"] >= 200
                 and res["taken_back"] and res["fill_us_after_restart"] == [0]
                 and res["gpu_fds_stored_again"] == 1
                 and res["verify"]["mismatches"] == 0
                 and res["verify"]["on_cuda"] and res["attach"]["ntensors"] == 64)


def fault_daemon(Daemon, tmp, name, spec):
    """A daemon with WEIGHTSD_FAULT armed; the carried build must have the hooks
    (-DWSD_FAULT_INJECTION=ON, run.sh's recipe)."""
    d = Daemon(os.path.join(tmp, name), env={"WEIGHTSD_FAULT": spec})
    deadline = time.time() + 3  # the line comes just after the sockets start accepting
    while "fault injection armed" not in d.log():
        if time.time() > deadline:
            d.stop()
            raise RuntimeError("the build has no fault hooks: rebuild with "
                               "-DWSD_FAULT_INJECTION=ON")
        time.sleep(0.05)
    return d


def check_g8_pin_failure(res, Daemon, tmp, path, nbytes):
    """G8's error path: a staging buffer that cannot be pinned fails the upload with
    E_PIN_FAILED and frees what the upload took (the device allocation included); the next
    upload on the same daemon works."""
    before = smi_used_mib()
    d = fault_daemon(Daemon, tmp, "g8", "gpu.hostalloc:1")
    try:
        r = d.ctl("preload", "big", path, "--device", "cuda:0", check=False)
        res["first_rc"], res["first_error"] = r.returncode, r.stderr.strip()[-400:]
        time.sleep(0.5)
        res["used_mib_before_daemon"], res["used_mib_after_failure"] = before, smi_used_mib()
        r2 = d.ctl("preload", "big", path, "--device", "cuda:0", check=False)
        res["retry_rc"], res["retry_error"] = r2.returncode, r2.stderr.strip()[-400:]
        # After the failure the daemon holds its CUDA context, not a copy of the model.
        res["ok"] = (r.returncode != 0 and "E_PIN_FAILED" in r.stderr and r2.returncode == 0
                     and res["used_mib_after_failure"] - before < (nbytes >> 20) // 2)
    finally:
        d.stop()


def check_g6_daemon_degraded(res, Daemon, tmp, path):
    """G6's daemon side: a sticky error in the daemon's own upload (injected: the copy reports
    cudaErrorIllegalAddress) marks cuda:0 degraded; later GPU preloads are refused with
    E_DEVICE_DEGRADED, stats says so, and the host tier keeps serving."""
    from wsdtest import attach
    d = fault_daemon(Daemon, tmp, "g6d", "gpu.sticky:1")
    try:
        d.preload("host", path)
        r = d.ctl("preload", "big", path, "--device", "cuda:0", check=False)
        res["first_rc"], res["first_error"] = r.returncode, r.stderr.strip()[-400:]
        dev = [x for x in d.ctl_json("stats")["gpu"].get("devices", []) if x["device"] == "cuda:0"]
        res["stats_device"] = dev[0] if dev else None
        r2 = d.ctl("preload", "big2", path, "--device", "cuda:0", check=False)
        res["second_rc"], res["second_error"] = r2.returncode, r2.stderr.strip()[-400:]
        res["host_attach"] = attach(d, "host")[-1]
        res["ok"] = (r.returncode != 0 and bool(dev) and dev[0]["state"] == "degraded"
                     and r2.returncode != 0 and "E_DEVICE_DEGRADED" in r2.stderr
                     and res["host_attach"].get("tensors") == NT and d.alive())
    finally:
        d.stop()


def check_legacy(res, Daemon, tmp, path):
    d = Daemon(os.path.join(tmp, "legacy"), env={"WEIGHTSD_GPU_LEGACY": "1"})
    try:
        d.preload("big", path, "--device", "cuda:0")
        dev = [x for x in d.ctl_json("info", "big")["devices"] if x["device"] == "cuda:0"][0]
        res["handle"] = dev["handle"]
        res["limits"] = dev.get("limits")
        w = Worker(d.sock, "big", path)
        try:
            w.ask("attach")
            res["verify"] = w.ask("verify")
            # A legacy allocation cannot be freed under its importer: --force drains it.
            res["evict_device_force"] = d.ctl("evict", "big", "--device", "cuda:0",
                                              "--force").stdout.strip()
            res["verify_after"] = w.ask("verify")["mismatches"]
        finally:
            w.close()
        time.sleep(0.5)
        res["devices_after_release"] = [x["device"] for x in
                                        d.ctl_json("info", "big", "--no-tensors")["devices"]]
        res["ok"] = (res["handle"] == "legacy_ipc" and res["verify"]["mismatches"] == 0
                     and res["evict_device_force"].startswith("draining big from cuda:0")
                     and res["verify_after"] == 0 and res["devices_after_release"] == ["cpu"])
    finally:
        d.stop()


def check_precheck(res, d, tmp):
    """A small model through the whole path (preload on cuda:0, a worker imports, maps and
    compares) before minutes go into the big one: where this fails, so would everything else,
    and the daemon's own view of the device (stats.gpu) says why."""
    import torch
    from safetensors.torch import save_file
    path = os.path.join(tmp, "small.safetensors")
    save_file({f"t{i}": torch.randn(1000 + i) for i in range(8)}, path)
    try:
        d.preload("small", path, "--device", "cuda:0")
    finally:  # the daemon probes the device at the first GPU preload: its view, after it
        res["daemon_gpu"] = d.ctl_json("stats").get("gpu")
    dev = [x for x in d.ctl_json("info", "small")["devices"] if x["device"] == "cuda:0"][0]
    res["handle"] = dev.get("handle")
    w = Worker(d.sock, "small", path)
    try:
        res["attach"] = w.ask("attach", timeout=60)
        res["verify"] = w.ask("verify", timeout=60)
        res["writable_without_allow"] = w.ask("writable", timeout=60)
    finally:
        w.close()
    d.ctl("evict", "small")
    res["ok"] = (res["verify"]["mismatches"] == 0 and res["attach"]["ntensors"] == 8
                 and res["writable_without_allow"].get("refused") is True)
    # --allow-gpu-write: a writable open works and its write is what a read-only worker sees.
    d.preload("small_rw", path, "--device", "cuda:0", "--allow-gpu-write")
    w = Worker(d.sock, "small_rw", path)
    try:
        w.ask("attach", timeout=60)
        res["writable_with_allow"] = w.ask("writable", timeout=60)
        res["after_allowed_write"] = w.ask("verify", timeout=60)
    finally:
        w.close()
    d.ctl("evict", "small_rw")
    res["ok"] = (res["ok"] and res["writable_with_allow"].get("wrote") is True
                 and res["after_allowed_write"]["mismatches"] == 1)


def environment():
    """What the machine is, for reading a failure from the one summary."""
    import torch
    env = {"kernel": platform.release(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "python": platform.python_version()}
    try:
        env["device"] = torch.cuda.get_device_name(0)
        env["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as e:
        env["error"] = f"{type(e).__name__}: {e}"
    return env


def main():
    from wsdtest import BUILD_DIR, Daemon as _Daemon

    class Daemon(_Daemon):  # every daemon is killed on any way out
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            LIVE.append(self)

    t_start = time.time()
    deadline = t_start + BUDGET_S
    out = {"ok": False, "checks": {}}
    summary_path = os.path.join(os.environ["OUT"], "gpu-summary.json") if os.environ.get(
        "OUT") else None

    def emit():
        out["seconds"] = round(time.time() - t_start, 1)
        out["ok"] = (bool(out["checks"]) and all(c["ok"] for c in out["checks"].values())
                     and "script_error" not in out)
        text = json.dumps(out, indent=1, default=str)
        if summary_path:
            try:
                with open(summary_path, "w") as f:
                    f.write(text + "\n")
            except OSError:
                pass
        return text

    state = {"tmp": None}

    def save_logs():
        """The tail of every daemon's log into $OUT: CUDA's error texts and the cleanup
        warnings (cuMemRelease, cudaFree) are only there, and tmp goes at the end."""
        if not os.environ.get("OUT") or not state["tmp"]:
            return
        try:
            with open(os.path.join(os.environ["OUT"], "daemon-logs.txt"), "w") as f:
                for sub in ("d1", "d2", "legacy", "g8", "g6d"):
                    lp = os.path.join(state["tmp"], sub, "weightsd.log")
                    if not os.path.exists(lp):
                        continue
                    with open(lp, "rb") as lf:
                        lf.seek(max(0, os.path.getsize(lp) - (512 << 10)))
                        f.write(f"===== {sub}/weightsd.log (last 512 KiB)\n")
                        f.write(lf.read().decode(errors="replace") + "\n")
        except OSError:
            pass

    def on_term(signum, _frame):  # run.sh's timeout: the summary so far, then out
        out["killed_by_signal"] = signum
        kill_everything()
        save_logs()
        print(emit(), flush=True)
        os._exit(1)
    signal.signal(signal.SIGTERM, on_term)

    def run(name, fn, *a):
        res = out["checks"][name] = {"ok": False}
        if time.time() > deadline - 20:
            res["skipped"] = f"the {BUDGET_S:.0f} s budget ran out"
            log(name, "SKIPPED (budget)")
            return False
        t = time.time()
        try:
            fn(res, *a)
        except Exception as e:
            res["error"] = f"{type(e).__name__}: {e}"
            res["trace"] = traceback.format_exc().splitlines()[-4:]
        res["seconds"] = round(time.time() - t, 2)
        log(name, "ok" if res["ok"] else "FAILED", res.get("error", ""))
        emit()
        return res["ok"]

    def skip(name, why):
        out["checks"][name] = {"ok": False, "skipped": why}
        log(name, "SKIPPED", why)

    files = {}
    d = tmp = None
    try:
        out["environment"] = environment()
        run("unit_test_gpu", check_unit, BUILD_DIR)
        tmp = state["tmp"] = tempfile.mkdtemp(prefix="wsd-gpu-")
        for sub in ("d1", "d2", "legacy", "g8", "g6d"):
            os.makedirs(os.path.join(tmp, sub))

        def start(res):
            nonlocal d
            d = Daemon(os.path.join(tmp, "d1"))
            res["ok"] = True
        # A failed precheck (most likely the importer's side: cuMemSetAccess read-only, say)
        # still leaves the checks that only talk to the daemon worth their time; the ones that
        # import into a worker would fail the same way, each after its own timeout.
        started = run("daemon_start", start)
        imports = started and run("precheck_small_model", check_precheck, d, tmp)

        def files_(res):
            files["path"], files["nbytes"] = make_files(tmp)
            res["model_bytes"] = out["model_bytes"] = files["nbytes"]
            res["ok"] = True
        big = started and run("make_model_file", files_)
        path, nbytes = files.get("path"), files.get("nbytes")
        daemon_checks = [("h2d_upload_rate", check_upload, d, path, nbytes)]
        worker_checks = [("g1_import_readonly_checksum", check_g1, d, path),
                         ("g6_worker_fault_isolated", check_g6, d, path),
                         ("four_workers_one_copy", check_one_copy, d, path, nbytes),
                         ("load_into_somemodule", check_load_into, d, tmp),
                         ("many_small_tensors_packed", check_many_small, d, tmp),
                         ("device_added_after_preload", check_device_added, d, tmp),
                         ("device_evicted_alone", check_device_evicted, d, tmp),
                         ("restart_uploads_again", check_restart_reupload, tmp),
                         ("g2_lifetime", check_g2, d, path, nbytes, Daemon, tmp)]
        for name, fn, *a in daemon_checks:
            run(name, fn, *a) if big else skip(name, "the daemon or the model file failed")
        for name, fn, *a in worker_checks:
            if big and imports:
                run(name, fn, *a)
            else:
                skip(name, "the precheck (a worker's import) or the model file failed")
        if d is not None:
            d.kill()
        small = os.path.join(tmp, "small.safetensors")
        # The legacy path is tried even when VMM failed: it is the fallback for that case.
        run("legacy_ipc_fallback", check_legacy, Daemon, tmp, path if big else small)
        if big:
            run("g8_pin_failure_rolls_back", check_g8_pin_failure, Daemon, tmp, path, nbytes)
            run("g6_daemon_degraded", check_g6_daemon_degraded, Daemon, tmp, path)
        else:
            skip("g8_pin_failure_rolls_back", "the daemon or the model file failed")
            skip("g6_daemon_degraded", "the daemon or the model file failed")
        out["attach_ms_per_worker"] = out["checks"].get("four_workers_one_copy", {}).get(
            "attach_open_ms")
    except Exception as e:  # a bug in this script: still a summary
        out["script_error"] = f"{type(e).__name__}: {e}"
        out["trace"] = traceback.format_exc().splitlines()[-6:]
    finally:
        kill_everything()
        save_logs()
        print(emit(), flush=True)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:5])
        sys.exit(0)
    sys.exit(main())
