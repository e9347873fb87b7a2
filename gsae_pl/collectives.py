"""Sums and gathers over DDP processes that are the identity in a 1-process run.

Used by state every process must hold identically (BatchTopK's batch-level selection and
threshold, the per-feature tokens-since-fired counts AuxK reads): each is a function of the
global batch, so a DDP run keeps it equal on every process and equal to the 1-process run.
Every call is a collective: every process must make it, in the same order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_sum(t: Tensor) -> Tensor:
    """The sum of `t` over processes (a copy; `t` itself is left alone)."""
    if world_size() < 2:
        return t
    total = t.detach().clone()
    dist.all_reduce(total)
    return total


def all_gather_stack(t: Tensor) -> Tensor:
    """Every process's `t` stacked along a new dim 0 in rank order; `t` itself in a
    1-process run (as Lightning's `strategy.all_gather`, whose gather without gradients
    goes through torch's deprecated `torch.distributed.nn.functional.all_gather` and so
    prints a deprecation warning in every process: nothing here needs a gradient)."""
    if world_size() < 2:
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    return torch.stack(parts)


def all_gather_cat(t: Tensor) -> Tensor:
    """Every process's `t` (same shape everywhere), concatenated along dim 0 in rank order."""
    if world_size() < 2:
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    return torch.cat(parts)
