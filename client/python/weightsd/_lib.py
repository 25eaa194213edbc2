"""ctypes bindings for libweightsd, and the error classes its return codes map to.

The library is found through $WEIGHTSD_LIBRARY (a path to libweightsd.so*), else in the build
tree this package sits in (<repo>/build/lib), else by the system loader (libweightsd.so.0).
Functions that may block on the socket go through a CDLL handle (the GIL is released while they
wait); the pure accessors go through a PyDLL handle on the same library, which keeps the GIL and
costs less per call.
"""
import ctypes
import os

__all__ = [
    "Error", "ProtocolError", "VersionMismatch", "NotFound", "AlreadyExists", "BadCheckpoint",
    "Busy", "Loading", "DeviceUnavailable", "LimitExceeded", "PermissionDenied", "NoLease",
    "CheckpointIOError", "OutOfMemory", "GPUError", "Stale", "ConnectionClosed",
    "InvalidArgument", "InternalError", "HashMismatch", "Canceled", "ConnectionFailed",
    "UnsupportedDtype",
]


class Error(Exception):
    """A failure reported by libweightsd or the daemon.

    `code` is the library's return code (a WSD_E* value <= -1000, or -errno); `message` is the
    daemon's own message when it sent one, else the library's description of the code.
    """

    def __init__(self, code, message=None):
        self.code = code
        self.message = message or strerror(code)
        super().__init__(self.message)

    def __str__(self):
        desc = strerror(self.code)
        if desc and desc != self.message:
            return f"{self.message} ({desc}, code {self.code})"
        return f"{self.message} (code {self.code})"


class ProtocolError(Error):
    """WSD_EPROTO: the peer broke the protocol or sent an inconsistent manifest."""


class VersionMismatch(ProtocolError):
    """WSD_EVERSION: the daemon speaks another protocol version."""


class NotFound(Error):
    """WSD_ENOTFOUND: no model by that name."""


class AlreadyExists(Error):
    """WSD_EEXIST."""


class BadCheckpoint(Error):
    """WSD_EBADCKPT: the checkpoint is malformed or unsupported."""


class Busy(Error):
    """WSD_EBUSY."""


class Loading(Error):
    """WSD_ELOADING: the model is still loading (pass wait=True to wait for it)."""


class DeviceUnavailable(Error):
    """WSD_ENODEV: the requested device does not exist or is not served."""


class LimitExceeded(Error):
    """WSD_ELIMIT."""


class PermissionDenied(Error):
    """WSD_EDENIED."""


class NoLease(Error):
    """WSD_ENOLEASE."""


class CheckpointIOError(Error):
    """WSD_EIO: the daemon failed reading the checkpoint."""


class OutOfMemory(Error):
    """WSD_ENOMEM: allocation failure or over the daemon's memory budget."""


class GPUError(Error):
    """WSD_EGPU."""


class Stale(Error):
    """WSD_ESTALE: the model's source changed under it."""


class ConnectionClosed(Error):
    """WSD_ECLOSED: the connection is closed (by close() or by the daemon going away)."""


class InvalidArgument(Error):
    """WSD_EINVAL, or -EINVAL from the library."""


class InternalError(Error):
    """WSD_EINTERNAL: a bug in weightsd."""


class HashMismatch(Error):
    """WSD_EMISMATCH."""


class Canceled(Error):
    """WSD_ECANCELED: the preload was cancelled (`weightsctl cancel`, or its requester left with
    --cancel-on-exit); a wait=True open of a model still loading gets this."""


class ConnectionFailed(Error):
    """connect() could not reach the socket (code is -errno: -ENOENT, -ECONNREFUSED, ...)."""


class UnsupportedDtype(Error, TypeError):
    """A tensor's dtype has no counterpart in the consumer (this torch, or the DLPack header)."""


_CODE_CLASS = {
    -1000: ProtocolError, -1001: VersionMismatch, -1002: NotFound, -1003: AlreadyExists,
    -1004: BadCheckpoint, -1005: Busy, -1006: Loading, -1007: DeviceUnavailable,
    -1008: LimitExceeded, -1009: PermissionDenied, -1010: NoLease, -1011: CheckpointIOError,
    -1012: OutOfMemory, -1013: GPUError, -1014: Stale, -1015: ConnectionClosed,
    -1016: InvalidArgument, -1017: InternalError, -1018: HashMismatch, -1019: Canceled,
    -22: InvalidArgument, -12: OutOfMemory,
}


def error_for(code, message=None):
    """The Error subclass instance for return code `code`."""
    return _CODE_CLASS.get(code, Error)(code, message)


def _candidates():
    env = os.environ.get("WEIGHTSD_LIBRARY")
    if env:
        return [env]
    here = os.path.dirname(os.path.abspath(__file__))
    tree = os.path.normpath(os.path.join(here, "..", "..", "..", "build", "lib", "libweightsd.so"))
    return [tree, "libweightsd.so.0"]


def _load():
    errors = []
    for path in _candidates():
        try:
            return path, ctypes.CDLL(path), ctypes.PyDLL(path)
        except OSError as e:
            errors.append(f"{path}: {e}")
    raise ImportError("weightsd: cannot load libweightsd (set WEIGHTSD_LIBRARY to its path): "
                      + "; ".join(errors))


LIBRARY_PATH, lib, fast = _load()

c_void_p, c_char_p, c_int, c_uint, c_size_t = (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int,
                                               ctypes.c_uint, ctypes.c_size_t)
c_u64, P_i64 = ctypes.c_uint64, ctypes.POINTER(ctypes.c_int64)

RELEASE_FN = ctypes.CFUNCTYPE(None, c_void_p)


