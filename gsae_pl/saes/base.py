"""What every SAE architecture shares: the decoder, its unit-norm constraint, the encoding.

Parameter names and shapes follow docs/method.md sec. 1 (the SAELens convention):
W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_dec [d_in], per-feature vectors [d_sae].
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from gsae_pl.saes.kernels import SparseCodes, decode_codes

Codes = Union[Tensor, SparseCodes]


class Encoding(NamedTuple):
    """The intermediates of one encoder pass, so no loss term recomputes a matmul.

    f         feature activations the decoder reads (f_tilde for the gated SAE)
    gate_acts what the sparsity penalty and the aux term see: ReLU(pi_gate) for gated
              (eq. 8), f itself for the baseline
    fired     per feature, the number of rows of the batch where f != 0 (for L0 and density)
    pi_gate   gate pre-activation (the baseline's only pre-activation)
    pi_mag    magnitude pre-activation (gated only)
    f and gate_acts are dense [B, d_sae] or, on the sparse path, `SparseCodes` sharing the
    gate's support. pi_gate and pi_mag are materialised by the reference path only: the
    fast paths keep them inside their backward (saes/kernels.py), as no loss term reads them.
    """

    f: Codes
    gate_acts: Codes
    fired: Tensor
    pi_gate: Optional[Tensor] = None
    pi_mag: Optional[Tensor] = None


class SAE(nn.Module):
    """Decoder half and constraints; subclasses define the encoder and `encode`."""

    has_gate = False  # whether the aux term (which reads ReLU(pi_gate)) applies

    def __init__(self, d_in: int, d_sae: int, unit_norm_decoder: bool = True):
        super().__init__()
        self.d_in, self.d_sae = d_in, d_sae
        self.unit_norm_decoder = unit_norm_decoder
        # Init decision (docs/method.md sec. 1): random unit decoder rows, W_enc = W_dec^T.
        W_dec = torch.randn(d_sae, d_in)
        self.W_dec = nn.Parameter(W_dec / W_dec.norm(dim=1, keepdim=True))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    def encode(self, x: Tensor) -> Encoding:
        raise NotImplementedError

    def decode(self, f: Codes) -> Tensor:
        return decode_codes(f, self.W_dec, self.b_dec)

    def forward(self, x: Tensor) -> tuple[Tensor, Encoding]:
        enc = self.encode(x)
        return self.decode(enc.f), enc

    # Staged training (saes/rescale_shift.py); a no-op for single-stage architectures.
    def begin_step(self, step: int, max_steps: int) -> None:
        """Called before each training step (`step` optimiser steps done of `max_steps`)."""

    def frozen_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimiser must leave untouched at this step (SAEModule drops
        their gradients before it runs)."""
        return []

    def init_b_dec(self, sample: Tensor, how: str) -> None:
        """b_dec from a data sample (docs/method.md sec. 1): zeros, mean or geometric median."""
        with torch.no_grad():
            if how == "mean":
                self.b_dec.copy_(sample.mean(0))
            elif how == "geometric_median":
                self.b_dec.copy_(geometric_median(sample))
            else:
                self.b_dec.zero_()

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the part of each W_dec row's gradient along the row (tangent to the sphere)."""
        if not self.unit_norm_decoder or self.W_dec.grad is None:
            return
        W, g = self.W_dec, self.W_dec.grad
        g -= (g * W).sum(1, keepdim=True) * W  # rows of W have unit norm here

    @torch.no_grad()
    def renormalise_decoder(self) -> None:
        if self.unit_norm_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)


def geometric_median(points: Tensor, iters: int = 50, eps: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: robust to the few very high-norm rows real activations have."""
    points = points.double()
    median = points.mean(0)
    for _ in range(iters):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(eps)
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - median).norm() < eps * (1 + median.norm()):
            break
        median = new
    return median.float()
