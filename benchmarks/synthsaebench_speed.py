"""SynthSAEBench-16k on the fly: rows made per second against an SAE step of width 4096.

    python benchmarks/synthsaebench_speed.py   # writes benchmarks/results/synthsaebench_speed.json

Generation: the preset configs/data/synthsaebench_16k.yaml's source (16,384 features, d 768)
making global batches of 1024 rows (`sample`, the training stream's work), median of
`--batches` after two warm-ups. The dictionary's orthogonalisation does not change what a
row costs, so the source is built with orthogonalize_steps=0 and one orthogonalisation step
of the 16384 x 768 dictionary is timed on its own (the preset takes 100). The step: a
width-4096 SAE on d_in 768, batch 1024, as `fit` runs it (benchmarks/step.py's machinery),
for BatchTopK (k 25, the protocol's L0) and the gated SAE.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step import batch_loader, make_module, time_steps  # noqa: E402

from gsae_pl.config import load_config  # noqa: E402
from gsae_pl.data.synthsaebench import SynthSAEBenchSource, orthogonalize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = {"batchtopk-768x4096-k25": ("batchtopk", ("sae.k=25", "loss.sparsity.enabled=false")),
         "gated-768x4096": ("gated", ())}


def generation(batch: int, batches: int) -> dict:
    cfg = load_config(ROOT / "configs/data/synthsaebench_16k.yaml",
                      ["data.synthsaebench.orthogonalize_steps=0"])
    start = time.perf_counter()
    src = SynthSAEBenchSource(cfg.data.synthsaebench)
    built = time.perf_counter() - start
    times, l0 = [], []
    for k in range(batches + 2):
        start = time.perf_counter()
        _, (rows, _, _) = src.sample(batch, src.generator("train", k))
        times.append(time.perf_counter() - start)
        l0.append(len(rows) / batch)
    start = time.perf_counter()
    orthogonalize(src.model.W, steps=1, lr=3e-4)
    ortho = time.perf_counter() - start
    ms = statistics.median(times[2:]) * 1e3
    return {"batch": batch, "ms_per_batch": round(ms, 1), "rows_per_s": round(batch / ms * 1e3),
            "true_l0": round(statistics.mean(l0), 2), "build_s_without_orthogonalisation":
            round(built, 1), "one_orthogonalisation_step_s": round(ortho, 1),
            "all_batch_ms": [round(t * 1e3, 1) for t in times]}


def step(name: str, batch: int, steps: int) -> dict:
    arch, overrides = STEPS[name]
    torch.manual_seed(0)
    x = torch.randn(batch, 768)
    module = make_module(arch, 768, 4096, "auto", batch, x, "auto", overrides)
    timer = time_steps(module, batch_loader(lambda: itertools.repeat(x)), steps, 2)
    ms = statistics.median(timer.times[2:]) * 1e3
    return {"case": name, "ms_per_step": round(ms, 1), "rows_per_s": round(batch / ms * 1e3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/synthsaebench_speed.json"))
    args = parser.parse_args()
    result = {"machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "generation": generation(args.batch, args.batches),
              "steps": [step(name, args.batch, args.steps) for name in STEPS]}
    print(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
