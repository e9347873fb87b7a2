"""A loss term: a function of one batch's tensors, a coefficient and an optional warm-up.

A term is one file in gsae_pl/losses/ that registers a `TermSpec` in `LOSS_TERMS` (below)
under its YAML key `loss.<name>`; the registry imports every file of the package on first
lookup, and the `loss:` schema is built from it. The spec declares:
  config  its `loss.<name>:` block, a `TermConfig` subclass (enabled, coefficient,
          warmup_steps, and its own fields; choices in field metadata)
  build   block -> the term's function (x, x_hat, enc, sae) -> scalar
  reads   the Encoding fields the function reads; the SAE fills them on every kernel path
  check   cfg -> None, refusing (UserError) setting combinations the term cannot train with
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from gsae_pl.ranges import NON_NEGATIVE
from gsae_pl.registry import Registry
from gsae_pl.saes.base import SAE, Encoding

TermFn = Callable[[Tensor, Tensor, Encoding, SAE], Tensor]


@dataclass
class TermConfig:
    enabled: bool = True
    coefficient: float = field(default=1.0, metadata=NON_NEGATIVE)
    # linear ramp of the coefficient from ~0 to full over these steps
    warmup_steps: int = field(default=0, metadata=NON_NEGATIVE)


def no_check(cfg: Any) -> None:
    """A term that combines with every setting."""


@dataclass(frozen=True)
class TermSpec:
    config: type  # a TermConfig subclass: the term's `loss.<name>:` block
    build: Callable[[Any], TermFn]  # its block -> its function, before the coefficient
    reads: tuple[str, ...] = ()  # Encoding fields the function reads
    check: Callable[[Any], None] = no_check  # the whole config -> refusals


@dataclass
class Term:
    fn: TermFn  # (x, x_hat, enc, sae) -> scalar, before the coefficient
    coefficient: float = 1.0
    warmup_steps: int = 0  # linear ramp of the coefficient from ~0 to full over these steps

    def coefficient_at(self, step: int) -> float:
        if self.warmup_steps <= 0:
            return self.coefficient
        return self.coefficient * min(1.0, (step + 1) / self.warmup_steps)


def squared_error(x: Tensor, x_hat: Tensor) -> Tensor:
    """||x - x_hat||^2 divided by n = d_in, batch mean (docs/method.md sec. 4: L2 loss over n)."""
    return (x - x_hat).pow(2).mean()


# The objective sums the enabled terms in this order (the total's rounding depends on it);
# a term not listed here comes after these, by name.
LOSS_TERMS: Registry[TermSpec] = Registry(
    "loss", "gsae_pl.losses", order=("reconstruction", "sparsity", "aux", "orthogonality"))


class Objective:
    """The enabled terms of `loss:`. Switches are data: `loss.<name>.enabled` picks the terms,
    and the objective treats every term the same way, never testing a term's name."""

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
