"""The shuffle buffer: activations of consecutive tokens are strongly correlated, so
batches are drawn from a block of rows gathered from many windows (docs/method.md: the
paper mixes 1e6 activations).

The row stream is cut into consecutive blocks of `capacity` rows (rounded down to whole
batches). Each block is gathered whole, then handed out as batches in an order drawn by
the block's own generator. So batch k depends only on the block holding it and that
block's seed, and a resumed run rebuilds that one block (`chunks_from` starts the stream
at the block's first row) instead of replaying every step before it. Decision: a pool
refilled by halves, where rows stay a random number of rounds, mixes no better for a
batch (at the default a block spans ~1000 windows, so a batch of 1024 rows holds about
one row per window), but its content at step k depends on the whole history, so an exact
resume would replay every step before k: measured, 403 s for the first 2000 steps' rows
of the default source on 2 CPU cores shared with other jobs. With blocks, a resume at step
2000 of the default gave its first batch in 10.8 s, a fresh start in 8.8 s (same machine).

Memory is bounded: one preallocated block of `capacity` rows plus the chunk being added.
The first block's fill, before any batch, can take minutes of LM forward passes: it
reports its progress (gsae_pl/progress_lines.py); later fills show in training's own lines.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from gsae_pl.progress_lines import ProgressLines


def block_rows(capacity: int, batch_size: int) -> int:
    """Rows per block: `capacity` rounded down to whole batches, at least one batch."""
    return max(int(capacity) // batch_size, 1) * batch_size


def shuffled_batches(chunks_from: Callable[[int], Iterator[Tensor]], capacity: int,
                     batch_size: int, generator_of: Callable[[int], torch.Generator],
                     start_batch: int = 0) -> Iterator[Tensor]:
    """Endless [batch_size, d] batches, from batch `start_batch` on.

    `chunks_from(row)` gives the row stream ([n_i, d] blocks) from global row `row` on;
    `generator_of(block)` the generator that orders block `block`'s batches.
    """
    size = block_rows(capacity, batch_size)
    block, skip = divmod(int(start_batch), size // batch_size)
    pool: Tensor | None = None
    filled = 0
    first = ProgressLines("filling the shuffle buffer (data.buffer_size)", total=size,
                          unit="rows")
    for chunk in chunks_from(block * size):
        while len(chunk):
            if pool is None:
                pool = chunk.new_empty(size, chunk.shape[1])
            take = min(size - filled, len(chunk))
            pool[filled:filled + take] = chunk[:take]
            filled, chunk = filled + take, chunk[take:]
            if first is not None:
                first.update(take)
            if filled == size:
                if first is not None:
                    first.close()
                    first = None
                order = torch.randperm(size, generator=generator_of(block)).to(pool.device)
                # Indexing copies, so a batch outlives the block's slots being refilled.
                yield from (pool[idx] for idx in order.split(batch_size)[skip:])
                block, filled, skip = block + 1, 0, 0
