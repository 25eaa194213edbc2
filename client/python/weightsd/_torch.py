"""The PyTorch side: state dicts over the daemon's mapping, meta construction, assignment.

Native torch paths are used where this torch has them: torch.device("meta") as a context
manager (torch >= 2.0) and load_state_dict(assign=True) (torch >= 2.1). The fallbacks below
(for Debian's torch 1.13) follow torch's own code: a TorchFunctionMode like torch 2.0's
DeviceContext, and a copy of Module.load_state_dict's traversal that assigns instead of copying.
"""
import functools
import gc
import inspect
import itertools

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from . import _lib

# wsd dtype code -> torch dtype attribute name (None where torch has no such type at all).
_DTYPE_ATTR = {
    0: "bool", 1: "uint8", 2: "int8", 3: "int16", 4: "uint16", 5: "float16", 6: "bfloat16",
    7: "int32", 8: "uint32", 9: "float32", 10: "float64", 11: "int64", 12: "uint64",
    13: "float8_e5m2", 14: "float8_e4m3fn", 15: "float8_e8m0fnu", 16: "float8_e4m3fnuz",
    17: "float8_e5m2fnuz", 18: None, 19: None, 20: None, 21: "complex64", 22: "complex128",
}
_DTYPES = {code: getattr(torch, attr, None) if attr else None
           for code, attr in _DTYPE_ATTR.items()}
# dtype.itemsize where torch has it (>= 2.1); else an empty CPU tensor, never on the default
# device, which may be CUDA (set_default_device) and would start CUDA at import.
_ITEMSIZE = {dt: getattr(dt, "itemsize", None)
             or torch.empty(0, dtype=dt, device="cpu").element_size()
             for dt in _DTYPES.values() if dt}

HAS_DEVICE_CONTEXT = hasattr(torch.device, "__enter__")
HAS_ASSIGN = "assign" in inspect.signature(nn.Module.load_state_dict).parameters

if hasattr(torch.Tensor, "untyped_storage"):
    def _untyped(t):
        return t.untyped_storage()
elif hasattr(torch.Tensor, "_storage"):  # torch 1.13: the untyped storage, without a wrapper
    def _untyped(t):
        # Under a TorchFunctionMode (meta_device()'s fallback, or the caller's) 1.13 dispatches
        # _storage() as Tensor.storage and hands back the TypedStorage wrapper.
        s = t._storage()
        return s.untyped() if isinstance(s, torch.TypedStorage) else s
else:
    def _untyped(t):
        return t.storage().untyped()


def _torch_dtype(code, name, model):
    dt = _DTYPES.get(code)
    if dt is None:
        raise _lib.UnsupportedDtype(-95, (
            f"tensor '{name}' of model '{model}' has dtype {_lib.dtype_name(code)}, which torch "
            f"{torch.__version__} does not have"))
    return dt


def _storage(info, mapping):
    """An UntypedStorage over the storage `info` (a TensorInfo) lies in, keeping the model
    alive. `mapping` is model.mapping(), taken once per state_dict."""
    if info.storage_nbytes == 0:  # frombuffer refuses empty buffers; nothing to share anyway
        return _untyped(torch.empty(0, dtype=torch.uint8, device="cpu"))
    base, view = mapping
    off = info.storage_data - base  # the library checked the extent against the mapping
    return _untyped(torch.frombuffer(view[off:off + info.storage_nbytes], dtype=torch.uint8))


def _whole(mapping, info, dtype, shape, strides):
    """The tensor for `info` straight from its bytes, when it alone uses its storage and fills it
    densely from the start: one frombuffer (and a view) instead of a storage, an empty tensor and
    a set_(), about half the cost per tensor. None where that does not give the same tensor."""
    base, view = mapping
    off = info.storage_data - base
    try:
        t = torch.frombuffer(view[off:off + info.storage_nbytes], dtype=dtype)
    except (TypeError, ValueError, RuntimeError):  # a dtype this torch's frombuffer refuses
        return None
    if len(shape) == 1:
        # frombuffer gave (storage_nbytes / itemsize,) with stride 1: compare as Python ints,
        # which is the common case of many-tensor checkpoints and cheaper than asking torch.
        return t if strides == (1,) and shape[0] * _ITEMSIZE[dtype] == info.storage_nbytes \
            else None
    t = t.view(shape)
    return t if t.shape == shape and t.stride() == strides else None


def _dlpack_storage(model, info, device):
    """The torch storage of `info`'s storage, imported through DLPack as the bytes it holds."""
    from torch.utils.dlpack import from_dlpack
    from . import _model
    if info.storage_nbytes == 0:  # nothing to share; no capsule for an empty range
        return _untyped(torch.empty(0, dtype=torch.uint8, device=device))
    capsule = model.storage_capsule(info.storage)
    try:
        return _untyped(from_dlpack(capsule))
    except BaseException:
        _model.free_unconsumed(capsule)  # else the capsule would pin the model for ever
        raise


