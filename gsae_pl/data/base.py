"""The tiny protocol every activation source meets.

A source knows its width, yields training batches forever, and hands out a fixed set of
held-out rows that training never sees (docs/method.md sec. 6: evaluate on held-out tokens).
The DataModule owns batching across processes, normalisation and the loaders.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from torch import Tensor

from gsae_pl.errors import UserError


class ActivationSource(Protocol):
    d_in: int
    # Unit rows [n_features, d_in] when the ground truth is known (synthetic data), else None.
    true_features: Tensor | None

    def train_batches(self, batch_size: int, rank: int, world_size: int,
                      start_step: int = 0) -> Iterator[Tensor]:
        """Endless float32 [batch_size // world_size, d_in] batches for process `rank`.

        `batch_size` is the GLOBAL batch of one optimiser step. Global batch k depends only
        on (seed, k), exactly as in a 1-process run, and process `rank` gets its rows
        rank::world_size. So every process count sees the same rows at each step, and
        DDP's average of the per-process mean losses is the full batch's mean loss; and a
        run restarted at `start_step` sees the batches it would have seen.
        `batch_size` must be a multiple of `world_size` (`check_split` says so).
        """
        ...

    def eval_rows(self, n_rows: int) -> Tensor:
        """A fixed float32 [n_rows, d_in] held-out set, disjoint from the training rows."""
        ...

    def describe(self) -> dict:
        """What made these activations: logged and stored beside the run."""
        ...


def check_split(batch_size: int, rank: int, world_size: int) -> None:
    """The conditions `train_batches` places on its arguments, for every source."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if batch_size % world_size:
        raise UserError(f"data.batch_size={batch_size} is the global batch and must split "
                        f"evenly over {world_size} processes: use a multiple of {world_size}")
