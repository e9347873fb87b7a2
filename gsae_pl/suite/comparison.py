"""The report's paired comparison of two variants (gsae_pl/suite/report.py, "Gated vs baseline"):
for each value both curves give (a metric at a common L0, the L0 needed for a loss
recovered), the difference A - B read off the seed-mean curves, its 95% interval from the
two-level bootstrap (gsae_pl/suite/paired.py), the difference under the second interpolant
(the monotone cubic in log L0, gsae_pl/suite/curves.py), and the verdict with its caveats
(gsae_pl/suite/uncertainty.py). docs/method.md sec. 6 states the rules and their assumptions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from gsae_pl.suite import paired, uncertainty
from gsae_pl.suite.curves import (
    SPARSE_RATIO,
    bracket_at_l0,
    bracket_needed,
    common_l0s,
    interpolate_at_l0,
    l0_needed,
    pchip_at_l0,
    pchip_l0_needed,
)
from gsae_pl.suite.plots import by_variant, variant_curve

METRICS = ("loss_recovered", "fvu", "relative_reconstruction_bias")
LOSS_TARGETS = (0.9, 0.95, 0.97, 0.98)
HEADER = ["value", "{a}", "{b}", "difference [95% interval]", "difference, monotone cubic",
          "verdict"]


@dataclass(frozen=True)
class Check:
    """One read-off: its label, the metric the curves plot, the quantity it yields (a metric,
    or "l0_needed"), and how to read it off a curve under each interpolant."""
    label: str
    metric: str
    quantity: str
    read: Callable
    cubic: Callable
    bracket: Callable


def n_documents(stats: dict[str, dict]) -> int:
    """The number of held-out documents (one for every run: document_stats.load checks)."""
    return len(np.asarray(next(iter(next(iter(stats.values())).values()))))


def checks(groups: dict[str, list[dict]]) -> list[Check]:
    found = []
    for metric in METRICS:
        for x in common_l0s({v: variant_curve(g, metric) for v, g in groups.items()}):
            found.append(Check(f"{metric} @ L0={x}", metric, metric,
                               lambda c, x=x: interpolate_at_l0(c, x),
                               lambda c, x=x: pchip_at_l0(c, x),
                               lambda c, x=x: bracket_at_l0(c, x)))
    found += [Check(f"L0 needed @ loss_recovered={t}", "loss_recovered", "l0_needed",
                    lambda c, t=t: l0_needed(c, t), lambda c, t=t: pchip_l0_needed(c, t),
                    lambda c, t=t: bracket_needed(c, t)) for t in LOSS_TARGETS]
    return found


def _sparsity(curves, bracket: Callable) -> float | None:
    """The widest ratio of bracketing L0s over both arms, where one exceeds SPARSE_RATIO."""
    ratios = [hi / lo for lo, hi in filter(None, map(bracket, curves)) if lo > 0]
    widest = max(ratios, default=None)
    return widest if widest is not None and widest > SPARSE_RATIO else None


def compare(arms: tuple[list[dict], list[dict]], names: tuple[str, str], check: Check,
            fmt: Callable, stats: dict[str, dict] | None = None,
            no_documents: str | None = "no per-document statistics",
            replicates: int = paired.REPLICATES) -> list[str] | None:
    """The table row for `check`; None unless both arms' seed-mean curves give it."""
    curves = [variant_curve(rows, check.metric) for rows in arms]
    a, b = (check.read(c) for c in curves)
    if a is None or b is None:
        return None
    usable = [paired.usable(rows, check.metric) for rows in arms]
    seeds = tuple(len(paired.arm_seeds(rows)) for rows in usable)
    resample = paired.can_resample_documents(stats, usable, check.metric)
    draws = paired.draw(seeds, n_documents(stats) if resample else None, replicates)
    found = paired.interval(paired.differences(usable, check.metric, check.read, draws,
                                               stats if resample else None))
    why_not = None if resample else (no_documents or f"no per-document {check.metric} sums")
    verdict = uncertainty.verdict(check.quantity, names[0], found, b, seeds, names)
    notes = uncertainty.caveats(seeds, names, why_not, _sparsity(curves, check.bracket))
    ca, cb = (check.cubic(c) for c in curves)
    span = "" if found is None else f" [{fmt(found[0])}, {fmt(found[1])}]"
    cubic = "" if ca is None or cb is None else fmt(ca - cb)
    return [check.label, fmt(a), fmt(b), fmt(a - b) + span, cubic,
            "; ".join([verdict, *notes])]


def section(rows: list[dict], fmt: Callable, stats: dict[str, dict] | None = None,
            no_documents: str | None = "no per-document statistics",
            names: tuple[str, str] = uncertainty.PAIR) -> tuple[list[str], list[list[str]]] | str:
    """(header, body) of the comparison table, or a line saying why there is none."""
    groups = by_variant(rows)
    if not all(v in groups for v in names):
        return f"no {names[0]}-vs-{names[1]} comparison: the suite lacks one of the two variants"
    arms = (groups[names[0]], groups[names[1]])
    body = [row for check in checks(groups)
            if (row := compare(arms, names, check, fmt, stats, no_documents)) is not None]
    if not body:
        return f"no value that both {names[0]} and {names[1]} curves give"
    return [h.format(a=names[0], b=names[1]) for h in HEADER], body
