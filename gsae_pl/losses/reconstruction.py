"""L_reconstruct = ||x - x_hat(f_tilde)||^2 (docs/method.md sec. 2, eq. 8)."""

from __future__ import annotations

from gsae_pl.losses.base import Term, squared_error


def reconstruction_term(loss_cfg) -> Term:
    return Term(fn=lambda x, x_hat, enc, sae: squared_error(x, x_hat),
                coefficient=loss_cfg.reconstruction.coefficient)