def _views(model, make_storage, device, make_whole=None):
    """The dict name -> tensor: one torch storage per checkpoint storage (make_storage(info)),
    each tensor a set_() view over it, names on the very same view sharing one tensor object.
    make_whole(info, dtype, shape, strides), where given, may build a tensor that is its
    storage's only user directly (None: the general path).

    The cyclic garbage collector is paused for the loop: each new tensor is a tracked object,
    and with 10^5 of them (a mixture-of-experts checkpoint) its full passes over torch's heap
    took a fifth of the time, for nothing, as the loop makes no cycles."""
    storages = {}  # storage index -> UntypedStorage
    views = {}     # (storage, offset, shape, strides, dtype) -> tensor, so tied names share one
    out = {}
    empty = torch.empty
    dtypes = _DTYPES
    # Explicit even for the host: torch.empty follows set_default_device() and a device
    # context (meta_device()), and set_() refuses a CPU storage for a tensor made elsewhere.
    on = {"device": "cpu" if device is None else device}
    collecting = gc.isenabled()
    gc.disable()
    try:
        infos = _lib.tensor_infos(model.ptr)  # one foreign call for all
        users = {}
        if make_whole is not None:
            for info in infos:
                si = info.storage
                users[si] = users.get(si, 0) + 1
        for info in infos:
            name = info.name.decode()
            dtype = dtypes.get(info.dtype) or _torch_dtype(info.dtype, name, model.name)
            nd = info.ndim
            shape = tuple(info.shape[:nd])
            strides = tuple(info.strides[:nd])
            si, offset = info.storage, info.storage_offset
            key = (si, offset, shape, strides, dtype)
            tensor = views.get(key)
            if tensor is None and offset == 0 and users.get(si) == 1 and info.nbytes and \
                    info.nbytes == info.storage_nbytes:
                tensor = make_whole(info, dtype, shape, strides)
            if tensor is None:
                st = storages.get(si)
                if st is None:
                    st = storages[si] = make_storage(info)
                try:
                    tensor = empty(0, dtype=dtype, **on).set_(st, offset, shape, strides)
                except RuntimeError as e:  # torch checks the view against the storage size
                    raise _lib.ProtocolError(-1000, f"tensor '{name}' of model '{model.name}' "
                                                    f"does not fit its storage: {e}") from None
                views[key] = tensor
            out[name] = tensor
    except BaseException:
        # The traceback keeps this frame: drop what pins the model, so its lease goes now.
        storages = views = out = tensor = st = model = make_storage = make_whole = None
        raise
    finally:
        if collecting:
            gc.enable()
    return out


def _dlpack_state_dict(model, device):
    """state_dict() through DLPack: one import per checkpoint storage (a uint8 tensor over its
    bytes, on `device`), the tensors views over it, so every dtype torch has works (DLPack
    names no float8 type, and no bool before 0.8) and tensors of one storage share one torch
    storage, as on the CPU path. Used for models opened on "cuda:N".

    Stream semantics: the daemon synchronised the upload before exporting, and nothing writes
    the bytes afterwards, so tensors are usable on any stream at once. Writing into them is a
    CUDA illegal-address fault unless the model was opened with writable=True (which needs a
    preload with --allow-gpu-write)."""
    try:
        return _views(model, lambda info: _dlpack_storage(model, info, device), device)
    except BaseException:
        model = None
        raise


def state_dict(model):
    """Builds the dict name -> tensor for an open Model (see Client.state_dict)."""
    device = _lib.wsd_model_device(model.ptr)
    if device >= 0:
        return _dlpack_state_dict(model, torch.device("cuda", device))
    mapping = model.mapping()
    try:
        return _views(model, lambda info: _storage(info, mapping), None,
                                functools.partial(_whole, mapping))
    except BaseException:
        model = mapping = None
        raise


# Factory functions torch 2.0's DeviceContext sends to its device (torch/utils/_device.py),
# where this torch has them.
_FACTORIES = frozenset(f for f in (
    getattr(mod, n, None) for mod, names in (
        (torch, ("empty", "empty_permuted", "empty_strided", "empty_quantized", "ones", "arange",
                 "bartlett_window", "blackman_window", "eye", "full", "hamming_window",
                 "hann_window", "kaiser_window", "linspace", "logspace", "rand", "randn",
                 "randint", "randperm", "range", "sparse_coo_tensor", "sparse_compressed_tensor",
                 "sparse_csr_tensor", "sparse_csc_tensor", "sparse_bsr_tensor",
                 "sparse_bsc_tensor", "tril_indices", "triu_indices", "vander", "zeros",
                 "asarray", "tensor", "as_tensor", "scalar_tensor")),
        (torch.fft, ("fftfreq", "rfftfreq")),
        (getattr(torch, "nested", None), ("nested_tensor",)),
    ) for n in names) if f is not None)


