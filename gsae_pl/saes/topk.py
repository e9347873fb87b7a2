"""TopK SAE (Gao et al. 2024, arXiv 2406.04093; docs/method.md sec. 1).

    z     = (x - b_dec) @ W_enc + b_enc
    f     = ReLU(TopK_k(z))      per row: the k largest z keep their value, the rest are 0
    x_hat = f @ W_dec + b_dec

ReLU after the selection, as Gao et al.'s released code (`relu(topk(...))`) and SAELens's
`TopK` do: a row with fewer than k positive z keeps fewer than k active features (its
selected z <= 0 become 0), never a negative activation. Decision: those selected z <= 0
stay in the support as explicit zeros (every row holds exactly k entries, so the pattern
needs no compaction); they carry no gradient (ReLU) and `fired` counts only f != 0.
Ties at the k-th value: torch.topk's choice (measure zero for continuous z).

No sparsity penalty: k sets L0 (the suite sweeps `sae.k`); `check` refuses
loss.sparsity and the gated aux term. Dead latents: the AuxK term (losses/auxk.py).
Init (Gao et al.): W_enc = W_dec^T, unit-norm decoder rows (saes/selection.py).
The fast path (saes/selection.py) touches only the k * B selected entries after the
encoder's forward. Exported as SAELens's `topk` SAE with its `k`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from gsae_pl.errors import UserError
from gsae_pl.saes.base import ARCHITECTURES
from gsae_pl.saes.kernels import Pattern
from gsae_pl.saes.selection import SelectionSAE, pattern_from_columns


@dataclass
class TopKConfig:
    # features kept per row (topk) or per row on average over the batch (batchtopk)
    k: int = field(default=32, metadata={"range": "positive"})


def refuse_penalties(cfg) -> None:
    """The selection SAEs set sparsity by k, not by a penalty (docs/method.md sec. 1)."""
    arch = cfg.sae.architecture
    if cfg.loss.sparsity.enabled:
        raise UserError(f"sae.architecture={arch} sets its sparsity by sae.k, not a penalty: "
                        "set loss.sparsity.enabled=false")
    if cfg.sae.k > cfg.sae.d_sae:
        raise UserError(f"sae.k={cfg.sae.k} exceeds sae.d_sae={cfg.sae.d_sae}: choose "
                        "sae.k <= sae.d_sae")


@ARCHITECTURES.register("topk")
class TopKSAE(SelectionSAE):
    Config = TopKConfig
    saelens = "topk"

    def __init__(self, d_in: int, d_sae: int, unit_norm_decoder: bool = True,
                 kernel: str = "auto", **own):
        super().__init__(d_in, d_sae, unit_norm_decoder, kernel)
        self.k = self.Config(**own).k  # its default: TopKConfig alone

    def select(self, z: Tensor) -> Pattern:
        return pattern_from_columns(torch.topk(z, self.k, dim=1, sorted=False).indices,
                                    self.d_sae)

    @classmethod
    def check(cls, cfg) -> None:
        refuse_penalties(cfg)

    @classmethod
    def saelens_cfg(cls, sae_cfg: dict) -> dict:
        # The selection reads z itself, never z scaled by decoder row norms.
        return {"k": int(sae_cfg["k"]), "rescale_acts_by_decoder_norm": False}
