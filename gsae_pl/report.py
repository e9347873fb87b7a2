"""The ablation suite's report: `python -m gsae_pl.report SUITE_DIR` (ablate calls `write_report`).

Reads what the runs left (runs/<name>/{config.yaml,metrics.json}, failed/<name>.json) and writes,
each file whole or not at all, results.csv, plots/*.png and report.md beside them. It only reads
run outputs, so it can be rerun at any time, e.g. while a suite is still going.
Metric names follow PAPER.md sec. 6.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from pathlib import Path

import yaml

from gsae_pl.cli import ArgumentParser, run_main
from gsae_pl.errors import UserError
from gsae_pl.io import atomic_write_text
from gsae_pl.report_plots import L0_FLOOR, by_variant, variant_curve, write_plots

# results.csv columns: the ones a reader compares first, then those only some data has.
MAIN_COLUMNS = ("variant", "l1_coefficient", "seed", "l0", "fvu", "loss_recovered",
                "delta_lm_loss", "relative_reconstruction_bias", "dead_fraction", "steps",
                "seconds")
EXTRA_COLUMNS = ("mmcs", "fraction_recovered", "tokens", "run")
COLUMNS = MAIN_COLUMNS + EXTRA_COLUMNS

# Where the Pareto summary reads each variant's curve: a 1-2-5 ladder, kept where points bracket it.
L0_LADDER = (1, 2, 5, 10, 20, 40, 80, 160, 320, 640, 1280)

# ---------------------------------------------------------------- reading the suite

def _read(path: Path, parse):
    try:
        return parse(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise UserError(f"cannot read {path}: {str(err).splitlines()[0]}") from None


def _get(cfg: dict, dotted: str):
    for key in dotted.split("."):
        cfg = cfg.get(key) if isinstance(cfg, dict) else None
    return cfg


def read_run(run_dir: Path) -> dict | None:
    """One results row for a finished run (None when metrics.json is absent: not finished)."""
    if not (run_dir / "metrics.json").exists():
        return None
    metrics = _read(run_dir / "metrics.json", json.loads)
    cfg = _read(run_dir / "config.yaml", yaml.safe_load) if (run_dir / "config.yaml").exists() \
        else {}
    cfg = cfg or {}
    row = {column: metrics.get(column) for column in COLUMNS}
    # output.variant is set by ablate; a hand-made run falls back to its architecture.
    row["variant"] = _get(cfg, "output.variant") or _get(cfg, "sae.architecture") or "unknown"
    row["l1_coefficient"] = _get(cfg, "loss.l1_coefficient")
    row["seed"] = _get(cfg, "seed")
    row["run"] = run_dir.name
    return row


def _sort_key(row: dict):
    # None sorts first rather than raising, so one odd config cannot stop the report.
    def num(value):
        return (value is not None, value if value is not None else 0)
    return (row["variant"], num(row["l1_coefficient"]), num(row["seed"]), row["run"])


def load_rows(suite_dir: Path) -> tuple[list[dict], list[str]]:
    """(finished runs' rows sorted by variant, l1 coefficient, seed; names of unfinished runs)."""
    runs = sorted(p for p in (suite_dir / "runs").glob("*") if p.is_dir())
    rows, unfinished = [], []
    for run_dir in runs:
        row = read_run(run_dir)
        if row is None:
            unfinished.append(run_dir.name)
        else:
            rows.append(row)
    return sorted(rows, key=_sort_key), unfinished


def load_failures(suite_dir: Path, finished: set[str]) -> list[dict]:
    """failed/<run>.json records, except for runs that have since finished (a stale record
    from an earlier attempt must not be reported next to the run's results)."""
    failures = []
    for path in sorted((suite_dir / "failed").glob("*.json")):
        record = _read(path, json.loads)
        record.setdefault("run", path.stem)
        if record["run"] not in finished:
            failures.append(record)
    return failures


# ---------------------------------------------------------------- numbers

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


def fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ---------------------------------------------------------------- outputs

def write_results_csv(suite_dir: Path, rows: list[dict]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row[k] is None else row[k] for k in COLUMNS})
    path = suite_dir / "results.csv"
    atomic_write_text(path, buffer.getvalue())
    return path


def _markdown_table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in body]


def pareto_summary(rows: list[dict]) -> list[str]:
    """Per metric, each variant's L0 range and the metric read off its curve at common L0s:
    the table that says whether one variant Pareto-dominates another."""
    lines, groups = [], by_variant(rows)
    curves_of = {metric: {v: variant_curve(g, metric) for v, g in groups.items()}
                 for metric in ("loss_recovered", "fvu", "relative_reconstruction_bias", "mmcs")}
    for metric, curves in curves_of.items():
        targets = common_l0s(curves)
        if not any(curves.values()) or not targets:
            continue
        header = ["variant", "points", "L0 range"] + [f"{metric} @ L0={x}" for x in targets]
        body = [[v, str(len(c)), f"{fmt(c[0][0])} - {fmt(c[-1][0])}" if c else ""]
                + [fmt(interpolate_at_l0(c, x)) for x in targets] for v, c in curves.items()]
        lines += ["", f"**{metric}** (mean over seeds per coefficient, interpolated linearly "
                      "in log L0; blank where the variant's runs do not bracket that L0):", ""]
        lines += _markdown_table(header, body)
    return lines + _l0_needed_table(curves_of["loss_recovered"])


