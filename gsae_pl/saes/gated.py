"""Gated SAE (docs/method.md sec. 1, paper sec. 3.2) with its weight-sharing modes (sec. 2)
and the gate variants of the discussion threads (sec. 5).

    pi_gate = (x - b_dec) @ W_gate + b_gate
    pi_mag  = (x - b_dec) @ W_mag  + b_mag
    f_tilde = 1[pi_gate > 0] * ReLU(pi_mag)

W_gate is stored as W_enc (SAELens convention). Sharing modes:
  r_mag     W_mag = W_gate * exp(r_mag) column-wise (eq. 7): ONE encoder matmul serves both
  no_r_mag  W_mag = W_gate (r_mag a zero buffer, exported as such): the "no r_mag" ablation
  untied    an independent W_mag: the "untied encoders" ablation (a second matmul)
  no_shift  as r_mag, with b_mag := exp(r_mag) * b_gate tied, not a parameter (sec. 5): the
            JumpReLU threshold is 0 and f = exp(r_mag) * ReLU(pi_gate), continuous in pi_gate
Gates (`sae.gate`, sec. 5):
  heaviside 1[pi_gate > 0] (paper)
  sigmoid   sigmoid(pi_gate / T) while training (T = sae.gate_temperature), so the
            reconstruction reaches W_gate and b_gate through it; the hard gate 1[pi_gate > 0]
            in evaluation. gate_acts = sigmoid(pi_gate / T), what the L1 penalty sees.
`encode_reference` is the plain-autograd definition; `encode` runs the same maths through
the fast kernels of saes/kernels.py where they apply (tied weights, Heaviside gate). Exported
as SAELens's `gated` SAE (W_mag = W_enc * exp(r_mag), the Heaviside gate), which cannot hold
an untied W_mag; a sigmoid-gated SAE exports as the hard-gated SAE its evaluation measures.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from gsae_pl.errors import UserError
from gsae_pl.saes.base import ARCHITECTURES, SAE, Encoding
from gsae_pl.saes.kernels import GatedEncodeDense, encode_gated_sparse

# Below this share of active (feature, row) pairs the sparse path beats the dense one on
# CPU. Measured at 768 x 16384, batch 4096 (`benchmarks/step.py --cases crossover`,
# benchmarks/RESULTS.md): sparse wins at L0 971 (5.9%), loses at L0 1985 (12.1%), and the
# interpolated crossover is ~8.3% (7.7% before the allocator change); 7% keeps a margin.
SPARSE_CROSSOVER = 0.07


@dataclass
class GatedConfig:
    weight_sharing: str = field(default="r_mag", metadata={
        "choices": ("r_mag", "no_r_mag", "untied", "no_shift")})


@dataclass
class GateConfig(GatedConfig):
    """Gated's own gate fields (rescale_shift, whose gate is its frozen baseline, has none)."""

    gate: str = field(default="heaviside", metadata={"choices": ("heaviside", "sigmoid")})
    # T in sigmoid(pi_gate / T); read by gate=sigmoid only
    gate_temperature: float = field(default=1.0, metadata={"range": "positive"})


