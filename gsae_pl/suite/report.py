"""The ablation suite's report: `python -m gsae_pl.report SUITE_DIR` (ablate calls `write_report`).

Reads what the runs left (runs/<name>/{config.yaml,metrics.json,milestones.json},
failed/<name>.json) and writes, each file whole or not at all, results.csv, milestones.csv
(runs with eval.at_tokens: gsae_pl/suite/milestones.py), plots/*.png and report.md beside
them, and the plots again as TensorBoard images under report/
(gsae_pl/suite/report_images.py). It only reads run outputs, so it can be rerun at any
time, e.g. while a suite is still going. It writes
only in a suite (a folder holding the suite.yaml ablate writes), and deletes only plots it
made itself (gsae_pl/suite/plots.py marks them).
Metric names follow docs/method.md; seed spread, standard errors and what counts as a
resolved difference: gsae_pl/suite/uncertainty.py; each run's provenance.json:
gsae_pl/run/provenance.py.
`--verify N` reruns N of a committed suite's runs and compares (gsae_pl/suite/verify.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from gsae_pl.cli import ArgumentParser, run_main
from gsae_pl.config import migrate
from gsae_pl.errors import UserError
from gsae_pl.io import atomic_write_csv, atomic_write_json, atomic_write_text
from gsae_pl.names import fitting_name
from gsae_pl.run import provenance
from gsae_pl.suite import comparison, document_stats, paired, uncertainty
from gsae_pl.suite.comparison import LOSS_TARGETS
from gsae_pl.suite.curves import (
    bracket_at_l0,
    bracket_needed,
    common_l0s,
    interpolate_at_l0,
    is_sparse,
    l0_needed,
)
from gsae_pl.suite.milestones import learning_curves_section, write_learning_curves
from gsae_pl.suite.plots import (
    DEFAULT_METRICS,
    L0_FLOOR,
    by_variant,
    variant_curve,
    write_plots,
)
from gsae_pl.suite.report_images import write_images
from gsae_pl.suite.spec import SPARSITY_KEY, check_metrics, sweep_label

# Table and results.csv columns: HEAD (the ones a reader compares first, then those only some
# data has), every other numeric metric a run wrote (by name), then TAIL. HEAD keeps the
# columns of reports made before any evaluation could add metrics, in their order, with
# d_sae beside the seed: variants of different widths (gated 512, baseline 768) compare
# only with it in view.
HEAD = ("variant", "swept", "value", "seed", "d_sae", "l0", "fvu", "loss_recovered",
        "loss_recovered_se", "delta_lm_loss", "delta_lm_loss_se",
        "relative_reconstruction_bias", "dead_fraction", "steps", "seconds", "mmcs",
        "fraction_recovered", "tokens")
TAIL = ("run",)
# From config.yaml and the folder: `swept` labels the key the suite swept for the run
# (output.sweep; `l1`, the sparsity coefficient, by default) and `value` is its value.
IDENTITY = ("variant", "swept", "value", "seed", "d_sae", "run")


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
    problem = _bad_metrics(metrics)
    if problem:  # skip it and say so: one odd run must not stop the suite's report
        print(f"warning: skipping {run_dir / 'metrics.json'}: {problem}; the report lists "
              f"{run_dir.name} as unfinished", file=sys.stderr)
        return None
    cfg = _read(run_dir / "config.yaml", yaml.safe_load) if (run_dir / "config.yaml").exists() \
        else {}
    cfg = cfg or {}
    row = {column: metrics.get(column) for column in HEAD}
    row.update({key: value for key, value in metrics.items()
                if key not in row and key not in IDENTITY and _is_number(value)})
    # output.variant is set by ablate; a hand-made run falls back to its architecture.
    row["variant"] = _get(cfg, "output.variant") or _get(cfg, "sae.architecture") or "unknown"
    cfg = migrate(cfg, str(run_dir / "config.yaml"))  # a run made before a key moved
    key = _get(cfg, "output.sweep") or SPARSITY_KEY
    row["swept"], row["value"] = sweep_label(key), _get(cfg, key)
    row["seed"] = _get(cfg, "seed")
    row["d_sae"] = _get(cfg, "sae.d_sae")
    row["run"] = run_dir.name
    return row


def _bad_metrics(metrics) -> str | None:
    """Why `metrics` (parsed metrics.json) cannot make a results row; None if it can."""
    if not isinstance(metrics, dict):
        return f"it holds a JSON {type(metrics).__name__}, not an object"
    for column in HEAD:
        if column in IDENTITY:
            continue  # taken from config.yaml and the folder name, not from metrics.json
        value = metrics.get(column)
        if value is not None and not _is_number(value):
            return f"{column} is {value!r}, not a number"
    return None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def columns(rows: list[dict]) -> list[str]:
    """HEAD, the other metrics some row has (sorted by name: stable across reruns), TAIL."""
    rest = sorted({key for row in rows for key in row} - set(HEAD) - set(TAIL))
    return [*HEAD, *rest, *TAIL]


def _sort_key(row: dict):
    # None sorts first rather than raising, so one odd config cannot stop the report.
    def num(value):
        return (value is not None, value if value is not None else 0)
    return (row["variant"], row["swept"], num(row["value"]), num(row["seed"]), row["run"])


def load_rows(suite_dir: Path) -> tuple[list[dict], list[str]]:
    """(finished runs' rows sorted by variant, swept value, seed; names of unfinished runs)."""
    runs = sorted(p for p in (suite_dir / "runs").glob("*") if p.is_dir())
    rows, unfinished = [], []
    for run_dir in runs:
        row = read_run(run_dir)
        if row is None:
            unfinished.append(run_dir.name)
        else:
            rows.append(row)
    # Every row gets every column (None: the run did not write it), so readers index freely.
    shown = columns(rows)
    rows = [{column: row.get(column) for column in shown} for row in rows]
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

def fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ---------------------------------------------------------------- outputs

def write_results_csv(suite_dir: Path, rows: list[dict]) -> Path:
    return atomic_write_csv(suite_dir / "results.csv", columns(rows), rows)


def _markdown_table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in body]


