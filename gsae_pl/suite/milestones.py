"""The suite report's learning curves: the milestones runs measured at `eval.at_tokens`
(runs/<run>/milestones.json, gsae_pl/run/milestones.py) as `milestones.csv` beside
results.csv, and the figure plots/metrics_vs_tokens.png (gsae_pl/suite/report.py).

milestones.csv has one row per run and milestone: the run's identity columns as in
results.csv (variant, swept, value, seed, run), then step, tokens, tokens_asked and every
numeric metric. It is a file of its own, not rows of results.csv, whose every reader (the
tables, the seed spread, the read-offs, --verify) takes a row for one finished run.

The figure: one panel per metric (L0, FVU, loss recovered: those the runs have), tokens on
a log axis; one line per variant and swept value (the mean over seeds at each milestone,
its swept value written at its end), in the variant's style of the other figures, ending
at the runs' final evaluation. Without milestones the report writes neither.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

from matplotlib.figure import Figure

from gsae_pl.io import atomic_write, atomic_write_csv
from gsae_pl.suite.plots import LABELS, MADE_BY, by_variant, styles

CURVE_METRICS = ("l0", "fvu", "loss_recovered")
IDENTITY = ("variant", "swept", "value", "seed", "run")
POSITION = ("step", "tokens", "tokens_asked")
FIGURE = "metrics_vs_tokens.png"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_milestones(run_dir: Path) -> list[dict]:
    """A run's milestones (none without milestones.json). A damaged file is skipped with a
    warning: one odd run must not stop the suite's report."""
    path = run_dir / "milestones.json"
    if not path.is_file():
        return []
    try:
        found = json.loads(path.read_text()).get("milestones")
        if not isinstance(found, list) or not all(isinstance(m, dict) and _is_number(
                m.get("tokens")) for m in found):
            raise ValueError("no list of milestones with their tokens")
    except (OSError, ValueError, AttributeError) as err:
        print(f"warning: skipping {path}: {str(err).splitlines()[0]}", file=sys.stderr)
        return []
    return found


def milestone_rows(suite_dir: Path, rows: list[dict]) -> list[dict]:
    """milestones.csv's rows: each finished run's milestones (results rows `rows`), in
    results.csv's order, then by tokens."""
    out = []
    for row in rows:
        for milestone in read_milestones(suite_dir / "runs" / row["run"]):
            numbers = {k: v for k, v in milestone.items() if _is_number(v)}
            out.append({**{k: row[k] for k in IDENTITY}, **numbers})
    return out


def write_milestones_csv(suite_dir: Path, points: list[dict]) -> Path:
    rest = sorted({k for p in points for k in p} - set(IDENTITY) - set(POSITION))
    shown = [*IDENTITY[:-1], *POSITION, *rest, IDENTITY[-1]]
    return atomic_write_csv(suite_dir / "milestones.csv", shown, points)


def curves(points: list[dict], rows: list[dict], metric: str) -> dict[tuple, list[tuple]]:
    """(variant, swept value) -> [(tokens, mean over seeds of `metric`), ...] by tokens: the
    milestones, then each run's final evaluation (its results row) unless a milestone was
    at the run's last step."""
    last = {(p["run"], p["tokens"]) for p in points}
    finals = [r for r in rows if r.get("tokens") is not None and (r["run"], r["tokens"])
              not in last and any(p["run"] == r["run"] for p in points)]
    sums: dict[tuple, dict[float, list[float]]] = {}
    for point in [*points, *finals]:
        if point.get(metric) is not None:
            at = sums.setdefault((point["variant"], point["value"]), {})
            at.setdefault(point["tokens"], []).append(point[metric])
    return {key: sorted((t, sum(v) / len(v)) for t, v in at.items())
            for key, at in sorted(sums.items(), key=lambda kv: (kv[0][0], str(kv[0][1])))}


def learning_curve_figure(points: list[dict], rows: list[dict], title: str) -> Figure | None:
    """The figure of each of CURVE_METRICS that some milestone has against tokens; None
    when none has any."""
    shown = [m for m in CURVE_METRICS if any(p.get(m) is not None for p in points)]
    if not shown:
        return None
    style = styles(list(by_variant(rows)))  # every variant's, as in the other figures
    fig = Figure(figsize=(5.0 * len(shown) + 2.0, 4.2), layout="constrained")
    for ax, metric in zip(fig.subplots(1, len(shown), squeeze=False)[0], shown):
        labelled = set()
        for (variant, value), curve in curves(points, rows, metric).items():
            colour, marker, linestyle = style[variant]
            x, y = zip(*curve)
            ax.plot(x, y, color=colour, marker=marker, linestyle=linestyle, markersize=4,
                    label=None if variant in labelled else variant)
            labelled.add(variant)
            ax.annotate(f"{value:g}" if _is_number(value) else str(value), curve[-1],
                        xytext=(3, 0), textcoords="offset points", fontsize=6, color=colour)
        ax.set_xscale("log")
        ax.margins(x=0.1)  # room for the swept values at the lines' ends
        ax.set_xlabel("training tokens (rows)")
        ax.set_ylabel(LABELS.get(metric, metric), fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"{title}: held-out metrics against tokens (milestones, mean over seeds)",
                 fontsize=10)
    fig.axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def write_learning_curves(suite_dir: Path, rows: list[dict], title: str) -> list[Path]:
    """milestones.csv and the figure, when some finished run has milestones; returns the
    figure's path ([] without one)."""
    points = milestone_rows(suite_dir, rows)
    if not points:
        return []
    write_milestones_csv(suite_dir, points)
    fig = learning_curve_figure(points, rows, title)
    if fig is None:
        return []
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, metadata={"Software": MADE_BY})
    path = suite_dir / "plots" / FIGURE
    atomic_write(path, lambda fh: fh.write(buffer.getvalue()))
    return [path]


def learning_curves_section(paths: list[Path]) -> list[str]:
    """report.md's lines for the figure (none without one)."""
    if not paths:
        return []
    return ["", "## Learning curves", "",
            "Each run's held-out evaluation at the token counts of `eval.at_tokens` "
            "(every value in `milestones.csv`), ending at its final evaluation: one line per "
            "variant and swept value, the mean over seeds."] + \
        [f"\n![{p.stem}](plots/{p.name})" for p in paths]
