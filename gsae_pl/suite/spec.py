"""A suite file: which variants, swept over which values of one config key, at which seeds,
on which shared settings.

    name: quick                         # optional; default: the file's stem
    output_dir: tensorboard_logs/quick  # runs go to <output_dir>/runs/<run name>/
    seeds: [0]                          # default for every variant
    configs: [../configs/recipes/paper_resampling.yaml]  # optional: merged under every run
    overrides:                          # shared by every run: dotted key -> value
      trainer.max_steps: 3000
    presets:                            # optional: named override sets variants apply
      baseline_family: {sae.d_sae: 1024}
    grids:                              # named sweeps; a list sweeps the sparsity coefficient
      gated: [0.02, 0.05, 0.1]          #   (the gated and baseline lambdas live on different
      ks: {sae.k: [16, 32, 64]}         #   scales); a mapping sweeps its one dotted key
    variants:                           # name -> <name>.yaml (or `config:`, one file or a
      gated: {grid: gated}              #   list, merged in order): see "Files" below
      baseline: {l1_coefficient: [0.005, 0.01], presets: [baseline_family], seeds: [0, 1]}
      orth: {config: gated.yaml, sweep: {loss.orthogonality.coefficient: [0.1, 1.0]}}
    figures:                            # optional: focused report plots, name -> variants
      main: [gated, baseline]
    metrics: [loss_recovered, fvu]      # optional: the metrics the report plots against L0

A variant sweeps exactly one key: `grid: NAME`, `l1_coefficient: [...]` (the sparsity
coefficient) or `sweep: {dotted.key: [...]}`. Its runs are named
`<variant>_<label>-<value>_seed<seed>`, the label being `l1` for the sparsity coefficient and
the key without its section otherwise (`sae.k` -> `k`), and `output.sweep` records the key.

Files (`configs:`, `config:`, and the `<variant>.yaml` a variant without `config:` names)
are relative to the suite file; one not found there is looked up relative to the project's
ablations/ folder (PROJECT_ABLATIONS), so a suite kept anywhere (a copy of
ablations/quick.yaml in a scratch folder) names the shipped variants and recipes as the
shipped suites do, and a file beside the suite wins over the shipped one of that name.

Precedence, last wins: the suite's `configs`, the variant's YAML(s) (each file merged once,
gsae_pl/config.py), the suite's `overrides`, the variant's `presets` in order, the variant's
`overrides`, the command line's `key=value`, then the keys that define a run (its swept
value, seed and output place), which only the suite may set. Every run's config is loaded
and validated here, so a bad suite is refused before anything runs.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import DictConfig

from gsae_pl.commands import python_m
from gsae_pl.config import load_config
from gsae_pl.errors import UserError
from gsae_pl.names import check_name
from gsae_pl.yaml_io import DuplicateKeyError, safe_load_unique_keys

SUITE_KEYS = {"name", "output_dir", "seeds", "configs", "overrides", "presets", "grids",
              "variants", "figures", "metrics"}
VARIANT_KEYS = {"config", "grid", "l1_coefficient", "sweep", "seeds", "presets", "overrides"}
# The key a plain list of values sweeps, and its label in run names (`gated_l1-0.05_seed0`).
SPARSITY_KEY, SPARSITY_LABEL = "loss.sparsity.coefficient", "l1"
# The shipped variant YAMLs, where a suite's file names fall back to (see "Files" above).
PROJECT_ABLATIONS = Path(__file__).resolve().parents[2] / "ablations"
# Keys that make one run differ from another: the suite owns them (and each variant's swept key).
RUN_KEYS = ("seed", "output.dir", "output.name", "output.variant", "output.sweep")


@dataclass(frozen=True)
class Run:
    variant: str
    sweep_key: str  # the dotted config key this variant sweeps
    sweep_value: object  # its value in this run
    seed: int
    config_paths: tuple[Path, ...]  # merged in order, as `fit --config A B` merges them
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


def load_suite(path: str | Path, cli_overrides: list[str] = (),
               output_dir: str | Path | None = None) -> Suite:
    """The suite in `path`; `output_dir` (ablate --output-dir) replaces its `output_dir`."""
    path = Path(path)
    spec = _read(path)
    output_dir = Path(output_dir or spec.get("output_dir") or f"tensorboard_logs/{path.stem}")
    for item in cli_overrides:
        key = item.partition("=")[0]
        if key in RUN_KEYS:
            raise UserError(f"{key} is set by the suite for each run: change it in {path} "
                            "(grids, seeds, output_dir) instead of on the command line")
    grids = spec.get("grids") or {}
    if not isinstance(grids, dict):
        raise UserError(f"{path}: grids must map a grid name to a list of l1 coefficients or "
                        "to {dotted.key: [values]}")
    variants = spec.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise UserError(f"{path}: `variants` must map at least one variant name to its "
                        "settings, e.g. variants: {gated: {grid: gated}}")
    shared = _Shared(path, spec, grids, _overrides(spec.get("overrides"), f"{path}: overrides"),
                     _presets(path, spec.get("presets")),
                     _suite_configs(path, spec.get("configs")),
                     list(cli_overrides), output_dir / "runs")
    runs = []
    for variant, entry in variants.items():
        # A variant's name starts its runs' folder names and names its YAML.
        check_name(str(variant), f"{path}: variant name ",
                   "and point `config:` at its YAML if it lives elsewhere")
        runs += _expand(shared, str(variant), entry or {})
    _check_distinct_runs(path, runs)
    _check_figures(path, spec.get("figures"), set(variants))
    return Suite(name=str(spec.get("name") or path.stem), path=path, output_dir=output_dir,
                 runs=tuple(runs), metrics=check_metrics(path, spec.get("metrics")))


@dataclass(frozen=True)
class _Shared:
    """What every variant of one suite file shares."""

    path: Path
    spec: dict
    grids: dict
    overrides: list[str]
    presets: dict[str, list[str]]
    configs: list[Path]
    cli: list[str]
    runs_dir: Path


def _check_distinct_runs(path: Path, runs: list[Run]) -> None:
    """Two runs with one name would train into one folder (names print l1 with :g, six
    significant digits, so 0.1 and 0.10000001 are both `l1-0.1`)."""
    seen: dict[str, Run] = {}
    for run in runs:
        first = seen.setdefault(run.name, run)
        if first is not run:
            raise UserError(f"{path}: {_point(first)} and {_point(run)} would both be run "
                            f"{run.name} in one folder: make the values differ within "
                            "six significant digits, or drop one")


def _point(run: Run) -> str:
    key = "l1_coefficient" if run.sweep_key == SPARSITY_KEY else run.sweep_key
    return f"(variant {run.variant}, {key} {run.sweep_value!r}, seed {run.seed})"


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
                        f"{python_m('gsae_pl.fit', '--config', Path(path))}, or name it "
                        "under a suite's `variants:`")
    unknown = sorted(set(spec) - SUITE_KEYS)
    if unknown:
        raise UserError(f"{path}: unknown suite key(s) {', '.join(unknown)} "
                        f"(valid: {', '.join(sorted(SUITE_KEYS))})")
    return spec


def _expand(shared: _Shared, variant: str, entry: dict) -> list[Run]:
    where = f"{shared.path}: variant {variant}"
    if not isinstance(entry, dict) or set(entry) - VARIANT_KEYS:
        raise UserError(f"{where}: settings must be a mapping with keys among "
                        f"{', '.join(sorted(VARIANT_KEYS))}")
    config_paths = shared.configs + _variant_files(shared.path, where, variant, entry)
    key, values = _sweep(where, entry, shared.grids)
    seeds = entry.get("seeds", shared.spec.get("seeds", [0]))
    if not isinstance(seeds, list) or not seeds or not all(_is_int(s) for s in seeds):
        raise UserError(f"{where}: seeds must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"{where}: seeds {seeds!r} repeat a seed, which would train one run "
                        "twice in one folder: list each seed once")
    own = (shared.overrides + _applied_presets(where, entry.get("presets"), shared.presets)
           + _overrides(entry.get("overrides"), f"{where}: overrides") + shared.cli)
    if any(item.partition("=")[0] == key for item in own):
        raise UserError(f"{where}: {key} is the key this variant sweeps: set its values in the "
                        "variant's grid or sweep, not in overrides")
    label = sweep_label(key)
    runs = []
    for value in values:
        for seed in seeds:
            name = f"{variant}_{label}-{_shown(value)}_seed{seed}"
            run_keys = [f"{key}={_scalar(value)}", f"seed={seed}",
                        f"output.dir={shared.runs_dir}", f"output.name={name}",
                        f"output.variant={variant}", f"output.sweep={key}"]
            try:
                cfg = load_config(config_paths, own + run_keys)
            except UserError as err:
                raise UserError(f"{where}, run {name}: {err}") from None
            runs.append(Run(variant, key, value, int(seed), tuple(config_paths),
                            tuple(own + run_keys), cfg))
    return runs


def sweep_label(key: str | None) -> str:
    """How run names and reports show a swept key: `l1` for the sparsity coefficient (and a
    run without a recorded sweep), else the key without its section (`sae.k` -> `k`)."""
    if key in (None, SPARSITY_KEY):
        return SPARSITY_LABEL
    return key.partition(".")[2] or key


def _variant_files(path: Path, where: str, variant: str, entry: dict) -> list[Path]:
    """The variant's own YAML(s): `config:` (one file or a list), else <variant>.yaml."""
    named = entry.get("config", f"{variant}.yaml")
    files = _files(path, named if isinstance(named, list) else [named], f"{where}: config")
    for file in files:
        if not file.is_file():
            folders = dict.fromkeys([path.parent, PROJECT_ABLATIONS])
            known = sorted({p.stem for folder in folders for p in folder.glob("*.yaml")
                            if not is_suite_file(p)})
            raise UserError(f"{where}: unknown variant, no file {file.name} beside the suite "
                            f"or in {PROJECT_ABLATIONS} (variants there: {', '.join(known)}); "
                            "add the file or set `config:`")
    return files


