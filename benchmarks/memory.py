"""Resident memory over many steps, with gsae_pl's allocator settings and with glibc's.

    python benchmarks/memory.py               # gated 768 x 16384, sparse path, L0 ~64

gsae_pl/allocator.py keeps freed memory for reuse and never trims the heap. The risk is
creep: if allocation sizes vary from step to step, the heap might fragment and grow. The
sparse path is where they vary most (the gate's support changes size with each batch), so
this runs it on a fresh random batch every step and reads the resident set size
(/proc/self/statm) along the way, once as gsae_pl sets the allocator and once with
glibc's defaults (forced by setting GLIBC_TUNABLES, which allocator.py leaves alone).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"gsae_pl": {}, "glibc defaults": {"GLIBC_TUNABLES": "glibc.malloc.perturb=0"}}


def resident_mib() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20


def measure(steps: int, every: int, batch: int, d_in: int, d_sae: int, l0: int) -> dict:
    """Train `steps` sparse steps in this process; resident MiB every `every` steps, and
    the peak."""
    import torch
    from step import make_module

    from gsae_pl import allocator

    allocator.configure()  # a no-op where GLIBC_TUNABLES is set: the baseline child

    torch.manual_seed(0)
    module = make_module("gated", d_in, d_sae, "sparse", batch, torch.randn(batch, d_in))
    threshold = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1 - l0 / d_sae))
    with torch.no_grad():
        module.sae.b_gate.fill_(-float(threshold))
    adam = torch.optim.Adam(module.sae.parameters(), lr=3e-4, fused=True)
    resident = {}
    for step in range(1, steps + 1):
        x = torch.randn(batch, d_in) * module.norm_scale
        x_hat, enc = module.sae(x)
        terms = module.objective(x, x_hat, enc, module.sae, step)
        torch.stack(list(terms.values())).sum().backward()
        module.sae.remove_parallel_grad()
        adam.step()
        adam.zero_grad()
        module.sae.after_optimizer_step()
        if step % every == 0 or step == 1:
            resident[f"step {step}"] = resident_mib()
    resident["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10  # KiB -> MiB
    return resident


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--l0", type=int, default=64)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/memory.json"))
    args = parser.parse_args()
    shape = (args.steps, args.every, args.batch, args.d_in, args.d_sae, args.l0)
    if args.child:  # one setting, in a process of its own: glibc reads its settings at start
        print(json.dumps(measure(*shape)))
        return
    results = {}
    for name, env in SETTINGS.items():
        child = subprocess.run([sys.executable, __file__, "--child", *sys.argv[1:]],
                               env={**os.environ, **env}, capture_output=True, text=True,
                               check=True)
        results[name] = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"{name:<16}" + "  ".join(f"{k}: {v} MiB" for k, v in results[name].items()),
              flush=True)
    Path(args.out).write_text(json.dumps({"shape": dict(zip(
        ("steps", "every", "batch", "d_in", "d_sae", "l0"), shape)), "resident_mib": results},
        indent=2) + "\n")


if __name__ == "__main__":
    main()
