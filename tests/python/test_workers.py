"""Several worker processes on one model: shared bytes, private writes, leases that follow the
processes (SIGKILL included)."""
import signal

import torch

from conftest import Worker, sample, write_st

# A worker: "load" opens the model with load_into on a meta module, "write" scribbles on its
# weights, "sum" reports what it sees, "pss" its proportional memory for the mapping.
WORKER = """
    from torch import nn
    client = weightsd.connect(SOCK)
    model = None
    for cmd in commands():
        if cmd[0] == "load":
            with weightsd.meta_device():
                model = nn.Linear(256, 128)
            weightsd.load_into(model, "m", client=client)
            reply("loaded", model.weight.is_meta)
        elif cmd[0] == "write":
            with torch.no_grad():
                model.weight.fill_(42.0)
            reply("wrote")
        elif cmd[0] == "sum":
            reply(repr(model.weight.double().sum().item()), repr(model.bias.double().sum().item()))
"""


def test_workers_share_and_write_privately(daemon, tmp_path):
    torch.manual_seed(0)
    ref = torch.nn.Linear(256, 128)
    write_st(tmp_path / "m.safetensors", ref.state_dict())
    daemon.preload("m", tmp_path / "m.safetensors")
    want = [repr(ref.weight.double().sum().item()), repr(ref.bias.double().sum().item())]

    workers = [Worker(daemon.sock, WORKER) for _ in range(4)]
    try:
        for w in workers:  # all start together; each answers once it holds its lease
            w.proc.stdin.write("load\n")
            w.proc.stdin.flush()
        for w in workers:
            assert w.read() == ["loaded", "False"]
        assert daemon.leases("m") == 4

        assert workers[0].ask("write") == ["wrote"]
        assert workers[0].ask("sum") == [repr(42.0 * 256 * 128), want[1]]
        for w in workers[1:]:
            assert w.ask("sum") == want  # the write stayed in worker 0's private pages

        workers[1].proc.send_signal(signal.SIGKILL)
        workers[1].proc.wait(timeout=10)
        assert daemon.wait_leases("m", 3) == 3
        for w in workers[2:]:
            assert w.ask("sum") == want
    finally:
        results = [w.finish() for w in workers]
    for i, (rc, err) in enumerate(results):
        assert rc == (-signal.SIGKILL if i == 1 else 0), err
    assert daemon.wait_leases("m", 0) == 0
    assert daemon.alive()


def test_clean_exit_releases_lease(daemon, tmp_path):
    """A worker that reads a state dict and exits cleanly gives its lease back on exit."""
    write_st(tmp_path / "m.safetensors", {"w": sample(torch.float32, (10,))})
    daemon.preload("m", tmp_path / "m.safetensors")
    script = """
        sd = weightsd.connect(SOCK).state_dict("m")
        for cmd in commands():
            reply(repr(sd["w"].sum().item()))
    """
    ws = [Worker(daemon.sock, script) for _ in range(3)]
    sums = {w.ask("sum")[0] for w in ws}
    assert len(sums) == 1 and daemon.leases("m") == 3
    for w in ws:
        assert w.finish()[0] == 0
    assert daemon.wait_leases("m", 0) == 0
