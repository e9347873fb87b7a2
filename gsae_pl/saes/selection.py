"""What the selection SAEs share (TopK, BatchTopK, and their subclasses): one encoder,
z = (x - b_dec) @ W_enc + b_enc, a support chosen from z by a rule rather than a penalty,
f = ReLU(z) on that support, and the fast path that exploits it (docs/method.md sec. 1).

Why a fast path: the support has a known, small size (k per row, or k * B per batch), so
every product after the encoder's forward can touch the support only, as in the gated
sparse path (saes/kernels.py):
- decoder forward and both decoder backward products: `SparseDecode` on `SparseCodes`;
- the encoder's weight gradient x_cent^T @ grad_z: grad_z vanishes off the support (f does
  not depend on z there), so it is a sparse [d_sae, B] x [B, d_in] product
  (`Pattern.t_matmul`), never a dense [B, d_sae] gradient;
- b_enc's gradient: grad_z summed per feature on the support; b_dec's through the centring:
  -(that sum) @ W_enc^T, a vector-matrix product (the kernels.py shortcut).
So a step costs one dense matmul (the encoder forward, which must see every z to choose)
plus products of size nnz * d_in. `SupportGather` is that backward; `encode_reference` is
the plain-autograd definition it is tested against (tests/saes/test_topk.py).

The support is a `Pattern` from the subclass's `select(z)`; the values ReLU(z) on it are
`SparseCodes`. Selection (and `fired`) run in fp32 with autocast off, as the gated sparse
path does, so both paths choose the same support under bf16 too.

Dead-latent state for AuxK (losses/auxk.py): `tokens_since_fired` [d_sae] int64, a buffer,
so checkpoints and exact resume keep it. Each training forward that builds a graph adds
the global batch's rows and zeroes the features that fired on any process's rows
(gsae_pl/collectives.py): the same counts on every process and in a 1-process run. Forward
passes without a graph (evaluation, the resampler's draws) leave it alone.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd import Function

from gsae_pl.collectives import all_sum, world_size
from gsae_pl.saes.base import FAST_FIELDS, SAE, Encoding
from gsae_pl.saes.kernels import Pattern, SparseCodes, _encoder_grads, _fp32


class SupportGather(Function):
    """z on the support, given its values (computed without a graph), with the sparse
    backward of z = (x - b_dec) @ W_enc + b_enc: gradients of x, W_enc, b_dec, b_enc."""

    @staticmethod
    @_fp32
    def forward(ctx, x, W_enc, b_dec, b_enc, values, pattern):
        ctx.save_for_backward(x, W_enc, b_dec)
        ctx.pattern = pattern
        return values.clone()

    @staticmethod
    @_fp32
    def backward(ctx, grad_values):
        x, W_enc, b_dec = ctx.saved_tensors
        pattern = ctx.pattern
        per_feature = torch.zeros(pattern.shape[1], dtype=grad_values.dtype,
                                  device=grad_values.device).index_add_(0, pattern.col,
                                                                        grad_values)
        g_x, g_W, g_b_dec, g_b_enc, _, _ = _encoder_grads(
            ctx, x - b_dec, W_enc, SparseCodes(pattern, grad_values), per_feature,
            per_feature if ctx.needs_input_grad[3] else None, None, None)
        return g_x, g_W, g_b_dec, g_b_enc, None, None


def pre_activations(x: Tensor, W_enc: Tensor, b_dec: Tensor, b_enc: Tensor) -> Tensor:
    """z = (x - b_dec) @ W_enc + b_enc with autocast off, half precision cast up to fp32 (a
    graph only if grad is on)."""
    up = lambda t: t.float() if t.dtype in (torch.bfloat16, torch.float16) else t  # noqa: E731
    with torch.autocast(x.device.type, enabled=False):
        return torch.addmm(up(b_enc), up(x) - up(b_dec), up(W_enc))


def pattern_from_mask(mask: Tensor) -> Pattern:
    """The support where the dense bool [B, d_sae] `mask` is True (rows come sorted)."""
    row, col = mask.nonzero().unbind(1)
    return Pattern(row, col, *mask.shape)


def pattern_from_columns(columns: Tensor, n_features: int) -> Pattern:
    """The support holding, in each row r, the features columns[r] ([B, k], k per row)."""
    n_rows, per_row = columns.shape
    row = torch.arange(n_rows, device=columns.device).repeat_interleave(per_row)
    col = columns.sort(dim=1).values.flatten()  # sorted within rows: a canonical CSR
    return Pattern(row, col, n_rows, n_features)


class SelectionSAE(SAE):
    """An encoder (W_enc, b_enc) whose support `select` chooses from z; f = ReLU(z) there.

    `kernel: reference` runs plain autograd; any other value the sparse path above (there
    is no dense fast path: with k << d_sae the sparse one does strictly less work).
    The Encoding's pi_gate is z; when a loss term reads it (AuxK), the fast path keeps z
    with a plain-autograd graph, which only a term that differentiates it through (AuxK
    does not: it selects on z detached and gathers with `pre_on_support`) would run.
    """

    provides = (*FAST_FIELDS, "pre_acts")
    resample_roles = {**SAE.resample_roles, "W_enc": "encoder", "b_enc": "zero"}

    def __init__(self, d_in: int, d_sae: int, unit_norm_decoder: bool = True,
                 kernel: str = "auto"):
        super().__init__(d_in, d_sae, unit_norm_decoder)
        self.kernel = kernel
        self.keep_pre = False  # set by `serve`: a term reads pi_gate
        # Gao et al. (arXiv 2406.04093) init: W_enc = W_dec^T, decoder rows of unit norm.
        self.W_enc = nn.Parameter(self.W_dec.detach().t().clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.int64))

    # ---- what a subclass defines ---------------------------------------------------------
    def select(self, z: Tensor) -> Pattern:
        """The support of f for the batch's pre-activations z [B, d_sae] (no graph)."""
        raise NotImplementedError

    def after_batch(self, fired: Tensor, rows: int) -> None:
        """State kept from training batches (a subclass may add to it): the dead counts."""
        fired_anywhere = all_sum(fired) > 0
        self.tokens_since_fired.add_(rows * world_size()).masked_fill_(fired_anywhere, 0)

    # ---- the encoder -----------------------------------------------------------------------
    def set_reads(self, reads) -> None:
        extra = set(reads) - set(FAST_FIELDS) - {"pre_acts"}
        self.reference_only = bool(extra)
        self.keep_pre = "pre_acts" in reads

    @property
    def uses_reference(self) -> bool:
        return self.reference_only or self.kernel == "reference"

    def encode(self, x: Tensor) -> Encoding:
        return self._encode(x, self.uses_reference)

    def encode_reference(self, x: Tensor) -> Encoding:
        return self._encode(x, True)

    def _encode(self, x: Tensor, reference: bool) -> Encoding:
        args = (x, self.W_enc, self.b_dec, self.b_enc)
        graph = reference or self.keep_pre
        if graph:
            z = pre_activations(*args)
            z_free = z.detach()
        else:
            with torch.no_grad():
                z_free = pre_activations(*args)
        pattern = self.select(z_free)
        if reference:  # plain autograd: f = ReLU(z) * 1[support], dense
            mask = torch.zeros_like(z_free, dtype=torch.bool)
            mask[pattern.row, pattern.col] = True
            f = torch.relu(z) * mask
            fired = (f != 0).sum(0)
        else:
            values = SupportGather.apply(*args, z_free[pattern.row, pattern.col], pattern)
            f_values = torch.relu(values)
            fired = torch.bincount(pattern.col[f_values > 0], minlength=self.d_sae)
            f = SparseCodes(pattern, f_values)
        if self.training and torch.is_grad_enabled():  # a training step, not a draw
            with torch.no_grad():
                self.after_batch(fired, x.shape[0])
        return Encoding(f=f, gate_acts=f, fired=fired, pre_acts=z if graph else None)

    def pre_on_support(self, x: Tensor, z: Tensor, pattern: Pattern) -> Tensor:
        """z (the Encoding's pi_gate) at `pattern`, differentiable: the sparse backward on
        the fast path, plain autograd on the reference path."""
        if self.uses_reference:
            return z[pattern.row, pattern.col]
        return SupportGather.apply(x, self.W_enc, self.b_dec, self.b_enc,
                                   z.detach()[pattern.row, pattern.col], pattern)

    def dead(self, dead_tokens: int) -> Tensor:
        """Features that fired on no training row over the last `dead_tokens` tokens."""
        return self.tokens_since_fired >= dead_tokens

    @classmethod
    def saelens_weights(cls, sae_cfg: dict, weights: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: weights[f"sae.{name}"] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
