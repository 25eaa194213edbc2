#!/usr/bin/python3
"""Issue-4 benchmark: the seed recipe through weightsd against torch's own recipes, same run.

    /usr/bin/python3 tests/bench/bench_python.py [SIZE_MIB] [NTENSORS]
    env: SIZE_MIB (default 1024), NTENSORS (default 300), WORKERS (default 8), REPEAT (default 3),
         WSD_BUILD_DIR (default build/)

Writes a torch.save checkpoint of a BenchModule (NTENSORS/2 Linear layers, weight + bias) and
the same tensors as safetensors, starts weightsd on private sockets, preloads with weightsctl
(the .pth if the daemon reads torch files, else the .safetensors; the output says which). Each
figure is the median over REPEAT fresh processes of the time from "torch imported" to "module
ready" for:
  1. plain:    torch.load(path) + BenchModule() + load_state_dict(sd)
  2. mmap:     torch.load(path, mmap=True) + meta construction + load_state_dict(assign=True)
               (torch >= 2.1 only; a note otherwise)
  3. weightsd: import weightsd + connect + meta construction + load_into (open + assign)
plus the connect + open + state_dict part of 3 alone (weightsd imported before the clock).
Then WORKERS processes each hold a weightsd-loaded module with every page read, and their total
Pss (smaps_rollup) is compared to the checkpoint size, with and without the Pss of as many idle
torch processes (the baseline that any torch worker costs). Not run by ctest.
"""
import math
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tests", "harness"))
import wsdtest  # noqa: E402

PY = "/usr/bin/python3"

# The module, shared by the writer and the timed processes (exec'ed in each).
MODULE = textwrap.dedent("""\
    import torch
    from torch import nn

    class BenchModule(nn.Module):
        def __init__(self, width, layers):
            super().__init__()
            self.layers = nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))

        def forward(self, x):
            return self.layers(x)
    """)

RECIPES = {
    "plain": """
        sd = torch.load(PATH)
        model = BenchModule(WIDTH, LAYERS)
        model.load_state_dict(sd)
        """,
    "mmap": """
        sd = torch.load(PATH, mmap=True, weights_only=True)
        with torch.device("meta"):
            model = BenchModule(WIDTH, LAYERS)
        model.load_state_dict(sd, assign=True)
        """,
    "weightsd": """
        import weightsd
        with weightsd.meta_device():
            model = BenchModule(WIDTH, LAYERS)
        weightsd.load_into(model, "bench", client=weightsd.connect(SOCK))
        """,
    "weightsd-state_dict": """
        sd = weightsd.connect(SOCK).state_dict("bench")
        """,
}

# Set-up done before the clock starts, where a figure is meant to isolate one part.
PRE = {"weightsd-state_dict": "import weightsd"}

# A timed process: imports torch, then times the recipe; optionally reads every weight and holds
# until stdin closes, so that its memory can be measured.
TIMED = textwrap.dedent("""\
    import sys, time
    import torch
    {pre}
    t0 = time.perf_counter()
    {recipe}
    t1 = time.perf_counter()
    print((t1 - t0) * 1000, flush=True)
    if HOLD:
        if RECIPE != "idle":
            with torch.no_grad():
                for p in model.parameters():
                    p.sum()
        print("held", flush=True)
        sys.stdin.read()
    """)


def child_source(name, path, sock, width, layers, hold):
    recipe = textwrap.dedent(RECIPES.get(name, "pass")).strip()
    head = (f"PATH = {path!r}\nSOCK = {sock!r}\nWIDTH = {width}\nLAYERS = {layers}\n"
            f"HOLD = {hold}\nRECIPE = {name!r}\n")
    return head + MODULE + TIMED.format(recipe=recipe, pre=PRE.get(name, ""))


def env():
    e = dict(os.environ)
    # Let the package's bytecode be cached, as an installed package's is (pip compiles it, and
    # Debian ships torch compiled): otherwise every worker would recompile weightsd.
    e.pop("PYTHONDONTWRITEBYTECODE", None)
    e["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "client", "python"),
                                       e.get("PYTHONPATH", "")])
    e.setdefault("WEIGHTSD_LIBRARY", os.path.join(os.path.abspath(wsdtest.BUILD_DIR), "lib",
                                                  "libweightsd.so"))
    return e


