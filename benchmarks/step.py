"""Time the SAE training step as `fit` runs it, against the dense-FLOP bound.

    python benchmarks/step.py                 # every case; prints a table, writes JSON
    python benchmarks/step.py --cases gated-512x4096 --steps 5
    python benchmarks/step.py --cases selection --out benchmarks/results/step_selection.json

A step is what Lightning does per batch in `fit`: training_step (forward, every loss term,
metric updates), backward, gradient projection, Adam, decoder renormalisation. It runs
through a real `lightning.Trainer` over one fixed in-memory batch, so data loading is not
in the figure (benchmarks/data_path.py measures that separately). The machine's matmul rate
is measured in the same run at the case's own shape; the bound counts the matmuls a step
cannot avoid with dense maths, each 2*B*d_in*d_sae FLOPs: 7 for gated (encoder forward,
decoder and aux decoder forwards, four backward products), 5 for the baseline and for the
selection SAEs topk and batchtopk (encoder forward, decoder forward, two decoder backward
products, encoder weight gradient: what the same step costs with dense codes), whose sparse
path (saes/selection.py) runs only the encoder forward densely: their fraction of the bound
above 1 is the sparse speed-up over that dense step. Matryoshka BatchTopK adds one sparse
decode per nested level; JumpReLU is dense (plain autograd) against the same 5-matmul bound.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, IterableDataset

from gsae_pl import allocator
from gsae_pl.config import load_config
from gsae_pl.run.module import SAEModule

ROOT = Path(__file__).resolve().parents[1]
BOUND_MATMULS = {"gated": 7, "relu": 5, "topk": 5, "batchtopk": 5,
                 "matryoshka_batchtopk": 5, "jumprelu": 5}
# name: (architecture, d_in, d_sae, kernel, target L0 or None for the init's natural L0,
#        and optionally a tuple of config overrides)
CASES = {
    "relu-512x4096": ("relu", 512, 4096, "auto", None),
    "gated-512x4096": ("gated", 512, 4096, "dense", None),
    "gated-reference-512x4096": ("gated", 512, 4096, "reference", None),
    "relu-768x16384": ("relu", 768, 16384, "auto", None),
    "gated-768x16384": ("gated", 768, 16384, "dense", None),
    "gated-sparse-768x16384-L0_64": ("gated", 768, 16384, "sparse", 64),
}
# The sparse/dense crossover in L0 / d_sae (SPARSE_CROSSOVER in saes/gated.py).
CROSSOVER = {f"gated-{kernel}-768x16384-L0_{l0}": ("gated", 768, 16384, kernel, l0)
             for l0 in (256, 1024, 2048) for kernel in ("sparse", "dense")}
CASES.update(CROSSOVER)
# The selection SAEs as their ablations train them (no penalty, AuxK on; no latent is dead
# within the timed steps, so AuxK adds only its residual-variance sum), and once with every
# latent that missed the last batch counted dead (dead_tokens=1): AuxK's worst case.
SELECTION = {f"{arch}-768x16384-k{k}": (arch, 768, 16384, "auto", None, (
    f"sae.k={k}", "loss.sparsity.enabled=false", "loss.auxk.enabled=true"))
    for arch in ("topk", "batchtopk") for k in (32, 64)}
SELECTION["topk-768x16384-k32-all_dead_auxk"] = (
    "topk", 768, 16384, "auto", None, ("sae.k=32", "loss.sparsity.enabled=false",
                                       "loss.auxk.enabled=true", "loss.auxk.dead_tokens=1"))
SELECTION["matryoshka_batchtopk-768x16384-k32"] = (
    "matryoshka_batchtopk", 768, 16384, "auto", None, (
        "sae.k=32", "loss.sparsity.enabled=false", "loss.auxk.enabled=true",
        "loss.matryoshka.enabled=true"))
# JumpReLU runs plain autograd (dense codes): its fraction of the 5-matmul bound shows what
# its dense step costs (autograd adds a sixth product, the centring's b_dec gradient).
SELECTION["jumprelu-768x16384"] = ("jumprelu", 768, 16384, "auto", None, ())
CASES.update(SELECTION)
MAIN = [name for name in CASES if name not in CROSSOVER and name not in SELECTION]
GROUPS = {"crossover": list(CROSSOVER), "selection": list(SELECTION)}


class _Stream(IterableDataset):
    def __init__(self, make_iter):
        self.make_iter = make_iter

    def __iter__(self):
        return self.make_iter()


def batch_loader(make_iter) -> DataLoader:
    """A loader over the batches `make_iter()` yields (already batched, so batch_size=None)."""
    return DataLoader(_Stream(make_iter), batch_size=None)


def _sync() -> None:
    if torch.cuda.is_available():  # GPU work is asynchronous: wait before reading a clock
        torch.cuda.synchronize()


class _StepTimer(L.Callback):
    def __init__(self):
        self.times, self.l0 = [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        _sync()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        _sync()
        self.times.append(time.perf_counter() - self.start)
        self.l0.append(float(module.train_recon.active / module.train_recon.rows))
        module.train_recon.reset()


def matmul_rate(batch: int, d_in: int, d_sae: int, device: str, dtype=torch.float32,
                repeats: int = 3) -> float:
    """FLOP/s of the three matmul forms a step uses (NN, NT, TN), median of each, averaged."""
    x, W = torch.randn(batch, d_in, device=device, dtype=dtype), \
        torch.randn(d_in, d_sae, device=device, dtype=dtype)
    g = torch.randn(batch, d_sae, device=device, dtype=dtype)
    forms = [lambda: x @ W, lambda: g @ W.t(), lambda: x.t() @ g]
    seconds = []
    for form in forms:
        form()
        runs = []
        for _ in range(repeats):
            _sync()
            start = time.perf_counter()
            form()
            _sync()
            runs.append(time.perf_counter() - start)
        seconds.append(statistics.median(runs))
    return 2 * batch * d_in * d_sae / statistics.mean(seconds)


def make_module(arch: str, d_in: int, d_sae: int, kernel: str, batch: int,
                sample: torch.Tensor, compile_mode: str = "auto",
                overrides: tuple = ()) -> SAEModule:
    cfg = load_config(ROOT / "configs/base.yaml", [
        f"sae.architecture={arch}", f"sae.d_sae={d_sae}", f"sae.kernel={kernel}",
        f"sae.compile={compile_mode}", f"loss.aux.enabled={arch == 'gated'}",
        "optim.lr=3e-4", "optim.warmup_steps=1", f"data.batch_size={batch}",
        "data.source=synthetic", f"data.synthetic.d_in={d_in}", *overrides])
    module = SAEModule(OmegaConf.to_container(cfg), d_in)
    module.prepare_from_sample(sample)
    return module


def time_steps(module: SAEModule, loader, steps: int, warmup: int, accelerator: str = "cpu",
               precision: str = "32-true") -> _StepTimer:
    """Run `fit` on `loader` for warmup + steps steps; the timer holds each step's time."""
    timer = _StepTimer()
    trainer = L.Trainer(max_steps=warmup + steps, accelerator=accelerator, devices=1,
                        precision=precision, logger=False,
                        callbacks=[timer], enable_checkpointing=False, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=loader)
    return timer


