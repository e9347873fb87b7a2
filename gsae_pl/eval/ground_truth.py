"""Recovery of known features (docs/method.md sec. 6): MMCS and the fraction of true
features recovered, on sources that know them (`true_features`, synthetic data)."""

from __future__ import annotations

from gsae_pl.data.synthetic import fraction_recovered, mmcs
from gsae_pl.eval.base import EVALUATORS, Evaluator


@EVALUATORS.register("ground_truth")
class GroundTruth(Evaluator):
    @classmethod
    def applies(cls, settings, source) -> bool:
        return source is not None and source.true_features is not None

    def __init__(self, settings, cfg, d_in, source):
        super().__init__(settings, cfg, d_in, source)
        # A plain attribute, not a buffer: the source makes it, checkpoints need not hold it.
        self.true_features = source.true_features

    def compute(self, ctx) -> dict:
        W_dec = ctx.sae.W_dec.detach()
        truth = self.true_features.to(W_dec)
        return {"mmcs": mmcs(truth, W_dec), "fraction_recovered": fraction_recovered(truth, W_dec)}
