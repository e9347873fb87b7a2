"""The paired comparison of two variants (arms) at matched L0: the difference of a value read
off their curves, with a 95% interval from a two-level bootstrap (docs/method.md sec. 6).

One bootstrap replicate:
- documents: the n held-out documents drawn n times with replacement, ONE draw for both arms
  (every run of a suite is measured on the same documents, so held-out sampling moves both
  arms together and the draw must too); each run's L0 and metric are recomputed from its
  per-document sums under that draw (gsae_pl/suite/document_stats.py). Without them the
  documents are not resampled and each run keeps its own values.
- seeds: within each arm, its seeds drawn with replacement, independently of the other arm
  (training noise is not shared); a drawn seed brings its runs at every swept value.
- the curve: as `variant_curve` (gsae_pl/suite/plots.py), at each swept value the mean over
  the drawn seeds of L0 and of the metric; the read-off, as the report's, from that curve.
The interval is the 2.5 and 97.5 percentiles of arm A's read-off minus arm B's over the
replicates whose read-offs are both defined (a resampled curve can stop short of the L0).

Few seeds (decision, docs/method.md sec. 6): a plain percentile bootstrap of a mean over n
seeds is too narrow for small n: its variance is (n - 1) / n of the squared standard error,
and it takes normal, not t, quantiles. With the two arms equal, it excluded 0 in 33% of
simulated comparisons at 2 seeds per arm, 21% at 3, 12% at 5 (normal seed noise). So the
seed level is widened: within each replicate, each arm's curve point is the all-seeds
mean under that replicate's document draw plus `seed_scale` times the drawn seeds' shift
from it, scale = sqrt(n / (n - 1)) * t(0.975, nA + nB - 2) / z(0.975). Simulated the same
way, that interval excludes 0 in 6% of comparisons at 2, 3, 5 and 10 seeds per arm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from gsae_pl.suite.document_stats import metric_from_sums, needs
from gsae_pl.suite.plots import L0_FLOOR

REPLICATES = 2000
# t(0.975, df) for the few-seeds correction; a df between entries takes the smaller df's.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000}
Z975 = 1.960
BOOTSTRAP_SEED = 0  # a fixed stream: a rerun of the report prints the same intervals
LEVEL = 0.95


@dataclass(frozen=True)
class Draws:
    """One bootstrap's resampling, as counts: how often each replicate took each item."""
    seeds: tuple[np.ndarray, np.ndarray]  # per arm [B, its seeds in `arm_seeds` order]
    documents: np.ndarray | None  # [B, n_documents], shared by both arms; None: not resampled


def usable(rows: list[dict], metric: str) -> list[dict]:
    """The arm's rows that have L0 and `metric` (the ones its curve is made of)."""
    return [r for r in rows if r.get(metric) is not None and r["l0"] is not None]


def arm_seeds(rows: list[dict]) -> list:
    """The arm's seeds in a fixed order (the columns of its seed counts)."""
    return sorted({r["seed"] for r in rows}, key=repr)


def seed_scale(n: int, df: int) -> float:
    """How far the seed level's shifts are stretched for an arm of `n` seeds (module doc)."""
    if n < 2 or df < 1:
        return 1.0  # one seed: no shift to stretch
    return (n / (n - 1)) ** 0.5 * T975[max(k for k in T975 if k <= df)] / Z975


def draw(n_seeds: tuple[int, int], n_documents: int | None, replicates: int = REPLICATES,
         seed: int = BOOTSTRAP_SEED) -> Draws:
    """Multinomial counts: drawing n items n times with replacement, `replicates` times.
    Documents first, so every comparison of a report shares one document draw."""
    rng = np.random.default_rng(seed)

    def counts(n: int) -> np.ndarray:
        return rng.multinomial(n, np.full(n, 1.0 / n), size=replicates)

    documents = counts(n_documents) if n_documents else None
    return Draws((counts(n_seeds[0]), counts(n_seeds[1])), documents)


