"""Start-up lines that say nothing about the run, silenced by their exact text: Lightning's
device census ("GPU available: ...", "TPU available: ...", "LOCAL_RANK: 0 -
CUDA_VISIBLE_DEVICES: ..."), its logger advertisement ("💡 Tip: ... litlogger") and the
deprecation warning Lightning 2.6's own pytree helper triggers in torch >= 2.9, the note
that a validation after training replaces the callbacks `configure_callbacks` returned
(by the same ones), and Lightning's advice to log the held-out `val/*` metrics with
`sync_dist=True` under DDP: the evaluators reduce their statistics across processes
themselves (EvalContext.reduce_sum, gsae_pl/eval/base.py), so every process logs the same
global value and a second, averaging, reduction would only cost a collective per metric.
Every other message and warning still shows; `fit` prints the device and the run directory."""

from __future__ import annotations

import logging
import warnings

from lightning.fabric.utilities.warnings import PossibleUserWarning

NOISE_PREFIXES = ("GPU available:", "TPU available:", "HPU available:", "LOCAL_RANK: ",
                  "💡 Tip:", "The following callbacks returned in "
                  "`LightningModule.configure_callbacks` will override")
# Lightning's info lines go through these loggers (lightning_utilities' rank_zero_info,
# the CUDA accelerator's device line).
LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero",
                     "lightning.fabric.utilities.rank_zero", "lightning.pytorch.accelerators.cuda")
KNOWN_DEPRECATIONS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)
# Only for the held-out metrics, which SAEModule.on_validation_epoch_end logs already reduced.
REDUCED_ELSEWHERE = r"It is recommended to use `self\.log\('val/.*sync_dist=True\)`"


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(NOISE_PREFIXES)


_FILTER = _DropNoise()


def silence_startup_noise() -> None:
    """Idempotent: a filter is added to a logger once; a warnings filter is deduplicated."""
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    for message in KNOWN_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    warnings.filterwarnings("ignore", message=REDUCED_ELSEWHERE, category=PossibleUserWarning)