def _files(path: Path, names, where: str) -> list[Path]:
    """File names relative to the suite file, else to the project's ablations/ folder (a
    missing file keeps the suite-relative name, for the caller's error)."""
    if names is None:
        return []
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise UserError(f"{where} must be a list of YAML file names relative to {path.parent}")
    return [_located(path.parent / name, PROJECT_ABLATIONS / name) for name in names]


def _located(beside: Path, shipped: Path) -> Path:
    return shipped if not beside.is_file() and shipped.is_file() else beside


def _suite_configs(path: Path, names) -> list[Path]:
    """The suite's `configs:`, merged under every run; each must exist."""
    files = _files(path, names, f"{path}: configs")
    for file in files:
        if not file.is_file():
            raise UserError(f"{path}: configs: no file {file}: name an existing YAML file")
    return files


def _presets(path: Path, spec) -> dict[str, list[str]]:
    """`presets:` name -> its overrides (`key=value`), for variants to apply by name."""
    if spec is None:
        return {}
    if not isinstance(spec, dict) or not all(isinstance(v, dict) for v in spec.values()):
        raise UserError(f"{path}: presets must map a name to dotted overrides, e.g. "
                        "presets: {baseline_family: {sae.d_sae: 1024}}")
    return {str(name): _overrides(items, f"{path}: preset {name}")
            for name, items in spec.items()}


