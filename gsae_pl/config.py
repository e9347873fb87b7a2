"""The structured config schema: load a YAML file, merge `key=value` overrides, validate.

Every field here is documented in `configs/base.yaml`, which sets each one explicitly.
Ablation files under `ablations/` hold only their deltas over it, and name
their base with a top-level `defaults: [path, ...]` list, resolved relative to the file.
Configs compose: several files merge in order (`--config a.yaml b.yaml`), after every file
their `defaults` name, and a file reached twice is merged once, at its first place. So
`--config configs/data/pythia_70m.yaml ablations/no_aux.yaml` is base.yaml, the data preset,
then the ablation's delta, rather than base.yaml again over the preset.
Unknown keys, wrong types and out-of-range values are refused at load time with a
`UserError` that names the key and, for a typo, the nearest valid one (ranges, choices and
combinations: gsae_pl/config_checks.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, get_type_hints

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gsae_pl.commands import python_m
from gsae_pl.config_checks import validate
from gsae_pl.data.base import SOURCES, DataConfig
from gsae_pl.errors import UserError
from gsae_pl.eval.base import EvalConfig, eval_schema
from gsae_pl.losses.base import LOSS_TERMS
from gsae_pl.names import check_name
from gsae_pl.ranges import (
    BELOW_ONE,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_OR_NULL,
    UNIT_INTERVAL,
    choices,
)
from gsae_pl.saes.base import ARCHITECTURES, SAECommon
from gsae_pl.yaml_io import YAML_11_ONLY_BOOLEANS, DuplicateKeyError, safe_load_unique_keys


def sae_schema() -> type:
    """The `sae:` block: the common fields and the union of the registered architectures'."""
    return _sae_schema(tuple(ARCHITECTURES.items()))


@functools.cache
def _sae_schema(architectures: tuple) -> type:
    # name -> (field, its type); a name two architectures declare must mean one setting
    found = {f.name: (f, get_type_hints(SAECommon)[f.name]) for f in dataclasses.fields(SAECommon)}
    for name, cls in architectures:
        hints = get_type_hints(cls.Config)
        for f in dataclasses.fields(cls.Config):
            seen, seen_type = found.setdefault(f.name, (f, hints[f.name]))
            if (seen_type, seen.default, seen.default_factory) != \
                    (hints[f.name], f.default, f.default_factory):
                raise RuntimeError(f"sae.architecture={name} declares sae.{f.name} with "
                                   "another type or default than an earlier declaration")
    return dataclasses.make_dataclass("SAEConfig", [
        (name, hint, field(default=f.default, default_factory=f.default_factory,
                           metadata=f.metadata)) for name, (f, hint) in found.items()])


def loss_schema() -> type:
    """The `loss:` block: one sub-block per registered loss term (gsae_pl/losses/base.py)."""
    return _loss_schema(tuple(LOSS_TERMS.items()))


@functools.cache
def _loss_schema(terms: tuple) -> type:
    return dataclasses.make_dataclass("LossConfig", [
        (name, spec.config, field(default_factory=spec.config)) for name, spec in terms])


def data_schema() -> type:
    """The `data:` block: the fields every source shares, then a block per source that
    declares settings of its own (`build.Settings`, gsae_pl/data/base.py)."""
    return _data_schema(tuple(SOURCES.items()))


@functools.cache
def _data_schema(sources: tuple) -> type:
    own = {name: build.Settings for name, build in sources if hasattr(build, "Settings")}
    return dataclasses.make_dataclass("DataConfig", [
        (name, settings, field(default_factory=settings)) for name, settings in own.items()],
        bases=(DataConfig,))


@dataclass
class OptimConfig:
    lr: float = field(default=3.0e-3, metadata=POSITIVE)
    beta1: float = field(default=0.0, metadata=BELOW_ONE)
    beta2: float = field(default=0.999, metadata=BELOW_ONE)
    warmup_steps: int = field(default=100, metadata=NON_NEGATIVE)


@dataclass
class ResampleConfig:
    # Dead-feature resampling (Bricken et al.; docs/method.md sec. 4). The defaults scale the
    # paper's recipe (25000 / 12500 / 1000 steps) down to the 4000-step default run.
    enabled: bool = True
    every_n_steps: int = field(default=500, metadata=POSITIVE)
    max_resamples: int = field(default=4, metadata=NON_NEGATIVE)
    # dead = fired on no row over this many steps before a resample
    window_steps: int = field(default=250, metadata=POSITIVE)
    # new encoder column norm / mean alive encoder column norm
    encoder_scale: float = field(default=0.2, metadata=POSITIVE)
    lr_drop: float = field(default=0.1, metadata=UNIT_INTERVAL)  # lr x this after a resample
    # cosine return to 1x over these steps
    lr_return_steps: int = field(default=200, metadata=POSITIVE)