class _MetaMode(TorchFunctionMode):
    """Puts factory calls without an explicit device on 'meta' (torch < 2.0 fallback)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FACTORIES and kwargs.get("device") is None:
            kwargs = dict(kwargs, device="meta")
        return func(*args, **kwargs)


def meta_device():
    """See weightsd.meta_device()."""
    return torch.device("meta") if HAS_DEVICE_CONTEXT else _MetaMode()


_EXTRA_STATE = "_extra_state"  # torch.nn.modules.module._EXTRA_STATE_KEY_SUFFIX


def _dotted_needs_child():
    """Whether this torch calls a dotted key unexpected unless its first part is a child module
    (torch >= 2.4, PR 124385; before, a local parameter or buffer of that name also passed),
    asked of torch itself so the checks before an assign report what torch would."""
    m = nn.Module()
    m.register_buffer("w", torch.empty(0, device="meta"))
    unexpected = []
    m._load_from_state_dict({"w.x": torch.empty(0, device="meta")}, "", {}, True, [],
                            unexpected, [])
    return unexpected == ["w.x"]


_DOTTED_NEEDS_CHILD = _dotted_needs_child()


def _has_extra_state(mod):
    return getattr(type(mod), "set_extra_state", nn.Module.set_extra_state) \
        is not nn.Module.set_extra_state


def _plan(module, sd):
    """Walks `module` the way Module.load_state_dict does and returns (plan, missing,
    unexpected, error_msgs), touching nothing. plan lists (submodule, local name, tensor)
    for every assignment; error_msgs hold torch's size-mismatch messages plus dtype mismatches
    worded the same way (an assign cannot convert, and the daemon serves what it preloaded)."""
    acc = ([], [], [], [])
    _visit(module, sd, "", acc)
    return acc


def _visit(mod, local_sd, prefix, acc):
    """One module of _plan (torch's _load_from_state_dict checks, then the children). A plain
    function, not a closure: a recursive closure is a reference cycle that would keep the
    tensors, and so the lease, alive until the next garbage collection."""
    plan, missing, unexpected, msgs = acc
    persistent = ((k, v) for k, v in mod._buffers.items()
                  if k not in mod._non_persistent_buffers_set)
    local = {k: v for k, v in itertools.chain(mod._parameters.items(), persistent)
             if v is not None}
    for name, param in local.items():
        key = prefix + name
        if key not in local_sd:
            missing.append(key)
            continue
        inp = local_sd[key]
        lazy = nn.parameter.is_lazy(param)
        if not lazy and len(param.shape) == 0 and len(inp.shape) == 1:
            inp = inp[0]  # torch's backward compatibility with 0.3 scalars
        if not lazy and inp.shape != param.shape:
            msgs.append(f"size mismatch for {key}: copying a param with shape {inp.shape} "
                        f"from checkpoint, the shape in current model is {param.shape}.")
            continue
        if not lazy and inp.dtype != param.dtype:
            msgs.append(f"dtype mismatch for {key}: copying a param with dtype {inp.dtype} "
                        f"from checkpoint, the dtype in current model is {param.dtype}.")
            continue
        plan.append((mod, name, inp, key))
    extra_key = prefix + _EXTRA_STATE
    if _has_extra_state(mod):
        if extra_key in local_sd:
            plan.append((mod, None, local_sd[extra_key], extra_key))
        else:
            missing.append(extra_key)
    elif extra_key in local_sd:
        unexpected.append(extra_key)
    # One pass over the keys both finds the unexpected ones and splits the rest by child, so a
    # module with many children (nn.Sequential) costs O(keys), not O(children * keys).
    by_child = {}
    n = len(prefix)
    for key, value in local_sd.items():
        if not key.startswith(prefix) or key == extra_key:
            continue
        first, dot, _ = key[n:].partition(".")
        if _DOTTED_NEEDS_CHILD:  # torch >= 2.4: "a.b" needs child a, "a" a local tensor
            odd = first not in mod._modules if dot else first not in local
        else:
            odd = first not in mod._modules and first not in local
        if odd:
            unexpected.append(key)
        if dot:
            by_child.setdefault(first, {})[key] = value
    for name, child in mod._modules.items():
        if child is not None:
            _visit(child, by_child.get(name, {}), prefix + name + ".", acc)


def _view_key(t):
    """Identity of a view: same key means same bytes, same layout. None for empty tensors."""
    if t.numel() == 0:
        return None
    return (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())


def _assign(plan):
    """The assign=True of torch >= 2.1 for torch 1.13, except that names on one view end up on
    one Parameter (or buffer) object, so tied weights stay tied."""
    made = {}
    for mod, name, inp, _ in plan:
        if name is None:
            mod.set_extra_state(inp)
            continue
        old = mod._parameters.get(name)
        is_param = name in mod._parameters
        vk = _view_key(inp)
        new = made.get((is_param, vk)) if vk is not None else None
        if new is None:
            if is_param:
                new = inp if isinstance(inp, nn.Parameter) else \
                    nn.Parameter(inp, requires_grad=old.requires_grad)
            else:
                new = inp
            if vk is not None:
                made[(is_param, vk)] = new
        setattr(mod, name, new)


def _retie(module):
    """After torch's own assign, which wraps each name in a new Parameter: make names on the
    same view share one Parameter object again."""
    seen = {}
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            vk = None if p is None or p.is_meta or nn.parameter.is_lazy(p) else _view_key(p)
            if vk is None:
                continue
            first = seen.setdefault(vk, p)
            if first is not p:
                setattr(mod, name, first)


def load_into(module, name, client=None, strict=True, prefix="", device="cpu", dtype=None,
              wait=False, writable=False):
    """Assigns model `name`'s tensors into `module`'s parameters and buffers, zero-copy.

    Equivalent to module.load_state_dict(sd, strict=strict, assign=True) with sd the daemon's
    state dict (keys under `prefix`, with the prefix removed): Parameters stay Parameters with
    their requires_grad, buffers stay buffers, and names on one view of one storage (tied
    weights) become one Parameter. Build `module` under meta_device() and create optimizers
    afterwards: the Parameters are new objects.

    Checks come first and change nothing on failure: missing and unexpected keys (if strict),
    shape and dtype mismatches raise RuntimeError worded as torch's ("Error(s) in loading
    state_dict for X:..."); dtype=, if given, must match every floating tensor (the daemon
    serves what it preloaded: no conversion on open), else TypeError. device goes to the daemon
    ("cuda:N" needs a preload with --device cuda:N; writable=True as in Client.open).
    client=None connects to the default socket; that connection then lives as long as the
    loaded tensors do.

    Returns torch's _IncompatibleKeys(missing_keys, unexpected_keys).
    """
    if client is None:
        from . import connect
        client = connect()
    sd = client.state_dict(name, device=device, wait=wait, writable=writable)
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if not sd:
            raise ValueError(f"model '{name}' has no tensor whose name starts with '{prefix}'")
    if dtype is not None:
        wrong = next(((k, t.dtype) for k, t in sd.items()
                      if t.is_floating_point() and t.dtype != dtype), None)
        if wrong:
            sd = None  # raise without the tensors: a traceback must not hold the lease
            raise TypeError(
                f"load_into({type(module).__name__}, '{name}', dtype={dtype}): tensor "
                f"'{prefix}{wrong[0]}' is {wrong[1]}; weightsd serves the dtype the model was "
                "preloaded with (weightsctl preload --dtype) and does not convert on open")

    plan, missing, unexpected, msgs = _plan(module, sd)
    if strict:
        if unexpected:
            msgs.insert(0, "Unexpected key(s) in state_dict: {}. ".format(
                ", ".join(f'"{k}"' for k in unexpected)))
        if missing:
            msgs.insert(0, "Missing key(s) in state_dict: {}. ".format(
                ", ".join(f'"{k}"' for k in missing)))
    if msgs:
        sd = plan = None
        raise RuntimeError("Error(s) in loading state_dict for {}:\n\t{}".format(
            type(module).__name__, "\n\t".join(msgs)))

    if HAS_ASSIGN:
        # torch 2.1 and 2.2 wrap an assigned tensor in Parameter(t), requires_grad=True (2.3
        # keeps the module's, PR 121157), which also fails for integer Parameters after other
        # names were assigned. Handed Parameters made here, one per view with the module's
        # requires_grad, every torch >= 2.1 assigns them as they are: tied names stay tied.
        sd = dict(sd)
        made = {}
        for mod, pname, inp, key in plan:
            if pname is None or pname not in mod._parameters:
                continue
            vk = _view_key(inp)
            p = made.get(vk) if vk is not None else None
            if p is None:
                p = inp if isinstance(inp, nn.Parameter) else \
                    nn.Parameter(inp, requires_grad=mod._parameters[pname].requires_grad)
                if vk is not None:
                    made[vk] = p
            sd[key] = p
        plan = made = p = inp = None
        result = module.load_state_dict(sd, strict=strict, assign=True)
        _retie(module)
        return result
    _assign(plan)
    return nn.modules.module._IncompatibleKeys(missing, unexpected)
