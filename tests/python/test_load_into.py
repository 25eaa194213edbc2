"""meta_device() + load_into() with real nn.Modules: the seed recipe end to end, ties, and
mismatches reported the way torch's load_state_dict reports them."""
import pytest
import torch
from torch import nn

import weightsd
from weightsd import _torch
from conftest import write_st


class SomeModule(nn.Module):
    """The seed's SomeModule(n): a few Linear layers of width n, a norm and buffers."""

    def __init__(self, n):
        super().__init__()
        self.embed = nn.Linear(n, n)
        self.blocks = nn.Sequential(nn.Linear(n, n), nn.ReLU(), nn.Linear(n, n))
        self.norm = nn.LayerNorm(n)
        self.head = nn.Linear(n, 10)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, n))
        self.register_buffer("scratch", torch.zeros(n), persistent=False)  # not in checkpoints

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.embed(x) * self.scale)))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.embed.weight


def rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4


def reference(n, seed=0):
    torch.manual_seed(seed)
    ref = SomeModule(n)
    with torch.no_grad():
        ref.scale.mul_(1.25)
    return ref


def checkpoint(daemon, tmp_path, sd, fmt, name="m", *opts):
    """Preloads the dict `sd` as `name` in format `fmt` ("safetensors" or "torch")."""
    if fmt == "safetensors":
        daemon.preload(name, write_st(tmp_path / f"{name}.safetensors", sd))
    else:
        torch.save(sd, tmp_path / f"{name}.pth")
        daemon.preload_json(name, tmp_path / f"{name}.pth", *opts)


def meta_module(cls, *args):
    with weightsd.meta_device():
        return cls(*args)


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_seed_recipe(daemon, client, tmp_path, fmt):
    ref = reference(1000)
    checkpoint(daemon, tmp_path, ref.state_dict(), fmt)

    before = rss_kib()
    model = meta_module(SomeModule, 1000)
    assert rss_kib() - before < 4096  # 3M+ float32 parameters would be 12 MiB
    assert all(t.is_meta for t in list(model.parameters()) + list(model.buffers()))

    result = weightsd.load_into(model, "m", client=client, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert all(isinstance(p, nn.Parameter) and p.requires_grad and not p.is_meta
               for p in model.parameters())
    assert set(model._buffers) == {"scale", "scratch"}
    assert not isinstance(model.scale, nn.Parameter) and not model.scale.is_meta
    assert model.scratch.is_meta  # non-persistent: not in the checkpoint, as with torch

    plain = SomeModule(1000)
    plain.load_state_dict(ref.state_dict() if fmt == "safetensors"
                          else torch.load(tmp_path / "m.pth"))
    x = torch.randn(4, 1000)
    assert torch.equal(model(x), plain(x))

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).square().sum().backward()
    opt.step()
    assert not torch.equal(model.head.weight, ref.head.weight)
    # The step wrote into this process's private copy only.
    assert torch.equal(client.state_dict("m")["head.weight"], ref.head.weight)


def test_tied_weights_stay_tied(daemon, client, tmp_path):
    torch.manual_seed(1)
    ref = Tied()
    checkpoint(daemon, tmp_path, ref.state_dict(), "torch")
    model = meta_module(Tied)
    weightsd.load_into(model, "m", client=client)
    assert model.head.weight is model.embed.weight
    assert torch.equal(model.embed.weight, ref.embed.weight)
    assert len(list(model.parameters())) == 1
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model.head(model.embed(torch.tensor([1, 2]))).sum().backward()
    opt.step()
    assert model.head.weight is model.embed.weight


def test_retie_after_native_assign():
    """What load_into does after torch >= 2.1's assign, which wraps every name separately."""
    w = torch.randn(10, 6)
    model = Tied()
    model.embed.weight = nn.Parameter(w)
    model.head.weight = nn.Parameter(w)
    assert model.head.weight is not model.embed.weight
    _torch._retie(model)
    assert model.head.weight is model.embed.weight


def test_requires_grad_and_kind_kept(daemon, client, tmp_path):
    ref = reference(8)
    checkpoint(daemon, tmp_path, ref.state_dict(), "safetensors")
    model = meta_module(SomeModule, 8)
    model.embed.weight.requires_grad_(False)
    weightsd.load_into(model, "m", client=client)
    assert not model.embed.weight.requires_grad and model.embed.bias.requires_grad
    assert isinstance(model.embed.weight, nn.Parameter)


