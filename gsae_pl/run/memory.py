"""How much memory a run needs, estimated before anything is allocated or written.

A width the machine cannot hold otherwise fails as an allocator traceback when the SAE is
built (d_sae=1e9), or at the first forward pass after the run directory exists (1e7).
The estimate counts what grows with the SAE and the batch:

- the SAE's parameters, in float32 (mixed precision keeps float32 master weights), times
  4: the weights, their gradients and Adam's two moments;
- the step's [rows, d_sae] float32 buffers: pre-activations, gate and magnitude paths,
  codes and their gradients. A 3-step CPU fit of a gated SAE peaked at about 9.5 such
  buffers over a small-width baseline (d_sae 65536 vs 262144, batch 512:
  1.93 vs 5.76 GB max RSS), so 10 are counted; evaluation uses the same batch size.

Left out: the LM of an LM source and the process's libraries (about 0.7 GB in that
measurement), so the estimate errs low and a run refused by it does not fit. Only the
device the run trains on is checked: a paper-scale GPU run is not held to the host's RAM.
"""

from __future__ import annotations

import os

import torch

from gsae_pl.errors import UserError
from gsae_pl.saes.base import ARCHITECTURES

FLOAT_BYTES = 4
STATE_COPIES = 4  # weights, gradients, Adam's exp_avg and exp_avg_sq
STEP_BUFFERS = 10  # [rows, d_sae] float32 tensors alive at the step's peak (measured: 9.5)


def parameter_count(sae_cfg, d_in: int) -> int:
    d_sae = int(sae_cfg.d_sae)
    # W_dec and the architecture's encoder matrices (W_enc, and an untied W_mag)
    matrices = 1 + ARCHITECTURES[sae_cfg.architecture].encoder_matrices(sae_cfg)
    return matrices * d_in * d_sae + 4 * d_sae + d_in  # biases, r_mag: at most 4 per feature


def estimate_bytes(cfg, d_in: int, world_size: int) -> tuple[int, int]:
    """(SAE state bytes, step buffer bytes) of one process."""
    state = STATE_COPIES * FLOAT_BYTES * parameter_count(cfg.sae, d_in)
    rows = -(-int(cfg.data.batch_size) // world_size)
    step = STEP_BUFFERS * FLOAT_BYTES * rows * int(cfg.sae.d_sae)
    return state, step


def available_bytes(device: torch.device) -> int | None:
    """Free memory on `device` now; None when it cannot be read."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def check_fits(cfg, d_in: int, device: torch.device, world_size: int,
               processes_here: int = 1) -> None:
    """Refuse a run whose estimate exceeds what `device` has free. `processes_here` is how
    many processes of the run share this memory (CPU DDP: each holds a copy)."""
    available = available_bytes(device)
    if available is None:
        return
    state, step = estimate_bytes(cfg, d_in, world_size)
    need = (state + step) * processes_here
    if need <= available:
        return
    rows = -(-int(cfg.data.batch_size) // world_size)
    each = f" per process x {processes_here}" if processes_here > 1 else ""
    raise UserError(
        f"this run needs about {_gb(need)} of {device.type.upper()} memory{each} (SAE weights, "
        f"gradients and Adam state {_gb(state)}; {STEP_BUFFERS} step buffers of [{rows}, "
        f"{int(cfg.sae.d_sae)}] floats {_gb(step)}) but {_gb(available)} is available: "
        "lower sae.d_sae or data.batch_size")


def _gb(n_bytes: float) -> str:
    gb = n_bytes / 1e9
    return f"{gb:,.0f} GB" if gb >= 100 else f"{gb:.3g} GB"


def check_run_fits(cfg, d_in: int, trainer) -> None:
    """`check_fits` for the device `trainer` will train on, before anything is allocated."""
    device = trainer.strategy.root_device
    if device.type == "cpu":
        # The launching process (local rank 0) checks for all of this host's processes;
        # the others would see memory their siblings already took.
        if os.environ.get("LOCAL_RANK", "0") == "0":
            check_fits(cfg, d_in, device, trainer.world_size,
                       processes_here=trainer.num_devices)
    elif device.type == "cuda" and _start_method(trainer) != "fork":
        # Reading free GPU memory initialises CUDA, which a forked DDP child cannot inherit.
        check_fits(cfg, d_in, device, trainer.world_size)


def _start_method(trainer) -> str | None:
    return getattr(getattr(trainer.strategy, "launcher", None), "_start_method", None)