PARETO_METRICS = ("loss_recovered", "fvu", "relative_reconstruction_bias", "mmcs")
BAND_NOTE = ("; with several seeds, [min – max] of the same value read off each seed's own "
             "curve; * sparse grid: the two points it lies between are more than 2x apart "
             "in L0")


def _at(x: float):
    return lambda curve: interpolate_at_l0(curve, x)


def _needed(target: float):
    return lambda curve: l0_needed(curve, target)


def _cell(group: list[dict], metric: str, read, bracket) -> str:
    """The value read off the seed-mean curve, with its per-seed band, starred where the
    grid is sparse there."""
    curve = variant_curve(group, metric)
    text = uncertainty.band_text(read(curve),
                                 uncertainty.per_seed(group, metric, read, variant_curve), fmt)
    return f"{text} *" if text and is_sparse(bracket(curve)) else text


def pareto_summary(rows: list[dict]) -> list[str]:
    """Per metric, each variant's L0 range and the metric read off its curve at common L0s:
    the table that says whether one variant Pareto-dominates another."""
    lines, groups = [], by_variant(rows)
    for metric in PARETO_METRICS:
        curves = {v: variant_curve(g, metric) for v, g in groups.items()}
        targets = common_l0s(curves)
        if not any(curves.values()) or not targets:
            continue
        header = ["variant", "points", "L0 range"] + [f"{metric} @ L0={x}" for x in targets]
        body = [[v, str(len(c)), f"{fmt(c[0][0])} - {fmt(c[-1][0])}" if c else ""]
                + [_cell(groups[v], metric, _at(x), lambda c, x=x: bracket_at_l0(c, x))
                   for x in targets]
                for v, c in curves.items()]
        lines += ["", f"**{metric}** (mean over seeds per swept value, interpolated linearly "
                      "in log L0; blank where the variant's runs do not bracket that L0"
                      f"{BAND_NOTE}):", ""]
        lines += _markdown_table(header, body)
    return lines + _l0_needed_table(groups)