def _l0_needed_table(curves: dict[str, list[tuple[float, float]]]) -> list[str]:
    """The paper's way to read the Pareto plot: L0 needed for a given loss recovered."""
    if not any(curves.values()):
        return []
    targets = (0.9, 0.95, 0.97, 0.98)
    body = [[v] + [fmt(l0_needed(c, t)) for t in targets] for v, c in curves.items()]
    return ["", "**L0 needed** to reach each loss recovered (same interpolation; blank where "
                "no pair of the variant's runs straddles it):", ""] + \
        _markdown_table(["variant"] + [f"L0 @ loss_recovered={t}" for t in targets], body)


def _tokens_text(rows: list[dict]) -> str:
    tokens = sorted({r["tokens"] for r in rows if r["tokens"] is not None})
    if not tokens:
        return "unknown tokens per run"
    if len(tokens) == 1:
        return f"{tokens[0]:,} tokens per run"
    return f"{tokens[0]:,} - {tokens[-1]:,} tokens per run"


def _intro(rows, failures, unfinished, wall_seconds) -> str:
    text = (f"Made by `python -m gsae_pl.report` from the runs under `runs/`: {len(rows)} "
            f"finished, {len(failures)} failed")
    text += f", {len(unfinished)} unfinished ({', '.join(unfinished)})" if unfinished else ""
    text += f"; {_tokens_text(rows)}"
    text += f"; suite wall time {wall_seconds:.0f} s." if wall_seconds is not None else "."
    clipped = sum(1 for r in rows if r["l0"] is not None and r["l0"] < L0_FLOOR)
    text += (f" L0 axes are logarithmic; L0 below {L0_FLOOR} is drawn at {L0_FLOOR} "
             f"({clipped} run(s) affected). Metrics are defined in PAPER.md sec. 6 and "
             "measured on held-out data; every number is also in `results.csv`.")
    return text


def _failures_section(suite_dir: Path, failures: list[dict]) -> list[str]:
    if not failures:
        return ["none"]
    body = []
    for f in failures:
        log = f.get("log") or f"logs/{f['run']}.log"
        try:  # a path relative to the suite is a working link from report.md
            log = str(Path(log).relative_to(suite_dir))
        except ValueError:
            pass
        error = str(f.get("error", "")).replace("|", "\\|")
        body.append([f["run"], fmt(f.get("returncode")), error, f"[{log}]({log})"])
    return _markdown_table(["run", "returncode", "error", "log"], body)


def write_report(suite_dir: Path, wall_seconds: float | None = None) -> Path:
    """results.csv, plots/*.png and report.md for the suite; returns report.md's path."""
    suite_dir = Path(suite_dir)
    if not suite_dir.is_dir():
        raise UserError(f"{suite_dir} is not a directory (expected an ablation suite's output)")
    rows, unfinished = load_rows(suite_dir)
    failures = load_failures(suite_dir, {r["run"] for r in rows})
    # a failed run keeps its run directory; it is reported once, as failed
    unfinished = sorted(set(unfinished) - {f["run"] for f in failures})
    if not rows and not failures and not unfinished:
        raise UserError(f"{suite_dir} holds no runs (nothing under runs/ or failed/)")
    write_results_csv(suite_dir, rows)
    title = f"{suite_dir.resolve().name}: {_tokens_text(rows)}"
    figures = suite_figures(suite_dir)
    plots = write_plots(suite_dir, rows, title, figures)
    lines = [f"# Ablation suite `{suite_dir.resolve().name}`", "",
             _intro(rows, failures, unfinished, wall_seconds), "", "## Results", ""]
    lines += _markdown_table(list(COLUMNS), [[fmt(r[c]) for c in COLUMNS] for r in rows])
    lines += ["", "## Pareto summary"] + (pareto_summary(rows) or ["", "no curve to read"])
    lines += ["", "## Plots"] + [f"\n![{p.stem}](plots/{p.name})" for p in plots.get("", [])]
    for name, paths in plots.items():
        if name:
            lines += ["", f"### {name}: {', '.join(figures[name])}"]
            lines += [f"\n![{p.stem}](plots/{p.name})" for p in paths]
    lines += ["", "## Failed runs", ""] + _failures_section(suite_dir, failures)
    path = suite_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def suite_figures(suite_dir: Path) -> dict[str, list[str]]:
    """The focused figures the suite file names (`figures:`), from the copy of it that
    ablate keeps in the suite directory; none without one."""
    path = suite_dir / "suite.yaml"
    spec = _read(path, yaml.safe_load) if path.is_file() else None
    return dict((spec or {}).get("figures") or {})


def _main(args: argparse.Namespace) -> int:
    print(write_report(Path(args.suite_dir)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m gsae_pl.report", description=__doc__)
    parser.add_argument("suite_dir", help="an ablation suite's output directory")
    return run_main(lambda: _main(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
