"""gsae_pl: gated sparse autoencoders in PyTorch Lightning (see README.md)."""

from gsae_pl.load import load_sae

__all__ = ["load_sae"]