def _l0_needed_table(groups: dict[str, list[dict]]) -> list[str]:
    """The paper's way to read the Pareto plot: L0 needed for a given loss recovered."""
    if not any(variant_curve(g, "loss_recovered") for g in groups.values()):
        return []
    body = [[v] + [_cell(g, "loss_recovered", _needed(t), lambda c, t=t: bracket_needed(c, t))
                   for t in LOSS_TARGETS]
            for v, g in groups.items()]
    return ["", "**L0 needed** to reach each loss recovered (same interpolation; blank where "
                f"no pair of the variant's runs straddles it{BAND_NOTE}):", ""] + \
        _markdown_table(["variant"] + [f"L0 @ loss_recovered={t}" for t in LOSS_TARGETS], body)


SPREAD_METRICS = ("l0", "fvu", "loss_recovered", "relative_reconstruction_bias")


def seed_spread_section(rows: list[dict]) -> list[str]:
    """Mean ± sample SD over seeds, for every swept value that has 2 or more seeds."""
    body = uncertainty.seed_spread_rows(rows, SPREAD_METRICS, fmt)
    if not body:
        return ["", "every swept value has one seed: no seed spread to show"]
    return ["", "Mean ± sample standard deviation over seeds (n - 1 denominator):", ""] + \
        _markdown_table(["variant", "swept", "value", "seeds"] + list(SPREAD_METRICS), body)


def comparison_section(rows: list[dict], stats: dict[str, dict] | None = None,
                       no_documents: str | None = "no per-document statistics") -> list[str]:
    """gated vs baseline at the common L0s and loss-recovered targets: each difference with
    its 95% paired-bootstrap interval and the verdict it gives (gsae_pl/suite/comparison.py)."""
    found = comparison.section(rows, fmt, stats, no_documents)
    if isinstance(found, str):
        return ["", found]
    header, body = found
    doc_level = ("and the held-out documents, one draw shared by both variants (each run's "
                 "values recomputed from its per-document sums)" if no_documents is None else
                 f"only: the documents are not resampled ({no_documents}), so the interval "
                 "leaves out the held-out sampling, and a seed x document interaction")
    return ["", "Difference = gated - baseline, read off the seed-mean curves (linear in log "
                f"L0). 95% interval: {paired.REPLICATES} bootstrap resamples of the seeds "
                f"within each variant {doc_level}. Verdict: *level* when the interval lies "
                "within the equivalence margin (loss recovered ±0.005, gamma ±0.01, FVU ±5% "
                "and L0 needed ±10% of baseline's), else *better* / *worse* (gamma: *higher* "
                "/ *lower*) when it excludes 0, else *unresolved*; a variant with one seed is "
                f"always *unresolved*, and fewer than {uncertainty.MIN_SEEDS} seeds are named. "
                "*Sparse grid*: the points a read-off lies between are more than 2x apart in "
                "L0. The monotone-cubic column reads the same curves by a monotone cubic in "
                "log L0 instead (docs/method.md sec. 6).", ""] + _markdown_table(header, body)


def _tokens_text(rows: list[dict]) -> str:
    tokens = sorted({r["tokens"] for r in rows if r["tokens"] is not None})
    if not tokens:
        return "unknown tokens per run"
    if len(tokens) == 1:
        return f"{tokens[0]:,} tokens per run"
    return f"{tokens[0]:,} - {tokens[-1]:,} tokens per run"


# ablate's wall time, summed over its invocations that trained runs: a rerun that finds
# every run finished adds nothing, and the report keeps the figure (`python -m gsae_pl.report`
# too). Whether to sum or keep the last: sum, the cost of the whole suite.
WALL_FILE = "wall_time.json"


def add_wall_time(suite_dir: Path, seconds: float) -> None:
    seconds_so_far, invocations = read_wall_time(suite_dir) or (0.0, 0)
    atomic_write_json(Path(suite_dir) / WALL_FILE, {"seconds": round(seconds_so_far + seconds, 1),
                                                    "invocations": invocations + 1})