def torch_error(module, sd, strict=True):
    """The RuntimeError text torch's own load_state_dict gives for `sd`."""
    with pytest.raises(RuntimeError) as e:
        module.load_state_dict(sd, strict=strict)
    return str(e.value)


def weightsd_error(client, module, strict=True):
    with pytest.raises(RuntimeError) as e:
        weightsd.load_into(module, "m", client=client, strict=strict)
    return str(e.value)


@pytest.mark.parametrize("case", ["missing", "unexpected", "shape", "all"])
def test_mismatch_messages_equal_torch(daemon, client, tmp_path, case):
    sd = dict(reference(8).state_dict())
    if case in ("missing", "all"):
        del sd["head.bias"], sd["blocks.0.weight"]
    if case in ("unexpected", "all"):
        sd["extra.weight"] = torch.ones(2)
        sd["blocks.5.bias"] = torch.ones(2)
        sd["norm.gamma"] = torch.ones(2)
    if case in ("shape", "all"):
        sd["head.weight"] = torch.ones(10, 7)
        sd["scale"] = torch.ones(9)
    checkpoint(daemon, tmp_path, sd, "safetensors")
    want = torch_error(SomeModule(8), sd)
    model = meta_module(SomeModule, 8)
    assert weightsd_error(client, model) == want
    assert all(p.is_meta for p in model.parameters())  # nothing assigned on failure


def test_non_strict_returns_torch_keys(daemon, client, tmp_path):
    sd = dict(reference(8).state_dict())
    del sd["head.bias"]
    sd["extra.weight"] = torch.ones(2)
    checkpoint(daemon, tmp_path, sd, "safetensors")
    want = SomeModule(8).load_state_dict(sd, strict=False)
    model = meta_module(SomeModule, 8)
    got = weightsd.load_into(model, "m", client=client, strict=False)
    assert got == want
    assert model.head.bias.is_meta and not model.head.weight.is_meta
    # Shape mismatches are errors even when not strict, as in torch.
    sd["head.weight"] = torch.ones(3)
    checkpoint(daemon, tmp_path, sd, "safetensors", "m2")
    want = torch_error(SomeModule(8), sd, strict=False)
    with pytest.raises(RuntimeError) as e:
        weightsd.load_into(meta_module(SomeModule, 8), "m2", client=client, strict=False)
    assert str(e.value) == want


def test_dtype_mismatch(daemon, client, tmp_path):
    sd = dict(reference(8).state_dict())
    sd["head.weight"] = sd["head.weight"].double()
    checkpoint(daemon, tmp_path, sd, "safetensors")
    model = meta_module(SomeModule, 8)
    msg = weightsd_error(client, model)
    # torch's copy_ would convert silently; an assign cannot, so it is an error worded like
    # torch's size mismatch.
    assert msg == ("Error(s) in loading state_dict for SomeModule:\n\tdtype mismatch for "
                   "head.weight: copying a param with dtype torch.float64 from checkpoint, the "
                   "dtype in current model is torch.float32.")
    assert model.head.weight.is_meta


def test_dtype_and_device_checks(daemon, client, tmp_path):
    checkpoint(daemon, tmp_path, reference(8).state_dict(), "safetensors")
    with pytest.raises(TypeError, match=r"tensor '[a-z.0-9]+' is torch.float32.*does not convert"):
        weightsd.load_into(meta_module(SomeModule, 8), "m", client=client, dtype=torch.bfloat16)
    model = meta_module(SomeModule, 8)
    weightsd.load_into(model, "m", client=client, dtype=torch.float32)
    assert not model.head.weight.is_meta
    with pytest.raises(weightsd.DeviceUnavailable, match="cuda:0"):
        weightsd.load_into(meta_module(SomeModule, 8), "m", client=client, device="cuda:0")


