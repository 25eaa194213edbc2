"""Every daemon limit, configured low and crossed by a real peer against the real daemon: the peer
gets a typed Error where one can be sent, is disconnected, is counted in stats, and the daemon's
fds and lease table are back where they were (RELIABILITY I6, I8, I9, I10).
"""
import json
import os
import signal
import socket
import struct
import subprocess
import time

import pytest

import wsdtest
from wsdtest import Daemon, attach, write_safetensors
import rawproto
from rawproto import OPEN_REPLY, WSD_ELIMIT, WSD_EPROTO, Conn, hello, open_req


def small_model(tmp_path, ntensors=1, name="m.safetensors"):
    tensors = [(f"t{i}", "F32", [4], struct.pack("<4f", i, 1, 2, 3)) for i in range(ntensors)]
    return write_safetensors(tmp_path / name, tensors)


@pytest.fixture
def started(tmp_path):
    """Starts daemons with given arguments; checks each exits 0 and is back at its baseline."""
    daemons = []

    def start(*args, **kw):
        sub = tmp_path / f"d{len(daemons)}"
        sub.mkdir()
        d = Daemon(sub, extra_args=args, **kw)
        daemons.append(d)
        return d

    yield start
    for d in daemons:
        rc = d.stop()
        assert rc == 0, "weightsd did not exit 0:\n" + d.log()


def stats(d):
    return d.ctl_json("stats")


def wait_for(pred, timeout=3.0):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def test_total_connection_limit_typed_error_and_admin_reserve(started):
    d = started("--max-connections", "4")
    base = d.fd_count()
    conns = [Conn(d.sock) for _ in range(4)]
    for c in conns:
        c.handshake()
    extra = Conn(d.sock)
    extra.send(hello(9))
    mid, code, msg = extra.error()
    assert (mid, code) == (9, WSD_ELIMIT) and "connection limit" in msg
    assert extra.closed_by_peer()
    # The admin socket keeps a reserve above the total, so the operator can still look.
    st = stats(d)
    assert st["connections"]["rejected"] >= 1
    for c in conns + [extra]:
        c.close()
    assert d.wait_fd_count(base) <= base
    # Room again once they are gone.
    again = Conn(d.sock)
    again.handshake()
    again.close()


