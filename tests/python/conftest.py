"""Fixtures for the Python layer's tests: a real weightsd per test, fixture writers, workers.

Run with /usr/bin/python3 (Debian's torch). $WSD_BUILD_DIR names the build tree holding
bin/weightsd, bin/weightsctl and lib/libweightsd.so; the package is loaded from it unless
$WEIGHTSD_LIBRARY says otherwise.
"""
import os
import subprocess
import sys
import textwrap
import time

import pytest

import wsdtest

os.environ.setdefault("WEIGHTSD_LIBRARY",
                      os.path.join(os.path.abspath(wsdtest.BUILD_DIR), "lib", "libweightsd.so"))

import torch  # noqa: E402

# torch dtype -> safetensors dtype name, for the dtypes both sides have.
ST_NAME = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.complex64: "C64",
}

# Every dtype torch.save can write on this torch that weightsd names.
TORCH_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64,
                torch.complex128]



def raw_bytes(t):
    """The bytes of `t`'s elements in row-major order (what safetensors stores)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def sample(dtype, shape, seed=0):
    """A tensor of `dtype` and `shape` with varied values (not all zeros)."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=dtype)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000) + 1, shape, generator=g,
                         dtype=torch.int64).to(dtype)


def write_st(path, tensors):
    """Writes {name: tensor} as a safetensors file, in dict order."""
    return wsdtest.write_safetensors(
        str(path), [(n, ST_NAME[t.dtype], list(t.shape), raw_bytes(t)) for n, t in tensors.items()])


class Daemon(wsdtest.Daemon):
    """wsdtest.Daemon plus the helpers these tests share."""

    def preload_json(self, name, path, *opts):
        """Preloads, failing the test with the daemon's message if it refuses."""
        p = self.ctl("preload", name, str(path), *opts, "--json", check=False)
        assert p.returncode == 0, f"preload {name} failed: {p.stderr}"

    def leases(self, name):
        return {m["name"]: m["leases"] for m in self.ctl_json("list")}[name]

    def wait_leases(self, name, want, timeout=10):
        """Polls `weightsctl list` until model `name` has `want` leases; returns the last count."""
        deadline = time.time() + timeout
        while True:
            n = self.leases(name)
            if n == want or time.time() > deadline:
                return n
            time.sleep(0.02)


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path)
    yield d
    alive = d.alive()
    rc = d.stop()
    assert alive, "weightsd died during the test:\n" + d.log()
    assert rc == 0, f"weightsd exited {rc}:\n" + d.log()


@pytest.fixture
def client(daemon):
    import weightsd
    c = weightsd.connect(daemon.sock)
    yield c
    c.close()


def mapped(name):
    """Lines of /proc/self/maps naming model `name`'s memfd."""
    with open("/proc/self/maps") as f:
        return [line for line in f if f"weightsd:{name} " in line or
                line.rstrip().endswith(f"weightsd:{name}")]


class Worker:
    """A /usr/bin/python3 process running `script` (which sees `SOCK` and `cmd()`): it reads
    one command per line from stdin and answers one line per command."""

    PRELUDE = textwrap.dedent("""\
        import sys, torch, weightsd
        SOCK = sys.argv[1]
        def reply(*a):
            print(*a, flush=True)
        def commands():
            for line in sys.stdin:
                yield line.split()
        """)

    def __init__(self, sock, script):
        import weightsd
        env = dict(os.environ)
        here = [os.path.dirname(os.path.dirname(weightsd.__file__)),
                os.path.dirname(wsdtest.__file__)]
        env["PYTHONPATH"] = os.pathsep.join(here + [env.get("PYTHONPATH", "")])
        self.proc = subprocess.Popen(
            [sys.executable, "-c", self.PRELUDE + textwrap.dedent(script), sock],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=env)

    def ask(self, *cmd):
        self.proc.stdin.write(" ".join(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"worker died: {self.proc.stderr.read()}")
        return line.split()

    def read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"worker died: {self.proc.stderr.read()}")
        return line.split()

    def finish(self, timeout=30):
        if self.proc.poll() is None:
            self.proc.stdin.close()
        self.proc.wait(timeout=timeout)
        err = self.proc.stderr.read()
        self.proc.stdout.close()
        self.proc.stderr.close()
        return self.proc.returncode, err
