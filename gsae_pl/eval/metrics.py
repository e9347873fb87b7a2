"""Metrics of docs/method.md sec. 6 as torchmetrics `Metric`s: sum-reduced states, so DDP
processes that each saw a share of the held-out rows agree on one exact value.

States are float64 sums: FVU and gamma are ratios of large sums that float32 would blur.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


def _at_least_fp32(t: Tensor) -> Tensor:
    """bf16 / fp16 as fp32, so no batch sum is rounded to 8 significant bits; others as is."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


class ReconstructionMetrics(Metric):
    """L0, MSE, FVU and the relative reconstruction bias gamma over everything seen (logged
    as `gamma`; metrics.json keeps the key `relative_reconstruction_bias`).

    mse   = E||x - x_hat||^2 / d_in   (the training loss's scale, docs/method.md sec. 4)
    fvu   = E||x - x_hat||^2 / E||x - mean(x)||^2
    gamma = E||x_hat||^2 / E[x_hat . x]   (corrected form, docs/method.md sec. 5; < 1 = shrinkage)
    norm_ratio = E||x_hat||^2 / E||x||^2  (below 1 wherever x_hat is off x's direction, even
                 at gamma = 1: the best x_hat on a line at an angle to x is shorter than x;
                 docs/method.md sec. 6)
    l0    = mean number of non-zero features per row
    """

    full_state_update = False

    def __init__(self, d_in: int):
        super().__init__()
        self.d_in = d_in
        for name in ("rows", "sq_err", "x_sq", "x_hat_sq", "x_hat_dot_x", "active"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("x_sum", torch.zeros(d_in, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, x: Tensor, x_hat: Tensor, fired: Tensor) -> None:
        """`fired`: per feature, the rows of this batch where it is non-zero (Encoding.fired).

        Batch sums in the inputs' dtype (torch sums pairwise), at least fp32, accumulated in
        float64. Counts are summed in float64: exact, where bf16 (8 significant bits) would
        round any total past 256.
        """
        x, x_hat = _at_least_fp32(x.detach()), _at_least_fp32(x_hat.detach())
        self.rows += x.shape[0]
        self.sq_err += (x - x_hat).pow(2).sum()
        self.x_sq += x.pow(2).sum()
        self.x_hat_sq += x_hat.pow(2).sum()
        self.x_hat_dot_x += (x_hat * x).sum()
        self.x_sum += x.sum(0)
        self.active += fired.sum(dtype=torch.float64)

    def compute(self) -> dict[str, Tensor]:
        total_variance = self.x_sq - self.x_sum.pow(2).sum() / self.rows
        return {
            "l0": self.active / self.rows,
            "mse": self.sq_err / (self.rows * self.d_in),
            "fvu": self.sq_err / total_variance,
            "gamma": self.x_hat_sq / self.x_hat_dot_x,
            "norm_ratio": self.x_hat_sq / self.x_sq,
        }


class FeatureDensity(Metric):
    """Per-feature firing frequency over a window of rows (dead = never fired in it)."""

    full_state_update = False

    def __init__(self, d_sae: int):
        super().__init__()
        self.add_state("fired", torch.zeros(d_sae, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("rows", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, fired: Tensor, n_rows: int) -> None:
        self.fired += fired.to(torch.float64)  # exact counts, whatever dtype they came in
        self.rows += n_rows

    def compute(self) -> Tensor:
        return self.fired / self.rows


def density_summary(density: Tensor, dense_threshold: float) -> dict[str, Tensor]:
    """Dead: fired on no row of the window. Dense: fired on more than the threshold's share."""
    return {
        "dead_fraction": (density == 0).double().mean(),
        "dense_fraction": (density > dense_threshold).double().mean(),
    }


def log10_density(density: Tensor, floor: float = 1e-10) -> Tensor:
    """log10 feature density for the histogram; dead features pile up at log10(floor)."""
    return density.clamp_min(floor).log10()
