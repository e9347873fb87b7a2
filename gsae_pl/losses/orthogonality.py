"""Orthogonality regulariser on decoder nearest neighbours (docs/method.md sec. 5, D. Till).

For each feature i active in the batch (fired on at least one row), with unit decoder
directions d_j = W_dec[j] / ||W_dec[j]||:

    c_ij    = |d_i . d_j|                       for every other feature j (i itself excluded)
    N(i)    = argmax_j c_ij                     all tied maxima (within TIE_TOLERANCE)
    P_i     = mean_{j in N(i)} s(c_ij)          (s: the penalty's shape, below)
    L_orth  = mean over active i of P_i

Penalty shapes (docs/method.md sec. 5 decisions), p = loss.orthogonality.exponent > 1:
  power  s(c) = c^p, p = 4 by default: ~0 for near-orthogonal neighbours (0.3^4 < 0.01),
         growing towards duplicates (|cos| = 1 costs 1), so it mostly separates
         near-duplicate features and leaves merely nearby ones alone.
  steep  s(c) = c^p / (1 - c + eps), eps = loss.orthogonality.eps: c^p where c is small
         (super-linear, like power), but growing without a plateau towards |cos| = 1, where it
         costs 1 / eps (100 by default) with slope ~1 / eps^2: a near-duplicate costs orders
         of magnitude more than a merely nearby neighbour.
The gradient moves both rows of a pair: the active feature's and its neighbour's, active or not.
The coefficient may be negative (the one loss term that allows it): the same term then
REWARDS aligned nearest neighbours, a probe of feature combinations (sec. 5); both shapes are
bounded (by 1 and 1 / eps), so the reward cannot run away.

Under DDP the active set is the global batch's: the per-feature fired counts are summed
over processes (one [d_sae] all_reduce, on every process every step, since it is a
collective), so every process holds the same penalty on the same (replicated) W_dec. DDP
averages gradients over W processes, and the mean of W identical gradients is that
gradient: no rescaling, and the 2-process run follows the 1-process one
(tests/run/test_ddp.py). Averaging per-process means over each shard's own active features
instead would be a different objective.

Cost: one [k, d_sae] product of the k active rows with all rows, O(k * d_sae * d_in); a
[d_sae, d_sae] Gram matrix is never formed (tests/losses/test_orthogonality.py checks shapes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor

from gsae_pl.errors import UserError
from gsae_pl.losses.base import LOSS_TERMS, TermConfig, TermSpec

TIE_TOLERANCE = 1e-6  # |cos| values this close to the maximum count as tied neighbours


def power(cos: Tensor, exponent: float, eps: float) -> Tensor:
    return cos.pow(exponent)


def steep(cos: Tensor, exponent: float, eps: float) -> Tensor:
    # 1 - cos floored at 0: a duplicate's |cos| may round to just above 1 (and the self
    # column, weighted 0, is 1); the denominator stays >= eps.
    return cos.pow(exponent) / ((1 - cos).clamp_min(0) + eps)


SHAPES = {"power": power, "steep": steep}


def nearest_neighbour_penalty(W_dec: Tensor, active: Tensor, exponent: float,
                              shape: str = "power", eps: float = 0.01) -> Tensor:
    """Mean over the `active` feature indices [k] of s(|cos to nearest other row|), s the
    `shape` (module docstring)."""
    d_sae = W_dec.shape[0]
    if active.numel() == 0 or d_sae < 2:
        return W_dec.sum() * 0.0  # a zero that still belongs to the graph
    directions = W_dec / W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos_KF = (directions[active] @ directions.t()).abs()  # [k, d_sae]: the only big product
    is_self_KF = torch.zeros_like(cos_KF, dtype=torch.bool)
    is_self_KF[torch.arange(active.numel(), device=active.device), active] = True
    with torch.no_grad():  # which neighbours are nearest: a selection, not differentiated
        candidates = cos_KF.masked_fill(is_self_KF, -1.0)
        nearest_max = candidates.max(dim=1, keepdim=True).values
        tied_KF = (candidates >= nearest_max - TIE_TOLERANCE) & ~is_self_KF
        weights_KF = tied_KF / tied_KF.sum(dim=1, keepdim=True)  # mean over ties
    per_feature = (weights_KF * SHAPES[shape](cos_KF, exponent, eps)).sum(dim=1)
    return per_feature.mean()


def global_fired(fired: Tensor) -> Tensor:
    """Per-feature fired counts over every process's rows (the local ones without DDP)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return fired
    # A float32 copy: `fired` is float or int by kernel path, and metrics still read it.
    counts = fired.detach().to(torch.float32, copy=True)
    dist.all_reduce(counts)  # every process, even one with no active feature of its own
    return counts


def orthogonality_loss(x, x_hat, enc, sae, exponent: float, shape: str, eps: float) -> Tensor:
    # `fired` exists on every kernel path
    active = torch.nonzero(global_fired(enc.fired) > 0).squeeze(1)
    return nearest_neighbour_penalty(sae.W_dec, active, exponent, shape, eps)


@dataclass
class OrthogonalityConfig(TermConfig):
    enabled: bool = False
    # Any sign (no range metadata): negative rewards aligned neighbours (module docstring).
    coefficient: float = 1.0
    exponent: float = 4.0  # p in the shape: |cos|^p to each active feature's nearest neighbour
    shape: str = field(default="power", metadata={"choices": tuple(SHAPES)})
    # steep only: s(c) = c^p / (1 - c + eps), so s(1) = 1 / eps
    eps: float = field(default=0.01, metadata={"range": "positive"})


def check(cfg) -> None:
    block = cfg.loss.orthogonality
    if not block.exponent > 1:
        raise UserError(f"loss.orthogonality.exponent={block.exponent} must be > 1: the penalty "
                        "|cos|^exponent is super-linear (docs/method.md sec. 5)")
    if not math.isfinite(block.coefficient):
        raise UserError(f"loss.orthogonality.coefficient={block.coefficient} must be a finite "
                        "number (negative rewards aligned neighbours)")


LOSS_TERMS.register("orthogonality")(TermSpec(
    config=OrthogonalityConfig,
    build=lambda block: partial(orthogonality_loss, exponent=block.exponent,
                                shape=block.shape, eps=block.eps),
    reads=("fired",), check=check))
