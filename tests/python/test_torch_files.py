"""state_dict() of torch.save checkpoints equals torch.load, tensor by tensor: values, dtype,
shape, strides, storage offset and storage sharing."""
import torch

from conftest import TORCH_DTYPES, sample
from weightsd._torch import _untyped


def flatten(obj, prefix=""):
    """Tensors of a (nested) torch.load result by dotted name, the way the daemon names them."""
    if isinstance(obj, torch.Tensor):
        return {prefix[:-1]: obj}
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    return out


def assert_same_as_torch_load(sd, ref):
    """`sd` (from weightsd) matches `ref` (from torch.load) exactly, sharing included."""
    assert sorted(sd) == sorted(ref)
    for name, r in ref.items():
        g = sd[name]
        assert g.dtype == r.dtype, name
        assert g.shape == r.shape, name
        assert g.stride() == r.stride(), name
        assert g.storage_offset() == r.storage_offset(), name
        assert torch.equal(g, r), name
    names = list(ref)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = ref[a].storage().data_ptr() == ref[b].storage().data_ptr()
            got = sd[a].storage().data_ptr() == sd[b].storage().data_ptr()
            assert got == shared, f"{a} / {b}: torch.load shares={shared}, weightsd={got}"
            if shared:
                assert sd[a].storage().size() == ref[a].storage().size(), a


def load_both(daemon, client, tmp_path, obj, *opts, key=None):
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    daemon.preload_json("m", path, *opts)
    ref = torch.load(path)
    if key is not None:
        ref = ref[key]
    return client.state_dict("m"), flatten(ref)


def test_plain(daemon, client, tmp_path):
    obj = {"fc.weight": sample(torch.float32, (8, 4)), "fc.bias": sample(torch.float32, (8,)),
           "step": torch.tensor(3)}
    sd, ref = load_both(daemon, client, tmp_path, obj)
    assert_same_as_torch_load(sd, ref)


def test_tied(daemon, client, tmp_path):
    emb = sample(torch.float32, (10, 6))
    obj = {"embed.weight": emb, "lm_head.weight": emb, "other": sample(torch.float32, (6,))}
    sd, ref = load_both(daemon, client, tmp_path, obj)
    assert_same_as_torch_load(sd, ref)
    assert sd["embed.weight"] is sd["lm_head.weight"]  # as torch.load gives one object


def test_views_with_storage_offsets(daemon, client, tmp_path):
    base = sample(torch.float64, (6, 10))
    obj = {"base": base, "row2": base[2], "tail": base[3:], "col": base[:, 7],
           "flat": base.view(-1)[5:17]}
    sd, ref = load_both(daemon, client, tmp_path, obj)
    assert ref["tail"].storage_offset() == 30
    assert_same_as_torch_load(sd, ref)
    assert sd["row2"].data_ptr() == sd["base"].data_ptr() + 2 * 10 * 8


def test_views_without_the_base(daemon, client, tmp_path):
    base = sample(torch.int32, (100,))
    obj = {"a": base[10:20], "b": base[50:]}  # only views saved: the whole storage travels
    sd, ref = load_both(daemon, client, tmp_path, obj)
    assert_same_as_torch_load(sd, ref)


def test_non_contiguous(daemon, client, tmp_path):
    m = sample(torch.float32, (5, 7, 3))
    obj = {"t": m.transpose(0, 2), "s": m[:, ::2, 1], "p": m.permute(1, 0, 2),
           "e": m[:, :1].expand(5, 4, 3)}
    sd, ref = load_both(daemon, client, tmp_path, obj)
    assert not sd["t"].is_contiguous()
    assert sd["e"].stride()[1] == 0
    assert_same_as_torch_load(sd, ref)


def test_sole_user_of_its_storage(daemon, client, tmp_path):
    """A tensor alone on its storage is built from its bytes in one step (_torch._whole) unless
    that would change its strides: a transposed or expanded one takes the general path."""
    obj = {"dense": sample(torch.float32, (4, 6)), "t": sample(torch.float64, (3, 5)).t(),
           "scalar": torch.tensor(7, dtype=torch.int64), "row": sample(torch.int16, (9,)),
           "e": sample(torch.float32, (1, 3)).expand(4, 3)}
    sd, ref = load_both(daemon, client, tmp_path, obj)
    assert sd["t"].stride() == ref["t"].stride() == (1, 5) and not sd["t"].is_contiguous()
    assert sd["e"].stride() == (0, 1)
    for name, t in sd.items():
        assert _untyped(t).nbytes() == _untyped(ref[name]).nbytes()
        assert _untyped(t).data_ptr() == t.data_ptr()
    assert_same_as_torch_load(sd, ref)


