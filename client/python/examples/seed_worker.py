#!/usr/bin/python3
"""The seed recipe through weightsd, as one worker process (for `make demo`).

    seed_worker.py --write-checkpoint PATH     torch.save a SomeModule(1000) state dict
    seed_worker.py SOCKET MODEL [--hold SECS]  connect, meta-construct, load_into, forward

The worker prints one line: load time, a checksum of a forward pass (equal across workers and
equal to a plain torch.load + load_state_dict of the same file), and the Rss/Pss of its mapping.
"""
import argparse
import time

import torch
from torch import nn


class SomeModule(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(n, n), nn.ReLU(), nn.Linear(n, n), nn.ReLU(),
                                    nn.Linear(n, 10))
        self.register_buffer("scale", torch.ones(n))

    def forward(self, x):
        return self.layers(x * self.scale)


def mapping_memory(model_name):
    """(Rss, Pss) in KiB of this process's mapping of the model's memfd."""
    rss = pss = 0
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            if "-" in line.split(" ", 1)[0]:
                inside = f"weightsd:{model_name}" in line
            elif inside and line.startswith("Rss:"):
                rss += int(line.split()[1])
            elif inside and line.startswith("Pss:"):
                pss += int(line.split()[1])
    return rss, pss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("socket", nargs="?")
    ap.add_argument("model", nargs="?")
    ap.add_argument("--hold", type=float, default=0)
    ap.add_argument("--write-checkpoint")
    args = ap.parse_args()
    if args.write_checkpoint:
        torch.manual_seed(0)
        torch.save(SomeModule(1000).state_dict(), args.write_checkpoint)
        return

    t0 = time.perf_counter()
    import weightsd
    client = weightsd.connect(args.socket)
    with weightsd.meta_device():
        model = SomeModule(1000)
    weightsd.load_into(model, args.model, client=client, strict=True)
    ms = (time.perf_counter() - t0) * 1000
    with torch.no_grad():
        out = model(torch.ones(1, 1000))
    rss, pss = mapping_memory(args.model)
    print(f"python worker: module ready in {ms:.1f} ms (after import torch), forward checksum "
          f"{out.double().sum().item():.6f}, mapping Rss {rss // 1024} MiB Pss {pss // 1024} MiB",
          flush=True)
    time.sleep(args.hold)


if __name__ == "__main__":
    main()
