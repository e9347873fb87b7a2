"""Architectures by name: the name is what configs and checkpoints store."""

from __future__ import annotations

from gsae_pl.saes.base import SAE, Encoding
from gsae_pl.saes.gated import GatedSAE
from gsae_pl.saes.prolu import ProLUSAE
from gsae_pl.saes.relu import ReLUSAE
from gsae_pl.saes.rescale_shift import RescaleShiftSAE

ARCHITECTURES: dict[str, type[SAE]] = {"relu": ReLUSAE, "gated": GatedSAE, "prolu": ProLUSAE,
                                       "rescale_shift": RescaleShiftSAE}


def build_sae(sae_cfg, d_in: int) -> SAE:
    """An SAE from the `sae:` config block (fields the architecture does not use are ignored)."""
    cls = ARCHITECTURES[sae_cfg.architecture]
    return cls(d_in=d_in, d_sae=sae_cfg.d_sae, unit_norm_decoder=sae_cfg.unit_norm_decoder,
               weight_sharing=sae_cfg.weight_sharing, kernel=sae_cfg.kernel,
               compile_mode=sae_cfg.compile, prolu_backward=sae_cfg.prolu_backward,
               rescale_shift_steps=sae_cfg.rescale_shift_steps)


__all__ = ["SAE", "Encoding", "GatedSAE", "ProLUSAE", "ReLUSAE", "RescaleShiftSAE",
           "ARCHITECTURES", "build_sae"]
