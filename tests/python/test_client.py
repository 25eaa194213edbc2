"""weightsd's Python client against a real daemon: safetensors state dicts, DLPack, lifetime,
errors. torch.save fixtures live in test_torch_files.py, modules in test_load_into.py."""
import gc
import os
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
import torch

import weightsd
import wsdtest
from conftest import ST_NAME, mapped, sample, write_st


def st_fixture(tmp_path):
    """One tensor per safetensors dtype torch can build, plus scalar, empty and 4-d shapes."""
    tensors = {f"t.{ST_NAME[dt]}": sample(dt, (3, 5), seed=i) for i, dt in enumerate(ST_NAME)}
    tensors["scalar"] = torch.tensor(2.5)
    tensors["empty"] = torch.zeros(0, 4)
    tensors["deep"] = sample(torch.float32, (2, 3, 1, 4), seed=99)
    return write_st(tmp_path / "m.safetensors", tensors), tensors


def test_state_dict_equals_source(daemon, client, tmp_path):
    path, want = st_fixture(tmp_path)
    daemon.preload("m", path)
    sd = client.state_dict("m")
    assert list(sd) == list(want)
    storages = set()
    for name, ref in want.items():
        got = sd[name]
        assert got.dtype == ref.dtype, name
        assert got.shape == ref.shape, name
        assert got.stride() == ref.stride(), name
        assert got.storage_offset() == 0, name
        assert torch.equal(got, ref), name
        if got.numel():
            storages.add(got.storage().data_ptr())
    # safetensors has no sharing: one storage per non-empty tensor.
    assert len(storages) == sum(1 for t in want.values() if t.numel())


def test_tensors_are_zero_copy_and_private(daemon, client, tmp_path):
    w = sample(torch.float32, (64, 64))
    daemon.preload("m", write_st(tmp_path / "m.safetensors", {"w": w}))
    a = client.state_dict("m")["w"]
    (line,) = mapped("m")
    lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
    assert lo <= a.data_ptr() < hi  # the tensor lives in the daemon's memfd mapping
    a.fill_(7.0)  # copy-on-write: private to this mapping
    b = client.state_dict("m")["w"]
    assert torch.equal(b, w)
    assert torch.all(a == 7.0)


def test_unsupported_dtype_names_tensor(daemon, client, tmp_path):
    if hasattr(torch, "uint16"):
        pytest.skip(f"torch {torch.__version__} has uint16")
    import wsdtest
    wsdtest.write_safetensors(str(tmp_path / "u.safetensors"),
                              [("ok", "F32", [1], b"\0\0\0\0"), ("odd", "U16", [2], b"\1\0\2\0")])
    daemon.preload("u", tmp_path / "u.safetensors")
    with pytest.raises(weightsd.UnsupportedDtype, match=r"'odd'.*U16"):
        client.state_dict("u")
    assert daemon.wait_leases("u", 0) == 0  # the failed attempt gave its lease back


@pytest.mark.parametrize("collecting", [True, False])
def test_state_dict_leaves_the_collector_as_it_found_it(daemon, client, tmp_path, collecting):
    """state_dict() pauses the cyclic collector for its loop (many tensors): on return, and on
    an error half-way, it is back in the state the caller had, enabled or not."""
    import wsdtest
    wsdtest.write_safetensors(str(tmp_path / "f4.safetensors"),
                              [("ok", "F32", [1], b"\0\0\0\0"), ("packed", "F4", [2], b"\x21")])
    daemon.preload("ok", write_st(tmp_path / "ok.safetensors", {"w": sample(torch.float32, (4,))}))
    daemon.preload("f4", tmp_path / "f4.safetensors")
    was = gc.isenabled()
    (gc.enable if collecting else gc.disable)()
    try:
        assert torch.equal(client.state_dict("ok")["w"], sample(torch.float32, (4,)))
        assert gc.isenabled() == collecting
        with pytest.raises(weightsd.UnsupportedDtype, match=r"'packed'.*F4"):
            client.state_dict("f4")  # torch has no 4-bit float
        assert gc.isenabled() == collecting
    finally:
        (gc.enable if was else gc.disable)()


