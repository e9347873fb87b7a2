"""The tiny protocol every activation source meets (STYLE.md point 4).

A source knows its width, yields training batches forever, and hands out a fixed set of
held-out rows that training never sees (PAPER.md sec. 6: evaluate on held-out tokens).
The DataModule owns batching across processes, normalisation and the loaders.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from torch import Tensor


class ActivationSource(Protocol):
    d_in: int
    # Unit rows [n_features, d_in] when the ground truth is known (synthetic data), else None.
    true_features: Tensor | None

    def train_batches(self, batch_size: int, rank: int, world_size: int,
                      start_step: int = 0) -> Iterator[Tensor]:
        """Endless float32 [batch_size, d_in] batches for process `rank` of `world_size`.

        Processes see disjoint rows; batch k of a process depends only on (seed, k, rank),
        so a run restarted at `start_step` sees the batches it would have seen.
        """
        ...

    def eval_rows(self, n_rows: int) -> Tensor:
        """A fixed float32 [n_rows, d_in] held-out set, disjoint from the training rows."""
        ...

    def describe(self) -> dict:
        """What made these activations: logged and stored beside the run."""
        ...
