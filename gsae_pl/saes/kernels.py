"""Fast gated encoder and sparse decoder: hand-written backward passes.

Why not plain autograd (the reference in `GatedSAE.encode_reference`):
- autograd differentiates x_cent = x - b_dec with a full [B, d_sae] x [d_sae, d_in] matmul;
  b_dec only needs the batch sum of that, so here it is (sum_B grad_pre) @ W_enc^T, a
  vector-matrix product. That leaves the 7 matmuls a gated step cannot avoid (the bound).
- every gradient of the gated step vanishes off the gate's support {pi_gate > 0}:
  f = 1[pi_gate > 0] ReLU(pi_mag) and ReLU(pi_gate) are both zero there, whatever the
  upstream gradient. So with few active features, the decoder products (two forward, three
  backward) and the encoder's weight gradient need only touch the support; the encoder
  forward alone must be dense, to find it. `SparseCodes` carries (f, ReLU(pi_gate)) as two
  value vectors on that one shared CSR pattern.
Both paths are checked against the reference, values and gradients, in tests/test_kernels.py.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import Tensor
from torch.amp import custom_bwd, custom_fwd
from torch.autograd import Function

# CSR support is marked beta; the ops used here are checked against dense in the tests.
# Under bf16 autocast (GPU, `trainer.precision=bf16-mixed`) the matmuls run in bf16 while the
# parameters, and so the thresholds b_gate / b_mag, stay fp32 masters: pi_gate = bf16 pre +
# fp32 b_gate is computed in fp32. custom_fwd/custom_bwd replay the forward's autocast state
# in the backward.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


class SparseCodes(NamedTuple):
    """A [n_rows, n_features] matrix in CSR form: row pointers, column ids, values."""

    crow: Tensor
    col: Tensor
    values: Tensor
    n_rows: int
    n_features: int

    def csr(self, values: Tensor | None = None) -> Tensor:
        values = self.values if values is None else values
        return torch.sparse_csr_tensor(self.crow, self.col, values,
                                       (self.n_rows, self.n_features), check_invariants=False)

    def row_ids(self) -> Tensor:
        counts = self.crow[1:] - self.crow[:-1]
        return torch.repeat_interleave(torch.arange(self.n_rows, device=self.col.device), counts)


# ---- dense pointwise maths, eager or fused by torch.compile (see `pointwise`) ------------
def _gated_forward(pre: Tensor, b_gate: Tensor, scale: Tensor, b_mag: Tensor):
    """f, ReLU(pi_gate) and per-feature fire counts from pre = (x - b_dec) @ W_enc."""
    pi_gate = pre + b_gate
    f = torch.where(pi_gate > 0, torch.relu(pre * scale + b_mag), 0.0)
    return f, torch.relu(pi_gate), (f != 0).sum(0)


def _gated_backward(grad_f, grad_gate_acts, pre, b_gate, scale, b_mag):
    """dL/d pre, its batch sum, and the batch sums that are the bias and r_mag gradients."""
    gate = (pre + b_gate) > 0
    grad_mag = torch.where(gate & ((pre * scale + b_mag) > 0), grad_f, 0.0)  # dL/d pi_mag
    grad_gate = torch.where(gate, grad_gate_acts, 0.0)  # dL/d pi_gate
    grad_pre = grad_gate + grad_mag * scale
    return (grad_pre, grad_pre.sum(0), grad_gate.sum(0), (grad_mag * pre).sum(0) * scale,
            grad_mag.sum(0))


# Each eager line above is a pass over [B, d_sae] into a fresh buffer; on CPU the fresh
# buffer's page faults cost more than the arithmetic. torch.compile fuses each function into
# one loop (measured in benchmarks/RESULTS.md), at a one-time compile cost of ~20 s.
_COMPILED: dict = {}
COMPILE_MIN_ELEMENTS = 1 << 22  # `auto` compiles from B * d_sae = 4M elements up


def pointwise(fn, n_elements: int, mode: str):
    """`fn` itself, or its torch.compile'd twin (mode: auto | always | never)."""
    if mode == "never" or (mode == "auto" and n_elements < COMPILE_MIN_ELEMENTS):
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


