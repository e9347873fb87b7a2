"""Dead-feature resampling (Bricken et al. 2023; docs/method.md sec. 4), a switch: `resample:`.

After steps every_n_steps * 1 .. max_resamples, every feature that fired on no training
row over the last window_steps steps is re-initialised from a training row that the SAE
reconstructs badly (Anthropic's recipe; the paper's appendix D uses it):
- candidate rows: all ranks' rows of the window's last steps, enough for 2 x d_sae rows
  (never more than the window), as Anthropic draws from a large sample; each is drawn with
  probability ~ (its squared error)^2 under the SAE at the resample, without replacement
  and each distinct row once, so no two features share a direction (they would get equal
  gradients and stay duplicates). Decision: with fewer distinct rows than dead features,
  only that many are revived; the rest stay dead until the next resample, since perturbed
  copies of one row would start as near-duplicates;
- the dead feature's decoder row := unit(x - b_dec); its encoder column(s) (W_enc, the
  gate for gated SAEs, and W_mag when untied) := that direction times encoder_scale times
  the mean norm of the alive columns of the same matrix; its per-feature biases (b_enc,
  b_gate, b_mag) and r_mag := 0, a JumpReLU threshold := its initial value; Adam's moments
  of every one of those entries := 0.
The rows are drawn at the end of the resample step and used at the start of the next
batch, so the validation and the checkpoint Lightning runs in between see the weights
training produced (the checkpoint carries the drawn rows; a resumed run revives from them).
Then the lr drops to lr_drop x and returns to 1x on a cosine over lr_return_steps steps
(`lr_multiplier`, which SAEModule multiplies into its warm-up). Decision: the schedule is a
pure function of the step, so the drop happens at each scheduled resample even when no
feature was dead, and a resumed run follows it without saved state.
Which parameters hold features, and how each is re-initialised, every architecture declares
(`resample_roles`, gsae_pl/saes/base.py); parameters it does not name (b_dec) stay.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import Tensor

from gsae_pl.collectives import all_gather_stack
from gsae_pl.data.outliers import outlier_rows
from gsae_pl.resample_schedule import resample_steps
from gsae_pl.run.progress import announce, tokens

# The axis that indexes features, by a parameter's resample role (SAE.resample_roles).
ROLE_AXIS = {"direction": 0, "encoder": 1, "zero": 0, "init": 0}
POOL_ROWS_PER_FEATURE = 2  # the draw's pool holds this many rows per feature (Resampler)


def feature_axes(sae) -> dict[str, int]:
    """Parameter name -> the axis that indexes features, for the parameters a resample
    re-initialises."""
    return {name: ROLE_AXIS[role] for name, role in sae.resample_roles.items()}


def choose_rows(x: Tensor, x_hat: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """Up to `n` indices of DISTINCT rows of x, drawn without replacement with probability
    ~ squared error squared (Anthropic).

    Two features given one direction get identical gradients from every term and stay
    duplicates for good, so a row is a candidate once (the copies of a repeated row pool
    their weight) and fewer than `n` come back when fewer distinct rows exist.
    """
    weights = (x - x_hat).pow(2).sum(1).double().pow(2).cpu()
    if not weights.sum() > 0:  # a perfect (or non-finite) reconstruction: uniform draw
        weights = torch.ones_like(weights)
    first, copy_of = _distinct_rows(x)
    weights = torch.zeros(len(first), dtype=weights.dtype).index_add_(0, copy_of, weights)
    n = min(n, int((weights > 0).sum()))
    if n == 0:  # multinomial refuses to draw nothing
        return first[:0]
    return first[torch.multinomial(weights, n, replacement=False, generator=generator)]


def _distinct_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """(index of the first copy of each distinct row of x, in order of appearance; for each
    row, the position of its distinct row in that list). Without repeats: (arange, arange),
    so the draw is the one a plain weighted draw over x makes."""
    _, inverse = torch.unique(x, dim=0, return_inverse=True)
    inverse = inverse.cpu()
    positions = torch.arange(len(x))
    first = torch.full((int(inverse.max()) + 1,), len(x)).scatter_reduce_(0, inverse, positions,
                                                                          "amin")
    order = first.argsort()
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(len(order)))
    return first[order], rank[inverse]


@torch.no_grad()
def draw_rows(sae, n: int, pool: Tensor, generator: torch.Generator,
              chunk_rows: int | None = None) -> Tensor:
    """Up to `n` distinct rows of `pool` [N, d_in] for dead features, weighted by how badly
    the SAE reconstructs them now; the forward runs `chunk_rows` rows at a time."""
    if n == 0:
        return pool[:0]
    x_hat = torch.cat([sae(chunk)[0] for chunk in pool.split(chunk_rows or len(pool))])
    return pool[choose_rows(pool, x_hat, n, generator).to(pool.device)]


@torch.no_grad()
def revive(sae, optimizer, dead: Tensor, rows: Tensor, encoder_scale: float) -> None:
    """Re-initialise the first len(rows) features where `dead` [d_sae] is True, one from each
    row of `rows` [k, d_in]; the other dead features wait for the next resample."""
    idx = torch.nonzero(dead).squeeze(1)[:len(rows)].to(rows.device)
    if idx.numel() == 0:
        return
    direction = rows - sae.b_dec
    direction /= direction.norm(dim=1, keepdim=True).clamp_min(1e-12)  # [k, d_in]
    for name, param in sae.named_parameters():
        role = sae.resample_roles.get(name)
        if role is None:
            continue
        axis = ROLE_AXIS[role]
        if role == "direction":
            param[idx] = direction.to(param.dtype)
        elif role == "encoder":
            alive = ~dead.to(param.device)
            alive_norm = param[:, alive].norm(dim=0).mean() if alive.any() else 1.0
            param[:, idx] = (direction * encoder_scale * alive_norm).t().to(param.dtype)
        elif role == "init":  # e.g. a JumpReLU threshold: 0 would open the feature wide
            param[idx] = sae.initial_entry(name)
        else:
            param[idx] = 0.0
        # Adam's moments (and any other per-entry state) of the new entries start afresh.
        for value in optimizer.state.get(param, {}).values():
            if torch.is_tensor(value) and value.shape == param.shape:
                value.index_fill_(axis, idx, 0.0)


def resample_dead(sae, optimizer, dead: Tensor, x: Tensor, generator: torch.Generator,
                  encoder_scale: float) -> int:
    """Draw rows of x for the features where `dead` is True and revive them at once;
    returns how many were revived (at most the number of distinct rows of x)."""
    rows = draw_rows(sae, int(dead.sum()), x, generator)
    revive(sae, optimizer, dead, rows, encoder_scale)
    return len(rows)


def global_batch(gathered: Tensor, batch: Tensor) -> Tensor:
    """The rows of all ranks in the 1-process order: rank r holds global rows r, r + N, ...
    (data/base.py), so a DDP run draws the rows a 1-process run would."""
    if gathered.dim() == batch.dim():  # one process: all_gather is the identity
        return batch
    return gathered.transpose(0, 1).reshape(-1, batch.shape[-1])  # [N, B/N, d] -> [B, d]


class Resampler(L.Callback):
    """Counts firing over the window before each scheduled resample and pools the rows of
    its last steps; at the resample step it draws the rows, and revives the dead features
    with them at the start of the next batch (so a held-out evaluation at that step measures
    the weights training produced, not freshly re-initialised features)."""

    def __init__(self, resample_cfg, d_sae: int, seed: int):
        self.cfg, self.d_sae, self.seed = resample_cfg, d_sae, seed
        self.steps = resample_steps(resample_cfg)
        self.fired = torch.zeros(d_sae, dtype=torch.long)  # rows fired on, this window
        self.pool: list[Tensor] = []  # global batches (raw) of the window's last steps
        self.pending: dict | None = None  # {"dead", "rows"}: drawn, not yet revived

    def pool_steps(self, rows_per_step: int) -> int:
        """Steps whose rows the draw chooses from. Decision: enough rows for 2 x d_sae, so
        even with every feature dead the draw still prefers badly reconstructed rows; the
        pool then takes the memory of two decoders. Never more than the window."""
        return min(self.cfg.window_steps, math.ceil(POOL_ROWS_PER_FEATURE * self.d_sae
                                                    / rows_per_step))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # The resample drawn at the end of the previous batch: Lightning ran that step's
        # validation and checkpoint in between, so both hold the weights before it.
        if self.pending is not None:
            revive(pl_module.sae, trainer.optimizers[0], self.pending["dead"],
                   self.pending["rows"].to(pl_module.device), self.cfg.encoder_scale)
            self.pending = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # already counts this batch's optimiser step
        upcoming = next((s for s in self.steps if s >= step), None)
        if upcoming is None or upcoming - step >= self.cfg.window_steps:
            return
        fired = outputs["fired"]
        self.fired = self.fired.to(fired.device) + fired
        rows_per_step = batch.shape[0] * trainer.world_size
        if upcoming - step < self.pool_steps(rows_per_step):
            # Every rank keeps every rank's rows, so all draw the same (DDP stays in step).
            self.pool.append(global_batch(all_gather_stack(batch), batch))
        if step == upcoming:
            self.draw(trainer, pl_module, step, rows_per_step)

    def draw(self, trainer, pl_module, step: int, rows_per_step: int) -> None:
        # Every rank sees the same counts and the same pool and seeds the same generator,
        # so the parameters stay identical across DDP processes (and runs are repeatable).
        fired = trainer.strategy.reduce(self.fired.clone(), reduce_op="sum")
        pool = torch.cat([rows.to(pl_module.device) for rows in self.pool])  # some restored
        limit = getattr(pl_module, "outlier_norm", math.inf)  # raw scale; inf: none
        if math.isfinite(limit):  # outliers left out of the run (data/outliers.py)
            pool = pool[~outlier_rows(pool, limit)]
        pool = pool * pl_module.norm_scale
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        dead = fired == 0
        rows = draw_rows(pl_module.sae, int(dead.sum()), pool, generator, rows_per_step)
        self.pending = {"dead": dead, "rows": rows}
        self.fired.zero_()
        self.pool = []
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({"resample/dead_fraction": float(dead.float().mean()),
                                    "resample/revived_fraction": len(rows) / len(dead)},
                                   max(0, step - 1))
        window = tokens(self.cfg.window_steps * rows_per_step)
        announce(trainer, f"resample at step {step}: {int(dead.sum())} of {len(dead)} features "
                          f"dead (fired on none of the last {window} training tokens), "
                          f"{len(rows)} revived")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        # Each process counted only its own rows, and only process 0's state is written:
        # save the sum over processes, so a resumed run of any process count knows which
        # features fired anywhere. Only `fired == 0` is ever read, so counting the saved
        # part again at the next resample's reduction changes nothing. The pool and a
        # pending draw are the same on every process already.
        self.fired = trainer.strategy.reduce(self.fired, reduce_op="sum")
        checkpoint["callbacks"][self.state_key] = self.state_dict()

    def state_dict(self) -> dict:
        # A checkpoint can fall inside the pool's steps or between a draw and its revival
        # (checkpoints are written after on_train_batch_end): both travel, so resume is exact.
        pending = None if self.pending is None else {k: v.cpu() for k, v in
                                                     self.pending.items()}
        return {"fired": self.fired.cpu(), "pool": [rows.cpu() for rows in self.pool],
                "pending": pending}

    def load_state_dict(self, state_dict: dict) -> None:
        self.fired = state_dict["fired"].clone()
        self.pool = [rows.clone() for rows in state_dict.get("pool", [])]  # older: no pool
        pending = state_dict.get("pending")
        self.pending = None if pending is None else {k: v.clone() for k, v in pending.items()}
