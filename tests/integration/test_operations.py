"""What an operator sees: the log stays readable under a flood of hostile peers (rate-limited
lines plus one summary per site), command-line settings survive a SIGHUP reload, and a second
SIGTERM/SIGINT while the daemon stops exits at once.
"""
import os
import re
import signal
import socket
import struct
import subprocess
import time

import wsdtest
from wsdtest import Daemon
from rawproto import ERROR, WSD_ELIMIT, Conn, hello, zigzag

BURST = 10  # LOG_RATELIMIT_BURST in daemon/log.h
SUMMARY = re.compile(r"(\d+) similar messages? suppressed in the last \d+ s; the latest: (.*)")


def wait_for(pred, timeout=5.0):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def site_lines(log, marker):
    """(lines logged, lines suppressed) for the call site whose lines contain `marker`."""
    logged = suppressed = 0
    for line in log.splitlines():
        m = SUMMARY.search(line)
        if m and marker in m.group(2):
            suppressed += int(m.group(1))
        elif not m and marker in line:
            logged += 1
    return logged, suppressed


def test_a_flood_of_hostile_peers_keeps_the_log_bounded(tmp_path):
    # debug would log every line (and every connection): run as an operator would.
    d = Daemon(tmp_path, extra_args=("--log-level", "info", "--max-connections", "1"))
    try:
        d.fd_count()  # the harness's readiness probes are gone
        holder = Conn(d.sock)
        holder.handshake()
        # Each peer is over the connection limit (one site) and then sends a frame that is
        # not a Frame (another site).
        end, peers = time.time() + 1.5, 0
        while time.time() < end:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(d.sock)
            try:
                s.sendall(struct.pack("<IHH", 6, 0, 0) + b"\xff" * 6)
            except OSError:
                pass  # closed at once: too many refused peers waiting already
            s.close()
            peers += 1

        # Every line is either logged or counted in a summary, which comes once the window
        # has passed even though the flood has stopped. (The counters move on for a moment,
        # while the daemon works through the peers still queued.)
        def accounted():
            st = d.ctl_json("stats")
            log = d.log()
            return (st["protocol_violations"] > 10 * BURST and
                    st["connections"]["rejected"] > 10 * BURST and
                    sum(site_lines(log, "protocol violation")) == st["protocol_violations"] and
                    sum(site_lines(log, "refusing connection")) == st["connections"]["rejected"])
        assert wait_for(accounted, timeout=15), (peers, d.ctl_json("stats"), d.log()[-3000:])
        log = d.log()
        logged_v, suppressed_v = site_lines(log, "protocol violation")
        logged_r, suppressed_r = site_lines(log, "refusing connection")
        # One window for a 1.5 s flood (two if the daemon lagged behind it by seconds).
        assert BURST <= logged_v <= 2 * BURST and BURST <= logged_r <= 2 * BURST, log
        assert suppressed_v > 0 and suppressed_r > 0
        assert len(log.splitlines()) < 80, log
        # The daemon serves on, and its admin socket was never in the way.
        holder.close()
        c = Conn(d.sock)
        c.handshake()
        c.close()
    finally:
        assert d.stop() == 0, d.log()


def test_reload_keeps_what_the_command_line_set(tmp_path):
    conf = tmp_path / "weightsd.conf"
    text = ("[daemon]\nlog-level = err\nmax-frame = 2048\nmax-connections = 100\n"
            "memory-budget = 1G\n")
    conf.write_text(text)
    d = Daemon(tmp_path, extra_args=("--config", str(conf), "--log-level", "debug",
                                     "--max-frame", "1024", "--max-connections", "2",
                                     "--memory-budget", "64M"))
    try:
        d.fd_count()

        def check_cli_values():
            a = Conn(d.sock)
            assert a.handshake()[4] == 1024  # the announced max-frame
            b = Conn(d.sock)
            b.handshake()
            c = Conn(d.sock)
            c.send(hello(3))
            assert c.error()[1] == WSD_ELIMIT  # max-connections 2, not 100
            for x in (a, b, c):
                x.close()
            assert d.ctl_json("stats")["memory_budget"] == 64 << 20
            assert d.wait_fd_count(base) <= base

        base = d.fd_count()
        check_cli_values()
        # The same settings again, and a socket path the command line also set.
        conf.write_text(text + "socket = /nonexistent/other.sock\n")
        d.proc.send_signal(signal.SIGHUP)
        # A notice: it would not be logged at the file's log-level = err.
        assert wait_for(lambda: "reloaded: serving" in d.log()), d.log()
        check_cli_values()
        after = d.log().split("reloaded: serving", 1)[1]
        assert re.search(r"debug: connection \d+ on client socket", after), after
        assert "socket changed" not in d.log()
    finally:
        assert d.stop() == 0, d.log()


def test_reload_of_a_removed_key_goes_back_to_the_default(tmp_path):
    """A key taken out of the file reverts at the next reload (to the command line's value, or
    the built-in default) instead of the last file's value staying in force."""
    conf = tmp_path / "weightsd.conf"
    conf.write_text("[daemon]\nmax-connections = 2\nmemory-budget = 64M\n")
    d = Daemon(tmp_path, extra_args=("--config", str(conf)))
    try:
        d.fd_count()

        def third_connection_refused():
            a, b, c = Conn(d.sock), Conn(d.sock), Conn(d.sock)
            try:
                a.handshake()
                b.handshake()
                c.send(hello(3))
                mid, body, fields, fds = c.recv_frame()
                return body == ERROR and zigzag(fields.get(1, 0)) == WSD_ELIMIT
            finally:
                for x in (a, b, c):
                    x.close()

        assert third_connection_refused()
        assert d.ctl_json("stats")["memory_budget"] == 64 << 20
        conf.write_text("[daemon]\n")
        d.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "reloaded: serving" in d.log()), d.log()
        assert wait_for(lambda: not third_connection_refused())
        assert d.ctl_json("stats")["memory_budget"] != 64 << 20
    finally:
        assert d.stop() == 0, d.log()


