"""weightsd as a system service (issue 7): the sd_notify protocol, socket activation, the config
file and its checker, SIGHUP reloads and the access policy.

PID 1 here is not systemd, so the tests play the service manager's part the way the protocol
documents it: a datagram socket in NOTIFY_SOCKET receives the daemon's messages, and
systemd-socket-activate (systemd's own tool) hands over named listening sockets.
"""
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

import wsdtest
from wsdtest import BIN, Daemon, attach, write_safetensors

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


class Manager:
    """The service manager's end of NOTIFY_SOCKET: collects the daemon's datagrams."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.addr = path if path[0] != "\0" else "@" + path[1:]
        self.messages = []

    def next(self, timeout=10):
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        fields = dict(line.split("=", 1) for line in data.split("\n") if line)
        self.messages.append(fields)
        return fields

    def wait_for(self, key, timeout=20):
        """Returns the messages up to and including the first one carrying `key`."""
        seen, end = [], time.time() + timeout
        while True:
            left = end - time.time()
            if left <= 0:
                raise AssertionError(f"no {key} from weightsd; got {seen}")
            m = self.next(left)
            seen.append(m)
            if key in m:
                return seen

    def close(self):
        self.sock.close()


def model_file(tmp_path, name="m.safetensors", nbytes=1 << 20, seed=1):
    data = bytes((i * 31 + seed) & 0xFF for i in range(256)) * (nbytes // 256)
    return write_safetensors(tmp_path / name, [("w", "U8", [len(data)], data)])


def write_config(path, text):
    path.write_text(text)
    return path


def start(tmp_path, config=None, env=None, **kw):
    args = ("--config", str(config)) if config else ()
    return Daemon(tmp_path, extra_args=args, env=env, **kw)


@pytest.fixture
def manager(tmp_path):
    m = Manager(str(tmp_path / "notify.sock"))
    yield m
    m.close()


def test_ready_only_after_configured_preloads(tmp_path, manager):
    # Big enough that the preloads are still running when the sockets already serve.
    big = model_file(tmp_path, "big.safetensors", 96 << 20)
    small = model_file(tmp_path, "small.safetensors", 1 << 20)
    cfg = write_config(tmp_path / "w.conf", f"""
[daemon]
log-level = info

[model big]
path = {big}