def test_dlpack_numpy_and_torch(daemon, client, tmp_path):
    path, want = st_fixture(tmp_path)
    daemon.preload("m", path)
    seen = []
    for name, t in client.tensors("m"):
        ref = want[name]
        assert t.shape == tuple(ref.shape) and t.strides == ref.stride()
        if ref.dtype == torch.bool:  # DLPack 0.6 (Debian's header) has no bool code
            with pytest.raises(weightsd.UnsupportedDtype, match=f"'{name}'.*BOOL"):
                t.__dlpack__()
            continue
        got = torch.utils.dlpack.from_dlpack(t)
        assert got.dtype == ref.dtype and torch.equal(got, ref), name
        if ref.dtype != torch.bfloat16:  # numpy has no bfloat16
            arr = np.from_dlpack(t)
            assert np.array_equal(arr, ref.numpy()), name
        seen.append(name)
    assert "t.F32" in seen and "scalar" in seen


def test_dlpack_keeps_mapping_alive(daemon, client, tmp_path):
    w = sample(torch.int32, (100,))
    daemon.preload("m", write_st(tmp_path / "m.safetensors", {"w": w}))
    arr = np.from_dlpack(dict(client.tensors("m"))["w"])  # the exporter is gone at once
    gc.collect()
    assert mapped("m") and daemon.leases("m") == 1
    assert np.array_equal(arr, w.numpy())
    del arr
    gc.collect()
    assert not mapped("m")
    assert daemon.wait_leases("m", 0) == 0


def test_dlpack_protocol_arguments(daemon, client, tmp_path):
    daemon.preload("m", write_st(tmp_path / "m.safetensors", {"w": torch.arange(4.0)}))
    ((_, t),) = client.tensors("m")
    assert t.__dlpack_device__() == (1, 0)
    got = torch.utils.dlpack.from_dlpack(t.__dlpack__(stream=None, max_version=(1, 0)))
    assert torch.equal(got, torch.arange(4.0))
    with pytest.raises(BufferError):
        t.__dlpack__(copy=True)
    with pytest.raises(BufferError):
        t.__dlpack__(dl_device=(2, 0))
    with pytest.raises(weightsd.NotFound):  # at the call, not at the first iteration
        client.tensors("nope")


def test_unconsumed_capsule_is_freed(daemon, client, tmp_path):
    daemon.preload("m", write_st(tmp_path / "m.safetensors", {"w": torch.ones(4)}))
    ((_, t),) = client.tensors("m")
    cap = t.__dlpack__()
    assert weightsd._model.pinned_count() == 1
    del t
    gc.collect()
    assert not mapped("m") and weightsd._model.pinned_count() == 0
    with pytest.raises(Exception):  # renamed once freed: nobody can consume it any more
        torch.utils.dlpack.from_dlpack(cap)


def test_close_keeps_tensors(daemon, client, tmp_path):
    w = sample(torch.float64, (10, 10))
    daemon.preload("m", write_st(tmp_path / "m.safetensors", {"w": w}))
    sd = client.state_dict("m")
    assert daemon.leases("m") == 1
    client.close()
    assert client.closed
    assert daemon.wait_leases("m", 0) == 0  # the daemon dropped the connection's lease
    assert torch.equal(sd["w"], w)  # ... but the memory stays mapped here
    with pytest.raises(weightsd.ConnectionClosed):
        client.state_dict("m")
    del sd
    gc.collect()
    assert not mapped("m")


def test_gc_unmaps_and_releases(daemon, client, tmp_path):
    daemon.preload("m", write_st(tmp_path / "m.safetensors",
                                 {"a": torch.ones(8), "b": torch.zeros(3, 3)}))
    sd = client.state_dict("m")
    view = sd["a"][2:]
    assert len(mapped("m")) == 1 and daemon.leases("m") == 1
    del sd  # no garbage collection needed here: nothing in a state dict forms a cycle
    assert mapped("m") and daemon.leases("m") == 1  # a view still points into the mapping
    del view
    assert not mapped("m")
    assert daemon.wait_leases("m", 0) == 0
    assert weightsd._model.pinned_count() == 0


def test_free_from_another_thread(daemon, client, tmp_path):
    daemon.preload("m", write_st(tmp_path / "m.safetensors", {"a": torch.ones(8)}))
    box = [client.state_dict("m")]
    th = threading.Thread(target=box.clear)
    th.start()
    th.join()
    gc.collect()
    assert not mapped("m") and daemon.wait_leases("m", 0) == 0
    assert torch.equal(client.state_dict("m")["a"], torch.ones(8))  # connection still in sync


