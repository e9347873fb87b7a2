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
The baseline gets the same centring shortcut (`ReLUEncodeDense`). Every path is checked
against the reference, values and gradients, in tests/saes/test_kernels.py.

Under bf16 autocast (`trainer.precision=bf16-mixed`):
- the dense paths run their matmuls in bf16 while the parameters, and so the thresholds
  b_gate / b_mag, stay fp32 masters: pi_gate = bf16 pre + fp32 b_gate is computed in fp32.
  custom_fwd/custom_bwd replay the forward's autocast state in the backward.
- `fired` is counted exactly, as int64 (`_column_counts`): bf16 holds integers exactly only
  up to 256, so counts taken in bf16 come out rounded (4097 rows all firing read 4096), and
  L0, density, dead / dense fractions and resampling all read them.
- the sparse path runs wholly in fp32, autocast off (`_fp32`): CPU has no bf16 CSR product
  (addmm_out_sparse_csr_impl_mkl), and its fused addmm would add b_gate in bf16. Simpler
  than a bf16 encoder matmul with fp32 CSR products around it, and the same on every
  device; `auto` picks the sparse path on CPU only, and on GPU (`sae.kernel=sparse`, opt-in)
  it gives up the bf16 speed of its one dense matmul.
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import torch
from torch import Tensor
from torch.amp import custom_bwd, custom_fwd
from torch.autograd import Function

# CSR support is marked beta; the ops used here are checked against dense in the tests.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


class Pattern:
    """Where a [n_rows, n_features] sparse matrix is non-zero: one per batch, shared by f,
    ReLU(pi_gate) and every gradient on the support, so its transpose is sorted once."""

    def __init__(self, row: Tensor, col: Tensor, n_rows: int, n_features: int):
        self.row, self.col, self.shape = row, col, (n_rows, n_features)
        self.crow = _pointers(row, n_rows)
        self._transpose = None

    def csr(self, values: Tensor) -> Tensor:
        return torch.sparse_csr_tensor(self.crow, self.col, values, self.shape,
                                       check_invariants=False)

    def t_matmul(self, values: Tensor, dense: Tensor) -> Tensor:
        """matrix^T @ dense, [n_features, d], touching only the stored entries."""
        if self._transpose is None:
            order = torch.argsort(self.col, stable=True)
            self._transpose = (_pointers(self.col[order], self.shape[1]), self.row[order], order)
        crow_t, row_t, order = self._transpose
        return torch.sparse_csr_tensor(crow_t, row_t, values[order], self.shape[::-1],
                                       check_invariants=False) @ dense


def _pointers(sorted_ids: Tensor, n: int) -> Tensor:
    """CSR row pointers for entries whose (sorted) row ids are `sorted_ids`."""
    crow = torch.zeros(n + 1, dtype=torch.int64, device=sorted_ids.device)
    torch.cumsum(torch.bincount(sorted_ids, minlength=n), 0, out=crow[1:])
    return crow


class SparseCodes(NamedTuple):
    """A sparse [n_rows, n_features] activation matrix: values on a shared `Pattern`."""

    pattern: Pattern
    values: Tensor

    @property
    def n_rows(self) -> int:
        return self.pattern.shape[0]

    @property
    def col(self) -> Tensor:
        return self.pattern.col

    def csr(self) -> Tensor:
        return self.pattern.csr(self.values)


# ---- dense pointwise maths, eager or fused by torch.compile (see `pointwise`) ------------
def _gated_forward(pre: Tensor, b_gate: Tensor, scale: Tensor, b_mag: Tensor):
    """f, ReLU(pi_gate) and f's non-zero mask (fp32 0/1, for `_column_counts`) from
    pre = (x - b_dec) @ W_enc."""
    pi_gate = pre + b_gate
    f = torch.where(pi_gate > 0, torch.relu(pre * scale + b_mag), 0.0)
    return f, torch.relu(pi_gate), (f > 0).float()


def _gated_backward(grad_f, grad_gate_acts, pre, b_gate, scale, b_mag):
    """dL/d pre, and dL/d pi_gate, dL/d pi_mag, dL/d pi_mag * pre, whose batch sums are the
    b_gate, b_mag and r_mag gradients. Each sum is taken on its own tensor, so a term that
    cannot reach a parameter gives it exactly zero (the routing tests check exact zeros)."""
    gate = (pre + b_gate) > 0
    grad_mag = torch.where(gate & ((pre * scale + b_mag) > 0), grad_f, 0.0)  # dL/d pi_mag
    grad_gate = torch.where(gate, grad_gate_acts, 0.0)  # dL/d pi_gate
    return grad_gate + grad_mag * scale, grad_gate, grad_mag, grad_mag * pre


