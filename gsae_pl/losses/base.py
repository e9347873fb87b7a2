"""A loss term: a function of one batch's tensors, a coefficient and an optional warm-up."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from gsae_pl.saes.base import SAE, Encoding

TermFn = Callable[[Tensor, Tensor, Encoding, SAE], Tensor]


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
