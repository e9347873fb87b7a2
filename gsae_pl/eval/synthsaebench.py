"""SynthSAEBench's metrics (Chanin & Garriga-Alonso 2026, arXiv 2602.14687; docs/method.md
sec. 6), as SAELens 6.54's `eval_sae_on_synthetic_data` defines them, on a source that knows
its held-out rows' true feature activations (data/synthsaebench.py: `eval_features`):

- `synth_mcc`: the decoder rows matched one-to-one to the true features by the Hungarian
  algorithm on |cos|, the mean |cos| of the matched pairs;
- `synth_uniqueness`: distinct best-matching true features (argmax |cos| per latent) / d_sae;
- `synth_precision`, `synth_recall`, `synth_f1`, `synth_accuracy`: each latent as a detector
  of its best-matching feature (fires: f != 0; the feature: activation > 0), means over the
  latents of its TP / (TP + FP), TP / (TP + FN) (0 where undefined), their harmonic mean,
  (TP + TN) / rows;
- `synth_explained_variance`: 1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2), raw scale;
- `synth_l0`, `synth_true_l0`: mean active latents, mean active true features per row;
- `synth_dead_latents`: latents that fired on no held-out row (a count);
- `synth_shrinkage`: mean over rows with ||x|| > 1e-6 of ||x_hat|| / ||x||.

One pass of its own over the held-out rows (as soft_gate.py), every row of them, whatever
data.outlier_norm_ratio (the benchmark leaves none out): blocks of data.batch_size rows,
process `rank` taking every world_size-th block; the counts are summed over processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from gsae_pl.errors import UserError
from gsae_pl.eval.base import EVALUATORS, Evaluator, Settings
from gsae_pl.eval.metrics import active_entries
from gsae_pl.ranges import POSITIVE_OR_NULL

_MIN_NORM = 1e-6  # SAELens's shrinkage leaves out rows with a smaller input norm


@dataclass
class SynthSAEBenchSettings(Settings):
    rows: Optional[int] = field(default=None, metadata=POSITIVE_OR_NULL)  # null: eval.rows


def cosines(a: Tensor, b: Tensor) -> Tensor:
    """|cos| between the rows of a [m, d] and of b [n, d], as SAELens (norms clamped 1e-8)."""
    a = a / a.norm(dim=1, keepdim=True).clamp(min=1e-8)
    b = b / b.norm(dim=1, keepdim=True).clamp(min=1e-8)
    return (a @ b.T).abs()


def mcc(cos: Tensor) -> float:
    """Mean |cos| of the best one-to-one matching of rows to columns (Hungarian)."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        raise UserError("eval.synthsaebench needs scipy for the Hungarian matching: "
                        "pip install scipy, or set eval.synthsaebench.enabled=false") from None
    rows, cols = linear_sum_assignment(1 - cos.cpu().numpy())
    return float(cos[torch.as_tensor(rows), torch.as_tensor(cols)].mean())


def uniqueness(cos: Tensor) -> float:
    return len(cos.argmax(1).unique()) / cos.shape[0] if cos.shape[0] else 0.0


def classification(tp: Tensor, fp: Tensor, fn: Tensor, tn: Tensor) -> dict[str, float]:
    """Per-latent precision, recall, F1, accuracy (0 where undefined), their means."""
    precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp(min=1), 0.0)
    recall = torch.where(tp + fn > 0, tp / (tp + fn).clamp(min=1), 0.0)
    both = precision + recall
    f1 = torch.where(both > 0, 2 * precision * recall / both.clamp(min=1e-30), 0.0)
    accuracy = (tp + tn) / (tp + fp + fn + tn).clamp(min=1e-8)
    return {"synth_precision": float(precision.mean()), "synth_recall": float(recall.mean()),
            "synth_f1": float(f1.mean()), "synth_accuracy": float(accuracy.mean())}


