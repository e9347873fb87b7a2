"""Gated SAE (docs/method.md sec. 1, paper sec. 3.2) with its three weight-sharing modes (sec. 2).

    pi_gate = (x - b_dec) @ W_gate + b_gate
    pi_mag  = (x - b_dec) @ W_mag  + b_mag
    f_tilde = 1[pi_gate > 0] * ReLU(pi_mag)

W_gate is stored as W_enc (SAELens convention). Sharing modes:
  r_mag     W_mag = W_gate * exp(r_mag) column-wise (eq. 7): ONE encoder matmul serves both
  no_r_mag  W_mag = W_gate (r_mag a zero buffer, exported as such): the "no r_mag" ablation
  untied    an independent W_mag: the "untied encoders" ablation (a second matmul)
`encode_reference` is the plain-autograd definition; `encode` runs the same maths through
the fast kernels of saes/kernels.py where they apply (tied weights). Exported as SAELens's
`gated` SAE (W_mag = W_enc * exp(r_mag)), which cannot hold an untied W_mag.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from gsae_pl.errors import UserError
from gsae_pl.saes import ARCHITECTURES
from gsae_pl.saes.base import SAE, Encoding
from gsae_pl.saes.kernels import GatedEncodeDense, encode_gated_sparse

# Below this share of active (feature, row) pairs the sparse path beats the dense one on
# CPU. Measured at 768 x 16384, batch 4096 (`benchmarks/step.py --cases crossover`,
# benchmarks/RESULTS.md): sparse wins at L0 971 (5.9%), loses at L0 1985 (12.1%), and the
# interpolated crossover is ~8.3% (7.7% before the allocator change); 7% keeps a margin.
SPARSE_CROSSOVER = 0.07


@dataclass
class GatedConfig:
    weight_sharing: str = field(default="r_mag",
                                metadata={"choices": ("r_mag", "no_r_mag", "untied")})


@ARCHITECTURES.register("gated")
class GatedSAE(SAE):
    Config = GatedConfig
    provides = ("f", "gate_acts", "fired", "pi_gate", "pi_mag")
    has_gate = True
    resample_roles = {**SAE.resample_roles, "W_enc": "encoder", "W_mag": "encoder",
                      "b_gate": "zero", "b_mag": "zero", "r_mag": "zero"}
    bias_parameters = ("b_gate", "b_mag")  # r_mag is a log scale, not a bias
    saelens = "gated"

    def __init__(self, d_in: int, d_sae: int, unit_norm_decoder: bool = True,
                 weight_sharing: str = "r_mag", kernel: str = "auto",
                 compile_mode: str = "never"):
        super().__init__(d_in, d_sae, unit_norm_decoder)
        self.weight_sharing, self.kernel, self.compile_mode = weight_sharing, kernel, compile_mode
        self.W_enc = nn.Parameter(self.W_dec.detach().t().clone())
        self.b_gate = nn.Parameter(torch.zeros(d_sae))
        self.b_mag = nn.Parameter(torch.zeros(d_sae))
        if weight_sharing == "r_mag":
            self.r_mag = nn.Parameter(torch.zeros(d_sae))
        else:
            self.register_buffer("r_mag", torch.zeros(d_sae))
        if weight_sharing == "untied":
            self.W_mag = nn.Parameter(self.W_dec.detach().t().clone())
        self.last_density = 1.0  # share of (row, feature) pairs active in the last batch

    def encode(self, x: Tensor) -> Encoding:
        path = self.path_for(x)
        if path == "reference":
            return self.encode_reference(x)
        args = (x, self.W_enc, self.b_dec, self.b_gate, self.r_mag, self.b_mag)
        if path == "sparse":
            f, gate_acts, fired = encode_gated_sparse(*args)
        else:
            f, gate_acts, fired = GatedEncodeDense.apply(*args, self.compile_mode)
        if self.kernel == "auto" and x.device.type == "cpu":  # a host read: free on CPU only
            self.last_density = float(fired.sum()) / (x.shape[0] * self.d_sae)
        return Encoding(f=f, gate_acts=gate_acts, fired=fired)

    def path_for(self, x: Tensor) -> str:
        if self.weight_sharing == "untied":
            return "reference"  # the kernels assume one shared encoder matmul
        if self.reference_only:
            return "reference"  # a loss term reads pi_gate or pi_mag (SAE.serve)
        if self.kernel != "auto":
            return self.kernel
        if x.device.type != "cpu":
            return "dense"
        return "sparse" if self.last_density < SPARSE_CROSSOVER else "dense"

    def encode_reference(self, x: Tensor) -> Encoding:
        x_cent = x - self.b_dec  # not stop-gradiented: L_sparsity and L_aux reach b_dec
        pre_gate = x_cent @ self.W_enc
        pi_gate = pre_gate + self.b_gate
        if self.weight_sharing == "untied":
            pi_mag = x_cent @ self.W_mag + self.b_mag
        else:
            # (x @ W_gate) * exp(r_mag) == x @ (W_gate * exp(r_mag)), without a second matmul.
            pi_mag = pre_gate * torch.exp(self.r_mag) + self.b_mag
        # The Heaviside gate carries no gradient, so L_reconstruct never reaches b_gate.
        f = (pi_gate > 0).to(pi_mag.dtype) * torch.relu(pi_mag)
        return Encoding(f=f, gate_acts=torch.relu(pi_gate), fired=(f != 0).sum(0),
                        pi_gate=pi_gate, pi_mag=pi_mag)

    def jumprelu_threshold(self) -> Tensor:
        """With weight sharing the encoder is a JumpReLU (docs/method.md sec. 1, appendix E)."""
        return self.b_mag - torch.exp(self.r_mag) * self.b_gate

    @classmethod
    def encoder_matrices(cls, sae_cfg) -> int:
        return 2 if sae_cfg.weight_sharing == "untied" else 1  # W_enc (and W_mag)

    @classmethod
    def saelens_weights(cls, sae_cfg: dict, weights: dict[str, Tensor]) -> dict[str, Tensor]:
        if sae_cfg.get("weight_sharing") == "untied":
            raise UserError("sae.weight_sharing=untied has its own W_mag, which SAELens's gated "
                            "format (W_mag = W_enc * exp(r_mag)) cannot hold: nothing written")
        return super().saelens_weights(sae_cfg, weights)
