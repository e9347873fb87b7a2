"""Loss terms by YAML key, and the objective that sums the enabled ones.

Switches are data: `loss.<name>.enabled` picks the terms, and the
objective treats every term the same way, never testing a term's name.
"""

from __future__ import annotations

from torch import Tensor

from gsae_pl.losses.aux import aux_term
from gsae_pl.losses.base import Term
from gsae_pl.losses.orthogonality import orthogonality_term
from gsae_pl.losses.reconstruction import reconstruction_term
from gsae_pl.losses.sparsity import sparsity_term
from gsae_pl.saes.base import SAE, Encoding

# name -> builder(loss_cfg) -> Term. A new term is one entry here and one block in the schema.
TERMS = {"reconstruction": reconstruction_term, "sparsity": sparsity_term, "aux": aux_term,
         "orthogonality": orthogonality_term}


class Objective:
    def __init__(self, terms: dict[str, Term]):
        self.terms = terms

    @classmethod
    def from_config(cls, loss_cfg) -> Objective:
        return cls({name: build(loss_cfg) for name, build in TERMS.items()
                    if loss_cfg[name].enabled})

    def coefficients(self, step: int) -> dict[str, float]:
        return {name: term.coefficient_at(step) for name, term in self.terms.items()}

    def __call__(self, x: Tensor, x_hat: Tensor, enc: Encoding, sae: SAE,
                 step: int) -> dict[str, Tensor]:
        """Each enabled term times its coefficient at `step`; the loss is their sum."""
        coefs = self.coefficients(step)
        return {name: coefs[name] * term.fn(x, x_hat, enc, sae)
                for name, term in self.terms.items()}


__all__ = ["Objective", "Term", "TERMS"]
