"""A suite file: which variants, at which sparsity coefficients and seeds, with what overrides.

    name: quick                         # optional; default: the file's stem
    output_dir: tensorboard_logs/quick  # runs go to <output_dir>/runs/<run name>/
    seeds: [0]                          # default for every variant
    overrides:                          # shared by every run: dotted key -> value
      trainer.max_steps: 3000
    grids:                              # named l1_coefficient grids: the gated and the
      gated: [0.02, 0.05, 0.1]          #   baseline lambdas live on different scales
    variants:                           # name -> <name>.yaml beside this file (or `config:`)
      gated: {grid: gated}
      baseline: {l1_coefficient: [0.005, 0.01], overrides: {sae.d_sae: 1024}, seeds: [0, 1]}
    figures:                            # optional: focused report plots, name -> variants
      main: [gated, baseline]
    metrics: [loss_recovered, fvu]      # optional: the metrics the report plots against L0

Override precedence, last wins: the variant's YAML, the suite's `overrides`, the variant's
`overrides`, the command line's `key=value`, then the keys that define a run (its
coefficient, seed and output place), which only the suite may set. Every run's config is
loaded and validated here, so a bad suite is refused before anything runs.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import DictConfig

from gsae_pl.config import load_config
from gsae_pl.errors import UserError
from gsae_pl.run_dir import check_name
from gsae_pl.yaml_io import DuplicateKeyError, safe_load_unique_keys

SUITE_KEYS = {"name", "output_dir", "seeds", "overrides", "grids", "variants", "figures",
              "metrics"}
VARIANT_KEYS = {"config", "grid", "l1_coefficient", "seeds", "overrides"}
# Keys that make one run differ from another: the suite owns them.
RUN_KEYS = ("loss.l1_coefficient", "seed", "output.dir", "output.name", "output.variant")


@dataclass(frozen=True)
class Run:
    variant: str
    l1_coefficient: float
    seed: int
    config_path: Path
    overrides: tuple[str, ...]  # key=value, as `python -m gsae_pl.fit` takes them
    cfg: DictConfig  # the resolved config (validated)

    @property
    def name(self) -> str:
        return self.cfg.output.name

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.output.dir) / self.cfg.output.name


@dataclass(frozen=True)
class Suite:
    name: str
    path: Path
    output_dir: Path
    runs: tuple[Run, ...]
    metrics: tuple[str, ...] | None = None  # plotted against L0; None: the report's default

    @property
    def variants(self) -> list[str]:
        return list(dict.fromkeys(run.variant for run in self.runs))


def is_suite_file(path: Path) -> bool:
    """Suites and variant YAMLs share ablations/: a suite is the one with `variants:`."""
    try:
        spec = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(spec, dict) and "variants" in spec


def load_suite(path: str | Path, cli_overrides: list[str] = ()) -> Suite:
    path = Path(path)
    spec = _read(path)
    output_dir = Path(spec.get("output_dir") or f"tensorboard_logs/{path.stem}")
    for item in cli_overrides:
        key = item.partition("=")[0]
        if key in RUN_KEYS:
            raise UserError(f"{key} is set by the suite for each run: change it in {path} "
                            "(grids, seeds, output_dir) instead of on the command line")
    shared = _overrides(spec.get("overrides"), f"{path}: overrides")
    grids = spec.get("grids") or {}
    if not isinstance(grids, dict):
        raise UserError(f"{path}: grids must map a grid name to a list of l1 coefficients")
    variants = spec.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise UserError(f"{path}: `variants` must map at least one variant name to its "
                        "settings, e.g. variants: {gated: {grid: gated}}")
    runs = []
    for variant, entry in variants.items():
        # A variant's name starts its runs' folder names and names its YAML.
        check_name(str(variant), f"{path}: variant name ",
                   "and point `config:` at its YAML if it lives elsewhere")
        runs += _expand(path, str(variant), entry or {}, spec, grids, shared,
                        list(cli_overrides), output_dir / "runs")
    _check_distinct_runs(path, runs)
    _check_figures(path, spec.get("figures"), set(variants))
    return Suite(name=str(spec.get("name") or path.stem), path=path, output_dir=output_dir,
                 runs=tuple(runs), metrics=check_metrics(path, spec.get("metrics")))


def _check_distinct_runs(path: Path, runs: list[Run]) -> None:
    """Two runs with one name would train into one folder (names print l1 with :g, six
    significant digits, so 0.1 and 0.10000001 are both `l1-0.1`)."""
    seen: dict[str, Run] = {}
    for run in runs:
        first = seen.setdefault(run.name, run)
        if first is not run:
            raise UserError(f"{path}: {_point(first)} and {_point(run)} would both be run "
                            f"{run.name} in one folder: make the coefficients differ within "
                            "six significant digits, or drop one")


def _point(run: Run) -> str:
    return f"(variant {run.variant}, l1_coefficient {run.l1_coefficient!r}, seed {run.seed})"


def _check_figures(path: Path, figures, variants: set) -> None:
    """`figures:` maps a plot name to some of the suite's variants (the report draws each)."""
    if figures is None:
        return
    if not isinstance(figures, dict) or not all(
            isinstance(v, list) and v and str(k).isidentifier() for k, v in figures.items()):
        raise UserError(f"{path}: figures must map a name (letters, digits, _) to a non-empty "
                        "list of variants, e.g. figures: {main: [gated, baseline]}")
    for name, members in figures.items():
        unknown = sorted(set(map(str, members)) - variants)
        if unknown:
            raise UserError(f"{path}: figure {name} names {', '.join(unknown)}, not among the "
                            f"suite's variants ({', '.join(sorted(variants))})")