def test_per_uid_connection_limit(started, tmp_path):
    d = started("--max-connections-per-uid", "2")
    d.preload("m", small_model(tmp_path))
    a, b = Conn(d.sock), Conn(d.sock)
    a.handshake()
    b.handshake()
    # wsd-attach gets the typed error through libweightsd, not a bare reset.
    p = subprocess.run([os.path.join(wsdtest.BIN, "wsd-attach"), "--socket", d.sock, "m"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode != 0 and "limit exceeded" in p.stderr, p.stderr
    assert stats(d)["connections"]["rejected_uid"] >= 1
    a.close()
    assert attach(d, "m")[-1]["tensors"] == 1
    b.close()


def test_max_frame_is_announced_and_enforced(started):
    d = started("--max-frame", "1024")
    c = Conn(d.sock)
    assert c.handshake()[4] == 1024
    c.send(struct.pack("<IHH", 2000, 0, 0) + b"\x08" * 100)
    mid, code, msg = c.error()
    assert (mid, code) == (0, WSD_ELIMIT) and "2000" in msg and "1024" in msg
    assert c.closed_by_peer()
    c.close()
    assert stats(d)["protocol_violations"] == 1


def test_max_fds_per_message(started):
    d = started("--max-fds", "1")
    base = d.fd_count()
    r, w = os.pipe()
    c = Conn(d.sock)
    c.handshake()
    c.send(struct.pack("<IHH", 2, 2, 0), fds=[r, w])
    _, code, msg = c.error()
    assert code == WSD_ELIMIT and "2 file descriptors" in msg
    assert c.closed_by_peer()
    c.close()
    # Within the limit an fd is still unsolicited: no request carries any.
    c = Conn(d.sock)
    c.handshake()
    c.send(struct.pack("<IHH", 2, 1, 0), fds=[r])
    _, code, msg = c.error()
    assert code == WSD_EPROTO and "unsolicited" in msg
    c.close()
    os.close(r)
    os.close(w)
    assert d.wait_fd_count(base) <= base


def test_max_leases_per_connection(started, tmp_path):
    d = started("--max-leases", "2")
    d.preload("m", small_model(tmp_path))
    c = Conn(d.sock)
    c.handshake()
    for i in range(2):
        c.send(open_req(10 + i, "m"))
        mid, body, _, fds = c.recv_frame()
        assert body == OPEN_REPLY and len(fds) == 1
        os.close(fds[0])
    c.send(open_req(12, "m"))
    mid, code, msg = c.error()
    assert (mid, code) == (12, WSD_ELIMIT) and "limit 2" in msg
    assert d.ctl_json("list")[0]["leases"] == 2
    c.close()
    assert wait_for(lambda: d.ctl_json("list")[0]["leases"] == 0)


def test_output_queue_cap_drops_a_peer_that_never_reads(started, tmp_path):
    d = started("--max-output-queue", "4K")
    # A big manifest makes every OpenReply larger than the whole queue cap.
    d.preload("m", small_model(tmp_path, ntensors=2000))
    base = d.fd_count()
    c = Conn(d.sock)
    c.handshake()
    c.send(b"".join(open_req(100 + i, "m") for i in range(64)))
    assert wait_for(lambda: stats(d)["connections"]["outq_dropped"] == 1)
    assert wait_for(lambda: d.ctl_json("list")[0]["leases"] == 0)
    c.close()
    assert d.wait_fd_count(base) <= base
    assert attach(d, "m")[-1]["tensors"] == 2000


def test_handshake_timeout(started):
    d = started("--handshake-timeout", "300")
    base = d.fd_count()
    c = Conn(d.sock)
    t0 = time.time()
    _, code, msg = c.error()
    assert code == WSD_ELIMIT and "HELLO" in msg
    assert c.closed_by_peer()
    assert 0.25 < time.time() - t0 < 3
    c.close()
    assert stats(d)["connections"]["timed_out"] == 1
    assert d.wait_fd_count(base) <= base


def test_half_frame_stall_is_dropped(started):
    d = started("--handshake-timeout", "300")
    c = Conn(d.sock)
    c.handshake()
    c.send(struct.pack("<IHH", 100, 0, 0) + b"\x08\x01")
    _, code, msg = c.error()
    assert code == WSD_ELIMIT and "started frame" in msg
    c.close()
    # A slow dribble is no better than a stall: the clock starts with the frame's first byte.
    c = Conn(d.sock)
    c.handshake()
    t0 = time.time()
    payload = open_req(5, "nope")
    try:
        for b in payload:
            c.send(bytes([b]))
            time.sleep(0.05)
        raised = False
    except (BrokenPipeError, ConnectionResetError):
        raised = True
    assert raised or c.closed_by_peer()
    assert time.time() - t0 < len(payload) * 0.05 + 0.5
    c.close()
    assert stats(d)["connections"]["timed_out"] == 2


def test_unread_replies_time_out(started, tmp_path):
    d = started("--handshake-timeout", "300")
    d.preload("m", small_model(tmp_path, ntensors=2000))
    c = Conn(d.sock)
    c.handshake()
    c.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c.send(b"".join(open_req(100 + i, "m") for i in range(32)))
    assert wait_for(lambda: stats(d)["connections"]["timed_out"] == 1)
    assert wait_for(lambda: d.ctl_json("list")[0]["leases"] == 0)
    c.close()


def test_idle_timeout_spares_lease_holders(started, tmp_path):
    d = started("--idle-timeout", "300")
    d.preload("m", small_model(tmp_path))
    holder = subprocess.Popen([os.path.join(wsdtest.BIN, "wsd-attach"), "--socket", d.sock,
                               "--hold", "0", "m"], stdout=subprocess.PIPE, text=True)
    holder.stdout.readline()
    idle = Conn(d.sock)
    idle.handshake()
    _, code, msg = idle.error()
    assert code == WSD_ELIMIT and "idle" in msg
    idle.close()
    time.sleep(0.8)
    assert d.ctl_json("list")[0]["leases"] == 1  # the holder was not idle-closed
    holder.terminate()
    holder.wait()


def test_emfile_on_accept_is_survived_and_counted(started, tmp_path):
    d = started(wrapper=("prlimit", "--nofile=40:40"))
    d.preload("m", small_model(tmp_path))
    base = d.fd_count()
    conns, refused = [], 0
    for _ in range(60):
        c = Conn(d.sock, timeout=2)
        try:
            c.handshake()
            conns.append(c)
        except (EOFError, ConnectionResetError, BrokenPipeError):
            refused += 1
            c.close()
    assert refused > 0 and len(conns) > 10
    # The daemon did not spin or die; free its fds and it serves again.
    for c in conns:
        c.close()
    assert d.wait_fd_count(base) <= base
    assert stats(d)["connections"]["emfile"] >= refused
    assert attach(d, "m")[-1]["tensors"] == 1


def test_limits_from_the_config_file(started, tmp_path):
    conf = tmp_path / "weightsd.conf"
    conf.write_text("[daemon]\nmax-connections-per-uid = 1\nmax-frame = 2048\nmax-fds = 0\n"
                    "max-output-queue = 1M\nhandshake-timeout = 400\nidle-timeout = 0\n")
    d = started("--config", str(conf))
    d.fd_count()  # the harness's readiness probes are gone
    a = Conn(d.sock)
    assert a.handshake()[4] == 2048
    b = Conn(d.sock)
    b.send(hello(3))
    assert b.error()[1] == WSD_ELIMIT
    a.close()
    b.close()
    bad = tmp_path / "bad.conf"
    bad.write_text("[daemon]\nmax-frame = 10\nmax-fds = 9\nidle-timeout = -1\n")
    p = subprocess.run([os.path.join(wsdtest.BIN, "weightsd"), "--check-config", str(bad)],
                       capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr.count("bad.conf:") == 3, p.stderr


def test_reload_raises_the_total_and_the_per_uid_default_follows(started, tmp_path):
    conf = tmp_path / "weightsd.conf"
    conf.write_text("[daemon]\nmax-connections = 2\n")
    d = started("--config", str(conf))
    d.fd_count()
    a, b = Conn(d.sock), Conn(d.sock)
    a.handshake()
    b.handshake()
    c = Conn(d.sock)
    c.send(hello(3))
    assert c.error()[1] == WSD_ELIMIT
    c.close()
    conf.write_text("[daemon]\nmax-connections = 3\n")
    d.proc.send_signal(signal.SIGHUP)

    def third_admitted():
        c = Conn(d.sock)
        try:
            c.handshake()
            return True
        except AssertionError:
            return False
        finally:
            c.close()
    assert wait_for(third_admitted)
    a.close()
    b.close()


def test_manifest_too_large_to_send_is_refused_before_the_copy(started, tmp_path):
    """9000 tensors with 4000-byte names make a manifest of about 72 MB, more than one 64 MiB
    reply can carry. The preload must say so from the parse, before it reserves budget or copies:
    with a budget smaller than the data, the refusal is E_LIMIT, not E_BUDGET."""
    n, width = 9000, 4000
    tensors = [(f"{i:08d}".ljust(width, "x"), "F32", [256], bytes(1024)) for i in range(n)]
    path = write_safetensors(tmp_path / "wide.safetensors", tensors)
    d = started("--memory-budget", "1M")
    p = d.ctl("preload", "wide", str(path), check=False)
    assert p.returncode != 0
    assert "E_LIMIT" in p.stderr and "E_BUDGET" not in p.stderr, p.stderr
    assert f"manifest of {n} tensors" in p.stderr and str(64 * 2**20 - 64) in p.stderr, p.stderr
    p = d.ctl("preload", "wide", str(path), "--share", "file", check=False)
    assert p.returncode != 0 and "E_LIMIT" in p.stderr and "manifest" in p.stderr, p.stderr
    # The same model with short names fits the reply and reaches the budget check as before.
    short = [(f"t{i}", "F32", [256], bytes(1024)) for i in range(n)]
    p = d.ctl("preload", "short", str(write_safetensors(tmp_path / "short.safetensors", short)),
              check=False)
    assert p.returncode != 0 and "E_BUDGET" in p.stderr, p.stderr
    assert d.ctl_json("list") == []


def fnv_multicollision(bits, steps, prefix=b"w."):
    """2^steps distinct alphanumeric names whose FNV-1a 64 hashes agree in the low `bits` bits
    (the construction of test-strhash.c): FNV-1a's low bits depend only on the low bits of its
    state, so at each step two 3-byte blocks that meet there can be chained, and every choice of
    one block per step ends in the same low bits."""
    mask, prime = (1 << bits) - 1, 1099511628211
    alnum = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

    def step(h, block):
        for b in block:
            h = ((h ^ b) * prime) & mask
        return h

    h = step(1469598103934665603 & mask, prefix)
    pairs = []
    for _ in range(steps):
        seen = {}
        for x in range(len(alnum) ** 3):
            block = bytes((alnum[x % 62], alnum[x // 62 % 62], alnum[x // 3844]))
            v = step(h, block)
            if v in seen:
                pairs.append((seen[v], block))
                h = v
                break
            seen[v] = block
    names = [prefix]
    for a, b in pairs:
        names = [n + a for n in names] + [n + b for n in names]
    return [n.decode() for n in names]


def test_names_chosen_to_collide_do_not_slow_the_client(started, tmp_path):
    """libweightsd indexes a model's tensor names in an open-addressed table at open. With the
    FNV-1a it used before, 2^18 names built to share the low 19 bits (the table's size for
    them) made every insert walk all the earlier ones: about 3.4 * 10^10 probes per worker's
    open. Keyed SipHash, like the daemon's tables, leaves nothing to aim at; the open must
    take well under a second, so the timeout is generous."""
    names = fnv_multicollision(19, 18)
    assert len(set(names)) == 1 << 18
    path = write_safetensors(tmp_path / "flood.safetensors",
                             [(n, "F32", [1], struct.pack("<f", i)) for i, n in enumerate(names)])
    d = started()
    d.preload("flood", path)
    t0 = time.monotonic()
    out = attach(d, "flood", timeout=30)[-1]
    assert out["tensors"] == 1 << 18, out
    print(f"open of 2^18 colliding names: {time.monotonic() - t0:.2f} s")


def test_info_of_700000_tensors_comes_in_pages(started, tmp_path):
    """info listed every tensor in one reply: for 700000 of them its JSON is over the 64 MiB a
    frame carries, and weightsctl could only report E_LIMIT (before that, the daemon closed the
    connection). weightsctl now reads the list in pages and prints it whole; a request for
    everything at once is still refused, with E_LIMIT and the way out, and the connection
    serves the next request."""
    n = 700000
    path = tmp_path / "many.safetensors"
    hdr = json.dumps({f"t{i}": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]}
                      for i in range(n)}, separators=(",", ":")).encode()
    hdr += b" " * (-len(hdr) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hdr)) + hdr + bytes(n))
    d = started()
    d.preload("many", str(path))
    doc = d.ctl_json("info", "many")
    assert doc["ntensors"] == n and "tensor_offset" not in doc
    assert [t["name"] for t in doc["tensors"]] == [f"t{i}" for i in range(n)]
    assert doc["tensors"][-1] == {"name": f"t{n - 1}", "dtype": "U8", "shape": [1],
                                  "stride": [1], "nbytes": 1, "storage": n - 1,
                                  "storage_offset": 0}
    text = d.ctl("info", "many", "--no-tensors").stdout
    assert f"tensors:  {n}\n" in text and " t0 " not in text, text[-300:]
    assert "tensors" not in d.ctl_json("info", "many", "--no-tensors")

    c = rawproto.Conn(d.admin, timeout=60)
    try:
        c.handshake()
        c.send(rawproto.info_req(2, "many"))
        mid, code, msg = c.error()
        assert (mid, code) == (2, rawproto.WSD_ELIMIT), (mid, code, msg)
        assert f"the {n} tensors of 'many'" in msg and "tensor_limit" in msg, msg
        # A page from anywhere, and the end: nothing past it, an error beyond.
        c.send(rawproto.info_req(3, "many", offset=n - 3, limit=100))
        mid, page = c.admin_json()
        assert mid == 3 and page["tensor_offset"] == n - 3 and page["ntensors"] == n
        assert [t["name"] for t in page["tensors"]] == [f"t{i}" for i in range(n - 3, n)]
        c.send(rawproto.info_req(4, "many", offset=n, limit=1))
        assert c.admin_json()[1]["tensors"] == []
        c.send(rawproto.info_req(5, "many", offset=n + 1, limit=1))
        mid, code, msg = c.error()
        assert (mid, code) == (5, rawproto.WSD_EINVAL), (mid, code, msg)
        assert f"tensor offset {n + 1} is past the {n} tensors of 'many'" in msg, msg
        # A page of 65536 is cut where its JSON would pass 8 MiB, never left empty.
        c.send(rawproto.info_req(6, "many", limit=1 << 20))
        mid, page = c.admin_json()
        size = len(json.dumps(page["tensors"], separators=(",", ":")))
        assert 0 < len(page["tensors"]) < n and 8 * 2**20 - 200 < size <= 8 * 2**20, size
    finally:
        c.close()
    assert d.ctl_json("list")[0]["name"] == "many"  # the daemon and its admin socket serve on
