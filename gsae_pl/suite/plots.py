"""The suite report's figures: each plotted metric against L0 (log axis; which metrics: the
suite file's `metrics:`, else DEFAULT_METRICS), one style per variant, a point per run and a
line through the seed means, each mean labelled with its swept value (gsae_pl/suite/report.py).
Error bars: on the line, the sample SD over seeds at each swept value (where there are 2 or
more); on each loss-recovered point, its held-out standard error. Gamma plots mark gamma = 1
(no shrinkage) with a dashed line.

Styles: a variant gets a colour from PALETTE (10 distinct hues, black, grey), a line style and
a marker, fixed by its place among ALL the suite's variants, so a variant looks the same in
every figure, including the focused ones a suite names under `figures:`; neighbours differ
in line style too, and no two of any number of variants share all three.

The y axis spans the band that matters: a point beyond Tukey's far-out fences (3 IQR past
the quartiles, from 5 points on), such as a collapsed no-aux run at loss recovered 0.32
among runs at 0.8-0.99, is left off the axis and marked at its edge by an arrow with its
variant and value, so it cannot squash the other curves into a line.

A bare matplotlib Figure renders with Agg and touches no global pyplot state.
"""

from __future__ import annotations

import io
import statistics
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from gsae_pl.io import atomic_write

# Log axes cannot show L0 = 0 (a collapsed SAE); such points are drawn at this floor.
L0_FLOOR = 0.01

LABELS = {
    "l0": "L0 (mean non-zero features per token)",
    "fvu": "FVU (fraction of variance unexplained)",
    "loss_recovered": "loss recovered (CE_zero - CE_spliced) / (CE_zero - CE_clean)",
    "relative_reconstruction_bias": "gamma (relative reconstruction bias)",
    "mmcs": "MMCS (mean max cosine similarity to true features)",
}
# The y metrics plotted when the suite file names none; x is always L0.
DEFAULT_METRICS = ("loss_recovered", "fvu", "relative_reconstruction_bias", "mmcs")
# A plot's file is l0_vs_<metric>.png, except these (gamma_vs_l0 keeps the name).
STEMS = {"relative_reconstruction_bias": "gamma_vs_l0"}
MARKERS = "osD^vP*X<>hp"
# Ten hues at least 20 degrees apart in CIELAB hue angle (so no two blues, no red beside a
# brown), then black and grey; ordered so that neighbouring variants contrast.
PALETTE = ("#0072b2", "#ff7f00", "#33a02c", "#d62728", "#6a3d9a", "#17becf", "#e7298a",
           "#000000", "#bcbd22", "#009e73", "#e6ab02", "#999999")
LINESTYLES = ("-", "--", "-.", ":")
FENCE = 3.0  # Tukey's far-out fence, in interquartile ranges
MIN_POINTS_TO_CLIP = 5  # with fewer, the quartiles say little about what is an outlier
GAMMA = "relative_reconstruction_bias"


def _seed_groups(rows: list[dict], metric: str) -> list[list[dict]]:
    """A variant's rows that have `metric` and L0, grouped by swept value (one per seed)."""
    groups: dict = {}
    for row in rows:
        if row.get(metric) is not None and row["l0"] is not None:
            groups.setdefault(row["value"], []).append(row)
    return list(groups.values())


def labelled_curve(rows: list[dict], metric: str) -> list[tuple[float, float, object]]:
    """`variant_curve`'s points with the swept value each is the mean at: (L0, y, value)."""
    curve = []
    for group in _seed_groups(rows, metric):
        l0 = sum(max(r["l0"], L0_FLOOR) for r in group) / len(group)
        curve.append((l0, sum(r[metric] for r in group) / len(group), group[0]["value"]))
    return sorted(curve, key=lambda point: point[:2])


def variant_curve(rows: list[dict], metric: str) -> list[tuple[float, float]]:
    """One variant's (L0, metric) points, the mean over seeds at each swept value, by L0.
    L0 is clipped at L0_FLOOR so the curve can live on a log axis."""
    return [(l0, y) for l0, y, _ in labelled_curve(rows, metric)]


