"""weightsctl stats --metrics-file: a node_exporter textfile written atomically, once or on an
interval, from the real daemon's counters."""
import os
import re
import signal
import subprocess
import time

from wsdtest import BIN, Daemon, attach, write_safetensors

LINE = re.compile(r'^(# (TYPE|HELP) .*|[a-zA-Z_:][a-zA-Z0-9_:]*(\{[^}]*\})? -?[0-9.e+]+)$')


def test_metrics_file_once_and_on_interval(tmp_path):
    d = Daemon(tmp_path)
    try:
        path = write_safetensors(tmp_path / "m.safetensors", [("w", "U8", [64], bytes(64))])
        d.preload("m", path)
        out = tmp_path / "weightsd.prom"
        ctl = [os.path.join(BIN, "weightsctl"), "--admin-socket", d.admin, "stats"]
        assert subprocess.run(ctl + ["--metrics-file", str(out)]).returncode == 0
        text = out.read_text()
        assert all(LINE.match(l) for l in text.splitlines()), text
        assert 'weightsd_model_bytes{model="m",state="ready"} 64' in text
        assert re.search(r"^weightsd_opens_total 0$", text, re.M)

        p = subprocess.Popen(ctl + ["--metrics-file", str(out), "--interval", "1"])
        attach(d, "m")
        end = time.time() + 5
        while time.time() < end and not re.search(r"^weightsd_opens_total 1$",
                                                  out.read_text(), re.M):
            time.sleep(0.1)
        assert re.search(r"^weightsd_opens_total 1$", out.read_text(), re.M)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=10) == 0
        assert sorted(os.listdir(tmp_path)).count("weightsd.prom") == 1
        assert not [f for f in os.listdir(tmp_path) if ".prom.tmp" in f]
    finally:
        assert d.stop() == 0
    # The daemon gone: the round fails, says why, and the last good file stays.
    r = subprocess.run(ctl + ["--metrics-file", str(out)], capture_output=True, text=True)
    assert r.returncode != 0 and "weightsd_model_bytes" in out.read_text()
