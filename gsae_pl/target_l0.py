"""Find the sparsity coefficient for a target L0: `python -m gsae_pl.target_l0 --config FILE
[FILE ...] [key=value ...] --target L0 [--steps 500] [--tries 6]`.

Short fits of the given config (in this process, into a temporary folder deleted at the
end) search `loss.sparsity.coefficient` in log space: from the config's own lambda, x or /
STEP until one fit lands above the target and one below, then bisection of log lambda
between the closest pair, until a fit is within TOLERANCE of the target or the tries are
spent. The L0 is each fit's held-out L0 (docs/method.md sec. 6). It prints the lambda whose
fit came closest, its L0, and a 4-point grid around it for a suite file.

Held-out L0 falls as lambda grows for every penalised architecture (gated, relu, prolu,
rescale_shift: an L1 coefficient; jumprelu: an L0 coefficient, on its own scale), which is
all the bisection needs. The selection SAEs (topk, batchtopk, matryoshka_batchtopk) have no
penalty: their L0 is `sae.k`, so nothing is trained.

Caveat: L0 drifts as training goes on, so a short fit's lambda is a starting point for the
full-length run, not its answer.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable

from gsae_pl.cli import ArgumentParser, add_config_arguments, parse_config_arguments, run_main
from gsae_pl.config import load_config
from gsae_pl.errors import UserError

KNOB = "loss.sparsity.coefficient"
STEP = 4.0        # lambda x or / this per try until the target is bracketed
TOLERANCE = 0.05  # stop once a fit's L0 is within 5% of the target
GRID_RATIO = 2.5  # neighbouring grid points x2.5 apart: 4 points span 16x in lambda
CAVEAT = ("caveat: L0 drifts with training length, so a full-length run may end elsewhere: "
          "treat this as a starting point and read the grid's L0s off a first run")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m gsae_pl.target_l0", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--target", type=float, required=True,
                        help="the held-out L0 (active features per token) wanted")
    parser.add_argument("--steps", type=int, default=500,
                        help="training steps of each short fit (default 500)")
    parser.add_argument("--tries", type=int, default=6,
                        help="short fits at most (default 6)")
    return parse_config_arguments(parser, argv)


def is_selection(architecture: str) -> bool:
    """Whether the architecture sets L0 by `sae.k` rather than by a penalty."""
    from gsae_pl.saes.base import ARCHITECTURES
    from gsae_pl.saes.selection import SelectionSAE

    return issubclass(ARCHITECTURES[architecture], SelectionSAE)


def search(measure: Callable[[float], float], start: float, target: float,
           tries: int) -> list[tuple[float, float]]:
    """The (lambda, L0) of each try. L0 falls as lambda grows: a try with L0 above the
    target asks for a larger lambda, one below for a smaller. Lambdas are rounded to 3
    significant digits, so the printed value is the one that was trained."""
    tried: list[tuple[float, float]] = []
    for _ in range(tries):
        lam = float(f"{next_lambda(tried, start, target):.3g}")
        tried.append((lam, measure(lam)))
        if abs(tried[-1][1] - target) <= TOLERANCE * target:
            break
    return tried


def next_lambda(tried: list[tuple[float, float]], start: float, target: float) -> float:
    dense = [lam for lam, l0 in tried if l0 > target]    # lambda too small
    sparse = [lam for lam, l0 in tried if l0 <= target]  # lambda too large (or on target)
    if not tried:
        return start
    if dense and sparse:  # bisect log lambda between the closest pair
        return math.sqrt(max(dense) * min(sparse))
    return max(dense) * STEP if dense else min(sparse) / STEP


def closest(tried: list[tuple[float, float]], target: float) -> tuple[float, float]:
    """The try whose L0 is nearest the target in ratio (an L0 of 0 counts as very far)."""
    return min(tried, key=lambda t: abs(math.log(max(t[1], 1e-6) / target)))


def bracket(tried, target) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """The closest tries on either side of the target, (denser, sparser); None if one side
    has none."""
    dense = [t for t in tried if t[1] > target]
    sparse = [t for t in tried if t[1] <= target]
    if not dense or not sparse:
        return None
    return max(dense), min(sparse)


def grid(lam: float) -> list[float]:
    """4 lambdas centred on `lam` in log space, GRID_RATIO apart, largest first (as the
    shipped suites list them), to 2 significant digits."""
    return [float(f"{lam * GRID_RATIO ** e:.2g}") for e in (1.5, 0.5, -0.5, -1.5)]


def k_grid(target: float, d_sae: int) -> list[int]:
    """The selection SAEs' counterpart: 4 k values around the target, at most d_sae."""
    ks = (min(d_sae, max(1, round(target * GRID_RATIO ** e))) for e in (-1.5, -0.5, 0.5, 1.5))
    return list(dict.fromkeys(ks))