@dataclass
class LogConfig:
    every_n_steps: int = field(default=50, metadata=POSITIVE)
    histogram_every_n_steps: int = field(default=500, metadata=POSITIVE)
    dense_threshold: float = field(default=0.1, metadata=UNIT_INTERVAL)
    # a plain progress line every this many steps where stdout is no terminal (run/progress.py)
    progress_every_n_steps: int = field(default=100, metadata=POSITIVE)
    # Weights & Biases beside TensorBoard (run/wandb_logger.py)
    wandb: str = field(default="off", metadata=choices("off", "offline", "online"))
    wandb_project: str = "gsae_pl"


@dataclass
class TrainerConfig:
    max_steps: int = field(default=4000, metadata=POSITIVE)
    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"
    num_nodes: int = field(default=1, metadata=POSITIVE)
    precision: str = "32-true"
    gradient_clip_val: Optional[float] = field(default=None, metadata=POSITIVE_OR_NULL)
    enable_progress_bar: bool = True
    deterministic: bool = False


@dataclass
class CheckpointConfig:
    every_n_steps: int = field(default=1000, metadata=POSITIVE)
    keep: int = field(default=3, metadata=POSITIVE)


@dataclass
class OutputConfig:
    dir: str = "tensorboard_logs"
    name: Optional[str] = None  # null: derived from architecture, l1 coefficient and seed
    variant: Optional[str] = None  # label for reports and TensorBoard's HParams (ablate sets it)
    sweep: Optional[str] = None  # the dotted key the suite swept for this run (ablate sets it)


@dataclass
class Config:
    seed: int = 0
    # Built from the registries when a config is made, so a new architecture's or term's
    # fields are in the schema without an edit here.
    sae: Any = field(default_factory=lambda: sae_schema()())
    loss: Any = field(default_factory=lambda: loss_schema()())
    data: Any = field(default_factory=lambda: data_schema()())
    optim: OptimConfig = field(default_factory=OptimConfig)
    resample: ResampleConfig = field(default_factory=ResampleConfig)
    eval: Any = field(default_factory=lambda: eval_schema(EvalConfig)())
    log: LogConfig = field(default_factory=LogConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# Keys that moved: old dotted key -> new one. A file, an override or a saved run config
# (a checkpoint's, a finished run's config.yaml) that uses the old key still means the same
# setting; `migrate` renames it wherever a config enters (README.md lists them: a test
# checks that it names every one).
ALIASES: dict[str, str] = {
    # The sparsity term's coefficient and warm-up live in its own block, like every term's.
    "loss.l1_coefficient": "loss.sparsity.coefficient",
    "loss.l1_warmup_steps": "loss.sparsity.warmup_steps",
    "eval.lm_contexts": "eval.loss_recovered.contexts",  # evaluations are plug-ins (eval/)
}


def migrate(tree: dict, source: str = "a config") -> dict:
    """`tree` (a nested mapping, modified in place) with every aliased key at its new place."""
    for old, new in ALIASES.items():
        *old_parents, old_leaf = old.split(".")
        parent = tree
        for part in old_parents:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or old_leaf not in parent:
            continue
        value = parent.pop(old_leaf)
        *new_parents, new_leaf = new.split(".")
        node = tree
        for part in new_parents:
            node = node.setdefault(part, {})
        if new_leaf in node:
            raise UserError(f"{source} sets both {old} and {new}, which is its new name: "
                            f"keep {new}")
        node[new_leaf] = value
    return tree


def from_saved(saved: dict, source: str) -> DictConfig:
    """A saved run config (a checkpoint's, a finished run's config.yaml) in today's schema:
    renamed keys at their new place, keys added since at their defaults."""
    tree = OmegaConf.to_container(OmegaConf.create(saved))  # a plain copy (of a DictConfig too)
    return _merge(OmegaConf.structured(Config), migrate(tree, source), source)


def load_config(paths: str | Path | list | tuple | None,
                overrides: list[str] = ()) -> DictConfig:
    """Schema <- YAML files in order (each after its `defaults` chain, each file once) <-
    `key=value` overrides, validated."""
    cfg = OmegaConf.structured(Config)
    for source, layer in compose_files(paths):
        cfg = _merge(cfg, migrate(layer, source), source=source)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not key=value (e.g. sae.d_sae=2048)")
    cli = _words_stay_words(OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides))),
                            overrides)
    cfg = _merge(cfg, migrate(cli, "the command line"), source="the command line")
    _resolve(cfg)
    check(cfg)
    _check_seed(cfg.seed)
    if cfg.output.name is None:
        cfg.output.name = default_run_name(cfg)
    check_name(cfg.output.name, "output.name=")  # one folder inside output.dir, nowhere else
    return cfg


