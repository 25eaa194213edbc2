"""Shared harness for weightsd's Python-driven tests (integration and pytest+torch).

Starts the real daemon on private sockets in a temporary directory, runs the real weightsctl,
and writes safetensors files byte by byte (no safetensors package needed). Nothing here is a
stand-in for the daemon: every test talks to the built binaries in $WSD_BUILD_DIR.
"""
import ctypes
import errno
import json
import os
import signal
import socket
import struct
import subprocess
import time

BUILD_DIR = os.path.abspath(os.environ.get("WSD_BUILD_DIR") or os.path.join(
    os.path.dirname(__file__), "..", "..", "build"))
BIN = os.path.join(BUILD_DIR, "bin")


class Daemon:
    """A weightsd process on sockets under `tmpdir`; stop() checks it exits 0 on SIGTERM."""

    def __init__(self, tmpdir, extra_args=(), wrapper=(), start_timeout=10, env=None):
        self.dir = str(tmpdir)
        self.sock = os.path.join(self.dir, "c.sock")
        self.admin = os.path.join(self.dir, "a.sock")
        self.log_path = os.path.join(self.dir, "weightsd.log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [*wrapper, os.path.join(BIN, "weightsd"), "--socket", self.sock, "--admin-socket", self.admin,
             "--log-level", "debug", *extra_args],
            stdout=self._log, stderr=subprocess.STDOUT,
            env=None if env is None else {**os.environ, **env})
        # Ready means both sockets accept: a stale socket file from a killed daemon may exist
        # before this one has replaced it.
        deadline = time.time() + start_timeout
        while not (accepts(self.sock) and accepts(self.admin)):
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("weightsd did not start:\n" + self.log())
            time.sleep(0.01)

    @property
    def pid(self):
        return self.proc.pid

    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def ctl(self, *args, check=True, timeout=120):
        """Runs weightsctl against this daemon; returns CompletedProcess (text)."""
        p = subprocess.run([os.path.join(BIN, "weightsctl"), "--admin-socket", self.admin, *args],
                           capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"weightsctl {' '.join(args)} failed ({p.returncode}): "
                                 f"{p.stderr}")
        return p

    def ctl_json(self, *args):
        return json.loads(self.ctl(*args, "--json").stdout)

    def preload(self, name, path, *opts):
        return self.ctl_json("preload", name, str(path), *opts)

    def fd_count(self):
        """Open fds of the daemon once they stop changing: a client that just exited may still
        have its connection open in the daemon for a moment."""
        last = -1
        for _ in range(100):
            n = len(os.listdir(f"/proc/{self.pid}/fd"))
            if n == last:
                return n
            last = n
            time.sleep(0.02)
        return last

    def wait_fd_count(self, want, timeout=2.0):
        """Waits until the daemon has at most `want` fds open (a baseline taken while a
        finished client's connection was still closing may be one high); returns the count."""
        end = time.time() + timeout
        n = self.fd_count()
        while n > want and time.time() < end:
            time.sleep(0.02)
            n = self.fd_count()
        return n

    def alive(self):
        """The daemon still answers an admin request."""
        return self.proc.poll() is None and self.ctl("list", check=False).returncode == 0

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            rc = self.proc.wait(timeout=30)
        else:
            rc = self.proc.returncode
        self._log.close()
        return rc

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._log.close()


def sanitized(pid):
    """ASan's quarantine and TSan's shadow keep freed memory resident: RSS says nothing there."""
    with open(f"/proc/{pid}/exe", "rb") as f:
        exe = f.read()
    return b"__asan_init" in exe or b"__tsan_init" in exe


