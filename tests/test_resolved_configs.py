"""Every shipped YAML resolves to the same runs as at the snapshot
(tests/data/resolved_configs.json, written by `python -m tests.data.resolved_configs`
before the open-architecture refactor).

Keys may move or appear; each such difference is stated below with its reason, and a value
may never change silently.
"""

from __future__ import annotations

import json

import pytest

from tests.data.resolved_configs import SNAPSHOT, resolve_all

# old dotted key -> new dotted key: the same setting under its new name.
RENAMED: dict[str, str] = {
    # the sparsity term's coefficient and warm-up moved into its block, like every term's
    # (config.ALIASES keeps the old keys working)
    "loss.l1_coefficient": "loss.sparsity.coefficient",
    "loss.l1_warmup_steps": "loss.sparsity.warmup_steps",
    # Evaluations became plug-ins with their own blocks (gsae_pl/eval/); config.ALIASES.
    "eval.lm_contexts": "eval.loss_recovered.contexts",
}
# Dotted keys that did not exist at the snapshot take the default their dataclass declares
# (`defaults` below: a new plug-in's fields need no entry here), except these, whose value
# in shipped runs is not that default: the key -> the value every shipped run gets, or a
# function of the run's name ('' for a run config file) giving it.
ADDED: dict[str, object] = {
    # the key a suite swept (suite runs: the sparsity coefficient, all of them); plain: null
    "output.sweep": lambda name: "loss.sparsity.coefficient" if name else None,
}

def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def defaults() -> dict[str, object]:
    """Every schema key at the default its dataclass declares."""
    from omegaconf import OmegaConf

    from gsae_pl.config import Config

    return flatten(OmegaConf.to_container(OmegaConf.structured(Config)))


def migrated(old: dict, name: str, declared: dict[str, object]) -> dict[str, object]:
    flat = {RENAMED.get(key, key): value for key, value in flatten(old).items()}
    added = {key: value for key, value in declared.items() if key not in flat}
    return {**added, **flat, **{key: value(name) if callable(value) else value
                                for key, value in ADDED.items()}}


@pytest.mark.slow  # 30-60 s: ~400 runs resolved through OmegaConf
def test_every_shipped_yaml_resolves_to_the_snapshot_runs():
    before = json.loads(SNAPSHOT.read_text())
    now, declared = resolve_all(), defaults()
    assert set(before) <= set(now), "shipped YAML files removed"  # new ones: recipes
    for path, runs in before.items():
        assert sorted(now[path]) == sorted(runs), f"{path}: run names changed"
        for name, cfg in runs.items():
            got, want = flatten(now[path][name]), migrated(cfg, name, declared)
            diff = {k: (want.get(k, "<absent>"), got.get(k, "<absent>"))
                    for k in set(got) | set(want) if got.get(k, "<?>") != want.get(k, "<?>")}
            assert not diff, f"{path} run {name or '(the file)'}: (snapshot, now) {diff}"
