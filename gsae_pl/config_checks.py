"""Checks on a merged config that its types cannot express: choices, ranges, and
combinations of settings that cannot work together (gsae_pl/config.py calls `validate`).

Each refusal is a `UserError` naming the key, its value and what to do instead. Choices
and ranges come from the schema's field metadata, handed in by gsae_pl/config.py
(gsae_pl/ranges.py: `choices`, a tuple or a function returning one, e.g. a registry's names;
`range`), combination checks from the architecture and the loss terms themselves.
"""

from __future__ import annotations

import math

from omegaconf import DictConfig, OmegaConf

from gsae_pl.data.local_models import MODELS, lookup
from gsae_pl.errors import UserError
from gsae_pl.eval.base import milestone_steps
from gsae_pl.losses.base import LOSS_TERMS
from gsae_pl.resample_schedule import resample_steps
from gsae_pl.saes.base import ARCHITECTURES


def validate(cfg: DictConfig, declared: dict[str, dict]) -> None:
    """Ranges and choices the schema's types cannot express, as its fields declare them in
    `declared` (dotted key -> field metadata, gsae_pl/ranges.py), then the combinations."""
    get = lambda key: OmegaConf.select(cfg, key)
    choices = {key: meta["choices"] for key, meta in declared.items() if "choices" in meta}
    for key, allowed in choices.items():
        allowed = allowed() if callable(allowed) else allowed
        if get(key) not in allowed:
            shown = ", ".join("null" if a is None else a for a in allowed)
            raise UserError(f"{key}={get(key)} is not one of: {shown}")
    ranged = lambda kind: tuple(k for k, meta in declared.items() if meta.get("range") == kind)
    positive, non_negative = ranged("positive"), ranged("non_negative")
    unit_interval = ranged("unit_interval") + ranged("below_one")
    for key in positive + non_negative + unit_interval:  # nan passes no comparison below
        if not math.isfinite(get(key)):
            raise UserError(f"{key}={get(key)} must be a finite number")
    for key in positive:
        if not get(key) > 0:
            raise UserError(f"{key}={get(key)} must be > 0")
    for key in non_negative:
        if get(key) < 0:
            raise UserError(f"{key}={get(key)} must be >= 0")
    for key in unit_interval:
        if not 0 <= get(key) <= 1:
            raise UserError(f"{key}={get(key)} must lie in [0, 1]")
    for key in ranged("below_one"):
        if get(key) >= 1:
            raise UserError(f"{key}={get(key)} must lie in [0, 1) (Adam's moment decay: at 1 "
                            "a moment never forgets): set it below 1")
    for key in ranged("positive_or_null"):
        value = get(key)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UserError(f"{key}={value} must be a finite number > 0, or null for none")
    _validate_combinations(cfg)


def _validate_combinations(cfg: DictConfig) -> None:
    architecture = ARCHITECTURES[cfg.sae.architecture]
    for name, term in LOSS_TERMS.items():
        missing = [f for f in term.reads if f not in architecture.provides]
        if cfg.loss[name].enabled and missing:
            raise UserError(f"loss.{name} reads {', '.join(missing)}, which sae.architecture="
                            f"{cfg.sae.architecture} does not compute: set "
                            f"loss.{name}.enabled=false")
        term.check(cfg)
    if cfg.resample.enabled and cfg.resample.window_steps > cfg.resample.every_n_steps:
        raise UserError(f"resample.window_steps={cfg.resample.window_steps} must be <= "
                        f"resample.every_n_steps={cfg.resample.every_n_steps}")
    architecture.check(cfg)
    if cfg.resample.enabled:  # after the architecture's checks, whose messages are more specific
        _validate_resample_end(cfg)
    _validate_lm_data(cfg.data)
    milestone_steps(cfg)  # eval.at_tokens: increasing, within the run, on distinct steps
    if cfg.data.source == "file" and not cfg.data.path:
        raise UserError("data.source=file needs data.path=FILE (.npy, .safetensors or .pt)")
    syn = cfg.data.synthetic
    if cfg.data.source == "synthetic" and syn.correlated_groups * syn.group_size > syn.n_features:
        raise UserError("data.synthetic.correlated_groups * group_size exceeds n_features")


def _validate_resample_end(cfg: DictConfig) -> None:
    """Every resample inside the run must leave resample.lr_return_steps steps before the end.

    Decision (margin = lr_return_steps): by then the lr is back to 1x and the new features
    have trained as long as the recipe lets them settle; a resample later than that leaves
    the final metrics measuring half-trained, freshly re-initialised features.
    """
    max_steps, margin = cfg.trainer.max_steps, cfg.resample.lr_return_steps
    inside = [step for step in resample_steps(cfg.resample) if step <= max_steps]
    fit = [step for step in inside if step + margin <= max_steps]
    if len(fit) < len(inside):
        raise UserError(f"resample at step {inside[-1]} leaves {max_steps - inside[-1]} of the "
                        f"resample.lr_return_steps={margin} steps it needs before "
                        f"trainer.max_steps={max_steps}: set resample.max_resamples={len(fit)}"
                        f"{_scaled_schedule(cfg)}, or train longer (configs/quick.yaml is "
                        "the default run in 1000 steps)")


def _scaled_schedule(cfg: DictConfig) -> str:
    """The overrides that keep every resample, spread over the run so the last leaves its
    lr_return_steps; empty when they cannot fit."""
    r, max_steps = cfg.resample, cfg.trainer.max_steps
    every = (max_steps - r.lr_return_steps) // max(r.max_resamples, 1)
    if every < 1:
        return ""
    return (f", or keep {r.max_resamples} resamples with resample.every_n_steps={every} "
            f"resample.window_steps={min(r.window_steps, every)}")


def _validate_lm_data(data: DictConfig) -> None:
    # A named local model brings its own text. Whether its package is installed is checked
    # when the source is built, so its config still loads (and prints) on any machine.
    named = data.source == "transformer_lens" and lookup(data.model) is not None
    if data.source == "transformer_lens" and not named and not (data.model and data.dataset):
        raise UserError("data.source=transformer_lens needs data.model=HUB_NAME_OR_DIR and "
                        "data.dataset=HUB_NAME_OR_FILE (see configs/data/), or a named local "
                        f"model ({', '.join(MODELS)}; its text is optional), or use "
                        "data.source=tiny_lm, which works offline")
    if data.source == "tiny_lm" and data.model:
        raise UserError(f"data.model={data.model} is read only by data.source=transformer_lens"
                        "; tiny_lm is its own model: set data.model=null")
    if data.context_size < 2:
        raise UserError(f"data.context_size={data.context_size} must be >= 2 (BOS + a token)")
    if data.cache_rows is not None and data.cache_rows <= 0:
        raise UserError(f"data.cache_rows={data.cache_rows} must be > 0, or null")
