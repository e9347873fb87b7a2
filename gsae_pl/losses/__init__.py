"""Loss terms by YAML key, and the objective that sums the enabled ones.

Switches are data: `loss.<name>.enabled` picks the terms, and the objective treats every
term the same way, never testing a term's name. A term is one file of this package that
registers a `TermSpec` (losses/base.py) in `LOSS_TERMS`; the `loss:` schema is built from it.
"""

from __future__ import annotations

from torch import Tensor

from gsae_pl.losses.base import Term, TermSpec
from gsae_pl.registry import Registry
from gsae_pl.saes.base import SAE, Encoding

LOSS_TERMS: Registry[TermSpec] = Registry("loss", "gsae_pl.losses")

# Imported in this order, which is the order the objective sums them in (the total's
# rounding depends on it); a new file registers after these.
from gsae_pl.losses import reconstruction, sparsity, aux, orthogonality  # noqa: E402, F401, I001


class Objective:
    def __init__(self, terms: dict[str, Term], reads: tuple[str, ...] = ()):
        self.terms = terms
        self.reads = reads  # the Encoding fields the terms read: the SAE must fill them

    @classmethod
    def from_config(cls, loss_cfg) -> Objective:
        specs = {name: spec for name, spec in LOSS_TERMS.items() if loss_cfg[name].enabled}
        terms = {name: Term(fn=spec.build(loss_cfg[name]),
                            coefficient=loss_cfg[name].coefficient,
                            warmup_steps=loss_cfg[name].warmup_steps)
                 for name, spec in specs.items()}
        reads = tuple(dict.fromkeys(field for spec in specs.values() for field in spec.reads))
        return cls(terms, reads)

    def coefficients(self, step: int) -> dict[str, float]:
        return {name: term.coefficient_at(step) for name, term in self.terms.items()}

    def __call__(self, x: Tensor, x_hat: Tensor, enc: Encoding, sae: SAE,
                 step: int) -> dict[str, Tensor]:
        """Each enabled term times its coefficient at `step`; the loss is their sum."""
        coefs = self.coefficients(step)
        return {name: coefs[name] * term.fn(x, x_hat, enc, sae)
                for name, term in self.terms.items()}


__all__ = ["Objective", "Term", "TermSpec", "LOSS_TERMS"]
