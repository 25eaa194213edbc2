"""allow-client-preload (issue 5 item 8): off by default; when on, an open may name a
checkpoint under an allowlisted directory, which is loaded on first use and then shared."""
import os
import subprocess

from wsdtest import BIN, Daemon, attach, fnv1a, write_safetensors


def open_by_path(d, model, path):
    return subprocess.run([os.path.join(BIN, "wsd-attach"), "--socket", d.sock, "--path",
                           str(path), model], capture_output=True, text=True)


def test_off_by_default(tmp_path):
    path = write_safetensors(tmp_path / "m.safetensors", [("w", "U8", [4], b"abcd")])
    d = Daemon(tmp_path)
    try:
        r = open_by_path(d, "m", path)
        assert r.returncode != 0 and "allow-client-preload is off" in r.stderr
        assert d.ctl_json("list") == []
    finally:
        assert d.stop() == 0


def test_allowlisted_directory_only(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    data = os.urandom(4096)
    good = write_safetensors(models / "m.safetensors", [("w", "U8", [len(data)], data)])
    outside = write_safetensors(tmp_path / "o.safetensors", [("w", "U8", [2], b"no")])
    (models / "link.safetensors").symlink_to(outside)
    cfg = tmp_path / "weightsd.conf"
    cfg.write_text(f"[daemon]\nallow-client-preload = yes\nclient-preload-dirs = {models}\n")
    d = Daemon(tmp_path, extra_args=("--config", str(cfg)))
    try:
        first = open_by_path(d, "m", good)
        assert first.returncode == 0, first.stderr
        import json
        assert json.loads(first.stdout.splitlines()[-1])["checksum"] == f"{fnv1a(data):016x}"
        assert [m["name"] for m in d.ctl_json("list")] == ["m"]
        # Later opens by name or path share the same model; nothing is loaded twice.
        assert open_by_path(d, "m", good).returncode == 0
        assert attach(d, "m")[-1]["checksum"] == f"{fnv1a(data):016x}"
        assert d.log().count("on first use") == 1
        r = open_by_path(d, "x", outside)
        assert r.returncode != 0 and "outside the client-preload directories" in r.stderr
        r = open_by_path(d, "y", models / "link.safetensors")   # a symlink out is still out
        assert r.returncode != 0 and "outside" in r.stderr
        r = open_by_path(d, "z", models / ".." / "o.safetensors")
        assert r.returncode != 0 and "outside" in r.stderr
        assert [m["name"] for m in d.ctl_json("list")] == ["m"]
    finally:
        assert d.stop() == 0
    chk = subprocess.run([os.path.join(BIN, "weightsctl"), "config-check", str(cfg)],
                         capture_output=True, text=True)
    assert chk.returncode == 0, chk.stderr
    bad = tmp_path / "bad.conf"
    bad.write_text("[daemon]\nclient-preload-dirs = relative/dir\n")
    chk = subprocess.run([os.path.join(BIN, "weightsctl"), "config-check", str(bad)],
                         capture_output=True, text=True)
    assert chk.returncode != 0 and f"{bad}:2:" in chk.stderr
