"""L_reconstruct = ||x - x_hat(f_tilde)||^2 (docs/method.md sec. 2, eq. 8)."""

from __future__ import annotations

from dataclasses import dataclass

from gsae_pl.losses.base import LOSS_TERMS, TermConfig, TermSpec, squared_error


@dataclass
class ReconstructionConfig(TermConfig):
    pass


def reconstruction_fn(block):
    return lambda x, x_hat, enc, sae: squared_error(x, x_hat)


LOSS_TERMS.register("reconstruction")(TermSpec(config=ReconstructionConfig,
                                               build=reconstruction_fn))