def _bind(handle, name, restype, argtypes):
    try:
        fn = getattr(handle, name)
    except AttributeError:
        raise ImportError(f"weightsd: {LIBRARY_PATH} lacks {name}; it is older than this "
                          "package (rebuild libweightsd)") from None
    fn.restype, fn.argtypes = restype, argtypes
    return fn


wsd_version = _bind(fast, "wsd_version", c_uint, [])
wsd_strerror = _bind(fast, "wsd_strerror", c_char_p, [c_int])
wsd_dtype_name = _bind(fast, "wsd_dtype_name", c_char_p, [c_int])
wsd_dtype_bits = _bind(fast, "wsd_dtype_bits", c_uint, [c_int])
wsd_default_socket = _bind(fast, "wsd_default_socket", c_char_p, [c_int])
wsd_connect = _bind(lib, "wsd_connect", c_int, [c_char_p, ctypes.POINTER(c_void_p)])
wsd_set_timeout = _bind(fast, "wsd_set_timeout", c_int, [c_void_p, c_int])
wsd_close = _bind(lib, "wsd_close", None, [c_void_p])
wsd_last_error = _bind(fast, "wsd_last_error", c_char_p, [c_void_p])
wsd_open = _bind(lib, "wsd_open", c_int,
                 [c_void_p, c_char_p, c_char_p, c_uint, ctypes.POINTER(c_void_p)])
wsd_model_free = _bind(lib, "wsd_model_free", None, [c_void_p])
wsd_model_release = _bind(lib, "wsd_model_release", c_int, [c_void_p])
wsd_model_name = _bind(fast, "wsd_model_name", c_char_p, [c_void_p])
wsd_model_tensor_count = _bind(fast, "wsd_model_tensor_count", c_size_t, [c_void_p])
wsd_model_lease = _bind(fast, "wsd_model_lease", c_u64, [c_void_p])
wsd_model_hash = _bind(fast, "wsd_model_hash", c_char_p, [c_void_p])
wsd_model_base = _bind(fast, "wsd_model_base", c_void_p, [c_void_p, ctypes.POINTER(c_u64)])
wsd_model_device = _bind(fast, "wsd_model_device", c_int, [c_void_p])
wsd_model_tensor = _bind(fast, "wsd_model_tensor", c_void_p, [c_void_p, c_size_t])
wsd_model_find = _bind(fast, "wsd_model_find", c_void_p, [c_void_p, c_char_p])
wsd_model_storage_count = _bind(fast, "wsd_model_storage_count", c_size_t, [c_void_p])
wsd_model_storage = _bind(fast, "wsd_model_storage", c_int,
                          [c_void_p, c_size_t, ctypes.POINTER(c_void_p), ctypes.POINTER(c_u64)])
wsd_tensor_name = _bind(fast, "wsd_tensor_name", c_char_p, [c_void_p])
wsd_tensor_dtype = _bind(fast, "wsd_tensor_dtype", c_int, [c_void_p])
wsd_tensor_ndim = _bind(fast, "wsd_tensor_ndim", c_uint, [c_void_p])
wsd_tensor_shape = _bind(fast, "wsd_tensor_shape", P_i64, [c_void_p])
wsd_tensor_strides = _bind(fast, "wsd_tensor_strides", P_i64, [c_void_p])
wsd_tensor_storage = _bind(fast, "wsd_tensor_storage", c_size_t, [c_void_p])
wsd_tensor_storage_offset = _bind(fast, "wsd_tensor_storage_offset", c_u64, [c_void_p])
wsd_tensor_nbytes = _bind(fast, "wsd_tensor_nbytes", c_u64, [c_void_p])
wsd_tensor_dlpack = _bind(fast, "wsd_tensor_dlpack", c_int,
                          [c_void_p, c_size_t, RELEASE_FN, c_void_p, ctypes.POINTER(c_void_p)])
wsd_storage_dlpack = _bind(fast, "wsd_storage_dlpack", c_int,
                           [c_void_p, c_size_t, RELEASE_FN, c_void_p, ctypes.POINTER(c_void_p)])
wsd_dlpack_free = _bind(fast, "wsd_dlpack_free", None, [c_void_p])


class TensorInfo(ctypes.Structure):
    """wsd_tensor_info_t (weightsd.h)."""
    _fields_ = [("name", c_char_p), ("dtype", c_int), ("ndim", c_uint), ("shape", P_i64),
                ("strides", P_i64), ("storage", c_size_t), ("storage_offset", c_u64),
                ("nbytes", c_u64), ("storage_data", c_void_p), ("storage_nbytes", c_u64)]


wsd_model_tensor_info = _bind(fast, "wsd_model_tensor_info", c_int,
                              [c_void_p, c_size_t, c_size_t, ctypes.POINTER(TensorInfo),
                               c_size_t])


def tensor_infos(model_ptr):
    """Every tensor's TensorInfo, in one foreign call."""
    n = wsd_model_tensor_count(model_ptr)
    infos = (TensorInfo * n)()
    got = wsd_model_tensor_info(model_ptr, 0, n, infos, ctypes.sizeof(TensorInfo)) if n else 0
    if got != n:
        raise ProtocolError(-1000, f"libweightsd described {got} of {n} tensors")
    return infos


def strerror(code):
    """libweightsd's description of any return code."""
    return wsd_strerror(code).decode(errors="replace")


_DTYPE_NAMES = {}


def dtype_name(code):
    """The safetensors spelling of a wsd dtype code ("F32", ...), or "dtype <n>"."""
    name = _DTYPE_NAMES.get(code)
    if name is None:
        raw = wsd_dtype_name(code)
        name = _DTYPE_NAMES[code] = raw.decode() if raw else f"dtype {code}"
    return name
