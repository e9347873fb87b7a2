"""BatchTopK SAE (Bussmann et al. 2024, arXiv 2412.06410; docs/method.md sec. 1).

Training: z = (x - b_dec) @ W_enc + b_enc; over the whole batch of B rows, the k * B largest
ReLU(z) keep their value and the rest are 0: a row may keep more or fewer than k.
Selection is by value: tau = the (k * B)-th largest ReLU(z) of the batch, and
    f = z * 1[z >= tau] * 1[z > 0]
(ties at tau are all kept: measure zero for continuous z; the 1[z > 0] is the ReLU, so a
batch with fewer than k * B positive z keeps just those).

Inference (self.training False, and export): one global threshold theta,
    f = z * 1[z > theta]                                    (a JumpReLU with one threshold)
theta estimates the smallest activation BatchTopK keeps. Decision: each training batch's
smallest kept positive activation m_t (SAELens's estimate, and Bussmann et al.'s "minimum
positive activation"); theta := m_1 on the first batch, then an exponential moving average
theta := (1 - threshold_rate) theta + threshold_rate m_t (SAELens's `topk_threshold_lr`,
0.01, but started at m_1 rather than at 0, so early evaluations are not biased low). theta
and the batch count are buffers: checkpoints and exact resume keep them. Before the first
training batch theta = 0 (f = ReLU(z)).

DDP: "the batch" is the global batch, so a 2-process run keeps the 1-process run's
selection and threshold (the project's promise for every architecture). The global
(k * B)-th value needs no all-gather of z: the global top k * B lie among each process's
own top k * B, so each process gathers the others' top k * B candidates (k * B floats per
process, not B * d_sae) and finds tau and m_t from them, identically everywhere
(gsae_pl/collectives.py). Most implementations take a per-process top k * B_local instead,
a different selection per process count.

Exported as SAELens's `jumprelu` SAE with threshold theta on every feature.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from gsae_pl.collectives import all_gather_cat, world_size
from gsae_pl.saes.base import ARCHITECTURES
from gsae_pl.saes.kernels import Pattern
from gsae_pl.saes.selection import SelectionSAE, pattern_from_mask
from gsae_pl.saes.topk import TopKConfig, refuse_penalties


@dataclass
class BatchTopKConfig(TopKConfig):
    # EMA rate of the inference threshold: theta += threshold_rate * (batch min kept - theta)
    threshold_rate: float = field(default=0.01, metadata={"range": "unit_interval"})


def batch_cut(z: Tensor, budget: int) -> tuple[Tensor, Tensor]:
    """(tau, smallest kept positive) for the global batch's top `budget` of ReLU(z), from
    every process's own top `budget` candidates; the second is nan when none is positive."""
    acts = torch.relu(z).flatten()
    local = torch.topk(acts, min(budget, acts.numel()), sorted=False).values
    candidates = all_gather_cat(local)
    kept = torch.topk(candidates, min(budget, candidates.numel()), sorted=False).values
    tau = kept.min()
    smallest = torch.where(kept > 0, kept, torch.inf).min()
    return tau, torch.where(torch.isinf(smallest), torch.nan, smallest)


@ARCHITECTURES.register("batchtopk")
class BatchTopKSAE(SelectionSAE):
    Config = BatchTopKConfig
    saelens = "jumprelu"

    def __init__(self, d_in: int, d_sae: int, unit_norm_decoder: bool = True,
                 kernel: str = "auto", **own):
        super().__init__(d_in, d_sae, unit_norm_decoder, kernel)
        own = self.Config(**own)  # the defaults of its sae. fields: there alone
        self.k, self.threshold_rate = own.k, own.threshold_rate
        self.register_buffer("threshold", torch.tensor(0.0))  # theta
        self.register_buffer("threshold_batches", torch.tensor(0, dtype=torch.int64))
        self._batch_min = None  # this training batch's m_t, until `after_batch`

    def select(self, z: Tensor) -> Pattern:
        if not self.training:
            return pattern_from_mask(z > self.threshold)
        tau, self._batch_min = batch_cut(z, self.k * z.shape[0] * world_size())
        return pattern_from_mask((z >= tau) & (z > 0))

    def after_batch(self, fired: Tensor, rows: int) -> None:
        super().after_batch(fired, rows)
        m, self._batch_min = self._batch_min, None
        if m is None:
            return
        m = m.to(self.threshold.dtype)
        # Tensor ops only (no host sync): a batch with nothing kept (m nan) changes nothing.
        seen = ~torch.isnan(m)
        first = self.threshold_batches == 0
        new = torch.where(first, m, torch.lerp(self.threshold, m, self.threshold_rate))
        self.threshold.copy_(torch.where(seen, new, self.threshold))
        self.threshold_batches.add_(seen.to(torch.int64))

    @classmethod
    def check(cls, cfg) -> None:
        refuse_penalties(cfg)

    @classmethod
    def saelens_weights(cls, sae_cfg: dict, weights: dict[str, Tensor]) -> dict[str, Tensor]:
        out = super().saelens_weights(sae_cfg, weights)
        out["threshold"] = weights["sae.threshold"].expand_as(out["b_enc"]).clone()
        return out
