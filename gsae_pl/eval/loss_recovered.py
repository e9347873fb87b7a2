"""Loss recovered and delta LM loss (docs/method.md sec. 6), with their standard errors:
the SAE spliced into the language model on held-out windows (maths: eval/lm_eval.py).
Only sources with a language model (`lm`) have it."""

from __future__ import annotations

from dataclasses import dataclass, field

from gsae_pl.eval import lm_eval
from gsae_pl.eval.base import EVALUATORS, Evaluator, Settings
from gsae_pl.ranges import NON_NEGATIVE


@dataclass
class LossRecoveredSettings(Settings):
    # Held-out windows to splice into. 0 evaluates nothing, as enabled=false does: it is
    # what the former eval.lm_contexts=0 meant, so such configs keep their meaning.
    contexts: int = field(default=64, metadata=NON_NEGATIVE)


@EVALUATORS.register("loss_recovered")
class LossRecovered(Evaluator):
    Settings = LossRecoveredSettings

    @classmethod
    def applies(cls, settings, source) -> bool:
        # Every source has `lm` (data/base.py): None for rows with no LM behind them.
        return settings.contexts > 0 and source is not None and source.lm is not None

    def __init__(self, settings, cfg, d_in, source):
        super().__init__(settings, cfg, d_in, source)
        self.lm = source.lm  # not an nn.Module: stays out of the SAE's state

    def compute(self, ctx) -> dict:
        rank, world = ctx.rank, ctx.world_size
        tokens, documents = self.lm.heldout_windows(self.settings.contexts)
        # One document numbering for every process, made before the windows are dealt out
        # (disjoint shares), so the processes' sums add up (lm_eval.py).
        ids, documents = documents.unique(return_inverse=True)
        n_documents = int(documents.max()) + 1
        # The spliced activation is the reconstruction on the raw scale: x_hat / norm_scale.
        sums = lm_eval.ce_sums(self.lm, tokens[rank::world],
                               ctx.reconstruct_raw, documents[rank::world], n_documents)
        sums = ctx.reduce_sum(sums.to(ctx.device)).cpu()
        self._table = {"document": ids.numpy(), **lm_eval.document_sums(sums)}
        return lm_eval.loss_recovered(sums)

    def document_table(self) -> dict | None:
        return getattr(self, "_table", None)
