"""weightsd: tensors from the weightsd daemon's shared memory, zero-copy, for PyTorch and DLPack.

    import weightsd
    client = weightsd.connect()                    # argument, $WEIGHTSD_SOCKET, or the default
    sd = client.state_dict("llama")                # dict name -> torch.Tensor, zero-copy
    with weightsd.meta_device():
        model = SomeModule(1000)                   # parameters on 'meta', nothing allocated
    weightsd.load_into(model, "llama", client=client)
    client.close()                                 # tensors stay valid

Lifetime: every open (state_dict, tensors, load_into) takes one lease and one private mapping.
The mapping, and while the client is open the lease, live until the last tensor made from it is
freed; close() ends the connection (the daemon drops its leases) but never the memory. Writes to
tensors are private copy-on-write; other workers keep seeing the daemon's bytes.

torch is imported only by state_dict(), meta_device() and load_into(); tensors() needs none.
(Where torch is imported already, the torch layer is loaded with this package, so that the first
state_dict() does not pay for it.)
"""
import ctypes
import importlib
import math
import os
import sys
import threading

from . import _lib
from ._lib import (
    AlreadyExists, BadCheckpoint, Busy, Canceled, CheckpointIOError, ConnectionClosed,
    ConnectionFailed, DeviceUnavailable, Error, GPUError, HashMismatch, InternalError,
    InvalidArgument, LimitExceeded, Loading, NoLease, NotFound, OutOfMemory, PermissionDenied,
    ProtocolError, Stale, UnsupportedDtype, VersionMismatch)
from ._model import Model, free_unconsumed

if "torch" in sys.modules:  # no import is added, only moved earlier
    importlib.import_module(__name__ + "._torch")

__version__ = "0.1.0"

__all__ = [
    "connect", "Client", "DLPackTensor", "meta_device", "load_into", "default_socket",
    "library_version",
    "Error", "ProtocolError", "VersionMismatch", "NotFound", "AlreadyExists", "BadCheckpoint",
    "Busy", "Loading", "DeviceUnavailable", "LimitExceeded", "PermissionDenied", "NoLease",
    "CheckpointIOError", "OutOfMemory", "GPUError", "Stale", "ConnectionClosed",
    "InvalidArgument", "InternalError", "HashMismatch", "Canceled", "ConnectionFailed",
    "UnsupportedDtype",
]

_OPEN_WAIT = 1
_OPEN_GPU_WRITE = 2  # WSD_OPEN_GPU_WRITE


def default_socket():
    """The socket connect() uses without an argument: $WEIGHTSD_SOCKET, else the daemon's
    default (/run/weightsd/weightsd.sock for root, $XDG_RUNTIME_DIR/weightsd/ otherwise), or
    None when there is no default (not root, and $XDG_RUNTIME_DIR unset)."""
    path = _lib.wsd_default_socket(0)
    return path.decode() if path else None


def library_version():
    """(major, minor, patch) of the libweightsd actually loaded."""
    v = _lib.wsd_version()
    return (v >> 16, (v >> 8) & 0xFF, v & 0xFF)


_TIMEOUT_MS_MAX = 2**31 - 1  # wsd_set_timeout() takes an int of milliseconds


def connect(path=None, timeout=None):
    """Connects to the daemon's client socket and returns a Client.

    path: socket path; None means $WEIGHTSD_SOCKET or the default (see default_socket()).
    timeout: seconds to wait for each reply (None: the library default, 30 s; 0: forever),
    rounded up to whole milliseconds; negative, NaN, infinite or over 2147483 s (the C int of
    milliseconds) is a ValueError.
    Raises ConnectionFailed (socket missing, refused), PermissionDenied (the daemon's access
    policy refused this uid at the handshake), LimitExceeded (over its connection limits),
    VersionMismatch, ProtocolError.
    """
    timeout_ms = None
    if timeout is not None:
        if not timeout >= 0 or timeout == math.inf:  # NaN fails the first test
            raise ValueError(f"timeout must be >= 0 seconds (0 = wait forever), got {timeout!r}")
        # Rounded up: a timeout under 1 ms must not become 0, which means forever.
        timeout_ms = math.ceil(timeout * 1000)
        if timeout_ms > _TIMEOUT_MS_MAX:
            raise ValueError(f"timeout must be at most {_TIMEOUT_MS_MAX // 1000} s "
                             f"(0 = wait forever), got {timeout!r}")
    if path is None:
        path = default_socket()
        if path is None:
            raise ConnectionFailed(-2, "no weightsd socket: pass a path or set WEIGHTSD_SOCKET "
                                       "($XDG_RUNTIME_DIR is unset too)")
    ptr = ctypes.c_void_p()
    r = _lib.wsd_connect(os.fsencode(path), ctypes.byref(ptr))
    if r < 0:
        msg = f"cannot connect to weightsd at '{path}'"
        raise ConnectionFailed(r, msg) if r > -1000 else _lib.error_for(r, msg)
    client = Client(ptr.value, os.fspath(path))
    if timeout_ms is not None:
        r = _lib.wsd_set_timeout(client._ptr, timeout_ms)
        if r < 0:
            client.close()
            raise _lib.error_for(r, f"cannot set a timeout of {timeout!r} s")
    return client


