"""JumpReLU SAE (docs/method.md sec. 1; Rajamanoharan et al. 2024b, arXiv 2407.14435).

    z     = (x - b_dec) @ W_enc + b_enc
    f     = JumpReLU_theta(z) = z * H(z - theta)      (theta > 0, one threshold per feature)
    x_hat = f @ W_dec + b_dec
    L     = ||x - x_hat||^2 / d_in + lambda * sum_i H(z_i - theta_i)    (jumprelu_penalty l0)

H has a zero derivative wherever it has one, so neither term would move theta. The paper's
pseudo-derivatives (its eqs. 11-12), with the rectangle kernel K(u) = 1[|u| < 1/2] and
bandwidth eps, are the backward passes of the two Functions below:
    JumpReLU  d/dz := H(z - theta)     d/dtheta := -(theta / eps) K((z - theta) / eps)
    Step      d/dz := 0                d/dtheta := -(1 / eps) K((z - theta) / eps)
So the encoder learns from the reconstruction through the active features alone, and theta
from both terms, only on rows whose z falls within eps / 2 of it.

theta is a parameter of its own, directly (not log theta: under Adam a log threshold moves
by ~lr * theta per step and L0 stalls, SAELens #494/#382), projected onto theta >= 0 after
each optimiser step, and kept in fp32 whatever the module is cast to (a bf16 threshold
rounds Adam's small steps away). Under bf16 autocast z = bf16 matmul + fp32 b_enc is fp32,
and the Functions compare in fp32 in any case.

`sae.bandwidth` and `sae.threshold_init` are in the paper's units (activations scaled to
E||x||^2 = 1); gsae_pl trains on E||x||^2 = d_in (docs/method.md sec. 4), so the SAE uses
them times sqrt(d_in).

The threshold's lr. Adam moves a parameter by about lr per step whatever the size of its
gradient, so theta can rise by at most ~lr per step, and a larger L0 coefficient does not
make it rise faster. On gsae_pl's scale z is sqrt(d_in) times the paper's, so at the same
lr theta crossed the pre-activations sqrt(d_in) times slower than in the paper and L0
stalled (docs/method.md sec. 1; measured in docs/RESULTS.md, "JumpReLU's stalled L0").
theta therefore gets an optimiser group of its own at lr x `sae.threshold_lr_scale` (null:
sqrt(d_in), the paper's dynamics; 1: the behaviour before).

One path, plain autograd through the Functions; exported as
SAELens's `jumprelu` SAE (W_enc, b_enc, threshold, W_dec, b_dec).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn
from torch.autograd import Function

from gsae_pl.errors import UserError
from gsae_pl.ranges import POSITIVE_OR_NULL
from gsae_pl.saes.base import ARCHITECTURES, SAE, Encoding


def _fp32(t: Tensor) -> Tensor:
    """t in fp32 when it is a half type (bf16 autocast); fp32 and fp64 as they are."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def rectangle(u: Tensor) -> Tensor:
    """K(u) = 1[|u| < 1/2], in u's dtype."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def _save(ctx, z: Tensor, threshold: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """What both Functions' backward passes read: z and theta in fp32, and eps."""
    z, threshold = _fp32(z), _fp32(threshold)
    ctx.save_for_backward(z, threshold)
    ctx.eps = eps
    return z, threshold