def _applied_presets(where: str, names, presets: dict[str, list[str]]) -> list[str]:
    if names is None:
        return []
    if not isinstance(names, list):
        raise UserError(f"{where}: presets must be a list of preset names")
    unknown = [str(n) for n in names if n not in presets]
    if unknown:
        raise UserError(f"{where}: preset {unknown[0]} is not among the suite's presets "
                        f"({', '.join(presets) or 'none defined'})")
    return [item for name in names for item in presets[name]]


def _sweep(where: str, entry: dict, grids: dict) -> tuple[str, list]:
    """(the dotted key, its values) from `grid:`, `l1_coefficient:` or `sweep:`."""
    given = [k for k in ("grid", "l1_coefficient", "sweep") if k in entry]
    if len(given) != 1:
        raise UserError(f"{where}: give exactly one of `grid: NAME`, `l1_coefficient: [...]` "
                        "or `sweep: {dotted.key: [...]}`")
    if "grid" in entry:
        if entry["grid"] not in grids:
            raise UserError(f"{where}: grid {entry['grid']!r} is not among the suite's grids "
                            f"({', '.join(map(str, grids)) or 'none defined'})")
        spec = grids[entry["grid"]]
    else:
        spec = entry.get("sweep", entry.get("l1_coefficient"))
    key, values = SPARSITY_KEY, spec
    if isinstance(spec, dict):
        if len(spec) != 1:
            raise UserError(f"{where}: a sweep names one dotted key, e.g. {{sae.k: [16, 32]}}, "
                            f"not {len(spec)}")
        (key, values), = spec.items()
        key = str(key)
    if key in RUN_KEYS:
        raise UserError(f"{where}: {key} is set by the suite for each run and cannot be swept")
    _check_values(where, key, values)
    return key, values


def _check_values(where: str, key: str, values) -> None:
    if not isinstance(values, list) or not values:
        raise UserError(f"{where}: the sweep over {key} is empty: list at least one value")
    if not all(isinstance(v, (numbers.Real, str)) and not isinstance(v, bool) for v in values):
        raise UserError(f"{where}: the values of {key} must be numbers or names, "
                        f"got {values!r}")
    if key == SPARSITY_KEY and not all(isinstance(v, numbers.Real) and v >= 0 for v in values):
        raise UserError(f"{where}: l1 coefficients must be numbers >= 0, got {values!r}")
    if len(set(values)) != len(values):
        raise UserError(f"{where}: the sweep {values!r} over {key} repeats a value")


def _shown(value) -> str:
    """A swept value in a run name: numbers with six significant digits (:g)."""
    return f"{value:g}" if isinstance(value, numbers.Real) else str(value)


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
    if isinstance(value, float):
        return repr(value)  # every digit: the run's value is the suite's, not a rounding
    return str(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
