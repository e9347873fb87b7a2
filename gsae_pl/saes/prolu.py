"""ProLU SAE (docs/method.md sec. 5, G. Taggart): the bias thresholds, it never shifts magnitudes.

    m     = (x - b_dec) @ W_enc                       (no bias inside the matmul)
    f     = ProLU(m, b_enc) = m if (m > 0 and m + b_enc > 0) else 0
    x_hat = f @ W_dec + b_dec

The forward is a step in b_enc, so plain autograd would give b_enc no gradient at all.
The two backward rules of docs/method.md sec. 5 are custom autograd functions, picked by
`sae.prolu_backward`; on the active set gate = 1[m > 0 and m + b_enc > 0], g = dL/df:
    relu  dL/dm = g * gate,            dL/db_enc = g * gate      (like ReLU(m + b_enc))
    ste   dL/dm = g * gate * (1 + m),  dL/db_enc = g * gate * m  (straight-through on the step)
Trained like the baseline: an L1 penalty on f itself, no gate for the aux term.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.autograd import Function

from gsae_pl.saes import ARCHITECTURES
from gsae_pl.saes.base import SAE, Encoding


def prolu_gate(m: Tensor, b_enc: Tensor) -> Tensor:
    """1[m > 0 and m + b_enc > 0], in m's dtype."""
    return ((m > 0) & (m + b_enc > 0)).to(m.dtype)


class ProLUReLU(Function):
    """ProLU with the ReLU-like backward rule (docs/method.md sec. 5)."""

    @staticmethod
    def forward(ctx, m: Tensor, b_enc: Tensor) -> Tensor:
        gate = prolu_gate(m, b_enc)
        ctx.save_for_backward(gate)
        return m * gate

    @staticmethod
    def backward(ctx, g: Tensor):
        (gate,) = ctx.saved_tensors
        g_gate = g * gate
        return g_gate, g_gate.sum(0)  # b_enc broadcasts over the batch: sum its rows


class ProLUSTE(Function):
    """ProLU with the straight-through backward rule (docs/method.md sec. 5)."""

    @staticmethod
    def forward(ctx, m: Tensor, b_enc: Tensor) -> Tensor:
        gate = prolu_gate(m, b_enc)
        ctx.save_for_backward(m, gate)
        return m * gate

    @staticmethod
    def backward(ctx, g: Tensor):
        m, gate = ctx.saved_tensors
        g_gate = g * gate
        return g_gate * (1 + m), (g_gate * m).sum(0)


BACKWARD_RULES = {"relu": ProLUReLU, "ste": ProLUSTE}


@dataclass
class ProLUConfig:
    prolu_backward: str = field(default="relu", metadata={"choices": tuple(BACKWARD_RULES)})


@ARCHITECTURES.register("prolu")
class ProLUSAE(SAE):
    """Parameters as the baseline's (W_enc, b_enc, W_dec, b_dec): b_enc is the threshold.
    One path (plain autograd through the rules above) that fills every Encoding field; no
    SAELens format computes ProLU, so export refuses it."""

    Config = ProLUConfig
    provides = ("f", "gate_acts", "fired", "pi_gate", "pi_mag")
    resample_roles = {**SAE.resample_roles, "W_enc": "encoder", "b_enc": "zero"}

    def __init__(self, d_in: int, d_sae: int, unit_norm_decoder: bool = True,
                 prolu_backward: str = "relu"):
        super().__init__(d_in, d_sae, unit_norm_decoder)
        self.prolu_backward = prolu_backward
        self.prolu = BACKWARD_RULES[prolu_backward]
        self.W_enc = nn.Parameter(self.W_dec.detach().t().clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))

    def encode(self, x: Tensor) -> Encoding:
        m = (x - self.b_dec) @ self.W_enc
        f = self.prolu.apply(m, self.b_enc)
        # pi_gate is what decides firing: f != 0 exactly where m > 0 and pi_gate > 0.
        return Encoding(f=f, gate_acts=f, fired=(f != 0).sum(0), pi_gate=m + self.b_enc,
                        pi_mag=m)
