"""Rows of extreme norm (docs/method.md sec. 6, `data.outlier_norm_ratio`).

On SmolLM2 about 0.1% of non-BOS rows hold 88% of the squared norm: left in, they dominate
the normalisation, FVU, gamma, resampling and the spliced loss. A row is an outlier when
its norm exceeds `ratio` times the MEDIAN row norm, the median estimated once on the
normalisation sample (the first `data.normalize_rows` training rows) and then fixed and
stored with the run (its checkpoints and metrics.json: `median_norm`), as dictionary_learning
masks rows far above the median. The median, not the mean: the outliers themselves would
move a mean (and a mean-based threshold) by a large factor.

With `data.outlier_norm_ratio=0` (off) nothing is left out, and the held-out metrics are
also split at REFERENCE_RATIO times the median, to show what the outliers do to them.
"""

from __future__ import annotations

import math

from torch import Tensor

from gsae_pl.errors import UserError

# Decision: 10x the median norm splits typical from outlier rows when the option is off.
# On LM residual streams typical rows lie within ~3x of the median and the extreme rows
# (attention sinks, massive activations) hundreds of times above it, so the split does not
# move much between 5x and 50x; 10x is dictionary_learning's order of magnitude.
REFERENCE_RATIO = 10.0


def check_ratio(ratio: float) -> None:
    """0 (off) or above 1: a ratio at or below 1 would leave out half the rows or more."""
    if 0 < ratio <= 1:
        raise UserError(f"data.outlier_norm_ratio={ratio} would leave out at least half of "
                        "the rows (the threshold is that multiple of the median norm): use 0 "
                        "(off) or a ratio above 1, e.g. 10")


def median_norm(sample: Tensor) -> float:
    """The median row norm of `sample` [n, d_in] (float64; the lower median for even n)."""
    return float(sample.double().norm(dim=1).median())


def threshold(ratio: float, median: float) -> float:
    """The norm above which a row is left out: inf when the option is off."""
    return ratio * median if ratio > 0 else math.inf


def outlier_rows(rows: Tensor, limit: float) -> Tensor:
    """bool [n]: rows whose norm exceeds `limit` (none when it is inf)."""
    return rows.double().norm(dim=1) > limit