class JumpReLU(Function):
    """(z, theta, eps) -> z * H(z - theta), with the paper's pseudo-derivative for theta."""

    @staticmethod
    def forward(ctx, z: Tensor, threshold: Tensor, eps: float) -> Tensor:
        z, threshold = _save(ctx, z, threshold, eps)
        return z * (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        z, threshold = ctx.saved_tensors
        g = _fp32(g)
        grad_z = g * (z > threshold).to(z.dtype)
        kernel = rectangle((z - threshold) / ctx.eps)
        grad_threshold = (-(threshold / ctx.eps) * kernel * g).sum(0)  # summed over rows
        return grad_z, grad_threshold, None


class Step(Function):
    """(z, theta, eps) -> H(z - theta): no gradient to z, the paper's one to theta."""

    @staticmethod
    def forward(ctx, z: Tensor, threshold: Tensor, eps: float) -> Tensor:
        z, threshold = _save(ctx, z, threshold, eps)
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        z, threshold = ctx.saved_tensors
        kernel = rectangle((z - threshold) / ctx.eps)
        grad_threshold = (-(1.0 / ctx.eps) * kernel * _fp32(g)).sum(0)
        return None, grad_threshold, None


# What loss.sparsity penalises (through Encoding.gate_acts): the paper's L0 through Step,
# or ||f||_1 for comparison (the JumpReLU forward with an L1 penalty, no STE on the L0).
PENALTIES = ("l0", "l1")


@dataclass
class JumpReLUConfig:
    # eps of the pseudo-derivatives, in the paper's units (E||x||^2 = 1); x sqrt(d_in) here
    bandwidth: float = field(default=0.001, metadata={"range": "positive"})
    # theta at init and at a resample, in the paper's units; x sqrt(d_in) here
    threshold_init: float = field(default=0.001, metadata={"range": "positive"})
    jumprelu_penalty: str = field(default="l0", metadata={"choices": PENALTIES})
    # theta's lr, as a multiple of optim.lr; null: sqrt(d_in), so that theta moves as far
    # per Adam step relative to z as in the paper's units (docstring: "The threshold's lr")
    threshold_lr_scale: Optional[float] = field(default=None, metadata=POSITIVE_OR_NULL)


@ARCHITECTURES.register("jumprelu")
class JumpReLUSAE(SAE):
    """Parameters W_enc, b_enc, threshold, W_dec, b_dec; no gate for the aux term."""

    Config = JumpReLUConfig
    provides = ("f", "gate_acts", "fired", "pre_acts")
    resample_roles = {**SAE.resample_roles, "W_enc": "encoder", "b_enc": "zero",
                      "threshold": "init"}
    bias_parameters = ("b_enc", "threshold")  # histograms (run/bias_histograms.py)
    saelens = "jumprelu"

    def __init__(self, d_in: int, d_sae: int, unit_norm_decoder: bool = True, **own):
        super().__init__(d_in, d_sae, unit_norm_decoder)
        own = self.Config(**own)  # the defaults of its sae. fields: there alone
        # The paper's units to gsae_pl's: x is sqrt(d_in) times larger here (sec. 4).
        self.eps = own.bandwidth * math.sqrt(d_in)
        self.theta_init = own.threshold_init * math.sqrt(d_in)
        self.jumprelu_penalty = own.jumprelu_penalty
        self.threshold_lr_scale = math.sqrt(d_in) if own.threshold_lr_scale is None \
            else float(own.threshold_lr_scale)
        self.W_enc = nn.Parameter(self.W_dec.detach().t().clone())  # the paper's init
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.threshold = nn.Parameter(torch.full((d_sae,), self.theta_init))

    def encode(self, x: Tensor) -> Encoding:
        z = (x - self.b_dec) @ self.W_enc + self.b_enc
        f = JumpReLU.apply(z, self.threshold, self.eps)
        gate_acts = Step.apply(z, self.threshold, self.eps) \
            if self.jumprelu_penalty == "l0" else f
        return Encoding(f=f, gate_acts=gate_acts, fired=(f != 0).sum(0), pre_acts=z)

    def lr_scales(self) -> dict[str, float]:
        return {} if self.threshold_lr_scale == 1.0 else {"threshold": self.threshold_lr_scale}

    def initial_entry(self, name: str) -> float:
        """A resampled feature's threshold starts where every threshold started."""
        return {"threshold": self.theta_init}[name]

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        # SAEModule's after-step hook: also project theta onto >= 0. Below 0 the forward
        # would pass negative z (SAELens's JumpReLU, ReLU(z) * 1[z > theta], would not).
        # A projection, not a clamp in the graph: that would cut the gradient that brings
        # a threshold at 0 back up (the L0 term's, through Step).
        super().after_optimizer_step()
        self.threshold.clamp_(min=0.0)

    def _apply(self, fn, *args, **kwargs):
        # module.to(bf16) (e.g. bf16-true precision) casts every parameter: keep theta fp32.
        out = super()._apply(fn, *args, **kwargs)
        if self.threshold.dtype != torch.float32:
            self.threshold.data = self.threshold.data.float()
        return out

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.sae.jumprelu_penalty == "l0" and cfg.loss.sparsity.kind == "decoder_norm_l1":
            # sum_i ||W_dec_i|| H(z_i - theta_i): shrinking a row while scaling its f,
            # W_enc column, b_enc and theta up leaves x_hat and H unchanged and lowers the
            # penalty without end.
            raise UserError("loss.sparsity.kind=decoder_norm_l1 with sae.jumprelu_penalty=l0 "
                            "is lowered by shrinking decoder rows alone: use "
                            "loss.sparsity.kind=l1 (the plain L0) or sae.jumprelu_penalty=l1")