def read_wall_time(suite_dir: Path) -> tuple[float, int] | None:
    """(seconds, invocations) recorded by ablate; None without a readable record."""
    try:
        record = json.loads((Path(suite_dir) / WALL_FILE).read_text())
        return float(record["seconds"]), int(record["invocations"])
    except (OSError, ValueError, TypeError, KeyError):
        return None


def table_columns(rows: list[dict]) -> list[str]:
    """report.md's table: results.csv's columns less those no run has a value for (mmcs on
    an LM suite, loss recovered on a synthetic one); results.csv keeps them all."""
    shown = columns(rows)
    return [c for c in shown if any(r.get(c) is not None for r in rows)] if rows else shown


def _intro(rows, failures, unfinished, wall_seconds, invocations: int = 1) -> str:
    text = (f"Made by `python -m gsae_pl.report` from the runs under `runs/`: {len(rows)} "
            f"finished, {len(failures)} failed")
    text += f", {len(unfinished)} unfinished ({', '.join(unfinished)})" if unfinished else ""
    text += f"; {_tokens_text(rows)}"
    over = f" over {invocations} invocations of ablate" if invocations > 1 else ""
    text += f"; suite wall time {wall_seconds:.0f} s{over}." if wall_seconds is not None else "."
    clipped = sum(1 for r in rows if r["l0"] is not None and r["l0"] < L0_FLOOR)
    text += (f" L0 axes are logarithmic; L0 below {L0_FLOOR} is drawn at {L0_FLOOR} "
             f"({clipped} run(s) affected). Metrics are defined in docs/method.md and "
             "measured on held-out data; every number is also in `results.csv`.")
    return text


def _failures_section(suite_dir: Path, failures: list[dict]) -> list[str]:
    if not failures:
        return ["none"]
    body = []
    for f in failures:
        log = f.get("log") or f"logs/{fitting_name(f['run'], '.log')}"  # as ablate names it
        try:  # a path relative to the suite is a working link from report.md
            log = str(Path(log).relative_to(suite_dir))
        except ValueError:
            pass
        error = str(f.get("error", "")).replace("|", "\\|")
        body.append([f["run"], fmt(f.get("returncode")), error, f"[{log}]({log})"])
    return _markdown_table(["run", "returncode", "error", "log"], body)


def write_report(suite_dir: Path, wall_seconds: float | None = None,
                 document_reader=document_stats.from_run) -> Path:
    """results.csv, plots/*.png and report.md for the suite; returns report.md's path.
    The wall time shown: `wall_seconds` if given, else ablate's record (WALL_FILE).
    `document_reader(run_dir)`: a run's per-document statistics, or None
    (gsae_pl/suite/document_stats.py); the paired comparisons resample documents only
    when every run has them."""
    suite_dir = Path(suite_dir)
    invocations = 1
    if wall_seconds is None:
        wall_seconds, invocations = read_wall_time(suite_dir) or (None, 1)
    if not suite_dir.is_dir():
        raise UserError(f"{suite_dir} is not a directory (expected an ablation suite's output)")
    check_suite(suite_dir)  # the files it replaces are then the report's own
    rows, unfinished = load_rows(suite_dir)
    failures = load_failures(suite_dir, {r["run"] for r in rows})
    # a failed run keeps its run directory; it is reported once, as failed
    unfinished = sorted(set(unfinished) - {f["run"] for f in failures})
    if not rows and not failures and not unfinished:
        raise UserError(f"{suite_dir} holds no runs (nothing under runs/ or failed/)")
    figures, plotted = suite_figures(suite_dir), suite_metrics(suite_dir)  # before writing
    write_results_csv(suite_dir, rows)
    name = suite_name(suite_dir)
    title = f"{name}: {_tokens_text(rows)}"
    plots = write_plots(suite_dir, rows, title, figures, plotted)
    curves = write_learning_curves(suite_dir, rows, title)  # runs with eval.at_tokens
    write_images(suite_dir, [p for paths in plots.values() for p in paths] + curves)
    lines = [f"# Ablation suite `{name}`", "",
             _intro(rows, failures, unfinished, wall_seconds, invocations), "",
             "## Provenance", ""]
    lines += provenance.suite_header(provenance.read_records(suite_dir, [r["run"] for r in rows]))
    lines += ["", "## Results", ""]
    shown = table_columns(rows)
    lines += _markdown_table(shown, [[fmt(r.get(c)) for c in shown] for r in rows])
    lines += ["", "## Seed spread"] + seed_spread_section(rows)
    lines += ["", "## Pareto summary"] + (pareto_summary(rows) or ["", "no curve to read"])
    stats, no_documents = document_stats.load(suite_dir, [r["run"] for r in rows],
                                              document_reader)
    lines += ["", "## Gated vs baseline"] + comparison_section(rows, stats, no_documents)
    lines += ["", "## Plots"] + [f"\n![{p.stem}](plots/{p.name})" for p in plots.get("", [])]
    for name, paths in plots.items():
        if name:
            lines += ["", f"### {name}: {', '.join(figures[name])}"]
            lines += [f"\n![{p.stem}](plots/{p.name})" for p in paths]
    lines += learning_curves_section(curves)
    lines += ["", "## Failed runs", ""] + _failures_section(suite_dir, failures)
    path = suite_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def check_suite(suite_dir: Path) -> None:
    """Refuse a folder that is not a suite: the report replaces results.csv, report.md and
    its plots there, which elsewhere could be a user's own files. A suite is a folder that
    holds suite.yaml, the copy of the suite file ablate writes before any run."""
    if not (suite_dir / "suite.yaml").is_file():
        raise UserError(f"{suite_dir} is not an ablation suite's output (no suite.yaml, which "
                        "python -m gsae_pl.ablate writes there): pass the output_dir ablate "
                        "wrote; the report would replace results.csv, report.md and plots/")


