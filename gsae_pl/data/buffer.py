"""The shuffle buffer: activations of consecutive tokens are strongly correlated, so
batches are drawn from a pool of rows gathered from many windows (PAPER.md sec. 4: the
paper mixes 1e6 activations).

Memory is bounded: one preallocated pool of `capacity` rows, plus the half that leaves
(copied out in one gather) and the chunk being added. When the pool is full, a random half
of its slots leaves as batches and fresh rows refill exactly those slots, so a row stays
for a random number of rounds and the pool mixes far more windows than one refill holds.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor


def shuffled_batches(chunks: Iterator[Tensor], capacity: int, batch_size: int,
                     generator: torch.Generator) -> Iterator[Tensor]:
    """Endless [batch_size, d] batches from `chunks` ([n_i, d] row blocks), mixed."""
    capacity = max(int(capacity), 2 * batch_size)
    n_out = capacity // 2 // batch_size * batch_size
    pool: Tensor | None = None
    free = torch.arange(capacity)  # slots waiting for rows
    for chunk in chunks:
        while len(chunk):
            if pool is None:
                pool = chunk.new_empty(capacity, chunk.shape[1])
                free = free.to(pool.device)
            take = min(len(free), len(chunk))
            pool[free[:take]] = chunk[:take]
            free, chunk = free[take:], chunk[take:]
            if len(free) == 0:
                free = torch.randperm(capacity, generator=generator)[:n_out].to(pool.device)
                yield from pool[free].split(batch_size)  # random slots, in random order