class Client:
    """One connection to weightsd. Use connect() to make one; usable as a context manager.

    Not fork-safe: connect in each worker process, after the fork. Methods may be called from
    several threads (a lock serialises requests on the connection).
    """

    def __init__(self, ptr, path):
        self._ptr = ptr
        self._lock = threading.RLock()
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()

    def __repr__(self):
        return f"<weightsd.Client {self.path!r}{' closed' if self.closed else ''}>"

    @property
    def closed(self):
        return self._ptr is None

    def close(self):
        """Closes the connection; the daemon releases this connection's leases. Tensors already
        handed out stay mapped and valid until they are freed, except on a GPU copy served by
        the legacy CUDA IPC fallback (`weightsctl info` says handle legacy_ipc): the daemon
        frees that with the model's last lease once it is evicted, so keep the connection
        open while such tensors are in use. Idempotent."""
        with self._lock:
            ptr, self._ptr = self._ptr, None
            if ptr is not None and _lib is not None:
                _lib.wsd_close(ptr)

    def open(self, name, device="cpu", wait=False, writable=False):
        """Leases model `name` and maps it. Returns a Model; most callers want state_dict() or
        tensors() instead. device: "cpu", or "cuda:N" for the daemon's copy on that GPU
        (preloaded with --device cuda:N; else DeviceUnavailable with the daemon's message).
        wait: wait for a model still loading (or being uploaded to that device) instead of
        raising Loading. writable: map a GPU copy read-write (every worker shares those
        bytes); the daemon refuses it (PermissionDenied) unless the model was preloaded with
        --allow-gpu-write. GPU copies are read-only by
        default; host copies are always sealed read-only, so writable=True with "cpu" is a
        ValueError."""
        dev = str(device) if device is not None else "cpu"
        if writable and not dev.startswith("cuda"):
            raise ValueError(f"cannot open '{name}' writable on {dev}: only a GPU copy can be "
                             "mapped writable (host copies are sealed memfds)")
        flags = (_OPEN_WAIT if wait else 0) | (_OPEN_GPU_WRITE if writable else 0)
        ptr = ctypes.c_void_p()
        with self._lock:
            if self._ptr is None:
                raise ConnectionClosed(-1015, f"cannot open '{name}': the client is closed")
            r = _lib.wsd_open(self._ptr, name.encode(), dev.encode(), flags, ctypes.byref(ptr))
            if r < 0:
                msg = _lib.wsd_last_error(self._ptr).decode(errors="replace")
                raise _lib.error_for(r, msg or f"cannot open '{name}': {_lib.strerror(r)}")
        return Model(self, name, ptr.value)

    def state_dict(self, name, device="cpu", wait=False, writable=False):
        """Model `name` as a dict name -> torch.Tensor, in the checkpoint's order, zero-copy.

        Each tensor has the checkpoint's dtype, shape, strides and storage offset; tensors that
        share a storage in the checkpoint share one torch storage here, and names on the very
        same view (tied weights) map to the same tensor object, as torch.load gives them.
        Raises UnsupportedDtype for a dtype this torch lacks, and the open() errors.
        """
        from . import _torch
        return _torch.state_dict(self.open(name, device, wait, writable))

    def tensors(self, name, device="cpu", wait=False, writable=False):
        """[(name, DLPackTensor)] for every tensor of model `name`, in checkpoint order.

        Hand a DLPackTensor to numpy.from_dlpack(), torch.utils.dlpack.from_dlpack() or any
        DLPack consumer; its __dlpack__() returns a fresh "dltensor" capsule. One lease covers
        them all and lives while any DLPackTensor, or any array made from one, does.
        Raises the open() errors.
        """
        model = self.open(name, device, wait, writable)
        out = []
        for i, info in enumerate(_lib.tensor_infos(model.ptr)):
            t = DLPackTensor(model, i, info)
            out.append((t.name, t))
        return out


