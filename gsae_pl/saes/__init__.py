"""Architectures by name: the name is what configs and checkpoints store.

Each architecture is one file of this package that registers its `SAE` subclass in
`ARCHITECTURES` (the interface: saes/base.py); the registry imports every file of the
package, so a new file needs no edit elsewhere.
"""

from __future__ import annotations

import inspect
from dataclasses import fields

from gsae_pl.registry import Registry
from gsae_pl.saes.base import SAE, Encoding

ARCHITECTURES: Registry[type[SAE]] = Registry("sae.architecture", "gsae_pl.saes")

# Imported in this order, so choice lists read relu, gated, prolu, rescale_shift, ...
from gsae_pl.saes import relu, gated, prolu, rescale_shift  # noqa: E402, F401, I001
from gsae_pl.saes.gated import GatedSAE  # noqa: E402
from gsae_pl.saes.prolu import ProLUSAE  # noqa: E402
from gsae_pl.saes.relu import ReLUSAE  # noqa: E402
from gsae_pl.saes.rescale_shift import RescaleShiftSAE  # noqa: E402

# Settings of the common `sae:` fields, under the constructor argument that takes them.
COMMON_ARGS = {"d_sae": "d_sae", "unit_norm_decoder": "unit_norm_decoder",
               "kernel": "kernel", "compile_mode": "compile"}


def build_sae(sae_cfg, d_in: int, reads=()) -> SAE:
    """An SAE from the `sae:` config block that fills the Encoding fields `reads` (the loss
    terms'). The architecture gets its own fields and the common ones its constructor names
    (prolu has one path: no kernel, no compile)."""
    cls = ARCHITECTURES[sae_cfg.architecture]
    params = inspect.signature(cls).parameters.values()
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params)  # e.g. a wrapped constructor
    takes = {p.name for p in params}
    common = {arg: sae_cfg[key] for arg, key in COMMON_ARGS.items()
              if open_ended or arg in takes}
    own = {f.name: sae_cfg[f.name] for f in fields(cls.Config)}
    sae = cls(d_in=d_in, **common, **own)
    sae.serve(reads)
    return sae


__all__ = ["SAE", "Encoding", "GatedSAE", "ProLUSAE", "ReLUSAE", "RescaleShiftSAE",
           "ARCHITECTURES", "build_sae"]
