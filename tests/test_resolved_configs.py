"""Every shipped YAML resolves to the same runs as at the snapshot
(tests/data/resolved_configs.json, written by `python -m tests.data.resolved_configs`
before the open-architecture refactor).

Keys may move or appear; each such difference is stated below with its reason, and a value
may never change silently.
"""

from __future__ import annotations

import json

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
# dotted keys that did not exist at the snapshot -> the value every shipped run gets, or a
# function of the run's name ('' for a run config file) giving it.
ADDED: dict[str, object] = {
    # every loss term's block now has a warm-up (losses/base.py TermConfig); 0 is none,
    # the coefficient these terms always had
    "loss.reconstruction.warmup_steps": 0,
    "loss.aux.warmup_steps": 0,
    "loss.orthogonality.warmup_steps": 0,
    # the key a suite swept (suite runs: the sparsity coefficient, all of them); plain: null
    "output.sweep": lambda name: "loss.sparsity.coefficient" if name else None,
    # Each evaluation's switch: on, as every evaluation that applied was before.
    "eval.ground_truth.enabled": True,
    "eval.loss_recovered.enabled": True,
    "eval.reconstruction.enabled": True,
    # The JumpReLU architecture's own fields (gsae_pl/saes/jumprelu.py); no other reads them.
    "sae.bandwidth": 0.001,
    "sae.threshold_init": 0.001,
    "sae.jumprelu_penalty": "l0",
    # The discussion threads' variants (docs/method.md sec. 5): each default is the former
    # behaviour (Heaviside gate, ProLU everywhere, |cos|^p), and the soft-gate FVU's switch.
    "sae.gate": "heaviside",
    "sae.gate_temperature": 1.0,
    "sae.prolu_positive_bias": "prolu",
    "loss.orthogonality.shape": "power",
    "loss.orthogonality.eps": 0.01,
    "eval.soft_gate.enabled": True,
    # The selection SAEs' fields (gsae_pl/saes/topk.py, batchtopk.py) and the AuxK term
    # (gsae_pl/losses/auxk.py), off: read by no shipped run of the snapshot.
    "sae.k": 32,
    "sae.threshold_rate": 0.01,
    "loss.auxk.enabled": False,
    "loss.auxk.coefficient": 0.03125,
    "loss.auxk.warmup_steps": 0,
    "loss.auxk.k_aux": 0,
    "loss.auxk.dead_tokens": 256000,
    # Matryoshka BatchTopK (saes/matryoshka_batchtopk.py, losses/matryoshka.py): off.
    "sae.matryoshka_widths": [],
    "loss.matryoshka.enabled": False,
    "loss.matryoshka.coefficient": 1.0,
    "loss.matryoshka.warmup_steps": 0,
    # the linear probes (eval/probes.py): off unless a config turns them on
    "eval.probes.enabled": False,
    "eval.probes.rows": 4096,
    # progress lines and the optional W&B logger (gsae_pl/run/progress.py, wandb_logger.py)
    "log.progress_every_n_steps": 100,
    "log.wandb": "off",
    "log.wandb_project": "gsae_pl",
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


def migrated(old: dict, name: str) -> dict[str, object]:
    flat = {RENAMED.get(key, key): value for key, value in flatten(old).items()}
    return {**flat, **{key: value(name) if callable(value) else value
                       for key, value in ADDED.items()}}


def test_every_shipped_yaml_resolves_to_the_snapshot_runs():
    before = json.loads(SNAPSHOT.read_text())
    now = resolve_all()
    assert set(before) <= set(now), "shipped YAML files removed"  # new ones: recipes
    for path, runs in before.items():
        assert sorted(now[path]) == sorted(runs), f"{path}: run names changed"
        for name, cfg in runs.items():
            got, want = flatten(now[path][name]), migrated(cfg, name)
            diff = {k: (want.get(k, "<absent>"), got.get(k, "<absent>"))
                    for k in set(got) | set(want) if got.get(k, "<?>") != want.get(k, "<?>")}
            assert not diff, f"{path} run {name or '(the file)'}: (snapshot, now) {diff}"