def accepts(path):
    """Whether something accepts connections on the Unix socket at `path`."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def write_bench_model(path, mib):
    """The benchmarks' model: ~`mib` MiB of random f32 in 300 tensors (one random block, so
    writing it is quick). Returns the file size."""
    n = mib * (1 << 20) // 300 // 4 * 4
    blob = os.urandom(n)
    write_safetensors(path, [(f"l.{i}", "F32", [n // 4], blob) for i in range(300)])
    return os.path.getsize(path)


def attach(daemon, model, *args, timeout=60):
    """Runs the C worker wsd-attach; returns its JSON lines as a list of dicts."""
    p = subprocess.run([os.path.join(BIN, "wsd-attach"), "--socket", daemon.sock, *args, model],
                       capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"wsd-attach {model} failed: {p.stderr}")
    return [json.loads(line) for line in p.stdout.splitlines() if line.strip()]


def fnv1a(data, h=1469598103934665603):
    for b in data:
        h = ((h ^ b) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h


ST_DTYPE_SIZE = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4,
                 "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8, "F8_E5M2": 1, "F8_E4M3": 1,
                 "C64": 8}


def write_safetensors(path, tensors, metadata=None):
    """Writes a safetensors file the way the reference writer does (FORMATS.md §4.7).

    tensors: list of (name, dtype, shape, data bytes), stored in the given order.
    """
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for _, _, _, data in tensors:
            f.write(data)
    return path


def write_sparse_safetensors(path, nbytes):
    """A safetensors file of one U8 tensor of `nbytes` zero bytes, sparse on disk: cheap to
    write, and as slow to preload as a real file of that size."""
    h = json.dumps({"w": {"dtype": "U8", "shape": [nbytes], "data_offsets": [0, nbytes]}},
                   separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        f.truncate(8 + len(h) + nbytes)
    return path


def raw_connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.settimeout(5)
    return s


_libc = ctypes.CDLL(None, use_errno=True)
PAGE = os.sysconf("SC_PAGESIZE")


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("cache", "dirty", "writeback", "evicted",
                                               "recently_evicted")]


def page_cache_bytes(path, off=0, length=0):
    """Bytes of [off, off + length) of `path` in the page cache (length 0: to the end), by
    cachestat(2), as the daemon asks. OSError(ENOSYS) on kernels before 6.5."""
    fd = os.open(path, os.O_RDONLY)
    try:
        st = _Cachestat()
        if _libc.syscall(451, fd, ctypes.byref(_CachestatRange(off, length)), ctypes.byref(st),
                         0) < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), path)
        return st.cache * PAGE
    finally:
        os.close(fd)


def drop_page_cache(path):
    """Writes `path` back and drops its pages from the page cache: the next read is cold.
    Returns what is still cached (0 unless the filesystem keeps pages, as tmpfs does)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return page_cache_bytes(path)


def no_cachestat(e):
    return isinstance(e, OSError) and e.errno == errno.ENOSYS


class FdStore:
    """The service manager's side of systemd's fd store, as documented: a datagram socket
    ($NOTIFY_SOCKET) collecting FDSTORE=1/FDNAME= fds by name (FDSTOREREMOVE=1 drops one),
    and start(), which passes them to a new weightsd from fd 3 on with LISTEN_FDS,
    LISTEN_FDNAMES and LISTEN_PID set to its own pid."""

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setblocking(False)
        self.fds = {}        # FDNAME -> list of fds
        self.messages = []

    def pump(self, timeout=0.5):
        end = time.time() + timeout
        while time.time() < end:
            try:
                msg, fds, _, _ = socket.recv_fds(self.sock, 4096, 8)
            except BlockingIOError:
                time.sleep(0.01)
                continue
            fields = dict(l.split("=", 1) for l in msg.decode().split("\n") if "=" in l)
            self.messages.append(fields)
            if fields.get("FDSTORE") == "1":
                self.fds.setdefault(fields["FDNAME"], []).extend(fds)
            elif fields.get("FDSTOREREMOVE") == "1":
                for fd in self.fds.pop(fields["FDNAME"], []):
                    os.close(fd)
            else:
                for fd in fds:
                    os.close(fd)

    def start(self, tmp, extra=(), env=None):
        """Starts weightsd with the stored fds as systemd would pass them (and `env` added to
        its environment)."""
        names, fds = [], []
        for name, lst in sorted(self.fds.items()):
            for fd in lst:
                names.append(name)
                fds.append(fd)
        high = [os.dup2(fd, 200 + i) for i, fd in enumerate(fds)]

        # subprocess closes fds after preexec_fn runs, so it must not close any (close_fds
        # False) and place() leaves the child exactly fds 0-2 and 3.. as systemd would.
        def place():
            for i, h in enumerate(high):
                os.dup2(h, 3 + i)
            os.closerange(3 + len(high), 4096)

        log = open(os.path.join(tmp, "weightsd.log"), "ab")
        env = {**os.environ, **(env or {}), "NOTIFY_SOCKET": self.path,
               "LISTEN_FDS": str(len(fds)), "LISTEN_FDNAMES": ":".join(names)}
        proc = subprocess.Popen(
            ["/bin/sh", "-c", 'LISTEN_PID=$$ exec "$0" "$@"', os.path.join(BIN, "weightsd"),
             "--socket", os.path.join(tmp, "c.sock"), "--admin-socket",
             os.path.join(tmp, "a.sock"), "--log-level", "debug", *extra],
            env=env, stdout=log, stderr=subprocess.STDOUT, close_fds=False, preexec_fn=place)
        for h in high:
            os.close(h)
        return proc


def wait_ready(store, proc, timeout=10):
    end = time.time() + timeout
    while time.time() < end:
        store.pump(0.05)
        if any(m.get("READY") == "1" for m in store.messages):
            return
        assert proc.poll() is None, "weightsd died"
    raise AssertionError("no READY=1")
