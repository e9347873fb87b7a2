"""FVU of the sigmoid-gated SAE's soft reconstruction (docs/method.md sec. 5 and 6).

A sigmoid gate is never exactly 0, so a sigmoid-gated SAE (`sae.gate=sigmoid`) is evaluated
with its hard gate 1[pi_gate > 0]: L0, FVU and loss recovered are the hard-gated SAE's (the
one export writes). This evaluation adds what the training objective saw,

    fvu_soft_gate = E||x - x_hat_soft||^2 / E||x - mean(x)||^2,
    x_hat_soft    = (sigmoid(pi_gate / T) * ReLU(pi_mag)) @ W_dec + b_dec,

on the same held-out rows. The validation pass hands evaluators the hard encoding only, so
the soft one is computed here, in one pass of its own over this process's share of the rows
(the share the validation loop scores, rows rank::world); the sum-reduced state adds the
processes' shares up. Every other SAE yields nothing.
"""

from __future__ import annotations

import torch

from gsae_pl.eval.base import EVALUATORS, Evaluator
from gsae_pl.eval.metrics import ReconstructionMetrics


@EVALUATORS.register("soft_gate")
class SoftGate(Evaluator):
    @classmethod
    def applies(cls, settings, source) -> bool:
        return source is not None  # it reads the held-out rows from the source

    def __init__(self, settings, cfg, d_in, source):
        super().__init__(settings, cfg, d_in, source)
        self.source = source  # not an nn.Module: stays out of the SAE's state
        self.rows, self.batch_size = cfg.eval.rows, cfg.data.batch_size
        self.recon = ReconstructionMetrics(d_in)

    def compute(self, ctx) -> dict:
        sae = ctx.sae
        if getattr(sae, "gate", None) != "sigmoid":
            return {}
        rank, world = ctx.rank, ctx.world_size
        rows = self.source.eval_rows(self.rows)[rank::world]
        with torch.no_grad():
            for chunk in rows.split(self.batch_size):
                x = chunk.to(ctx.device) * ctx.norm_scale
                enc = sae.encode_reference(x, soft=True)
                self.recon.update(x, sae.decode(enc.f), enc.fired)
        return {"fvu_soft_gate": self.recon.compute()["fvu"]}
