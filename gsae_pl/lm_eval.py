"""Loss recovered (docs/method.md, metrics): splice the SAE into the LM on held-out text.

    loss_recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean)
    delta_lm_loss  = CE_spliced - CE_clean

CE_spliced replaces the activation at the SAE's hook by its reconstruction (mapped back to
the raw scale, since the SAE sees x * norm_scale; docs/method.md), CE_zero by zeros.
Only the positions the SAE trains on are replaced (BOS left alone when data.exclude_bos):
the SAE never saw BOS activations, and zeroing them would measure the attention sink, not
the site. CE is the mean next-token loss over every predicted token of the windows.

Standard errors: the sampling unit is the held-out WINDOW, not the token (tokens of one
window share a context, so their losses are correlated). For window i let c_i, s_i, z_i be
its mean CE clean, spliced and zero; C, S, Z their means over the n windows (equal to the
token means, since every window predicts the same number of tokens), and Sigma the 3 x 3
sample covariance (n - 1 denominator) of (c, s, z). By the delta method, with b = Z - C
and LR = (Z - S) / b:

    SE(delta_lm_loss)^2  = (Var s + Var c - 2 Cov(s, c)) / n
    SE(loss_recovered)^2 = g' Sigma g / n,   g = dLR/d(C, S, Z) = (LR, -1, 1 - LR) / b

Sigma comes from the sums over windows of c, s, z, their squares and cross-products, which
(like the token sums) add up across DDP processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

# ce_sums' layout. Token-level: CE sums and the predicted-token count (the point estimates).
# Window-level: the window count, then sums of per-window means, squares, cross-products.
_SUMS = ("clean", "spliced", "zero")
_PAIRS = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))
N_SUMS = 4 + 1 + 3 + len(_PAIRS)


@torch.no_grad()
def ce_sums(lm, tokens: Tensor, reconstruct: Callable[[Tensor], Tensor]) -> Tensor:
    """[N_SUMS] float64, every entry a sum over `tokens`' windows (so process-summable):
    [0:3] CE clean, spliced, zero summed over predicted tokens; [3] the token count;
    [4] the window count; [5:8] sums of per-window mean CE clean, spliced, zero;
    [8:14] sums of per-window products cc, ss, zz, cs, cz, sz (for the standard errors).

    `lm` is a TransformerLensSource; `reconstruct` maps raw [n, d_in] rows to raw rows.
    """
    sums = torch.zeros(N_SUMS, dtype=torch.float64)
    for chunk in tokens.split(lm.lm_batch_size):
        chunk = chunk.to(lm.device)
        keep = lm.keep_mask(chunk)

        def splice(act: Tensor, hook, fill: Callable[[Tensor], Tensor], keep=keep) -> Tensor:
            flat = act.flatten(2)  # [B, T, d_in] view of any hook's shape
            out = flat.clone()
            out[keep] = fill(flat[keep].float()).to(act.dtype)
            return out.view_as(act)

        runs = {"clean": [],
                "spliced": [(lm.hook, lambda a, hook: splice(a, hook, reconstruct))],
                "zero": [(lm.hook, lambda a, hook: splice(a, hook, torch.zeros_like))]}
        per_window = []
        for name in _SUMS:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=lm.device.type == "cuda"):
                loss = lm.bridge.run_with_hooks(chunk, fwd_hooks=runs[name], return_type="loss",
                                                loss_per_token=True)
            per_window.append(loss.double().mean(dim=1).cpu())  # [B]: one value per window
        sums += window_sums(torch.stack(per_window, dim=1), loss.shape[1])
    return sums


def window_sums(per_window: Tensor, tokens_per_window: int) -> Tensor:
    """ce_sums' [N_SUMS] vector from per-window mean CEs [n, 3] (clean, spliced, zero)."""
    per_window = per_window.double()
    n = per_window.shape[0]
    products = [(per_window[:, i] * per_window[:, j]).sum() for i, j in _PAIRS]
    return torch.cat([per_window.sum(0) * tokens_per_window,
                      torch.tensor([n * tokens_per_window, n], dtype=torch.float64),
                      per_window.sum(0), torch.stack(products)])


def loss_recovered(sums: Tensor) -> dict[str, float]:
    """The metrics from (possibly process-summed) `ce_sums` output; the standard errors
    need at least 2 windows."""
    clean, spliced, zero = (sums[:3] / sums[3]).tolist()
    out = {"ce_clean": clean, "ce_spliced": spliced, "ce_zero": zero,
           "delta_lm_loss": spliced - clean}
    if zero != clean:  # else the site does not matter to the loss: the ratio is undefined
        out["loss_recovered"] = (zero - spliced) / (zero - clean)
    out.update(standard_errors(sums))
    return out


def standard_errors(sums: Tensor) -> dict[str, float]:
    """delta_lm_loss_se and loss_recovered_se by the delta method over windows (module
    docstring); {} with fewer than 2 windows."""
    n = float(sums[4])
    if n < 2:
        return {}
    mean = sums[5:8] / n
    cov = torch.empty(3, 3, dtype=torch.float64)
    for (i, j), total in zip(_PAIRS, sums[8:14]):
        cov[i, j] = cov[j, i] = (total - n * mean[i] * mean[j]) / (n - 1)
    c, s, z = mean.tolist()
    diff = torch.tensor([-1.0, 1.0, 0.0], dtype=torch.float64)
    out = {"delta_lm_loss_se": _se(diff, cov, n)}
    if z != c:
        ratio = (z - s) / (z - c)
        grad = torch.tensor([ratio, -1.0, 1.0 - ratio], dtype=torch.float64) / (z - c)
        out["loss_recovered_se"] = _se(grad, cov, n)
    return out


def _se(grad: Tensor, cov: Tensor, n: float) -> float:
    # Rounding can leave a tiny negative variance for a perfect reconstruction: clip at 0.
    return math.sqrt(max(float(grad @ cov @ grad), 0.0) / n)