def test_every_dtype(daemon, client, tmp_path):
    obj = {str(dt).replace("torch.", ""): sample(dt, (4, 3), seed=i)
           for i, dt in enumerate(TORCH_DTYPES)}
    obj["scalar_bool"] = torch.tensor(True)
    obj["empty_half"] = torch.zeros(0, 2, dtype=torch.float16)
    sd, ref = load_both(daemon, client, tmp_path, obj)
    assert_same_as_torch_load(sd, ref)


def test_nested_with_key(daemon, client, tmp_path):
    w = sample(torch.float32, (3, 3))
    obj = {"model": {"layer.weight": w, "layer.bias": w[0], "sub": {"x": torch.arange(4)}},
           "optimizer": {"state": {0: {"momentum": torch.ones(3, 3)}}}, "epoch": 7}
    sd, ref = load_both(daemon, client, tmp_path, obj, "--key", "model", key="model")
    assert_same_as_torch_load(sd, ref)


def test_dlpack_path_equals_torch_load(daemon, client, tmp_path, monkeypatch):
    """The state_dict a model opened on "cuda:N" gets (one DLPack import per storage, views by
    set_()), run here on the host copy: same values, sharing, tying and every dtype, bool
    included, as torch.load; and a failed import pins nothing."""
    import gc
    import torch.utils.dlpack
    from weightsd import _model, _torch
    base = sample(torch.float64, (6, 10))
    emb = sample(torch.float32, (10, 6))
    obj = {str(dt).replace("torch.", ""): sample(dt, (4, 3), seed=i)
           for i, dt in enumerate(TORCH_DTYPES)}
    obj.update({"base": base, "row2": base[2], "col": base[:, 7], "t": emb.t(),
                "embed": emb, "lm_head": emb, "scalar_bool": torch.tensor(True),
                "empty_half": torch.zeros(0, 2, dtype=torch.float16)})
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    daemon.preload_json("m", path)
    ref = flatten(torch.load(path))
    sd = _torch._dlpack_state_dict(client.open("m"), torch.device("cpu"))
    assert_same_as_torch_load(sd, ref)
    assert sd["embed"] is sd["lm_head"]
    assert daemon.leases("m") == 1 and _model.pinned_count() > 0
    sd = None
    gc.collect()
    assert daemon.leases("m") == 0 and _model.pinned_count() == 0

    def refuse(_capsule):
        raise RuntimeError("this consumer refuses the capsule")
    monkeypatch.setattr(torch.utils.dlpack, "from_dlpack", refuse)
    try:
        _torch._dlpack_state_dict(client.open("m"), torch.device("cpu"))
    except RuntimeError as e:
        assert "refuses" in str(e)
    else:
        raise AssertionError("from_dlpack's failure was swallowed")
    gc.collect()
    assert daemon.leases("m") == 0 and _model.pinned_count() == 0


def test_state_dict_inside_a_device_context(daemon, client, tmp_path):
    """A worker may ask for the state dict inside `with weightsd.meta_device():` (where it
    builds its module) or with another default device. Tensors must still be the host
    mapping's: torch.empty follows the context, and on torch 1.13 any TorchFunctionMode made
    _storage() return the TypedStorage wrapper, so every tensor on a shared storage failed
    with "does not fit its storage"."""
    import weightsd
    base = sample(torch.float64, (6, 10))
    emb = sample(torch.float32, (10, 6))
    obj = {"base": base, "row2": base[2], "t": emb.t(), "embed": emb, "lm_head": emb,
           "alone": sample(torch.int16, (7,)), "empty": torch.zeros(0, 3)}
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    daemon.preload_json("m", path)
    ref = flatten(torch.load(path))
    with weightsd.meta_device():
        sd = client.state_dict("m")
        assert torch.empty(1).is_meta  # the context is in force here
    assert all(t.device.type == "cpu" for t in sd.values())
    assert_same_as_torch_load(sd, ref)
