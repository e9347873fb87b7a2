"""The inner levels of the Matryoshka loss (docs/method.md sec. 1; arXiv 2503.17547):

    L_matryoshka = sum over inner prefix sizes m of ||x - (f[:, :m] @ W_dec[:m] + b_dec)||^2 / n

The outer level, the whole dictionary, is the reconstruction term. Each prefix decodes the
code with the latents from m on set to zero: on the fast path the sparse code's values are
masked (one sparse decode per level, touching only the active latents), on the reference
path the dense code is. A level's loss therefore reaches only the first m latents' decoder
rows and codes, and b_dec.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gsae_pl.errors import UserError
from gsae_pl.losses.base import LOSS_TERMS, TermConfig, TermSpec, squared_error
from gsae_pl.saes.kernels import SparseCodes, decode_codes


@dataclass
class MatryoshkaLossConfig(TermConfig):
    enabled: bool = False  # matryoshka_batchtopk only (which refuses to train without it)


def prefix(codes, width: int):
    """`codes` with every latent from `width` on set to zero (dense or SparseCodes)."""
    if isinstance(codes, SparseCodes):
        return SparseCodes(codes.pattern, codes.values * (codes.col < width))
    keep = torch.arange(codes.shape[1], device=codes.device) < width
    return codes * keep


def matryoshka_loss(x, x_hat, enc, sae) -> Tensor:
    levels = [squared_error(x, decode_codes(prefix(enc.f, m), sae.W_dec, sae.b_dec))
              for m in sae.inner_widths]
    return torch.stack(levels).sum()


def check(cfg) -> None:
    arch = cfg.sae.architecture
    if cfg.loss.matryoshka.enabled and arch != "matryoshka_batchtopk":
        raise UserError(f"loss.matryoshka needs nested prefixes, which sae.architecture={arch} "
                        "has not: set sae.architecture=matryoshka_batchtopk or "
                        "loss.matryoshka.enabled=false")


LOSS_TERMS.register("matryoshka")(TermSpec(config=MatryoshkaLossConfig,
                                           build=lambda block: matryoshka_loss,
                                           reads=("f",), check=check))
