"""L_sparsity = lambda * ||gate_acts||_1 (docs/method.md sec. 2).

gate_acts is ReLU(pi_gate) for the gated SAE and f for the baseline (see `Encoding`).
`decoder_norm_l1` weights each feature by its decoder row norm (the later variant that
SAELens uses; meaningful only without the unit-norm constraint, which config enforces).
"""

from __future__ import annotations

from torch import Tensor

from gsae_pl.losses.base import Term
from gsae_pl.saes.kernels import mean_row_sum


def l1(x, x_hat, enc, sae) -> Tensor:
    return mean_row_sum(enc.gate_acts)  # gate_acts >= 0, so its sum is its L1 norm


def decoder_norm_l1(x, x_hat, enc, sae) -> Tensor:
    return mean_row_sum(enc.gate_acts, sae.W_dec.norm(dim=1))


KINDS = {"l1": l1, "decoder_norm_l1": decoder_norm_l1}


def sparsity_term(loss_cfg) -> Term:
    return Term(fn=KINDS[loss_cfg.sparsity.kind], coefficient=loss_cfg.l1_coefficient,
                warmup_steps=loss_cfg.l1_warmup_steps)