def start_preload(d, tmp_path):
    # Sparse on disk, slow enough to preload that the daemon is still copying when told to stop.
    big = wsdtest.write_sparse_safetensors(tmp_path / "big.safetensors", 1 << 30)
    ctl = subprocess.Popen([os.path.join(wsdtest.BIN, "weightsctl"), "--admin-socket", d.admin,
                            "preload", "big", str(big)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    assert wait_for(lambda: any(m["name"] == "big" for m in d.ctl_json("list")))
    return ctl


def test_one_sigterm_cancels_the_running_preload(tmp_path):
    """systemctl stop must not wait for a copy that takes as long as the checkpoint is big
    (past TimeoutStopSec, into SIGKILL): the preload is cancelled and the daemon exits 0."""
    d = Daemon(tmp_path)
    ctl = start_preload(d, tmp_path)  # ~2 s of copying here; the signal comes in the first 0.1
    t0 = time.time()
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(timeout=120) == 0, d.log()
    took = time.time() - t0
    assert ctl.wait(timeout=30) != 0  # the waiting weightsctl hears why
    d.stop()
    log = d.log()
    assert "received SIGTERM, stopping" in log
    assert "stopping: cancelling 1 running preload" in log, log
    assert re.search(r"preload of 'big' .* failed: .*cancelled", log), log
    assert "preloaded 'big'" not in log and "again while stopping" not in log, log
    assert took < 1.5, (took, log)


def test_second_stop_signal_exits_at_once(tmp_path):
    d = Daemon(tmp_path)
    ctl = start_preload(d, tmp_path)
    # Two stop signals, taken in one go: the first starts the clean stop, which then waits for
    # the preload; the second must not. Held while stopped so both are pending together (two
    # of the same signal would merge into one).
    d.proc.send_signal(signal.SIGSTOP)
    d.proc.send_signal(signal.SIGTERM)
    d.proc.send_signal(signal.SIGINT)
    t0 = time.time()
    d.proc.send_signal(signal.SIGCONT)
    rc = d.proc.wait(timeout=30)
    took = time.time() - t0
    ctl.wait(timeout=30)
    d.stop()
    log = d.log()
    # It dies by the second signal, as a shell and systemd expect of "exit now".
    assert rc in (-signal.SIGTERM, -signal.SIGINT), (rc, log)
    assert re.search(r"received SIG(TERM|INT), stopping", log), log
    m = re.search(r"received SIG(TERM|INT) again while stopping: exiting now, abandoning (\d+) "
                  r"running preloads?", log)
    assert m, log
    if m.group(2) == "1":
        assert "preloaded 'big'" not in log
        assert took < 5, took
    assert not re.search(r"info: stopped$", log, re.M), log
    # Nothing left behind that the next start would trip over.
    assert not os.path.exists(d.sock) and not os.path.exists(d.admin)


def test_memfd_noexec_enforced(tmp_path):
    """RELIABILITY I5: under vm.memfd_noexec = 2 (a memfd may never be executable) the daemon's
    arenas are still created, and workers accept them with the extra F_SEAL_EXEC the kernel
    then adds (libweightsd checks the seals it needs as a mask, never for equality). The
    sysctl is per pid namespace, so the daemon runs in a new one, as pid 1."""
    import pytest
    if os.geteuid() != 0 or not os.path.exists("/proc/sys/vm/memfd_noexec"):
        pytest.skip("needs root and a kernel with vm.memfd_noexec (Linux 6.3)")
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                           capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a pid namespace here: {probe.stderr.decode().strip()}")
    data = bytes(range(256)) * 64
    path = wsdtest.write_safetensors(tmp_path / "m.safetensors", [("w", "U8", [len(data)], data)])
    d = Daemon(tmp_path, wrapper=(
        "unshare", "--pid", "--fork", "--mount-proc", "sh", "-c",
        'echo 2 > /proc/sys/vm/memfd_noexec && echo memfd_noexec=$(cat /proc/sys/vm/memfd_noexec)'
        ' && exec "$@"', "sh"))
    try:
        # The sysctl reads as the reader's namespace has it: the wrapper says what it set.
        assert d.log().startswith("memfd_noexec=2\n"), d.log()
        d.preload("m", path)
        got = wsdtest.attach(d, "m")[-1]
        assert got["checksum"] == f"{wsdtest.fnv1a(data):016x}", got
    finally:
        # unshare ignores SIGTERM while it waits: the daemon (its child, pid 1 inside) gets it,
        # and unshare exits with its status.
        with open(f"/proc/{d.pid}/task/{d.pid}/children") as f:
            children = [int(x) for x in f.read().split()]
        for pid in children:
            os.kill(pid, signal.SIGTERM)
        rc = d.proc.wait(timeout=30)
        d.stop()
    assert rc == 0, d.log()
    assert "ready" in d.log()