def check(cfg: DictConfig) -> None:
    """Every range, choice and combination check of a merged config (config_checks.py)."""
    validate(cfg, declared_metadata())


def declared_metadata() -> dict[str, dict]:
    """Dotted key -> field metadata (gsae_pl/ranges.py), for every schema field that
    declares some: what the config checks hold each value to."""
    out: dict[str, dict] = {}

    def walk(schema: type, prefix: str) -> None:
        hints = get_type_hints(schema)
        for f in dataclasses.fields(schema):
            kind = hints[f.name]
            if kind is Any and f.default_factory is not dataclasses.MISSING:
                kind = type(f.default_factory())  # a block built from a registry
            if dataclasses.is_dataclass(kind):
                walk(kind, f"{prefix}{f.name}.")
            elif f.metadata:
                out[f"{prefix}{f.name}"] = dict(f.metadata)

    walk(Config, "")
    return out


def _words_stay_words(tree: dict, overrides) -> dict:
    """`key=on` (off, yes, no) as the word, not YAML 1.1's boolean, as config files read it
    (gsae_pl/yaml_io.py): `output.name=on` names the run "on", not "True"."""
    for item in overrides:
        key, _, text = item.partition("=")
        if text.strip().lower() in YAML_11_ONLY_BOOLEANS:
            *parents, leaf = key.split(".")
            node = tree
            for part in parents:
                node = node[part]
            node[leaf] = text.strip()
    return tree


def default_run_name(cfg: DictConfig) -> str:
    return f"{cfg.sae.architecture}_l1-{cfg.loss.sparsity.coefficient:g}_seed{cfg.seed}"


def compose_files(paths: str | Path | list | tuple | None) -> list[tuple[str, dict]]:
    """(file name, mapping) for every file to merge, in order: first the files that the given
    files' `defaults` name (each chain depth first, in the given order), then the given files
    in order. A file reached a second time is skipped. So a partial file (a recipe with no
    `defaults`) given before an ablation still lands on top of the ablation's base.yaml."""
    if paths is None:
        return []
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    chains = [_file_layers(Path(path)) for path in paths]
    ordered = [entry for chain in chains for entry in chain[:-1]]
    ordered += [chain[-1] for chain in chains]
    layers, merged = [], set()
    for file, layer in ordered:
        if file.resolve() not in merged:
            merged.add(file.resolve())
            layers.append((str(file), layer))
    return layers


def _file_layers(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict]]:
    """The YAML file and, before it, the files its `defaults:` list names (depth first)."""
    if path.is_dir():
        raise UserError(f"config file {path} is a directory: pass a YAML file in it to --config")
    if not path.is_file():
        raise UserError(f"config file {path} not found: pass an existing YAML file to --config")
    if path.resolve() in seen:
        raise UserError(f"config {path} includes itself through `defaults`")
    try:
        data = safe_load_unique_keys(path.read_text()) or {}
    except DuplicateKeyError as err:  # else the last one would win without a word
        raise UserError(f"config file {path} sets {err.key!r} twice in one mapping (lines "
                        f"{err.first_line} and {err.line}): keep one") from None
    except yaml.constructor.ConstructorError as err:  # a tag safe loading has no constructor for
        raise UserError(_unsupported_tag(path, err)) from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise UserError(f"config file {path} is not valid YAML{line}: fix its syntax") from None
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise UserError(f"config file {path} must hold a mapping of keys, not a {kind}")
    if "variants" in data:  # suites and run configs share ablations/ (gsae_pl/suite/spec.py)
        raise UserError(f"{path} is a suite file (it lists variants), not a run config: run "
                        f"{python_m('gsae_pl.ablate', '--suite', Path(path))}")
    layers: list[tuple[Path, dict]] = []
    for parent in _defaults_list(path, data.pop("defaults", None)):
        layers += _file_layers(path.parent / parent, seen + (path.resolve(),))
    return layers + [(path, data)]


