"""Reconstruction on held-out rows (docs/method.md sec. 6): L0, MSE, FVU, gamma, the norm
ratio E||x_hat||^2 / E||x||^2, the dead and dense fractions, and the log10 feature-density
histogram (TensorBoard only)."""

from __future__ import annotations

from gsae_pl.eval.base import EVALUATORS, Evaluator
from gsae_pl.eval.metrics import FeatureDensity, ReconstructionMetrics


@EVALUATORS.register("reconstruction")
class Reconstruction(Evaluator):
    def __init__(self, settings, cfg, d_in, source):
        super().__init__(settings, cfg, d_in, source)
        self.recon = ReconstructionMetrics(d_in)
        self.density = FeatureDensity(cfg.sae.d_sae)

    def update(self, x, x_hat, enc) -> None:
        self.recon.update(x, x_hat, enc.fired)
        self.density.update(enc.fired, x.shape[0])

    def compute(self, ctx) -> dict:
        values = dict(self.recon.compute())
        # The histogram goes where the training window's does; the summary is returned.
        values.update(ctx.log_histogram("val", self.density.compute()))
        return values
