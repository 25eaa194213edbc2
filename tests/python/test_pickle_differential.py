"""RELIABILITY P10 for the pickle VM: weightsd and CPython's unpickler, on the same bytes.

Inputs: pickle.dumps() of random plain values (the kinds a checkpoint's non-tensor entries
hold: dicts, lists, tuples, sets, frozensets, OrderedDict, Counter, str with any code point,
bytes, bytearray, big ints, floats with NaN and infinities, complex, torch.Size, torch.device
and dtypes) at protocols 2 to 5, then byte-level mutations of those. Each input goes through
weightsd's VM (build/tests/wsd-pickle-json) and through pickle.Unpickler with encoding="utf-8",
as torch.load calls it, whose find_class gives out only harmless builtins (never a callable
that could run anything).

WSD_DIFF_VALUES (default 1500 values, 6 inputs each) and WSD_DIFF_SEED change the run.

The rule: when weightsd accepts a stream and renders it, CPython accepts it too and holds the
same value (compared as JSON, the way weightsd renders it); when CPython refuses a stream,
weightsd refuses it. weightsd refusing what CPython accepts is allowed (it is stricter on
purpose: protocol 0/1 text opcodes, frozensets as keys, ...). Mismatches print their bytes.
"""
import collections
import io
import json
import math
import os
import pickle
import pickletools
import random
import subprocess

import pytest
import torch

import wsdtest

# pickletools reading mutated STRING opcodes warns about their escapes; that is the input's doing.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TOOL = os.path.join(wsdtest.BUILD_DIR, "tests", "wsd-pickle-json")

# What find_class may hand out: value-building callables only.
SAFE = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "Counter"): collections.Counter,
    ("_codecs", "encode"): __import__("codecs").encode,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
}
for _m in ("builtins", "__builtin__"):
    for _n, _v in (("set", set), ("frozenset", frozenset), ("complex", complex),
                   ("bytes", bytes), ("bytearray", bytearray)):
        SAFE[(_m, _n)] = _v


class Named:
    """A torch dtype or other attribute global: only its name matters, as in weightsd."""

    def __init__(self, name):
        self.name = name


class Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in SAFE:
            return SAFE[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None),
                                            (torch.dtype, torch.qscheme)):
            return Named(f"torch.{name}")
        raise pickle.UnpicklingError(f"global {module}.{name} not allowed here")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("no storages here")


def render(v):
    """v as weightsd renders it (pickle.h: pickle_render_json), or raise Skip."""
    if isinstance(v, str):
        # JSON cannot tell two lone surrogates from the pair they spell: weightsd's "\ud83d\ude00"
        # is read back as one code point, so CPython's string is compared the same way.
        return v.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
    if v is None or isinstance(v, (bool, int)):
        return v
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "Infinity" if v > 0 else "-Infinity"
        return v
    if isinstance(v, (bytes, bytearray)):
        return v.decode("latin-1")
    if isinstance(v, complex):
        return [render(v.real), render(v.imag)]
    if isinstance(v, Named):
        return v.name
    if isinstance(v, torch.device):
        return str(v)
    if isinstance(v, (set, frozenset)):
        return Unordered(render(x) for x in v)
    if isinstance(v, (list, tuple)):  # torch.Size is a tuple
        return [render(x) for x in v]
    if isinstance(v, dict):
        out = {}
        for k, x in v.items():
            if isinstance(k, str):
                key = k
            elif k is None or isinstance(k, (bool, int, float)):
                key = json.dumps(render(k)).strip('"')
            else:  # json.dumps refuses these keys; weightsd's own spelling is not compared
                raise Skip
            if key in out:  # 1 and "1": json.dumps would repeat the name; weightsd refuses
                raise Skip
            out[key] = render(x)
        return out
    raise Skip


class Skip(Exception):
    pass


class Unordered(list):
    """A rendered set: weightsd keeps the pickle's order, CPython its own hash order."""


