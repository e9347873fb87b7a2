"""gsae_pl: gated sparse autoencoders in PyTorch Lightning (see README.md)."""

import os

# Ask PyTorch's CPU allocator for transparent huge pages on large tensors: a training step
# allocates several [batch, d_sae] buffers, and with 4 KiB pages their first-touch page
# faults cost more than the arithmetic (benchmarks/RESULTS.md). torch reads it at its first
# large allocation, so it is set here, before any; a value already in the environment wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from gsae_pl.load import load_sae  # noqa: E402

__all__ = ["load_sae"]