@EVALUATORS.register("synthsaebench")
class SynthSAEBench(Evaluator):
    Settings = SynthSAEBenchSettings

    @classmethod
    def applies(cls, settings, source) -> bool:
        return (source is not None and getattr(source, "true_features", None) is not None
                and hasattr(source, "eval_features"))

    def __init__(self, settings, cfg, d_in, source):
        super().__init__(settings, cfg, d_in, source)
        self.source = source  # not an nn.Module: stays out of the SAE's state
        self.rows = int(settings.rows or cfg.eval.rows)
        self.batch_size = int(cfg.data.batch_size)

    def compute(self, ctx) -> dict:
        W_dec = ctx.sae.W_dec.detach().float()
        cos = cosines(W_dec, self.source.true_features.to(W_dec))
        best = cos.argmax(1)
        sums = self._counts(ctx, best)
        values = self._summary(sums)
        values.update(synth_mcc=mcc(cos), synth_uniqueness=uniqueness(cos))
        return values

    def _counts(self, ctx, best: Tensor) -> dict[str, Tensor]:
        """This process's blocks' sums, then summed over processes (float64 on the device)."""
        x_all, truth = self.source.eval_rows(self.rows), self.source.eval_features(self.rows)
        t_rows, t_cols = truth.indices()
        d_sae, d_in = len(best), x_all.shape[1]
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=ctx.device)
        # scalars: rows, sum |x|^2, sum |x - x_hat|^2, active latents, active true
        # features, sum of the shrinkage ratios; shrink_rows: the rows in that sum
        sums = {"tp": z(d_sae), "fp": z(d_sae), "fn": z(d_sae), "fired": z(d_sae),
                "x": z(d_in), "scalars": z(6), "shrink_rows": z(1)}
        blocks = range(0, self.rows, self.batch_size)
        with torch.no_grad():
            for k, start in enumerate(blocks):
                if k % ctx.world_size != ctx.rank:
                    continue
                stop = min(start + self.batch_size, self.rows)
                lo, hi = torch.searchsorted(t_rows, torch.tensor([start, stop])).tolist()
                gt = torch.zeros(stop - start, truth.shape[1], dtype=torch.bool)
                gt[t_rows[lo:hi] - start, t_cols[lo:hi]] = True
                self._add(sums, ctx, x_all[start:stop].to(ctx.device),
                          gt.to(ctx.device), best)
        return {k: ctx.reduce_sum(v) for k, v in sums.items()}

    def _add(self, sums, ctx, x: Tensor, gt: Tensor, best: Tensor) -> None:
        x_hat, enc = ctx.sae(x * ctx.norm_scale)
        x_hat = x_hat.float() / ctx.norm_scale
        # f is dense or, on the gated sparse path, SparseCodes: its non-zero entries
        rows, cols = active_entries(enc.f)
        fires = torch.zeros(len(x), len(best), dtype=torch.bool, device=x.device)
        fires[rows, cols] = True
        truth = gt[:, best]
        sums["tp"] += (fires & truth).sum(0)
        sums["fp"] += (fires & ~truth).sum(0)
        sums["fn"] += (~fires & truth).sum(0)
        sums["fired"] += fires.any(0)
        xd = x.double()
        sums["x"] += xd.sum(0)
        norms = x.norm(dim=1)
        kept = norms > _MIN_NORM
        ratio = (x_hat.norm(dim=1)[kept] / norms[kept]).double().sum()
        sums["scalars"] += torch.stack([
            torch.tensor(float(len(x)), dtype=torch.float64, device=x.device),
            xd.pow(2).sum(), (xd - x_hat.double()).pow(2).sum(),
            fires.sum().double(), gt.sum().double(), ratio])
        sums["shrink_rows"] += kept.sum()

    def _summary(self, sums: dict[str, Tensor]) -> dict:
        rows, sq, residual, l0, true_l0, shrink = sums["scalars"].tolist()
        total = sq / rows - float((sums["x"] / rows).pow(2).sum())
        mse = residual / rows
        ev = (1.0 if mse < 1e-10 else 0.0) if total < 1e-10 else 1 - mse / total
        tp, fp, fn = sums["tp"].cpu(), sums["fp"].cpu(), sums["fn"].cpu()
        kept = float(sums["shrink_rows"])
        return {**classification(tp, fp, fn, rows - tp - fp - fn),
                "synth_explained_variance": ev, "synth_l0": l0 / rows,
                "synth_true_l0": true_l0 / rows,
                "synth_dead_latents": int((sums["fired"] == 0).sum()),
                "synth_shrinkage": shrink / kept if kept else 0.0}