[model small]
path = small.safetensors
""")
    d = start(tmp_path, cfg, env={"NOTIFY_SOCKET": manager.addr})
    try:
        msgs = manager.wait_for("READY")
        # READY=1 is the last thing said during start, and by then every preload is done.
        lst = {m["name"]: m["state"] for m in d.ctl_json("list")}
        assert lst == {"big": "ready", "small": "ready"}
        before = msgs[:-1]
        assert any("EXTEND_TIMEOUT_USEC" in m for m in before), msgs
        assert any(m.get("STATUS", "").startswith("preloading 2 models") for m in before), msgs
        assert msgs[-1]["READY"] == "1" and msgs[-1]["STATUS"] == "serving 2 models"
        assert int(next(m for m in before if "EXTEND_TIMEOUT_USEC" in m)
                   ["EXTEND_TIMEOUT_USEC"]) > 0
        # the relative path was taken from the config's directory
        assert d.ctl_json("info", "small")["source"] == str(small)
        # STOPPING=1 on SIGTERM, and a clean exit
        d.proc.send_signal(signal.SIGTERM)
        assert manager.wait_for("STOPPING")[-1]["STOPPING"] == "1"
        assert d.proc.wait(timeout=30) == 0, d.log()
    finally:
        assert d.stop() == 0, d.log()


def test_failed_preload_still_becomes_ready_and_says_so(tmp_path, manager):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    cfg = write_config(tmp_path / "w.conf", f"[model bad]\npath = {bad}\n")
    d = start(tmp_path, cfg, env={"NOTIFY_SOCKET": manager.addr})
    try:
        ready = manager.wait_for("READY")[-1]
        assert "1 configured preload failed" in ready["STATUS"], ready
        assert d.ctl_json("list") == []
    finally:
        assert d.stop() == 0, d.log()


def test_abstract_notify_socket_and_no_config(tmp_path):
    name = f"\0wsd-test-{os.getpid()}-{time.time_ns()}"
    m = Manager(name)
    d = start(tmp_path, env={"NOTIFY_SOCKET": m.addr})
    try:
        ready = m.wait_for("READY")[-1]
        assert ready["STATUS"] == "serving 0 models"
    finally:
        assert d.stop() == 0, d.log()
        m.close()


def test_watchdog_pings_at_half_the_interval(tmp_path, manager):
    d = start(tmp_path, env={"NOTIFY_SOCKET": manager.addr, "WATCHDOG_USEC": "200000"})
    try:
        t0 = time.time()
        pings = 0
        while pings < 5:
            if "WATCHDOG" in manager.next(timeout=2):
                pings += 1
        # 5 pings at 100 ms: about 0.4 s after the first (sent at start)
        assert time.time() - t0 < 2.0
    finally:
        assert d.stop() == 0, d.log()


def test_watchdog_for_another_pid_is_not_ours(tmp_path, manager):
    d = start(tmp_path, env={"NOTIFY_SOCKET": manager.addr, "WATCHDOG_USEC": "100000",
                             "WATCHDOG_PID": "1"})
    try:
        manager.wait_for("READY")
        with pytest.raises(socket.timeout):
            while True:
                assert "WATCHDOG" not in manager.next(timeout=0.5)
    finally:
        assert d.stop() == 0, d.log()


def test_sighup_reload_adds_removes_and_keeps_old_config_when_bad(tmp_path, manager):
    a = model_file(tmp_path, "a.safetensors", seed=1)
    b = model_file(tmp_path, "b.safetensors", seed=2)
    cfg = write_config(tmp_path / "w.conf", f"[model a]\npath = {a}\n")
    d = start(tmp_path, cfg, env={"NOTIFY_SOCKET": manager.addr})
    try:
        manager.wait_for("READY")
        # a worker holds 'a' across the reload that drops it: drained, not yanked
        holder = subprocess.Popen([os.path.join(BIN, "wsd-attach"), "--socket", d.sock,
                                   "--hold", "2", "a"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 10
        while d.ctl_json("info", "a")["leases"] == 0:
            assert time.time() < deadline and holder.poll() is None, holder.stderr
            time.sleep(0.02)

        write_config(cfg, f"[model b]\npath = {b}\n")
        d.proc.send_signal(signal.SIGHUP)
        msgs = manager.wait_for("READY")
        reloading = next(m for m in msgs if "RELOADING" in m)
        assert int(reloading["MONOTONIC_USEC"]) > 0
        states = {m["name"]: m["state"] for m in d.ctl_json("list")}
        assert states == {"a": "draining", "b": "ready"}
        assert holder.wait(timeout=30) == 0, holder.stderr.read()
        deadline = time.time() + 5
        while "a" in {m["name"] for m in d.ctl_json("list")}:
            assert time.time() < deadline
            time.sleep(0.02)

        # A broken config changes nothing, and the daemon says why (file:line) and serves on.
        write_config(cfg, f"[model b]\npath = {b}\n[model c]\npath = {a}\ndtype = int3\n")
        d.proc.send_signal(signal.SIGHUP)
        ready = manager.wait_for("READY")[-1]
        assert "reload" in ready["STATUS"] and "failed" in ready["STATUS"], ready
        assert f"{cfg}:5: dtype: 'int3'" in d.log()
        assert [m["name"] for m in d.ctl_json("list")] == ["b"]
        assert attach(d, "b")
    finally:
        assert d.stop() == 0, d.log()


def test_config_check_reports_every_bad_line(tmp_path):
    cfg = write_config(tmp_path / "bad.conf", """\
[daemon]
log-level = shouty
max-connections = -3
frobnicate = yes
memory-budget = 4X

[access]
client-users = no-such-user-here
admin-groups = no-such-group-here

[model m]
path = /nonexistent/m.safetensors
dtype = int4
share = tmpfs
devices = tpu:0
no-verify = perhaps
what is this
[model m]
[nonsense]
[model empty]
""")
    p = subprocess.run([os.path.join(BIN, "weightsctl"), "config-check", str(cfg)],
                       capture_output=True, text=True, env={**os.environ, "PATH": "/usr/bin:/bin"})
    assert p.returncode == 1, p
    lines = [l for l in p.stderr.splitlines() if l]
    want = {2: "log-level", 3: "max-connections", 4: "frobnicate", 5: "memory-budget",
            8: "no-such-user-here", 9: "no-such-group-here", 13: "dtype", 14: "share",
            15: "devices", 16: "no-verify", 17: "what is this", 18: "appears twice",
            19: "unknown section", 20: "no path"}
    for line, what in want.items():
        assert any(l.startswith(f"{cfg}:{line}: ") and what in l for l in lines), \
            f"line {line} ({what}) not reported:\n{p.stderr}"
    assert len(lines) == len(want), p.stderr
    assert f"{len(want)} errors" in p.stdout

    good = write_config(tmp_path / "good.conf", """\