class DLPackTensor:
    """One tensor of an open model, exported through the DLPack protocol: kDLCPU memory, or
    kDLCUDA for a model opened on "cuda:N".

    Attributes mirror the manifest: name, dtype (safetensors spelling, e.g. "BF16"), shape,
    strides (elements), storage (index), storage_offset (elements). Capsules point at element 0
    with byte_offset 0. A capsule from __dlpack__() must be consumed while this object is alive:
    when it goes, capsules nobody consumed are freed (and renamed, so they cannot be consumed
    later). numpy marks arrays it imports this way read-only; torch does not.
    """

    __slots__ = ("name", "dtype", "shape", "strides", "storage", "storage_offset", "_model",
                 "_index", "_capsules")

    def __init__(self, model, index, info=None):
        if info is None:  # one tensor: one call too
            info = _lib.TensorInfo()
            if _lib.wsd_model_tensor_info(model.ptr, index, 1, ctypes.byref(info),
                                          ctypes.sizeof(info)) != 1:
                raise IndexError(f"model '{model.name}' has no tensor {index}")
        nd = info.ndim
        self.name = info.name.decode()
        self.dtype = _lib.dtype_name(info.dtype)
        self.shape = tuple(info.shape[:nd])
        self.strides = tuple(info.strides[:nd])
        self.storage = info.storage
        self.storage_offset = info.storage_offset
        self._model = model
        self._index = index
        self._capsules = []

    def __del__(self):
        for capsule in getattr(self, "_capsules", ()):
            free_unconsumed(capsule)

    def __repr__(self):
        return f"<weightsd.DLPackTensor {self.name!r} {self.dtype} {list(self.shape)}>"

    def _device(self):
        d = _lib.wsd_model_device(self._model.ptr)
        return (1, 0) if d < 0 else (2, d)  # (kDLCPU, 0) or (kDLCUDA, N)

    def __dlpack__(self, stream=None, *, max_version=None, dl_device=None, copy=None):
        """A new "dltensor" capsule: the legacy (pre-1.0) form, which the protocol lets a
        producer return whatever max_version asks. stream is ignored: on the CPU it means
        nothing, and a GPU copy needs no wait on any stream, since the daemon synchronised its
        upload before exporting. Raises BufferError for
        copy=True or a dl_device other than the model's (this export is zero-copy), and
        UnsupportedDtype for dtypes DLPack cannot describe (BOOL with DLPack < 0.8, F8_*,
        F6_*, F4)."""
        if copy:
            raise BufferError("weightsd exports its mapping as is; copy the imported array")
        # stream needs no wait: the daemon synchronised its upload before exporting, and
        # nothing writes these bytes afterwards (read-only mapping).
        if dl_device is not None and tuple(dl_device) != self._device():
            raise BufferError(f"weightsd tensor lives on {self._device()}, not on {dl_device}")
        capsule = self._model.capsule(self._index)
        self._capsules.append(capsule)
        return capsule

    def __dlpack_device__(self):
        return self._device()


def meta_device():
    """Context manager under which torch factory calls build tensors on the 'meta' device.

    torch.device("meta") itself where torch supports it (>= 2.0); otherwise a TorchFunctionMode
    that adds device="meta" to factory calls made without an explicit device.
    """
    from . import _torch
    return _torch.meta_device()


def load_into(module, name, client=None, strict=True, prefix="", device="cpu", dtype=None,
              wait=False, writable=False):
    """Assigns model `name`'s tensors into `module`, zero-copy, like
    module.load_state_dict(sd, strict=strict, assign=True). See weightsd._torch.load_into."""
    from . import _torch
    return _torch.load_into(module, name, client=client, strict=strict, prefix=prefix,
                            device=device, dtype=dtype, wait=wait, writable=writable)
