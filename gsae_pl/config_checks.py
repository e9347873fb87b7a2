"""Checks on a merged config that its types cannot express: choices, ranges, and
combinations of settings that cannot work together (gsae_pl/config.py calls `validate`).

Each refusal is a `UserError` naming the key, its value and what to do instead. Choices
and ranges of the `sae:` and `loss:` fields come from the schema's field metadata
(`choices`: a tuple or a function returning one, e.g. the architecture registry's names;
`range`), combination checks from the architecture and the loss terms themselves.
"""

from __future__ import annotations

import dataclasses
import math
import typing

from omegaconf import DictConfig, OmegaConf

from gsae_pl.data.base import SOURCES
from gsae_pl.errors import UserError

CHOICES = {
    "data.source": SOURCES,  # the registered sources (gsae_pl/data/base.py)
    "data.dtype": ("float32", "bfloat16", "float16"),
    "data.cache_dtype": ("float32", "float16"),
}
POSITIVE = ("sae.d_sae", "data.batch_size", "data.normalize_rows", "eval.rows",
            "data.buffer_size", "data.lm_batch_size",
            "trainer.max_steps", "log.every_n_steps", "log.histogram_every_n_steps",
            "eval.every_n_steps", "checkpoint.every_n_steps", "checkpoint.keep",
            "optim.lr", "data.synthetic.d_in", "data.synthetic.n_features",
            "data.synthetic.avg_active", "data.synthetic.group_size", "trainer.num_nodes",
            "resample.every_n_steps", "resample.window_steps", "resample.encoder_scale",
            "resample.lr_return_steps")
NON_NEGATIVE = ("eval.loss_recovered.contexts", "optim.warmup_steps",
                "data.synthetic.magnitude_noise",
                "data.synthetic.frequency_exponent", "data.synthetic.correlated_groups",
                "resample.max_resamples")
# Adam's betas: torch.optim.Adam refuses 1 (a moment that never forgets), and it would do
# so only once training starts, after the run directory is written.
BELOW_ONE = ("optim.beta1", "optim.beta2")
UNIT_INTERVAL = BELOW_ONE + ("log.dense_threshold",
                 "data.synthetic.co_fire_prob", "data.synthetic.min_frequency_ratio",
                 "resample.lr_drop")
# Positive when set; null switches the setting off (Lightning skips clipping at a value <= 0
# without a word, so -1 would train unclipped while the config says clipped).
POSITIVE_OR_NULL = ("trainer.gradient_clip_val",)


def validate(cfg: DictConfig) -> None:
    """Ranges and choices the schema's types cannot express."""
    get = lambda key: OmegaConf.select(cfg, key)
    declared = declared_metadata()
    choices = {**{key: meta["choices"] for key, meta in declared.items() if "choices" in meta},
               **CHOICES}
    for key, allowed in choices.items():
        allowed = allowed() if callable(allowed) else allowed
        if get(key) not in allowed:
            shown = ", ".join("null" if a is None else a for a in allowed)
            raise UserError(f"{key}={get(key)} is not one of: {shown}")
    ranged = lambda kind: tuple(k for k, meta in declared.items() if meta.get("range") == kind)
    positive, non_negative = POSITIVE + ranged("positive"), NON_NEGATIVE + ranged("non_negative")
    unit_interval = UNIT_INTERVAL + ranged("unit_interval")
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
    for key in BELOW_ONE:
        if get(key) >= 1:
            raise UserError(f"{key}={get(key)} must lie in [0, 1) (Adam's moment decay: at 1 "
                            "a moment never forgets): set it below 1")
    for key in POSITIVE_OR_NULL:
        value = get(key)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UserError(f"{key}={value} must be a finite number > 0, or null for none")
    _validate_combinations(cfg)


def declared_metadata() -> dict[str, dict]:
    """Dotted key -> field metadata, for every schema field that declares some."""
    from gsae_pl.config import Config  # here: config.py imports this module

    out: dict[str, dict] = {}

    def walk(schema: type, prefix: str) -> None:
        hints = typing.get_type_hints(schema)
        for f in dataclasses.fields(schema):
            kind = hints[f.name]
            if kind is typing.Any and f.default_factory is not dataclasses.MISSING:
                kind = type(f.default_factory())  # a block built from a registry
            if dataclasses.is_dataclass(kind):
                walk(kind, f"{prefix}{f.name}.")
            elif f.metadata:
                out[f"{prefix}{f.name}"] = dict(f.metadata)

    walk(Config, "")
    return out


def _validate_combinations(cfg: DictConfig) -> None:
    from gsae_pl.losses import LOSS_TERMS
    from gsae_pl.saes import ARCHITECTURES

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
    from gsae_pl.run.resample import resample_steps  # here: it brings lightning, only needed now

    max_steps, margin = cfg.trainer.max_steps, cfg.resample.lr_return_steps
    inside = [step for step in resample_steps(cfg.resample) if step <= max_steps]
    fit = [step for step in inside if step + margin <= max_steps]
    if len(fit) < len(inside):
        raise UserError(f"resample at step {inside[-1]} leaves {max_steps - inside[-1]} of the "
                        f"resample.lr_return_steps={margin} steps it needs before "
                        f"trainer.max_steps={max_steps}: set resample.max_resamples={len(fit)}"
                        ", resample less often, or train longer")


def _validate_lm_data(data: DictConfig) -> None:
    from gsae_pl.data.local_models import MODELS, lookup

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
