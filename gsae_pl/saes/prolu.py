"""ProLU SAE (docs/method.md sec. 5, G. Taggart): the bias thresholds, it never shifts magnitudes.

    m     = (x - b_dec) @ W_enc                       (no bias inside the matmul)
    f     = ProLU(m, b_enc) = m if (m > 0 and m + b_enc > 0) else 0
    x_hat = f @ W_dec + b_dec

The forward is a step in b_enc, so plain autograd would give b_enc no gradient at all.
The backward rules of docs/method.md sec. 5 are custom autograd functions, picked by
`sae.prolu_backward`; on the active set gate = 1[m > 0 and m + b_enc > 0], g = dL/df:
    relu      dL/dm = g * gate,            dL/db_enc = g * gate      (like ReLU(m + b_enc))
    ste       dL/dm = g * gate * (1 + m),  dL/db_enc = g * gate * m  (straight-through)
    ste_bias  dL/dm = g * gate,            dL/db_enc = g * gate * m  (STE on the bias only)
    ste_m     dL/dm = g * gate * (1 + m),  dL/db_enc = g * gate      (STE on m only)
`sae.prolu_positive_bias: relu` (the author's variant, sec. 5) makes a feature whose bias is
>= 0 a plain ReLU, f = ReLU(m + b_enc), with ReLU's own gradient: ProLU only where b_enc < 0.
Trained like the baseline: an L1 penalty on f itself, no gate for the aux term.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.autograd import Function

from gsae_pl.saes.base import ARCHITECTURES, SAE, Encoding


def prolu_gate(m: Tensor, b_enc: Tensor) -> Tensor:
    """1[m > 0 and m + b_enc > 0], in m's dtype."""
    return ((m > 0) & (m + b_enc > 0)).to(m.dtype)


class ProLU(Function):
    """ProLU's forward; subclasses pick the straight-through part of each gradient
    (docs/method.md sec. 5): `ste_m` adds g * gate * m to dL/dm, `ste_bias` makes dL/db_enc
    g * gate * m instead of g * gate."""

    ste_m: bool = False
    ste_bias: bool = False

    @classmethod
    def forward(cls, ctx, m: Tensor, b_enc: Tensor) -> Tensor:
        gate = prolu_gate(m, b_enc)
        ctx.save_for_backward(m, gate)
        return m * gate

    @classmethod
    def backward(cls, ctx, g: Tensor):
        m, gate = ctx.saved_tensors
        g_gate = g * gate
        g_m = g_gate * (1 + m) if cls.ste_m else g_gate
        g_b = g_gate * m if cls.ste_bias else g_gate
        return g_m, g_b.sum(0)  # b_enc broadcasts over the batch: sum its rows


class ProLUReLU(ProLU):
    """The ReLU-like rule: dL/dm = dL/db_enc = g * gate."""


class ProLUSTE(ProLU):
    """The straight-through rule on both m and b_enc."""

    ste_m = ste_bias = True


class ProLUSTEBias(ProLU):
    """Straight-through on b_enc only; ReLU-like on m."""

    ste_bias = True


class ProLUSTEM(ProLU):
    """Straight-through on m only; ReLU-like on b_enc."""

    ste_m = True


BACKWARD_RULES = {"relu": ProLUReLU, "ste": ProLUSTE, "ste_bias": ProLUSTEBias,
                  "ste_m": ProLUSTEM}


@dataclass
class ProLUConfig:
    prolu_backward: str = field(default="relu", metadata={"choices": tuple(BACKWARD_RULES)})
    # prolu: ProLU for every feature | relu: f = ReLU(m + b_enc) where b_enc >= 0 (sec. 5)
    prolu_positive_bias: str = field(default="prolu", metadata={"choices": ("prolu", "relu")})


@ARCHITECTURES.register("prolu")
class ProLUSAE(SAE):
    """Parameters as the baseline's (W_enc, b_enc, W_dec, b_dec): b_enc is the threshold.
    One path (plain autograd through the rules above) that fills every Encoding field; no
    SAELens format computes ProLU, so export refuses it."""

    Config = ProLUConfig
    provides = ("f", "gate_acts", "fired", "pre_acts", "pi_mag")
    resample_roles = {**SAE.resample_roles, "W_enc": "encoder", "b_enc": "zero"}

    def __init__(self, d_in: int, d_sae: int, unit_norm_decoder: bool = True, **own):
        super().__init__(d_in, d_sae, unit_norm_decoder)
        own = self.Config(**own)  # the defaults of its sae. fields: there alone
        self.prolu_backward, self.prolu_positive_bias = own.prolu_backward, own.prolu_positive_bias
        self.prolu = BACKWARD_RULES[own.prolu_backward]
        self.W_enc = nn.Parameter(self.W_dec.detach().t().clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))

    def encode(self, x: Tensor) -> Encoding:
        m = (x - self.b_dec) @ self.W_enc
        f = self.prolu.apply(m, self.b_enc)
        pi_mag = m
        if self.prolu_positive_bias == "relu":
            # torch.where routes each feature's gradient to the branch it takes: ReLU's own
            # where b_enc >= 0, the ProLU rule's elsewhere.
            plain = self.b_enc >= 0
            f = torch.where(plain, torch.relu(m + self.b_enc), f)
            pi_mag = torch.where(plain, m + self.b_enc, m)  # the magnitude f passes on
        # pi_gate is what decides firing: f != 0 exactly where pi_gate > 0 (and, under ProLU,
        # m > 0).
        return Encoding(f=f, gate_acts=f, fired=(f != 0).sum(0), pre_acts=m + self.b_enc,
                        pi_mag=pi_mag)
