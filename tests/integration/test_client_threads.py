"""libweightsd from several threads at once against the real daemon (tests/integration/
wsd-threads.c): opens serialised on one client while other threads read, export and free
leaseless models; wsd_close() racing with frees of that client's models. Its reference count is
what these exercise; a lost update shows as a use-after-free or a leak under the ASan build and
under valgrind below, and every thread checks the bytes it reads."""
import json
import os
import re
import shutil
import subprocess

import pytest

import wsdtest
from wsdtest import Daemon, write_safetensors


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path)
    yield d
    rc = d.stop()
    assert rc == 0, "weightsd did not exit 0 on SIGTERM:\n" + d.log()


def model(daemon, tmp_path):
    path = write_safetensors(tmp_path / "m.safetensors", [
        ("w", "F32", [64, 256], bytes((i * 13 + 5) & 0xFF for i in range(64 * 256 * 4))),
        ("b", "F16", [7], bytes(range(14))),
        ("step", "I64", [], bytes(8)),
        ("empty", "BF16", [0, 3], b""),
    ])
    daemon.preload("m", path)


def run_threads(daemon, *args, wrapper=(), timeout=300):
    p = subprocess.run([*wrapper, os.path.join(wsdtest.BIN, "wsd-threads"), "--socket",
                        daemon.sock, *args, "m"], capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"wsd-threads failed ({p.returncode}): {p.stderr[-3000:]}"
    return json.loads(p.stdout)


def test_threads_share_a_client_and_free_models_concurrently(daemon, tmp_path):
    model(daemon, tmp_path)
    base = daemon.fd_count()
    before = daemon.ctl_json("stats")["leases_released_on_close"]
    out = run_threads(daemon, "--threads", "8", "--rounds", "200", "--hold", "4")
    assert out["failures"] == 0
    assert out["opens"] == 1 + 8 * 200 + 8 * 4
    # Every open exported its four tensors through DLPack (F32, F16, I64 and an empty BF16).
    assert out["exports"] == (8 * 200 + 8 * 4) * 4
    # Only the leases left for wsd_close() went with the connection; the rest were released.
    assert daemon.ctl_json("stats")["leases_released_on_close"] - before == \
        out["released_on_close"] == 8 * 2
    assert daemon.ctl_json("list")[0]["leases"] == 0
    assert daemon.wait_fd_count(base) == base


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind not installed")
def test_threads_valgrind_clean(daemon, tmp_path):
    """The last reference dropped on a worker thread frees the client exactly once."""
    model(daemon, tmp_path)
    vlog = tmp_path / "valgrind.log"
    out = run_threads(daemon, "--threads", "4", "--rounds", "10", "--hold", "3",
                      wrapper=("valgrind", "--leak-check=full", "--show-leak-kinds=all",
                               "--errors-for-leak-kinds=all", "--error-exitcode=3",
                               f"--log-file={vlog}"))
    text = vlog.read_text()
    assert out["failures"] == 0
    assert "ERROR SUMMARY: 0 errors" in text, text[-3000:]
    assert re.search(r"in use at exit: 0 bytes", text), text[-3000:]
