"""gsae_pl: gated sparse autoencoders in PyTorch Lightning (see README.md)."""

from gsae_pl import allocator

# Before torch's first large allocation: see gsae_pl/allocator.py.
allocator.configure()

from gsae_pl.load import load_sae  # noqa: E402

__all__ = ["load_sae"]