# Each eager line above is a pass over [B, d_sae] into a fresh buffer. torch.compile fuses
# each function into one loop, at a one-time compile cost of ~20 s (benchmarks/RESULTS.md).
# The batch sums are left out of the fused loops on purpose: inductor's column reductions
# over [B, d_sae] ran 3-4x slower than separate `sum(0)` / matrix-vector passes, measured
# at 4096 x 16384. Fresh buffers are cheap because gsae_pl/allocator.py keeps freed memory
# for reuse: with it, buffers kept from step to step measured no faster.
_COMPILED: dict = {}
COMPILE_MIN_ELEMENTS = 1 << 22  # `auto` compiles from B * d_sae = 4M elements up


def pointwise(fn, like: Tensor, mode: str, *args) -> tuple[Tensor, ...]:
    """fn(*args), eager or compiled (mode: auto | always | never; `auto` by like's size)."""
    if mode == "never" or (mode == "auto" and like.numel() < COMPILE_MIN_ELEMENTS):
        return fn(*args)
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn](*args)


class GatedEncodeDense(Function):
    """(x, W_enc, b_dec, b_gate, r_mag, b_mag) -> (f, ReLU(pi_gate), fired), dense."""

    @staticmethod
    @custom_fwd(device_type="cuda")
    def forward(ctx, x, W_enc, b_dec, b_gate, r_mag, b_mag, compile_mode="never"):
        x_cent = x - b_dec
        pre = x_cent @ W_enc
        scale = torch.exp(r_mag)
        ctx.compile_mode = compile_mode
        f, gate_acts, active = pointwise(_gated_forward, pre, compile_mode,
                                         pre, b_gate, scale, b_mag)
        fired = _column_counts(active)
        ctx.save_for_backward(x_cent, W_enc, pre, b_gate, scale, b_mag)
        ctx.mark_non_differentiable(fired)
        return f, gate_acts, fired

    @staticmethod
    @custom_bwd(device_type="cuda")
    def backward(ctx, grad_f, grad_gate_acts, _fired):
        x_cent, W_enc, pre, b_gate, scale, b_mag = ctx.saved_tensors
        grad_pre, *parts = pointwise(_gated_backward, pre, ctx.compile_mode,
                                     grad_f, grad_gate_acts, pre, b_gate, scale, b_mag)
        sum_gate, sum_mag, sum_mag_pre = (_column_sums(part) for part in parts)
        return _encoder_grads(ctx, x_cent, W_enc, grad_pre, sum_gate + sum_mag * scale,
                              sum_gate, sum_mag_pre * scale, sum_mag) + (None,)


def _column_sums(matrix: Tensor) -> Tensor:
    """Sum over the batch, [B, n] -> [n], as one matrix-vector product."""
    return (matrix.new_ones(1, matrix.shape[0]) @ matrix).squeeze(0)


def _column_counts(active: Tensor) -> Tensor:
    """Per column, the rows where the fp32 0/1 matrix `active` is 1: exact, as int64.

    Still the matrix-vector product (a bool `sum(0, dtype=int32)` took 76 ms against its
    11 ms at 4096 x 4096 on CPU), but in fp32 with autocast off: fp32 adds integers below
    2^24 exactly, in any order (TF32 rounds only the inputs, and 0/1 survive that)."""
    if active.shape[0] >= 1 << 24:
        return active.sum(0, dtype=torch.int64)
    with torch.autocast(active.device.type, enabled=False):
        return _column_sums(active).to(torch.int64)


def _fp32(method):
    """Run an autograd Function's forward or backward in fp32 with autocast off, on the
    inputs' device (custom_fwd's cast_inputs names one device type; CPU and GPU both need
    it). bf16/fp16 tensors are cast up; fp32 and fp64 are left as they are. Autograd casts
    each returned gradient back to its input's dtype."""

    @functools.wraps(method)
    def wrapped(ctx, *args):
        device = next(a.device.type for a in args if isinstance(a, Tensor))
        with torch.autocast(device, enabled=False):
            return method(ctx, *(a.float() if isinstance(a, Tensor) and a.dtype in
                                 (torch.bfloat16, torch.float16) else a for a in args))

    return wrapped


def _relu_forward(pre: Tensor, b_enc: Tensor):
    f = torch.relu(pre + b_enc)
    return f, (f > 0).float()


def _relu_backward(grad_f: Tensor, f: Tensor):
    return (torch.where(f > 0, grad_f, 0.0),)