@ARCHITECTURES.register("gated")
class GatedSAE(SAE):
    Config = GateConfig
    provides = ("f", "gate_acts", "fired", "pre_acts", "pi_mag")
    aux_applies = True
    resample_roles = {**SAE.resample_roles, "W_enc": "encoder", "W_mag": "encoder",
                      "b_gate": "zero", "b_mag": "zero", "r_mag": "zero"}
    bias_parameters = ("b_gate", "b_mag")  # r_mag is a log scale, not a bias
    saelens = "gated"
    auxk_unfit = ("a gated latent is dead only if pi_gate <= 0 on every row, where ReLU(pi_gate) "
                  "and its gradient are 0, so AuxK would train nothing")

    def __init__(self, d_in: int, d_sae: int, unit_norm_decoder: bool = True,
                 kernel: str = "auto", compile_mode: str = "never", **own):
        super().__init__(d_in, d_sae, unit_norm_decoder)
        own = self.Config(**own)  # the defaults of sae.weight_sharing, gate, ...: there alone
        weight_sharing = self.weight_sharing = own.weight_sharing
        self.kernel, self.compile_mode = kernel, compile_mode
        self.gate = getattr(own, "gate", "heaviside")  # rescale_shift has no gate fields
        self.gate_temperature = getattr(own, "gate_temperature", 1.0)
        self.W_enc = nn.Parameter(self.W_dec.detach().t().clone())
        self.b_gate = nn.Parameter(torch.zeros(d_sae))
        if weight_sharing != "no_shift":  # no_shift: b_mag is tied (`magnitude_bias`)
            self.b_mag = nn.Parameter(torch.zeros(d_sae))
        else:  # only b_gate is learnt: the tied b_mag has its signs
            self.bias_parameters = ("b_gate",)
        if weight_sharing in ("r_mag", "no_shift"):
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
        # A tied b_mag (no_shift) is a function of r_mag and b_gate: autograd carries the
        # kernels' b_mag gradient on to them.
        args = (x, self.W_enc, self.b_dec, self.b_gate, self.r_mag, self.magnitude_bias())
        if path == "sparse":
            f, gate_acts, fired = encode_gated_sparse(*args)
        else:
            f, gate_acts, fired = GatedEncodeDense.apply(*args, self.compile_mode)
        # A host read, free on CPU only. Training batches only: a held-out evaluation
        # would otherwise steer the next training step's path, and a resumed run's.
        if self.kernel == "auto" and x.device.type == "cpu" and self.training:
            self.last_density = float(fired.sum()) / (x.shape[0] * self.d_sae)
        return Encoding(f=f, gate_acts=gate_acts, fired=fired)

    def path_for(self, x: Tensor) -> str:
        if self.weight_sharing == "untied":
            return "reference"  # the kernels assume one shared encoder matmul
        if self.gate != "heaviside":
            return "reference"  # the kernels know the Heaviside gate only
        if self.reference_only:
            return "reference"  # a loss term reads pi_gate or pi_mag (SAE.serve)
        if self.kernel != "auto":
            return self.kernel
        if x.device.type != "cpu":
            return "dense"
        return "sparse" if self.last_density < SPARSE_CROSSOVER else "dense"

    def encode_reference(self, x: Tensor, soft: bool | None = None) -> Encoding:
        """Plain autograd. `soft`: the sigmoid gate's soft form (default: while training);
        the Heaviside gate ignores it."""
        x_cent = x - self.b_dec  # not stop-gradiented: L_sparsity and L_aux reach b_dec
        pre_gate = x_cent @ self.W_enc
        pi_gate = pre_gate + self.b_gate
        if self.weight_sharing == "untied":
            pi_mag = x_cent @ self.W_mag + self.b_mag
        else:
            # (x @ W_gate) * exp(r_mag) == x @ (W_gate * exp(r_mag)), without a second matmul.
            pi_mag = pre_gate * torch.exp(self.r_mag) + self.magnitude_bias()
        # The Heaviside gate carries no gradient, so L_reconstruct never reaches b_gate.
        f = (pi_gate > 0).to(pi_mag.dtype) * torch.relu(pi_mag)
        if self.gate == "heaviside":
            return Encoding(f=f, gate_acts=torch.relu(pi_gate), fired=(f != 0).sum(0),
                            pre_acts=pi_gate, pi_mag=pi_mag)
        # Sigmoid gate (docs/method.md sec. 5): never exactly 0, so `fired` (L0, density,
        # dead features, the orthogonality term's active set) counts the hard gate's support,
        # in training as in evaluation, where f is the hard-gated f itself.
        gate_acts = torch.sigmoid(pi_gate / self.gate_temperature)
        fired = (f != 0).sum(0)
        if (self.training if soft is None else soft):
            f = gate_acts * torch.relu(pi_mag)  # L_reconstruct reaches W_gate, b_gate here
        return Encoding(f=f, gate_acts=gate_acts, fired=fired, pre_acts=pi_gate, pi_mag=pi_mag)

    def magnitude_bias(self) -> Tensor:
        """b_mag; under no_shift the tied exp(r_mag) * b_gate (docs/method.md sec. 5)."""
        if self.weight_sharing == "no_shift":
            return torch.exp(self.r_mag) * self.b_gate
        return self.b_mag

    def jumprelu_threshold(self) -> Tensor:
        """With weight sharing the encoder is a JumpReLU (docs/method.md sec. 1, appendix E)."""
        return self.magnitude_bias() - torch.exp(self.r_mag) * self.b_gate

    @classmethod
    def encoder_matrices(cls, sae_cfg) -> int:
        return 2 if sae_cfg.weight_sharing == "untied" else 1  # W_enc (and W_mag)

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.sae.gate == "sigmoid" and cfg.loss.aux.enabled:
            raise UserError("sae.gate=sigmoid trains the gate through the reconstruction, "
                            "without the aux term (docs/method.md sec. 5): set "
                            "loss.aux.enabled=false")

    @classmethod
    def saelens_weights(cls, sae_cfg: dict, weights: dict[str, Tensor]) -> dict[str, Tensor]:
        if sae_cfg.get("weight_sharing") == "untied":
            raise UserError("sae.weight_sharing=untied has its own W_mag, which SAELens's gated "
                            "format (W_mag = W_enc * exp(r_mag)) cannot hold: nothing written")
        if sae_cfg.get("weight_sharing") == "no_shift":  # b_mag is tied, not stored
            weights = {**weights, "sae.b_mag": torch.exp(weights["sae.r_mag"]) *
                       weights["sae.b_gate"]}
        return super().saelens_weights(sae_cfg, weights)
