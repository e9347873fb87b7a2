"""Baseline ReLU SAE (PAPER.md sec. 1, Towards Monosemanticity style)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gsae_pl.saes.base import SAE, Encoding


class ReLUSAE(SAE):
    """f = ReLU((x - b_dec) @ W_enc + b_enc); the L1 penalty falls on f itself."""

    def __init__(self, d_in: int, d_sae: int, unit_norm_decoder: bool = True, **_):
        super().__init__(d_in, d_sae, unit_norm_decoder)
        self.W_enc = nn.Parameter(self.W_dec.detach().t().clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))

    def encode(self, x: Tensor) -> Encoding:
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        f = torch.relu(pre)
        return Encoding(f=f, pi_gate=pre, pi_mag=None, gate_acts=f)