def run_case(name: str, batch: int, steps: int, warmup: int, compile_mode: str,
             accelerator: str, precision: str) -> dict:
    arch, d_in, d_sae, kernel, target_l0, *overrides = CASES[name]
    torch.manual_seed(0)
    x = torch.randn(batch, d_in)  # Gaussian inputs, E||x||^2 = d_in as after normalisation
    module = make_module(arch, d_in, d_sae, kernel, batch, x, compile_mode,
                         overrides[0] if overrides else ())
    if target_l0:  # shut all but ~target_l0 gates: pre-activations are ~N(0, 1) here
        z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1 - target_l0 / d_sae))
        with torch.no_grad():
            module.sae.b_gate.fill_(-float(z))
    timer = time_steps(module, batch_loader(lambda: itertools.repeat(x)), steps, warmup,
                       accelerator, precision)
    step_s = statistics.median(timer.times[warmup:])
    device = str(module.device)
    rate = matmul_rate(batch, d_in, d_sae, device,
                       torch.bfloat16 if precision.startswith("bf16") else torch.float32)
    bound_s = BOUND_MATMULS[arch] * 2 * batch * d_in * d_sae / rate
    return {"case": name, "arch": arch, "d_in": d_in, "d_sae": d_sae, "kernel": kernel,
            "compile": compile_mode, "device": device, "precision": precision,
            "batch": batch, "ms_per_step": round(1e3 * step_s, 1),
            "tokens_per_s": round(batch / step_s), "l0": round(statistics.mean(timer.l0), 1),
            "matmul_gflops": round(rate / 1e9, 1), "dense_bound_ms": round(1e3 * bound_s, 1),
            "fraction_of_bound": round(bound_s / step_s, 3),
            "all_step_ms": [round(1e3 * t, 1) for t in timer.times]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(MAIN),
                        help="comma-separated case names; 'crossover' for the L0 sweep, "
                        "'selection' for the topk and batchtopk cases")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", default="auto", choices=["auto", "always", "never"])
    parser.add_argument("--accelerator", default="cpu", help="cpu | gpu")
    parser.add_argument("--precision", default="32-true", help="32-true | bf16-mixed")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/step.json"))
    args = parser.parse_args()
    allocator.configure()  # as every gsae_pl command does (gsae_pl/allocator.py)
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        parser.error("--accelerator gpu: this machine has no CUDA device; run it on one "
                     "(make bench-gpu)")
    results = []
    print(f"{'case':<32}{'ms/step':>10}{'tokens/s':>10}{'L0':>8}{'GFLOP/s':>9}"
          f"{'bound ms':>10}{'of bound':>9}")
    names = GROUPS.get(args.cases) or args.cases.split(",")
    for name in names:
        r = run_case(name, args.batch, args.steps, args.warmup, args.compile,
                     args.accelerator, args.precision)
        results.append(r)
        print(f"{name:<32}{r['ms_per_step']:>10}{r['tokens_per_s']:>10}{r['l0']:>8}"
              f"{r['matmul_gflops']:>9}{r['dense_bound_ms']:>10}{r['fraction_of_bound']:>9}",
              flush=True)
    meta = {"machine": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "threads": torch.get_num_threads(), "torch": torch.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
