"""Checks on a merged config that its types cannot express: choices, ranges, and
combinations of settings that cannot work together (gsae_pl/config.py calls `validate`).

Each refusal is a `UserError` naming the key, its value and what to do instead.
"""

from __future__ import annotations

import math

from omegaconf import DictConfig, OmegaConf

from gsae_pl.data.base import SOURCES
from gsae_pl.errors import UserError

CHOICES = {
    "sae.architecture": ("relu", "gated", "prolu", "rescale_shift"),
    "sae.prolu_backward": ("relu", "ste"),
    "sae.weight_sharing": ("r_mag", "no_r_mag", "untied"),
    "sae.b_dec_init": ("zeros", "mean", "geometric_median"),
    "sae.kernel": ("auto", "reference", "dense", "sparse"),
    "sae.compile": ("auto", "always", "never"),
    "loss.sparsity.kind": ("l1", "decoder_norm_l1"),
    "loss.aux.decoder": ("frozen", "unfrozen"),
    "loss.aux.b_dec": (None, "frozen", "unfrozen"),
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
NON_NEGATIVE = ("eval.lm_contexts", "loss.l1_coefficient", "loss.l1_warmup_steps",
                "loss.reconstruction.coefficient",
                "loss.aux.coefficient", "optim.warmup_steps", "data.synthetic.magnitude_noise",
                "data.synthetic.frequency_exponent", "data.synthetic.correlated_groups",
                "loss.orthogonality.coefficient", "resample.max_resamples")
UNIT_INTERVAL = ("optim.beta1", "optim.beta2", "log.dense_threshold",
                 "data.synthetic.co_fire_prob", "data.synthetic.min_frequency_ratio",
                 "resample.lr_drop")


def validate(cfg: DictConfig) -> None:
    """Ranges and choices the schema's types cannot express."""
    get = lambda key: OmegaConf.select(cfg, key)
    for key, allowed in CHOICES.items():
        if get(key) not in allowed:
            shown = ", ".join("null" if a is None else a for a in allowed)
            raise UserError(f"{key}={get(key)} is not one of: {shown}")
    for key in POSITIVE + NON_NEGATIVE + UNIT_INTERVAL:  # nan passes no comparison below
        if not math.isfinite(get(key)):
            raise UserError(f"{key}={get(key)} must be a finite number")
    for key in POSITIVE:
        if not get(key) > 0:
            raise UserError(f"{key}={get(key)} must be > 0")
    for key in NON_NEGATIVE:
        if get(key) < 0:
            raise UserError(f"{key}={get(key)} must be >= 0")
    for key in UNIT_INTERVAL:
        if not 0 <= get(key) <= 1:
            raise UserError(f"{key}={get(key)} must lie in [0, 1]")
    _validate_combinations(cfg)


def _validate_combinations(cfg: DictConfig) -> None:
    if cfg.loss.aux.enabled and cfg.sae.architecture != "gated":
        raise UserError(f"loss.aux needs a gate, which sae.architecture={cfg.sae.architecture} "
                        "has not: set loss.aux.enabled=false")
    if cfg.loss.sparsity.kind == "decoder_norm_l1" and cfg.sae.unit_norm_decoder:
        raise UserError("loss.sparsity.kind=decoder_norm_l1 is plain L1 under unit-norm decoder "
                        "rows: also set sae.unit_norm_decoder=false")
    if (cfg.loss.sparsity.kind == "decoder_norm_l1" and cfg.loss.aux.enabled
            and cfg.loss.aux.decoder == "frozen"):
        # The penalty shrinks the rows and the frozen aux decoder (sg(W_dec)) never pushes
        # back: rows collapse (review: median norm 0.10, L0 3.4x). docs/method.md sec. 2.
        raise UserError("loss.sparsity.kind=decoder_norm_l1 with loss.aux.decoder=frozen lets "
                        "the penalty shrink the decoder rows unopposed: set "
                        "loss.aux.decoder=unfrozen (or loss.aux.enabled=false)")
    _validate_model_side(cfg)
    if cfg.sae.architecture == "rescale_shift":
        _validate_rescale_shift(cfg)
    if cfg.resample.enabled:  # after rescale_shift's check, whose message is more specific
        _validate_resample_end(cfg)
    _validate_lm_data(cfg.data)
    if cfg.data.source == "file" and not cfg.data.path:
        raise UserError("data.source=file needs data.path=FILE (.npy, .safetensors or .pt)")
    syn = cfg.data.synthetic
    if cfg.data.source == "synthetic" and syn.correlated_groups * syn.group_size > syn.n_features:
        raise UserError("data.synthetic.correlated_groups * group_size exceeds n_features")


def _validate_model_side(cfg: DictConfig) -> None:
    if not cfg.loss.orthogonality.exponent > 1:
        raise UserError(f"loss.orthogonality.exponent={cfg.loss.orthogonality.exponent} must be "
                        "> 1: the penalty |cos|^exponent is super-linear (docs/method.md sec. 5)")
    if cfg.resample.enabled and cfg.resample.window_steps > cfg.resample.every_n_steps:
        raise UserError(f"resample.window_steps={cfg.resample.window_steps} must be <= "
                        f"resample.every_n_steps={cfg.resample.every_n_steps}")


def _validate_rescale_shift(cfg: DictConfig) -> None:
    steps, max_steps = cfg.sae.rescale_shift_steps, cfg.trainer.max_steps
    if not 0 < steps < max_steps:
        raise UserError(f"sae.rescale_shift_steps={steps} must lie strictly between 0 and "
                        f"trainer.max_steps={max_steps}: stage 1 trains the baseline first")
    if cfg.sae.weight_sharing != "r_mag":
        raise UserError(f"sae.architecture=rescale_shift learns r_mag (sec. 3 item 4): set "
                        f"sae.weight_sharing=r_mag, not {cfg.sae.weight_sharing}")
    # A resample at step s runs after the s-th optimiser step, s = max_steps included.
    from gsae_pl.resample import resample_steps  # here: it brings lightning, only needed now

    done = [step for step in resample_steps(cfg.resample) if step <= max_steps]
    if done and done[-1] > max_steps - steps:
        raise UserError(f"resample at step {done[-1]} falls inside stage 2, which starts at "
                        f"step {max_steps - steps} (trainer.max_steps - sae.rescale_shift_steps)"
                        ": resample less often, fewer times, or shorten stage 2")


def _validate_resample_end(cfg: DictConfig) -> None:
    """Every resample inside the run must leave resample.lr_return_steps steps before the end.

    Decision (margin = lr_return_steps): by then the lr is back to 1x and the new features
    have trained as long as the recipe lets them settle; a resample later than that leaves
    the final metrics measuring half-trained, freshly re-initialised features.
    """
    from gsae_pl.resample import resample_steps  # here: it brings lightning, only needed now

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
