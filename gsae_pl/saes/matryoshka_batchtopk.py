"""Matryoshka BatchTopK SAE (Bussmann et al. 2025, arXiv 2503.17547; docs/method.md sec. 1).

One BatchTopK code f (saes/batchtopk.py: training selection, inference threshold, export
as a JumpReLU); the dictionary's nested prefixes each reconstruct on their own:

    x_hat_m = f[:, :m] @ W_dec[:m] + b_dec        for m in m_1 < m_2 < ... < m_L = d_sae
    L       = sum_m ||x - x_hat_m||^2 / n

The outer level (m_L = d_sae) is the ordinary reconstruction term; the inner levels are the
`loss.matryoshka` term (losses/matryoshka.py), which the ablation switches on. So the first
m_1 latents must reconstruct x alone, the next ones refine it, and general features settle
early in the dictionary instead of being absorbed by more specific ones.

`sae.matryoshka_widths` lists the inner prefix sizes m_1 < ... < m_{L-1} (each < d_sae).
Decision where the paper leaves it to the user: [] (the default) means prefixes growing
4x up to the full dictionary, d_sae / 64, d_sae / 16, d_sae / 4 (those >= 1), like the
paper's 4x-spaced levels. The levels' losses are summed with equal weight (SAELens's
`matryoshka_batchtopk` does the same); the nested decoding costs one sparse decode per
level on the fast path (values beyond a prefix masked to zero, never a dense product).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gsae_pl.errors import UserError
from gsae_pl.saes.base import ARCHITECTURES
from gsae_pl.saes.batchtopk import BatchTopKConfig, BatchTopKSAE


@dataclass
class MatryoshkaConfig(BatchTopKConfig):
    # matryoshka_batchtopk only: inner prefix sizes, increasing, each < d_sae; []: 4x levels
    matryoshka_widths: list[int] = field(default_factory=list)


def nested_widths(widths, d_sae: int) -> tuple[int, ...]:
    """The inner prefix sizes a config asks for ([]: d_sae/64, d_sae/16, d_sae/4)."""
    if not widths:
        return tuple(w for w in dict.fromkeys(d_sae // 4 ** i for i in (3, 2, 1)) if w >= 1)
    return tuple(int(w) for w in widths)


@ARCHITECTURES.register("matryoshka_batchtopk")
class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    Config = MatryoshkaConfig

    def __init__(self, d_in: int, d_sae: int, unit_norm_decoder: bool = True,
                 kernel: str = "auto", **own):
        super().__init__(d_in, d_sae, unit_norm_decoder, kernel, **own)
        self.inner_widths = nested_widths(self.Config(**own).matryoshka_widths, d_sae)

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        widths, d_sae = list(cfg.sae.matryoshka_widths), cfg.sae.d_sae
        increasing = all(a < b for a, b in zip(widths, widths[1:]))
        if not increasing or any(not 0 < w < d_sae for w in widths):
            raise UserError(f"sae.matryoshka_widths={widths} must increase strictly, each "
                            f"between 1 and sae.d_sae - 1 = {d_sae - 1} (the full "
                            "dictionary is always the outer level): e.g. "
                            f"[{max(1, d_sae // 16)}, {max(2, d_sae // 4)}]")
        if not cfg.loss.matryoshka.enabled:
            raise UserError("sae.architecture=matryoshka_batchtopk without its nested losses "
                            "is plain batchtopk: set loss.matryoshka.enabled=true (or use "
                            "sae.architecture=batchtopk)")