def test_connect_uses_env(daemon, tmp_path, monkeypatch):
    daemon.preload("m", write_st(tmp_path / "m.safetensors", {"a": torch.ones(1)}))
    monkeypatch.setenv("WEIGHTSD_SOCKET", daemon.sock)
    assert weightsd.default_socket() == daemon.sock
    with weightsd.connect() as c:
        assert torch.equal(c.state_dict("m")["a"], torch.ones(1))
    assert c.closed


def test_errors_map_to_classes(daemon, client, tmp_path):
    daemon.preload("m", write_st(tmp_path / "m.safetensors", {"a": torch.ones(1)}))
    with pytest.raises(weightsd.NotFound, match="no model named 'nope'") as e:
        client.state_dict("nope")
    assert e.value.code == -1002 and isinstance(e.value, weightsd.Error)
    with pytest.raises(weightsd.DeviceUnavailable, match="'cuda:0' unavailable") as e:
        client.state_dict("m", device="cuda:0")
    assert e.value.code == -1007 and "host tier" in e.value.message
    with pytest.raises(weightsd.DeviceUnavailable):
        client.state_dict("m", device=torch.device("cuda", 1))
    # writable=True is for GPU copies only; the host copy is a sealed memfd.
    with pytest.raises(ValueError, match="only a GPU copy can be mapped writable"):
        client.state_dict("m", writable=True)
    with pytest.raises(weightsd.DeviceUnavailable, match="'cuda:0' unavailable"):
        client.state_dict("m", device="cuda:0", writable=True)
    with pytest.raises(weightsd.ConnectionFailed) as e:
        weightsd.connect(str(tmp_path / "no.sock"))
    assert e.value.code == -2
    assert daemon.leases("m") == 0
    # The connection is still usable after the daemon refused requests.
    assert torch.equal(client.state_dict("m")["a"], torch.ones(1))


@pytest.mark.parametrize("code,cls", [
    (-1000, weightsd.ProtocolError), (-1001, weightsd.VersionMismatch),
    (-1002, weightsd.NotFound), (-1004, weightsd.BadCheckpoint), (-1005, weightsd.Busy),
    (-1006, weightsd.Loading), (-1007, weightsd.DeviceUnavailable),
    (-1015, weightsd.ConnectionClosed), (-1018, weightsd.HashMismatch),
    (-1019, weightsd.Canceled), (-5, weightsd.Error),
])
def test_error_codes(code, cls):
    e = weightsd._lib.error_for(code, "daemon says so")
    assert type(e) is cls and e.code == code and e.message == "daemon says so"
    assert "daemon says so" in str(e) and str(code) in str(e)


def test_connect_rejects_a_negative_timeout(daemon):
    with pytest.raises(ValueError, match="timeout must be >= 0"):
        weightsd.connect(daemon.sock, timeout=-1)
    with weightsd.connect(daemon.sock, timeout=0) as c:  # 0 = wait forever, still allowed
        assert not c.closed
    for bad in (float("nan"), float("inf"), 2**31 / 1000):
        with pytest.raises(ValueError, match="timeout must be"):
            weightsd.connect(daemon.sock, timeout=bad)


def test_a_sub_millisecond_timeout_is_not_forever(daemon, tmp_path):
    """0.4 ms used to round down to 0 ms, which the C library takes as "wait forever": with the
    daemon stopped, the open below would never have returned."""
    path = wsdtest.write_safetensors(tmp_path / "m.safetensors", [("a", "F32", [1], bytes(4))])
    daemon.ctl("preload", "m", str(path))
    c = weightsd.connect(daemon.sock, timeout=0.0004)
    got = []

    def opener():
        try:
            got.append(c.open("m"))
        except weightsd.Error as e:
            got.append(e)
    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        th = threading.Thread(target=opener)
        th.start()
        th.join(5)
        finished = not th.is_alive()
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
    th.join(10)
    c.close()
    assert finished, "an open with a 0.4 ms timeout waited on a stopped daemon for 5 s"
    assert isinstance(got[0], weightsd.Error) and "tim" in str(got[0]).lower(), got


