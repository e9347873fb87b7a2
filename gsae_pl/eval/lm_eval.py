"""Loss recovered (docs/method.md, metrics): splice the SAE into the LM on held-out text.

    loss_recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean)
    delta_lm_loss  = CE_spliced - CE_clean

CE_spliced replaces the activation at the SAE's hook by its reconstruction (mapped back to
the raw scale, since the SAE sees x * norm_scale; docs/method.md), CE_zero by zeros.
Only the positions the SAE trains on are replaced (BOS left alone when data.exclude_bos):
the SAE never saw BOS activations, and zeroing them would measure the attention sink, not
the site. CE is the mean next-token loss over every predicted token of the windows.

Standard errors: the sampling unit is the held-out DOCUMENT (a file of the held-out text),
not the token or the window: tokens of one window share a context and windows of one file
share a subject, so their losses are correlated, and a file-level error is the one that
says how far another set of held-out files could move the number. Each window belongs to
the document its last token comes from (`TextWindows.evaluation_windows`). For window i
let v_i = (c_i, s_i, z_i) be its mean CE clean, spliced and zero and v their mean over the
n windows (equal to the token means, since every window predicts the same number of
tokens). With G documents, n_g windows and sum S_g of v_i in document g, the
cluster-robust covariance of the mean is

    Sigma = G / (G - 1) * sum_g r_g r_g' / n^2,   r_g = S_g - n_g v

(with one window per document it is the sample covariance over n, the plain window-level
error). By the delta method, with b = Z - C and LR = (Z - S) / b:

    SE(delta_lm_loss)^2  = d' Sigma d,   d = (-1, 1, 0)
    SE(loss_recovered)^2 = g' Sigma g,   g = dLR/d(C, S, Z) = (LR, -1, 1 - LR) / b

Every entry of `ce_sums` is a sum over windows (token sums, and per-document window counts
and sums), so the vectors of DDP processes add up, as long as they share the document
numbering (they do: it is made before the windows are dealt out).
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from gsae_pl.io import atomic_write

# ce_sums' layout: [0:3] CE clean, spliced, zero summed over predicted tokens; [3] the token
# count (the point estimates); then, for each document g, [n_g, sums of per-window mean CE
# clean, spliced, zero] (the standard errors).
_TOKEN_SUMS = 4


def n_sums(n_documents: int) -> int:
    """The length of `ce_sums`' vector for held-out windows from `n_documents` documents."""
    return _TOKEN_SUMS + 4 * n_documents


@torch.no_grad()
def ce_sums(lm, tokens: Tensor, reconstruct: Callable[[Tensor], Tensor],
            documents: Tensor | None = None, n_documents: int | None = None) -> Tensor:
    """[n_sums(n_documents)] float64, every entry a sum over `tokens`' windows (so
    process-summable; layout above). `documents` [n] numbers each window's document in
    0..n_documents-1; by default every window is its own document (window-level errors).

    `lm` is a TransformerLensSource; `reconstruct` maps raw [n, d_in] rows to raw rows.
    """
    if documents is None:
        documents, n_documents = torch.arange(len(tokens)), len(tokens)
    sums = torch.zeros(n_sums(n_documents), dtype=torch.float64)
    for chunk, docs in zip(tokens.split(lm.lm_batch_size), documents.split(lm.lm_batch_size)):
        chunk = chunk.to(lm.device)
        spliced, n_tokens = _window_ce(lm, chunk, reconstruct)
        clean, zero = _reference_ce(lm, chunk).unbind(1)
        sums += window_sums(torch.stack([clean, spliced, zero], dim=1), n_tokens, docs,
                            n_documents)
    return sums


def _window_ce(lm, chunk: Tensor, fill: Callable[[Tensor], Tensor] | None) -> tuple[Tensor, int]:
    """Per-window mean CE [B] (float64, CPU) with the kept positions' activations at the
    hook replaced by `fill(raw rows)` (None: the clean model), and the tokens each predicts."""
    keep = lm.keep_mask(chunk)

    def splice(act: Tensor, hook) -> Tensor:
        flat = act.flatten(2)  # [B, T, d_in] view of any hook's shape
        out = flat.clone()
        out[keep] = fill(flat[keep].float()).to(act.dtype)
        return out.view_as(act)

    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=lm.device.type == "cuda"):
        loss = lm.bridge.run_with_hooks(chunk, fwd_hooks=[] if fill is None
                                        else [(lm.hook, splice)], return_type="loss",
                                        loss_per_token=True)
    return loss.double().mean(dim=1).cpu(), loss.shape[1]