def seed_sd_curve(rows: list[dict], metric: str) -> list[float]:
    """The sample SD over seeds of `metric` at each point of `variant_curve` (0 with one)."""
    points = []
    for group in _seed_groups(rows, metric):
        l0 = sum(max(r["l0"], L0_FLOOR) for r in group) / len(group)
        values = [r[metric] for r in group]
        points.append((l0, statistics.stdev(values) if len(values) > 1 else 0.0))
    return [sd for _, sd in sorted(points)]


def by_variant(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows grouped by variant, variants in sorted order (which also fixes their colours)."""
    groups: dict[str, list[dict]] = {}
    for row in rows:  # load_rows sorted them by variant, swept value, seed
        groups.setdefault(row["variant"], []).append(row)
    return dict(sorted(groups.items()))


def styles(variants: list[str]) -> dict[str, tuple]:
    """variant -> (colour, marker, line style), by the variant's place in sorted order: the
    colour and marker cycle through 12, the line style through 4, shifted by one every 12
    variants so that no two variants share all three."""
    return {v: (PALETTE[i % len(PALETTE)], MARKERS[i % len(MARKERS)],
                LINESTYLES[(i + i // len(PALETTE)) % len(LINESTYLES)])
            for i, v in enumerate(sorted(variants))}


def y_band(values: list[float], keep: tuple[float, ...] = ()) -> tuple[float, float] | None:
    """The y limits that leave out far-out points (beyond FENCE interquartile ranges past
    the quartiles), padded by 8% and stretched over `keep` (gamma's reference line);
    None when no point is far out, or there are too few points to tell."""
    if len(values) < MIN_POINTS_TO_CLIP:
        return None
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    low, high = q1 - FENCE * (q3 - q1), q3 + FENCE * (q3 - q1)
    inside = [v for v in values if low <= v <= high]
    if len(inside) == len(values):
        return None
    lo, hi = min(inside + list(keep)), max(inside + list(keep))
    pad = 0.08 * (hi - lo) or 0.05 * max(abs(hi), 1e-3)
    return lo - pad, hi + pad


def _mark_off_axis(ax: Axes, points: list[tuple[float, float, str, str]],
                   band: tuple[float, float]) -> None:
    """An arrow at the axis edge for each (x, y, variant, colour) outside `band`."""
    lo, hi = band
    for x, y, variant, colour in points:
        if lo <= y <= hi:
            continue
        edge, offset = (lo, 22) if y < lo else (hi, -22)
        ax.annotate(f"{variant} {y:.3g}", xy=(x, edge), xytext=(0, offset),
                    textcoords="offset points", ha="center", fontsize=7, color=colour,
                    arrowprops={"arrowstyle": "->", "color": colour})


def _shown(value) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else str(value)


def metric_figure(rows: list[dict], metric: str, title: str, style: dict[str, tuple]) -> Figure:
    """The Figure of `metric` against L0 for the variants in `rows` (one Axes)."""
    fig = Figure(figsize=(8.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ys, off_axis, has_se = [], [], False
    for variant, group in by_variant(rows).items():
        points = [(max(r["l0"], L0_FLOOR), r[metric]) for r in group
                  if r.get(metric) is not None and r["l0"] is not None]
        if not points:
            continue
        colour, marker, linestyle = style[variant]
        ax.scatter(*zip(*points), color=colour, marker=marker, s=18, alpha=0.6)
        ys += [y for _, y in points]
        off_axis += [(x, y, variant, colour) for x, y in points]
        se_key = f"{metric}_se"
        with_se = [(max(r["l0"], L0_FLOOR), r[metric], r[se_key]) for r in group
                   if r.get(se_key) is not None and r[metric] is not None and r["l0"] is not None]
        if with_se:  # held-out standard error of each run's value
            x, y, se = zip(*with_se)
            ax.errorbar(x, y, yerr=se, fmt="none", ecolor=colour, alpha=0.6, capsize=2)
            has_se = True
        curve = labelled_curve(group, metric)
        x, y, values = zip(*curve)
        ax.errorbar(x, y, yerr=seed_sd_curve(group, metric), color=colour, marker=marker,
                    linestyle=linestyle, capsize=3, label=variant)
        for px, py, value in curve:  # the swept value beside each seed-mean point
            ax.annotate(_shown(value), (px, py), xytext=(3, 3), textcoords="offset points",
                        fontsize=6, color=colour, alpha=0.9)
    if metric == GAMMA:
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="gamma = 1")
    band = y_band(ys, keep=(1.0,) if metric == GAMMA else ())
    if band:
        ax.set_ylim(*band)
        _mark_off_axis(ax, off_axis, band)
        ax.text(0.99, 0.01, "arrows: points beyond the axis", transform=ax.transAxes,
                ha="right", va="bottom", fontsize=7, color="grey")
    ax.set_xscale("log")
    clipped = any(r["l0"] is not None and r["l0"] < L0_FLOOR for r in rows)
    ax.set_xlabel(LABELS["l0"] + (f"; L0 < {L0_FLOOR} drawn at {L0_FLOOR}" if clipped else ""))
    ax.set_ylabel(LABELS.get(metric, metric))
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.supxlabel(error_bar_note(has_se), fontsize=7, color="grey")  # laid out below
    # Beside the axes, not on them: with ten variants a legend inside hides a curve.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def error_bar_note(has_se: bool) -> str:
    """What the plot's error bars are (gsae_pl/suite/uncertainty.py says which to compare)."""
    note = "error bars on the lines: sample SD over seeds of each swept value (none: 1 seed)"
    if has_se:
        note += ("; thin bars on the points: each run's held-out SE (the same windows for "
                 "every variant: not the noise between variants)")
    return note


def plot_metric(rows: list[dict], metric: str, title: str, style: dict[str, tuple]) -> bytes:
    """PNG bytes of `metric` against L0 for the variants in `rows`."""
    buffer = io.BytesIO()
    metric_figure(rows, metric, title, style).savefig(buffer, format="png", dpi=110,
                                                      metadata={"Software": MADE_BY})
    return buffer.getvalue()


# The PNG's Software text: the mark of a plot the report made, the only PNGs it deletes.
MADE_BY = "gsae_pl.report"


def made_by_report(png: Path) -> bool:
    """Whether `png` is a plot the report wrote (a user's own PNG in plots/ is kept)."""
    from PIL import Image

    try:
        with Image.open(png) as image:
            return image.info.get("Software") == MADE_BY
    except (OSError, ValueError, SyntaxError):  # not a PNG PIL can read: not ours
        return False


def plot_stem(metric: str) -> str:
    return STEMS.get(metric, f"l0_vs_{metric}")


def write_plots(suite_dir: Path, rows: list[dict], title: str,
                figures: dict[str, list[str]] | None = None,
                metrics: tuple[str, ...] = DEFAULT_METRICS) -> dict[str, list[Path]]:
    """Each of `metrics` that some run has, over all variants (group "") and over each named
    group of `figures` (files `<group>_<stem>.png`). Plots an earlier report made (MADE_BY)
    and this one did not are removed, so the folder never shows a figure from an earlier
    state of the suite; any other PNG there stays."""
    style = styles(list({r["variant"] for r in rows}))
    groups = {"": rows}
    groups.update({name: [r for r in rows if r["variant"] in members]
                   for name, members in (figures or {}).items()})
    written: dict[str, list[Path]] = {}
    for name, group in groups.items():
        for metric in metrics:
            if not any(r.get(metric) is not None and r["l0"] is not None for r in group):
                continue
            png = plot_metric(group, metric, f"{title}{f' ({name})' if name else ''}", style)
            path = suite_dir / "plots" / f"{name + '_' if name else ''}{plot_stem(metric)}.png"
            atomic_write(path, lambda fh, png=png: fh.write(png))
            written.setdefault(name, []).append(path)
    kept = {p for paths in written.values() for p in paths}
    for old in (suite_dir / "plots").glob("*.png"):
        if old not in kept and made_by_report(old):
            old.unlink()
    return written