def test_open_waiting_on_a_cancelled_preload_raises_canceled(daemon, client, tmp_path):
    # 1 GiB of sparse file takes about a second to copy: time to queue an open and cancel.
    big = wsdtest.write_sparse_safetensors(tmp_path / "big.safetensors", 1 << 30)
    ctl = [os.path.join(wsdtest.BIN, "weightsctl"), "--admin-socket", daemon.admin]
    bg = subprocess.Popen(ctl + ["preload", "c", str(big)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 5
    while not any(m["name"] == "c" for m in daemon.ctl_json("list")):
        assert time.time() < deadline and bg.poll() is None, "the preload never showed up"
        time.sleep(0.01)
    got = []

    def opener():
        try:
            got.append(client.open("c", wait=True))
        except weightsd.Error as e:
            got.append(e)
    th = threading.Thread(target=opener)
    th.start()
    time.sleep(0.2)  # the open reaches the daemon and waits
    r = daemon.ctl("cancel", "c", check=False)
    th.join(timeout=60)
    bg.communicate(timeout=60)
    if r.returncode != 0:  # the preload won the race: the open got the model
        assert "not loading" in r.stderr and isinstance(got[0], weightsd._model.Model)
        pytest.skip("the preload finished before it could be cancelled")
    e = got[0]
    assert type(e) is weightsd.Canceled and e.code == -1019, repr(e)
    assert isinstance(e, weightsd.Error) and "cancel" in e.message
    assert daemon.ctl_json("list") == []


def test_tensor_info_matches_the_accessors(daemon, client, tmp_path):
    """wsd_model_tensor_info() (one call for all tensors, what state_dict() uses) says what the
    per-field accessors say, stops at the end of the model, and writes no byte past `stride`:
    a binding built against a shorter struct keeps working."""
    import ctypes
    from weightsd import _lib

    path, want = st_fixture(tmp_path)
    daemon.preload("m", path)
    model = client.open("m")
    n = _lib.wsd_model_tensor_count(model.ptr)
    infos = _lib.tensor_infos(model.ptr)
    assert len(infos) == n == len(want)
    for i, info in enumerate(infos):
        t = _lib.wsd_model_tensor(model.ptr, i)
        nd = _lib.wsd_tensor_ndim(t)
        data, nbytes = ctypes.c_void_p(), ctypes.c_uint64()
        assert _lib.wsd_model_storage(model.ptr, info.storage, ctypes.byref(data),
                                      ctypes.byref(nbytes)) == 0
        assert (info.name, info.dtype, info.ndim, info.shape[:nd], info.strides[:nd],
                info.storage, info.storage_offset, info.nbytes, info.storage_data or None,
                info.storage_nbytes) == (
            _lib.wsd_tensor_name(t), _lib.wsd_tensor_dtype(t), nd,
            _lib.wsd_tensor_shape(t)[:nd], _lib.wsd_tensor_strides(t)[:nd],
            _lib.wsd_tensor_storage(t), _lib.wsd_tensor_storage_offset(t),
            _lib.wsd_tensor_nbytes(t), data.value, nbytes.value)
    assert [info.name.decode() for info in infos] == list(want)

    # A caller whose struct ends after dtype: two entries of 16 bytes, nothing else written.
    short = _lib.TensorInfo.ndim.offset
    buf = (ctypes.c_ubyte * (2 * short + 8))(*([0xAB] * (2 * short + 8)))
    out = ctypes.cast(buf, ctypes.POINTER(_lib.TensorInfo))
    assert _lib.wsd_model_tensor_info(model.ptr, n - 2, 5, out, short) == 2
    for k in range(2):
        name = ctypes.c_char_p.from_address(ctypes.addressof(buf) + k * short).value
        dtype = ctypes.c_int.from_address(ctypes.addressof(buf) + k * short + 8).value
        assert (name, dtype) == (infos[n - 2 + k].name, infos[n - 2 + k].dtype)
    assert list(buf[2 * short:]) == [0xAB] * 8
    assert _lib.wsd_model_tensor_info(model.ptr, n, 1, out, short) == 0
    assert _lib.wsd_model_tensor_info(model.ptr, 0, 1, out, 4) == -22  # no room for a name
    model.free()
