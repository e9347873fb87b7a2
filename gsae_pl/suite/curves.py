"""Reading a variant's (L0, metric) curve: the value at an L0, and the L0 at which loss
recovered reaches a target (gsae_pl/suite/report.py, its Pareto summary and comparisons).

Two interpolants, both in log L0 (docs/method.md sec. 6, "Read-offs"): linear, the one every
table uses, and a monotone cubic (Fritsch-Carlson, as scipy's PchipInterpolator), shown beside
it in the comparisons so a reader sees how much a read-off owes to the choice. Where the two
points that bracket a read-off are more than SPARSE_RATIO apart in L0 the grid is "sparse"
there: the curve between them is a guess either way.
"""

from __future__ import annotations

import math

# Where the Pareto summary reads each variant's curve: a 1-2-5 ladder, kept where points bracket it.
L0_LADDER = (1, 2, 5, 10, 20, 40, 80, 160, 320, 640, 1280)
SPARSE_RATIO = 2.0


def bracket_at_l0(points: list[tuple[float, float]], l0: float) -> tuple[float, float] | None:
    """The L0s of the two points `interpolate_at_l0` reads `l0` between; None: no read-off."""
    points = sorted(points)
    for (x0, _), (x1, _) in zip(points, points[1:]):
        if x0 <= l0 <= x1:
            return x0, x1
    if len(points) == 1 and points[0][0] == l0:
        return l0, l0
    return None


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


def bracket_needed(points: list[tuple[float, float]], target: float) -> tuple[float, float] | None:
    """The L0s of the two runs that straddle `target` for `l0_needed`; None where none do."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if y0 < target <= y1:
            return x0, x1
    return None


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


def is_sparse(bracket: tuple[float, float] | None) -> bool:
    """Whether a read-off's bracketing L0s lie more than SPARSE_RATIO apart."""
    return bracket is not None and bracket[1] > SPARSE_RATIO * bracket[0]


# ---------------------------------------------------------------- the monotone cubic

def _merged_log(points: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """(log L0, y) sorted, points at one L0 merged into their mean (as the linear reader does)."""
    merged: dict[float, list[float]] = {}
    for x, y in points:
        merged.setdefault(x, []).append(y)
    xs = sorted(merged)
    return [math.log(x) for x in xs], [sum(merged[x]) / len(merged[x]) for x in xs]


def _pchip_slopes(x: list[float], y: list[float]) -> list[float]:
    """Fritsch-Carlson derivatives at each knot (scipy.interpolate.PchipInterpolator's): a
    weighted harmonic mean of the neighbouring secants inside, 0 at a local extremum, and
    the three-point end formula kept monotone at the ends."""
    h = [b - a for a, b in zip(x, x[1:])]
    delta = [(y[k + 1] - y[k]) / h[k] for k in range(len(h))]
    if len(h) == 1:
        return [delta[0], delta[0]]
    d = [0.0] * len(x)
    for k in range(1, len(x) - 1):
        if delta[k - 1] * delta[k] > 0:
            w1, w2 = 2 * h[k] + h[k - 1], h[k] + 2 * h[k - 1]
            d[k] = (w1 + w2) / (w1 / delta[k - 1] + w2 / delta[k])
    d[0] = _end_slope(h[0], h[1], delta[0], delta[1])
    d[-1] = _end_slope(h[-1], h[-2], delta[-1], delta[-2])
    return d


def _sign(v: float) -> int:
    return (v > 0) - (v < 0)


def _end_slope(h0: float, h1: float, m0: float, m1: float) -> float:
    d = ((2 * h0 + h1) * m0 - h0 * m1) / (h0 + h1)
    if _sign(d) != _sign(m0):
        return 0.0
    if _sign(m0) != _sign(m1) and abs(d) > 3 * abs(m0):
        return 3 * m0
    return d


def _hermite(y0: float, y1: float, d0: float, d1: float, h: float, t: float) -> float:
    return ((2 * t ** 3 - 3 * t ** 2 + 1) * y0 + (t ** 3 - 2 * t ** 2 + t) * h * d0
            + (-2 * t ** 3 + 3 * t ** 2) * y1 + (t ** 3 - t ** 2) * h * d1)


def pchip_at_l0(points: list[tuple[float, float]], l0: float) -> float | None:
    """As `interpolate_at_l0` (None outside the points), by the monotone cubic in log L0."""
    if bracket_at_l0(points, l0) is None:
        return None
    x, y = _merged_log(points)
    if len(x) == 1:
        return y[0]
    d, u = _pchip_slopes(x, y), math.log(l0)
    k = max(i for i in range(len(x) - 1) if x[i] <= u)
    h = x[k + 1] - x[k]
    return _hermite(y[k], y[k + 1], d[k], d[k + 1], h, (u - x[k]) / h)


def pchip_l0_needed(points: list[tuple[float, float]], target: float) -> float | None:
    """As `l0_needed`, on the monotone cubic: the cubic is monotone between two knots, so
    the L0 where it reaches `target` is found by bisection on that segment."""
    if bracket_needed(points, target) is None:
        return None
    x, y = _merged_log(points)
    d = _pchip_slopes(x, y)
    k = next((i for i in range(len(x) - 1) if y[i] < target <= y[i + 1]), None)
    if k is None:  # only two runs at one L0 straddled it: merged, they no longer do
        return None
    h, lo, hi = x[k + 1] - x[k], 0.0, 1.0
    for _ in range(60):  # 2^-60 of the segment: below float precision
        mid = (lo + hi) / 2
        if _hermite(y[k], y[k + 1], d[k], d[k + 1], h, mid) < target:
            lo = mid
        else:
            hi = mid
    return math.exp(x[k] + hi * h)
