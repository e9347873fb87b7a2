"""The suite report's noise: seed spread, held-out standard errors, and whether a
gated-vs-baseline difference is resolved (gsae_pl/suite/report.py).

- Seed spread is the sample standard deviation over seeds (n - 1 denominator), shown as
  "mean ± sd" wherever a variant has 2 or more seeds at one swept value.
- A value read off a curve (a metric at an L0, the L0 needed for a loss recovered) is also
  read off each seed's own curve; the band is the min - max of those per-seed values.
- SE is the held-out standard error of loss recovered (gsae_pl/eval/lm_eval.py: clustered by
  held-out document), mean over seeds: how far another held-out set could move that one
  number. It is shown, but it does not enter a comparison: every run of a suite is
  measured on the same held-out windows, so held-out sampling moves gated and baseline
  together and cancels from their difference, while the seed spread, measured on those
  same windows, is the training noise that does not cancel.
- A difference d between gated and baseline is "resolved" when |d| > RESOLVE_Z * noise,
  noise = sqrt(sd_gated^2 + sd_baseline^2). The per-seed SD (not SD / sqrt(n)) is
  deliberately conservative: with 2 or 3 seeds the SD is itself uncertain. With one seed
  there is no spread to compare against: never resolved.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

RESOLVE_Z = 2.0
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


def verdict(diff: float, noises: list[float | None]) -> str:
    """'resolved' when |diff| exceeds RESOLVE_Z x the combined noise, else why not."""
    if any(n is None for n in noises):
        return "not resolved at this noise (one seed: no spread)"
    noise = math.sqrt(sum(n * n for n in noises))
    if abs(diff) > RESOLVE_Z * noise:
        return f"resolved ({abs(diff) / noise:.1f} x noise {noise:.3g})"
    return f"not resolved at this noise ({noise:.3g})"


def compare(groups: dict[str, list[dict]], read: Callable, metric: str,
            curve: Callable) -> tuple[float, float, str] | None:
    """(gated value, baseline value, verdict) for one read-off of one metric's curves;
    None unless both variants give a value."""
    if not all(v in groups for v in PAIR):
        return None
    values, noises = [], []
    for variant in PAIR:
        value = read(curve(groups[variant], metric))
        if value is None:
            return None
        _, sd = mean_sd(per_seed(groups[variant], metric, read, curve) or [value])
        values.append(value)
        noises.append(sd)
    return values[0], values[1], verdict(values[0] - values[1], noises)
