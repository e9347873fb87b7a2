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


def active_entries(f) -> tuple[Tensor, Tensor]:
    """(row, feature) index pairs of the non-zero entries of codes `f`: a dense [B, d_sae]
    tensor or the sparse path's SparseCodes (its `pattern` holds row and col)."""
    if hasattr(f, "pattern"):
        nonzero = f.values != 0
        return f.pattern.row[nonzero], f.pattern.col[nonzero]
    return f.detach().nonzero(as_tuple=True)


# GroupSums' columns, per group: what the held-out metrics and their standard errors need
# (gsae_pl/eval/document_stats.py).
GROUP_COLUMNS = ("rows", "sq_err", "x_sq", "x_hat_sq", "x_hat_dot_x", "l0_sum")


class GroupSums(Metric):
    """Per group of rows (a held-out document; typical vs outlier rows), the sums of
    GROUP_COLUMNS and of x, in float64; `compute` gives them summed over processes."""

    full_state_update = False

    def __init__(self, n_groups: int, d_in: int):
        super().__init__()
        self.add_state("sums", torch.zeros(n_groups, len(GROUP_COLUMNS), dtype=torch.float64),
                       dist_reduce_fx="sum")
        self.add_state("x_sum", torch.zeros(n_groups, d_in, dtype=torch.float64),
                       dist_reduce_fx="sum")

    def update(self, x: Tensor, x_hat: Tensor, active_rows: Tensor, groups: Tensor) -> None:
        """`active_rows`: the row index of each non-zero code entry; `groups` [B]: each
        row's group in 0..n_groups-1."""
        x, x_hat = _at_least_fp32(x.detach()), _at_least_fp32(x_hat.detach())
        groups = groups.to(x.device).long()
        l0 = torch.bincount(active_rows.to(x.device), minlength=x.shape[0])
        per_row = torch.stack([torch.ones(x.shape[0], device=x.device, dtype=x.dtype),
                               (x - x_hat).pow(2).sum(1), x.pow(2).sum(1),
                               x_hat.pow(2).sum(1), (x_hat * x).sum(1), l0.to(x.dtype)], 1)
        self.sums.index_add_(0, groups, per_row.double())
        self.x_sum.index_add_(0, groups, x.double())

    def compute(self) -> tuple[Tensor, Tensor]:
        return self.sums, self.x_sum


class FiringDocuments(Metric):
    """Per feature, the lowest and highest document it fired in (n_documents and -1: never),
    reduced over processes by min and max. A feature fired in one document alone where the
    two agree: the dead fraction's jackknife needs, per document, how many such features
    it holds (gsae_pl/eval/document_stats.py), not a [documents, d_sae] count matrix."""

    full_state_update = False

    def __init__(self, n_documents: int, d_sae: int):
        super().__init__()
        self.n_documents = n_documents
        self.add_state("first", torch.full((d_sae,), n_documents, dtype=torch.long),
                       dist_reduce_fx="min")
        self.add_state("last", torch.full((d_sae,), -1, dtype=torch.long), dist_reduce_fx="max")

    def update(self, active_rows: Tensor, active_features: Tensor, documents: Tensor) -> None:
        docs = documents.to(active_rows.device).long()[active_rows]
        features = active_features.to(self.first.device)
        self.first.scatter_reduce_(0, features, docs.to(self.first.device), "amin")
        self.last.scatter_reduce_(0, features, docs.to(self.last.device), "amax")

    def compute(self) -> Tensor:
        """float64 [n_documents]: the features that fired in that document and no other."""
        alone = (self.first == self.last) & (self.last >= 0)
        return torch.bincount(self.first[alone], minlength=self.n_documents).double()


class OutlierShare(Metric):
    """The share of held-out rows, and of their summed squared norm, that are outliers
    (data/outliers.py), summed over processes."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        for name in ("rows", "outlier_rows", "sq_norm", "outlier_sq_norm"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, rows: Tensor, outlier: Tensor) -> None:
        sq_norm = rows.detach().double().pow(2).sum(1)
        self.rows += rows.shape[0]
        self.outlier_rows += outlier.sum(dtype=torch.float64)
        self.sq_norm += sq_norm.sum()
        self.outlier_sq_norm += sq_norm[outlier].sum()

    def compute(self) -> dict[str, Tensor]:
        return {"outlier_row_fraction": self.outlier_rows / self.rows.clamp_min(1),
                "outlier_norm_fraction": self.outlier_sq_norm / self.sq_norm.clamp_min(
                    torch.finfo(torch.float64).tiny)}
