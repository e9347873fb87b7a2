"""When dead-feature resampling happens and what it does to the lr: pure functions of the
step and the `resample:` block (docs/method.md sec. 4), read by the config checks, the
architectures with stages and the Resampler (gsae_pl/run/resample.py) alike."""

from __future__ import annotations

import math


def resample_steps(resample_cfg) -> list[int]:
    """The global steps after which a resample runs (none when resampling is off)."""
    if not resample_cfg.enabled:
        return []
    return [resample_cfg.every_n_steps * j for j in range(1, resample_cfg.max_resamples + 1)]


def lr_multiplier(step: int, resample_cfg) -> float:
    """Factor on the lr of optimiser step `step` (0-based: the one after `step` steps)."""
    since = [step - s for s in resample_steps(resample_cfg) if s <= step]
    if not since or min(since) >= resample_cfg.lr_return_steps:
        return 1.0
    progress = min(since) / resample_cfg.lr_return_steps  # in [0, 1)
    drop = resample_cfg.lr_drop
    return drop + (1.0 - drop) * 0.5 * (1.0 - math.cos(math.pi * progress))