def check_metrics(path: Path, metrics) -> tuple[str, ...] | None:
    """`metrics:` names metrics.json keys (letters, digits, _), each once; None if absent."""
    if metrics is None:
        return None
    if not isinstance(metrics, list) or not metrics or not all(
            isinstance(m, str) and m.isidentifier() for m in metrics):
        raise UserError(f"{path}: metrics must be a non-empty list of metric names (letters, "
                        "digits, _), e.g. metrics: [loss_recovered, fvu]")
    if len(set(metrics)) != len(metrics):
        raise UserError(f"{path}: metrics {metrics!r} names a metric twice: list each once")
    return tuple(metrics)


def _read(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"suite file {path} not found: pass an existing YAML file to --suite "
                        "(e.g. ablations/quick.yaml)")
    try:
        spec = safe_load_unique_keys(path.read_text()) or {}
    except DuplicateKeyError as err:
        raise UserError(f"suite file {path}: key {err.key!r} appears twice (lines "
                        f"{err.first_line} and {err.line}): each variant, grid and setting may "
                        "appear once (YAML would silently keep only the last)") from None
    except yaml.YAMLError:
        raise UserError(f"suite file {path} is not valid YAML: fix its syntax") from None
    if not isinstance(spec, dict):
        raise UserError(f"suite file {path} must hold a mapping (name, variants, ...)")
    if "variants" not in spec and set(spec) & {"defaults", "sae", "loss", "data", "trainer"}:
        raise UserError(f"{path} is a run config (a variant), not a suite file: train it with "
                        f"python -m gsae_pl.fit --config {path}, or name it under a suite's "
                        "`variants:`")
    unknown = sorted(set(spec) - SUITE_KEYS)
    if unknown:
        raise UserError(f"{path}: unknown suite key(s) {', '.join(unknown)} "
                        f"(valid: {', '.join(sorted(SUITE_KEYS))})")
    return spec


def _expand(path: Path, variant: str, entry: dict, spec: dict, grids: dict,
            shared: list[str], cli: list[str], runs_dir: Path) -> list[Run]:
    where = f"{path}: variant {variant}"
    if not isinstance(entry, dict) or set(entry) - VARIANT_KEYS:
        raise UserError(f"{where}: settings must be a mapping with keys among "
                        f"{', '.join(sorted(VARIANT_KEYS))}")
    config_path = path.parent / entry.get("config", f"{variant}.yaml")
    if not config_path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml") if not is_suite_file(p))
        raise UserError(f"{where}: unknown variant, no file {config_path} (variants beside the "
                        f"suite: {', '.join(known)}); add the file or set `config:`")
    coefficients = _grid(where, entry, grids)
    seeds = entry.get("seeds", spec.get("seeds", [0]))
    if not isinstance(seeds, list) or not seeds or not all(_is_int(s) for s in seeds):
        raise UserError(f"{where}: seeds must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"{where}: seeds {seeds!r} repeat a seed, which would train one run "
                        "twice in one folder: list each seed once")
    own = shared + _overrides(entry.get("overrides"), f"{where}: overrides") + cli
    runs = []
    for l1 in coefficients:
        for seed in seeds:
            name = f"{variant}_l1-{l1:g}_seed{seed}"
            run_keys = [f"loss.l1_coefficient={l1!r}", f"seed={seed}", f"output.dir={runs_dir}",
                        f"output.name={name}", f"output.variant={variant}"]
            try:
                cfg = load_config(config_path, own + run_keys)
            except UserError as err:
                raise UserError(f"{where}, run {name}: {err}") from None
            runs.append(Run(variant, float(l1), int(seed), config_path,
                            tuple(own + run_keys), cfg))
    return runs


def _grid(where: str, entry: dict, grids: dict) -> list[float]:
    if ("grid" in entry) == ("l1_coefficient" in entry):
        raise UserError(f"{where}: give exactly one of `grid: NAME` or `l1_coefficient: [...]`")
    if "grid" in entry:
        if entry["grid"] not in grids:
            raise UserError(f"{where}: grid {entry['grid']!r} is not among the suite's grids "
                            f"({', '.join(map(str, grids)) or 'none defined'})")
        values = grids[entry["grid"]]
    else:
        values = entry["l1_coefficient"]
    if not isinstance(values, list) or not values:
        raise UserError(f"{where}: the sparsity grid is empty: list at least one l1 coefficient")
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and v >= 0
               for v in values):
        raise UserError(f"{where}: l1 coefficients must be numbers >= 0, got {values!r}")
    if len(set(values)) != len(values):
        raise UserError(f"{where}: the sparsity grid {values!r} repeats a coefficient")
    return values


def _overrides(mapping, where: str) -> list[str]:
    """A mapping of dotted keys to scalars, as `key=value` strings."""
    if mapping is None:
        return []
    if not isinstance(mapping, dict):
        raise UserError(f"{where} must map dotted config keys to values, e.g. "
                        "{trainer.max_steps: 3000}")
    out = []
    for key, value in mapping.items():
        if isinstance(value, (dict, list)):
            raise UserError(f"{where}: {key} must be a single value (write nested keys dotted)")
        if str(key) in RUN_KEYS:
            raise UserError(f"{where}: {key} is set by the suite for each run; use grids/seeds")
        out.append(f"{key}={_scalar(value)}")
    return out


def _scalar(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
