"""The report's figures, read from the matplotlib objects (not pixels): variant styles
that stay apart, a y axis clipped to the band that matters with arrows for the points
beyond it, gamma's reference line, and swept-value labels."""

from __future__ import annotations

import itertools
import math

import pytest
from matplotlib.colors import to_rgb

from gsae_pl.suite.plots import PALETTE, metric_figure, styles, y_band


def _lab(colour) -> tuple[float, float, float]:
    """sRGB -> CIELAB (D65), for colour differences as people see them."""
    linear = [((v + 0.055) / 1.055) ** 2.4 if v > 0.04045 else v / 12.92 for v in to_rgb(colour)]
    rows = ((0.4124, 0.3576, 0.1805), (0.2126, 0.7152, 0.0722), (0.0193, 0.1192, 0.9505))
    x, y, z = (sum(m * v for m, v in zip(row, linear)) / n
               for row, n in zip(rows, (0.95047, 1.0, 1.08883)))

    def f(t):
        return t ** (1 / 3) if t > 0.008856 else 7.787 * t + 16 / 116
    return 116 * f(y) - 16, 500 * (f(x) - f(y)), 200 * (f(y) - f(z))


def _apart(c1, c2) -> bool:
    """Two chromatic colours: hue angles 20 degrees apart (a light and a dark blue are not:
    the old palette's complaint); grey and black: lightness 30 apart."""
    (l1, a1, b1), (l2, a2, b2) = _lab(c1), _lab(c2)
    chroma1, chroma2 = math.hypot(a1, b1), math.hypot(a2, b2)
    if chroma1 < 10 or chroma2 < 10:
        return abs(l1 - l2) >= 30 or (chroma1 < 10) != (chroma2 < 10)
    turn = abs(math.degrees(math.atan2(b1, a1) - math.atan2(b2, a2))) % 360
    return min(turn, 360 - turn) >= 20


def test_eleven_variants_get_colours_of_distinct_hues():
    style = styles([f"v{i:02d}" for i in range(11)])
    colours = [colour for colour, _, _ in style.values()]
    assert len(set(colours)) == 11
    crowded = [(a, b) for a, b in itertools.combinations(colours, 2) if not _apart(a, b)]
    assert not crowded
    assert not _apart("#1f77b4", "#aec7e8")  # tab20's two blues, which the test must catch
    assert len(PALETTE) == 12


def test_no_two_variants_look_alike_and_neighbours_differ_in_line_style():
    names = sorted(f"v{i:02d}" for i in range(30))
    style = styles(names)
    assert len(set(style.values())) == 30  # (colour, marker, line style) all distinct
    for a, b in zip(names, names[1:]):
        assert style[a][2] != style[b][2]
    assert styles(["b", "a"])["a"] == styles(["a", "c"])["a"]  # by place, not by set


def test_the_band_leaves_a_far_out_point_off_and_keeps_the_rest():
    values = [0.85, 0.9, 0.93, 0.95, 0.96, 0.97, 0.98, 0.99, 0.32]  # a collapsed no-aux run
    lo, hi = y_band(values)
    span = 0.99 - 0.85
    assert lo == pytest.approx(0.85 - 0.08 * span) and hi == pytest.approx(0.99 + 0.08 * span)
    assert y_band(values[:-1]) is None  # nothing far out: matplotlib's own limits
    assert y_band([0.9, 0.95, 0.32, 0.99]) is None  # too few points to call one an outlier
    lo, hi = y_band([0.9, 0.91, 0.92, 0.93, 0.94, 2.5], keep=(1.0,))  # gamma: 1 stays in view
    assert lo < 0.9 and 1.0 < hi < 1.1


def _row(variant, value, seed, l0, **metrics):
    return {"variant": variant, "value": value, "seed": seed, "l0": l0, **metrics}


ROWS = [_row("gated", v, 0, l0, loss_recovered=lr, relative_reconstruction_bias=g)
        for v, l0, lr, g in ((0.1, 5.0, 0.90, 0.98), (0.05, 10.0, 0.94, 0.99),
                             (0.02, 20.0, 0.97, 1.0), (0.01, 40.0, 0.98, 1.0))] + \
       [_row("no_aux", 0.1, 0, 0.5, loss_recovered=0.32, relative_reconstruction_bias=0.9),
        _row("no_aux", 0.01, 0, 30.0, loss_recovered=0.96, relative_reconstruction_bias=1.0)]


ROW_VARIANTS = ("gated", "no_aux")


def test_loss_recovered_axis_is_clipped_and_the_outlier_marked_by_an_arrow():
    style = styles(["gated", "no_aux"])
    ax = metric_figure(ROWS, "loss_recovered", "t", style).axes[0]
    lo, hi = ax.get_ylim()
    assert 0.8 < lo < 0.9 and 0.98 < hi < 1.0  # 0.32 does not squash 0.90-0.98
    arrows = [t for t in ax.texts if getattr(t, "arrow_patch", None) is not None]
    assert [t.get_text() for t in arrows] == ["no_aux 0.32"]
    assert arrows[0].xy == (0.5, lo)  # at the bottom edge, above the point's L0
    labels = {t.get_text() for t in ax.texts if t not in arrows}
    assert {"0.1", "0.05", "0.02", "0.01"} <= labels  # each mean carries its swept value
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["gated", "no_aux"]


def test_gamma_gets_a_dashed_line_at_one():
    ax = metric_figure(ROWS, "relative_reconstruction_bias", "t", styles(["gated", "no_aux"])) \
        .axes[0]
    ones = [line for line in ax.get_lines() if list(line.get_ydata()) == [1.0, 1.0]]
    assert len(ones) == 1 and ones[0].get_linestyle() == "--"
    curves = {c.get_label(): c.lines[0] for c in ax.containers if c.get_label() in ROW_VARIANTS}
    assert curves["gated"].get_linestyle() != curves["no_aux"].get_linestyle()


def test_the_error_bars_say_what_they_are():
    """The seed SD on the lines; the held-out SE on the points only where the runs wrote
    one, and said to be no noise between variants (the report compares against the SD)."""
    style = styles(list(ROW_VARIANTS))
    plain = metric_figure(ROWS, "loss_recovered", "t", style).get_supxlabel()
    assert plain.startswith("error bars on the lines: sample SD over seeds")
    assert "held-out SE" not in plain
    with_se = [{**row, "loss_recovered_se": 0.01} for row in ROWS]
    note = metric_figure(with_se, "loss_recovered", "t", style).get_supxlabel()
    assert "thin bars on the points: each run's held-out SE" in note
    assert "not the noise between variants" in note