def short_overrides(cfg, steps: int, out_dir: str) -> list[str]:
    """What makes the config a short, quiet fit into `out_dir` measuring held-out L0 once:
    one evaluation at the end, no LM splicing or probes (L0 does not need them), and only
    the resamples that fit into `steps` with their lr return (gsae_pl/config_checks.py)."""
    from gsae_pl.resample_schedule import resample_steps

    warmup = cfg.loss.sparsity.warmup_steps
    if warmup >= steps:
        raise UserError(f"--steps {steps} ends within loss.sparsity.warmup_steps={warmup}, "
                        "before lambda reaches its value: pass more --steps")
    fits = [s for s in resample_steps(cfg.resample)
            if s + cfg.resample.lr_return_steps <= steps]
    extra = [f"trainer.max_steps={steps}", f"eval.every_n_steps={steps}",
             f"checkpoint.every_n_steps={steps}", f"output.dir={out_dir}",
             "trainer.enable_progress_bar=false", "log.wandb=off",
             "eval.loss_recovered.enabled=false", "eval.probes.enabled=false",
             f"resample.max_resamples={max(len(fits), 1)}",
             f"resample.enabled={str(bool(fits)).lower()}"]
    if cfg.sae.architecture == "rescale_shift":  # stage 2 keeps its share of the run
        share = cfg.sae.rescale_shift_steps / cfg.trainer.max_steps
        extra.append(f"sae.rescale_shift_steps={max(1, round(share * steps))}")
    return extra


def held_out_l0(files: list[str], overrides: list[str], lam: float, name: str) -> float:
    """Train one short fit at lambda `lam`, its own output quiet; its held-out L0."""
    from gsae_pl.run.train import fit

    cfg = load_config(files, [*overrides, f"{KNOB}={lam!r}", f"output.name={name}"])
    logging.disable(logging.INFO)  # Lightning's "`Trainer.fit` stopped" and the like
    try:
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            return float(fit(cfg)["l0"])
    finally:
        logging.disable(logging.NOTSET)


def _selection(cfg, target: float) -> int:
    arch, k = cfg.sae.architecture, max(1, round(target))
    how = ("k per row, fewer on a row with under k positive pre-activations" if arch == "topk"
           else "k per row on average over each training batch, a learnt threshold at "
                "inference")
    print(f"sae.architecture={arch} sets its sparsity by sae.k: k IS the L0 ({how}); "
          "nothing to search")
    print(f"for a run:   sae.k={k}")
    print(f"for a suite: k: {{sae.k: {k_grid(target, cfg.sae.d_sae)}}}")
    return 0


def _main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # refuses a suite file, bad keys, ...
    if not math.isfinite(args.target) or args.target <= 0:
        raise UserError(f"--target {args.target:g} must be a positive L0 (active features per "
                        "token), e.g. --target 20")
    if args.target >= cfg.sae.d_sae:
        raise UserError(f"--target {args.target:g} is not below sae.d_sae={cfg.sae.d_sae}, "
                        "the most features a token can have")
    if args.steps < 1 or args.tries < 1:
        raise UserError("--steps and --tries must be >= 1")
    if is_selection(cfg.sae.architecture):
        return _selection(cfg, args.target)
    if not cfg.loss.sparsity.enabled:
        raise UserError("loss.sparsity.enabled=false: there is no sparsity coefficient to "
                        "search; enable it")
    start = float(cfg.loss.sparsity.coefficient)
    if start <= 0:
        raise UserError(f"{KNOB}={start:g}: start the search from a positive lambda")
    with tempfile.TemporaryDirectory(prefix="gsae_pl_target_l0_") as out_dir:
        overrides = [*args.overrides, *short_overrides(cfg, args.steps, out_dir)]
        load_config(args.config, overrides)  # the short config's own checks, before a fit
        print(f"searching {KNOB} for held-out L0 {args.target:g} ({cfg.sae.architecture}, "
              f"{args.steps} steps per fit, at most {args.tries} fits)", flush=True)

        names = (f"try{i}" for i in itertools.count())

        def measure(lam: float) -> float:
            began = time.perf_counter()
            l0 = held_out_l0(args.config, overrides, lam, next(names))
            print(f"  lambda {lam:g}: held-out L0 {l0:.4g} ({time.perf_counter() - began:.0f} s)",
                  flush=True)
            return l0

        tried = search(measure, start, args.target, args.tries)
    return _report(tried, args.target, args.steps)


def _report(tried, target: float, steps: int) -> int:
    lam, l0 = closest(tried, target)
    print(f"lambda {lam:g}: held-out L0 {l0:.4g} after {steps} steps (target {target:g})")
    found = bracket(tried, target)
    if found:
        (dense_lam, dense_l0), (sparse_lam, sparse_l0) = found
        print(f"bracket: lambda {dense_lam:g} (L0 {dense_l0:.4g}) .. {sparse_lam:g} "
              f"(L0 {sparse_l0:.4g})")
    else:
        print(f"not bracketed in {len(tried)} fits: every L0 was "
              f"{'above' if l0 > target else 'below'} the target; pass more --tries")
    print(f"for a run:   {KNOB}={lam:g}")
    print(f"for a suite: grids: {{my_grid: {grid(lam)}}}")
    print(CAVEAT)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: _main(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
