"""Integration tests: the real weightsd, the real weightsctl, real C worker processes.

Every test starts its own daemon on private sockets (wsdtest.Daemon), preloads through
weightsctl, and checks what workers see against the bytes of the file on disk.
"""
import array
import json
import os
import signal
import socket
import struct
import subprocess
import time

import pytest

import wsdtest
from wsdtest import Daemon, attach, fnv1a, write_safetensors


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path)
    yield d
    rc = d.stop()
    assert rc == 0, "weightsd did not exit 0 on SIGTERM:\n" + d.log()
    assert not os.path.exists(d.sock) and not os.path.exists(d.admin)


def sample_tensors():
    """A few dtypes, a scalar, an empty tensor and a >1-page tensor, with known bytes."""
    big = bytes((i * 7 + 3) & 0xFF for i in range(3 * 4096 * 4))
    return [
        ("layer.0.weight", "F32", [3, 4096], big),
        ("layer.0.bias", "F16", [5], struct.pack("<5e", 1.0, -2.5, 0.0, 65504.0, 0.5)),
        ("step", "I64", [], struct.pack("<q", 123456789)),
        ("mask", "BOOL", [2, 2], bytes([1, 0, 0, 1])),
        ("empty", "BF16", [0, 7], b""),
        ("ids", "I32", [2, 3], struct.pack("<6i", 1, -2, 3, -4, 5, -6)),
    ]


def storage_checksum(tensors):
    h = 1469598103934665603
    for _, _, _, data in tensors:
        h = fnv1a(data, h)
    return f"{h:016x}"


def contiguous_strides(shape):
    st, acc = [], 1
    for s in reversed(shape):
        st.append(acc)
        acc *= max(s, 1) if s else 1
    return list(reversed(st))


def test_preload_info_list_json_shapes(daemon, tmp_path):
    tensors = sample_tensors()
    path = write_safetensors(tmp_path / "m.safetensors", tensors, {"format": "pt"})
    out = daemon.preload("m", path)
    assert out["name"] == "m" and out["state"] == "ready" and out["ntensors"] == len(tensors)

    info = daemon.ctl_json("info", "m")
    for key in ("name", "source", "state", "bytes", "tensors"):
        assert key in info
    assert info["source"] == str(path)
    assert info["bytes"] == sum(len(t[3]) for t in tensors)
    assert info["metadata"] == {"format": "pt"}
    by_name = {t["name"]: t for t in info["tensors"]}
    for name, dtype, shape, data in tensors:
        t = by_name[name]
        assert t["dtype"] == dtype and t["shape"] == shape and t["nbytes"] == len(data)
        assert t["stride"] == contiguous_strides(shape)

    lst = daemon.ctl_json("list")
    assert lst == [{"name": "m", "state": "ready", "bytes": info["bytes"], "leases": 0}]
    human = daemon.ctl("list").stdout.splitlines()
    assert human[0].split() == ["NAME", "STATE", "BYTES", "LEASES", "SERVED", "ON"], human
    assert human[1].split()[:2] == ["m", "ready"] and human[1].split()[-2:] == ["0", "cpu"]


def write_many(path, names, fill=0):
    """A safetensors file of one-byte U8 tensors, one per name, each holding `fill`."""
    hdr = json.dumps({n: {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]}
                      for i, n in enumerate(names)}, separators=(",", ":")).encode()
    hdr += b" " * (-len(hdr) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hdr)) + hdr + bytes([fill]) * len(names))
    return str(path)


def test_info_reads_a_long_list_in_pages(daemon, tmp_path):
    """weightsctl info asks for 16384 tensors at a time: 20000 make two pages, printed as one
    list in the model's order, in text and in JSON; --no-tensors gives the summary alone."""
    n = 20000
    names = [f"blk.{i}.w" for i in range(n)]
    daemon.preload("m", write_many(tmp_path / "m.safetensors", names))
    lines = daemon.ctl("info", "m").stdout.splitlines()
    at = lines.index(f"tensors:  {n}")
    assert [ln.split()[0] for ln in lines[at + 1:]] == names
    assert lines[at + 1].split()[1:] == ["U8", "(1,)", "stride", "(1,)", "1", "B"], lines[at + 1]
    doc = daemon.ctl_json("info", "m")
    assert [t["name"] for t in doc["tensors"]] == names and "tensor_offset" not in doc
    summary = daemon.ctl("info", "m", "--no-tensors").stdout
    assert summary.endswith(f"tensors:  {n}\n") and "blk.0.w" not in summary, summary
    doc2 = daemon.ctl_json("info", "m", "--no-tensors")
    assert "tensors" not in doc2 and doc2["ntensors"] == n and doc2["hash"] == doc["hash"]


