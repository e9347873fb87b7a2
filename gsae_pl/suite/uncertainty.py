"""The suite report's noise: seed spread, held-out standard errors, and the verdict on a
paired difference between two variants (gsae_pl/suite/report.py).

- Seed spread is the sample standard deviation over seeds (n - 1 denominator), shown as
  "mean ± sd" wherever a variant has 2 or more seeds at one swept value.
- A value read off a curve (a metric at an L0, the L0 needed for a loss recovered) is also
  read off each seed's own curve; the band is the min - max of those per-seed values.
- SE is the held-out standard error of loss recovered (gsae_pl/eval/lm_eval.py: clustered by
  held-out document), mean over seeds: how far another held-out set could move that one
  number. It is shown beside each run; comparisons use the paired bootstrap instead.
- A comparison of two variants (arm A minus arm B) at matched L0 has a 95% interval from the
  two-level bootstrap of gsae_pl/suite/paired.py, and its verdict follows the interval
  (`verdict`, docs/method.md sec. 6): "level" when the whole interval lies within the
  equivalence margin (MARGINS), else "better" / "worse" (or "higher" / "lower" for a
  metric with no better direction, gamma) when it excludes 0, else "unresolved". An arm
  with one seed makes it "unresolved" whatever the interval (its training noise is
  unmeasured: the interval holds only the other arm's seeds and the documents); with fewer
  than MIN_SEEDS seeds in an arm, the verdict says so: the percentile bootstrap of a mean
  over 2 seeds can take only 3 values, and understates the spread.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

# The paired comparison the report judges (docs/method.md: the paper's main claim).
PAIR = ("gated", "baseline")


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample SD (None with fewer than 2 values)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def by_seed(rows: list[dict]) -> dict:
    """One variant's rows grouped by seed."""
    seeds: dict = {}
    for row in rows:
        seeds.setdefault(row["seed"], []).append(row)
    return seeds


def per_seed(rows: list[dict], metric: str, read: Callable, curve: Callable) -> list[float]:
    """`read(curve(seed's rows, metric))` for every seed where it is defined."""
    values = [read(curve(group, metric)) for group in by_seed(rows).values()]
    return [v for v in values if v is not None]


def band_text(value, values: list[float], fmt: Callable) -> str:
    """`value`, with the per-seed min - max band where 2 or more seeds give one."""
    if value is None:
        return ""
    if len(values) < 2:
        return fmt(value)
    return f"{fmt(value)} [{fmt(min(values))} – {fmt(max(values))}]"


def spread_text(values: list[float], fmt: Callable) -> str:
    if not values:
        return ""
    mean, sd = mean_sd(values)
    return fmt(mean) if sd is None else f"{fmt(mean)} ± {fmt(sd)}"


def seed_spread_rows(rows: list[dict], metrics: tuple[str, ...], fmt: Callable) -> list[list]:
    """[variant, swept, value, seeds, "mean ± sd" per metric] where a value has 2+ seeds."""
    groups: dict = {}
    for row in rows:
        groups.setdefault((row["variant"], row["swept"], row["value"]), []).append(row)
    body = []
    for (variant, swept, value), group in groups.items():
        if len(group) < 2:
            continue
        cells = [spread_text([r[m] for r in group if r[m] is not None], fmt) for m in metrics]
        body.append([variant, swept, fmt(value), str(len(group))] + cells)
    return body


MIN_SEEDS = 3
# Above this share of replicates whose curve stops short of the read-off, the interval
# describes only the resamples that happen to reach it: "unresolved".
UNDEFINED_LIMIT = 0.05
# Equivalence margins (decision, docs/method.md sec. 6): differences a reader would not act
# on. Absolute for the bounded metrics, relative to arm B's value for those whose scale
# changes across a suite (FVU 0.01 on SmolLM2, 0.2 on the tiny LM; L0 over 1 - 1000).
MARGINS = {"loss_recovered": (0.005, "absolute"),
           "relative_reconstruction_bias": (0.01, "absolute"),
           "fvu": (0.05, "relative"), "l0_needed": (0.10, "relative")}
# The sign of a difference A - B that favours A; gamma has none (1 is ideal, from either side).
BETTER = {"loss_recovered": 1, "fvu": -1, "l0_needed": -1}


def margin(quantity: str, reference: float) -> float | None:
    """The equivalence margin of `quantity` when arm B reads `reference`; None: no margin."""
    if quantity not in MARGINS:
        return None
    size, kind = MARGINS[quantity]
    return size * abs(reference) if kind == "relative" else size


def verdict(quantity: str, arm: str, found: tuple[float, float, float] | None,
            reference: float, seeds: tuple[int, int], names: tuple[str, str]) -> str:
    """The verdict word for `arm` (A) from the interval `found` = (low, high, share
    undefined) of A - B, then why it is no stronger: one seed, undefined resamples."""
    if found is None:
        return "unresolved (no resample gives this read-off)"
    low, high, undefined = found
    if min(seeds) == 1:
        lone = " and ".join(n for n, s in zip(names, seeds) if s == 1)
        return f"unresolved (one seed of {lone}: its seed noise is unmeasured)"
    if undefined > UNDEFINED_LIMIT:
        return f"unresolved (read-off undefined in {undefined:.0%} of resamples)"
    m = margin(quantity, reference)
    if m is not None and -m <= low and high <= m:
        return f"level (within ±{m:.2g})"
    if low > 0 or high < 0:
        sign = 1 if low > 0 else -1
        if quantity not in BETTER:
            return f"{arm} {'higher' if sign > 0 else 'lower'}"
        return f"{arm} {'better' if sign == BETTER[quantity] else 'worse'}"
    return "unresolved"


def caveats(seeds: tuple[int, int], names: tuple[str, str], documents: str | None,
            sparse: float | None) -> list[str]:
    """What qualifies a verdict: few seeds, documents not resampled, a sparse grid (the
    widest bracketing ratio of L0s)."""
    notes = []
    if 1 < min(seeds) < MIN_SEEDS:
        notes.append(f"{seeds[0]} and {seeds[1]} seeds: fewer than {MIN_SEEDS} per arm")
    if documents:
        notes.append(f"documents not resampled: {documents}")
    if sparse:
        notes.append(f"sparse grid (bracketing L0s {round(sparse, 1):g}x apart)")
    return notes
