"""Baseline ReLU SAE (docs/method.md sec. 1, Towards Monosemanticity style)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gsae_pl.saes.base import ARCHITECTURES, FAST_FIELDS, SAE, Encoding
from gsae_pl.saes.kernels import ReLUEncodeDense


@ARCHITECTURES.register("relu")
class ReLUSAE(SAE):
    """f = ReLU((x - b_dec) @ W_enc + b_enc); the L1 penalty falls on f itself.

    `kernel: reference` runs plain autograd; any other value the hand-written backward
    (saes/kernels.py), which saves the centring matmul. The baseline has no sparse path:
    its decoder reads f, whose support is what the L1 penalty shrinks only slowly.
    Exported as SAELens's `standard` SAE.
    """

    provides = (*FAST_FIELDS, "pre_acts")
    resample_roles = {**SAE.resample_roles, "W_enc": "encoder", "b_enc": "zero"}
    saelens = "standard"
    auxk_unfit = ("a ReLU latent is dead only if z <= 0 on every row (its pre-activation), where "
                  "ReLU(z) and its gradient are 0, so AuxK would train nothing")

    def __init__(self, d_in: int, d_sae: int, unit_norm_decoder: bool = True,
                 kernel: str = "auto", compile_mode: str = "never"):
        super().__init__(d_in, d_sae, unit_norm_decoder)
        self.kernel, self.compile_mode = kernel, compile_mode
        self.W_enc = nn.Parameter(self.W_dec.detach().t().clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))

    def encode(self, x: Tensor) -> Encoding:
        kernel = "reference" if self.reference_only else self.kernel
        return encode_relu(x, self.W_enc, self.b_dec, self.b_enc, kernel, self.compile_mode)

    def encode_reference(self, x: Tensor) -> Encoding:
        return encode_relu(x, self.W_enc, self.b_dec, self.b_enc, "reference")


def encode_relu(x: Tensor, W_enc: Tensor, b_dec: Tensor, b_enc: Tensor, kernel: str,
                compile_mode: str = "never") -> Encoding:
    """f = ReLU((x - b_dec) @ W_enc + b_enc), the sparsity penalty on f itself: through the
    hand-written backward, or plain autograd for kernel `reference`. The baseline's encoder,
    also RescaleShiftSAE's stage 1 (with b_gate as b_enc)."""
    if kernel != "reference":
        f, fired = ReLUEncodeDense.apply(x, W_enc, b_dec, b_enc, compile_mode)
        return Encoding(f=f, gate_acts=f, fired=fired)
    pre = (x - b_dec) @ W_enc + b_enc
    f = torch.relu(pre)
    return Encoding(f=f, gate_acts=f, fired=(f != 0).sum(0), pre_acts=pre)