def test_info_fails_when_the_model_changes_between_pages(daemon, tmp_path):
    """A listing of several pages is of one model or fails: weightsctl's stdout is a pipe left
    unread, so it blocks printing its first page; the model is then preloaded again under the
    same name with other tensors, as many of them, and the next page must be refused rather
    than spliced onto the first. The partial JSON is left unterminated, so nothing parses it."""
    n = 40000
    a = write_many(tmp_path / "a.safetensors", [f"a.{i}" for i in range(n)])
    b = write_many(tmp_path / "b.safetensors", [f"b.{i}" for i in range(n)], fill=1)
    daemon.preload("m", a)
    p = subprocess.Popen([os.path.join(wsdtest.BIN, "weightsctl"), "--admin-socket",
                          daemon.admin, "info", "m", "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    first = p.stdout.read(1 << 10)  # the first page has come: it is being printed
    assert first.startswith(b'{"name":"m"'), first
    daemon.ctl("evict", "m")
    daemon.preload("m", b)
    out, err = p.communicate(timeout=60)
    out = first + out
    assert p.returncode == 1, (p.returncode, err)
    assert b"'m' changed while it was being listed" in err, err
    assert b'"b.' not in out and out.count(b'"name":"a.') == 16384, out[-200:]
    with pytest.raises(ValueError):
        json.loads(out)
    # Listed again, it is the new model throughout.
    assert [t["name"] for t in daemon.ctl_json("info", "m")["tensors"]] == [f"b.{i}" for i in range(n)]
    # Evicted between pages: the error says the list printed is a part.
    for args in (["--json"], []):
        p = subprocess.Popen([os.path.join(wsdtest.BIN, "weightsctl"), "--admin-socket",
                              daemon.admin, "info", "m", *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        assert p.stdout.read(1 << 10)
        daemon.ctl("evict", "m")
        _, err = p.communicate(timeout=60)
        assert p.returncode == 1, (args, err)
        assert b"the listing stopped after 16384 of 40000 tensors" in err, err
        assert b"no model named 'm'" in err, err
        daemon.preload("m", b)


def mapping_kb(pid, model):
    """(Rss, Pss) in kB of the weightsd memfd mapping of `model` in process `pid`."""
    rss = pss = None
    inside = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            first = line.split()[0]
            if "-" in first and not first.endswith(":"):
                inside = f"memfd:weightsd:{model} " in line + " "
            elif inside and first == "Rss:":
                rss = int(line.split()[1])
            elif inside and first == "Pss:":
                pss = int(line.split()[1])
    return rss, pss


def test_workers_see_file_bytes_and_share_pages(daemon, tmp_path):
    tensors = sample_tensors()
    path = write_safetensors(tmp_path / "m.safetensors", tensors)
    daemon.preload("m", path)
    expect = storage_checksum(tensors)

    procs = [subprocess.Popen([os.path.join(wsdtest.BIN, "wsd-attach"), "--socket", daemon.sock,
                               "--tensors", "--hold", "0", "m"],
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = []
    for p in procs:
        lines = []
        while not lines or "checksum" not in lines[-1]:
            lines.append(json.loads(p.stdout.readline()))
        outputs.append(lines)
    lst = daemon.ctl_json("list")
    assert lst[0]["leases"] == 4
    info = daemon.ctl_json("info", "m")
    assert sum(h["leases"] for h in info["holders"]) == 4
    assert {h["pid"] for h in info["holders"]} == {p.pid for p in procs}
    # The human form names the holders and how the model is held, as the README says.
    text = daemon.ctl("info", "m").stdout
    for p in procs:
        assert f"  pid {p.pid} uid {os.getuid()}: 1 lease(s)\n" in text, text
    assert "memory:   sealed memfd, " in text and "(--page-cache auto)\n" in text, text
    assert "device:" not in text, text  # no GPU copies
    assert f"hash:     {info['hash']}\n" in text and "leases:   4\n" in text, text
    # Four workers touched every page of the same memfd: each is charged about a quarter.
    for p in procs:
        rss, pss = mapping_kb(p.pid, "m")
        assert rss and pss * 3 <= rss, (rss, pss)

    for p, lines in zip(procs, outputs):
        p.terminate()
        assert p.wait(timeout=30) == 0
        summary = lines[-1]
        assert summary["checksum"] == expect
        seen = {x["name"]: x for x in lines if "dtype" in x}
        for name, dtype, shape, data in tensors:
            assert seen[name]["dtype"] == dtype
            assert seen[name]["shape"] == shape
            assert seen[name]["stride"] == contiguous_strides(shape)
            assert seen[name]["nbytes"] == len(data)
            assert seen[name]["storage_offset"] == 0
    time.sleep(0.1)
    assert daemon.ctl_json("list")[0]["leases"] == 0


def test_private_writes_are_invisible_to_others(daemon, tmp_path):
    tensors = sample_tensors()
    path = write_safetensors(tmp_path / "m.safetensors", tensors)
    daemon.preload("m", path)
    expect = storage_checksum(tensors)
    holder = subprocess.Popen([os.path.join(wsdtest.BIN, "wsd-attach"), "--socket", daemon.sock,
                               "--hold", "3", "m"], stdout=subprocess.PIPE, text=True)
    writer = attach(daemon, "m", "--write")
    assert writer[-1]["checksum"] != expect       # the writer saw its own change
    assert attach(daemon, "m")[-1]["checksum"] == expect   # nobody else did
    out, _ = holder.communicate(timeout=30)
    assert json.loads(out.splitlines()[0])["checksum"] == expect


def test_killed_worker_releases_its_lease(daemon, tmp_path):
    path = write_safetensors(tmp_path / "m.safetensors", sample_tensors())
    daemon.preload("m", path)
    p = subprocess.Popen([os.path.join(wsdtest.BIN, "wsd-attach"), "--socket", daemon.sock,
                          "--hold", "0", "m"], stdout=subprocess.PIPE, text=True)
    p.stdout.readline()
    assert daemon.ctl_json("list")[0]["leases"] == 1
    p.send_signal(signal.SIGKILL)
    p.wait()
    for _ in range(100):
        if daemon.ctl_json("list")[0]["leases"] == 0:
            break
        time.sleep(0.01)
    assert daemon.ctl_json("list")[0]["leases"] == 0
    assert daemon.ctl_json("stats")["leases_released_on_close"] == 1


def test_typed_errors(daemon, tmp_path):
    path = write_safetensors(tmp_path / "m.safetensors", sample_tensors())
    daemon.preload("m", path)

    dup = daemon.ctl("preload", "m", str(path), check=False)
    assert dup.returncode != 0 and "exists already" in dup.stderr
    ev = daemon.ctl("evict", "nope", check=False)
    assert ev.returncode != 0 and "no model named 'nope'" in ev.stderr
    info = daemon.ctl("info", "nope", check=False)
    assert info.returncode != 0 and "no such model" in info.stderr
    bad_name = daemon.ctl("preload", "has space", str(path), check=False)
    assert bad_name.returncode != 0 and "invalid" in bad_name.stderr
    w = subprocess.run([os.path.join(wsdtest.BIN, "wsd-attach"), "--socket", daemon.sock, "nope"],
                       capture_output=True, text=True)
    assert w.returncode != 0 and "no model named 'nope'" in w.stderr
    # Admin verbs on the client socket are refused whatever the file modes.
    p = subprocess.run([os.path.join(wsdtest.BIN, "weightsctl"), "--admin-socket", daemon.sock,
                        "list"], capture_output=True, text=True)
    assert p.returncode != 0 and "admin socket only" in p.stderr
    for line in (dup.stderr, ev.stderr, info.stderr):
        assert line.count("\n") == 1


def test_evict_refuses_with_leases_then_frees(daemon, tmp_path):
    path = write_safetensors(tmp_path / "m.safetensors", sample_tensors())
    daemon.preload("m", path)
    p = subprocess.Popen([os.path.join(wsdtest.BIN, "wsd-attach"), "--socket", daemon.sock,
                          "--hold", "0", "m"], stdout=subprocess.PIPE, text=True)
    p.stdout.readline()
    r = daemon.ctl("evict", "m", check=False)
    assert r.returncode != 0 and "1 lease" in r.stderr
    p.terminate()
    p.wait()
    time.sleep(0.1)
    daemon.ctl("evict", "m")
    assert daemon.ctl_json("list") == []
    assert daemon.ctl_json("stats")["resident_bytes"] == 0


# (file name, bytes, expected rule) for malformed safetensors checkpoints: the daemon must name
# the rule, refuse the preload, and keep serving what it has.
def _hdr(obj, pad=0):
    h = json.dumps(obj, separators=(",", ":")).encode() + b" " * pad
    return struct.pack("<Q", len(h)) + h


BAD_FILES = [
    ("empty", b"", "E_TOO_SMALL"),
    ("too_small", b"\x01\x02\x03", "E_TOO_SMALL"),
    ("header_past_eof", struct.pack("<Q", 1000) + b"{}", "E_"),
    ("offsets_gap", _hdr({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})
     + b"\0" * 8, "E_ST_OFFSETS"),
    ("size_mismatch", _hdr({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}})
     + b"\0" * 4, "E_ST_SIZE_MISMATCH"),
    ("truncated", _hdr({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})
     + b"\0" * 8, "E_ST_INCOMPLETE_BUFFER"),
    ("trailing", _hdr({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
     + b"\0" * 8, "E_ST_INCOMPLETE_BUFFER"),
    ("bad_dtype", _hdr({"w": {"dtype": "f32", "shape": [1], "data_offsets": [0, 4]}})
     + b"\0" * 4, "E_ST_DTYPE"),
    ("not_json", struct.pack("<Q", 4) + b"{abc", "E_ST_JSON"),
    ("dup_key", struct.pack("<Q", 105) +
     b'{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
     b'"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}' + b"\0", "E_ST_DUP_KEY"),
    ("legacy_torch", b"\x80\x02" + b"\0" * 20, "E_LEGACY_TORCH"),
    ("unknown", b"GGUF" + b"\0" * 20, "E_UNKNOWN_FORMAT"),
]


@pytest.mark.parametrize("hlen", [128, 384, 640, 0x8080])
def test_safetensors_header_length_low_byte_0x80(daemon, tmp_path, hlen):
    """A header length ending in 0x80 starts the file with the legacy pickle's PROTO byte
    (640 = 80 02 ..., protocol 2's very first bytes); it is still safetensors."""
    tensors = [("w", "F32", [3], struct.pack("<3f", 1, 2, 3))]
    if hlen > 128:
        tensors.append(("b", "U8", [5], b"abcde"))
    for k in range(hlen):
        path = write_safetensors(tmp_path / f"h{hlen}.safetensors", tensors,
                                 metadata={"pad": "x" * k})
        if struct.unpack("<Q", path.read_bytes()[:8])[0] == hlen:
            break
    else:
        pytest.fail(f"cannot build a {hlen}-byte header")
    assert path.read_bytes()[0] == 0x80
    daemon.preload("m", path)
    assert daemon.ctl_json("info", "m")["format"] == "safetensors"
    assert attach(daemon, "m")[-1]["checksum"] == storage_checksum(tensors)


@pytest.mark.parametrize("name,data,rule", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_malformed_checkpoint_rejected_daemon_keeps_serving(daemon, tmp_path, name, data, rule):
    good = write_safetensors(tmp_path / "good.safetensors", sample_tensors())
    daemon.preload("good", good)
    before = daemon.fd_count()
    bad = tmp_path / f"{name}.safetensors"
    bad.write_bytes(data)
    r = daemon.ctl("preload", "bad", str(bad), check=False)
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and rule in r.stderr, r.stderr
    assert "preload of 'bad'" in daemon.log()
    assert [m["name"] for m in daemon.ctl_json("list")] == ["good"]
    assert attach(daemon, "good")[-1]["checksum"] == storage_checksum(sample_tensors())
    assert daemon.wait_fd_count(before) <= before


def test_unreadable_inputs(daemon, tmp_path):
    missing = daemon.ctl("preload", "x", str(tmp_path / "missing.safetensors"), check=False)
    assert missing.returncode != 0 and "No such file" in missing.stderr
    d = daemon.ctl("preload", "x", str(tmp_path), check=False)
    assert d.returncode != 0 and "directory" in d.stderr
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)   # nobody writes it: opening it blocking would hang a pool thread
    f = daemon.ctl("preload", "x", str(fifo), check=False, timeout=10)
    assert f.returncode != 0 and "special file" in f.stderr
    if os.geteuid() != 0:  # root reads anything: the permission case needs a normal user
        locked = write_safetensors(tmp_path / "locked.safetensors", sample_tensors())
        os.chmod(locked, 0)
        p = daemon.ctl("preload", "x", str(locked), check=False)
        assert p.returncode != 0 and "Permission denied" in p.stderr
    assert daemon.ctl_json("list") == []


def test_hostile_clients_are_dropped_others_unaffected(daemon, tmp_path):
    path = write_safetensors(tmp_path / "m.safetensors", sample_tensors())
    daemon.preload("m", path)
    base_fds = daemon.fd_count()
    holder = subprocess.Popen([os.path.join(wsdtest.BIN, "wsd-attach"), "--socket", daemon.sock,
                               "--hold", "0", "m"], stdout=subprocess.PIPE, text=True)
    holder.stdout.readline()

    def dropped(s):
        # Closing with our bytes unread makes the kernel send a reset: dropped all the same. A
        # typed Error may come first; the end of the stream is what counts.
        try:
            while s.recv(4096):
                pass
            return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    # Garbage bytes (a header announcing a payload that is not a Frame).
    s = wsdtest.raw_connect(daemon.sock)
    s.sendall(struct.pack("<IHH", 6, 0, 0) + b"\xff" * 6)
    assert dropped(s)
    # An oversized frame header: refused before any payload is buffered.
    s = wsdtest.raw_connect(daemon.sock)
    s.sendall(struct.pack("<IHH", 1 << 30, 0, 0))
    assert dropped(s)
    # Reserved header bits set.
    s = wsdtest.raw_connect(daemon.sock)
    s.sendall(struct.pack("<IHH", 2, 0, 1) + b"\x08\x01")
    assert dropped(s)
    # Unsolicited file descriptors: closed by the daemon, connection dropped.
    r, w = os.pipe()
    s = wsdtest.raw_connect(daemon.sock)
    socket.send_fds(s, [struct.pack("<IHH", 2, 1, 0)], [r, w, r])
    assert dropped(s)
    os.close(r)
    os.close(w)
    # A request before HELLO gets an Error, then the connection ends.
    s = wsdtest.raw_connect(daemon.sock)
    s.sendall(struct.pack("<IHH", 2, 0, 0) + b"\x08\x07")  # Frame{id=7}, no body
    data = s.recv(4096)
    assert len(data) > 8 and dropped(s)
    # Half a frame, then hang up.
    s = wsdtest.raw_connect(daemon.sock)
    s.sendall(struct.pack("<IHH", 100, 0, 0) + b"\x08")
    s.close()

    time.sleep(0.2)
    stats = daemon.ctl_json("stats")
    assert stats["protocol_violations"] >= 4
    assert daemon.ctl_json("list")[0]["leases"] == 1
    assert attach(daemon, "m")[-1]["checksum"] == storage_checksum(sample_tensors())
    holder.terminate()
    holder.wait()
    assert daemon.wait_fd_count(base_fds) <= base_fds


def test_socket_modes_and_stale_socket(tmp_path):
    d = Daemon(tmp_path)
    try:
        assert os.stat(d.admin).st_mode & 0o777 == 0o600
        assert os.stat(d.sock).st_mode & 0o777 == 0o660
        # A second daemon on the same sockets refuses to start instead of stealing them.
        p = subprocess.run([os.path.join(wsdtest.BIN, "weightsd"), "--socket", d.sock,
                            "--admin-socket", d.admin], capture_output=True, text=True, timeout=10)
        assert p.returncode != 0 and "another weightsd" in p.stderr
        assert d.alive()
    finally:
        d.kill()
    # After a SIGKILL the socket files stay behind; the next daemon replaces them.
    assert os.path.exists(d.sock)
    d2 = Daemon(tmp_path)
    assert d2.alive()
    assert d2.stop() == 0


def test_help_and_version():
    for tool in ("weightsd", "weightsctl"):
        p = subprocess.run([os.path.join(wsdtest.BIN, tool), "--help"], capture_output=True,
                           text=True)
        assert p.returncode == 0 and "Usage:" in p.stdout
        v = subprocess.run([os.path.join(wsdtest.BIN, tool), "--version"], capture_output=True,
                           text=True)
        assert v.returncode == 0 and "0.1.0" in v.stdout
    bad = subprocess.run([os.path.join(wsdtest.BIN, "weightsctl"), "frobnicate"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command" in bad.stderr
    ctl = subprocess.run([os.path.join(wsdtest.BIN, "weightsctl"), "--help"],
                         capture_output=True, text=True).stdout
    assert "config-check FILE" in ctl and "preload,\n" in ctl and "evict, cancel;" in ctl
    assert "--no-tensors" in ctl and "16384 tensors" in ctl
    wsd = subprocess.run([os.path.join(wsdtest.BIN, "weightsd"), "--help"],
                         capture_output=True, text=True).stdout
    assert wsd.count("1..1048576") == 3 and "K/M/G/T" in wsd and "error (or err)" in wsd
    for tool, args in (("bench-convert", ["--help"]), ("wsd-attach", ["--help"])):
        p = subprocess.run([os.path.join(wsdtest.BIN, tool), *args], capture_output=True,
                           text=True)
        assert p.returncode == 0 and "Usage:" in p.stdout, (tool, p.stderr)


def test_garbage_numbers_are_usage_errors():
    # Nothing listens on this socket: a tool that got past its arguments would fail with 1.
    for tool, args in (("bench-convert", ["lots"]), ("bench-convert", ["0"]),
                       ("bench-convert", ["1", "2"]),
                       ("wsd-attach", ["--socket", "/nonexistent", "--hold", "x", "m"]),
                       ("wsd-attach", ["--socket", "/nonexistent", "--hold", "-1", "m"]),
                       ("wsd-attach", ["--socket", "/nonexistent", "--repeat", "3x", "m"]),
                       ("wsd-attach", ["--socket", "/nonexistent", "--repeat", "0", "m"])):
        p = subprocess.run([os.path.join(wsdtest.BIN, tool), *args], capture_output=True,
                           text=True, timeout=10)
        assert p.returncode == 2 and p.stdout == "", (tool, args, p.returncode, p.stderr)


def test_options_of_another_command_are_usage_errors():
    # Each must fail before connecting (no daemon here): 2, one line naming option and command.
    cases = [(["list", "--drain"], "--drain"), (["info", "m", "--force"], "--force"),
             (["evict", "m", "--dtype", "bf16"], "--dtype"),
             (["cancel", "m", "--cancel-on-exit"], "--cancel-on-exit"),
             (["preload", "m", "/x", "--drain"], "--drain"),
             (["stats", "--no-verify"], "--no-verify"), (["list", "--prometheus"], "--prometheus"),
             (["preload", "m", "/x", "--metrics-file", "/tmp/x"], "--metrics-file"),
             (["stats", "--interval", "5"], "--interval"),
             (["stats", "--prometheus", "--interval", "5"], "--interval"),
             (["config-check", "/x", "--device", "cuda:0"], "--device"),
             (["list", "--no-tensors"], "--no-tensors")]
    for args, opt in cases:
        p = subprocess.run([os.path.join(wsdtest.BIN, "weightsctl"), "--admin-socket",
                            "/nonexistent", *args], capture_output=True, text=True, timeout=10)
        assert p.returncode == 2 and opt in p.stderr and args[0] in p.stderr, (args, p.stderr)
        assert p.stderr.count("\n") == 1, p.stderr