def _unsupported_tag(path: Path, err: yaml.constructor.ConstructorError) -> str:
    """A `!!python/...` (or any unknown) tag is valid YAML that safe loading refuses on
    purpose: such tags build Python objects, and building them can run code."""
    tag = re.search(r"tag '([^']*)'", str(err.problem))
    shown = (tag.group(1).replace("tag:yaml.org,2002:", "!!") if tag else "a tag")
    where = err.problem_mark or err.context_mark
    line = f" at line {where.line + 1}" if where else ""
    return (f"config file {path} uses the YAML tag {shown}{line}, which is not supported: "
            "tags that build Python objects are refused for safety (they can run code); "
            "write a plain value")


def _defaults_list(path: Path, defaults: Any) -> list[str]:
    """`defaults:` as a list of file names; one name alone (`defaults: base.yaml`) is one file,
    not a list of its characters."""
    if defaults is None:
        return []
    if isinstance(defaults, str):
        return [defaults]
    if isinstance(defaults, list) and all(isinstance(name, str) for name in defaults):
        return defaults
    raise UserError(f"config file {path}: `defaults` must be a file name or a list of file "
                    f"names, not {defaults!r}")


def _resolve(cfg: DictConfig) -> None:
    """Resolve every ${...} now, so a missing key or environment variable is bad input here
    rather than a traceback wherever the value is first read."""
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "a config value"
        reason = str(err).splitlines()[0]
        raise UserError(f"cannot resolve the interpolation in {key}: {reason}: set it, or "
                        "give the key a plain value") from None


# Lightning's seed_everything (numpy's generator) takes seeds in [0, 2**32 - 1].
SEED_RANGE = (0, 2**32 - 1)


def _check_seed(seed: int) -> None:
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise UserError(f"seed={seed} must lie in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] "
                        "(the range Lightning and numpy accept)")


def _merge(cfg: DictConfig, layer: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, layer)
    except OmegaConfBaseException as err:
        raise UserError(_explain(err, source)) from None


def _explain(err: OmegaConfBaseException, source: str) -> str:
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
    msg = str(err).splitlines()[0]
    if "not in" in msg or "Key '" in msg and "not" in msg:
        parent = str(key).rpartition(".")[0]
        valid = _keys_under(parent)
        hints = suggest_keys(str(key))
        near = f"; did you mean {' or '.join(hints)}?" if hints else ""
        where = f" under {parent}" if parent else ""
        return f"unknown config key {key} in {source}{near} (valid keys{where}: {', '.join(valid)})"
    target = f"config key {key}" if key != "?" else "a config value"
    return f"bad value for {target} in {source}: {msg}"


def suggest_keys(key: str) -> list[str]:
    """What an unknown dotted `key` most likely meant, best first: keys with the same last
    part in any section (`l1_coefficient` -> `loss.sparsity.coefficient`, its old name
    shown too: a missing section is the commonest slip), else the nearest spelling under the
    same parent (`sae.d_sea` -> `sae.d_sae`) or of a last part in any section."""
    parent, _, leaf = key.rpartition(".")
    schema = _all_keys(OmegaConf.structured(Config))
    renamed = [f"{new} (old name {old})" for old, new in ALIASES.items()
               if old.rpartition(".")[2] == leaf and old != key]
    same_leaf = [k for k in schema if k.rpartition(".")[2] == leaf and k != key]
    if renamed or same_leaf:
        return (renamed + same_leaf)[:4]
    # The nearest spelling: under the same parent (from 0.5 similar; it wins a tie) or in
    # any section (from 0.75): `dsae` -> `sae.d_sae`, not the section `sae`.
    scored = [(_similar(leaf, name), 1, ".".join(filter(None, [parent, name])))
              for name in _keys_under(parent) if _similar(leaf, name) >= 0.5]
    scored += [(_similar(leaf, k.rpartition(".")[2]), 0, k) for k in schema
               if _similar(leaf, k.rpartition(".")[2]) >= 0.75]
    return [max(scored)[2]] if scored else []


def _similar(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a, b).ratio()


def _all_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, blocks and leaves, in schema order."""
    out = []
    for name in node.keys():
        out.append(f"{prefix}{name}")
        child = node.get(name)
        if isinstance(child, DictConfig):
            out += _all_keys(child, f"{prefix}{name}.")
    return out


def _keys_under(dotted: str) -> list[str]:
    node: Any = OmegaConf.structured(Config)
    for part in filter(None, dotted.split(".")):
        node = node.get(part) if isinstance(node, DictConfig) else None
    return list(node.keys()) if isinstance(node, DictConfig) else []


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