def same(w, p):
    """Whether weightsd's JSON value w is CPython's rendered value p."""
    if isinstance(p, Unordered):
        # Set items are hashable, so hold no sets themselves: a sort settles the order.
        key = lambda x: json.dumps(x, sort_keys=True)  # noqa: E731
        return isinstance(w, list) and sorted(w, key=key) == sorted(p, key=key)
    if isinstance(p, list):
        return isinstance(w, list) and len(w) == len(p) and all(map(same, w, p))
    if isinstance(p, dict):
        return (isinstance(w, dict) and list(w) == list(p)
                and all(same(w[k], p[k]) for k in p))
    return type(w) is type(p) and w == p


def huge_memo(data):
    """A memo index CPython would size its memo for (gigabytes, seconds): not fed to it."""
    try:
        for op, arg, _ in pickletools.genops(data):
            if "PUT" in op.name or "GET" in op.name:
                if isinstance(arg, int) and arg > 1 << 20:
                    return True
    except Exception:  # noqa: BLE001 - a malformed tail: what came before was checked
        pass
    return False


def python_value(data):
    if huge_memo(data):
        return True, Skip
    try:
        return True, render(Unpickler(io.BytesIO(data), encoding="utf-8").load())
    except Skip:
        return True, Skip
    except RecursionError:
        return True, Skip
    except Exception as e:  # noqa: BLE001 - any refusal by CPython counts
        return False, f"{type(e).__name__}: {e}"


def random_value(rnd, depth=0):
    kinds = ["none", "bool", "int", "big", "float", "special", "str", "bytes", "complex",
             "dtype", "device", "size"]
    if depth < 3:
        kinds += ["list", "tuple", "dict", "set", "frozenset", "od", "counter", "bytearray"] * 2
    k = rnd.choice(kinds)
    if k == "none":
        return None
    if k == "bool":
        return rnd.random() < 0.5
    if k == "int":
        return rnd.choice([0, 1, -1, 255, 256, 65535, 65536, 2**31 - 1, -2**31, 2**63 - 1,
                           rnd.randint(-2**40, 2**40)])
    if k == "big":
        return rnd.choice([1, -1]) * rnd.randint(2**63, 2**200)
    if k == "float":
        return rnd.choice([0.0, -0.0, 0.1, 1e16, 1e-5, 123456.5, rnd.uniform(-1e9, 1e9),
                           rnd.random() * 10 ** rnd.randint(-300, 300)])
    if k == "special":
        return rnd.choice([math.nan, math.inf, -math.inf])
    if k == "str":
        return "".join(chr(rnd.choice([rnd.randint(32, 126), rnd.randint(0, 31),
                                       rnd.randint(0x80, 0xffff), rnd.randint(0x10000, 0x10ffff),
                                       rnd.randint(0xd800, 0xdfff)]))
                       for _ in range(rnd.randint(0, 6)))
    if k == "bytes":
        return bytes(rnd.randint(0, 255) for _ in range(rnd.randint(0, 5)))
    if k == "bytearray":
        return bytearray(rnd.randint(0, 255) for _ in range(rnd.randint(0, 5)))
    if k == "complex":
        return complex(rnd.uniform(-5, 5), rnd.choice([0.0, 1.5, math.inf]))
    if k == "dtype":
        return rnd.choice([torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool])
    if k == "device":
        return torch.device(rnd.choice(["cpu", "cuda", "cuda:1"]))
    if k == "size":
        return torch.Size([rnd.randint(0, 9) for _ in range(rnd.randint(0, 3))])
    items = [random_value(rnd, depth + 1) for _ in range(rnd.randint(0, 4))]
    if k == "list":
        return items
    if k == "tuple":
        return tuple(items)
    hashable = [random_key(rnd) for _ in range(rnd.randint(0, 4))]
    if k in ("set", "frozenset"):
        return set(hashable) if k == "set" else frozenset(hashable)
    d = {key: random_value(rnd, depth + 1) for key in hashable}
    if k == "od":
        return collections.OrderedDict(d)
    if k == "counter":
        return collections.Counter({key: rnd.randint(0, 9) for key in hashable})
    return d


