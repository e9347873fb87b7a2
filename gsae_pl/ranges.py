"""Field metadata that the config checks read (gsae_pl/config_checks.py): the one way a
schema field declares its range or its choices, wherever the field is declared.

    d_sae: int = field(default=512, metadata=POSITIVE)
    kernel: str = field(default="auto", metadata=choices("auto", "dense", "sparse"))

`choices` also takes a function returning the tuple, e.g. a registry's `names`, so that the
list is read when a config is checked, after every plug-in has registered.
"""

from __future__ import annotations

from collections.abc import Callable

POSITIVE = {"range": "positive"}  # > 0
NON_NEGATIVE = {"range": "non_negative"}  # >= 0
UNIT_INTERVAL = {"range": "unit_interval"}  # in [0, 1]
# In [0, 1): Adam's betas (torch refuses 1, a moment that never forgets, but only once
# training starts, after the run directory is written).
BELOW_ONE = {"range": "below_one"}
# > 0 when set; null switches the setting off (Lightning skips clipping at a value <= 0
# without a word, so -1 would train unclipped while the config says clipped).
POSITIVE_OR_NULL = {"range": "positive_or_null"}
RANGES = ("positive", "non_negative", "unit_interval", "below_one", "positive_or_null")


def choices(*options) -> dict:
    """One of `options` (None is written `null`), or of what a function returns."""
    if len(options) == 1 and isinstance(options[0], Callable):
        return {"choices": options[0]}
    return {"choices": tuple(options)}
