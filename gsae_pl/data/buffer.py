"""The shuffle buffer: activations of consecutive tokens are strongly correlated, so
batches are drawn from a pool of rows gathered from many windows (PAPER.md sec. 4: the
paper mixes 1e6 activations).

Memory is bounded: at most `capacity` rows are held, plus the chunk being added. When the
pool is full it is permuted, half of it leaves as batches, and fresh rows refill that half.
Rows therefore stay in the pool for a random number of rounds, mixing far more windows
than one refill holds.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor


def shuffled_batches(chunks: Iterator[Tensor], capacity: int, batch_size: int,
                     generator: torch.Generator) -> Iterator[Tensor]:
    """Endless [batch_size, d] batches from `chunks` ([n_i, d] row blocks), mixed."""
    capacity = max(int(capacity), 2 * batch_size)
    pool: list[Tensor] = []
    held = 0
    for chunk in chunks:
        pool.append(chunk)
        held += len(chunk)
        if held < capacity:
            continue
        rows = torch.cat(pool)
        rows = rows[torch.randperm(len(rows), generator=generator).to(rows.device)]
        n_out = max(batch_size, (len(rows) // 2) // batch_size * batch_size)
        yield from rows[:n_out].split(batch_size)
        pool, held = [rows[n_out:]], len(rows) - n_out