def _suite_spec(suite_dir: Path) -> dict:
    """The suite file, from the copy of it that ablate keeps in the suite directory; {}
    without one."""
    path = suite_dir / "suite.yaml"
    spec = _read(path, yaml.safe_load) if path.is_file() else None
    return spec if isinstance(spec, dict) else {}


def suite_name(suite_dir: Path) -> str:
    """The suite file's `name:`, as ablate printed it; the folder's name without one (the
    output folder may be any, e.g. --output-dir /tmp/x)."""
    name = _suite_spec(suite_dir).get("name")
    return str(name) if name else Path(suite_dir).resolve().name


def suite_figures(suite_dir: Path) -> dict[str, list[str]]:
    """The focused figures the suite file names (`figures:`); none without one."""
    return dict(_suite_spec(suite_dir).get("figures") or {})


def suite_metrics(suite_dir: Path) -> tuple[str, ...]:
    """The metrics the suite file plots against L0 (`metrics:`), else DEFAULT_METRICS."""
    path = suite_dir / "suite.yaml"
    return check_metrics(path, _suite_spec(suite_dir).get("metrics")) or DEFAULT_METRICS


def _main(args: argparse.Namespace) -> int:
    if args.verify is not None or args.runs:
        from gsae_pl.suite.verify import verify

        return verify(Path(args.suite_dir), args.verify, args.runs, args.rtol, args.atol,
                      args.configs)
    print(write_report(Path(args.suite_dir)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m gsae_pl.report", description=__doc__)
    parser.add_argument("suite_dir", help="an ablation suite's output directory")
    parser.add_argument("--verify", type=int, metavar="N",
                        help="rerun N of the suite's runs (spread over its variants) with "
                             "their recorded configs and compare with results.csv: exit 0 "
                             "if every metric matches, 1 if not")
    parser.add_argument("--runs", nargs="+", metavar="NAME",
                        help="with or instead of --verify: rerun these runs by name")
    parser.add_argument("--rtol", type=float, default=1e-4,
                        help="relative tolerance of --verify (default 1e-4)")
    parser.add_argument("--atol", type=float, default=1e-8,
                        help="absolute tolerance of --verify, for values near 0")
    parser.add_argument("--configs", default=None,
                        help="--verify without runs/<run>/config.yaml: the folder holding the "
                             "suite's variant YAMLs (default: the checkout's ablations/)")
    return run_main(lambda: _main(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