def test_prefix_and_default_client(daemon, tmp_path, monkeypatch):
    ref = reference(8)
    sd = {f"model.{k}": v for k, v in ref.state_dict().items()}
    sd["optimizer.lr"] = torch.tensor(0.1)
    checkpoint(daemon, tmp_path, sd, "safetensors")
    monkeypatch.setenv("WEIGHTSD_SOCKET", daemon.sock)
    model = meta_module(SomeModule, 8)
    weightsd.load_into(model, "m", prefix="model.")  # connects by itself
    x = torch.randn(2, 8)
    assert torch.equal(model(x), ref(x))
    assert daemon.leases("m") == 1  # the module's tensors keep the connection and lease
    with pytest.raises(ValueError, match="no tensor .* 'nothing.'"):
        weightsd.load_into(meta_module(SomeModule, 8), "m", prefix="nothing.")
    del model  # no reference cycles: the lease goes without a garbage collection
    assert daemon.wait_leases("m", 0) == 0


def test_meta_device():
    with weightsd.meta_device():
        a = torch.ones(3)
        b = torch.zeros(2, device="cpu")  # an explicit device wins, as with torch.device
        lin = nn.Linear(4, 4)
    assert a.is_meta and lin.weight.is_meta and b.device.type == "cpu"
    assert not torch.ones(1).is_meta  # and it ends with the block


def test_unexpected_keys_as_this_torch_reports_them(daemon, client, tmp_path):
    """Which odd keys count as unexpected changed in torch 2.4 (a dotted key needs a child
    module of that name; before, a parameter or buffer of that name also let it pass). The
    checks before the assign must report what the installed torch reports."""
    sd = dict(reference(8).state_dict())
    sd["blocks.0.weight.bad"] = torch.ones(2)  # dotted, under a parameter
    sd["scale.x"] = torch.ones(2)              # dotted, under a buffer
    sd["embed"] = torch.ones(2)                # a bare key naming a child module
    checkpoint(daemon, tmp_path, sd, "safetensors")
    want = SomeModule(8).load_state_dict(sd, strict=False)
    model = meta_module(SomeModule, 8)
    got = weightsd.load_into(model, "m", client=client, strict=False)
    assert sorted(got.unexpected_keys) == sorted(want.unexpected_keys)
    assert got.missing_keys == want.missing_keys == []
    assert _torch._DOTTED_NEEDS_CHILD == (want.unexpected_keys != [])


def test_native_branch_under_torch_2_1_assign_semantics(daemon, client, tmp_path, monkeypatch):
    """The torch >= 2.1 branch cannot run on this torch, so it runs here against a stand-in
    for torch 2.1 and 2.2's assign=True, following their _load_from_state_dict: a tensor put
    into a Parameter slot is wrapped as Parameter(t), requires_grad=True, unless it is a
    Parameter already. load_into must hand it Parameters that keep the module's
    requires_grad (frozen stays frozen; an integer Parameter cannot require grad at all),
    one per view, so tied names stay tied."""
    class WithCount(nn.Module):
        def __init__(self):
            super().__init__()
            self.tied = Tied()
            self.steps = nn.Parameter(torch.zeros(3, dtype=torch.int64), requires_grad=False)

    def assign_21(module, sd, strict=True, assign=False):
        assert assign
        for mname, mod in module.named_modules():
            pre = mname + "." if mname else ""
            for name in list(mod._parameters) + list(mod._buffers):
                if pre + name not in sd:
                    continue
                inp = sd[pre + name]
                if name in mod._parameters and not isinstance(inp, nn.Parameter):
                    inp = nn.Parameter(inp)  # 2.1/2.2: requires_grad=True
                setattr(mod, name, inp)
        return nn.modules.module._IncompatibleKeys([], [])

    torch.manual_seed(2)
    ref = WithCount()
    ref.steps.data.copy_(torch.tensor([4, 5, 6]))
    checkpoint(daemon, tmp_path, ref.state_dict(), "torch")
    model = meta_module(WithCount)
    model.tied.embed.weight.requires_grad_(False)
    monkeypatch.setattr(_torch, "HAS_ASSIGN", True)
    monkeypatch.setattr(nn.Module, "load_state_dict", assign_21)
    weightsd.load_into(model, "m", client=client)
    assert model.tied.head.weight is model.tied.embed.weight
    assert not model.tied.embed.weight.requires_grad
    assert isinstance(model.steps, nn.Parameter) and model.steps.tolist() == [4, 5, 6]
    assert torch.equal(model.tied.embed.weight, ref.tied.embed.weight)
