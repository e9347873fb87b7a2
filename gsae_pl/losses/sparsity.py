"""L_sparsity = lambda * ||gate_acts||_1 (docs/method.md sec. 2).

gate_acts is ReLU(pi_gate) for the gated SAE and f for the baseline (see `Encoding`).
`decoder_norm_l1` weights each feature by its decoder row norm (the later variant that
SAELens uses; meaningful only without the unit-norm constraint, which config enforces).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from gsae_pl.errors import UserError
from gsae_pl.losses.base import LOSS_TERMS, TermConfig, TermSpec
from gsae_pl.ranges import NON_NEGATIVE
from gsae_pl.saes.kernels import mean_row_sum


def l1(x, x_hat, enc, sae) -> Tensor:
    return mean_row_sum(enc.gate_acts)  # gate_acts >= 0, so its sum is its L1 norm


def decoder_norm_l1(x, x_hat, enc, sae) -> Tensor:
    return mean_row_sum(enc.gate_acts, sae.W_dec.norm(dim=1))


KINDS = {"l1": l1, "decoder_norm_l1": decoder_norm_l1}


@dataclass
class SparsityConfig(TermConfig):
    # lambda (activations normalised, docs/method.md sec. 4); was loss.l1_coefficient
    coefficient: float = field(default=0.05, metadata=NON_NEGATIVE)
    kind: str = field(default="l1", metadata={"choices": tuple(KINDS)})


def check(cfg) -> None:
    kind = cfg.loss.sparsity.kind
    if kind == "decoder_norm_l1" and cfg.sae.unit_norm_decoder:
        raise UserError("loss.sparsity.kind=decoder_norm_l1 is plain L1 under unit-norm decoder "
                        "rows: also set sae.unit_norm_decoder=false")
    if kind == "decoder_norm_l1" and cfg.loss.aux.enabled and cfg.loss.aux.decoder == "frozen":
        # The penalty shrinks the rows and the frozen aux decoder (sg(W_dec)) never pushes
        # back: rows collapse (review: median norm 0.10, L0 3.4x). docs/method.md sec. 2.
        raise UserError("loss.sparsity.kind=decoder_norm_l1 with loss.aux.decoder=frozen lets "
                        "the penalty shrink the decoder rows unopposed: set "
                        "loss.aux.decoder=unfrozen (or loss.aux.enabled=false)")


LOSS_TERMS.register("sparsity")(TermSpec(config=SparsityConfig,
                                         build=lambda block: KINDS[block.kind],
                                         reads=("gate_acts",), check=check))
