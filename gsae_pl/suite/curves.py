"""Reading a variant's (L0, metric) curve: the value at an L0, and the L0 at which loss
recovered reaches a target, both linear in log L0 (gsae_pl/suite/report.py, its Pareto summary).
"""

from __future__ import annotations

import math

# Where the Pareto summary reads each variant's curve: a 1-2-5 ladder, kept where points bracket it.
L0_LADDER = (1, 2, 5, 10, 20, 40, 80, 160, 320, 640, 1280)


def interpolate_at_l0(points: list[tuple[float, float]], l0: float) -> float | None:
    """The curve through `points` (L0, y) at `l0`, linear in log L0; None unless points lie on
    both sides of `l0` (extrapolating would claim a result no run measured)."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= l0 <= x1:
            if x0 == x1:
                return (y0 + y1) / 2
            t = (math.log(l0) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    if len(points) == 1 and points[0][0] == l0:
        return points[0][1]
    return None


def common_l0s(curves: dict[str, list[tuple[float, float]]]) -> list[float]:
    """Ladder L0s that at least half the variants' curves bracket (an outlier such as a
    collapsed no-aux run must not empty the table), the 4 most widely covered, in order."""
    ranges = [(c[0][0], c[-1][0]) for c in curves.values() if c]
    covered = {x: sum(lo <= x <= hi for lo, hi in ranges) for x in L0_LADDER}
    chosen = [x for x in L0_LADDER if ranges and 2 * covered[x] >= len(ranges)]
    return sorted(sorted(chosen, key=lambda x: -covered[x])[:4])


def l0_needed(points: list[tuple[float, float]], target: float) -> float | None:
    """The smallest L0 at which the curve (L0, loss recovered) reaches `target`, linear in
    log L0 between the two runs that straddle it; None if no run reaches it, or the first
    run already exceeds it (extrapolating would claim an L0 no run measured)."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if y0 < target <= y1:
            t = (target - y0) / (y1 - y0)
            return math.exp(math.log(x0) + t * (math.log(x1) - math.log(x0)))
    return None
