"""`python -m gsae_pl.report SUITE_DIR --verify N [--runs NAME ...]`: rerun some of a
committed suite's runs with their recorded configs and compare with its results.csv.

The config of a run is runs/<run>/config.yaml where the suite's runs are present; on a
fresh clone, where only results.csv, report.md, plots/ and suite.yaml are committed, it is
rebuilt from the suite's own suite.yaml (gsae_pl/suite/spec.py) against the checkout's variant
YAMLs. Each rerun trains in a temporary directory, in a process of its own, and leaves the
suite untouched. Exit 0 when every metric matches within tolerance, 1 when one does not.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from gsae_pl.config import load_config, to_yaml
from gsae_pl.errors import RunFailed, UserError

# results.csv columns that a rerun must reproduce (not the identity columns, not seconds).
COMPARED = ("l0", "fvu", "loss_recovered", "loss_recovered_se", "delta_lm_loss",
            "delta_lm_loss_se", "relative_reconstruction_bias", "dead_fraction", "steps",
            "mmcs", "fraction_recovered", "tokens")


def read_results(suite_dir: Path) -> list[dict]:
    path = suite_dir / "results.csv"
    if not path.is_file():
        raise UserError(f"{path} not found: --verify needs a suite's results.csv "
                        "(made by python -m gsae_pl.report)")
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def pick(rows: list[dict], n: int | None, names: list[str] | None) -> list[dict]:
    """The rows named, else N spread over the variants: each variant's first row (in
    results.csv order), then each one's second, ... so a small N still covers variants."""
    if names:
        by_name = {r["run"]: r for r in rows}
        unknown = [name for name in names if name not in by_name]
        if unknown:
            raise UserError(f"--runs {' '.join(unknown)}: not in results.csv (runs: "
                            f"{', '.join(list(by_name)[:6])}{' ...' if len(by_name) > 6 else ''})")
        return [by_name[name] for name in names]
    if n is None or n < 1:
        raise UserError(f"--verify {n}: give the number of runs to rerun, 1 or more")
    columns: dict[str, list[dict]] = {}
    for row in rows:
        columns.setdefault(row["variant"], []).append(row)
    order = [col[i] for i in range(max(map(len, columns.values()), default=0))
             for col in columns.values() if i < len(col)]
    return order[:n]


def recorded_config(suite_dir: Path, run: str, configs: Path | None):
    """The run's config: its own config.yaml if present, else rebuilt from suite.yaml."""
    saved = suite_dir / "runs" / run / "config.yaml"
    if saved.is_file():
        return load_config(saved)
    from gsae_pl.suite.spec import PROJECT_ABLATIONS, load_suite

    spec_path = suite_dir / "suite.yaml"
    if not spec_path.is_file():
        raise UserError(f"{suite_dir} has neither runs/{run}/config.yaml nor suite.yaml: "
                        "cannot tell how the run was made")
    spec = yaml.safe_load(spec_path.read_text()) or {}
    configs = Path(configs) if configs else PROJECT_ABLATIONS
    # The copy lives away from the variant YAMLs it names: point each variant at its file.
    for variant, entry in (spec.get("variants") or {}).items():
        entry = entry if isinstance(entry, dict) else {}
        entry["config"] = str((configs / entry.get("config", f"{variant}.yaml")).resolve())
        spec["variants"][variant] = entry
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "suite.yaml"
        copy.write_text(yaml.safe_dump(spec))
        runs = {r.name: r for r in load_suite(copy).runs}
    if run not in runs:
        raise UserError(f"{spec_path} does not make a run named {run}")
    return runs[run].cfg


def rerun(cfg, out_dir: Path) -> dict:
    """Train `cfg` under `out_dir` in a fresh process; its metrics.json."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))
    cfg.output.dir = str(out_dir)
    config = out_dir / "config.yaml"
    config.write_text(to_yaml(cfg))
    log = out_dir / "fit.log"
    with open(log, "w") as fh:
        done = subprocess.run([sys.executable, "-m", "gsae_pl.fit", "--config", str(config)],
                              stdout=fh, stderr=subprocess.STDOUT)
    metrics = out_dir / cfg.output.name / "metrics.json"
    if done.returncode != 0 or not metrics.is_file():
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise RunFailed(f"the rerun of {cfg.output.name} failed (exit {done.returncode}): "
                        f"{tail[0][:300]}")
    return json.loads(metrics.read_text())


def compare(committed: dict, fresh: dict, rtol: float, atol: float) -> list[list]:
    """[metric, committed, rerun, abs diff, rel diff, ok] for each committed metric."""
    table = []
    for metric in COMPARED:
        if committed.get(metric, "") == "":
            continue
        old, new = float(committed[metric]), fresh.get(metric)
        if new is None:
            table.append([metric, old, None, None, None, False])
            continue
        diff = abs(new - old)
        rel = diff / max(abs(old), abs(new)) if diff else 0.0
        table.append([metric, old, new, diff, rel, diff <= atol + rtol * abs(old)])
    return table


def _show(value) -> str:
    if value is None:
        return "missing"
    return f"{value:.6g}" if isinstance(value, float) and math.isfinite(value) else str(value)


def verify(suite_dir: Path, n: int | None, names: list[str] | None, rtol: float = 1e-4,
           atol: float = 1e-8, configs: Path | None = None) -> int:
    rows = pick(read_results(suite_dir), n, names)
    failures = 0
    for row in rows:
        cfg = recorded_config(suite_dir, row["run"], configs)
        print(f"rerunning {row['run']} ...", flush=True)
        with tempfile.TemporaryDirectory(prefix="gsae_verify_") as tmp:
            fresh = rerun(cfg, Path(tmp))
        table = compare(row, fresh, rtol, atol)
        print(f"{'metric':<30}{'committed':>14}{'rerun':>14}{'abs diff':>12}{'rel diff':>12}")
        for metric, old, new, diff, rel, ok in table:
            print(f"{metric:<30}{_show(old):>14}{_show(new):>14}{_show(diff):>12}"
                  f"{_show(rel):>12}{'' if ok else '  MISMATCH'}")
        bad = [t[0] for t in table if not t[-1]]
        failures += bool(bad)
        print(f"{row['run']}: " + (f"MISMATCH in {', '.join(bad)}" if bad else
                                   f"matches (rtol {rtol:g}, atol {atol:g})"), flush=True)
    print(f"verified {len(rows)} run(s): {len(rows) - failures} match, {failures} differ")
    return 1 if failures else 0
