"""AuxK (Gao et al. 2024, arXiv 2406.04093, appendix A.2; docs/method.md sec. 4): dead latents
learn to model the main reconstruction's residual.

    e      = sg(x - x_hat)                        the residual, a fixed target
    z_aux  = ReLU(TopK_{k_aux}(z restricted to the dead latents))   per row
    e_hat  = z_aux @ W_dec                        no b_dec: the residual already excludes it
    L_auxk = mean_rows ||e - e_hat||^2 / mean_rows ||e - mean_rows(e)||^2

dead: fired on no training row over the last `dead_tokens` tokens (the SAE's
`tokens_since_fired` buffer, saes/selection.py: counted over all processes, kept by
checkpoints). k_aux = min(k_aux or d_in // 2, number of dead latents) (paper: "a power of two
close to d_model / 2"); with no dead latent the term is 0.

Decisions where the paper is silent or its code differs from the text:
- normalisation: divided by the batch's variance of e, as the released code's
  `normalized_mse` does, so alpha = 1/32 keeps the paper's meaning whatever the residual's
  size; the variance is detached and taken over the global batch (one small all-reduce), so
  a 2-process run follows the 1-process one. SAELens and Bussmann et al. leave it out.
- ReLU after the selection, as the released code and the TopK activation itself.
- gradient: e is detached, so AuxK reaches only the dead latents selected: their W_dec rows,
  W_enc columns and b_enc entries, and b_dec through the centring x - b_dec (as in the
  released code); never an alive latent's parameters (tests/losses/test_auxk.py).
It reuses z from the forward pass (the Encoding's pre_acts) and, on the fast path, gathers
its values with the sparse backward (`pre_on_support`): no matmul is recomputed and no dense
[B, d_sae] gradient is formed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor

from gsae_pl.collectives import all_sum, world_size
from gsae_pl.errors import UserError
from gsae_pl.losses.base import LOSS_TERMS, TermConfig, TermSpec
from gsae_pl.ranges import NON_NEGATIVE
from gsae_pl.saes.base import ARCHITECTURES
from gsae_pl.saes.kernels import SparseCodes, decode_sparse
from gsae_pl.saes.selection import SelectionSAE, pattern_from_columns


@dataclass
class AuxKConfig(TermConfig):
    enabled: bool = False  # for the selection SAEs (topk, batchtopk), off unless asked
    coefficient: float = field(default=1 / 32, metadata=NON_NEGATIVE)  # alpha (paper)
    # dead latents modelling the residual per row; 0: d_in // 2 (paper)
    k_aux: int = field(default=0, metadata=NON_NEGATIVE)
    # dead = fired on no training row over this many tokens (paper: 10M at its scale)
    dead_tokens: int = field(default=256_000, metadata={"range": "positive"})


def residual_variance(e: Tensor) -> Tensor:
    """mean over the global batch's rows of ||e - mean(e)||^2 (detached)."""
    sums = all_sum(torch.cat([e.sum(0), e.pow(2).sum().reshape(1)]))
    n = e.shape[0] * world_size()
    mean = sums[:-1] / n
    return sums[-1] / n - mean.pow(2).sum()


def auxk_loss(x, x_hat, enc, sae, k_aux: int, dead_tokens: int) -> Tensor:
    e = (x - x_hat).detach()
    variance = residual_variance(e)  # a collective: every process, every step
    dead = sae.dead(dead_tokens)
    n_dead = int(dead.sum())
    if n_dead == 0 or not variance > 0:
        return x_hat.new_zeros(())
    z = enc.pre_acts.detach()
    k = min(k_aux or max(1, sae.d_in // 2), n_dead)
    columns = torch.topk(z.masked_fill(~dead, -torch.inf), k, dim=1, sorted=False).indices
    pattern = pattern_from_columns(columns, sae.d_sae)
    z_aux = torch.relu(sae.pre_on_support(x, enc.pre_acts, pattern))
    e_hat = decode_sparse(SparseCodes(pattern, z_aux), sae.W_dec, torch.zeros_like(sae.b_dec))
    return (e - e_hat).pow(2).sum(1).mean() / variance


def auxk_fn(block):
    return partial(auxk_loss, k_aux=block.k_aux, dead_tokens=block.dead_tokens)


def check(cfg) -> None:
    arch = cfg.sae.architecture
    cls = ARCHITECTURES[arch]
    if cfg.loss.auxk.enabled and not issubclass(cls, SelectionSAE):
        if cls.auxk_unfit:  # the L1 family: AuxK could not apply (docs/method.md sec. 4)
            raise UserError(f"loss.auxk cannot apply to sae.architecture={arch}: "
                            f"{cls.auxk_unfit}; keep its dead latents with resampling "
                            "(resample.enabled=true), and set loss.auxk.enabled=false")
        able = ", ".join(name for name, cls in ARCHITECTURES.items()
                         if issubclass(cls, SelectionSAE))
        raise UserError(f"loss.auxk needs the dead-latent counts that sae.architecture={arch} "
                        f"does not keep ({able} do): set loss.auxk.enabled=false")


LOSS_TERMS.register("auxk")(TermSpec(config=AuxKConfig, build=auxk_fn, reads=("pre_acts",),
                                     check=check))
