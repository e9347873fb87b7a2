"""Dead-feature resampling (Bricken et al. 2023; PAPER.md sec. 4), a switch: `resample:`.

After steps every_n_steps * 1 .. max_resamples, every feature that fired on no training
row over the last window_steps steps is re-initialised from a training row that the SAE
reconstructs badly (Anthropic's recipe; the paper's appendix D uses it):
- rows of the current global batch are drawn with probability ~ (their squared error)^2;
  decision (PAPER.md is silent on the sample): the batch at the resample step, all ranks'
  rows, drawn without replacement while the batch has enough rows;
- the dead feature's decoder row := unit(x - b_dec); its encoder column(s) (W_enc, the
  gate for gated SAEs, and W_mag when untied) := that direction times encoder_scale times
  the mean norm of the alive columns of the same matrix; its per-feature biases (b_enc,
  b_gate, b_mag) and r_mag := 0; Adam's moments of every one of those entries := 0.
Then the lr drops to lr_drop x and returns to 1x on a cosine over lr_return_steps steps
(`lr_multiplier`, which SAEModule multiplies into its warm-up). Decision: the schedule is a
pure function of the step, so the drop happens at each scheduled resample even when no
feature was dead, and a resumed run follows it without saved state.
Parameters are addressed by their SAELens names, so relu, gated and prolu all work.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import Tensor

# Which axis of each parameter indexes features; parameters not named here (b_dec) stay.
FEATURE_AXIS = {"W_dec": 0, "W_enc": 1, "W_mag": 1, "b_enc": 0, "b_gate": 0, "b_mag": 0,
                "r_mag": 0}
ENCODER_COLUMNS = ("W_enc", "W_mag")  # set to the new direction, scaled like alive columns


def resample_steps(resample_cfg) -> list[int]:
    """The global steps after which a resample runs (none when resampling is off)."""
    if not resample_cfg.enabled:
        return []
    return [resample_cfg.every_n_steps * j for j in range(1, resample_cfg.max_resamples + 1)]


def lr_multiplier(step: int, resample_cfg) -> float:
    """Factor on the lr of optimiser step `step` (0-based: the one after `step` steps)."""
    since = [step - s for s in resample_steps(resample_cfg) if s <= step]
    if not since or min(since) >= resample_cfg.lr_return_steps:
        return 1.0
    progress = min(since) / resample_cfg.lr_return_steps  # in [0, 1)
    drop = resample_cfg.lr_drop
    return drop + (1.0 - drop) * 0.5 * (1.0 - math.cos(math.pi * progress))


def choose_rows(x: Tensor, x_hat: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """`n` row indices of x, drawn with probability ~ squared error squared (Anthropic)."""
    weights = (x - x_hat).pow(2).sum(1).double().pow(2).cpu()
    if not weights.sum() > 0:  # a perfect (or non-finite) reconstruction: uniform draw
        weights = torch.ones_like(weights)
    replace = n > int((weights > 0).sum())
    return torch.multinomial(weights, n, replacement=replace, generator=generator)


@torch.no_grad()
def resample_dead(sae, optimizer, dead: Tensor, x: Tensor, generator: torch.Generator,
                  encoder_scale: float) -> None:
    """Re-initialise the features where `dead` [d_sae] is True from rows of x [B, d_in]."""
    idx = torch.nonzero(dead).squeeze(1)
    if idx.numel() == 0:
        return
    x_hat, _ = sae(x)
    rows = choose_rows(x, x_hat, idx.numel(), generator).to(x.device)
    direction = x[rows] - sae.b_dec
    direction /= direction.norm(dim=1, keepdim=True).clamp_min(1e-12)  # [n_dead, d_in]
    for name, param in sae.named_parameters():
        axis = FEATURE_AXIS.get(name)
        if axis is None:
            continue
        if name == "W_dec":
            param[idx] = direction.to(param.dtype)
        elif name in ENCODER_COLUMNS:
            alive_norm = param[:, ~dead].norm(dim=0).mean() if (~dead).any() else 1.0
            param[:, idx] = (direction * encoder_scale * alive_norm).t().to(param.dtype)
        else:
            param[idx] = 0.0
        # Adam's moments (and any other per-entry state) of the new entries start afresh.
        for value in optimizer.state.get(param, {}).values():
            if torch.is_tensor(value) and value.shape == param.shape:
                value.index_fill_(axis, idx, 0.0)


def global_batch(gathered: Tensor, batch: Tensor) -> Tensor:
    """The rows of all ranks in the 1-process order: rank r holds global rows r, r + N, ...
    (data/base.py), so a DDP run draws the rows a 1-process run would."""
    if gathered.dim() == batch.dim():  # one process: all_gather is the identity
        return batch
    return gathered.transpose(0, 1).reshape(-1, batch.shape[-1])  # [N, B/N, d] -> [B, d]


class Resampler(L.Callback):
    """Counts firing over the window before each scheduled resample, then resamples."""

    def __init__(self, resample_cfg, d_sae: int, seed: int):
        self.cfg, self.seed = resample_cfg, seed
        self.steps = resample_steps(resample_cfg)
        self.fired = torch.zeros(d_sae, dtype=torch.long)  # rows fired on, this window

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # already counts this batch's optimiser step
        upcoming = next((s for s in self.steps if s >= step), None)
        if upcoming is None or upcoming - step >= self.cfg.window_steps:
            return
        fired = outputs["fired"]
        self.fired = self.fired.to(fired.device) + fired
        if step == upcoming:
            self.resample(trainer, pl_module, batch, step)

    def resample(self, trainer, pl_module, batch: Tensor, step: int) -> None:
        # Every rank sees the same counts and the same rows and seeds the same generator,
        # so the parameters stay identical across DDP processes (and runs are repeatable).
        fired = trainer.strategy.reduce(self.fired.clone(), reduce_op="sum")
        x = global_batch(trainer.strategy.all_gather(batch), batch)
        x = x.to(pl_module.device) * pl_module.norm_scale
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        dead = fired == 0
        resample_dead(pl_module.sae, trainer.optimizers[0], dead, x, generator,
                      self.cfg.encoder_scale)
        self.fired.zero_()
        if trainer.logger is not None and trainer.is_global_zero:
            trainer.logger.log_metrics({"resample/dead_fraction": float(dead.float().mean())},
                                       max(0, step - 1))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        # Each process counted only its own rows, and only process 0's state is written:
        # save the sum over processes, so a resumed run of any process count knows which
        # features fired anywhere. Only `fired == 0` is ever read, so counting the saved
        # part again at the next resample's reduction changes nothing.
        self.fired = trainer.strategy.reduce(self.fired, reduce_op="sum")
        checkpoint["callbacks"][self.state_key] = self.state_dict()

    def state_dict(self) -> dict:
        return {"fired": self.fired.cpu()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.fired = state_dict["fired"].clone()
