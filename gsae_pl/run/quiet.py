"""Start-up lines that say nothing about the run, silenced by their exact text: Lightning's
device census ("GPU available: ...", "TPU available: ...", "LOCAL_RANK: 0 -
CUDA_VISIBLE_DEVICES: ..."), its logger advertisement ("💡 Tip: ... litlogger") and the
deprecation warning Lightning 2.6's own pytree helper triggers in torch >= 2.9. Every
other message and warning still shows; `fit` prints the device and the run directory."""

from __future__ import annotations

import logging
import warnings

NOISE_PREFIXES = ("GPU available:", "TPU available:", "HPU available:", "LOCAL_RANK: ",
                  "💡 Tip:")
# Lightning's info lines go through these loggers (lightning_utilities' rank_zero_info,
# the CUDA accelerator's device line).
LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero",
                     "lightning.fabric.utilities.rank_zero", "lightning.pytorch.accelerators.cuda")
KNOWN_DEPRECATIONS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)


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
