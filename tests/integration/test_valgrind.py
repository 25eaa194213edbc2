"""The daemon's whole lifecycle under valgrind: start, preload, 100 attaches, a failed preload,
info (whole, summary, paged), evict, stop. Zero errors, zero leaked bytes, no file descriptor left open at exit."""
import os
import re
import shutil

import pytest

import rawproto
from wsdtest import Daemon, attach, write_safetensors


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind not installed")
def test_lifecycle_valgrind_clean(tmp_path):
    vlog = tmp_path / "valgrind.log"
    d = Daemon(tmp_path, wrapper=("valgrind", "--leak-check=full", "--show-leak-kinds=all",
                                  "--errors-for-leak-kinds=all", "--error-exitcode=3",
                                  "--track-fds=yes", f"--log-file={vlog}"),
               start_timeout=60)
    try:
        path = write_safetensors(tmp_path / "m.safetensors",
                                 [("w", "F32", [256, 256], os.urandom(256 * 1024)),
                                  ("b", "I64", [3], bytes(24)), ("s", "F16", [], bytes(2))])
        d.preload("m", path)
        for _ in range(20):
            attach(d, "m")
        assert attach(d, "m", "--repeat", "80")[0]["repeat"] == 80
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(b"\x10" + bytes(7) + b"{not json}      ")
        assert d.ctl("preload", "bad", str(bad), check=False).returncode != 0
        d.ctl("stats")
        # info: the whole list, the summary alone, and pages of two (the last one short).
        assert "tensors:  3" in d.ctl("info", "m").stdout
        assert "tensors" not in d.ctl_json("info", "m", "--no-tensors")
        c = rawproto.Conn(d.admin, timeout=60)
        try:
            c.handshake()
            names = []
            for i, off in enumerate((0, 2)):
                c.send(rawproto.info_req(10 + i, "m", offset=off, limit=2))
                names += [t["name"] for t in c.admin_json()[1]["tensors"]]
            assert names == ["w", "b", "s"], names
            c.send(rawproto.info_req(12, "m", offset=4, limit=2))
            assert c.error()[1] == rawproto.WSD_EINVAL
        finally:
            c.close()
        d.ctl("evict", "m")
    finally:
        rc = d.stop()
    text = vlog.read_text()
    assert rc == 0, text[-3000:]
    assert "ERROR SUMMARY: 0 errors" in text, text[-3000:]
    assert re.search(r"in use at exit: 0 bytes", text), text[-3000:]
    # Only stdin/stdout/stderr (and valgrind's own log) may remain open.
    m = re.search(r"FILE DESCRIPTORS: (\d+) open", text)
    assert m and int(m.group(1)) <= 4, text[-3000:]