def _reference_ce(lm, chunk: Tensor) -> Tensor:
    """Per-window mean CE clean and zero-ablated [B, 2]: they do not depend on the SAE, so
    where the LM has a `reference_dir` (the activation cache's, which one suite's runs
    share) they are computed by the first run and read by the others; the LM then runs once
    per window and run instead of three times. Keyed by what made the activations, the
    device type and the windows' tokens."""
    def compute() -> Tensor:
        return torch.stack([_window_ce(lm, chunk, None)[0],
                            _window_ce(lm, chunk, torch.zeros_like)[0]], dim=1)

    folder = getattr(lm, "reference_dir", None)
    if folder is None:
        return compute()
    digest = hashlib.sha256(json.dumps([lm.describe(), lm.device.type], sort_keys=True)
                            .encode() + chunk.cpu().numpy().tobytes()).hexdigest()[:32]
    path = Path(folder) / f"{digest}.pt"
    if path.is_file():
        stored, problem = read_reference(path, len(chunk))
        if problem is None:
            return stored
        # A cache of what the LM gives: recompute it rather than fail every rerun.
        print(f"warning: {path} is damaged ({problem}): recomputed it and replaced the file",
              file=sys.stderr, flush=True)
    values = compute()
    atomic_write(path, lambda fh: torch.save(values, fh))
    return values


def read_reference(path: Path, n_windows: int) -> tuple[Tensor | None, str | None]:
    """(the stored [n_windows, 2] float64 CEs, None), or (None, why the file is not that).
    weights_only: the reference folder travels with an activation cache, which people
    share, and a pickled object in it must not run code."""
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return None, "it holds Python objects, not only a tensor: not loaded"
    except Exception as err:
        return None, (str(err).strip().splitlines() or [type(err).__name__])[0]
    if not isinstance(stored, Tensor) or stored.dtype != torch.float64 or \
            tuple(stored.shape) != (n_windows, 2):
        return None, f"not a [{n_windows}, 2] float64 tensor"
    if not torch.isfinite(stored).all():
        return None, "it holds NaN or Inf"
    return stored, None


def window_sums(per_window: Tensor, tokens_per_window: int, documents: Tensor | None = None,
                n_documents: int | None = None) -> Tensor:
    """ce_sums' vector from per-window mean CEs [n, 3] (clean, spliced, zero) and each
    window's document (default: one document per window)."""
    per_window = per_window.double()
    n = per_window.shape[0]
    if documents is None:
        documents, n_documents = torch.arange(n), n
    by_document = torch.zeros(n_documents, 4, dtype=torch.float64)
    by_document.index_add_(0, documents.long(),
                           torch.cat([torch.ones(n, 1, dtype=torch.float64), per_window], 1))
    return torch.cat([per_window.sum(0) * tokens_per_window,
                      torch.tensor([n * tokens_per_window], dtype=torch.float64),
                      by_document.flatten()])


def document_sums(sums: Tensor) -> dict:
    """Per document, from `ce_sums`' vector: its windows, the tokens they predict and its CE
    clean / spliced / zero summed over those tokens (numpy float64 [G] each; the entries
    of heldout_documents.npz, gsae_pl/eval/document_stats.py)."""
    by_document = sums[_TOKEN_SUMS:].view(-1, 4).double()
    windows = by_document[:, 0]
    per_window = float(sums[3]) / max(float(windows.sum()), 1.0)  # tokens each predicts
    return {"ce_windows": windows.numpy(), "ce_tokens": (windows * per_window).numpy(),
            **{f"ce_{name}_sum": (by_document[:, 1 + i] * per_window).numpy()
               for i, name in enumerate(("clean", "spliced", "zero"))}}


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
    """delta_lm_loss_se and loss_recovered_se by the delta method with document-clustered
    covariance (module docstring); {} when the windows come from fewer than 2 documents."""
    by_document = sums[_TOKEN_SUMS:].view(-1, 4)
    by_document = by_document[by_document[:, 0] > 0]  # documents this evaluation saw
    n_docs, n = len(by_document), float(by_document[:, 0].sum())
    if n_docs < 2:
        return {}
    mean = by_document[:, 1:].sum(0) / n
    residual = by_document[:, 1:] - by_document[:, :1] * mean  # r_g = S_g - n_g v
    cov = n_docs / (n_docs - 1) * residual.T @ residual / n ** 2
    c, s, z = mean.tolist()
    out = {"delta_lm_loss_se": _se(torch.tensor([-1.0, 1.0, 0.0], dtype=torch.float64), cov)}
    if z != c:
        ratio = (z - s) / (z - c)
        grad = torch.tensor([ratio, -1.0, 1.0 - ratio], dtype=torch.float64) / (z - c)
        out["loss_recovered_se"] = _se(grad, cov)
    return out


def _se(grad: Tensor, cov: Tensor) -> float:
    # Rounding can leave a tiny negative variance for a perfect reconstruction: clip at 0.
    return math.sqrt(max(float(grad @ cov @ grad), 0.0))
