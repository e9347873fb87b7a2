"""The suite report's figures: each plotted metric against L0 (log axis; which metrics: the
suite file's `metrics:`, else DEFAULT_METRICS), one colour and marker per
variant, a point per run and a line through the seed means (gsae_pl/suite/report.py). Error bars:
on the line, the sample SD over seeds at each swept value (where there are 2 or more); on
each loss-recovered point, its held-out standard error. Gamma plots mark gamma = 1 (no
shrinkage).

A bare matplotlib Figure renders with Agg and touches no global pyplot state. Colours and
markers follow a variant's place among ALL the suite's variants, so a variant looks the
same in every figure, including the focused ones a suite names under `figures:`.
"""

from __future__ import annotations

import io
import statistics
from pathlib import Path

from matplotlib.figure import Figure

from gsae_pl.run.io import atomic_write

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


def _seed_groups(rows: list[dict], metric: str) -> list[list[dict]]:
    """A variant's rows that have `metric` and L0, grouped by swept value (one per seed)."""
    groups: dict = {}
    for row in rows:
        if row.get(metric) is not None and row["l0"] is not None:
            groups.setdefault(row["value"], []).append(row)
    return list(groups.values())


def variant_curve(rows: list[dict], metric: str) -> list[tuple[float, float]]:
    """One variant's (L0, metric) points, the mean over seeds at each swept value, by L0.
    L0 is clipped at L0_FLOOR so the curve can live on a log axis."""
    curve = []
    for group in _seed_groups(rows, metric):
        l0 = sum(max(r["l0"], L0_FLOOR) for r in group) / len(group)
        curve.append((l0, sum(r[metric] for r in group) / len(group)))
    return sorted(curve)


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
    """variant -> (colour, marker), fixed by the variant's place among all of the suite's:
    20 colours and 12 markers, so no two of up to 20 variants look alike."""
    import matplotlib

    # tab20 pairs a dark and a light shade of each hue: take the 10 dark ones first, so
    # suites of up to 10 variants never put two shades of one hue side by side.
    colours = matplotlib.colormaps["tab20"]
    return {v: (colours((2 * i + i // 10) % 20), MARKERS[i % len(MARKERS)])
            for i, v in enumerate(sorted(variants))}


def plot_metric(rows: list[dict], metric: str, title: str, style: dict[str, tuple]) -> bytes:
    """PNG bytes of `metric` against L0 for the variants in `rows`."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for variant, group in by_variant(rows).items():
        points = [(max(r["l0"], L0_FLOOR), r[metric]) for r in group
                  if r.get(metric) is not None and r["l0"] is not None]
        if not points:
            continue
        colour, marker = style[variant]
        ax.scatter(*zip(*points), color=colour, marker=marker, s=18, alpha=0.6)
        se_key = f"{metric}_se"
        with_se = [(max(r["l0"], L0_FLOOR), r[metric], r[se_key]) for r in group
                   if r.get(se_key) is not None and r[metric] is not None and r["l0"] is not None]
        if with_se:  # held-out standard error of each run's value
            x, y, se = zip(*with_se)
            ax.errorbar(x, y, yerr=se, fmt="none", ecolor=colour, alpha=0.6, capsize=2)
        x, y = zip(*variant_curve(group, metric))
        ax.errorbar(x, y, yerr=seed_sd_curve(group, metric), color=colour, marker=marker,
                    capsize=3, label=variant)
    if metric == "relative_reconstruction_bias":
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="gamma = 1")
    ax.set_xscale("log")
    clipped = any(r["l0"] is not None and r["l0"] < L0_FLOOR for r in rows)
    ax.set_xlabel(LABELS["l0"] + (f"; L0 < {L0_FLOOR} drawn at {L0_FLOOR}" if clipped else ""))
    ax.set_ylabel(LABELS.get(metric, metric))
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def plot_stem(metric: str) -> str:
    return STEMS.get(metric, f"l0_vs_{metric}")


def write_plots(suite_dir: Path, rows: list[dict], title: str,
                figures: dict[str, list[str]] | None = None,
                metrics: tuple[str, ...] = DEFAULT_METRICS) -> dict[str, list[Path]]:
    """Each of `metrics` that some run has, over all variants (group "") and over each named
    group of `figures` (files `<group>_<stem>.png`). Files of plots not made this time are
    removed, so the folder never shows a figure from an earlier state of the suite."""
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
        if old not in kept:
            old.unlink()
    return written