def run_once(name, path, sock, width, layers):
    p = subprocess.run([PY, "-c", child_source(name, path, sock, width, layers, False)],
                       capture_output=True, text=True, env=env(), timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{p.stderr}")
    return float(p.stdout.split()[0])


def pss_kib(pid):
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise RuntimeError(f"no Pss for {pid}")


def hold_workers(name, n, path, sock, width, layers):
    """Starts n holding processes of recipe `name`; returns their total Pss in KiB."""
    procs = [subprocess.Popen([PY, "-c", child_source(name, path, sock, width, layers, True)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=env()) for _ in range(n)]
    try:
        for p in procs:
            p.stdout.readline()  # the time
            if p.stdout.readline().strip() != "held":
                raise RuntimeError(f"{name} worker failed")
        return sum(pss_kib(p.pid) for p in procs)
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(timeout=60)


def write_checkpoints(tmp, size_mib, ntensors):
    layers = max(1, ntensors // 2)
    width = max(1, int(math.sqrt(size_mib * (1 << 20) / 4 / layers)))
    code = MODULE + textwrap.dedent(f"""\
        import sys
        sys.path.insert(0, {os.path.join(ROOT, 'tests', 'harness')!r})
        import wsdtest
        torch.manual_seed(0)
        m = BenchModule({width}, {layers})
        sd = m.state_dict()
        torch.save(sd, {os.path.join(tmp, 'model.pth')!r})
        wsdtest.write_safetensors({os.path.join(tmp, 'model.safetensors')!r},
            [(k, "F32", list(v.shape), v.numpy().tobytes()) for k, v in sd.items()])
        """)
    subprocess.run([PY, "-c", code], check=True, env=env())
    return width, layers


def main():
    argv = sys.argv[1:]
    size_mib = int(os.environ.get("SIZE_MIB", argv[0] if argv else 1024))
    ntensors = int(os.environ.get("NTENSORS", argv[1] if len(argv) > 1 else 300))
    workers = int(os.environ.get("WORKERS", 8))
    repeat = int(os.environ.get("REPEAT", 3))
    import torch
    print(f"torch {torch.__version__}, python {sys.version.split()[0]}, {os.cpu_count()} CPUs")

    subprocess.run([PY, "-m", "compileall", "-q", os.path.join(ROOT, "client", "python")],
                   check=True, env=env())
    with tempfile.TemporaryDirectory(prefix="wsd-bench-py-") as tmp:
        width, layers = write_checkpoints(tmp, size_mib, ntensors)
        pth = os.path.join(tmp, "model.pth")
        nbytes = os.path.getsize(os.path.join(tmp, "model.safetensors"))
        print(f"checkpoint: BenchModule(width={width}, layers={layers}): {2 * layers} tensors, "
              f"{nbytes / (1 << 20):.1f} MiB; torch.save file {os.path.getsize(pth) >> 20} MiB")
        d = wsdtest.Daemon(tmp)
        try:
            served = pth
            p = d.ctl("preload", "bench", pth, "--json", check=False)
            if p.returncode != 0:
                print(f"note: preload of the .pth failed ({p.stderr.strip()}); "
                      "weightsd serves the .safetensors file with the same tensors")
                served = os.path.join(tmp, "model.safetensors")
                d.preload("bench", served)
            print(f"files: torch recipes read {os.path.basename(pth)}; weightsd serves "
                  f"{os.path.basename(served)}")

            results = {}
            for name in ("plain", "mmap", "weightsd", "weightsd-state_dict"):
                if name == "mmap" and "mmap" not in torch.load.__code__.co_varnames:
                    print(f"mmap recipe: skipped (torch {torch.__version__} has no "
                          "torch.load(mmap=True) / load_state_dict(assign=True); needs >= 2.1)")
                    continue
                times = [run_once(name, pth, d.sock, width, layers) for _ in range(repeat)]
                results[name] = statistics.median(times)
                print(f"{name:>20}: median {results[name]:9.2f} ms  "
                      f"(runs: {', '.join(f'{t:.2f}' for t in times)})")

            w = results["weightsd"]
            print(f"ratio plain / weightsd: {results['plain'] / w:8.1f}x  (target >= 20x)")
            if "mmap" in results:
                print(f"ratio mmap / weightsd:  {results['mmap'] / w:8.1f}x  (target >= 3x)")
            print(f"weightsd connect + open + state_dict of {2 * layers} tensors: "
                  f"{results['weightsd-state_dict']:.2f} ms (target < 5 ms); the whole "
                  f"recipe (import, meta construction, load_into): {w:.2f} ms")

            idle = hold_workers("idle", workers, pth, d.sock, width, layers)
            held = hold_workers("weightsd", workers, pth, d.sock, width, layers)
            size_kib = nbytes / 1024
            print(f"{workers} workers holding the module: total Pss {held / 1024:.1f} MiB = "
                  f"{held / size_kib:.2f} x checkpoint; {workers} idle torch processes: "
                  f"{idle / 1024:.1f} MiB; difference {(held - idle) / 1024:.1f} MiB = "
                  f"{(held - idle) / size_kib:.2f} x checkpoint (target <= 1.1 x); "
                  f"daemon Pss {pss_kib(d.pid) / 1024:.1f} MiB")
        finally:
            d.stop()


if __name__ == "__main__":
    main()
