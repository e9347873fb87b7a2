"""Reconstruction on held-out rows (docs/method.md sec. 6): L0, MSE, FVU, gamma, the norm
ratio E||x_hat||^2 / E||x||^2, the dead and dense fractions, and the log10 feature-density
histogram (TensorBoard only); the standard errors of L0, FVU, gamma, the norm ratio and the
dead fraction, clustered by held-out document, and the per-document sums behind them
(gsae_pl/eval/document_stats.py); FVU and gamma on typical and on outlier rows apart
(data/outliers.py), when outliers are not left out of the run."""

from __future__ import annotations

import torch

from gsae_pl.data.base import heldout_documents
from gsae_pl.eval import document_stats
from gsae_pl.eval.base import EVALUATORS, Evaluator
from gsae_pl.eval.metrics import (
    GROUP_COLUMNS,
    FeatureDensity,
    FiringDocuments,
    GroupSums,
    ReconstructionMetrics,
    active_entries,
)


@EVALUATORS.register("reconstruction")
class Reconstruction(Evaluator):
    def __init__(self, settings, cfg, d_in, source):
        super().__init__(settings, cfg, d_in, source)
        self.recon = ReconstructionMetrics(d_in)
        self.density = FeatureDensity(cfg.sae.d_sae)
        self.d_sae = int(cfg.sae.d_sae)
        # The held-out documents' ids, sorted: a row's document becomes its index here.
        self.document_ids = heldout_documents(source, int(cfg.eval.rows)).unique()
        self.documents = GroupSums(len(self.document_ids), d_in)
        self.firing = FiringDocuments(len(self.document_ids), self.d_sae)
        self.split = GroupSums(2, d_in)  # typical rows, outlier rows
        self.outliers_left_out = float(cfg.data.get("outlier_norm_ratio", 0.0)) > 0
        self._table: dict | None = None

    def update(self, x, x_hat, enc) -> None:
        # Without documents (a caller outside the validation loop): blocks of rows.
        self.update_batch(x, x_hat, enc, None)

    def update_batch(self, x, x_hat, enc, batch) -> None:
        self.recon.update(x, x_hat, enc.fired)
        self.density.update(enc.fired, x.shape[0])
        rows, features = active_entries(enc.f)
        if batch is None:
            documents = torch.zeros(x.shape[0], dtype=torch.long)
            outlier = torch.zeros(x.shape[0], dtype=torch.bool)
        else:
            ids = self.document_ids.to(batch.documents.device)
            # contiguous: under DDP a process's ids are a strided slice of the global ones
            documents = torch.searchsorted(ids, batch.documents.contiguous()).clamp_max(
                len(ids) - 1)
            outlier = batch.outlier
        self.documents.update(x, x_hat, rows, documents)
        self.firing.update(rows, features, documents)
        self.split.update(x, x_hat, rows, outlier.long())

    def compute(self, ctx) -> dict:
        values = dict(self.recon.compute())
        # The histogram goes where the training window's does; the summary is returned.
        values.update(ctx.log_histogram("val", self.density.compute()))
        sums, x_sum = (t.detach().cpu().numpy() for t in self.documents.compute())
        dead = int((self.density.compute() == 0).sum())
        table = {"document": self.document_ids.numpy(),
                 **{key: sums[:, i] for i, key in enumerate(GROUP_COLUMNS)},
                 "x_sum": x_sum, "only_here": self.firing.compute().cpu().numpy(),
                 "d_sae": self.d_sae, "dead_features": dead,
                 "norm_scale": float(ctx.norm_scale)}
        self._table = table
        values.update(document_stats.reconstruction_ses(table))
        if not self.outliers_left_out:
            values.update(split_metrics(*self.split.compute()))
        return values

    def document_table(self) -> dict | None:
        return self._table


def split_metrics(sums: torch.Tensor, x_sum: torch.Tensor) -> dict[str, float]:
    """fvu_ and gamma_ of typical rows (group 0) and outlier rows (group 1). A part's FVU is
    its summed squared error over its summed ||x - mean(x)||^2, mean(x) over ALL held-out
    rows, so the two parts' denominators add up to FVU's (docs/method.md sec. 6); a part
    with no rows has none."""
    sums, x_sum = sums.double().cpu(), x_sum.double().cpu()
    col = {key: sums[:, i] for i, key in enumerate(GROUP_COLUMNS)}
    n = float(col["rows"].sum())
    if n == 0:
        return {}
    mean = x_sum.sum(0) / n
    out = {}
    for part, name in enumerate(("typical", "outlier")):
        rows = float(col["rows"][part])
        if rows == 0:
            continue
        spread = float(col["x_sq"][part] - 2 * x_sum[part] @ mean + rows * mean @ mean)
        if spread > 0:
            out[f"fvu_{name}"] = float(col["sq_err"][part]) / spread
        if float(col["x_hat_dot_x"][part]) != 0:
            out[f"gamma_{name}"] = float(col["x_hat_sq"][part] / col["x_hat_dot_x"][part])
    return out
