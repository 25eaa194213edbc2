"""An open model (one lease, one mapping) and what keeps it alive.

Lifetime rule: a Model frees its wsd_model_t (lease released, memory unmapped) when the last
Python reference to it goes. Everything that points into the mapping holds such a reference:

- torch tensors: their storage is made by torch.frombuffer over a ctypes array that carries the
  Model as an attribute; torch drops the array (taking the GIL) when the storage dies.
- DLPack exports: each live DLManagedTensor pins the Model in _pins; its deleter, run by the
  consumer when the last array on it dies, unpins it through a ctypes callback.

So no tensor outlives its bytes, whatever happens to the Client. Model.__del__ runs as an
ordinary finalizer (CPython saves any pending exception around it), which is why freeing happens
there and not inside a C callback.
"""
import ctypes
import itertools

from . import _lib

# token -> Model, one entry per live DLManagedTensor. Only integers cross into C. Single dict
# operations are atomic under the GIL, so no lock: a deleter may run in the middle of anything.
_pins = {}
_tokens = itertools.count(1)


def _release(ctx):
    """Deleter callback (any thread; ctypes takes the GIL): drop the pin `ctx`."""
    try:
        _pins.pop(ctx, None)  # may run Model.__del__, and so unmap, right here
    except Exception:  # interpreter shutdown: the module may be half torn down
        pass


_release_cb = _lib.RELEASE_FN(_release)

DLTENSOR = b"dltensor"
_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
_capsule_valid = ctypes.pythonapi.PyCapsule_IsValid
_capsule_valid.restype = ctypes.c_int
_capsule_valid.argtypes = [ctypes.py_object, ctypes.c_char_p]
_capsule_ptr = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_ptr.restype = ctypes.c_void_p
_capsule_ptr.argtypes = [ctypes.py_object, ctypes.c_char_p]
_capsule_set_name = ctypes.pythonapi.PyCapsule_SetName
_capsule_set_name.restype = ctypes.c_int
_capsule_set_name.argtypes = [ctypes.py_object, ctypes.c_char_p]
_FREED = ctypes.c_char_p(b"weightsd_freed_dltensor")  # must outlive every capsule named so


class Model:
    """One wsd_model_t. Holds its Client (and so the connection and its lease) while alive."""

    __slots__ = ("client", "name", "ptr", "__weakref__")

    def __init__(self, client, name, ptr):
        self.client = client
        self.name = name
        self.ptr = ptr

    def __del__(self):
        self.free()

    def free(self):
        """Releases the lease and unmaps. Only safe once nothing points into the mapping."""
        ptr, self.ptr = self.ptr, None
        if ptr is None or _lib is None or getattr(_lib, "wsd_model_free", None) is None:
            return
        with self.client._lock:  # the release request shares the connection
            _lib.wsd_model_free(ptr)

    def mapping(self):
        """(base address, writable memoryview of the whole mapping), the view keeping self
        alive; (None, None) for an empty one. Slicing the one view is much cheaper than a
        ctypes array type per storage. Not kept on self: that would be a reference cycle, and
        the lease must go when the last tensor does, not at the next garbage collection."""
        size = ctypes.c_uint64()
        base = _lib.wsd_model_base(self.ptr, ctypes.byref(size))
        if not base or not size.value:
            return None, None
        arr = (ctypes.c_ubyte * size.value).from_address(base)
        arr.weightsd_model = self
        return base, memoryview(arr).cast("B")

    def _export(self, fn, index, describe):
        """A capsule from fn (wsd_tensor_dlpack or wsd_storage_dlpack) pinning this model until
        the consumer frees it; describe(r) is the error for a failure r."""
        managed = ctypes.c_void_p()
        token = next(_tokens)
        _pins[token] = self
        r = fn(self.ptr, index, _release_cb, token, ctypes.byref(managed))
        if r < 0:
            del _pins[token]
            raise describe(r)
        try:
            return _capsule_new(managed.value, DLTENSOR, None)
        except BaseException:
            _lib.wsd_dlpack_free(managed)
            raise

    def capsule(self, index):
        """A "dltensor" capsule for tensor `index`, pinning this model until the consumer frees
        it. The capsule has no destructor: its producer (DLPackTensor) frees it if nobody
        consumed it. Raises UnsupportedDtype for dtypes the DLPack header cannot name."""
        def describe(r):
            t = _lib.wsd_model_tensor(self.ptr, index)
            what = f"tensor '{_lib.wsd_tensor_name(t).decode()}' of model '{self.name}'"
            if r == -95:  # -EOPNOTSUPP
                return _lib.UnsupportedDtype(r, (
                    f"{what} has dtype {_lib.dtype_name(_lib.wsd_tensor_dtype(t))}, which the "
                    "DLPack header libweightsd was built with cannot describe"))
            return _lib.error_for(r, f"cannot export {what} through DLPack")
        return self._export(_lib.wsd_tensor_dlpack, index, describe)

    def storage_capsule(self, index):
        """A "dltensor" capsule of storage `index`'s bytes (1-D uint8, on the model's device),
        pinning this model as capsule() does; any dtype can be viewed over it."""
        return self._export(_lib.wsd_storage_dlpack, index, lambda r: _lib.error_for(
            r, f"cannot export storage {index} of model '{self.name}' through DLPack"))


def free_unconsumed(capsule):
    """Frees a capsule's tensor if no consumer took it (consumers rename it "used_dltensor"),
    and renames it so that nobody can consume the freed tensor later."""
    if _capsule_valid(capsule, DLTENSOR):
        _lib.wsd_dlpack_free(_capsule_ptr(capsule, DLTENSOR))
        _capsule_set_name(capsule, _FREED)


def pinned_count():
    """Number of live DLPack exports (for tests and debugging)."""
    return len(_pins)
