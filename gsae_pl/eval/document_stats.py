"""Per-document sufficient statistics of the held-out metrics, their document-clustered
standard errors, and the run folder's `heldout_documents.npz` (docs/method.md sec. 6).

The held-out DOCUMENT is the sampling unit of every held-out metric (rows of one document
share a context and a subject, so they are correlated; eval/lm_eval.py argues it for loss
recovered). Every point estimate here is a smooth function f of means m = T / n of
per-document totals T_g (n = sum of the documents' rows n_g). With G documents the
cluster-robust covariance of m is

    Sigma = G / (G - 1) * sum_g r_g r_g' / n^2,   r_g = T_g - n_g m

(lm_eval.py's, for loss recovered), and by the delta method SE(f)^2 = grad' Sigma grad,
computed as G / (G - 1) * sum_g (grad . r_g)^2 / n^2 without forming Sigma (FVU's totals
include the d_in-vector sum x). Dead fraction is not smooth (a count of features whose
firing count is 0): its error is a delete-one-document jackknife (`dead_fraction_se`).

The file. `heldout_documents.npz` (numpy's npz, read with allow_pickle=False), one entry
per held-out document of either the held-out rows or the loss-recovered windows, in the
order of `document`:
  format                   int, FORMAT (this layout)
  document     [G] int64   the source's document id: for LM sources the index of the
                           held-out document (file) in the held-out text's order, the same
                           for every run on that text, so two runs' tables pair by id; for
                           synthetic and file sources a block of ROWS_PER_DOCUMENT
                           consecutive held-out rows (data/base.py)
  rows         [G] float64 held-out rows (SAE rows, outliers left out when they are)
  sq_err, x_sq, x_hat_sq, x_hat_dot_x [G] float64
                           sums over the document's rows of ||x - x_hat||^2, ||x||^2,
                           ||x_hat||^2, x_hat . x (on the SAE's scale: x * norm_scale)
  x_sum      [G, d_in] float64   sum of x over the document's rows (FVU's mean)
  l0_sum       [G] float64 active features summed over the rows
  only_here    [G] float64 features that fired in this document and in no other (what the
                           dead fraction's jackknife needs: without document g, dead grows
                           by only_here_g)
  d_sae, dead_features     int: the SAE's width and its features that fired on no row
  norm_scale               float: x's scale factor (the sums are on the SAE's scale)
  ce_windows   [G] float64 loss-recovered windows of the document (0: none of them)
  ce_tokens    [G] float64 tokens those windows predict
  ce_clean_sum, ce_spliced_sum, ce_zero_sum [G] float64
                           CE summed over those tokens, clean / SAE spliced / zero-ablated
  (the ce_* entries only on sources with a language model)

`read_document_stats(run_dir)` reads it back as a dict of numpy arrays. numpy only: a
report or a suite can read it without torch.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

FILE = "heldout_documents.npz"
FORMAT = 1
ROW_KEYS = ("rows", "sq_err", "x_sq", "x_hat_sq", "x_hat_dot_x", "l0_sum", "only_here")
CE_KEYS = ("ce_windows", "ce_tokens", "ce_clean_sum", "ce_spliced_sum", "ce_zero_sum")


# ---- standard errors -------------------------------------------------------------------
def clustered_se(totals: np.ndarray, rows: np.ndarray, grad: np.ndarray) -> float | None:
    """SE of f(m) by the delta method, document-clustered (module docstring). `totals`
    [G, k]: per-document sums; `rows` [G]: n_g; `grad` [k]: df/dm at m = totals.sum / n.
    None with fewer than 2 documents."""
    totals, rows = np.asarray(totals, np.float64), np.asarray(rows, np.float64)
    seen = rows > 0
    totals, rows = totals[seen], rows[seen]
    n_docs, n = len(rows), rows.sum()
    if n_docs < 2:
        return None
    mean = totals.sum(0) / n
    scores = (totals - rows[:, None] * mean) @ np.asarray(grad, np.float64)
    return math.sqrt(max(n_docs / (n_docs - 1) * float(scores @ scores) / n ** 2, 0.0))


def reconstruction_ses(t: dict) -> dict[str, float]:
    """l0_se, fvu_se, gamma_se, norm_ratio_se, dead_fraction_se from a table's row entries
    (numpy arrays as in the file); {} with fewer than 2 documents."""
    rows = np.asarray(t["rows"], np.float64)
    n = rows.sum()
    col = lambda key: np.asarray(t[key], np.float64)[:, None]  # noqa: E731
    out = {}
    l0 = clustered_se(col("l0_sum"), rows, [1.0])
    if l0 is None:
        return out
    out["l0_se"] = l0
    m_err, m_q, m_h, m_d = (float(np.sum(t[k])) / n
                            for k in ("sq_err", "x_sq", "x_hat_sq", "x_hat_dot_x"))
    m_s = np.asarray(t["x_sum"], np.float64).sum(0) / n
    var = m_q - float(m_s @ m_s)  # E||x - mean x||^2
    if var > 0:  # FVU = m_err / (m_q - |m_s|^2)
        grad = np.concatenate([[1 / var, -m_err / var ** 2], 2 * m_err * m_s / var ** 2])
        totals = np.concatenate([col("sq_err"), col("x_sq"), t["x_sum"]], axis=1)
        out["fvu_se"] = clustered_se(totals, rows, grad)
    if m_d != 0:  # gamma = m_h / m_d
        gamma = m_h / m_d
        out["gamma_se"] = clustered_se(np.hstack([col("x_hat_sq"), col("x_hat_dot_x")]),
                                       rows, [1 / m_d, -gamma / m_d])
    if m_q > 0:  # norm ratio = m_h / m_q
        ratio = m_h / m_q
        out["norm_ratio_se"] = clustered_se(np.hstack([col("x_hat_sq"), col("x_sq")]), rows,
                                            [1 / m_q, -ratio / m_q])
    out["dead_fraction_se"] = dead_fraction_se(t["only_here"], rows, int(t["d_sae"]))
    return out


def dead_fraction_se(only_here: np.ndarray, rows: np.ndarray, d_sae: int) -> float:
    """Delete-one-document jackknife: without document g the dead fraction is
    dead + only_here_g / d_sae, so SE^2 = (G - 1) / G * sum_g (u_g - mean u)^2 / d_sae^2
    over the G documents with rows (docs/method.md sec. 6: what it does and does not say)."""
    u = np.asarray(only_here, np.float64)[np.asarray(rows) > 0]
    n_docs = len(u)
    if n_docs < 2:
        return 0.0
    return math.sqrt((n_docs - 1) / n_docs * float(((u - u.mean()) ** 2).sum())) / d_sae


# ---- the table and its file ------------------------------------------------------------
def merge(*tables: dict | None) -> dict:
    """One table from evaluators' tables, each with its own `document` ids and [G_i] (or
    [G_i, ...]) entries; a document missing from a table gets zeros there. Scalars (no
    `document` axis) are kept as they are."""
    tables = [t for t in tables if t]
    ids = np.unique(np.concatenate([np.asarray(t["document"], np.int64) for t in tables])) \
        if tables else np.zeros(0, np.int64)
    out: dict = {"format": FORMAT, "document": ids}
    for table in tables:
        where = np.searchsorted(ids, np.asarray(table["document"], np.int64))
        for key, value in table.items():
            value = np.asarray(value)
            if key == "document":
                continue
            if value.ndim == 0:
                out[key] = value
                continue
            full = np.zeros((len(ids), *value.shape[1:]), dtype=np.float64)
            full[where] = value
            out[key] = full
    return out


def to_bytes(table: dict) -> bytes:
    """The npz file's bytes (written atomically by the run: gsae_pl/io.py)."""
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(v) for k, v in table.items()})
    return buffer.getvalue()


def read_document_stats(run_dir: Path | str) -> dict[str, np.ndarray]:
    """The run's per-document statistics (module docstring), as numpy arrays (scalars as
    0-d arrays). Raises FileNotFoundError for a run without them (runs made before them),
    ValueError for a file of another format."""
    path = Path(run_dir) / FILE
    with np.load(path, allow_pickle=False) as stored:
        table = {key: stored[key] for key in stored.files}
    if int(table.get("format", -1)) != FORMAT:
        raise ValueError(f"{path} has format {table.get('format')}, this reader reads "
                         f"{FORMAT}")
    return table