def random_key(rnd):
    return rnd.choice([rnd.randint(-9, 9), f"k{rnd.randint(0, 99)}", None, True, 2.5,
                       (rnd.randint(0, 3), "t"), b"by"])


def mutate(rnd, data):
    b = bytearray(data)
    for _ in range(rnd.randint(1, 3)):
        op = rnd.randrange(4)
        i = rnd.randrange(len(b)) if b else 0
        if op == 0 and b:
            b[i] = rnd.randrange(256)
        elif op == 1 and b:
            del b[i:i + rnd.randint(1, 4)]
        elif op == 2:
            b[i:i] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 3)))
        else:  # duplicate a run: repeated opcodes, memo slots, container items
            j = rnd.randrange(len(b) + 1)
            b[j:j] = b[i:i + rnd.randint(1, 8)]
    return bytes(b)


def weightsd_results(paths):
    out = subprocess.run([TOOL] + paths, capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines()]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    if not os.access(TOOL, os.X_OK):
        pytest.skip(f"{TOOL} not built")
    rnd = random.Random(int(os.environ.get("WSD_DIFF_SEED", "20261202")))
    n = int(os.environ.get("WSD_DIFF_VALUES", "1500"))
    d = tmp_path_factory.mktemp("pkl")
    files = []
    for i in range(n):
        v = random_value(rnd)
        base = pickle.dumps(v, protocol=rnd.choice([2, 3, 4, 5]))
        for j, data in enumerate([base] + [mutate(rnd, base) for _ in range(5)]):
            p = d / f"{i:04d}-{j}.pkl"
            p.write_bytes(data)
            files.append(str(p))
    return files


def test_weightsd_never_accepts_what_cpython_refuses_or_reads_it_differently(inputs):
    compared = refused_both = stricter = 0
    bad = []
    for w in weightsd_results(inputs):
        data = open(w["file"], "rb").read()
        py_ok, py_val = python_value(data)
        if not w["ok"]:
            if py_ok:
                stricter += 1
            else:
                refused_both += 1
            continue
        if not py_ok:
            bad.append(f"weightsd accepts what CPython refuses ({py_val}): {data!r}")
            continue
        if w["json"] is None or py_val is Skip:
            continue
        got = json.loads(w["json"])
        if not same(got, py_val):
            bad.append(f"values differ: weightsd {w['json']} vs CPython "
                       f"{json.dumps(py_val)}: {data!r}")
        compared += 1
    print(f"{len(inputs)} inputs: {compared} values identical, {refused_both} refused by both, "
          f"{stricter} refused by weightsd only")
    assert not bad, f"{len(bad)} mismatches:\n" + "\n".join(bad[:20])
    # The test must have compared a fair share, or it proves nothing.
    assert compared > len(inputs) // 10


def test_unmutated_values_are_read_as_cpython_reads_them(inputs):
    """Every pickle.dumps() output weightsd accepts at protocol >= 2 renders the same value."""
    bases = [f for f in inputs if f.endswith("-0.pkl")]
    accepted = 0
    for w in weightsd_results(bases):
        data = open(w["file"], "rb").read()
        ok, val = python_value(data)
        assert ok, w["file"]
        if w["ok"] and w["json"] is not None and val is not Skip:
            assert same(json.loads(w["json"]), val), (w["json"], val, data)
            accepted += 1
        elif not w["ok"]:
            # Allowed refusals only: frozensets or tensors-free oddities weightsd names.
            assert "E_PKL" in w["error"], w
            pickletools.dis(data, out=io.StringIO())
    assert accepted > len(bases) // 2