; comments are fine
[daemon]
socket = /run/weightsd/weightsd.sock
log-level = notice
memory-budget = 64G
[access]
client-users = root 65534
admin-groups = root
[model llama]
path = /var/lib/weightsd/llama.safetensors
dtype = bf16
share = memfd
devices = host
no-verify = no
""")
    p = subprocess.run([os.path.join(BIN, "weightsctl"), "config-check", str(good)],
                       capture_output=True, text=True)
    assert p.returncode == 0 and p.stderr == "", p
    assert "OK (1 model to preload)" in p.stdout

    # The daemon refuses to start on a bad file, with the same list.
    p = subprocess.run([os.path.join(BIN, "weightsd"), "--config", str(cfg), "--socket",
                        str(tmp_path / "c.sock")], capture_output=True, text=True, timeout=10)
    assert p.returncode == 1 and f"{cfg}:13: dtype" in p.stderr


def test_socket_activation_with_named_sockets(tmp_path, manager):
    # The admin socket comes first here: names, not positions, decide.
    sa = shutil.which("systemd-socket-activate")
    if not sa:
        pytest.skip("systemd-socket-activate not installed")
    csock, asock = str(tmp_path / "c.sock"), str(tmp_path / "a.sock")
    d = Daemon(tmp_path, wrapper=(sa, "-l", asock, "-l", csock, "--fdname=admin:client",
                                  f"--setenv=NOTIFY_SOCKET={manager.addr}"))
    try:
        manager.wait_for("READY")
        log = d.log()
        assert "fd 3 ('admin') is the admin socket" in log, log
        assert "fd 4 ('client') is the client socket" in log, log
        path = model_file(tmp_path)
        d.preload("m", path)
        assert attach(d, "m")
        # admin verbs on the client socket are refused whatever the file modes
        p = subprocess.run([os.path.join(BIN, "weightsctl"), "--admin-socket", csock, "list"],
                           capture_output=True, text=True, timeout=10)
        assert p.returncode == 1 and "admin socket only" in p.stderr, p
    finally:
        assert d.stop() == 0, d.log()


def test_socket_activation_rejects_a_datagram_socket(tmp_path):
    sa = shutil.which("systemd-socket-activate")
    if not sa:
        pytest.skip("systemd-socket-activate not installed")
    dsock = str(tmp_path / "d.sock")
    p = subprocess.Popen([sa, "-d", "-l", dsock, "--fdname=client",
                          os.path.join(BIN, "weightsd"), "--socket", str(tmp_path / "c.sock")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # systemd-socket-activate starts its command on the first datagram
        deadline = time.time() + 10
        while not os.path.exists(dsock):
            assert time.time() < deadline
            time.sleep(0.01)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.sendto(b"x", dsock)
        s.close()
        _, err = p.communicate(timeout=10)
    finally:
        p.kill()
    assert p.returncode == 1 and "not a listening AF_UNIX stream socket" in err, err


@pytest.fixture
def open_dir():
    """A socket directory the unprivileged test uid can reach (pytest's tmp dirs are 0700)."""
    d = tempfile.mkdtemp(prefix="wsd-policy-")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def as_nobody(*argv):
    return subprocess.run([*NOBODY, *argv], capture_output=True, text=True, timeout=20)


def loosen(d):
    """Misconfigured modes on purpose: the policy has to hold on its own."""
    os.chmod(d.sock, 0o666)
    os.chmod(d.admin, 0o666)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to run a peer under another uid")
def test_policy_refuses_a_uid_outside_it(open_dir):
    d = Daemon(open_dir)
    try:
        loosen(d)
        d.preload("m", model_file(wsdtest_path(open_dir)))
        p = as_nobody(os.path.join(BIN, "wsd-attach"), "--socket", d.sock, "m")
        assert p.returncode != 0, p
        stats = d.ctl_json("stats")
        assert stats["connections"]["denied"] == 1, stats
        assert f"access denied on the client socket: pid" in d.log()
        assert "uid 65534" in d.log()
        p = as_nobody(os.path.join(BIN, "weightsctl"), "--admin-socket", d.admin, "list")
        assert p.returncode != 0, p
        assert d.ctl_json("stats")["connections"]["denied"] == 2
        assert attach(d, "m")  # root still served
    finally:
        assert d.stop() == 0, d.log()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to run a peer under another uid")
def test_policy_admits_configured_client_uid_but_not_on_admin(open_dir, manager):
    cfg = write_config(wsdtest_path(open_dir) / "w.conf",
                       "[access]\nclient-users = 65534\n")
    d = start(open_dir, cfg)
    try:
        loosen(d)
        d.preload("m", model_file(wsdtest_path(open_dir)))
        p = as_nobody(os.path.join(BIN, "wsd-attach"), "--socket", d.sock, "m")
        assert p.returncode == 0, p.stderr
        p = as_nobody(os.path.join(BIN, "weightsctl"), "--admin-socket", d.admin, "list")
        assert p.returncode != 0, p
        assert d.ctl_json("stats")["connections"]["denied"] == 1
        assert "access denied on the admin socket" in d.log()

        # a reload that drops the uid applies to the next connection
        write_config(cfg, "[access]\nclient-users = root\n")
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.time() + 10
        while "reloaded" not in d.log():
            assert time.time() < deadline, d.log()
            time.sleep(0.02)
        p = as_nobody(os.path.join(BIN, "wsd-attach"), "--socket", d.sock, "m")
        assert p.returncode != 0, p
    finally:
        assert d.stop() == 0, d.log()


def wsdtest_path(d):
    return pathlib.Path(d)


SYSTEMD_DIR = pathlib.Path(__file__).resolve().parents[2] / "systemd"


def rendered_units(tmp_path):
    """The units as installed, but naming the binaries under test (verify wants them to exist)."""
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    text = (SYSTEMD_DIR / "weightsd.service.in").read_text()
    for k, v in {"@WSD_BINDIR@": BIN, "@WSD_SBINDIR@": BIN,
                 "@WSD_CONFIG_DIR@": str(conf_dir),
                 "@WSD_DOCDIR@": "/usr/share/doc/weightsd"}.items():
        text = text.replace(k, v)
    assert "@WSD_" not in text
    units = tmp_path / "units"
    units.mkdir()
    (units / "weightsd.service").write_text(text)
    for name in ("weightsd.socket", "weightsd-admin.socket"):
        shutil.copy(SYSTEMD_DIR / name, units / name)
    return units


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_units_verify_and_security_threshold(tmp_path):
    units = rendered_units(tmp_path)
    names = [str(units / n) for n in ("weightsd.service", "weightsd.socket",
                                      "weightsd-admin.socket")]
    p = subprocess.run(["systemd-analyze", "verify", "--man=no", *names],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stderr.strip() == "", p.stderr
    # S4: exposure at most 2.0 (the threshold is on the 0-100 scale)
    p = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=20",
                        names[0]], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr
    exposure = float(p.stdout.split("Overall exposure level for weightsd.service: ")[1].split()[0])
    assert exposure <= 2.0
    # what the GPU needs is spelled out, and what would break it is not set
    text = (units / "weightsd.service").read_text()
    directives = {l for l in text.splitlines() if l and not l.startswith("#")}
    assert "PrivateDevices=no" in directives and "DeviceAllow=/dev/nvidiactl rw" in directives
    assert "Type=notify" in text and "FileDescriptorName=client" in \
        (units / "weightsd.socket").read_text()
    assert "FileDescriptorName=admin" in (units / "weightsd-admin.socket").read_text()
    # Documentation= names only what an install puts there (no man pages exist).
    docs = [l for n in ("weightsd.service", "weightsd.socket", "weightsd-admin.socket")
            for l in (units / n).read_text().splitlines() if l.startswith("Documentation=")]
    assert docs == ["Documentation=file:/usr/share/doc/weightsd/README.md"], docs


@pytest.mark.skipif(not shutil.which("cmake"), reason="cmake not installed")
def test_installed_unit_documentation_exists(tmp_path):
    # DESTDIR: the install's absolute paths (/etc, the systemd dirs) stay under tmp_path.
    p = subprocess.run(["cmake", "--install", wsdtest.BUILD_DIR], capture_output=True, text=True,
                       env={**os.environ, "DESTDIR": str(tmp_path)}, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    units = list(tmp_path.rglob("weightsd.service"))
    assert len(units) == 1, units
    docs = [l.split("=", 1)[1] for l in units[0].read_text().splitlines()
            if l.startswith("Documentation=")]
    assert docs and all(d.startswith("file:/") for d in docs), docs
    for d in docs:
        installed = tmp_path / d[len("file:/"):]
        assert installed.is_file() and "# weightsd" in installed.read_text(), d


def test_example_config_is_valid(tmp_path):
    text = (SYSTEMD_DIR / "weightsd.conf").read_text()
    # sysusers.d creates these groups on an installed host; stand in for them here
    for group in ("weightsd-admin", "weightsd"):
        if subprocess.run(["getent", "group", group], capture_output=True).returncode != 0:
            text = text.replace(f"= {group}\n", "= root\n")
    cfg = write_config(tmp_path / "weightsd.conf", text)
    p = subprocess.run([os.path.join(BIN, "weightsctl"), "config-check", str(cfg)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    # and every commented-out model key is one the parser knows
    model = "\n".join(l[1:] for l in text.splitlines()
                      if l.startswith(";") and ("=" in l or l.startswith(";["))
                      and l[1:2] != " " and not l.startswith(";client"))
    model = model.replace("path = /var/lib/weightsd/llama-3-8b/model.safetensors.index.json",
                          "path = /x.safetensors")
    cfg2 = write_config(tmp_path / "model.conf", model)
    p = subprocess.run([os.path.join(BIN, "weightsctl"), "config-check", str(cfg2)],
                       capture_output=True, text=True)
    assert p.returncode == 0, (model, p.stderr)


def test_stats_prometheus_text_format(tmp_path):
    d = Daemon(tmp_path)
    try:
        d.preload("llama/8b", model_file(tmp_path))
        assert attach(d, "llama/8b")
        p = d.ctl("stats", "--prometheus")
        types, samples = {}, {}
        for line in p.stdout.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split()
                types[name] = kind
            elif line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                samples[name] = float(value)
        for name in samples:
            assert name.split("{")[0] in types, name
        assert types["weightsd_opens_total"] == "counter" and samples["weightsd_opens_total"] == 1
        assert types["weightsd_connections_denied_total"] == "counter"
        # every cumulative count is a counter named *_total; what is current is a gauge
        for name in ("rejected_uid", "emfile", "timed_out", "outq_dropped"):
            assert types[f"weightsd_connections_{name}_total"] == "counter", name
            assert f"weightsd_connections_{name}" not in types, name
        assert types["weightsd_connections_current"] == "gauge"
        assert types["weightsd_resident_bytes"] == "gauge"
        assert samples['weightsd_model_bytes{model="llama/8b",state="ready"}'] == 1 << 20
        assert samples['weightsd_model_leases{model="llama/8b"}'] == 0
        assert d.ctl("list", "--prometheus", check=False).returncode == 2
    finally:
        assert d.stop() == 0, d.log()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to run a peer under another uid")
def test_policy_admits_a_configured_supplementary_group(open_dir):
    # gid 4242 need not exist: the peer holds it (SO_PEERGROUPS), the database is not asked
    cfg = write_config(wsdtest_path(open_dir) / "w.conf", "[access]\nclient-groups = 4242\n")
    d = start(open_dir, cfg)
    try:
        loosen(d)
        d.preload("m", model_file(wsdtest_path(open_dir)))
        p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--groups=4242",
                            os.path.join(BIN, "wsd-attach"), "--socket", d.sock, "m"],
                           capture_output=True, text=True, timeout=20)
        assert p.returncode == 0, p.stderr
        p = as_nobody(os.path.join(BIN, "wsd-attach"), "--socket", d.sock, "m")
        assert p.returncode != 0
        assert d.ctl_json("stats")["connections"]["denied"] == 1
    finally:
        assert d.stop() == 0, d.log()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to run a peer under another uid")
def test_per_model_allowlists(open_dir):
    """[model] allow-users/allow-groups: the client socket admits uid 65534, but only the models
    whose allowlist names it (or its group) may be opened by it."""
    base = wsdtest_path(open_dir)
    f = model_file(base)
    cfg = write_config(base / "acl.conf", f"""\
[access]
client-users = 65534

[model open]
path = {f}

[model private]
path = {f}
allow-users = 1234

[model bygroup]
path = {f}
allow-groups = 65534
""")
    d = start(open_dir, cfg)
    try:
        loosen(d)
        for _ in range(200):
            if len([m for m in d.ctl_json("list") if m["state"] == "ready"]) == 3:
                break
            time.sleep(0.02)
        assert as_nobody(os.path.join(BIN, "wsd-attach"), "--socket", d.sock,
                         "open").returncode == 0
        p = as_nobody(os.path.join(BIN, "wsd-attach"), "--socket", d.sock, "private")
        assert p.returncode != 0 and "not open to uid 65534" in p.stderr
        assert as_nobody(os.path.join(BIN, "wsd-attach"), "--socket", d.sock,
                         "bygroup").returncode == 0
        assert attach(d, "private")[-1]["tensors"] >= 1   # root may always
        assert "may not open model 'private'" in d.log()
    finally:
        assert d.stop() == 0, d.log()