def _values(row: dict, metric: str, stats: dict | None, documents: np.ndarray | None,
            replicates: int) -> tuple[np.ndarray, np.ndarray]:
    """(L0, metric) of one run in each replicate: from its per-document sums under the
    document draw, or its own values (documents not resampled)."""
    if documents is not None and stats is not None:
        return metric_from_sums(stats, "l0", documents), metric_from_sums(stats, metric, documents)
    return np.full(replicates, float(row["l0"])), np.full(replicates, float(row[metric]))


def arm_curves(rows: list[dict], metric: str, seed_counts: np.ndarray,
               documents: np.ndarray | None = None,
               stats: dict[str, dict] | None = None,
               scale: float = 1.0) -> list[list[tuple[float, float]]]:
    """The arm's (L0, metric) curve in each replicate: at each swept value, the
    seed-count-weighted mean over the seeds with a run there (`variant_curve`'s points
    when every count is 1 and documents are not resampled), its shift from the all-seeds
    mean stretched by `scale` (`seed_scale`)."""
    rows = usable(rows, metric)
    seeds, swept = arm_seeds(rows), sorted({r["value"] for r in rows}, key=repr)
    replicates = len(seed_counts)
    l0 = np.zeros((replicates, len(seeds), len(swept)))
    y, runs = np.zeros_like(l0), np.zeros((len(seeds), len(swept)))
    for row in rows:
        s, v = seeds.index(row["seed"]), swept.index(row["value"])
        x0, y0 = _values(row, metric, (stats or {}).get(row["run"]), documents, replicates)
        l0[:, s, v] += np.maximum(x0, L0_FLOOR)  # clipped as on the plots' log axis
        y[:, s, v] += y0
        runs[s, v] += 1
    has = runs > 0
    l0[:, has] /= runs[has]  # two runs of one seed and value: their mean
    y[:, has] /= runs[has]
    weight = seed_counts[:, :, None] * has[None]
    total = weight.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        l0_mean, y_mean = (weight * l0).sum(1) / total, (weight * y).sum(1) / total
    if scale != 1.0:  # all seeds once, under the same document draw: the shift's origin
        l0_all, y_all = (has * l0).sum(1) / has.sum(0), (has * y).sum(1) / has.sum(0)
        l0_mean = np.maximum(l0_all + scale * (l0_mean - l0_all), L0_FLOOR)  # stays > 0
        y_mean = y_all + scale * (y_mean - y_all)
    return [sorted((float(l0_mean[b, v]), float(y_mean[b, v]))
                   for v in range(len(swept)) if total[b, v] > 0)
            for b in range(replicates)]


def differences(arms: tuple[list[dict], list[dict]], metric: str, read: Callable,
                draws: Draws, stats: dict[str, dict] | None = None,
                few_seeds: bool = True) -> np.ndarray:
    """[B] read-off of arm A minus arm B per replicate (NaN where either is undefined);
    `few_seeds`: with the few-seeds widening of the seed level (module doc)."""
    if draws.documents is not None and not can_resample_documents(stats, arms, metric):
        raise ValueError(f"per-document statistics cannot give {metric} for every run")
    n = [counts.shape[1] for counts in draws.seeds]
    reads = []
    for rows, counts in zip(arms, draws.seeds):
        scale = seed_scale(counts.shape[1], sum(n) - 2) if few_seeds else 1.0
        curves = arm_curves(rows, metric, counts, draws.documents, stats, scale)
        reads.append(np.array([np.nan if (v := read(c)) is None else v for c in curves]))
    return reads[0] - reads[1]


def can_resample_documents(stats: dict[str, dict] | None, arms, metric: str) -> bool:
    """Whether every run of both arms has the per-document sums `metric` and L0 need."""
    keys = needs(metric)
    return bool(stats) and keys is not None and all(
        r["run"] in stats and all(k in stats[r["run"]] for k in (*keys, "active", "rows"))
        for rows in arms for r in rows)


def interval(diffs: np.ndarray, level: float = LEVEL) -> tuple[float, float, float] | None:
    """(low, high, share of replicates undefined): the percentile interval of the defined
    replicates; None when none is defined."""
    defined = diffs[~np.isnan(diffs)]
    if not len(defined):
        return None
    low, high = np.quantile(defined, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high), 1 - len(defined) / len(diffs)