class ReLUEncodeDense(Function):
    """Baseline encoder (x, W_enc, b_dec, b_enc) -> (f, fired): the same centring shortcut."""

    @staticmethod
    @custom_fwd(device_type="cuda")
    def forward(ctx, x, W_enc, b_dec, b_enc, compile_mode="never"):
        x_cent = x - b_dec
        pre = x_cent @ W_enc
        ctx.compile_mode = compile_mode
        f, active = pointwise(_relu_forward, pre, compile_mode, pre, b_enc)
        fired = _column_counts(active)
        ctx.save_for_backward(x_cent, W_enc, f)
        ctx.mark_non_differentiable(fired)
        return f, fired

    @staticmethod
    @custom_bwd(device_type="cuda")
    def backward(ctx, grad_f, _fired):
        x_cent, W_enc, f = ctx.saved_tensors
        (grad_pre,) = pointwise(_relu_backward, f, ctx.compile_mode, grad_f, f)
        grad_sum = _column_sums(grad_pre)
        g_x, g_W, g_b_dec, g_b_enc, _, _ = _encoder_grads(
            ctx, x_cent, W_enc, grad_pre, grad_sum, grad_sum, None, None)
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
        g_W = (grad_pre.pattern.t_matmul(grad_pre.values, x_cent).t() if sparse
               else x_cent.t() @ grad_pre)
    if need[2]:
        g_b_dec = -(grad_pre_sum @ W_enc.t())
    g_r_mag = g_r_mag if len(need) > 4 and need[4] else None
    return g_x, g_W, g_b_dec, g_b_gate, g_r_mag, g_b_mag


class GatedEncodeSparse(Function):
    """Like GatedEncodeDense, but f and ReLU(pi_gate) are values on the gate's support.

    Outputs (f_values, gate_values, fired, pattern): `pattern` (not a tensor) says where
    the values sit; fired counts the rows where each feature's f is non-zero.
    """

    @staticmethod
    @_fp32
    def forward(ctx, x, W_enc, b_dec, b_gate, r_mag, b_mag):
        x_cent = x - b_dec
        pi_gate = torch.addmm(b_gate, x_cent, W_enc)
        row, col = (pi_gate > 0).nonzero().unbind(1)  # row-major: rows come sorted
        pattern = Pattern(row, col, *pi_gate.shape)
        gate_values = pi_gate[row, col]
        del pi_gate  # the one dense [B, d_sae] tensor of this path: free it early
        scale = torch.exp(r_mag)
        pre_values = gate_values - b_gate[col]
        mag_values = pre_values * scale[col] + b_mag[col]
        f_values = torch.relu(mag_values)
        fired = torch.bincount(col[f_values > 0], minlength=W_enc.shape[1])
        ctx.save_for_backward(x_cent, W_enc, pre_values, mag_values, scale)
        ctx.pattern = pattern
        ctx.mark_non_differentiable(fired)
        return f_values, gate_values, fired, pattern

    @staticmethod
    @_fp32
    def backward(ctx, grad_f_values, grad_gate_values, _fired, _pattern):
        x_cent, W_enc, pre_values, mag_values, scale = ctx.saved_tensors
        pattern = ctx.pattern
        n_features = pattern.shape[1]
        grad_mag = torch.where(mag_values > 0, grad_f_values, 0.0)
        grad_pre_values = grad_gate_values + grad_mag * scale[pattern.col]
        per_feature = lambda v: torch.zeros(n_features, dtype=v.dtype,  # noqa: E731
                                            device=v.device).index_add_(0, pattern.col, v)
        grad_pre = SparseCodes(pattern, grad_pre_values)
        return _encoder_grads(ctx, x_cent, W_enc, grad_pre, per_feature(grad_pre_values),
                              per_feature(grad_gate_values),
                              per_feature(grad_mag * pre_values) * scale,
                              per_feature(grad_mag))


class SparseDecode(Function):
    """codes @ W: the forward product and both backward products touch only the support."""

    @staticmethod
    @_fp32
    def forward(ctx, values, W, pattern):
        ctx.save_for_backward(values, W)
        ctx.pattern = pattern
        return pattern.csr(values) @ W

    @staticmethod
    @_fp32
    def backward(ctx, grad_out):
        values, W = ctx.saved_tensors
        pattern = ctx.pattern
        grad_values = grad_W = None
        if ctx.needs_input_grad[0]:  # (grad_out @ W^T) sampled on the support
            grad_values = torch.sparse.sampled_addmm(
                pattern.csr(torch.zeros_like(values)), grad_out, W.t()).values()
        if ctx.needs_input_grad[1]:
            grad_W = pattern.t_matmul(values, grad_out)
        return grad_values, grad_W, None


def decode_sparse(codes: SparseCodes, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    return SparseDecode.apply(codes.values, W_dec, codes.pattern) + b_dec


def encode_gated_sparse(x, W_enc, b_dec, b_gate, r_mag, b_mag):
    """(f, ReLU(pi_gate)) as SparseCodes on one shared pattern, and the fired counts."""
    f_values, gate_values, fired, pattern = GatedEncodeSparse.apply(
        x, W_enc, b_dec, b_gate, r_mag, b_mag)
    return SparseCodes(pattern, f_values), SparseCodes(pattern, gate_values), fired


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