class GatedEncodeDense(Function):
    """(x, W_enc, b_dec, b_gate, r_mag, b_mag) -> (f, ReLU(pi_gate), fired), dense."""

    @staticmethod
    @custom_fwd(device_type="cuda")
    def forward(ctx, x, W_enc, b_dec, b_gate, r_mag, b_mag, compile_mode="never"):
        x_cent = x - b_dec
        pre = x_cent @ W_enc
        scale = torch.exp(r_mag)
        ctx.compile_mode = compile_mode
        fwd = pointwise(_gated_forward, pre.numel(), compile_mode)
        f, gate_acts, fired = fwd(pre, b_gate, scale, b_mag)
        ctx.save_for_backward(x_cent, W_enc, pre, b_gate, scale, b_mag)
        ctx.mark_non_differentiable(fired)
        return f, gate_acts, fired

    @staticmethod
    @custom_bwd(device_type="cuda")
    def backward(ctx, grad_f, grad_gate_acts, _fired):
        x_cent, W_enc, pre, b_gate, scale, b_mag = ctx.saved_tensors
        bwd = pointwise(_gated_backward, pre.numel(), ctx.compile_mode)
        grad_pre, *sums = bwd(grad_f, grad_gate_acts, pre, b_gate, scale, b_mag)
        return _encoder_grads(ctx, x_cent, W_enc, grad_pre, *sums) + (None,)


def _relu_forward(pre: Tensor, b_enc: Tensor):
    f = torch.relu(pre + b_enc)
    return f, (f != 0).sum(0)


def _relu_backward(grad_f: Tensor, f: Tensor):
    grad_pre = torch.where(f > 0, grad_f, 0.0)
    grad_sum = grad_pre.sum(0)
    return grad_pre, grad_sum, grad_sum


class ReLUEncodeDense(Function):
    """Baseline encoder (x, W_enc, b_dec, b_enc) -> (f, fired): the same centring shortcut."""

    @staticmethod
    @custom_fwd(device_type="cuda")
    def forward(ctx, x, W_enc, b_dec, b_enc, compile_mode="never"):
        x_cent = x - b_dec
        pre = x_cent @ W_enc
        ctx.compile_mode = compile_mode
        f, fired = pointwise(_relu_forward, pre.numel(), compile_mode)(pre, b_enc)
        ctx.save_for_backward(x_cent, W_enc, f)
        ctx.mark_non_differentiable(fired)
        return f, fired

    @staticmethod
    @custom_bwd(device_type="cuda")
    def backward(ctx, grad_f, _fired):
        x_cent, W_enc, f = ctx.saved_tensors
        bwd = pointwise(_relu_backward, f.numel(), ctx.compile_mode)
        grad_pre, grad_pre_sum, grad_b_enc = bwd(grad_f, f)
        g_x, g_W, g_b_dec, g_b_enc, _, _ = _encoder_grads(
            ctx, x_cent, W_enc, grad_pre, grad_pre_sum, grad_b_enc, None, None)
        return g_x, g_W, g_b_dec, g_b_enc, None


def _encoder_grads(ctx, x_cent, W_enc, grad_pre, grad_pre_sum, g_b_gate, g_r_mag, g_b_mag):
    """Gradients of (x, W_enc, b_dec, b_gate, r_mag, b_mag), each only if needed.

    grad_pre (dL/d pre) is dense or SparseCodes; b_dec's gradient through the centring is
    -(sum over the batch of grad_pre) @ W_enc^T, a vector-matrix product.
    """
    need = ctx.needs_input_grad
    sparse = isinstance(grad_pre, SparseCodes)
    g_x = g_W = g_b_dec = None
    if need[0]:
        g_x = (grad_pre.csr() if sparse else grad_pre) @ W_enc.t()
    if need[1]:
        g_W = _sparse_t_matmul(grad_pre, x_cent).t() if sparse else x_cent.t() @ grad_pre
    if need[2]:
        g_b_dec = -(grad_pre_sum @ W_enc.t())
    g_r_mag = g_r_mag if len(need) > 4 and need[4] else None
    return g_x, g_W, g_b_dec, g_b_gate, g_r_mag, g_b_mag


def _sparse_t_matmul(codes: SparseCodes, dense: Tensor) -> Tensor:
    """codes^T @ dense, [n_features, d]: touches only the stored entries."""
    return torch.sparse.mm(codes.csr().t(), dense)


