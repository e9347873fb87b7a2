"""L_aux = ||x - (ReLU(pi_gate) @ sg(W_dec) + sg(b_dec))||^2 (docs/method.md sec. 2, eq. 8).

The aux path decodes the gate's own activations through a frozen copy of the decoder, so
the gate learns to reconstruct without the decoder being bent towards the gate.
`decoder: unfrozen` is the paper's "unfreeze decoder" ablation (sec. 5.1); by the
docs/method.md decision it unfreezes b_dec too unless `b_dec` says otherwise.
It reuses ReLU(pi_gate) from the forward pass: no encoder matmul is recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Optional

from torch import Tensor

from gsae_pl.errors import UserError
from gsae_pl.losses.base import LOSS_TERMS, TermConfig, TermSpec, squared_error
from gsae_pl.saes.base import ARCHITECTURES
from gsae_pl.saes.kernels import decode_codes


@dataclass
class AuxConfig(TermConfig):
    # frozen | unfrozen: stop-gradient on W_dec in L_aux
    decoder: str = field(default="frozen", metadata={"choices": ("frozen", "unfrozen")})
    # frozen | unfrozen | null (= same as `decoder`)
    b_dec: Optional[str] = field(default=None,
                                 metadata={"choices": (None, "frozen", "unfrozen")})


def aux_loss(x, x_hat, enc, sae, freeze_W_dec: bool, freeze_b_dec: bool) -> Tensor:
    W_dec = sae.W_dec.detach() if freeze_W_dec else sae.W_dec
    b_dec = sae.b_dec.detach() if freeze_b_dec else sae.b_dec
    return squared_error(x, decode_codes(enc.gate_acts, W_dec, b_dec))


def aux_fn(aux):
    b_dec_mode = aux.b_dec or aux.decoder
    return partial(aux_loss, freeze_W_dec=aux.decoder == "frozen",
                   freeze_b_dec=b_dec_mode == "frozen")


def check(cfg) -> None:
    arch = cfg.sae.architecture
    if cfg.loss.aux.enabled and not ARCHITECTURES[arch].aux_applies:
        raise UserError(f"loss.aux needs a gate, which sae.architecture={arch} has not: set "
                        "loss.aux.enabled=false")


LOSS_TERMS.register("aux")(TermSpec(config=AuxConfig, build=aux_fn, reads=("gate_acts",),
                                    check=check))
