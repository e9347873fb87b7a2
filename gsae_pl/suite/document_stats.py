"""A run's held-out metrics recomputed from its per-document sums, under any reweighting of the
held-out documents (the document level of the paired bootstrap, gsae_pl/suite/paired.py;
docs/method.md sec. 6).

The interface this module needs from a run (one dict per run, the arrays all of length
n_documents, the documents in the same order in every run of a suite):

    rows             held-out SAE rows of the document
    active           the L0 sum: non-zero features summed over those rows
    sq_err           sum of ||x - x_hat||^2 over those rows
    centred_sq_norm  sum of ||x - mean||^2 over those rows, mean = the run's mean held-out x
    x_hat_sq         sum of ||x_hat||^2         (gamma; optional)
    x_hat_dot_x      sum of x_hat . x           (gamma; optional)
    ce_tokens        predicted tokens of the loss-recovered windows of the document
    ce_clean_sum, ce_spliced_sum, ce_zero_sum    their CE summed over those tokens

Each metric is the ratio of weighted sums (the form metrics.json's values take over all
documents): with weight w_g for document g (1 for every g reproduces the run's own value),
FVU = sum w_g sq_err_g / sum w_g centred_sq_norm_g, L0 = sum w_g active_g / sum w_g rows_g,
loss recovered = (Z - S) / (Z - C) with C, S, Z the weighted CE sums. FVU keeps the run's
own centre: the shift of the mean under a reweighting changes the denominator by a relative
O(1 / rows), far below the variance between documents.

`from_run` reads them from the run's `heldout_documents.npz` (gsae_pl/eval/document_stats.py)
and is the report's default; a run without that file (made before it existed) answers None,
and comparisons that reach such a run fall back to resampling seeds alone, saying so.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from gsae_pl.eval.document_stats import read_document_stats

# metric -> (numerator, denominator) for a plain ratio of sums
RATIOS = {
    "l0": ("active", "rows"),
    "fvu": ("sq_err", "centred_sq_norm"),
    "relative_reconstruction_bias": ("x_hat_sq", "x_hat_dot_x"),
}
CE = ("ce_clean_sum", "ce_spliced_sum", "ce_zero_sum")


def NO_READER(run_dir: Path) -> dict | None:  # noqa: N802 (a constant that is a function)
    """Per-document statistics switched off: every comparison resamples seeds alone."""
    return None


def from_run(run_dir: Path) -> dict | None:
    """The interface above from the run's heldout_documents.npz, None when it has none. The
    centred norm is centred on the run's own held-out mean: sum_g ||x - m||^2 =
    x_sq_g - 2 m . x_sum_g + rows_g ||m||^2."""
    try:
        table = read_document_stats(run_dir)
    except (FileNotFoundError, ValueError):
        return None
    rows = np.asarray(table["rows"], dtype=np.float64)
    x_sum = np.asarray(table["x_sum"], dtype=np.float64)
    mean = x_sum.sum(0) / max(rows.sum(), 1.0)
    out = {"rows": rows, "active": np.asarray(table["l0_sum"], dtype=np.float64),
           "sq_err": np.asarray(table["sq_err"], dtype=np.float64),
           "centred_sq_norm": (np.asarray(table["x_sq"], dtype=np.float64)
                               - 2 * x_sum @ mean + rows * float(mean @ mean)),
           "x_hat_sq": np.asarray(table["x_hat_sq"], dtype=np.float64),
           "x_hat_dot_x": np.asarray(table["x_hat_dot_x"], dtype=np.float64)}
    for key in ("ce_tokens", *CE):
        if key in table:
            out[key] = np.asarray(table[key], dtype=np.float64)
    return out


def needs(metric: str) -> tuple[str, ...] | None:
    """The statistics `metric` is computed from; None for a metric they cannot give."""
    if metric in RATIOS:
        return RATIOS[metric]
    if metric == "loss_recovered":
        return CE
    if metric == "delta_lm_loss":
        return (*CE[:2], "ce_tokens")
    return None


def metric_from_sums(stats: dict[str, np.ndarray], metric: str,
                     weights: np.ndarray) -> np.ndarray:
    """`metric` under each row of `weights` ([B, n_documents], e.g. how often a bootstrap
    draw took each document), from the run's per-document `stats`: [B] values (NaN where a
    denominator is 0)."""
    sums = {key: weights @ np.asarray(stats[key], dtype=np.float64) for key in needs(metric)}
    with np.errstate(divide="ignore", invalid="ignore"):
        if metric in RATIOS:
            top, bottom = RATIOS[metric]
            return sums[top] / sums[bottom]
        if metric == "loss_recovered":
            clean, spliced, zero = (sums[key] for key in CE)
            return (zero - spliced) / (zero - clean)
        return (sums["ce_spliced_sum"] - sums["ce_clean_sum"]) / sums["ce_tokens"]


def load(suite_dir: Path, runs: list[str],
         reader: Callable[[Path], dict | None] = from_run
         ) -> tuple[dict[str, dict[str, np.ndarray]], str | None]:
    """(run -> its statistics, None) when every run in `runs` has them with one number of
    documents; else ({}, why not), the words the verdicts quote."""
    found, missing = {}, []
    for run in runs:
        stats = reader(Path(suite_dir) / "runs" / run)
        if stats is None:
            missing.append(run)
        else:
            found[run] = {key: np.asarray(value, dtype=np.float64) for key, value in stats.items()}
    if not found:
        return {}, "no per-document statistics"
    if missing:
        return {}, f"no per-document statistics for {len(missing)} of {len(runs)} runs"
    lengths = {len(a) for stats in found.values() for a in stats.values()}
    if len(lengths) != 1:
        return {}, "per-document statistics of different lengths"
    return found, None