class GatedEncodeSparse(Function):
    """Like GatedEncodeDense, but returns values of f and ReLU(pi_gate) on the support.

    Outputs (f_values, gate_values, crow, col, fired); crow and col give the CSR pattern,
    fired counts the rows where each feature's f is non-zero.
    """

    @staticmethod
    @custom_fwd(device_type="cuda")
    def forward(ctx, x, W_enc, b_dec, b_gate, r_mag, b_mag):
        x_cent = x - b_dec
        pi_gate = torch.addmm(b_gate, x_cent, W_enc)
        support = pi_gate > 0
        crow = torch.zeros(x.shape[0] + 1, dtype=torch.int64, device=x.device)
        torch.cumsum(support.sum(1), 0, out=crow[1:])
        col = support.nonzero()[:, 1]
        gate_values = pi_gate[support]  # row-major order: matches (crow, col)
        scale = torch.exp(r_mag)
        pre_values = gate_values - b_gate[col]
        mag_values = pre_values * scale[col] + b_mag[col]
        f_values = torch.relu(mag_values)
        fired = torch.bincount(col[f_values > 0], minlength=W_enc.shape[1])
        ctx.save_for_backward(x_cent, W_enc, crow, col, pre_values, mag_values, scale)
        ctx.shape = (x.shape[0], W_enc.shape[1])
        ctx.mark_non_differentiable(crow, col, fired)
        return f_values, gate_values, crow, col, fired

    @staticmethod
    @custom_bwd(device_type="cuda")
    def backward(ctx, grad_f_values, grad_gate_values, _crow, _col, _fired):
        x_cent, W_enc, crow, col, pre_values, mag_values, scale = ctx.saved_tensors
        n_features = ctx.shape[1]
        grad_mag = torch.where(mag_values > 0, grad_f_values, 0.0)
        grad_pre_values = grad_gate_values + grad_mag * scale[col]
        per_feature = lambda v: torch.zeros(n_features, dtype=v.dtype,  # noqa: E731
                                            device=v.device).index_add_(0, col, v)
        grad_pre = SparseCodes(crow, col, grad_pre_values, *ctx.shape)
        return _encoder_grads(ctx, x_cent, W_enc, grad_pre, per_feature(grad_pre_values),
                              per_feature(grad_gate_values),
                              per_feature(grad_mag * pre_values) * scale,
                              per_feature(grad_mag))


class SparseDecode(Function):
    """codes @ W: the forward product and both backward products touch only the support."""

    @staticmethod
    @custom_fwd(device_type="cuda")
    def forward(ctx, values, W, crow, col, n_rows):
        codes = SparseCodes(crow, col, values, n_rows, W.shape[0])
        ctx.save_for_backward(values, W, crow, col)
        ctx.n_rows = n_rows
        return codes.csr() @ W

    @staticmethod
    @custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        values, W, crow, col = ctx.saved_tensors
        codes = SparseCodes(crow, col, values, ctx.n_rows, W.shape[0])
        grad_values = grad_W = None
        if ctx.needs_input_grad[0]:  # (grad_out @ W^T) sampled on the support
            grad_values = torch.sparse.sampled_addmm(
                codes.csr(torch.zeros_like(values)), grad_out, W.t()).values()
        if ctx.needs_input_grad[1]:
            grad_W = _sparse_t_matmul(codes, grad_out)
        return grad_values, grad_W, None, None, None


def decode_sparse(codes: SparseCodes, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    return SparseDecode.apply(codes.values, W_dec, codes.crow, codes.col, codes.n_rows) + b_dec


def encode_gated_sparse(x, W_enc, b_dec, b_gate, r_mag, b_mag):
    """(f, ReLU(pi_gate)) as SparseCodes on one shared pattern, and the fired counts."""
    f_values, gate_values, crow, col, fired = GatedEncodeSparse.apply(
        x, W_enc, b_dec, b_gate, r_mag, b_mag)
    shape = (x.shape[0], W_enc.shape[1])
    return SparseCodes(crow, col, f_values, *shape), SparseCodes(crow, col, gate_values, *shape), \
        fired


# ---- what loss terms and metrics call, for dense tensors and SparseCodes alike ----------
def decode_codes(codes: Tensor | SparseCodes, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    if isinstance(codes, SparseCodes):
        return decode_sparse(codes, W_dec, b_dec)
    return codes @ W_dec + b_dec


def mean_row_sum(codes: Tensor | SparseCodes, weights: Tensor | None = None) -> Tensor:
    """Mean over rows of sum_i codes_i * weights_i (the L1 norm for non-negative codes)."""
    if isinstance(codes, SparseCodes):
        values = codes.values if weights is None else codes.values * weights[codes.col]
        return values.sum() / codes.n_rows
    weighted = codes if weights is None else codes * weights
    return weighted.sum(-1).mean()
